"""Join perturbation metadata onto a fields table, as image-based profiling does.

plate barcode → platemap name (``barcode_platemap.csv``) → well → sample and
dose (the platemap file) → annotation table (name, MoA, targets, SMILES) →
``Metadata_*`` columns (pycytominer / JUMP convention) and the CellCLIP prompt.

Column names are matched loosely so that the LINCS / Broad files
(``Assay_Plate_Barcode``, ``Plate_Map_Name``, ``well_position``, ``broad_sample``,
``pert_iname``, ``moa``, ``target``), JUMP-Target tables (``target_list``, ``smiles``,
``control_type``, ``gene``, ``target_sequence``), CP-JUMP1 tables (``genes``,
``target``) and the JUMP ``datasets`` tables work without configuration:

* a JUMP well table (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_JCP2022``, one row
  per well of many plates) is a platemap for every plate it lists;
* annotations keyed by ``Metadata_JCP2022``: ``crispr.csv.gz`` / ``orf.csv.gz``
  (``Metadata_Symbol``), ``compound.csv.gz`` (``Metadata_InChIKey``, ``Metadata_SMILES``);
* tables keyed by InChIKey only (``compound_rephub_annot.csv.gz``: name, MoA, target,
  clinical phase) fill in compounds by their InChIKey (the full key, else its first
  14-character block, as LINCS's ``InChIKey14``); several rows of one key are merged;
* control tables (``perturbation_control.csv``: ``Metadata_pert_type`` negcon / poscon /
  empty per JCP2022 id) mark controls.

``annotations=`` takes one table, a list of them, or a folder (every table in it, e.g.
the JUMP ``metadata/`` folder); :func:`read_annotations` merges them into one table
whose rows may be of different modalities (compound / crispr / orf).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import MetadataError, PlateError, warn_at_caller
from .plates import normalize_well
from .prompts import (
    CONTROL_TYPES, DEFAULT_TEMPLATES, MISSING_STRINGS, MODALITIES, PromptTemplates, build_prompt, is_missing,
)

NEGCON_NAMES = ("DMSO",)
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")

#: sample identifiers an annotation row is found by (first found is the table's key)
ID_COLUMNS = {
    "broad_sample": ("broad_sample", "Metadata_broad_sample"),
    "jcp2022": ("Metadata_JCP2022", "JCP2022"),
    "inchikey": ("Metadata_InChIKey", "InChIKey", "inchikey", "InChIKey14"),
}
# standard output column -> accepted input column names (first found wins)
ANNOTATION_COLUMNS = {
    "pert_iname": ("pert_iname", "Metadata_pert_iname", "name", "compound_name", "Metadata_Name"),
    "broad_id": ("broad_id", "Metadata_broad_id"),
    "moa": ("moa", "Metadata_moa", "MoA", "moa_list"),
    "target": ("target", "target_list", "Metadata_target", "targets"),
    "smiles": ("smiles", "SMILES", "Metadata_smiles", "Metadata_SMILES", "canonical_smiles"),
    "inchikey": ID_COLUMNS["inchikey"],
    "pert_type": ("pert_type", "Metadata_pert_type"),
    "control_type": ("control_type", "Metadata_control_type"),
    "gene": ("gene", "genes", "Metadata_gene", "Metadata_Symbol", "Symbol", "gene_symbol"),
    "target_sequence": ("target_sequence", "Metadata_target_sequence", "sequence"),
    "clinical_phase": ("clinical_phase", "Metadata_clinical_phase"),
    "modality": ("modality", "Metadata_modality"),
    "jcp2022": ID_COLUMNS["jcp2022"],
}
_FILLED_BY_INCHIKEY = ("pert_iname", "moa", "target", "clinical_phase", "smiles")


def _read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file not found: {path}")
    name = path.name.lower().removesuffix(".gz")
    sep = "," if name.endswith(".csv") else "\t"
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise MetadataError(f"{path}: cannot read table ({exc})") from exc


def _col(df: pd.DataFrame, names: Iterable[str], what: str, path, required: bool = True) -> str | None:
    for n in names:
        if n in df.columns:
            return n
    if required:
        raise MetadataError(f"{path}: no {what} column (looked for {', '.join(names)}); columns are "
                            f"{list(df.columns)}")
    return None


def _find_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".txt", ".tsv", ".csv", ".csv.gz"):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    for p in folder.rglob(f"{stem}.*"):
        if p.is_file():
            return p
    return None


def _find_annotations(folder: Path) -> Path | None:
    for pattern in ("repurposing_info*.tsv", "*compound_metadata*.tsv", "*_metadata.tsv", "*annotation*"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def read_platemap(path) -> pd.DataFrame:
    """A platemap file → one row per well with ``well``, ``broad_sample``, ``dose``, ``solvent``.

    A table with a plate column (a JUMP ``well.csv``: ``Metadata_Plate``, ``Metadata_Well``,
    ``Metadata_JCP2022``) also gets ``plate``; wells are then unique per plate.
    """
    df = _read_table(path)
    wcol = _col(df, ("well_position", "Metadata_Well", "well", "Well"), "well", path)
    scol = _col(df, ("broad_sample", "Metadata_broad_sample", "Metadata_JCP2022", "JCP2022", "sample"),
                "sample", path)
    dcol = _col(df, ("mmoles_per_liter", "dose", "Metadata_dose", "concentration", "Metadata_mmoles_per_liter"),
                "dose", path, required=False)
    solcol = _col(df, ("solvent", "Metadata_solvent"), "solvent", path, required=False)
    pcol = _col(df, ("Metadata_Plate", "plate", "Assay_Plate_Barcode"), "plate", path, required=False)
    wells = []
    for i, w in enumerate(df[wcol]):
        try:
            wells.append(normalize_well(w))
        except PlateError as exc:
            raise MetadataError(f"{path}, line {i + 2}: {exc}") from None
    out = pd.DataFrame({"well": wells, "broad_sample": df[scol].str.strip()})
    out["dose"] = pd.to_numeric(df[dcol], errors="coerce") if dcol else np.nan
    out["solvent"] = df[solcol].str.strip() if solcol else ""
    keys = ["well"]
    if pcol:
        out["plate"] = df[pcol].str.strip()
        keys = ["plate", "well"]
    dup = out.duplicated(keys)
    if dup.any():
        raise MetadataError(f"{path}: well {' '.join(out.loc[dup, keys].iloc[0])} appears more than once")
    return out


# ------------------------------------------------------------------------ annotations


def _table_files(source) -> list[tuple[Path, bool]]:
    """[(table file, found in a folder)] for a file, a folder or a list of them."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += [(f, True) for f in sorted(p.iterdir())
                      if f.is_file() and f.name.lower().endswith(TABLE_SUFFIXES)]
        elif p.is_file():
            files.append((p, False))
        else:
            raise MetadataError(f"annotation table or folder not found: {p}")
    return files


