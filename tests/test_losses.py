"""Losses against direct float64 formulas written with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from napari_cellclip import losses
from napari_cellclip.losses import (HOPFIELD_SCALE, clip_loss, cloob_loss, compute_loss, cwcl_loss,
                                   gather_features, siglip_loss)

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


def _groups(labels, n):
    """Distinct labels (sorted) and, per distinct label, the batch positions holding it."""
    labels = list(range(n)) if labels is None else list(labels)
    uniq = sorted(set(labels))
    return labels, uniq, [[i for i in range(n) if labels[i] == u] for u in uniq]


def _texts(txt, groups):
    """One unit text per distinct label: the normalised mean of its samples' unit texts."""
    out = []
    for g in groups:
        v = sum(txt[j] / math.sqrt(float(txt[j] @ txt[j])) for j in g)
        out.append(v)
    return out


def _logits(img, txt, log_scale, labels=None):
    """[image i][distinct prompt u] = s cos(image_i, text_u)."""
    s = math.exp(min(log_scale, LN100))
    n = img.shape[0]
    labels, uniq, groups = _groups(labels, n)
    t = _texts(txt, groups)
    return [[s * _cos(img[i], t[u]) for u in range(len(uniq))] for i in range(n)]


def _i2t_targets(labels, n):
    labels, uniq, _ = _groups(labels, n)
    return [[1.0 if labels[i] == u else 0.0 for u in uniq] for i in range(n)]


def _t2i_targets(labels, n):
    """[prompt u][image j]: uniform over the images with label u."""
    _, uniq, groups = _groups(labels, n)
    return [[1.0 / len(groups[k]) if j in groups[k] else 0.0 for j in range(n)] for k in range(len(uniq))]


def _with_counts(lg, labels):
    """Image->text logits plus log(n_u): prompt u repeated n_u times in the batch."""
    _, _, groups = _groups(labels, len(lg))
    return [[v + math.log(len(groups[u])) for u, v in enumerate(row)] for row in lg]


def _soft_ce_rows(rows, targets):
    n = len(rows)
    total = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(v) for v in rows[i]))
        for j in range(len(rows[i])):
            total -= targets[i][j] * (rows[i][j] - lse)
    return total / n


def _transpose(m):
    return [list(r) for r in zip(*m)]


def ref_clip(img, txt, log_scale, labels=None):
    n = img.shape[0]
    lg = _logits(img, txt, log_scale, labels)
    i2t = _soft_ce_rows(_with_counts(lg, labels), _i2t_targets(labels, n))
    return (i2t + _soft_ce_rows(_transpose(lg), _t2i_targets(labels, n))) / 2


def ref_cwcl(img, txt, feats, log_scale, labels=None):
    n, C = feats.shape[0], feats.shape[1]
    lg = _logits(img, txt, log_scale, labels)
    loss_cl = _soft_ce_rows(_transpose(lg), _t2i_targets(labels, n))  # text -> image
    lab, uniq, groups = _groups(labels, n)
    w = []
    for i in range(n):
        # pairwise weights, the maximum (1) for samples sharing i's label
        pair = [1.0 if lab[i] == lab[j] else sum(_cos(feats[i, c], feats[j, c]) / 2 + 0.5 for c in range(C)) / C
                for j in range(n)]
        pair = [p / sum(pair) for p in pair]
        row = [sum(pair[j] for j in g) for g in groups]  # summed per distinct prompt
        tot = sum(row)
        w.append([r / tot for r in row])
    loss_cwcl = _soft_ce_rows(_with_counts(lg, labels), w)  # image -> distinct prompts, continuous weights
    return loss_cl + loss_cwcl


def ref_siglip(img, txt, log_scale, bias, labels=None):
    n = img.shape[0]
    lg = _logits(img, txt, log_scale, labels)
    pos = _i2t_targets(labels, n)
    total = 0.0
    for i in range(n):
        for u in range(len(lg[i])):
            z = 1.0 if pos[i][u] else -1.0
            total -= math.log(1.0 / (1.0 + math.exp(-z * (lg[i][u] + bias))))
    return total / n


def _unit(v):
    n = math.sqrt(sum(float(a) * float(a) for a in v))
    return [float(a) / n for a in v]


def _retrieve(state, stored, beta):
    """Modern Hopfield retrieval, one state at a time: normalise(sum_j softmax_j(beta <s, x_j>) x_j)."""
    out = []
    for s in state:
        logits = [beta * sum(a * b for a, b in zip(s, x)) for x in stored]
        m = max(logits)
        w = [math.exp(v - m) for v in logits]
        z = sum(w)
        out.append(_unit([sum(w[j] / z * stored[j][d] for j in range(len(stored))) for d in range(len(s))]))
    return out


