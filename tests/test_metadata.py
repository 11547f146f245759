"""Perturbation metadata join and CellCLIP prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from napari_cellclip.errors import CellClipWarning, MetadataError
from napari_cellclip.metadata import annotate, prompts_for_table, read_annotations
from napari_cellclip.plates import read_plate
from napari_cellclip.prompts import PromptTemplates, build_prompt, compound_prompt, crispr_prompt, orf_prompt
from napari_cellclip.sample import load_sample_fields, sample_plate_dir, sample_platemap_dir

JUMP = Path(__file__).parent / "data" / "jump-target"

DMSO = "A549 cells treated with compound: control, DMSO"
ORANTINIB = "A549 cells treated with compound: orantinib"
LONAFARNIB = "A549 cells treated with compound: lonafarnib"


def test_sample_plate_annotation():
    df = load_sample_fields()
    by_well = df.groupby("Metadata_Well").first()
    assert by_well.loc["A01", "Metadata_prompt"] == DMSO
    assert by_well.loc["J18", "Metadata_prompt"] == DMSO
    assert by_well.loc["A13", "Metadata_prompt"] == ORANTINIB
    assert by_well.loc["P13", "Metadata_prompt"] == LONAFARNIB
    assert by_well.loc["P13", "Metadata_moa"] == "farnesyltransferase inhibitor"
    assert by_well.loc["A13", "Metadata_broad_sample"] == "BRD-K55966568-001-05-4"
    assert by_well.loc["A13", "Metadata_dose"] == pytest.approx(10.0)
    assert by_well.loc["A01", "Metadata_is_control"] and by_well.loc["A01", "Metadata_control_type"] == "negcon"
    assert not by_well.loc["P13", "Metadata_is_control"]
    assert (df["Metadata_cell_line"] == "A549").all() and (df["Metadata_pert_type"] == "compound").all()
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_pert_iname", "Metadata_prompt"):
        assert col in df.columns
    assert not df["Metadata_prompt"].str.contains("nan|None").any()


def test_shared_plates_prompts(shared_lincs):
    df = annotate(read_plate(shared_lincs / "images"), platemap_dir=shared_lincs / "platemap", cell_line="A549")
    counts = df.groupby(["Metadata_Plate", "Metadata_prompt"]).size()
    for plate in ("SQ00015198", "SQ00015230", "SQ00015231"):
        assert counts[(plate, DMSO)] == 18 and counts[(plate, ORANTINIB)] == 9 and counts[(plate, LONAFARNIB)] == 9


def _platemap_copy(tmp_path) -> Path:
    d = tmp_path / "platemap"
    shutil.copytree(sample_platemap_dir(), d)
    return d


def test_platemap_without_row_for_a_well(tmp_path):
    d = _platemap_copy(tmp_path)
    pm = d / "C-7161-01-LM6-014.txt"
    lines = [ln for ln in pm.read_text().splitlines() if "\tP13\t" not in ln]
    pm.write_text("\n".join(lines) + "\n")
    with pytest.warns(CellClipWarning, match="SQ00015198 P13"):
        df = annotate(read_plate(sample_plate_dir()), platemap_dir=d, cell_line="A549")
    p13 = df[df["Metadata_Well"] == "P13"]
    assert p13["Metadata_prompt"].isna().all() and len(p13) == 3
    assert (df[df["Metadata_Well"] == "A13"]["Metadata_prompt"] == ORANTINIB).all()  # rest annotated


def test_annotation_without_a_name(tmp_path):
    d = _platemap_copy(tmp_path)
    ann = d / "repurposing_info_external_moa_map_resolved.tsv"
    table = pd.read_csv(ann, sep="\t", dtype=str, keep_default_na=False)
    table.loc[table["broad_id"] == "BRD-K41599323", "pert_iname"] = ""
    table.to_csv(ann, sep="\t", index=False)
    with pytest.warns(CellClipWarning, match="without a name.*BRD-K41599323-001-02-3"):
        df = annotate(read_plate(sample_plate_dir()), platemap_dir=d, cell_line="A549")
    p13 = df[df["Metadata_Well"] == "P13"]
    assert (p13["Metadata_pert_iname"] == "BRD-K41599323").all()
    assert (p13["Metadata_prompt"] == "A549 cells treated with compound: BRD-K41599323").all()


def test_unknown_plate_barcode(tmp_path):
    d = _platemap_copy(tmp_path)
    (d / "barcode_platemap.csv").write_text("Assay_Plate_Barcode,Plate_Map_Name\nOTHER,C-7161-01-LM6-014\n")
    with pytest.raises(MetadataError, match="plate SQ00015198 is not in"):
        annotate(read_plate(sample_plate_dir()), platemap_dir=d)


def test_platemap_with_bad_well(tmp_path):
    d = _platemap_copy(tmp_path)
    pm = d / "C-7161-01-LM6-014.txt"
    pm.write_text(pm.read_text().replace("\tA02\t", "\tXX2y\t", 1))
    with pytest.raises(MetadataError, match="XX2y"):
        annotate(read_plate(sample_plate_dir()), platemap_dir=d)


def test_missing_platemap_folder(tmp_path):
    with pytest.raises(MetadataError, match="not found"):
        annotate(read_plate(sample_plate_dir()), platemap_dir=tmp_path / "nope")


def test_jump_target_platemap_join():
    fields = read_plate(sample_plate_dir())
    df = annotate(fields, platemap=JUMP / "JUMP-Target-1_compound_platemap.tsv",
                  annotations=JUMP / "JUMP-Target-1_compound_metadata.tsv", cell_line="U2OS")
    a01 = df[df["Metadata_Well"] == "A01"].iloc[0]
    assert a01["Metadata_pert_iname"] == "gabapentin-enacarbil"
    assert a01["Metadata_prompt"] == ("U2OS cells treated with compound: gabapentin-enacarbil, SMILES: "
                                      "CC(OC(=O)NCC1(CC(=O)O)CCCCC1)OC(=O)C(C)C")


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "meta, modality",
    [
        ("JUMP-Target-1_compound_metadata.tsv", "compound"),
        ("JUMP-Target-2_compound_metadata.tsv", "compound"),
        ("JUMP-Target-1_crispr_metadata.tsv", "crispr"),
        ("JUMP-Target-1_orf_metadata.tsv", "orf"),
    ],
)
def test_every_jump_target_prompt_builds(meta, modality):
    table = pd.read_csv(JUMP / meta, sep="\t", dtype=str, keep_default_na=False)
    prompts = prompts_for_table(table, modality=modality, cell_line="U2OS")
    assert len(prompts) == len(table)
    for p in prompts:
        assert p.startswith("U2OS cells treated with")
        assert "nan" not in p.lower().split() and "None" not in p and "{" not in p
        assert len(p) <= 512
    if modality == "crispr":
        assert "U2OS cells treated with control, no treatment." in prompts
        assert any(p.startswith("U2OS cells treated with crispr sequence: ") for p in prompts)
    if modality == "orf":
        assert "U2OS cells treated with orf, targeting genes: KCNN1" in prompts


def test_jump_target_control_prompts():
    table = read_annotations(JUMP / "JUMP-Target-1_compound_metadata.tsv").reset_index()
    negcon = table[table["control_type"] == "negcon"].iloc[0]
    text = build_prompt({**negcon, "pert_type": "compound", "cell_line": "U2OS"})
    assert text == f"U2OS cells treated with compound: control, DMSO, SMILES: {negcon['smiles']}"
    poscon = table[table["control_type"] == "poscon_cp"].iloc[0]
    text = build_prompt({**poscon, "pert_type": "compound", "cell_line": "U2OS"})
    assert text.startswith(f"U2OS cells treated with compound: {poscon['pert_iname']}, SMILES: ")
    as_control = PromptTemplates(poscon_as_control=True)
    assert build_prompt({**poscon, "pert_type": "compound", "cell_line": "U2OS"}, as_control) == \
        "U2OS cells treated with compound: control"


def test_prompt_templates_exact():
    assert compound_prompt("aspirin", "CC(=O)Oc1ccccc1C(=O)O", cell="A549") == \
        "A549 cells treated with compound: aspirin, SMILES: CC(=O)Oc1ccccc1C(=O)O"
    assert compound_prompt("aspirin", float("nan"), cell="A549") == "A549 cells treated with compound: aspirin"
    assert compound_prompt("DMSO", "CS(C)=O", cell="A549", control="negcon") == \
        "A549 cells treated with compound: control, DMSO, SMILES: CS(C)=O"
    assert compound_prompt(None, None, cell="A549", control="poscon") == "A549 cells treated with compound: control"
    assert crispr_prompt("HIF1A", "TATG", cell="U2OS") == \
        "U2OS cells treated with crispr sequence: TATG, targeting genes: HIF1A"
    assert crispr_prompt("HIF1A", None, cell="U2OS") == "U2OS cells treated with crispr, targeting genes: HIF1A"
    assert crispr_prompt(None, None, cell="U2OS", control="negcon") == "U2OS cells treated with control, no treatment."
    assert orf_prompt("KCNN1", cell="U2OS") == "U2OS cells treated with orf, targeting genes: KCNN1"
    assert orf_prompt("LacZ", cell="U2OS", control="negcon") == "U2OS cells treated with control, no treatment."


def test_long_prompt_fallbacks():
    long_smiles = "C" * 520
    assert compound_prompt("x", long_smiles, cell="A549") == "A549 cells treated with compound, x"
    mid_smiles = "C" * 480
    assert compound_prompt("a-very-long-name" * 3, mid_smiles, cell="A549") == \
        f"A549 cells treated with SMILES: {mid_smiles}"


def test_custom_templates():
    t = PromptTemplates(compound="{cell} cells exposed to {name} (SMILES {smiles})")
    assert compound_prompt("x", "CCO", cell="HeLa", templates=t) == "HeLa cells exposed to x (SMILES CCO)"


def test_prompt_needs_a_name():
    with pytest.raises(MetadataError):
        compound_prompt(None, None, cell="A549")