def _standardize(df: pd.DataFrame, path) -> pd.DataFrame:
    """Standard annotation columns (``ANNOTATION_COLUMNS``) + ``broad_sample`` (the row's key)."""
    out = pd.DataFrame(index=df.index)
    for std, names in ANNOTATION_COLUMNS.items():
        c = _col(df, names, std, path, required=False)
        out[std] = df[c].str.strip() if c else ""
    keys = [c for names in ID_COLUMNS.values() for c in names if c in df.columns]
    if not keys:
        raise MetadataError(f"{path}: no sample id column (looked for "
                            f"{', '.join(c for names in ID_COLUMNS.values() for c in names)}); "
                            f"columns are {list(df.columns)}")
    for c in out.columns:
        out[c] = out[c].where(~out[c].str.lower().isin(MISSING_STRINGS), "")
    # a row's key: its first id that is present (JUMP-Target's DMSO row has no broad_sample, only an InChIKey)
    key = pd.Series("", index=df.index)
    for c in reversed(keys):
        v = df[c].str.strip()
        key = v.where(~v.str.lower().isin(MISSING_STRINGS), key)
    out["broad_sample"] = key
    ptype = out["pert_type"].str.lower()
    is_ctrl = ptype.isin(CONTROL_TYPES) & (out["control_type"] == "")
    out.loc[is_ctrl, "control_type"] = ptype[is_ctrl]
    out.loc[ptype.isin(MODALITIES) & (out["modality"] == ""), "modality"] = ptype
    if (out["broad_id"] == "").all():
        out["broad_id"] = [_broad_id(s) if s.startswith("BRD-") else "" for s in out["broad_sample"]]
    return out


