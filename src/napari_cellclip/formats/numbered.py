"""Per-channel images numbered by channel (Phenix / Harmony, ImageXpress) and multi-channel TIFFs.

* Phenix / Harmony: ``rXXcYYfZZpPP-chNsk1fk1fl1.(tiff|png)``; channel names from the
  ``Index.idx.xml`` / ``Index.xml`` beside the images (same folder or a parent).  One plane
  per field is read (the lowest plane number, with a warning when there are several).
* ImageXpress: ``<prefix>_<well>_s<site>_w<channel>[UUID].tif``; wavelength names from the
  plate's ``.HTD`` file; the Bray et al. layout of one folder per dye (``24277-Hoechst/``,
  ``24277-ERSyto/`` …) is one plate whose channels are named by those folders.
* one multi-channel TIFF per field with a user pattern (well, site) and the channel axis.

Each folder of images is a plate (named by the Harmony plate ID, the ImageXpress prefix,
or the folder), and channel numbers become stains through
:func:`napari_cellclip.plates.read_plate`'s naming rules.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pandas as pd

from ..errors import PlateError, warn_at_caller
from ..images import TIFF_SUFFIXES
from ..plates import (
    IMAGEXPRESS_RE, PHENIX_RE, _concat_plates, _finish, _match_pattern, _plate_name_for, _stain_names,
    _table_from_channels, normalize_well, well_name,
)
from .dyes import canonical_stain


def find_index_xml(folder: Path, stop: Path | None = None) -> Path | None:
    """A Harmony ``Index.idx.xml`` / ``Index.xml`` in ``folder`` or a parent (up to ``stop``)."""
    folder = Path(folder).resolve()
    stop = Path(stop).resolve() if stop is not None else None
    for d in [folder, *folder.parents]:
        for name in ("Index.idx.xml", "Index.xml", "index.idx.xml", "index.xml"):
            if (d / name).is_file():
                return d / name
        if stop is not None and d == stop.parent:
            break
        if len(d.parts) <= 2:
            break
    return None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_index_xml(path: Path) -> tuple[dict[int, str], str | None]:
    """Channel number -> channel name and the plate ID from a Harmony index file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise PlateError(f"{path}: not a readable Harmony index file ({exc})") from exc
    channels: dict[int, str] = {}
    plate_id = None
    for el in root.iter():
        tag = _local(el.tag)
        if tag == "PlateID" and el.text and plate_id is None:
            plate_id = el.text.strip()
        if tag == "Entry" and "ChannelID" in el.attrib:
            for child in el:
                if _local(child.tag) == "ChannelName" and child.text:
                    channels.setdefault(int(el.attrib["ChannelID"]), child.text.strip())
    return channels, plate_id


def read_htd(folder: Path) -> dict[int, str]:
    """Wavelength number -> name from an ImageXpress ``.HTD`` plate file in ``folder`` or its parent."""
    for d in (folder, folder.parent):
        for f in sorted(d.glob("*.[hH][tT][dD]")):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            names = {int(n): v.strip() for n, v in re.findall(r'"WaveName(\d+)"\s*,\s*"([^"]*)"', text) if v.strip()}
            if names:
                return names
    return {}


def _numbered_record(f: Path, kind: str) -> dict:
    if kind == "phenix":
        m = PHENIX_RE.match(f.name)
        return {"dir": f.parent, "well": well_name(m["row"], m["col"]), "site": int(m["site"]),
                "ch": int(m["ch"]), "plane": int(m["plane"]), "path": f}
    m = IMAGEXPRESS_RE.match(f.name)
    return {"dir": f.parent, "well": normalize_well(m["well"]), "site": int(m["site"]), "ch": int(m["ch"]),
            "path": f, "prefix": m["prefix"]}


def _dye_dir(folder: Path) -> tuple[Path, str] | None:
    """(plate key, dye) for a folder named ``<plate>-<dye>`` (Bray: ``24277-ERSyto``), else None."""
    m = re.match(r"^(?P<plate>[^-]+)-(?P<dye>.+)$", folder.name)
    return (folder.parent / m["plate"], m["dye"]) if m and canonical_stain(m["dye"]) else None


