"""Real-data measurement on the LINCS A549 plates (leave one plate out).

1. Naive baseline (training/baseline.py): global per-channel intensity
   descriptors → nearest centroid by perturbation, leave one plate out, with
   and without per-plate DMSO centre-and-scale.
2. CellCLIP with the offline defaults (morphology encoder, MiniLM text encoder,
   CWCL, multi-positive batching, TVN; training.loop.FIT_DEFAULTS) trained on
   SQ00015198 + SQ00015230 on CPU, evaluated on SQ00015231: field- and
   well-level Recall@1 in both directions over the 3 prompts, for every
   combination of --encoders x --holdouts x --normalizations x --losses x
   --batchings x --corrections x --seeds.
3. Separability of each encoder's frozen features themselves: per plate, after DMSO
   centre-and-scale, the distance between the two DMSO wells' mean
   features, and from each treated well to its nearest DMSO well.
   A treated well closer to a DMSO well than the DMSO wells are to each
   other cannot be told from DMSO by any rule built on these features.
4. Speed of each encoder: fields/s extracting --speed-fields fields from
   nothing (no cache) with --workers DataLoader workers, in the same run.

    python benchmarks/lincs_eval.py [--data-root ../shared/data/lincs-a549]
        [--encoders morphology cells morphology+cells] [--workers 2] [--speed-fields 24]
        [--output benchmarks/lincs_eval.json | --no-write] [--workdir DIR] [--cache-dir DIR]
        [--holdouts SQ00015231 | all] [--losses cwcl siglip clip]
        [--batchings multipositive distinct] [--corrections tvn center_scale none]
        [--normalizations plate field]
        [--seeds 0 1 2] [--skip-baseline] [--device cpu] [--fit '{"epochs": 240}']

The file in the repository was written by

    python benchmarks/lincs_eval.py --holdouts all --seeds 0 1 2 \
        --corrections tvn center_scale none --normalizations plate field

(the first summary row, cwcl + multipositive + tvn, is the default; the
specified split is the SQ00015231 rows of it).  benchmarks/lincs_eval_encoders.json
(the encoder comparison) was written by

    OMP_NUM_THREADS=1 python benchmarks/lincs_eval.py --encoders morphology cells \
        morphology+cells --workers 2 --holdouts all --seeds 0 1 2 --corrections tvn \
        --output benchmarks/lincs_eval_encoders.json

and benchmarks/lincs_eval_cells_corrections.json (the single-cell encoders under the other
corrections) by

    OMP_NUM_THREADS=1 python benchmarks/lincs_eval.py --encoders cells morphology+cells \
        --workers 1 --holdouts all --seeds 0 1 2 --corrections center_scale none --skip-baseline \
        --speed-fields 0 --output benchmarks/lincs_eval_cells_corrections.json

(OMP_NUM_THREADS=1: on a machine whose cores are shared, torch's intra-op threads
made each training step ~30x slower).
Writes --output (default benchmarks/lincs_eval.json; nothing with --no-write) and prints a
summary table.  The plates are read from --data-root, by default ``../shared/data/lincs-a549``
beside the repository (the layout of shared/data/README.md; $NAPARI_CELLCLIP_LINCS_DATA
overrides it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository's training/ package

PLATES = ["SQ00015198", "SQ00015230", "SQ00015231"]
TRAIN = ["SQ00015198", "SQ00015230"]
TEST = "SQ00015231"


def default_data_root() -> Path:
    """``$NAPARI_CELLCLIP_LINCS_DATA``, else ``../shared/data/lincs-a549`` beside the repository."""
    env = os.environ.get("NAPARI_CELLCLIP_LINCS_DATA")
    return Path(env) if env else HERE.parent.parent / "shared" / "data" / "lincs-a549"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="How well CellCLIP, trained on two real LINCS Cell Painting plates, names the compound of "
                    "the wells and fields of the third plate, next to a simple nearest-average rule on "
                    "intensity measurements.  Prints a table; about 10 seconds per trained model once the "
                    "image features are cached.",
        epilog="Each combination of --encoders, --holdouts, --normalizations, --losses, --batchings, "
               "--corrections and --seeds trains one model.")
    p.add_argument("--data-root", type=Path, default=default_data_root(),
                   help="folder with the LINCS plates (images/, platemap/), default: ../shared/data/lincs-a549 "
                        "beside the repository, or $NAPARI_CELLCLIP_LINCS_DATA (now: %(default)s)")
    p.add_argument("--encoders", nargs="+", default=["morphology"],
                   help="frozen encoder specs compared on the same folds, as fit --encoder (default: morphology)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers for feature extraction; the cells encoder measures in them (default: 0)")
    p.add_argument("--speed-fields", type=int, default=24,
                   help="fields extracted from nothing per encoder to report fields/s (0: skip; default: 24)")
    p.add_argument("--output", default=str(HERE / "lincs_eval.json"),
                   help="where to write every number as JSON (default: benchmarks/lincs_eval.json)")
    p.add_argument("--no-write", action="store_true", help="only print the table; write no file")
    p.add_argument("--workdir", default=None,
                   help="keep every trained model in this folder (default: a temporary folder; each model, about "
                        "185 MB with its text encoder, is deleted once evaluated)")
    p.add_argument("--cache-dir", default=None,
                   help="image-feature cache to reuse (default: a new temporary one, so the time measured "
                        "includes computing the features)")
    p.add_argument("--corrections", nargs="+", default=["tvn", "center_scale", "none"],
                   help="plate-effect corrections to compare: tvn, center_scale, none (default: all three)")
    p.add_argument("--normalizations", nargs="+", default=["plate"], choices=["plate", "field"],
                   help="how image intensities are rescaled: per plate or per field (default: plate)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="random seeds; each trains a model (default: 0)")
    p.add_argument("--losses", nargs="+", default=["cwcl"], help="training losses: cwcl, clip, siglip (default: cwcl)")
    p.add_argument("--batchings", nargs="+", default=["multipositive"], choices=["multipositive", "distinct"],
                   help="how training batches are drawn (default: multipositive)")
    p.add_argument("--holdouts", nargs="+", default=[TEST],
                   help=f"plates to hold out, each in turn, training on the other two; 'all' holds out each "
                        f"plate (default: {TEST})")
    p.add_argument("--skip-baseline", action="store_true", help="leave out the nearest-average rule")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--fit", default="", help="more training options as JSON, e.g. '{\"epochs\": 80}'")
    a = p.parse_args(argv)
    if not (Path(a.data_root) / "images").is_dir():
        p.error(f"no LINCS plates in {a.data_root} (expected its images/ and platemap/ folders): "
                "give --data-root or set NAPARI_CELLCLIP_LINCS_DATA")

    import torch

    from training.baseline import run_baseline
    from napari_cellclip.fields import read_fields

    root = Path(a.data_root)
    plate = lambda b: str(root / "images" / b)  # noqa: E731
    platemap = str(root / "platemap")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="lincs-eval-"))
    cache = a.cache_dir or str(work / "feature-cache")
    extra = json.loads(a.fit) if a.fit else {}
    report = {"data": str(root), "train_plates": TRAIN, "test_plate": TEST, "device": a.device,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "encoders": a.encoders,
              "workers": a.workers, "runs": []}

    if not a.skip_baseline:
        t0 = time.perf_counter()
        fields = read_fields([plate(b) for b in TRAIN + [TEST]], platemap=platemap, cell_line="A549")
        base = run_baseline(fields)
        for k in ("without_correction", "with_center_scale"):
            for pp in base[k]["per_plate"].values():
                pp["well_predictions"] = {w: str(v) for w, v in pp["well_predictions"].items()}
        base["seconds"] = round(time.perf_counter() - t0, 2)
        report["baseline"] = base

    if a.speed_fields > 0:
        fields = read_fields([plate(b) for b in PLATES], platemap=platemap, cell_line="A549")
        report["encoder_speed"] = encoder_speed(fields, a.encoders, a.speed_fields, a.workers, a.normalizations[0],
                                                a.device)

    if not a.skip_baseline:
        report["separability"] = {}
        for enc in a.encoders:
            for norm in a.normalizations:
                sep = separability(plate, platemap, cache, a.device, norm, enc, a.workers)
                report["separability"][norm if enc == "morphology" else f"{enc}/{norm}"] = sep
                for b, row in sep["per_plate"].items():
                    print(f"separability ({enc}, {norm}) {b}: DMSO-DMSO {row['control_control']:.1f}  "
                          + "  ".join(f"{k}->nearest DMSO {v:.1f}" for k, v in row["to_nearest_control"].items()))
                for c, r in sep["nearest_centroid_on_these_features"].items():
                    print(f"nearest centroid on the {norm}-normalised {enc} features, {c}: wells "
                          f"{r['wells_correct']}/{r['wells']}  fields {r['fields_correct']}/{r['fields']}")

    holdouts = PLATES if a.holdouts == ["all"] else a.holdouts
    combos = [(e, h, nm, lo, b, c, s) for e in a.encoders for h in holdouts for nm in a.normalizations
              for lo in a.losses for b in a.batchings for c in a.corrections for s in a.seeds]
    for enc, held, norm, loss, batching, corr, seed in combos:
        run = _fit_and_evaluate(plate, platemap, work, cache, a, extra, enc=enc, held=held, norm=norm, loss=loss,
                                batching=batching, corr=corr, seed=seed)
        report["runs"].append(run)
        _print_run(run)

    if "baseline" in report:
        b = report["baseline"]
        for k in ("without_correction", "with_center_scale"):
            x = b[k]
            print(f"baseline {k:>20}: wells {x['wells_correct']}/{x['wells']}  "
                  f"fields {x['fields_correct']}/{x['fields']} ({100 * x['field_accuracy']:.0f} %)")
    report["summary"] = _summarise(report["runs"])
    for row in report["summary"]:
        print("mean over seeds/holdouts:", json.dumps(row))
    if not a.no_write:
        Path(a.output).write_text(json.dumps(report, indent=2, default=str))
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.output}")
    return 0


def _fit_and_evaluate(plate, platemap, work, cache, a, extra, *, enc, held, norm, loss, batching, corr,
                      seed) -> dict:
    """Train on the plates other than ``held``, evaluate on ``held``; the run's record."""
    from training.loop import evaluate, fit

    train = [b for b in PLATES if b != held]
    tag = enc.replace("+", "_").replace(":", "_").replace(",", "_").replace("=", "-")
    out = work / f"fit-{tag}-{held}-{norm}-{loss}-{batching}-{corr}-s{seed}"
    t0 = time.perf_counter()
    opts = {"workers": a.workers, **extra}
    summary = fit(data=[plate(b) for b in train], platemap=platemap, output=str(out), encoder=enc,
                  correction=corr, seed=seed, loss=loss, batching=batching, device=a.device,
                  normalization=norm, cache_dir=cache, no_progress=True, quiet=True, **opts)
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    rep = evaluate(out, [plate(held)], platemap=platemap, device=a.device, cache_dir=cache,
                   workers=opts["workers"], quiet=True, no_progress=True)
    t_eval = time.perf_counter() - t1
    if a.workdir is None:
        shutil.rmtree(out, ignore_errors=True)
    return {"encoder": enc, "test_plate": held, "train_plates": train, "loss": loss, "batching": batching,
            "correction": corr, "normalization": norm, "seed": seed, "fit_seconds": round(t_fit, 1),
            "fit_extract_seconds": summary["extract_seconds"],
            "train_seconds": summary["train_seconds"], "steps": summary["steps"],
            "evaluate_seconds": round(t_eval, 1), "wall_seconds": round(t_fit + t_eval, 1),
            "fit_options": {**extra}, "test": rep}