def _role(path: Path, df: pd.DataFrame) -> str:
    """'controls', 'inchikey' (annotations keyed by InChIKey only) or 'perturbations'."""
    has = set(df.columns)
    if "control" in path.name.lower() and any(c in has for c in ANNOTATION_COLUMNS["pert_type"]):
        return "controls"
    ids = {kind for kind, names in ID_COLUMNS.items() if has & set(names)}
    return "inchikey" if ids == {"inchikey"} else "perturbations"


def _infer_modality(path: Path, table: pd.DataFrame) -> str:
    name = path.name.lower()
    for m in ("crispr", "orf", "compound"):
        if m in name:
            return m
    if (table["target_sequence"] != "").any():
        return "crispr"
    if (table["smiles"] != "").any() or (table["moa"] != "").any() or (table["inchikey"] != "").any():
        return "compound"
    return "orf" if (table["gene"] != "").any() else "compound"


def _read_role_tables(files: list[tuple[Path, bool]]) -> dict[str, list[pd.DataFrame]]:
    roles: dict[str, list[pd.DataFrame]] = {"perturbations": [], "inchikey": [], "controls": []}
    for f, in_folder in files:
        raw = _read_table(f)
        raw = raw[~(raw == "").all(axis=1)]  # blank lines
        if in_folder and not any(c in raw.columns for names in ID_COLUMNS.values() for c in names):
            warn_at_caller(f"{f}: no sample id column; not an annotation table, skipped")
            continue
        role = _role(f, raw)
        table = _standardize(raw, f)
        if role == "perturbations":
            table.loc[table["modality"] == "", "modality"] = _infer_modality(f, table)
            nokey = table["broad_sample"] == ""
            if nokey.any():
                warn_at_caller(f"{f}: {int(nokey.sum())} row(s) without a sample id skipped")
                table = table[~nokey]
        table.attrs["path"] = str(f)
        roles[role].append(table)
    return roles


def _by_inchikey(by_key: pd.DataFrame) -> dict[str, dict[str, str]]:
    """InChIKey → merged annotation: the first name; MoA / targets / phases / SMILES of all rows."""
    values: dict[str, dict[str, list[str]]] = {}
    for key, *vals in by_key[["broad_sample", *_FILLED_BY_INCHIKEY]].itertuples(index=False, name=None):
        slot = values.setdefault(key, {c: [] for c in _FILLED_BY_INCHIKEY})
        for c, v in zip(_FILLED_BY_INCHIKEY, vals):
            if v:
                slot[c].append(v)
    return {key: {c: (v[0] if c == "pert_iname" or not v else
                      "|".join(dict.fromkeys(x for item in v for x in item.split("|"))))
                  if v else "" for c, v in slot.items()} for key, slot in values.items()}


def _merge_by_inchikey(table: pd.DataFrame, by_key: pd.DataFrame) -> pd.DataFrame:
    """Fill name / MoA / target / phase / SMILES of rows from an InChIKey-keyed table (full key, else block 1)."""
    if table.empty or by_key.empty:
        return table
    merged = _by_inchikey(by_key)
    block: dict[str, dict[str, str]] = {}
    for key, rec in merged.items():
        block.setdefault(key[:14], rec)
    table = table.copy()
    keys = table["inchikey"]
    for c in _FILLED_BY_INCHIKEY:
        full = keys.map({k: r[c] for k, r in merged.items()})
        first = keys.str[:14].map({k: r[c] for k, r in block.items()})
        fill = full.where(full.notna() & (full != ""), first).fillna("")
        table[c] = table[c].where(table[c] != "", fill)
    return table


