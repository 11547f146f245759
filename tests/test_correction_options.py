"""Correction options reach the computation (found by mutation testing, issue 16): ``scale`` and
``eps`` of the spec, old specs without the newer keys, the no-op spec, TVN without controls and
on (N, E) embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import correction as corr
from napari_cellclip.errors import CellClipError, CellClipWarning


def _fields(n=20, controls=8):
    return pd.DataFrame({"Metadata_Plate": ["P"] * n, "Metadata_Well": [f"A{i:02d}" for i in range(n)],
                         "Metadata_control_type": ["negcon"] * controls + ["trt"] * (n - controls)})


def _x(n=20, shape=(2, 4), seed=0):
    return (np.random.default_rng(seed).normal(size=(n, *shape)) * 3 + 5).astype(np.float32)


def test_no_correction_returns_float32_features_unchanged():
    x = _x().astype(np.float64)
    for spec in (None, {"method": "none"}, {"method": None}):
        y = corr.apply(x, _fields(), spec)
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, x.astype(np.float32))


def test_unknown_method_names_the_choices():
    with pytest.raises(CellClipError, match="unknown feature correction 'zca'; choose one of none, center_scale, tvn"):
        corr.apply(_x(), _fields(), {"method": "zca"})


@pytest.mark.parametrize("method", ["center_scale", "tvn"])
def test_scale_false_only_centres(method):
    x, f = _x(), _fields()
    y = corr.apply(x, f, corr.fit(x, f, corr.make_spec(method, scale=False)))
    if method == "center_scale":
        np.testing.assert_allclose(y, x - x[:8].astype(np.float64).mean(0), atol=1e-5)
    # unscaled controls keep their spread; the default scales it to 1 (before any whitening)
    spread = corr.center_scale(x, f, scale=False)[:8].std(0)
    np.testing.assert_allclose(spread, x[:8].std(0), rtol=1e-5)
    y_default = corr.apply(x, f, corr.fit(x, f, corr.make_spec(method)))
    assert not np.allclose(y, y_default, atol=1e-3)


@pytest.mark.parametrize("method", ["center_scale", "tvn"])
def test_eps_floors_the_control_spread(method):
    """``eps`` is the smallest spread a feature is divided by: with eps above every spread, all
    features are divided by eps."""
    x, f = _x(), _fields()
    big = corr.make_spec(method, eps=50.0)
    y = corr.apply(x, f, corr.fit(x, f, big))
    if method == "center_scale":
        np.testing.assert_allclose(y, (x - x[:8].astype(np.float64).mean(0)) / 50.0, atol=1e-6)
    else:
        z = corr.center_scale(x, f, eps=50.0)
        st = corr.fit(x, f, big)["_state"]
        np.testing.assert_allclose(y, np.einsum("ncd,cde->nce", z - st["mean"][None], st["whiten"]), atol=1e-5)
        assert not np.allclose(y, corr.apply(x, f, corr.fit(x, f, corr.make_spec(method))), atol=1e-3)


def test_old_tvn_specs_mean_plain_covariance_and_default_whiten_eps():
    """A spec written before ``shrinkage`` / ``whiten_eps`` existed: no shrinkage, eps 1e-2."""
    x, f = _x(n=40), _fields(n=40, controls=30)
    old = corr.fit(x, f, {"method": "tvn", "scale": True, "eps": 1e-6})
    new = corr.fit(x, f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1e-2))
    assert old["fitted_shrinkage"] == [0.0, 0.0]
    np.testing.assert_allclose(old["_state"]["whiten"], new["_state"]["whiten"], rtol=1e-6)
    assert not np.allclose(new["_state"]["whiten"],
                           corr.fit(x, f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1.0))["_state"]["whiten"])


def test_tvn_without_controls_whitens_on_all_fields_and_says_so():
    x = _x(n=30)
    f = _fields(n=30, controls=0)
    with pytest.warns(CellClipWarning) as seen:
        spec = corr.fit(x, f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1e-6))
    assert any("TVN: no negative-control fields in the training data; whitening on all fields" in str(w.message)
               and w.category is CellClipWarning for w in seen)
    assert spec["fitted_on_fields"] == 30
    with pytest.warns(CellClipWarning):
        y = corr.apply(x, f, spec)
    for c in range(2):
        np.testing.assert_allclose(np.cov(y[:, c].T), np.eye(4), atol=1e-3)


def test_tvn_on_embeddings_whitens_the_whole_vector():
    x = _x(n=60, shape=(6,))
    f = _fields(n=60, controls=40)
    spec = corr.fit(x, f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1e-6))
    assert spec["_state"]["whiten"].shape == (1, 6, 6) and spec["_state"]["mean"].shape == (1, 6)
    y = corr.apply(x, f, spec)
    assert y.shape == (60, 6)
    np.testing.assert_allclose(np.cov(y[:40].T), np.eye(6), atol=1e-3)
