"""The training loop: data → features → correction → bags → CellCLIP, with checkpoints.

* AdamW (the fused kernel where torch has one for the device: CUDA, and CPU
  in torch >= 2.4) with no weight decay on norms, biases, embeddings-like 1-D
  parameters and the logit scale/bias; linear warm-up then cosine decay;
  gradient clipping; fp32 / bf16 / fp16 autocast (fp16 with a GradScaler;
  ``--precision auto``, the default, is bf16 on CUDA and fp32 elsewhere).
* The corrected (N_fields, C, D) features are written once to
  ``<output>/.features-rank<r>.npy`` and memory-mapped (removed when fit
  returns); each batch gathers its bags' rows by index arrays.
* Checkpoints ``<output>/checkpoints/checkpoint-<step>/`` hold the model
  (``save_pretrained``: config.json + model.safetensors + text/) and
  ``training_state.pt`` (optimizer, scheduler, scaler, RNG states, step,
  epoch, sampler position; plain tensors/containers, loaded with
  ``weights_only=True``).  Each is written to a temporary folder and renamed
  into place, and ``<output>/checkpoints/latest`` is replaced atomically last,
  so a kill at any moment leaves the previous checkpoint intact.  The final
  model is ``<output>/model``.
* ``--resume`` continues from ``latest``: the epoch order depends only on
  (seed, epoch), the field-subset augmentation only on (seed, step), and the
  torch RNG is restored, so a resumed run ends with the same weights as an
  uninterrupted one.
* Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DDP, each rank
  takes its contiguous shard of a global batch (``--batching``: shuffled wells
  with multi-positive labels, or distinct prompts), the loss all-gathers
  embeddings, features and prompt labels in the same rank order (so labels
  stay aligned and negatives span the global batch) and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from napari_cellclip._fsutil import atomic_dir
from napari_cellclip.errors import CellClipError, CheckpointError

DEFAULT_OUTPUT = "checkpoints/cellclip-lincs-sample"
STATE_NAME = "training_state.pt"
LATEST = "latest"


# ------------------------------------------------------------------ distributed
class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.initialised_here = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device):
        if not self.enabled:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self.initialised_here = True

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialised_here = False


def resolve_train_device(device: str, dist: Dist):
    import torch

    from napari_cellclip.encoders import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dist.enabled:
        torch.cuda.set_device(dist.local_rank)
        dev = torch.device("cuda", dist.local_rank)
    return dev


# ------------------------------------------------------------------ data loading
def load_fields(data=None, *, platemap=None, barcode_platemap=None, annotations=None,
                channel_map=None, cell_line="A549"):
    """Fields table of one or several plates (folder / LoadData CSV), annotated.

    No ``data`` → the bundled real LINCS sample.
    """
    import pandas as pd

    from napari_cellclip import plates as P

    if not data:
        from napari_cellclip.sample import load_sample_fields

        fields = load_sample_fields()
    else:
        tables = []
        for d in data:
            if not Path(d).exists():
                raise CellClipError(f"{d}: no such plate folder or manifest")
            t = P.read_plate(d, channel_map=channel_map)
            if platemap or annotations or barcode_platemap:
                from napari_cellclip.metadata import annotate

                kw = {"cell_line": cell_line}
                if platemap:
                    kw["platemap_dir"] = platemap
                if barcode_platemap:
                    kw["barcode_platemap"] = barcode_platemap
                if annotations:
                    kw["annotations"] = annotations
                t = annotate(t, **kw)
            tables.append(t)
        fields = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
        dup = fields.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Site"])
        if dup.any():
            raise CellClipError(f"{int(dup.sum())} field(s) appear twice (same plate, well and site) "
                                "in the given data")
    stains = P.stains(fields)
    if set(stains) == set(P.DEFAULT_STAINS) and list(stains) != list(P.DEFAULT_STAINS):
        fields = P.reorder_stains(fields, P.DEFAULT_STAINS)
    return fields.reset_index(drop=True)


def extract(fields, encoder_spec="morphology", *, normalization="field", device="auto", cache_dir=None,
            batch_size=8, num_workers=0, progress=True, quiet=False):
    """Frozen features of every field (cached) → (features (N, C, D), fields of the rows kept, encoder)."""
    from napari_cellclip.encoders import get_encoder
    from napari_cellclip.features import extract_features
    from napari_cellclip.plates import stains as stains_of

    encoder = get_encoder(encoder_spec, device=device)
    bar = None
    cb = None
    if progress and not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fields), desc="features", unit="field", file=sys.stderr, leave=False)

        def cb(done, total):
            bar.n = done
            bar.refresh()
    try:
        res = extract_features(fields, encoder, stains=stains_of(fields), cache_dir=cache_dir,
                               normalization=normalization,
                               batch_size=batch_size, num_workers=num_workers, progress=cb)
    finally:
        if bar is not None:
            bar.close()
    if len(res.index) == 0:
        raise CellClipError("no field could be read: nothing to train on")
    kept = fields.iloc[np.asarray(res.index)].reset_index(drop=True)
    return np.ascontiguousarray(res.features, dtype=np.float32), kept, encoder


# ------------------------------------------------------------------ optimisation
def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "logit_" in name or "norm" in name.lower() \
                or ".ln" in name or "ln_" in name or "cls_token" in name or "channel_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def resolve_precision(device) -> str:
    """``--precision auto``: bf16 autocast on a CUDA device that supports it, fp32 elsewhere."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def make_adamw(groups, device, **kw):
    """AdamW with the fused kernel where torch has one for ``device`` (CUDA, and CPU since torch
    2.4), else the default (foreach) implementation -> (optimizer, "fused" | "foreach")."""
    import torch

    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        fused_ok = device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: fused is CUDA-only
        fused_ok = device.type == "cuda"
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, **kw), "foreach"


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ------------------------------------------------------------------ checkpoints
def _rng_state():
    import torch

    npst = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "python": _to_plain(random.getstate()),
          "numpy": {"key": torch.from_numpy(npst[1].astype(np.int64)), "pos": int(npst[2]),
                    "has_gauss": int(npst[3]), "gauss": float(npst[4])}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _to_plain(x):
    if isinstance(x, tuple):
        return [_to_plain(v) for v in x]
    return x


