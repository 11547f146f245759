"""OME-Zarr HCS plates: OME-NGFF 0.4 (zarr v2) and 0.5 (zarr v3).

Layout (NGFF "plate" specification)::

    plate.ome.zarr/            plate metadata: rows, columns, wells[].path ("B/3")
      B/3/                     well metadata: images[].path ("0", "1", … one per field)
        0/                     image: multiscales (axes, datasets = pyramid levels), omero (channels)
          0/ 1/ 2/ …           one zarr array per pyramid level, full resolution first

In NGFF 0.4 the metadata is each group's ``.zattrs`` (zarr v2); in 0.5 it is the
``attributes.ome`` object of each group's ``zarr.json`` (zarr v3).

**Library choice: plain ``zarr`` (v3, which reads both zarr formats) for the pixel arrays,
and the three small NGFF metadata documents read as JSON here.**  ``ome-zarr`` (ome-zarr-py)
is used by the tests as the *writer*; its reader was not used because it builds a whole-plate
mosaic and opens every image's pyramid while walking the plate, where a Cell Painting
screen needs one field at a time.  ``ome-zarr-models`` validates whole hierarchies with
pydantic: on a real plate (384 wells × 9 fields, several levels each) that is thousands
of metadata reads before the first field is shown, and its errors are validation dumps
rather than a sentence naming the file.  Reading only ``plate → wells → first image``
keeps opening a plate to one metadata file per well, and errors name the file at fault.

:func:`read_fields` turns a plate into fields-table rows: ``PathName_Orig<Stain>`` = the
plate, ``FileName_Orig<Stain>`` = the field's image path inside it (``B/3/0``),
``Frame_Orig<Stain>`` = the channel index; site = the image's position in its well.

Pixels are read lazily: :func:`read_plane` opens one pyramid level of one field and
slices one channel (first time point, Z max-projected, see :mod:`.planes`), so zarr
decodes only the chunks of that channel.  Level 0 (full resolution) goes to the
encoders; napari gets every level as a multiscale layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ImageReadError, PlateError, warn_at_caller
from .planes import check_channel, describe_reduction, to_plane

ZARR_SUFFIXES = (".zarr",)
_V2_META = (".zattrs", ".zgroup", ".zarray")
_UNIT_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "meter": 1e6, "angstrom": 1e-4}


def is_zarr_dir(path) -> bool:
    """A folder that is a zarr group or array (v2 ``.zgroup``/``.zattrs``/``.zarray`` or v3 ``zarr.json``)."""
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in ("zarr.json",) + _V2_META)


def metadata_file(path) -> Path:
    """The file holding a group's attributes: ``zarr.json`` (v3) or ``.zattrs`` (v2)."""
    p = Path(path)
    return p / "zarr.json" if (p / "zarr.json").is_file() else p / ".zattrs"


def _fail(error, f: Path, msg: str):
    return error(f, msg) if error is ImageReadError else error(f"{f}: {msg}")


