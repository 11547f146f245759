"""Loss contracts the formula tests left open (found by mutation testing, issue 16): CWCL target
rows, the computation dtype, scalar logit scales, labels passed through compute_loss, and the
errors a caller gets for mismatched inputs."""

from __future__ import annotations

import math

import pytest
import torch

from napari_cellclip import losses
from napari_cellclip.losses import (
    channel_similarity_weights,
    clip_loss,
    cloob_loss,
    compute_loss,
    cwcl_loss,
    siglip_loss,
)

NAMES = ("cwcl", "clip", "siglip")


def _data(n=5, e=6, c=3, d=4, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, e, generator=g, dtype=dtype), torch.randn(n, e, generator=g, dtype=dtype),
            torch.randn(n, c, d, generator=g, dtype=dtype))


def _loss(name, img, txt, feats, scale, labels=None):
    return compute_loss(name, img, txt, scale, channel_features=feats, logit_bias=-2.0, labels=labels)


def test_cwcl_target_rows_are_distributions_with_the_documented_weights():
    _, _, feats = _data(n=4, c=2)
    w = channel_similarity_weights(feats)
    torch.testing.assert_close(w.sum(1), torch.ones(4, dtype=torch.float64))
    u = torch.nn.functional.normalize(feats, dim=-1)
    for i in range(4):
        raw = [(sum(float(u[i, c] @ u[j, c]) for c in range(2)) / 2) / 2 + 0.5 for j in range(4)]
        for j in range(4):
            assert w[i, j].item() == pytest.approx(raw[j] / sum(raw), rel=1e-12)
    lab = torch.tensor([0, 1, 0, 2])
    wl = channel_similarity_weights(feats, lab)
    torch.testing.assert_close(wl.sum(1), torch.ones(4, dtype=torch.float64))
    assert wl[0, 2].item() == pytest.approx(wl[0, 0].item()) and wl[0, 0] > wl[0, 1]
    assert channel_similarity_weights(feats[:1]).item() == 1.0  # a batch of one


def test_half_precision_inputs_are_computed_in_float32():
    img, txt, feats = _data()
    s = torch.tensor(1.7)
    for name in NAMES:
        for dt in (torch.bfloat16, torch.float16):
            lo = _loss(name, img.to(dt), txt.to(dt), feats.to(dt), s.to(dt))
            assert lo.dtype == torch.float32, (name, dt)
            ref = _loss(name, img.to(dt).float(), txt.to(dt).float(), feats.to(dt).float(), s.to(dt).float())
            assert lo.item() == pytest.approx(ref.item(), rel=1e-6), (name, dt)


def test_float64_inputs_stay_float64_with_a_float32_logit_scale():
    """A model's logit scale is a float32 parameter; float64 embeddings are computed in float64."""
    img, txt, feats = _data()
    s32 = torch.tensor(1.7, dtype=torch.float32)
    for name in NAMES:
        got = _loss(name, img, txt, feats, s32)
        ref = _loss(name, img, txt, feats, s32.double())
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(ref.item(), rel=1e-13), name


def test_a_plain_number_logit_scale_equals_a_tensor():
    img, txt, feats = _data()
    for name in NAMES:
        assert _loss(name, img, txt, feats, 1.25).item() == pytest.approx(
            _loss(name, img, txt, feats, torch.tensor(1.25, dtype=torch.float64)).item(), rel=1e-13)


def test_compute_loss_passes_the_labels_on():
    img, txt, feats = _data()
    s = torch.tensor(1.5, dtype=torch.float64)
    lab = torch.tensor([0, 1, 0, 2, 1])
    direct = {"cwcl": cwcl_loss(img, txt, feats, s, labels=lab), "clip": clip_loss(img, txt, s, labels=lab),
              "siglip": siglip_loss(img, txt, s, -2.0, labels=lab), "cloob": cloob_loss(img, txt, s, labels=lab)}
    for name in losses.LOSSES:
        got = _loss(name, img, txt, feats, s, labels=lab)
        assert torch.equal(got, direct[name]), name
        assert not torch.allclose(got, _loss(name, img, txt, feats, s)), name


def test_mismatched_inputs_are_clear_errors():
    img, txt, feats = _data(n=4)
    s = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must both be \(B, E\), got \(4, 6\) and \(4, 5\)"):
        clip_loss(img, txt[:, :5], s)
    with pytest.raises(ValueError, match="must both be"):
        clip_loss(img[None], txt[None], s)  # same shapes, but 3-D
    with pytest.raises(ValueError, match="labels has 3 entries for a batch of 4"):
        clip_loss(img, txt, s, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels has 3 entries for a batch of 4"):
        losses.target_matrix(torch.tensor([0, 1, 2]), 4)
    with pytest.raises(ValueError, match=r"channel_features must be \(B, C, D\) with B=4, got \(3, 3, 4\)"):
        cwcl_loss(img, txt, feats[:3], s)
    with pytest.raises(ValueError, match="channel_features must be"):
        cwcl_loss(img, txt, feats[..., 0], s)
    with pytest.raises(ValueError, match=r"^cwcl loss needs channel_features \(B, C, D\)$"):
        compute_loss("cwcl", img, txt, s)
    with pytest.raises(ValueError, match="^siglip loss needs logit_bias$"):
        compute_loss("siglip", img, txt, s)
    with pytest.raises(ValueError, match=r"unknown loss 'infonce' \(cwcl \| clip \| siglip \| cloob\)"):
        compute_loss("infonce", img, txt, s)


def test_logit_scale_is_clamped_at_ln100():
    assert losses.LOGIT_SCALE_MAX == pytest.approx(math.log(100.0))


def test_a_single_unbatched_embedding_is_a_clear_error():
    """(E,) vectors instead of (B, E) batches: the shape message, not an IndexError from inside."""
    img, txt, feats = _data()
    for name in losses.LOSSES:
        with pytest.raises(ValueError, match=r"must both be \(B, E\), got \(6,\) and \(6,\)"):
            _loss(name, img[0], txt[0], feats[0], 1.0)


def test_target_matrix_rows_are_uniform_over_equal_labels():
    eye = losses.target_matrix(None, 3)
    assert eye.dtype == torch.float32 and torch.equal(eye, torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1]]))
    assert losses.target_matrix(None, 2, dtype=torch.float64).dtype == torch.float64
    lab = [4, 1, 4, 2, 4, 1]
    got = losses.target_matrix(torch.tensor(lab), 6, dtype=torch.float64)
    assert got.dtype == torch.float64
    for i in range(6):
        same = [j for j in range(6) if lab[j] == lab[i]]
        for j in range(6):
            assert got[i, j].item() == (1 / len(same) if j in same else 0.0), (i, j)
    # on the requested device, whatever device the labels are on
    assert losses.target_matrix(None, 3, device="meta").device.type == "meta"
    assert losses.target_matrix(torch.tensor(lab), 6, device="meta").device.type == "meta"


