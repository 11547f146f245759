"""Plate-effect correction against each plate's negative controls.

Plate-to-plate technical variation (staining batches, focus, illumination) is
often larger than the effect of a perturbation.  The standard remedy in
image-based profiling is to express every profile relative to the negative
controls (DMSO) *of its own plate*:

``center_scale``
    per plate, subtract the mean and divide by the standard deviation of that
    plate's negative-control fields, feature by feature.  The statistics are
    computed at apply time from the plate being corrected, so a new plate is
    corrected with its own controls — nothing about plates is stored.
``tvn``
    Typical Variation Normalisation (Ando et al. 2017): ``center_scale`` per
    plate, then a PCA whitening fitted on the (corrected) control fields of
    the *training* plates, so that the variation seen among controls has
    identity covariance.  For (N, C, D) channel features the whitening is
    fitted per channel in D dimensions (ZCA form, so the channel/feature
    layout the model expects is kept).  The control covariance is shrunk
    towards a scaled identity (Ledoit & Wolf 2004, ``shrinkage="auto"``, or a
    fixed weight in [0, 1]): a plate set rarely has more control fields than
    feature dimensions (the bundled sample: 6 DMSO fields for 128 features
    per channel), and inverting a rank-deficient sample covariance would
    amplify noise directions by up to ``1/sqrt(whiten_eps)``.  The shrinkage
    used is recorded in the spec.  Its matrices are fitted once
    (:func:`fit`) and stored as tensors in the checkpoint's model.safetensors
    (``extra.feature_correction.*``, :func:`attach_to_model` /
    :func:`spec_for_model`), never in JSON.

A correction is described by a small json-serialisable *spec* recorded in
``CellCLIPConfig.feature_correction`` (``None`` = off)::

    {"method": "center_scale"}
    {"method": "tvn", "scale": true, "eps": 1e-06, "whiten_eps": 0.01, "shrinkage": "auto"}

Works on any array whose first axis is the field axis: frozen channel features
(N, C, D) before training, or embeddings (N, E) for evaluation, search and the
UMAP.  A plate without negative controls gets a :class:`CellClipWarning` and
is centred and scaled on all its fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .errors import CellClipError, CheckpointError, warn_at_caller
from .prompts import read_flag  # the one reading of a yes / no metadata flag

METHODS = ("none", "center_scale", "tvn")
STATE_FILE = "feature_correction.safetensors"
_STATE_KEY = "_state"  # in-memory arrays of a fitted TVN spec (stripped from JSON)


def make_spec(method: str | None, **options) -> dict | None:
    """Spec for ``method`` ("none"/None, "center_scale", "tvn")."""
    if method is None or str(method).lower() in ("none", "off", "false", ""):
        return None
    method = str(method).lower().replace("-", "_")
    if method not in METHODS:
        raise CellClipError(f"unknown feature correction {method!r}; choose one of {', '.join(METHODS)}")
    spec = {"method": method, "scale": bool(options.pop("scale", True)),
            "eps": float(options.pop("eps", 1e-6))}
    if method == "tvn":
        spec["whiten_eps"] = float(options.pop("whiten_eps", 1e-2))
        spec["shrinkage"] = _check_shrinkage(options.pop("shrinkage", "auto"))
    if options:
        raise CellClipError(f"unknown correction option(s): {', '.join(sorted(options))}")
    return spec


def to_json(spec: Mapping | None) -> dict | None:
    """The spec without in-memory arrays (what goes into config.json / reports)."""
    if spec is None:
        return None
    return {k: v for k, v in spec.items() if k != _STATE_KEY}


def describe(spec: Mapping | None) -> str:
    if not spec:
        return "none"
    return str(spec.get("method"))


# --------------------------------------------------------------------- controls
def control_mask(fields) -> np.ndarray:
    """Boolean mask of negative-control rows of a fields table.

    ``Metadata_control_type == "negcon"`` when that column exists (and is
    filled somewhere), else ``Metadata_is_control``, else DMSO by name.
    """
    n = len(fields)
    cols = getattr(fields, "columns", ())
    if "Metadata_control_type" in cols:
        ct = np.char.lower(_filled(fields["Metadata_control_type"]).astype(str))
        if (ct != "").any():
            return ct == "negcon"
    if "Metadata_is_control" in cols:
        # read as the prompts read it: a column of text ("False", "no", "0") is not all controls
        return np.fromiter(map(read_flag, fields["Metadata_is_control"]), dtype=bool, count=n)
    if "Metadata_pert_iname" in cols:
        return np.char.upper(_filled(fields["Metadata_pert_iname"]).astype(str)) == "DMSO"
    return np.zeros(n, dtype=bool)


def _filled(column) -> np.ndarray:
    # A copy as objects with the missing values set to "" (false, no control type, no compound).
    # Not Series.fillna: an empty or numeric column (read from csv / parquet) is float, and filling
    # it with a str or bool is deprecated in pandas 3 (Pandas4Warning) and an error in pandas 4.
    vals = np.array(column, dtype=object)
    vals[pd.isna(vals)] = ""
    return vals


def plate_keys(fields) -> np.ndarray:
    cols = getattr(fields, "columns", ())
    if "Metadata_Plate" in cols:
        return fields["Metadata_Plate"].astype(str).to_numpy()
    return np.full(len(fields), "<plate>", dtype=object)


def _check(features: np.ndarray, fields) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim < 2:
        raise CellClipError(f"features must be (N, ...) with N fields, got shape {x.shape}")
    if len(fields) != x.shape[0]:
        raise CellClipError(
            f"features have {x.shape[0]} rows but the fields table has {len(fields)}; "
            "pass the table rows the features were extracted from (FeatureResult.index)")
    return x


def _scale_from_std(std: np.ndarray, eps: float) -> np.ndarray:
    # Floor tiny standard deviations (constant features, a single control field) so
    # nothing explodes: at least eps and at least 1e-3 of the typical spread.
    pos = std[std > 0]
    typical = float(np.median(pos)) if pos.size else 1.0
    return np.maximum(std, max(eps, 1e-3 * typical))


def _no_controls_message(plate, n: int) -> str:
    if n == 1:
        return (f"plate {plate}: one field and no negative-control (DMSO) fields: centring it on itself sets its "
                "features to zero, so it embeds to the same constant vector as every such plate and every query "
                "scores it the same; annotate its negative controls (--platemap) or embed it with its whole plate")
    return (f"plate {plate}: no negative-control (DMSO) fields; centring and scaling on all its {n} fields "
            "instead, so its fields are compared with the plate's average, not with DMSO")


def center_scale(features, fields, *, scale: bool = True, eps: float = 1e-6,
                 warn: bool = True) -> np.ndarray:
    """Per plate: ``(x - mean_ctrl) / std_ctrl`` with that plate's negative controls."""
    x = _check(features, fields)
    out = np.empty_like(x)
    ctrl = control_mask(fields)
    plates = plate_keys(fields)
    for plate in dict.fromkeys(plates):  # keeps order
        rows = np.flatnonzero(plates == plate)
        ref = rows[ctrl[rows]]
        if ref.size == 0:
            if warn:
                warn_at_caller(_no_controls_message(plate, rows.size))
            ref = rows
        xr = x[ref].astype(np.float64)
        mu = xr.mean(axis=0)
        # in float64, stored as float32: subtracting a float32-rounded mean would leave its rounding
        # (up to half a float32 step of the raw values) on every field
        y = x[rows] - mu
        if scale:
            std = xr.std(axis=0)  # zeros for a single control field
            y = y / _scale_from_std(std, eps)
        out[rows] = y
    return out


