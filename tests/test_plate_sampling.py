"""Plates with more fields than the plate-range sample, and LoadData paths in sub-folders (issue 16).

Under plate normalisation every field of a plate is rescaled by one per-channel range taken
from up to 16 sampled fields (``images.PLATE_SAMPLE_FIELDS``).  The sample must be spread
through the whole plate and deterministic: a sample of only the first rows (say, the first
columns of the plate) would give a range that clips the bright wells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cellclip import images
from napari_cellclip.errors import PlateError
from napari_cellclip.images import load_field
from napari_cellclip.plates import read_plate

STAINS = ["DNA", "ER"]


def _plate(folder: Path, values, plate="P1", wells=None) -> pd.DataFrame:
    """A plate of constant-valued 16x16 uint16 fields: field i is ``values[i]`` in DNA and
    ``2 * values[i]`` in ER.  Returns its fields table (one row per field, table order = i)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, v in enumerate(values):
        rec = {"Metadata_Plate": plate, "Metadata_Well": wells[i] if wells else f"A{i // 4 + 1:02d}",
               "Metadata_Site": i % 4 + 1}
        for s, mult in zip(STAINS, (1, 2)):
            name = f"{plate}_f{i:03d}_{s}.tif"
            tifffile.imwrite(folder / name, np.full((16, 16), v * mult, dtype=np.uint16))
            rec[f"FileName_Orig{s}"] = name
            rec[f"PathName_Orig{s}"] = str(folder)
        rows.append(rec)
    return pd.DataFrame(rows)


def _spread(n, k=images.PLATE_SAMPLE_FIELDS):
    """Evenly spread positions 0 .. n-1 (both ends included), computed here without the code."""
    if n <= k:
        return list(range(n))
    return [int(np.floor(i * (n - 1) / (k - 1) + 0.5)) for i in range(k)]


# ------------------------------------------------------------------ which fields are sampled
@pytest.mark.parametrize("n", [17, 20, 40, 384])
def test_sample_of_a_big_plate_is_spread_over_the_whole_plate(n):
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"W{i}" for i in range(n)]})
    got = images.plate_samples(fields)
    assert list(got) == ["P"]
    pos = got["P"].tolist()
    assert len(pos) == images.PLATE_SAMPLE_FIELDS == 16
    assert pos == sorted(set(pos))  # distinct, in plate order
    assert pos[0] == 0 and pos[-1] == n - 1  # from the first to the last field
    gaps = np.diff(pos)
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert pos == _spread(n)
    assert images.plate_samples(fields)["P"].tolist() == pos  # deterministic


def test_small_plates_use_every_field_and_max_fields_is_respected():
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"W{i}" for i in range(16)]})
    assert images.plate_samples(fields)["P"].tolist() == list(range(16))
    assert images.plate_samples(fields.iloc[:3])["P"].tolist() == [0, 1, 2]
    assert images.plate_samples(fields, max_fields=4)["P"].tolist() == [0, 5, 10, 15]
    assert images.plate_samples(fields, max_fields=0)["P"].tolist() == [0]  # at least one field


def test_each_plate_is_sampled_from_its_own_rows():
    """Two plates interleaved in one table (as after concatenating wells): positions index the
    table, each plate's sample spans that plate only."""
    n = 50
    plates = np.where(np.arange(2 * n) % 2 == 0, "A", "B")
    fields = pd.DataFrame({"Metadata_Plate": plates, "Metadata_Well": [f"W{i}" for i in range(2 * n)]})
    got = images.plate_samples(fields)
    assert list(got) == ["A", "B"]
    a_rows, b_rows = np.flatnonzero(plates == "A"), np.flatnonzero(plates == "B")
    assert got["A"].tolist() == a_rows[_spread(n)].tolist()
    assert got["B"].tolist() == b_rows[_spread(n)].tolist()