def test_channel_similarity_weights_dtype():
    """float32 (or float64 when given float64), whatever the features' precision."""
    _, _, feats = _data()
    for dt, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                     (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        assert channel_similarity_weights(feats.to(dt)).dtype == want, dt


def test_a_channel_without_signal_counts_as_cosine_zero():
    """Pooled features of norm < 1e-8 (a blank channel) carry no direction: their cosine is 0 (weight
    1/2), not the cosine of their rounding noise."""
    _, _, feats = _data(n=4, c=2)
    feats = feats.clone()
    feats[:, 1] *= 1e-13  # channel 1: noise far below any real feature (norm < 1e-12)
    w = channel_similarity_weights(feats)
    u = torch.nn.functional.normalize(feats[:, 0], dim=-1)
    raw = (u @ u.t() + 0.0) / 2 / 2 + 0.5  # mean over 2 channels of cos/2 + 1/2, channel 1's cos = 0
    torch.testing.assert_close(w, raw / raw.sum(1, keepdim=True), rtol=0, atol=1e-8)


def test_mixed_precision_channel_features():
    """Frozen-encoder features in another precision than the embeddings (float64 features with float32
    embeddings, half features with float64 embeddings) give the loss of matching precisions."""
    img, txt, feats = _data()
    s = torch.tensor(1.5)
    ref32 = cwcl_loss(img.float(), txt.float(), feats.float(), s)
    got32 = cwcl_loss(img.float(), txt.float(), feats, s)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(ref32.item(), rel=1e-6)
    half = feats.half()
    ref64 = cwcl_loss(img, txt, half.double(), s)
    got64 = cwcl_loss(img, txt, half, s)
    assert got64.dtype == torch.float64 and got64.item() == pytest.approx(ref64.item(), rel=1e-6)


class _Elsewhere(torch.Tensor):
    """A CPU tensor that reports another device (what compute_loss reads to pick the autocast to switch off)."""
    where = "cuda"

    @property
    def device(self):
        return torch.device(self.where)


def _on(kind):
    t = torch.Tensor._make_subclass(_Elsewhere, torch.zeros(2, 3))
    t.where = kind
    return t


def test_autocast_is_switched_off_on_the_embeddings_device(monkeypatch):
    """A trainer under CUDA (or MPS/XPU) autocast gets an fp32 loss: compute_loss disables autocast for
    the device the embeddings live on; devices autocast does not know fall back to the CPU."""
    seen = []

    class Stop(Exception):
        pass

    def fake_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        seen.append((device_type, enabled))
        raise Stop

    monkeypatch.setattr(torch, "autocast", fake_autocast)
    cases = [("cuda", "cuda"), ("mps", "mps"), ("xpu", "xpu"), ("cpu", "cpu"), ("meta", "cpu"), ("hpu", "cpu")]
    for kind, want in cases:
        seen.clear()
        with pytest.raises(Stop):
            compute_loss("clip", _on(kind), _on(kind), 1.0)
        assert seen == [(want, False)], kind


def test_losses_stay_on_the_embeddings_device_with_cpu_labels(monkeypatch):
    """Every tensor a loss builds lives on the embeddings' device; labels may stay on the CPU.  The meta
    device stands in for a GPU: a tensor made on the default (CPU) device meets a meta tensor and
    raises, and nothing may read a value back (no host sync)."""
    img, txt, feats = (t.float().to("meta") for t in _data())
    lab = torch.tensor([0, 1, 0, 2, 1])
    s = torch.tensor(1.5, device="meta")
    for labels in (None, lab):
        for name in ("cwcl", "clip", "siglip"):
            got = compute_loss(name, img, txt, s, channel_features=feats, logit_bias=-2.0, labels=labels)
            assert got.device.type == "meta" and got.shape == (), (name, labels)
        assert channel_similarity_weights(feats, labels).device.type == "meta"
        # frozen channel features cached on the CPU, towers on the device: the targets follow the logits
        got = cwcl_loss(img, txt, torch.zeros(5, 3, 4), s, labels=labels)
        assert got.device.type == "meta", labels

    # CLOOB's InfoLOOB step reads values (rows without a negative); a device-checking stand-in
    # replaces it so the Hopfield retrievals and the positives are checked on the meta device
    def loob(k, positive):
        assert k.device.type == "meta" and positive.device.type == "meta"
        return (k * positive).sum()

    monkeypatch.setattr(losses, "_info_loob", loob)
    for labels in (None, lab):
        assert cloob_loss(img, txt, s, labels=labels).device.type == "meta"
