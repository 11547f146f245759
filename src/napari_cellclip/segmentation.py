"""Classical nucleus and cell segmentation (CellProfiler's recipe, scikit-image, no weights).

The steps follow CellProfiler's IdentifyPrimaryObjects / IdentifySecondaryObjects /
IdentifyTertiaryObjects as the Broad's A549 Cell Painting pipelines configure them
(``imaging-platform-pipelines/cellpainting_a549_20x_phenix_bin1``):

1. **Nuclei** on the DNA stain: Gaussian-smoothed image, one global threshold per field
   (Otsu, or minimum cross-entropy = Li), holes filled; touching nuclei split by a
   seeded watershed whose seeds are the maxima of the smoothed distance transform
   (``declump="shape"``) or of the smoothed intensity (``declump="intensity"``);
   objects outside the diameter range dropped; nuclei cut by the field's edge
   dropped (``discard_border``, as CellProfiler does).
2. **Cells** by a seeded, compact watershed from the nuclei on the Sobel edges of
   the cell stain (CellProfiler's "Watershed - Image" with a distance term, as its
   "Propagation" regularises; RNA in the Broad pipeline, AGP also works), bounded by
   a threshold on that stain (three-class Otsu, middle class to the foreground, by
   default), holes filled.  Every cell carries its nucleus's label.
3. **Cytoplasm** = cell minus its nucleus shrunk by one pixel (CellProfiler's
   "shrink smaller object prior to subtraction"), so every cell has a cytoplasm.

Segmentation reads the raw field and rescales each channel it uses by that field's
own 1st-99.9th percentiles, so the masks do not depend on how the encoder
normalises intensities (field or plate ranges): what is shown in napari is what was
measured.  Non-finite pixels are replaced by the channel's finite minimum.  A field
whose DNA stain has no object standing out of its background (``min_contrast``, in
units of the background's robust noise) gets no nuclei instead of segmented noise.
Deterministic: no random state anywhere.

Pixel sizes are those of 20x Cell Painting (about 0.65 µm per pixel, LINCS and
JUMP); other magnifications need other diameters and distances
(:class:`SegmentationParams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import CellClipError

__all__ = ["THRESHOLD_METHODS", "Segmentation", "SegmentationParams", "centre_agreement", "cytoplasm_of",
           "segment_cells", "segment_field", "segment_nuclei"]

#: global threshold methods: ``otsu`` (two classes), ``otsu3`` (three classes, the
#: middle class to the foreground) and ``li`` (minimum cross-entropy)
THRESHOLD_METHODS = ("otsu", "otsu3", "li")
_DECLUMP = ("shape", "intensity")


@dataclass(frozen=True)
class SegmentationParams:
    """Settings of :func:`segment_field` (pixel units of the field as read).

    nucleus_diameter : (min, max) equivalent diameters of a nucleus kept, px.
    smoothing : Gaussian sigma applied before thresholding the DNA stain, px.
    threshold : nucleus threshold method (:data:`THRESHOLD_METHODS`).
    threshold_correction : factor applied to the nucleus threshold.
    declump : ``"shape"`` (distance-transform seeds) or ``"intensity"`` (brightness seeds).
    declump_smoothing : Gaussian sigma applied to the seed landscape, px.
    min_distance : smallest distance between two nucleus seeds, px.
    min_contrast : nuclei must stand this many robust noise sigmas above the
        background, or the field has no nuclei.
    discard_border : drop nuclei (and their cells) touching the field's edge.
    cell_threshold : threshold method on the cell stain.
    cell_smoothing : Gaussian sigma applied to the cell stain, px.
    cell_compactness : weight of the distance to the nucleus against the stain's edges
        when cells are grown (scikit-image's compact watershed; the role of the
        regularisation factor of CellProfiler's Propagation).  0 floods by edges
        alone, and a nucleus whose rim is a little darker then takes the whole
        cytoplasm of a clump; 0.01 splits clumps along the edges between the nuclei.
    """

    nucleus_diameter: tuple[float, float] = (12.0, 120.0)
    smoothing: float = 1.0
    threshold: str = "otsu"
    threshold_correction: float = 1.0
    declump: str = "shape"
    declump_smoothing: float = 2.5
    min_distance: int = 6
    min_contrast: float = 6.0
    discard_border: bool = True
    cell_threshold: str = "otsu3"
    cell_smoothing: float = 1.0
    cell_compactness: float = 0.01

    def __post_init__(self):
        lo, hi = (float(v) for v in self.nucleus_diameter)
        object.__setattr__(self, "nucleus_diameter", (lo, hi))
        if not 0 < lo < hi:
            raise CellClipError(f"nucleus_diameter must be (min, max) with 0 < min < max px, got {(lo, hi)}")
        for name in ("threshold", "cell_threshold"):
            if getattr(self, name) not in THRESHOLD_METHODS:
                raise CellClipError(f"{name} must be one of {', '.join(THRESHOLD_METHODS)}, "
                                    f"got {getattr(self, name)!r}")
        if self.declump not in _DECLUMP:
            raise CellClipError(f"declump must be 'shape' or 'intensity', got {self.declump!r}")
        if int(self.min_distance) < 1:
            raise CellClipError(f"min_distance must be at least 1 px, got {self.min_distance}")
        for name in ("smoothing", "declump_smoothing", "cell_smoothing", "min_contrast", "cell_compactness"):
            if not float(getattr(self, name)) >= 0:
                raise CellClipError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not float(self.threshold_correction) > 0:
            raise CellClipError(f"threshold_correction must be > 0, got {self.threshold_correction}")

    def describe(self) -> str:
        """Stable ``key=value`` text of every setting (part of an encoder's identity)."""
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())

    def with_options(self, **options) -> SegmentationParams:
        unknown = set(options) - set(asdict(self))
        if unknown:
            raise CellClipError(f"unknown segmentation option(s) {sorted(unknown)}; "
                                f"known: {', '.join(asdict(self))}")
        return replace(self, **options)


@dataclass
class Segmentation:
    """Label images of one field (int32, 0 = background; label i is the same cell in all three).

    ``n`` objects; ``nuclei_threshold`` / ``cell_threshold`` on the field-normalised
    stains (NaN when not computed); ``note`` says why a field has no objects.
    """

    nuclei: np.ndarray
    cells: np.ndarray
    cytoplasm: np.ndarray
    nuclei_threshold: float = float("nan")
    cell_threshold: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.nuclei.max(initial=0))


