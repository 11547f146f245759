"""Which pixels a plate-level normalisation range is taken from (images.sample_range /
plate_ranges / field_ranges): the pixel stride, the larger stride of a big field, unreadable
fields skipped, plates without a readable field left out (issue 16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cellclip import images
from napari_cellclip.errors import CellClipError


def _table(folder: Path, planes, plates=None, stains=("DNA",)) -> pd.DataFrame:
    """One row per field; ``planes[i]`` is field i's (H, W) DNA plane (ER: the same plus 1000).
    A plane of None is a field whose files are missing."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, plane in enumerate(planes):
        rec = {"Metadata_Plate": plates[i] if plates else "P1", "Metadata_Well": f"A{i + 1:02d}",
               "Metadata_Site": 1}
        for k, s in enumerate(stains):
            name = f"f{i}_{s}.tif"
            if plane is not None:
                tifffile.imwrite(folder / name, (plane + 1000 * k).astype(np.uint16))
            rec[f"FileName_Orig{s}"], rec[f"PathName_Orig{s}"] = name, str(folder)
        rows.append(rec)
    return pd.DataFrame(rows)


def _grid(h, w, on, off, step):
    """``on`` at every ``step``-th pixel in y and x (from 0), ``off`` elsewhere."""
    a = np.full((h, w), off, np.uint16)
    a[::step, ::step] = on
    return a


def test_every_second_pixel_in_y_and_x_is_sampled(tmp_path):
    """A small field: the default stride 2 sees only the (even, even) pixels."""
    fields = _table(tmp_path, [_grid(12, 12, 100, 9000, 2)])
    np.testing.assert_array_equal(images.plate_ranges(fields, ["DNA"])["P1"], [[100, 100]])
    np.testing.assert_array_equal(images.sample_range(fields, [0], ["DNA"]), [[100, 100]])
    # stride 1 sees every pixel: a quarter at 100, the rest at 9000
    r = images.plate_ranges(fields, ["DNA"], stride=1)["P1"]
    np.testing.assert_array_equal(r, [[100, 9000]])
    r3 = images.sample_range(fields, [0], ["DNA"], stride=3)  # (0, 3, 6, 9): 0 and 6 on the grid
    np.testing.assert_array_equal(r3, [[100, 9000]])


def test_a_big_field_is_sampled_with_a_larger_stride(tmp_path):
    """1024 x 1100 pixels is over 4 x PLATE_SAMPLE_PIXELS: the stride grows to 3 so a channel's
    sample stays near 2**18 pixels; every third pixel of this field is dark, the rest bright."""
    big = _grid(1024, 1100, 50, 7000, 3)
    fields = _table(tmp_path, [big])
    np.testing.assert_array_equal(images.plate_ranges(fields, ["DNA"])["P1"], [[50, 50]])
    # an explicit stride larger than that wins
    np.testing.assert_array_equal(images.sample_range(fields, [0], ["DNA"], stride=4), [[50, 7000]])


def test_range_percentiles_over_all_sampled_fields_and_channels(tmp_path):
    rng = np.random.default_rng(3)
    planes = [rng.integers(0, 5000, (10, 10)).astype(np.uint16) for _ in range(3)]
    fields = _table(tmp_path, planes, stains=("DNA", "ER"))
    pix = np.concatenate([p[::2, ::2].ravel() for p in planes]).astype(np.float32)
    want_dna = np.percentile(pix, [1.0, 99.9]).astype(np.float32)
    want_er = np.percentile(pix + 1000, [1.0, 99.9]).astype(np.float32)
    got = images.plate_ranges(fields, ["DNA", "ER"])["P1"]
    assert got.dtype == np.float32 and got.shape == (2, 2)
    np.testing.assert_array_equal(got, [want_dna, want_er])
    np.testing.assert_array_equal(images.sample_range(fields, [0, 1, 2], ("DNA", "ER")), got)
    got = images.plate_ranges(fields, ["ER"], low=10.0, high=60.0)["P1"]
    np.testing.assert_array_equal(got, [np.percentile(pix + 1000, [10.0, 60.0]).astype(np.float32)])
    # only the rows asked for
    only = images.sample_range(fields, [1], ["DNA"], 0.0, 100.0)
    np.testing.assert_array_equal(only, [[planes[1][::2, ::2].min(), planes[1][::2, ::2].max()]])


