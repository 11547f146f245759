"""CellProfiler LoadData CSVs (the Cell Painting Gallery manifest): paths relative to the CSV in
sub-folders, frames, plate names, dye-named stain columns, several CSVs under one folder, and the
exact message of every refusal."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd
import pytest

from napari_cellclip.errors import CellClipWarning, PlateError
from napari_cellclip.plates import read_load_data, read_plate, stains, summarize, write_load_data


def _csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _row(well="A01", site=1, plate="P1", stains_=("DNA", "ER"), path=None, **extra):
    r = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site}
    for s in stains_:
        r[f"FileName_Orig{s}"] = f"{well}_s{site}_{s}.tif"
        if path is not None:
            r[f"PathName_Orig{s}"] = path
    r.update(extra)
    return r


def _message(exc_info) -> str:
    return str(exc_info.value)


def test_relative_paths_resolve_against_the_csv_folder(tmp_path, monkeypatch):
    plate = tmp_path / "plate"
    (plate / "images").mkdir(parents=True)
    csv = _csv(plate / "meta" / "load_data.csv", [
        {**_row("A01", path="../images"), "PathName_OrigER": ""},
        {**_row("A02", path="../images/./"), "PathName_OrigER": "sub/dir"},
    ])
    monkeypatch.chdir(tmp_path)  # not where the CSV is
    df = read_load_data(csv)
    assert df["PathName_OrigDNA"].tolist() == [str((plate / "images").resolve())] * 2
    assert df["PathName_OrigER"].tolist() == [str((plate / "meta").resolve()),
                                              str((plate / "meta" / "sub" / "dir").resolve())]
    # a relative CSV path gives the same table
    pd.testing.assert_frame_equal(read_load_data(Path("plate/meta/load_data.csv")), df)


def test_absolute_paths_are_kept_as_written(tmp_path):
    csv = _csv(tmp_path / "load_data.csv", [_row(path="/data/run1/../images")])
    df = read_load_data(csv)
    assert df["PathName_OrigDNA"].tolist() == ["/data/run1/../images"]


def test_without_path_columns_the_images_are_beside_the_csv(tmp_path):
    csv = _csv(tmp_path / "sub" / "load_data.csv", [_row()])
    df = read_load_data(csv)
    assert df["PathName_OrigDNA"].tolist() == [str((tmp_path / "sub").resolve())]
    assert list(df.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "FileName_OrigDNA",
                                "PathName_OrigDNA", "FileName_OrigER", "PathName_OrigER"]


def test_columns_and_rows_come_out_in_table_order(tmp_path):
    rows = [_row("B02", 2, "P2", path=".", Metadata_Batch="b2", Frame_OrigER=1, Note="z"),
            _row("a1", 3, "P1", path=".", Metadata_Batch="b1", Frame_OrigER=0, Note="y"),
            _row("A01", 1, "P1", path=".", Metadata_Batch="b1", Frame_OrigER=0, Note="x")]
    df = read_load_data(_csv(tmp_path / "load_data.csv", rows))
    assert list(df.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Batch",
                                "FileName_OrigDNA", "PathName_OrigDNA", "FileName_OrigER", "PathName_OrigER",
                                "Frame_OrigER", "Note"]
    assert df[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].values.tolist() == [
        ["P1", "A01", 1], ["P1", "A01", 3], ["P2", "B02", 2]]
    assert df["Note"].tolist() == ["x", "y", "z"] and df.index.tolist() == [0, 1, 2]
    assert df["Metadata_Site"].dtype.kind == "i" and str(df["Frame_OrigER"].dtype) == "Int64"
    assert df["Frame_OrigER"].tolist() == [0, 0, 1]
    assert df.attrs["stain_source"] == "load_data"
    assert summarize(df) == "2 plate(s), 2 well(s), 3 field(s); stains ['DNA', 'ER']"


def test_numeric_plate_names_stay_text_and_plate_overrides(tmp_path):
    csv = _csv(tmp_path / "load_data.csv", [_row(plate="0012", path="."), _row("A02", plate="0012", path=".")])
    df = read_load_data(csv)
    assert df["Metadata_Plate"].tolist() == ["0012", "0012"]
    assert read_load_data(csv, plate="Renamed")["Metadata_Plate"].tolist() == ["Renamed", "Renamed"]
    # with a plate name given, the CSV needs no Metadata_Plate column
    no_plate = _csv(tmp_path / "np.csv", [{k: v for k, v in _row().items() if k != "Metadata_Plate"}])
    assert read_load_data(no_plate, plate="X")["Metadata_Plate"].tolist() == ["X"]
    assert read_plate(no_plate, plate="X")["Metadata_Plate"].tolist() == ["X"]
    with pytest.raises(PlateError) as err:
        read_load_data(no_plate)
    assert _message(err) == f"{no_plate}: missing column(s) ['Metadata_Plate']"


def test_blank_frames_are_single_channel_files(tmp_path):
    # "" as pandas writes a missing frame, "NA" as R does
    rows = [_row(path=".", Frame_OrigDNA="2"), _row("A02", path=".", Frame_OrigDNA=""),
            _row("A03", path=".", Frame_OrigDNA="NA")]
    df = read_load_data(_csv(tmp_path / "load_data.csv", rows))
    assert df["Frame_OrigDNA"].iloc[0] == 2 and df["Frame_OrigDNA"].iloc[1:].isna().all()


# ----------------------------------------------------------------------------- refusals


def test_a_missing_or_empty_csv_is_named(tmp_path):
    with pytest.raises(PlateError) as err:
        read_load_data(tmp_path / "nope.csv")
    assert _message(err) == f"LoadData CSV not found: {tmp_path / 'nope.csv'}"
    with pytest.raises(PlateError) as err:
        read_load_data(tmp_path)  # a folder is not a CSV
    assert _message(err) == f"LoadData CSV not found: {tmp_path}"
    empty = tmp_path / "empty.csv"
    empty.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,FileName_OrigDNA\n")
    with pytest.raises(PlateError) as err:
        read_load_data(empty)
    assert _message(err) == f"{empty}: the LoadData CSV has no rows"
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    with pytest.raises(PlateError, match=re.escape(f"{blank}: cannot read as CSV (")):
        read_load_data(blank)


def test_a_csv_that_is_not_load_data_is_named(tmp_path):
    f = _csv(tmp_path / "other.csv", [{"Metadata_Well": "A01", "Metadata_Site": 1, "Image": "a.tif"}])
    with pytest.raises(PlateError) as err:
        read_load_data(f)
    assert _message(err) == f"{f}: no FileName_Orig<Stain> columns (is this a CellProfiler LoadData CSV?)"
    g = tmp_path / "ragged.csv"
    g.write_text("Metadata_Well,FileName_OrigDNA\nA01,a.tif\nA02,b.tif,extra,more\n")
    with pytest.raises(PlateError, match=re.escape(f"{g}: cannot read as CSV (")):
        read_load_data(g)
    h = _csv(tmp_path / "nosite.csv", [{"Metadata_Well": "A01", "FileName_OrigDNA": "a.tif"}])
    with pytest.raises(PlateError) as err:
        read_load_data(h)
    assert _message(err) == f"{h}: missing column(s) ['Metadata_Site', 'Metadata_Plate']"


def test_bad_wells_are_listed_by_csv_line(tmp_path):
    rows = [_row(w) for w in ("A01", "Z1x", "A03", "13", "B", "C-1", "??", "A06", "AB123")]
    f = _csv(tmp_path / "load_data.csv", rows)
    with pytest.raises(PlateError) as err:
        read_load_data(f)
    assert _message(err) == (f"{f}: unknown well name(s) row 3: 'Z1x', row 5: '13', row 6: 'B', row 7: 'C-1', "
                             "row 8: '??' ...")
    five = _csv(tmp_path / "five.csv", [_row(w) for w in ("Z1x", "13", "B", "A01", "C-1", "??")])
    with pytest.raises(PlateError) as err:
        read_load_data(five)
    assert _message(err) == (f"{five}: unknown well name(s) row 2: 'Z1x', row 3: '13', row 4: 'B', row 6: 'C-1', "
                             "row 7: '??'")
    few = _csv(tmp_path / "few.csv", [_row("A01"), _row("A00")])
    with pytest.raises(PlateError) as err:
        read_load_data(few)
    assert _message(err) == f"{few}: unknown well name(s) row 3: 'A00'"


def test_sites_must_be_whole_numbers(tmp_path):
    f = _csv(tmp_path / "load_data.csv", [_row(site="1"), _row("A02", site="two")])
    with pytest.raises(PlateError, match=re.escape(f"{f}: Metadata_Site must be whole numbers (")):
        read_load_data(f)


def test_a_field_listed_twice_is_refused(tmp_path):
    f = _csv(tmp_path / "load_data.csv", [_row("A01", 2), _row("B01", 1), _row("a1", 2)])
    with pytest.raises(PlateError) as err:
        read_load_data(f)
    assert _message(err) == "field ['P1', 'A01', 2] (plate, well, site) appears more than once"


# ----------------------------------------------------------------------------- dye-named stain columns


def test_dye_named_columns_become_stains_frames_included(tmp_path):
    rows = [_row(stains_=("Hoechst", "ERSyto", "Brightfield"), path=".", Frame_OrigHoechst=0)]
    f = _csv(tmp_path / "load_data.csv", rows)
    with pytest.warns(CellClipWarning) as rec:
        df = read_load_data(f)
    said = [str(w.message) for w in rec]
    assert said == [f"{f}: LoadData stain names are dye names; renamed by the dye vocabulary "
                    "(napari_cellclip.formats.dyes): ch1 'Hoechst' → DNA, ch2 'ERSyto' → ER"]
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert stains(df) == ["DNA", "ER", "Brightfield"]
    assert df["FileName_OrigDNA"].tolist() == ["A01_s1_Hoechst.tif"] and df["Frame_OrigDNA"].tolist() == [0]
    assert "PathName_OrigDNA" in df and not any("Hoechst" in c for c in df.columns)


def test_dye_names_are_kept_when_two_would_become_one_stain(tmp_path):
    f = _csv(tmp_path / "load_data.csv", [_row(stains_=("Hoechst", "DAPI", "Mito"), path=".")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_load_data(f)
    assert stains(df) == ["Hoechst", "DAPI", "Mito"]


def test_stain_names_already_canonical_are_not_warned_about(tmp_path):
    f = _csv(tmp_path / "load_data.csv", [_row(stains_=("DNA", "Mito", "Brightfield"), path=".")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stains(read_load_data(f)) == ["DNA", "Mito", "Brightfield"]


# ----------------------------------------------------------------------------- folders of CSVs


def test_a_folder_with_load_data_csvs_in_sub_folders_reads_them_all(tmp_path):
    plate = tmp_path / "batch"
    _csv(plate / "P2" / "load_data.csv", [_row("A01", plate="P2", path="images")])
    _csv(plate / "P1" / "load_data.csv", [_row("B01", plate="P1", path="../P1/images"), _row("A01", plate="P1")])
    _csv(plate / "platemap.csv", [{"well": "A01", "compound": "x"}])  # not LoadData: passed over
    (plate / "P1" / "r01c01f01p01-ch1sk1fk1fl1.tiff").write_bytes(b"")  # images beside: the CSV wins
    df = read_plate(plate)
    assert df[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["P1", "A01"], ["P1", "B01"], ["P2", "A01"]]
    assert df["PathName_OrigDNA"].tolist() == [str((plate / "P1").resolve()), str((plate / "P1" / "images").resolve()),
                                               str((plate / "P2" / "images").resolve())]
    assert df.attrs["stain_source"] == "load_data"
    assert read_plate(plate, layout="load_data").equals(df)


def test_one_plate_name_for_a_folder_makes_repeated_fields_clash(tmp_path):
    _csv(tmp_path / "P1" / "load_data.csv", [_row("A01", plate="P1")])
    _csv(tmp_path / "P2" / "load_data.csv", [_row("A01", plate="P2")])
    assert len(read_plate(tmp_path)) == 2
    with pytest.raises(PlateError, match=re.escape("field ['ONE', 'A01', 1] (plate, well, site) appears more")):
        read_plate(tmp_path, plate="ONE")


def test_load_data_csvs_naming_different_stains_are_refused(tmp_path):
    _csv(tmp_path / "a" / "load_data.csv", [_row(stains_=("DNA", "ER"))])
    _csv(tmp_path / "b" / "load_data.csv", [_row("A02", stains_=("DNA", "Mito"))])
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path)
    assert _message(err) == (f"{tmp_path}: the LoadData CSVs name different stains: "
                             "load_data.csv: ['DNA', 'ER']; load_data.csv: ['DNA', 'Mito']")


def test_layout_load_data_needs_a_csv_and_other_layouts_pass_it_over(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    for ch in (1, 2):
        (tmp_path / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff").write_bytes(b"")
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path, layout="load_data")
    assert _message(err) == f"{tmp_path}: no LoadData CSV (with FileName_Orig<Stain> columns) found"
    _csv(tmp_path / "load_data.csv", [_row(stains_=("DNA",))])
    assert read_plate(tmp_path).attrs["stain_source"] == "load_data"
    phenix = read_plate(tmp_path, layout="phenix", channel_map="1=DNA,2=ER")
    assert phenix.attrs["stain_source"] == "folder" and stains(phenix) == ["DNA", "ER"]


def test_write_load_data_round_trips_and_replaces(tmp_path):
    f = _csv(tmp_path / "in" / "load_data.csv", [_row("B01", path="."), _row("A01", 2, path=".")])
    df = read_load_data(f)
    out = tmp_path / "out" / "manifest.csv"
    out.parent.mkdir()
    out.write_text("old")
    assert write_load_data(df, str(out)) == out
    assert out.read_text().splitlines()[0] == ",".join(df.columns)
    pd.testing.assert_frame_equal(read_load_data(out), df)
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.csv"]  # no temporary file left
