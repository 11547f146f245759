"""The image and text towers: frozen features → image embeddings, prompts → text embeddings.

One copy of each, used by the plugin (:mod:`napari_cellclip.embed`), the embedding job
(:mod:`napari_cellclip.pipeline`), search and zero-shot scoring (:mod:`napari_cellclip.search`)
and training's evaluation (:mod:`training.evaluate`):

* :func:`encode_bags` — bags of instances ``(B, M, C, D)`` through the model's multi-instance
  pooling and CrossChannelFormer → ``(B, E)`` unit rows (a field is a bag of one, a well the
  bag of its fields);
* :func:`image_embeddings` — a plate's features → plate-effect correction → field embeddings
  and well embeddings (each well's fields pooled by the model, wells as in
  :func:`napari_cellclip.store.well_groups`);
* :func:`encode_texts` — prompts through the checkpoint's tokenizer and text tower → ``(P, E)``
  unit rows.

torch is imported inside the functions (importing this module stays cheap).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import Cancelled, CellClipError, QueryError
from .store import WELL_KEYS, l2_normalize, well_groups

__all__ = ["ENCODE_BATCH", "ImageEmbeddings", "gather_bags", "encode_bags", "embed_features", "image_embeddings",
           "encode_texts", "QUERY_THREADS"]

#: bags per model.encode_image call (the work per bag is tiny next to feature extraction)
ENCODE_BATCH = 256

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


def gather_bags(features: np.ndarray, bag_index: np.ndarray) -> np.ndarray:
    """Feature rows by an index array of any shape (-1 → a zero row, the model's padding):
    ``bag_index.shape + (C, D)``.  Reads only the rows asked for, so ``features`` may be a
    memory-mapped ``.npy`` that is never read whole."""
    idx = np.asarray(bag_index, dtype=np.int64)
    out = np.zeros(idx.shape + tuple(features.shape[1:]), dtype=np.float32)
    valid = idx >= 0
    if valid.any():
        out[valid] = features[idx[valid]]
    return out


def _model_device(model):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def encode_bags(model, features: np.ndarray, bag_index: np.ndarray | None = None, *, batch_size: int = ENCODE_BATCH,
                progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> np.ndarray:
    """Image embeddings of bags of feature rows → ``(B, E)`` float32, L2-normalised.

    ``features``: ``(N, C, D)`` (already corrected); ``bag_index``: ``(B, M)`` rows of
    ``features`` per bag, -1 = padding; None: every row alone (``B = N``, ``M = 1``).  Runs
    on the model's device in eval mode under ``torch.inference_mode``; ``progress(done, B)``
    after each batch; ``should_stop()`` → :class:`Cancelled`.
    """
    import torch
    import torch.nn.functional as F

    x = np.asarray(features, dtype=np.float32) if not isinstance(features, np.ndarray) else features
    if x.ndim != 3:
        raise CellClipError(f"features must be (N, C, D), got shape {x.shape}")
    idx = np.arange(len(x), dtype=np.int64)[:, None] if bag_index is None else np.asarray(bag_index, np.int64)
    n, bs, dev = len(idx), max(1, int(batch_size)), _model_device(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, n, bs):
                if should_stop is not None and should_stop():
                    raise Cancelled("embedding cancelled")
                xb = torch.from_numpy(gather_bags(x, idx[start:start + bs])).to(dev)
                out.append(F.normalize(model.encode_image(xb).float(), dim=-1).cpu().numpy())
                if progress is not None:
                    progress(min(start + bs, n), n)
    finally:
        if was_training:
            model.train()
    e = int(getattr(getattr(model, "config", None), "embed_dim", 0) or 0)
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, e), np.float32)


def embed_features(features: np.ndarray, model, *, batch_size: int = ENCODE_BATCH, progress: ProgressFn | None = None,
                   should_stop: StopFn | None = None) -> np.ndarray:
    """Each field alone (a bag of one) through the image tower: ``(N, C, D)`` → ``(N, E)`` unit rows."""
    return encode_bags(model, features, batch_size=batch_size, progress=progress, should_stop=should_stop)


@dataclass
class ImageEmbeddings:
    """:func:`image_embeddings` of a plate: ``fields`` (N, E) unit rows, aligned with the fields
    table; ``wells`` (W, E) unit rows, ``well_table`` (W rows) and ``well_index`` (W, M) — each
    well's rows, -1 padded — as :func:`napari_cellclip.store.well_groups`; None without wells."""

    fields: np.ndarray
    wells: np.ndarray | None = None
    well_table: pd.DataFrame | None = None
    well_index: np.ndarray | None = None


def image_embeddings(model, features: np.ndarray, fields: pd.DataFrame, *, correction_spec=None,
                     wells: bool = True, batch_size: int = ENCODE_BATCH, progress: ProgressFn | None = None,
                     should_stop: StopFn | None = None) -> ImageEmbeddings:
    """Features of a plate's fields → plate-effect correction → field and well embeddings.

    ``features`` (N, C, D) are the frozen features of the rows of ``fields``;
    ``correction_spec`` the checkpoint's correction (:func:`napari_cellclip.correction.spec_for_model`;
    its statistics come from these fields' controls, so pass whole plates).  Field embeddings
    are bags of one; well embeddings pool all the fields of a well through the model (a table
    without plate and well columns has none).  ``progress(done, N + W)``.
    """
    from . import correction

    x = correction.apply(features, fields, correction_spec) if correction_spec else \
        np.asarray(features, dtype=np.float32)
    n = len(x)
    wells = wells and n > 0 and all(k in fields.columns for k in WELL_KEYS)
    codes_table = well_groups(fields) if wells else None
    total = n + (len(codes_table[1]) if codes_table is not None else 0)

    def part(offset: int) -> ProgressFn | None:
        return None if progress is None else (lambda done, _tot: progress(offset + done, total))

    field_emb = encode_bags(model, x, batch_size=batch_size, progress=part(0), should_stop=should_stop)
    if codes_table is None:
        return ImageEmbeddings(field_emb)
    _, table, bag_index = codes_table
    well_emb = encode_bags(model, x, bag_index, batch_size=batch_size, progress=part(n), should_stop=should_stop)
    return ImageEmbeddings(field_emb, well_emb, table, bag_index)


# -------------------------------------------------------------------- text tower
#: intra-op threads for encoding a handful of prompts on the CPU (env
#: NAPARI_CELLCLIP_QUERY_THREADS overrides; 0 = leave torch's setting).  One short prompt
#: is ~1 GFLOP: spreading it over several OpenMP threads gains little, and on a busy
#: machine their spin-waits made it 10-20x slower (benchmarks/RESULTS.md, row 4).
QUERY_THREADS = int(os.environ.get("NAPARI_CELLCLIP_QUERY_THREADS", "1") or 0)
_THREADS_LOCK = threading.Lock()


class _query_threads:
    def __init__(self, model, n_texts: int) -> None:
        self.active = False
        try:
            dev = next(model.parameters()).device.type
        except (StopIteration, AttributeError, TypeError):
            dev = "cpu"
        self.want = QUERY_THREADS if (QUERY_THREADS > 0 and n_texts <= 8 and dev == "cpu") else 0

    def __enter__(self):
        import torch

        if self.want and _THREADS_LOCK.acquire(blocking=False):
            self.active, self.old = True, torch.get_num_threads()
            if self.old > self.want:
                torch.set_num_threads(self.want)
        return self

    def __exit__(self, *exc):
        import torch

        if self.active:
            if torch.get_num_threads() != self.old:
                torch.set_num_threads(self.old)
            _THREADS_LOCK.release()
        return False


def encode_texts(model, texts: str | Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Encode prompts with the checkpoint's text tower → ``(Q, E)`` float32 unit rows.

    Raises :class:`QueryError` for an empty list or an empty/blank prompt; prompts
    longer than the tokenizer's context are rejected by ``model.encode_prompts``.
    """
    import torch

    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise QueryError("no query text given")
    for t in texts:
        if not isinstance(t, str):
            raise QueryError(f"query text must be a string, got {type(t).__name__}")
        if not t.strip():
            raise QueryError("the query text is empty: type a phenotype description, e.g. 'fragmented mitochondria'")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), _query_threads(model, len(texts)):
            out = model.encode_prompts(texts, batch_size=batch_size)
    finally:
        if was_training:
            model.train()
    return l2_normalize(out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out))
