"""A control-heavy training layout made from the LINCS plates, as on a JUMP plate (DMSO in many wells).

Each LINCS plate has 2 DMSO wells and 1 well of each compound.  This script splits every DMSO well
of the *training* plates into ``K`` wells of their own, by site (site s goes to well ``<well>-<(s-1) mod K>``),
so that with K = 9 the two training plates hold 36 one-field DMSO wells against 2 lonafarnib and 2
orantinib wells (18:1, about JUMP's share of DMSO wells to a compound's).  The held-out plate is read as
it is.  Everything else is ``benchmarks/lincs_eval.py`` (its options follow K):

    python benchmarks/lincs_control_heavy.py 9 --encoders morphology --holdouts all --seeds 0 1 2 \\
        --corrections tvn --skip-baseline --speed-fields 0 --output benchmarks/lincs_control_heavy.json

It replaces ``training.prepare._read`` for the run (an experiment on the training layout, not an option
of ``fit``).  Run at c20dc7e, the commit before the losses' log(count) term, it measures what a model
that learns the batch's prompt frequencies does with such a layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def split_control_wells(fields, k: int):
    """The fields with each DMSO well's sites spread over ``k`` wells ``<well>-0 … <well>-(k-1)``."""
    f = fields.copy()
    dmso = f["Metadata_prompt"].astype(str).str.contains("DMSO", case=False)
    site = f.loc[dmso, "Metadata_Site"].astype(int)
    f.loc[dmso, "Metadata_Well"] = f.loc[dmso, "Metadata_Well"].astype(str) + "-" + ((site - 1) % k).astype(str)
    return f


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print(__doc__)
        print("usage: lincs_control_heavy.py K [lincs_eval.py options]  (K >= 1 wells per DMSO well)", file=sys.stderr)
        return 2
    k = int(argv.pop(0))
    import lincs_eval
    import training.prepare as prep

    read = prep._read
    prep._read = lambda cfg: split_control_wells(read(cfg), k)
    try:
        return lincs_eval.main(argv)
    finally:
        prep._read = read


if __name__ == "__main__":
    sys.exit(main())