def ome_attrs(path, error=PlateError) -> dict:
    """A group's OME-NGFF attributes (``attributes.ome`` in 0.5, the ``.zattrs`` object in 0.4).

    Raises ``error`` (PlateError or ImageReadError) naming the metadata file when it is
    missing or not valid JSON.
    """
    f = metadata_file(path)
    if not f.is_file():
        if (Path(path) / ".zgroup").is_file():
            return {}
        raise _fail(error, f, "no zarr metadata (zarr.json or .zattrs)")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(error, f, f"corrupt zarr metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise _fail(error, f, "zarr metadata is not a JSON object")
    if f.name == "zarr.json":
        doc = doc.get("attributes") or {}
    ome = doc.get("ome")
    return ome if isinstance(ome, dict) else doc


def is_plate(path) -> bool:
    """True for the root of an OME-Zarr HCS plate (cheap: reads one metadata file)."""
    if not is_zarr_dir(path):
        return False
    try:
        return isinstance(ome_attrs(path).get("plate"), dict)
    except PlateError:
        return True  # a zarr group whose metadata is broken: let read_plate name the file


# ------------------------------------------------------------------------------ plate
@dataclass
class ZarrPlate:
    name: str
    version: str
    fields: list = field(default_factory=list)  # (row, col, site, image path relative to the plate)
    skipped: list = field(default_factory=list)  # messages about wells that could not be read


def _index(name: str, fallback) -> int | None:
    """1-based row/column number from a row name ("B" -> 2, "AA" -> 27) or a column name ("03" -> 3)."""
    name = str(name)
    if name.isdigit():
        return int(name)
    if name.isalpha():
        n = 0
        for ch in name.upper():
            n = n * 26 + (ord(ch) - 64)
        return n
    return None if fallback is None else int(fallback) + 1


def _well_position(well: dict, plate: dict, f: Path) -> tuple[int, int]:
    path = str(well.get("path", ""))
    parts = path.strip("/").split("/")
    if len(parts) != 2:
        raise PlateError(f"{f}: well path {path!r} is not '<row>/<column>'")
    rows, cols = plate.get("rows") or [], plate.get("columns") or []
    ri, ci = well.get("rowIndex"), well.get("columnIndex")
    row = _index(rows[ri]["name"] if ri is not None and ri < len(rows) else parts[0], None) or _index(parts[0], ri)
    col = _index(cols[ci]["name"] if ci is not None and ci < len(cols) else parts[1], None) or _index(parts[1], ci)
    if not row or not col:
        raise PlateError(f"{f}: cannot tell the row and column of well {path!r}")
    if parts[0].isdigit() and ri is not None:  # numeric row names: trust the index
        row = int(ri) + 1
    return row, col


def read_plate_fields(path) -> ZarrPlate:
    """Every field of an OME-Zarr HCS plate: plate metadata, then each well's image list.

    A well whose metadata is missing or unreadable is skipped (listed in ``skipped``);
    broken plate metadata raises PlateError naming the file.
    """
    root = Path(path)
    attrs = ome_attrs(root)
    f = metadata_file(root)
    plate = attrs.get("plate")
    if not isinstance(plate, dict):
        raise PlateError(f"{f}: no 'plate' metadata; not an OME-Zarr HCS plate")
    wells = plate.get("wells")
    if not isinstance(wells, list) or not wells:
        raise PlateError(f"{f}: the plate metadata lists no wells")
    version = str(plate.get("version") or attrs.get("version") or "")
    name = str(plate.get("name") or re.sub(r"(\.ome)?\.zarr$", "", root.name, flags=re.IGNORECASE))
    out = ZarrPlate(name=name, version=version)
    for well in wells:
        row, col = _well_position(well, plate, f)
        wpath = str(well["path"]).strip("/")
        try:
            images = ome_attrs(root / wpath).get("well", {}).get("images")
        except PlateError as exc:
            out.skipped.append(str(exc))
            continue
        if not images:
            out.skipped.append(f"{metadata_file(root / wpath)}: no 'well' images listed")
            continue
        for site, image in enumerate(images, start=1):
            out.fields.append((row, col, site, f"{wpath}/{str(image['path']).strip('/')}"))
    if not out.fields:
        raise PlateError(f"{root}: no readable well in the plate; " + "; ".join(out.skipped[:5]))
    return out


# ------------------------------------------------------------------------------ image
@dataclass(frozen=True)
class ZarrImage:
    path: Path
    axes: tuple  # lower-case axis names, e.g. ("c", "y", "x")
    datasets: tuple  # array paths, full resolution first
    channel_names: tuple  # omero channel labels (None where missing); () without omero channels
    pixel_size_um: tuple  # (y, x)


def _axes(ms: dict, f: Path) -> tuple:
    axes = ms.get("axes")
    if axes is None:  # NGFF 0.1 / 0.2: always 5-D
        return ("t", "c", "z", "y", "x")
    names = tuple(str(a.get("name") if isinstance(a, dict) else a).lower() for a in axes)
    if names[-2:] != ("y", "x"):
        raise ImageReadError(f, f"unsupported axes {names} (the last two must be y and x)")
    return names


def _pixel_size(ms: dict, axes: tuple) -> tuple:
    units = {}
    for a in ms.get("axes") or []:
        if isinstance(a, dict):
            units[str(a.get("name")).lower()] = _UNIT_TO_UM.get(str(a.get("unit")))
    scale = None
    for t in (ms["datasets"][0].get("coordinateTransformations") or []):
        if t.get("type") == "scale" and len(t.get("scale") or []) == len(axes):
            scale = t["scale"]
    if scale is None:
        return (None, None)
    return tuple(float(scale[axes.index(a)]) * units[a] if units.get(a) is not None else None for a in ("y", "x"))


@lru_cache(maxsize=4096)
def _image_meta(path: str, mtime_ns: int) -> ZarrImage:
    p = Path(path)
    attrs = ome_attrs(p, error=ImageReadError)
    f = metadata_file(p)
    ms_list = attrs.get("multiscales")
    if not isinstance(ms_list, list) or not ms_list or not isinstance(ms_list[0], dict):
        raise ImageReadError(f, "no 'multiscales' metadata: not an OME-Zarr image")
    ms = ms_list[0]
    datasets = tuple(str(d.get("path")) for d in ms.get("datasets") or [] if isinstance(d, dict) and d.get("path"))
    if not datasets:
        raise ImageReadError(f, "the multiscales metadata lists no datasets")
    axes = _axes(ms, f)
    channels = (attrs.get("omero") or {}).get("channels") if isinstance(attrs.get("omero"), dict) else None
    names = tuple((c.get("label") or None) if isinstance(c, dict) else None for c in channels or [])
    return ZarrImage(path=p, axes=axes, datasets=datasets, channel_names=names,
                     pixel_size_um=_pixel_size(ms, axes))


def image_meta(path) -> ZarrImage:
    """Multiscales + omero metadata of one image (field); cached while its metadata file is unchanged."""
    f = metadata_file(path)
    try:
        mtime = f.stat().st_mtime_ns
    except OSError:
        raise ImageReadError(path, "no zarr metadata (zarr.json or .zattrs): not an OME-Zarr image") from None
    return _image_meta(str(Path(path)), mtime)


def _open_level(path: Path, meta: ZarrImage, level: int):
    try:
        import zarr
    except ImportError:
        raise ImageReadError(path, "reading OME-Zarr pixels needs the zarr package (Python >= 3.11: "
                                   "pip install 'zarr>=3')") from None
    if not 0 <= level < len(meta.datasets):
        raise ImageReadError(path, f"pyramid level {level} out of range ({len(meta.datasets)} levels)")
    try:
        arr = zarr.open_array(str(path / meta.datasets[level]), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a bad array
        raise ImageReadError(path / meta.datasets[level], f"cannot open the zarr array ({type(exc).__name__}: "
                                                          f"{exc})") from exc
    if arr.ndim != len(meta.axes):
        raise ImageReadError(path / meta.datasets[level], f"array has {arr.ndim} dimensions but the "
                                                          f"metadata names {len(meta.axes)} axes {meta.axes}")
    return arr


def image_shape(path, level: int = 0) -> dict:
    """``{axis name: size}`` of one pyramid level (metadata only)."""
    meta = image_meta(path)
    return dict(zip(meta.axes, _open_level(Path(path), meta, level).shape))


def level_shapes(path) -> list[tuple[int, int]]:
    """(H, W) of every pyramid level, full resolution first (array metadata only)."""
    meta = image_meta(path)
    return [tuple(int(v) for v in _open_level(Path(path), meta, lv).shape[-2:]) for lv in range(len(meta.datasets))]


def read_plane(path, channel: int | None, level: int = 0) -> np.ndarray:
    """Channel ``channel`` (0-based) of one image at pyramid ``level`` as a 2-D array.

    First time point, Z max-projected; only the chunks holding that channel are decoded.
    """
    path = Path(path)
    meta = image_meta(path)
    arr = _open_level(path, meta, level)
    n_channels = arr.shape[meta.axes.index("c")] if "c" in meta.axes else 1
    channel = check_channel(path, channel, n_channels)
    index = tuple(int(channel) if a == "c" else slice(None) if a in ("z", "y", "x") else 0 for a in meta.axes)
    try:
        data = np.asarray(arr[index])
    except Exception as exc:  # noqa: BLE001 - missing / corrupt chunks, codec errors
        raise ImageReadError(path / meta.datasets[level], f"cannot decode channel {channel} "
                                                          f"({type(exc).__name__}: {exc})") from exc
    return to_plane(data, "ZYX" if "z" in meta.axes else "YX")


def _level0_stats(path: Path) -> tuple[Path, tuple]:
    """(level-0 array folder, ((relative path, size, mtime_ns), …) of its files, sorted)."""
    level0 = path / image_meta(path).datasets[0]
    files = sorted(p for p in level0.rglob("*") if p.is_file())
    return level0, tuple((str(p.relative_to(level0)), st.st_size, st.st_mtime_ns)
                         for p, st in ((p, p.stat()) for p in files))


def image_stamp(path) -> str:
    """A cheap change stamp of an image (sizes and modification times of its metadata and
    full-resolution array files, no content read): what a file's size:mtime is to a file."""
    path = Path(path)
    meta = metadata_file(path).stat()
    _, stats = _level0_stats(path)
    size = meta.st_size + sum(st[1] for st in stats)
    mtime = max([meta.st_mtime_ns] + [st[2] for st in stats])
    return f"{size}:{mtime}:{len(stats)}"


def image_digest(path) -> str:
    """blake2b (20 bytes, hex) of an image's metadata and every file of its full-resolution array.

    The content digest that keys the feature cache for a zarr field (a regular file's is
    the digest of its bytes); memoised while no file changes size or mtime.  Raises
    OSError when the image cannot be read.
    """
    path = Path(path)
    level0, stats = _level0_stats(path)
    return _tree_digest(str(path), str(metadata_file(path)), str(level0), stats)


@lru_cache(maxsize=8192)
def _tree_digest(image: str, meta_file: str, level0: str, stats: tuple) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(Path(meta_file).read_bytes())
    for rel, size, _ in stats:
        h.update(f"\0{rel}\0{size}\0".encode())
        with open(os.path.join(level0, rel), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------- fields table


def read_fields(path: Path, roots: list[Path], channel_map, plate) -> pd.DataFrame:
    """Fields-table rows of the OME-Zarr HCS plate(s) ``roots`` (found under ``path``)."""
    from ..plates import _concat_plates

    tables = []
    for root in roots:
        if not is_plate(root):
            if len(roots) == 1 and root == path:
                raise PlateError(f"{root}: an OME-Zarr folder without HCS 'plate' metadata (an image or well?); "
                                 "open the plate's root folder")
            warn_at_caller(f"{root}: not an OME-Zarr HCS plate; skipped")
            continue
        tables.append(_read_zarr_plate(root.resolve(), channel_map, plate))
    if not tables:
        raise PlateError(f"{path}: no OME-Zarr HCS plate found")
    return _concat_plates(path, tables, "ome-zarr")


def _read_zarr_plate(root: Path, channel_map, plate) -> pd.DataFrame:
    from ..plates import _finish, _stain_names, _table_from_channels, well_name

    zp = read_plate_fields(root)
    if zp.skipped:
        warn_at_caller(f"{root}: skipped {len(zp.skipped)} well(s) with unreadable metadata: "
                       + "; ".join(zp.skipped[:5]))
    first = root / zp.fields[0][3]
    meta = image_meta(first)
    shape = image_shape(first)
    n_channels = shape.get("c", 1)
    note = describe_reduction(shape.get("t", 1), shape.get("z", 1))
    if note:
        warn_at_caller(f"{root}: {note}.")
    names = dict(enumerate(meta.channel_names, start=1))
    if not meta.channel_names:
        names = {}
        warn_at_caller(f"{metadata_file(first)}: no 'omero' channel labels")
    channel_names = _stain_names(range(1, n_channels + 1), channel_map, names, str(root),
                                 "the omero channel labels")
    px = dict(zip(("Metadata_PixelSizeY", "Metadata_PixelSizeX"), meta.pixel_size_um))
    # FileName = the field's image path inside the plate ("B/3/0"), PathName = the plate
    records = [{"plate": plate or zp.name, "well": well_name(r, c), "site": site, "ch": ch + 1,
                "path": root / rel, "file": rel, "folder": str(root), "frame": ch,
                "meta": {k: v for k, v in px.items() if v is not None}}
               for r, c, site, rel in zp.fields for ch in range(n_channels)]
    df = _table_from_channels(records, channel_names, str(root), multi_frame=True)
    return _finish(df, [channel_names[i] for i in sorted(channel_names)], "ome-zarr")
