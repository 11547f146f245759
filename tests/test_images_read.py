"""Reading one channel plane (images.read_image): file types, frames and axes, pyramid levels,
pixel types, and the messages that name what is wrong with a file (issue 16)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_cellclip.errors import ImageReadError
from napari_cellclip.images import pyramid_shapes, read_image

RNG = np.random.default_rng(7)


def _stack(c=3, h=6, w=5, dtype=np.uint16):
    """A (C, H, W) stack whose channels differ everywhere (channel k holds 1000*k + pixel index)."""
    return (np.arange(h * w).reshape(1, h, w) + 1000 * np.arange(c).reshape(c, 1, 1)).astype(dtype)


# ------------------------------------------------------------------ file types
def test_missing_file_and_unknown_type_are_named(tmp_path):
    with pytest.raises(ImageReadError, match=re.escape(f"{tmp_path / 'gone.tif'}: file not found")):
        read_image(tmp_path / "gone.tif")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "x.jpg")
    assert str(info.value) == f"{tmp_path / 'x.jpg'}: unsupported image type '.jpg' (use TIFF, PNG or OME-Zarr)"
    assert info.value.path == str(tmp_path / "x.jpg")


def test_upper_case_suffixes_are_read(tmp_path):
    img = RNG.integers(0, 60000, (7, 9), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.TIF", img)
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "b.PNG")
    np.testing.assert_array_equal(read_image(tmp_path / "a.TIF"), img)
    np.testing.assert_array_equal(read_image(tmp_path / "b.PNG"), img.astype(np.uint8))


def test_corrupt_tiff_names_the_file_and_the_decoder_error(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.ones((64, 64), np.uint16))
    data = (tmp_path / "c.tif").read_bytes()
    (tmp_path / "c.tif").write_bytes(data[:40])
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "c.tif")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'c.tif'}: cannot decode image (TiffFileError: ")
    assert "imagecodecs" not in msg


def test_png_grey_rgb_and_rgba_give_one_plane(tmp_path):
    grey = RNG.integers(0, 255, (5, 8), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = np.stack([grey, grey // 2, grey // 3], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((5, 8, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("g.png", "rgb.png", "rgba.png"):
        got = read_image(tmp_path / name)
        assert got.shape == (5, 8), name
        np.testing.assert_array_equal(got, grey)  # the first (red) plane
    # a 3-channel TIFF is not an RGB picture: it is refused, not silently cut to its first plane
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.raises(ImageReadError, match=r"expected a 2-D single-channel image, got shape \(5, 8, 3\)"):
        read_image(tmp_path / "rgb.tif")


def test_a_single_resolution_file_refuses_a_pyramid_level(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.ones((4, 4), np.uint16))
    Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "a.png")
    for name in ("a.tif", "a.png"):
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name, level=1)
        assert str(info.value) == (f"{tmp_path / name}: pyramid level 1 requested, but the file holds one "
                                   "resolution")
        assert read_image(tmp_path / name, level=0).shape == (4, 4)
        assert pyramid_shapes(tmp_path / name) == []


def test_pyramid_shapes_of_an_unreadable_header(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"this is no TIFF header")
    with pytest.raises(ImageReadError, match=re.escape(f"{tmp_path / 'bad.tif'}: cannot read the image header (")):
        pyramid_shapes(tmp_path / "bad.tif")
    (tmp_path / "bad.ome.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ImageReadError, match="cannot read the image header"):
        pyramid_shapes(tmp_path / "bad.ome.tif")
    assert pyramid_shapes(tmp_path / "notes.txt") == []  # not an image: no levels, nothing opened


def test_pyramid_shapes_of_an_upper_case_ome_tiff(tmp_path):
    img = _stack(2, 16, 16)
    with tifffile.TiffWriter(tmp_path / "P.OME.TIF") as tw:
        tw.write(img, subifds=1, metadata={"axes": "CYX"})
        tw.write(img[:, ::2, ::2], subfiletype=1)
    assert pyramid_shapes(tmp_path / "P.OME.TIF") == [(16, 16), (8, 8)]


# ------------------------------------------------------------------ frames and axes
def test_frame_picks_a_channel_of_a_cyx_or_yxc_tiff(tmp_path):
    img = _stack(3)
    tifffile.imwrite(tmp_path / "cyx.tif", img, photometric="minisblack")
    tifffile.imwrite(tmp_path / "yxc.tif", np.moveaxis(img, 0, -1), photometric="minisblack")
    for k in range(3):
        np.testing.assert_array_equal(read_image(tmp_path / "cyx.tif", frame=k), img[k])
        np.testing.assert_array_equal(read_image(tmp_path / "cyx.tif", frame=k, axes="CYX"), img[k])
        np.testing.assert_array_equal(read_image(tmp_path / "yxc.tif", frame=k, axes="YXC"), img[k])
        np.testing.assert_array_equal(read_image(tmp_path / "yxc.tif", frame=k, axes="yxc"), img[k])


def test_frame_out_of_range_and_bad_axes_are_named(tmp_path):
    img = _stack(3)
    tifffile.imwrite(tmp_path / "cyx.tif", img, photometric="minisblack")
    tifffile.imwrite(tmp_path / "yxc.tif", np.moveaxis(img, 0, -1), photometric="minisblack")
    for frame in (3, -1):
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / "cyx.tif", frame=frame)
        assert str(info.value) == (f"{tmp_path / 'cyx.tif'}: channel index {frame} out of range "
                                   "(file has 3 channels)")
    # the channel count of a YXC file is its last axis (5 wide here), not its first (6 rows)
    with pytest.raises(ImageReadError, match=r"channel index 3 out of range \(file has 3 channels\)"):
        read_image(tmp_path / "yxc.tif", frame=3, axes="YXC")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "cyx.tif", frame=0, axes="XYC")
    assert str(info.value).endswith("expected a 3-D XYC multi-channel image, got shape (3, 6, 5)")
    # a 3-D stack read without a frame is not one plane
    with pytest.raises(ImageReadError, match=r"expected a 2-D single-channel image, got shape \(3, 6, 5\)"):
        read_image(tmp_path / "cyx.tif")


def test_frame_of_a_single_plane_file(tmp_path):
    plane = RNG.integers(0, 4000, (6, 5), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "one.tif", plane)
    # frame 0 (or none) of a one-plane file is that plane; any other frame is a mistake
    np.testing.assert_array_equal(read_image(tmp_path / "one.tif", frame=0), plane)
    np.testing.assert_array_equal(read_image(tmp_path / "one.tif"), plane)
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "one.tif", frame=1)
    assert str(info.value) == f"{tmp_path / 'one.tif'}: expected a 3-D CYX multi-channel image, got shape (6, 5)"
    with pytest.raises(ImageReadError, match=r"expected a 3-D YXC multi-channel image, got shape \(6, 5\)"):
        read_image(tmp_path / "one.tif", frame=2, axes="yxc")


def test_explicit_axes_read_an_ome_tiff_as_a_plain_stack(tmp_path):
    """``axes`` given: the OME metadata is not consulted, the stack is split as told."""
    img = _stack(2, 8, 8)
    tifffile.imwrite(tmp_path / "f.ome.tif", img, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "f.ome.tif", frame=1), img[1])
    np.testing.assert_array_equal(read_image(tmp_path / "f.ome.tif", frame=1, axes="CYX"), img[1])
    with pytest.raises(ImageReadError, match="pyramid level 1 requested"):
        read_image(tmp_path / "f.ome.tif", frame=1, axes="CYX", level=1)


# ------------------------------------------------------------------ pixel types
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_numeric_pixel_types_come_back_unchanged(tmp_path, dtype):
    img = (RNG.random((6, 7)) * 100).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite image is read without a word
        got = read_image(tmp_path / "a.tif")
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, img)


@pytest.mark.parametrize("img", [np.ones((4, 4), bool), np.ones((4, 4), np.complex64)], ids=["bool", "complex"])
def test_non_numeric_pixel_types_are_refused(tmp_path, img):
    tifffile.imwrite(tmp_path / "a.tif", img)
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "a.tif")
    assert str(info.value) == f"{tmp_path / 'a.tif'}: unsupported pixel type {img.dtype}"


def test_a_3d_stack_without_a_frame_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", _stack(2, 4, 4), photometric="minisblack")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "s.tif")
    assert str(info.value) == f"{tmp_path / 's.tif'}: expected a 2-D single-channel image, got shape (2, 4, 4)"
    assert info.value.path == str(tmp_path / "s.tif")


def test_an_unreadable_header_names_the_decoders_error_type(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"this is no TIFF header")
    with pytest.raises(ImageReadError) as info:
        pyramid_shapes(tmp_path / "bad.tif")
    assert f"{tmp_path / 'bad.tif'}: cannot read the image header (TiffFileError: " in str(info.value)


def test_an_ome_tiff_is_opened_once_per_plane_and_per_level_query(tmp_path, monkeypatch):
    """The OME-XML of a big OME-TIFF is parsed on every open: reading a plane or its pyramid
    levels must open the file once, not once more inside the OME reader."""
    img = _stack(2, 16, 16)
    with tifffile.TiffWriter(tmp_path / "p.ome.tif") as tw:
        tw.write(img, subifds=1, metadata={"axes": "CYX"})
        tw.write(img[:, ::2, ::2], subfiletype=1)
    opened = []

    class Counting(tifffile.TiffFile):
        def __init__(self, *args, **kwargs):
            opened.append(args[0] if args else kwargs.get("arg"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tifffile, "TiffFile", Counting)
    np.testing.assert_array_equal(read_image(tmp_path / "p.ome.tif", 1), img[1])
    assert len(opened) == 1
    np.testing.assert_array_equal(read_image(tmp_path / "p.ome.tif", 0, level=1), img[0, ::2, ::2])
    assert len(opened) == 2
    assert pyramid_shapes(tmp_path / "p.ome.tif") == [(16, 16), (8, 8)]
    assert len(opened) == 3
