"""Per-cell CellProfiler measurements (cp-measure) and their per-field profile.

:func:`measure_cells` measures every segmented cell of one field
(:mod:`napari_cellclip.segmentation`) with cp-measure, CellProfiler's measurements
outside CellProfiler; :func:`field_profile` aggregates them into one vector per
stain channel, ``(C, D)`` with ``D = len(FEATURE_NAMES) == 200``, the input of the
``cells`` encoder; :func:`cell_table` / :func:`export_cell_table` write the
per-cell measurements themselves (one row per cell, ``Metadata_*`` columns first).

Per cell, for **each stain** (76 numbers; compartments Nuclei, Cells, Cytoplasm):

======================  ==  ====================================================
block                   n   what (cp-measure function, settings)
======================  ==  ====================================================
Intensity               27  Mean, Std, Median, MAD, Lower/UpperQuartile, Max,
                            Integrated intensity and MassDisplacement, per
                            compartment (``get_intensity``)
Texture                 39  the 13 Haralick features at scale 3 px, 256 grey
                            levels, averaged over the 4 directions, per
                            compartment (``get_texture``, numba backend)
Granularity             8   spectrum 1-8 of the cell (``get_granularity``,
                            subsampling 0.25, structuring element 10)
Correlation             2   Pearson correlation of the stain with the nucleus
                            stain and with the cell stain, in the cell (1 for
                            the stain with itself)
======================  ==  ====================================================

Shape, which belongs to no stain (20 numbers): Area, Perimeter, Major/MinorAxisLength,
Eccentricity, FormFactor, Solidity, Extent and MeanRadius of the nucleus and of the
cell (``get_sizeshape``), the cytoplasm's area and the nucleus's share of its cell.

The field profile of a stain is the median and the MAD over the field's cells of its
76 stain features and of the 20 shape features, then 8 field-level numbers: the cell
count, the cells' and nuclei's share of the field, the median distance from a nucleus
to its nearest neighbour, the share of cells touching another cell, the mean number
of touching neighbours, the count of nuclei found before the size/edge filters, and
an "empty field" flag.  Shape and field-level numbers are the same in every
channel's vector: each channel token then carries the cell context it was measured
in (how many cells, how big), as a CellProfiler per-object row does, and D stays the
same for every channel.  Every value goes through ``asinh`` (linear near 0,
logarithmic for areas and texture sums), so all features are O(0.1-10).

A field with no cell gets a defined vector: zeros, with the empty flag set and the
count 0 (:func:`profile_cell_counts` reads the counts back).  Features cp-measure
leaves undefined for a cell (texture of a cell too small for the scale, correlation
of a flat cell) are NaN per cell and left out of the median; a feature undefined for
every cell of a field is 0.  No NaN leaves this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import CellClipError
from .segmentation import Segmentation

__all__ = ["CHANNEL_FEATURES", "FEATURE_NAMES", "FIELD_FEATURES", "SHAPE_FEATURES", "VERSION", "measure_field",
           "CellMeasurements", "field_profile", "measure_cells", "profile_cell_counts"]

#: bumped whenever a feature's definition or order changes (part of the encoder identity)
VERSION = "cells-v1"
COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
INTENSITY = ("MeanIntensity", "StdIntensity", "MedianIntensity", "MADIntensity", "LowerQuartileIntensity",
             "UpperQuartileIntensity", "MaxIntensity", "IntegratedIntensity", "MassDisplacement")
HARALICK = ("AngularSecondMoment", "Contrast", "Correlation", "Variance", "InverseDifferenceMoment",
            "SumAverage", "SumVariance", "SumEntropy", "Entropy", "DifferenceVariance",
            "DifferenceEntropy", "InfoMeas1", "InfoMeas2")
TEXTURE_SCALE = 3
GRANULARITY = 8
SHAPE = ("Area", "Perimeter", "MajorAxisLength", "MinorAxisLength", "Eccentricity", "FormFactor",
         "Solidity", "Extent", "MeanRadius")

CHANNEL_FEATURES: tuple[str, ...] = tuple(
    [f"{c}_Intensity_{f}" for c in COMPARTMENTS for f in INTENSITY]
    + [f"{c}_Texture_{f}_{TEXTURE_SCALE}" for c in COMPARTMENTS for f in HARALICK]
    + [f"Cells_Granularity_{i}" for i in range(1, GRANULARITY + 1)]
    + ["Cells_Correlation_Pearson_NucleusStain", "Cells_Correlation_Pearson_CellStain"]
)
SHAPE_FEATURES: tuple[str, ...] = tuple(
    [f"{c}_AreaShape_{f}" for c in ("Nuclei", "Cells") for f in SHAPE]
    + ["Cytoplasm_AreaShape_Area", "Nuclei_AreaShape_CellAreaFraction"]
)
FIELD_FEATURES: tuple[str, ...] = (
    "Count_Cells", "AreaFraction_Cells", "AreaFraction_Nuclei", "NearestNeighbourDistance_Nuclei",
    "FractionTouching_Cells", "MeanTouchingNeighbours_Cells", "Count_NucleiFound", "Empty",
)
FEATURE_NAMES: tuple[str, ...] = tuple(
    [f"median.{n}" for n in CHANNEL_FEATURES] + [f"mad.{n}" for n in CHANNEL_FEATURES]
    + [f"median.{n}" for n in SHAPE_FEATURES] + [f"mad.{n}" for n in SHAPE_FEATURES]
    + [f"field.{n}" for n in FIELD_FEATURES]
)
_COUNT_INDEX = FEATURE_NAMES.index("field.Count_Cells")


@dataclass
class CellMeasurements:
    """Per-cell measurements of one field: ``channel`` (N, C, 76), ``shape`` (N, 20),
    ``centers`` (N, 2) nucleus centres (x, y) in pixels; row i is label i + 1."""

    channel: np.ndarray
    shape: np.ndarray
    centers: np.ndarray
    stains: tuple

    @property
    def n(self) -> int:
        return int(self.shape.shape[0])


# ------------------------------------------------------------------- cp-measure calls
def _texture_fn():
    """cp-measure's numba Haralick kernel (same values as its mahotas one, ~50x faster), else mahotas."""
    try:
        from cp_measure.core.numba.measuretexture import get_texture
    except ImportError:  # pragma: no cover - numba comes with umap-learn
        from cp_measure.core.measuretexture import get_texture
    return get_texture


