"""The training run: set-up, epochs of steps, checkpoints, validation, the final model.

* AdamW (:mod:`training.optim`) with warm-up + cosine decay (:mod:`training.scheduler`),
  gradient clipping, fp32 / bf16 / fp16 autocast (:mod:`training.precision`).
* ``--resume`` continues from the latest checkpoint (:mod:`training.checkpoints`): the epoch
  order depends only on (seed, epoch), the field-subset augmentation only on (seed, step), and
  the RNGs are restored, so a resumed run ends with the same weights as an uninterrupted one.
* Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DDP, each rank takes its
  contiguous shard of a global batch (``--batching``: shuffled wells with multi-positive labels,
  or distinct prompts), the loss all-gathers embeddings, features and prompt labels in the same
  rank order (so labels stay aligned and negatives span the global batch) and only rank 0 writes.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_cellclip._fsutil import append_text, atomic_write_text

from .config import FitConfig
from .distributed import Dist, resolve_train_device
from .prepare import TrainingData, prepare

__all__ = ["Run", "fit"]


@dataclass
class Run:
    """A training run in progress: the model, its optimiser state and where it is."""

    cfg: FitConfig
    dist: Dist
    device: Any
    data: TrainingData
    model: Any  # the CellCLIP (unwrapped)
    net: Any  # the model, DDP-wrapped under torchrun
    sampler: Any
    optimizer: Any
    optimizer_impl: str
    scheduler: Any
    scaler: Any
    tokens: tuple  # (input_ids, attention_mask) of the training prompts, on the device
    train_args: dict
    total_steps: int
    say: Callable
    step: int = 0
    epoch: int = 0
    start: int = 0  # batch position inside the epoch
    stopped: bool = False
    t_train: float = field(default_factory=time.perf_counter)

    @property
    def output(self) -> Path:
        return Path(self.cfg.output)

    def log(self, rec: dict) -> None:
        if self.dist.main:
            append_text(self.output / "metrics.jsonl", json.dumps(rec, default=float) + "\n")


# ------------------------------------------------------------------------- set-up
def build_model(cfg: FitConfig, data: TrainingData, dist: Dist, device):
    """A fresh CellCLIP for the data (its width, channels, stains, correction, prompt context)
    → (model on the device, the training arguments recorded in its config)."""
    import torch

    from napari_cellclip import correction as corr
    from napari_cellclip.checkpoints import record_prompt_context
    from napari_cellclip.model import CellCLIP, CellCLIPConfig

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    _, c, d = data.feature_shape
    heads = int(cfg.vision_heads)
    while d % heads:
        heads -= 1
    train_args = dict(cfg.to_json(), world_size=dist.world, n_train_wells=len(data.train),
                      prompts=data.train.prompts, val_plates=list(data.val_plates))
    train_fields = data.fields[~data.fields["Metadata_Plate"].astype(str).isin(data.val_plates)]
    config = CellCLIPConfig(
        embed_dim=int(cfg.embed_dim), vision_width=int(d), vision_layers=int(cfg.vision_layers), vision_heads=heads,
        input_channels=int(c), context_length=int(cfg.context_length), pooling=cfg.pooling,
        text_encoder=cfg.text_encoder, text_tuning=cfg.text_tuning, stains=data.stains,
        image_encoder=data.encoder_spec, feature_correction=corr.to_json(data.correction_spec),
        input_normalization=cfg.normalization, prompt_context=record_prompt_context(train_fields),
        loss=cfg.loss, training=json.loads(json.dumps(train_args, default=str)))
    model = CellCLIP(config)
    corr.attach_to_model(model, data.correction_spec)
    return model.to(device), train_args


def setup(cfg: FitConfig, data: TrainingData, dist: Dist, device, say) -> Run:
    """Model, prompt tokens, sampler, optimiser, schedule and scaler; resumed when asked."""
    from .checkpoints import restore
    from .data import make_batch_sampler
    from .optim import make_optimizer
    from .precision import grad_scaler
    from .scheduler import make_scheduler

    model, train_args = build_model(cfg, data, dist, device)
    tok = model.tokenize(data.train.prompts, truncate=True)
    sampler = make_batch_sampler(cfg.batching, data.train.prompt_ids, cfg.batch_size, seed=cfg.seed,
                                 rank=dist.rank, world_size=dist.world, warn=False)
    total_steps = len(sampler) * int(cfg.epochs)
    optimizer, impl = make_optimizer(model, cfg, device)
    train_args["optimizer"] = impl
    model.config.training["optimizer"] = impl  # the checkpoint records what train_args.json does
    run = Run(cfg, dist, device, data, model, model, sampler, optimizer, impl,
              make_scheduler(optimizer, total_steps, cfg.warmup, cfg.min_lr_ratio), grad_scaler(device, cfg.precision),
              (tok["input_ids"].to(device), tok["attention_mask"].to(device)), train_args, total_steps, say)
    if cfg.resume:
        got = restore(run.output, model, optimizer, run.scheduler, run.scaler, rank=dist.rank)
        if got is None:
            say(f"--resume: no checkpoint in {run.output / 'checkpoints'}; starting from scratch")
        else:
            ck, run.step, run.epoch, run.start = got
            say(f"resumed from {ck} at step {run.step} (epoch {run.epoch}, batch {run.start})")
    # a checkpoint taken after an epoch's last batch (start == len(sampler)) resumes with that epoch's
    # empty rest: train() then ends the epoch as an uninterrupted run does (its eval_every validation)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines of what happened before the checkpoint resumed from: the step lines
    up to its step, the events (validations, "done") before it.  The steps after it, and the events
    that follow a checkpoint at its own step (an epoch's validation, the final one), are run and
    logged again; a line cut short by a kill is dropped."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        at = int(rec.get("step", 0))
        if at < step or (at == step and "event" not in rec):
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _start_logs(run: Run) -> None:
    if run.dist.main:
        run.output.mkdir(parents=True, exist_ok=True)
        metrics = run.output / "metrics.jsonl"
        if not run.cfg.resume and metrics.exists():
            metrics.unlink()
        elif metrics.exists():
            _trim_metrics(metrics, run.step)
        atomic_write_text(run.output / "train_args.json", json.dumps(run.train_args, indent=2, default=str))


# ---------------------------------------------------------------------- training
def train_step(run: Run, rows: np.ndarray):
    """One optimiser step on the wells ``rows`` → (loss, gradient norm) as detached device tensors.

    Nothing here waits for the device (no ``.item()``, no ``float()``, no device ``unique``): the
    batch's distinct prompts are found on the host, inputs go from pinned memory, and the caller
    reads the two numbers only when it logs them.  The text tower encodes each distinct prompt
    of the batch once (U ≪ B on real plates); its embedding is then shared by the batch's wells.
    """
    import torch

    from napari_cellclip.devices import to_device
    from napari_cellclip.losses import compute_loss

    from .precision import autocast

    cfg, wb, model, dev = run.cfg, run.data.train, run.model, run.device
    if cfg.bag_min_fields or cfg.bag_max_fields:  # augmentation: a random subset of each well's fields
        rng = np.random.default_rng([cfg.seed, run.step, run.dist.rank, 0xA06])
        bags = wb.gather_subsets(rows, rng, cfg.bag_min_fields or 1, cfg.bag_max_fields)
    else:
        bags = wb.gather(rows)
    pids = np.asarray(wb.prompt_ids[rows], dtype=np.int64)
    uniq, inverse = np.unique(pids, return_inverse=True)
    x = to_device(torch.from_numpy(np.ascontiguousarray(bags)), dev)
    uniq_d, inverse_d = to_device(torch.from_numpy(uniq), dev), to_device(torch.from_numpy(inverse.reshape(-1)), dev)
    input_ids, attn = run.tokens
    with autocast(dev, cfg.precision):
        img, txt, pooled = run.net(x, input_ids[uniq_d], attn[uniq_d])
    labels = torch.from_numpy(pids)  # on the CPU: the loss groups them without a device sync
    if run.dist.enabled:  # all-gathered with the embeddings: on the device
        labels = to_device(labels, dev)
    loss = compute_loss(model.config.loss, img, txt[inverse_d], model.logit_scale, channel_features=pooled,
                        logit_bias=model.logit_bias, labels=labels, gather=run.dist.enabled)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.zeros((), device=dev)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    model.clamp_logit_scale_()
    return loss.detach(), gnorm.detach()


def checkpoint(run: Run) -> None:
    """Write checkpoint-<step> (rank 0; every rank's RNG state gathered)."""
    from .checkpoints import rng_state, save_checkpoint

    st = {"step": run.step, "epoch": run.epoch, "optimizer": run.optimizer.state_dict(),
          "scheduler": run.scheduler.state_dict(),
          "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
          "rng": rng_state(), "sampler": {"epoch": run.epoch, "start": run.start, "seed": run.cfg.seed},
          "total_steps": run.total_steps, "world_size": run.dist.world}
    if run.dist.enabled:
        st["rank_rng"] = run.dist.all_gather(rng_state())
    if run.dist.main:
        save_checkpoint(run.output, run.model, st, keep=run.cfg.keep)
    run.dist.barrier()


def validate(run: Run, tag: str) -> dict | None:
    """Retrieval on the validation plates (logged), or None without them."""
    from .evaluate import evaluate_bags

    if run.data.val is None:
        return None
    rep = evaluate_bags(run.model, run.data.val, device=run.device, correction_spec=run.data.correction_spec,
                        extra={"step": run.step, "epoch": run.epoch})
    run.model.train()
    run.log({"event": tag, "step": run.step, "epoch": run.epoch,
             **{f"val_{lvl}_{short}_R@1": rep[lvl][d]["R@1"] for lvl in ("field", "well")
                for short, d in (("i2t", "image_to_text"), ("t2i", "text_to_image"))}})
    return rep


def _step_record(run: Run, rows, loss, gnorm) -> dict:
    """A metrics line whose numbers are still device tensors (read by :func:`_write_record`)."""
    return {"step": run.step, "epoch": run.epoch, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
            "logit_scale": run.model.logit_scale.detach().exp(), "grad_norm": gnorm, "batch": int(len(rows))}


def _write_record(run: Run, bar, rec: dict | None) -> None:
    """Read the record's numbers off the device (one transfer) and log them."""
    if rec is None:
        return
    import torch

    keys = ("loss", "logit_scale", "grad_norm")
    values = torch.stack([rec[k].float().reshape(()) for k in keys]).tolist()
    rec = dict(rec, **dict(zip(keys, values)), time=round(time.perf_counter() - run.t_train, 3))
    bar.set_postfix(loss=f"{rec['loss']:.4f}", epoch=rec["epoch"])
    run.log(rec)


def train_epoch(run: Run, bar) -> None:
    """The rest of the current epoch, with logging, periodic checkpoints and ``stop_after_steps``.

    A logged step's numbers are read after the *next* step has been queued, so reading them
    does not stall the device between steps (the last one is read at the end of the epoch).
    """
    cfg = run.cfg
    run.sampler.set_epoch(run.epoch, run.start)
    pending = None
    for rows in run.sampler:
        loss, gnorm = train_step(run, rows)
        run.step += 1
        run.start += 1
        bar.update(1)
        _write_record(run, bar, pending)
        pending = _step_record(run, rows, loss, gnorm) if cfg.log_every and run.step % cfg.log_every == 0 else None
        if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total_steps:
            _write_record(run, bar, pending)
            pending = None
            checkpoint(run)
        if cfg.stop_after_steps and run.step >= int(cfg.stop_after_steps) and run.step < run.total_steps:
            _write_record(run, bar, pending)
            checkpoint(run)
            run.stopped = True
            return
    _write_record(run, bar, pending)


def train(run: Run) -> None:
    """Epochs until the last one (or ``stop_after_steps``), validating every ``eval_every`` epochs."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", file=sys.stderr,
               disable=not run.dist.main or cfg.no_progress or cfg.quiet, dynamic_ncols=True)
    run.net.train()
    run.t_train = time.perf_counter()
    while run.epoch < int(cfg.epochs) and not run.stopped:
        train_epoch(run, bar)
        if run.stopped:
            break
        run.epoch += 1
        run.start = 0
        if cfg.eval_every and run.epoch % cfg.eval_every == 0 and run.epoch < int(cfg.epochs):
            validate(run, "val")
    bar.close()


def finish(run: Run, t_start: float) -> dict:
    """The last checkpoint, the final ``model/``, the final validation → the summary."""
    from napari_cellclip import correction as corr

    from .evaluate import format_report, write_report

    summary = {"output": str(run.output), "steps": run.step, "total_steps": run.total_steps, "epochs": run.epoch,
               "stopped_early": run.stopped, "train_seconds": round(time.perf_counter() - run.t_train, 2),
               "extract_seconds": round(run.data.extract_seconds, 2),
               "feature_correction": corr.to_json(run.data.correction_spec),
               "steps_per_epoch": len(run.sampler), "batch_size": run.sampler.batch_size,
               "batching": run.cfg.batching, "precision": run.cfg.precision, "optimizer": run.optimizer_impl,
               "world_size": run.dist.world}
    if run.stopped:
        run.say(f"stopped after {run.step} steps (--stop-after-steps); resume with --resume")
        return summary
    checkpoint(run)
    if run.dist.main:
        run.model.save_pretrained(run.output / "model")
    rep = validate(run, "final_val")
    if rep is not None and run.dist.main:
        write_report(rep, run.output / "val_report.json")
        run.say(format_report(rep))
        summary["val"] = {lvl: {d: rep[lvl][d]["R@1"] for d in ("image_to_text", "text_to_image")}
                          for lvl in ("field", "well")}
    summary.update(seconds=round(time.perf_counter() - t_start, 2), model=str(run.output / "model"))
    if run.dist.main:
        from napari_cellclip.modelcard import write_model_card

        write_model_card(run.output / "model", summary=summary, fields=run.data.fields, report=rep)
        run.log({"event": "done", "step": run.step, **{k: v for k, v in summary.items() if k != "val"}})
        run.say(f"saved {run.output / 'model'} ({run.step} steps, {summary['seconds']:.1f}s)")
    run.dist.barrier()
    return summary


def fit(cfg: FitConfig) -> dict:
    """Train CellCLIP as ``cfg`` says; returns a summary dict (paths, steps, validation report)."""
    from .precision import resolve_precision

    t_start = time.perf_counter()
    dist = Dist()
    device = resolve_train_device(cfg.device, dist)
    if cfg.precision == "auto":
        cfg.precision = resolve_precision(device)
    dist.init(device, cfg.dist_timeout)
    say = (lambda *m: print(*m, file=sys.stderr)) if dist.main and not cfg.quiet else (lambda *m: None)
    data = None
    try:
        data = prepare(cfg, dist, device, say)
        run = setup(cfg, data, dist, device, say)
        _start_logs(run)
        train(run)
        return finish(run, t_start)
    finally:
        dist.close()
        if data is not None:
            data.close()