def _loob_rows(q, c, positive, inv_tau):
    """mean over rows with a negative of [-mean_pos k + log sum_neg exp k], k = inv_tau <q_r, c_j>."""
    rows = []
    for r in range(len(q)):
        k = [inv_tau * sum(a * b for a, b in zip(q[r], c[j])) for j in range(len(c))]
        pos = [k[j] for j in range(len(c)) if positive[r][j]]
        neg = [k[j] for j in range(len(c)) if not positive[r][j]]
        if neg:
            rows.append(-sum(pos) / len(pos) + math.log(sum(math.exp(v) for v in neg)))
    return sum(rows) / len(rows) if rows else 0.0


def ref_cloob(img, txt, log_scale, labels=None, beta=HOPFIELD_SCALE):
    n = img.shape[0]
    inv_tau = math.exp(min(log_scale, LN100))
    lab, uniq, groups = _groups(labels, n)
    x = [_unit(img[i].tolist()) for i in range(n)]
    y = [_unit([float(v) for v in t]) for t in _texts(txt, groups)]  # distinct prompts
    u_x, u_y = _retrieve(x, x, beta), _retrieve(y, x, beta)
    v_x, v_y = _retrieve(x, y, beta), _retrieve(y, y, beta)
    own = _i2t_targets(labels, n)  # [image][prompt] 1 for the image's own prompt
    loss_img = _loob_rows(u_x, u_y, own, inv_tau)
    loss_txt = _loob_rows(v_y, v_x, _transpose(own), inv_tau)
    return (loss_img + loss_txt) / inv_tau


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


@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2, 1, 0]])
@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), 0.4])
@pytest.mark.parametrize("beta", [HOPFIELD_SCALE, 1.5])
def test_cloob_matches_loops(labels, log_scale, beta):
    img, txt, _ = _data()
    lab = None if labels is None else torch.tensor(labels)
    got = cloob_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64), labels=lab, hopfield_scale=beta)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_cloob(img, txt, log_scale, labels, beta), rel=1e-10)


def _published_cloob(img, txt, inv_tau, beta):
    """CellCLIP's ``cloob`` (src/clip/methods.py), transcribed with hflayers' Hopfield layer
    reduced to what its settings leave (no projections, scaling beta): one prompt per image."""
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)

    def hopfield(state, stored):
        r = torch.softmax(beta * state @ stored.t(), dim=-1) @ stored
        return r / r.norm(dim=1, keepdim=True)

    def info_loob(x, y, i):
        tau = 1 / inv_tau
        k = x @ y.T / tau
        positives = -torch.mean(torch.sum(k * i, dim=1))
        arg_lse = k * torch.logical_not(i) + i * -1000.0
        return tau * (positives + torch.mean(torch.logsumexp(arg_lse, dim=1)))

    p_xx, p_yy = hopfield(img, img), hopfield(txt, txt)
    p_xy, p_yx = hopfield(txt, img), hopfield(img, txt)
    i = torch.eye(p_xx.shape[0]) > 0.5
    return info_loob(p_xx, p_xy, i) + info_loob(p_yy, p_yx, i)


def test_cloob_equals_the_published_formula_without_labels():
    img, txt, _ = _data(n=7)
    for log_scale in (math.log(1 / 0.07), 1.0):
        s = torch.tensor(log_scale, dtype=torch.float64)
        ref = _published_cloob(img, txt, math.exp(log_scale), HOPFIELD_SCALE)
        assert cloob_loss(img, txt, s).item() == pytest.approx(ref.item(), rel=1e-10)