def _apply_controls(table: pd.DataFrame, controls: list[pd.DataFrame]) -> pd.DataFrame:
    """Mark controls from control tables (matched by any id of a row); controls no row has are added."""
    for ctrl in controls:
        ctrl = ctrl.drop_duplicates("broad_sample").set_index("broad_sample")
        found = set()
        for col in ("broad_sample", "jcp2022", "inchikey"):
            hit = table[col].isin(ctrl.index) & (table[col] != "")
            for i, key in zip(table.index[hit], table.loc[hit, col]):
                c = ctrl.loc[key]
                table.at[i, "control_type"] = c["control_type"] or table.at[i, "control_type"]
                if not table.at[i, "pert_iname"] and c["pert_iname"]:
                    table.at[i, "pert_iname"] = c["pert_iname"]
                found.add(key)
        extra = ctrl.loc[~ctrl.index.isin(found)].reset_index()
        extra["modality"] = [m if m in MODALITIES else "compound" for m in extra["modality"]]
        table = pd.concat([table, extra[table.columns]], ignore_index=True)
    return table


class _Aliases(dict):
    """Other id → key of an annotation table; kept in ``attrs``, which pandas deep-copies on every
    operation, so it is shared instead of copied."""

    def __deepcopy__(self, memo):
        return self


def read_annotations(source) -> pd.DataFrame:
    """Annotation table(s) → one table indexed by sample id (``broad_sample``: the key column of
    each table: broad_sample, JCP2022 or InChIKey) with the columns of ``ANNOTATION_COLUMNS``.

    ``source``: a file, a list of files, or a folder (all its tables).  InChIKey-keyed tables
    fill in compounds by InChIKey and control tables mark controls (see the module doc);
    every row carries its ``modality``.  ``attrs["aliases"]`` maps other ids of a row
    (JCP2022, broad_sample, InChIKey) to its key.
    """
    files = _table_files(source)
    if not files:
        raise MetadataError(f"no annotation table in {source}")
    roles = _read_role_tables(files)
    by_key = pd.concat(roles["inchikey"], ignore_index=True) if roles["inchikey"] else None
    table = pd.concat(roles["perturbations"], ignore_index=True) if roles["perturbations"] else None
    if by_key is not None:
        by_key["modality"] = by_key["modality"].replace("", "compound")
        if table is None:
            table = by_key
        else:  # fill compounds in by InChIKey; compounds no row refers to stay, keyed by InChIKey
            table = _merge_by_inchikey(table, by_key)
            used = set(table["inchikey"]) | {k[:14] for k in table["inchikey"] if k}
            table = pd.concat([table, by_key[~by_key["broad_sample"].isin(used)
                                             & ~by_key["broad_sample"].str[:14].isin(used)]], ignore_index=True)
    if table is None:
        table = pd.DataFrame(columns=[*ANNOTATION_COLUMNS, "broad_sample"])
    table = _apply_controls(table, roles["controls"])
    if table.empty:
        raise MetadataError(f"{source}: the annotation table(s) have no rows")
    out = table.drop_duplicates("broad_sample").set_index("broad_sample")
    aliases = _Aliases()
    for kind in ("jcp2022", "inchikey", "broad_id"):
        aliases.update({v: k for k, v in zip(out.index, out[kind]) if v and v not in out.index})
    out.attrs["aliases"] = aliases
    out.attrs["path"] = ", ".join(str(f) for f, _ in files)
    return out


def read_jump_annotations(folder) -> pd.DataFrame:
    """The JUMP ``datasets`` metadata folder (crispr / orf / compound tables, compound
    annotations by InChIKey, perturbation controls) as one table keyed by JCP2022 id."""
    return read_annotations(Path(folder))


