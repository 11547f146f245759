"""napari reader: a Cell Painting plate folder, a LoadData CSV, or a field's channel files.

A plate opens as one image layer per stain (napari's ``channel_axis``), each a lazy
dask array of shape ``(n_fields, H, W)`` with the fields on the first axis (a slider
over fields): only the field on screen is decoded, one ``dask.delayed`` image
read per (field, stain).  Layers are named by stain, blended additively, coloured
the Cell Painting way and given contrast limits from robust percentiles of the
first readable field.  The fields table (``Metadata_*`` columns + image paths,
annotated with the platemap when one is found) goes into
``layer.metadata["cellclip_fields"]``, which is how the widgets know which plate
is open.

``get_reader`` returns ``None`` for anything it cannot read and never raises, as
napari expects from a reader plugin.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "get_reader",
    "read_fields",
    "fields_layer_data",
    "stain_colormap",
    "STAIN_COLORMAPS",
]

FIELDS_KEY = "cellclip_fields"
SOURCE_KEY = "cellclip_source"

#: Cell Painting display colours (napari colormap names)
STAIN_COLORMAPS = {
    "DNA": "blue",
    "ER": "green",
    "RNA": "yellow",
    "AGP": "red",
    "Mito": "magenta",
}
_FALLBACK_COLORMAPS = ("cyan", "gray", "bop orange", "bop purple", "I Forward")
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def stain_colormap(stain: str, i: int = 0) -> str:
    """Colormap for ``stain`` (case-insensitive match on the Cell Painting names)."""
    for key, cmap in STAIN_COLORMAPS.items():
        if stain.lower() == key.lower():
            return cmap
    low = stain.lower()
    for key, cmap in (("hoechst", "blue"), ("dapi", "blue"), ("nuc", "blue"), ("conc", "green"),
                      ("syto", "yellow"), ("phallo", "red"), ("actin", "red"), ("wga", "red"),
                      ("mito", "magenta")):
        if key in low:
            return cmap
    return _FALLBACK_COLORMAPS[i % len(_FALLBACK_COLORMAPS)]


# --------------------------------------------------------------------------- reading
def _is_loaddata_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return False
    return "FileName_Orig" in header or "FileName_" in header and "PathName_" in header


def _annotate_if_possible(fields, plate_dir: Path | None):
    """Join platemap metadata when the plate is the bundled one or a platemap folder is nearby.

    ``plate/../platemap``, ``plate/../../platemap`` (the LINCS layout) or ``plate/platemap``
    holding a ``barcode_platemap.csv``.  Metadata is a bonus: a failed join warns and keeps
    the plain fields table.
    """
    if fields is None or plate_dir is None or "Metadata_prompt" in fields.columns:
        return fields
    from . import sample
    from .errors import CellClipWarning

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
        warnings.warn(f"platemap metadata from {platemap} not joined: {exc}", CellClipWarning, stacklevel=2)
        return fields


def read_fields(path: str | Path | Sequence[str | Path]):
    """Fields table for a plate folder, a LoadData CSV, or one or more channel files.

    Returns ``None`` when ``path`` is not something napari-cellclip reads.  For channel
    files, the plate around them is read and only the fields those files belong to kept.
    """
    from .errors import CellClipError
    from .fields import read_fields as read_table

    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if not paths:
        return None
    try:
        if len(paths) == 1 and paths[0].is_dir():
            fields = read_table(paths[0])
            plate_dir = paths[0]
        elif len(paths) == 1 and paths[0].suffix.lower() == ".csv":
            if not paths[0].is_file() or not _is_loaddata_csv(paths[0]):
                return None
            fields = read_table(paths[0])
            plate_dir = paths[0].parent
        elif all(p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file() for p in paths):
            parents = {p.parent.resolve() for p in paths}
            if len(parents) != 1:
                return None
            plate_dir = parents.pop()
            fields = read_table(plate_dir)
            fields = _fields_with_files(fields, paths)
        else:
            return None
    except (CellClipError, OSError, ValueError, KeyError):
        return None
    except Exception:  # noqa: BLE001 - never raise on foreign files
        return None
    if fields is None or len(fields) == 0:
        return None
    fields = _annotate_if_possible(fields, plate_dir)
    return fields.reset_index(drop=True)


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
def _load_channel(row: dict, stain: str, shape: tuple, dtype) -> np.ndarray:
    """Decode one channel image of one field (called lazily by dask)."""
    from .errors import CellClipError, CellClipWarning
    from .images import load_field

    try:
        img = load_field(row, [stain])[0]
    except CellClipError as exc:
        warnings.warn(f"field {row.get('Metadata_Well')} site {row.get('Metadata_Site')}: {exc}",
                      CellClipWarning, stacklevel=2)
        return np.zeros(shape, dtype=dtype)
    if img.shape != tuple(shape):
        warnings.warn(
            f"field {row.get('Metadata_Well')} site {row.get('Metadata_Site')} ({stain}): "
            f"shape {img.shape} differs from the plate's {tuple(shape)}; shown blank",
            CellClipWarning, stacklevel=2,
        )
        return np.zeros(shape, dtype=dtype)
    return img.astype(dtype, copy=False)


def fields_layer_data(fields, source: str = "", *, name_prefix: str = "") -> list[tuple]:
    """LayerData tuples (one image layer per stain) for the fields in ``fields``.

    Raises :class:`~napari_cellclip.errors.CellClipError` when no field can be read.
    """
    import dask
    import dask.array as da

    from .errors import ImageReadError
    from .images import contrast_limits, load_field
    from .plates import stains as plate_stains

    fields = fields.reset_index(drop=True)
    stains = list(plate_stains(fields))
    first = None
    last_exc = None
    for i in range(min(len(fields), 8)):
        try:
            first = load_field(fields.iloc[i], stains)
            break
        except ImageReadError as exc:
            last_exc = exc
    if first is None:
        raise last_exc or ImageReadError(source or "<plate>", "no readable field")
    _, h, w = first.shape
    dtype = first.dtype
    rows = [_row_dict(r) for _, r in fields.iterrows()]
    per_field = []
    for row in rows:
        chans = [
            da.from_delayed(dask.delayed(_load_channel, pure=True)(row, s, (h, w), dtype), shape=(h, w), dtype=dtype)
            for s in stains
        ]
        per_field.append(da.stack(chans))
    data = da.stack(per_field)  # (n_fields, C, H, W), chunks = one channel image
    limits = [contrast_limits(first[c]) for c in range(len(stains))]
    dtype_max = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None
    if dtype_max is not None:
        limits = [(lo, min(hi, dtype_max)) for lo, hi in limits]
    metadata = {FIELDS_KEY: fields, SOURCE_KEY: str(source)}
    kwargs: dict[str, Any] = {
        "channel_axis": 1,
        "name": [f"{name_prefix}{s}" for s in stains],
        "colormap": [stain_colormap(s, i) for i, s in enumerate(stains)],
        "blending": "additive",
        "contrast_limits": limits,
        "metadata": metadata,
        "axis_labels": ("field", "y", "x"),
    }
    return [(data, kwargs, "image")]


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