def test_cloob_single_prompt_batch_has_nothing_to_contrast():
    img, txt, _ = _data(n=4)
    img.requires_grad_(True)
    loss = cloob_loss(img, txt, torch.tensor(2.0, dtype=torch.float64), labels=torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(img.grad).all()


def test_distinct_labels_equal_no_labels():
    img, txt, feats = _data()
    lab = torch.arange(6)
    s = torch.tensor(2.0, dtype=torch.float64)
    assert torch.allclose(clip_loss(img, txt, s), clip_loss(img, txt, s, labels=lab))
    assert torch.allclose(cwcl_loss(img, txt, feats, s), cwcl_loss(img, txt, feats, s, labels=lab))
    assert torch.allclose(siglip_loss(img, txt, s, -1.0), siglip_loss(img, txt, s, -1.0, labels=lab))
    assert torch.allclose(cloob_loss(img, txt, s), cloob_loss(img, txt, s, labels=lab))


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
    assert torch.allclose(cloob_loss(img, txt, big), cloob_loss(img, txt, ln100))
    assert clip_loss(img, txt, big).item() == pytest.approx(ref_clip(img, txt, 10.0), rel=1e-10)


def test_gradients_and_detached_cwcl_targets():
    img, txt, feats = _data()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    feats.requires_grad_(True)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = cwcl_loss(img, txt, feats, scale) + siglip_loss(img, txt, scale, bias) + cloob_loss(img, txt, scale)
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
    assert torch.equal(compute_loss("cloob", img, txt, s), cloob_loss(img, txt, s))
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
        for name in losses.LOSSES:
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
        # without gather=True a loss sees this process's shard only (the loop formulas on the shard)
        shard_lab = None if rank == 0 else labels[lo:hi].tolist()
        shard = (img[lo:hi], txt[lo:hi])
        assert clip_loss(*shard, s).item() == pytest.approx(ref_clip(*shard, 1.2), rel=1e-10)
        assert cwcl_loss(*shard, feats[lo:hi], s, labels=labels[lo:hi] if shard_lab else None).item() == \
            pytest.approx(ref_cwcl(*shard, feats[lo:hi], 1.2, shard_lab), rel=1e-10)
        assert siglip_loss(*shard, s, -1.0).item() == pytest.approx(ref_siglip(*shard, 1.2, -1.0), rel=1e-10)
        assert cloob_loss(*shard, s).item() == pytest.approx(ref_cloob(*shard, 1.2), rel=1e-10)
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
    # outside a process group the gathering losses are the plain ones (this also ties the test to
    # them in-process, so mutation testing runs it for mutants of the gathering code)
    img, txt, feats = _data(n=5)
    s = torch.tensor(1.0, dtype=torch.float64)
    for name in losses.LOSSES:
        assert torch.equal(compute_loss(name, img, txt, s, channel_features=feats, logit_bias=-1.0, gather=True),
                           compute_loss(name, img, txt, s, channel_features=feats, logit_bias=-1.0))
    x = torch.ones(2, 3)
    assert gather_features(x) is x
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), (3, 2)), nprocs=2, join=True)


def test_module_exports():
    for name in ("clip_loss", "cwcl_loss", "siglip_loss", "cloob_loss", "gather_features"):
        assert hasattr(losses, name)


def test_repeated_prompts_are_positives_both_directions():
    """Same-label samples: one text candidate, positives of each other (multi-positive batching)."""
    img, txt, feats = _data(n=6)
    lab = torch.tensor([0, 1, 0, 2, 1, 0])
    s = torch.tensor(2.0, dtype=torch.float64)
    b = torch.tensor(-1.0, dtype=torch.float64)
    same_txt = txt.clone()
    same_txt[2] = same_txt[0]
    same_txt[5] = same_txt[0]
    same_txt[4] = same_txt[1]
    fns = [lambda t, f=feats: cwcl_loss(img, t, f, s, labels=lab),
           lambda t: clip_loss(img, t, s, labels=lab),
           lambda t: siglip_loss(img, t, s, b, labels=lab),
           lambda t: cloob_loss(img, t, s, labels=lab)]
    for fn in fns:
        ref = fn(same_txt)
        swapped = same_txt[[2, 1, 0, 3, 4, 5]]  # swap two same-label texts
        assert fn(swapped).item() == pytest.approx(ref.item(), rel=1e-12)
        assert torch.isfinite(ref)
    # the same-label image is a positive, not a negative: labels [0, 1, 0, ...] ≠ treating
    # sample 2 as its own prompt
    assert clip_loss(img, same_txt, s, labels=lab).item() != pytest.approx(
        clip_loss(img, same_txt, s, labels=torch.arange(6)).item())
    # CWCL targets: same-label pairs get the maximum weight
    w = losses.channel_similarity_weights(feats, lab)
    assert torch.allclose(w[0, 2], w[0, 0]) and torch.allclose(w[0, 5], w[0, 0])


def _repeated_texts(n=5):
    img, txt, feats = _data(n=n, c=3)
    lab = torch.tensor([0, 1, 0, 2, 0])
    t = txt.clone()
    t[2] = t[0]
    t[4] = t[0]
    return img, t, feats, lab


def _dedup_t2i(img, t, s, lab):
    """text->image over the 3 distinct prompts (rows 0, 1, 3 of t), by hand."""
    imgn = torch.nn.functional.normalize(img, dim=-1)
    lg = s.exp() * imgn @ torch.nn.functional.normalize(t[[0, 1, 3]], dim=-1).t()
    lt = torch.log_softmax(lg.t(), 1)
    return -(lt[0, [0, 2, 4]].mean() + lt[1, 1] + lt[2, 3]) / 3