def _broad_id(sample: str) -> str:
    m = re.match(r"^(BRD-[A-Z]\d{8})", str(sample))
    return m.group(1) if m else str(sample)


def _lookup(ann: pd.DataFrame | None, sample: str):
    """The annotation row of ``sample`` (its key, another id of the row, or its Broad id)."""
    if ann is None:
        return None
    if sample in ann.index:
        return ann.loc[sample]
    alias = ann.attrs.get("aliases", {}).get(sample) or ann.attrs.get("aliases", {}).get(_broad_id(sample))
    if alias is not None:
        return ann.loc[alias]
    hits = ann[ann["broad_id"] == _broad_id(sample)]
    return hits.iloc[0] if len(hits) else None


def _modality(ann: pd.DataFrame, given: str | None) -> str:
    if given:
        if given not in MODALITIES:
            raise MetadataError(f"unknown perturbation type {given!r}; use compound, crispr or orf")
        return given
    mods = {m for m in ann.get("modality", pd.Series(dtype=str)) if m}
    return mods.pop() if len(mods) == 1 else "compound"


# ------------------------------------------------------------------------ annotate


def _plate_maps(fields: pd.DataFrame, folder: Path | None, barcode_platemap, platemap) -> dict:
    """plate → platemap table (one file for all plates, a JUMP well table, or the barcode lookup)."""
    plates = fields["Metadata_Plate"].unique()
    if platemap is not None:
        pm = read_platemap(platemap)
        if "plate" not in pm.columns:
            return {p: pm for p in plates}
        missing = [p for p in plates if p not in set(pm["plate"])]
        if missing:
            raise MetadataError(f"plate(s) {', '.join(missing[:10])} not in {platemap}")
        return {p: pm[pm["plate"] == p].drop(columns="plate") for p in plates}
    bp = _read_table(Path(barcode_platemap))
    bcol = _col(bp, ("Assay_Plate_Barcode", "Metadata_Plate", "plate"), "plate barcode", barcode_platemap)
    mcol = _col(bp, ("Plate_Map_Name", "Metadata_Plate_Map_Name", "platemap"), "platemap name", barcode_platemap)
    lookup = dict(zip(bp[bcol].str.strip(), bp[mcol].str.strip()))
    base = folder if folder is not None else Path(barcode_platemap).parent
    cache: dict[str, pd.DataFrame] = {}
    out = {}
    for plate in plates:
        if plate not in lookup:
            raise MetadataError(f"plate {plate} is not in {barcode_platemap} (it lists "
                                f"{', '.join(sorted(lookup)[:10])})")
        name = lookup[plate]
        if name not in cache:
            f = _find_file(base, name)
            if f is None:
                raise MetadataError(f"platemap {name!r} for plate {plate} not found in {base}")
            cache[name] = read_platemap(f)
        out[plate] = cache[name]
    return out


_RECORD_KEYS = ("broad_sample", "pert_iname", "pert_type", "dose", "moa", "target", "smiles", "inchikey",
                "control_type", "is_control", "gene", "target_sequence", "prompt")


