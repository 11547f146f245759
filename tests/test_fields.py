"""The one front door: read_fields from a folder, CSV, parquet, manifest, DataFrame or a list."""

from __future__ import annotations

import pandas as pd
import pytest

from napari_cellclip.errors import PlateError
from napari_cellclip.fields import read_fields
from napari_cellclip.sample import load_sample_fields, sample_plate_dir, sample_platemap_dir


def _renamed_copy(tmp_path, name):
    """The bundled plate's LoadData CSV as plate ``name`` (images stay where they are)."""
    t = pd.read_csv(sample_plate_dir() / "load_data.csv")
    t["Metadata_Plate"] = name
    for col in [c for c in t.columns if c.startswith("PathName_")]:
        t[col] = str(sample_plate_dir())
    d = tmp_path / name
    d.mkdir()
    t.to_csv(d / "load_data.csv", index=False)
    return d / "load_data.csv"


def test_every_input_gives_the_same_table(tmp_path):
    ref = read_fields(sample_plate_dir())
    assert len(ref) == 12 and list(ref.filter(like="FileName_Orig").columns) == [
        f"FileName_Orig{s}" for s in ("DNA", "ER", "RNA", "AGP", "Mito")]
    pd.testing.assert_frame_equal(read_fields(sample_plate_dir() / "load_data.csv"), ref)
    ref.to_parquet(tmp_path / "fields.parquet")
    pd.testing.assert_frame_equal(read_fields(tmp_path / "fields.parquet"), ref)
    pd.testing.assert_frame_equal(read_fields(ref), ref)
    (tmp_path / "plates.txt").write_text(f"# one plate\n\n{sample_plate_dir()}\n")
    pd.testing.assert_frame_equal(read_fields(tmp_path / "plates.txt"), ref)
    # relative manifest entries resolve against the manifest's folder
    second = _renamed_copy(tmp_path, "SQ2")
    (tmp_path / "two.txt").write_text(f"{sample_plate_dir()}\nSQ2/load_data.csv\n")
    two = read_fields(tmp_path / "two.txt")
    assert len(two) == 24 and sorted(set(two["Metadata_Plate"])) == ["SQ00015198", "SQ2"]
    pd.testing.assert_frame_equal(read_fields([sample_plate_dir(), second]), two)


def test_annotation_through_the_front_door(tmp_path):
    fields = read_fields(sample_plate_dir(), platemap=sample_platemap_dir(), cell_line="A549")
    pd.testing.assert_frame_equal(fields, load_sample_fields())
    assert fields.loc[fields["Metadata_Well"] == "P13", "Metadata_prompt"].iloc[0] == \
        "A549 cells treated with compound: lonafarnib"
    plain = read_fields(sample_plate_dir(), platemap=sample_platemap_dir())
    assert plain["Metadata_prompt"].iloc[0].startswith("Cells treated with")
    # a table annotated without a cell line gets one, prompts rewritten
    named = read_fields(plain, cell_line="U2OS")
    assert set(named["Metadata_cell_line"]) == {"U2OS"}
    assert all(p.startswith("U2OS cells treated with") for p in named["Metadata_prompt"])
    # one platemap file for every plate
    one = read_fields(sample_plate_dir(), platemap=sample_platemap_dir() / "C-7161-01-LM6-014.txt")
    assert one["Metadata_broad_sample"].tolist() == plain["Metadata_broad_sample"].tolist()


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(PlateError, match="no such plate folder or manifest"):
        read_fields(tmp_path / "missing")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(PlateError, match="lists no plates"):
        read_fields(tmp_path / "empty.txt")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(PlateError, match="not a fields table"):
        read_fields(tmp_path / "x.parquet")
    with pytest.raises(PlateError, match="appear more than once.*A01 site 1"):
        read_fields([sample_plate_dir(), sample_plate_dir() / "load_data.csv"])
    with pytest.raises(PlateError, match="empty"):
        read_fields(read_fields(sample_plate_dir()).iloc[:0])
    (tmp_path / "nested.txt").write_text(str(tmp_path / "empty.txt"))
    with pytest.raises(PlateError, match="another manifest"):
        read_fields(tmp_path / "nested.txt")
    four = read_fields(sample_plate_dir()).drop(columns=["FileName_OrigMito", "PathName_OrigMito"])
    with pytest.raises(PlateError, match="different stains"):
        read_fields([read_fields(sample_plate_dir()), four])


def test_stain_order_kept_and_canonical_for_training():
    from training.data import read_training_fields

    f = read_fields(sample_plate_dir())
    cols = [c for c in f.columns if not c.startswith(("FileName_", "PathName_"))]
    shuffled = f[cols + [c for s in ("Mito", "DNA", "AGP", "ER", "RNA")
                         for c in (f"FileName_Orig{s}", f"PathName_Orig{s}")]]
    pd.testing.assert_frame_equal(read_fields(shuffled), shuffled)  # the plate's channel order
    pd.testing.assert_frame_equal(read_training_fields(shuffled), f)  # a new model's order
