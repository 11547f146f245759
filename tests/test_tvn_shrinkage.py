"""TVN with ``shrinkage="auto"`` uses the Ledoit-Wolf shrinkage of the centre-scaled controls,
per channel, and whitens with that shrunk covariance (issue 16).  Expected values come from
scikit-learn and plain numpy, not from napari_cellclip.correction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import correction as corr
from napari_cellclip.errors import CellClipWarning

covariance = pytest.importorskip("sklearn.covariance")


def _data(seed=0, n=30, C=3, D=12):
    """Two plates, 9 controls each (fewer than D features: shrinkage matters), correlated features."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(C, D, D))
    x = np.einsum("ncd,cde->nce", rng.normal(size=(2 * n, C, D)), mix).astype(np.float32)
    x[n:] = x[n:] * 3.0 + 7.0  # plate effect on plate 2
    controls = np.array(([True] * 9 + [False] * (n - 9)) * 2)
    fields = pd.DataFrame({"Metadata_Plate": ["P1"] * n + ["P2"] * n,
                           "Metadata_Well": [f"A{i:02d}" for i in range(2 * n)],
                           "Metadata_control_type": np.where(controls, "negcon", "trt")})
    return x, fields, controls


def _centre_scaled_controls(x, fields, controls):
    """Per plate, (x - mean_ctrl) / std_ctrl of its control fields, controls only."""
    out = []
    for plate in ("P1", "P2"):
        rows = (fields["Metadata_Plate"] == plate).to_numpy() & controls
        ref = x[rows].astype(np.float64)
        out.append((ref - ref.mean(0)) / ref.std(0))
    return np.concatenate(out)


def _inv_sqrt(cov, eps):
    w, v = np.linalg.eigh(cov)
    return (v / np.sqrt(np.clip(w, 0, None) + eps)) @ v.T


def test_auto_shrinkage_is_ledoit_wolf_per_channel_and_whitens_with_it():
    x, fields, controls = _data()
    spec = corr.fit(x, fields, corr.make_spec("tvn"))
    assert spec["shrinkage"] == "auto"
    z = _centre_scaled_controls(x, fields, controls)  # (18, C, D)
    n, C, _ = z.shape
    eps = spec["whiten_eps"]
    want = [covariance.ledoit_wolf_shrinkage(z[:, c]) for c in range(C)]
    assert all(0.05 < s < 0.95 for s in want)  # shrinkage really is in play
    assert len(set(np.round(want, 3))) == C  # and differs between channels
    assert spec["fitted_shrinkage"] == [round(w, 4) for w in want]  # recorded, to 4 decimals
    state = spec["_state"]
    for c in range(C):
        lw = covariance.LedoitWolf().fit(z[:, c])
        np.testing.assert_allclose(lw.shrinkage_, want[c], rtol=1e-12)
        # the shrunk covariance, on the unbiased (n - 1) scale of the sample covariance
        cov = lw.covariance_ * n / (n - 1)
        np.testing.assert_allclose(state["mean"][c], z[:, c].mean(0), atol=1e-5)
        np.testing.assert_allclose(state["whiten"][c], _inv_sqrt(cov, eps), rtol=1e-6, atol=1e-6)


def test_fixed_shrinkage_is_used_as_given():
    x, fields, controls = _data(seed=1)
    z = _centre_scaled_controls(x, fields, controls)
    for s in (0.0, 0.3, 1.0):
        spec = corr.fit(x, fields, corr.make_spec("tvn", shrinkage=s))
        assert spec["fitted_shrinkage"] == [s] * 3
        for c in range(3):
            sample = np.cov(z[:, c].T)
            cov = (1 - s) * sample + s * np.trace(sample) / sample.shape[0] * np.eye(sample.shape[0])
            np.testing.assert_allclose(spec["_state"]["whiten"][c], _inv_sqrt(cov, spec["whiten_eps"]),
                                       rtol=1e-6, atol=1e-6)


def test_corrected_controls_follow_the_whitening():
    """What reaches the model: apply() = per-plate centre-scale, then (z - mean) @ W per channel."""
    x, fields, controls = _data(seed=2)
    spec = corr.fit(x, fields, corr.make_spec("tvn"))
    y = corr.apply(x, fields, spec)
    z_all = np.empty_like(x, dtype=np.float64)
    for plate in ("P1", "P2"):
        rows = (fields["Metadata_Plate"] == plate).to_numpy()
        ref = x[rows & controls].astype(np.float64)
        z_all[rows] = (x[rows] - ref.mean(0)) / ref.std(0)
    st = spec["_state"]
    want = np.einsum("ncd,cde->nce", z_all - st["mean"][None], st["whiten"].astype(np.float64))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_two_control_fields_use_the_unbiased_covariance():
    """With 2 controls the n - 1 = 1 normalisation of the sample covariance matters."""
    x, fields, _ = _data(seed=3)
    controls = np.zeros(len(fields), dtype=bool)
    controls[[0, 1]] = True  # plate P1's first two fields; plate P2 has none (centred on all its fields)
    fields = fields.assign(Metadata_control_type=np.where(controls, "negcon", "trt"))
    with pytest.warns(CellClipWarning, match="plate P2: no negative-control"):
        spec = corr.fit(x, fields, corr.make_spec("tvn", shrinkage=0.0))
    ref = x[:2].astype(np.float64)
    z = (ref - ref.mean(0)) / ref.std(0)
    for c in range(3):
        sample = np.cov(z[:, c].T)  # ddof=1
        np.testing.assert_allclose(spec["_state"]["whiten"][c], _inv_sqrt(sample, spec["whiten_eps"]),
                                   rtol=1e-6, atol=1e-6)
