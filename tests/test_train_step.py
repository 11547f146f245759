"""training/train.py, one optimiser step: the loss it optimises, clipping, the schedule, precision,
the text tower, bag augmentation (tiny synthetic data, a tiny text tower; no images)."""

from __future__ import annotations

import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
import transformers.models.bert.modeling_bert  # noqa: F401  (imported at collection, not per test)

import training.train as tt
from _train_data import cfg, make_data, run_of, step_lines
from _train_data import fit as run_fit
from napari_cellclip.losses import compute_loss
from training.checkpoints import load_training_state
from training.scheduler import warmup_cosine

# transformers' own progress bars off while these tests load the tiny text tower (as quiet fits do)
pytestmark = pytest.mark.usefixtures("hf_bars_off")


@pytest.fixture(scope="module")
def data():
    return make_data()


def _rows(run):
    run.sampler.set_epoch(0)
    return next(iter(run.sampler))


def _expected_loss_and_grads(run, rows):
    """The batch's loss and gradients computed by hand on a copy of the model as it is now."""
    model = copy.deepcopy(run.model)
    wb = run.data.train
    x = torch.from_numpy(wb.gather(rows))
    pids = np.asarray(wb.prompt_ids[rows])
    ids, attn = run.tokens
    img, txt, pooled = model(x, ids[pids], attn[pids])  # every well's own prompt, encoded per well
    loss = compute_loss(model.config.loss, img, txt, model.logit_scale, channel_features=pooled,
                        logit_bias=model.logit_bias, labels=torch.from_numpy(pids))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("loss", ["cwcl", "siglip", "clip"])
def test_a_step_optimises_the_configured_loss_of_the_batch(tmp_path, tiny_bert_dir, data, loss):
    """The returned loss is the batch's contrastive loss (labels, channel features, the SigLIP bias),
    and the gradients are its gradients, for every trainable parameter."""
    run = run_of(cfg(tmp_path, tiny_bert_dir, loss=loss, grad_clip=0, batch_size=6), data)
    rows = _rows(run)  # all 6 wells: each prompt twice (the labels make them positives)
    assert len(rows) == 6
    want, grads = _expected_loss_and_grads(run, rows)
    got, gnorm = tt.train_step(run, rows)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(gnorm) == 0.0  # no clipping asked: no norm computed
    have = {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
    assert have.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(have[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_grad_clip_bounds_the_gradient_and_reports_the_norm_before(tmp_path, tiny_bert_dir, data):
    run = run_of(cfg(tmp_path, tiny_bert_dir, grad_clip=1e-3, text_tuning="last:1"), data)
    rows = _rows(run)
    _, grads = _expected_loss_and_grads(run, rows)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    _, gnorm = tt.train_step(run, rows)
    full = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert float(gnorm) == pytest.approx(full, rel=1e-4) and full > 1e-2
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in trainable))
    assert after == pytest.approx(1e-3, rel=1e-3)  # the gradient the optimiser used was clipped
    # the frozen text layers neither moved nor joined the norm
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in run.model.named_parameters() if n in frozen)


def test_steps_do_not_accumulate_gradients(tmp_path, tiny_bert_dir, data):
    run = run_of(cfg(tmp_path, tiny_bert_dir, grad_clip=0), data)
    run.sampler.set_epoch(0)
    first, second = list(run.sampler)[:2]
    tt.train_step(run, first)
    _, grads = _expected_loss_and_grads(run, second)
    tt.train_step(run, second)
    for n, p in run.model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_logit_scale_is_clamped_after_the_step(tmp_path, tiny_bert_dir, data):
    run = run_of(cfg(tmp_path, tiny_bert_dir, lr=1e-6), data)
    with torch.no_grad():
        run.model.logit_scale.fill_(9.0)  # exp(9) > 100
    tt.train_step(run, _rows(run))
    assert float(run.model.logit_scale.detach()) == pytest.approx(math.log(100), abs=1e-6)


def test_the_text_tower_encodes_each_distinct_prompt_of_the_batch_once(tmp_path, tiny_bert_dir, data):
    run = run_of(cfg(tmp_path, tiny_bert_dir, batch_size=6), data)  # all 6 wells, 3 prompts twice
    seen = []
    run.model.text.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("input_ids", args[0] if args
                                                                                   else None)), with_kwargs=True)
    rows = _rows(run)
    assert len(rows) == 6
    tt.train_step(run, rows)
    ids, _ = run.tokens
    assert len(seen) == 1 and torch.equal(seen[0], ids[np.unique(run.data.train.prompt_ids[rows])])


def _inputs(run, steps):
    """The bags the model got at steps 0 .. steps-1, each on every well (as (rows, bag) pairs)."""
    got = []
    h = run.model.register_forward_pre_hook(lambda m, args: got.append(args[0].clone()))
    rows = np.arange(len(run.data.train))
    out = []
    for s in range(steps):
        run.step = s
        tt.train_step(run, rows)
        out.append((rows, got[-1]))
    h.remove()
    return out


