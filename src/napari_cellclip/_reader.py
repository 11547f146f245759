"""napari reader: a Cell Painting plate (any layout :func:`napari_cellclip.plates.read_plate`
reads: a folder, an OME-Zarr plate, an OME-TIFF, a LoadData CSV) or a field's channel files.

A plate opens as one image layer per stain (napari's ``channel_axis``), each a lazy
dask array of shape ``(n_fields, H, W)`` with the fields on the first axis (a slider
over fields): only the field on screen is decoded, one image read per (field, stain)
and one dask chunk each (the graph is a single blockwise layer, so a plate of
thousands of fields opens as fast as a small one).  OME-Zarr plates and pyramidal
OME-TIFFs give a *multiscale* layer: napari reads the pyramid level it displays.
Layers are named by stain, blended additively, coloured the Cell Painting way
(:data:`STAIN_DISPLAY`) and given contrast limits from robust percentiles of a few
fields spread through the plate; with a known pixel size (``Metadata_PixelSizeX/Y``,
µm) they are scaled to micrometres.  The
fields table (``Metadata_*`` columns + image paths, annotated with the platemap when
one is found) goes into ``layer.metadata["cellclip_fields"]``, which is how the
widgets know which plate is open.

Stain names: a ``channels.json`` / ``channels.txt`` beside the plate is used as its
channel map (see :func:`napari_cellclip.plates.read_plate`); :func:`read_fields` takes
a ``channel_map`` for a widget that re-reads a plate with one, and
:func:`napari_cellclip.plates.rename_stains` relabels a table already read.

``get_reader`` returns ``None`` for anything it cannot read and never raises, as
napari expects from a reader plugin.  Declining is cheap: a file is judged by its
name, a folder by a bounded look at its first entries (:func:`napari_cellclip.plates.sniff`);
no tree is read unless it holds a plate.

napari shows a "choose reader" dialog for a *folder* whenever two installed plugins
accept folders (napari's own reader does), whatever the plugins declare (npe2 matches
``filename_patterns`` against files only).  ``napari --plugin napari-cellclip <plate>``
skips it, and so does a preference: napari ▸ Preferences ▸ Plugins ▸ file extension
readers, e.g. ``*.zarr/`` or ``*/Images/`` → napari-cellclip (the dialog's "remember"
box saves one for the exact folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import warn_at_caller

__all__ = [
    "get_reader",
    "read_fields",
    "fields_layer_data",
    "stain_style",
    "stain_colormap",
    "StainStyle",
    "STAIN_DISPLAY",
    "PIXEL_SIZE_COLUMN",
    "PIXEL_SIZE_KEY",
]

FIELDS_KEY = "cellclip_fields"
SOURCE_KEY = "cellclip_source"
#: fields-table column with the pixel size in micrometres (plate readers fill it from the
#: image metadata when it is known); the layers then get that scale and a scale bar
PIXEL_SIZE_COLUMN = "Metadata_PixelSizeUm"
#: layer metadata key holding that pixel size (µm per pixel) for the widgets
PIXEL_SIZE_KEY = "cellclip_pixel_size_um"
#: percentiles of a sample of the plate's fields giving the display contrast limits: the
#: low end just above the background, the high end saturating only the brightest 0.1 %
DISPLAY_PERCENTILES = (5.0, 99.9)
#: how many fields (spread through the plate) the contrast limits are taken from
DISPLAY_SAMPLE_FIELDS = 3


@dataclass(frozen=True)
class StainStyle:
    """How one stain is drawn in the composite: colour (hex), gamma and opacity (its weight
    in the additive blend)."""

    color: str
    gamma: float = 1.0
    opacity: float = 1.0
    label: str = ""


#: The Cell Painting composite.  Colours follow the composites of the RxRx Cell Painting
#: datasets (Recursion's rxrx1-utils: DNA blue, ER green, RNA cyan, AGP red, Mito magenta)
#: rather than a yellow RNA, which with green ER and red AGP sums to a yellow-white
#: cytoplasm.  DNA is a lighter blue (pure blue is too dark on black to read); the diffuse
#: cytoplasmic stains (ER, RNA, AGP) get a gamma above 1 and a lower weight, so their
#: structures (perinuclear ER, nucleoli, Golgi) show and their sum does not wash out the
#: cell; punctate Mito and the nuclei stay at full weight.
STAIN_DISPLAY = {
    "DNA": StainStyle("#2666ff", gamma=0.9, opacity=1.0, label="blue"),
    "ER": StainStyle("#00ff00", gamma=1.3, opacity=0.8, label="green"),
    "RNA": StainStyle("#00cccc", gamma=1.5, opacity=0.7, label="cyan"),
    "AGP": StainStyle("#ff2600", gamma=1.3, opacity=0.8, label="red"),
    "Mito": StainStyle("#ff00ff", gamma=1.0, opacity=1.0, label="magenta"),
}
_FALLBACK_STYLES = (StainStyle("#ffd700", label="yellow"), StainStyle("#ffffff", label="grey"),
                    StainStyle("#ff8c00", label="orange"), StainStyle("#9370db", label="purple"))


def stain_style(stain: str, i: int = 0) -> StainStyle:
    """Display style of ``stain`` (Cell Painting name or a dye name; else the i-th fallback)."""
    for key, style in STAIN_DISPLAY.items():
        if stain.lower() == key.lower():
            return style
    from .formats.dyes import canonical_stain

    key = canonical_stain(stain)  # a dye or marker name (Hoechst, ConA, SYTO 14 ...)
    if key in STAIN_DISPLAY:
        return STAIN_DISPLAY[key]
    return _FALLBACK_STYLES[i % len(_FALLBACK_STYLES)]


def stain_colormap(stain: str, i: int = 0):
    """napari colormap (black to the stain's colour) named ``"<stain> <colour>"``."""
    from napari.utils.colormaps import Colormap

    style = stain_style(stain, i)
    rgb = [int(style.color[k:k + 2], 16) / 255 for k in (1, 3, 5)]
    return Colormap([[0, 0, 0, 1], [*rgb, 1]], name=f"{stain} {style.label}".strip())


# --------------------------------------------------------------------------- reading
def _annotate_if_possible(fields, plate_dir: Path | None):
    """Join platemap metadata when the plate is the bundled one or a platemap folder is nearby.

    ``plate/../platemap``, ``plate/../../platemap`` (the LINCS layout) or ``plate/platemap``
    holding a ``barcode_platemap.csv``.  Metadata is a bonus: a failed join warns and keeps
    the plain fields table.
    """
    if fields is None or plate_dir is None or "Metadata_prompt" in fields.columns:
        return fields
    from . import sample

    plate_dir = Path(plate_dir).resolve()
    kwargs: dict[str, Any] = {}
    if plate_dir == sample.sample_plate_dir().resolve():
        platemap = sample.sample_platemap_dir()
        kwargs["cell_line"] = "A549"
    else:
        platemap = next(
            (c for c in (plate_dir / "platemap", plate_dir.parent / "platemap", plate_dir.parent.parent / "platemap")
             if (c / "barcode_platemap.csv").is_file()),
            None,
        )
    if platemap is None:
        return fields
    try:
        from .fields import read_fields

        return read_fields(fields, platemap=platemap, **kwargs)
    except Exception as exc:  # noqa: BLE001
        warn_at_caller(f"platemap metadata from {platemap} not joined: {exc}")
        return fields


def read_fields(path: str | Path | Sequence[str | Path], channel_map=None, *, strict: bool = False):
    """Fields table for a plate (folder, OME-Zarr plate, OME-TIFF, LoadData CSV) or channel files.

    Returns ``None`` when ``path`` is not something napari-cellclip reads; deciding that
    reads no tree (:func:`napari_cellclip.plates.sniff`).  For channel files, the plate
    around them is read and only the fields those files belong to kept; for a well or a
    field inside an OME-Zarr plate, the plate is read and only that well / field kept.
    ``channel_map`` (see ``read_plate``) names numbered channels.  ``strict=True`` (a widget
    re-reading a plate it knows is ours) raises the :class:`~napari_cellclip.errors.CellClipError`
    saying why instead of returning ``None``.
    """
    from .errors import PlateError

    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if not paths:
        return None
    try:
        found = _read_paths(paths, channel_map)
    except Exception:  # noqa: BLE001 - never raise on foreign or broken files
        if strict:
            raise
        return None
    if found is None or found[0] is None or len(found[0]) == 0:
        if strict:
            raise PlateError(f"{paths[0]}: no plate napari-cellclip can read")
        return None
    fields, plate_dir = found
    fields = _annotate_if_possible(fields, plate_dir)
    return fields.reset_index(drop=True)


def _read_paths(paths: list[Path], channel_map):
    """(fields, plate folder) for the paths, or None when they are not ours; plates are read
    through the fields front door (:func:`napari_cellclip.fields.read_fields`)."""
    from .fields import read_fields as read_table
    from .plates import image_kind, sniff

    if len(paths) == 1:
        p = paths[0]
        inner = _zarr_plate_of(p)
        if inner is not None:
            root, rel = inner
            return _fields_in(read_table(root, channel_map=channel_map), root, rel), root.parent
        kind = sniff(p)
        if kind is None:
            return None
        if p.is_dir() or kind in ("load_data", "ome-tiff"):
            return read_table(p, channel_map=channel_map), (p if p.is_dir() else p.parent)
    if not all(p.is_file() and image_kind(p) for p in paths):
        return None
    parents = {p.parent.resolve() for p in paths}
    if len(parents) != 1:
        return None
    plate_dir = parents.pop()
    return _fields_with_files(read_table(plate_dir, channel_map=channel_map), paths), plate_dir


def _zarr_plate_of(path: Path):
    """(plate root, relative path) for a well or image folder inside an OME-Zarr plate, else None."""
    from .formats import ome_zarr

    if not ome_zarr.is_zarr_dir(path) or ome_zarr.is_plate(path):
        return None
    for parent in list(path.resolve().parents)[:3]:
        if ome_zarr.is_plate(parent):
            return parent, path.resolve().relative_to(parent).as_posix()
    return None


def _fields_in(fields, root: Path, rel: str):
    """The rows of ``fields`` whose OME-Zarr image is ``rel`` or lies under it (a well)."""
    col = next(c for c in fields.columns if str(c).startswith("FileName_"))
    keep = [str(f) == rel or str(f).startswith(rel.rstrip("/") + "/") for f in fields[col]]
    return fields[keep]


def _fields_with_files(fields, paths: Sequence[Path]):
    names = {p.name for p in paths}
    resolved = {str(p.resolve()) for p in paths}
    file_cols = [c for c in fields.columns if str(c).startswith("FileName_")]
    keep = np.zeros(len(fields), dtype=bool)
    for c in file_cols:
        stain = str(c)[len("FileName_"):]
        pcol = f"PathName_{stain}"
        for i, (name, folder) in enumerate(zip(fields[c].astype(str), fields.get(pcol, [""] * len(fields)))):
            if name in names:
                full = str((Path(str(folder)) / name).resolve())
                if full in resolved or not folder:
                    keep[i] = True
    return fields[keep]


# ------------------------------------------------------------------------- layer data
def _load_channel(row: dict, stain: str, shape: tuple, dtype, level: int = 0) -> np.ndarray:
    """Decode one channel image of one field at pyramid ``level`` (called lazily by dask)."""
    from .errors import CellClipError
    from .images import channel_frame, channel_path, load_field, read_image

    try:
        if level == 0:
            img = load_field(row, [stain])[0]
        else:
            img = read_image(channel_path(row, stain), frame=channel_frame(row, stain), level=level)
    except CellClipError as exc:
        warn_at_caller(f"field {row.get('Metadata_Well')} site {row.get('Metadata_Site')}: {exc}")
        return np.zeros(shape, dtype=dtype)
    if img.shape != tuple(shape):
        warn_at_caller(f"field {row.get('Metadata_Well')} site {row.get('Metadata_Site')} ({stain}): "
                       f"shape {img.shape} differs from the plate's {tuple(shape)}; shown blank")
        return np.zeros(shape, dtype=dtype)
    return img.astype(dtype, copy=False)


def fields_layer_data(fields, source: str = "", *, name_prefix: str = "") -> list[tuple]:
    """LayerData tuples (one image layer per stain) for the fields in ``fields``.

    Each stain gets its Cell Painting colour, gamma and weight (:data:`STAIN_DISPLAY`) and
    contrast limits from :data:`DISPLAY_PERCENTILES` of a few fields spread through the
    plate.  With a pixel size (:data:`PIXEL_SIZE_COLUMN`) the layers are scaled to
    micrometres.  Raises :class:`~napari_cellclip.errors.CellClipError` when no field can
    be read.
    """
    from .plates import stains as plate_stains

    fields = fields.reset_index(drop=True)
    stains = list(plate_stains(fields))
    sample = _display_sample(fields, stains, source)
    first = sample[0]
    _, h, w = first.shape
    dtype = first.dtype
    rows = [_row_dict(r) for _, r in fields.iterrows()]
    shapes = _level_shapes(fields.iloc[0], stains[0], (h, w))
    levels = [_lazy_fields(rows, stains, shape, dtype, lv) for lv, shape in enumerate(shapes)]
    data = levels if len(levels) > 1 else levels[0]
    styles = [stain_style(s, i) for i, s in enumerate(stains)]
    metadata = {FIELDS_KEY: fields, SOURCE_KEY: str(source)}
    kwargs: dict[str, Any] = {
        "channel_axis": 1,
        "multiscale": len(levels) > 1,
        "name": [f"{name_prefix}{s}" for s in stains],
        "colormap": [stain_colormap(s, i) for i, s in enumerate(stains)],
        "gamma": [st.gamma for st in styles],
        "opacity": [st.opacity for st in styles],
        "blending": "additive",
        "contrast_limits": display_limits(sample, dtype),
        "metadata": metadata,
        "axis_labels": ("field", "y", "x"),
    }
    px = pixel_size_um(fields)
    if px is not None:
        metadata[PIXEL_SIZE_KEY] = px
        kwargs["scale"] = (1.0, px, px)
        kwargs["units"] = ("pixel", "um", "um")
    return [(data, kwargs, "image")]


def _level_shapes(row, stain: str, full: tuple) -> list[tuple]:
    """(H, W) per pyramid level of a field's images; ``[full]`` for single-resolution files."""
    from .errors import CellClipError
    from .images import channel_path, pyramid_shapes

    try:
        shapes = pyramid_shapes(channel_path(row, stain))
    except CellClipError:
        return [full]
    return shapes if shapes and tuple(shapes[0]) == tuple(full) else [full]


def _lazy_fields(rows: list, stains: list, shape: tuple, dtype, level: int):
    """(n_fields, C, H, W) dask array; one chunk (one decode) per field and stain."""
    import uuid

    import dask.array as da

    def block(block_info=None):
        i, j = block_info[None]["chunk-location"][:2]
        return _load_channel(rows[i], stains[j], shape, dtype, level)[None, None]

    chunks = ((1,) * len(rows), (1,) * len(stains), (shape[0],), (shape[1],))
    return da.map_blocks(block, dtype=dtype, chunks=chunks, meta=np.empty((0, 0, 0, 0), dtype),
                         name=f"cellclip-fields-{uuid.uuid4().hex}")


def _display_sample(fields, stains, source: str) -> list[np.ndarray]:
    """Up to :data:`DISPLAY_SAMPLE_FIELDS` readable fields spread through the plate, all of the shape
    most of the looked-at fields have (so one odd field, e.g. a 1×1 first one, cannot set the
    plate's shape and blank the good ones); the first of them first (it fixes shape and dtype)."""
    from collections import Counter

    from .errors import ImageReadError
    from .images import load_field

    n, read, last_exc = len(fields), [], None
    for i in sorted(set(range(min(n, 4))) | {n // 4, n // 2, (3 * n) // 4, n - 1}):
        try:
            read.append(load_field(fields.iloc[i], stains))
        except ImageReadError as exc:
            last_exc = exc
    for i in range(4, min(n, 8)) if not read else ():
        try:
            read.append(load_field(fields.iloc[i], stains))
        except ImageReadError as exc:
            last_exc = exc
    if not read:
        raise last_exc or ImageReadError(source or "<plate>", "no readable field")
    counts = Counter(img.shape for img in read)
    shape = max(counts, key=lambda s: (counts[s], s[-1] * s[-2]))
    return [img for img in read if img.shape == shape][:DISPLAY_SAMPLE_FIELDS]


def display_limits(sample: Sequence[np.ndarray], dtype) -> list[tuple[float, float]]:
    """Per-channel contrast limits from :data:`DISPLAY_PERCENTILES` of the sampled fields."""
    from .images import contrast_limits

    low, high = DISPLAY_PERCENTILES
    stride = max(1, int(np.ceil(np.sqrt(sample[0][0].size / 262_144))))  # <= ~0.26 M pixels per field
    limits = []
    for c in range(sample[0].shape[0]):
        pixels = np.concatenate([f[c, ::stride, ::stride].ravel() for f in sample])
        limits.append(contrast_limits(pixels, low, high))
    if np.issubdtype(dtype, np.integer):
        top = float(np.iinfo(dtype).max)
        limits = [(lo, min(hi, top)) if hi > lo else (lo, lo + 1.0) for lo, hi in limits]
    return limits


def pixel_size_um(fields) -> float | None:
    """The plate's pixel size in µm, when known and one for all fields.

    Read from :data:`PIXEL_SIZE_COLUMN`, or from ``Metadata_PixelSizeX``/``Y`` (µm, what
    the OME-TIFF and OME-Zarr readers fill) when X and Y agree.
    """
    import pandas as pd

    cols = getattr(fields, "columns", ())
    if PIXEL_SIZE_COLUMN in cols:
        values = pd.to_numeric(fields[PIXEL_SIZE_COLUMN], errors="coerce")
    elif "Metadata_PixelSizeX" in cols and "Metadata_PixelSizeY" in cols:
        x = pd.to_numeric(fields["Metadata_PixelSizeX"], errors="coerce")
        y = pd.to_numeric(fields["Metadata_PixelSizeY"], errors="coerce")
        values = x.where(np.isclose(x, y, rtol=1e-3))
    else:
        return None
    values = values.dropna()
    values = values[(values > 0) & np.isfinite(values)]
    if values.empty:
        return None
    if values.nunique() > 1:

        warn_at_caller(f"the fields have different pixel sizes ({sorted(values.unique())[:4]} µm): "
                       "shown in pixels, without a scale bar")
        return None
    return float(values.iloc[0])


def _row_dict(row) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, np.generic):
            v = v.item()
        out[str(k)] = v
    return out


# ----------------------------------------------------------------------------- npe2
def get_reader(path) -> Callable | None:
    """npe2 reader hook: a reader function for ``path``, or ``None`` if it is not ours."""
    try:
        fields = read_fields(path)
    except Exception:  # noqa: BLE001 - never raise on foreign files
        return None
    if fields is None:
        return None
    source = str(path[0] if isinstance(path, (list, tuple)) else path)

    def reader(_path) -> list[tuple]:
        try:
            return fields_layer_data(fields, source)
        except Exception as exc:  # noqa: BLE001
            from ._widgets import _notify

            try:
                _notify.error(f"napari-cellclip could not read {source}: {exc}")
            except Exception:  # pragma: no cover - no napari app
                pass
            return [(None,)]  # napari's 'read, but no layers' sentinel

    return reader
