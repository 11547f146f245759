"""CellCLIP's perturbation prompt templates.

The texts follow the published CellCLIP templates exactly; every template can
be replaced through :class:`PromptTemplates`.  Missing values (no SMILES, no
guide sequence, no cell line) drop their clause instead of printing "nan".

Which template a well gets:

* a negative control (``control_type`` ``negcon``, or a solvent-only well such
  as DMSO) gets ``compound_negcon``;
* a control with no identifiable compound (no name and no SMILES) gets
  ``compound_other_control``;
* every other well, positive controls included, gets ``compound``: a positive
  control is a real, named compound with its own phenotype, and collapsing all
  of them onto one "control" text would teach the model that different
  phenotypes share one description.  ``poscon_as_control=True`` switches to
  the "other control" text for them.
* CRISPR / ORF: a negative control (non-targeting guide, LacZ, BFP …), an empty
  well or a control without a gene gets ``genetic_control``; a positive control
  with a gene (PLK1 knock-out, eGFP) gets the gene's text, for the same reason
  (``poscon_as_control=True``: the control text).
* An empty well (``control_type`` ``empty``, JUMP's JCP2022_999999) gets
  ``genetic_control`` ("... treated with control, no treatment.") whatever the modality.
* A compound without a name or SMILES is named by its identifier (the Broad id of
  ``broad_sample``, the JCP2022 id or the InChIKey), so every annotated row has a text.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .errors import MetadataError

MODALITIES = ("compound", "crispr", "orf")
#: strings that mean "no value" in metadata tables
MISSING_STRINGS = ("", "nan", "none", "na", "n/a", "null")


@dataclass(frozen=True)
class PromptTemplates:
    compound: str = "{cell} cells treated with compound: {name}, SMILES: {smiles}"
    compound_negcon: str = "{cell} cells treated with compound: control, {name}, SMILES: {smiles}"
    compound_other_control: str = "{cell} cells treated with compound: control"
    compound_long_smiles: str = "{cell} cells treated with SMILES: {smiles}"
    compound_long_name: str = "{cell} cells treated with compound, {name}"
    crispr: str = "{cell} cells treated with crispr sequence: {sequence}, targeting genes: {gene}"
    crispr_no_sequence: str = "{cell} cells treated with crispr, targeting genes: {gene}"
    orf: str = "{cell} cells treated with orf, targeting genes: {gene}"
    genetic_control: str = "{cell} cells treated with control, no treatment."
    max_length: int = 512
    poscon_as_control: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_TEMPLATES = PromptTemplates()


def is_missing(value: Any) -> bool:
    """True for None, NaN, pandas NA and empty / 'nan' / 'none' / 'NA' strings."""
    if value is None:
        return True
    try:
        if isinstance(value, float) and math.isnan(value):
            return True
    except TypeError:
        pass
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return True
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    if isinstance(value, str) and value.strip().lower() in MISSING_STRINGS:
        return True
    return False


#: strings that mean "no" in a yes / no column read as text (an ``is_control`` of "False")
FALSE_STRINGS = ("false", "f", "no", "n", "off")


def read_flag(value: Any) -> bool:
    """A yes / no metadata flag: missing, falsy, "False" / "no" / "0" (any number 0) are no."""
    if is_missing(value):
        return False
    if isinstance(value, str):
        text = value.strip().lower()
        if text in FALSE_STRINGS:
            return False
        try:
            return float(text) != 0
        except ValueError:
            return True
    return bool(value)


def _clean(value: Any) -> str | None:
    return None if is_missing(value) else str(value).strip()


def _fill(template: str, cell: str | None, **values: str | None) -> str:
    """Format ``template``, dropping clauses whose value is missing.

    A clause is a ``", label: {key}"`` / ``", {key}"`` piece; a missing
    ``{cell}`` drops the leading ``"{cell} "`` and capitalises what follows.
    """
    text = template
    for key, value in values.items():
        token = "{" + key + "}"
        if token not in text:
            continue
        if value is None:
            # drop the clause ", <label>: {key}" the value belongs to (each one, if used twice)
            while token in text:
                start = text.find(token)
                comma = text.rfind(",", 0, start)
                if comma == -1:
                    raise MetadataError(f"template {template!r} needs a value for {key}")
                text = text[:comma] + text[start + len(token):]
        else:
            text = text.replace(token, value)
    if cell is None:
        text = text.replace("{cell} ", "").replace("{cell}", "")
        text = text[:1].upper() + text[1:]
    else:
        text = text.replace("{cell}", cell)
    return text


def _get(row: Mapping, *keys: str) -> str | None:
    for key in keys:
        for candidate in (key, f"Metadata_{key}"):
            if candidate in row:
                value = _clean(row[candidate])
                if value is not None:
                    return value
    return None


def compound_prompt(
    name: str | None,
    smiles: str | None = None,
    *,
    cell: str | None = None,
    control: str | None = None,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
) -> str:
    """Prompt for a compound well.

    ``control``: None for a treatment, ``"negcon"`` for a negative control,
    ``"poscon"`` (or any other string) for another control.
    """
    name, smiles, cell = _clean(name), _clean(smiles), _clean(cell)
    control = _clean(control)
    if control is not None and control.lower().startswith("neg"):
        if name is None:
            return _fill(templates.compound_other_control, cell)
        text = _fill(templates.compound_negcon, cell, name=name, smiles=smiles)
    elif control is not None and (templates.poscon_as_control or (name is None and smiles is None)):
        return _fill(templates.compound_other_control, cell)
    else:
        if name is None and smiles is None:
            raise MetadataError("a compound prompt needs a name or a SMILES string")
        if name is None:
            text = _fill(templates.compound_long_smiles, cell, smiles=smiles)
        else:
            text = _fill(templates.compound, cell, name=name, smiles=smiles)
    if len(text) > templates.max_length and smiles is not None:
        text = _fill(templates.compound_long_smiles, cell, smiles=smiles)
    if len(text) > templates.max_length and name is not None:
        text = _fill(templates.compound_long_name, cell, name=name)
    return text


def _genetic_control(gene: str | None, control: str | None, templates: PromptTemplates, what: str) -> bool:
    """True when a CRISPR / ORF well gets the genetic control text (see the module doc)."""
    control = _clean(control)
    if control is None:
        if gene is None:
            raise MetadataError(f"a{'n' if what == 'ORF' else ''} {what} prompt needs the "
                                f"{'overexpressed' if what == 'ORF' else 'targeted'} gene")
        return False
    return gene is None or not control.lower().startswith("pos") or templates.poscon_as_control


def crispr_prompt(
    gene: str | None,
    sequence: str | None = None,
    *,
    cell: str | None = None,
    control: str | None = None,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
) -> str:
    """Prompt for a CRISPR guide; negative controls and gene-less controls get the genetic control text."""
    gene, sequence, cell = _clean(gene), _clean(sequence), _clean(cell)
    if _genetic_control(gene, control, templates, "CRISPR"):
        return _fill(templates.genetic_control, cell)
    if sequence is None:
        return _fill(templates.crispr_no_sequence, cell, gene=gene)
    return _fill(templates.crispr, cell, sequence=sequence, gene=gene)


def orf_prompt(
    gene: str | None,
    *,
    cell: str | None = None,
    control: str | None = None,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
) -> str:
    """Prompt for an ORF overexpression; negative controls and gene-less controls get the genetic control text."""
    gene, cell = _clean(gene), _clean(cell)
    if _genetic_control(gene, control, templates, "ORF"):
        return _fill(templates.genetic_control, cell)
    return _fill(templates.orf, cell, gene=gene)


GENE_KEYS = ("gene", "genes", "Symbol", "gene_symbol", "pert_iname")
ID_KEYS = ("broad_id", "broad_sample", "JCP2022", "jcp2022", "InChIKey", "inchikey")
CONTROL_TYPES = ("negcon", "poscon", "empty", "control")


def _modality_and_control(row: Mapping) -> tuple[str, str | None]:
    modality = _get(row, "modality")
    pert_type = (_get(row, "pert_type") or "").lower()
    if modality is None or modality.lower() not in MODALITIES:
        modality = pert_type if pert_type in MODALITIES else "compound"
    control = _get(row, "control_type")
    if control is None and pert_type in CONTROL_TYPES:
        control = pert_type
    if control is None:
        if read_flag(row.get("Metadata_is_control", row.get("is_control"))):
            control = "control"
    return modality.lower(), control


def _compound_name(row: Mapping) -> str | None:
    name = _get(row, "pert_iname", "name", "Name")
    if name is None and _get(row, "smiles", "SMILES") is None:
        ident = _get(row, *ID_KEYS)
        if ident is not None:
            m = re.match(r"^(BRD-[A-Z]\d{8})", ident)
            name = m.group(1) if m else ident
    return name


def build_prompt(row: Mapping, templates: PromptTemplates = DEFAULT_TEMPLATES) -> str:
    """Prompt for one fields-table / annotation row (keys with or without ``Metadata_``).

    Reads ``modality`` (compound / crispr / orf), else ``pert_type`` when it names a
    modality; ``control_type``, else a ``pert_type`` of negcon / poscon / empty / control
    (JUMP, CP-JUMP1); ``pert_iname``, ``smiles``, ``gene`` (or ``genes``, ``Symbol``),
    ``target_sequence`` and ``cell_line``.  A compound without a name or SMILES is named
    by its identifier (``broad_sample``, JCP2022, InChIKey).
    """
    modality, control = _modality_and_control(row)
    cell = _get(row, "cell_line")
    if control is not None and control.lower() == "empty":
        return _fill(templates.genetic_control, _clean(cell))
    if modality == "crispr":
        return crispr_prompt(_get(row, *GENE_KEYS), _get(row, "target_sequence", "sequence"),
                             cell=cell, control=control, templates=templates)
    if modality == "orf":
        return orf_prompt(_get(row, *GENE_KEYS), cell=cell, control=control, templates=templates)
    return compound_prompt(_compound_name(row), _get(row, "smiles", "SMILES"),
                           cell=cell, control=control, templates=templates)