class _Wells:
    """Builds the perturbation columns of one well (the same for all its fields) and collects notes."""

    def __init__(self, ann, modality, cell_line, negcon, templates):
        self.ann, self.mod, self.cell_line, self.templates = ann, modality, cell_line, templates
        self.negcon = {n.lower() for n in negcon}
        self.missing_samples: set[str] = set()
        self.nameless: set[str] = set()

    def record(self, pm: pd.DataFrame, well: str) -> dict:
        rec = dict.fromkeys(_RECORD_KEYS, "")
        rec.update(dose=np.nan, is_control=False, pert_type=self.mod)
        if well not in pm.index:
            rec["prompt"] = None
            return rec
        pw = pm.loc[well]
        rec.update(broad_sample=pw["broad_sample"], dose=pw["dose"])
        if is_missing(pw["broad_sample"]):
            solvent = pw.get("solvent", "") or "DMSO"
            rec.update(pert_iname=solvent, control_type="negcon" if solvent.lower() in self.negcon else "control")
        else:
            self._annotation(rec, pw["broad_sample"])
        if rec["pert_iname"].lower() in self.negcon and not rec["control_type"]:
            rec["control_type"] = "negcon"
        rec["is_control"] = bool(rec["control_type"])
        row = {k: rec[k] for k in ("pert_iname", "smiles", "gene", "target_sequence", "control_type")}
        rec["prompt"] = build_prompt({**row, "modality": rec["pert_type"], "cell_line": self.cell_line},
                                     self.templates)
        return rec

    def _annotation(self, rec: dict, sample: str) -> None:
        a = _lookup(self.ann, sample)
        if a is None:
            if self.ann is not None:
                self.missing_samples.add(sample)
            rec["pert_iname"] = _broad_id(sample)
            return
        for k in ("pert_iname", "moa", "target", "smiles", "inchikey", "gene", "target_sequence", "control_type"):
            rec[k] = a.get(k, "") or ""
        rec["pert_type"] = a.get("modality", "") or self.mod
        if rec["pert_type"] in ("crispr", "orf") and rec["gene"]:
            rec["pert_iname"] = rec["gene"]
        if not rec["pert_iname"]:
            self.nameless.add(sample)
            rec["pert_iname"] = _broad_id(sample)


def annotate(
    fields: pd.DataFrame,
    *,
    platemap_dir=None,
    barcode_platemap=None,
    platemap=None,
    annotations=None,
    cell_line: str | None = None,
    modality: str | None = None,
    negcon: Sequence[str] = NEGCON_NAMES,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
) -> pd.DataFrame:
    """Add perturbation ``Metadata_*`` columns and ``Metadata_prompt`` to a fields table.

    Parameters
    ----------
    platemap_dir : folder with ``barcode_platemap.csv``, the platemap files named by
        platemap name, and an annotation table (found by name).
    barcode_platemap : CSV with ``Assay_Plate_Barcode`` and ``Plate_Map_Name``.
    platemap : a single platemap file used for every plate (instead of the barcode lookup),
        or a JUMP well table with a ``Metadata_Plate`` column covering the plates.
    annotations : annotation table(s) (:func:`read_annotations`: a file, a list, a folder).
    cell_line : put in the prompt ("A549 cells treated with ...").
    modality : compound / crispr / orf for wells whose annotation does not say (solvent-only
        wells, samples missing from the annotations); default: the annotations' modality
        when they have one, else compound.
    negcon : names of negative-control treatments (solvent-only wells get their solvent name).

    A well missing from its platemap, or a sample missing from the annotations,
    is warned about by name and left unannotated (no prompt); the rest goes on.
    A plate barcode missing from ``barcode_platemap`` is an error.
    """
    folder = Path(platemap_dir) if platemap_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise MetadataError(f"platemap folder not found: {folder}")
    if barcode_platemap is None and folder is not None and platemap is None:
        candidate = folder / "barcode_platemap.csv"
        barcode_platemap = candidate if candidate.is_file() else None
    if annotations is None and folder is not None:
        annotations = _find_annotations(folder)
    if platemap is None and barcode_platemap is None:
        raise MetadataError("give a platemap file, or a barcode_platemap.csv (with a platemap folder)")
    plate_maps = _plate_maps(fields, folder, barcode_platemap, platemap)
    ann = read_annotations(annotations) if annotations is not None else None
    wells = _Wells(ann, _modality(ann, modality) if ann is not None else (modality or "compound"),
                   cell_line, negcon, templates)
    indexed = {id(t): t.set_index("well") for t in plate_maps.values()}
    by_well: dict[tuple[str, str], dict] = {}
    cols = {k: [] for k in _RECORD_KEYS}
    missing_wells = []
    for key in zip(fields["Metadata_Plate"], fields["Metadata_Well"]):
        if key not in by_well:
            by_well[key] = wells.record(indexed[id(plate_maps[key[0]])], key[1])
        if by_well[key]["prompt"] is None:
            missing_wells.append(f"{key[0]} {key[1]}")
        for k, v in by_well[key].items():
            cols[k].append(v)
    _warn_annotation_gaps(missing_wells, wells, annotations)
    return _with_columns(fields, cols, cell_line)


