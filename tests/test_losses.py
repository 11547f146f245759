"""Losses against direct float64 formulas written with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from napari_cellclip import losses
from napari_cellclip.losses import clip_loss, compute_loss, cwcl_loss, gather_features, siglip_loss

LN100 = math.log(100.0)


def _data(n=6, e=8, c=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, e, generator=g, dtype=torch.float64)
    txt = torch.randn(n, e, generator=g, dtype=torch.float64)
    feats = torch.randn(n, c, d, generator=g, dtype=torch.float64)
    return img, txt, feats


# --------------------------------------------------------------------- loop references
def _cos(a, b):
    return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))


def _logits(img, txt, log_scale):
    s = math.exp(min(log_scale, LN100))
    n = img.shape[0]
    return [[s * _cos(img[i], txt[j]) for j in range(n)] for i in range(n)]  # [image i][text j]


def _targets(labels, n):
    if labels is None:
        return [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    t = []
    for i in range(n):
        row = [1.0 if labels[i] == labels[j] else 0.0 for j in range(n)]
        tot = sum(row)
        t.append([r / tot for r in row])
    return t


def _soft_ce_rows(rows, targets):
    n = len(rows)
    total = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(v) for v in rows[i]))
        for j in range(n):
            total -= targets[i][j] * (rows[i][j] - lse)
    return total / n


def _transpose(m):
    return [list(r) for r in zip(*m)]


def ref_clip(img, txt, log_scale, labels=None):
    lg = _logits(img, txt, log_scale)
    t = _targets(labels, len(lg))
    return (_soft_ce_rows(lg, t) + _soft_ce_rows(_transpose(lg), t)) / 2


def ref_cwcl(img, txt, feats, log_scale, labels=None):
    lg = _logits(img, txt, log_scale)
    n, C = feats.shape[0], feats.shape[1]
    t = _targets(labels, n)
    loss_cl = _soft_ce_rows(_transpose(lg), t)  # text -> image
    w = []
    for i in range(n):
        row = []
        for j in range(n):
            row.append(sum(_cos(feats[i, c], feats[j, c]) / 2 + 0.5 for c in range(C)) / C)
        tot = sum(row)
        w.append([r / tot for r in row])
    loss_cwcl = _soft_ce_rows(lg, w)  # image -> text, continuous weights
    return loss_cl + loss_cwcl


def ref_siglip(img, txt, log_scale, bias, labels=None):
    lg = _logits(img, txt, log_scale)
    n = len(lg)
    total = 0.0
    for i in range(n):
        for j in range(n):
            pos = (i == j) if labels is None else (labels[i] == labels[j])
            z = 1.0 if pos else -1.0
            total -= math.log(1.0 / (1.0 + math.exp(-z * (lg[i][j] + bias))))
    return total / n


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2, 1, 3]])
@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), 0.3])
def test_clip_matches_loops(labels, log_scale):
    img, txt, _ = _data()
    lab = None if labels is None else torch.tensor(labels)
    got = clip_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64), labels=lab)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_clip(img, txt, log_scale, labels), rel=1e-10)


@pytest.mark.parametrize("labels", [None, [5, 5, 1, 2, 1, 7]])
@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), -0.2])
def test_cwcl_matches_loops(labels, log_scale):
    img, txt, feats = _data(c=4)
    lab = None if labels is None else torch.tensor(labels)
    got = cwcl_loss(img, txt, feats, torch.tensor(log_scale, dtype=torch.float64), labels=lab)
    assert got.item() == pytest.approx(ref_cwcl(img, txt, feats, log_scale, labels), rel=1e-10)


@pytest.mark.parametrize("labels", [None, [0, 0, 1, 1, 2, 3]])
@pytest.mark.parametrize("bias", [-10.0, 0.5])
def test_siglip_matches_loops(labels, bias):
    img, txt, _ = _data()
    lab = None if labels is None else torch.tensor(labels)
    log_scale = math.log(10.0)
    got = siglip_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64),
                      torch.tensor(bias, dtype=torch.float64), labels=lab)
    assert got.item() == pytest.approx(ref_siglip(img, txt, log_scale, bias, labels), rel=1e-10)


def test_distinct_labels_equal_no_labels():
    img, txt, feats = _data()
    lab = torch.arange(6)
    s = torch.tensor(2.0, dtype=torch.float64)
    assert torch.allclose(clip_loss(img, txt, s), clip_loss(img, txt, s, labels=lab))
    assert torch.allclose(cwcl_loss(img, txt, feats, s), cwcl_loss(img, txt, feats, s, labels=lab))
    assert torch.allclose(siglip_loss(img, txt, s, -1.0), siglip_loss(img, txt, s, -1.0, labels=lab))


def test_losses_normalise_inside_and_float32():
    img, txt, feats = _data()
    s = torch.tensor(2.0)
    a = cwcl_loss(img.float(), txt.float(), feats.float(), s)
    b = cwcl_loss(3 * img.float(), 0.5 * txt.float(), 7 * feats.float(), s)
    assert a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5)


def test_logit_scale_clamped_at_use():
    img, txt, feats = _data()
    big = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    ln100 = torch.tensor(LN100, dtype=torch.float64)
    assert torch.allclose(clip_loss(img, txt, big), clip_loss(img, txt, ln100))
    assert torch.allclose(cwcl_loss(img, txt, feats, big), cwcl_loss(img, txt, feats, ln100))
    assert torch.allclose(siglip_loss(img, txt, big, -3.0), siglip_loss(img, txt, ln100, -3.0))
    assert clip_loss(img, txt, big).item() == pytest.approx(ref_clip(img, txt, 10.0), rel=1e-10)


def test_gradients_and_detached_cwcl_targets():
    img, txt, feats = _data()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    feats.requires_grad_(True)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = cwcl_loss(img, txt, feats, scale) + siglip_loss(img, txt, scale, bias)
    loss.backward()
    assert feats.grad is None  # the CWCL targets carry no gradient
    for t in (img, txt, scale, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_compute_loss_dispatch():
    img, txt, feats = _data()
    s = torch.tensor(1.5, dtype=torch.float64)
    assert torch.equal(compute_loss("clip", img, txt, s), clip_loss(img, txt, s))
    assert torch.equal(compute_loss("cwcl", img, txt, s, channel_features=feats), cwcl_loss(img, txt, feats, s))
    assert torch.equal(compute_loss("siglip", img, txt, s, logit_bias=-1.0), siglip_loss(img, txt, s, -1.0))
    with pytest.raises(ValueError):
        compute_loss("nope", img, txt, s)
    with pytest.raises(ValueError):
        compute_loss("cwcl", img, txt, s)


def test_gather_is_noop_without_dist():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_features(x) is x
    img, txt, feats = _data()
    s = torch.tensor(1.0, dtype=torch.float64)
    assert torch.equal(cwcl_loss(img, txt, feats, s, gather=True), cwcl_loss(img, txt, feats, s))


# --------------------------------------------------------------------- DDP (2 gloo processes)
def _ddp_worker(rank, world, init_file, split):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt, feats = _data(n=sum(split), c=3)
        labels = torch.tensor([0, 1, 2, 0, 3][: sum(split)])
        s = torch.tensor(1.2, dtype=torch.float64)
        lo, hi = sum(split[:rank]), sum(split[: rank + 1])
        for name in ("clip", "cwcl", "siglip"):
            for lab in (None, labels):
                # global reference: full batch in one process
                gi, gt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
                ref = compute_loss(name, gi, gt, s, channel_features=feats, logit_bias=-1.0, labels=lab)
                ref.backward()
                # local shard, gathered
                li = img[lo:hi].clone().requires_grad_(True)
                lt = txt[lo:hi].clone().requires_grad_(True)
                got = compute_loss(name, li, lt, s, channel_features=feats[lo:hi], logit_bias=-1.0,
                                   labels=None if lab is None else lab[lo:hi], gather=True)
                got.backward()
                assert torch.allclose(got, ref), (name, rank)
                assert torch.allclose(li.grad, gi.grad[lo:hi]), (name, rank)
                assert torch.allclose(lt.grad, gt.grad[lo:hi]), (name, rank)
        x = torch.full((split[rank], 2), float(rank))
        g = gather_features(x)
        assert g.shape == (sum(split), 2)
        assert torch.equal(g[: split[0]], torch.zeros(split[0], 2))
    finally:
        dist.destroy_process_group()


def test_gather_ddp_uneven(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), (3, 2)), nprocs=2, join=True)


def test_module_exports():
    for name in ("clip_loss", "cwcl_loss", "siglip_loss", "gather_features"):
        assert hasattr(losses, name)
