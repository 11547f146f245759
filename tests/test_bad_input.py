"""Bad-input corpus (issue 12): each case feeds one kind of bad input or fault and asserts what the
user sees — a one-line error naming the input, a warning naming it with the rest processed, or a
recomputation — never a traceback or a silently wrong number."""

from __future__ import annotations

import pytest

from napari_cellclip.errors import CellClipError


# ------------------------------------------------------------------ command-line options
@pytest.mark.parametrize("argv, words", [
    (["fit", "--vision-heads", "0"], ["--vision-heads", "at least 1"]),
    (["fit", "--lr", "-1"], ["--lr", "above 0"]),
    (["fit", "--lr", "nan"], ["--lr", "finite"]),
    (["fit", "--workers", "-1"], ["--workers", "at least 0"]),
    (["fit", "--grad-clip", "-1"], ["--grad-clip", "at least 0"]),
    (["fit", "--min-lr-ratio", "2"], ["--min-lr-ratio", "at most 1"]),
    (["fit", "--embed-dim", "1000000000"], ["--embed-dim", "at most"]),
    (["fit", "--epochs", "1.5"], ["--epochs", "whole number"]),
    (["evaluate", "--checkpoint", "x", "--batch-size", "0"], ["--batch-size", "at least 1"]),
])
def test_training_cli_refuses_out_of_range_options(argv, words, capsys):
    from training.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and all(w in err for w in words), err


def test_fit_output_that_is_a_file_is_refused(tmp_path, capsys):
    from training.__main__ import main

    f = tmp_path / "run.txt"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--output", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert str(f) in err and "not a folder" in err, err


@pytest.mark.parametrize("argv, words", [
    (["--shard-size", "0"], ["--shard-size", "at least 1"]),
    (["--workers", "-2"], ["--workers", "at least 0"]),
    (["--wait-timeout", "0"], ["--wait-timeout", "above 0"]),
    (["--n-crops", "x"], ["--n-crops", "not a whole number"]),
])
def test_pipeline_cli_refuses_out_of_range_options(argv, words, capsys, tmp_path):
    from napari_cellclip.pipeline import main

    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path), "--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and all(w in err for w in words), err


def test_pipeline_output_that_is_a_file_is_refused(tmp_path, capsys):
    from napari_cellclip.pipeline import main, run_job

    f = tmp_path / "store.parquet"
    f.write_bytes(b"x")
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path), "--checkpoint", str(tmp_path), "--out", str(f)])
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(CellClipError, match="store.parquet.*not a folder"):
        run_job(str(tmp_path), str(tmp_path), f)


@pytest.mark.parametrize("kw, words", [
    ({"grad_clip": -1.0}, "--grad-clip"), ({"vision_heads": 0}, "--vision-heads"),
    ({"lr": float("inf")}, "--lr"), ({"warmup": -0.5}, "--warmup"), ({"keep": -1}, "--keep"),
    ({"bag_min_fields": 4, "bag_max_fields": 2}, "--bag-max-fields"),
])
def test_fit_api_validates_like_the_command_line(kw, words):
    from training.config import FitConfig

    with pytest.raises(CellClipError, match=words):
        FitConfig(**kw)
    assert FitConfig(lr=1e-3, grad_clip=0.0).grad_clip == 0.0  # in range: accepted


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_bert_dir):
    import torch

    from napari_cellclip import model as model_mod

    torch.manual_seed(0)
    cfg = model_mod.CellCLIPConfig(embed_dim=8, vision_width=16, vision_layers=1, vision_heads=2,
                                   input_channels=5, context_length=32, text_encoder=str(tiny_bert_dir),
                                   text_pooling="mean", image_encoder="morphology")
    return model_mod.CellCLIP(cfg).eval().save_pretrained(tmp_path_factory.mktemp("ck") / "model")


def _copy_with(tmp_path, ckpt, file, **changes):
    import json
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / file).read_text())
    cfg.update(changes)
    (d / file).write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("file, changes, words", [
    ("config.json", {"vision_width": 10**9}, "visual.channel_embed"),
    ("config.json", {"embed_dim": 10**9}, "visual.proj"),
    ("config.json", {"vision_layers": 10**6}, "vision_layers is 1000000"),
    ("config.json", {"input_channels": 7, "stains": list("ABCDEFG")}, "visual.channel_embed"),
    ("text/config.json", {"hidden_size": 10**9}, "text encoder config"),
    ("text/config.json", {"num_hidden_layers": 10**6}, "text encoder config"),
])
def test_absurd_checkpoint_config_is_refused_before_anything_is_built(tmp_path, tiny_ckpt, file, changes, words):
    from napari_cellclip.checkpoints import load_model
    from napari_cellclip.errors import CheckpointError

    d = _copy_with(tmp_path, tiny_ckpt, file, **changes)
    with pytest.raises(CheckpointError, match=words) as exc:
        load_model(d, device="cpu")
    assert str(d) in str(exc.value)


