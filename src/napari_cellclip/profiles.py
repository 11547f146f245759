"""Profiles in image-based profiling's convention: tables pycytominer and copairs read.

A *profile table* has one row per field of view (``level="field"``) or per well
(``level="well"``), the ``Metadata_*`` columns of the fields table (plate, well,
site, perturbation, MoA, ...) and one numeric column per feature.  Feature
columns are image-level measurements, so they carry CellProfiler's ``Image_``
prefix:

==========================  =====================================================
CellCLIP image embeddings   ``Image_CellCLIP_0000`` … ``Image_CellCLIP_{E-1}``
frozen channel features     ``Image_<Encoder>_<Stain>_<feature>``, e.g.
                            ``Image_Morphology_DNA_mean`` (index when unnamed)
intensity baseline          ``Image_Intensity_<Stain>_<descriptor>``
==========================  =====================================================

pycytominer finds them with ``infer_cp_features(df, image_features=True)`` (and
``normalize`` / ``feature_select`` / ``aggregate`` with ``image_features=True``);
the list is also written into the parquet file (schema metadata key
``napari_cellclip``, with the source, level and well aggregation) and returned
by :func:`read_profiles`, to pass as ``features=``.

Well profiles
    the **median** of the well's field profiles by default (pycytominer's
    ``aggregate`` default; ``aggregate="mean"`` for the mean), or, for CellCLIP
    embeddings, the model's own multi-instance pooling (gated attention over
    the well's fields) when that is what the caller has — a well-level
    :class:`~napari_cellclip.store.EmbeddingStore`, or ``<store>/wells`` beside
    a field-level one.  Which one was used is recorded in the file
    (``well_profiles``).

Profiles from elsewhere (CellProfiler well profiles from the Cell Painting
Gallery, another model's embeddings) are read by :func:`read_profiles`:
``Metadata_*`` columns are metadata, every other numeric column that is not
CellProfiler bookkeeping (``ImageNumber``, ``FileName_*``, ...) is a feature,
unless a ``features=`` list says which.

This module imports neither torch nor Qt.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import CellClipError
from .store import EmbeddingStore, metadata_columns, parquet_safe, well_groups

__all__ = [
    "AGGREGATIONS",
    "INFO_KEY",
    "ProfileError",
    "aggregate_wells",
    "feature_columns",
    "feature_names",
    "feature_profiles",
    "load_store",
    "profile_frame",
    "read_profiles",
    "store_profiles",
    "write_profiles",
    "write_store_profiles",
]

AGGREGATIONS = ("median", "mean")
INFO_KEY = "napari_cellclip"  # parquet schema-metadata key of the profile description
WELL_STORE = "wells"  # a well-level store beside (inside) a field-level store folder
# CellProfiler bookkeeping columns: numeric, but not measurements of the cells
_BOOKKEEPING = ("ImageNumber", "ObjectNumber", "TableNumber", "Number_Object_Number", "FileName_",
                "PathName_", "URL_", "Frame_", "Series_", "ExecutionTime_", "ModuleError_", "MD5Digest_",
                "Height_", "Width_", "Scaling_", "Group_Index", "Group_Number")


class ProfileError(CellClipError):
    """A profile table is unreadable or has no usable metadata or feature columns."""


# --------------------------------------------------------------------- columns
def _token(text: str) -> str:
    """A CellProfiler-style name token: letters, digits and underscores only."""
    t = str(text).replace(">", "_gt_").replace("<", "_lt_").replace(".", "p")
    t = re.sub(r"[^0-9A-Za-z]+", "_", t)
    return t.strip("_") or "x"


def feature_names(source: str, count: int | None = None, *, stains: Sequence[str] | None = None,
                  names: Sequence[str] | None = None) -> list[str]:
    """Feature column names ``Image_<source>[_<stain>]_<name or index>``.

    ``stains`` (C) and ``names`` (D, or ``count`` = D when unnamed) give C×D columns in
    (stain, feature) order, the layout of ``features.reshape(N, C * D)``; without
    ``stains``, ``count`` (or ``len(names)``) columns.
    """
    src = _token(source[:1].upper() + source[1:])
    if names is None:
        if count is None:
            raise ValueError("feature_names needs names or count")
        width = max(4, len(str(count - 1)))
        names = [f"{i:0{width}d}" for i in range(count)]
    per = [_token(n) for n in names]
    cols = ([f"Image_{src}_{n}" for n in per] if stains is None
            else [f"Image_{src}_{_token(s)}_{n}" for s in stains for n in per])
    if len(set(cols)) != len(cols):  # names that collide once sanitised keep their position
        cols = [f"{c}_{i}" for i, c in enumerate(cols)]
    return cols


def _is_bookkeeping(col: str) -> bool:
    return col.startswith(_BOOKKEEPING)


def feature_columns(df: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """The feature columns of a profile table.

    ``features`` given: checked to exist and be numeric.  Otherwise: every numeric
    column that is not ``Metadata_*`` and not CellProfiler bookkeeping.
    """
    if features is not None:
        features = [str(f) for f in features]
        missing = [f for f in features if f not in df.columns]
        if missing:
            raise ProfileError(f"feature column(s) not in the table: {', '.join(missing[:5])}"
                               + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        bad = [f for f in features if not pd.api.types.is_numeric_dtype(df[f])]
        if bad:
            raise ProfileError(f"feature column(s) are not numeric: {', '.join(bad[:5])}")
        return features
    cols = [str(c) for c in df.columns if not str(c).startswith("Metadata_") and not _is_bookkeeping(str(c))
            and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    if not cols:
        raise ProfileError("no feature columns: a profile table needs numeric columns besides the "
                           "Metadata_* ones (or name them with features=)")
    return cols


def profile_frame(meta: pd.DataFrame, values: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
    """``Metadata_*`` columns of ``meta`` + ``values`` (N, K) as float32 feature ``columns``."""
    values = np.asarray(values)
    values = values.reshape(values.shape[0], -1)
    if values.shape != (len(meta), len(columns)):
        raise ProfileError(f"{values.shape[0]}x{values.shape[1]} values for {len(meta)} rows and "
                           f"{len(columns)} feature names")
    feats = pd.DataFrame(values.astype(np.float32, copy=False), columns=list(columns))
    return pd.concat([meta[metadata_columns(meta)].reset_index(drop=True), feats], axis=1)


# ----------------------------------------------------------------- aggregation
def aggregate_wells(profiles: pd.DataFrame, features: Sequence[str] | None = None,
                    method: str = "median") -> pd.DataFrame:
    """One row per ``(Metadata_Plate, Metadata_Well)``: the median (or mean) of its rows.

    Metadata constant within every well is kept (per-field columns such as
    ``Metadata_Site`` are dropped); ``Metadata_n_fields`` counts the rows aggregated.
    """
    if method not in AGGREGATIONS:
        raise ProfileError(f"unknown well aggregation {method!r}; choose {' or '.join(AGGREGATIONS)}")
    features = feature_columns(profiles, features)
    codes, table, _ = well_groups(profiles)
    x = profiles[features].reset_index(drop=True).astype(np.float64)
    agg = x.groupby(codes, sort=True).agg(method).to_numpy(dtype=np.float32)
    return profile_frame(table, agg, features)


def feature_profiles(features: np.ndarray, fields: pd.DataFrame, *, source: str,
                     stains: Sequence[str] | None = None, names: Sequence[str] | None = None,
                     correction: dict | None = None) -> pd.DataFrame:
    """Per-field profiles of frozen (N, C, D) channel features (or any (N, K) descriptors).

    ``correction`` (a :mod:`napari_cellclip.correction` spec, e.g. the one a checkpoint
    records) is applied first, per plate against its negative controls, as the checkpoint does.
    """
    from . import correction as corr

    x = corr.apply(features, fields, correction) if correction else np.asarray(features, np.float32)
    if x.ndim == 3:
        cols = feature_names(source, x.shape[2], stains=stains or [f"ch{i + 1}" for i in range(x.shape[1])],
                             names=names)
    else:
        cols = feature_names(source, x.shape[1], names=names)
    return profile_frame(fields, x.reshape(len(x), -1), cols)


# ------------------------------------------------------------------ stores
def load_store(path) -> tuple[EmbeddingStore, EmbeddingStore | None]:
    """A store folder and the well-level store beside it (``<path>/wells``), if any."""
    store = EmbeddingStore.load(path)
    if store.level == "well":
        return store, store
    wells_dir = Path(path) / WELL_STORE
    wells = EmbeddingStore.load(wells_dir) if EmbeddingStore.exists(wells_dir) else None
    if wells is not None and wells.level != "well":
        raise ProfileError(f"{wells_dir}: expected a well-level store, found level {wells.level!r}")
    return store, wells


def store_profiles(store: EmbeddingStore, *, wells: EmbeddingStore | None = None,
                   aggregate: str = "median") -> tuple[pd.DataFrame | None, pd.DataFrame, dict]:
    """(field profiles or None, well profiles, description) of an embedding store.

    Well rows come from a well-level store (``store`` itself, or ``wells``: the model's
    multi-instance pooling) when there is one, else from ``aggregate`` over the field rows.
    """
    info: dict[str, Any] = {"source": "CellCLIP image embeddings", "model_id": store.model_id}
    cols = feature_names("CellCLIP", store.dim)
    fields = None if store.level == "well" else profile_frame(store.fields, store.embeddings, cols)
    well_store = store if store.level == "well" else wells
    if well_store is not None:
        if well_store.dim != store.dim or (store.model_id and well_store.model_id != store.model_id):
            raise ProfileError("the well-level store comes from another model than the field store")
        well = profile_frame(well_store.fields, well_store.embeddings, cols)
        info["well_profiles"] = str(well_store.info.get("well_pooling")
                                    or "the store's well rows (the model's multi-instance pooling)")
    else:
        well = aggregate_wells(fields, cols, aggregate)
        info["well_profiles"] = f"{aggregate} of the well's field embeddings"
    return fields, well, info


# ------------------------------------------------------------------------ I/O
def write_profiles(df: pd.DataFrame, path, *, features: Sequence[str] | None = None,
                   info: dict | None = None) -> Path:
    """Write a profile table to parquet (atomically), its feature list and ``info`` in the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    features = feature_columns(df, features)
    meta = {**(info or {}), "features": list(features), "n_rows": len(df)}
    table = pa.Table.from_pandas(parquet_safe(df), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           INFO_KEY.encode(): json.dumps(meta, default=str).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_profiles(path, *, features: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str], dict]:
    """Read a profile table (parquet, CSV, TSV; gzip allowed) → (table, feature columns, description).

    The feature list is, in order: ``features``, the list a napari-cellclip file records,
    or every numeric non-metadata column (:func:`feature_columns`).
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    name = path.name.lower().removesuffix(".gz")
    info: dict = {}
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(INFO_KEY.encode())
            info = json.loads(raw) if raw else {}
            df = table.to_pandas()
        elif name.endswith((".csv", ".tsv")):
            df = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
        else:
            raise ProfileError(f"{path}: unknown profile format (use .parquet, .csv or .tsv)")
    except ProfileError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow / pandas raise several types
        raise ProfileError(f"{path}: unreadable profile table ({exc})") from None
    if not metadata_columns(df):
        raise ProfileError(f"{path}: no Metadata_* columns (a profile table names its metadata "
                           "Metadata_Plate, Metadata_Well, Metadata_broad_sample, ...)")
    try:
        cols = feature_columns(df, features if features is not None else info.get("features"))
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None
    return df, cols, info


def write_store_profiles(store: EmbeddingStore, folder, *, wells: EmbeddingStore | None = None,
                         aggregate: str = "median") -> dict[str, Path]:
    """Write ``fields.parquet`` (when the store has field rows) and ``wells.parquet`` into ``folder``.

    The Perturbation map widget's profile export and ``python -m training profiles`` call this.
    """
    fields, well, info = store_profiles(store, wells=wells, aggregate=aggregate)
    folder = Path(folder)
    out = {}
    if fields is not None:
        out["fields"] = write_profiles(fields, folder / "fields.parquet", info={**info, "level": "field"})
    out["wells"] = write_profiles(well, folder / "wells.parquet", info={**info, "level": "well"})
    return out
