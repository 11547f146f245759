"""Common machinery of the frozen per-channel encoders.

A :class:`ChannelEncoder` turns a batch of fields ``(B, C, H, W)`` (float32 in
[0, 1], one plane per stain) into per-channel feature vectors ``(B, C, D)``:
every stain plane is encoded *on its own* as a grayscale image, and all ``B*C``
planes of a batch go through the encoder in one batched forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from ..errors import CellClipError

_DEVICE_CHOICES = "'auto', 'cpu', 'cuda' (or 'cuda:N') or 'mps'"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cuda[:N]" | "mps" | "cpu"`` into a :class:`torch.device`.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU.  Asking for a device
    that is not available raises :class:`CellClipError` saying so.
    """
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise CellClipError(f"device must be a string ({_DEVICE_CHOICES}), got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CellClipError(
                f"device {device!r} was requested but CUDA is not available in this "
                f"PyTorch build/machine (torch {torch.__version__}); use 'auto' or 'cpu'"
            )
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise CellClipError(f"invalid CUDA device {device!r}: {exc}") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CellClipError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CellClipError("device 'mps' was requested but Apple MPS is not available; use 'auto' or 'cpu'")
        return torch.device("mps")
    raise CellClipError(f"unknown device {device!r}; choose {_DEVICE_CHOICES}")


def short_hash(text: str, n: int = 16) -> str:
    """A short stable hex digest of ``text`` (blake2b)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=max(4, n // 2)).hexdigest()[:n]


class ChannelEncoder:
    """Frozen encoder of single stain planes.

    Attributes
    ----------
    spec : str
        The spec it was built from (``"morphology"``, ``"hf:<id or dir>"``).
    dim : int
        Length ``D`` of one channel's feature vector.
    identity : str
        Stable string naming the spec, the weights and every setting that
        changes the features (crop count, normalisation, version); used as the
        feature-cache key.
    device : torch.device
        Where the forward pass runs.

    Subclasses implement :meth:`_encode_planes` ``(N, 1, H, W) -> (N, D)`` on
    ``self.device``.
    """

    spec: str = ""
    dim: int = 0
    identity: str = ""
    #: run the forward under bf16/fp16 autocast on CUDA
    autocast: bool = False

    def __init__(self, device: str | torch.device | None = "auto"):
        self.device = resolve_device(device)

    # -- to implement -----------------------------------------------------
    def _encode_planes(self, planes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public -----------------------------------------------------------
    @property
    def identity_hash(self) -> str:
        """16 hex digits of :attr:`identity` (used as a folder name in the cache)."""
        return short_hash(self.identity, 16)

    def _autocast_context(self):
        if self.autocast and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast(device_type="cuda", dtype=dtype)
        return contextlib.nullcontext()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode fields ``(B, C, H, W)`` float in [0, 1] → ``(B, C, D)`` float32 on the CPU."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.ndim == 3:  # a single field
            return self.encode(x[None])[0]
        if x.ndim != 4:
            raise CellClipError(f"encode expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if b * c == 0:
            return torch.zeros((b, c, self.dim), dtype=torch.float32)
        planes = x.reshape(b * c, 1, h, w).to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.inference_mode(), self._autocast_context():
            out = self._encode_planes(planes)
        return out.float().reshape(b, c, -1).cpu()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={str(self.device)!r})"