def test_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path, tiny_ckpt):
    import shutil

    from safetensors.torch import load_file, save_file

    from napari_cellclip.checkpoints import load_model
    from napari_cellclip.errors import CheckpointError

    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    state = load_file(str(d / "model.safetensors"))
    state["visual.proj"][0, 0] = float("nan")
    state["text_proj.bias"][1] = float("inf")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in .*(visual\.proj|text_proj\.bias)"):
        load_model(d, device="cpu")


def test_truncated_checkpoint_weights_name_the_file(tmp_path, tiny_ckpt):
    import shutil

    from napari_cellclip.checkpoints import load_model
    from napari_cellclip.errors import CheckpointError

    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(d, device="cpu")


# ------------------------------------------------------------------ training faults
def test_resume_skips_a_truncated_checkpoint_cleans_temps_and_logs_each_step_once(tmp_path, cellclip_cache_dir):
    import json
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import load_file

    from napari_cellclip.errors import CellClipWarning
    from training.loop import fit

    kw = dict(embed_dim=16, vision_layers=1, vision_heads=2, quiet=True, no_progress=True, epochs=2, batch_size=2,
              cache_dir=str(cellclip_cache_dir), seed=1, warmup=1)
    full = fit(output=str(tmp_path / "full"), **kw)
    run = tmp_path / "part"
    part = fit(output=str(run), stop_after_steps=3, save_every=1, keep=3, **kw)
    assert part["stopped_early"] and full["steps"] > 3
    ck = run / "checkpoints"
    w = ck / "checkpoint-0000003" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])  # killed mid-write on a file system without atomic rename
    stale = ck / ".checkpoint-0000004.tmp-0123abcd"
    stale.mkdir()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "epoch": 0, "lo')  # a line cut short by the kill
    with pytest.warns(CellClipWarning) as got:
        resumed = fit(output=str(run), resume=True, **kw)
    said = " ".join(str(w.message) for w in got)
    assert "checkpoint-0000003" in said and "damaged" in said and str(stale) in said
    assert resumed["steps"] == full["steps"] and not stale.exists()
    a = load_file(str(Path(full["model"]) / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, full["steps"] + 1))


def test_resume_with_every_checkpoint_damaged_stops_with_a_clear_error(tmp_path, cellclip_cache_dir):
    from napari_cellclip.errors import CheckpointError
    from training.loop import fit

    kw = dict(embed_dim=16, vision_layers=1, vision_heads=2, quiet=True, no_progress=True, epochs=2, batch_size=2,
              cache_dir=str(cellclip_cache_dir))
    run = tmp_path / "part"
    fit(output=str(run), stop_after_steps=2, **kw)
    for st in (run / "checkpoints").glob("checkpoint-*/training_state.pt"):
        st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"checkpoint-0000002.*damaged"), pytest.warns(Warning):
        fit(output=str(run), resume=True, **kw)


# ------------------------------------------------------------------ stores and queries
def _store(n=4, dim=8, scale=1.0):
    import numpy as np
    import pandas as pd

    from napari_cellclip.store import EmbeddingStore, l2_normalize

    rng = np.random.default_rng(0)
    emb = l2_normalize(rng.normal(size=(n, dim)).astype(np.float32)) * scale
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"A{i + 1:02d}" for i in range(n)],
                           "Metadata_Site": 1})
    return EmbeddingStore(emb, fields, "m", normalize=False)


@pytest.mark.parametrize("damage, words", [
    (lambda e: e.__imul__(3.0), "row 0 has length 3"),
    (lambda e: e.__setitem__((2, 1), float("nan")), "row 2 has length nan"),
])
def test_store_with_non_unit_embeddings_is_refused_on_load(tmp_path, damage, words):
    import numpy as np

    from napari_cellclip.store import EmbeddingStore, StoreError

    import json

    _store().save(tmp_path / "s")
    f = tmp_path / "s" / "embeddings.npy"
    emb = np.load(f)
    damage(emb)
    np.save(f, emb)
    meta = tmp_path / "s" / "store.json"  # as a store without checksums (an older one, or another tool's)
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "checksums"}))
    for mmap in (False, True):
        with pytest.raises(StoreError, match=words) as exc:
            EmbeddingStore.load(tmp_path / "s", mmap=mmap)
        assert "embeddings.npy" in str(exc.value)
    _store(scale=1.0).save(tmp_path / "ok")
    assert EmbeddingStore.load(tmp_path / "ok").embeddings.shape == (4, 8)  # unit rows load


