"""Frozen per-channel image encoders.

``get_encoder(spec, device)`` builds one:

- ``"morphology"`` — weight-free classic descriptors of each stain plane (the offline
  default), see :mod:`napari_cellclip.encoders.morphology`;
- ``"cells"`` (optionally ``"cells:cell=AGP,..."``) — segments nuclei and cells and
  profiles each stain with CellProfiler measurements of the cells (cp-measure), see
  :mod:`napari_cellclip.encoders.cells`;
- ``"hf:<hub id or local dir>"`` (optionally ``"hf:<id>@<revision>"``) — any
  transformers vision model, DINOv2 first, see :mod:`napari_cellclip.encoders.hf`;
- ``"<spec>+<spec>"``, e.g. ``"morphology+cells"`` — the parts' features concatenated
  per channel, see :mod:`napari_cellclip.encoders.concat`.

Every encoder maps ``(B, C, H, W)`` float32 in [0, 1] to ``(B, C, D)`` float32.
"""

from __future__ import annotations

from ..errors import CellClipError
from .base import ChannelEncoder, resolve_device

__all__ = ["DEFAULT_ENCODER", "ENCODER_KINDS", "ChannelEncoder", "get_encoder", "resolve_device"]

DEFAULT_ENCODER = "morphology"
ENCODER_KINDS = ("morphology", "cells", "hf")
_USAGE = "'morphology', 'cells', 'hf:<model id or dir>' or a '+' of them (e.g. 'morphology+cells')"


def _is_concat(spec: str) -> bool:
    parts = spec.split("+")
    return len(parts) > 1 and all(p.strip().partition(":")[0].strip().lower() in ENCODER_KINDS for p in parts)


def get_encoder(spec: str = DEFAULT_ENCODER, device="auto", **options) -> ChannelEncoder:
    """Build the frozen channel encoder named by ``spec``.

    ``options`` go to the encoder class (e.g. ``n_crops=9`` for ``hf:`` encoders,
    ``size=256`` for ``morphology``, ``cell="AGP"`` for ``cells``; not allowed for a
    ``+`` of encoders).  A malformed spec or a model that cannot be loaded raises
    :class:`CellClipError` with the reason.
    """
    if isinstance(spec, ChannelEncoder):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise CellClipError(f"image encoder spec must be {_USAGE}, got {spec!r}")
    spec = spec.strip()
    if _is_concat(spec):
        if options:
            raise CellClipError(f"encoder options {sorted(options)} are ambiguous for the concatenated "
                                f"encoder {spec!r}; write them into the parts' specs")
        from .concat import ConcatEncoder

        return ConcatEncoder([get_encoder(p.strip(), device=device) for p in spec.split("+")])
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "morphology" and (not sep or not rest):
        from .morphology import MorphologyEncoder

        return MorphologyEncoder(device=device, **options)
    if kind == "cells":
        from .cells import CellsEncoder, parse_cells_options

        return CellsEncoder(device=device, **{**parse_cells_options(rest), **options})
    if kind == "hf":
        if not rest.strip():
            raise CellClipError(f"image encoder spec {spec!r} names no model; write 'hf:<hub id or local dir>'")
        from .hf import HFEncoder

        return HFEncoder(rest.strip(), device=device, **options)
    raise CellClipError(f"unknown image encoder spec {spec!r}; use {_USAGE} (e.g. 'hf:facebook/dinov2-small')")