# ------------------------------------------------------------------ TVN whitening
def _check_shrinkage(value) -> str | float:
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return "auto"
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise CellClipError(f"TVN shrinkage must be 'auto' (Ledoit-Wolf) or a number in [0, 1], got {value!r}")
    return v


def ledoit_wolf_shrinkage(xc: np.ndarray) -> float:
    """Ledoit-Wolf (2004) optimal weight of the scaled identity for centred rows ``xc`` (n, d).

    The shrunk covariance is ``(1 - s) S + s (tr S / d) I`` with ``S = xc.T xc / n``.
    """
    n, d = xc.shape
    if n < 2:
        return 1.0
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta = float(((s - mu * np.eye(d)) ** 2).sum()) / d
    if delta <= 0.0:
        return 1.0
    beta = (float((np.einsum("ij,ij->i", xc, xc) ** 2).sum()) / n - float((s**2).sum())) / (n * d)
    return float(min(max(beta, 0.0), delta) / delta)


def _whitening(x: np.ndarray, eps: float, shrinkage) -> tuple[np.ndarray, np.ndarray, float]:
    """ZCA whitening (mean, W, shrinkage) of rows x (n, d) with a shrunk covariance:
    (x - mean) @ W has ~identity covariance when there are enough rows."""
    mu = x.mean(axis=0)
    xc = x - mu
    n, d = xc.shape
    sample = xc.T @ xc / max(n - 1, 1)
    s = ledoit_wolf_shrinkage(xc) if shrinkage == "auto" else float(shrinkage)
    cov = (1.0 - s) * sample + s * (np.trace(sample) / d) * np.eye(d)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.clip(evals, 0.0, None)
    w = (evecs / np.sqrt(evals + eps)) @ evecs.T
    return mu.astype(np.float32), w.astype(np.float32), s


