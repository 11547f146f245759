"""A field's channels from its fields-table row (images.row_value / channel_path / channel_frame /
load_field) and the identity of a channel file the feature cache keys on (channel_stamp,
channel_digest) (issue 16)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cellclip.errors import ImageReadError
from napari_cellclip.images import channel_digest, channel_frame, channel_path, channel_stamp, load_field, row_value


# ------------------------------------------------------------------ row values
@pytest.mark.parametrize("as_series", [False, True], ids=["mapping", "series"])
def test_row_value_treats_absent_and_missing_alike(as_series):
    rec = {"a": "x.tif", "b": None, "c": np.nan, "d": pd.NA, "e": 0, "f": "", "g": [1, 2]}
    row = pd.Series(rec, dtype=object) if as_series else rec
    assert row_value(row, "a") == "x.tif"
    for key in ("b", "c", "d", "nope"):
        assert row_value(row, key) is None, key
    assert row_value(row, "e") == 0  # zero and "" are values, not missing
    assert row_value(row, "f") == ""
    assert row_value(row, "g") == [1, 2]  # a non-scalar value is kept, not "missing"


def test_row_value_of_a_dataframe_row_with_nan():
    df = pd.DataFrame({"Frame_OrigDNA": [2.0, np.nan], "Metadata_Site": [1, 2]})
    assert row_value(df.iloc[0], "Frame_OrigDNA") == 2.0
    assert row_value(df.iloc[1], "Frame_OrigDNA") is None
    assert channel_frame(df.iloc[0], "DNA") == 2 and isinstance(channel_frame(df.iloc[0], "DNA"), int)
    assert channel_frame(df.iloc[1], "DNA") is None
    assert channel_frame(df.iloc[1], "ER") is None  # no frame column at all: a single-channel file


# ------------------------------------------------------------------ channel paths
def test_channel_path_joins_folder_and_name():
    row = {"FileName_OrigDNA": "a.tif", "PathName_OrigDNA": "/data/plate1"}
    assert channel_path(row, "DNA") == Path("/data/plate1") / "a.tif"


@pytest.mark.parametrize("name", [None, "", np.nan], ids=["none", "empty", "nan"])
def test_a_stain_without_an_image_names_the_field(name):
    row = {"Metadata_Plate": "SQ1", "Metadata_Well": "B03", "Metadata_Site": 4,
           "FileName_OrigDNA": name, "PathName_OrigDNA": "/data"}
    with pytest.raises(ImageReadError) as info:
        channel_path(row, "DNA")
    assert str(info.value) == "SQ1/B03 site 4: no image for stain 'DNA'"
    with pytest.raises(ImageReadError, match=re.escape("SQ1/B03 site 4: no image for stain 'Mito'")):
        channel_path(row, "Mito")


# ------------------------------------------------------------------ load_field
def _write(folder: Path, name: str, img) -> str:
    tifffile.imwrite(folder / name, img, photometric="minisblack")
    return name


def test_default_stains_are_the_rows_file_columns_in_order(tmp_path):
    a, b = np.full((4, 5), 3, np.uint16), np.full((4, 5), 9, np.uint16)
    row = pd.Series({"Metadata_Well": "A01", "FileName_OrigMito": _write(tmp_path, "m.tif", b),
                     "PathName_OrigMito": str(tmp_path), "FileName_OrigDNA": _write(tmp_path, "d.tif", a),
                     "PathName_OrigDNA": str(tmp_path), "Frame_OrigDNA": np.nan})
    img = load_field(row)
    assert img.shape == (2, 4, 5) and img.dtype == np.uint16
    np.testing.assert_array_equal(img[:, 0, 0], [9, 3])  # Mito first, as in the row
    np.testing.assert_array_equal(load_field(row, ["DNA"])[:, 0, 0], [3])
    np.testing.assert_array_equal(load_field(dict(row), ["DNA", "Mito"])[:, 0, 0], [3, 9])


def test_frames_and_the_channel_axes_of_a_multi_channel_file(tmp_path):
    stack = (np.arange(3).reshape(3, 1, 1) * 100 + np.arange(20).reshape(1, 4, 5)).astype(np.uint16)
    _write(tmp_path, "cyx.tif", stack)
    _write(tmp_path, "yxc.tif", np.moveaxis(stack, 0, -1))
    row = {"FileName_OrigDNA": "cyx.tif", "PathName_OrigDNA": str(tmp_path), "Frame_OrigDNA": 2,
           "FileName_OrigER": "cyx.tif", "PathName_OrigER": str(tmp_path), "Frame_OrigER": 0.0}
    np.testing.assert_array_equal(load_field(row), stack[[2, 0]])
    yxc = {k: v.replace("cyx", "yxc") if isinstance(v, str) else v for k, v in row.items()}
    yxc["Metadata_ChannelAxes"] = "YXC"
    np.testing.assert_array_equal(load_field(yxc), stack[[2, 0]])
    yxc["Metadata_ChannelAxes"] = np.nan  # no axes said: CYX, the (4, 5, 3) file is cut along its rows
    assert load_field(yxc).shape == (2, 5, 3)
    row["Metadata_ChannelAxes"] = 3  # not an axes text (a number in that column): ignored, CYX
    np.testing.assert_array_equal(load_field(row), stack[[2, 0]])


def test_channels_of_different_shapes_name_both_files(tmp_path):
    row = {"FileName_OrigDNA": _write(tmp_path, "d.tif", np.zeros((4, 5), np.uint8)),
           "PathName_OrigDNA": str(tmp_path),
           "FileName_OrigER": _write(tmp_path, "e.tif", np.zeros((4, 5), np.uint8)),
           "PathName_OrigER": str(tmp_path),
           "FileName_OrigRNA": _write(tmp_path, "r.tif", np.zeros((5, 4), np.uint8)),
           "PathName_OrigRNA": str(tmp_path)}
    with pytest.raises(ImageReadError) as info:
        load_field(row)
    assert str(info.value) == f"{tmp_path / 'r.tif'}: shape (5, 4) differs from (4, 5) of d.tif in the same field"


def test_no_channels_and_mixed_pixel_types(tmp_path):
    with pytest.raises(ImageReadError) as info:
        load_field({"Metadata_Well": "A01"})
    assert str(info.value) == "<field>: no channels to read"
    row = {"FileName_OrigDNA": _write(tmp_path, "d.tif", np.full((3, 3), 200, np.uint8)),
           "PathName_OrigDNA": str(tmp_path),
           "FileName_OrigER": _write(tmp_path, "e.tif", np.full((3, 3), 40000, np.uint16)),
           "PathName_OrigER": str(tmp_path)}
    img = load_field(row)
    assert img.dtype == np.uint16  # wide enough for both, nothing wraps
    np.testing.assert_array_equal(img[:, 1, 1], [200, 40000])


# ------------------------------------------------------------------ cache identity
def test_channel_digest_is_the_content_not_the_name_or_time(tmp_path):
    img = np.arange(64, dtype=np.uint16).reshape(8, 8)
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(tmp_path / name, img)
    tifffile.imwrite(tmp_path / "c.tif", img + 1)
    rows = {n: {"FileName_OrigDNA": f"{n}.tif", "PathName_OrigDNA": str(tmp_path)} for n in "abc"}
    da, db, dc = (channel_digest(rows[n], "DNA") for n in "abc")
    assert da == db != dc
    assert da == hashlib.blake2b((tmp_path / "a.tif").read_bytes(), digest_size=20).hexdigest()


def test_channel_digest_of_a_missing_file_is_an_image_error(tmp_path):
    row = {"FileName_OrigDNA": "gone.tif", "PathName_OrigDNA": str(tmp_path)}
    with pytest.raises(ImageReadError) as info:
        channel_digest(row, "DNA")
    assert str(info.value) == f"{tmp_path / 'gone.tif'}: file not found or not readable (No such file or directory)"
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no OSError traceback for a user


def test_channel_stamp_follows_size_and_mtime(tmp_path):
    f = tmp_path / "a.tif"
    f.write_bytes(b"x" * 10)
    os.utime(f, ns=(1_000_000_000, 1_234_567_890_123))
    assert channel_stamp(f) == "10:1234567890123"
    assert channel_stamp(str(f)) == "10:1234567890123"
    f.write_bytes(b"y" * 11)
    os.utime(f, ns=(1_000_000_000, 1_234_567_890_123))
    assert channel_stamp(f) == "11:1234567890123"
    with pytest.raises(OSError):
        channel_stamp(tmp_path / "gone.tif")
