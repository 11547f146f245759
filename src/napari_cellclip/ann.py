"""Approximate nearest-neighbour index (FAISS) for large embedding stores.

Search over an :class:`~napari_cellclip.store.EmbeddingStore` is an exact matrix
product below :data:`ANN_THRESHOLD` rows; at or above it, :func:`napari_cellclip.search.get_searcher`
uses an :class:`AnnIndex`:

* **IVF-flat on inner product** of the L2-normalised vectors (cosine).  The vectors
  are stored uncompressed in the inverted lists, so every returned score is the exact
  cosine; only *which* rows are looked at is approximate.
* ``nlist`` ≈ ``2·√N`` (a power of two, 64–8192), k-means trained on a sample of
  ``40·nlist`` vectors.
* ``nprobe`` is **calibrated at build time**: held-out queries (stored vectors with
  small and with large noise, renormalised) are searched exactly and with growing
  ``nprobe``; the smallest ``nprobe`` reaching :data:`TARGET_RECALL` recall@10 is kept,
  but at least ``nlist / 32`` (text queries lie off the image manifold and need more
  lists than image-like queries show; benchmarks/RESULTS.md row 4).  Recorded in ``ann.json``.
* Saved next to the store as ``ann.faiss`` + ``ann.json`` and loaded **memory-mapped**
  (``faiss.IO_FLAG_MMAP``: the inverted lists stay on disk, paged in on demand).
* GPU FAISS is used for search when the installed faiss has GPUs
  (``faiss.get_num_gpus() > 0``); faiss-cpu from PyPI has none.
* ``k`` larger than :data:`MAX_ANN_K` (e.g. "rank everything") and queries for which the
  probed lists hold fewer than ``k`` rows fall back to the exact product.

This module imports neither torch nor Qt; faiss is imported inside functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import CellClipError, warn_at_caller

__all__ = [
    "ANN_THRESHOLD",
    "TARGET_RECALL",
    "AnnIndex",
    "faiss_available",
    "build_index",
    "load_index",
    "searcher_for_store",
    "recall_at_k",
    "exact_topk",
]

#: stores with at least this many rows are searched with the ANN index (exact below)
ANN_THRESHOLD = 50_000
#: recall@10 the build-time nprobe calibration aims for (the issue asks ≥ 0.95)
TARGET_RECALL = 0.97
#: nprobe is at least nlist // MIN_PROBE_FRACTION
MIN_PROBE_FRACTION = 32
#: larger k than this is answered exactly
MAX_ANN_K = 2048
INDEX_FILE = "ann.faiss"
META_FILE = "ann.json"
_FORMAT = "napari-cellclip-ann-v1"


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


#: how to get faiss: an optional dependency, so that a GPU build can take the ``faiss`` package's place
FAISS_HINT = ("pip install 'napari-cellclip[ann]' (faiss-cpu); on a GPU machine install a faiss GPU build "
              "instead (e.g. conda install -c pytorch faiss-gpu, or pip install faiss-gpu-cu12)")
#: the most lists a GPU IVF index probes per query (faiss GPU's k-selection limit)
GPU_MAX_NPROBE = 2048


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise CellClipError(f"the ANN index needs faiss, which is not installed ({e}): {FAISS_HINT}") from None
    return faiss


def default_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: the power of two nearest 2·√n, in [16, 8192], at most
    ``n // 39`` (faiss wants ≥ 39 training points per list) and never more than ``n`` (k-means
    cannot make more lists than it has points)."""
    if n <= 0:
        return 1
    target = 2.0 * math.sqrt(n)
    p = 2 ** int(round(math.log2(max(target, 1.0))))
    return int(min(n, max(16, min(8192, p, max(1, n // 39)))))


def fingerprint(embeddings: np.ndarray) -> str:
    """A cheap identity of an embedding matrix: shape + a hash of a few rows."""
    import hashlib

    x = np.asarray(embeddings)
    n = x.shape[0]
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{x.shape}|{x.dtype}".encode())
    if n:
        take = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64))
        h.update(np.ascontiguousarray(x[take], dtype=np.float32).tobytes())
    return h.hexdigest()


def exact_topk(embeddings: np.ndarray, queries: np.ndarray, k: int, chunk: int = 262_144):
    """Exact top-``k`` by inner product, streamed over row chunks (works on a memmap).

    Returns ``(scores (Q, k) float32, rows (Q, k) int64)``, best first.
    """
    x = embeddings
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    n = x.shape[0]
    k = max(0, min(int(k), n))
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((q.shape[0], 0), dtype=np.int64)
    for a in range(0, n, chunk):
        s = q @ np.asarray(x[a:a + chunk], dtype=np.float32).T
        kk = min(k, s.shape[1])
        idx = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else \
            np.broadcast_to(np.arange(s.shape[1]), (q.shape[0], s.shape[1]))
        cs = np.concatenate([best_s, np.take_along_axis(s, idx, 1)], axis=1)
        cr = np.concatenate([best_r, idx + a], axis=1)
        keep = np.argsort(-cs, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(cs, keep, 1), np.take_along_axis(cr, keep, 1)
    return best_s, best_r


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows found among the approximate top-k."""
    a, e = np.atleast_2d(approx_rows), np.atleast_2d(exact_rows)
    if e.size == 0:
        return 1.0
    return float(np.mean([len(set(ai.tolist()) & set(ei.tolist())) / len(ei) for ai, ei in zip(a, e)]))


def _calibration_queries(x: np.ndarray, nq: int, rng) -> np.ndarray:
    """Stored vectors (not necessarily in the index sample) plus noise, renormalised."""
    n, d = x.shape
    rows = rng.choice(n, size=min(nq, n), replace=False)
    q = np.asarray(x[np.sort(rows)], dtype=np.float32)
    # half near the data (noise ~ a near neighbour's distance), half far from it (noise norm
    # ~1.2: a query from another modality, e.g. text, sits off the image manifold)
    scale = np.where(np.arange(len(q)) % 2 == 0, 0.5, 1.2).astype(np.float32)[:, None]
    q = q + rng.standard_normal(q.shape).astype(np.float32) * (scale / math.sqrt(d))
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


class AnnIndex:
    """A FAISS IVF-flat inner-product index over unit vectors (see module doc).

    ``search(queries (Q, E), k) -> (scores (Q, k) float64, rows (Q, k) int64)``, best
    first, same contract as :class:`napari_cellclip.search.ExactSearcher`.
    """

    def __init__(self, index, *, nprobe: int, embeddings: np.ndarray | None = None,
                 meta: dict | None = None) -> None:
        self.index = index
        self.nprobe = int(nprobe)
        self.embeddings = embeddings  # for exact fallbacks (may be a memmap)
        self.meta = dict(meta or {})
        self._gpu = None
        self._set_nprobe(self.index, self.nprobe)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @staticmethod
    def _set_nprobe(index, nprobe: int, *, gpu: bool = False) -> None:
        """Lists probed per query.  A GPU index (or its shards over several GPUs) is set through
        ``GpuParameterSpace`` — the CPU paths do nothing on it — and at most :data:`GPU_MAX_NPROBE`."""
        faiss = _faiss()
        if gpu:
            try:
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(int(nprobe), GPU_MAX_NPROBE))
            except RuntimeError as e:
                raise CellClipError(f"could not set nprobe={nprobe} on the GPU ANN index: {e}") from None
            return
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except Exception:  # noqa: BLE001 - not an IVF index at its top: the generic path
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))

    def use_gpu(self, enable: bool | str = "auto") -> bool:
        """Move the index to all GPUs for search if faiss has GPUs (returns whether it did)."""
        faiss = _faiss()
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if not enable or ngpu == 0:
            return False
        if self._gpu is None:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = ngpu > 1
            gpu = faiss.index_cpu_to_all_gpus(self.index, co=co)
            self._set_nprobe(gpu, self.nprobe, gpu=True)
            self._gpu = gpu
        return True

    def _search_on(self, index, q: np.ndarray, k: int, nprobe: int | None, *, gpu: bool):
        if nprobe is not None:
            self._set_nprobe(index, nprobe, gpu=gpu)
        try:
            return index.search(q, k)
        finally:
            if nprobe is not None:
                self._set_nprobe(index, self.nprobe, gpu=gpu)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None):
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = len(self)
        k = max(0, min(int(k), n))
        if k == 0:
            return np.zeros((q.shape[0], 0)), np.zeros((q.shape[0], 0), dtype=np.int64)
        if k > MAX_ANN_K:
            return self._exact(q, k)
        scores = rows = None
        if self._gpu is not None:
            try:
                scores, rows = self._search_on(self._gpu, q, k, nprobe, gpu=True)
            except (RuntimeError, CellClipError) as e:  # e.g. GPU memory: the CPU index answers instead
                first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)  # e.g. RuntimeError()
                warn_at_caller(f"GPU ANN search failed ({first}); "
                               "searching on the CPU from now on")
                self._gpu = None
        if scores is None:
            try:
                scores, rows = self._search_on(self.index, q, k, nprobe, gpu=False)
            except RuntimeError as e:
                raise CellClipError(f"ANN search failed: {e}") from None
        bad = (rows < 0).any(axis=1)
        if bad.any():  # probed lists held fewer than k rows: answer those exactly
            es, er = self._exact(q[bad], k)
            scores = scores.astype(np.float64)
            scores[bad], rows[bad] = es, er
        return scores.astype(np.float64), rows.astype(np.int64)

    def _exact(self, q: np.ndarray, k: int):
        if self.embeddings is None:
            raise CellClipError("exact fallback needs the embeddings; load the index with embeddings=")
        s, r = exact_topk(self.embeddings, q, k)
        return s.astype(np.float64), r

    # --------------------------------------------------------------------- I/O
    def save(self, folder) -> Path:
        """Write ``ann.faiss`` + ``ann.json`` into ``folder`` (atomically, json last)."""
        from ._fsutil import atomic_file, atomic_write_text

        faiss = _faiss()
        folder = Path(folder)
        with atomic_file(folder / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        meta = dict(self.meta, format=_FORMAT, nprobe=self.nprobe, n=len(self), dim=self.dim)
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))
        return folder / INDEX_FILE


def build_index(
    embeddings: np.ndarray,
    *,
    nlist: int | None = None,
    target_recall: float = TARGET_RECALL,
    k: int = 10,
    n_calibration: int = 200,
    train_per_list: int = 40,
    seed: int = 0,
    use_gpu: bool | str = "auto",
) -> AnnIndex:
    """Build an IVF-flat inner-product index over ``embeddings`` (N, E), unit rows.

    ``nprobe`` is the smallest power of two (then refined) whose recall@``k`` on
    calibration queries reaches ``target_recall`` (see module doc).
    """
    faiss = _faiss()
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0:
        raise CellClipError(f"ANN index needs a non-empty (N, E) array, got shape {x.shape}")
    n, d = x.shape
    rng = np.random.default_rng(seed)
    nlist = int(nlist or default_nlist(n))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ntrain = _train(index, quantizer, x, rng, nlist=nlist, train_per_list=train_per_list, seed=seed, use_gpu=use_gpu)
    for a in range(0, n, 262_144):  # add in chunks: works on a memmap without a full copy
        index.add(np.ascontiguousarray(x[a:a + 262_144], dtype=np.float32))
    chosen, reached = _calibrate_nprobe(index, x, rng, nlist=nlist, k=k, n_calibration=n_calibration,
                                        target_recall=target_recall)
    index.nprobe = chosen
    meta = {
        "kind": "IVFFlat-IP", "nlist": nlist, "calibration_recall": reached, "calibration_k": k,
        "target_recall": target_recall, "fingerprint": fingerprint(x), "n_train": int(ntrain),
    }
    out = AnnIndex(index, nprobe=chosen, embeddings=x, meta=meta)
    if use_gpu:
        out.use_gpu(use_gpu)
    return out


def _train(index, quantizer, x: np.ndarray, rng, *, nlist: int, train_per_list: int, seed: int, use_gpu) -> int:
    """k-means of the IVF lists on a sample of the rows (on the GPUs when faiss has them) → sample size."""
    faiss = _faiss()
    n, d = x.shape
    ntrain = min(n, max(nlist * train_per_list, 10_000))
    xt = np.ascontiguousarray(x[np.sort(rng.choice(n, size=ntrain, replace=False))], dtype=np.float32)
    index.cp.niter = 10
    index.cp.seed = seed
    index.cp.max_points_per_centroid = max(train_per_list, 39)
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and ngpu > 0:  # k-means on the GPU
        clus = faiss.Clustering(d, nlist, index.cp)
        clus.train(xt, faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d)))
        quantizer.add(faiss.vector_to_array(clus.centroids).reshape(nlist, d))
        index.is_trained = True
    else:
        index.train(xt)
    return ntrain


def _recall(index, nprobe: int, q: np.ndarray, truth: np.ndarray, k: int) -> float:
    index.nprobe = int(nprobe)
    return recall_at_k(index.search(q, k)[1], truth)


def _calibrate_nprobe(index, x: np.ndarray, rng, *, nlist: int, k: int, n_calibration: int,
                      target_recall: float) -> tuple[int, float]:
    """The smallest power of two of lists to probe reaching ``target_recall`` (then refined below it),
    at least ``nlist / MIN_PROBE_FRACTION`` → (nprobe, recall reached)."""
    q = _calibration_queries(x, n_calibration, rng)
    _, truth = exact_topk(x, q, k)
    chosen, reached, p = nlist, 1.0, 1
    while p <= nlist:
        r = _recall(index, p, q, truth, k)
        if r >= target_recall:
            chosen, reached = p, r
            break
        p *= 2
    if p <= nlist:  # refine between p/2 and p
        for cand in np.unique(np.linspace(max(1, p // 2), p, num=5).astype(int)):
            if cand >= p:
                break
            r = _recall(index, cand, q, truth, k)
            if r >= target_recall:
                chosen, reached = int(cand), r
                break
    # floor: scan at least 1/32 of the lists (text queries sit off the image manifold,
    # where recall needs more lists than held-out image vectors show)
    return int(min(nlist, max(chosen, nlist // MIN_PROBE_FRACTION))), reached


def load_index(folder, *, embeddings: np.ndarray | None = None, mmap: bool = True,
               use_gpu: bool | str = "auto") -> AnnIndex:
    """Load ``ann.faiss`` + ``ann.json`` from ``folder`` (memory-mapped by default).

    With ``embeddings`` given, their :func:`fingerprint` must match the one recorded at
    build time (else :class:`CellClipError`: the index is stale).
    """
    faiss = _faiss()
    folder = Path(folder)
    ip, mp = folder / INDEX_FILE, folder / META_FILE
    if not (ip.is_file() and mp.is_file()):
        raise CellClipError(f"{folder}: no ANN index here ({INDEX_FILE} + {META_FILE})")
    try:
        meta = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CellClipError(f"{mp}: unreadable ({e})") from None
    if meta.get("format") != _FORMAT:
        raise CellClipError(f"{mp}: not a napari-cellclip ANN index")
    if embeddings is not None and meta.get("fingerprint") != fingerprint(embeddings):
        raise CellClipError(f"{folder}: the ANN index does not match these embeddings (stale); rebuild it")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(ip), flags)
    except RuntimeError as e:
        raise CellClipError(f"{ip}: cannot read ANN index ({e})") from None
    out = AnnIndex(index, nprobe=int(meta.get("nprobe", 1)), embeddings=embeddings, meta=meta)
    if use_gpu:
        out.use_gpu(use_gpu)
    return out


_WARNED_NO_FAISS = False


def searcher_for_store(store, *, save: bool = True) -> AnnIndex | None:
    """The ANN index for a (large) store: loaded from the store's folder when one was
    built alongside it (and still matches), else built now (and saved there when
    possible).  ``None`` when faiss is not installed (exact search then)."""
    global _WARNED_NO_FAISS
    if not faiss_available():
        if not _WARNED_NO_FAISS:
            warn_at_caller("faiss is not installed: searching large stores exactly (slower); "
                           f"{FAISS_HINT}")
            _WARNED_NO_FAISS = True
        return None
    folder = store.path  # None for a store not loaded from a folder
    emb = store.embeddings
    if folder is not None and (Path(folder) / INDEX_FILE).is_file():
        try:
            return load_index(folder, embeddings=emb)
        except CellClipError as e:
            warn_at_caller(f"{e}; rebuilding it")
    idx = build_index(emb)
    if save and folder is not None and store.level == "field":
        try:
            idx.save(folder)
        except (OSError, RuntimeError):
            pass  # a read-only store folder: keep the in-memory index
    return idx
