"""CellCLIPConfig: what a config.json may hold, the defaults a published one gets, and the errors
a user with a broken config sees (issue 16)."""

from __future__ import annotations

import json
import locale
import re

import pytest

from napari_cellclip.errors import CheckpointError
from napari_cellclip.losses import LOSSES
from napari_cellclip.model import CellCLIPConfig

SMALL = dict(embed_dim=8, vision_width=16, vision_heads=2, input_channels=3)
SIZES = ("embed_dim", "vision_width", "vision_layers", "vision_heads", "input_channels", "context_length")
#: the keys of the published CellCLIP config.json (no text settings)
PUBLISHED = dict(embed_dim=512, vision_layers=2, vision_width=1536, vision_heads=8, input_channels=5,
                 context_length=77, pooling="attention")


# ------------------------------------------------------------------ sizes
def test_vision_layers_given_as_a_one_element_list_is_that_int():
    cfg = CellCLIPConfig(**SMALL, vision_layers=[3])
    assert cfg.vision_layers == 3 and type(cfg.vision_layers) is int
    assert CellCLIPConfig(**SMALL, vision_layers=(0,)).vision_layers == 0
    with pytest.raises(CheckpointError, match=r"^vision_layers must be an int, got \[1, 2\]$"):
        CellCLIPConfig(**SMALL, vision_layers=[1, 2])


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("bad", [-1, 2.0, True, "4", None])
def test_a_size_that_is_not_a_positive_int_is_refused_by_name(name, bad):
    with pytest.raises(CheckpointError, match=rf"^config {name} must be a positive int, got {re.escape(repr(bad))}$"):
        CellCLIPConfig(**{**SMALL, name: bad})


@pytest.mark.parametrize("name", [n for n in SIZES if n != "vision_layers"])
def test_zero_is_refused_for_every_size_but_the_layer_count(name):
    with pytest.raises(CheckpointError, match=rf"^config {name} must be a positive int, got 0$"):
        CellCLIPConfig(**{**SMALL, name: 0})


def test_the_smallest_sizes_are_accepted():
    """1 for every size, and no transformer layers at all (the CrossChannelFormer reads the CLS token
    after the LNs only)."""
    cfg = CellCLIPConfig(embed_dim=1, vision_width=1, vision_layers=0, vision_heads=1, input_channels=1,
                         context_length=1)
    assert (cfg.embed_dim, cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.input_channels,
            cfg.context_length) == (1, 1, 0, 1, 1, 1)


# ------------------------------------------------------------------ choices: the message names the choices
def test_choice_errors_say_what_is_allowed():
    with pytest.raises(CheckpointError, match=r"^vision_width 16 is not divisible by vision_heads 3$"):
        CellCLIPConfig(**{**SMALL, "vision_heads": 3})
    with pytest.raises(CheckpointError, match=r"^pooling must be 'attention' or 'mean', got 'max'$"):
        CellCLIPConfig(**SMALL, pooling="max")
    with pytest.raises(CheckpointError, match=r"^text_pooling must be auto\|pooler\|mean\|cls, got 'first'$"):
        CellCLIPConfig(**SMALL, text_pooling="first")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"loss must be {'|'.join(LOSSES)}, got 'triplet'") + "$"):
        CellCLIPConfig(**SMALL, loss="triplet")
    assert "cwcl|clip|siglip" in "|".join(LOSSES)
    with pytest.raises(CheckpointError, match=r"^config lists 1 stains \['DNA'\] but input_channels is 3$"):
        CellCLIPConfig(**SMALL, stains=["DNA"])


@pytest.mark.parametrize("mode", ["auto", "pooler", "mean", "cls"])
def test_every_text_pooling_mode_is_accepted(mode):
    assert CellCLIPConfig(**SMALL, text_pooling=mode).text_pooling == mode


def test_null_training_and_extras_are_empty_and_given_ones_kept():
    cfg = CellCLIPConfig(**SMALL, training=None, extras=None)
    assert cfg.training == {} and cfg.extras == {}
    assert not cfg.use_bias and json.loads(cfg.to_json())["embed_dim"] == 8
    kept = CellCLIPConfig(**SMALL, training={"lr": 0.1, "epochs": 3})
    assert kept.training == {"lr": 0.1, "epochs": 3}
    assert CellCLIPConfig.from_dict({**SMALL, "text_encoder": "x", "training": None}).training == {}


