"""Command-line options shared by ``python -m training`` and ``python -m napari_cellclip.pipeline``.

The same thing has the same name in both: ``--data``, ``--platemap``, ``--barcode-platemap``,
``--annotations``, ``--channel-map``, ``--cell-line``, ``--checkpoint``, ``--device``,
``--workers``, ``--batch-size``, ``--cache-dir``, ``--quiet``.  Older spellings
(``--platemap-dir``, ``--num-workers``, ``--extract-batch-size``, ``--out``) still parse
but are not shown.  :class:`HelpFormatter` adds "(default: …)" only to options whose help
does not already say what the default is.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["HelpFormatter", "add_data_args", "add_checkpoint_arg", "add_run_args", "add_alias",
           "fields_from_args", "CELL_LINE_HELP", "check_number", "number", "output_dir", "check_output_dir"]

CELL_LINE_HELP = "cell line named in the prompts, e.g. A549 (default: the one the checkpoint was trained on)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help mentions a default already,
    or there is none to show (None, False, a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if text is argparse.SUPPRESS or "default" in text.lower() or not action.option_strings or nothing \
                or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


def check_number(value, kind=int, lo=None, hi=None, *, above: bool = False):
    """``value`` as ``kind`` (int or float) within [lo, hi] (``above``: strictly above ``lo``);
    ValueError saying what is wrong otherwise.  NaN and ±inf are never accepted."""
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        v = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{value!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{value!r} is not a finite number")
    if lo is not None and (v <= lo if above else v < lo):
        raise ValueError(f"{value!r} must be {'above' if above else 'at least'} {lo}")
    if hi is not None and v > hi:
        raise ValueError(f"{value!r} must be at most {hi}")
    return v


def number(kind=int, lo=None, hi=None, *, above: bool = False):
    """An argparse ``type=`` accepting :func:`check_number`'s range: a bad value is argparse's
    one-line ``error: argument --x: ...`` and exit status 2."""

    def parse(text: str):
        try:
            return check_number(text, kind, lo, hi, above=above)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def check_output_dir(path) -> Path:
    """``path`` as an output folder: CellClipError when it is an existing file (or under one)."""
    from .errors import CellClipError

    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "is" if q == p else f"lies under {q}, which is"
                raise CellClipError(f"output {path}: {where} a file, not a folder")
            break
    return p


def output_dir(text: str) -> str:
    """argparse ``type=`` of an output folder (see :func:`check_output_dir`)."""
    try:
        check_output_dir(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_alias(parser, flag: str, dest: str, **kw) -> None:
    """An old spelling of an option: parses into ``dest``, hidden from ``--help``."""
    parser.add_argument(flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)


def add_data_args(parser, *, cell_line_help: str = CELL_LINE_HELP, data_help: str | None = None,
                  data_required: bool = False):
    """``--data`` (repeatable) and the annotation options read by :func:`fields_from_args`."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="PATH", required=data_required,
                   help=data_help or "plate folder, LoadData CSV, fields-table .parquet, or .txt manifest "
                                     "(one of those per line); repeat for several plates")
    g.add_argument("--platemap", metavar="PATH",
                   help="platemap folder (barcode_platemap.csv, the platemaps it names, an annotation table), "
                        "or one platemap file for every plate: names each well's perturbation and prompt")
    add_alias(g, "--platemap-dir", "platemap")
    g.add_argument("--barcode-platemap", metavar="CSV",
                   help="plate barcode → platemap name table, if it is not in the --platemap folder")
    g.add_argument("--annotations", metavar="TABLE",
                   help="perturbation annotations by sample (name, MoA, SMILES), if not in the --platemap folder")
    g.add_argument("--channel-map", metavar="MAP",
                   help="stain of each channel, e.g. '1=DNA,2=ER,3=RNA,4=AGP,5=Mito' (or a file), for plates "
                        "whose files do not name their stains")
    g.add_argument("--cell-line", metavar="NAME", help=cell_line_help)
    return g


def add_checkpoint_arg(parser, *, required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=required, metavar="DIR",
                        help="CellCLIP checkpoint: the run folder `python -m training fit` wrote, its model/ "
                             "folder, or one of its checkpoints/checkpoint-N folders")


def add_run_args(parser, *, batch_help: str, batch_default: int, workers_help: str, workers_default,
                 batch_flag: str = "--batch-size", batch_aliases=(), cache_help: str | None = None):
    """``--device``, ``--workers``, ``--batch-size`` (fields per encoder forward; ``batch_flag``
    names it where ``--batch-size`` means something else), ``--cache-dir``, ``--quiet``."""
    from .devices import DEVICE_HELP

    g = parser.add_argument_group("running")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    workers, batch = number(int, 0, 1024), number(int, 1, 1 << 20)
    g.add_argument("--workers", type=workers, default=workers_default, metavar="N", help=workers_help)
    add_alias(g, "--num-workers", "workers", type=workers)
    dest = batch_flag.lstrip("-").replace("-", "_")
    g.add_argument(batch_flag, type=batch, default=batch_default, metavar="N", help=batch_help)
    for flag in batch_aliases:
        add_alias(g, flag, dest, type=batch)
    g.add_argument("--cache-dir", metavar="DIR",
                   help=cache_help or "feature cache folder, shared with the plugin and training "
                                      "(default: $NAPARI_CELLCLIP_CACHE or ~/.cache/napari-cellclip/features)")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return g


def fields_from_args(args, data=None):
    """:func:`napari_cellclip.fields.read_fields` of the data options of a parsed command line."""
    from .fields import read_fields

    return read_fields(args.data if data is None else data, platemap=args.platemap,
                       barcode_platemap=args.barcode_platemap, annotations=args.annotations,
                       channel_map=args.channel_map, cell_line=args.cell_line)
