"""Plate-effect correction on negative controls (napari_cellclip.correction)."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import correction as corr
from napari_cellclip.errors import CellClipError, CellClipWarning, CheckpointError


def _table(plates, controls):
    return pd.DataFrame({
        "Metadata_Plate": plates,
        "Metadata_Well": [f"A{i:02d}" for i in range(len(plates))],
        "Metadata_control_type": ["negcon" if c else "" for c in controls],
        "Metadata_is_control": controls,
    })


def _two_plates(rng, n=40, shape=(3, 4)):
    plates = ["P1"] * n + ["P2"] * n
    controls = ([True] * (n // 2) + [False] * (n // 2)) * 2
    x = rng.normal(size=(2 * n,) + shape).astype(np.float32)
    x[:n] = x[:n] * 2.0 + 5.0       # plate 1: shifted and scaled
    x[n:] = x[n:] * 0.5 - 3.0       # plate 2
    x[n // 2:n] += 10.0             # treated wells differ strongly from controls
    x[n + n // 2:] += 10.0
    return x, _table(plates, controls)


def test_center_scale_uses_only_each_plates_controls():
    rng = np.random.default_rng(0)
    x, fields = _two_plates(rng)
    spec = corr.make_spec("center_scale")
    y = corr.apply(x, fields, spec)
    assert y.dtype == np.float32 and y.shape == x.shape
    ctrl = corr.control_mask(fields)
    for plate in ("P1", "P2"):
        rows = (fields["Metadata_Plate"] == plate).to_numpy()
        c = y[rows & ctrl]
        np.testing.assert_allclose(c.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(c.std(0), 1, atol=1e-4)
        ref = x[rows & ctrl].astype(np.float64)
        expect = (x[rows & ~ctrl] - ref.mean(0)) / ref.std(0)
        np.testing.assert_allclose(y[rows & ~ctrl], expect, rtol=1e-4, atol=1e-4)
    # the treated fields do not influence the statistics
    x2 = x.copy()
    x2[~ctrl] *= 100
    y2 = corr.apply(x2, fields, spec)
    np.testing.assert_allclose(y2[ctrl], y[ctrl], atol=1e-6)
    # plates are corrected independently: dropping plate 2 changes nothing on plate 1
    p1 = (fields["Metadata_Plate"] == "P1").to_numpy()
    np.testing.assert_allclose(corr.apply(x[p1], fields[p1], spec), y[p1], atol=1e-6)


def test_works_on_embeddings_and_none_is_identity():
    rng = np.random.default_rng(1)
    x, fields = _two_plates(rng, shape=(6,))
    y = corr.apply(x, fields, {"method": "center_scale"})
    assert y.shape == x.shape
    np.testing.assert_array_equal(corr.apply(x, fields, None), x)
    with pytest.raises(CellClipError):
        corr.apply(x, fields.iloc[:3], {"method": "center_scale"})
    with pytest.raises(CellClipError):
        corr.make_spec("zscore-everything")


def test_plate_without_controls_warns_and_uses_all_fields():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(30, 2, 5)).astype(np.float32)
    fields = _table(["P9"] * 30, [False] * 30)
    with pytest.warns(CellClipWarning, match="P9.*no negative-control"):
        y = corr.apply(x, fields, corr.make_spec("center_scale"))
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1, atol=1e-4)


def test_dmso_by_name_when_no_control_columns():
    fields = pd.DataFrame({"Metadata_Plate": ["P"] * 4, "Metadata_pert_iname": ["DMSO", "DMSO", "x", "y"]})
    assert corr.control_mask(fields).tolist() == [True, True, False, False]


def test_tvn_makes_control_covariance_identity_and_round_trips():
    rng = np.random.default_rng(3)
    n, C, D = 400, 2, 6
    mix = rng.normal(size=(C, D, D))
    z = rng.normal(size=(n, C, D))
    x = np.einsum("ncd,cde->nce", z, mix).astype(np.float32) + 4.0  # correlated features
    plates = ["P1"] * (n // 2) + ["P2"] * (n // 2)
    controls = [True] * n
    fields = _table(plates, controls)
    spec = corr.fit(x, fields, corr.make_spec("tvn", whiten_eps=1e-6, shrinkage=0))
    assert corr.to_json(spec) == {"method": "tvn", "scale": True, "eps": 1e-6, "whiten_eps": 1e-6,
                                  "shrinkage": 0.0, "fitted_on_fields": n, "fitted_shrinkage": [0.0, 0.0]}
    y = corr.apply(x, fields, spec)
    for c in range(C):
        cov = np.cov(y[:, c].T)
        np.testing.assert_allclose(cov, np.eye(D), atol=0.05)
    # arrays live as tensors on the model, not in the JSON config
    model = types.SimpleNamespace(config=types.SimpleNamespace(feature_correction=None), extra_tensors={})
    corr.attach_to_model(model, spec)
    assert model.config.feature_correction["method"] == "tvn"
    assert set(model.extra_tensors) == {"feature_correction.mean", "feature_correction.whiten"}
    again = corr.spec_for_model(model)
    np.testing.assert_allclose(corr.apply(x, fields, again), y, atol=1e-5)
    bare = types.SimpleNamespace(config=model.config, extra_tensors={})
    with pytest.raises(CheckpointError, match="whitening"):
        corr.spec_for_model(bare)


def test_ledoit_wolf_shrinkage_matches_sklearn():
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(7)
    for n, d in ((12, 40), (200, 10), (30, 30)):
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        xc = x - x.mean(0)
        want = covariance.ledoit_wolf_shrinkage(xc, assume_centered=True)
        assert corr.ledoit_wolf_shrinkage(xc) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_tvn_with_fewer_controls_than_features_is_well_conditioned():
    # 6 control fields, 64 features: the sample covariance has rank 5, and plain
    # whitening would scale the 59 empty directions by 1/sqrt(whiten_eps) = 10
    rng = np.random.default_rng(8)
    x = rng.normal(size=(20, 64)).astype(np.float32)
    fields = _table(["P"] * 20, [True] * 6 + [False] * 14)
    plain = corr.fit(x, fields, corr.make_spec("tvn", shrinkage=0))
    auto = corr.fit(x, fields, corr.make_spec("tvn"))
    assert auto["shrinkage"] == "auto" and 0.0 < auto["fitted_shrinkage"][0] <= 1.0
    gain = lambda spec: np.linalg.svd(spec["_state"]["whiten"][0], compute_uv=False)  # noqa: E731
    assert gain(plain).max() > 9.0
    assert gain(auto).max() < 3.0
    # the corrected non-control fields stay on the scale of the controls
    y = corr.apply(x, fields, auto)
    assert np.abs(y[6:]).std() < 3.0 < np.abs(corr.apply(x, fields, plain)[6:]).std()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "often", float("nan")])
def test_tvn_rejects_bad_shrinkage(bad):
    with pytest.raises(CellClipError, match="shrinkage"):
        corr.make_spec("tvn", shrinkage=bad)


def test_tvn_state_file_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    fields = _table(["P"] * 50, [True] * 25 + [False] * 25)
    spec = corr.fit(x, fields, corr.make_spec("tvn"))
    corr.save_state(spec, tmp_path)
    loaded = corr.load_state(corr.to_json(spec), tmp_path)
    np.testing.assert_allclose(corr.apply(x, fields, loaded), corr.apply(x, fields, spec), atol=1e-6)


def test_center_scale_is_silent_with_controls():
    rng = np.random.default_rng(5)
    x, fields = _two_plates(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corr.apply(x, fields, corr.make_spec("center_scale"))