# ------------------------------------------------------------------ from_dict
def test_from_dict_refuses_a_non_object():
    with pytest.raises(CheckpointError, match=r"^config must be a JSON object, got list$"):
        CellCLIPConfig.from_dict([1, 2])


def test_from_dict_merges_an_explicit_extras_object_with_unknown_keys():
    cfg = CellCLIPConfig.from_dict({**SMALL, "text_encoder": "x", "extras": {"note": "kept"}, "future": 1})
    assert cfg.extras == {"note": "kept", "future": 1}
    assert cfg.to_dict()["note"] == "kept" and "extras" not in cfg.to_dict()


def test_our_config_missing_keys_takes_the_field_defaults_not_the_published_ones():
    """A config.json of ours names its text encoder; the keys it lacks take the dataclass defaults
    (auto text pooling, DINOv2-giant features, CWCL), not the published model's BERT ones."""
    cfg = CellCLIPConfig.from_dict({**SMALL, "text_encoder": "some-encoder"})
    assert (cfg.text_encoder, cfg.text_pooling, cfg.text_tuning, cfg.loss) == ("some-encoder", "auto", "full", "cwcl")
    assert cfg.image_encoder == "hf:facebook/dinov2-giant"


def test_the_published_config_gets_the_published_models_settings():
    cfg = CellCLIPConfig.from_dict(PUBLISHED)
    assert (cfg.text_encoder, cfg.text_pooling, cfg.text_tuning, cfg.loss) == ("bert-base-cased", "pooler",
                                                                                "full", "cwcl")
    assert cfg.image_encoder == "hf:facebook/dinov2-giant"  # 1536 = DINOv2-giant's width
    assert not cfg.use_bias
    other = CellCLIPConfig.from_dict({**PUBLISHED, "vision_width": 32, "embed_dim": 16})
    assert other.image_encoder is None  # some other encoder: unknown
    siglip = CellCLIPConfig.from_dict({**PUBLISHED, "use_bias": True})
    assert siglip.loss == "siglip" and siglip.use_bias and siglip.extras == {"use_bias": True}
    assert CellCLIPConfig.from_dict({**PUBLISHED, "use_bias": False}).loss == "cwcl"


def test_from_dict_reports_a_malformed_value_as_a_bad_config():
    with pytest.raises(CheckpointError, match=r"^bad config: "):
        CellCLIPConfig.from_dict({**SMALL, "text_encoder": "x", "stains": 5})


# ------------------------------------------------------------------ JSON files
def test_from_json_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "config.json"
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{missing}: no such file") + "$"):
        CellCLIPConfig.from_json_file(missing)
    missing.write_text("{not json")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{missing}: not a readable JSON config (")):
        CellCLIPConfig.from_json_file(missing)


@pytest.fixture
def ascii_locale():
    """The process's text encoding is ASCII (like a C locale; Windows' cp1252 is as bad for UTF-8)."""
    old = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
    except locale.Error:  # pragma: no cover - every libc has C
        pytest.skip("no C locale")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def test_a_utf8_config_reads_whatever_the_locale(tmp_path, ascii_locale):
    path = tmp_path / "config.json"
    cfg = CellCLIPConfig(**SMALL, stains=["Hoechst", "Phalloïdine", "α-tubulin"])
    # as an editor or another tool writes it: UTF-8, not \u-escaped
    path.write_text(json.dumps(cfg.to_dict(), ensure_ascii=False), encoding="utf-8")
    assert "ï".encode() in path.read_bytes()
    assert CellCLIPConfig.from_json_file(path).stains == ["Hoechst", "Phalloïdine", "α-tubulin"]


def test_config_json_is_indented_one_key_per_line():
    text = CellCLIPConfig(**SMALL).to_json()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert lines[1] == '  "embed_dim": 8,'
    assert json.loads(text) == CellCLIPConfig(**SMALL).to_dict()
