"""Bags of single cells instead of fields, leave one LINCS plate out (issue 14's optional variant).

The ``cells`` encoder profiles a field by the median and MAD of its cells.  This experiment asks
whether the multi-instance pooling does better when its instances are the cells themselves:

* per cell and stain, the 76 stain measurements and the 20 shape numbers of
  :mod:`napari_cellclip.cellfeatures` (asinh, NaN → 0), so an instance is (C, 96);
  the segmentation and measurements are the ``cells`` encoder's, on plate-normalised channels;
* a well's bag is all its cells; a field is scored as the bag of its own cells;
* training is ``python -m training fit`` with the offline defaults (CWCL, TVN fitted on the
  training plates' control cells, multi-positive batching), with the fit's feature step
  replaced by these per-cell rows (a table with one row per cell, its field's metadata repeated);
* evaluation scores wells and fields of the held-out plate against its 3 prompts, as
  ``benchmarks/lincs_eval.py`` does for field profiles.

    python benchmarks/lincs_cell_bags.py [--data-root ../shared/data/lincs-a549] [--seeds 0 1 2]
        [--workers 2] [--output benchmarks/lincs_cell_bags.json]

It replaces ``training.prepare._features`` for the length of the run: an experiment, not a
supported encoder (it did not help on LINCS; see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PLATES = ["SQ00015198", "SQ00015230", "SQ00015231"]
STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def _default_root() -> str:
    return os.environ.get("NAPARI_CELLCLIP_LINCS_DATA",
                          str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lincs-a549"))


def cell_instances(item) -> np.ndarray:
    """(n_cells, C, 96) float32 of one field: per stain its 76 measurements, then the 20 shape numbers."""
    row, ranges = item
    from napari_cellclip.cellfeatures import measure_field
    from napari_cellclip.images import load_field

    _, m = measure_field(load_field(row, STAINS), STAINS, ranges=ranges)
    x = np.concatenate([m.channel, np.repeat(m.shape[:, None, :], len(STAINS), 1)], 2)
    return np.nan_to_num(np.arcsinh(x), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def cell_rows(fields, workers: int):
    """Every cell of ``fields`` as a row: features (N, C, 96) and the fields table repeated per cell
    (plus ``Metadata_FieldIndex``, the field's row)."""
    from napari_cellclip.correction import plate_keys
    from napari_cellclip.images import plate_ranges

    ranges = plate_ranges(fields, STAINS)
    items = [(fields.iloc[i], ranges[p]) for i, p in enumerate(plate_keys(fields))]
    if workers > 0:
        with get_context("spawn").Pool(workers) as pool:
            per_field = pool.map(cell_instances, items, chunksize=1)
    else:
        per_field = [cell_instances(it) for it in items]
    idx = np.repeat(np.arange(len(fields)), [len(x) for x in per_field])
    cells = fields.iloc[idx].reset_index(drop=True)
    cells["Metadata_FieldIndex"] = idx
    return np.concatenate(per_field).astype(np.float32), cells


def evaluate_held_out(out: Path, feats: np.ndarray, cells) -> dict:
    """Wells and fields (bags of their cells) of the held-out plate against its prompts: the bags are
    :func:`training.data.build_well_bags`' (the wells training and the store use), a field's bag being
    the "well" of its own cells."""
    from napari_cellclip import correction as corr
    from napari_cellclip.checkpoints import load_model, resolve_checkpoint
    from napari_cellclip.towers import encode_bags, encode_texts
    from training.data import build_well_bags
    from training.evaluate import retrieval_metrics

    ck = resolve_checkpoint(out)
    model = load_model(ck)
    x = corr.apply(feats, cells, corr.spec_for_model(model, ck))
    by_field = cells.assign(Metadata_Well=cells["Metadata_Well"].astype(str) + "/"
                            + cells["Metadata_FieldIndex"].astype(str))
    rep = {}
    for level, table in (("well", cells), ("field", by_field)):
        wb = build_well_bags(x, table)
        m = retrieval_metrics(encode_bags(model, x, wb.bag_index), encode_texts(model, wb.prompts), wb.prompt_ids)
        m["per_prompt_image_to_text_R@1"] = {wb.prompts[k]: v for k, v in m["per_prompt_image_to_text_R@1"].items()}
        m["right"] = int(round(m["accuracy"] * len(wb)))
        rep[level] = m
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=_default_root())
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2, help="processes measuring cells (default 2)")
    p.add_argument("--output", default="benchmarks/lincs_cell_bags.json")
    a = p.parse_args(argv)
    import training.prepare as prep
    from training.data import read_training_fields
    from training.loop import fit

    root = Path(a.data_root)
    if not (root / "images").is_dir():
        p.error(f"no LINCS plates in {root} (expected images/ and platemap/)")
    data = {b: str(root / "images" / b) for b in PLATES}
    fields = read_training_fields(list(data.values()), platemap=str(root / "platemap"))
    t0 = time.perf_counter()
    feats, cells = cell_rows(fields, a.workers)
    t_cells = time.perf_counter() - t0
    print(f"{len(cells)} cells from {len(fields)} fields in {t_cells:.0f}s", flush=True)

    def per_cell_features(cfg, fit_fields, dist, device):
        keep = cells["Metadata_Plate"].isin(set(fit_fields["Metadata_Plate"])).to_numpy()
        return feats[keep], cells[keep].reset_index(drop=True), "cells-per-cell-experiment"

    original, prep._features = prep._features, per_cell_features
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="lincs-cell-bags-") as work:
            for held in PLATES:
                for seed in a.seeds:
                    t1 = time.perf_counter()
                    out = Path(work) / f"{held}-s{seed}"
                    fit(data=[data[b] for b in PLATES if b != held], platemap=str(root / "platemap"),
                        output=str(out), seed=seed, no_progress=True, quiet=True)
                    m = (cells["Metadata_Plate"] == held).to_numpy()
                    rep = evaluate_held_out(out, feats[m], cells[m].reset_index(drop=True))
                    # a field without cells has no bag: it counts as a field not named right
                    rep["field"]["of"] = int((fields["Metadata_Plate"] == held).sum())
                    rep["well"]["of"] = rep["well"]["n_images"]
                    runs.append({"test_plate": held, "seed": seed, "seconds": round(time.perf_counter() - t1, 1),
                                 **rep})
                    print(f"held out {held} seed {seed}: wells {rep['well']['right']}/{rep['well']['n_images']} "
                          f"fields {rep['field']['right']}/{rep['field']['of']}", flush=True)
    finally:
        prep._features = original
    summary = {lvl: {"right": sum(r[lvl]["right"] for r in runs), "of": sum(r[lvl]["of"] for r in runs),
                     "text_to_image_R@1_mean": round(float(np.mean([r[lvl]["text_to_image"]["R@1"] for r in runs])), 3)}
               for lvl in ("well", "field")}
    print("summary:", json.dumps(summary))
    Path(a.output).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "cells": len(cells),
                                          "cells_seconds": round(t_cells, 1), "summary": summary, "runs": runs},
                                         indent=2, default=str))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
