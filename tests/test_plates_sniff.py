"""What a path is, decided from names alone (the napari reader's cheap check): ``sniff`` and
``image_kind`` on real file-name layouts, LoadData CSV headers and OME-Zarr plate roots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from napari_cellclip.plates import image_kind, is_load_data_csv, sniff

LOAD_DATA_HEADER = "Metadata_Plate,Metadata_Well,Metadata_Site,FileName_OrigDNA,PathName_OrigDNA\n"


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _zarr(path: Path, attrs: dict) -> Path:
    path.mkdir(parents=True)
    (path / ".zgroup").write_text('{"zarr_format": 2}')
    (path / ".zattrs").write_text(json.dumps(attrs))
    return path


@pytest.mark.parametrize("name, kind", [
    ("r01c01f01p01-ch1sk1fk1fl1.tiff", "phenix"),
    ("R12C24F123P02-CH5SK1FK1FL1.PNG", "phenix"),
    ("r01c01f01p01-ch1sk1fk1fl1.tif", "phenix"),
    ("PLATE7_B02_s1_w1.tif", "imagexpress"),
    ("PLATE7_B02_s1_w10F2A6C1E-7D43-4B7E-9C0A-1234567890AB.tif", "imagexpress"),
    ("cdp2bioactives_AA24_s9_w5.TIFF", "imagexpress"),
    ("B03_s1.ome.tiff", "ome-tiff"),
    ("anything.OME.TIF", "ome-tiff"),
    ("overview.tif", None),
    ("r01c01f01p01-ch1sk1fk1fl1.jpg", None),  # not an image suffix the plugin reads
    ("PLATE7_B02_s1_w1.png", None),            # ImageXpress writes TIFF only
    ("notes.txt", None),
])
def test_image_kind_from_the_file_name(tmp_path, name, kind):
    assert image_kind(tmp_path / name) == kind
    assert image_kind(str(tmp_path / name)) == kind  # a string path too


@pytest.mark.parametrize("rel, kind", [
    ("A01_s1/Hoechst.tif", "dye-folders"),
    ("B03_2/ERSytoBleed.tiff", "dye-folders"),
    ("B03/2/Mito.tif", "dye-folders"),         # well folder, then a numbered field folder
    ("B03/field2/Mito.tif", None),             # the field folder is not a number
    ("plate/Hoechst.tif", None),               # no well in the folder name
    ("A01_s1/Brightfield.tif", None),          # not a dye name
    ("A01_s1/Hoechst.txt", None),
])
def test_dye_named_files_count_only_inside_a_field_folder(tmp_path, rel, kind):
    assert image_kind(tmp_path / "P1" / rel) == kind


def test_load_data_csv_is_told_by_its_header(tmp_path):
    good = _touch(tmp_path / "load_data.csv", LOAD_DATA_HEADER + "P1,A01,1,a.tif,.\n")
    no_well = _touch(tmp_path / "a.csv", "Metadata_Plate,Metadata_Site,FileName_OrigDNA\n")
    no_file = _touch(tmp_path / "b.csv", "Metadata_Plate,Metadata_Well,Metadata_Site\n")
    later = _touch(tmp_path / "c.csv", "x,y\nMetadata_Well,FileName_OrigDNA\n")  # only the first line counts
    assert is_load_data_csv(good) and sniff(good) == "load_data"
    for f in (no_well, no_file, later):
        assert not is_load_data_csv(f) and sniff(f) is None
    assert not is_load_data_csv(tmp_path / "missing.csv")
    assert not is_load_data_csv(tmp_path)  # a folder cannot be opened as a file


def test_load_data_csv_names_in_any_case_and_headers_not_utf8(tmp_path):
    upper = _touch(tmp_path / "LOAD_DATA.CSV", LOAD_DATA_HEADER)
    assert sniff(upper) == "load_data"
    folder = tmp_path / "plate"
    _touch(folder / "Manifest.Csv", LOAD_DATA_HEADER)
    assert sniff(folder) == "load_data"
    latin1 = tmp_path / "latin1.csv"  # a header written by a Windows tool: still read, never an exception
    latin1.write_bytes("Metadata_Well,Metadata_Site,Remarque_\xe9t\xe9,FileName_OrigDNA\n".encode("latin-1"))
    assert is_load_data_csv(latin1) and sniff(latin1) == "load_data"


def test_a_load_data_header_in_another_suffix_is_not_a_plate(tmp_path):
    f = _touch(tmp_path / "load_data.txt", LOAD_DATA_HEADER)
    assert sniff(f) is None


def test_single_files_are_judged_by_name(tmp_path):
    assert sniff(_touch(tmp_path / "r02c03f04p01-ch2sk1fk1fl1.tiff")) == "phenix"
    assert sniff(_touch(tmp_path / "P_A01_s1_w1.tif")) == "imagexpress"
    assert sniff(_touch(tmp_path / "P1" / "A01_s1" / "Hoechst.tif")) == "dye-folders"
    assert sniff(_touch(tmp_path / "holiday.png")) is None
    assert sniff(tmp_path / "missing") is None
    assert sniff(str(tmp_path / "P_A01_s1_w1.tif")) == "imagexpress"


def test_a_folder_is_judged_by_what_it_holds(tmp_path):
    phenix = tmp_path / "phenix"
    _touch(phenix / "Images" / "r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert sniff(phenix) == "phenix"
    ix = tmp_path / "ix"
    _touch(ix / "notes.txt")
    _touch(ix / "TimePoint_1" / "P_A01_s1_w1.tif")
    assert sniff(ix) == "imagexpress"
    ld = tmp_path / "ld"
    _touch(ld / "meta" / "load_data.csv", LOAD_DATA_HEADER)
    assert sniff(ld) == "load_data"
    other = tmp_path / "other"
    _touch(other / "a" / "b" / "holiday.png")
    _touch(other / "table.csv", "a,b\n1,2\n")
    assert sniff(other) is None
    (tmp_path / "empty").mkdir()
    assert sniff(tmp_path / "empty") is None


def test_hidden_entries_are_not_looked_at(tmp_path):
    _touch(tmp_path / ".r01c01f01p01-ch1sk1fk1fl1.tiff")
    _touch(tmp_path / ".cache" / "r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert sniff(tmp_path) is None
    _touch(tmp_path / "visible" / "r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert sniff(tmp_path) == "phenix"


def test_the_look_is_breadth_first_and_bounded(tmp_path):
    # the shallow file decides, not the deeper one in a folder listed first
    _touch(tmp_path / "a" / "b" / "P_A01_s1_w1.tif")
    _touch(tmp_path / "r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert sniff(tmp_path) == "phenix"
    big = tmp_path / "big"
    for i in range(6):
        _touch(big / f"n{i}.txt")
    _touch(big / "deep" / "P_A01_s1_w1.tif")
    # 6 files + the "deep" folder + the image: 8 entries
    assert sniff(big, max_entries=8) == "imagexpress"
    assert sniff(big, max_entries=7) is None
    assert sniff(big, max_entries=3) is None


def test_folders_reached_through_a_symbolic_link_are_looked_into(tmp_path):
    real = tmp_path / "storage" / "run1"
    _touch(real / "P_A01_s1_w1.tif")
    top = tmp_path / "view"
    top.mkdir()
    try:
        (top / "run1").symlink_to(real, target_is_directory=True)
    except OSError:
        pytest.skip("no symbolic links here")
    assert sniff(top) == "imagexpress"


def test_ome_zarr_plates_and_other_zarr_groups(tmp_path):
    plate = _zarr(tmp_path / "one.zarr", {"plate": {"name": "P1", "wells": []}})
    assert sniff(plate) == "ome-zarr"
    image = _zarr(tmp_path / "image.zarr", {"multiscales": []})
    assert sniff(image) is None
    holder = tmp_path / "holder"
    _zarr(holder / "sub" / "plate.zarr", {"plate": {"name": "P2"}})
    assert sniff(holder) == "ome-zarr"
    # a zarr folder that is not a plate is not entered: the image inside it does not count
    images = tmp_path / "images"
    z = _zarr(images / "x.zarr", {"multiscales": []})
    _touch(z / "r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert sniff(images) is None
    # but a folder merely holding zarr metadata files named like a plate is judged by content
    odd = tmp_path / "odd.zarr"
    _touch(odd / "r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert sniff(odd) == "phenix"
    assert sniff(tmp_path / "wrap") is None


class _Listing:
    """``os.scandir`` in name order (the real one lists in the file system's order)."""

    def __init__(self, entries):
        self.entries = sorted(entries, key=lambda e: e.name)

    def __enter__(self):
        return iter(self.entries)

    def __exit__(self, *exc):
        return False


def test_an_unreadable_sub_folder_is_passed_over(tmp_path, monkeypatch):
    real = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        with real(path) as it:
            return _Listing(list(it))

    monkeypatch.setattr(os, "scandir", scandir)
    (tmp_path / "locked").mkdir()
    _touch(tmp_path / "z" / "P_A01_s1_w1.tif")  # listed after the folder that cannot be read
    assert sniff(tmp_path) == "imagexpress"


class _Entry:
    """A listed file that is not there (creating thousands of files is slow on a busy disk)."""

    def __init__(self, folder, name):
        self.name, self.path = name, os.path.join(folder, name)

    def is_dir(self, follow_symlinks=True):
        return False


def test_by_default_the_look_stops_after_5000_entries(tmp_path, monkeypatch):
    real = os.scandir
    extra = {"n": 4998}

    def scandir(path):
        with real(path) as it:
            entries = list(it)
        if Path(path) == tmp_path:
            entries += [_Entry(str(tmp_path), f"n{i:04d}.txt") for i in range(extra["n"])]
        return _Listing(entries)

    monkeypatch.setattr(os, "scandir", scandir)
    _touch(tmp_path / "deep" / "P_A01_s1_w1.tif")  # 4998 files and a folder; the image is the 5000th entry
    assert sniff(tmp_path) == "imagexpress"
    extra["n"] = 4999  # one more entry: the image is now the 5001st
    assert sniff(tmp_path) is None