def _intensity(labels: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    from cp_measure.core.measureobjectintensity import get_intensity

    r = get_intensity(labels, pixels, edge_measurements=False)
    return np.stack([np.asarray(r[f"Intensity_{f}"], dtype=np.float64) for f in INTENSITY], 1)


def _texture(labels: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    r = _texture_fn()(labels, pixels, TEXTURE_SCALE, 256)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN directions of a tiny cell
        for f in HARALICK:
            dirs = [np.asarray(v, dtype=np.float64) for k, v in r.items() if k.startswith(f"{f}_{TEXTURE_SCALE}_")]
            out.append(np.nanmean(np.stack(dirs), 0))
    return np.stack(out, 1)


def _granularity(labels: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    from cp_measure.core.measuregranularity import get_granularity

    r = get_granularity(labels, pixels, 0.25, 0.25, 10, GRANULARITY)
    return np.stack([np.asarray(r[f"Granularity_{i}"], dtype=np.float64) for i in range(1, GRANULARITY + 1)], 1)


def _pearson(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from cp_measure.core.measurecolocalization import get_correlation_pearson

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(get_correlation_pearson(a, b, labels)["Correlation_Pearson"], dtype=np.float64)


def _shape(labels: np.ndarray) -> np.ndarray:
    from cp_measure.core.measureobjectsizeshape import get_sizeshape

    r = get_sizeshape(labels, None, calculate_advanced=False, new_features=False)
    return np.stack([np.asarray(r[f], dtype=np.float64) for f in SHAPE], 1)


# --------------------------------------------------------------------------- per cell
def _check_labels(seg: Segmentation) -> int:
    n = seg.n
    for name in ("cells", "cytoplasm"):
        lab = getattr(seg, name)
        if int(lab.max(initial=0)) != n or (n and np.count_nonzero(np.bincount(lab.ravel(), minlength=n + 1)[1:]) != n):
            raise CellClipError(f"segmentation {name} do not match the nuclei 1..{n} one to one")
    return n


def _stain_features(field: np.ndarray, c: int, seg: Segmentation, anchors: tuple[int, int]) -> np.ndarray:
    px = field[c]
    blocks = [_intensity(getattr(seg, k.lower()), px) for k in COMPARTMENTS]
    blocks += [_texture(getattr(seg, k.lower()), px) for k in COMPARTMENTS]
    blocks.append(_granularity(seg.cells, px))
    corr = [np.ones(seg.n) if a == c else _pearson(px, field[a], seg.cells) for a in anchors]
    blocks.append(np.stack(corr, 1))
    return np.concatenate(blocks, 1)


def measure_cells(field: np.ndarray, seg: Segmentation, stains: Sequence[str], *, nuclei_stain: str = "DNA",
                  cell_stain: str = "RNA") -> CellMeasurements:
    """Per-cell measurements of ``field`` (C, H, W) float in [0, 1] on the masks ``seg``."""
    from scipy import ndimage as ndi

    from .segmentation import _stain_index

    field = np.asarray(field)
    if field.ndim != 3 or field.shape[0] != len(stains) or field.shape[1:] != seg.nuclei.shape:
        raise CellClipError(f"measure_cells expects a ({len(stains)}, {seg.nuclei.shape[0]}, "
                            f"{seg.nuclei.shape[1]}) field, got {field.shape}")
    field = np.clip(np.nan_to_num(field.astype(np.float64, copy=False), nan=0.0), 0.0, 1.0)
    n = _check_labels(seg)
    c = len(stains)
    if n == 0:
        return CellMeasurements(np.zeros((0, c, len(CHANNEL_FEATURES))), np.zeros((0, len(SHAPE_FEATURES))),
                                np.zeros((0, 2)), tuple(stains))
    anchors = (_stain_index(stains, nuclei_stain, "nucleus"), _stain_index(stains, cell_stain, "cell"))
    channel = np.stack([_stain_features(field, i, seg, anchors) for i in range(c)], 1)
    nuc, cel = _shape(seg.nuclei), _shape(seg.cells)
    cyto_area = np.bincount(seg.cytoplasm.ravel(), minlength=n + 1)[1:].astype(np.float64)
    shape = np.concatenate([nuc, cel, cyto_area[:, None], (nuc[:, 0] / np.maximum(cel[:, 0], 1))[:, None]], 1)
    cy_cx = np.asarray(ndi.center_of_mass(np.ones_like(seg.nuclei), seg.nuclei, np.arange(1, n + 1)))
    return CellMeasurements(channel, shape, cy_cx[:, ::-1].copy(), tuple(stains))


def measure_field(field: np.ndarray, stains: Sequence[str], *, nuclei_stain: str = "DNA", cell_stain: str = "RNA",
                  params=None, ranges=None, normalized: bool = False, low: float = 1.0, high: float = 99.9
                  ) -> tuple[Segmentation, CellMeasurements]:
    """Segment a field (C, H, W) and measure its cells → (masks, measurements).

    ``field`` is raw (any dtype) unless ``normalized`` (float in [0, 1]); a raw field is rescaled by
    ``ranges`` (C, 2) or, when None, by its own ``low``/``high`` percentiles before measuring.  The
    segmentation always reads the field itself (:func:`~napari_cellclip.segmentation.segment_field`,
    ``params`` a :class:`~napari_cellclip.segmentation.SegmentationParams`).
    """
    from .images import normalize, normalize_range
    from .segmentation import segment_field

    field = np.asarray(field)
    seg = segment_field(field, stains, nuclei_stain=nuclei_stain, cell_stain=cell_stain, params=params)
    if normalized:
        unit = np.asarray(field, dtype=np.float32)
    else:
        finite = np.where(np.isfinite(field), field, 0) if field.dtype.kind == "f" else field
        unit = normalize(finite, low, high) if ranges is None else normalize_range(finite, ranges)
    return seg, measure_cells(unit, seg, stains, nuclei_stain=nuclei_stain, cell_stain=cell_stain)


# --------------------------------------------------------------------------- per field
def _median_mad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nan-median and MAD over axis 0; a column with no finite value → 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(x, axis=0)
        mad = np.nanmedian(np.abs(x - med), axis=0)
    return np.nan_to_num(med), np.nan_to_num(mad)


def _touching(cells: np.ndarray, n: int) -> np.ndarray:
    """Number of other cells each cell touches (4-connectivity)."""
    pairs = []
    for a, b in ((cells[:, :-1], cells[:, 1:]), (cells[:-1, :], cells[1:, :])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([a[m], b[m]], 1))
    p = np.concatenate(pairs)
    p = np.unique(np.sort(p, axis=1), axis=0) if len(p) else p
    return np.bincount(p.ravel(), minlength=n + 1)[1:] if len(p) else np.zeros(n)


def _field_level(m: CellMeasurements, seg: Segmentation) -> np.ndarray:
    from scipy.spatial import cKDTree

    n, area = m.n, float(seg.nuclei.size)
    nn = 0.0
    if n >= 2:
        d, _ = cKDTree(m.centers).query(m.centers, k=2)
        nn = float(np.median(d[:, 1]))
    neigh = _touching(seg.cells, n) if n else np.zeros(0)
    return np.array([
        n, np.count_nonzero(seg.cells) / area, np.count_nonzero(seg.nuclei) / area, nn,
        float(np.mean(neigh > 0)) if n else 0.0, float(np.mean(neigh)) if n else 0.0,
        float(seg.extra.get("n_found", n)), float(n == 0),
    ], dtype=np.float64)


def field_profile(m: CellMeasurements, seg: Segmentation) -> np.ndarray:
    """The ``(C, D)`` float32 profile of one field (module doc); finite by construction."""
    c = len(m.stains)
    shape_med, shape_mad = _median_mad(m.shape) if m.n else (np.zeros(len(SHAPE_FEATURES)),) * 2
    common = np.concatenate([shape_med, shape_mad, _field_level(m, seg)])
    out = np.empty((c, len(FEATURE_NAMES)), dtype=np.float64)
    for i in range(c):
        med, mad = _median_mad(m.channel[:, i]) if m.n else (np.zeros(len(CHANNEL_FEATURES)),) * 2
        out[i] = np.concatenate([med, mad, common])
    out = np.arcsinh(out)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def profile_cell_counts(profiles: np.ndarray) -> np.ndarray:
    """Cell counts of fields from their profiles ``(..., C, D)`` → int array ``(...)``."""
    p = np.asarray(profiles)
    return np.rint(np.sinh(p[..., 0, _COUNT_INDEX])).astype(np.int64)
