"""A compound row without a name still gets a prompt (issue 16): the "Name" column names it; with
neither a name nor a SMILES it is named by its identifier (the Broad id's compound part, a JCP2022
id, an InChIKey); with a SMILES but no name it gets the SMILES text, never its identifier."""

from __future__ import annotations

import pytest

from napari_cellclip.errors import MetadataError
from napari_cellclip.prompts import build_prompt


@pytest.mark.parametrize("key", ["Name", "Metadata_Name", "name", "pert_iname", "Metadata_pert_iname"])
def test_every_name_column_names_the_compound(key):
    assert build_prompt({key: "aspirin", "cell_line": "A549"}) == "A549 cells treated with compound: aspirin"


def test_a_name_wins_over_the_identifier():
    row = {"pert_iname": "lonafarnib", "broad_sample": "BRD-K41599323-001-02-3", "cell_line": "A549"}
    assert build_prompt(row) == "A549 cells treated with compound: lonafarnib"
    row = {"Name": "lonafarnib", "Metadata_JCP2022": "JCP2022_012818", "Metadata_cell_line": "A549"}
    assert build_prompt(row) == "A549 cells treated with compound: lonafarnib"


@pytest.mark.parametrize("ident, shown", [
    # a Broad sample id names the compound by its compound part (no batch / salt suffix) ...
    ("BRD-K41599323-001-02-3", "BRD-K41599323"),
    ("BRD-K41599323", "BRD-K41599323"),
    # ... any other identifier as it is
    ("JCP2022_012818", "JCP2022_012818"),
    ("brd-k41599323-001-02-3", "brd-k41599323-001-02-3"),
    ("BRD-K4159932", "BRD-K4159932"),
    ("XLBOFJFPXUXXAE-UHFFFAOYSA-N", "XLBOFJFPXUXXAE-UHFFFAOYSA-N"),
])
@pytest.mark.parametrize("key", ["broad_sample", "Metadata_broad_sample", "broad_id", "JCP2022",
                                 "Metadata_JCP2022", "jcp2022", "InChIKey", "Metadata_InChIKey", "inchikey"])
def test_a_compound_without_a_name_or_smiles_is_named_by_its_identifier(key, ident, shown):
    for name in ({}, {"pert_iname": float("nan")}, {"Name": ""}, {"name": "NA"}):
        row = {**name, key: ident, "cell_line": "A549"}
        assert build_prompt(row) == f"A549 cells treated with compound: {shown}"


def test_a_missing_identifier_is_skipped_for_the_next_one():
    row = {"broad_sample": "nan", "JCP2022": "JCP2022_012818", "cell_line": "A549"}
    assert build_prompt(row) == "A549 cells treated with compound: JCP2022_012818"


@pytest.mark.parametrize("smiles_key", ["smiles", "SMILES", "Metadata_smiles", "Metadata_SMILES"])
def test_a_compound_with_a_smiles_but_no_name_gets_the_smiles_text_not_its_identifier(smiles_key):
    row = {smiles_key: "CCO", "broad_sample": "BRD-K41599323-001-02-3", "cell_line": "A549"}
    assert build_prompt(row) == "A549 cells treated with SMILES: CCO"
    row = {smiles_key: "CCO", "Metadata_JCP2022": "JCP2022_012818", "name": float("nan")}
    assert build_prompt(row) == "Cells treated with SMILES: CCO"


def test_a_named_compound_without_a_smiles_keeps_its_name():
    row = {"pert_iname": "DMSO", "broad_sample": "BRD-K00000000-001-01-1", "cell_line": "A549"}
    assert build_prompt(row) == "A549 cells treated with compound: DMSO"


def test_a_row_with_nothing_to_name_it_is_an_error():
    msg = "^a compound prompt needs a name or a SMILES string$"
    with pytest.raises(MetadataError, match=msg):
        build_prompt({"cell_line": "A549"})
    with pytest.raises(MetadataError, match=msg):
        build_prompt({"pert_iname": "nan", "smiles": "", "broad_sample": None, "cell_line": "A549"})
