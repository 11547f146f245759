"""OME-TIFF: one file per field of view, described by the OME-XML it carries.

What is read from the OME-XML (through tifffile, which also decodes every TIFF
compression imagecodecs provides):

* the image's axes and shape (``CYX``, ``ZCYX``, ``TCZYX`` …, as tifffile reports the
  image series: singleton axes dropped);
* per channel ``Channel@Name`` (turned into stain names by :mod:`.dyes`);
* ``Pixels@PhysicalSizeX/Y`` with their units, in micrometres;
* where the file has a ``Plate`` element: the well (``Well@Row``/``@Column``, 0-based) and
  the field (the image's position among its well's ``WellSample`` elements) of this
  file's image, and ``Plate@Name``;
* pyramid levels (SubIFDs), so napari can show a multiscale layer.

A field's stain image is one channel: the first time point (T) and, for a Z stack, the
maximum-intensity projection over Z (:func:`.planes.to_plane`).  Only the TIFF pages of
that channel (and time point) are decoded.

:func:`read_fields` turns a folder of them into fields-table rows (``Frame_Orig<Stain>`` =
channel index), with well and site from a user pattern, the OME plate metadata, or the
file name (:func:`napari_cellclip.plates.parse_well_site`), in that order.

When the OME-XML lists several images (a multi-file OME-TIFF data set, where every file
repeats the whole metadata), the image whose pages are stored in *this* file is used.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ImageReadError, PlateError, warn_at_caller
from ..plates import (
    _finish, _match_pattern, _plate_name_for, _stain_names, _table_from_channels, parse_well_site, well_name,
)
from .planes import check_channel, describe_reduction, to_plane

OME_SUFFIXES = (".ome.tif", ".ome.tiff")

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6, "Å": 1e-4, "pm": 1e-6}


def is_ome_tiff_name(name) -> bool:
    """True for ``*.ome.tif`` / ``*.ome.tiff`` (any case)."""
    return str(name).lower().endswith(OME_SUFFIXES)


@dataclass
class OmeTiffInfo:
    """What one OME-TIFF says about the field it holds."""

    path: Path
    axes: str
    shape: tuple
    channel_names: list = field(default_factory=list)  # per channel; None where unnamed
    pixel_size_um: tuple = (None, None)  # (y, x)
    plate: str | None = None
    well: tuple | None = None  # (row, column), 1-based
    site: int | None = None
    levels: int = 1

    @property
    def n_channels(self) -> int:
        return int(self.shape[self.axes.index("C")]) if "C" in self.axes else 1

    def size(self, axis: str) -> int:
        return int(self.shape[self.axes.index(axis)]) if axis in self.axes else 1


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el, name):
    return [c for c in el if _local(c.tag) == name]


def _series_index(tf) -> int:
    """Index of the first image series whose pages are stored in this file."""
    for i, s in enumerate(tf.series):
        try:
            page = s.pages[0] if len(s.pages) else None
        except Exception:  # noqa: BLE001 - a page in a missing companion file
            page = None
        if page is not None and getattr(page, "parent", tf) is tf:
            return i
    return 0


def _physical_size(pixels, axis: str):
    value = pixels.attrib.get(f"PhysicalSize{axis}")
    if value is None:
        return None
    unit = pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm")
    try:
        return float(value) * _UNIT_TO_UM.get(unit, 1.0)
    except ValueError:
        return None


def _plate_position(root, image_id: str):
    """(plate name, (row, col) 1-based, site 1-based) of ``image_id`` from the Plate elements."""
    for plate in (el for el in root if _local(el.tag) == "Plate"):
        for well in _children(plate, "Well"):
            samples = _children(well, "WellSample")
            samples.sort(key=lambda s: int(s.attrib.get("Index", 0) or 0))
            for k, sample in enumerate(samples):
                refs = _children(sample, "ImageRef")
                if refs and refs[0].attrib.get("ID") == image_id:
                    try:
                        row, col = int(well.attrib["Row"]) + 1, int(well.attrib["Column"]) + 1
                    except (KeyError, ValueError):
                        return plate.attrib.get("Name"), None, None
                    return plate.attrib.get("Name"), (row, col), k + 1
    return None, None, None


def _parse_xml(path: Path, xml: str, image_index: int, info: OmeTiffInfo) -> None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ImageReadError(path, f"the OME-XML cannot be parsed ({exc})") from None
    images = [el for el in root if _local(el.tag) == "Image"]
    if not images:
        raise ImageReadError(path, "the OME-XML describes no Image")
    image = images[min(image_index, len(images) - 1)]
    pixels = next(iter(_children(image, "Pixels")), None)
    if pixels is None:
        raise ImageReadError(path, f"OME-XML image {image.attrib.get('ID')} has no Pixels element")
    names = [c.attrib.get("Name") or None for c in _children(pixels, "Channel")]
    n = info.n_channels
    info.channel_names = (names + [None] * n)[:n] if names else [None] * n
    info.pixel_size_um = (_physical_size(pixels, "Y"), _physical_size(pixels, "X"))
    info.plate, info.well, info.site = _plate_position(root, image.attrib.get("ID", ""))


def probe(path) -> OmeTiffInfo:
    """Read an OME-TIFF's header and OME-XML (no pixels).  Raises ImageReadError naming the file."""
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.is_ome:
                raise ImageReadError(path, "named .ome.tif(f) but carries no OME-XML")
            k = _series_index(tf)
            series = tf.series[k]
            info = OmeTiffInfo(path=path, axes=series.axes.upper(), shape=tuple(series.shape),
                               levels=len(series.levels))
            xml = tf.ome_metadata
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on bad files
        raise ImageReadError(path, f"cannot read the OME-TIFF header ({type(exc).__name__}: {exc})") from exc
    if "S" in info.axes:
        raise ImageReadError(path, f"an RGB image (axes {info.axes}), not one plane per fluorescence channel")
    if info.axes[-2:] != "YX":
        raise ImageReadError(path, f"unsupported axes {info.axes} (the last two must be Y and X)")
    _parse_xml(path, xml, k, info)
    return info