def fit(features, fields, spec: Mapping | None) -> dict | None:
    """Fit what a spec needs from training data; returns the (possibly augmented) spec.

    ``center_scale`` needs nothing (statistics come from each plate at apply
    time).  ``tvn`` fits a whitening on the centre-scaled negative-control
    fields of the given (training) plates: per channel for (N, C, D) input,
    on the whole vector for (N, E).
    """
    if spec is None:
        return None
    spec = dict(spec)
    if spec.get("method") != "tvn":
        return spec
    x = center_scale(features, fields, scale=spec.get("scale", True), eps=spec.get("eps", 1e-6))
    ctrl = control_mask(fields)
    ref = x[ctrl] if ctrl.any() else x
    if not ctrl.any():
        warn_at_caller("TVN: no negative-control fields in the training data; whitening on all fields")
    ref = ref.astype(np.float64)
    eps = float(spec.get("whiten_eps", 1e-2))
    # specs written before shrinkage existed mean the plain sample covariance
    shrink = _check_shrinkage(spec.get("shrinkage", 0.0))
    if ref.ndim == 3:  # (N, C, D): per channel
        mus, ws, used = zip(*(_whitening(ref[:, c], eps, shrink) for c in range(ref.shape[1])))
        mean, w = np.stack(mus), np.stack(ws)
    else:
        flat = ref.reshape(ref.shape[0], -1)
        mean, w, used = _whitening(flat, eps, shrink)
        mean, w, used = mean[None], w[None], (used,)
    spec[_STATE_KEY] = {"mean": mean, "whiten": w}
    spec["fitted_on_fields"] = int(ref.shape[0])
    spec["fitted_shrinkage"] = [round(float(u), 4) for u in used]
    return spec


def _state(spec: Mapping) -> dict:
    state = spec.get(_STATE_KEY)
    if state is None:
        raise CheckpointError(
            "the TVN feature correction needs its whitening matrices; load them with "
            "napari_cellclip.correction.load_state(spec, checkpoint_dir) (file "
            f"{spec.get('state_file', STATE_FILE)})")
    return state


