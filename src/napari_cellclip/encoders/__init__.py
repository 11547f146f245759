"""Frozen per-channel image encoders.

``get_encoder(spec, device)`` builds one:

- ``"morphology"`` — weight-free classic descriptors (the offline default), see
  :mod:`napari_cellclip.encoders.morphology`;
- ``"hf:<hub id or local dir>"`` (optionally ``"hf:<id>@<revision>"``) — any
  transformers vision model, DINOv2 first, see :mod:`napari_cellclip.encoders.hf`.

Every encoder maps ``(B, C, H, W)`` float32 in [0, 1] to ``(B, C, D)`` float32.
"""

from __future__ import annotations

from ..errors import CellClipError
from .base import ChannelEncoder, resolve_device

__all__ = ["ChannelEncoder", "DEFAULT_ENCODER", "get_encoder", "resolve_device"]

DEFAULT_ENCODER = "morphology"


def get_encoder(spec: str = DEFAULT_ENCODER, device="auto", **options) -> ChannelEncoder:
    """Build the frozen channel encoder named by ``spec``.

    ``options`` go to the encoder class (e.g. ``n_crops=9`` for ``hf:`` encoders,
    ``size=256`` for ``morphology``).  A malformed spec or a model that cannot be
    loaded raises :class:`CellClipError` with the reason.
    """
    if isinstance(spec, ChannelEncoder):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise CellClipError(f"image encoder spec must be 'morphology' or 'hf:<model id or dir>', got {spec!r}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "morphology" and (not sep or not rest):
        from .morphology import MorphologyEncoder

        return MorphologyEncoder(device=device, **options)
    if kind == "hf":
        if not rest.strip():
            raise CellClipError(f"image encoder spec {spec!r} names no model; write 'hf:<hub id or local dir>'")
        from .hf import HFEncoder

        return HFEncoder(rest.strip(), device=device, **options)
    raise CellClipError(
        f"unknown image encoder spec {spec!r}; use 'morphology' or 'hf:<hub id or local dir>' "
        "(e.g. 'hf:facebook/dinov2-small')"
    )
