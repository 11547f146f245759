"""ANN / exact search behaviours a user would see go wrong (issue 16).

* the nprobe calibration on an index where it, not the ``nlist / 32`` floor, decides;
* queries whose probed lists hold fewer than ``k`` rows get the exact answer;
* chunked exact top-k returns the right *rows* (row offset of later chunks);
* a store and its index loaded with ``mmap=True`` really stay on disk;
* ranking returns the right rows in the right order, not only the right scores.
"""

from __future__ import annotations

import gc
import mmap

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import ann, search
from napari_cellclip.store import EmbeddingStore

faiss = pytest.importorskip("faiss")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_rows(x, q, k):
    """Exact top-k rows by a plain argsort (no code under test)."""
    s = np.atleast_2d(q).astype(np.float64) @ x.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


@pytest.fixture(scope="module")
def hard():
    """8000 uniform unit vectors in 16-D: no cluster structure, so reaching 97 % recall@10 needs
    ~40 of the 128 lists -- far above the nlist/32 = 4 floor (calibration decides)."""
    return _unit(np.random.default_rng(11).standard_normal((8000, 16)))


@pytest.fixture(scope="module")
def hard_index(hard):
    seen = {}
    real = ann._calibration_queries

    def spy(x, nq, rng):
        seen["q"] = real(x, nq, rng)
        return seen["q"]

    mp = pytest.MonkeyPatch()
    mp.setattr(ann, "_calibration_queries", spy)
    try:
        idx = ann.build_index(hard, use_gpu=False)
    finally:
        mp.undo()
    return idx, seen["q"]


def _recall(idx, x, q, nprobe, k=10):
    truth, _ = _brute_rows(x, q, k)
    _, got = idx.search(q, k, nprobe=nprobe)
    return ann.recall_at_k(got, truth)


