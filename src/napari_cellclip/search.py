"""Text / image queries and zero-shot scoring over an :class:`~napari_cellclip.store.EmbeddingStore`.

All scores are cosine similarities between L2-normalised vectors.  Result tables
(:func:`rank`, :func:`text_query`, :func:`image_query`) have the columns

``rank`` (1-based) · ``score`` (cosine, float64) · ``row`` (position in the store *at the
level searched*: a field row for ``level="field"``, a row of ``store.well_level()`` for
``level="well"``) · then the store's ``Metadata_*`` columns (plate, well, site,
perturbation, MoA, prompt, ...).

Search is an exact matrix product (:class:`ExactSearcher`) below
:data:`ANN_THRESHOLD` rows and a FAISS IVF index (:mod:`napari_cellclip.ann`) above it;
:func:`get_searcher` picks one.

Text queries and zero-shot candidates go through the one text tower
(:func:`napari_cellclip.towers.encode_texts`, here also named ``encode_text_queries``); well-level
ranking uses the store's wells (the model's pooling of each well's fields when the store has them).
torch is imported only inside :func:`text_query` / :func:`zero_shot` (they run the model).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from . import ann as _ann
from .errors import QueryError
from .store import EmbeddingStore, l2_normalize, metadata_columns
from .towers import encode_texts as encode_text_queries

if TYPE_CHECKING:  # pragma: no cover
    from .model import CellCLIP

__all__ = [
    "Searcher",
    "ExactSearcher",
    "get_searcher",
    "ANN_THRESHOLD",
    "rank",
    "text_query",
    "image_query",
    "more_like_this",
    "control_centered",
    "encode_text_queries",
    "zero_shot",
    "zero_shot_scores",
    "zero_shot_accuracy",
    "ZeroShotResult",
    "export_csv",
    "read_csv",
    "RESULT_COLUMNS",
]

RESULT_COLUMNS = ("rank", "score", "row")
LEVELS = ("field", "well")


# --------------------------------------------------------------------- searchers
class Searcher(Protocol):
    """Anything that can return the ``k`` nearest rows (by cosine) for unit query vectors."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (Q, E) unit rows → ``(scores (Q, k) float64, rows (Q, k) int64)``, best first."""
        ...


