"""The model's LayerNorm: computed in at least float32 (half-precision inputs are normalised in
float32 and rounded once), with the layer's own eps, with or without affine weights and bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_cellclip.model import LayerNorm

D = 64


def _randomised(ln):
    with torch.no_grad():
        for p in ln.parameters():
            p.normal_()
    return ln


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [torch.float32, "same"])
def test_half_inputs_are_normalised_in_float32_and_rounded_once(dtype, weights):
    """Bit for bit what a float32 LayerNorm of the upcast input gives, rounded to the input's dtype
    (half-precision kernels fed directly round differently: up to 1 ulp off)."""
    torch.manual_seed(0)
    ln = _randomised(LayerNorm(D))
    if weights == "same":
        ln = ln.to(dtype)  # a model cast to bfloat16 / float16
    x = (torch.randn(32, D) * 30 + 100).to(dtype)
    want = F.layer_norm(x.float(), (D,), ln.weight.float(), ln.bias.float(), ln.eps).to(dtype)
    got = ln(x)
    assert got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs", [dict(elementwise_affine=False), dict(bias=False)])
def test_without_weights_or_bias(kwargs):
    torch.manual_seed(0)
    ln = _randomised(LayerNorm(D, **kwargs))
    x = torch.randn(4, D).bfloat16()
    b = None if ln.bias is None else ln.bias.float()
    w = None if ln.weight is None else ln.weight.float()
    assert torch.equal(ln(x), F.layer_norm(x.float(), (D,), w, b, ln.eps).bfloat16())


def test_the_layers_eps_is_used():
    ln = LayerNorm(D, eps=0.5)
    x = torch.randn(4, D) * 0.1  # variance ~0.01: eps 0.5 dominates, the default 1e-5 would not
    torch.testing.assert_close(ln(x), F.layer_norm(x, (D,), ln.weight, ln.bias, 0.5))
    assert not torch.allclose(ln(x), F.layer_norm(x, (D,), ln.weight, ln.bias, 1e-5), atol=0.1)
