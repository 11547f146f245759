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
              "siglip": siglip_loss(img, txt, s, -2.0, labels=lab)}
    for name in NAMES:
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
    with pytest.raises(ValueError, match=r"cwcl loss needs channel_features \(B, C, D\)"):
        compute_loss("cwcl", img, txt, s)
    with pytest.raises(ValueError, match="siglip loss needs logit_bias"):
        compute_loss("siglip", img, txt, s)
    with pytest.raises(ValueError, match=r"unknown loss 'infonce' \(cwcl \| clip \| siglip \| cloob\)"):
        compute_loss("infonce", img, txt, s)


def test_logit_scale_is_clamped_at_ln100():
    assert losses.LOGIT_SCALE_MAX == pytest.approx(math.log(100.0))
