"""The numbers of the correction (found by mutation testing, issue 16): the floor under tiny
control spreads, exact centring of large raw values, the defaults of hand-written specs, a TVN
whitening fitted with the same scale / eps it is applied with, near-redundant features, the
(N, E) / (N, C, D) layouts and Ledoit-Wolf on small spreads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import correction as corr


def _plate(n_ctrl, n_trt=0, plate="P"):
    return pd.DataFrame({"Metadata_Plate": [plate] * (n_ctrl + n_trt),
                         "Metadata_control_type": ["negcon"] * n_ctrl + ["trt"] * n_trt})


def _cov_error(y):
    """Largest distance of the covariance of rows y (n, d) from the identity."""
    return float(np.abs(np.cov(y.astype(np.float64).T) - np.eye(y.shape[1])).max())


# ---------------------------------------------------------------------- the spread floor
def test_a_single_control_field_divides_by_a_thousandth():
    """One control field has no spread: every feature is divided by 1e-3 (not by eps)."""
    x = np.array([[1.0, 5.0], [1.5, 4.0]], np.float32)
    y = corr.apply(x, _plate(1, 1), corr.make_spec("center_scale"))
    np.testing.assert_allclose(y, [[0.0, 0.0], [500.0, -1000.0]], rtol=1e-5)


def test_constant_control_features_are_divided_by_a_thousandth_of_the_typical_spread():
    """Features constant over the controls are divided by 1e-3 x the median of the non-zero
    control spreads (here 0.5), so they neither explode to 1/eps nor ignore the data's scale."""
    ctrl = np.array([[1.0, 10.0, 3.0, 3.0, 3.0], [2.0, 11.0, 3.0, 3.0, 3.0]] * 4)  # spreads .5 .5 0 0 0
    trt = np.array([[2.5, 10.5, 4.0, 3.0, 2.0]])
    y = corr.apply(np.vstack([ctrl, trt]).astype(np.float32), _plate(8, 1), corr.make_spec("center_scale"))
    np.testing.assert_allclose(y[-1], [2.0, 0.0, 2000.0, 0.0, -2000.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs(y[:8, :2]), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(y[:8, 2:], 0.0)


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize("scale", [True, False])
def test_large_raw_values_are_centred_exactly_on_their_controls(scale):
    """Raw features with a large common offset (integrated intensities ~1e7) and a small spread:
    the controls are centred on exactly zero.  (The control mean falls between two float32
    numbers; subtracting it rounded to float32 would shift every field by up to half a step,
    here ~0.2 of the spread.)"""
    rng = np.random.default_rng(8)
    ctrl = (1.2e7 + rng.integers(-3, 4, size=(200, 2, 3))).astype(np.float32)
    exact = ctrl.astype(np.float64) - ctrl.astype(np.float64).mean(0)
    y = corr.center_scale(ctrl, _plate(200), scale=scale).astype(np.float64)
    if scale:
        exact /= exact.std(0)
    np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-6)


def test_tvn_whitens_nearly_redundant_features():
    """Two features that almost duplicate each other leave a direction of tiny control variance:
    the whitening (fitted in float64) still brings the controls to unit covariance."""
    n = 400
    rng = np.random.default_rng(2)
    base = rng.normal(size=(n, 1, 3))
    twin = base[:, :, :1] + 1e-3 * rng.normal(size=(n, 1, 1))
    x = np.concatenate([base, twin], axis=2).astype(np.float32)
    f = _plate(n)
    spec = corr.fit(x, f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1e-12))
    assert _cov_error(corr.apply(x, f, spec)[:, 0]) < 2e-3


def test_tvn_with_tiny_whiten_eps_and_few_controls_stays_finite():
    """Fewer control fields than dimensions, no shrinkage and a tiny whiten_eps: the null
    directions of the controls are scaled by 1/sqrt(whiten_eps), never NaN."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 2, 8)).astype(np.float32)
    f = _plate(3, 5)
    spec = corr.fit(x, f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1e-20))
    assert np.isfinite(spec["_state"]["whiten"]).all()
    assert np.isfinite(corr.apply(x, f, spec)).all()


# ---------------------------------------------------------------------- hand-written specs
def test_a_minimal_center_scale_spec_scales_with_the_default_eps():
    """``{"method": "center_scale"}`` (the form in the module docs) scales to unit control
    spread, also for features whose spread is far below 1."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(30, 4)) * 0.1 + 2).astype(np.float32)
    f = _plate(20, 10)
    for y in (corr.apply(x, f, {"method": "center_scale"}), corr.center_scale(x, f)):
        np.testing.assert_allclose(y[:20].std(0), 1.0, rtol=1e-5)
        np.testing.assert_allclose(y[:20].mean(0), 0.0, atol=1e-5)


def test_a_minimal_tvn_spec_is_fitted_and_applied_alike():
    """``{"method": "tvn"}`` with nothing else: fitting and applying use the same defaults, so
    the controls come out white (up to whiten_eps = 1e-2 against unit spread)."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(80, 2, 4)) * 0.1 + 2).astype(np.float32)
    f = _plate(60, 20)
    spec = corr.fit(x, f, {"method": "tvn"})
    y = corr.apply(x, f, spec)
    for c in range(2):
        assert _cov_error(y[:60, c]) < 0.05


@pytest.mark.parametrize("options", [{"scale": False}, {"eps": 50.0}])
def test_tvn_is_fitted_with_the_scale_and_eps_it_is_applied_with(options):
    """A TVN spec that does not scale, or floors the spread at a large eps: the whitening is
    fitted on controls corrected the same way as at apply time, so they come out white."""
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(80, 2, 4)) * 3 + 5).astype(np.float32)
    f = _plate(60, 20)
    spec = corr.fit(x, f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1e-9, **options))
    y = corr.apply(x, f, spec)
    for c in range(2):
        assert _cov_error(y[:60, c]) < 1e-3


# ---------------------------------------------------------------------- layouts
def test_whole_vector_whitening_applies_to_the_same_features_in_channel_layout():
    """A whitening fitted on (N, C*D) vectors corrects the same features given as (N, C, D):
    same numbers, the caller's shape."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 2, 3)).astype(np.float32)
    f = _plate(30, 10)
    spec = corr.fit(x.reshape(40, 6), f, corr.make_spec("tvn", shrinkage=0.0, whiten_eps=1e-9))
    flat = corr.apply(x.reshape(40, 6), f, spec)
    assert _cov_error(flat[:30]) < 1e-3
    y = corr.apply(x, f, spec)
    assert y.shape == (40, 2, 3)
    np.testing.assert_allclose(y.reshape(40, 6), flat, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- Ledoit-Wolf
def test_ledoit_wolf_on_small_spreads_matches_sklearn():
    """Controls with a small overall spread (squared distance from the scaled identity below 1)
    still get the Ledoit-Wolf weight, not full shrinkage."""
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 4)) * np.array([0.3, 0.2, 0.05, 0.01])
    xc = x - x.mean(0)
    want = covariance.ledoit_wolf_shrinkage(xc, assume_centered=True)
    assert 0.0 < want < 0.5
    assert corr.ledoit_wolf_shrinkage(xc) == pytest.approx(want, rel=1e-9)

