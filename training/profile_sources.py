"""Profiles to judge: a checkpoint's embeddings, its frozen input features, the naive intensity
baseline, or a table the user passes; and the ``profiles`` verb that writes them.

The metrics themselves are in :mod:`training.profiling` (copairs); the table convention in
:mod:`napari_cellclip.profiles`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from napari_cellclip.errors import CellClipError

from .profiling import Profiles, ProfilingOptions, profiling_report

LEVELS = ("well", "field")
REPRESENTATIONS = ("embeddings", "features", "intensity")


def _check_level(level: str) -> str:
    if level not in LEVELS:
        raise CellClipError(f"unknown profile level {level!r}; choose {' or '.join(LEVELS)}")
    return level


def embedding_profiles(model, wb, fields: pd.DataFrame, *, level: str = "well") -> Profiles:
    """CellCLIP image embeddings of the wells of ``wb`` (the model's multi-instance pooling of each
    well's fields) or of each field alone (a bag of one), as profiles."""
    from napari_cellclip.profiles import feature_names, profile_frame
    from napari_cellclip.store import well_groups

    from napari_cellclip.towers import encode_bags

    info = {"representation": "embeddings", "source": "CellCLIP image embeddings", "level": _check_level(level)}
    if level == "field":
        rows = np.flatnonzero(wb.field_prompt_ids >= 0)
        emb = encode_bags(model, wb.features, rows[:, None])
        meta = fields.iloc[rows]
    else:
        emb = encode_bags(model, wb.features, wb.bag_index)
        _, table, _ = well_groups(fields.iloc[np.flatnonzero(wb.field_prompt_ids >= 0)])
        at = {(str(p), str(w)): i for i, (p, w) in enumerate(zip(table["Metadata_Plate"], table["Metadata_Well"]))}
        meta = table.iloc[[at[(p, w)] for p, w in zip(wb.wells["plate"], wb.wells["well"])]]
        info["well_profiles"] = "the model's multi-instance pooling (gated attention) of the well's fields"
    cols = feature_names("CellCLIP", emb.shape[1])
    return Profiles(profile_frame(meta, emb, cols), cols, info)


def _at_level(fp: pd.DataFrame, cols: list[str], info: dict, level: str, aggregate: str) -> Profiles:
    from napari_cellclip.profiles import aggregate_wells

    info["level"] = _check_level(level)
    if level == "field":
        return Profiles(fp, cols, info)
    info["well_profiles"] = f"{aggregate} of the well's field profiles"
    return Profiles(aggregate_wells(fp, cols, aggregate), cols, info)


def channel_feature_profiles(features: np.ndarray, fields: pd.DataFrame, encoder, *, level: str = "well",
                             aggregate: str = "median", correction: dict | None = None,
                             corrected: bool = False) -> Profiles:
    """Frozen (N, C, D) channel features as profiles, per-plate corrected as ``correction`` says
    (``corrected=True``: already corrected by the caller with that spec)."""
    from napari_cellclip import correction as corr
    from napari_cellclip.plates import stains as stains_of
    from napari_cellclip.profiles import feature_profiles

    spec = getattr(encoder, "spec", str(encoder))
    fp = feature_profiles(features, fields, source=spec.split(":")[-1].split("/")[-1],
                          stains=list(stains_of(fields)) or None, names=getattr(encoder, "feature_names", None),
                          correction=None if corrected else correction)
    info = {"representation": "features", "source": f"frozen {spec} channel features",
            "correction": corr.describe(correction)}
    return _at_level(fp, list(fp.columns[fp.columns.str.startswith("Image_")]), info, level, aggregate)


def intensity_profiles(fields: pd.DataFrame, *, level: str = "well", aggregate: str = "median",
                       correction: str | None = "center_scale", progress=None) -> Profiles:
    """The naive baseline's per-channel intensity descriptors (training/baseline.py) as profiles."""
    from napari_cellclip import correction as corr
    from napari_cellclip.plates import stains as stains_of
    from napari_cellclip.profiles import feature_profiles

    from .baseline import DESCRIPTOR_NAMES, global_descriptors

    stains = list(stains_of(fields))
    desc = global_descriptors(fields, stains, progress=progress).reshape(len(fields), len(stains), -1)
    spec = corr.make_spec(correction)
    fp = feature_profiles(desc, fields, source="Intensity", stains=stains, names=DESCRIPTOR_NAMES, correction=spec)
    info = {"representation": "intensity", "source": "naive baseline: per-channel intensity mean, std, "
            "percentiles", "correction": corr.describe(spec)}
    return _at_level(fp, list(fp.columns[fp.columns.str.startswith("Image_")]), info, level, aggregate)


def table_profiles(table, *, features: Sequence[str] | None = None, level: str = "well",
                   aggregate: str = "median") -> Profiles:
    """A profile table the user passes (path or DataFrame).  Several rows per (plate, well) at
    ``level="well"`` (fields, cells) are aggregated; one row per well is used as it is."""
    from napari_cellclip.profiles import aggregate_wells, feature_columns, read_profiles

    if isinstance(table, pd.DataFrame):
        df, cols, info = table, feature_columns(table, features), {"source": "profile table"}
    else:
        df, cols, info = read_profiles(table, features=features)
        info = {**info, "source": info.get("source", f"profile table {table}"), "path": str(table)}
        info.pop("features", None)
    info["representation"] = "table"
    keys = [c for c in ("Metadata_Plate", "Metadata_Well") if c in df.columns]
    per_well = len(keys) == 2 and df.duplicated(keys).any()
    if level == "well" and per_well:
        info["well_profiles"] = f"{aggregate} of the table's rows per well"
        return Profiles(aggregate_wells(df, cols, aggregate), cols, {**info, "level": "well"})
    if level == "field" and not per_well and info.get("level") == "well":
        raise CellClipError(f"{info.get('path', 'the profile table')}: holds well profiles, not field profiles")
    if level == "well":
        info.setdefault("well_profiles", "the table's rows as they are")
    return Profiles(df.reset_index(drop=True), cols, {**info, "level": level})


# ----------------------------------------------------------------- reports
def _table_sources(tables, features, level: str, aggregate: str) -> dict[str, Profiles]:
    """``tables``: paths, or (name, DataFrame) pairs → {name: Profiles}."""
    out = {}
    for t in tables or ():
        name, src = (t if isinstance(t, tuple) else (Path(t).name.split(".")[0], t))
        out[str(name)] = table_profiles(src, features=features, level=level, aggregate=aggregate)
    return out


def model_report(ev, metrics: Sequence[str], *, options: ProfilingOptions | None = None,
                 representations: Sequence[str] = ("embeddings", "features"), tables=(),
                 table_features: Sequence[str] | None = None, level: str = "well", aggregate: str = "median",
                 required: bool = True) -> dict:
    """Profiling report of a checkpoint on plates (a :class:`training.loop.EvaluationData`).

    ``representations``: "embeddings" (the checkpoint's image embeddings), "features" (its frozen
    input features, per-plate corrected as the checkpoint does), "intensity" (the naive baseline's
    descriptors, DMSO centre-and-scale per plate); ``tables``: profile tables to judge beside them.
    """
    unknown = [r for r in representations if r not in REPRESENTATIONS]
    if unknown:
        raise CellClipError(f"unknown representation(s) {', '.join(unknown)}; choose from {', '.join(REPRESENTATIONS)}")
    rows = np.flatnonzero(ev.wells.field_prompt_ids >= 0)  # the fields the model embeds
    fields = ev.fields.iloc[rows].reset_index(drop=True)
    sources: dict[str, Profiles] = {}
    if "embeddings" in representations:
        sources["embeddings"] = embedding_profiles(ev.model, ev.wells, ev.fields, level=level)
    if "features" in representations:
        sources["features"] = channel_feature_profiles(ev.features[rows], fields, ev.encoder, level=level,
                                                       aggregate=aggregate, correction=ev.correction, corrected=True)
    if "intensity" in representations:
        sources["intensity"] = intensity_profiles(fields, level=level, aggregate=aggregate)
    sources.update(_table_sources(tables, table_features, level, aggregate))
    return profiling_report(sources, metrics, options or ProfilingOptions(), required=required)


def table_report(tables, metrics: Sequence[str], *, options: ProfilingOptions | None = None,
                 table_features: Sequence[str] | None = None, level: str = "well", aggregate: str = "median",
                 required: bool = True) -> dict:
    """Profiling report of profile tables alone (no checkpoint): e.g. CellProfiler well profiles."""
    if not tables:
        raise CellClipError("no profiles to evaluate: give --checkpoint (with --data) or --profiles")
    sources = _table_sources(tables, table_features, level, aggregate)
    return profiling_report(sources, metrics, options or ProfilingOptions(), required=required)


# ----------------------------------------------------------------- profiles out
def _write_levels(field: Profiles, well: Profiles, output) -> dict:
    from napari_cellclip.profiles import write_profiles

    out = Path(output)
    paths = {lvl: write_profiles(p.frame, out / f"{lvl}s.parquet", features=p.features, info=p.info)
             for lvl, p in (("field", field), ("well", well))}
    return {"fields": str(paths["field"]), "wells": str(paths["well"]), "n_fields": len(field.frame),
            "n_wells": len(well.frame), "n_features": len(field.features), "source": field.info.get("source"),
            "well_profiles": well.info.get("well_profiles")}


def _plate_profiles(data, representation: str, *, checkpoint, encoder, normalization, correction, aggregate,
                    load: dict, run: dict) -> tuple[Profiles, Profiles]:
    """(field, well) profiles of plates: a checkpoint's embeddings or features, or features alone."""
    from napari_cellclip import correction as corr
    from napari_cellclip.profiles import aggregate_wells

    from .data import read_training_fields
    from .evaluate import load_evaluation
    from .prepare import extract

    if checkpoint:
        ev = load_evaluation(checkpoint, data, correction=correction or "checkpoint", **load, **run)
        if representation == "embeddings":
            return (embedding_profiles(ev.model, ev.wells, ev.fields, level="field"),
                    embedding_profiles(ev.model, ev.wells, ev.fields, level="well"))
        fields, feats, enc, spec = ev.fields, ev.features, ev.encoder, ev.correction
        field = (channel_feature_profiles(feats, fields, enc, level="field", correction=spec, corrected=True)
                 if representation == "features" else None)
    else:
        if representation == "embeddings":
            raise CellClipError("embedding profiles need a checkpoint (--checkpoint)")
        fields = read_training_fields(data, **load)
        field = None
        if representation == "features":
            feats, fields, enc = extract(fields, encoder, normalization=normalization, device=run["device"],
                                         cache_dir=run["cache_dir"], batch_size=run["extract_batch_size"],
                                         workers=run["workers"], progress=not run["no_progress"],
                                         quiet=run["quiet"])
            spec = corr.make_spec(correction or "center_scale")
            spec = corr.fit(feats, fields, spec) if spec and spec["method"] == "tvn" else spec
            field = channel_feature_profiles(feats, fields, enc, level="field", correction=spec)
    if field is None:  # intensity
        field = intensity_profiles(fields, level="field", correction="center_scale" if correction in
                                   (None, "checkpoint", "tvn") else correction)
    info = {**field.info, "level": "well", "well_profiles": f"{aggregate} of the well's field profiles"}
    return field, Profiles(aggregate_wells(field.frame, field.features, aggregate), field.features, info)


def export_profiles(output, data=None, *, checkpoint=None, representation: str | None = None,
                    encoder: str = "morphology", normalization: str = "plate", correction: str | None = None,
                    aggregate: str = "median", load: dict | None = None, run: dict | None = None) -> dict:
    """Write ``<output>/fields.parquet`` and ``<output>/wells.parquet`` (pycytominer convention).

    ``data``: plates (folders, LoadData CSVs, a manifest), or one embedding-store folder (a
    ``python -m napari_cellclip.pipeline`` output), whose well rows are used when it has them.
    ``representation``: "embeddings" (needs ``checkpoint``), "features" or "intensity".
    """
    from napari_cellclip.profiles import load_store, write_store_profiles
    from napari_cellclip.store import EmbeddingStore

    data = [data] if isinstance(data, (str, Path)) else list(data or [])
    stores = [d for d in data if EmbeddingStore.exists(d)]
    if stores:
        if len(data) != 1:
            raise CellClipError("give one embedding-store folder alone (a pipeline output), not mixed with plates")
        store, wells = load_store(stores[0])
        paths = write_store_profiles(store, output, wells=wells, aggregate=aggregate)
        return {k: str(v) for k, v in paths.items()}
    run = {"device": "auto", "cache_dir": None, "extract_batch_size": 8, "workers": None, "quiet": False,
           "no_progress": False, **(run or {})}
    representation = representation or ("embeddings" if checkpoint else "features")
    if representation not in REPRESENTATIONS:
        raise CellClipError(f"unknown representation {representation!r}; choose from {', '.join(REPRESENTATIONS)}")
    field, well = _plate_profiles(data, representation, checkpoint=checkpoint, encoder=encoder,
                                  normalization=normalization, correction=correction, aggregate=aggregate,
                                  load=load or {}, run=run)
    return _write_levels(field, well, output)
