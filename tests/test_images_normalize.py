"""Percentile intensity normalisation (images.fast_percentiles / channel_ranges / normalize /
normalize_range / check_normalization / load_field_normalized) and display contrast limits
(issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_cellclip import images
from napari_cellclip.errors import CellClipError

RNG = np.random.default_rng(16)


def _reference(plane, low, high):
    """What the histogram path must equal bit for bit: numpy's own percentile in float32."""
    lo, hi = np.percentile(np.asarray(plane, np.float32).ravel(), [low, high])
    return np.float32(lo), np.float32(hi)


# ------------------------------------------------------------------ fast_percentiles
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001])
def test_histogram_percentiles_equal_numpy_bit_for_bit(dtype, n):
    top = np.iinfo(dtype).max
    plane = RNG.integers(0, top, n, dtype=dtype, endpoint=True)
    plane[: max(1, n // 10)] = top  # pixels at the very top of the range
    for low, high in [(1.0, 99.9), (0.0, 100.0), (25.0, 75.0), (50.0, 50.0), (10.0, 90.0), (0.5, 99.5),
                      (33.3, 66.7), (12.5, 87.5)]:
        got = images.fast_percentiles(plane.reshape(1, -1) if n % 2 else plane, low, high)
        assert got == _reference(plane, low, high), (n, low, high)
        assert all(type(v) is np.float32 for v in got)


def test_histogram_percentiles_between_two_far_apart_values():
    """Interpolation between neighbours far apart, on both sides of the midpoint (numpy's two-sided lerp)."""
    plane = np.array([0] * 3 + [60000] * 2, np.uint16)
    for q in (10.0, 40.0, 49.0, 50.0, 51.0, 62.5, 70.0, 90.0, 99.9):
        assert images.fast_percentiles(plane, q, q) == _reference(plane, q, q), q


def test_default_percentiles_are_1_and_99_9():
    plane = np.arange(10_000, dtype=np.uint16)
    assert images.fast_percentiles(plane) == _reference(plane, 1.0, 99.9)
    f = plane.astype(np.float64)
    assert images.fast_percentiles(f) == _reference(f, 1.0, 99.9)
    assert images.fast_percentiles(f) == images.fast_percentiles(plane)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32, np.uint32])
def test_other_pixel_types_use_numpy(dtype):
    plane = (RNG.random((9, 11)) * 1000 - (0 if np.dtype(dtype).kind == "u" else 300)).astype(dtype)
    got = images.fast_percentiles(plane, 2.0, 98.0)
    assert got == _reference(plane, 2.0, 98.0)
    assert all(type(v) is np.float32 for v in got)


def test_channel_ranges_are_each_channels_own():
    img = np.stack([np.arange(1000, dtype=np.uint16), np.arange(1000, dtype=np.uint16) * 3 + 50])
    r = images.channel_ranges(img, 5.0, 95.0)
    assert r.dtype == np.float32 and r.shape == (2, 2)
    np.testing.assert_array_equal(r[0], _reference(img[0], 5.0, 95.0))
    np.testing.assert_array_equal(r[1], _reference(img[1], 5.0, 95.0))
    np.testing.assert_array_equal(images.channel_ranges(img), [_reference(c, 1.0, 99.9) for c in img])


# ------------------------------------------------------------------ normalize / normalize_range
def test_normalize_maps_the_percentiles_to_0_and_1_and_clips():
    ch = np.arange(1, 10_001, dtype=np.uint16).reshape(100, 100)
    img = np.stack([ch, ch // 2])
    out = images.normalize(img)
    assert out.dtype == np.float32 and out.shape == img.shape
    lo, hi = _reference(ch, 1.0, 99.9)
    np.testing.assert_allclose(out[0], np.clip((ch - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert (out[0] == 0).sum() == (ch <= lo).sum()  # only the darkest 1 % are clipped to 0
    lo2, hi2 = _reference(ch // 2, 10.0, 90.0)
    np.testing.assert_allclose(images.normalize(img, 10.0, 90.0)[1],
                               np.clip((ch // 2 - lo2) / (hi2 - lo2), 0, 1), atol=1e-6)


def test_normalize_of_one_plane_and_of_flat_channels():
    plane = np.array([[0, 100], [200, 400]], np.float32)
    out = images.normalize(plane, 0.0, 100.0)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0, 0.25], [0.5, 1.0]])
    flat = images.normalize(np.stack([np.full((3, 3), 7, np.uint16), np.eye(3, dtype=np.uint16)]), 0.0, 100.0)
    np.testing.assert_array_equal(flat[0], 0.0)  # a flat channel is zeros, not NaN
    np.testing.assert_array_equal(flat[1], np.eye(3))


def test_normalize_range_with_fixed_ranges():
    img = np.stack([np.array([[0, 50], [100, 150]], np.uint16), np.array([[5, 5], [9, 1]], np.uint16),
                    np.array([[1, 2], [3, 4]], np.uint16)])
    ranges = np.array([[50, 150], [5, 5], [4, 2]], np.float64)  # normal, flat, reversed
    out = images.normalize_range(img, ranges)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[0, 0], [0.5, 1.0]])
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)  # hi < lo: zeros, not an inverted image
    assert img[0, 1, 1] == 150  # the input is left alone


def test_normalize_range_clips_above_and_below():
    img = np.array([[[-10.0, 0.0, 5.0, 10.0, 30.0]]], np.float32)
    out = images.normalize_range(img, [[0.0, 10.0]])
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.5, 1.0, 1.0]]])
    assert img[0, 0, 0] == -10.0


