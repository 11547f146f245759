"""Frozen per-channel encoders: hf (tiny random DINOv2 saved to disk) and morphology."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_cellclip.encoders import get_encoder, resolve_device
from napari_cellclip.errors import CellClipError, CellClipWarning

MEAN = [0.40, 0.50, 0.60]
STD = [0.20, 0.25, 0.30]
SIZE = 56


def _save_tiny_dinov2(folder, seed=0, mean=MEAN, std=STD, preprocessor=True):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=SIZE)
    model = Dinov2Model(cfg)
    with torch.no_grad():  # make the patch embedding bias non-trivial for the fold test
        model.embeddings.patch_embeddings.projection.bias.normal_()
    model.save_pretrained(folder)
    if preprocessor:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "BitImageProcessor",
            "crop_size": {"height": SIZE, "width": SIZE}, "size": {"shortest_edge": SIZE},
            "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std), "resample": 3,
        }))
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="module")
def tiny_enc(tiny_dir):
    return get_encoder(f"hf:{tiny_dir}", device="cpu")


# -- device ------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(CellClipError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CellClipError, match="CUDA is not available"):
            resolve_device("cuda")


# -- hf ----------------------------------------------------------------------
def test_hf_shape_and_attributes(tiny_enc, tiny_dir):
    assert tiny_enc.dim == 32 and tiny_enc.input_size == SIZE and tiny_enc.n_crops == 4
    assert tiny_enc.folded
    assert tiny_enc.spec == f"hf:{tiny_dir}"
    assert tiny_enc.image_mean == tuple(MEAN) and tiny_enc.image_std == tuple(STD)
    assert tiny_enc.model.config._attn_implementation == "sdpa"
    x = torch.rand(2, 3, 70, 80)
    out = tiny_enc.encode(x)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    # channels are encoded independently: one channel alone == inside the stack
    alone = tiny_enc.encode(x[:, 1:2])
    torch.testing.assert_close(alone[:, 0], out[:, 1], atol=1e-5, rtol=1e-4)


def test_hf_fold_equals_rgb_processor_path(tiny_enc, tiny_dir):
    """1-channel folded conv == grey replicated to RGB + the HF image processor's normalisation."""
    from transformers import BitImageProcessor, Dinov2Model

    enc1 = get_encoder(f"hf:{tiny_dir}", device="cpu", n_crops=1)
    assert enc1.folded
    rng = np.random.default_rng(0)
    grey = rng.random((3, SIZE, SIZE), dtype=np.float32)
    proc = BitImageProcessor.from_pretrained(tiny_dir)
    rgb = [np.repeat(g[:, :, None], 3, axis=2) for g in grey]
    pixel = proc(images=rgb, do_resize=False, do_center_crop=False, do_rescale=False,
                 return_tensors="pt")["pixel_values"]
    assert pixel.shape == (3, 3, SIZE, SIZE)
    ref_model = Dinov2Model.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        ref = ref_model(pixel_values=pixel).pooler_output
    ours = enc1.encode(torch.from_numpy(grey)[None])[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # and the unfolded (explicit replicate + normalise) path agrees too
    enc_nofold = get_encoder(f"hf:{tiny_dir}", device="cpu", n_crops=1, fold=False)
    assert not enc_nofold.folded
    torch.testing.assert_close(enc_nofold.encode(torch.from_numpy(grey)[None])[0], ref, atol=1e-4, rtol=1e-4)


def test_hf_crops_are_averaged(tiny_enc, tiny_dir):
    enc1 = get_encoder(f"hf:{tiny_dir}", device="cpu", n_crops=1)
    x = torch.rand(1, 2, 2 * SIZE, 2 * SIZE)
    quads = [x[..., i * SIZE:(i + 1) * SIZE, j * SIZE:(j + 1) * SIZE] for i in range(2) for j in range(2)]
    expected = torch.stack([enc1.encode(q) for q in quads]).mean(0)
    torch.testing.assert_close(tiny_enc.encode(x), expected, atol=1e-5, rtol=1e-4)


def test_crop_grid_positions():
    from napari_cellclip.encoders.hf import crop_grid

    x = torch.arange(540 * 540, dtype=torch.float32).view(1, 1, 540, 540)
    c4 = crop_grid(x, 224, 4)  # adjacent centred tiles: offset (540 - 448) // 2 = 46
    assert c4.shape == (1, 4, 1, 224, 224)
    assert c4[0, 0, 0, 0, 0] == x[0, 0, 46, 46] and c4[0, 3, 0, 0, 0] == x[0, 0, 270, 270]
    c9 = crop_grid(x, 224, 9)  # overlapping, edge to edge
    assert c9[0, 0, 0, 0, 0] == x[0, 0, 0, 0] and c9[0, 8, 0, -1, -1] == x[0, 0, 539, 539]
    small = crop_grid(torch.rand(2, 1, 30, 40), 56, 1)  # upsampled to the input size
    assert small.shape == (2, 1, 1, 56, 56)


def test_hf_identity(tiny_enc, tiny_dir, tmp_path):
    again = get_encoder(f"hf:{tiny_dir}", device="cpu")
    assert again.identity == tiny_enc.identity
    other = get_encoder(f"hf:{_save_tiny_dinov2(tmp_path / 'other', seed=1)}", device="cpu")
    assert other.identity != tiny_enc.identity  # different weights
    assert get_encoder(f"hf:{tiny_dir}", device="cpu", n_crops=9).identity != tiny_enc.identity
    renorm = get_encoder(f"hf:{_save_tiny_dinov2(tmp_path / 'renorm', mean=[0.5] * 3)}", device="cpu")
    assert renorm.identity != tiny_enc.identity  # same weights, other normalisation


def test_hf_missing_preprocessor_falls_back_to_imagenet(tmp_path):
    folder = _save_tiny_dinov2(tmp_path / "nopre", preprocessor=False)
    with pytest.warns(CellClipWarning, match="ImageNet"):
        enc = get_encoder(f"hf:{folder}", device="cpu")
    assert enc.image_mean == (0.485, 0.456, 0.406)
    assert enc.input_size == SIZE  # from config.image_size
    assert enc.encode(torch.rand(1, 1, SIZE, SIZE)).shape == (1, 1, 32)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("hf:/no/such/folder/dinov2", "does not exist"),
        ("hf:", "names no model"),
        ("resnet", "unknown image encoder"),
        ("", "must be"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(CellClipError, match=match):
        get_encoder(spec, device="cpu")


def test_bad_folder_and_options(tmp_path, tiny_dir):
    with pytest.raises(CellClipError, match="no config.json"):
        get_encoder(f"hf:{tmp_path}", device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CellClipError, match="could not load image encoder"):
        get_encoder(f"hf:{broken}", device="cpu")
    with pytest.raises(CellClipError, match="square number"):
        get_encoder(f"hf:{tiny_dir}", device="cpu", n_crops=3)


# -- morphology --------------------------------------------------------------
@pytest.fixture(scope="module")
def morph():
    return get_encoder("morphology", device="cpu")


def _texture(kind, seed, size=200):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if kind == "noise":
        img = rng.random((size, size))
    elif kind == "blobs":
        img = np.zeros((size, size), np.float32)
        for cy, cx in rng.uniform(10, size - 10, (25, 2)):
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
    elif kind == "stripes":
        phase = rng.uniform(0, 2 * np.pi)
        img = 0.5 + 0.5 * np.sin(xx * 2 * np.pi / 12 + 0.3 * yy * 2 * np.pi / 12 + phase)
        img = img + 0.05 * rng.random((size, size))
    img = np.asarray(img, np.float32)
    return (img - img.min()) / (img.max() - img.min())


def test_morphology_shape_and_names(morph):
    from napari_cellclip.encoders.morphology import FEATURE_NAMES

    assert morph.dim == len(FEATURE_NAMES) == 128 and len(set(FEATURE_NAMES)) == 128
    out = morph.encode(torch.rand(2, 5, 120, 150))
    assert out.shape == (2, 5, 128) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert morph.encode(torch.zeros(1, 1, 64, 64)).isfinite().all()  # a blank plane is fine


def test_morphology_deterministic_and_batch_invariant(morph):
    x = torch.rand(3, 2, 180, 180)
    a = morph.encode(x)
    torch.testing.assert_close(morph.encode(x), a, atol=0, rtol=0)
    torch.testing.assert_close(morph.encode(x[1:2]), a[1:2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(morph.encode(x[:, 1:]), a[:, 1:], atol=1e-6, rtol=1e-5)


def test_morphology_distinguishes_textures(morph):
    kinds = ["noise", "blobs", "stripes"]
    feats = {k: morph.encode(torch.from_numpy(np.stack([_texture(k, s) for s in (0, 1)]))[:, None])[:, 0]
             for k in kinds}
    allf = torch.cat(list(feats.values()))
    scale = allf.std(0) + 1e-3
    z = {k: v / scale for k, v in feats.items()}
    within = max((z[k][0] - z[k][1]).norm() for k in kinds)
    between = min((z[a].mean(0) - z[b].mean(0)).norm() for a in kinds for b in kinds if a != b)
    assert between > 3 * within


def test_morphology_on_real_field(morph):
    from napari_cellclip.images import load_field_normalized
    from napari_cellclip.plates import read_plate, stains
    from napari_cellclip.sample import sample_plate_dir

    fields = read_plate(sample_plate_dir())
    x = torch.from_numpy(load_field_normalized(fields.iloc[0], stains(fields)))[None]
    out = morph.encode(x)
    assert out.shape == (1, 5, 128) and torch.isfinite(out).all()
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-3  # DNA and ER planes describe differently


def test_morphology_identity():
    a = get_encoder("morphology", device="cpu")
    assert a.identity == get_encoder("morphology", device="cpu").identity
    assert a.identity != get_encoder("morphology", device="cpu", size=128).identity


# ------------------------------------------------------------------ field preparation (DataLoader workers)
def test_field_prep_percentiles_bit_identical_to_normalize():
    from napari_cellclip.encoders.base import FieldPrep
    from napari_cellclip.images import fast_percentiles, normalize

    rng = np.random.default_rng(3)
    for dt in (np.uint8, np.uint16):
        for _ in range(20):
            a = rng.gamma(rng.uniform(0.3, 3), rng.uniform(1, 3000), (3, 57, 41)).clip(0, np.iinfo(dt).max)
            a = a.astype(dt)
            np.testing.assert_array_equal(FieldPrep()(a), normalize(a))
            for plane in a:  # the histogram percentiles are np.percentile's, bit for bit
                want = np.percentile(plane.astype(np.float32), [1, 99.9]).astype(np.float32)
                assert np.array_equal(np.array(fast_percentiles(plane, 1, 99.9)), want)
    flat = np.full((2, 10, 10), 7, np.uint16)
    np.testing.assert_array_equal(FieldPrep()(flat), normalize(flat))


def test_crop_prep_keeps_exactly_the_crops_the_encoder_cuts():
    from napari_cellclip.encoders.base import FieldPrep
    from napari_cellclip.encoders.hf import CropPrep, crop_grid

    rng = np.random.default_rng(0)
    for (h, w), k, size in [((200, 230), 2, 64), ((100, 100), 3, 40), ((70, 300), 2, 64), ((50, 50), 1, 64)]:
        raw = rng.integers(0, 4000, (2, h, w)).astype(np.uint16)
        full = torch.from_numpy(FieldPrep()(raw))[:, None]
        part = torch.from_numpy(CropPrep(size=size, grid=k)(raw))[:, None]
        torch.testing.assert_close(crop_grid(part, size, k * k), crop_grid(full, size, k * k), rtol=0, atol=0)


def test_encoders_own_their_preparation(tiny_enc, morph):
    """encode(prep(raw)) == encode(normalize(raw)): the prep only moves work into the workers."""
    import pickle

    from napari_cellclip.encoders.hf import CropPrep
    from napari_cellclip.encoders.morphology import ResizePrep
    from napari_cellclip.images import normalize, normalize_range

    rng = np.random.default_rng(1)
    raw = rng.gamma(2.0, 300, (5, 300, 260)).clip(0, 65535).astype(np.uint16)
    for enc, kind in ((tiny_enc, CropPrep), (morph, ResizePrep)):
        prep = pickle.loads(pickle.dumps(enc.field_prep(["DNA", "ER", "RNA", "AGP", "Mito"])))
        assert isinstance(prep, kind)
        got = enc.encode(torch.from_numpy(prep(raw))[None])
        want = enc.encode(torch.from_numpy(normalize(raw))[None])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ranges = np.array([[100.0, 900.0]] * 5, np.float32)  # plate normalisation: fixed ranges
        torch.testing.assert_close(enc.encode(torch.from_numpy(prep(raw, ranges))[None]),
                                   enc.encode(torch.from_numpy(normalize_range(raw, ranges))[None]),
                                   rtol=1e-5, atol=1e-5)
