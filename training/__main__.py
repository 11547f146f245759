"""``python -m training fit|extract|evaluate|profiles`` — train and evaluate CellCLIP, write profiles.

``python -m training fit`` with no further arguments trains on the bundled real
LINCS sample with the offline defaults (weight-free morphology encoder, the
bundled MiniLM text encoder frozen, CWCL with multi-positive batches (wells
sharing a prompt are positives of each other), per-plate DMSO centre-scale + TVN
whitening of the frozen features, random field subsets per well bag) and writes
``./checkpoints/cellclip-lincs-sample``.  Mistakes a user can make print one
line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from napari_cellclip.cli import (CELL_LINE_HELP, HelpFormatter, add_checkpoint_arg, add_data_args, add_run_args,
                                 output_dir)

from .config import LOSSES
from .config import option_type as _t
from .loop import DEFAULT_OUTPUT, FIT_DEFAULTS

D = FIT_DEFAULTS


FIT_CELL_LINE_HELP = "cell line named in the prompts of plates annotated with --platemap (default: A549)"
EXTRACT_BATCH_HELP = "fields per encoder forward while extracting features"
WORKERS_HELP = ("worker processes decoding images for feature extraction (0: decode in this process; default: "
                "on a GPU half the CPU cores shared among the node's torchrun processes, at most 8; on a CPU 0)")
ENCODER_SPECS = "morphology | cells[:cell=AGP,...] | hf:<id or dir> | a+b (e.g. morphology+cells)"
ENCODER_HELP = f"frozen channel encoder: {ENCODER_SPECS}"


def _common(p: argparse.ArgumentParser, *, fit: bool, cell_line_help: str = CELL_LINE_HELP) -> None:
    add_data_args(p, cell_line_help=FIT_CELL_LINE_HELP if fit else cell_line_help,
                  data_help="plate folder, LoadData CSV, fields-table .parquet, or .txt manifest (one of those "
                            "per line); repeat for several plates (default: the bundled LINCS sample)")
    if fit:
        g = add_run_args(p, batch_help=EXTRACT_BATCH_HELP, batch_default=D["extract_batch_size"],
                         batch_flag="--extract-batch-size", workers_help=WORKERS_HELP,
                         workers_default=D["workers"])
    else:
        g = add_run_args(p, batch_help=EXTRACT_BATCH_HELP, batch_default=D["extract_batch_size"],
                         batch_aliases=("--extract-batch-size",), workers_help=WORKERS_HELP,
                         workers_default=D["workers"])
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fit_parser(sub) -> None:
    f = sub.add_parser("fit", help="train a model", description="Train CellCLIP on annotated plates.",
                       formatter_class=HelpFormatter)
    _common(f, fit=True)
    f.add_argument("--val-plate", action="append", metavar="PLATE",
                   help="hold out this plate for validation (repeat for several)")
    f.add_argument("--output", "-o", default=DEFAULT_OUTPUT, metavar="DIR", type=output_dir,
                   help="run folder: checkpoints/, the final model/, metrics.jsonl")
    m = f.add_argument_group("model")
    m.add_argument("--encoder", default=D["encoder"], help=ENCODER_HELP)
    m.add_argument("--normalization", default=D["normalization"], choices=["plate", "field"],
                   help="rescale channels by their plate's intensity percentiles (keeps intensity "
                        "differences between wells) or by each field's own; recorded in the checkpoint")
    m.add_argument("--text-encoder", default=D["text_encoder"],
                   help="text encoder: a transformers folder, or the bundled all-MiniLM-L6-v2")
    m.add_argument("--text-tuning", default=D["text_tuning"],
                   help="which text-encoder weights train: frozen | last:k (the last k layers) | full")
    m.add_argument("--loss", default=D["loss"], choices=list(LOSSES),
                   help="contrastive loss; cloob: Hopfield retrieval + InfoLOOB (Fürst et al. 2022), beta 14.3 "
                        "as in CellCLIP")
    m.add_argument("--embed-dim", type=_t("embed_dim"), default=D["embed_dim"],
                   help="width of the shared image-text space")
    m.add_argument("--vision-layers", type=_t("vision_layers"), default=D["vision_layers"],
                   help="transformer layers of the CrossChannelFormer")
    m.add_argument("--vision-heads", type=_t("vision_heads"), default=D["vision_heads"],
                   help="attention heads of the CrossChannelFormer (lowered until it divides the feature width)")
    m.add_argument("--pooling", default=D["pooling"], choices=["attention", "mean"],
                   help="how a well's fields are pooled: gated attention (multi-instance) or their mean")
    m.add_argument("--context-length", type=_t("context_length"), default=D["context_length"],
                   help="longest prompt in tokens (longer ones are cut)")
    m.add_argument("--correction", default=D["correction"], choices=["none", "center_scale", "tvn"],
                   help="plate-effect correction of the frozen features on each plate's negative controls")
    _optimisation_args(f)
    c = f.add_argument_group("checkpoints")
    c.add_argument("--save-every", type=_t("save_every"), default=D["save_every"],
                   help="checkpoint every N steps (0: at the end)")
    c.add_argument("--keep", type=_t("keep"), default=D["keep"], help="checkpoints kept")
    c.add_argument("--log-every", type=_t("log_every"), default=D["log_every"],
                   help="write a metrics line every N steps")
    c.add_argument("--eval-every", type=_t("eval_every"), default=D["eval_every"],
                   help="validate every N epochs (0: at the end only)")
    c.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    c.add_argument("--stop-after-steps", type=_t("stop_after_steps"), default=None, metavar="N",
                   help="checkpoint and stop after N steps (resume later with --resume)")


def _optimisation_args(f) -> None:
    o = f.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_t("epochs"), default=D["epochs"], help="passes over the training wells")
    o.add_argument("--batch-size", type=_t("batch_size"), default=D["batch_size"],
                   help="wells per training step and process (capped at the number of wells; with --batching "
                        "distinct, at the number of distinct prompts)")
    o.add_argument("--batching", default=D["batching"], choices=["multipositive", "distinct"],
                   help="multipositive: shuffled batches, prompts may repeat, same-prompt wells are "
                        "positives of each other in the loss (both directions); distinct: batches of "
                        "pairwise distinct prompts")
    o.add_argument("--lr", type=_t("lr"), default=D["lr"], help="peak learning rate (AdamW)")
    o.add_argument("--text-lr", type=_t("text_lr"), default=None,
                   help="learning rate of the text encoder (default: --lr)")
    o.add_argument("--weight-decay", type=_t("weight_decay"), default=D["weight_decay"],
                   help="AdamW weight decay (not on norms, biases and the logit scale)")
    o.add_argument("--warmup", type=_t("warmup"), default=D["warmup"],
                   help="warm-up steps (below 1: a fraction of all steps)")
    o.add_argument("--min-lr-ratio", type=_t("min_lr_ratio"), default=D["min_lr_ratio"],
                   help="learning rate at the end of the cosine decay, as a fraction of --lr")
    o.add_argument("--grad-clip", type=_t("grad_clip"), default=D["grad_clip"], help="max gradient norm (0: off)")
    o.add_argument("--precision", default=D["precision"], choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto: bf16 on CUDA, fp32 elsewhere (default)")
    o.add_argument("--dist-timeout", type=_t("dist_timeout"), default=D["dist_timeout"], metavar="MINUTES",
                   help="under torchrun: how long a rank may wait for the others (feature extraction, "
                        "validation, checkpoints) before the run is aborted")
    o.add_argument("--seed", type=_t("seed"), default=D["seed"],
                   help="seed of the model, the batches and the augmentation")
    o.add_argument("--bag-min-fields", type=_t("bag_min_fields"), default=D["bag_min_fields"],
                   help="augmentation: each step a well's bag is a random subset of at least this many of "
                        "its fields (0: off, always all fields)")
    o.add_argument("--bag-max-fields", type=_t("bag_max_fields"), default=None,
                   help="augmentation: bags of a random subset of at most this many fields (default: all)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate CellCLIP.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _fit_parser(sub)
    e = sub.add_parser("extract", help="precompute and cache frozen features",
                       description="Extract and cache the frozen per-channel features of plates.",
                       formatter_class=HelpFormatter)
    _common(e, fit=False, cell_line_help="cell line named in the prompts of plates annotated with --platemap")
    e.add_argument("--encoder", default=D["encoder"], help=ENCODER_HELP)
    e.add_argument("--normalization", default=D["normalization"], choices=["plate", "field"],
                   help="rescale channels by their plate's intensity percentiles or by each field's own")
    e.add_argument("--output", "-o", metavar="NPZ", help="also write the features and their fields to this .npz")
    v = sub.add_parser("evaluate", help="retrieval and profiling (copairs mAP) report of a checkpoint "
                                        "or of profile tables",
                       description="Field- and well-level retrieval of a checkpoint on annotated plates, and "
                                   "profiling mAP (copairs) of its embeddings, its input features or profile "
                                   "tables.", formatter_class=HelpFormatter)
    add_checkpoint_arg(v, required=False)
    _common(v, fit=False)
    v.add_argument("--correction", default="checkpoint", choices=["checkpoint", "none", "center_scale", "tvn"],
                   help="feature correction (default: the one recorded in the checkpoint)")
    v.add_argument("--report", "-o", dest="report", metavar="JSON", help="write the JSON report here")
    _profiling_args(v)

    pr = sub.add_parser("profiles", help="write per-field and per-well profiles (parquet, pycytominer convention)",
                        description="Per-field and per-well profiles of plates (parquet, pycytominer's "
                                    "Metadata_* convention).", formatter_class=HelpFormatter)
    _common(pr, fit=False)
    pr.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for fields.parquet + wells.parquet")
    pr.add_argument("--checkpoint", help="checkpoint whose image embeddings (or corrected input features) to write")
    pr.add_argument("--representation", choices=["embeddings", "features", "intensity"],
                    help="embeddings (needs --checkpoint; the default with one), features (frozen channel "
                         "features; the default without), intensity (the naive baseline's descriptors)")
    pr.add_argument("--encoder", default=D["encoder"],
                    help=f"frozen encoder for features without a checkpoint: {ENCODER_SPECS}")
    pr.add_argument("--normalization", default=D["normalization"], choices=["plate", "field"])
    pr.add_argument("--correction", choices=["checkpoint", "none", "center_scale", "tvn"],
                    help="per-plate correction (default: the checkpoint's; without one, center_scale)")
    pr.add_argument("--aggregate", default="median", choices=["median", "mean"],
                    help="well profile = this of the field profiles (embeddings: the model's own pooling)")
    return p


def _profiling_args(v: argparse.ArgumentParser) -> None:
    g = v.add_argument_group("profiling metrics (copairs mAP; see README)")
    g.add_argument("--metrics", metavar="LIST",
                   help="comma list of retrieval, replicate, activity, consistency, sister, or all "
                        "(default: all; without a checkpoint, all but retrieval)")
    g.add_argument("--representations", default="embeddings,features", metavar="LIST",
                   help="profiles of the checkpoint to judge: embeddings (its image embeddings), features "
                        "(its frozen input features, corrected as it does), intensity (naive baseline)")
    g.add_argument("--profiles", action="append", metavar="FILE",
                   help="a profile table to judge too (parquet/CSV/TSV, Metadata_* + feature columns, e.g. "
                        "CellProfiler well profiles); repeat for several")
    g.add_argument("--profile-features", metavar="LIST|@FILE",
                   help="feature columns of --profiles (default: every numeric non-Metadata column)")
    g.add_argument("--level", default="well", choices=["well", "field"], help="profiles compared")
    g.add_argument("--aggregate", default="median", choices=["median", "mean"],
                   help="well profile of features and tables = this of the fields "
                        "(embeddings: the model's multi-instance pooling)")
    g.add_argument("--perturbation", action="append", metavar="COLUMN",
                   help="column(s) naming a perturbation (default: broad_sample/JCP2022/pert_iname..., + dose)")
    g.add_argument("--control", metavar="COLUMN=VALUE",
                   help="negative controls (default: Metadata_control_type=negcon, is_control, DMSO)")
    g.add_argument("--annotation", action="append", metavar="COLUMN",
                   help="consistency annotation (default: Metadata_moa, Metadata_target where present)")
    g.add_argument("--sister", action="append", metavar="[MODALITY=]TSV",
                   help="compound–gene table (cpjump1_compound/crispr/orf_metadata.tsv shape); repeat")
    g.add_argument("--query-plate", action="append", metavar="PLATE",
                   help="replicate/activity queries from these plates only (e.g. a held-out plate)")
    g.add_argument("--null-size", type=int, default=10000, help="copairs null-distribution size")
    g.add_argument("--fdr", type=float, default=0.05, help="significance threshold on FDR-corrected p-values")
    g.add_argument("--seed", type=int, default=0, help="seed of copairs' null distributions")


def _fit(a) -> int:
    from .loop import fit

    kw = {k: getattr(a, k) for k in FIT_DEFAULTS if hasattr(a, k)}
    summary = fit(**kw)
    if not a.quiet and os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _extract(a) -> int:
    import numpy as np

    from .data import read_training_fields
    from .loop import extract

    fields = read_training_fields(a.data, platemap=a.platemap, barcode_platemap=a.barcode_platemap,
                         annotations=a.annotations, channel_map=a.channel_map, cell_line=a.cell_line)
    feats, kept, enc = extract(fields, a.encoder, normalization=a.normalization, device=a.device,
                               cache_dir=a.cache_dir, batch_size=a.batch_size, workers=a.workers,
                               progress=not a.no_progress, quiet=a.quiet)
    if a.output:
        from napari_cellclip._fsutil import atomic_file

        with atomic_file(a.output) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, features=feats, plate=kept["Metadata_Plate"].to_numpy().astype(str),
                     well=kept["Metadata_Well"].to_numpy().astype(str),
                     site=kept["Metadata_Site"].astype(int).to_numpy())
    if not a.quiet:
        print(json.dumps({"fields": len(kept), "features": list(feats.shape), "encoder": enc.spec,
                          "output": a.output}))
    return 0


def _profiling_kwargs(a) -> dict:
    from .profiling import ProfilingOptions

    feats = a.profile_features
    if feats and feats.startswith("@"):
        try:
            feats = [x.strip() for x in open(feats[1:]).read().splitlines() if x.strip()]
        except OSError as exc:
            from napari_cellclip.errors import CellClipError

            raise CellClipError(f"{feats[1:]}: cannot read the feature list ({exc.strerror})") from None
    elif feats:
        feats = [x.strip() for x in feats.split(",") if x.strip()]
    opts = ProfilingOptions(perturbation=a.perturbation, control=a.control, annotations=a.annotation,
                            sister=tuple(a.sister or ()), query_plates=a.query_plate, null_size=a.null_size,
                            threshold=a.fdr, seed=a.seed)
    return dict(options=opts, tables=a.profiles or (), table_features=feats or None, level=a.level,
                aggregate=a.aggregate, required=a.metrics is not None)


def _evaluate(a) -> int:
    from .loop import evaluate
    from .profile_sources import table_report
    from .profiling import format_profiling, parse_metrics

    metrics = parse_metrics(a.metrics or ("all" if a.checkpoint else "replicate,activity,consistency,sister"))
    prof = _profiling_kwargs(a)
    if a.checkpoint:
        prof["representations"] = [r.strip() for r in a.representations.split(",") if r.strip()]
        rep = evaluate(a.checkpoint, a.data, platemap=a.platemap, barcode_platemap=a.barcode_platemap,
                       annotations=a.annotations, channel_map=a.channel_map, cell_line=a.cell_line,
                       correction=a.correction, device=a.device, cache_dir=a.cache_dir,
                       extract_batch_size=a.batch_size, workers=a.workers,
                       output=a.report, quiet=a.quiet, no_progress=a.no_progress, metrics=metrics,
                       profiling=prof)
    else:
        from .evaluate import write_report

        rep = {"profiling": table_report(prof.pop("tables"), metrics, **prof)}
        if a.report:
            write_report(rep, a.report)
        if not a.quiet:
            print(format_profiling(rep["profiling"]), file=sys.stderr)
    if not a.report and not a.quiet:
        print(json.dumps(rep, indent=2, default=str))
    return 0


def _profiles(a) -> int:
    from .profile_sources import export_profiles

    load = dict(platemap=a.platemap, barcode_platemap=a.barcode_platemap, annotations=a.annotations,
                channel_map=a.channel_map, cell_line=a.cell_line)
    run = dict(device=a.device, cache_dir=a.cache_dir, extract_batch_size=a.batch_size,
               workers=a.workers, quiet=a.quiet, no_progress=a.no_progress)
    out = export_profiles(a.output, a.data, checkpoint=a.checkpoint, representation=a.representation,
                          encoder=a.encoder, normalization=a.normalization, correction=a.correction,
                          aggregate=a.aggregate, load=load, run=run)
    if not a.quiet:
        print(json.dumps(out, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    from napari_cellclip.errors import CellClipError

    args = build_parser().parse_args(argv)
    try:
        return {"fit": _fit, "extract": _extract, "evaluate": _evaluate,
                "profiles": _profiles}[args.command](args)
    except CellClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
