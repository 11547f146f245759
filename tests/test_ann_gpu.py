"""The ANN index on GPUs, checked on the CPU with a stand-in for a faiss GPU build (issue 16).

``FakeFaiss`` is the real faiss-cpu module plus what a GPU build adds: ``get_num_gpus``,
``GpuMultipleClonerOptions``, ``GpuParameterSpace`` and ``index_cpu_to_all_gpus``.  A "GPU copy"
of an IVF index keeps its own ``nprobe`` (reachable only through ``GpuParameterSpace``, at most
2048 lists, as in faiss GPU) and searches the CPU index with it; a "GPU copy" of a flat index
(what k-means trains on) is the flat index itself, so GPU k-means runs the real faiss code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_cellclip import ann
from napari_cellclip.errors import CellClipError, CellClipWarning

faiss = pytest.importorskip("faiss")

GPU_NAMES = {"get_num_gpus", "GpuMultipleClonerOptions", "GpuParameterSpace", "index_cpu_to_all_gpus"}


class GpuIndex:
    """A GPU copy of an IVF index: its own nprobe, no IVF object a CPU code path could reach."""

    def __init__(self, cpu, log):
        self.cpu, self.log, self.nprobe, self.fail = cpu, log, None, None

    @property
    def ntotal(self):
        return self.cpu.ntotal

    def search(self, q, k):
        if self.fail is not None:
            raise self.fail
        self.log.append(("search", self.nprobe))
        ivf = faiss.extract_index_ivf(self.cpu)
        old = ivf.nprobe
        ivf.nprobe = self.nprobe
        try:
            return self.cpu.search(q, k)
        finally:
            ivf.nprobe = old


class FakeFaiss:
    def __init__(self, ngpu: int | None):
        self.ngpu = ngpu  # None: a faiss without the GPU API at all
        self.log = []
        self.clones = []
        self.param_error = None
        fake = self

        class ClonerOptions:
            shard = False

        class GpuParameterSpace:
            def set_index_parameter(self, index, name, value):
                if fake.param_error is not None:
                    raise fake.param_error
                if not isinstance(index, GpuIndex):
                    raise TypeError(f"not a GPU index: {index!r}")
                if name != "nprobe":
                    raise RuntimeError(f"could not set parameter {name}")
                if type(value) is not int or not 0 < value <= 2048:
                    raise RuntimeError(f"GPU IVF: nprobe must be an int in 1..2048, got {value!r}")
                fake.log.append(("set", value))
                index.nprobe = value

        self.GpuMultipleClonerOptions = ClonerOptions
        self.GpuParameterSpace = GpuParameterSpace

    def __getattr__(self, name):
        if name in GPU_NAMES:
            raise AttributeError(name)  # only reached when ngpu is None (see __getattribute__)
        return getattr(faiss, name)

    def __getattribute__(self, name):
        if name in GPU_NAMES and object.__getattribute__(self, "ngpu") is None:
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    def get_num_gpus(self):
        return self.ngpu

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        self.clones.append((index, None if co is None else co.shard))
        if isinstance(index, faiss.IndexFlat):
            return index  # k-means' assignment index: the real flat index stands in
        if not isinstance(index, faiss.IndexIVF):
            raise TypeError(f"cannot clone {index!r}")
        return GpuIndex(index, self.log)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def x():
    return _unit(np.random.default_rng(4).standard_normal((3000, 16)))


@pytest.fixture
def cpu_index(x):
    return ann.build_index(x, nlist=32, use_gpu=False)


def _install(monkeypatch, ngpu):
    fake = FakeFaiss(ngpu)
    monkeypatch.setattr(ann, "_faiss", lambda: fake)
    return fake


def _points_here(w):
    """A warning points at the line in this test that called the library, not into it."""
    return w.filename == __file__


# ------------------------------------------------------------------ moving the index to the GPUs
def test_index_moves_to_all_gpus_sharded_and_searches_there(monkeypatch, x, cpu_index):
    q = x[[3, 1500, 2999]]
    want_s, want_r = cpu_index.search(q, 10)
    fake = _install(monkeypatch, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_index.use_gpu() is True
        # one clone of this index, split (sharded) over the 2 GPUs, with the calibrated nprobe
        assert [(c is cpu_index.index, shard) for c, shard in fake.clones] == [(True, True)]
        assert fake.log == [("set", cpu_index.nprobe)]
        s, r = cpu_index.search(q, 10)
    assert fake.log[-1] == ("search", cpu_index.nprobe)  # answered by the GPU copy
    np.testing.assert_array_equal(r, want_r)
    np.testing.assert_allclose(s, want_s)
    assert r.dtype == np.int64 and s.dtype == np.float64
    assert r[:, 0].tolist() == [3, 1500, 2999]
    assert cpu_index.use_gpu() is True and len(fake.clones) == 1  # cloned once, then reused


def test_one_gpu_holds_the_whole_index(monkeypatch, cpu_index):
    fake = _install(monkeypatch, 1)
    assert cpu_index.use_gpu("auto") is True
    assert [shard for _, shard in fake.clones] == [False]


def test_no_gpu_or_gpu_turned_off_keeps_the_cpu_index(monkeypatch, x, cpu_index):
    if faiss.get_num_gpus() == 0:  # faiss-cpu: nothing to move to
        assert cpu_index.use_gpu() is False
    fake = _install(monkeypatch, 2)
    assert cpu_index.use_gpu(False) is False
    fake_none = _install(monkeypatch, 0)
    assert cpu_index.use_gpu(True) is False
    assert fake.clones == [] and fake_none.clones == []
    r = cpu_index.search(x[:4], 5)[1]
    assert r[:, 0].tolist() == [0, 1, 2, 3] and fake.log == [] and fake_none.log == []


def test_faiss_without_a_gpu_api_builds_and_searches_on_the_cpu(monkeypatch, x):
    fake = _install(monkeypatch, None)
    idx = ann.build_index(x, nlist=32, use_gpu=True)
    assert idx.use_gpu(True) is False
    assert idx.search(x[[7]], 3)[1][0, 0] == 7
    assert fake.clones == []


def test_nprobe_above_the_gpu_limit_is_capped(monkeypatch, x, cpu_index):
    fake = _install(monkeypatch, 2)
    cpu_index.nprobe = 4000
    assert cpu_index.use_gpu() is True
    assert fake.log == [("set", ann.GPU_MAX_NPROBE)]


# ------------------------------------------------------------------ per-query nprobe on the GPU
def test_per_query_nprobe_reaches_the_gpu_copy_and_is_restored(monkeypatch, x, cpu_index):
    fake = _install(monkeypatch, 2)
    cpu_index.use_gpu()
    gpu = cpu_index._gpu
    q = x[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, r = cpu_index.search(q, 10, nprobe=3)
        assert ("search", 3) in fake.log
        assert gpu.nprobe == cpu_index.nprobe  # restored afterwards
        all_s, all_r = cpu_index.search(q, 10, nprobe=10_000)  # more than the GPU allows: capped
        assert ("search", ann.GPU_MAX_NPROBE) in fake.log
        assert gpu.nprobe == cpu_index.nprobe
    assert (r[:, 0] == np.arange(5)).all()
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(all_r, truth)  # every list probed: the exact answer
    assert cpu_index._gpu is gpu  # nothing fell back to the CPU


def test_gpu_that_cannot_take_nprobe_is_a_clear_error(monkeypatch, cpu_index):
    fake = _install(monkeypatch, 1)
    fake.param_error = RuntimeError("device lost")
    with pytest.raises(CellClipError, match=rf"could not set nprobe={cpu_index.nprobe} on the GPU ANN index: "
                                            r"device lost"):
        cpu_index.use_gpu()


# ------------------------------------------------------------------ GPU failures: the CPU answers
@pytest.mark.parametrize("error,shown", [
    (RuntimeError("Error in GpuIndexIVF: out of memory\n  at line 12 of GpuIndexIVF.cu"),
     "Error in GpuIndexIVF: out of memory"),
    (RuntimeError(), "RuntimeError()"),
])
def test_failing_gpu_search_warns_once_and_the_cpu_answers(monkeypatch, x, cpu_index, error, shown):
    q = x[[10, 20]]
    want = cpu_index.search(q, 10)[1]
    fake = _install(monkeypatch, 1)
    cpu_index.use_gpu()
    cpu_index._gpu.fail = error
    with pytest.warns(CellClipWarning) as rec:
        _, r = cpu_index.search(q, 10)
    assert [str(w.message) for w in rec] == [f"GPU ANN search failed ({shown}); searching on the CPU from now on"]
    assert _points_here(rec[0])
    np.testing.assert_array_equal(r, want)
    with warnings.catch_warnings():  # from now on the CPU index, without another warning
        warnings.simplefilter("error")
        np.testing.assert_array_equal(cpu_index.search(q, 10)[1], want)
    assert not any(e[0] == "search" for e in fake.log)


def test_gpu_nprobe_failure_during_search_falls_back_too(monkeypatch, x, cpu_index):
    fake = _install(monkeypatch, 1)
    cpu_index.use_gpu()
    fake.param_error = RuntimeError("device lost")
    with pytest.warns(CellClipWarning, match=r"GPU ANN search failed \(could not set nprobe=7"):
        _, r = cpu_index.search(x[[5]], 4, nprobe=7)
    assert r[0, 0] == 5


# ------------------------------------------------------------------ k-means on the GPU, build, load
def _centroids(index):
    q = faiss.extract_index_ivf(index).quantizer
    return q.reconstruct_n(0, q.ntotal)


def test_kmeans_on_the_gpu_gives_the_lists_the_cpu_would(monkeypatch, x, cpu_index):
    fake = _install(monkeypatch, 1)
    idx = ann.build_index(x, nlist=32)  # use_gpu="auto": faiss has a GPU, so k-means and search go there
    flat = [c for c, _ in fake.clones if isinstance(c, faiss.IndexFlat)]
    assert len(flat) == 1 and flat[0].d == 16  # k-means assigned points on the GPU
    np.testing.assert_array_equal(_centroids(idx.index), _centroids(cpu_index.index))
    assert idx.nprobe == cpu_index.nprobe and idx.meta["n_train"] == len(x)
    assert isinstance(idx._gpu, GpuIndex) and idx._gpu.cpu is idx.index  # the built index went to the GPU
    q = x[[0, 100, 2000]]
    np.testing.assert_array_equal(idx.search(q, 10)[1], cpu_index.search(q, 10)[1])
    assert fake.log[-1] == ("search", idx.nprobe)


def test_build_without_gpu_keeps_kmeans_and_search_on_the_cpu(monkeypatch, x, cpu_index):
    fake = _install(monkeypatch, 2)
    idx = ann.build_index(x, nlist=32, use_gpu=False)
    assert fake.clones == [] and idx._gpu is None
    np.testing.assert_array_equal(_centroids(idx.index), _centroids(cpu_index.index))


def test_loaded_index_goes_to_the_gpu(monkeypatch, tmp_path, x, cpu_index):
    cpu_index.save(tmp_path)
    fake = _install(monkeypatch, 2)
    off = ann.load_index(tmp_path, embeddings=x, use_gpu=False)
    assert off._gpu is None and fake.clones == []
    on = ann.load_index(tmp_path, embeddings=x)
    assert isinstance(on._gpu, GpuIndex) and [shard for _, shard in fake.clones] == [True]
    assert on.search(x[[42]], 5)[1][0, 0] == 42
    assert fake.log[-1] == ("search", cpu_index.nprobe)
