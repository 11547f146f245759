"""Wells: well_groups (the one definition of a well, its table and the bags for the model's
pooling), the mean fallback of EmbeddingStore.well_level, and model-pooled wells= stores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.store import EmbeddingStore, StoreError, l2_normalize, well_groups


def _unit(n, dim=4, seed=0):
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, dim)))


def test_well_table_layout_counts_and_bags():
    # wells of 1, 3 and 2 fields, rows interleaved; the first well (by plate, well) has one field
    f = pd.DataFrame({
        "Metadata_Plate": ["P1", "P1", "P1", "P0", "P1", "P1"],
        "Metadata_Well": ["B02", "A01", "B02", "Z09", "A01", "B02"],
        "Metadata_Site": [1, 1, 2, 1, 2, 3],
        "Metadata_pert": ["x", "dmso", "x", "y", "dmso", "x"],
        "Metadata_dose": [1.0, np.nan, np.nan, 2.0, np.nan, 1.0],  # missing in some of B02's fields only
        "FileName_DNA": list("abcdef"),
    }, index=[50, 51, 52, 53, 54, 55])
    codes, table, bags = well_groups(f)
    assert list(table.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_pert", "Metadata_n_fields"]
    assert list(zip(table.Metadata_Plate, table.Metadata_Well, table.Metadata_pert)) == [
        ("P0", "Z09", "y"), ("P1", "A01", "dmso"), ("P1", "B02", "x")]
    assert list(table.index) == [0, 1, 2]
    assert table["Metadata_n_fields"].tolist() == [1, 2, 3] and table["Metadata_n_fields"].dtype == np.int64
    assert codes.tolist() == [2, 1, 2, 0, 1, 2]
    # each well's rows (positions in the fields table) in table order, padded with -1
    assert bags.dtype == np.int64
    assert bags.tolist() == [[3, -1, -1], [1, 4, -1], [0, 2, 5]]


def test_bags_keep_table_order_in_large_wells():
    wells = np.repeat(np.arange(5), 40)
    np.random.default_rng(0).shuffle(wells)
    f = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"W{w}" for w in wells]})
    _, table, bags = well_groups(f)
    assert table["Metadata_n_fields"].tolist() == [40] * 5
    for w in range(5):
        assert bags[w].tolist() == np.flatnonzero(wells == w).tolist()


def test_fields_without_a_well_name_form_their_own_well():
    f = pd.DataFrame({"Metadata_Plate": ["P", "P", "P"], "Metadata_Well": ["A01", None, None]})
    codes, table, bags = well_groups(f)
    assert len(table) == 2 and table["Metadata_n_fields"].tolist() == [1, 2]
    assert table["Metadata_Well"].isna().tolist() == [False, True]
    assert bags.tolist() == [[0, -1], [1, 2]]


def test_an_empty_fields_table_has_no_wells():
    f = pd.DataFrame({"Metadata_Plate": pd.Series([], dtype=object), "Metadata_Well": pd.Series([], dtype=object),
                      "Metadata_pert": pd.Series([], dtype=object)})
    codes, table, bags = well_groups(f)
    assert len(codes) == 0 and len(table) == 0 and bags.shape == (0, 0)
    assert "Metadata_n_fields" in table.columns


def test_a_stale_well_count_in_the_fields_is_recounted_and_kept_last():
    f = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A01", "B01"],
                      "Metadata_n_fields": [7, 7, 7], "Metadata_pert": ["a", "a", "b"]})
    _, table, _ = well_groups(f)
    assert list(table.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_pert", "Metadata_n_fields"]
    assert table["Metadata_n_fields"].tolist() == [2, 1]


def test_mean_wells_keep_the_parent_info_and_say_how_they_were_pooled():
    f = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A01", "B01"]})
    st = EmbeddingStore(_unit(3), f, "m", info={"encoder": "cnn"})
    wl = st.well_level()
    assert wl.info == {"encoder": "cnn", "aggregated_from": "field", "well_pooling": "mean"}
    assert wl.level == "well" and wl.model_id == "m" and not st.has_model_wells
    m = st.embeddings[:2].mean(axis=0)
    np.testing.assert_allclose(wl.embeddings[0], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(wl.embeddings[1], st.embeddings[2])


def _model_wells(f, level="well", pooling="model"):
    _, table, _ = well_groups(f)
    return EmbeddingStore(_unit(len(table), seed=9), table, "m", level=level, info={"well_pooling": pooling})


def test_model_pooled_wells_are_used_instead_of_means():
    f = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A01", "B01"]})
    wells = _model_wells(f)
    st = EmbeddingStore(_unit(3), f, "m", wells=wells)
    assert st.has_model_wells and st.well_level() is wells
    # wells pooled some other way are used but not called model-pooled
    other = EmbeddingStore(_unit(3), f, "m", wells=_model_wells(f, pooling="mean"))
    assert not other.has_model_wells


@pytest.mark.parametrize("wells_level, level", [("field", "field"), ("well", "well")])
def test_wells_must_be_a_well_store_of_a_field_store(wells_level, level):
    f = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A01", "B01"]})
    wells = _model_wells(f, level=wells_level)
    with pytest.raises(StoreError, match="^wells= must be a well-level store of a field-level one$"):
        EmbeddingStore(_unit(3), f, "m", level=level, wells=wells)