# ------------------------------------------------------------------ what ranges result
def test_plate_range_comes_from_the_spread_sample(tmp_path):
    """24 fields; the sampled ones (0, 2, 3, 5, ...) hold 1000..1800, the ones left out are
    extreme.  The plate's range is exactly the sampled fields' span: a sample of the first 16
    rows, or of every row, gives a different range."""
    n = 24
    pos = _spread(n)
    values = [30_000 if i % 2 else 5 for i in range(n)]  # extremes the sample must not see
    for j, p in enumerate(pos):
        values[p] = 1000 + 800 * j // (len(pos) - 1)
    fields = _plate(tmp_path / "P1", values)
    ranges = images.plate_ranges(fields, STAINS)
    lo, hi = min(values[p] for p in pos), max(values[p] for p in pos)
    assert (lo, hi) == (1000, 1800)
    np.testing.assert_allclose(ranges["P1"], [[lo, hi], [2 * lo, 2 * hi]], rtol=1e-6)
    # the range every field of the plate is rescaled with
    per_row = images.field_ranges(fields, STAINS, "plate")
    assert len(per_row) == n and all(np.array_equal(r, ranges["P1"]) for r in per_row)
    # a field brighter than the sample clips at 1, one in the middle lands in the middle
    bright = images.normalize_range(load_field(fields.iloc[1], STAINS), per_row[1])
    assert np.all(bright == 1.0)
    mid = next(p for j, p in enumerate(pos) if 1000 + 800 * j // 15 == 1373)
    np.testing.assert_allclose(images.normalize_range(load_field(fields.iloc[mid], STAINS), per_row[mid]),
                               (1373 - lo) / (hi - lo), rtol=1e-5)


def test_two_plates_get_their_own_ranges(tmp_path):
    a = _plate(tmp_path / "A", [100 + 10 * i for i in range(20)], plate="A")
    b = _plate(tmp_path / "B", [5000 + 100 * i for i in range(30)], plate="B")
    fields = pd.concat([a, b], ignore_index=True)
    ranges = images.plate_ranges(fields, STAINS)
    np.testing.assert_allclose(ranges["A"][0], [100, 290])
    np.testing.assert_allclose(ranges["B"][0], [5000, 7900])
    per_row = images.field_ranges(fields, STAINS, "plate")
    assert all(np.array_equal(r, ranges["A"]) for r in per_row[:20])
    assert all(np.array_equal(r, ranges["B"]) for r in per_row[20:])


# ------------------------------------------------------------------ LoadData in sub-folders
def _tif(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((8, 8), value, dtype=np.uint16))


def _write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "FileName_OrigDNA", "PathName_OrigDNA"]
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


def test_relative_pathnames_with_sub_folders_resolve_against_the_csv_folder(tmp_path, monkeypatch):
    """A Cell Painting Gallery manifest keeps the images in per-plate sub-folders; the same file
    name in two folders is two different images."""
    proj = tmp_path / "project"
    _tif(proj / "images" / "plate1" / "A01" / "f1.tif", 11)
    _tif(proj / "images" / "plate1" / "A02" / "f1.tif", 22)
    _tif(proj / "images" / "plate2" / "f1.tif", 33)
    _tif(tmp_path / "elsewhere" / "f1.tif", 44)
    absolute = str((tmp_path / "elsewhere").resolve())
    csv = _write_csv(proj / "load_data.csv", [
        ["P", "A01", 1, "f1.tif", "images/plate1/A01"],
        ["P", "A02", 1, "f1.tif", "images/plate1/A02"],
        ["P", "A03", 1, "f1.tif", "./images/plate2"],
        ["P", "A04", 1, "f1.tif", absolute],
    ])
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working folder must not matter
    df = read_plate(Path("..") / "project" / "load_data.csv")
    root = proj.resolve()
    by_well = df.set_index("Metadata_Well")["PathName_OrigDNA"]
    assert by_well["A01"] == str(root / "images" / "plate1" / "A01")
    assert by_well["A02"] == str(root / "images" / "plate1" / "A02")
    assert by_well["A03"] == str(root / "images" / "plate2")
    assert by_well["A04"] == absolute  # absolute paths are kept as they are
    values = {w: int(load_field(r, ["DNA"]).max()) for w, r in df.set_index("Metadata_Well").iterrows()}
    assert values == {"A01": 11, "A02": 22, "A03": 33, "A04": 44}
    assert csv.is_file()


def test_parent_folder_and_empty_pathnames(tmp_path, monkeypatch):
    """A manifest in ``manifests/`` pointing at ``../images/<plate>``; an empty PathName (or none
    at all) means the CSV's own folder."""
    _tif(tmp_path / "images" / "SQ1" / "a.tif", 7)
    _tif(tmp_path / "manifests" / "b.tif", 8)
    _write_csv(tmp_path / "manifests" / "load_data.csv", [
        ["SQ1", "B02", 1, "a.tif", "../images/SQ1"],
        ["SQ1", "B03", 1, "b.tif", ""],
    ])
    monkeypatch.chdir(tmp_path / "images")
    df = read_plate(tmp_path / "manifests" / "load_data.csv")
    paths = df.set_index("Metadata_Well")["PathName_OrigDNA"]
    assert paths["B02"] == str((tmp_path / "images" / "SQ1").resolve())  # ".." resolved away
    assert paths["B03"] == str((tmp_path / "manifests").resolve())
    assert [int(load_field(r, ["DNA"]).max()) for _, r in df.iterrows()] == [7, 8]

    (tmp_path / "manifests" / "no_path.csv").write_text(
        "Metadata_Plate,Metadata_Well,Metadata_Site,FileName_OrigDNA\nSQ1,B03,1,b.tif\n")
    df = read_plate(tmp_path / "manifests" / "no_path.csv")
    assert df.loc[0, "PathName_OrigDNA"] == str((tmp_path / "manifests").resolve())


def test_missing_image_in_a_sub_folder_is_named(tmp_path):
    _write_csv(tmp_path / "load_data.csv", [["P", "A01", 1, "gone.tif", "images/plate9"]])
    df = read_plate(tmp_path / "load_data.csv")
    with pytest.raises(Exception) as info:
        load_field(df.iloc[0], ["DNA"])
    assert str(Path("images") / "plate9" / "gone.tif") in str(info.value)
    with pytest.raises(PlateError, match="not found"):
        read_plate(tmp_path / "nope.csv")
