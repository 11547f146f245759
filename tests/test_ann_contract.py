"""The ANN index's contract at its edges (issue 16): sizes, row offsets, dtypes, k at its limits,
which answers come from FAISS and which from the exact fallback, and the stored identity of an index.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from napari_cellclip import ann
from napari_cellclip.errors import CellClipError

faiss = pytest.importorskip("faiss")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_rows(x, q, k):
    """Exact top-k rows by a plain argsort (no code under test)."""
    s = np.atleast_2d(q).astype(np.float64) @ np.asarray(x, dtype=np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


@pytest.fixture(scope="module")
def x():
    return _unit(np.random.default_rng(21).standard_normal((3000, 16)))


# ---------------------------------------------------------------------- number of lists
@pytest.mark.parametrize("n,nlist", [
    (0, 1),            # nothing to index: one (empty) list
    (1, 1), (10, 10),  # fewer rows than the 16-list floor: one list per row, k-means can do that
    (64, 16),          # 2·√64 = 16
    (700, 17),         # 2·√700 ≈ 53 → 64, but 700 rows give only 17 lists of 39+ points
    (2000, 51),        # 2·√2000 ≈ 89 → 64, capped at 2000 // 39 = 51
    (8000, 128),       # 2·√8000 ≈ 179 → 128 (nearest power of two, not the next one)
    (50_000, 512),     # ≈ 447 → 512
    (10**8, 8192),     # 20 000 → 16 384, capped at 8192
])
def test_default_nlist(n, nlist):
    assert ann.default_nlist(n) == nlist


def test_tiny_arrays_get_a_working_index():
    """Fewer rows than the 16-list floor used to fail inside faiss' k-means."""
    for n in (1, 5, 15):
        x = _unit(np.random.default_rng(n).standard_normal((n, 8)))
        idx = ann.build_index(x, use_gpu=False)
        assert len(idx) == n and idx.meta["nlist"] == n
        s, r = idx.search(x, 3)
        np.testing.assert_array_equal(r, _brute_rows(x, x, min(3, n))[0])
        assert r[:, 0].tolist() == list(range(n))


# ---------------------------------------------------------------------- build_index input
@pytest.mark.parametrize("bad", [np.zeros(8, np.float32), np.zeros((0, 8), np.float32),
                                 np.zeros((2, 3, 4), np.float32)])
def test_build_index_rejects_what_is_not_a_matrix_of_rows(bad):
    msg = f"ANN index needs a non-empty (N, E) array, got shape {bad.shape}"
    with pytest.raises(CellClipError, match=re.escape(msg)):
        ann.build_index(bad, use_gpu=False)


def test_builds_are_reproducible():
    """The same store gives the same index (training sample, lists, nprobe, answers) every time."""
    x = _unit(np.random.default_rng(22).standard_normal((12_000, 8)))
    a = ann.build_index(x, nlist=64, use_gpu=False)
    b = ann.build_index(x, nlist=64, use_gpu=False)
    assert a.meta == b.meta and a.nprobe == b.nprobe
    q = x[::60]
    np.testing.assert_array_equal(a.search(q, 10, nprobe=1)[1], b.search(q, 10, nprobe=1)[1])


def test_kmeans_sample_is_max_of_40_per_list_and_10000_distinct_rows(monkeypatch):
    seen = []
    real = faiss.IndexIVFFlat.train

    def spy(self, xt):
        seen.append(np.array(xt))
        return real(self, xt)

    monkeypatch.setattr(faiss.IndexIVFFlat, "train", spy)
    x = _unit(np.random.default_rng(23).standard_normal((25_000, 4)))
    x[:, 0] = np.arange(25_000) / 25_000  # every row distinct, and told apart by its first value
    small = ann.build_index(x, nlist=64, n_calibration=20, use_gpu=False)  # 40·64 < 10 000
    big = ann.build_index(x, nlist=512, n_calibration=20, use_gpu=False)  # 40·512 = 20 480
    assert small.meta["n_train"] == 10_000 and big.meta["n_train"] == 20_480
    assert [len(s) for s in seen] == [10_000, 20_480]
    for s in seen:  # rows of the store, none twice
        assert len(np.unique(s[:, 0])) == len(s)
        assert np.isin(s[:, 0], x[:, 0]).all()


