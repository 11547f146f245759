"""The ``cells`` encoder: segment each field, measure every cell, profile per stain.

Per field: nuclei and cells are segmented the CellProfiler way
(:mod:`napari_cellclip.segmentation`), every cell is measured with cp-measure per
compartment and stain, and the field becomes one 200-number profile per stain
channel (:mod:`napari_cellclip.cellfeatures` lists the features in order).  No
weights, no torch in the measurement, deterministic.

It is CPU work (about 2-3 s per 540 x 540 field on one core), so the heavy part is
the module-level, picklable :class:`CellFieldPrep`, which the feature engine runs in
its DataLoader worker processes: ``encoder.field_prep(stains)(raw, ranges)`` takes the
raw ``(C, H, W)`` field and its fixed intensity ranges (plate normalisation; None:
the field's own percentiles) and returns the ``(C, D)`` profile; ``encoder.encode``
then only stacks a batch of profiles ``(B, C, D)``.  ``encode`` also accepts whole
fields ``(B, C, H, W)`` in [0, 1] and measures them in-process.

Which channel is DNA and which one cells are grown on is named, not guessed: the
encoder is built for a stain order (``stains``, default the Cell Painting order
DNA, ER, RNA, AGP, Mito; :meth:`CellsEncoder.with_stains` and ``field_prep(stains)``
take the fields table's order) and a ``nuclei`` / ``cell`` stain (default DNA / RNA,
as the Broad's A549 pipeline grows cells on RNA).

Spec: ``"cells"``, or ``"cells:cell=AGP,min_distance=8"`` with any of ``nuclei``,
``cell`` and the :class:`~napari_cellclip.segmentation.SegmentationParams` fields
(``nucleus_diameter=12-120``).  The spec a checkpoint records names every
non-default setting, so the plugin rebuilds the same encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dc_fields

import numpy as np

from ..errors import CellClipError, warn_at_caller
from ..segmentation import SegmentationParams
from .base import ChannelEncoder

__all__ = ["CellFieldPrep", "CellsEncoder", "field_profile_of", "parse_cells_options"]

DEFAULT_STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")
_ROLE_DEFAULTS = {"nuclei": "DNA", "cell": "RNA"}


def field_profile_of(field: np.ndarray, stains: Sequence[str], *, nuclei_stain: str = "DNA",
                     cell_stain: str = "RNA", params: SegmentationParams | None = None,
                     ranges=None, normalized: bool = False, low: float = 1.0, high: float = 99.9) -> np.ndarray:
    """Segment, measure and profile one field → ``(C, D)`` float32.

    ``field`` is raw (any dtype) unless ``normalized`` (float in [0, 1]); a raw field is
    rescaled by ``ranges`` (C, 2) or, when None, by its own ``low``/``high`` percentiles
    before measuring.  The segmentation always reads the field itself
    (:func:`~napari_cellclip.segmentation.segment_field`).
    """
    from ..cellfeatures import field_profile, measure_field

    field = np.asarray(field)
    if field.ndim != 3 or field.shape[0] != len(stains):
        raise CellClipError(f"a field of {len(stains)} stains {list(stains)} must be (C, H, W), got {field.shape}")
    seg, m = measure_field(field, stains, nuclei_stain=nuclei_stain, cell_stain=cell_stain, params=params,
                           ranges=ranges, normalized=normalized, low=low, high=high)
    return field_profile(m, seg)


@dataclass(frozen=True)
class CellFieldPrep:
    """Picklable per-field preparation of the ``cells`` encoder (runs in worker processes).

    ``prep(raw (C, H, W), ranges (C, 2) or None) -> (C, D)`` float32 profile.
    """

    stains: tuple
    nuclei_stain: str = "DNA"
    cell_stain: str = "RNA"
    params: SegmentationParams = field(default_factory=SegmentationParams)
    low: float = 1.0
    high: float = 99.9

    def __call__(self, raw: np.ndarray, ranges=None) -> np.ndarray:
        return field_profile_of(raw, self.stains, nuclei_stain=self.nuclei_stain, cell_stain=self.cell_stain,
                                params=self.params, ranges=ranges, low=self.low, high=self.high)


def _parse_value(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise CellClipError(f"cells option {key}={text!r}: expected true or false")
    if isinstance(default, tuple):
        parts = text.replace(":", "-").split("-")
        try:
            return tuple(float(p) for p in parts if p.strip())
        except ValueError:
            raise CellClipError(f"cells option {key}={text!r}: expected MIN-MAX") from None
    if isinstance(default, (int, float)):
        try:
            return type(default)(float(text)) if isinstance(default, float) else int(text)
        except ValueError:
            raise CellClipError(f"cells option {key}={text!r}: expected a number") from None
    return text


def parse_cells_options(text: str) -> dict:
    """``"cell=AGP,min_distance=8"`` → keyword options of :class:`CellsEncoder`."""
    defaults = {**_ROLE_DEFAULTS, **asdict(SegmentationParams())}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise CellClipError(f"cells encoder option {item!r} is not KEY=VALUE with KEY one of "
                                f"{', '.join(defaults)}")
        out[key] = _parse_value(key, value.strip(), defaults[key])
    return out


def _format_value(v) -> str:
    if isinstance(v, tuple):
        return "-".join(f"{x:g}" for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).lower() if isinstance(v, bool) else str(v)


class CellsEncoder(ChannelEncoder):
    """Per-stain CellProfiler profiles of the segmented cells of a field; ``dim == 200``.

    Parameters
    ----------
    device : ignored (the measurement runs on the CPU); kept for the encoder interface.
    nuclei, cell : the stain nuclei are found in, and the stain cells are grown on.
    stains : the channel order of the fields ``encode`` receives.
    **params : :class:`~napari_cellclip.segmentation.SegmentationParams` fields.
    """

    autocast = False

    def __init__(self, device="auto", nuclei: str = "DNA", cell: str = "RNA",
                 stains: Sequence[str] = DEFAULT_STAINS, **params):
        from ..cellfeatures import FEATURE_NAMES, VERSION
        from .base import short_hash

        super().__init__("cpu")
        self.nuclei_stain, self.cell_stain = str(nuclei), str(cell)
        defaults = asdict(SegmentationParams())
        params = {k: _parse_value(k, v, defaults[k]) if isinstance(v, str) and k in defaults else v
                  for k, v in params.items()}
        self.params = SegmentationParams().with_options(**params)
        self.stains = tuple(str(s) for s in stains)
        self.feature_names = FEATURE_NAMES
        self.dim = len(FEATURE_NAMES)
        self.spec = self._spec()
        self.identity = (f"{VERSION}|cp-measure={_cp_measure_version()}|nuclei={self.nuclei_stain}|"
                         f"cell={self.cell_stain}|{self.params.describe()}|"
                         f"features={short_hash(','.join(FEATURE_NAMES))}|D={self.dim}")

    def _spec(self) -> str:
        given = {"nuclei": self.nuclei_stain, "cell": self.cell_stain, **asdict(self.params)}
        defaults = {**_ROLE_DEFAULTS, **asdict(SegmentationParams())}
        opts = [f"{k}={_format_value(v)}" for k, v in given.items() if v != defaults[k]]
        return "cells" + (":" + ",".join(opts) if opts else "")

    def with_stains(self, stains: Sequence[str]) -> CellsEncoder:
        """This encoder for fields whose channels are ``stains`` (checks the nucleus and cell stains are there)."""
        self.field_prep(stains)
        if tuple(stains) == self.stains:
            return self
        return CellsEncoder(nuclei=self.nuclei_stain, cell=self.cell_stain, stains=stains,
                            **{f.name: getattr(self.params, f.name) for f in dc_fields(self.params)})

    def field_prep(self, stains: Sequence[str] | None = None, *, low: float = 1.0,
                   high: float = 99.9) -> CellFieldPrep:
        """The picklable worker-side preparation for fields of ``stains`` (default :attr:`stains`; module doc)."""
        from ..segmentation import _stain_index

        stains = tuple(str(s) for s in (self.stains if stains is None else stains))
        _stain_index(stains, self.nuclei_stain, "nucleus")
        _stain_index(stains, self.cell_stain, "cell")
        return CellFieldPrep(stains, self.nuclei_stain, self.cell_stain, self.params, float(low), float(high))

    def encode(self, x):
        """``(B, C, D)`` profiles (from :meth:`field_prep`) → themselves as a float32 tensor;
        ``(B, C, H, W)`` fields in [0, 1] (channels in :attr:`stains` order) → measured here."""
        import torch

        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim == 3 and arr.shape[-1] == self.dim:
            out = arr.astype(np.float32, copy=False)
        elif arr.ndim == 4:
            if arr.shape[1] != len(self.stains):
                raise CellClipError(f"the cells encoder was built for {len(self.stains)} stains {list(self.stains)}, "
                                    f"got fields with {arr.shape[1]} channels; build it with_stains(...)")
            prep = self.field_prep(self.stains)
            out = np.stack([field_profile_of(f, self.stains, nuclei_stain=prep.nuclei_stain,
                                             cell_stain=prep.cell_stain, params=prep.params, normalized=True)
                            for f in arr]) if len(arr) else np.zeros((0, arr.shape[1], self.dim), np.float32)
        else:
            raise CellClipError(f"the cells encoder takes fields (B, C, H, W) or profiles (B, C, {self.dim}), "
                                f"got shape {arr.shape}")
        self._report_empty(out)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    @staticmethod
    def _report_empty(profiles: np.ndarray) -> None:
        from ..cellfeatures import profile_cell_counts

        if len(profiles) == 0:
            return
        empty = int(np.sum(profile_cell_counts(profiles) == 0))
        if empty:
            warn_at_caller(f"{empty} of {len(profiles)} field(s) have no segmented cell; their cells profile is "
                           "the defined empty vector (zeros, field.Empty = 1)")


def _cp_measure_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cp-measure")
    except PackageNotFoundError:  # pragma: no cover - a source checkout of cp_measure
        return "unknown"
