"""Per-cell tables: one row per segmented cell, CellProfiler column names, ``Metadata_*`` first.

:func:`cell_table` measures one field (segmentation + cp-measure, the same
measurements the ``cells`` encoder profiles, :mod:`napari_cellclip.cellfeatures`);
:func:`export_cell_table` writes every cell of a fields table to one parquet or CSV
file, field by field (a row group per field, so a plate never sits in memory at
once), in worker processes when asked, atomically (a killed export leaves no
partial file under the final name).  Command line::

    python -m napari_cellclip.celltable --data PLATE [--data PLATE ...] --output cells.parquet \\
        [--platemap DIR] [--nuclei DNA] [--cell RNA] [--normalization field|plate] [--workers N]

Columns: the fields table's ``Metadata_*`` columns, ``ObjectNumber`` (the label in
the segmentation masks), ``Nuclei_Location_Center_X`` / ``_Y`` (pixels), the shape
features (``Nuclei_AreaShape_Area`` ...), then per stain ``<Compartment>_Intensity_<F>_<stain>``,
``<Compartment>_Texture_<F>_<stain>_3`` (mean over the four directions),
``Cells_Granularity_<i>_<stain>`` and ``Cells_Correlation_Pearson_<stain>_<stain>``.
Intensities are on the [0, 1] scale of the chosen normalisation (the field's own
1st-99.9th percentiles by default, or its plate's).  Undefined values are NaN here
(this is the raw table; only the encoder's profiles are NaN-free).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._fsutil import discard, publish, temp_path
from .cellfeatures import CHANNEL_FEATURES, SHAPE_FEATURES, measure_field
from .errors import Cancelled, CellClipError
from .segmentation import SegmentationParams, _stain_index

__all__ = ["cell_columns", "cell_table", "export_cell_table", "main"]


def _stain_name(feature: str, stain: str) -> str:
    """CellProfiler's place for the image name in a measurement name."""
    comp, block, rest = feature.split("_", 2)
    if block == "Texture":
        name, scale = rest.rsplit("_", 1)
        return f"{comp}_Texture_{name}_{stain}_{scale}"
    return f"{comp}_{block}_{rest}_{stain}"


def cell_columns(stains: Sequence[str], nuclei_stain: str = "DNA", cell_stain: str = "RNA") -> list[tuple]:
    """``[(column name, channel index, feature index)]`` of the per-stain columns of a cell table.

    The two correlation features become ``Cells_Correlation_Pearson_<stain>_<anchor>``;
    a stain with itself and the second copy of a symmetric pair are left out.
    """
    anchors = (stains[_stain_index(stains, nuclei_stain, "nucleus")], stains[_stain_index(stains, cell_stain, "cell")])
    cols, pairs = [], set()
    for c, stain in enumerate(stains):
        for j, feat in enumerate(CHANNEL_FEATURES):
            if feat.startswith("Cells_Correlation_Pearson_"):
                other = anchors[0] if feat.endswith("NucleusStain") else anchors[1]
                pair = frozenset((stain, other))
                if other == stain or pair in pairs:
                    continue
                pairs.add(pair)
                cols.append((f"Cells_Correlation_Pearson_{stain}_{other}", c, j))
            else:
                cols.append((_stain_name(feat, stain), c, j))
    return cols


def cell_table(raw: np.ndarray, stains: Sequence[str], *, nuclei_stain: str = "DNA", cell_stain: str = "RNA",
               params: SegmentationParams | None = None, ranges=None, metadata: dict | None = None,
               low: float = 1.0, high: float = 99.9) -> pd.DataFrame:
    """One row per cell of the raw field ``raw`` (C, H, W); ``metadata`` values are repeated on every row.

    ``ranges`` (C, 2): the intensity range of each channel (plate normalisation);
    None: the field's own ``low``/``high`` percentiles.
    """
    _, m = measure_field(raw, stains, nuclei_stain=nuclei_stain, cell_stain=cell_stain, params=params,
                         ranges=ranges, low=low, high=high)
    data = {k: [v] * m.n for k, v in (metadata or {}).items()}
    data["ObjectNumber"] = np.arange(1, m.n + 1, dtype=np.int64)
    data["Nuclei_Location_Center_X"] = m.centers[:, 0]
    data["Nuclei_Location_Center_Y"] = m.centers[:, 1]
    for j, name in enumerate(SHAPE_FEATURES):
        data[name] = m.shape[:, j]
    for name, c, j in cell_columns(list(stains), nuclei_stain, cell_stain):
        data[name] = m.channel[:, c, j]
    return pd.DataFrame(data)


class _FieldCells:
    """Picklable: fields-table row → its cell table (or an error message), for worker processes."""

    def __init__(self, stains, nuclei_stain, cell_stain, params):
        self.stains, self.nuclei_stain, self.cell_stain, self.params = list(stains), nuclei_stain, cell_stain, params

    def __call__(self, item):
        from .images import load_field

        row, meta, ranges = item
        try:
            raw = load_field(row, self.stains)
            return cell_table(raw, self.stains, nuclei_stain=self.nuclei_stain, cell_stain=self.cell_stain,
                              params=self.params, ranges=ranges, metadata=meta), None
        except CellClipError as exc:
            return None, str(exc)


