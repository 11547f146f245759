"""Decode channel images and normalise intensities.

Fields are read lazily: nothing here touches a file until :func:`load_field` is
called for that field.  TIFF goes through tifffile with imagecodecs (8-bit, 16-bit,
float; LZW, zstd, deflate, JPEG-family compression; multi-channel files with a frame
index; OME-TIFF), PNG through Pillow, OME-Zarr fields through zarr
(:mod:`napari_cellclip.formats`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import ImageReadError, warn_at_caller

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
IMAGE_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES


def read_image(path, frame: int | None = None, axes: str | None = None, level: int = 0) -> np.ndarray:
    """Read one 2-D channel image.

    ``path`` is a PNG or TIFF file (any compression imagecodecs decodes: LZW, zstd,
    deflate, JPEG, JPEG 2000, JPEG XL …), an OME-TIFF, or an OME-Zarr image folder (one
    field of an HCS plate).  ``frame`` picks a channel (0-based) inside a multi-channel
    file; ``axes`` says where the channel axis is in a plain multi-channel TIFF ("CYX" or
    "YXC"; default "CYX"); OME-TIFF and OME-Zarr images say it themselves (their T and Z
    are reduced as :mod:`napari_cellclip.formats.planes` describes).  ``level`` picks a
    pyramid level of an OME-Zarr or pyramidal OME-TIFF image (0 = full resolution).
    Raises :class:`ImageReadError` naming the file when it is missing, corrupt, truncated
    or not 2-D.
    """
    path = Path(path)
    if path.is_dir():
        from .formats import ome_zarr

        return _check_plane(path, ome_zarr.read_plane(path, frame, level))
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            data, is_ome = _read_tiff(path, frame, axes, level)
            if is_ome or (data.ndim == 2 and not frame):  # frame 0 of a single-plane file is that plane
                return _check_plane(path, data)
        elif suffix in PNG_SUFFIXES:
            from PIL import Image

            _no_pyramid(path, level)
            with Image.open(path) as im:
                im.load()
                data = np.asarray(im)
        else:
            raise ImageReadError(path, f"unsupported image type {suffix!r} (use TIFF, PNG or OME-Zarr)")
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt files
        if "imagecodecs" in str(exc):
            raise ImageReadError(path, f"the file is compressed with a codec that needs the 'imagecodecs' "
                                       f"package (pip install imagecodecs): {exc}") from exc
        raise ImageReadError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc

    data = np.asarray(data)
    if frame is not None:
        axes = (axes or "CYX").upper()
        if data.ndim != 3 or axes not in ("CYX", "YXC"):
            raise ImageReadError(path, f"expected a 3-D {axes} multi-channel image, got shape {data.shape}")
        n = data.shape[0] if axes == "CYX" else data.shape[-1]
        if not 0 <= frame < n:
            raise ImageReadError(path, f"channel index {frame} out of range (file has {n} channels)")
        data = data[frame] if axes == "CYX" else data[..., frame]
    if data.ndim == 3 and data.shape[-1] in (3, 4) and suffix in PNG_SUFFIXES:
        # An RGB(A) PNG of a single stain: all planes carry the same grey values.
        data = data[..., 0]
    return _check_plane(path, data)


def _no_pyramid(path: Path, level: int) -> None:
    if level:
        raise ImageReadError(path, f"pyramid level {level} requested, but the file holds one resolution")


def _read_tiff(path: Path, frame: int | None, axes: str | None, level: int) -> tuple[np.ndarray, bool]:
    """(data, is_ome): a TIFF's first image series; for an OME-TIFF read without explicit
    ``axes``, the one channel ``frame`` (first time point, Z projected) at pyramid ``level``."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        if tf.is_ome and axes is None:
            from .formats import ome_tiff

            return ome_tiff.read_plane(path, frame, level, tiff=tf), True
        _no_pyramid(path, level)
        return np.asarray(tf.asarray()), False