def test_a_store_larger_than_one_add_chunk_is_indexed_row_for_row():
    """Rows are added in chunks of 262 144: the row after the first chunk is in, once."""
    n = 262_144 + 1
    x = _unit(np.random.default_rng(24).standard_normal((n, 4)))
    idx = ann.build_index(x, nlist=16, n_calibration=10, use_gpu=False)
    assert len(idx) == n
    _, r = idx.search(x[[0, n - 1]], 2, nprobe=16)
    assert r[:, 0].tolist() == [0, n - 1]


# ---------------------------------------------------------------------- search at the edges of k
def test_k_zero_and_one(x):
    idx = ann.build_index(x, nlist=32, use_gpu=False)
    q = x[[5, 6, 7]]
    s, r = idx.search(q, 0)
    assert s.shape == (3, 0) and r.shape == (3, 0) and r.dtype == np.int64 and s.dtype == np.float64
    s, r = idx.search(q, 1)
    assert r.shape == (3, 1) and r[:, 0].tolist() == [5, 6, 7]
    np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-5)


def test_k_up_to_the_limit_is_answered_by_faiss_above_it_needs_the_embeddings(tmp_path, x):
    """An index loaded without its embeddings answers k <= MAX_ANN_K itself; beyond that the exact
    ranking needs the embeddings, and the error says how to give them."""
    ann.build_index(x, nlist=16, use_gpu=False).save(tmp_path)
    bare = ann.load_index(tmp_path)
    q = x[[1, 2]]
    s, r = bare.search(q, ann.MAX_ANN_K, nprobe=16)  # every list probed: exact, and full
    truth, sc = _brute_rows(x, q, ann.MAX_ANN_K)
    np.testing.assert_array_equal(r, truth)
    np.testing.assert_allclose(s, np.take_along_axis(sc, truth, 1), atol=1e-5)
    with pytest.raises(CellClipError, match="^exact fallback needs the embeddings; load the index with embeddings=$"):
        bare.search(q, ann.MAX_ANN_K + 1)


def test_a_freshly_built_index_answers_large_k_exactly(x):
    idx = ann.build_index(x, nlist=32, use_gpu=False)
    q = x[[4, 40]]
    s, r = idx.search(q, ann.MAX_ANN_K + 1)
    truth, sc = _brute_rows(x, q, ann.MAX_ANN_K + 1)
    np.testing.assert_array_equal(r, truth)
    np.testing.assert_allclose(s, np.take_along_axis(sc, truth, 1), atol=1e-5)


def test_filled_answers_containing_row_0_are_faiss_answers(x):
    """Only rows FAISS could not fill (-1) are re-answered exactly: row 0 is a real row."""
    idx = ann.build_index(x, nlist=32, use_gpu=False)
    q = x[[0, 1]]
    ivf = faiss.extract_index_ivf(idx.index)
    ivf.nprobe = 1
    raw_s, raw_r = idx.index.search(q, 40)
    ivf.nprobe = idx.nprobe
    assert (raw_r >= 0).all() and raw_r[0, 0] == 0 and raw_r[1, 0] == 1
    assert (raw_r != _brute_rows(x, q, 40)[0]).any()  # one list is not the exact answer ...
    s, r = idx.search(q, 40, nprobe=1)
    np.testing.assert_array_equal(r, raw_r)  # ... and it is what the user gets
    np.testing.assert_allclose(s, raw_s)


def test_a_failing_cpu_search_is_a_cellclip_error(x):
    idx = ann.build_index(x[:500], nlist=16, use_gpu=False)

    class Broken:  # stands in for faiss failing inside search (e.g. out of memory)
        ntotal, d = idx.index.ntotal, idx.index.d

        def search(self, q, k):
            raise RuntimeError("std::bad_alloc")

    idx.index = Broken()
    with pytest.raises(CellClipError, match=r"^ANN search failed: std::bad_alloc$"):
        idx.search(x[:1], 5)


