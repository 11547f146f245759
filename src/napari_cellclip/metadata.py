"""Join perturbation metadata onto a fields table, as image-based profiling does.

plate barcode → platemap name (``barcode_platemap.csv``) → well → sample and
dose (the platemap file) → annotation table (name, MoA, targets, SMILES) →
``Metadata_*`` columns (pycytominer / JUMP convention) and the CellCLIP prompt.

Column names are matched loosely so that both the LINCS / Broad files
(``Assay_Plate_Barcode``, ``Plate_Map_Name``, ``well_position``, ``broad_sample``,
``pert_iname``, ``moa``, ``target``) and JUMP-style tables (``broad_sample``,
``pert_iname``, ``target_list``, ``smiles``, ``control_type``, ``gene``,
``target_sequence``) work without configuration.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import CellClipWarning, MetadataError, PlateError
from .plates import normalize_well
from .prompts import DEFAULT_TEMPLATES, PromptTemplates, build_prompt, is_missing

NEGCON_NAMES = ("DMSO",)

# standard output column -> accepted input column names (first found wins)
ANNOTATION_COLUMNS = {
    "pert_iname": ("pert_iname", "Metadata_pert_iname", "name", "compound_name", "Metadata_Name", "gene"),
    "broad_id": ("broad_id", "Metadata_broad_id"),
    "moa": ("moa", "Metadata_moa", "MoA", "moa_list"),
    "target": ("target", "target_list", "Metadata_target", "targets", "gene"),
    "smiles": ("smiles", "SMILES", "Metadata_smiles", "canonical_smiles"),
    "inchikey": ("InChIKey", "inchikey", "Metadata_InChIKey", "InChIKey14"),
    "pert_type": ("pert_type", "Metadata_pert_type"),
    "control_type": ("control_type", "Metadata_control_type"),
    "gene": ("gene", "Metadata_gene", "Metadata_Symbol"),
    "target_sequence": ("target_sequence", "Metadata_target_sequence", "sequence"),
    "clinical_phase": ("clinical_phase",),
}


def _read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file not found: {path}")
    sep = "," if path.suffix.lower() == ".csv" or path.name.endswith(".csv.gz") else "\t"
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
    """A platemap file → one row per well with ``well``, ``broad_sample``, ``dose``, ``solvent``."""
    df = _read_table(path)
    wcol = _col(df, ("well_position", "Metadata_Well", "well", "Well"), "well", path)
    scol = _col(df, ("broad_sample", "Metadata_broad_sample", "Metadata_JCP2022", "JCP2022", "sample"),
                "sample", path)
    dcol = _col(df, ("mmoles_per_liter", "dose", "Metadata_dose", "concentration", "Metadata_mmoles_per_liter"),
                "dose", path, required=False)
    solcol = _col(df, ("solvent", "Metadata_solvent"), "solvent", path, required=False)
    out = pd.DataFrame({"well": [], "broad_sample": []})
    wells = []
    for i, w in enumerate(df[wcol]):
        try:
            wells.append(normalize_well(w))
        except PlateError as exc:
            raise MetadataError(f"{path}, line {i + 2}: {exc}") from None
    out = pd.DataFrame({"well": wells, "broad_sample": df[scol].str.strip()})
    out["dose"] = pd.to_numeric(df[dcol], errors="coerce") if dcol else np.nan
    out["solvent"] = df[solcol].str.strip() if solcol else ""
    dup = out["well"].duplicated()
    if dup.any():
        raise MetadataError(f"{path}: well {out.loc[dup, 'well'].iloc[0]} appears more than once")
    return out


def read_annotations(path) -> pd.DataFrame:
    """An annotation table keyed by ``broad_sample`` with the standard columns of ANNOTATION_COLUMNS."""
    df = _read_table(path)
    key = _col(df, ("broad_sample", "Metadata_broad_sample", "Metadata_JCP2022", "JCP2022"), "sample id", path)
    out = pd.DataFrame({"broad_sample": df[key].str.strip()})
    for std, names in ANNOTATION_COLUMNS.items():
        c = _col(df, names, std, path, required=False)
        out[std] = df[c].str.strip() if c else ""
    if (out["broad_id"] == "").all():
        out["broad_id"] = out["broad_sample"].map(_broad_id)
    out = out.drop_duplicates("broad_sample").set_index("broad_sample")
    out.attrs["path"] = str(path)
    return out


def _broad_id(sample: str) -> str:
    m = re.match(r"^(BRD-[A-Z]\d{8})", str(sample))
    return m.group(1) if m else str(sample)


def _modality(ann: pd.DataFrame, given: str | None) -> str:
    if given:
        if given not in ("compound", "crispr", "orf"):
            raise MetadataError(f"unknown perturbation type {given!r}; use compound, crispr or orf")
        return given
    if (ann.get("target_sequence", pd.Series(dtype=str)) != "").any():
        return "crispr"
    if (ann.get("smiles", pd.Series(dtype=str)) != "").any() or (ann.get("moa", pd.Series(dtype=str)) != "").any():
        return "compound"
    if (ann.get("gene", pd.Series(dtype=str)) != "").any():
        return "orf"
    return "compound"


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
    platemap : a single platemap file used for every plate (instead of the barcode lookup).
    annotations : annotation table keyed by ``broad_sample``.
    cell_line : put in the prompt ("A549 cells treated with ...").
    modality : compound / crispr / orf (default: inferred from the annotation columns).
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

    plate_maps = _plate_maps(fields["Metadata_Plate"].unique(), platemap, barcode_platemap, folder)
    ann = read_annotations(annotations) if annotations is not None else None
    wells = _WellAnnotator(ann, _modality(ann, modality) if ann is not None else (modality or "compound"),
                           cell_line, negcon, templates)
    cols: dict[str, list] = {k: [] for k in _WELL_COLUMNS}
    missing_wells: list[str] = []
    by_well: dict[tuple[str, str], dict] = {}
    for plate, well in zip(fields["Metadata_Plate"], fields["Metadata_Well"]):
        rec = by_well.get((plate, well))
        if rec is None:
            rec = by_well[(plate, well)] = wells.record(plate_maps[plate], well)
        if rec["prompt"] is None:  # the platemap has no row for this well
            missing_wells.append(f"{plate} {well}")
        for k, v in rec.items():
            cols[k].append(v)
    _warn_unannotated(missing_wells, wells, annotations)
    return _with_columns(fields, cols, wells.modality, cell_line)


#: the columns annotate() fills per well (as ``Metadata_<name>``)
_WELL_COLUMNS = ("broad_sample", "pert_iname", "dose", "moa", "target", "smiles", "inchikey",
                 "control_type", "is_control", "gene", "target_sequence", "prompt")


def _plate_maps(plates, platemap, barcode_platemap, folder) -> dict[str, pd.DataFrame]:
    """plate -> its platemap, indexed by well (one file for all plates, or by barcode lookup)."""
    if platemap is not None:
        pm = read_platemap(platemap).set_index("well")
        return {p: pm for p in plates}
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
            cache[name] = read_platemap(f).set_index("well")
        out[plate] = cache[name]
    return out


class _WellAnnotator:
    """The perturbation columns of one well from its platemap row and the annotation table;
    remembers the samples it could not name (``missing_samples``, ``nameless``)."""

    def __init__(self, ann, modality: str, cell_line, negcon, templates):
        self.ann, self.modality, self.cell_line, self.templates = ann, modality, cell_line, templates
        self.negcon = {n.lower() for n in negcon}
        self.missing_samples: set[str] = set()
        self.nameless: set[str] = set()

    def record(self, platemap: pd.DataFrame, well: str) -> dict:
        rec = dict.fromkeys(_WELL_COLUMNS, "")
        rec.update(dose=np.nan, is_control=False)
        if well not in platemap.index:
            rec["prompt"] = None
            return rec
        pw = platemap.loc[well]
        sample = pw["broad_sample"]
        rec.update(broad_sample=sample, dose=pw["dose"])
        if is_missing(sample):
            solvent = pw.get("solvent", "") or "DMSO"
            rec.update(pert_iname=solvent, is_control=True,
                       control_type="negcon" if solvent.lower() in self.negcon else "control")
        else:
            self._treatment(rec, sample)
        row = {"pert_type": self.modality, "cell_line": self.cell_line}
        row.update({k: rec[k] for k in ("pert_iname", "smiles", "gene", "target_sequence", "control_type")})
        rec["prompt"] = build_prompt(row, self.templates)
        return rec

    def _annotation(self, sample: str):
        if self.ann is None:
            return None
        if sample in self.ann.index:
            return self.ann.loc[sample]
        hits = self.ann[self.ann["broad_id"] == _broad_id(sample)]
        if len(hits):
            return hits.iloc[0]
        self.missing_samples.add(sample)
        return None

    def _treatment(self, rec: dict, sample: str) -> None:
        a = self._annotation(sample)
        if a is None:
            rec["pert_iname"] = _broad_id(sample)
        else:
            for k in ("pert_iname", "moa", "target", "smiles", "inchikey", "gene", "target_sequence"):
                rec[k] = a.get(k, "")
            ct = a.get("control_type", "")
            rec["control_type"] = "" if is_missing(ct) else ct
            if (a.get("pert_type", "") or "").lower() == "control" and not rec["control_type"]:
                rec["control_type"] = "control"
            if rec["pert_iname"] == "" and self.modality in ("crispr", "orf") and rec["gene"]:
                rec["pert_iname"] = rec["gene"]
            if rec["pert_iname"] == "":
                self.nameless.add(sample)
                rec["pert_iname"] = _broad_id(sample)
        if rec["pert_iname"].lower() in self.negcon and not rec["control_type"]:
            rec["control_type"] = "negcon"
        rec["is_control"] = bool(rec["control_type"])


def _warn_unannotated(missing_wells: list[str], wells: _WellAnnotator, annotations) -> None:
    if missing_wells:
        warnings.warn(f"{len(missing_wells)} field(s) in wells the platemap has no row for are left "
                      f"unannotated: {', '.join(sorted(set(missing_wells))[:10])}", CellClipWarning, stacklevel=3)
    if wells.missing_samples:
        warnings.warn(f"samples not in the annotation table {annotations}: "
                      f"{', '.join(sorted(wells.missing_samples)[:10])}; their identifier is used as the name",
                      CellClipWarning, stacklevel=3)
    if wells.nameless:
        warnings.warn(f"annotation rows without a name in {annotations}: {', '.join(sorted(wells.nameless)[:10])}; "
                      "their identifier is used as the name", CellClipWarning, stacklevel=3)


def _with_columns(fields: pd.DataFrame, cols: dict, modality: str, cell_line) -> pd.DataFrame:
    out = fields.copy()
    out["Metadata_pert_type"] = modality
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


def prompts_for_table(table: pd.DataFrame, *, modality: str, cell_line: str | None = None,
                      templates: PromptTemplates = DEFAULT_TEMPLATES) -> list[str]:
    """Prompts for every row of an annotation table (e.g. JUMP-Target metadata)."""
    out = []
    for _, r in table.iterrows():
        row = dict(r)
        row["pert_type"] = modality
        row["cell_line"] = cell_line
        out.append(build_prompt(row, templates))
    return out
