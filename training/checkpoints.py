"""Training checkpoints: ``<output>/checkpoints/checkpoint-<step>/`` (the model + the training state).

Each holds the model (``save_pretrained``: config.json + model.safetensors + text/) and
``training_state.pt`` (optimizer, scheduler, scaler, RNG states, step, epoch, sampler
position; plain tensors and containers, loaded with ``weights_only=True``).  Each is written
to a temporary folder and renamed into place, and ``<output>/checkpoints/latest`` is replaced
atomically last, so a kill at any moment leaves the previous checkpoint intact.  Where they
are found and how a model is read back is :mod:`napari_cellclip.checkpoints`.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import warnings
from pathlib import Path

import numpy as np

from napari_cellclip._fsutil import atomic_dir, atomic_write_text, remove_stale_temps
from napari_cellclip.checkpoints import LATEST, TRAINING_STATE, latest_checkpoint, load_weights
from napari_cellclip.errors import CellClipWarning, CheckpointError

__all__ = ["save_checkpoint", "load_training_state", "rng_state", "set_rng_state", "restore",
           "resume_candidates"]


def rng_state() -> dict:
    """The torch, Python, NumPy (and CUDA) RNG states as plain tensors and containers."""
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
    return [_to_plain(v) for v in x] if isinstance(x, tuple) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def set_rng_state(st: dict) -> None:
    import torch

    torch.set_rng_state(st["torch"])
    random.setstate(_to_tuple(st["python"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(output: Path, model, state: dict, keep: int = 2) -> Path:
    """Atomically write checkpoint-<step> (model + training state) and update ``latest``;
    keep the ``keep`` newest."""
    import torch

    ck = Path(output) / "checkpoints"
    name = f"checkpoint-{state['step']:07d}"
    final = ck / name
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        torch.save(state, tmp / TRAINING_STATE)
    atomic_write_text(ck / LATEST, name)
    if keep and keep > 0:
        olds = sorted(p for p in ck.glob("checkpoint-*") if p.is_dir() and p != final)
        for p in olds[: max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_training_state(path: Path) -> dict:
    import torch

    try:
        return torch.load(Path(path) / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a damaged file
        raise CheckpointError(f"{path}: cannot read {TRAINING_STATE} ({exc})") from None


def resume_candidates(output) -> list[Path]:
    """The checkpoints of ``output`` to resume from, best first: ``latest``, then newest to oldest."""
    ck = Path(output) / "checkpoints"
    first = latest_checkpoint(output)
    rest = sorted((p for p in ck.glob("checkpoint-*") if (p / TRAINING_STATE).is_file() and p != first),
                  reverse=True)
    return ([first] if first else []) + rest


def restore(output, model, optimizer, scheduler, scaler, *, rank: int) -> tuple[Path, int, int, int] | None:
    """Load the newest readable checkpoint of ``output`` into the model, optimizer, scheduler, scaler
    and RNGs → ``(checkpoint, step, epoch, batch position in the epoch)``; None when there is none.

    A damaged checkpoint (truncated weights or state, NaN weights) is named in a warning and the
    previous one is used; when every one is damaged, CheckpointError.  Rank 0 removes the temporary
    folders a killed checkpoint write left behind."""
    if rank == 0:
        for p in remove_stale_temps(Path(output) / "checkpoints"):
            warnings.warn(f"removed {p}, left by an interrupted write", CellClipWarning, stacklevel=2)
    damaged = []
    device = next(iter(model.parameters())).device
    for ck in resume_candidates(output):
        try:
            st = load_training_state(ck)
            load_weights(model, ck)
        except CheckpointError as exc:
            damaged.append(ck.name)
            warnings.warn(f"{ck} is damaged and is skipped: {exc}", CellClipWarning, stacklevel=2)
            continue
        model.to(device)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        rank_rng = st.get("rank_rng")
        set_rng_state(rank_rng[rank] if rank_rng and rank < len(rank_rng) else st["rng"])
        return ck, int(st["step"]), int(st["sampler"]["epoch"]), int(st["sampler"]["start"])
    if damaged:
        raise CheckpointError(f"{Path(output) / 'checkpoints'}: no checkpoint can be resumed from "
                              f"({', '.join(damaged)} damaged); run without --resume to start again")
    return None
