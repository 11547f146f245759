"""Names a user gives or a plate carries: wells and fields in file and folder names, channel maps
(strings, dicts, channels.json / channels.txt), and renaming / reordering the stains of a table."""

from __future__ import annotations

import json
import re
import warnings

import pandas as pd
import pytest

from napari_cellclip.errors import PlateError
from napari_cellclip.plates import (
    find_channel_map, normalize_well, parse_channel_map, parse_well_site, rename_stains, reorder_stains, stains,
    well_name,
)


# ----------------------------------------------------------------------------- wells and fields in names


@pytest.mark.parametrize("name, expected", [
    ("r02c03f04", ("B03", 4)),
    ("r2c3", ("B03", None)),
    ("R16C24F1234", ("P24", 1234)),
    ("r02c03f04p01-ch1sk1fk1fl1.tiff", ("B03", 4)),
    ("img_r27c03f01.png", ("AA03", 1)),
    ("B03_s2", ("B03", 2)),
    ("b3_S2", ("B03", 2)),
    ("B03_Site2", ("B03", 2)),
    ("Well_B03_Field_2", ("B03", 2)),
    ("B03F4.TIFF", ("B03", 4)),
    ("B03-2", ("B03", 2)),
    ("B03.2", ("B03", 2)),
    ("B03 2", ("B03", 2)),
    ("B03f4", ("B03", 4)),
    ("B03_fld_3", ("B03", 3)),
    ("B03 - field - 12", ("B03", 12)),
    ("B03_site12.TIF", ("B03", 12)),
    ("B03_s2.ome.zarr", ("B03", 2)),
    ("well_B03_field_2", ("B03", 2)),
    ("AA01_s1", ("AA01", 1)),
    ("B03", ("B03", None)),
    ("B03.tiff", ("B03", None)),
    ("B03_s12345", ("B03", None)),  # five digits are no field number
    ("A123", None),                 # three digits are no column
    ("ABC12", None),                # three letters are no row
    ("xyB03", None),
    ("3B03", None),
    ("Images", None), ("SQ00015198", None), ("", None),
])
def test_well_and_field_read_from_a_name(name, expected):
    assert parse_well_site(name) == expected


def test_a_position_with_row_or_column_zero_is_no_well():
    # rows and columns count from 1: r00c05 is no well, and neither is its "r00" read as a well name
    assert parse_well_site("r00c05") is None
    assert parse_well_site("A00_s1") is None
    # a Phenix-style position that is no well does not hide a well named elsewhere in the name
    assert parse_well_site("B03_r00c05") == ("B03", None)


@pytest.mark.parametrize("row, col, name", [(1, 1, "A01"), (26, 12, "Z12"), (27, 3, "AA03"), (52, 1, "AZ01"),
                                            (53, 1, "BA01"), ("2", "7", "B07")])
def test_well_names_from_numbers(row, col, name):
    assert well_name(row, col) == name


@pytest.mark.parametrize("row, col", [(0, 1), (1, 0), (-1, 3)])
def test_well_positions_below_one_are_refused(row, col):
    with pytest.raises(PlateError, match=re.escape(f"invalid well position row={row} column={col}")):
        well_name(row, col)


@pytest.mark.parametrize("raw, well", [("a1", "A01"), (" B7 ", "B07"), ("aa24", "AA24"), ("P13", "P13")])
def test_well_names_normalised(raw, well):
    assert normalize_well(raw) == well


@pytest.mark.parametrize("raw", ["13P", "A", "A123", "ABC1", "", "A-1", "A00", "B0"])
def test_bad_well_names_are_named(raw):
    with pytest.raises(PlateError, match=re.escape(f"unknown well name {raw!r} (expected a row letter")):
        normalize_well(raw)


# ----------------------------------------------------------------------------- channel maps


