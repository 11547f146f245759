"""Prompt rules the template tests did not reach (found by mutation testing, issue 16): missing
cell lines, missing values and controls, the row keys build_prompt reads, custom templates
threaded through, and the error messages a user sees."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from napari_cellclip.errors import MetadataError
from napari_cellclip.prompts import (
    PromptTemplates,
    build_prompt,
    compound_prompt,
    crispr_prompt,
    is_missing,
    orf_prompt,
)

GENETIC_CONTROL = "U2OS cells treated with control, no treatment."


# ---------------------------------------------------------------------- missing values
@pytest.mark.parametrize("value", [None, float("nan"), math.nan, pd.NA, pd.NaT, "", "   ", "nan", "NaN",
                                   "None", "NONE", "na", "NA", "n/a", "N/A", "null", " NULL "])
def test_missing_values(value):
    assert is_missing(value)


@pytest.mark.parametrize("value", [0, 0.0, 10.0, -1.5, "0", "DMSO", "nana", "n", "control", False, True])
def test_present_values(value):
    assert not is_missing(value)


# ---------------------------------------------------------------------- no cell line
def test_without_a_cell_line_the_prompt_starts_capitalised():
    assert compound_prompt("aspirin", "CCO") == "Cells treated with compound: aspirin, SMILES: CCO"
    assert compound_prompt("aspirin", None, cell=float("nan")) == "Cells treated with compound: aspirin"
    assert compound_prompt(None, None, control="poscon") == "Cells treated with compound: control"
    assert crispr_prompt("HIF1A", None) == "Cells treated with crispr, targeting genes: HIF1A"
    assert orf_prompt("LacZ", control="negcon") == "Cells treated with control, no treatment."
    t = PromptTemplates(compound="{cell}-derived organoids given {name}")
    assert compound_prompt("x", None, templates=t) == "-derived organoids given x"
    t = PromptTemplates(compound="exposed {cell} cells to {name}")
    assert compound_prompt("x", None, templates=t) == "Exposed cells to x"


# ---------------------------------------------------------------------- compounds and controls
def test_compound_without_a_name_or_a_smiles():
    assert compound_prompt(None, "CCO", cell="A549") == "A549 cells treated with SMILES: CCO"
    with pytest.raises(MetadataError, match="needs a name or a SMILES"):
        compound_prompt(None, None, cell="A549")
    with pytest.raises(MetadataError, match="needs a name or a SMILES"):
        compound_prompt("nan", "", cell="A549")


def test_controls_with_and_without_a_compound():
    # a positive control is a named compound with its own phenotype ...
    assert compound_prompt("staurosporine", None, cell="A549", control="poscon") == \
        "A549 cells treated with compound: staurosporine"
    assert compound_prompt(None, "CCO", cell="A549", control="poscon") == "A549 cells treated with SMILES: CCO"
    # ... unless asked to treat every control alike; a negative control without a name is "control"
    as_control = PromptTemplates(poscon_as_control=True)
    assert compound_prompt("staurosporine", "CCO", cell="A549", control="poscon", templates=as_control) == \
        "A549 cells treated with compound: control"
    assert compound_prompt(None, "CS(C)=O", cell="A549", control="negcon") == \
        "A549 cells treated with compound: control"


def test_genetic_controls_and_errors():
    assert crispr_prompt("KCNN1", "ACGT", cell="U2OS", control="negcon") == GENETIC_CONTROL
    assert crispr_prompt(None, None, cell="U2OS", control="no_guide") == GENETIC_CONTROL
    assert orf_prompt("KCNN1", cell="U2OS", control="poscon") == GENETIC_CONTROL
    with pytest.raises(MetadataError, match="CRISPR prompt needs the targeted gene"):
        crispr_prompt(None, "ACGT", cell="U2OS")
    with pytest.raises(MetadataError, match="ORF prompt needs the overexpressed gene"):
        orf_prompt("", cell="U2OS")


# ---------------------------------------------------------------------- templates
def test_custom_template_fills_every_value_it_has():
    t = PromptTemplates(compound="{cell} cells exposed to a molecule, SMILES: {smiles}")
    assert compound_prompt("x", "CCO", cell="HeLa", templates=t) == "HeLa cells exposed to a molecule, SMILES: CCO"
    t = PromptTemplates(crispr="{cell} cells, guide {sequence} against {gene}, guide again {sequence}")
    assert crispr_prompt("TP53", "ACGT", cell="HeLa", templates=t) == \
        "HeLa cells, guide ACGT against TP53, guide again ACGT"


def test_a_missing_value_drops_its_own_clause_only():
    t = PromptTemplates(compound="{cell} cells, a dose, treated with {name}, SMILES: {smiles}")
    assert compound_prompt("x", None, cell="HeLa", templates=t) == "HeLa cells, a dose, treated with x"
    t = PromptTemplates(compound="{cell} cells treated with {name}, SMILES: {smiles}, in 2D")
    assert compound_prompt("x", None, cell="HeLa", templates=t) == "HeLa cells treated with x, in 2D"
    # a value used twice: both of its clauses go, no "{smiles}" is left in the prompt
    t = PromptTemplates(compound="{cell}, compound {name}, SMILES {smiles}, again SMILES {smiles}, end")
    assert compound_prompt("x", None, cell="HeLa", templates=t) == "HeLa, compound x, end"


def test_a_missing_value_without_a_clause_is_an_error_naming_it():
    t = PromptTemplates(compound="{smiles} given to {cell} cells ({name})")
    with pytest.raises(MetadataError, match="needs a value for smiles"):
        compound_prompt("x", None, cell="HeLa", templates=t)


def test_templates_round_trip():
    t = PromptTemplates(compound="{cell}: {name}", max_length=99, poscon_as_control=True)
    d = t.to_dict()
    assert d["compound"] == "{cell}: {name}" and d["max_length"] == 99 and d["poscon_as_control"] is True
    assert PromptTemplates(**d) == t


# ---------------------------------------------------------------------- rows of a table
def test_build_prompt_reads_the_row_keys_it_documents():
    assert build_prompt({"Metadata_modality": "crispr", "Metadata_gene": "TP53", "Metadata_sequence": "ACGT",
                         "Metadata_cell_line": "U2OS"}) == \
        "U2OS cells treated with crispr sequence: ACGT, targeting genes: TP53"
    # the gene may come as pert_iname, the SMILES as "SMILES", the name as "name"
    assert build_prompt({"pert_type": "crispr", "pert_iname": "TP53", "target_sequence": "ACGT",
                         "cell_line": "U2OS"}) == "U2OS cells treated with crispr sequence: ACGT, targeting genes: TP53"
    assert build_prompt({"modality": "ORF", "pert_iname": "KCNN1", "cell_line": "U2OS"}) == \
        "U2OS cells treated with orf, targeting genes: KCNN1"
    assert build_prompt({"name": "aspirin", "SMILES": "CCO", "cell_line": "A549"}) == \
        "A549 cells treated with compound: aspirin, SMILES: CCO"
    assert build_prompt({"pert_iname": "aspirin", "pert_type": "trt", "smiles": "CCO"}) == \
        "Cells treated with compound: aspirin, SMILES: CCO"
    # "modality" wins over "pert_type"; an unknown modality is a compound
    assert build_prompt({"modality": "orf", "pert_type": "compound", "gene": "KCNN1", "cell_line": "U2OS"}) == \
        "U2OS cells treated with orf, targeting genes: KCNN1"
    assert build_prompt({"modality": "peptide", "pert_iname": "x", "cell_line": "A549"}) == \
        "A549 cells treated with compound: x"


def test_build_prompt_control_flags():
    row = {"pert_iname": "DMSO", "smiles": "CS(C)=O", "cell_line": "A549"}
    assert build_prompt(row) == "A549 cells treated with compound: DMSO, SMILES: CS(C)=O"
    for flag in ({"Metadata_is_control": True}, {"is_control": "True"}, {"is_control": 1}):
        assert build_prompt({**row, **flag}, PromptTemplates(poscon_as_control=True)) == \
            "A549 cells treated with compound: control"
    for flag in ({"Metadata_is_control": False}, {"is_control": float("nan")}, {"is_control": None}):
        assert build_prompt({**row, **flag}, PromptTemplates(poscon_as_control=True)) == \
            "A549 cells treated with compound: DMSO, SMILES: CS(C)=O"
    # an explicit control type wins over the flag
    assert build_prompt({**row, "control_type": "negcon", "is_control": False}) == \
        "A549 cells treated with compound: control, DMSO, SMILES: CS(C)=O"
    assert build_prompt({"pert_type": "orf", "gene": "LacZ", "is_control": True, "cell_line": "U2OS"}) == \
        GENETIC_CONTROL


def test_build_prompt_passes_the_templates_on():
    t = PromptTemplates(compound="{cell} + {name}", crispr="{cell} crispr {gene}",
                        crispr_no_sequence="{cell} ko {gene}",
                        orf="{cell} orf {gene}", genetic_control="{cell} nothing")
    assert build_prompt({"pert_iname": "x", "cell_line": "A"}, t) == "A + x"
    assert build_prompt({"pert_type": "crispr", "gene": "G", "cell_line": "A"}, t) == "A ko G"
    assert build_prompt({"pert_type": "orf", "gene": "G", "cell_line": "A"}, t) == "A orf G"
    assert build_prompt({"pert_type": "orf", "gene": "G", "control_type": "negcon", "cell_line": "A"}, t) == \
        "A nothing"
