"""CellCLIP's perturbation prompt templates.

The texts follow the published CellCLIP templates exactly; every template can
be replaced through :class:`PromptTemplates`.  Missing values (no SMILES, no
guide sequence, no cell line) drop their clause instead of printing "nan".

Which compound template a well gets:

* a negative control (``control_type`` ``negcon``, or a solvent-only well such
  as DMSO) gets ``compound_negcon``;
* a control with no identifiable compound (no name and no SMILES) gets
  ``compound_other_control``;
* every other well, positive controls included, gets ``compound``: a positive
  control is a real, named compound with its own phenotype, and collapsing all
  of them onto one "control" text would teach the model that different
  phenotypes share one description.  ``poscon_as_control=True`` switches to
  the "other control" text for them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .errors import MetadataError

MODALITIES = ("compound", "crispr", "orf")


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
    if isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "na", "n/a", "null"):
        return True
    return False


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


def crispr_prompt(
    gene: str | None,
    sequence: str | None = None,
    *,
    cell: str | None = None,
    control: str | None = None,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
) -> str:
    """Prompt for a CRISPR guide; controls (any control type) get the genetic control text."""
    gene, sequence, cell = _clean(gene), _clean(sequence), _clean(cell)
    if _clean(control) is not None or gene is None:
        if _clean(control) is None:
            raise MetadataError("a CRISPR prompt needs the targeted gene")
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
    """Prompt for an ORF overexpression; controls get the genetic control text."""
    gene, cell = _clean(gene), _clean(cell)
    if _clean(control) is not None or gene is None:
        if _clean(control) is None:
            raise MetadataError("an ORF prompt needs the overexpressed gene")
        return _fill(templates.genetic_control, cell)
    return _fill(templates.orf, cell, gene=gene)


def build_prompt(row: Mapping, templates: PromptTemplates = DEFAULT_TEMPLATES) -> str:
    """Prompt for one fields-table / annotation row (keys with or without ``Metadata_``).

    Reads ``pert_type`` (compound / crispr / orf; ``trt`` and ``control`` mean
    compound unless a gene column says otherwise), ``pert_iname``, ``smiles``,
    ``gene``, ``target_sequence``, ``control_type`` and ``cell_line``.
    """
    modality = (_get(row, "modality", "pert_type") or "compound").lower()
    if modality not in MODALITIES:
        modality = "compound"
    cell = _get(row, "cell_line")
    control = _get(row, "control_type")
    if control is None:
        is_control = row.get("Metadata_is_control", row.get("is_control"))
        if not is_missing(is_control) and bool(is_control):
            control = "control"
    if modality == "crispr":
        return crispr_prompt(_get(row, "gene", "pert_iname"), _get(row, "target_sequence", "sequence"),
                             cell=cell, control=control, templates=templates)
    if modality == "orf":
        return orf_prompt(_get(row, "gene", "pert_iname"), cell=cell, control=control, templates=templates)
    return compound_prompt(_get(row, "pert_iname", "name"), _get(row, "smiles", "SMILES"),
                           cell=cell, control=control, templates=templates)
