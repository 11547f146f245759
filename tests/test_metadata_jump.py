"""JUMP / CP-JUMP1 metadata: JCP2022 ids, InChIKey-keyed compound annotations, CRISPR/ORF gene tables,
controls; prompts for every row of the tables (copies in tests/data, see their SOURCE.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from napari_cellclip.errors import CellClipWarning, MetadataError
from napari_cellclip.metadata import annotate, prompts_for_table, read_annotations
from napari_cellclip.plates import read_plate
from napari_cellclip.prompts import PromptTemplates, build_prompt
from napari_cellclip.sample import sample_plate_dir

DATA = Path(__file__).parent / "data"
CPJUMP1 = DATA / "cpjump1"
JUMP = DATA / "jump"
TARGET = DATA / "jump-target"


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        return fn(*args, **kwargs)


def _check(prompts, n):
    assert len(prompts) == n
    for p in prompts:
        assert p.startswith("U2OS cells treated with")
        assert "nan" not in p.lower().replace(",", " ").split() and "None" not in p and "{" not in p, p
        assert len(p) <= 512


@pytest.fixture(scope="module")
def jump():
    return _quiet(read_annotations, JUMP)


@pytest.mark.parametrize("name", ["cpjump1_compound_metadata.tsv", "cpjump1_crispr_metadata.tsv",
                                  "cpjump1_orf_metadata.tsv"])
def test_every_cpjump1_prompt_builds(name):
    raw = pd.read_csv(CPJUMP1 / name, sep="\t", dtype=str, keep_default_na=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        table = read_annotations(CPJUMP1 / name)
    # blank lines are not rows; a row without an id (CP-JUMP1's DMSO negcon) cannot be looked up: said
    assert len(table) == (raw["broad_sample"] != "").sum()
    nameless = ((raw["broad_sample"] == "") & (raw != "").any(axis=1)).sum()
    assert [str(w.message) for w in rec] == ([f"{CPJUMP1 / name}: {nameless} row(s) without a sample id skipped"]
                                             if nameless else [])
    prompts = prompts_for_table(table.reset_index(), cell_line="U2OS")
    _check(prompts, len(table))
    modality = name.split("_")[1]
    assert set(table["modality"]) == {modality}
    if modality == "compound":  # CP-JUMP1 compounds have no name here: their Broad id names them
        assert "U2OS cells treated with compound: BRD-A86665761" in prompts
    else:
        assert "U2OS cells treated with control, no treatment." in prompts
        assert any(p.startswith(f"U2OS cells treated with {modality}") for p in prompts)


def test_every_jump_table_prompt_builds(jump):
    sizes = {"crispr": 7977, "orf": 15132}
    assert (jump["modality"] == "crispr").sum() == sizes["crispr"] and (jump["modality"] == "orf").sum() == sizes["orf"]
    # the Drug Repurposing Hub compounds (keyed by InChIKey, merged per key) and the compound controls
    assert (jump["modality"] == "compound").sum() >= 4_700
    _check(prompts_for_table(jump.reset_index(), cell_line="U2OS"), len(jump))
    rephub = _quiet(read_annotations, JUMP / "compound_rephub_annot.csv.gz")
    _check(prompts_for_table(rephub.reset_index(), cell_line="U2OS"), len(rephub))


@pytest.mark.parametrize("jcp, control, prompt", [
    ("JCP2022_800001", "negcon", "U2OS cells treated with control, no treatment."),  # no-guide
    ("JCP2022_800002", "negcon", "U2OS cells treated with control, no treatment."),  # non-targeting
    ("JCP2022_805264", "poscon", "U2OS cells treated with crispr, targeting genes: PLK1"),
    ("JCP2022_800003", "", "U2OS cells treated with crispr, targeting genes: A2M"),
    ("JCP2022_915131", "negcon", "U2OS cells treated with control, no treatment."),  # LacZ
    ("JCP2022_915132", "poscon", "U2OS cells treated with orf, targeting genes: eGFP"),
    ("JCP2022_900002", "", "U2OS cells treated with orf, targeting genes: NAT1"),
    ("JCP2022_033924", "negcon", "U2OS cells treated with compound: control, DMSO"),
    ("JCP2022_037716", "poscon", "U2OS cells treated with compound: AMG900"),
    ("JCP2022_999999", "empty", "U2OS cells treated with control, no treatment."),
])
def test_jump_controls_are_marked_and_prompted(jump, jcp, control, prompt):
    key = jump.attrs["aliases"].get(jcp, jcp)
    row = jump.loc[key]
    assert row["control_type"] == control
    assert build_prompt({**row, "cell_line": "U2OS"}) == prompt


def test_poscon_as_control_keeps_the_control_text(jump):
    row = jump.loc["JCP2022_805264"]
    assert build_prompt({**row, "cell_line": "U2OS"}, PromptTemplates(poscon_as_control=True)) == \
        "U2OS cells treated with control, no treatment."


def _well_table(tmp_path, wells: dict) -> Path:
    path = tmp_path / "well.csv"
    pd.DataFrame({"Metadata_Source": "source_4", "Metadata_Plate": "SQ00015198",
                  "Metadata_Well": list(wells), "Metadata_JCP2022": list(wells.values())}).to_csv(path, index=False)
    return path


def test_jcp2022_well_table_with_compounds_joined_by_inchikey(tmp_path):
    """JUMP: well → JCP2022 (well.csv) → InChIKey + SMILES (compound.csv) → name, MoA (Repurposing Hub)."""
    wells = _well_table(tmp_path, {"A01": "JCP2022_033924", "J18": "JCP2022_033924", "A13": "JCP2022_012345",
                                   "P13": "JCP2022_054321"})
    pd.DataFrame({
        "Metadata_JCP2022": ["JCP2022_033924", "JCP2022_012345", "JCP2022_054321"],
        "Metadata_InChIKey": ["IAZDPXIOMUYVGZ-UHFFFAOYSA-N", "GMROZDPZEUVIGD-UHFFFAOYSA-N",
                              "DHMTURDWPRKSOA-UHFFFAOYSA-N"],
        "Metadata_SMILES": ["CS(C)=O", "CC1=CC(=C(N1)C=C2C3=CC=CC=C3NC2=O)C", "C1CN(CCC1CC(=O)N2CCC(CC2)c3c(Br)"],
    }).to_csv(tmp_path / "compound.csv", index=False)
    fields = read_plate(sample_plate_dir())
    df = annotate(fields, platemap=wells, annotations=[tmp_path / "compound.csv", JUMP], cell_line="A549")
    by_well = df.groupby("Metadata_Well").first()
    assert by_well.loc["A01", "Metadata_prompt"] == "A549 cells treated with compound: control, DMSO, SMILES: CS(C)=O"
    assert by_well.loc["A01", "Metadata_control_type"] == "negcon" and by_well.loc["A01", "Metadata_is_control"]
    assert by_well.loc["P13", "Metadata_pert_iname"] == "lonafarnib"
    assert by_well.loc["P13", "Metadata_moa"] == "farnesyltransferase inhibitor"
    assert by_well.loc["P13", "Metadata_prompt"].startswith(
        "A549 cells treated with compound: lonafarnib, SMILES: C1CN")
    assert by_well.loc["A13", "Metadata_pert_iname"] == "orantinib"
    assert not by_well.loc["P13", "Metadata_is_control"]
    assert (df["Metadata_pert_type"] == "compound").all()


def test_jcp2022_well_table_with_crispr_and_orf(tmp_path):
    wells = _well_table(tmp_path, {"A01": "JCP2022_800002", "A13": "JCP2022_805264", "J18": "JCP2022_915131",
                                   "P13": "JCP2022_800003"})
    df = _quiet(annotate, read_plate(sample_plate_dir()), platemap=wells, annotations=JUMP, cell_line="U2OS")
    by_well = df.groupby("Metadata_Well").first()
    assert by_well["Metadata_prompt"].to_dict() == {
        "A01": "U2OS cells treated with control, no treatment.",
        "A13": "U2OS cells treated with crispr, targeting genes: PLK1",
        "J18": "U2OS cells treated with control, no treatment.",
        "P13": "U2OS cells treated with crispr, targeting genes: A2M",
    }
    assert by_well["Metadata_control_type"].to_dict() == {"A01": "negcon", "A13": "poscon", "J18": "negcon",
                                                          "P13": ""}
    assert by_well["Metadata_pert_type"].to_dict() == {"A01": "crispr", "A13": "crispr", "J18": "orf",
                                                       "P13": "crispr"}
    assert by_well.loc["P13", "Metadata_gene"] == "A2M" and by_well.loc["P13", "Metadata_pert_iname"] == "A2M"


def test_well_table_without_a_plate_is_an_error(tmp_path):
    path = tmp_path / "well.csv"
    pd.DataFrame({"Metadata_Plate": ["OTHER"], "Metadata_Well": ["A01"],
                  "Metadata_JCP2022": ["JCP2022_800001"]}).to_csv(path, index=False)
    with pytest.raises(MetadataError, match=r"SQ00015198 not in .*well.csv"):
        annotate(read_plate(sample_plate_dir()), platemap=path, annotations=JUMP)


@pytest.mark.parametrize("modality, platemap, meta, a01", [
    ("crispr", "JUMP-Target-1_crispr_platemap.tsv", CPJUMP1 / "cpjump1_crispr_metadata.tsv",
     "U2OS cells treated with crispr, targeting genes: HIF1A"),
    ("orf", "JUMP-Target-1_orf_platemap.tsv", CPJUMP1 / "cpjump1_orf_metadata.tsv",
     "U2OS cells treated with orf, targeting genes: KCNN1"),
])
def test_cpjump1_genes_tables_annotate_a_plate(modality, platemap, meta, a01):
    df = _quiet(annotate, read_plate(sample_plate_dir()), platemap=TARGET / platemap, annotations=meta,
                cell_line="U2OS")
    by_well = df.groupby("Metadata_Well").first()
    assert by_well.loc["A01", "Metadata_prompt"] == a01
    assert (df["Metadata_pert_type"] == modality).all()
    assert df["Metadata_prompt"].notna().all()
    if modality == "crispr":  # A13 holds a non-targeting guide (negcon, no gene)
        assert by_well.loc["A13", "Metadata_prompt"] == "U2OS cells treated with control, no treatment."
        assert by_well.loc["A13", "Metadata_control_type"] == "negcon"


def test_inchikey_block_fills_names(tmp_path):
    """A table with only the first InChIKey block (LINCS's InChIKey14) still finds its compound."""
    (tmp_path / "compounds.tsv").write_text("broad_sample\tInChIKey14\nBRD-K41599323-001-02-3\tDHMTURDWPRKSOA\n")
    table = read_annotations([tmp_path / "compounds.tsv", JUMP / "compound_rephub_annot.csv.gz"])
    row = table.loc["BRD-K41599323-001-02-3"]
    assert row["pert_iname"] == "lonafarnib" and row["clinical_phase"] == "Phase 3"
    assert row["target"] == "FNTA|HRAS|KRAS|NRAS"


def test_duplicate_inchikeys_are_merged():
    table = read_annotations(JUMP / "compound_rephub_annot.csv.gz")
    rolipram = table.loc["HJORMJIFDVBMOB-UHFFFAOYSA-N"]
    assert rolipram["pert_iname"] == "(R)-(-)-rolipram"  # the first name of the key
    assert set(rolipram["target"].split("|")) == {"PDE4A", "PDE4B", "PDE4C", "PDE4D", "PDE5A"}


def test_a_folder_skips_tables_without_ids_by_name():
    with pytest.warns(CellClipWarning, match="microscope_filter.csv: no sample id column"):
        read_annotations(JUMP)
    with pytest.raises(MetadataError, match="microscope_filter.csv: no sample id column"):
        read_annotations(JUMP / "microscope_filter.csv")