class _Writer:
    """Append tables to a temporary sibling of ``<path>`` (:mod:`napari_cellclip._fsutil`);
    :meth:`commit` publishes it, :meth:`abort` discards it."""

    def __init__(self, path: Path):
        self.path = path
        self.kind = "parquet" if path.suffix.lower() == ".parquet" else "csv"
        if self.kind == "csv" and path.suffix.lower() not in (".csv", ".gz") and not str(path).endswith(".csv.gz"):
            raise CellClipError(f"{path}: write per-cell tables as .parquet or .csv")
        self.tmp = temp_path(path)  # grows field by field; published whole by commit
        self.writer = None
        self.columns = None

    def write(self, df: pd.DataFrame) -> None:
        if self.columns is None:
            self.columns = list(df.columns)
        df = df.reindex(columns=self.columns)
        if self.kind == "csv":
            df.to_csv(self.tmp, mode="a" if self.writer else "w", header=self.writer is None, index=False,
                      na_rep="NaN")
            self.writer = True
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            table = pa.Table.from_pandas(df, preserve_index=False)
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        else:
            table = pa.Table.from_pandas(df, schema=self.writer.schema, preserve_index=False)
        self.writer.write_table(table)

    def commit(self) -> None:
        if self.kind == "parquet" and self.writer is not None:
            self.writer.close()
        if self.writer is None:
            raise CellClipError(f"no cell was segmented in any field; {self.path} not written")
        publish(self.tmp, self.path)

    def abort(self) -> None:
        if self.kind == "parquet" and self.writer is not None:
            with contextlib.suppress(Exception):  # cleaning up after another error
                self.writer.close()
        discard(self.tmp)


def _items(fields: pd.DataFrame, stains: list[str], normalization: str):
    from .images import field_ranges
    from .store import parquet_safe

    meta = parquet_safe(fields[[c for c in fields.columns if str(c).startswith("Metadata_")]])
    ranges = field_ranges(fields, stains, normalization)
    rows = fields.to_dict(orient="records")
    metas = meta.to_dict(orient="records")
    return [(rows[i], metas[i], ranges[i]) for i in range(len(fields))]


def export_cell_table(fields: pd.DataFrame, out, *, stains: Sequence[str] | None = None, nuclei_stain: str = "DNA",
                      cell_stain: str = "RNA", params: SegmentationParams | None = None,
                      normalization: str = "field", workers: int = 0,
                      progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None) -> dict:
    """Write one row per cell of every field of ``fields`` to ``out`` (``.parquet`` or ``.csv``).

    Returns ``{"path", "fields", "cells", "empty_fields", "skipped": [(row, message)]}``.
    Unreadable fields are skipped (listed); ``should_stop()`` returning True raises
    :class:`Cancelled` and leaves nothing under ``out``.
    """
    from .plates import stains as plate_stains

    stains = list(stains) if stains is not None else list(plate_stains(fields))
    fields = fields.reset_index(drop=True)
    work = _FieldCells(stains, nuclei_stain, cell_stain, params)
    for stain, role in ((nuclei_stain, "nucleus"), (cell_stain, "cell")):
        _stain_index(stains, stain, role)
    items = _items(fields, stains, normalization)
    writer = _Writer(Path(out).expanduser())
    summary = {"path": str(writer.path), "fields": len(fields), "cells": 0, "empty_fields": 0, "skipped": []}
    pool = None
    try:
        if workers and workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(max_workers=int(workers))
            results = pool.map(work, items)
        else:
            results = map(work, items)
        for i, (table, err) in enumerate(results):
            if should_stop is not None and should_stop():
                raise Cancelled("per-cell export cancelled")
            if err is not None:
                summary["skipped"].append((i, err))
            elif len(table) == 0:
                summary["empty_fields"] += 1
            else:
                writer.write(table)
                summary["cells"] += len(table)
            if progress is not None:
                progress(i + 1, len(items))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_cellclip.celltable``: per-cell measurements of plates to parquet/CSV."""
    from .cli import HelpFormatter, add_alias, add_data_args, fields_from_args

    p = argparse.ArgumentParser(prog="python -m napari_cellclip.celltable", description=main.__doc__,
                                formatter_class=HelpFormatter)
    add_data_args(p, data_required=True)
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="output .parquet or .csv")
    add_alias(p, "--out", "output")
    p.add_argument("--nuclei", default="DNA", help="stain nuclei are found in")
    p.add_argument("--cell", default="RNA", help="stain cells are grown on")
    p.add_argument("--normalization", default="field", choices=["field", "plate"],
                   help="rescale channels by each field's own intensity percentiles or by its plate's")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (0: in this process)")
    a = p.parse_args(argv)
    try:
        fields = fields_from_args(a)
        s = export_cell_table(fields, a.output, nuclei_stain=a.nuclei, cell_stain=a.cell,
                              normalization=a.normalization, workers=a.workers,
                              progress=lambda d, t: print(f"\r{d}/{t} fields", end="", file=sys.stderr))
    except CellClipError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print(f"\n{s['cells']} cells from {s['fields'] - len(s['skipped'])} fields written to {s['path']}"
          + (f" ({s['empty_fields']} fields without cells)" if s["empty_fields"] else "")
          + (f"; {len(s['skipped'])} fields skipped" if s["skipped"] else ""), file=sys.stderr)
    for i, msg in s["skipped"]:
        print(f"  skipped row {i}: {msg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