def _to_tuple(x):
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x


def _set_rng_state(st):
    import torch

    torch.set_rng_state(st["torch"])
    random.setstate(_to_tuple(st["python"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def latest_checkpoint(output: Path) -> Path | None:
    ck = Path(output) / "checkpoints"
    pointer = ck / LATEST
    if pointer.is_file():
        p = ck / pointer.read_text().strip()
        if (p / STATE_NAME).is_file():
            return p
    cands = sorted(p for p in ck.glob("checkpoint-*") if (p / STATE_NAME).is_file())
    return cands[-1] if cands else None


def save_checkpoint(output: Path, model, state: dict, keep: int = 2) -> Path:
    """Atomically write checkpoint-<step> (model + training state) and update ``latest``."""
    import torch

    ck = Path(output) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{state['step']:07d}"
    final = ck / name
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        torch.save(state, tmp / STATE_NAME)
    ptmp = ck / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    ptmp.write_text(name)
    os.replace(ptmp, ck / LATEST)
    if keep and keep > 0:
        olds = sorted(p for p in ck.glob("checkpoint-*") if p.is_dir() and p != final)
        for p in olds[: max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_training_state(path: Path) -> dict:
    import torch

    try:
        return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read {STATE_NAME} ({exc})") from None


def load_model_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "model.safetensors"), device="cpu")
    extra = {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")}
    state = {k: v for k, v in state.items() if not k.startswith("extra.")}
    model.load_checkpoint_state(state, where=str(path))
    model.extra_tensors = extra


# ------------------------------------------------------------------ fit
def _hf_bars_follow_quiet(fn):
    """``quiet=True`` or ``no_progress=True`` also silences transformers' own
    "Loading weights" bars while ``fn`` runs (restored afterwards)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (kwargs.get("quiet") or kwargs.get("no_progress")):
            return fn(*args, **kwargs)
        from transformers.utils import logging as hf_logging

        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                hf_logging.enable_progress_bar()
    return wrapper


FIT_DEFAULTS = dict(
    data=None, platemap=None, barcode_platemap=None, annotations=None, channel_map=None,
    cell_line="A549", output=DEFAULT_OUTPUT, encoder="morphology", normalization="plate",
    text_encoder="all-MiniLM-L6-v2",
    text_tuning="frozen", loss="cwcl", embed_dim=256, vision_layers=2, vision_heads=8,
    pooling="attention", context_length=77, epochs=240, batch_size=64, batching="multipositive", lr=5e-4, text_lr=None,
    weight_decay=0.1, warmup=0.1, min_lr_ratio=0.0, grad_clip=1.0, seed=0, device="auto",
    precision="auto", correction="tvn", bag_min_fields=1, bag_max_fields=None,
    val_plate=None, save_every=0, keep=2, log_every=1, stop_after_steps=None, resume=False,
    cache_dir=None, extract_batch_size=8, num_workers=0, no_progress=False, quiet=False,
    eval_every=0, betas=(0.9, 0.98), eps=1e-6, features_mmap=True,
)


@_hf_bars_follow_quiet
def fit(**kwargs) -> dict:
    """Train CellCLIP; returns a summary dict (paths, steps, validation report)."""
    unknown = set(kwargs) - set(FIT_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown fit option(s): {sorted(unknown)}")
    a = dict(FIT_DEFAULTS)
    a.update({k: v for k, v in kwargs.items() if v is not None or k in ("stop_after_steps",)})
    import torch

    from napari_cellclip import correction as corr
    from napari_cellclip.losses import compute_loss
    from napari_cellclip.modelcard import write_model_card
    from napari_cellclip.model import CellCLIP, CellCLIPConfig

    from .data import BATCHINGS, build_well_bags, make_batch_sampler, split_by_plate
    from .evaluate import evaluate_bags, format_report, write_report

    t_start = time.perf_counter()
    dist = Dist()
    feats_file = None
    if a["precision"] not in ("auto", "fp32", "bf16", "fp16"):
        raise CellClipError(f"unknown precision {a['precision']!r}; choose auto, fp32, bf16 or fp16")
    from napari_cellclip.losses import LOSSES

    if a["loss"] not in LOSSES:
        raise CellClipError(f"unknown loss {a['loss']!r}; choose one of {', '.join(LOSSES)}")
    from napari_cellclip.images import check_normalization

    a["normalization"] = check_normalization(a["normalization"])
    if a["batching"] not in BATCHINGS:
        raise CellClipError(f"unknown batching {a['batching']!r}; choose {' or '.join(BATCHINGS)}")
    if int(a["epochs"]) < 1 or int(a["batch_size"]) < 1:
        raise CellClipError("--epochs and --batch-size must be at least 1")
    device = resolve_train_device(a["device"], dist)
    if a["precision"] == "auto":
        a["precision"] = resolve_precision(device)
    dist.init(device)
    say = (lambda *m: print(*m, file=sys.stderr)) if dist.main and not a["quiet"] else (lambda *m: None)
    output = Path(a["output"])
    try:
        # ---- data, features, correction -------------------------------------------
        fields = load_fields(a["data"], platemap=a["platemap"], barcode_platemap=a["barcode_platemap"],
                             annotations=a["annotations"], channel_map=a["channel_map"],
                             cell_line=a["cell_line"])
        val_plates = a["val_plate"] or []
        if isinstance(val_plates, str):
            val_plates = [val_plates]
        split_by_plate(fields, val_plates)  # validates the names before the slow part
        if "Metadata_prompt" not in fields.columns:
            raise CellClipError("the data has no prompts (no Metadata_prompt column): give --platemap "
                                "(and --annotations) so that wells get perturbation names")
        t0 = time.perf_counter()
        if dist.enabled and not dist.main:
            dist.barrier()  # rank 0 fills the cache first
        feats, fields, encoder = extract(fields, a["encoder"], normalization=a["normalization"],
                                         device=device.type if device.type != "cuda"
                                         else str(device), cache_dir=a["cache_dir"],
                                         batch_size=a["extract_batch_size"], num_workers=a["num_workers"],
                                         progress=not a["no_progress"] and dist.main, quiet=a["quiet"])
        if dist.enabled and dist.main:
            dist.barrier()
        t_extract = time.perf_counter() - t0
        train_mask, val_mask = split_by_plate(fields, val_plates)
        spec = corr.make_spec(a["correction"])
        spec = corr.fit(feats[train_mask], fields[train_mask], spec)
        # corrected features, training rows first then validation rows, written once to a
        # .npy in the output folder and memory-mapped (batches gather rows by index)
        n_train = int(train_mask.sum())
        feats_shape = tuple(feats.shape)
        if a["features_mmap"]:
            output.mkdir(parents=True, exist_ok=True)
            feats_file = output / f".features-rank{dist.rank}.npy"
            feats_c = np.lib.format.open_memmap(feats_file, mode="w+", dtype=np.float32, shape=feats_shape)
        else:
            feats_c = np.empty(feats_shape, dtype=np.float32)
        feats_c[:n_train] = corr.apply(feats[train_mask], fields[train_mask], spec)
        if val_mask.any():
            feats_c[n_train:] = corr.apply(feats[val_mask], fields[val_mask], spec)
        del feats
        if feats_file is not None:
            feats_c.flush()
            del feats_c
            feats_c = np.load(feats_file, mmap_mode="r", allow_pickle=False)
        train_fields = fields[train_mask].reset_index(drop=True)
        wb = build_well_bags(feats_c[:n_train], train_fields)
        val_wb = None
        if val_mask.any():
            val_wb = build_well_bags(feats_c[n_train:], fields[val_mask].reset_index(drop=True))
        stains = list(fields.filter(like="FileName_Orig").columns.str.replace("FileName_Orig", ""))
        n_prompts = len(wb.prompts)
        say(f"data: {len(fields)} fields, {len(wb)} training wells on "
            f"{len(set(wb.wells['plate']))} plate(s), {n_prompts} distinct prompts; features "
            f"{feats_shape} from {encoder.spec!r} in {t_extract:.1f}s; correction "
            f"{corr.describe(spec)}")
        if a["batching"] == "distinct" and a["batch_size"] * dist.world > n_prompts:
            say(f"note: batches hold distinct prompts only, so the batch size is capped at "
                f"{max(1, n_prompts // dist.world)} per process (the training set has {n_prompts} prompts)")

        # ---- model ------------------------------------------------------------------
        torch.manual_seed(a["seed"])
        random.seed(a["seed"])
        np.random.seed(a["seed"])
        D, C = int(feats_shape[2]), int(feats_shape[1])
        heads = int(a["vision_heads"])
        while D % heads:
            heads -= 1
        train_args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in a.items()}
        train_args.update(world_size=dist.world, n_train_wells=len(wb), prompts=wb.prompts,
                          val_plates=list(val_plates))
        config = CellCLIPConfig(
            embed_dim=int(a["embed_dim"]), vision_width=D, vision_layers=int(a["vision_layers"]),
            vision_heads=heads, input_channels=C, context_length=int(a["context_length"]),
            pooling=a["pooling"], text_encoder=a["text_encoder"], text_tuning=a["text_tuning"],
            stains=stains, image_encoder=encoder.spec, feature_correction=corr.to_json(spec),
            input_normalization=a["normalization"],
            loss=a["loss"], training=json.loads(json.dumps(train_args, default=str)))
        model = CellCLIP(config)
        corr.attach_to_model(model, spec)
        model.to(device)

        tok = model.tokenize(wb.prompts, truncate=True)
        input_ids, attn = tok["input_ids"].to(device), tok["attention_mask"].to(device)

        sampler = make_batch_sampler(a["batching"], wb.prompt_ids, a["batch_size"], seed=a["seed"],
                                     rank=dist.rank, world_size=dist.world, warn=False)
        steps_per_epoch = len(sampler)
        total_steps = steps_per_epoch * int(a["epochs"])
        warmup = a["warmup"]
        warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
        groups = param_groups(model, a["weight_decay"])
        if a["text_lr"]:
            text_ids = {id(p) for p in model.text.parameters()}
            new = []
            for g in groups:
                for is_text in (False, True):
                    ps = [p for p in g["params"] if (id(p) in text_ids) == is_text]
                    if ps:
                        new.append({**g, "params": ps, **({"lr": a["text_lr"]} if is_text else {})})
            groups = new
        opt, opt_impl = make_adamw(groups, device, lr=a["lr"], betas=tuple(a["betas"]), eps=a["eps"])
        train_args["optimizer"] = opt_impl
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(total_steps, warmup_steps, a["min_lr_ratio"]))
        scaler = torch.amp.GradScaler(device.type, enabled=a["precision"] == "fp16")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a["precision"])

        step, epoch, start = 0, 0, 0
        if a["resume"]:
            ck = latest_checkpoint(output)
            if ck is None:
                say(f"--resume: no checkpoint in {output / 'checkpoints'}; starting from scratch")
            else:
                st = load_training_state(ck)
                load_model_weights(model, ck)
                model.to(device)
                opt.load_state_dict(st["optimizer"])
                sched.load_state_dict(st["scheduler"])
                if "scaler" in st and st["scaler"]:
                    scaler.load_state_dict(st["scaler"])
                step, epoch, start = int(st["step"]), int(st["sampler"]["epoch"]), int(st["sampler"]["start"])
                if st.get("rank_rng") and dist.rank < len(st["rank_rng"]):
                    _set_rng_state(st["rank_rng"][dist.rank])
                else:
                    _set_rng_state(st["rng"])
                say(f"resumed from {ck} at step {step} (epoch {epoch}, batch {start})")
        if start >= steps_per_epoch:
            epoch, start = epoch + 1, 0

        raw = model
        net = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        metrics_path = output / "metrics.jsonl"
        if dist.main:
            output.mkdir(parents=True, exist_ok=True)
            if not a["resume"] and metrics_path.exists():
                metrics_path.unlink()
            (output / "train_args.json").write_text(json.dumps(train_args, indent=2, default=str))

        def log(rec):
            if dist.main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec, default=float) + "\n")

        def make_state():
            import torch.distributed as tdist

            st = {"step": step, "epoch": epoch, "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                  "rng": _rng_state(), "sampler": {"epoch": epoch, "start": start, "seed": a["seed"]},
                  "total_steps": total_steps, "world_size": dist.world}
            if dist.enabled:
                gathered = [None] * dist.world
                tdist.all_gather_object(gathered, _rng_state())
                st["rank_rng"] = gathered
            return st

        def checkpoint():
            st = make_state()
            if dist.main:
                save_checkpoint(output, raw, st, keep=a["keep"])
            dist.barrier()

        def run_eval(tag):
            if val_wb is None:
                return None
            rep = evaluate_bags(raw, val_wb, device=device, correction_spec=spec,
                                extra={"step": step, "epoch": epoch})
            raw.train()
            log({"event": tag, "step": step, "epoch": epoch,
                 "val_field_i2t_R@1": rep["field"]["image_to_text"]["R@1"],
                 "val_well_i2t_R@1": rep["well"]["image_to_text"]["R@1"],
                 "val_field_t2i_R@1": rep["field"]["text_to_image"]["R@1"],
                 "val_well_t2i_R@1": rep["well"]["text_to_image"]["R@1"]})
            return rep

        # ---- loop ---------------------------------------------------------------------
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=sys.stderr,
                   disable=not dist.main or a["no_progress"] or a["quiet"], dynamic_ncols=True)
        augment = bool(a["bag_min_fields"]) or bool(a["bag_max_fields"])
        stopped = False
        params = [p for p in raw.parameters() if p.requires_grad]
        net.train()
        t_train = time.perf_counter()
        while epoch < int(a["epochs"]) and not stopped:
            sampler.set_epoch(epoch, start)
            for rows in sampler:
                if augment:
                    rng = np.random.default_rng([a["seed"], step, dist.rank, 0xA06])
                    bags = wb.gather_subsets(rows, rng, a["bag_min_fields"] or 1, a["bag_max_fields"])
                else:
                    bags = wb.gather(rows)
                pids = torch.from_numpy(wb.prompt_ids[rows]).to(device)
                x = torch.from_numpy(bags).to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    img, txt, pooled = net(x, input_ids[pids], attn[pids])
                loss = compute_loss(raw.config.loss, img.float(), txt.float(), raw.logit_scale,
                                    channel_features=pooled.float(), logit_bias=raw.logit_bias,
                                    labels=pids, gather=dist.enabled)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(params, a["grad_clip"]) if a["grad_clip"] \
                    else torch.tensor(0.0)
                scaler.step(opt)
                scaler.update()
                sched.step()
                raw.clamp_logit_scale_()
                step += 1
                start += 1
                lval = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{lval:.4f}", epoch=epoch)
                if a["log_every"] and step % a["log_every"] == 0:
                    log({"step": step, "epoch": epoch, "loss": lval, "lr": sched.get_last_lr()[0],
                         "logit_scale": float(raw.logit_scale.detach().exp()), "grad_norm": float(gnorm),
                         "batch": int(len(rows)), "time": round(time.perf_counter() - t_train, 3)})
                if a["save_every"] and step % a["save_every"] == 0 and step < total_steps:
                    checkpoint()
                if a["stop_after_steps"] and step >= int(a["stop_after_steps"]) and step < total_steps:
                    checkpoint()
                    stopped = True
                    break
            if stopped:
                break
            epoch += 1
            start = 0
            if a["eval_every"] and epoch % a["eval_every"] == 0 and epoch < int(a["epochs"]):
                run_eval("val")
        bar.close()
        train_seconds = time.perf_counter() - t_train
        summary = {"output": str(output), "steps": step, "total_steps": total_steps, "epochs": epoch,
                   "stopped_early": stopped, "train_seconds": round(train_seconds, 2),
                   "extract_seconds": round(t_extract, 2), "feature_correction": corr.to_json(spec),
                   "steps_per_epoch": steps_per_epoch, "batch_size": sampler.batch_size,
                   "batching": a["batching"], "precision": a["precision"], "optimizer": opt_impl,
                   "world_size": dist.world}
        if stopped:
            say(f"stopped after {step} steps (--stop-after-steps); resume with --resume")
            return summary
        checkpoint()
        if dist.main:
            raw.save_pretrained(output / "model")
        rep = run_eval("final_val")
        if rep is not None and dist.main:
            write_report(rep, output / "val_report.json")
            say(format_report(rep))
            summary["val"] = {lvl: {d: rep[lvl][d]["R@1"] for d in ("image_to_text", "text_to_image")}
                              for lvl in ("field", "well")}
        summary["seconds"] = round(time.perf_counter() - t_start, 2)
        summary["model"] = str(output / "model")
        if dist.main:
            write_model_card(output / "model", summary=summary, fields=fields, report=rep)
            log({"event": "done", **{k: v for k, v in summary.items() if k != "val"}})
            say(f"saved {output / 'model'} ({step} steps, {summary['seconds']:.1f}s)")
        dist.barrier()
        return summary
    finally:
        dist.close()
        if feats_file is not None:
            with contextlib.suppress(OSError):  # mapped files cannot be removed on Windows
                feats_file.unlink()


# ------------------------------------------------------------------ evaluate
def resolve_checkpoint(path) -> Path:
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    ck = latest_checkpoint(p)
    if ck is not None:
        return ck
    raise CheckpointError(f"{p}: not a checkpoint folder (no config.json)")


@dataclasses.dataclass
class EvaluationData:
    """What evaluating a checkpoint on plates needs: the model, the plates' corrected frozen
    features (rows aligned with ``fields``), their well bags and how they were made."""

    model: object
    checkpoint: Path
    device: object
    features: np.ndarray
    fields: object
    encoder: object
    correction: dict | None
    wells: object


def load_evaluation(checkpoint, data=None, *, platemap=None, barcode_platemap=None, annotations=None,
                    channel_map=None, cell_line="A549", correction="checkpoint", device="auto", cache_dir=None,
                    extract_batch_size=8, num_workers=0, quiet=False, no_progress=False) -> EvaluationData:
    """Load a checkpoint, read and annotate the plates, extract their features with the checkpoint's
    encoder and input normalisation, and correct them as the checkpoint does (or as ``correction`` says)."""
    from napari_cellclip import correction as corr
    from napari_cellclip.model import CellCLIP
    from napari_cellclip.plates import reorder_stains
    from napari_cellclip.plates import stains as stains_of

    from .data import build_well_bags

    ck = resolve_checkpoint(checkpoint)
    dev = resolve_train_device(device, Dist())
    model = CellCLIP.from_pretrained(ck, device=dev)
    fields = load_fields(data, platemap=platemap, barcode_platemap=barcode_platemap,
                         annotations=annotations, channel_map=channel_map, cell_line=cell_line)
    want = list(model.config.stains)
    if list(stains_of(fields)) != want:
        fields = reorder_stains(fields, want)
    feats, fields, enc = extract(fields, model.config.image_encoder or "morphology",
                                 normalization=getattr(model.config, "input_normalization", "field"),
                                 device=str(dev), cache_dir=cache_dir, batch_size=extract_batch_size,
                                 num_workers=num_workers, progress=not no_progress, quiet=quiet)
    if correction == "checkpoint":
        spec = corr.spec_for_model(model, ck)
    else:
        spec = corr.make_spec(correction)
        if spec and spec["method"] == "tvn":
            spec = corr.fit(feats, fields, spec)
    feats = corr.apply(feats, fields, spec)
    return EvaluationData(model, ck, dev, feats, fields, enc, spec, build_well_bags(feats, fields))


@_hf_bars_follow_quiet
def evaluate(checkpoint, data=None, *, platemap=None, barcode_platemap=None, annotations=None,
             channel_map=None, cell_line="A549", correction="checkpoint", device="auto", cache_dir=None,
             extract_batch_size=8, num_workers=0, output=None, quiet=False, no_progress=False,
             metrics=("retrieval",), profiling=None) -> dict:
    """Report of a checkpoint on a data set (features via the checkpoint's encoder).

    ``metrics``: "retrieval" (cross-modal R@k) and/or the copairs profiling metrics of
    :mod:`training.profiling` ("replicate", "activity", "consistency", "sister"), whose
    options ``profiling`` holds (:func:`training.profile_sources.model_report`'s keywords).
    """
    import torch

    from napari_cellclip import correction as corr

    from .evaluate import evaluate_bags, format_report, write_report

    t0 = time.perf_counter()
    ev = load_evaluation(checkpoint, data, platemap=platemap, barcode_platemap=barcode_platemap,
                         annotations=annotations, channel_map=channel_map, cell_line=cell_line,
                         correction=correction, device=device, cache_dir=cache_dir,
                         extract_batch_size=extract_batch_size, num_workers=num_workers, quiet=quiet,
                         no_progress=no_progress)
    with torch.no_grad():
        if "retrieval" in metrics:
            rep = evaluate_bags(ev.model, ev.wells, device=ev.device, correction_spec=ev.correction,
                                extra={"checkpoint": str(ev.checkpoint)})
        else:
            rep = {"checkpoint": str(ev.checkpoint), "plates": sorted(set(ev.wells.wells["plate"])),
                   "n_wells": len(ev.wells), "feature_correction": corr.to_json(ev.correction)}
        if any(m != "retrieval" for m in metrics):
            from .profile_sources import model_report

            rep["profiling"] = model_report(ev, metrics, **(profiling or {}))
    rep["seconds"] = round(time.perf_counter() - t0, 2)
    if output:
        write_report(rep, output)
    if not quiet:
        print(format_report(rep), file=sys.stderr)
    return rep
