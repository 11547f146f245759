"""The store's tables and keys: constructor checks, subset, to_frame / export_parquet,
parquet_safe (mixed-type columns), cache_key (what a reusable plate embedding is keyed on),
l2_normalize, repr."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.store import EmbeddingStore, StoreError, cache_key, l2_normalize, parquet_safe


def _fields(n=4):
    return pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"A{i + 1:02d}" for i in range(n)],
                         "FileName_DNA": [f"{i}.tif" for i in range(n)]})


def _unit(n, dim=4, seed=0):
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, dim)))


# ------------------------------------------------------------------ constructor
def test_constructor_errors_say_what_is_wrong():
    f = _fields(4)
    with pytest.raises(StoreError, match=r"^embeddings must be a 2-D \(N, E\) array, got shape \(4,\)$"):
        EmbeddingStore(np.ones(4), f)
    with pytest.raises(StoreError, match="^fields must be a pandas DataFrame, got list$"):
        EmbeddingStore(np.ones((4, 2)), [1, 2, 3, 4])
    with pytest.raises(StoreError, match="^embeddings have 3 rows but the fields table has 4$"):
        EmbeddingStore(np.ones((3, 8)), f)
    with pytest.raises(StoreError, match=r"^level must be one of \('field', 'well'\), got 'plate'$"):
        EmbeddingStore(np.ones((4, 2)), f, level="plate")


def test_defaults_and_kept_rows():
    st = EmbeddingStore(_unit(4).astype(np.float64), _fields(4), normalize=False)
    assert st.model_id == "" and st.level == "field" and st.info == {}
    assert st.embeddings.dtype == np.float32  # stored as float32 even when not renormalised
    np.testing.assert_array_equal(st.embeddings, _unit(4))


def test_repr_shows_size_level_and_the_start_of_the_model_id():
    st = EmbeddingStore(_unit(4), _fields(4), "0123456789abcdef")
    assert repr(st) == "EmbeddingStore(n=4, dim=4, level='field', model_id='0123456789ab')"


# ------------------------------------------------------------------ subset
def test_subset_keeps_model_level_info_and_the_vectors_as_they_are():
    emb = _unit(4) * np.float32(1.0005)  # rows of another tool, within the unit tolerance
    st = EmbeddingStore(emb, _fields(4), "m", level="well", info={"encoder": "cnn"}, normalize=False)
    sub = st.subset([2, 0])
    assert sub.model_id == "m" and sub.level == "well" and sub.info == {"encoder": "cnn"}
    np.testing.assert_array_equal(sub.embeddings, emb[[2, 0]])  # not renormalised
    one = st.subset(3)  # a single position
    assert len(one) == 1 and one.fields["Metadata_Well"].tolist() == ["A04"]
    assert st.subset(np.array([[0, 1], [3, 2]])).fields["Metadata_Well"].tolist() == ["A01", "A02", "A04", "A03"]


def _values(col):
    """A column's values with every kind of missing value as None."""
    return [None if pd.isna(v) else v for v in col.tolist()]


