"""Control wells read from a table row (issue 16): a ``pert_type`` of negcon / poscon / empty
(JUMP, CP-JUMP1) marks the control when there is no ``control_type``; an empty well gets the
"no treatment" text whatever its modality and name; the error messages for a genetic well
without its gene read as English."""

from __future__ import annotations

import pytest

from napari_cellclip.errors import MetadataError
from napari_cellclip.prompts import (PromptTemplates, build_prompt, compound_prompt, crispr_prompt, orf_prompt,
                                    read_flag)

DMSO = {"pert_iname": "DMSO", "smiles": "CS(C)=O", "cell_line": "U2OS"}


def test_pert_type_negcon_marks_a_negative_control():
    assert build_prompt({**DMSO, "pert_type": "negcon"}) == \
        "U2OS cells treated with compound: control, DMSO, SMILES: CS(C)=O"
    assert build_prompt({**DMSO, "Metadata_pert_type": "NEGCON"}) == \
        "U2OS cells treated with compound: control, DMSO, SMILES: CS(C)=O"
    # a treatment's pert_type is no control
    assert build_prompt({**DMSO, "pert_type": "trt"}) == "U2OS cells treated with compound: DMSO, SMILES: CS(C)=O"


def test_pert_type_poscon_marks_a_control_the_templates_may_collapse():
    row = {"pert_iname": "staurosporine", "pert_type": "poscon", "cell_line": "U2OS"}
    assert build_prompt(row) == "U2OS cells treated with compound: staurosporine"
    assert build_prompt(row, PromptTemplates(poscon_as_control=True)) == "U2OS cells treated with compound: control"


def test_an_explicit_control_type_wins_over_pert_type():
    row = {**DMSO, "pert_type": "poscon", "control_type": "negcon"}
    assert build_prompt(row) == "U2OS cells treated with compound: control, DMSO, SMILES: CS(C)=O"
    row = {"pert_iname": "staurosporine", "pert_type": "negcon", "control_type": "poscon", "cell_line": "U2OS"}
    assert build_prompt(row) == "U2OS cells treated with compound: staurosporine"


@pytest.mark.parametrize("row", [
    # JUMP's empty well: a compound row with the JCP2022_999999 id, no name, no SMILES
    {"Metadata_JCP2022": "JCP2022_999999", "Metadata_control_type": "empty", "Metadata_pert_type": "compound"},
    {"JCP2022": "JCP2022_999999", "pert_type": "empty"},
    {"pert_iname": "DMSO", "smiles": "CS(C)=O", "control_type": "EMPTY"},
    {"pert_iname": "KCNN1", "modality": "orf", "control_type": "Empty"},
    {"gene": "TP53", "target_sequence": "ACGT", "modality": "crispr", "control_type": "empty"},
])
def test_an_empty_well_gets_the_no_treatment_text(row):
    assert build_prompt({**row, "cell_line": "U2OS"}) == "U2OS cells treated with control, no treatment."
    assert build_prompt({**row, "cell_line": "nan"}) == "Cells treated with control, no treatment."
    t = PromptTemplates(genetic_control="{cell} cells left untreated")
    assert build_prompt({**row, "Metadata_cell_line": "HeLa"}, t) == "HeLa cells left untreated"


def test_an_is_control_flag_marks_a_control_of_no_particular_kind():
    # neither negative (its compound keeps its name) nor positive (a genetic control's gene is dropped)
    assert build_prompt({**DMSO, "is_control": True}) == "U2OS cells treated with compound: DMSO, SMILES: CS(C)=O"
    assert build_prompt({"pert_iname": None, "smiles": None, "is_control": True, "cell_line": "U2OS"}) == \
        "U2OS cells treated with compound: control"
    row = {"modality": "crispr", "gene": "PLK1", "target_sequence": "ACGT", "cell_line": "U2OS"}
    assert build_prompt({**row, "is_control": True}) == "U2OS cells treated with control, no treatment."
    assert build_prompt({**row, "control_type": "poscon", "is_control": True}) == \
        "U2OS cells treated with crispr sequence: ACGT, targeting genes: PLK1"
    assert build_prompt({**row, "modality": "orf", "is_control": 1}) == \
        "U2OS cells treated with control, no treatment."


def test_missing_gene_messages():
    with pytest.raises(MetadataError, match=r"^a CRISPR prompt needs the targeted gene$"):
        crispr_prompt(None, "ACGT", cell="U2OS")
    with pytest.raises(MetadataError, match=r"^an ORF prompt needs the overexpressed gene$"):
        orf_prompt("nan", cell="U2OS")
    with pytest.raises(MetadataError, match=r"^a CRISPR prompt needs the targeted gene$"):
        build_prompt({"modality": "crispr", "target_sequence": "ACGT", "cell_line": "U2OS"})
    with pytest.raises(MetadataError, match=r"^an ORF prompt needs the overexpressed gene$"):
        build_prompt({"pert_type": "orf", "cell_line": "U2OS"})


def test_missing_compound_message():
    with pytest.raises(MetadataError, match=r"^a compound prompt needs a name or a SMILES string$"):
        compound_prompt(float("nan"), "none", cell="U2OS")


@pytest.mark.parametrize("no", [False, 0, 0.0, "False", "false", " FALSE ", "0", "0.0", "no", "No", "n", "f",
                                "off", "", "nan", None, float("nan")])
def test_an_is_control_flag_read_as_text_that_says_no_is_no_control(no):
    # a table read with dtype=str holds "False" / "0": not a control (bool("False") is True)
    assert read_flag(no) is False  # the one reading, shared with correction.control_mask
    row = {"modality": "crispr", "gene": "PLK1", "target_sequence": "ACGT", "cell_line": "U2OS"}
    assert build_prompt({**row, "is_control": no}) == \
        "U2OS cells treated with crispr sequence: ACGT, targeting genes: PLK1"
    assert build_prompt({"modality": "orf", "gene": "KCNN1", "Metadata_is_control": no, "cell_line": "U2OS"}) == \
        "U2OS cells treated with orf, targeting genes: KCNN1"
    assert build_prompt({**DMSO, "is_control": no}, PromptTemplates(poscon_as_control=True)) == \
        "U2OS cells treated with compound: DMSO, SMILES: CS(C)=O"


@pytest.mark.parametrize("yes", [True, 1, 2.5, "True", "true", " TRUE ", "1", "1.0", "yes", "Y", "t", "on", "x"])
def test_an_is_control_flag_that_says_yes_is_a_control(yes):
    assert read_flag(yes) is True
    row = {"modality": "crispr", "gene": "PLK1", "target_sequence": "ACGT", "cell_line": "U2OS"}
    assert build_prompt({**row, "is_control": yes}) == "U2OS cells treated with control, no treatment."
    assert build_prompt({"modality": "orf", "gene": "KCNN1", "Metadata_is_control": yes, "cell_line": "U2OS"}) == \
        "U2OS cells treated with control, no treatment."
    assert build_prompt({**DMSO, "is_control": yes}, PromptTemplates(poscon_as_control=True)) == \
        "U2OS cells treated with compound: control"