def test_max_fields_limits_the_sample(tmp_path):
    planes = [np.full((4, 4), v, np.uint16) for v in (10, 20, 30, 40, 50)]
    fields = _table(tmp_path, planes)
    # two fields spread over five rows: the first and the last
    np.testing.assert_array_equal(images.plate_ranges(fields, ["DNA"], 0.0, 100.0, max_fields=2)["P1"], [[10, 50]])
    np.testing.assert_array_equal(images.plate_ranges(fields, ["DNA"], 0.0, 100.0, max_fields=1)["P1"], [[10, 10]])


def test_unreadable_fields_are_skipped_and_a_plate_without_any_is_left_out(tmp_path):
    planes = [np.full((4, 4), 100, np.uint16), None, np.full((4, 4), 300, np.uint16), None, None]
    fields = _table(tmp_path, planes, plates=["A", "A", "A", "B", "B"])
    ranges = images.plate_ranges(fields, ["DNA"], 0.0, 100.0)
    assert list(ranges) == ["A"]
    np.testing.assert_array_equal(ranges["A"], [[100, 300]])
    assert images.sample_range(fields, [3, 4], ["DNA"]) is None
    assert images.sample_range(fields, [], ["DNA"]) is None
    per_row = images.field_ranges(fields, ["DNA"], "plate", 0.0, 100.0)
    assert len(per_row) == 5
    for r in per_row[:3]:
        np.testing.assert_array_equal(r, [[100, 300]])
    assert per_row[3] is None and per_row[4] is None  # plate B falls back to per-field ranges


def test_field_normalisation_needs_no_ranges_and_reads_nothing(tmp_path):
    fields = _table(tmp_path, [None, None, None])  # no file exists: nothing may be read
    assert images.field_ranges(fields, ["DNA"]) == [None, None, None]
    assert images.field_ranges(fields, ["DNA"], "FIELD") == [None, None, None]
    with pytest.raises(CellClipError, match="unknown input normalization 'well'"):
        images.field_ranges(fields, ["DNA"], "well")


def test_precomputed_ranges_are_used_as_given(tmp_path):
    fields = _table(tmp_path, [None, None, None], plates=["A", "B", "A"])  # nothing readable: no sampling
    given = {"A": np.array([[1.0, 2.0]], np.float32)}
    per_row = images.field_ranges(fields, ["DNA"], "plate", ranges=given)
    assert per_row[0] is given["A"] and per_row[2] is given["A"] and per_row[1] is None


def test_plate_normalisation_defaults_to_1_and_99_9_percent(tmp_path):
    planes = [np.arange(400, dtype=np.uint16).reshape(20, 20) * (k + 1) for k in range(2)]
    fields = _table(tmp_path, planes)
    pix = np.concatenate([p[::2, ::2].ravel() for p in planes]).astype(np.float32)
    want = np.percentile(pix, [1.0, 99.9]).astype(np.float32)
    per_row = images.field_ranges(fields, ["DNA"], "plate")
    for r in per_row:
        np.testing.assert_array_equal(r, [want])


def test_plate_range_of_one_field_matches_its_own_percentiles(tmp_path):
    """A one-field plate sampled at every pixel gets the range per-field normalisation would give
    that field, also for float pixels float32 cannot hold exactly."""
    plane = np.array([[16777217.0, 16777219.0], [16777221.0, 16777223.0]], np.float64)
    tifffile.imwrite(tmp_path / "f.tif", plane)
    fields = pd.DataFrame([{"Metadata_Plate": "P1", "FileName_OrigDNA": "f.tif", "PathName_OrigDNA": str(tmp_path)}])
    got = images.sample_range(fields, [0], ["DNA"], 10.0, 25.0, stride=1)
    np.testing.assert_array_equal(got, [images.fast_percentiles(plane, 10.0, 25.0)])
    # float32 pixels 2**24 + (0, 4, 4, 8): 25 % lies at 2**24 + 3, held as 2**24 + 4; in float64 first
    # it would be 2**24 + 2.5, held as 2**24 + 2
    assert got[0, 1] == np.float32(16777220.0)
    assert np.float32(np.percentile(plane, 25.0)) == np.float32(16777218.0)


def test_plate_normalisation_uses_the_percentiles_asked_for(tmp_path):
    planes = [np.arange(400, dtype=np.uint16).reshape(20, 20) * (k + 1) for k in range(2)]
    fields = _table(tmp_path, planes)
    pix = np.concatenate([p[::2, ::2].ravel() for p in planes]).astype(np.float32)
    per_row = images.field_ranges(fields, ["DNA"], "plate", 5.0, 80.0)
    for r in per_row:
        np.testing.assert_array_equal(r, [np.percentile(pix, [5.0, 80.0]).astype(np.float32)])
