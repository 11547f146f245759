"""Reading a user's plate folder: which files count (hidden ones, zarr folders, names that are not
UTF-8), how a folder's layout is recognised or refused, plate names from folder names, file-name
patterns, fields that lack a channel, and the messages a user sees for each."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_cellclip.errors import CellClipWarning, PlateError
from napari_cellclip.plates import check_utf8_path, is_utf8, read_plate, stains, summarize

MAP5 = "1=DNA,2=ER,3=RNA,4=AGP,5=Mito"


def _phenix(folder: Path, wells=((1, 1),), sites=(1,), channels=(1, 2), plane=1) -> Path:
    """Empty Phenix-named files (the table is built from names; no pixel is read)."""
    folder.mkdir(parents=True, exist_ok=True)
    for r, c in wells:
        for s in sites:
            for ch in channels:
                (folder / f"r{r:02d}c{c:02d}f{s:02d}p{plane:02d}-ch{ch}sk1fk1fl1.tiff").write_bytes(b"")
    return folder


def _imagexpress(folder: Path, prefix="PL", wells=("A01",), sites=(1,), channels=(1, 2)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for w in wells:
        for s in sites:
            for ch in channels:
                (folder / f"{prefix}_{w}_s{s}_w{ch}.tif").write_bytes(b"")
    return folder


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        return fn(*args, **kwargs)


def _message(err) -> str:
    return str(err.value)


# ----------------------------------------------------------------------------- what is read


def test_hidden_files_and_folders_are_not_part_of_the_plate(tmp_path):
    _phenix(tmp_path / "P1", wells=((1, 1), (1, 2)))
    _phenix(tmp_path / "P1" / ".thumbnails", wells=((3, 3),))
    _imagexpress(tmp_path / ".trash")
    (tmp_path / "P1" / ".r05c05f01p01-ch1sk1fk1fl1.tiff").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hidden files are not even called unrecognised
        df = read_plate(tmp_path, channel_map="1=DNA,2=ER")
    assert df["Metadata_Well"].tolist() == ["A01", "A02"]
    assert df["Metadata_Plate"].unique().tolist() == ["P1"]


def test_macos_resource_forks_beside_imagexpress_files_are_not_images(tmp_path):
    _imagexpress(tmp_path, prefix="PL", wells=("A01",))
    for ch in (1, 2):  # what macOS leaves on a USB disk: "._" + the name (a valid ImageXpress name)
        (tmp_path / f"._PL_A01_s1_w{ch}.tif").write_bytes(b"\x00\x05\x16\x07")
    df = read_plate(tmp_path, channel_map="1=DNA,2=ER")
    assert df[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["PL", "A01"]]


def test_zarr_plates_in_several_sub_folders_are_all_read(tmp_path):
    from _formats_data import write_ome_zarr

    for sub, well in (("a", "B03"), ("b", "C05")):
        write_ome_zarr(tmp_path / sub, "0.4", fields=[(well, 1, np.ones((2, 8, 8), np.uint16))], names=("DNA", "ER"),
                       levels=1)
    df = read_plate(tmp_path)
    assert df["Metadata_Well"].tolist() == ["B03", "C05"] and stains(df) == ["DNA", "ER"]


def test_files_inside_a_zarr_folder_are_not_read_as_images(tmp_path):
    from _formats_data import write_ome_zarr

    fields = [(w, 1, np.full((5, 8, 8), i, np.uint16)) for i, w in enumerate(("B03", "C05"))]
    plate = write_ome_zarr(tmp_path, "0.4", fields=fields, levels=1)
    # a Phenix-named file inside the zarr folder would otherwise make the folder "mix layouts"
    (plate / "r01c01f01p01-ch1sk1fk1fl1.tiff").write_bytes(b"")
    df = _quiet(read_plate, tmp_path)
    assert df["Metadata_Well"].tolist() == ["B03", "C05"] and df.attrs["stain_source"] == "ome-zarr"
    assert stains(df) == ["DNA", "ER", "RNA", "AGP", "Mito"]
    # a plate name and a channel map given reach the OME-Zarr reader
    named = read_plate(tmp_path, plate="PX", channel_map="1=Mito,2=AGP,3=RNA,4=ER,5=DNA")
    assert named["Metadata_Plate"].unique().tolist() == ["PX"]
    assert stains(named) == ["Mito", "AGP", "RNA", "ER", "DNA"] and named["Frame_OrigDNA"].tolist() == [4, 4]
    direct = read_plate(plate, plate="PZ", channel_map={1: "Mito", 2: "AGP", 3: "RNA", 4: "ER", 5: "DNA"})
    assert direct["Metadata_Plate"].unique().tolist() == ["PZ"] and stains(direct)[0] == "Mito"
    # the same plate through a folder not named *.zarr is still found by its zarr metadata
    renamed = tmp_path / "copy"
    renamed.mkdir()
    plate.rename(renamed / "plate_v04")
    assert len(_quiet(read_plate, renamed)) == 2
    assert len(_quiet(read_plate, renamed / "plate_v04")) == 2
    assert len(_quiet(read_plate, renamed, layout="ome-zarr")) == 2


def _bad_name(folder: Path, raw: bytes) -> bytes:
    return os.fsencode(str(folder)) + b"/" + raw


def test_names_that_are_not_utf8_are_skipped_and_listed(tmp_path):
    _imagexpress(tmp_path, prefix="PL", channels=(1,))
    (tmp_path / "sub").mkdir()
    try:  # ImageXpress names with a prefix that is not UTF-8: they would be a second plate
        for i in range(5):
            Path(os.fsdecode(_bad_name(tmp_path, b"P\xff%d_A01_s1_w1.tif" % i))).write_bytes(b"")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take names that are not UTF-8")
    for i in range(2):
        Path(os.fsdecode(_bad_name(tmp_path / "sub", b"Q\xfe%d_B02_s1_w1.tif" % i))).write_bytes(b"")
    bad_dir = os.fsdecode(_bad_name(tmp_path, b"dir\xfd"))
    os.mkdir(bad_dir)
    Path(bad_dir, "PL_C03_s1_w1.tif").write_bytes(b"")  # a good name in a folder that cannot be stored
    with pytest.warns(CellClipWarning) as rec:
        df = read_plate(tmp_path, channel_map="1=DNA")
    said = [str(w.message) for w in rec]
    assert len(said) == 1, said  # nothing else: the skipped files are not read, nor called unrecognised
    assert rec[0].filename == __file__
    assert said[0].startswith(f"{tmp_path}: 8 name(s) that are not valid UTF-8 skipped (rename them to read them): ")
    listed = said[0].split("read them): ")[1].split(", ")
    assert len(listed) == 5 and all(re.search(r"\\x(ff|fe|fd)", n) for n in listed)
    assert all(n.startswith(str(tmp_path) + "/") for n in listed)
    assert df[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["PL", "A01"]]


def test_a_plate_path_that_is_not_utf8_is_refused_by_name(tmp_path):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/plate\xff")
    assert not is_utf8(bad) and is_utf8(tmp_path / "plaque é") and is_utf8("")
    with pytest.raises(PlateError) as err:
        check_utf8_path(bad)
    assert _message(err) == (f"{tmp_path}/plate\\xff: the path is not valid UTF-8 text; rename the folder or file "
                             "(e.g. with convmv) so its name can be stored in the fields table")
    check_utf8_path(tmp_path / "plaque é")  # no error
    with pytest.raises(PlateError, match=re.escape("plate\\xff: the path is not valid UTF-8")):
        read_plate(bad)  # before anything else: it does not even exist


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path / "nope")
    assert _message(err) == f"not found: {tmp_path / 'nope'}"
    f = tmp_path / "r01c01f01p01-ch1sk1fk1fl1.tiff"
    f.write_bytes(b"")
    with pytest.raises(PlateError) as err:
        read_plate(f)
    assert _message(err) == f"{f}: give a plate folder, an OME-Zarr plate, an OME-TIFF or a LoadData CSV"
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path / "nope", layout="Phenix")  # the layout is checked first
    assert _message(err) == ("unknown layout 'Phenix'; choose one of auto, load_data, phenix, imagexpress, "
                             "ome-tiff, ome-zarr, dye-folders, multichannel")
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    with pytest.raises(PlateError) as err:
        read_plate(empty)
    assert _message(err) == f"{empty}: the folder is empty"


def test_home_folder_in_the_path_is_expanded(tmp_path, monkeypatch):
    _phenix(tmp_path / "P1", wells=((2, 3),))
    monkeypatch.setenv("HOME", str(tmp_path))
    df = read_plate("~/P1", channel_map="1=DNA,2=ER")
    assert df["Metadata_Well"].tolist() == ["B03"]
    assert df["PathName_OrigDNA"].tolist() == [str(tmp_path / "P1")]


# ----------------------------------------------------------------------------- recognising the layout


def test_no_recognised_names_lists_examples(tmp_path):
    for n in ("z.tif", "b.png", "a.tif", "c.tif"):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path)
    assert _message(err).startswith(f"{tmp_path}: no recognised image names among 4 image file(s) (e.g. a.tif, "
                                    "b.png, c.tif). Supported: Phenix 'r01c01f01p01-ch1sk1fk1fl1.tiff', ")
    assert _message(err).endswith("a LoadData CSV, or multi-channel TIFFs with a pattern and axes.")
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    with pytest.raises(PlateError, match=re.escape(f"{other}: no recognised image names among 0 image file(s) "
                                                   "(e.g. none)")):
        read_plate(other)


def test_a_named_layout_the_folder_lacks_is_refused_with_its_images(tmp_path):
    _phenix(tmp_path)
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path, layout="imagexpress")
    assert _message(err).startswith(f"{tmp_path}: no recognised image names among 2 image file(s) (e.g. "
                                    "r01c01f01p01-ch1sk1fk1fl1.tiff, r01c01f01p01-ch2sk1fk1fl1.tiff)")


def test_mixed_layouts_are_listed_with_counts(tmp_path):
    _phenix(tmp_path / "a", channels=(1, 2, 3))
    _imagexpress(tmp_path / "b", wells=("B02",))
    (tmp_path / "b" / "Hoechst.tif").write_bytes(b"")
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path)
    assert _message(err) == (f"{tmp_path}: the folder mixes layouts: imagexpress (2, e.g. b/PL_B02_s1_w1.tif); "
                             "phenix (3, e.g. a/r01c01f01p01-ch1sk1fk1fl1.tiff). Open one plate at a time, or give "
                             "layout= to pick one.")
    # picking one reads only it, and says nothing of the other layout's files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_plate(tmp_path, layout="imagexpress", channel_map="1=DNA,2=ER")
    assert df[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["PL", "B02"]]
    df = read_plate(tmp_path, layout="phenix", channel_map="1=DNA,2=ER,3=RNA")
    assert df[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["a", "A01"]]


def test_unrecognised_images_beside_a_plate_are_named_at_most_three(tmp_path):
    _phenix(tmp_path / "P1")
    for n in ("overview.tif", "thumb.png", "z/stitched.tif", "label.tif"):
        (tmp_path / "P1" / n).parent.mkdir(exist_ok=True)
        (tmp_path / "P1" / n).write_bytes(b"")
    with pytest.warns(CellClipWarning) as rec:
        read_plate(tmp_path, channel_map="1=DNA,2=ER")
    said = [str(w.message) for w in rec]
    assert said == [f"{tmp_path}: 4 image file(s) with unrecognised names skipped (e.g. P1/label.tif, "
                    "P1/overview.tif, P1/thumb.png)"]
    assert rec[0].filename == __file__


@pytest.mark.parametrize("layout", ["phenix", "imagexpress", "dye-folders"])
def test_each_layout_named_or_recognised_gives_the_same_table(tmp_path, layout):
    if layout == "phenix":
        _phenix(tmp_path / "P9", wells=((2, 3),), sites=(1, 2))
    elif layout == "imagexpress":
        _imagexpress(tmp_path / "P9", prefix="P9", wells=("B03",), sites=(1, 2))
    else:
        for s in (1, 2):
            for dye in ("Hoechst", "ConA"):
                (tmp_path / "P9" / f"B03_S{s}").mkdir(parents=True, exist_ok=True)
                (tmp_path / "P9" / f"B03_S{s}" / f"{dye}.tif").write_bytes(b"")
    kw = {} if layout == "dye-folders" else {"channel_map": "1=DNA,2=ER"}
    auto = _quiet(read_plate, tmp_path, **kw)
    named = _quiet(read_plate, tmp_path, layout=layout, **kw)
    assert auto.equals(named)
    assert auto[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].values.tolist() == [["P9", "B03", 1],
                                                                                          ["P9", "B03", 2]]
    assert stains(auto) == ["DNA", "ER"]
    assert auto.attrs["stain_source"] == ("dye-folders" if layout == "dye-folders" else "folder")


def test_dye_folders_never_take_a_channel_map(tmp_path):
    for dye in ("Hoechst", "Mito"):
        (tmp_path / "P1" / "A01_s1").mkdir(parents=True, exist_ok=True)
        (tmp_path / "P1" / "A01_s1" / f"{dye}.tif").write_bytes(b"")
    df = _quiet(read_plate, tmp_path, channel_map="1=Mito,2=DNA")
    assert stains(df) == ["DNA", "Mito"] and df["FileName_OrigDNA"].tolist() == ["Hoechst.tif"]


def test_one_ome_tiff_file_with_a_pattern_and_without_a_position(tmp_path):
    f = tmp_path / "scan-3-11-0002.ome.tiff"
    tifffile.imwrite(f, np.zeros((2, 8, 8), np.uint16), metadata={"axes": "CYX"})
    with pytest.raises(PlateError) as err:
        _quiet(read_plate, f)
    assert _message(err).startswith(f"{tmp_path}: cannot tell the well and field of 1 OME-TIFF(s) (e.g. "
                                    "scan-3-11-0002.ome.tiff)")
    df = _quiet(read_plate, f, pattern=r"scan-(?P<row>\d+)-(?P<col>\d+)-(?P<site>\d+)")
    assert df[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].values.tolist() == [[tmp_path.name, "C11", 2]]


def test_one_ome_tiff_file_finds_the_channel_map_beside_it(tmp_path, tmp_path_factory):
    img = np.arange(2 * 6 * 6, dtype=np.uint16).reshape(2, 6, 6)
    f = tmp_path / "C05_s3.ome.tif"
    tifffile.imwrite(f, img, metadata={"axes": "CYX"})
    (tmp_path / "channels.txt").write_text("1=DNA\n2=Mito\n")
    with pytest.warns(CellClipWarning, match=r"stains from the channel map .*channels.txt: ch1 → DNA, ch2 → Mito"):
        df = read_plate(f, plate="PX")
    assert df[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].values.tolist() == [["PX", "C05", 3]]
    assert stains(df) == ["DNA", "Mito"] and df["Frame_OrigMito"].tolist() == [1]
    # a map two folders above the file's folder is found too
    deep = tmp_path_factory.mktemp("exp") / "plate" / "fields"
    deep.mkdir(parents=True)
    g = deep / "D02_s1.ome.tif"
    tifffile.imwrite(g, img, metadata={"axes": "CYX"})
    (deep.parent.parent / "channels.json").write_text('{"1": "RNA", "2": "ER"}')
    assert stains(_quiet(read_plate, g)) == ["RNA", "ER"]
    # the same from the folder, with an explicit map and a pattern
    df = read_plate(tmp_path, channel_map={1: "AGP", 2: "ER"}, pattern=r"(?P<well>[A-P]\d\d)_s(?P<site>\d)")
    assert stains(df) == ["AGP", "ER"] and df["Metadata_Plate"].tolist() == [tmp_path.name]


def test_pattern_and_axes_read_multichannel_tiffs_without_naming_the_layout(tmp_path):
    for w in ("A01", "B02"):
        tifffile.imwrite(tmp_path / f"{w}-f1.tif", np.zeros((3, 4, 4), np.uint8))
    pattern = r"(?P<well>[A-P]\d\d)-f(?P<site>\d)"
    df = read_plate(tmp_path, pattern=pattern, axes="cyx", channel_map="1=DNA,2=ER,3=Mito", plate="MC1")
    assert df["Metadata_Well"].tolist() == ["A01", "B02"] and df.attrs["stain_source"] == "multichannel"
    assert df["Metadata_Plate"].tolist() == ["MC1", "MC1"] and stains(df) == ["DNA", "ER", "Mito"]
    assert df["Frame_OrigMito"].tolist() == [2, 2]
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path, pattern=r"(?P<well>[A-P]\d\d)_s(?P<site>\d)", axes="CYX")
    assert _message(err) == rf"{tmp_path}: no file name matches the pattern '(?P<well>[A-P]\\d\\d)_s(?P<site>\\d)'"
    with pytest.raises(PlateError, match="multi-channel TIFFs need a file-name pattern"):
        read_plate(tmp_path, layout="multichannel")


# ----------------------------------------------------------------------------- plate names


def test_a_folder_named_zarr_is_never_looked_into(tmp_path):
    for name in ("export.zarr", "EXPORT2.ZARR"):
        _phenix(tmp_path / name)  # no zarr metadata: not a plate, and its files are not images of the plate
    with pytest.warns(CellClipWarning, match="not an OME-Zarr HCS plate; skipped"):
        with pytest.raises(PlateError) as err:
            read_plate(tmp_path)
    assert _message(err) == f"{tmp_path}: no OME-Zarr HCS plate found"


def test_upper_case_suffixes(tmp_path):
    for ch in (1, 2):
        (tmp_path / f"PL_A01_s1_w{ch}.TIF").write_bytes(b"")
    df = read_plate(tmp_path, channel_map="1=DNA,2=ER")
    assert df["FileName_OrigER"].tolist() == ["PL_A01_s1_w2.TIF"]
    (tmp_path / "LOAD_DATA.CSV").write_text("Metadata_Plate,Metadata_Well,Metadata_Site,FileName_OrigDNA\n"
                                            "P,B02,1,x.tif\n")
    assert read_plate(tmp_path / "LOAD_DATA.CSV")["Metadata_Well"].tolist() == ["B02"]
    assert read_plate(tmp_path)["Metadata_Well"].tolist() == ["B02"]  # the CSV in the folder wins


def test_a_zarr_image_that_is_no_plate_is_named(tmp_path):
    img = tmp_path / "field.zarr"
    img.mkdir()
    (img / ".zgroup").write_text('{"zarr_format": 2}')
    (img / ".zattrs").write_text('{"multiscales": []}')
    with pytest.warns(CellClipWarning, match="not an OME-Zarr HCS plate; skipped"):
        with pytest.raises(PlateError) as err:
            read_plate(tmp_path)
    assert _message(err) == f"{tmp_path}: no OME-Zarr HCS plate found"


@pytest.mark.parametrize("layout", ["phenix", "imagexpress", "dye-folders", "ome-tiff"])
def test_a_plate_name_given_names_every_field(tmp_path, layout):
    if layout == "phenix":
        _phenix(tmp_path / "P1", wells=((1, 1), (2, 2)))
    elif layout == "imagexpress":
        _imagexpress(tmp_path / "P1", wells=("A01", "B02"))
    elif layout == "ome-tiff":
        _ome(tmp_path / "P1", ["A01_s1.ome.tif", "B02_s1.ome.tif"])
    else:
        for w in ("A01", "B02"):
            for dye in ("Hoechst", "ConA"):
                (tmp_path / "P1" / f"{w}_s1").mkdir(parents=True, exist_ok=True)
                (tmp_path / "P1" / f"{w}_s1" / f"{dye}.tif").write_bytes(b"")
    df = _quiet(read_plate, tmp_path, plate="Screen 7", channel_map="1=DNA,2=ER")
    assert df[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["Screen 7", "A01"], ["Screen 7", "B02"]]
    assert stains(df) == ["DNA", "ER"]


def test_dye_folder_warnings_name_the_folder_opened(tmp_path):
    for dye in ("Hoechst", "Brightfield"):
        (tmp_path / "P1" / "A01_s1").mkdir(parents=True, exist_ok=True)
        (tmp_path / "P1" / "A01_s1" / f"{dye}.tif").write_bytes(b"")
    (tmp_path / "P1" / "overview.tif").write_bytes(b"")  # not in a field folder: skipped
    with pytest.warns(CellClipWarning) as rec:
        df = read_plate(tmp_path)
    said = [str(w.message) for w in rec]
    # Brightfield.tif is read as an extra channel of its field, so it is not said to be skipped
    assert said.pop(0) == f"{tmp_path}: 1 image file(s) with unrecognised names skipped (e.g. P1/overview.tif)"
    assert said[0] == (f"{tmp_path}: stains named from the file names by the dye vocabulary "
                       "(napari_cellclip.formats.dyes): ch1 'Hoechst' → DNA. A channel map overrides this.")
    assert said[1].startswith(f"{tmp_path}: ch2 'Brightfield' from the file names: not a Cell Painting stain name")
    assert stains(df) == ["DNA", "Brightfield"] and len(said) == 2


@pytest.mark.parametrize("folders, plate", [
    ("BR00117010", "BR00117010"),
    ("BR00117010__2020-11-08T18_34_24-Measurement1/Images", "BR00117010"),
    ("run/Images", "run"),
    ("run/images", "run"),
    ("run/TimePoint_1", "run"),
    ("run/TimePoint_12", "run"),
    ("run/TIMEPOINT_1", "run"),
    ("run/TimePoint_x", "TimePoint_x"),
    ("__odd", "__odd"),
])
def test_plate_named_by_its_folder(tmp_path, folders, plate):
    _phenix(tmp_path / folders)
    df = read_plate(tmp_path, channel_map="1=DNA,2=ER")
    assert df["Metadata_Plate"].unique().tolist() == [plate]


def test_two_plate_folders_with_different_stains_are_refused(tmp_path):
    from _formats_data import HARMONY_XML

    for name, dyes in (("P1", ("Hoechst", "ConA")), ("P2", ("Hoechst", "MitoTracker"))):
        _phenix(tmp_path / name)
        entries = "".join(f'<Entry ChannelID="{i}"><ChannelName>{n}</ChannelName></Entry>'
                          for i, n in enumerate(dyes, start=1))
        (tmp_path / name / "Index.idx.xml").write_text(HARMONY_XML.format(plate=name, entries=entries))
    with pytest.raises(PlateError) as err:
        _quiet(read_plate, tmp_path)
    assert _message(err) == (f"{tmp_path}: plates under this folder have different stains: "
                             "[('DNA', 'ER'), ('DNA', 'Mito')]")
    df = _quiet(read_plate, tmp_path / "P1")
    assert summarize(df) == "1 plate(s), 1 well(s), 1 field(s); stains ['DNA', 'ER']"


# ----------------------------------------------------------------------------- file-name patterns


def _ome(folder: Path, names, channels=2):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        tifffile.imwrite(folder / n, np.zeros((channels, 8, 8), np.uint16), metadata={"axes": "CYX"})


def test_pattern_with_row_col_and_plate_groups(tmp_path):
    _ome(tmp_path, ["exp_R3-C11_F2.ome.tif", "exp_R1-C2_F1.ome.tif", "ignored.ome.tif"])
    pattern = r"(?P<plate>exp)_R(?P<row>\d+)-C(?P<col>\d+)_F(?P<site>\d+)"
    df = read_plate(tmp_path, pattern=pattern, channel_map="1=DNA,2=ER")
    assert df[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].values.tolist() == [["exp", "A02", 1],
                                                                                        ["exp", "C11", 2]]


def test_pattern_refusals_are_exact(tmp_path):
    _ome(tmp_path, ["B03_s1.ome.tif"])
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path, pattern="(?P<well>[A-P]\\d\\d", channel_map="1=DNA,2=ER")
    assert _message(err).startswith("invalid file-name pattern '(?P<well>[A-P]\\\\d\\\\d': missing ), ")
    for bad in (r"(?P<well>\w\d\d)", r"(?P<site>\d)", r"(?P<row>\d)(?P<site>\d)", r"(?P<col>\d)(?P<site>\d)"):
        with pytest.raises(PlateError) as err:
            read_plate(tmp_path, pattern=bad, channel_map="1=DNA,2=ER")
        assert _message(err) == f"pattern {bad!r} needs named groups 'well' (or 'row' and 'col') and 'site'"
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path, pattern=r"(?P<well>[A-P]\d\d)_f(?P<site>\d)", channel_map="1=DNA,2=ER")
    assert _message(err) == rf"{tmp_path}: no file name matches the pattern '(?P<well>[A-P]\\d\\d)_f(?P<site>\\d)'"


def test_pattern_well_names_are_normalised_and_searched_anywhere(tmp_path):
    _ome(tmp_path, ["run7 well b3 site 04.ome.tif"])
    df = read_plate(tmp_path, pattern=r"well (?P<well>\w\d+) site (?P<site>\d+)", channel_map="1=DNA,2=ER")
    assert df[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["B03", 4]]


# ----------------------------------------------------------------------------- fields and channels


@pytest.mark.parametrize("n", [10, 11])
def test_fields_missing_a_channel_are_listed_ten_at_most(tmp_path, n):
    wells = [(1, c) for c in range(1, n + 1)] + [(2, 1)]
    _phenix(tmp_path / "P1", wells=wells, channels=(1,))
    _phenix(tmp_path / "P1", wells=[(2, 1)], channels=(2,))
    with pytest.warns(CellClipWarning) as rec:
        df = read_plate(tmp_path, channel_map="1=DNA,2=ER")
    said = [str(w.message) for w in rec]
    listed = "; ".join(f"P1 A{c:02d} site 1 (missing ER)" for c in range(1, 11))
    more = " ..." if n > 10 else ""
    assert said == [f"{tmp_path / 'P1'}: skipped {n} field(s) that lack a channel: {listed}{more}"]
    assert rec[0].filename == __file__
    assert df["Metadata_Well"].tolist() == ["B01"]


def test_a_few_fields_missing_channels_are_all_listed(tmp_path):
    _phenix(tmp_path / "P1", wells=[(1, 1), (1, 2)], channels=(1, 2, 3))
    (tmp_path / "P1" / "r01c02f01p01-ch1sk1fk1fl1.tiff").unlink()
    (tmp_path / "P1" / "r01c02f01p01-ch3sk1fk1fl1.tiff").unlink()
    with pytest.warns(CellClipWarning) as rec:
        read_plate(tmp_path, channel_map="1=DNA,2=ER,3=RNA")
    assert [str(w.message) for w in rec] == [f"{tmp_path / 'P1'}: skipped 1 field(s) that lack a channel: "
                                             "P1 A02 site 1 (missing DNA, RNA)"]


def test_no_field_with_every_channel_is_an_error(tmp_path):
    _phenix(tmp_path / "P1", wells=[(1, 1)], channels=(1,))
    _phenix(tmp_path / "P1", wells=[(1, 2)], channels=(2,))
    with pytest.raises(PlateError) as err:
        _quiet(read_plate, tmp_path, channel_map="1=DNA,2=ER")
    assert _message(err) == f"{tmp_path / 'P1'}: no field has all channels ['DNA', 'ER']"


def test_two_files_for_one_channel_of_a_field_are_named(tmp_path):
    uuid = "0F2A6C1E-7D43-4B7E-9C0A-1234567890AB"
    _imagexpress(tmp_path, prefix="PL", channels=(1, 2))
    (tmp_path / f"PL_A01_s1_w2{uuid}.tif").write_bytes(b"")
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path, channel_map="1=DNA,2=ER")
    assert _message(err) == (f"{tmp_path}: two files for plate PL well A01 site 1 channel 2: "
                             f"{tmp_path / 'PL_A01_s1_w2.tif'} and {tmp_path / f'PL_A01_s1_w2{uuid}.tif'}")


def test_table_columns_from_a_numbered_layout(tmp_path):
    _phenix(tmp_path / "P1", wells=[(2, 1), (1, 3)], sites=(2, 1), channels=(2, 1))
    df = read_plate(tmp_path, channel_map="1=DNA,2=ER")
    assert list(df.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "FileName_OrigDNA",
                                "PathName_OrigDNA", "FileName_OrigER", "PathName_OrigER"]
    assert df[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["A03", 1], ["A03", 2], ["B01", 1],
                                                                      ["B01", 2]]
    assert df["FileName_OrigER"].iloc[0] == "r01c03f01p01-ch2sk1fk1fl1.tiff"
    assert set(df["PathName_OrigDNA"]) == {str(tmp_path / "P1")}
