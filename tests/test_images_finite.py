"""NaN / infinite pixels of a float image (images._finite via read_image): named in a warning
that points at the caller, replaced by the image's lowest finite value, never left to poison a
plate's percentiles (issue 16)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import tifffile

from napari_cellclip.errors import CellClipWarning, ImageReadError
from napari_cellclip.images import load_field, read_image


def _float_plane():
    img = np.linspace(5.0, 50.0, 48, dtype=np.float32).reshape(6, 8)
    img[2, 3], img[4, 1], img[5, 7] = np.nan, np.inf, -np.inf
    return img  # lowest finite value: 5.0 at [0, 0]; 45 of 48 finite


def test_bad_pixels_are_counted_named_and_replaced_by_the_lowest_finite_value(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", _float_plane())
    with pytest.warns(CellClipWarning) as got:
        img = read_image(tmp_path / "f.tif")
    assert len(got) == 1
    assert str(got[0].message) == (f"{tmp_path / 'f.tif'}: 3 of 48 pixels are NaN or infinite; they are read as "
                                   "the image's lowest finite value (5)")
    assert got[0].filename == __file__  # the code that asked for the image, not the library's insides
    assert img.dtype == np.float32 and np.isfinite(img).all()
    assert img[2, 3] == img[4, 1] == img[5, 7] == np.float32(5.0)
    expected = _float_plane()
    good = np.isfinite(expected)
    np.testing.assert_array_equal(img[good], expected[good])  # every finite pixel kept as it was


def test_the_fill_is_the_minimum_not_the_first_or_a_mean(tmp_path):
    img = np.array([[7.5, np.nan, 2.25], [9.0, 3.0, np.inf]], np.float64)
    tifffile.imwrite(tmp_path / "g.tif", img)
    with pytest.warns(CellClipWarning, match=re.escape("2 of 6 pixels are NaN or infinite; they are read as the "
                                                       "image's lowest finite value (2.25)")):
        got = read_image(tmp_path / "g.tif")
    np.testing.assert_array_equal(got, [[7.5, 2.25, 2.25], [9.0, 3.0, 2.25]])


def test_one_finite_pixel_is_enough_and_none_is_an_error(tmp_path):
    img = np.full((3, 3), np.nan, np.float32)
    img[1, 1] = -4.0
    tifffile.imwrite(tmp_path / "one.tif", img)
    with pytest.warns(CellClipWarning, match="8 of 9 pixels"):
        np.testing.assert_array_equal(read_image(tmp_path / "one.tif"), np.full((3, 3), -4.0, np.float32))
    tifffile.imwrite(tmp_path / "none.tif", np.array([[np.inf, -np.inf], [np.nan, np.nan]], np.float32))
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "none.tif")
    assert str(info.value) == f"{tmp_path / 'none.tif'}: every pixel is NaN or infinite"


def test_finite_float_images_are_read_silently_and_integers_are_never_checked(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", np.arange(12, dtype=np.float32).reshape(3, 4))
    tifffile.imwrite(tmp_path / "int.tif", np.arange(12, dtype=np.uint16).reshape(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_image(tmp_path / "ok.tif"), np.arange(12).reshape(3, 4))
        np.testing.assert_array_equal(read_image(tmp_path / "int.tif"), np.arange(12).reshape(3, 4))


def test_a_field_with_a_bad_channel_names_that_channels_file(tmp_path):
    tifffile.imwrite(tmp_path / "dna.tif", np.ones((6, 8), np.float32))
    tifffile.imwrite(tmp_path / "er.tif", _float_plane())
    row = {"FileName_OrigDNA": "dna.tif", "PathName_OrigDNA": str(tmp_path),
           "FileName_OrigER": "er.tif", "PathName_OrigER": str(tmp_path)}
    with pytest.warns(CellClipWarning) as got:
        img = load_field(row)
    assert [str(w.message).split(":")[0] for w in got] == [str(tmp_path / "er.tif")]
    assert np.isfinite(img).all() and img.shape == (2, 6, 8)


def test_non_finite_pixels_of_an_ome_zarr_field_are_named_and_replaced(tmp_path):
    from _formats_data import write_ome_zarr

    img = np.linspace(1.0, 2.0, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    img[1, 3, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ome-zarr-py's own notes while writing
        plate = write_ome_zarr(tmp_path, "0.5", fields=[("B03", 1, img)], names=("DNA", "ER"), levels=1)
    image = plate / "B" / "3" / "0"
    with pytest.warns(CellClipWarning, match=re.escape(f"{image}: 1 of 64 pixels are NaN or infinite")):
        got = read_image(image, 1)
    assert got[3, 3] == np.nanmin(img[1]) == img[1, 0, 0]
    np.testing.assert_array_equal(np.delete(got.ravel(), 27), np.delete(img[1].ravel(), 27))
