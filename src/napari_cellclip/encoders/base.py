"""Common machinery of the frozen per-channel encoders.

An encoder works in two steps:

1. ``encoder.field_prep(stains)`` gives a picklable :class:`FieldPrep`, run on each
   field in the DataLoader worker processes: ``prep(raw (C, H, W), ranges (C, 2) or None)``
   rescales each channel to [0, 1] (by the field's own percentiles, or by the fixed
   ``ranges`` of plate normalisation) over only the region the encoder will look at, and
   gives it the shape the encoder wants (e.g. the crop grid's span, or the working size);
2. ``encoder.encode(batch)`` on the device: a :class:`ChannelEncoder` turns ``(B, C, h, w)``
   into per-channel feature vectors ``(B, C, D)``; every stain plane is encoded *on its
   own* as a grayscale image, and all ``B*C`` planes go through one batched forward pass.

``encode`` also accepts whole normalised fields (it crops or resamples them itself), so
``encode(prep(raw))`` and ``encode(normalize(raw))`` give the same features.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import cuda_flags, resolve_device
from ..errors import CellClipError

@dataclass(frozen=True)
class FieldPrep:
    """Picklable preparation of one field for an encoder (see the module doc).

    This base rescales the whole field and keeps its shape; encoders that look at part of a
    field (:meth:`region`) or at a resampled one (:meth:`shape`) subclass it.
    """

    low: float = 1.0
    high: float = 99.9

    def region(self, h: int, w: int) -> tuple[slice, slice]:
        """The part of an ``h × w`` field the encoder looks at."""
        return slice(0, h), slice(0, w)

    def shape(self, x: np.ndarray) -> np.ndarray:
        """The rescaled region → what ``encode`` takes."""
        return x

    def __call__(self, raw: np.ndarray, ranges: np.ndarray | None = None) -> np.ndarray:
        """``raw`` (C, H, W) → float32 in [0, 1]; ``ranges``: fixed (C, 2) (lo, hi) per channel (plate
        normalisation), None: the field's own ``low``/``high`` percentiles (over the whole field)."""
        from ..images import channel_ranges, normalize_range

        if ranges is None:
            ranges = channel_ranges(raw, self.low, self.high)
        ys, xs = self.region(*raw.shape[-2:])
        return np.ascontiguousarray(self.shape(normalize_range(raw[:, ys, xs], ranges)), dtype=np.float32)


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
        Stable string naming the spec, the weights, every setting that
        changes the features (crop count, normalisation, version) and the
        numeric :attr:`precision` of the forward; used as the feature-cache key
        (bf16 GPU features differ from fp32 CPU ones by ~0.5 %: they never share entries).
    device : torch.device
        Where the forward pass runs.

    Subclasses implement :meth:`_encode_planes` ``(N, 1, H, W) -> (N, D)`` on
    ``self.device``.
    """

    spec: str = ""
    dim: int = 0
    _identity: str = ""
    #: run the forward under bf16/fp16 autocast on CUDA
    autocast: bool = False

    def __init__(self, device: str | torch.device | None = "auto"):
        self.device = resolve_device(device)
        self.precision = self._pick_precision()

    def _pick_precision(self) -> str:
        """``"bf16"`` / ``"fp16"`` (autocast on CUDA, bf16 where supported), else ``"fp32"`` (TF32 off)."""
        if self.autocast and self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"

    @property
    def identity(self) -> str:
        """What the subclass names (spec, weights, settings) plus ``|precision=<fp32|bf16|fp16>``."""
        return f"{self._identity}|precision={getattr(self, 'precision', 'fp32')}"

    @identity.setter
    def identity(self, value: str) -> None:
        self._identity = str(value)

    # -- to implement -----------------------------------------------------
    def _encode_planes(self, planes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public -----------------------------------------------------------
    def field_prep(self, stains=None, *, low: float = 1.0, high: float = 99.9) -> FieldPrep:
        """The picklable per-field preparation for this encoder, run in DataLoader workers."""
        return FieldPrep(low, high)

    @property
    def identity_hash(self) -> str:
        """16 hex digits of :attr:`identity` (used as a folder name in the cache)."""
        return short_hash(self.identity, 16)

    def _autocast_context(self):
        """The forward's numerics, as :attr:`precision` says: autocast in bf16/fp16, or exact fp32
        (TF32 off for the block, whatever a caller set process-wide, so fp32 features are fp32)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        if self.device.type == "cuda":
            return cuda_flags(tf32=False)
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
