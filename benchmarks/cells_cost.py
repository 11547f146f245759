"""Where a field's time goes in the ``cells`` encoder, and what the groups left out would cost.

Times, on --fields LINCS fields (540 x 540, one process), the segmentation and each
cp-measure group the encoder uses (per field: 5 stains x 3 compartments for intensity
and texture, 5 stains x cells for granularity, 7 stain pairs for correlation, 2
compartments for shape), and, for comparison, the cp-measure groups it leaves out at
the same call counts (radial distribution, Zernike shape, Costes colocalisation,
intensity edges, texture through mahotas instead of the numba kernel).  Prints each as
a share of the encoder's own time per field, so the ratios hold on a loaded machine, and the
CPU seconds per field of the whole cells encoder and of ``morphology`` (process CPU time,
one thread: the cost on one core, which a loaded machine does not inflate much).

    python benchmarks/cells_cost.py [--fields 6] [--data-root ../shared/data/lincs-a549]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
DATA_ROOT = HERE.parent.parent / "shared" / "data" / "lincs-a549"


def _timed(fn, n_calls: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n_calls):
        fn()
    return time.perf_counter() - t0


def _groups(seg, unit):
    """The encoder's measurement groups and the left-out ones, as calls over one field."""
    from cp_measure.core import measurecolocalization as mc
    from cp_measure.core import measureobjectintensity as mi
    from cp_measure.core import measureobjectintensitydistribution as md
    from cp_measure.core import measureobjectsizeshape as ms
    from cp_measure.core import measuretexture as mt

    from napari_cellclip import cellfeatures as F

    comps = [seg.nuclei, seg.cells, seg.cytoplasm]
    runs = {
        "intensity": lambda: [F._intensity(m, unit[c]) for c in range(5) for m in comps],
        "texture (numba)": lambda: [F._texture(m, unit[c]) for c in range(5) for m in comps],
        "granularity": lambda: [F._granularity(seg.cells, unit[c]) for c in range(5)],
        "correlation": lambda: [F._pearson(unit[c], unit[o], seg.cells) for c, o in
                                [(1, 0), (2, 0), (3, 0), (4, 0), (1, 2), (3, 2), (4, 2)]],
        "shape": lambda: [F._shape(seg.nuclei), F._shape(seg.cells)],
    }
    skipped = {
        "radial distribution": lambda: [md.get_radial_distribution(seg.cells, unit[c]) for c in range(5)],
        "zernike shape": lambda: [ms.get_zernike(m, None) for m in comps],
        "costes colocalisation": lambda: [mc.get_correlation_costes(unit[c], unit[0], seg.cells, scale_max=255)
                                          for c in range(1, 5)],
        "intensity edges": lambda: [mi.get_intensity(m, unit[c], edge_measurements=True)
                                    for c in range(5) for m in comps],
        "texture (mahotas)": lambda: [mt.get_texture(seg.cells, unit[c], 3, 256) for c in range(5)],
    }
    return runs, skipped


def _cpu_seconds(fields, stains) -> dict:
    """CPU seconds per field (this process, all its threads) of the cells encoder's worker-side
    prep and of morphology (normalise + encode): the cost on one core, whatever the machine's load."""
    import torch

    from napari_cellclip.encoders import get_encoder
    from napari_cellclip.images import load_field, normalize

    raws = [load_field(fields.iloc[i], stains) for i in range(len(fields))]
    prep = get_encoder("cells").field_prep(stains)
    morph = get_encoder("morphology", device="cpu")
    torch.set_num_threads(1)
    out = {}
    for name, fn in (("cells", lambda r: prep(r)),
                     ("morphology", lambda r: morph.encode(torch.from_numpy(normalize(r))[None]))):
        fn(raws[0])  # warm-up (imports, numba cache)
        t0 = time.process_time()
        for r in raws:
            fn(r)
        out[name] = round((time.process_time() - t0) / len(raws), 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(DATA_ROOT))
    p.add_argument("--fields", type=int, default=6)
    p.add_argument("--output", default=str(HERE / "cells_cost.json"))
    a = p.parse_args(argv)

    import warnings

    import numpy as np

    from napari_cellclip import cellfeatures as F
    from napari_cellclip.images import load_field, normalize
    from napari_cellclip.plates import read_plate
    from napari_cellclip.segmentation import segment_field

    fields = read_plate(Path(a.data_root) / "images" / "SQ00015198")
    stains = ["DNA", "ER", "RNA", "AGP", "Mito"]
    pick = np.unique(np.linspace(0, len(fields) - 1, a.fields).round().astype(int))
    warnings.simplefilter("ignore", RuntimeWarning)  # undefined Costes / radial values of the left-out groups
    used: dict[str, float] = {}
    left_out: dict[str, float] = {}
    cells = 0
    F._texture(np.ones((8, 8), np.int32), np.full((8, 8), 0.5))  # numba compile / cache load outside the timing
    for i in pick:
        raw = load_field(fields.iloc[int(i)], stains)
        t0 = time.perf_counter()
        seg = segment_field(raw, stains)
        used["segmentation"] = used.get("segmentation", 0) + time.perf_counter() - t0
        unit = normalize(raw).astype(np.float64)
        cells += seg.n
        runs, skipped = _groups(seg, unit)
        for k, fn in runs.items():
            used[k] = used.get(k, 0) + _timed(fn)
        for k, fn in skipped.items():
            left_out[k] = left_out.get(k, 0) + _timed(fn)
    n = len(pick)
    total = sum(used.values())
    cpu = _cpu_seconds(fields.iloc[pick], stains)
    out = {"fields": int(n), "cells_per_field": round(cells / n, 1), "seconds_per_field": round(total / n, 3),
           "load_average": os.getloadavg()[0], "cpu_seconds_per_field": cpu,
           "fields_per_second_on_2_cores_from_cpu_time": {k: round(2 / v, 2) for k, v in cpu.items()},
           "share_of_encoder_time": {k: round(v / total, 3) for k, v in used.items()},
           "left_out_relative_to_encoder_time": {k: round(v / total, 3) for k, v in left_out.items()},
           "note": "texture (mahotas) is for the cells compartment only (5 calls); the encoder's numba "
                   "texture covers 3 compartments (15 calls)"}
    print(json.dumps(out, indent=1))
    Path(a.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
