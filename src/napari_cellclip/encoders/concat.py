"""Several frozen encoders side by side: ``"morphology+cells"``.

Each channel's feature vector is the concatenation of the parts' vectors for that
channel, in the order of the spec: ``(B, C, D1 + D2 + ...)``.  The identity names
every part's identity, so a cache entry or checkpoint knows all of them.  The feature
engine (:func:`napari_cellclip.features.iter_features`) takes each part through its road
on its own (and caches it under the part's identity), so the costly ``cells`` part is
measured once for ``cells`` and ``morphology+cells`` alike.

The encoder interface holds as for any encoder: ``field_prep(stains)`` runs every
part's preparation and packs the results into one flat float32 vector per field: a
header ``[n_parts, ndim_1, *shape_1, ndim_2, *shape_2, ...]`` followed by the parts'
arrays, raveled.  Fields of one size pack to one length, so a batch stacks to
``(B, L)``, and :meth:`ConcatEncoder.encode` unpacks it and hands each part its own
prepared batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CellClipError
from .base import ChannelEncoder

__all__ = ["ConcatEncoder", "ConcatFieldPrep"]


@dataclass(frozen=True)
class ConcatFieldPrep:
    """Picklable prep running each part's prep and packing the results (module doc)."""

    parts: tuple

    def __call__(self, raw: np.ndarray, ranges=None) -> np.ndarray:
        arrays = [np.asarray(p(raw, ranges), dtype=np.float32) for p in self.parts]
        header = [float(len(arrays))]
        for a in arrays:
            header += [float(a.ndim), *map(float, a.shape)]
        return np.concatenate([np.asarray(header, np.float32)] + [a.ravel() for a in arrays])


def unpack(batch: np.ndarray) -> list[np.ndarray]:
    """``(B, L)`` packed fields → one ``(B, *shape)`` array per part."""
    head = batch[0]
    n, pos, shapes = int(head[0]), 1, []
    for _ in range(n):
        nd = int(head[pos])
        shapes.append(tuple(int(v) for v in head[pos + 1:pos + 1 + nd]))
        pos += 1 + nd
    out = []
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(batch[:, pos:pos + size].reshape((len(batch),) + shape))
        pos += size
    if pos != batch.shape[1]:
        raise CellClipError(f"packed fields of length {batch.shape[1]} do not match their header ({pos})")
    return out


class ConcatEncoder(ChannelEncoder):
    """Per-channel concatenation of several encoders' features (``"morphology+cells"``)."""

    def __init__(self, parts: Sequence[ChannelEncoder]):
        parts = list(parts)
        if len(parts) < 2:
            raise CellClipError("a concatenated encoder needs at least two parts")
        self.parts = parts
        self.device = parts[0].device
        self.spec = "+".join(p.spec for p in parts)
        self.dim = int(sum(p.dim for p in parts))
        self.identity = "concat(" + ";".join(p.identity for p in parts) + f")|D={self.dim}"
        names = [getattr(p, "feature_names", None) for p in parts]
        if all(n is not None for n in names):
            self.feature_names = tuple(f"{p.spec}.{n}" for p, ns in zip(parts, names) for n in ns)

    def with_stains(self, stains: Sequence[str]) -> ConcatEncoder:
        """The parts that need the stain order (``cells``) get it."""
        parts = [p.with_stains(stains) if hasattr(p, "with_stains") else p for p in self.parts]
        return self if all(a is b for a, b in zip(parts, self.parts)) else ConcatEncoder(parts)

    def field_prep(self, stains=None, *, low: float = 1.0, high: float = 99.9) -> ConcatFieldPrep:
        """Every part's preparation, packed (module doc)."""
        return ConcatFieldPrep(tuple(p.field_prep(stains, low=low, high=high) for p in self.parts))

    def encode(self, x):
        """Fields ``(B, C, H, W)`` in [0, 1], or packed prepared fields ``(B, L)`` → ``(B, C, sum D)``."""
        import torch

        if np.ndim(x) == 2:
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
            outs = [p.encode(torch.from_numpy(np.ascontiguousarray(a))) for p, a in zip(self.parts, unpack(arr))]
        else:
            outs = [p.encode(x) for p in self.parts]
        return torch.cat([o.float().cpu() for o in outs], dim=-1)