@pytest.mark.parametrize("value,expected", [("field", "field"), ("plate", "plate"), ("Plate", "plate"),
                                            ("FIELD", "field")])
def test_check_normalization_accepts_either_case(value, expected):
    assert images.check_normalization(value) == expected


@pytest.mark.parametrize("value", ["well", "", None, "plates"])
def test_check_normalization_names_the_choices(value):
    with pytest.raises(CellClipError) as info:
        images.check_normalization(value)
    assert str(info.value) == f"unknown input normalization {value!r}; choose field or plate"


def test_load_field_normalized_passes_the_percentiles(tmp_path):
    ch = np.arange(400, dtype=np.uint16).reshape(20, 20)
    tifffile.imwrite(tmp_path / "d.tif", ch)
    row = {"FileName_OrigDNA": "d.tif", "PathName_OrigDNA": str(tmp_path)}
    out = images.load_field_normalized(row)
    assert out.shape == (1, 20, 20) and out.dtype == np.float32
    np.testing.assert_array_equal(out, images.normalize(ch[None]))
    lo, hi = _reference(ch, 20.0, 80.0)
    np.testing.assert_allclose(images.load_field_normalized(row, ["DNA"], low=20.0, high=80.0)[0],
                               np.clip((ch - lo) / (hi - lo), 0, 1), atol=1e-6)


# ------------------------------------------------------------------ contrast limits
def test_contrast_limits_are_robust_percentiles_as_floats():
    a = np.arange(1001, dtype=np.uint16)
    lo, hi = images.contrast_limits(a)
    assert lo == 10.0 and hi == pytest.approx(999.0)
    assert type(lo) is float and type(hi) is float
    assert images.contrast_limits(a, 10.0, 90.0) == (100.0, 900.0)


def test_contrast_limits_ignore_non_finite_pixels_and_never_collapse():
    a = np.array([np.nan, 1.0, 2.0, 3.0, np.inf, -np.inf], np.float32)
    assert images.contrast_limits(a, 0.0, 100.0) == (1.0, 3.0)
    assert images.contrast_limits(np.full(5, np.nan, np.float32)) == (0.0, 1.0)
    assert images.contrast_limits(np.zeros(0, np.uint16)) == (0.0, 1.0)
    assert images.contrast_limits(np.full((4, 4), 7, np.uint16)) == (7.0, 8.0)  # flat: a one-unit window


@pytest.mark.parametrize("plane,q", [([9940, 62281], 33.78542238338492), ([2483, 30047], 16.62051785305335),
                                     ([27716, 61083], 92.16768602773698)])
def test_histogram_percentiles_round_like_numpy_on_either_side_of_the_midpoint(plane, q):
    """Pairs where interpolating up from the lower value and down from the upper one round to
    different float32 values: numpy takes the first below the midpoint, the second above it."""
    plane = np.array(plane, np.uint16)
    up, down = (np.float32(plane[0] + (plane[1] - plane[0]) * (q / 100)),
                np.float32(plane[1] - (plane[1] - plane[0]) * (1 - q / 100)))
    assert up != down  # the case is a real one
    want = _reference(plane, q, q)
    assert want == ((up, up) if q < 50 else (down, down))
    assert images.fast_percentiles(plane, q, q) == want


def test_an_empty_plane_has_no_percentiles():
    """No pixels, no range: an error, never a range invented from an empty histogram."""
    for dtype in (np.uint8, np.uint16, np.float32):
        with pytest.raises((IndexError, ValueError)):
            images.fast_percentiles(np.zeros((0, 5), dtype))


def test_percentiles_of_wide_pixel_types_are_taken_at_float32_precision():
    """Values float32 cannot hold (above 2**24) are rounded before interpolating, as the
    documented ``np.percentile(plane.astype(float32))`` does; interpolating first rounds elsewhere."""
    plane = np.array([[16777217.0, 16777219.0]], np.float64)
    assert images.fast_percentiles(plane, 25.0, 25.0) == (np.float32(16777216.0), np.float32(16777216.0))
    assert np.float32(np.percentile(plane, 25.0)) == np.float32(16777218.0)  # what float64 first would give
    assert images.fast_percentiles(plane.astype(np.int32), 25.0, 25.0) == (16777216.0, 16777216.0)


def test_fixed_ranges_are_applied_at_float32_precision():
    """A range given in float64 (a dict a user built, a JSON cache) rescales bit-identically to the
    same range in float32, the precision the feature cache keys ranges with."""
    img = (np.random.default_rng(5).random((2, 40, 40)) * 1000).astype(np.float32)
    r64 = np.array([[0.1, 999.7], [12.345678901, 500.0000001]], np.float64)
    np.testing.assert_array_equal(images.normalize_range(img, r64), images.normalize_range(img, r64.astype(np.float32)))
    np.testing.assert_array_equal(images.normalize_range(img, r64.tolist()),
                                  images.normalize_range(img, r64.astype(np.float32)))


def test_load_field_normalized_reads_only_the_stains_asked_for(tmp_path):
    tifffile.imwrite(tmp_path / "d.tif", np.arange(16, dtype=np.uint16).reshape(4, 4))
    row = {"FileName_OrigDNA": "d.tif", "PathName_OrigDNA": str(tmp_path),
           "FileName_OrigER": "missing.tif", "PathName_OrigER": str(tmp_path)}
    assert images.load_field_normalized(row, ["DNA"]).shape == (1, 4, 4)
    with pytest.raises(images.ImageReadError, match="missing.tif: file not found"):
        images.load_field_normalized(row)
