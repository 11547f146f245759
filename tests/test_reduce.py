"""2-D maps: PCA fallback, determinism, and one small UMAP run (numba compile ~30 s)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_cellclip.errors import CellClipError, CellClipWarning
from napari_cellclip.reduce import embed_2d, pca_2d


def _clusters(n_per=10, k=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 5
    X = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    return X.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_pca_for_few_points_and_on_request():
    X, _ = _clusters(n_per=2)  # 6 points < MIN_UMAP_POINTS
    Y = embed_2d(X)
    assert Y.shape == (6, 2) and Y.dtype == np.float32
    np.testing.assert_allclose(Y, pca_2d(X))
    X30, labels = _clusters()
    Y30 = embed_2d(X30, method="pca")
    np.testing.assert_array_equal(Y30, embed_2d(X30, method="pca"))
    # PCA keeps well-separated clusters apart
    c = np.stack([Y30[labels == i].mean(0) for i in range(3)])
    spread = max(np.linalg.norm(Y30[labels == i] - c[i], axis=1).max() for i in range(3))
    assert min(np.linalg.norm(c[i] - c[j]) for i in range(3) for j in range(i + 1, 3)) > spread


def test_degenerate_sizes():
    assert embed_2d(np.ones((1, 5))).shape == (1, 2)
    np.testing.assert_array_equal(embed_2d(np.ones((1, 5))), 0)
    assert embed_2d(np.eye(2, 5)).shape == (2, 2)
    assert embed_2d(np.zeros((0, 5))).shape == (0, 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert embed_2d(np.eye(4, 5), method="umap").shape == (4, 2)
    assert any(issubclass(x.category, CellClipWarning) for x in w)


def test_bad_input():
    with pytest.raises(CellClipError, match="2-D"):
        embed_2d(np.ones(5))
    with pytest.raises(CellClipError, match="NaN"):
        embed_2d(np.full((20, 3), np.nan))
    with pytest.raises(CellClipError, match="method"):
        embed_2d(np.ones((20, 3)), method="tsne")


def test_umap_small_deterministic():
    # the only UMAP run of the suite: the first call in a process compiles numba (~30 s)
    X, labels = _clusters(n_per=10)  # N = 30
    Y1 = embed_2d(X, method="umap", n_neighbors=50, random_state=0)  # n_neighbors clipped to 29
    assert Y1.shape == (30, 2) and Y1.dtype == np.float32 and np.isfinite(Y1).all()
    Y2 = embed_2d(X, method="auto", n_neighbors=50, random_state=0)
    np.testing.assert_allclose(Y1, Y2, rtol=1e-5, atol=1e-5)
    # clusters stay together: each point's nearest neighbour is in its own cluster
    d = np.linalg.norm(Y1[:, None] - Y1[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.9