def _warn_annotation_gaps(missing_wells: list[str], wells: _Wells, annotations) -> None:
    if missing_wells:
        warn_at_caller(f"{len(missing_wells)} field(s) in wells the platemap has no row for are left "
                       f"unannotated: {', '.join(sorted(set(missing_wells))[:10])}")
    if wells.missing_samples:
        warn_at_caller(f"samples not in the annotation table {annotations}: "
                       f"{', '.join(sorted(wells.missing_samples)[:10])}; their identifier is used as the name")
    if wells.nameless:
        warn_at_caller(f"annotation rows without a name in {annotations}: {', '.join(sorted(wells.nameless)[:10])}; "
                       "their identifier is used as the name")


def _with_columns(fields: pd.DataFrame, cols: dict, cell_line) -> pd.DataFrame:
    out = fields.copy()
    for k, v in cols.items():
        out[f"Metadata_{k}"] = v
    out["Metadata_cell_line"] = cell_line if cell_line is not None else ""
    out["Metadata_dose"] = pd.to_numeric(out["Metadata_dose"], errors="coerce")
    out["Metadata_is_control"] = out["Metadata_is_control"].astype(bool)
    out["Metadata_prompt"] = out["Metadata_prompt"].astype(object)
    # keep Metadata_ columns together, before the channel columns
    meta = [c for c in out.columns if c.startswith("Metadata_")]
    rest = [c for c in out.columns if not c.startswith("Metadata_")]
    return out[meta + rest]


def with_cell_line(fields: pd.DataFrame, cell_line: str | None,
                   templates: PromptTemplates = DEFAULT_TEMPLATES) -> pd.DataFrame:
    """``fields`` with the prompts that name no cell line rewritten to name ``cell_line``.

    Only prompts :func:`annotate` built from these columns with ``templates`` and no cell
    line are rewritten (and their ``Metadata_cell_line`` set); a prompt written some other
    way, one naming a cell line, and rows without a prompt are left as they are.
    """
    if "Metadata_prompt" not in fields.columns:
        return fields
    out = fields.copy()
    keys = [c for c in ("Metadata_Plate", "Metadata_Well") if c in out.columns]
    groups = out.groupby(keys, sort=False, dropna=False).indices if keys else {None: np.arange(len(out))}
    prompts = out["Metadata_prompt"].astype(object).to_numpy(copy=True)
    cells = (out["Metadata_cell_line"].astype(object).to_numpy(copy=True) if "Metadata_cell_line" in out.columns
             else np.full(len(out), "", dtype=object))
    for rows in groups.values():
        row = out.iloc[rows[0]].to_dict()
        old = row.get("Metadata_prompt")
        if is_missing(old):
            continue
        row["Metadata_cell_line"] = None
        try:
            if build_prompt(row, templates) != old:
                continue  # not built from these columns with these templates: keep it
            row["Metadata_cell_line"] = cell_line
            prompts[rows] = build_prompt(row, templates)
            cells[rows] = cell_line if cell_line is not None else ""
        except MetadataError:
            continue
    out["Metadata_prompt"] = prompts
    out["Metadata_cell_line"] = cells
    return out


def prompts_for_table(table: pd.DataFrame, *, modality: str | None = None, cell_line: str | None = None,
                      templates: PromptTemplates = DEFAULT_TEMPLATES) -> list[str]:
    """Prompts for every row of an annotation table (e.g. JUMP-Target metadata, or the table
    :func:`read_annotations` returns); ``modality`` overrides the rows' own."""
    out = []
    for row in table.to_dict("records"):
        if modality is not None:
            row["modality"] = modality
        row["cell_line"] = cell_line
        out.append(build_prompt(row, templates))
    return out