def apply(features, fields, spec: Mapping | None) -> np.ndarray:
    """Correct ``features`` (N, ...) of the rows of ``fields`` as ``spec`` says.

    ``spec=None`` returns the features unchanged (as float32).
    """
    if spec is None or spec.get("method") in (None, "none"):
        return np.asarray(features, dtype=np.float32)
    method = spec.get("method")
    if method not in METHODS:
        raise CellClipError(f"unknown feature correction {method!r}; choose one of {', '.join(METHODS)}")
    x = center_scale(features, fields, scale=spec.get("scale", True), eps=spec.get("eps", 1e-6))
    if method == "tvn":
        state = _state(spec)
        mean, w = np.asarray(state["mean"], np.float32), np.asarray(state["whiten"], np.float32)
        if x.ndim == 3 and mean.shape[0] == x.shape[1]:
            x = np.einsum("ncd,cde->nce", x - mean[None], w, optimize=True)
        else:
            flat = x.reshape(x.shape[0], -1)
            if flat.shape[1] != w.shape[-1]:
                raise CheckpointError(
                    f"TVN whitening was fitted on {w.shape[-1]}-dim features but got {flat.shape[1]}")
            x = ((flat - mean[0]) @ w[0]).reshape(x.shape)
    return np.ascontiguousarray(x, dtype=np.float32)


# ------------------------------------------------------------------ persistence
def save_state(spec: Mapping | None, directory) -> None:
    """Write the fitted arrays of ``spec`` (TVN) as safetensors into ``directory``."""
    if not spec or _STATE_KEY not in spec:
        return
    from safetensors.numpy import save_file

    from ._fsutil import atomic_file

    state = spec[_STATE_KEY]
    with atomic_file(Path(directory) / spec.get("state_file", STATE_FILE)) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(tmp))


def load_state(spec: Mapping | None, directory) -> dict | None:
    """Return ``spec`` with its arrays loaded from ``directory`` (no-op for center_scale/None)."""
    if not spec or spec.get("method") != "tvn" or _STATE_KEY in spec:
        return dict(spec) if spec else spec
    path = Path(directory) / spec.get("state_file", STATE_FILE)
    if not path.is_file():
        raise CheckpointError(f"{path}: TVN correction matrices missing from the checkpoint")
    from safetensors.numpy import load_file

    out = dict(spec)
    out[_STATE_KEY] = dict(load_file(str(path)))
    return out


EXTRA_PREFIX = "feature_correction."


def attach_to_model(model, spec: Mapping | None) -> None:
    """Record ``spec`` in ``model.config.feature_correction`` (JSON part) and its fitted
    arrays in ``model.extra_tensors`` (saved as tensors in model.safetensors)."""
    import torch

    model.config.feature_correction = to_json(spec)
    extra = getattr(model, "extra_tensors", None)
    if extra is None:
        extra = model.extra_tensors = {}
    for k in [k for k in extra if k.startswith(EXTRA_PREFIX)]:
        del extra[k]
    if spec and _STATE_KEY in spec:
        for k, v in spec[_STATE_KEY].items():
            extra[EXTRA_PREFIX + k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))


def spec_for_model(model, checkpoint_dir=None) -> dict | None:
    """The usable correction spec of a loaded CellCLIP model (TVN arrays attached).

    The arrays come from ``model.extra_tensors`` (``feature_correction.*``), else
    from ``feature_correction.safetensors`` in ``checkpoint_dir``.
    """
    spec = getattr(getattr(model, "config", None), "feature_correction", None)
    if not spec or spec.get("method") != "tvn" or _STATE_KEY in spec:
        return dict(spec) if spec else None
    extra = getattr(model, "extra_tensors", None) or {}
    state = {k[len(EXTRA_PREFIX):]: v.detach().cpu().numpy() for k, v in extra.items()
             if k.startswith(EXTRA_PREFIX)}
    if state:
        out = dict(spec)
        out[_STATE_KEY] = state
        return out
    directory = checkpoint_dir or getattr(model, "checkpoint_dir", None)
    if directory is None:
        _state(spec)  # raises a clear CheckpointError
    return load_state(spec, directory)


def json_safe(spec: Any) -> Any:
    return to_json(spec) if isinstance(spec, Mapping) else spec
