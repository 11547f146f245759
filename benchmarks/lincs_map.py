"""Profiling mAP on the LINCS A549 plates, leave one plate out (copairs, via training/profiling.py).

For each held-out plate (and seed), CellCLIP is fitted with the offline defaults on the
other two plates; then every well of the three plates is profiled four ways and judged
with the held-out plate's wells as the only queries:

  (a) CellCLIP image embeddings: the model's multi-instance pooling of the well's fields;
  (b) the frozen morphology features the model was trained on, corrected as the checkpoint
      does (per-plate DMSO centre-and-scale + TVN fitted on the fold's training plates),
      median of the well's fields;
  (b') the same features with the per-plate DMSO centre-and-scale only;
  (c) the naive intensity baseline (training/baseline.py descriptors), per-plate DMSO
      centre-and-scale, median of the well's fields.

What "replicates" are here: the three plates are replicates of one layout, each with one
orantinib well, one lonafarnib well and two DMSO wells, so a compound's replicate wells
exist only across plates.  A held-out well's positives are the same compound's wells on
the two training plates (2 per query).  Replicate retrieval ranks them among every other
well of the 3 plates (9 negatives: 6 DMSO + the other compound's 3); phenotypic activity
among the 6 DMSO wells only.  One query per compound per fold, so a compound's mAP in a
fold is one AP, and its p-value cannot go below 1/C(8,2) = 0.036 (activity) or
1/C(11,2) = 0.018 (retrieval); with two compounds corrected together (Benjamini-Hochberg),
activity is significant only when both rank their replicates first.

    python benchmarks/lincs_map.py [--data-root ../shared/data/lincs-a549] [--seeds 0 1 2]
        [--encoders morphology cells morphology+cells]   (rows (a), (b), (b') per encoder; default: morphology)
        [--workers 2]   (DataLoader workers for feature extraction; the cells encoder measures in them)
        (default data root: $NAPARI_CELLCLIP_LINCS_DATA, else ../shared/data/lincs-a549 beside the repository)
        [--null-size 10000] [--output benchmarks/lincs_map.json] [--cache-dir DIR]

Writes --output and prints a markdown table (the one in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # the repository's training/ package
sys.path.insert(0, str(HERE))

from lincs_eval import PLATES, default_data_root  # noqa: E402 - one definition of the LINCS data
ROWS = [("embeddings", "(a) CellCLIP image embeddings (model's well pooling)"),
        ("features", "(b) frozen morphology features, corrected as the checkpoint (centre-scale + TVN)"),
        ("features_center_scale", "(b') frozen morphology features, DMSO centre-and-scale only"),
        ("intensity", "(c) naive intensity baseline, DMSO centre-and-scale")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, default=default_data_root(),
                   help="the LINCS plates: ../shared/data/lincs-a549 beside the repository, or "
                        "$NAPARI_CELLCLIP_LINCS_DATA (now: %(default)s)")
    p.add_argument("--output", default=str(HERE / "lincs_map.json"))
    p.add_argument("--cache-dir", default=None, help="feature cache (default: the user cache)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--null-size", type=int, default=10000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoders", nargs="+", default=["morphology"],
                   help="frozen encoders compared on the same folds, as fit --encoder (default: morphology)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for feature extraction (default: 0)")
    a = p.parse_args(argv)
    root = Path(a.data_root)
    if not (root / "images").is_dir():
        print(f"error: {root}: no LINCS data here (give --data-root)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    plates = [str(root / "images" / b) for b in PLATES]
    platemap = str(root / "platemap")
    intensity = _intensity_table(plates, platemap)
    t_intensity = time.perf_counter() - t0
    runs = []
    work = Path(tempfile.mkdtemp(prefix="lincs-map-"))
    try:
        for enc in a.encoders:
            for held in PLATES:
                for seed in a.seeds:
                    runs.append(_fold(held, seed, enc, plates, platemap, intensity, work, a))
                    _print_fold(runs[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"command": "python benchmarks/lincs_map.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "data": str(root), "seeds": a.seeds, "encoders": a.encoders, "null_size": a.null_size,
              "loadavg_start": _loadavg(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "intensity_seconds": round(t_intensity, 1),
              "seconds": round(time.perf_counter() - t0, 1), "runs": runs, "summary": summarise(runs)}
    Path(a.output).write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report["summary"], a.seeds))
    print(f"wrote {a.output}")
    return 0


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _intensity_table(plates, platemap):
    """Field-level intensity-baseline profiles of the 3 plates (DMSO centre-and-scale per plate)."""
    from napari_cellclip.fields import read_fields
    from training.profile_sources import intensity_profiles

    fields = read_fields(plates, platemap=platemap, cell_line="A549")
    return intensity_profiles(fields, level="field", correction="center_scale").frame


def _fold(held, seed, enc, plates, platemap, intensity, work, a) -> dict:
    from training.loop import evaluate, fit
    from training.profiling import ProfilingOptions

    train = [p for p in plates if Path(p).name != held]
    out = work / f"fit-{enc.replace('+', '_')}-{held}-s{seed}"
    t0 = time.perf_counter()
    fit(data=train, platemap=platemap, output=str(out), seed=seed, encoder=enc, device=a.device,
        cache_dir=a.cache_dir, workers=a.workers, quiet=True, no_progress=True)
    t_fit = time.perf_counter() - t0
    opts = ProfilingOptions(query_plates=[held], null_size=a.null_size, seed=0)
    common = dict(platemap=platemap, device=a.device, cache_dir=a.cache_dir, workers=a.workers, quiet=True,
                  no_progress=True, metrics=("replicate", "activity"))
    rep = evaluate(out, plates, **common, profiling=dict(options=opts, representations=("embeddings", "features"),
                                                          tables=[("intensity", intensity)]))
    with warnings.catch_warnings():  # row (b') overrides the checkpoint's correction on purpose
        warnings.filterwarnings("ignore", message="--correction center_scale overrides")
        cs = evaluate(out, plates, correction="center_scale", **common,
                      profiling=dict(options=opts, representations=("features",)))
    shutil.rmtree(out, ignore_errors=True)
    sources = dict(rep["profiling"]["sources"])
    sources["features_center_scale"] = cs["profiling"]["sources"]["features"]
    keep = ("source", "well_profiles", "n_profiles", "n_features", "replicate", "activity")
    return {"encoder": enc, "test_plate": held, "seed": seed, "fit_seconds": round(t_fit, 1),
            "sources": {k: {f: v[f] for f in keep if f in v} for k, v in sources.items()}}


def _print_fold(run):
    cells = []
    for key, _ in ROWS:
        s = run["sources"][key]
        cells.append(f"{key}: rep {s['replicate'].get('mAP', float('nan')):.2f} "
                     f"act {s['activity'].get('mAP', float('nan')):.2f}")
    print(f"encoder={run['encoder']} test={run['test_plate']} seed={run['seed']} (fit {run['fit_seconds']:.0f}s): "
          + " | ".join(cells), flush=True)


def _rows(runs):
    """(summary key, label, source key, runs) per table row: (a), (b), (b') for each encoder in the
    order run, then (c) once (the intensity baseline does not depend on the encoder)."""
    encoders = list(dict.fromkeys(r["encoder"] for r in runs))
    rows = []
    for enc in encoders:
        mine = [r for r in runs if r["encoder"] == enc]
        for key, label in ROWS[:-1]:
            name = key if len(encoders) == 1 else f"{enc}:{key}"
            rows.append((name, label.replace("morphology", enc) + ("" if key != "embeddings" else f" [{enc}]"),
                         key, mine))
    key, label = ROWS[-1]
    rows.append((key, label, key, [r for r in runs if r["encoder"] == encoders[0]]))
    return rows


def summarise(runs) -> dict:
    """Per row of :func:`_rows`: mean mAP over folds x seeds, per-compound means, significant groups."""
    import numpy as np

    out = {}
    for name, label, key, mine in _rows(runs):
        row = {"label": label}
        for metric in ("replicate", "activity"):
            res = [r["sources"][key][metric] for r in mine]
            scored = [x for x in res if "mAP" in x]
            per = {}
            for x in scored:
                for g, v in x["groups"].items():
                    per.setdefault(v.get("name", g), []).append(v["mAP"])
            row[metric] = {"mAP_mean": round(float(np.mean([x["mAP"] for x in scored])), 3) if scored else None,
                           "mAP_per_fold": [x.get("mAP") for x in res],
                           "per_compound": {k: round(float(np.mean(v)), 3) for k, v in sorted(per.items())},
                           "significant": int(sum(x["n_significant"] for x in scored)),
                           "groups": int(sum(x["n_groups"] for x in scored)),
                           "not_computed": [x["not_computed"] for x in res if "not_computed" in x]}
        out[name] = row
    return out


def markdown(summary, seeds) -> str:
    runs = f"3 folds x {len(seeds)} seed(s)"
    lines = [f"| well profiles (leave one plate out, {runs}) | replicate mAP | "
             "activity mAP | activity: orantinib / lonafarnib | significant (activity, FDR 0.05) |",
             "|---|---|---|---|---|"]
    for row in summary.values():
        r, act = row["replicate"], row["activity"]
        pc = act["per_compound"]
        lines.append(f"| {row['label']} | {r['mAP_mean']:.3f} | {act['mAP_mean']:.3f} | "
                     f"{pc.get('orantinib', float('nan')):.2f} / {pc.get('lonafarnib', float('nan')):.2f} | "
                     f"{act['significant']}/{act['groups']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