def _papers_i2t(img, t, s, targets):
    """image->text as the paper writes it: a softmax over all B texts, a repeated prompt n times."""
    lg = s.exp() * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).t()
    return -(targets * torch.log_softmax(lg, 1)).sum() / lg.shape[0]


@pytest.mark.parametrize("name", ["clip", "cwcl"])
def test_repeated_prompts_are_the_papers_repeated_candidates(name):
    """A prompt three times in a batch of five: the loss over the 3 distinct prompts is the paper's loss over the
    5 texts (each copy a candidate) less a constant, log(count) of each target's prompt: same value, same gradient."""
    img, t, feats, lab = _repeated_texts()
    s = torch.tensor(1.2, dtype=torch.float64)
    counts = torch.tensor([3.0, 1.0, 3.0, 1.0, 3.0], dtype=torch.float64)  # of each sample's prompt
    if name == "clip":
        targets = losses.target_matrix(lab, 5, dtype=torch.float64)

        def ours(x):
            return clip_loss(x, t, s, labels=lab)

        def paper(x):
            return (_papers_i2t(x, t, s, targets) + _dedup_t2i(x, t, s, lab)) / 2
        constant = counts.log().mean() / 2
    else:
        targets = losses.channel_similarity_weights(feats, lab)  # (5, 5): the paper's w, same-label pairs 1

        def ours(x):
            return cwcl_loss(x, t, feats, s, labels=lab)

        def paper(x):
            return _papers_i2t(x, t, s, targets) + _dedup_t2i(x, t, s, lab)
        constant = (targets * counts[None, :].log()).sum() / 5
    x1 = img.clone().requires_grad_(True)
    x2 = img.clone().requires_grad_(True)
    got, ref = ours(x1), paper(x2)
    assert got.item() == pytest.approx((ref - constant).item(), rel=1e-12)
    got.backward()
    ref.backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["clip", "cwcl"])
@pytest.mark.parametrize("controls", [2, 16])
def test_a_prompt_on_more_wells_is_not_learned_as_a_prior(name, controls):
    """``controls`` control samples and one treated share one image (16: a JUMP plate's share of DMSO
    wells): at the loss's optimum the image is as close to either prompt (with no count term it ends
    log(controls) / s closer to the control prompt)."""
    n = controls + 1
    img = torch.tensor([[1.0, 0.0, 0.0]] * n, dtype=torch.float64)
    feats = torch.ones(n, 2, 4, dtype=torch.float64)
    lab = torch.tensor([0] * controls + [1])
    s = torch.tensor(math.log(10.0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.LBFGS([prompts], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = compute_loss(name, img, prompts[lab], s, channel_features=feats, labels=lab)
        loss.backward()
        return loss

    opt.step(closure)
    cos = torch.nn.functional.cosine_similarity(img[:1], prompts.detach(), dim=-1)
    assert cos[0].item() == pytest.approx(cos[1].item(), abs=1e-6)


def test_gather_is_a_noop_in_a_single_process_group(tmp_path):
    """torch.distributed initialised with one process (a one-GPU torchrun): nothing to gather, the
    embeddings come back as they are (no collective, same tensor, same graph)."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, 4, requires_grad=True)
        assert gather_features(x) is x
    finally:
        dist.destroy_process_group()


def test_losses_under_autocast_are_float32_formulas():
    """A trainer's bf16 autocast region does not reach the loss: float32 embeddings give the float32
    loss of the loop formulas, not one from bf16 matmuls (~1e-2 off)."""
    img, txt, feats = _data()
    lab = [0, 1, 0, 2, 1, 3]
    s = torch.tensor(1.0)
    refs = {"clip": ref_clip(img, txt, 1.0, lab), "cwcl": ref_cwcl(img, txt, feats, 1.0, lab),
            "siglip": ref_siglip(img, txt, 1.0, -1.0, lab), "cloob": ref_cloob(img, txt, 1.0, lab)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in losses.LOSSES:
            got = compute_loss(name, img.float(), txt.float(), s, channel_features=feats.float(), logit_bias=-1.0,
                               labels=torch.tensor(lab))
            assert got.dtype == torch.float32, name
            assert got.item() == pytest.approx(refs[name], rel=1e-5), name


def test_siglip_float_bias_at_the_embeddings_precision():
    """A Python-number bias is used at float64 for float64 embeddings (not rounded to float32 first)."""
    img, txt, _ = _data()
    got = siglip_loss(img, txt, math.log(10.0), -1.1)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_siglip(img, txt, math.log(10.0), -1.1), rel=1e-12)