# ---------------------------------------------------------------------- calibration
def test_calibrated_nprobe_is_the_smallest_that_reaches_the_target(hard, hard_index):
    idx, q = hard_index
    nlist, p = idx.meta["nlist"], idx.nprobe
    assert nlist == 128
    floor = nlist // ann.MIN_PROBE_FRACTION
    assert p > floor, "the calibration, not the floor, must decide on this data"
    target = idx.meta["target_recall"]
    assert target == ann.TARGET_RECALL
    # on the calibration queries: the chosen nprobe reaches the target ...
    got = _recall(idx, hard, q, p)
    assert got >= target
    assert idx.meta["calibration_recall"] == pytest.approx(got)
    # ... the power of two below it did not (doubling stopped at the first success) ...
    pow2 = 1 << (p - 1).bit_length()  # smallest power of two >= p
    assert _recall(idx, hard, q, pow2 // 2) < target
    # ... and the refinement between pow2/2 and pow2 kept the smallest success of its grid
    grid = np.unique(np.linspace(max(1, pow2 // 2), pow2, num=5).astype(int))
    first_ok = next(int(c) for c in grid if _recall(idx, hard, q, int(c)) >= target)
    assert p == first_ok


def test_calibrated_index_finds_the_true_neighbours_of_fresh_queries(hard, hard_index):
    """What the user sees: recall@10 of new queries (near and far from the data) ~ the target."""
    idx, _ = hard_index
    rng = np.random.default_rng(99)
    base = hard[rng.choice(len(hard), 500, replace=False)]
    scale = np.where(np.arange(500) % 2 == 0, 0.5, 1.2)[:, None] / np.sqrt(hard.shape[1])
    q = _unit(base + rng.standard_normal(base.shape) * scale)
    truth, s = _brute_rows(hard, q, 10)
    scores, rows = idx.search(q, 10)
    assert ann.recall_at_k(rows, truth) >= 0.95
    # half the calibrated nprobe is clearly worse: the calibration did not over-probe for nothing
    assert _recall(idx, hard, q, max(1, idx.nprobe // 2)) < 0.95
    # returned scores are the exact cosines of the returned rows, best first
    np.testing.assert_allclose(scores, np.take_along_axis(s, rows, 1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_floor_decides_on_easy_data():
    """Clustered data reaches the target with 1-2 lists: nprobe is the nlist/32 floor, exactly."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 32))
    x = _unit(centres[rng.integers(0, 100, 8000)] + 0.3 * rng.standard_normal((8000, 32)))
    idx = ann.build_index(x, use_gpu=False)
    assert idx.meta["nlist"] == 128
    assert idx.nprobe == 128 // ann.MIN_PROBE_FRACTION == 4
    assert idx.meta["calibration_recall"] >= ann.TARGET_RECALL


def test_unreachable_target_falls_back_to_every_list(hard):
    x = hard[:2000]
    idx = ann.build_index(x, use_gpu=False, target_recall=1.01)
    assert idx.nprobe == idx.meta["nlist"]
    truth, _ = _brute_rows(x, x[:20], 10)
    np.testing.assert_array_equal(idx.search(x[:20], 10)[1], truth)  # all lists probed: exact


# ---------------------------------------------------------------------- exact fallback
def test_rows_faiss_cannot_fill_are_answered_exactly(hard, hard_index):
    idx, _ = hard_index
    ivf = faiss.extract_index_ivf(idx.index)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    k = int(np.median(sizes))  # with one probed list, about half the queries come up short
    rng = np.random.default_rng(3)
    q = _unit(hard[rng.choice(len(hard), 60, replace=False)] + 0.3 * rng.standard_normal((60, 16)))
    ivf.nprobe = 1
    _, raw_r = idx.index.search(q, k)
    ivf.nprobe = idx.nprobe
    short = (raw_r < 0).any(axis=1)
    assert 0 < short.sum() < len(q), "need both filled and short queries"

    scores, rows = idx.search(q, k, nprobe=1)
    assert rows.shape == (60, k) and (rows >= 0).all()
    truth, s = _brute_rows(hard, q, k)
    # short queries: exactly the exact answer (rows and scores)
    np.testing.assert_array_equal(rows[short], truth[short])
    np.testing.assert_allclose(scores[short], np.take_along_axis(s, truth, 1)[short], atol=1e-5)
    # filled queries keep FAISS's answer (one list), with exact cosines
    np.testing.assert_array_equal(rows[~short], raw_r[~short])
    np.testing.assert_allclose(scores, np.take_along_axis(s, rows, 1), atol=1e-5)
    assert idx.nprobe == ivf.nprobe  # the per-call nprobe did not stick


def test_k_above_the_ann_limit_is_the_exact_ranking(hard, hard_index):
    idx, _ = hard_index
    q = hard[[5, 77]]
    k = ann.MAX_ANN_K + 1
    scores, rows = idx.search(q, k)
    truth, s = _brute_rows(hard, q, k)
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(s, truth, 1), atol=1e-5)


# ---------------------------------------------------------------------- chunked exact top-k
@pytest.mark.parametrize("chunk,k", [(1000, 7), (333, 50), (4, 7), (8000, 7), (97, 200)])
def test_chunked_exact_topk_returns_the_right_rows(hard, chunk, k):
    q = hard[[0, 4321, 7999]] + 0.01  # best matches in the first, a middle and the last chunk
    scores, rows = ann.exact_topk(hard, q, k, chunk=chunk)
    truth, s = _brute_rows(hard, q, k)
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(s, truth, 1), atol=1e-5)
    assert rows[:, 0].tolist() == [0, 4321, 7999]


def test_chunked_exact_topk_on_a_memmap(tmp_path, hard):
    np.save(tmp_path / "x.npy", hard)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    _, r = ann.exact_topk(mm, hard[[1234]], 5, chunk=500)
    assert r[0, 0] == 1234 and r[0].tolist() == _brute_rows(hard, hard[[1234]], 5)[0][0].tolist()


# ---------------------------------------------------------------------- memory mapping
def _file_backed(a) -> bool:
    """Whether the array's memory is a mapped file (np.memmap / mmap.mmap somewhere in its bases)."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _mapped_by_this_process(path) -> bool | None:
    """Whether ``path`` appears in /proc/self/maps (None where there is no /proc)."""
    try:
        with open("/proc/self/maps") as fh:
            return str(path) in fh.read()
    except OSError:
        return None


def _index_is_memory_mapped(index, path) -> bool:
    on_proc = _mapped_by_this_process(path)
    if on_proc is not None:
        return on_proc
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return type(lists).__name__ == "OnDiskInvertedLists"


def _fields(n):
    return pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"A{i % 24 + 1:02d}" for i in range(n)],
                         "Metadata_Site": np.arange(n) // 24})


def test_store_loaded_with_mmap_stays_on_disk(tmp_path, hard):
    EmbeddingStore(hard, _fields(len(hard)), "m", normalize=False).save(tmp_path / "s")
    mapped = EmbeddingStore.load(tmp_path / "s", mmap=True)
    assert _file_backed(mapped.embeddings) and not mapped.embeddings.flags.writeable
    assert _mapped_by_this_process((tmp_path / "s" / "embeddings.npy").resolve()) in (True, None)
    in_ram = EmbeddingStore.load(tmp_path / "s")
    assert not _file_backed(in_ram.embeddings)
    np.testing.assert_array_equal(mapped.embeddings, in_ram.embeddings)
    # the searcher works on the mapped array itself, not on a copy of it
    s = search.get_searcher(mapped, exact=False)
    assert isinstance(s, search.ExactSearcher)
    assert np.shares_memory(s.embeddings, mapped.embeddings)


def test_ann_index_loaded_with_mmap_stays_on_disk(tmp_path, hard, hard_index):
    idx, _ = hard_index
    a, b = tmp_path / "mapped", tmp_path / "read"
    idx.save(a)
    idx.save(b)
    loaded = ann.load_index(a, embeddings=hard, mmap=True)
    assert _index_is_memory_mapped(loaded.index, (a / ann.INDEX_FILE).resolve())
    read = ann.load_index(b, embeddings=hard, mmap=False)
    assert not _index_is_memory_mapped(read.index, (b / ann.INDEX_FILE).resolve())
    q = hard[:30]
    np.testing.assert_array_equal(loaded.search(q, 10)[1], read.search(q, 10)[1])
    assert loaded.nprobe == read.nprobe == idx.nprobe


def test_large_store_searches_through_a_memory_mapped_index(tmp_path, hard, monkeypatch):
    monkeypatch.setattr(ann, "ANN_THRESHOLD", 1000)
    EmbeddingStore(hard, _fields(len(hard)), "m", normalize=False).save(tmp_path / "s")
    first = search.get_searcher(EmbeddingStore.load(tmp_path / "s", mmap=True))  # builds + saves
    assert isinstance(first, ann.AnnIndex)
    del first
    gc.collect()
    store = EmbeddingStore.load(tmp_path / "s", mmap=True)
    s = search.get_searcher(store)  # loaded from the folder
    assert isinstance(s, ann.AnnIndex)
    assert _index_is_memory_mapped(s.index, (tmp_path / "s" / ann.INDEX_FILE).resolve())
    assert s.embeddings is store.embeddings and _file_backed(s.embeddings)  # the exact fallback too
    res = search.rank(store, hard[4000], top_k=5)
    assert res["row"].iloc[0] == 4000


# ---------------------------------------------------------------------- rows, not only scores
def test_rank_returns_the_exact_rows_in_order():
    rng = np.random.default_rng(5)
    x = _unit(rng.standard_normal((300, 12)))
    f = _fields(300)
    f["Metadata_tag"] = [f"row{i}" for i in range(300)]
    st = EmbeddingStore(x, f, "m")
    q = rng.standard_normal(12)
    res = search.rank(st, q, top_k=25)
    truth, s = _brute_rows(st.embeddings, q / np.linalg.norm(q), 25)
    assert res["row"].tolist() == truth[0].tolist()
    assert res["Metadata_tag"].tolist() == [f"row{i}" for i in truth[0]]  # metadata of those rows
    np.testing.assert_allclose(res["score"], s[0, truth[0]], atol=1e-6)
    # well level: rows of store.well_level(), in order
    wl = st.well_level()
    wres = search.rank(st, q, top_k=10, level="well")
    wtruth, _ = _brute_rows(wl.embeddings, q / np.linalg.norm(q), 10)
    assert wres["row"].tolist() == wtruth[0].tolist()
    assert wres["Metadata_Well"].tolist() == wl.fields["Metadata_Well"].iloc[wtruth[0]].tolist()


def test_image_query_returns_the_nearest_other_rows_in_order():
    rng = np.random.default_rng(6)
    x = _unit(rng.standard_normal((200, 8)))
    st = EmbeddingStore(x, _fields(200), "m")
    truth, _ = _brute_rows(st.embeddings, st.embeddings[17], 6)
    assert truth[0, 0] == 17
    assert search.image_query(st, 17, top_k=6)["row"].tolist() == truth[0].tolist()
    assert search.image_query(st, 17, top_k=5, exclude_self=True)["row"].tolist() == truth[0, 1:].tolist()