# ------------------------------------------------------------------ export
def test_to_frame_and_export_hold_exactly_metadata_embeddings_and_coordinates(tmp_path):
    import pyarrow.parquet as pq

    st = EmbeddingStore(_unit(4, dim=3), _fields(4), "m")
    df = st.to_frame()
    assert list(df.columns) == ["Metadata_Plate", "Metadata_Well", "emb_0", "emb_1", "emb_2"]
    coords = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = st.export_parquet(tmp_path / "sub" / "map.parquet", coords, coord_names=("x", "y"))
    assert out == tmp_path / "sub" / "map.parquet"
    # other tools read the file: exactly these columns, no index column
    assert pq.read_schema(out).names == ["Metadata_Plate", "Metadata_Well", "emb_0", "emb_1", "emb_2", "x", "y"]
    back = pd.read_parquet(out)
    np.testing.assert_array_equal(back[["x", "y"]].to_numpy(), coords)
    np.testing.assert_array_equal(back[["emb_0", "emb_1", "emb_2"]].to_numpy(), st.embeddings)
    assert back["Metadata_Well"].tolist() == ["A01", "A02", "A03", "A04"]
    # default names; a mixed-type metadata column is written as text
    st.fields["Metadata_dose"] = [1, "2 uM", None, 3.5]
    back = pd.read_parquet(st.export_parquet(tmp_path / "m2.parquet", coords))
    assert back[["UMAP_1", "UMAP_2"]].shape == (4, 2)
    assert _values(back["Metadata_dose"]) == ["1", "2 uM", None, "3.5"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["map.parquet"]  # no temporary left


def test_export_without_coordinates(tmp_path):
    st = EmbeddingStore(_unit(4, dim=2), _fields(4), "m")
    back = pd.read_parquet(st.export_parquet(tmp_path / "e.parquet"))
    assert list(back.columns) == ["Metadata_Plate", "Metadata_Well", "emb_0", "emb_1"]


# ------------------------------------------------------------------ parquet_safe
def test_parquet_safe_turns_mixed_columns_into_text_and_keeps_missing_values(tmp_path):
    f = pd.DataFrame({
        "Metadata_dose": pd.Series([10, "1 uM", None, np.nan, 2.5], dtype=object),
        "Metadata_plate_id": pd.Series([1, "B2", 3, None, 5], dtype=object),  # numbers and text only
        "Metadata_is_control": pd.Series([True, False, None, True, False], dtype=object),
        "Metadata_count": pd.Series([1, 2, None, 4, 5], dtype=object),
        "Metadata_name": pd.Series(["a", None, "c", np.nan, "e"], dtype=object),
        "Metadata_folder": pd.Series([Path("/a"), Path("/b"), None, Path("/d"), Path("/e")], dtype=object),
        7: [1.0, 2.0, 3.0, 4.0, 5.0],
    })
    safe = parquet_safe(f)
    assert list(safe.columns) == ["Metadata_dose", "Metadata_plate_id", "Metadata_is_control", "Metadata_count",
                                  "Metadata_name", "Metadata_folder", "7"]
    assert f["Metadata_dose"].tolist()[0] == 10 and 7 in f.columns  # the input is left alone
    st = EmbeddingStore(_unit(5), safe, "m")
    back = EmbeddingStore.load(st.save(tmp_path / "s")).fields
    assert _values(back["Metadata_dose"]) == ["10", "1 uM", None, None, "2.5"]  # missing stays missing
    assert _values(back["Metadata_plate_id"]) == ["1", "B2", "3", None, "5"]
    # columns of one plain kind keep their values (booleans stay booleans, numbers numbers)
    assert _values(back["Metadata_is_control"]) == [True, False, None, True, False]
    assert _values(back["Metadata_count"]) == [1, 2, None, 4, 5]
    assert _values(back["Metadata_name"]) == ["a", None, "c", None, "e"]
    assert _values(back["Metadata_folder"]) == [str(Path("/a")), str(Path("/b")), None, str(Path("/d")),
                                                str(Path("/e"))]


# ------------------------------------------------------------------ cache_key
def _key_fields(tmp_path, **extra):
    f = pd.DataFrame({"Metadata_Plate": ["P", "P"], "Metadata_Well": ["A01", "A02"], "Metadata_dose": [1.5, 2.0],
                      "FileName_DNA": ["a.tif", "b.tif"], "PathName_DNA": [str(tmp_path)] * 2})
    for k, v in extra.items():
        f[k] = v
    return f


def test_cache_key_changes_with_any_value_that_identifies_the_data(tmp_path):
    base = _key_fields(tmp_path)
    k = cache_key(base, "m")
    assert cache_key(base.iloc[:, ::-1], "m") == k  # column order does not matter
    changed = [
        _key_fields(tmp_path).assign(Metadata_dose=[1.5, 3.0]),         # a float value
        _key_fields(tmp_path).assign(Metadata_Well=["A01", "A03"]),     # a text value
        _key_fields(tmp_path, Frame_DNA=[0, 1]),                        # a frame of a multi-frame file
        _key_fields(tmp_path, URL_DNA=["s3://a", "s3://b"]),            # a remote image
    ]
    keys = {cache_key(f, "m") for f in changed}
    assert k not in keys and len(keys) == len(changed)
    with_frames = _key_fields(tmp_path, Frame_DNA=[0, 1])
    assert cache_key(with_frames.assign(Frame_DNA=[0, 2]), "m") != cache_key(with_frames, "m")
    with_urls = _key_fields(tmp_path, URL_DNA=["s3://a", "s3://b"])
    assert cache_key(with_urls.assign(URL_DNA=["s3://a", "s3://c"]), "m") != cache_key(with_urls, "m")


def test_missing_values_key_alike_however_they_are_spelled(tmp_path):
    """None, NaN and pd.NA in a table (as read from CSV, parquet or built by hand) are one missing value."""
    keys = {cache_key(_key_fields(tmp_path, Metadata_moa=pd.Series(["x", v], dtype=object)), "m")
            for v in (None, np.nan, pd.NA, np.float32("nan"))}
    assert len(keys) == 1
    # ... and differ from a present value, including the text "<NA>"
    assert cache_key(_key_fields(tmp_path, Metadata_moa=["x", "<NA>"]), "m") not in keys


def test_numpy_scalars_key_like_python_values(tmp_path):
    plain = _key_fields(tmp_path, Metadata_Site=pd.Series([1, 2], dtype=object))
    numpy_ = _key_fields(tmp_path, Metadata_Site=pd.Series([np.int64(1), np.int64(2)], dtype=object))
    assert cache_key(plain, "m") == cache_key(numpy_, "m")


def test_images_named_relative_to_the_working_folder_are_stamped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.tif").write_bytes(b"1234")
    f = pd.DataFrame({"Metadata_Plate": ["P"], "Metadata_Well": ["A01"], "FileName_DNA": ["a.tif"]})  # no PathName_
    g = f.assign(PathName_DNA=pd.Series([None], dtype=object))  # a folder column left empty
    before = cache_key(f, "m"), cache_key(g, "m")
    (tmp_path / "a.tif").write_bytes(b"123456")  # rewritten
    after = cache_key(f, "m"), cache_key(g, "m")
    assert before[0] != after[0] and before[1] != after[1]


def test_cache_key_layout_is_stable(tmp_path):
    """The key of a plate does not change between releases of the same store format (stores
    embedded before are reused): blake2b-128 over the documented layout, written out here."""
    folder = tmp_path / "gone"  # images that cannot be stamped
    f = pd.DataFrame({"Metadata_Well": ["A01", "A02"], "Metadata_dose": [1.5, np.nan],
                      "FileName_DNA": ["a.tif", "b.tif"], "PathName_DNA": [str(folder)] * 2, "Other": [1, 2]})
    h = hashlib.blake2b(digest_size=16)
    h.update(b"napari-cellclip-embedding-store:1\0model-7\0")
    cols = ["FileName_DNA", "Metadata_Well", "Metadata_dose", "PathName_DNA"]
    h.update(("\x1f".join(cols) + "\0").encode())
    for name, well, dose in (("a.tif", "A01", "1.5"), ("b.tif", "A02", "<NA>")):
        h.update("\x1f".join([repr(name), repr(well), dose, repr(str(folder))]).encode())
        h.update(b"|missing")
        h.update(b"\0")
    assert cache_key(f, "model-7") == h.hexdigest()


# ------------------------------------------------------------------ l2_normalize
def test_l2_normalize_vectors_and_rows_as_float32():
    v = l2_normalize(np.array([3, 4]))
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, [0.6, 0.8], rtol=1e-6)
    rows = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]]))
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0], [0.0, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(l2_normalize(np.zeros(3)), np.zeros(3, np.float32))


def test_l2_normalize_stacks_along_the_last_axis():
    x = np.zeros((2, 3, 2))
    x[..., 0], x[..., 1] = 3.0, 4.0  # every vector along the last axis is (3, 4)
    np.testing.assert_allclose(l2_normalize(x), np.broadcast_to([0.6, 0.8], (2, 3, 2)), rtol=1e-6)
