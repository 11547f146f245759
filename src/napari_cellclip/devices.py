"""The one device resolver: ``"auto" | "cpu" | "cuda[:N]" | "mps"`` → a concrete :class:`torch.device`.

Every caller (the plugin's embedding, the embedding job, training, evaluation, the encoders)
goes through :func:`resolve_device`.  A CUDA device always comes back with an index
(``cuda`` alone means the current CUDA device, or ``cuda:LOCAL_RANK`` in a torchrun process),
so ``torch.cuda.set_device`` and per-device caches see one name per GPU.
"""

from __future__ import annotations

import contextlib

from .errors import CellClipError

__all__ = ["DEVICE_CHOICES", "DEVICE_HELP", "cuda_flags", "default_workers", "free_device_memory", "local_world_size",
           "resolve_device", "to_device", "torchrun_env", "use_device"]

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DEVICE_HELP = "'auto' (CUDA, then Apple MPS, then the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'"


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def _cuda(index: int | None, local_rank: int | None, asked: str):
    """``cuda:index`` (validated), ``cuda:local_rank`` under torchrun, else the current CUDA device."""
    import torch

    count = torch.cuda.device_count()
    if count < 1:
        raise CellClipError(f"device {asked!r} was requested but no CUDA device is visible")
    if local_rank is not None:
        index = int(local_rank) % count
    elif index is None:
        index = torch.cuda.current_device()
    if not 0 <= index < count:
        raise CellClipError(f"device {asked!r} requested but only {count} CUDA device(s) exist")
    return torch.device("cuda", index)


def resolve_device(device=None, *, local_rank: int | None = None):
    """Turn ``"auto" | "cpu" | "cuda[:N]" | "mps"`` (or a torch.device) into a :class:`torch.device`.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU.  A CUDA device always has an index:
    ``"cuda"`` is the current CUDA device, and with ``local_rank`` (one process per GPU under
    torchrun) it is ``cuda:<local_rank mod device count>``.  Asking for a device that is not
    available raises :class:`CellClipError` saying so.
    """
    import torch

    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise CellClipError(f"device must be {DEVICE_HELP}, got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return _cuda(None, local_rank, device)
        return torch.device("mps" if _mps_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CellClipError(
                f"device {device!r} was requested but CUDA is not available in this "
                f"PyTorch build/machine (torch {torch.__version__}); use 'auto' or 'cpu'"
            )
        try:
            index = torch.device(name).index
        except RuntimeError as exc:
            raise CellClipError(f"invalid CUDA device {device!r}: {exc}") from None
        return _cuda(index, local_rank, device)
    if name == "mps":
        if not _mps_available():
            raise CellClipError("device 'mps' was requested but Apple MPS is not available; use 'auto' or 'cpu'")
        return torch.device("mps")
    raise CellClipError(f"unknown device {device!r}; choose {DEVICE_HELP}")


def use_device(device):
    """Make a resolved CUDA ``device`` the process's current one (no-op elsewhere); returns it.

    It changes no global numerics flag: TF32 and cuDNN autotuning are scoped with :func:`cuda_flags`.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def cuda_flags(*, tf32: bool | None = None, benchmark: bool | None = None):
    """Set PyTorch's process-wide TF32 / ``cudnn.benchmark`` flags for a block, restoring them after.

    ``None`` leaves a flag as it is.  The flags are global to the process: a job (or a benchmark
    row) that set them without restoring would run every later computation in TF32, so callers
    scope them with this context instead.
    """
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
            torch.backends.cudnn.allow_tf32 = bool(tf32)
        if benchmark is not None:
            torch.backends.cudnn.benchmark = bool(benchmark)
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def to_device(t, device):
    """Tensor ``t`` on ``device``; a CPU tensor goes to a GPU from pinned memory without blocking the
    host (a pageable copy would wait for the GPU's queued work first)."""
    import torch

    device = torch.device(device) if device is not None else t.device
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def free_device_memory(device) -> None:
    """Hand cached blocks of a CUDA device back to the driver (after a big model is dropped)."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def local_world_size() -> int:
    """Processes sharing this node under torchrun (``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    import os

    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        raise CellClipError(
            f"environment variable LOCAL_WORLD_SIZE={os.environ.get('LOCAL_WORLD_SIZE')!r} is not an integer"
        ) from None


def default_workers(cap: int = 8) -> int:
    """Decoding worker processes for this process: half the node's CPU cores divided among the
    node's torchrun processes, between 1 and ``cap``."""
    import os

    return max(1, min(int(cap), (os.cpu_count() or 2) // 2 // local_world_size()))


def torchrun_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 without it)."""
    import os

    def _int(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise CellClipError(f"environment variable {name}={os.environ.get(name)!r} is not an integer") from None

    world = max(1, _int("WORLD_SIZE", 1))
    rank = _int("RANK", 0)
    local = _int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise CellClipError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    return rank, world, local
