"""``python -m training fit|extract|evaluate`` — train and evaluate CellCLIP.

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

from .loop import DEFAULT_OUTPUT, FIT_DEFAULTS

D = FIT_DEFAULTS


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="PATH",
                   help="plate folder or LoadData CSV manifest; repeat for several plates "
                        "(default: the bundled LINCS sample)")
    g.add_argument("--platemap", metavar="DIR", help="platemap folder (barcode_platemap.csv + platemap .txt)")
    g.add_argument("--barcode-platemap", metavar="CSV", help="barcode → platemap table")
    g.add_argument("--annotations", metavar="TSV", help="perturbation annotations (e.g. Drug Repurposing Hub)")
    g.add_argument("--channel-map", metavar="MAP", help="channel → stain map, e.g. '1=DNA,2=ER,3=RNA,4=AGP,5=Mito'")
    g.add_argument("--cell-line", default=D["cell_line"])
    g.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: user cache; "
                                                       "env NAPARI_CELLCLIP_CACHE)")
    g.add_argument("--extract-batch-size", type=int, default=D["extract_batch_size"])
    g.add_argument("--num-workers", type=int, default=D["num_workers"])
    g.add_argument("--device", default=D["device"], help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate CellCLIP.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_args(f)
    f.add_argument("--val-plate", action="append", metavar="PLATE", help="hold out this plate for validation (repeat)")
    f.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help="output folder")
    m = f.add_argument_group("model")
    m.add_argument("--encoder", default=D["encoder"],
                   help="frozen channel encoder: morphology | cells[:cell=AGP,...] | hf:<id or dir> | a+b "
                        "(e.g. morphology+cells)")
    m.add_argument("--normalization", default=D["normalization"], choices=["plate", "field"],
                   help="rescale channels by their plate's intensity percentiles (keeps intensity "
                        "differences between wells) or by each field's own; recorded in the checkpoint")
    m.add_argument("--text-encoder", default=D["text_encoder"], help="text encoder id/dir (default: bundled MiniLM)")
    m.add_argument("--text-tuning", default=D["text_tuning"], help="frozen | last:k | full")
    m.add_argument("--loss", default=D["loss"], choices=["cwcl", "clip", "siglip"])
    m.add_argument("--embed-dim", type=int, default=D["embed_dim"])
    m.add_argument("--vision-layers", type=int, default=D["vision_layers"])
    m.add_argument("--vision-heads", type=int, default=D["vision_heads"])
    m.add_argument("--pooling", default=D["pooling"], choices=["attention", "mean"])
    m.add_argument("--context-length", type=int, default=D["context_length"])
    m.add_argument("--correction", default=D["correction"], choices=["none", "center_scale", "tvn"],
                   help="plate-effect correction of the frozen features on each plate's negative controls")
    o = f.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=D["epochs"])
    o.add_argument("--batch-size", type=int, default=D["batch_size"],
                   help="wells per batch and process (capped at the number of wells; with --batching "
                        "distinct, at the number of distinct prompts)")
    o.add_argument("--batching", default=D["batching"], choices=["multipositive", "distinct"],
                   help="multipositive: shuffled batches, prompts may repeat, same-prompt wells are "
                        "positives of each other in the loss (both directions); distinct: batches of "
                        "pairwise distinct prompts")
    o.add_argument("--lr", type=float, default=D["lr"])
    o.add_argument("--text-lr", type=float, default=None, help="learning rate of the text encoder (default --lr)")
    o.add_argument("--weight-decay", type=float, default=D["weight_decay"])
    o.add_argument("--warmup", type=float, default=D["warmup"], help="warm-up steps (<1: fraction of all steps)")
    o.add_argument("--min-lr-ratio", type=float, default=D["min_lr_ratio"])
    o.add_argument("--grad-clip", type=float, default=D["grad_clip"], help="max gradient norm (0 = off)")
    o.add_argument("--precision", default=D["precision"], choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, fp32 elsewhere (default)")
    o.add_argument("--seed", type=int, default=D["seed"])
    o.add_argument("--bag-min-fields", type=int, default=D["bag_min_fields"],
                   help="augmentation: each step a well's bag is a random subset of at least this many of "
                        "its fields (0 = off: always all fields)")
    o.add_argument("--bag-max-fields", type=int, default=None,
                   help="augmentation: bags of a random subset of at most this many fields")
    c = f.add_argument_group("checkpoints")
    c.add_argument("--save-every", type=int, default=D["save_every"], help="checkpoint every N steps (0 = at the end)")
    c.add_argument("--keep", type=int, default=D["keep"], help="checkpoints kept")
    c.add_argument("--log-every", type=int, default=D["log_every"])
    c.add_argument("--eval-every", type=int, default=D["eval_every"], help="validate every N epochs (0 = at the end)")
    c.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    c.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and stop after this many steps (simulates an interruption)")

    e = sub.add_parser("extract", help="precompute and cache frozen features")
    _data_args(e)
    e.add_argument("--encoder", default=D["encoder"])
    e.add_argument("--normalization", default=D["normalization"], choices=["plate", "field"])
    e.add_argument("--output", "-o", metavar="NPZ", help="also write features + row index to this .npz")

    v = sub.add_parser("evaluate", help="cross-modal retrieval report of a checkpoint")
    _data_args(v)
    v.add_argument("--checkpoint", required=True, help="checkpoint folder (or a fit --output folder)")
    v.add_argument("--correction", default="checkpoint", choices=["checkpoint", "none", "center_scale", "tvn"],
                   help="feature correction (default: the one recorded in the checkpoint)")
    v.add_argument("--report", "-o", dest="report", metavar="JSON", help="write the JSON report here")
    return p


def _fit(a) -> int:
    from .loop import fit

    kw = {k: getattr(a, k) for k in FIT_DEFAULTS if hasattr(a, k)}
    summary = fit(**kw)
    if not a.quiet and os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _extract(a) -> int:
    import numpy as np

    from .loop import extract, load_fields

    fields = load_fields(a.data, platemap=a.platemap, barcode_platemap=a.barcode_platemap,
                         annotations=a.annotations, channel_map=a.channel_map, cell_line=a.cell_line)
    feats, kept, enc = extract(fields, a.encoder, normalization=a.normalization, device=a.device,
                               cache_dir=a.cache_dir,
                               batch_size=a.extract_batch_size, num_workers=a.num_workers,
                               progress=not a.no_progress, quiet=a.quiet)
    if a.output:
        np.savez(a.output, features=feats, plate=kept["Metadata_Plate"].to_numpy().astype(str),
                 well=kept["Metadata_Well"].to_numpy().astype(str),
                 site=kept["Metadata_Site"].astype(int).to_numpy())
    if not a.quiet:
        print(json.dumps({"fields": len(kept), "features": list(feats.shape), "encoder": enc.spec,
                          "output": a.output}))
    return 0


def _evaluate(a) -> int:
    from .loop import evaluate

    rep = evaluate(a.checkpoint, a.data, platemap=a.platemap, barcode_platemap=a.barcode_platemap,
                   annotations=a.annotations, channel_map=a.channel_map, cell_line=a.cell_line,
                   correction=a.correction, device=a.device, cache_dir=a.cache_dir,
                   extract_batch_size=a.extract_batch_size, num_workers=a.num_workers,
                   output=a.report, quiet=a.quiet, no_progress=a.no_progress)
    if not a.report and not a.quiet:
        print(json.dumps(rep, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    from napari_cellclip.errors import CellClipError

    args = build_parser().parse_args(argv)
    try:
        return {"fit": _fit, "extract": _extract, "evaluate": _evaluate}[args.command](args)
    except CellClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