@pytest.mark.parametrize("spec, expected", [
    (None, {}),
    ("", {}),
    ("1=DNA,2=ER", {1: "DNA", 2: "ER"}),
    (" 1 = DNA , 2:ER ,, ", {1: "DNA", 2: "ER"}),
    ("ch1=DNA,W2=ER,c3=RNA", {1: "DNA", 2: "ER", 3: "RNA"}),
    ("5=Mito", {5: "Mito"}),
    ("1:DNA,2:ER", {1: "DNA", 2: "ER"}),
    ("1=DNA,2=ER.txt", {1: "DNA", 2: "ER.txt"}),  # with an "=" it is a map, whatever it ends with
    ("1=Hoechst: nuclei,2: ER=ConA", {1: "Hoechst: nuclei", 2: "ER=ConA"}),  # only the first = or : splits
    ({1: " DNA ", "2": "ER", "ch3": "RNA", "w4": "AGP", "C5": "Mito"},
     {1: "DNA", 2: "ER", 3: "RNA", 4: "AGP", 5: "Mito"}),
])
def test_channel_maps_from_strings_and_dicts(spec, expected):
    assert parse_channel_map(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("DNA", "cannot read channel map entry ['DNA']; use e.g. 1=DNA"),
    ("one=DNA", "cannot read channel map entry 'one': 'DNA'; use e.g. 1=DNA"),
    ("1=", "cannot read channel map entry '1': ''; use e.g. 1=DNA"),
    ("x1=DNA", "cannot read channel map entry 'x1': 'DNA'; use e.g. 1=DNA"),
    ("1a=DNA", "cannot read channel map entry '1a': 'DNA'; use e.g. 1=DNA"),
    ({"1": " "}, "cannot read channel map entry '1': ' '; use e.g. 1=DNA"),
    ("1=DNA,2=DNA", "channel map gives the same stain to several channels: {1: 'DNA', 2: 'DNA'}"),
])
def test_bad_channel_maps_say_which_entry(spec, message):
    with pytest.raises(PlateError) as err:
        parse_channel_map(spec)
    assert str(err.value) == message


def test_channel_map_files_json_and_text(tmp_path):
    js = tmp_path / "map.json"
    js.write_text(json.dumps({"ch1": "DNA", "2": "ER"}))
    assert parse_channel_map(js) == parse_channel_map(str(js)) == {1: "DNA", 2: "ER"}
    txt = tmp_path / "map.txt"
    txt.write_text("# acquisition protocol\n\n1=DNA\n  2 , ER\nch3: RNA\n4\tAGP\n   # indented comment\nw5 = Mito\n"
                   "6=Hoechst, bleed\n")
    assert parse_channel_map(txt) == {1: "DNA", 2: "ER", 3: "RNA", 4: "AGP", 5: "Mito", 6: "Hoechst, bleed"}
    # a JSON object in a file of any name is read as JSON
    other = tmp_path / "stains"
    other.write_text('{"1": "DNA"}')
    assert parse_channel_map(other) == {1: "DNA"}
    # a file whose name has an "=" is still a file when it exists
    odd = tmp_path / "a=b"
    odd.write_text("1=DNA\n")
    assert parse_channel_map(str(odd)) == {1: "DNA"}


@pytest.mark.parametrize("suffix", [".json", ".txt", ".csv", ".tsv", ".yaml", ".yml", ".JSON"])
def test_a_missing_channel_map_file_is_named(tmp_path, suffix):
    path = tmp_path / f"channels{suffix}"
    with pytest.raises(PlateError) as err:
        parse_channel_map(str(path))
    assert str(err.value) == f"channel map file not found: {path}"


def test_a_path_object_is_always_a_file(tmp_path):
    with pytest.raises(PlateError, match="channel map file not found"):
        parse_channel_map(tmp_path / "1=DNA")


def test_a_json_file_that_is_not_an_object_is_refused(tmp_path):
    for text in ("[1, 2]", "{broken"):
        f = tmp_path / "channels.json"
        f.write_text(text)
        with pytest.raises(PlateError) as err:
            parse_channel_map(f)
        assert str(err.value) == f'{f}: not a JSON object of channel number -> stain (e.g. {{"1": "DNA"}})'
    # a text file holding a JSON list is read line by line, and its one line is no entry
    t = tmp_path / "channels.txt"
    t.write_text("[1, 2]")
    with pytest.raises(PlateError, match=re.escape("cannot read channel map entry '[1': '2]'")):
        parse_channel_map(t)


