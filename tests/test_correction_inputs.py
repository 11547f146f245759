"""What the correction reads from its inputs and what it tells the user about them (found by
mutation testing, issue 16): which rows are negative controls, plates, fields tables without
metadata, method names and options of a spec, and the exact errors and warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import correction as corr
from napari_cellclip.errors import CellClipError, CellClipWarning, CheckpointError


def _x(n, d=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) * 2 + 7


def _centred_on(x, rows):
    ref = x[rows].astype(np.float64)
    return (x - ref.mean(0)) / ref.std(0)


# ---------------------------------------------------------------------- negative controls
def test_empty_control_type_column_falls_back_to_is_control():
    """A Metadata_control_type column that exists but is blank everywhere says nothing: the
    controls come from Metadata_is_control."""
    n = 8
    x = _x(n)
    is_ctrl = [True, False, True, False, True, False, True, False]
    for blank in ([np.nan] * n, [""] * n, [None] * n):
        f = pd.DataFrame({"Metadata_Plate": ["P"] * n, "Metadata_control_type": blank,
                          "Metadata_is_control": is_ctrl})
        np.testing.assert_array_equal(corr.control_mask(f), is_ctrl)
        np.testing.assert_allclose(corr.apply(x, f, corr.make_spec("center_scale")),
                                   _centred_on(x, np.flatnonzero(is_ctrl)), rtol=1e-5, atol=1e-5)


def test_is_control_alone_marks_the_controls_and_missing_values_are_not_controls():
    n = 8
    x = _x(n)
    f = pd.DataFrame({"Metadata_Plate": ["P"] * n,
                      "Metadata_is_control": [True, None, True, np.nan, True, False, None, False]})
    np.testing.assert_array_equal(corr.control_mask(f), [True, False, True, False, True, False, False, False])
    np.testing.assert_allclose(corr.apply(x, f, corr.make_spec("center_scale")),
                               _centred_on(x, [0, 2, 4]), rtol=1e-5, atol=1e-5)


def test_empty_or_numeric_control_columns_read_without_warnings():
    """Columns read from csv / parquet that are empty or numeric are float: reading the controls
    from them must not depend on pandas filling a float column with text (deprecated in pandas 3,
    an error in pandas 4)."""
    nan = np.nan
    tables = [
        ({"Metadata_control_type": [nan] * 4, "Metadata_is_control": [1.0, 0.0, nan, 1.0]}, [1, 0, 0, 1]),
        ({"Metadata_is_control": [1.0, nan, 0.0, 1.0]}, [1, 0, 0, 1]),
        ({"Metadata_pert_iname": [nan] * 4}, [0, 0, 0, 0]),
        ({"Metadata_control_type": [nan] * 4, "Metadata_pert_iname": ["DMSO", nan, "x", "dmso"]}, [1, 0, 0, 1]),
    ]
    for columns, want in tables:
        f = pd.DataFrame(columns)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mask = corr.control_mask(f)
        np.testing.assert_array_equal(mask, np.array(want, dtype=bool))


def test_missing_compound_names_are_not_dmso():
    f = pd.DataFrame({"Metadata_pert_iname": ["dmso", None, "DMSO", np.nan, "taxol"]})
    np.testing.assert_array_equal(corr.control_mask(f), [True, False, True, False, False])


def test_a_table_without_plate_or_control_columns_is_one_plate_centred_on_all_its_fields():
    n = 6
    x = _x(n)
    f = pd.DataFrame({"Metadata_Well": [f"A{i:02d}" for i in range(n)]})
    mask = corr.control_mask(f)
    assert mask.dtype == bool and mask.shape == (n,) and not mask.any()
    with pytest.warns(CellClipWarning) as seen:
        y = corr.apply(x, f, corr.make_spec("center_scale"))
    assert [str(w.message) for w in seen] == [
        "plate <plate>: no negative-control (DMSO) fields; centring and scaling on all its 6 fields "
        "instead, so its fields are compared with the plate's average, not with DMSO"]
    np.testing.assert_allclose(y, _centred_on(x, slice(None)), rtol=1e-5, atol=1e-5)


def test_fields_without_columns_are_one_plate_without_controls():
    """Anything with a length can stand for the fields (a list of well names): one plate, no
    controls."""
    n = 5
    x = _x(n)
    wells = [f"A{i:02d}" for i in range(n)]
    assert not corr.control_mask(wells).any()
    assert list(corr.plate_keys(wells)) == ["<plate>"] * n
    with pytest.warns(CellClipWarning, match="^plate <plate>: no negative-control"):
        y = corr.apply(x, wells, corr.make_spec("center_scale"))
    np.testing.assert_allclose(y, _centred_on(x, slice(None)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- warnings
def test_plate_of_two_fields_without_controls_is_centred_on_both():
    x = _x(2)
    f = pd.DataFrame({"Metadata_Plate": ["Q", "Q"], "Metadata_control_type": ["trt", "trt"]})
    with pytest.warns(CellClipWarning) as seen:
        y = corr.apply(x, f, corr.make_spec("center_scale"))
    assert [str(w.message) for w in seen] == [
        "plate Q: no negative-control (DMSO) fields; centring and scaling on all its 2 fields instead, "
        "so its fields are compared with the plate's average, not with DMSO"]
    np.testing.assert_allclose(np.abs(y), 1.0, rtol=1e-5)  # two fields sit one spread either side


def test_a_lone_field_without_controls_is_told_it_becomes_zero():
    x = _x(3)
    f = pd.DataFrame({"Metadata_Plate": ["P", "P", "Z"], "Metadata_control_type": ["negcon", "trt", "trt"]})
    with pytest.warns(CellClipWarning) as seen:
        y = corr.apply(x, f, corr.make_spec("center_scale"))
    assert [str(w.message) for w in seen] == [
        "plate Z: one field and no negative-control (DMSO) fields: centring it on itself sets its features "
        "to zero, so it embeds to the same constant vector as every such plate and every query scores it "
        "the same; annotate its negative controls (--platemap) or embed it with its whole plate"]
    np.testing.assert_array_equal(y[2], 0.0)


def test_warnings_point_at_the_users_call():
    """The no-controls warnings name the line that called apply / fit, not the library."""
    x = _x(4)
    f = pd.DataFrame({"Metadata_Plate": ["P"] * 4, "Metadata_control_type": ["trt"] * 4})
    with pytest.warns(CellClipWarning) as seen:
        corr.apply(x, f, corr.make_spec("center_scale"))
    _assert_points_here([w.filename for w in seen], 1)
    with pytest.warns(CellClipWarning) as seen:
        corr.fit(x, f, corr.make_spec("tvn"))
    _assert_points_here([w.filename for w in seen], 2)
    assert str(seen[1].message) == "TVN: no negative-control fields in the training data; whitening on all fields"


def _assert_points_here(filenames, n):
    assert len(filenames) == n
    assert filenames == [__file__] * n


# ---------------------------------------------------------------------- features vs table
def test_features_need_a_field_axis():
    with pytest.raises(CellClipError) as e:
        corr.apply(np.zeros(4, np.float32), pd.DataFrame({"Metadata_Plate": ["P"] * 4}),
                   corr.make_spec("center_scale"))
    assert str(e.value) == "features must be (N, ...) with N fields, got shape (4,)"


def test_features_and_table_of_different_lengths_say_which_rows_to_pass():
    f = pd.DataFrame({"Metadata_Plate": ["P"] * 4, "Metadata_control_type": ["negcon"] * 4})
    with pytest.raises(CellClipError) as e:
        corr.apply(np.zeros((5, 3), np.float32), f, corr.make_spec("center_scale"))
    assert str(e.value) == ("features have 5 rows but the fields table has 4; pass the table rows the "
                            "features were extracted from (FeatureResult.index)")


def test_integer_features_are_corrected_as_real_numbers():
    """Counts (integer features) must not be truncated back to integers after centring."""
    x = np.array([[0, 10], [1, 20], [2, 30], [3, 40], [7, 5]], dtype=np.int64)
    f = pd.DataFrame({"Metadata_Plate": ["P"] * 5, "Metadata_control_type": ["negcon"] * 4 + ["trt"]})
    std = np.sqrt(1.25)  # of 0, 1, 2, 3 (and 10 x that for 10..40)
    want = np.array([[-1.5, -1.5], [-0.5, -0.5], [0.5, 0.5], [1.5, 1.5], [5.5, -2.0]]) / std
    y = corr.center_scale(x, f)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-6)
    np.testing.assert_allclose(corr.apply(x, f, corr.make_spec("center_scale")), want, rtol=1e-6)


def test_tvn_on_features_of_another_layout_names_both_sizes():
    rng = np.random.default_rng(1)
    f = pd.DataFrame({"Metadata_Plate": ["P"] * 12, "Metadata_control_type": ["negcon"] * 8 + ["trt"] * 4})
    spec = corr.fit(rng.normal(size=(12, 2, 4)).astype(np.float32), f, corr.make_spec("tvn"))
    with pytest.raises(CheckpointError) as e:
        corr.apply(rng.normal(size=(12, 3, 4)).astype(np.float32), f, spec)
    assert str(e.value) == "TVN whitening was fitted on 4-dim features but got 12"


def test_tvn_without_its_matrices_says_so_in_words():
    x = _x(4)
    f = pd.DataFrame({"Metadata_Plate": ["P"] * 4, "Metadata_control_type": ["negcon"] * 4})
    with pytest.raises(CheckpointError) as e:
        corr.apply(x, f, {"method": "tvn"})
    assert str(e.value) == (
        "the TVN feature correction needs its whitening matrices; load them with "
        "napari_cellclip.correction.load_state(spec, checkpoint_dir) (file feature_correction.safetensors)")


# ---------------------------------------------------------------------- specs
@pytest.mark.parametrize("off", [None, "none", "None", "NONE", "off", "Off", "false", "False", ""])
def test_ways_of_saying_no_correction(off):
    assert corr.make_spec(off) is None


@pytest.mark.parametrize("name", ["center-scale", "Center_Scale", "CENTER-SCALE"])
def test_method_names_ignore_case_and_dashes(name):
    assert corr.make_spec(name) == {"method": "center_scale", "scale": True, "eps": 1e-6}


def test_unknown_method_and_options_are_named():
    with pytest.raises(CellClipError) as e:
        corr.make_spec("zca")
    assert str(e.value) == "unknown feature correction 'zca'; choose one of none, center_scale, tvn"
    with pytest.raises(CellClipError) as e:
        corr.make_spec("tvn", whiten=1, center=True, scale=False)
    assert str(e.value) == "unknown correction option(s): center, whiten"
