"""Ranking and image queries: result tables, top_k, query validation and its messages, torch
queries, the exact searcher's edge cases and the searcher cache (issue 16)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import ann, search
from napari_cellclip.errors import QueryError
from napari_cellclip.search import ExactSearcher, get_searcher, image_query, rank
from napari_cellclip.store import EmbeddingStore

E = 6


def _store(n=30, seed=0):
    """``n`` fields of one plate, 3 sites per well, random unit embeddings."""
    rng = np.random.default_rng(seed)
    fields = pd.DataFrame({
        "Metadata_Plate": "P1",
        "Metadata_Well": [f"B{i // 3 + 1:02d}" for i in range(n)],
        "Metadata_Site": [i % 3 + 1 for i in range(n)],
        "FileName_OrigDNA": [f"f{i}.png" for i in range(n)],
        "Metadata_tag": [f"field{i}" for i in range(n)],
    })
    return EmbeddingStore(rng.standard_normal((n, E)), fields, "m-1")


def _brute(emb, q):
    """Rows by decreasing cosine, ties by row (plain numpy, no code under test)."""
    s = emb.astype(np.float64) @ (q / np.linalg.norm(q))
    return np.lexsort((np.arange(len(s)), -s))


# ----------------------------------------------------------------------- result tables
def test_result_table_has_exactly_rank_score_row_then_the_metadata():
    st = _store()
    meta = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_tag"]
    q = np.arange(1.0, E + 1)
    res = rank(st, q, top_k=5)
    assert list(res.columns) == ["rank", "score", "row", *meta]  # no leftover index column
    order = _brute(st.embeddings, q)[:5]
    assert res["row"].tolist() == order.tolist()
    assert res["Metadata_tag"].tolist() == [f"field{i}" for i in order]
    assert res.index.tolist() == [0, 1, 2, 3, 4]
    res = image_query(st, 7, top_k=4)
    assert list(res.columns) == ["rank", "score", "row", *meta]
    assert res["Metadata_tag"].tolist() == [f"field{i}" for i in res["row"]]


def test_default_top_k_is_twenty_results():
    st = _store(30)
    assert len(rank(st, np.ones(E))) == 20
    assert len(image_query(st, 3)) == 20
    assert len(search.more_like_this(st, 3)) == 20

    class Model:  # the text tower: any prompt -> the same vector
        training = False

        def eval(self):
            return self

        def encode_prompts(self, texts, batch_size=64):
            return np.ones((len(texts), E), np.float32)

    assert len(search.text_query(Model(), st, "cells")) == 20


def test_top_k_one_gives_the_single_best():
    st = _store()
    q = np.arange(1.0, E + 1)
    res = rank(st, q, top_k=1)
    assert res["row"].tolist() == [_brute(st.embeddings, q)[0]]
    assert image_query(st, 11, top_k=1)["row"].tolist() == [11]
    nearest_other = _brute(st.embeddings, st.embeddings[11])[1]
    assert image_query(st, 11, top_k=1, exclude_self=True)["row"].tolist() == [nearest_other]
    for bad in (0, -3):
        with pytest.raises(QueryError, match=re.escape(f"top_k must be at least 1, got {bad}")):
            image_query(st, 11, top_k=bad)


def test_a_store_of_one_field_can_be_searched():
    st = _store(1)
    res = rank(st, np.ones(E), top_k=5)
    assert res["row"].tolist() == [0] and len(res) == 1


def test_an_empty_store_says_nothing_is_embedded():
    empty = EmbeddingStore(np.zeros((0, E)), _store().fields.iloc[:0], "m-1")
    with pytest.raises(QueryError, match="^nothing is embedded yet: the store is empty$"):
        rank(empty, np.ones(E))


# -------------------------------------------------------------------- query validation
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_malformed_queries_are_refused_with_their_reason():
    st = _store()
    for bad in (np.ones((2, 3, E)), np.zeros((0, E))):
        msg = f"query must be a vector (E,) or a stack (Q, E), got shape {bad.shape}"
        with pytest.raises(QueryError, match=re.escape(msg)):
            rank(st, bad)
    msg = ("query has 7 dimensions but the store's embeddings have 6: "
           "was the store embedded with a different checkpoint?")
    with pytest.raises(QueryError, match=re.escape(msg)):
        rank(st, np.ones(E + 1))
    overflow = [1e39] + [0.0] * (E - 1)  # finite in float64, infinite in float32
    for bad in (np.full(E, np.nan), np.r_[np.inf, np.ones(E - 1)], overflow):
        with pytest.raises(QueryError, match="^query vector contains NaN or infinite values$"):
            rank(st, bad)
    with pytest.raises(QueryError, match="^query vector is all zeros$"):
        rank(st, np.zeros(E))
    msg = "this store holds well-level embeddings; field-level search needs a field-level store"
    with pytest.raises(QueryError, match=f"^{re.escape(msg)}$"):
        rank(st.well_level(), np.ones(E), level="field")


def test_a_stack_of_queries_ranks_by_their_mean_direction():
    st = _store()
    a, b = np.eye(E)[0], np.eye(E)[1] * 5.0  # unit-normalised before averaging: b's length does not count
    res = rank(st, np.stack([a, b]), top_k=None)
    assert res["row"].tolist() == _brute(st.embeddings, a + b / 5.0).tolist()
    msg = "^the query vectors cancel out \\(their mean is zero\\): nothing to rank by$"
    with pytest.raises(QueryError, match=msg):
        rank(st, np.stack([a, -a]))
    line = EmbeddingStore(np.array([[1.0], [-1.0], [1.0]]), st.fields.iloc[:3], "m-1")  # also in one dimension
    with pytest.raises(QueryError, match=msg):
        rank(line, np.array([[2.0], [-3.0]]))
    assert rank(line, np.array([[2.0], [3.0]]))["row"].tolist() == [0, 2, 1]


def test_torch_queries_rank_like_numpy_ones():
    torch = pytest.importorskip("torch")
    st = _store()
    q = np.arange(1.0, E + 1)
    expected = rank(st, q, top_k=6)
    grad = torch.tensor(q, dtype=torch.float32, requires_grad=True)  # e.g. straight from a model
    pd.testing.assert_frame_equal(rank(st, grad, top_k=6), expected)
    half = torch.tensor(q, dtype=torch.bfloat16)  # numpy cannot read bfloat16
    assert rank(st, half, top_k=6)["row"].tolist() == expected["row"].tolist()


def test_image_query_refuses_bad_rows_with_their_reason():
    st = _store(30)
    with pytest.raises(QueryError, match=re.escape("row must be an integer position, got 'x'")):
        image_query(st, "x")
    for bad in (30, -1):
        with pytest.raises(QueryError, match=re.escape(f"row {bad} is outside the store (0..29)")):
            image_query(st, bad)
    emb = st.embeddings.copy()
    emb[4] = 0.0
    zero = EmbeddingStore(emb, st.fields, "m-1", normalize=False)
    with pytest.raises(QueryError, match="^row 4 has an all-zero embedding$"):
        image_query(zero, 4)


# ---------------------------------------------------------------------- exact searcher
def test_exact_searcher_k_zero_and_all_but_one():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((9, E)).astype(np.float32)
    s = ExactSearcher(emb)
    assert len(s) == 9
    q = rng.standard_normal((2, E))
    scores, rows = s.search(q, 0)
    assert scores.shape == (2, 0) and rows.shape == (2, 0)
    scores, rows = s.search(q, 8)
    for i in range(2):
        full = emb.astype(np.float64) @ q[i]
        assert rows[i].tolist() == np.argsort(-full, kind="stable")[:8].tolist()
        np.testing.assert_allclose(scores[i], full[rows[i]], rtol=1e-5)


def test_exact_searcher_answers_at_float32_whatever_it_is_given():
    """A float64 array or query is searched as the store's float32: the same scores, bit for bit."""
    rng = np.random.default_rng(2)
    emb64 = rng.standard_normal((40, E))
    emb64 /= np.linalg.norm(emb64, axis=1, keepdims=True)
    q64 = rng.standard_normal((3, E))
    q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
    ref_scores, ref_rows = ExactSearcher(emb64.astype(np.float32)).search(q64.astype(np.float32), 10)
    scores, rows = ExactSearcher(emb64).search(q64, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(scores, ref_scores)
    assert scores.dtype == np.float64 and rows.dtype == np.int64


# ---------------------------------------------------------------------- searcher cache
def test_the_searcher_follows_a_replaced_embeddings_array():
    st = _store()
    q = np.arange(1.0, E + 1)
    first = rank(st, q, top_k=3)["row"].tolist()
    st.embeddings = st.embeddings[::-1].copy()  # e.g. the store re-embedded in place
    assert rank(st, q, top_k=3)["row"].tolist() == [len(st) - 1 - r for r in first]


def test_a_store_of_exactly_the_threshold_size_uses_the_ann_index(monkeypatch):
    made = []

    class Fake(ExactSearcher):
        pass

    def fake_searcher_for_store(store):
        made.append(len(store))
        return Fake(store.embeddings)

    monkeypatch.setattr(ann, "ANN_THRESHOLD", 30)
    monkeypatch.setattr(ann, "searcher_for_store", fake_searcher_for_store)
    assert isinstance(get_searcher(_store(30)), Fake) and made == [30]
    assert not isinstance(get_searcher(_store(29)), Fake) and made == [30]
    assert type(get_searcher(_store(30), exact=True)) is ExactSearcher


def test_image_query_asks_the_searcher_for_one_row_more_than_it_shows(monkeypatch):
    """The query row itself plus top_k others: a larger k would cost an ANN index more (and can switch
    it to exact search), a smaller one would come up a row short with exclude_self."""
    st = _store(30)
    asked = []

    class Spy(ExactSearcher):
        def search(self, queries, k):
            asked.append(k)
            return super().search(queries, k)

    monkeypatch.setattr(search, "get_searcher", lambda store, exact=False: Spy(store.embeddings))
    assert len(image_query(st, 5, top_k=4, exclude_self=True)) == 4
    assert len(image_query(st, 5, top_k=29)) == 29 and len(image_query(st, 5, top_k=None)) == 30
    assert asked == [5, 30, 30]