def test_channel_map_file_found_beside_or_up_to_two_folders_above(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert find_channel_map(deep) is None
    (tmp_path / "channels.txt").write_text("1=DNA\n")
    assert find_channel_map(deep) is None  # three folders above: too far
    assert find_channel_map(deep, levels=3) == tmp_path / "channels.txt"
    (tmp_path / "a" / "channels.txt").write_text("1=DNA\n")
    assert find_channel_map(deep) == tmp_path / "a" / "channels.txt"
    assert find_channel_map(deep, levels=1) is None
    (deep / "channels.txt").write_text("1=DNA\n")
    assert find_channel_map(deep, levels=0) == deep / "channels.txt"
    (deep / "channels.json").write_text('{"1": "DNA"}')
    assert find_channel_map(str(deep)) == deep / "channels.json"  # json before txt in one folder
    (tmp_path / "a" / "b" / "channels.json").mkdir()  # a folder of that name is no map
    (deep / "channels.json").unlink()
    (deep / "channels.txt").unlink()
    assert find_channel_map(deep) == tmp_path / "a" / "channels.txt"


# ----------------------------------------------------------------------------- stains of a table


def _table(names=("DNA", "ER", "RNA"), frames=False):
    t = pd.DataFrame({"Metadata_Plate": ["P1", "P1"], "Metadata_Well": ["A01", "A02"], "Metadata_Site": [1, 1]})
    for i, s in enumerate(names):
        t[f"FileName_Orig{s}"] = [f"a_{s}.tif", f"b_{s}.tif"]
        t[f"PathName_Orig{s}"] = "/data"
        if frames:
            t[f"Frame_Orig{s}"] = i
    t["Metadata_extra"] = ["x", "y"]
    t.attrs = {"stain_source": "folder", "note": "kept"}
    return t


def test_rename_by_stain_name_moves_every_column_of_the_stain():
    t = _table(frames=True)
    out = rename_stains(t, {"DNA": " Hoechst ", "RNA": "Syto"})
    assert stains(out) == ["Hoechst", "ER", "Syto"]
    assert out["FileName_OrigHoechst"].tolist() == ["a_DNA.tif", "b_DNA.tif"]
    assert out["PathName_OrigSyto"].tolist() == ["/data", "/data"]
    assert out["Frame_OrigHoechst"].tolist() == [0, 0] and out["Frame_OrigSyto"].tolist() == [2, 2]
    assert list(out.columns) == [c.replace("OrigDNA", "OrigHoechst").replace("OrigRNA", "OrigSyto")
                                 for c in t.columns]
    assert out.attrs == {"stain_source": "user", "note": "kept"}
    assert t.attrs["stain_source"] == "folder" and stains(t) == ["DNA", "ER", "RNA"]  # the input is not changed


def test_stains_can_swap_names():
    out = rename_stains(_table(), {"DNA": "ER", "ER": "DNA"})
    assert stains(out) == ["ER", "DNA", "RNA"]
    assert out["FileName_OrigER"].tolist() == ["a_DNA.tif", "b_DNA.tif"]


@pytest.mark.parametrize("mapping", ["1=DNA,3=RNA", {1: "DNA", 3: "RNA"}, {"ch1": "DNA", "w3": "RNA"},
                                     {" c1 ": "DNA", "3": "RNA"}])
def test_rename_numbered_channels_with_a_channel_map(mapping):
    out = rename_stains(_table(("ch1", "ch2", "ch3")), mapping)
    assert stains(out) == ["DNA", "ch2", "RNA"]
    assert out["FileName_OrigRNA"].tolist() == ["a_ch3.tif", "b_ch3.tif"]


def test_rename_with_a_channel_map_file(tmp_path):
    f = tmp_path / "channels.txt"
    f.write_text("2=ER\n")
    assert stains(rename_stains(_table(("ch1", "ch2")), f)) == ["ch1", "ER"]


def test_rename_refusals_name_the_stains():
    t = _table()
    with pytest.raises(PlateError) as err:
        rename_stains(t, {"Actin": "AGP", "DNA": "Hoechst"})
    assert str(err.value) == "the plate has no stain(s) ['Actin']; its stains are ['DNA', 'ER', 'RNA']"
    with pytest.raises(PlateError) as err:
        rename_stains(t, {"DNA": "ER"})
    assert str(err.value) == ("renaming ['DNA', 'ER', 'RNA'] to ['ER', 'ER', 'RNA'] gives two channels the same "
                              "stain")
    with pytest.raises(PlateError) as err:
        rename_stains(t, "4=Mito")
    assert str(err.value) == "the plate has no stain(s) ['ch4']; its stains are ['DNA', 'ER', 'RNA']"


def test_reorder_puts_the_stains_in_the_given_order_and_drops_the_rest():
    t = _table(("Mito", "DNA", "Extra"), frames=True)
    out = reorder_stains(t, ["DNA", "Mito"])
    assert list(out.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_extra",
                                 "FileName_OrigDNA", "PathName_OrigDNA", "Frame_OrigDNA",
                                 "FileName_OrigMito", "PathName_OrigMito", "Frame_OrigMito"]
    assert out["Frame_OrigDNA"].tolist() == [1, 1]
    plain = reorder_stains(_table(("Mito", "AGP", "RNA", "ER", "DNA")))
    assert stains(plain) == ["DNA", "ER", "RNA", "AGP", "Mito"] and "Frame_OrigDNA" not in plain


def test_reorder_names_what_is_missing():
    with pytest.raises(PlateError) as err:
        reorder_stains(_table(("DNA", "Extra")), ("DNA", "ER", "Mito"))
    msg = str(err.value)
    assert msg.startswith("the plate has stains ['DNA', 'Extra'] but ['DNA', 'ER', 'Mito'] are needed; "
                          "missing ['ER', 'Mito']. Name them with a channel map")


def test_no_warning_when_nothing_is_guessed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rename_stains(_table(), {"DNA": "Hoechst"})
        reorder_stains(_table(("ER", "DNA")), ["DNA", "ER"])