@pytest.mark.parametrize("name", ["embeddings.npy", "fields.parquet"])
def test_a_flipped_bit_in_a_store_is_refused_on_load(tmp_path, name):
    """The last bit of the last embedding (its row still unit length to 1e-7) or of the fields table:
    the file no longer matches the checksum store.json holds for it."""
    from napari_cellclip.store import EmbeddingStore, StoreError

    _store().save(tmp_path / "s")
    f = tmp_path / "s" / name
    data = bytearray(f.read_bytes())
    at = len(data) - 4 if name == "embeddings.npy" else len(data) // 2  # float32 low byte / inside a page
    data[at] ^= 0x01
    f.write_bytes(bytes(data))
    for mmap in (False, True):
        with pytest.raises(StoreError, match="do not match the checksum") as exc:
            EmbeddingStore.load(tmp_path / "s", mmap=mmap)
        assert name in str(exc.value)


@pytest.mark.parametrize("text", ["\u200b\u200b", "\x07\x01\x1b", " \u200d\ufeff ", "\u2063"])
def test_queries_that_tokenise_to_nothing_are_refused(tiny_ckpt, text):
    from napari_cellclip.checkpoints import load_model
    from napari_cellclip.errors import QueryError

    model = load_model(tiny_ckpt, device="cpu")
    with pytest.raises(QueryError, match="no words"):
        model.encode_prompts([text])
    assert model.encode_prompts(["A549 cells treated with compound: lonafarnib"]).shape == (1, 8)


def test_evaluate_with_a_correction_the_checkpoint_was_not_trained_with_warns_and_says_so(trained_checkpoint,
                                                                                          cellclip_cache_dir):
    from napari_cellclip.errors import CellClipWarning
    from training.evaluate import evaluate_checkpoint

    with pytest.warns(CellClipWarning, match=r"--correction none overrides the 'tvn' correction"):
        rep = evaluate_checkpoint(trained_checkpoint, correction="none", device="cpu", cache_dir=cellclip_cache_dir,
                                  quiet=True, no_progress=True)
    assert "overrides" in rep["correction_override"]
    own = evaluate_checkpoint(trained_checkpoint, device="cpu", cache_dir=cellclip_cache_dir, quiet=True,
                              no_progress=True)
    assert "correction_override" not in own


# ------------------------------------------------------------------ images
def _plate(tmp_path, planes):
    """A fields table of one plate, one field per plane list (one plane per stain), as float/uint TIFFs."""
    import pandas as pd
    import tifffile

    rows = []
    for i, chans in enumerate(planes):
        rec = {"Metadata_Plate": "P1", "Metadata_Well": f"A{i + 1:02d}", "Metadata_Site": 1}
        for s, img in zip(("DNA", "AGP"), chans):
            name = f"A{i + 1:02d}_{s}.tif"
            tifffile.imwrite(tmp_path / name, img)
            rec[f"FileName_Orig{s}"], rec[f"PathName_Orig{s}"] = name, str(tmp_path)
        rows.append(rec)
    return pd.DataFrame(rows)


def test_nan_and_inf_pixels_are_named_and_do_not_poison_the_plate(tmp_path):
    import numpy as np

    from napari_cellclip._reader import fields_layer_data
    from napari_cellclip.errors import CellClipWarning
    from napari_cellclip.images import plate_ranges, read_image

    rng = np.random.default_rng(0)
    good = [[rng.gamma(2, 100, (32, 32)).astype(np.float32) for _ in range(2)] for _ in range(3)]
    bad = [p.copy() for p in good[0]]
    bad[0][3, 4], bad[0][5, 6], bad[1][0, 0] = np.nan, np.inf, -np.inf
    (tmp_path / "clean").mkdir()
    clean = plate_ranges(_plate(tmp_path / "clean", good), ["DNA", "AGP"])
    fields = _plate(tmp_path, [bad, *good[1:]])
    with pytest.warns(CellClipWarning, match=r"A01_DNA\.tif: 2 of 1024 pixels are NaN or infinite"):
        img = read_image(tmp_path / "A01_DNA.tif")
    assert np.isfinite(img).all() and img[3, 4] == np.nanmin(np.where(np.isfinite(bad[0]), bad[0], np.nan))
    with pytest.warns(CellClipWarning):
        r = plate_ranges(fields, ["DNA", "AGP"])["P1"]
        layers = fields_layer_data(fields)
    assert np.isfinite(r).all()
    np.testing.assert_allclose(r, clean["P1"], rtol=0.05)
    limits = [lim for _, kw, _ in layers for lim in [kw["contrast_limits"]]]
    assert np.isfinite(np.asarray(limits, dtype=float)).all()