# --------------------------------------------------------------------------- helpers
def _finite_unit(plane: np.ndarray) -> np.ndarray:
    """One channel as float32 in [0, 1] by its own 1st-99.9th percentiles; non-finite → the finite minimum."""
    from .images import normalize

    x = np.asarray(plane, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        good = x[~bad]
        x = np.where(bad, good.min() if good.size else 0.0, x).astype(np.float32)
    return normalize(x)


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(img, float(sigma), mode="nearest") if sigma > 0 else img


def _global_threshold(img: np.ndarray, method: str) -> float:
    """One threshold for the whole image; NaN for a flat image."""
    from skimage import filters

    if not np.isfinite(img).all() or float(img.max()) - float(img.min()) <= 1e-6:
        return float("nan")
    if method == "otsu":
        return float(filters.threshold_otsu(img))
    if method == "li":
        return float(filters.threshold_li(img))
    try:
        return float(filters.threshold_multiotsu(img, classes=3)[0])
    except ValueError:  # fewer than three distinct levels
        return float(filters.threshold_otsu(img))


def _contrast(img: np.ndarray, t: float) -> float:
    """(median foreground − median background) / robust background noise sigma."""
    fg, bg = img[img > t], img[img <= t]
    if fg.size == 0 or bg.size == 0:
        return 0.0
    med = float(np.median(bg))
    noise = 1.4826 * float(np.median(np.abs(bg - med)))
    return (float(np.median(fg)) - med) / max(noise, 1e-6)


# --------------------------------------------------------------------------- steps
def _nucleus_objects(dna: np.ndarray, params: SegmentationParams) -> tuple[np.ndarray, float, str]:
    """Every declumped nucleus, before the size and border filters → (labels, threshold, note)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    empty = np.zeros(dna.shape, dtype=np.int32)
    sm = _smooth(dna, params.smoothing)
    t = _global_threshold(sm, params.threshold)
    if not np.isfinite(t):
        return empty, t, "flat DNA stain"
    t *= float(params.threshold_correction)
    if _contrast(sm, t) < params.min_contrast:
        return empty, t, "no nucleus stands out of the DNA background"
    mask = ndi.binary_fill_holes(sm > t)
    if params.declump == "shape":
        land = _smooth(ndi.distance_transform_edt(mask).astype(np.float32), params.declump_smoothing)
    else:
        land = _smooth(sm, params.declump_smoothing)
    comps, n_comp = ndi.label(mask)
    if n_comp == 0:
        return empty, t, "no pixel above the DNA threshold"
    peaks = peak_local_max(land, min_distance=int(params.min_distance), labels=comps, exclude_border=False)
    markers = np.zeros(dna.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    seeded = np.zeros(n_comp + 1, dtype=bool)
    seeded[np.unique(comps[markers > 0])] = True
    unseeded = ~seeded[comps] & mask  # a component without a maximum is one object
    markers[unseeded] = comps[unseeded] + len(peaks)
    return watershed(-land, markers, mask=mask).astype(np.int32, copy=False), t, ""


def _kept(labels: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Lookup table old label → new label (1..n, or 0 for a nucleus out of the size range or on the edge)."""
    area = np.bincount(labels.ravel())
    dmin, dmax = params.nucleus_diameter
    keep = (area >= np.pi * (dmin / 2) ** 2) & (area <= np.pi * (dmax / 2) ** 2)
    keep[0] = False
    if params.discard_border:
        for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            keep[edge] = False
    lut = np.zeros(len(area), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut


def segment_nuclei(dna: np.ndarray, params: SegmentationParams | None = None
                   ) -> tuple[np.ndarray, float, str]:
    """Nuclei of a DNA image already in [0, 1] → (labels int32 1..n, threshold, note)."""
    params = params or SegmentationParams()
    labels, t, note = _nucleus_objects(dna, params)
    out = _kept(labels, params)[labels]
    return out, t, note or ("" if out.max() else "no nucleus within the size range")


def segment_cells(stain: np.ndarray, nuclei: np.ndarray, params: SegmentationParams | None = None
                  ) -> tuple[np.ndarray, float]:
    """Cells grown from the seeds ``nuclei`` on a cell stain already in [0, 1] → (labels int32, threshold).

    Cell ``i`` is the territory of nucleus ``i``, within the stain's foreground (and
    always including the nucleus itself).
    """
    from scipy import ndimage as ndi
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    params = params or SegmentationParams()
    if nuclei.max() == 0:
        return np.zeros_like(nuclei), float("nan")
    sm = _smooth(stain, params.cell_smoothing)
    t = _global_threshold(sm, params.cell_threshold)
    mask = nuclei > 0
    if np.isfinite(t):
        mask = mask | (sm > t)
    edges = sobel(sm)
    cells = watershed(edges, nuclei, mask=mask, compactness=float(params.cell_compactness))
    filled = ndi.binary_fill_holes(cells > 0)
    if (filled & (cells == 0)).any():  # holes take the label that surrounds them
        cells = watershed(edges, cells, mask=filled)
    return cells.astype(np.int32, copy=False), t


def cytoplasm_of(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Cells minus their nuclei shrunk by one pixel (CellProfiler's tertiary objects)."""
    from skimage.segmentation import find_boundaries

    rim = find_boundaries(nuclei, mode="inner") & (nuclei > 0)
    return np.where((nuclei == 0) | rim, cells, 0).astype(np.int32, copy=False)


def _stain_index(stains: Sequence[str], stain: str, role: str) -> int:
    names = [str(s) for s in stains]
    if stain in names:
        return names.index(stain)
    lower = [s.lower() for s in names]
    if stain.lower() in lower:
        return lower.index(stain.lower())
    raise CellClipError(f"the {role} stain {stain!r} is not among the field's stains {names}; "
                        f"name the {role} stain explicitly")


def segment_field(raw: np.ndarray, stains: Sequence[str], *, nuclei_stain: str = "DNA",
                  cell_stain: str = "RNA", params: SegmentationParams | None = None) -> Segmentation:
    """Nuclei, cells and cytoplasm of one field ``raw`` (C, H, W), any dtype.

    ``stains`` names the channels in order; ``nuclei_stain`` / ``cell_stain`` pick
    the DNA stain and the stain cells are grown on (case-insensitive).
    """
    params = params or SegmentationParams()
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[0] != len(stains):
        raise CellClipError(f"segment_field expects a (C, H, W) field with C = {len(stains)} stains, "
                            f"got shape {raw.shape}")
    dna = _finite_unit(raw[_stain_index(stains, nuclei_stain, "nucleus")])
    cyto_stain = _finite_unit(raw[_stain_index(stains, cell_stain, "cell")])
    objects, t_nuc, note = _nucleus_objects(dna, params)
    lut = _kept(objects, params)
    nuclei = lut[objects]
    # every nucleus found claims its territory (as CellProfiler grows cells from the
    # unfiltered nuclei); the cells of nuclei dropped by the size/edge filters go with them
    cells, t_cell = segment_cells(cyto_stain, objects, params)
    cells = lut[cells]
    if not note and not nuclei.max():
        note = "no nucleus within the size range" + (" away from the field's edge" if params.discard_border else "")
    return Segmentation(nuclei=nuclei, cells=cells, cytoplasm=cytoplasm_of(cells, nuclei),
                        nuclei_threshold=t_nuc, cell_threshold=t_cell, note=note,
                        extra={"n_found": int(objects.max(initial=0))})


def centre_agreement(labels: np.ndarray, centres: np.ndarray) -> dict:
    """How a label image agrees with reference object centres ``(N, 2)`` (x, y in pixels).

    ``inside``: share of the centres that fall in an object; ``one_to_one``: share that
    fall in an object holding no other centre; ``count_ratio``: objects / centres.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    n_obj = int(labels.max(initial=0))
    if len(centres) == 0:
        return {"inside": float("nan"), "one_to_one": float("nan"), "count_ratio": float("nan"),
                "objects": n_obj, "centres": 0}
    h, w = labels.shape
    xi = np.clip(np.rint(centres[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.rint(centres[:, 1]).astype(int), 0, h - 1)
    hit = labels[yi, xi]
    inside = hit > 0
    per_object = np.bincount(hit[inside], minlength=n_obj + 1)
    one_to_one = inside & (per_object[hit] == 1)
    return {"inside": float(inside.mean()), "one_to_one": float(one_to_one.mean()),
            "count_ratio": n_obj / len(centres), "objects": n_obj, "centres": len(centres)}