class ExactSearcher:
    """Exact cosine search by matrix product (ties broken by lower row first)."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """All cosine scores ``(Q, N)`` float64."""
        return (np.atleast_2d(queries).astype(np.float32) @ self.embeddings.T).astype(np.float64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores(queries)
        n = s.shape[1]
        k = max(0, min(int(k), n))
        rows = np.empty((s.shape[0], k), dtype=np.int64)
        for i, si in enumerate(s):
            if 0 < k < n:  # k == 0: nothing to partition (an empty answer, like the ANN index's)
                cand = np.argpartition(-si, k - 1)[:k]
                # include every row tied with the k-th score so tie-breaking is by row
                kth = si[cand].min()
                cand = np.flatnonzero(si >= kth)
            else:
                cand = np.arange(n)
            order = np.lexsort((cand, -si[cand]))
            rows[i] = cand[order][:k]
        return np.take_along_axis(s, rows, axis=1), rows


#: Stores with at least this many rows are searched with the FAISS ANN index (issue 5);
#: smaller ones exactly.  See :mod:`napari_cellclip.ann`.
ANN_THRESHOLD = _ann.ANN_THRESHOLD


def get_searcher(store: EmbeddingStore, *, exact: bool = False) -> Searcher:
    """The searcher for ``store`` (built once, cached on the store).

    :class:`ExactSearcher` below :data:`ANN_THRESHOLD` rows (or with ``exact=True``);
    above it an :class:`napari_cellclip.ann.AnnIndex` — loaded memory-mapped from the
    store's folder when the embedding pipeline built one alongside the embeddings,
    else built on first use — when faiss is installed.
    """
    if exact:
        return ExactSearcher(store.embeddings)
    s = getattr(store, "_searcher", None)
    if s is None or getattr(s, "_source", None) is not store.embeddings:
        s = None
        if len(store) >= _ann.ANN_THRESHOLD:
            s = _ann.searcher_for_store(store)
        if s is None:
            s = ExactSearcher(store.embeddings)
        s._source = store.embeddings  # rebuilt if the store's array is replaced
        store._searcher = s
    return s


# ----------------------------------------------------------------------- ranking
def _at_level(store: EmbeddingStore, level: str) -> EmbeddingStore:
    if level not in LEVELS:
        raise QueryError(f"level must be 'field' or 'well', got {level!r}")
    if level == store.level:
        return store
    if level == "well":
        return store.well_level()
    raise QueryError("this store holds well-level embeddings; field-level search needs a field-level store")


def _prepare_queries(query_vec, dim: int) -> np.ndarray:
    q = _to_numpy(query_vec)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0:
        raise QueryError(f"query must be a vector (E,) or a stack (Q, E), got shape {q.shape}")
    if q.shape[1] != dim:
        raise QueryError(
            f"query has {q.shape[1]} dimensions but the store's embeddings have {dim}: "
            "was the store embedded with a different checkpoint?"
        )
    if not np.all(np.isfinite(q)):
        raise QueryError("query vector contains NaN or infinite values")
    q = l2_normalize(q)
    if not np.any(q):
        raise QueryError("query vector is all zeros")
    return q


def _combine(q: np.ndarray) -> np.ndarray:
    """Several query vectors → one (mean of the unit vectors, renormalised; prompt ensembling)."""
    return l2_normalize(q.mean(axis=0)) if q.shape[0] > 1 else q[0]


def _results(store: EmbeddingStore, rows: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    meta = store.fields.iloc[rows][metadata_columns(store.fields)].reset_index(drop=True)
    head = pd.DataFrame(
        {
            "rank": np.arange(1, len(rows) + 1, dtype=np.int64),
            "score": np.asarray(scores, dtype=np.float64),
            "row": np.asarray(rows, dtype=np.int64),
        }
    )
    return pd.concat([head, meta], axis=1)


def rank(
    store: EmbeddingStore,
    query_vec,
    top_k: int | None = 20,
    level: str = "field",
) -> pd.DataFrame:
    """Rank the store's fields (or wells) by cosine similarity to ``query_vec``.

    Parameters
    ----------
    store
        Field-level (or well-level) embedding store.
    query_vec
        ``(E,)`` vector or ``(Q, E)`` stack (numpy or torch; need not be normalised).
        A stack is combined into one query: the mean of its unit vectors, renormalised
        (CLIP-style prompt ensembling); ``score`` is the cosine to that vector.  A stack
        whose unit vectors cancel out (mean zero) is a :class:`QueryError`.
    top_k
        Number of results (clipped to the store size); ``None`` = all.
    level
        ``"field"`` or ``"well"`` (well means via :meth:`EmbeddingStore.well_level`).

    Returns
    -------
    DataFrame with ``rank, score, row`` + ``Metadata_*`` columns, best first.
    """
    st = _at_level(store, level)
    if len(st) == 0:
        raise QueryError("nothing is embedded yet: the store is empty")
    q = _combine(_prepare_queries(query_vec, st.dim))
    if not np.any(q):  # opposite query vectors: every row would score 0, in row order
        raise QueryError("the query vectors cancel out (their mean is zero): nothing to rank by")
    k = len(st) if top_k is None else int(top_k)
    if k < 1:
        raise QueryError(f"top_k must be at least 1, got {top_k}")
    scores, rows = get_searcher(st).search(q[None, :], k)
    return _results(st, rows[0], scores[0])


def image_query(
    store: EmbeddingStore,
    row: int,
    top_k: int | None = 20,
    level: str = "field",
    *,
    exclude_self: bool = False,
) -> pd.DataFrame:
    """"More like this": rank by similarity to the embedding at position ``row``.

    ``row`` is a position at ``level`` (a field row, or a row of ``store.well_level()``).
    The query row itself ranks first (score ≈ 1) unless ``exclude_self``.
    """
    st = _at_level(store, level)
    n = len(st)
    try:
        row = int(row)
    except (TypeError, ValueError):
        raise QueryError(f"row must be an integer position, got {row!r}") from None
    if not 0 <= row < n:
        raise QueryError(f"row {row} is outside the store (0..{n - 1})")
    k = n if top_k is None else int(top_k)
    if k < 1:
        raise QueryError(f"top_k must be at least 1, got {top_k}")
    q = st.embeddings[row]
    if not np.any(q):
        raise QueryError(f"row {row} has an all-zero embedding")
    scores, rows = get_searcher(st).search(q[None, :], min(n, k + 1))
    scores, rows = scores[0], rows[0]
    keep = rows != row
    if exclude_self:
        scores, rows = scores[keep][:k], rows[keep][:k]
    else:  # put the query itself first even if an identical vector ties with it
        self_score = float(st.embeddings[row] @ st.embeddings[row])
        rows = np.concatenate([[row], rows[keep]])[:k]
        scores = np.concatenate([[self_score], scores[keep]])[:k]
    return _results(st, rows, scores)


def control_centered(store: EmbeddingStore) -> EmbeddingStore:
    """The store in the space "change from the plate's negative controls".

    Each plate's mean control embedding (:func:`napari_cellclip.correction.control_mask`:
    ``Metadata_control_type == "negcon"``, ``Metadata_is_control`` or DMSO; the plate's
    mean when it has no controls) is subtracted from its rows, which are renormalised.
    Raw CellCLIP image embeddings of one plate share a large common direction (every
    field is "cells"), so their cosines all sit near 1; after centring, a cosine compares
    the *phenotypes*: 1 = the same change from control, 0 = unrelated, < 0 = opposite.
    Cached on the store.
    """
    cached = getattr(store, "_control_centered", None)
    if cached is not None:
        return cached
    from .correction import control_mask, plate_keys

    emb = np.asarray(store.embeddings, dtype=np.float64)
    ctrl, plates = control_mask(store.fields), plate_keys(store.fields)
    out = np.empty_like(emb)
    for plate in np.unique(plates):
        rows = plates == plate
        ref = rows & ctrl if (rows & ctrl).any() else rows
        out[rows] = emb[rows] - emb[ref].mean(axis=0)
    centred = EmbeddingStore(out, store.fields, store.model_id, level=store.level,
                             info=dict(store.info, space="control-centred"))
    store._control_centered = centred
    return centred


def more_like_this(store: EmbeddingStore, row: int, top_k: int | None = 20, level: str = "field") -> pd.DataFrame:
    """"More like this" ranked by phenotype: :func:`image_query` in the
    :func:`control_centered` space (``score``: cosine of the changes from the plate's
    controls; the query itself first with 1.0)."""
    return image_query(control_centered(_at_level(store, level)), row, top_k, level=level)


# ------------------------------------------------------------------ text queries
def _check_model_matches(model, store: EmbeddingStore) -> None:
    mid = getattr(model, "_cellclip_id", None)
    if mid and store.model_id and mid != store.model_id:
        raise QueryError(
            "the embeddings were computed with a different checkpoint than the loaded model "
            f"(store {store.model_id[:12]}…, model {mid[:12]}…); re-embed the plate with this model"
        )


def text_query(
    model: CellCLIP,
    store: EmbeddingStore,
    text: str | Sequence[str],
    top_k: int | None = 20,
    level: str = "field",
) -> pd.DataFrame:
    """Rank fields/wells by similarity to a text description (see :func:`rank` for columns).

    ``text`` may be one prompt or several (ensembled).  Raises :class:`QueryError` for
    empty text or text too long for the checkpoint's tokenizer (raised by the model).
    """
    _check_model_matches(model, store)
    q = encode_text_queries(model, text)
    return rank(store, q, top_k=top_k, level=level)


# ---------------------------------------------------------------------- zero-shot
@dataclass
class ZeroShotResult:
    """Zero-shot scoring of every row of a store against a set of prompts.

    ``table``: one row per field/well: ``row``, ``best_prompt``, ``best_score``,
    (``true_prompt_score``, ``true_prompt_rank``, ``correct`` when ``Metadata_prompt`` exists)
    + ``Metadata_*`` columns.  ``scores``: ``(N, P)`` cosine matrix, column ``j`` = ``prompts[j]``.
    """

    table: pd.DataFrame
    scores: np.ndarray
    prompts: list[str] = field(default_factory=list)
    level: str = "well"

    def score_frame(self) -> pd.DataFrame:
        """The score matrix as a DataFrame (one column per prompt, rows aligned with ``table``)."""
        return pd.DataFrame(self.scores, columns=self.prompts)

    def accuracy(self) -> float:
        """Top-1 accuracy against ``Metadata_prompt`` (see :func:`zero_shot_accuracy`)."""
        return zero_shot_accuracy(self.table)


def _unique(seq) -> list[str]:
    out, seen = [], set()
    for s in seq:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def zero_shot_scores(
    model: CellCLIP,
    store: EmbeddingStore,
    prompts: Sequence[str] | None = None,
    level: str = "well",
) -> ZeroShotResult:
    """Score every well (or field) against ``prompts`` and pick the best one.

    ``prompts`` defaults to the distinct non-empty ``Metadata_prompt`` values of the
    store (order of first appearance).  Duplicates are dropped.
    """
    _check_model_matches(model, store)
    st = _at_level(store, level)
    if len(st) == 0:
        raise QueryError("nothing is embedded yet: the store is empty")
    if prompts is None:
        if "Metadata_prompt" not in st.fields.columns:
            raise QueryError("no prompts given and the store has no Metadata_prompt column")
        vals = st.fields["Metadata_prompt"]
        prompts = [str(p) for p in vals[vals.notna()] if str(p).strip()]
    elif isinstance(prompts, str):
        prompts = [prompts]
    prompts = _unique(list(prompts))
    if not prompts:
        raise QueryError("no prompts to score against")
    q = encode_text_queries(model, prompts)
    if q.shape[1] != st.dim:
        raise QueryError(f"text embeddings have {q.shape[1]} dimensions but the store has {st.dim}")
    scores = st.embeddings.astype(np.float32) @ q.T  # (N, P)
    scores = scores.astype(np.float64)
    best = np.argmax(scores, axis=1)
    table = pd.DataFrame(
        {
            "row": np.arange(len(st), dtype=np.int64),
            "best_prompt": [prompts[j] for j in best],
            "best_score": scores[np.arange(len(st)), best],
        }
    )
    if "Metadata_prompt" in st.fields.columns:
        pos = {p: j for j, p in enumerate(prompts)}
        truth = st.fields["Metadata_prompt"].tolist()
        tj = np.array([pos.get(t, -1) if isinstance(t, str) else -1 for t in truth])
        has = tj >= 0
        true_score = np.full(len(st), np.nan)
        true_score[has] = scores[np.flatnonzero(has), tj[has]]
        true_rank = np.full(len(st), -1, dtype=np.int64)
        if has.any():
            true_rank[has] = 1 + (scores[has] > true_score[has, None]).sum(axis=1)
        table["true_prompt_score"] = true_score
        table["true_prompt_rank"] = true_rank  # -1: the true prompt was not among the prompts
        correct = pd.array([None] * len(st), dtype="boolean")
        correct[has] = best[has] == tj[has]
        table["correct"] = correct
    table = pd.concat(
        [table, st.fields[metadata_columns(st.fields)].reset_index(drop=True)], axis=1
    )
    return ZeroShotResult(table=table, scores=scores, prompts=prompts, level=st.level)


def zero_shot(
    model: CellCLIP,
    store: EmbeddingStore,
    prompts: Sequence[str] | None = None,
    level: str = "well",
) -> pd.DataFrame:
    """Zero-shot table (best prompt + score per well/field); see :func:`zero_shot_scores`
    for the full per-prompt score matrix."""
    return zero_shot_scores(model, store, prompts, level).table


def zero_shot_accuracy(table: pd.DataFrame) -> float:
    """Fraction of rows whose best prompt equals ``Metadata_prompt``.

    Rows whose true prompt was not among the scored prompts are ignored.  Raises
    :class:`QueryError` without ``Metadata_prompt`` / no scorable rows.
    """
    if "correct" not in table.columns:
        if "Metadata_prompt" not in table.columns or "best_prompt" not in table.columns:
            raise QueryError("accuracy needs Metadata_prompt (the true prompt) in the table")
        correct = (table["best_prompt"] == table["Metadata_prompt"]).astype("boolean")
    else:
        correct = table["correct"].astype("boolean")
    correct = correct.dropna()
    if len(correct) == 0:
        raise QueryError("no row's true prompt was among the scored prompts")
    return float(correct.astype(bool).mean())


# ------------------------------------------------------------------------ export
def export_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a results table as CSV (no index).  Missing values are written as ``NaN`` so
    that empty strings survive; :func:`read_csv` reads it back unchanged."""
    from ._fsutil import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False, na_rep="NaN")
    return path


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV written by :func:`export_csv` (empty strings stay empty strings)."""
    return pd.read_csv(path, keep_default_na=False, na_values=["NaN"])


# ------------------------------------------------------------------------ helpers
def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