def read_plane(path, channel: int | None, level: int = 0, *, tiff=None) -> np.ndarray:
    """One channel of the OME-TIFF's image as a 2-D array: first time point, Z max-projected.

    ``channel`` is 0-based; None is allowed for a single-channel image.  ``level`` picks a
    pyramid level (0 = full resolution).  Only the pages of that channel are decoded.
    ``tiff``: the file already open as a ``tifffile.TiffFile``.
    """
    import tifffile

    path = Path(path)
    if tiff is None:
        with tifffile.TiffFile(path) as tf:
            return read_plane(path, channel, level, tiff=tf)
    k = _series_index(tiff)
    series = tiff.series[k]
    axes, shape = series.axes.upper(), tuple(series.shape)
    if "S" in axes or axes[-2:] != "YX":
        raise ImageReadError(path, f"unsupported OME-TIFF axes {axes}")
    n_channels = shape[axes.index("C")] if "C" in axes else 1
    channel = check_channel(path, channel, n_channels)
    if not 0 <= level < len(series.levels):
        raise ImageReadError(path, f"pyramid level {level} out of range ({len(series.levels)} levels)")
    lead_axes, lead_shape = axes[:-2], shape[:-2]
    if not lead_axes:
        return np.asarray(tiff.asarray(series=k, level=level))
    grids = [np.arange(n) if a == "Z" else np.array([int(channel) if a == "C" else 0])
             for a, n in zip(lead_axes, lead_shape)]
    index = np.ravel_multi_index(np.meshgrid(*grids, indexing="ij"), lead_shape).ravel()
    planes = np.asarray(tiff.asarray(key=index.tolist(), series=k, level=level))
    return to_plane(planes.reshape((-1,) + planes.shape[-2:]), "ZYX")


def level_shapes(path, *, tiff=None) -> list[tuple[int, int]]:
    """(H, W) of every pyramid level of the file's image, full resolution first."""
    import tifffile

    if tiff is None:
        with tifffile.TiffFile(path) as tf:
            return level_shapes(path, tiff=tf)
    series = tiff.series[_series_index(tiff)]
    return [tuple(int(v) for v in lv.shape[-2:]) for lv in series.levels]


# ------------------------------------------------------------------------- fields table


def _ome_position(f: Path, hits: dict, info, from_xml: bool) -> tuple[str, int, str | None] | None:
    """(well, site, plate from the XML) of an OME-TIFF: the pattern, the OME plate metadata, else the name."""
    if f in hits:
        return hits[f]
    if from_xml:
        info = info or probe(f)
        if info.well is not None:
            return well_name(*info.well), info.site or 1, info.plate
    pos = parse_well_site(f.name)
    return (pos[0], pos[1] or 1, None) if pos else None


def read_fields(root: Path, files: list[Path], channel_map, plate, pattern) -> pd.DataFrame:
    """One OME-TIFF per field; well/site from the OME plate metadata, the pattern or the name."""
    hits = dict(_match_pattern(root, files, pattern)) if pattern else {}
    files = sorted(hits) if pattern else sorted(files)
    first = probe(files[0])
    records, unplaced = [], []
    for f in files:
        pos = _ome_position(f, hits, first if f == files[0] else None, first.well is not None)
        if pos is None:
            unplaced.append(f.name)
            continue
        well, site, xml_plate = pos
        for ch in range(first.n_channels):
            records.append({"plate": plate or xml_plate or first.plate or _plate_name_for(f.parent), "well": well,
                            "site": site, "ch": ch + 1, "path": f, "frame": ch, "meta": _pixel_meta(first)})
    if unplaced:
        raise PlateError(f"{root}: cannot tell the well and field of {len(unplaced)} OME-TIFF(s) (e.g. "
                         f"{', '.join(unplaced[:3])}): neither the OME-XML (Plate/Well/WellSample) nor the name says. "
                         r"Give pattern=r'(?P<well>[A-P]\d{2})_s(?P<site>\d+)' (named groups well, site).")
    note = describe_reduction(first.size("T"), first.size("Z"))
    if note:
        warn_at_caller(f"{root}: {note}.")
    names = dict(enumerate(first.channel_names, start=1))
    channel_names = _stain_names(range(1, first.n_channels + 1), channel_map, names, str(files[0]),
                                 "the OME-XML channel names")
    df = _table_from_channels(records, channel_names, str(root), multi_frame=True)
    return _finish(df, [channel_names[i] for i in sorted(channel_names)], "ome-tiff")


def _pixel_meta(info) -> dict:
    y, x = info.pixel_size_um
    return {"Metadata_PixelSizeY": y, "Metadata_PixelSizeX": x} if x is not None and y is not None else {}