def encoder_speed(fields, encoders, n_fields, workers, normalization, device) -> dict:
    """Fields/s of each encoder extracting the same ``n_fields`` fields from nothing (no cache)."""
    import numpy as np

    from napari_cellclip.encoders import get_encoder
    from napari_cellclip.features import extract_features

    idx = np.unique(np.linspace(0, len(fields) - 1, min(n_fields, len(fields))).round().astype(int))
    sub = fields.iloc[idx].reset_index(drop=True)
    out = {"fields": len(sub), "workers": workers, "normalization": normalization,
           "load_average": os.getloadavg()[0], "fields_per_second": {}}
    for spec in encoders:
        enc = get_encoder(spec, device=device)
        t0 = time.perf_counter()
        extract_features(sub, enc, use_cache=False, num_workers=workers, normalization=normalization)
        rate = len(sub) / (time.perf_counter() - t0)
        out["fields_per_second"][spec] = round(rate, 3)
        print(f"encoder {spec}: {rate:.2f} fields/s ({len(sub)} fields, {workers} workers, no cache)", flush=True)
    base = out["fields_per_second"].get("morphology")
    if base:
        out["time_ratio_to_morphology"] = {k: round(base / v, 2) for k, v in out["fields_per_second"].items()}
    return out


def separability(plate, platemap, cache, device, normalization, encoder="morphology", workers=0) -> dict:
    """Well-mean distances in DMSO-centre-scaled feature space of ``encoder``, per plate."""
    import numpy as np

    from napari_cellclip.correction import center_scale, control_mask
    from training.baseline import leave_one_plate_out
    from napari_cellclip.fields import read_fields
    from training.loop import extract

    fields = read_fields([plate(b) for b in PLATES], platemap=platemap, cell_line="A549")
    t0 = time.perf_counter()
    feats, fields, enc = extract(fields, encoder, normalization=normalization, device=device,
                                 cache_dir=cache, workers=workers, quiet=True)
    t_extract = time.perf_counter() - t0
    x = center_scale(feats, fields).reshape(len(fields), -1)
    ctrl = control_mask(fields)
    out = {"features": f"{encoder} ({feats.shape[1]} x {feats.shape[2]}), {normalization} input normalisation, "
                       "per-plate DMSO centre-and-scale, well mean over fields",
           "distance": "Euclidean", "extract_seconds": round(t_extract, 1), "per_plate": {}}
    # the baseline's rule on the model's own frozen features: what the features alone give
    out["nearest_centroid_on_these_features"] = {}
    for c in ("none", "center_scale"):
        r = leave_one_plate_out(feats.reshape(len(fields), -1), fields, correction=c)
        out["nearest_centroid_on_these_features"][c] = {k: r[k] for k in (
            "wells_correct", "wells", "fields_correct", "fields")}
    for b in PLATES:
        on = (fields["Metadata_Plate"].astype(str) == b).to_numpy()
        wells = fields.loc[on, "Metadata_Well"].astype(str).to_numpy()
        means = {w: x[on][wells == w].mean(0) for w in dict.fromkeys(wells)}
        ctrl_wells = sorted(set(wells[ctrl[on]]))
        names = fields.loc[on].groupby("Metadata_Well")["Metadata_pert_iname"].first()
        cc = [float(np.linalg.norm(means[u] - means[v])) for i, u in enumerate(ctrl_wells)
              for v in ctrl_wells[i + 1:]]
        out["per_plate"][b] = {
            "control_control": round(float(np.mean(cc)), 2) if cc else None,
            "to_nearest_control": {f"{names[w]} ({w})": round(min(float(np.linalg.norm(means[w] - means[c]))
                                                                 for c in ctrl_wells), 2)
                                   for w in means if w not in ctrl_wells},
        }
    return out


