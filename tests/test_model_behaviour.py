"""Model behaviours the tiny test configs never reached (issue 16).

* the head count of a text tower rebuilt from a published-layout checkpoint, at real sizes
  (MiniLM's hidden 384 has 12 heads; ``hidden // 64`` would say 6);
* real features that contain exact zeros are instances, not padding; all-padding bags.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from napari_cellclip.checkpoints import _infer_bert_config
from napari_cellclip.model import CellCLIP, CellCLIPConfig, MILPooling

C, D = 5, 32


# ------------------------------------------------------------------ text-tower head count
@pytest.mark.parametrize("hidden,heads", [
    (384, 12),   # all-MiniLM-L6/L12-v2, paraphrase-MiniLM: 12 heads of 32 (hidden // 64 would be 6)
    (768, 12),   # bert-base-(un)cased, the published CellCLIP's text tower
    (1024, 16),  # bert-large: not a multiple of 12, 16 heads of 64
    (512, 8),    # BERT miniatures (Turc et al.): H/64 heads
    (256, 4),
    (128, 2),
    (100, 1),    # neither rule applies: one head
])
def test_inferred_head_count_follows_the_bert_family(hidden, heads):
    state = {
        "text.embeddings.word_embeddings.weight": torch.empty(50, hidden),
        "text.encoder.layer.0.intermediate.dense.weight": torch.empty(4 * hidden, hidden),
        "text.encoder.layer.1.intermediate.dense.weight": torch.empty(4 * hidden, hidden),
    }
    cfg = _infer_bert_config(state)
    assert cfg.hidden_size == hidden and cfg.num_attention_heads == heads
    assert cfg.num_hidden_layers == 2 and cfg.intermediate_size == 4 * hidden


def test_published_layout_with_a_minilm_sized_text_tower_embeds_like_its_source(tmp_path):
    """A checkpoint in the published layout (config.json without text settings, no text/
    folder) whose text tower has all-MiniLM-L6-v2's shape (hidden 384, 12 heads of 32, random
    weights): rebuilt from the tensors alone, it must embed text exactly like the tower it was
    saved from (a wrong head count loads the same tensors but computes different attention)."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tower = BertModel(BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                                 intermediate_size=1536, max_position_embeddings=512)).eval()
    src = CellCLIP(CellCLIPConfig(embed_dim=16, vision_width=D, vision_layers=1, vision_heads=4,
                                  input_channels=C, text_encoder="minilm-sized", text_pooling="pooler"),
                   text_model=tower).eval()
    ck = tmp_path / "published"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"embed_dim": 16, "vision_layers": 1, "vision_width": D,
                                                "vision_heads": 4, "input_channels": C,
                                                "context_length": 77, "pooling": "attention"}))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ck / "model.safetensors"))

    m = CellCLIP.from_pretrained(ck)
    assert not (ck / "text").exists() and m.config.text_pooling == "pooler"
    assert m.text.config.hidden_size == 384 and m.text.config.num_attention_heads == 12
    torch.testing.assert_close(m.text.embeddings.word_embeddings.weight, tower.embeddings.word_embeddings.weight)
    ids = torch.tensor([[101, 203, 442, 200, 389, 207, 37, 991, 102, 0],
                        [101, 37, 278, 212, 442, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = F.linear(tower(input_ids=ids, attention_mask=mask).pooler_output,
                        src.text_proj.weight, src.text_proj.bias)
        got = m.encode_text(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # with hidden // 64 = 6 heads the same tensors embed differently: the head count is what is pinned
    six = BertModel(BertConfig(**{**tower.config.to_dict(), "num_attention_heads": 6})).eval()
    six.load_state_dict(tower.state_dict())
    with torch.no_grad():
        other = F.linear(six(input_ids=ids, attention_mask=mask).pooler_output,
                         src.text_proj.weight, src.text_proj.bias)
    assert not torch.allclose(other, want, atol=1e-4)


# ------------------------------------------------------------------ padding vs real zeros
def _relu_feats(B=3, M=4, seed=0):
    """Post-ReLU-like features: about half of the values are exactly 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(B, M, C, D, generator=g))


def _attention_reference(pool, x):
    """Gated attention over every instance, computed per (sample, channel) without masking."""
    out = torch.zeros(x.shape[0], C, D)
    for b in range(x.shape[0]):
        for c in range(C):
            inst = x[b, :, c, :]
            s = pool.attention(torch.tanh(pool.V(inst)) * torch.sigmoid(pool.U(inst))).squeeze(-1)
            out[b, c] = (torch.softmax(s, 0)[:, None] * inst).sum(0)
    return out


def test_real_instances_with_zero_values_are_pooled_not_dropped():
    torch.manual_seed(0)
    pool = MILPooling(D, 64, "attention")
    x = _relu_feats()
    x[0, 1, :, 1:] = 0.0  # instance 1 of sample 0: a single non-zero value per channel
    x[0, 1, :, 0] = 0.5
    assert (x == 0).float().mean() > 0.4 and (x != 0).any(-1).all()
    with torch.no_grad():
        torch.testing.assert_close(pool(x), _attention_reference(pool, x), atol=1e-6, rtol=1e-5)
        mean = MILPooling(D, 64, "mean")(x)
    torch.testing.assert_close(mean, x.mean(1), atol=1e-6, rtol=1e-6)


def test_an_instance_is_padding_per_channel_only_when_all_its_values_are_zero():
    torch.manual_seed(1)
    pool = MILPooling(D, 64, "attention").eval()
    x = _relu_feats(B=1, M=3, seed=3)
    x[0, :, :, 0] = 0.25  # every instance has a value in every channel ...
    x[0, 2, 1] = 0.0  # ... except instance 2 in channel 1: padding there, real elsewhere
    with torch.no_grad():
        got = pool(x)
        ref_all = _attention_reference(pool, x)
        ref_two = _attention_reference(pool, x[:, :2])
        mean = MILPooling(D, 64, "mean")(x)
    torch.testing.assert_close(got[0, 1], ref_two[0, 1], atol=1e-6, rtol=1e-5)
    for c in (0, 2, 3, 4):
        torch.testing.assert_close(got[0, c], ref_all[0, c], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean[0, 1], x[0, :2, 1].mean(0))
    torch.testing.assert_close(mean[0, 0], x[0, :, 0].mean(0))


def _model(pooling="attention"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    text = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))
    cfg = CellCLIPConfig(embed_dim=8, vision_width=D, vision_layers=1, vision_heads=4, input_channels=C,
                         pooling=pooling, text_encoder="bert-tiny-test", text_pooling="mean",
                         text_tuning="frozen")
    return CellCLIP(cfg, text_model=text).eval()


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_a_single_field_with_zero_values_embeds_as_itself(pooling):
    """embed_fields runs every field as a bag of one: its embedding is the CrossChannelFormer of
    its own features, zeros and all."""
    m = _model(pooling)
    x = _relu_feats(B=4, M=1, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x), m.encode_pooled(x[:, 0]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_all_padding_bags(pooling):
    """A bag with no real instance pools to exact zeros and embeds like an all-zero field; it
    changes nothing for the other bags of its batch, and gradients stay finite."""
    m = _model(pooling).train()
    x = _relu_feats(B=3, M=4, seed=6)
    alone = x[[0, 2]].clone()
    x[1] = 0.0
    x.requires_grad_(True)
    pooled = m.pool_instances(x)
    assert torch.equal(pooled[1], torch.zeros(C, D))
    emb = m.encode_image(x)
    with torch.no_grad():
        torch.testing.assert_close(emb[1], m.encode_pooled(torch.zeros(1, C, D))[0])
        torch.testing.assert_close(emb[[0, 2]], m.encode_image(alone), atol=1e-6, rtol=1e-5)
    emb.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros(4, C, D))
    for name, p in m.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_well_bags_pad_with_zero_rows_the_model_ignores():
    """Training bags of wells with fewer fields than the largest are padded with zero rows
    (not with some other field's features), so a well's embedding does not depend on the
    size of the biggest well."""
    from training.data import build_well_bags

    feats = _relu_feats(B=6, M=1, seed=7)[:, 0].numpy()
    feats[feats == 0] = 0.0
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01"] * 4 + ["B01"] * 2,
                           "Metadata_prompt": ["x"] * 4 + ["y"] * 2})
    wb = build_well_bags(feats, fields)
    assert wb.max_fields == 4
    bags = wb.gather(np.arange(len(wb)))
    b = int(np.flatnonzero(wb.wells["well"] == "B01")[0])
    np.testing.assert_array_equal(bags[b, :2], feats[4:6])
    assert not bags[b, 2:].any()  # padding rows are exact zeros
    subsets = wb.gather_subsets(np.array([b, b]), np.random.default_rng(0), 1, 4)
    assert all(not s[len(np.flatnonzero(np.abs(s).sum((1, 2)))):].any() for s in subsets)
    m = _model()
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(torch.from_numpy(bags[b:b + 1])),
                                   m.encode_image(torch.from_numpy(feats[None, 4:6])), atol=1e-6, rtol=1e-5)
