"""The long-prompt fallback threshold (issue 16): a prompt of exactly ``max_length`` characters is
kept; one character more falls back to the SMILES-only text, then to the name-only text."""

from __future__ import annotations

import pytest

from napari_cellclip.prompts import (
    DEFAULT_TEMPLATES,
    PromptTemplates,
    build_prompt,
    compound_prompt,
)

FULL = "A549 cells treated with compound: {name}, SMILES: {smiles}"
SMILES_ONLY = "A549 cells treated with SMILES: {smiles}"
NAME_ONLY = "A549 cells treated with compound, {name}"


def _smiles_for(template: str, name: str, length: int) -> str:
    """A SMILES string that makes ``template`` exactly ``length`` characters long."""
    fixed = len(template.format(name=name, smiles=""))
    return "C" * (length - fixed)


@pytest.mark.parametrize("limit", [DEFAULT_TEMPLATES.max_length, 120])
def test_full_prompt_kept_at_the_limit_and_replaced_one_over(limit):
    t = PromptTemplates(max_length=limit)
    name = "lonafarnib"
    smiles = _smiles_for(FULL, name, limit)
    at = compound_prompt(name, smiles, cell="A549", templates=t)
    assert len(at) == limit and at == FULL.format(name=name, smiles=smiles)
    over = compound_prompt(name, smiles + "C", cell="A549", templates=t)
    assert over == SMILES_ONLY.format(smiles=smiles + "C") and len(over) < limit


@pytest.mark.parametrize("limit", [DEFAULT_TEMPLATES.max_length, 120])
def test_smiles_only_prompt_kept_at_the_limit_then_name_only(limit):
    t = PromptTemplates(max_length=limit)
    name = "orantinib"
    smiles = _smiles_for(SMILES_ONLY, name, limit)
    at = compound_prompt(name, smiles, cell="A549", templates=t)
    assert at == SMILES_ONLY.format(smiles=smiles) and len(at) == limit
    over = compound_prompt(name, smiles + "C", cell="A549", templates=t)
    assert over == NAME_ONLY.format(name=name)
    # a row of a fields table goes the same way
    row = {"Metadata_pert_iname": name, "Metadata_smiles": smiles + "C", "Metadata_cell_line": "A549"}
    assert build_prompt(row, templates=t) == NAME_ONLY.format(name=name)


def test_without_smiles_the_name_only_text_is_the_fallback():
    t = PromptTemplates(max_length=60)
    fixed = len("A549 cells treated with compound: ")
    at = "x" * (60 - fixed)
    assert compound_prompt(at, None, cell="A549", templates=t) == f"A549 cells treated with compound: {at}"
    over = at + "x"
    assert compound_prompt(over, None, cell="A549", templates=t) == NAME_ONLY.format(name=over)