def _check_plane(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D single-channel image, got shape {data.shape}")
    if data.dtype.kind not in "uif" or data.dtype == np.bool_:
        raise ImageReadError(path, f"unsupported pixel type {data.dtype}")
    return _finite(path, data) if data.dtype.kind == "f" else data


def _finite(path: Path, data: np.ndarray) -> np.ndarray:
    """A float plane with its NaN / ±inf pixels (which would poison every percentile of the plate)
    set to its lowest finite value, said in a warning naming the file; none finite: ImageReadError."""
    bad = ~np.isfinite(data)
    if not bad.any():
        return data
    if bad.all():
        raise ImageReadError(path, "every pixel is NaN or infinite")
    fill = data[~bad].min()
    warn_at_caller(f"{path}: {int(bad.sum())} of {data.size} pixels are NaN or infinite; they are read as the "
                   f"image's lowest finite value ({fill:g})")
    out = np.array(data, copy=True)
    out[bad] = fill
    return out


def pyramid_shapes(path) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level of an OME-Zarr image or OME-TIFF, full resolution first;
    ``[]`` for a file that holds one resolution (its shape is known once decoded)."""
    path = Path(path)
    try:
        if path.is_dir():
            from .formats import ome_zarr

            return ome_zarr.level_shapes(path)
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            from .formats import ome_tiff

            with tifffile.TiffFile(path) as tf:
                return ome_tiff.level_shapes(path, tiff=tf) if tf.is_ome else []
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(path, f"cannot read the image header ({type(exc).__name__}: {exc})") from exc
    return []


def channel_stamp(path) -> str:
    """A cheap change stamp of a channel's data, no content read: ``size:mtime`` of a file, or
    of an OME-Zarr image's metadata and array files.  Raises OSError when it cannot be read."""
    path = Path(path)
    if path.is_dir():
        from .formats import ome_zarr

        return ome_zarr.image_stamp(path)
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def channel_digest(row, stain: str) -> str:
    """Content digest of ``stain``'s image in a fields-table row, the feature cache's key part.

    A regular file: blake2b of its bytes (:func:`napari_cellclip._fsutil.file_digest`).  An
    OME-Zarr field: blake2b of the image's metadata and every file of its full-resolution
    array.  Raises :class:`ImageReadError` naming the path when it cannot be read.
    """
    path = channel_path(row, stain)
    try:
        if path.is_dir():
            from .formats import ome_zarr

            return ome_zarr.image_digest(path)
        from ._fsutil import file_digest

        return file_digest(path)
    except OSError as exc:
        raise ImageReadError(path, f"file not found or not readable ({exc.strerror or exc})") from None


def row_value(row, key):
    """``row[key]`` of a fields-table row (Series or mapping); None when absent or missing (None, NaN, NA)."""
    if isinstance(row, Mapping):
        value = row.get(key)
    else:
        value = row[key] if key in row.index else None
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # non-scalar values are not "missing"
        pass
    return value


def channel_path(row, stain: str) -> Path:
    """Absolute path of ``stain``'s image in a fields-table row."""
    name = row_value(row, f"FileName_Orig{stain}")
    folder = row_value(row, f"PathName_Orig{stain}")
    if name is None or name == "":
        raise ImageReadError(
            f"{row_value(row, 'Metadata_Plate')}/{row_value(row, 'Metadata_Well')} site "
            f"{row_value(row, 'Metadata_Site')}",
            f"no image for stain {stain!r}",
        )
    return Path(str(folder)) / str(name)


def channel_frame(row, stain: str) -> int | None:
    """Channel index of ``stain`` inside a multi-channel file, or None for a single-channel file."""
    value = row_value(row, f"Frame_Orig{stain}")
    return None if value is None else int(value)


def load_field(row, stains: Sequence[str] | None = None) -> np.ndarray:
    """All channels of one field as a (C, H, W) array in the file's dtype.

    ``row`` is a row of a fields table (a pandas Series or a mapping);
    ``stains`` defaults to the stains in the row's ``FileName_Orig*`` keys.
    All channels must have the same shape; a mismatch names both files.
    """
    if stains is None:
        keys = row.keys() if isinstance(row, Mapping) else row.index
        stains = [k[len("FileName_Orig"):] for k in keys if str(k).startswith("FileName_Orig")]
    axes = row_value(row, "Metadata_ChannelAxes")
    planes = []
    first = None
    for stain in stains:
        path = channel_path(row, stain)
        plane = read_image(path, frame=channel_frame(row, stain), axes=axes if isinstance(axes, str) else None)
        if first is None:
            first = (path, plane.shape)
        elif plane.shape != first[1]:
            raise ImageReadError(
                path,
                f"shape {plane.shape} differs from {first[1]} of {first[0].name} in the same field",
            )
        planes.append(plane)
    if not planes:
        raise ImageReadError("<field>", "no channels to read")
    dtype = np.result_type(*[p.dtype for p in planes])
    return np.stack(planes).astype(dtype, copy=False)


#: the percentiles a channel's intensity range is taken between
NORM_LOW = 1.0
NORM_HIGH = 99.9


def fast_percentiles(plane: np.ndarray, low: float = NORM_LOW, high: float = NORM_HIGH
                     ) -> tuple[np.float32, np.float32]:
    """``np.percentile(plane.astype(float32), [low, high])`` cast to float32, bit-identical, from a
    histogram for uint8/uint16 planes (≈8× faster); ``np.percentile`` for other pixel types."""
    a = np.asarray(plane)
    n = a.size
    if a.dtype in (np.uint8, np.uint16) and n > 0:
        cum = np.cumsum(np.bincount(a.ravel(), minlength=1))
        out = []
        for q in (low, high):
            v = (q / 100.0) * (n - 1)
            i = int(math.floor(v))
            g = v - i
            lo = float(np.searchsorted(cum, i, side="right"))
            hi = float(np.searchsorted(cum, min(i + 1, n - 1), side="right"))
            d = hi - lo  # numpy's _lerp, in float64, then cast
            out.append(np.float32(lo + d * g if g < 0.5 else hi - d * (1.0 - g)))
        return out[0], out[1]
    lo, hi = np.percentile(a.astype(np.float32, copy=False).reshape(1, -1), [low, high], axis=1)
    return np.float32(lo[0]), np.float32(hi[0])


def channel_ranges(img: np.ndarray, low: float = NORM_LOW, high: float = NORM_HIGH) -> np.ndarray:
    """(C, 2) float32 ``(lo, hi)``: each channel's own ``low``/``high`` percentiles (:func:`fast_percentiles`)."""
    return np.array([fast_percentiles(plane, low, high) for plane in np.asarray(img)], dtype=np.float32)


def normalize(img: np.ndarray, low: float = NORM_LOW, high: float = NORM_HIGH) -> np.ndarray:
    """Robust per-channel rescale to [0, 1] (float32).

    Each channel (the leading axis of a (C, H, W) array, or a single (H, W)
    image) is mapped so its ``low``-th percentile goes to 0 and its
    ``high``-th to 1, then clipped.  A flat channel becomes all zeros.
    """
    arr = np.asarray(img)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    out = normalize_range(arr, channel_ranges(arr, low, high))
    return out[0] if single else out


#: How a field's channels are rescaled to [0, 1] before encoding.  ``field``: each
#: field by its own percentiles (every field spans [0, 1], so a treatment that dims
#: or brightens a stain is invisible to the encoder).  ``plate``: every field of a
#: plate by the same per-channel percentiles, taken over a sample of that plate's
#: fields (:func:`plate_ranges`), so intensity differences between the wells of a
#: plate reach the encoder; the per-plate DMSO correction then removes plate effects.
NORMALIZATIONS = ("field", "plate")
PLATE_SAMPLE_FIELDS = 16
PLATE_SAMPLE_STRIDE = 2
#: at most about this many pixels per channel of each sampled field (a larger stride for
#: big fields keeps a plate's sample near 16 × 0.26 M pixels per channel)
PLATE_SAMPLE_PIXELS = 2**18


def check_normalization(normalization: str) -> str:
    value = str(normalization).lower()
    if value not in NORMALIZATIONS:
        from .errors import CellClipError

        raise CellClipError(f"unknown input normalization {normalization!r}; choose "
                            f"{' or '.join(NORMALIZATIONS)}")
    return value


def normalize_range(img: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Rescale each channel of ``img`` (C, H, W) with fixed ``ranges`` (C, 2) = (lo, hi) to [0, 1]
    (float32, a new array; a channel with ``hi <= lo`` becomes zeros)."""
    out = np.array(img, dtype=np.float32, copy=True)
    lo, hi = np.asarray(ranges, dtype=np.float32).T
    scale = hi - lo
    flat_ch = scale <= 0
    out -= lo[:, None, None]
    out /= np.where(flat_ch, np.float32(1.0), scale)[:, None, None]
    out[flat_ch] = 0.0
    np.clip(out, 0.0, 1.0, out=out)
    return out


def plate_samples(fields, max_fields: int = PLATE_SAMPLE_FIELDS) -> dict:
    """``{plate: row positions}`` of up to ``max_fields`` fields spread evenly through each
    plate's rows: the deterministic sample :func:`plate_ranges` reads."""
    from .correction import plate_keys

    plates = plate_keys(fields)
    out = {}
    for plate in dict.fromkeys(plates):
        idx = np.flatnonzero(plates == plate)
        n = min(len(idx), max(1, int(max_fields)))
        out[plate] = idx[np.unique(np.linspace(0, len(idx) - 1, n).round().astype(int))]
    return out


def sample_range(fields, rows, stains: Sequence[str], low: float = NORM_LOW, high: float = NORM_HIGH,
                 stride: int = PLATE_SAMPLE_STRIDE):
    """(C, 2) float32 (lo, hi) percentiles over the given rows' pixels, or None if none is readable."""
    stains = list(stains)
    samples = []
    for i in rows:
        try:
            img = load_field(fields.iloc[int(i)], stains)
        except ImageReadError:
            continue
        h, w = img.shape[-2:]
        k = max(int(stride), math.ceil(math.sqrt(h * w / PLATE_SAMPLE_PIXELS)))
        samples.append(np.asarray(img)[:, ::k, ::k].reshape(len(stains), -1))
    if not samples:
        return None
    pix = np.concatenate(samples, axis=1).astype(np.float32, copy=False)
    return np.percentile(pix, [low, high], axis=1).T.astype(np.float32)


def plate_ranges(fields, stains: Sequence[str], low: float = NORM_LOW, high: float = NORM_HIGH,
                 max_fields: int = PLATE_SAMPLE_FIELDS, stride: int = PLATE_SAMPLE_STRIDE) -> dict:
    """Per plate, per channel intensity range: ``{plate: (C, 2) float32 array of (lo, hi)}``.

    The ``low``/``high`` percentiles over up to ``max_fields`` fields spread evenly
    through the plate's rows (every ``stride``-th pixel in y and x, or a larger
    stride that keeps ≤ :data:`PLATE_SAMPLE_PIXELS` per channel of a big field).  The sample is
    deterministic, so a resumed or repeated job gets the same ranges.  Fields that
    cannot be read are skipped; a plate with no readable field is left out (its
    fields then fail to read anyway, or fall back to per-field normalisation).
    """
    out = {}
    for plate, rows in plate_samples(fields, max_fields).items():
        r = sample_range(fields, rows, stains, low, high, stride)
        if r is not None:
            out[plate] = r
    return out


def field_ranges(fields, stains: Sequence[str], normalization: str = "field", low: float = NORM_LOW,
                 high: float = NORM_HIGH, ranges: dict | None = None) -> list:
    """Per row of ``fields``: its (C, 2) intensity range, or None for per-field percentiles.

    ``ranges``: precomputed ``{plate: range}`` (e.g. from a cache); default :func:`plate_ranges`.
    """
    if check_normalization(normalization) == "field":
        return [None] * len(fields)
    from .correction import plate_keys

    if ranges is None:
        ranges = plate_ranges(fields, stains, low, high)
    return [ranges.get(p) for p in plate_keys(fields)]


def load_field_normalized(row, stains: Sequence[str] | None = None, low: float = NORM_LOW,
                          high: float = NORM_HIGH) -> np.ndarray:
    """:func:`load_field` followed by :func:`normalize`: float32 (C, H, W) in [0, 1]."""
    return normalize(load_field(row, stains), low=low, high=high)


def contrast_limits(img: np.ndarray, low: float = 1.0, high: float = 99.9) -> tuple[float, float]:
    """Display contrast limits for one channel from robust percentiles."""
    a = np.asarray(img)
    a = a[np.isfinite(a)] if a.dtype.kind == "f" else a
    if not a.size:
        return 0.0, 1.0
    lo, hi = np.percentile(a, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)