def _summarise(runs):
    import numpy as np

    groups = {}
    for r in runs:
        groups.setdefault((r.get("encoder", "morphology"), r.get("normalization", "field"), r["loss"],
                           r["batching"], r["correction"]), []).append(r)
    rows = []
    for (enc, norm, loss, batching, corr), rs in groups.items():
        row = {"encoder": enc, "normalization": norm, "loss": loss, "batching": batching, "correction": corr,
               "runs": len(rs), "test_plates": sorted({r["test_plate"] for r in rs})}
        for lvl in ("field", "well"):
            for d in ("image_to_text", "text_to_image"):
                v = [r["test"][lvl][d]["R@1"] for r in rs]
                row[f"{lvl}_{d}_R@1_mean"] = round(float(np.mean(v)), 3)
                row[f"{lvl}_{d}_R@1_min"] = round(float(np.min(v)), 3)
        row["runs_with_well_image_to_text_R@1_1"] = int(sum(r["test"]["well"]["image_to_text"]["R@1"] == 1.0
                                                            for r in rs))
        # well-level zero-shot: correct wells out of all held-out wells (comparable to the baseline)
        row["wells_correct"] = int(sum(round(r["test"]["well"]["image_to_text"]["R@1"] * r["test"]["n_wells"])
                                       for r in rs))
        row["wells"] = int(sum(r["test"]["n_wells"] for r in rs))
        row["fields_correct"] = int(sum(round(r["test"]["field"]["image_to_text"]["R@1"] * r["test"]["n_fields"])
                                        for r in rs))
        row["fields"] = int(sum(r["test"]["n_fields"] for r in rs))
        rows.append(row)
    return rows


def _print_run(run):
    t = run["test"]
    cells = []
    for lvl in ("field", "well"):
        for d, short in (("image_to_text", "i→t"), ("text_to_image", "t→i")):
            r = t[lvl][d]
            cells.append(f"{lvl} {short} R@1 {r['R@1']:.2f} ({r['n_queries']})")
    print(f"CellCLIP encoder={run['encoder']} test={run['test_plate']} norm={run['normalization']} "
          f"loss={run['loss']:<6} batching={run['batching']:<13} correction={run['correction']:<12} "
          f"seed={run['seed']}: " + " | ".join(cells)
          + f" | wall {run['wall_seconds']:.0f}s (fit {run['fit_seconds']:.0f}s, "
          f"extract {run['fit_extract_seconds']:.0f}s, train {run['train_seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