def read_fields(path: Path, files: list[Path], kind: str, channel_map, plate) -> pd.DataFrame:
    """Phenix / ImageXpress: each folder of images is a plate; ``<plate>-<dye>`` sibling folders are one."""
    records = _first_plane(path, [_numbered_record(f, kind) for f in files])
    groups: dict[Path, list[dict]] = defaultdict(list)
    dyes: dict[Path, dict[int, str]] = defaultdict(dict)
    for r in records:
        dd = _dye_dir(r["dir"])
        key = dd[0] if dd else r["dir"]
        groups[key].append(r)
        if dd:
            dyes[key][r["ch"]] = dd[1]
    tables = []
    for key, recs in sorted(groups.items()):
        tables.append(_numbered_plate(path, key, recs, dyes.get(key), channel_map, plate))
    return _concat_plates(path, tables, "folder")


def _first_plane(path: Path, records: list[dict]) -> list[dict]:
    planes = sorted({r["plane"] for r in records if "plane" in r})
    if len(planes) <= 1:
        return records
    warn_at_caller(f"{path}: the images have {len(planes)} planes (p{planes[0]:02d}..p{planes[-1]:02d}); plane "
                   f"p{planes[0]:02d} is read. To use another plane or a projection, write a LoadData CSV naming "
                   "those files.")
    return [r for r in records if r["plane"] == planes[0]]


def _numbered_plate(path: Path, key: Path, recs: list[dict], dye_names, channel_map, plate) -> pd.DataFrame:
    folder = recs[0]["dir"]
    index = find_index_xml(folder, stop=path)
    names, plate_id = read_index_xml(index) if index else ({}, None)
    source = f"the Harmony index {index}" if index else "the folder names"
    if not names and recs[0].get("prefix") is not None:
        names, source = (dye_names, "the folder names") if dye_names else (read_htd(folder), "the .HTD file")
    name = plate or plate_id or (key.name if dye_names else _plate_name_for(folder))
    if recs[0].get("prefix") is not None and not plate and not plate_id and not dye_names:
        prefixes = {r["prefix"] for r in recs}
        name = prefixes.pop() if len(prefixes) == 1 else name
    for r in recs:
        r["plate"] = name
    ids = [r["ch"] for r in recs]
    channel_names = _stain_names(ids, channel_map, names, str(key if dye_names else folder), source)
    return _table_from_channels(recs, channel_names, str(folder))


# --------------------------------------------------------------------------- multi-channel TIFF


def read_multichannel(root: Path, images: list[Path], pattern, axes, channel_map, plate) -> pd.DataFrame:
    if pattern is None:
        raise PlateError("multi-channel TIFFs need a file-name pattern with named groups 'well' and 'site', "
                         r"e.g. '(?P<well>[A-P]\d{2})_s(?P<site>\d+)\.tiff?'")
    if axes is None or str(axes).upper() not in ("CYX", "YXC"):
        raise PlateError(f"state where the channel axis is in the multi-channel TIFFs: axes='CYX' or 'YXC' "
                         f"(got {axes!r})")
    axes = str(axes).upper()
    matched = _match_pattern(root, [f for f in images if f.suffix.lower() in TIFF_SUFFIXES], pattern)
    import tifffile

    n_channels = None
    for f, _ in matched:
        try:
            with tifffile.TiffFile(f) as tf:
                shape = tf.series[0].shape
        except Exception as exc:  # noqa: BLE001
            warn_at_caller(f"{f}: cannot read TIFF header ({exc}); skipped")
            continue
        if len(shape) != 3:
            raise PlateError(f"{f}: expected a 3-D {axes} image, got shape {tuple(shape)}")
        n_channels = shape[0] if axes == "CYX" else shape[-1]
        break
    if n_channels is None:
        raise PlateError(f"{root}: none of the matching TIFF files could be read")
    names = _stain_names(range(1, n_channels + 1), channel_map, None, str(root))
    records = []
    for f, (well, site, p) in matched:
        for ch in range(1, n_channels + 1):
            records.append({"plate": plate or p or _plate_name_for(f.parent), "well": well, "site": site,
                            "ch": ch, "path": f, "frame": ch - 1})
    df = _table_from_channels(records, names, str(root), multi_frame=True)
    df["Metadata_ChannelAxes"] = axes
    return _finish(df, [names[i] for i in sorted(names)], "multichannel")
