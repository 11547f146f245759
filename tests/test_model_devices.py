"""Inputs of another type, dtype or device than the model's reach it as the model's own; the output
is on the model's device in its dtype (issue 16).

The meta device stands in for a GPU on a CPU-only machine: a module moved there computes shapes
only, and refuses tensors left on the CPU just as a CUDA module would.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _model_tiny import C, D, E, WordMeans, config, feats, model

from napari_cellclip.errors import CheckpointError
from napari_cellclip.model import CellCLIP, CrossChannelFormer, LayerNorm, MILPooling


# ------------------------------------------------------------------ features
@pytest.mark.parametrize("convert", [
    lambda x: x.numpy(),                       # numpy float32, as read from a feature table
    lambda x: x.double().numpy(),              # numpy float64
    lambda x: x.half(),                        # features stored in float16
    lambda x: x.double(),
], ids=["numpy32", "numpy64", "float16", "float64"])
def test_features_of_another_type_or_dtype_embed_like_float32_tensors(convert):
    m = model()
    x = feats(2, 3).half().float()  # exactly representable in float16
    with torch.no_grad():
        want = m.encode_image(x)
        got = m.encode_image(convert(x))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_pooled_features_of_another_dtype_embed_like_float32(dtype):
    m = model()
    pooled = feats(2, 1)[:, 0].half().float()
    with torch.no_grad():
        got = m.encode_pooled(pooled.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, m.encode_pooled(pooled))


def test_integer_features_are_cast_to_the_models_dtype():
    m = model()
    x = torch.randint(-3, 4, (2, 1, C, D))
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x), m.encode_image(x.float()))


def test_a_bag_given_as_one_field_per_sample_is_a_bag_of_one():
    m = model()
    x = feats(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x[:, 0]), m.encode_image(x))  # (B, C, D)
        torch.testing.assert_close(m.pool_instances(x[:, 0].numpy()), x[:, 0])


@pytest.mark.parametrize("shape", [(2, 1, C, D, 1), (C, D + 1), (2, C, D, 1), (2, 1, C + 1, D)])
def test_features_of_a_wrong_shape_say_which_shape_is_expected(shape):
    with pytest.raises(CheckpointError, match=rf"^the model expects features of shape \(B, M, {C}, {D}\) "
                                              rf"\({C} stains \['ch0', 'ch1', 'ch2'\] from image encoder None\), "
                                              + re.escape(f"got {shape}") + "$"):
        model().encode_image(torch.zeros(shape))


def test_features_on_the_cpu_reach_a_model_on_another_device():
    m = model().to("meta")
    out = m.encode_image(feats(2, 3))
    assert out.device.type == "meta" and out.shape == (2, E)
    out = m.encode_pooled(feats(2, 1)[:, 0])
    assert out.device.type == "meta" and out.shape == (2, E)
    with pytest.raises(RuntimeError):  # the stand-in GPU does refuse CPU tensors
        m.visual(feats(2, 1)[:, 0])


def test_token_ids_and_mask_on_the_cpu_reach_a_text_encoder_on_another_device():
    m = CellCLIP(config(text_pooling="mean"), text_model=WordMeans(), tokenizer=None).to("meta")
    ids = torch.tensor([[101, 4442, 102, 0], [101, 4442, 2007, 102]])
    mask = (ids != 0).long()
    for out in (m.encode_text(ids, mask), m.encode_text(ids)):
        assert out.device.type == "meta" and out.shape == (2, E)
    with pytest.raises(RuntimeError, match="on cpu, model on meta"):
        m.text(input_ids=ids, attention_mask=mask.to("meta"))


# ------------------------------------------------------------------ half precision activations
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_computes_in_float32_and_answers_in_the_inputs_dtype(dtype):
    torch.manual_seed(0)
    ln = LayerNorm(D)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = (torch.randn(4, D) * 30 + 100).to(dtype)
    y = ln(x)
    assert y.dtype == dtype
    want = F.layer_norm(x.float(), (D,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(y, want.to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x).dtype == dtype


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_a_bfloat16_pooling_answers_in_bfloat16(pooling):
    torch.manual_seed(0)
    pool = MILPooling(D, 32, pooling)
    x = torch.relu(feats(2, 4)).bfloat16()
    x[0, 2:] = 0  # padding
    want = pool(x.float())
    got = pool.to(torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_cast_to_another_dtype_embeds_images(dtype):
    """Defect: LayerNorm computed x.float() with the weights of the model's dtype, so on the CPU a
    bfloat16 / float64 model failed with 'mixed dtype'."""
    torch.manual_seed(0)
    m32 = model().eval()
    x = feats(2, 3)
    m = model().eval()
    m.load_state_dict(m32.state_dict())
    m = m.to(dtype)
    with torch.no_grad():
        out, want = m.encode_image(x), m32.encode_image(x)
    assert out.dtype == dtype
    tol = dict(atol=0.05, rtol=0.05) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), want, **tol)


def test_a_float64_layer_norm_keeps_float64_precision():
    ln = LayerNorm(D).double()
    x = torch.randn(4, D, dtype=torch.float64) * 1e-3 + 1e4  # float32 would lose these digits
    torch.testing.assert_close(ln(x), F.layer_norm(x, (D,), ln.weight, ln.bias, ln.eps), atol=1e-9, rtol=0)


def test_encode_pooled_takes_numpy_like_encode_image():
    torch.manual_seed(0)
    m = model().eval()
    x = feats(2, 1)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(m.encode_pooled(x.numpy()), m.encode_pooled(x))


@pytest.mark.parametrize("uses_proj", [True, False])
def test_under_bfloat16_autocast_the_visual_tower_keeps_bfloat16_features_in_bfloat16(uses_proj):
    """The residual stream stays in the features' dtype (half the memory autocast is for): the tower
    answers in it, with a projection (an autocast matmul) or without (the final LN's output)."""
    torch.manual_seed(0)
    f = CrossChannelFormer(D, 2, 2, E if uses_proj else D, C).eval()
    assert f.uses_proj == uses_proj
    x = feats(2, 1)[:, 0].bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(y.float(), f(x.float()), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float16, torch.float32])
def test_a_row_without_any_real_token_pools_to_zeros_not_nan(mask_dtype):
    """Mean pooling divides by the number of real tokens, at least a tiny epsilon: a row whose mask
    is all zeros (whatever the mask's dtype) embeds as the projection of a zero vector."""
    m = model(text_pooling="mean")
    ids = torch.tensor([[101, 4442, 2007, 102], [101, 4442, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    with torch.no_grad():
        out = m.encode_text(ids, mask.to(mask_dtype))
        want0 = m.encode_text(ids[:1], mask[:1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], m.text_proj.bias.detach())
    torch.testing.assert_close(out[0], want0[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_tower_without_transformer_layers_answers_in_its_inputs_dtype(dtype):
    """vision_layers=0 (CLS token + LNs + projection) works on features of any float dtype."""
    torch.manual_seed(0)
    f = CrossChannelFormer(D, 0, 2, E, C)
    x = feats(2, 1)[:, 0]
    with torch.no_grad():
        y = f(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), f(x), atol=0.1, rtol=0.05)
