"""The one device resolver: ``"auto" | "cpu" | "cuda[:N]" | "mps"`` → a concrete :class:`torch.device`.

Every caller (the plugin's embedding, the embedding job, training, evaluation, the encoders)
goes through :func:`resolve_device`.  A CUDA device always comes back with an index
(``cuda`` alone means the current CUDA device, or ``cuda:LOCAL_RANK`` in a torchrun process),
so ``torch.cuda.set_device`` and per-device caches see one name per GPU.
"""

from __future__ import annotations

from .errors import CellClipError

__all__ = ["DEVICE_CHOICES", "DEVICE_HELP", "resolve_device", "torchrun_env", "use_device"]

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


def use_device(device, *, tf32: bool = False):
    """Make a resolved CUDA ``device`` the process's current one (no-op elsewhere); returns it.

    ``tf32=True`` also lets fp32 matmuls and convolutions use TF32 and cuDNN pick its fastest
    kernels (the embedding job: frozen encoders under inference).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
    return device


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