# ---------------------------------------------------------------------- exact top-k
def test_exact_topk_k_zero_one_and_all_but_one(x):
    q = x[[10, 2500]] + 0.01
    s, r = ann.exact_topk(x, q, 0, chunk=700)
    assert s.shape == (2, 0) and r.shape == (2, 0)
    for k, chunk in [(1, 700), (1, 3000), (2999, 3000), (699, 700), (5, 6)]:
        s, r = ann.exact_topk(x, q, k, chunk=chunk)
        truth, sc = _brute_rows(x, q, k)
        np.testing.assert_array_equal(r, truth)
        np.testing.assert_allclose(s, np.take_along_axis(sc, truth, 1), atol=1e-5)


@pytest.mark.parametrize("n,k", [(1648, 658), (2092, 1667), (960, 547)])
def test_exact_topk_when_rows_improve_steadily(n, k):
    """Rows ever closer to the query (a drift): the best k are the last k, best first."""
    angle = np.linspace(1.5, 0.0, n)
    x = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
    s, r = ann.exact_topk(x, np.array([1.0, 0.0]), k)
    assert r[0].tolist() == list(range(n - 1, n - 1 - k, -1))


def test_exact_topk_types(x):
    """float32 scores and int64 rows, whatever the dtype of the embeddings and queries."""
    for emb, q in [(x, x[:3]), (x.astype(np.float64), x[:3].astype(np.float64)), (x.astype(np.float16), x[:3])]:
        s, r = ann.exact_topk(emb, q, 4, chunk=1000)
        assert s.dtype == np.float32 and r.dtype == np.int64
        assert r[:, 0].tolist() == [0, 1, 2]


def test_recall_at_k():
    assert ann.recall_at_k([[3]], [[4]]) == 0.0
    assert ann.recall_at_k([[4]], [[4]]) == 1.0
    assert ann.recall_at_k([[1, 2], [3, 4]], [[2, 9], [4, 3]]) == 0.75
    assert ann.recall_at_k(np.zeros((0, 0)), np.zeros((0, 0))) == 1.0  # nothing to find


# ---------------------------------------------------------------------- the stored identity
def _documented_fingerprint(x):
    """blake2b-96 of "<shape>|<dtype>" and the float32 bytes of 64 evenly spaced rows (first and last
    included): what ann.json records, so it must not change under a saved index."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{x.shape}|{x.dtype}".encode())
    rows = np.unique(np.linspace(0, len(x) - 1, num=min(len(x), 64)).astype(np.int64))
    h.update(x[rows].astype(np.float32).tobytes())
    return h.hexdigest()


def test_fingerprint_is_the_recorded_recipe():
    rng = np.random.default_rng(25)
    for x in [rng.standard_normal((1000, 8)).astype(np.float32), rng.standard_normal((40, 3)),
              rng.standard_normal((300, 5)).astype(np.float16), np.zeros((0, 4), np.float32)]:
        assert ann.fingerprint(x) == _documented_fingerprint(x)


def test_fingerprint_sees_the_first_middle_and_last_rows():
    x = _unit(np.random.default_rng(26).standard_normal((1000, 8)))
    ref = ann.fingerprint(x)
    assert ann.fingerprint(x.copy()) == ref
    for row in (0, 999 * 30 // 63, 999):  # sampled rows: first, one in the middle, last
        y = x.copy()
        y[row, 3] += 0.25
        assert ann.fingerprint(y) != ref, row
    assert ann.fingerprint(x[:-1]) != ref


def test_a_sharded_cpu_index_gets_nprobe_on_every_shard(x):
    """An index faiss cannot reach an IVF object in (CPU shards) gets nprobe through ParameterSpace."""
    keep, halves = [], []
    for part in (x[:1500], x[1500:]):
        quantizer = faiss.IndexFlatIP(16)
        ivf = faiss.IndexIVFFlat(quantizer, 16, 16, faiss.METRIC_INNER_PRODUCT)
        ivf.train(part)
        ivf.add(part)
        keep.append(quantizer)
        halves.append(ivf)
    shards = faiss.IndexShards(16, False, True)  # the second shard's rows are numbered after the first's
    for h in halves:
        shards.add_shard(h)
    idx = ann.AnnIndex(shards, nprobe=2, embeddings=x)
    assert [h.nprobe for h in halves] == [2, 2]
    q = x[[10, 2000]]
    _, r = idx.search(q, 5, nprobe=16)  # every list of both shards: the exact answer
    np.testing.assert_array_equal(r, _brute_rows(x, q, 5)[0])
    assert [h.nprobe for h in halves] == [2, 2]