def test_bag_augmentation_draws_field_subsets_by_seed_and_step(tmp_path, tiny_bert_dir, data):
    wb = data.train
    # no augmentation: each well's whole bag
    run = run_of(cfg(tmp_path / "a", tiny_bert_dir, bag_min_fields=0, batch_size=6), data)
    (rows, x), = _inputs(run, 1)
    assert torch.equal(x, torch.from_numpy(wb.gather(rows)))
    # at most one field a well, drawn again at every step
    run = run_of(cfg(tmp_path / "b", tiny_bert_dir, bag_min_fields=0, bag_max_fields=1, batch_size=6), data)
    got = _inputs(run, 3)
    for rows, x in got:
        assert (x.reshape(len(rows), x.shape[1], -1).abs().sum(-1) > 0).sum(1).tolist() == [1] * len(rows)
    picks = [x.sum(1) for _, x in got]
    assert not all(torch.equal(picks[0], p) for p in picks[1:])
    # a second run with the same seed draws the same subsets (a resumed run relies on it)
    again = _inputs(run_of(cfg(tmp_path / "c", tiny_bert_dir, bag_min_fields=0, bag_max_fields=1,
                               batch_size=6), data), 3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(got, again))
    # --bag-min-fields 0 with a maximum: subsets of 1 .. max fields (at least one field)
    run = run_of(cfg(tmp_path / "d", tiny_bert_dir, bag_min_fields=0, bag_max_fields=3, batch_size=6), data)
    sizes = set()
    for rows, x in _inputs(run, 6):
        sizes |= set((x.reshape(len(rows), x.shape[1], -1).abs().sum(-1) > 0).sum(1).tolist())
    assert 1 in sizes and sizes <= {1, 2, 3}
    # the subsets of step s are those of the seed's stream for (seed, s, rank): a seed gives the same
    # run in every version
    for s, (rows, x) in enumerate(_inputs(run_of(cfg(tmp_path / "e", tiny_bert_dir, bag_min_fields=2,
                                                     bag_max_fields=3, seed=7), data), 2)):
        want = wb.gather_subsets(rows, np.random.default_rng([7, s, 0, 0xA06]), 2, 3)
        assert torch.equal(x, torch.from_numpy(want))


def test_bf16_precision_runs_the_towers_under_autocast(tmp_path, tiny_bert_dir, data):
    dtypes = []
    run = run_of(cfg(tmp_path, tiny_bert_dir, precision="bf16"), data)
    run.model.visual.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    loss, _ = tt.train_step(run, _rows(run))
    assert dtypes == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_fp16_scales_the_loss_and_unscales_before_clipping(tmp_path, tiny_bert_dir, data):
    run = run_of(cfg(tmp_path, tiny_bert_dir, precision="fp16", grad_clip=1e9), data)
    assert run.scaler.is_enabled()
    # a scale of 4 (the default 65536 overflows this tiny model's fp16 backward: that step would be skipped)
    run.scaler.load_state_dict({**run.scaler.state_dict(), "scale": 4.0})
    rows = _rows(run)
    _, grads = _expected_loss_and_grads(run, rows)
    before = run.model.visual.proj.detach().clone()
    _, gnorm = tt.train_step(run, rows)
    full = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert float(gnorm) == pytest.approx(full, rel=0.05)  # the true norm, not the scaled one
    assert run.scaler.get_scale() == 4.0  # no inf/NaN: the scale stays
    assert not torch.equal(run.model.visual.proj, before)  # and the step was taken
    run.step = 1
    tt.checkpoint(run)  # the scaler's state is saved (a resumed run goes on with its scale)
    assert load_training_state(tmp_path / "checkpoints" / "checkpoint-0000001")["scaler"]["scale"] == 4.0


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(tmp_path, tiny_bert_dir, data):
    run = run_of(cfg(tmp_path, tiny_bert_dir, precision="fp16"), data)  # 65536: this model's backward overflows
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    loss, _ = tt.train_step(run, _rows(run))
    assert torch.isfinite(loss) and run.scaler.get_scale() == 32768.0
    assert all(torch.equal(p, before[n]) for n, p in run.model.named_parameters())


def test_logged_learning_rate_follows_warmup_then_cosine(monkeypatch, tmp_path, tiny_bert_dir, data):
    """--warmup 2 --min-lr-ratio 0.1 over 3 epochs of 2 steps: each step line logs the rate the
    next step will use (--lr's, not the text tower's --text-lr)."""
    out = tmp_path / "run"
    s = run_fit(monkeypatch, data, cfg(out, tiny_bert_dir, epochs=3, warmup=2, min_lr_ratio=0.1, lr=0.01,
                                       text_tuning="full", text_lr=1e-4))
    f = warmup_cosine(6, 2, 0.1)
    assert s["total_steps"] == 6
    assert [m["lr"] for m in step_lines(out)] == pytest.approx([0.01 * f(k) for k in range(1, 7)])


def test_the_batch_goes_to_the_training_device(monkeypatch, tmp_path, tiny_bert_dir, data):
    """Features, the distinct prompts and their inverse map are sent to the run's device (on a GPU run
    the model is there; this CPU test sees where each is sent)."""
    import napari_cellclip.devices as devices

    sent = []
    real = devices.to_device
    monkeypatch.setattr(devices, "to_device", lambda t, device: sent.append(device) or real(t, device))
    run = run_of(cfg(tmp_path, tiny_bert_dir), data)
    run.device = torch.device("cpu")
    tt.train_step(run, _rows(run))
    assert len(sent) == 3 and all(d is run.device for d in sent)


def test_without_clipping_the_zero_norm_is_made_on_the_training_device(monkeypatch, tmp_path, tiny_bert_dir, data):
    """(it is stacked with the loss when logged: on a GPU run a CPU zero could not join them)"""
    run = run_of(cfg(tmp_path, tiny_bert_dir, grad_clip=0), data)
    made = []
    real = torch.zeros

    def zeros(*shape, **kw):
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("training", "train.py")):
            made.append(kw.get("device"))
        return real(*shape, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    _, gnorm = tt.train_step(run, _rows(run))
    assert made == [run.device] and float(gnorm) == 0.0
