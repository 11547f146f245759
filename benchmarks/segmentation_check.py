"""Our nuclei against CellProfiler's on every LINCS field (108 fields, 3 plates).

For each field, the nucleus centres CellProfiler found in it
(``nuclei/<plate>/<well>-<site>-Nuclei.csv``, in the cropped 540 x 540 frame) are
compared with :func:`napari_cellclip.segmentation.segment_field`'s nuclei:

- inside: the share of CellProfiler's centres that fall in one of our nuclei;
- one to one: the share that fall in a nucleus of ours holding no other centre
  (a nucleus CellProfiler split in two, or two we merged, count against it);
- count ratio: our nuclei / CellProfiler's.

Our nuclei on the crop's edge are kept here (``discard_border=False``): CellProfiler
segmented the uncropped 1080 x 1080 field, where those nuclei were interior; the
encoder itself drops them, as CellProfiler drops nuclei on a field's edge.  Also
reports the segmentation time per field (nuclei + cells + cytoplasm, one process).

    python benchmarks/segmentation_check.py [--data-root ../shared/data/lincs-a549]
        [--params '{"min_distance": 5}'] [--output benchmarks/segmentation_check.json]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(DATA_ROOT))
    p.add_argument("--params", default="", help="SegmentationParams overrides as JSON")
    p.add_argument("--output", default=str(HERE / "segmentation_check.json"))
    a = p.parse_args(argv)

    import numpy as np
    import pandas as pd

    from napari_cellclip.images import load_field
    from napari_cellclip.plates import read_plate
    from napari_cellclip.segmentation import SegmentationParams, centre_agreement, segment_field

    root = Path(a.data_root)
    overrides = json.loads(a.params) if a.params else {}
    params = SegmentationParams(**{"discard_border": False, **overrides})
    rows, seconds = [], []
    for plate_dir in sorted((root / "images").iterdir()):
        fields = read_plate(plate_dir)
        stains = [c[len("FileName_Orig"):] for c in fields.columns if c.startswith("FileName_Orig")]
        for _, row in fields.iterrows():
            plate, well, site = row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"]
            csv = root / "nuclei" / str(plate) / f"{well}-{site}-Nuclei.csv"
            if not csv.is_file():
                continue
            centres = pd.read_csv(csv)[["Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"]].to_numpy()
            raw = load_field(row, stains)
            t0 = time.perf_counter()
            seg = segment_field(raw, stains, params=params)
            seconds.append(time.perf_counter() - t0)
            rows.append({"plate": plate, "well": well, "site": int(site), **centre_agreement(seg.nuclei, centres)})
    df = pd.DataFrame(rows)
    summary = {
        "fields": len(df), "params": params.describe(),
        "inside_mean": round(float(df["inside"].mean()), 4), "inside_min": round(float(df["inside"].min()), 4),
        "one_to_one_mean": round(float(df["one_to_one"].mean()), 4),
        "one_to_one_min": round(float(df["one_to_one"].min()), 4),
        "count_ratio_median": round(float(df["count_ratio"].median()), 3),
        "count_ratio_p5_p95": [round(float(v), 3) for v in np.percentile(df["count_ratio"], [5, 95])],
        "count_ratio_min_max": [round(float(df["count_ratio"].min()), 3), round(float(df["count_ratio"].max()), 3)],
        "centres_total": int(df["centres"].sum()), "objects_total": int(df["objects"].sum()),
        "seconds_per_field": round(float(np.median(seconds)), 3), "load_average": os.getloadavg()[0],
    }
    by_well = df.groupby("well")[["inside", "one_to_one", "count_ratio"]].mean().round(3)
    print(by_well.to_string())
    print(json.dumps(summary, indent=1))
    Path(a.output).write_text(json.dumps({"summary": summary, "by_well": by_well.reset_index().to_dict("records"),
                                          "fields": rows}, indent=1, default=str))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
