"""Correction specs on models and on disk, and Ledoit-Wolf edge cases (found by mutation
testing, issue 16)."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch

from napari_cellclip import correction as corr
from napari_cellclip.errors import CheckpointError

covariance = pytest.importorskip("sklearn.covariance")


def _fields(n=24, plates=("P1", "P2")):
    return pd.DataFrame({"Metadata_Plate": np.repeat(plates, n // len(plates)),
                         "Metadata_Well": [f"A{i:02d}" for i in range(n)],
                         "Metadata_control_type": (["negcon"] * 6 + ["trt"] * 6) * (n // 12)})


def _tvn(seed=0, n=24, shape=(2, 5), **options):
    x = np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)
    f = _fields(n)
    return x, f, corr.fit(x, f, corr.make_spec("tvn", **options))


def _model(spec=None, **attrs):
    return types.SimpleNamespace(config=types.SimpleNamespace(feature_correction=spec), **attrs)


# ---------------------------------------------------------------------- Ledoit-Wolf edges
@pytest.mark.parametrize("n,d,scale", [(2, 5, 1.0), (3, 4, 1.0), (30, 5, 0.01), (40, 3, 100.0)])
def test_ledoit_wolf_matches_sklearn_at_small_sizes_and_scales(n, d, scale):
    x = np.random.default_rng(n).normal(size=(n, d)) * scale
    xc = x - x.mean(0)
    want = covariance.ledoit_wolf_shrinkage(xc, assume_centered=True)
    assert corr.ledoit_wolf_shrinkage(xc) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_ledoit_wolf_degenerate_inputs():
    assert corr.ledoit_wolf_shrinkage(np.zeros((1, 4))) == 1.0  # one field: nothing but the target
    iso = np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]])  # sample covariance already a multiple of I
    s = corr.ledoit_wolf_shrinkage(iso)
    assert np.isfinite(s) and 0.0 <= s <= 1.0


# ---------------------------------------------------------------------- specs as text
def test_describe_and_json_safe():
    assert corr.describe(None) == "none" and corr.describe({}) == "none"
    assert corr.describe({"method": "tvn"}) == "tvn"
    _, _, spec = _tvn()
    safe = corr.json_safe(spec)
    assert "_state" in spec and "_state" not in safe and safe["method"] == "tvn"
    assert corr.json_safe("center_scale") == "center_scale" and corr.json_safe(None) is None


def test_tvn_without_its_matrices_says_how_to_load_them():
    spec = {"method": "tvn", "state_file": "my_tvn.safetensors"}
    x, f, _ = _tvn()
    with pytest.raises(CheckpointError, match=r"whitening matrices.*load_state\(spec, checkpoint_dir\).*my_tvn"):
        corr.apply(x, f, spec)
    with pytest.raises(CheckpointError, match=r"\(file feature_correction.safetensors\)"):
        corr.apply(x, f, {"method": "tvn"})


# ---------------------------------------------------------------------- on disk
def test_state_file_round_trip_as_float32_under_its_own_name(tmp_path):
    x, f, spec = _tvn(seed=1)
    spec["_state"] = {k: v.astype(np.float64) for k, v in spec["_state"].items()}
    spec["state_file"] = "tvn-b.safetensors"
    corr.save_state(spec, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tvn-b.safetensors"]
    back = corr.load_state(corr.to_json(spec), tmp_path)
    assert {k: v.dtype for k, v in back["_state"].items()} == {"mean": np.float32, "whiten": np.float32}
    np.testing.assert_allclose(corr.apply(x, f, back), corr.apply(x, f, spec), atol=1e-5)
    (tmp_path / "tvn-b.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"tvn-b.safetensors: TVN correction matrices missing"):
        corr.load_state(corr.to_json(spec), tmp_path)


def test_only_fitted_tvn_specs_touch_the_disk(tmp_path):
    for spec in (None, {"method": "center_scale"}, {"method": "tvn"}):
        corr.save_state(spec, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert corr.load_state(None, tmp_path) is None
    cs = {"method": "center_scale"}
    out = corr.load_state(cs, tmp_path)
    assert out == cs and out is not cs
    _, _, fitted = _tvn()
    same = corr.load_state(fitted, tmp_path)  # already has its arrays: nothing read
    assert same is not fitted and same["_state"] is fitted["_state"]


# ---------------------------------------------------------------------- on a model
def test_attach_to_a_model_without_extra_tensors_and_replace_stale_ones():
    _, _, spec = _tvn(seed=2)
    spec["_state"] = {k: v.astype(np.float64) for k, v in spec["_state"].items()}
    m = _model()
    corr.attach_to_model(m, spec)
    assert m.config.feature_correction == corr.to_json(spec)
    assert sorted(m.extra_tensors) == ["feature_correction.mean", "feature_correction.whiten"]
    assert all(t.dtype == torch.float32 for t in m.extra_tensors.values())
    m.extra_tensors["other.thing"] = torch.ones(2)
    corr.attach_to_model(m, {"method": "center_scale"})  # the TVN tensors go, the rest stays
    assert m.config.feature_correction == {"method": "center_scale"}
    assert list(m.extra_tensors) == ["other.thing"]
    corr.attach_to_model(m, None)
    assert m.config.feature_correction is None and list(m.extra_tensors) == ["other.thing"]


def test_spec_for_model_finds_the_matrices_where_they_are(tmp_path):
    x, f, spec = _tvn(seed=3)
    want = corr.apply(x, f, spec)
    assert corr.spec_for_model(_model(None)) is None
    assert corr.spec_for_model(types.SimpleNamespace()) is None  # not a CellCLIP at all
    cs = {"method": "center_scale"}
    got = corr.spec_for_model(_model(cs))
    assert got == cs and got is not cs
    # in the model's extra tensors
    m = _model()
    corr.attach_to_model(m, spec)
    np.testing.assert_allclose(corr.apply(x, f, corr.spec_for_model(m)), want, atol=1e-5)
    # in a state file next to the checkpoint: the folder given, else the model's checkpoint_dir
    corr.save_state(spec, tmp_path)
    js = corr.to_json(spec)
    np.testing.assert_allclose(corr.apply(x, f, corr.spec_for_model(_model(js), tmp_path)), want, atol=1e-5)
    np.testing.assert_allclose(corr.apply(x, f, corr.spec_for_model(_model(js, checkpoint_dir=str(tmp_path)))),
                               want, atol=1e-5)
    empty = tmp_path / "empty"
    empty.mkdir()
    np.testing.assert_allclose(
        corr.apply(x, f, corr.spec_for_model(_model(js, checkpoint_dir=str(empty)), tmp_path)), want, atol=1e-5)
    with pytest.raises(CheckpointError, match="whitening matrices"):
        corr.spec_for_model(_model(js, extra_tensors={}))
    fitted = corr.spec_for_model(_model(spec))  # a spec that already holds its arrays
    assert fitted is not spec and fitted["_state"] is spec["_state"]
