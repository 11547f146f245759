"""How a missing value drops its clause in a custom template (issue 16): a clause is everything
from the comma before the value to the value's end, found wherever it is (the template's first
character included); a value used twice inside ONE clause cannot be dropped clause by clause and
is an error naming it, never a half-cut prompt."""

from __future__ import annotations

import pytest

from napari_cellclip.errors import MetadataError
from napari_cellclip.prompts import PromptTemplates, compound_prompt, crispr_prompt


def test_a_clause_opening_the_template_is_dropped_like_any_other():
    t = PromptTemplates(compound=", SMILES: {smiles}, compound: {name}, cells: {cell}")
    assert compound_prompt("aspirin", None, cell="HeLa", templates=t) == ", compound: aspirin, cells: HeLa"
    assert compound_prompt("aspirin", "CCO", cell="HeLa", templates=t) == \
        ", SMILES: CCO, compound: aspirin, cells: HeLa"
    t = PromptTemplates(compound_negcon=", SMILES: {smiles}; {name}")
    assert compound_prompt("DMSO", "", control="negcon", templates=t) == "; DMSO"


def test_a_value_twice_in_one_clause_is_an_error_not_a_cut_prompt():
    t = PromptTemplates(compound="{cell} cells given {name}, SMILES {smiles} (canonical {smiles})")
    with pytest.raises(MetadataError, match=r"needs a value for smiles"):
        compound_prompt("aspirin", None, cell="HeLa", templates=t)
    assert compound_prompt("aspirin", "CCO", cell="HeLa", templates=t) == \
        "HeLa cells given aspirin, SMILES CCO (canonical CCO)"


def test_a_value_twice_in_two_clauses_drops_both():
    t = PromptTemplates(compound="{cell} cells, SMILES {smiles}, given {name}, again {smiles} (canonical)")
    assert compound_prompt("aspirin", None, cell="HeLa", templates=t) == "HeLa cells, given aspirin (canonical)"


def test_the_error_names_the_template_and_the_value():
    t = PromptTemplates(compound="{smiles} for {cell} cells, {name}")
    with pytest.raises(MetadataError) as err:
        compound_prompt("aspirin", None, cell="HeLa", templates=t)
    assert str(err.value) == "template '{smiles} for {cell} cells, {name}' needs a value for smiles"
    t = PromptTemplates(crispr_no_sequence="{gene} knocked out in {cell} cells")
    assert crispr_prompt("TP53", None, cell="HeLa", templates=t) == "TP53 knocked out in HeLa cells"
