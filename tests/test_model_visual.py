"""The image side's construction: the initialisation of a model trained from scratch, the
parts it reports, mean pooling, and checkpoints of fresh and reloaded models (issue 16)."""

from __future__ import annotations

import json

import pytest
import torch
from _model_tiny import C, D, E, bert, config, feats, minilm_tokenizer, model
from safetensors.torch import save_file
from transformers import BertConfig

from napari_cellclip.errors import CheckpointError
from napari_cellclip.model import CellCLIP, CellCLIPConfig, CrossChannelFormer, MILPooling


# ------------------------------------------------------------------ initialisation (CLIP's)
def test_channel_embeddings_start_as_a_normal_of_std_002_cut_at_two_sigma():
    torch.manual_seed(0)
    e = CrossChannelFormer(512, 0, 8, 256, 8).channel_embed.detach()
    assert e.shape == (8, 512)
    assert e.min() >= -0.04 and e.max() <= 0.04
    assert e.min() < -0.039 and e.max() > 0.039  # both tails reach the cut
    # std of N(0, 0.02) cut at +-2 sigma: 0.02 * 0.8796
    assert 0.0170 < e.std().item() < 0.0182
    assert abs(e.mean().item()) < 0.001


def test_the_projection_starts_with_std_one_over_sqrt_width():
    torch.manual_seed(0)
    proj = CrossChannelFormer(256, 0, 8, 128, 2).proj.detach()
    assert proj.shape == (256, 128)
    assert abs(proj.std().item() * 256**0.5 - 1) < 0.02
    assert abs(proj.mean().item()) < 0.002


def test_the_tower_reports_its_sizes():
    f = CrossChannelFormer(D, 2, 2, E, C)
    assert (f.width, f.output_dim, f.input_channels) == (D, E, C)
    assert (f.transformer.width, f.transformer.layers, len(f.transformer.resblocks)) == (D, 2, 2)


# ------------------------------------------------------------------ pooling
def test_mil_pooling_is_gated_attention_unless_asked_for_mean():
    pool = MILPooling(D)
    assert pool.pooling == "attention" and pool.V.out_features == 128
    with pytest.raises(CheckpointError, match=r"^pooling must be 'attention' or 'mean', got 'max'$"):
        MILPooling(D, 128, "max")


def test_a_mean_pooling_model_has_no_attention_weights_and_averages_real_instances():
    m = model(pooling="mean")
    assert not [k for k in m.state_dict() if k.startswith("image_pool.")]
    x = feats(2, 4)
    x[0, 3] = 0  # padding
    with torch.no_grad():
        pooled = m.pool_instances(x)
    torch.testing.assert_close(pooled[0], x[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], x[1].mean(0))


# ------------------------------------------------------------------ construction, checkpoints
def test_a_config_given_as_a_dict_is_read():
    d = config(embed_dim=E, pooling="mean").to_dict()
    m = CellCLIP(d, text_model=bert(), tokenizer=minilm_tokenizer())
    assert isinstance(m.config, CellCLIPConfig) and m.config.pooling == "mean" and m.config.embed_dim == E
    assert m.encode_image(feats(1, 2)).shape == (1, E)


def test_a_fresh_model_saves_and_reloads_without_extra_tensors(tmp_path):
    m = model()
    assert m.extra_tensors == {}
    m.save_pretrained(tmp_path / "ck")
    m2 = CellCLIP.from_pretrained(tmp_path / "ck")
    assert m2.extra_tensors == {}
    x = feats(2, 2)
    with torch.no_grad():
        assert torch.equal(m2.encode_image(x), m.encode_image(x))


def test_from_pretrained_moves_the_model_to_the_device_asked_for(tmp_path):
    model().save_pretrained(tmp_path / "ck")
    m = CellCLIP.from_pretrained(tmp_path / "ck", "meta")
    assert m.device.type == "meta" and {p.device.type for p in m.parameters()} == {"meta"}
    assert not m.training
    assert CellCLIP.from_pretrained(tmp_path / "ck").device.type == "cpu"


def test_from_pretrained_builds_the_text_encoder_from_the_text_config_given(tmp_path):
    """A published-layout checkpoint (no text/ folder) whose 24-wide tower has 2 heads: the shapes
    alone would say 12 heads; the text_config given says 2, and the embeddings match the source."""
    src = model(text=bert(hidden=24, heads=2), text_pooling="pooler")
    ck = tmp_path / "published"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"embed_dim": E, "vision_layers": 1, "vision_width": D,
                                                "vision_heads": 2, "input_channels": C,
                                                "context_length": 32, "pooling": "attention"}))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ck / "model.safetensors"))
    guessed = CellCLIP.from_pretrained(ck)
    assert guessed.text.config.num_attention_heads == 12
    m = CellCLIP.from_pretrained(ck, text_config=BertConfig(**{**src.text.config.to_dict()}))
    assert m.text.config.num_attention_heads == 2
    ids = torch.tensor([[101, 4442, 2007, 102, 0], [101, 4442, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(ids, mask), src.encode_text(ids, mask))
