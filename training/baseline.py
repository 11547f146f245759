"""Naive baseline: global intensity descriptors + nearest centroid, leave one plate out.

Per field and channel: mean, standard deviation and the 1/5/25/50/75/95/99th
intensity percentiles of the raw image (9 numbers x C channels).  A well is
the mean of its fields.  For each held-out plate, the training plates give one
centroid per perturbation (after z-scoring every descriptor with the training
statistics), and each held-out well (field) is assigned the perturbation of the
nearest centroid (Euclidean).  With ``correction="center_scale"`` every plate
(held-out included) is first centred and scaled on its own DMSO fields
(:func:`napari_cellclip.correction.center_scale`).

This is the yardstick the CellCLIP model must beat on the LINCS plates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
DESCRIPTOR_NAMES = ("mean", "std") + tuple(f"p{p}" for p in PERCENTILES)


def field_descriptors(img: np.ndarray) -> np.ndarray:
    """(C, H, W) → (C, 9) global per-channel intensity descriptors (float32)."""
    x = np.asarray(img, dtype=np.float32).reshape(img.shape[0], -1)
    pct = np.percentile(x, PERCENTILES, axis=1).T
    return np.concatenate([x.mean(1, keepdims=True), x.std(1, keepdims=True), pct], axis=1
                          ).astype(np.float32)


def global_descriptors(fields, stains=None, progress=None) -> np.ndarray:
    """(N, C*9) descriptors of every field of the table."""
    from napari_cellclip.images import load_field

    out = []
    for i, (_, row) in enumerate(fields.iterrows()):
        out.append(field_descriptors(load_field(row, stains)).ravel())
        if progress:
            progress(i + 1, len(fields))
    return np.stack(out)


def _nearest_centroid(train_x, train_y, test_x):
    classes = sorted(set(train_y))
    cents = np.stack([train_x[np.asarray(train_y) == c].mean(0) for c in classes])
    d = ((test_x[:, None, :] - cents[None]) ** 2).sum(-1)
    return [classes[i] for i in d.argmin(1)]


def leave_one_plate_out(desc: np.ndarray, fields, *, correction: str | None = None,
                        label_column: str = "Metadata_pert_iname") -> dict:
    """Nearest-centroid accuracy at well and field level, holding out each plate in turn."""
    from napari_cellclip.correction import center_scale

    x = np.asarray(desc, dtype=np.float64)
    if correction in ("center_scale", "dmso"):
        x = center_scale(x, fields).astype(np.float64)
    elif correction not in (None, "none"):
        raise ValueError(f"unknown correction {correction!r}")
    plates = fields["Metadata_Plate"].astype(str).to_numpy()
    wells = fields["Metadata_Well"].astype(str).to_numpy()
    labels = fields[label_column].astype(str).to_numpy()
    well_ok = well_n = field_ok = field_n = 0
    per_plate = {}
    for held in sorted(set(plates)):
        tr, te = plates != held, plates == held
        mu, sd = x[tr].mean(0), x[tr].std(0)
        sd[sd == 0] = 1.0
        z = (x - mu) / sd
        # field level
        pred_f = _nearest_centroid(z[tr], labels[tr], z[te])
        ok_f = int((np.asarray(pred_f) == labels[te]).sum())
        # well level: mean of a well's fields
        keys = list(zip(plates, wells))
        uniq = list(dict.fromkeys(keys))
        wz = np.stack([z[[k == u for k in keys]].mean(0) for u in uniq])
        wl = np.array([labels[keys.index(u)] for u in uniq])
        wp = np.array([u[0] for u in uniq])
        pred_w = _nearest_centroid(wz[wp != held], wl[wp != held], wz[wp == held])
        ok_w = int((np.asarray(pred_w) == wl[wp == held]).sum())
        per_plate[held] = {"wells_correct": ok_w, "wells": int((wp == held).sum()),
                           "fields_correct": ok_f, "fields": int(te.sum()),
                           "well_predictions": dict(zip([u[1] for u in uniq if u[0] == held], pred_w))}
        well_ok += ok_w
        well_n += int((wp == held).sum())
        field_ok += ok_f
        field_n += int(te.sum())
    return {"correction": correction or "none", "wells_correct": well_ok, "wells": well_n,
            "well_accuracy": well_ok / max(well_n, 1), "fields_correct": field_ok, "fields": field_n,
            "field_accuracy": field_ok / max(field_n, 1), "per_plate": per_plate}


def run_baseline(fields, stains=None) -> dict:
    t0 = time.perf_counter()
    desc = global_descriptors(fields, stains)
    t1 = time.perf_counter()
    out = {"descriptor": f"per-channel {', '.join(DESCRIPTOR_NAMES)} of the raw intensities",
           "rule": "nearest centroid by perturbation on the training plates, leave one plate out",
           "without_correction": leave_one_plate_out(desc, fields, correction=None),
           "with_center_scale": leave_one_plate_out(desc, fields, correction="center_scale"),
           "descriptor_seconds": round(t1 - t0, 2)}
    return out


def main(argv=None) -> int:
    from napari_cellclip.errors import CellClipError

    from napari_cellclip.cli import HelpFormatter, add_data_args, fields_from_args

    p = argparse.ArgumentParser(prog="python -m training.baseline", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    add_data_args(p, data_required=True)
    p.add_argument("--output", help="write the JSON report here")
    a = p.parse_args(argv)
    if not a.platemap:
        p.error("--platemap is needed: the baseline learns the perturbations the platemap names")
    try:
        fields = fields_from_args(a)
        rep = run_baseline(fields)
    except CellClipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(rep, indent=2)
    if a.output:
        from napari_cellclip._fsutil import atomic_write_text

        atomic_write_text(a.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
