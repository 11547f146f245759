"""2-D maps of embeddings: UMAP (umap-learn) with a PCA fallback.

umap is imported inside :func:`embed_2d`; its first call in a process spends ~30–40 s
compiling with numba.  Importing this module is cheap (numpy only).
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import CellClipError, warn_at_caller

__all__ = ["embed_2d", "pca_2d", "MIN_UMAP_POINTS"]

#: Below this many points ``method="auto"`` uses PCA (UMAP needs neighbours to work with).
MIN_UMAP_POINTS = 10


def pca_2d(X: np.ndarray) -> np.ndarray:
    """First two principal components of ``X`` (N, E) → (N, 2) float32.

    Deterministic: the sign of each component is fixed so its largest-magnitude
    loading is positive.  Missing components (N < 3 or E < 2) are zero.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    out = np.zeros((n, 2), dtype=np.float32)
    if n < 2:
        return out
    Xc = X - X.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    m = min(2, vt.shape[0])
    comps = vt[:m]
    signs = np.sign(comps[np.arange(m), np.argmax(np.abs(comps), axis=1)])
    signs[signs == 0] = 1.0
    comps = comps * signs[:, None]
    out[:, :m] = (Xc @ comps.T).astype(np.float32)
    return out


def embed_2d(
    X: np.ndarray,
    method: str = "auto",
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    random_state: int | None = 0,
    *,
    metric: str = "cosine",
) -> np.ndarray:
    """Project embeddings ``X`` (N, E) to 2-D → ``(N, 2)`` float32.

    Parameters
    ----------
    method
        ``"umap"``, ``"pca"`` or ``"auto"`` (UMAP, or PCA when N < :data:`MIN_UMAP_POINTS`
        or umap-learn is not installed).  ``"umap"`` with too few points also falls
        back to PCA, with a :class:`CellClipWarning`.
    n_neighbors
        UMAP neighbourhood size, clipped to ``N - 1``.
    min_dist
        UMAP ``min_dist``.
    random_state
        Seed; with a seed UMAP runs single-threaded and is reproducible.
    metric
        UMAP metric (``"cosine"`` suits L2-normalised embeddings).
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise CellClipError(f"embed_2d needs a 2-D (N, E) array, got shape {X.shape}")
    X = X.astype(np.float32, copy=False)
    if not np.all(np.isfinite(X)):
        raise CellClipError("cannot map embeddings containing NaN or infinite values")
    if method not in ("auto", "umap", "pca"):
        raise CellClipError(f"method must be 'auto', 'umap' or 'pca', got {method!r}")
    n = X.shape[0]
    if method == "pca":
        return pca_2d(X)
    if n < MIN_UMAP_POINTS:
        if method == "umap":
            warn_at_caller(f"UMAP needs at least {MIN_UMAP_POINTS} points, got {n}: showing PCA instead")
        return pca_2d(X)
    try:
        import umap  # noqa: PLC0415  (heavy: numba)
    except ImportError:
        if method == "umap":
            raise CellClipError("UMAP needs the 'umap-learn' package: pip install umap-learn") from None
        warn_at_caller("umap-learn is not installed: showing PCA instead")
        return pca_2d(X)

    k = int(max(2, min(int(n_neighbors), n - 1)))
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        min_dist=float(min_dist),
        metric=metric,
        random_state=random_state,
        n_jobs=1 if random_state is not None else -1,
        init="spectral",
    )
    with warnings.catch_warnings():
        # tiny graphs: umap warns about disconnected components / spectral init fallback
        warnings.filterwarnings("ignore", category=UserWarning, module=r"umap.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"sklearn.*")
        Y = reducer.fit_transform(X)
    return np.asarray(Y, dtype=np.float32)
