"""FAISS ANN index vs exact search (issue 5): recall, mmap round trip, threshold switch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("faiss")

from napari_cellclip import ann, search  # noqa: E402
from napari_cellclip.store import EmbeddingStore  # noqa: E402


def _clustered(n=20_000, d=64, n_clusters=200, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    lab = rng.integers(0, n_clusters, n)
    x = centres[lab] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = _clustered()
    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), 300, replace=False)] + 0.1 * rng.standard_normal((300, x.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q.astype(np.float32)


@pytest.fixture(scope="module")
def index(data):
    return ann.build_index(data[0], use_gpu=False)


def test_recall_at_10_against_exact(data, index):
    x, q = data
    _, truth = ann.exact_topk(x, q, 10)
    scores, rows = index.search(q, 10)
    assert rows.shape == (300, 10) and scores.dtype == np.float64
    rec = ann.recall_at_k(rows, truth)
    assert rec >= 0.95, rec
    # scores are exact cosines of the rows returned, best first
    np.testing.assert_allclose(scores, np.einsum("qe,qke->qk", q, x[rows]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert 1 <= index.nprobe < index.meta["nlist"]  # the calibration did not fall back to brute force


def test_exact_topk_matches_argsort(data):
    x, q = data
    s, r = ann.exact_topk(x, q[:5], 7, chunk=3000)
    full = q[:5] @ x.T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_allclose(s, np.take_along_axis(full, ref, 1), atol=1e-6)


def test_save_load_mmap_round_trip(data, index, tmp_path):
    x, q = data
    index.save(tmp_path)
    loaded = ann.load_index(tmp_path, embeddings=x, mmap=True)
    assert loaded.nprobe == index.nprobe and len(loaded) == len(x)
    s1, r1 = index.search(q[:50], 10)
    s2, r2 = loaded.search(q[:50], 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2)
    with pytest.raises(ann.CellClipError, match="stale"):
        ann.load_index(tmp_path, embeddings=x[:-1])
    # k above the ANN limit is answered exactly
    s, r = loaded.search(q[:1], ann.MAX_ANN_K + 1)
    assert r.shape == (1, ann.MAX_ANN_K + 1)


def test_threshold_switch_and_store_folder(data, tmp_path, monkeypatch):
    x, _ = data
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"A{i % 24 + 1:02d}" for i in range(len(x))],
                           "Metadata_Site": np.arange(len(x)) // 24})
    small = EmbeddingStore(x[:500], fields.iloc[:500], "m", normalize=False)
    monkeypatch.setattr(ann, "ANN_THRESHOLD", 1000)
    assert isinstance(search.get_searcher(small), search.ExactSearcher)

    big = EmbeddingStore(x, fields, "m", normalize=False)
    big.save(tmp_path / "store")
    loaded = EmbeddingStore.load(tmp_path / "store", mmap=True)
    assert isinstance(loaded.embeddings, np.ndarray) and loaded.path == tmp_path / "store"
    s = search.get_searcher(loaded)  # built on first use and saved next to the store
    assert isinstance(s, ann.AnnIndex)
    assert (tmp_path / "store" / ann.INDEX_FILE).is_file()
    again = EmbeddingStore.load(tmp_path / "store", mmap=True)
    s2 = search.get_searcher(again)  # now loaded (memory-mapped) from the folder
    assert isinstance(s2, ann.AnnIndex) and s2.nprobe == s.nprobe

    q = x[123]
    top_ann = search.rank(again, q, top_k=10)
    top_exact = search.get_searcher(again, exact=True).search(q[None], 10)[1][0]
    assert top_ann["row"].iloc[0] == 123
    assert len(set(top_ann["row"]) & set(top_exact.tolist())) >= 9
    # image_query / well level keep working above the threshold
    assert search.image_query(again, 5, top_k=3)["row"].iloc[0] == 5
    assert len(search.rank(again, q, top_k=5, level="well")) == 5