def test_all_nan_image_is_an_unreadable_field(tmp_path):
    import numpy as np
    import tifffile

    from napari_cellclip.errors import ImageReadError
    from napari_cellclip.images import read_image

    tifffile.imwrite(tmp_path / "x.tif", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ImageReadError, match=r"x\.tif: every pixel is NaN"):
        read_image(tmp_path / "x.tif")


def test_a_tiny_first_field_does_not_set_the_plates_shape(tmp_path):
    import numpy as np

    from napari_cellclip._reader import fields_layer_data
    from napari_cellclip.errors import CellClipWarning

    rng = np.random.default_rng(1)
    planes = [[np.ones((1, 1), np.uint16)] * 2] + [[rng.integers(0, 4000, (32, 40), dtype=np.uint16)] * 2
                                                    for _ in range(4)]
    layers = fields_layer_data(_plate(tmp_path, planes))
    data = layers[0][0]
    assert tuple(data.shape[-2:]) == (32, 40)
    with pytest.warns(CellClipWarning) as got:
        frames = np.asarray(data[:, 0])
    said = " ".join(str(w.message) for w in got)
    assert "A01" in said and not any(f"A0{i}" in said for i in range(2, 6))
    assert frames[1:].any(axis=(1, 2)).all() and not frames[0].any()


# ------------------------------------------------------------------ plate paths
def test_plate_path_that_is_not_utf8_is_a_plate_error(tmp_path, capsys):
    import os
    import shutil

    from napari_cellclip.errors import PlateError
    from napari_cellclip.fields import read_fields
    from napari_cellclip.plates import read_plate
    from napari_cellclip.sample import sample_plate_dir
    from training.__main__ import main

    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/plate\xff")
    try:
        shutil.copytree(sample_plate_dir(), bad)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take names that are not UTF-8")
    for read in (read_fields, read_plate):
        with pytest.raises(PlateError, match=r"plate\\xff: the path is not valid UTF-8"):
            read(bad)
    assert main(["extract", "--data", bad, "--no-progress"]) == 2
    assert "plate\\xff: the path is not valid UTF-8" in capsys.readouterr().err


def test_file_names_that_are_not_utf8_are_skipped_and_named(tmp_path):
    import os
    import shutil

    from napari_cellclip.errors import CellClipWarning
    from napari_cellclip.plates import read_plate
    from napari_cellclip.sample import sample_plate_dir

    plate = tmp_path / "plate"
    shutil.copytree(sample_plate_dir(), plate)
    n = len(read_plate(plate))
    some = sorted(plate.glob("*.png"))[0]
    try:
        shutil.copy(some, os.fsdecode(os.fsencode(str(some.parent)) + b"/x\xfe" + os.fsencode(some.name)))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take names that are not UTF-8")
    with pytest.warns(CellClipWarning, match=r"1 name\(s\) that are not valid UTF-8 skipped.*x\\xfe"):
        fields = read_plate(plate)
    assert len(fields) == n


# ------------------------------------------------------------------ correction
def test_one_field_plate_without_controls_says_what_it_does_to_the_results():
    import numpy as np
    import pandas as pd

    from napari_cellclip.correction import center_scale
    from napari_cellclip.errors import CellClipWarning

    fields = pd.DataFrame({"Metadata_Plate": ["P1", "P2", "P3", "P3"], "Metadata_Well": ["A01", "B02", "C03", "C04"],
                           "Metadata_Site": 1})
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    with pytest.warns(CellClipWarning) as got:
        y = center_scale(x, fields)
    said = [str(w.message) for w in got]
    assert sum("same constant vector" in m for m in said) == 2 and any("P1" in m for m in said)
    assert any("P3" in m and "plate's average" in m for m in said)
    assert not y[:2].any()  # what the warning says: those fields are zeroed
