"""EmbeddingStore: normalisation, save/load round trip, well means, export, cache keys."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.errors import MetadataError
from napari_cellclip.store import EmbeddingStore, StoreError, cache_key


def _fields(n_wells=3, sites=2, plate="P1"):
    rows = []
    for w in range(n_wells):
        for s in range(1, sites + 1):
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Well": f"A{w + 1:02d}",
                    "Metadata_Site": s,
                    "Metadata_pert_iname": "DMSO" if w == 0 else f"cpd{w}",
                    "Metadata_moa": "" if w == 0 else "kinase inhibitor",
                    "Metadata_dose": np.nan if w == 0 else 10.0,
                    "Metadata_is_control": w == 0,
                    "Metadata_prompt": f"prompt {w}",
                    "FileName_OrigDNA": f"w{w}s{s}.png",
                    "PathName_OrigDNA": "/nonexistent",
                }
            )
    return pd.DataFrame(rows)


def _store(seed=0, **kw):
    f = _fields(**kw)
    rng = np.random.default_rng(seed)
    return EmbeddingStore(rng.normal(size=(len(f), 8)), f, "model-abc")


def test_rows_are_unit_float32_and_index_reset():
    f = _fields()
    f.index = np.arange(100, 100 + len(f))
    st = EmbeddingStore(np.random.default_rng(0).normal(size=(len(f), 8)) * 5, f, "m")
    assert st.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(st.embeddings, axis=1), 1.0, rtol=1e-5)
    assert list(st.fields.index) == list(range(len(f)))
    assert len(st) == 6 and st.dim == 8


def test_shape_mismatch_and_nan_rejected():
    f = _fields()
    with pytest.raises(StoreError, match="rows"):
        EmbeddingStore(np.ones((len(f) + 1, 4)), f, "m")
    with pytest.raises(StoreError, match="NaN"):
        EmbeddingStore(np.full((len(f), 4), np.nan), f, "m")


def test_save_load_round_trip(tmp_path):
    st = _store()
    st.info["skipped"] = [[3, "bad.png: truncated"]]
    out = st.save(tmp_path / "store")
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "fields.parquet", "store.json"]
    meta = json.loads((out / "store.json").read_text())
    assert meta["model_id"] == "model-abc" and meta["n"] == 6 and meta["dim"] == 8
    back = EmbeddingStore.load(out)
    np.testing.assert_array_equal(back.embeddings, st.embeddings)
    assert back.model_id == "model-abc" and back.level == "field"
    assert back.info["skipped"] == [[3, "bad.png: truncated"]]
    pd.testing.assert_frame_equal(back.fields, st.fields, check_dtype=False)
    assert back.fields["Metadata_moa"].iloc[0] == ""  # empty strings survive parquet
    assert back.fields["Metadata_is_control"].dtype == bool
    # overwrite in place, no temporary folders left behind
    _store(seed=1).save(out)
    assert not np.array_equal(EmbeddingStore.load(out).embeddings, st.embeddings)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_load_rejects_incomplete(tmp_path):
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore.load(tmp_path / "missing")
    out = _store().save(tmp_path / "s")
    (out / "fields.parquet").unlink()
    assert not EmbeddingStore.exists(out)
    with pytest.raises(StoreError, match="fields.parquet missing"):
        EmbeddingStore.load(out)


def test_well_level_means_and_constant_metadata():
    st = _store()
    wl = st.well_level()
    assert wl.level == "well" and len(wl) == 3
    assert list(wl.fields["Metadata_Well"]) == ["A01", "A02", "A03"]
    assert list(wl.fields["Metadata_n_fields"]) == [2, 2, 2]
    assert "Metadata_Site" not in wl.fields.columns  # varies within the well
    assert "FileName_OrigDNA" not in wl.fields.columns
    for c in ("Metadata_pert_iname", "Metadata_moa", "Metadata_dose", "Metadata_prompt", "Metadata_is_control"):
        assert c in wl.fields.columns
    for i in range(3):
        m = st.embeddings[2 * i : 2 * i + 2].mean(axis=0)
        np.testing.assert_allclose(wl.embeddings[i], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
    assert wl.well_level() is wl and st.well_level() is wl  # cached
    assert wl.model_id == st.model_id


def test_well_level_keeps_plates_apart_and_needs_keys():
    f = pd.concat([_fields(plate="P1"), _fields(plate="P2")], ignore_index=True)
    st = EmbeddingStore(np.random.default_rng(1).normal(size=(len(f), 4)), f, "m")
    wl = st.well_level()
    assert len(wl) == 6
    assert list(zip(wl.fields.Metadata_Plate, wl.fields.Metadata_Well))[:2] == [("P1", "A01"), ("P1", "A02")]
    with pytest.raises(MetadataError, match="Metadata_Well"):
        EmbeddingStore(np.ones((2, 3)), pd.DataFrame({"Metadata_Plate": ["a", "b"]}), "m").well_level()


def test_to_frame_with_coords(tmp_path):
    st = _store()
    coords = np.arange(12, dtype=np.float32).reshape(6, 2)
    df = st.to_frame(coords)
    assert [c for c in df.columns if c.startswith("emb_")] == [f"emb_{i}" for i in range(8)]
    assert "FileName_OrigDNA" not in df.columns and "Metadata_Well" in df.columns
    np.testing.assert_array_equal(df[["UMAP_1", "UMAP_2"]].to_numpy(), coords)
    df.to_parquet(tmp_path / "x.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "x.parquet"), df, check_dtype=False)
    with pytest.raises(StoreError, match="coords"):
        st.to_frame(coords[:3])


def test_subset():
    st = _store()
    sub = st.subset([4, 1])
    assert list(sub.fields["Metadata_Well"]) == ["A03", "A01"]
    np.testing.assert_array_equal(sub.embeddings, st.embeddings[[4, 1]])
    assert len(st.subset(st.fields["Metadata_is_control"].to_numpy())) == 2


def test_cache_key(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"1234")
    f = pd.DataFrame({"Metadata_Plate": ["P"], "Metadata_Well": ["A01"], "Metadata_Site": [1],
                      "FileName_OrigDNA": ["a.png"], "PathName_OrigDNA": [str(tmp_path)]})
    k = cache_key(f, "m1")
    assert k == cache_key(f.copy(), "m1") == EmbeddingStore.cache_key(f, "m1") and len(k) == 32
    assert cache_key(f, "m2") != k
    g = f.copy()
    g["Metadata_is_control"] = [True]
    assert cache_key(g, "m1") != k  # annotations matter (correction, table)
    img.write_bytes(b"123456")  # rewritten image
    assert cache_key(f, "m1") != k
