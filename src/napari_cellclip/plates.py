"""Find the fields of view of a plate and the stain of every channel.

Layouts read (recursively under a folder):

* Phenix / Harmony exports: ``rXXcYYfZZpPP-chNsk1fk1fl1.(tiff|tif|png)``;
* ImageXpress: ``<prefix>_<well>_s<site>_w<channel><optional 36-char UUID>.tif``;
* one multi-channel TIFF per field, with well and site from a user-given regular
  expression (named groups ``well``, ``site``, optionally ``plate``, ``row``,
  ``col``) and the channel axis stated explicitly (``CYX`` or ``YXC``);
* a CellProfiler LoadData CSV (the Cell Painting Gallery manifest): one row per
  field with ``Metadata_Plate/Well/Site`` and per stain ``FileName_Orig<Stain>``
  + ``PathName_Orig<Stain>``.  A folder holding such a CSV is read through it.

The result is always a *fields table* in LoadData form (absolute
``PathName_Orig*``), so a table read from any layout can be written back as a
manifest with :func:`write_load_data`.

Stain names come from a LoadData CSV, from a Harmony ``Index.idx.xml`` /
``Index.xml`` beside the images (same folder or a parent), or from a mapping the
user gives; otherwise channels stay ``ch1..chN`` and a warning says so.  Nothing
is guessed silently.
"""

from __future__ import annotations

import json
import re
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

from .errors import CellClipWarning, PlateError
from .images import IMAGE_SUFFIXES, TIFF_SUFFIXES

DEFAULT_STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")

PHENIX_RE = re.compile(
    r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d{2,3})p(?P<plane>\d{2})-ch(?P<ch>\d+)"
    r"sk\d+fk\d+fl\d+\.(?:tiff?|png)$",
    re.IGNORECASE,
)
IMAGEXPRESS_RE = re.compile(
    r"^(?P<prefix>.+?)_(?P<well>[A-Za-z]{1,2}\d{1,2})_s(?P<site>\d+)_w(?P<ch>\d+)"
    r"(?P<uuid>[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})?"
    r"\.tiff?$",
    re.IGNORECASE,
)
WELL_RE = re.compile(r"^(?P<row>[A-Za-z]{1,2})(?P<col>\d{1,2})$")

# Unambiguous stain / dye names -> canonical Cell Painting stain.  Fluorophore
# names alone (e.g. "Alexa 488") are *not* mapped: their stain differs between
# experiments, so they stay as they are and the user is asked for a mapping.
STAIN_ALIASES = {
    "dna": "DNA", "hoechst": "DNA", "hoechst 33342": "DNA", "dapi": "DNA", "nuclei": "DNA",
    "er": "ER", "cona": "ER", "concanavalin a": "ER", "concanavalin": "ER",
    "rna": "RNA", "syto": "RNA", "syto 14": "RNA", "syto14": "RNA",
    "agp": "AGP", "phalloidin": "AGP", "wga": "AGP", "phalloidin/wga": "AGP", "actin": "AGP",
    "mito": "Mito", "mitotracker": "Mito", "mitotracker deep red": "Mito", "mitochondria": "Mito",
}


def canonical_stain(name: str) -> str | None:
    """Canonical stain for an unambiguous stain or dye name, else None."""
    key = re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()
    if key in STAIN_ALIASES:
        return STAIN_ALIASES[key]
    for alias, stain in STAIN_ALIASES.items():
        if len(alias) > 3 and key.startswith(alias):
            return stain
    return None


def well_name(row: int | str, col: int | str) -> str:
    """Well name from 1-based row and column numbers: (1, 1) -> 'A01', (27, 3) -> 'AA03'."""
    r, c = int(row), int(col)
    if r < 1 or c < 1:
        raise PlateError(f"invalid well position row={row} column={col}")
    letters = ""
    while r > 0:
        r, rem = divmod(r - 1, 26)
        letters = chr(65 + rem) + letters
    return f"{letters}{c:02d}"


def normalize_well(name) -> str:
    """'a1' / 'A1' / 'A01' -> 'A01'; raises PlateError for anything else."""
    m = WELL_RE.match(str(name).strip())
    if not m:
        raise PlateError(f"unknown well name {name!r} (expected a row letter and a column number, e.g. 'A01')")
    return f"{m['row'].upper()}{int(m['col']):02d}"


def stains(fields: pd.DataFrame) -> list[str]:
    """Stain names of a fields table, in its channel order."""
    return [c[len("FileName_Orig"):] for c in fields.columns if c.startswith("FileName_Orig")]


def reorder_stains(fields: pd.DataFrame, order: Sequence[str] = DEFAULT_STAINS) -> pd.DataFrame:
    """Put the stain columns in ``order`` (e.g. a checkpoint's canonical order).

    Raises PlateError naming the stains the table lacks.  Stains not in
    ``order`` are dropped from the channel columns.
    """
    have = stains(fields)
    missing = [s for s in order if s not in have]
    if missing:
        raise PlateError(
            f"the plate has stains {have} but {list(order)} are needed; missing {missing}. "
            "Give a channel map (e.g. 1=DNA,2=ER,3=RNA,4=AGP,5=Mito) if the channels are only numbered."
        )
    channel_cols = [c for c in fields.columns if re.match(r"^(FileName|PathName|Frame)_Orig", c)]
    other = [c for c in fields.columns if c not in channel_cols]
    ordered = []
    for s in order:
        for prefix in ("FileName", "PathName", "Frame"):
            col = f"{prefix}_Orig{s}"
            if col in fields.columns:
                ordered.append(col)
    return fields[other + ordered]


# --------------------------------------------------------------------------- channel maps


def parse_channel_map(spec) -> dict[int, str]:
    """Channel number -> stain from a dict, a ``"1=DNA,2=ER"`` string or a file.

    A file may be JSON (``{"1": "DNA", ...}`` or ``{"ch1": "DNA"}``), or text with
    one ``1=DNA`` / ``1,DNA`` / ``ch1: DNA`` per line.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = spec.items()
    else:
        text = str(spec)
        path = Path(text)
        if "=" not in text and path.suffix.lower() in (".json", ".txt", ".csv", ".tsv", ".yaml", ".yml") \
                or path.is_file():
            if not path.is_file():
                raise PlateError(f"channel map file not found: {path}")
            text = path.read_text()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None
            if isinstance(data, Mapping):
                items = data.items()
            else:
                items = [re.split(r"\s*[=,:\t]\s*", ln.strip(), maxsplit=1) for ln in text.splitlines()
                         if ln.strip() and not ln.lstrip().startswith("#")]
        else:
            items = [re.split(r"\s*[=:]\s*", part.strip(), maxsplit=1) for part in text.split(",") if part.strip()]
    out: dict[int, str] = {}
    for item in items:
        if len(item) != 2:
            raise PlateError(f"cannot read channel map entry {item!r}; use e.g. 1=DNA")
        key, value = item
        m = re.match(r"^(?:ch|w|c)?(\d+)$", str(key).strip(), re.IGNORECASE)
        if not m or not str(value).strip():
            raise PlateError(f"cannot read channel map entry {key!r}: {value!r}; use e.g. 1=DNA")
        out[int(m.group(1))] = str(value).strip()
    if len(set(out.values())) != len(out):
        raise PlateError(f"channel map gives the same stain to several channels: {out}")
    return out


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


def _stain_names(channel_ids: Iterable[int], channel_map, index_names: Mapping[int, str] | None,
                 where: str) -> tuple[dict[int, str], str]:
    """Resolve channel numbers to stain names; returns (mapping, source)."""
    ids = sorted(set(channel_ids))
    user = parse_channel_map(channel_map)
    if user:
        missing = [i for i in ids if i not in user]
        if missing:
            raise PlateError(f"{where}: the channel map {user} has no stain for channel(s) {missing}")
        return {i: user[i] for i in ids}, "user"
    if index_names:
        out = {}
        unknown = []
        for i in ids:
            raw = index_names.get(i, f"ch{i}")
            stain = canonical_stain(raw)
            if stain is None:
                unknown.append(f"ch{i} {raw!r}")
                stain = re.sub(r"[^0-9A-Za-z]+", "", raw) or f"ch{i}"
            out[i] = stain
        if unknown:
            warnings.warn(
                f"{where}: channel names {', '.join(unknown)} from the Harmony index are not stain names; "
                "they are kept as they are. Give a channel map (e.g. 1=DNA,2=ER,3=RNA,4=AGP,5=Mito) "
                "to use them with a model.",
                CellClipWarning, stacklevel=3,
            )
        if len(set(out.values())) == len(out):
            return out, "index_xml"
    warnings.warn(
        f"{where}: no LoadData CSV, Harmony index or channel map names the stains; channels are kept as "
        f"{', '.join(f'ch{i}' for i in ids)}. Give a channel map (e.g. 1=DNA,2=ER,3=RNA,4=AGP,5=Mito).",
        CellClipWarning, stacklevel=3,
    )
    return {i: f"ch{i}" for i in ids}, "numbered"


# --------------------------------------------------------------------------- LoadData CSV


def is_load_data_csv(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return False
    return "FileName_Orig" in header and "Metadata_Well" in header


def read_load_data(path, *, plate: str | None = None) -> pd.DataFrame:
    """Read a CellProfiler LoadData CSV into a fields table.

    Relative ``PathName_Orig*`` resolve against the CSV's folder; extra
    ``Metadata_*`` columns are carried along.
    """
    path = Path(path)
    if not path.is_file():
        raise PlateError(f"LoadData CSV not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise PlateError(f"{path}: cannot read as CSV ({exc})") from exc
    if df.empty:
        raise PlateError(f"{path}: the LoadData CSV has no rows")
    names = [c[len("FileName_Orig"):] for c in df.columns if c.startswith("FileName_Orig")]
    if not names:
        raise PlateError(f"{path}: no FileName_Orig<Stain> columns (is this a CellProfiler LoadData CSV?)")
    need = ["Metadata_Well", "Metadata_Site"] + ([] if plate else ["Metadata_Plate"])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise PlateError(f"{path}: missing column(s) {missing}")
    if plate:
        df["Metadata_Plate"] = plate
    base = path.parent.resolve()
    for stain in names:
        pcol = f"PathName_Orig{stain}"
        if pcol not in df.columns:
            df[pcol] = "."
        df[pcol] = [str((base / p).resolve()) if not Path(p).is_absolute() else p
                    for p in df[pcol].replace("", ".")]
        fcol = f"Frame_Orig{stain}"
        if fcol in df.columns:
            df[fcol] = pd.to_numeric(df[fcol], errors="coerce").astype("Int64")
    bad = []
    wells = []
    for i, w in enumerate(df["Metadata_Well"]):
        try:
            wells.append(normalize_well(w))
        except PlateError:
            bad.append(f"row {i + 2}: {w!r}")
            wells.append(None)
    if bad:
        raise PlateError(f"{path}: unknown well name(s) {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
    df["Metadata_Well"] = wells
    try:
        df["Metadata_Site"] = df["Metadata_Site"].astype(int)
    except ValueError as exc:
        raise PlateError(f"{path}: Metadata_Site must be whole numbers ({exc})") from exc
    df["Metadata_Plate"] = df["Metadata_Plate"].astype(str)
    return _finish(df, names, source="load_data")


def write_load_data(fields: pd.DataFrame, path) -> Path:
    """Write a fields table as a LoadData CSV (the manifest format for every layout)."""
    from ._fsutil import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        fields.to_csv(tmp, index=False)
    return path


def _finish(df: pd.DataFrame, stain_names: Sequence[str], source: str) -> pd.DataFrame:
    meta = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    extra_meta = [c for c in df.columns if c.startswith("Metadata_") and c not in meta]
    chan = []
    for s in stain_names:
        chan += [f"FileName_Orig{s}", f"PathName_Orig{s}"]
        if f"Frame_Orig{s}" in df.columns:
            chan.append(f"Frame_Orig{s}")
    other = [c for c in df.columns if c not in meta + extra_meta + chan]
    out = df[meta + extra_meta + chan + other]
    dup = out.duplicated(meta)
    if dup.any():
        first = out.loc[dup, meta].iloc[0].tolist()
        raise PlateError(f"field {first} (plate, well, site) appears more than once")
    out = out.sort_values(meta, kind="stable").reset_index(drop=True)
    out.attrs["stain_source"] = source
    return out


# --------------------------------------------------------------------------- folders


def _plate_name_for(folder: Path) -> str:
    name = folder.name
    if name.lower() in ("images", "timepoint_1") or re.match(r"^timepoint_\d+$", name, re.IGNORECASE):
        name = folder.parent.name
    return name.split("__")[0] or name


def _table_from_channels(records: list[dict], channel_names: dict[int, str], where: str,
                         multi_frame: bool = False) -> pd.DataFrame:
    """records: plate, well, site, ch, path (+frame).  Drops fields missing a channel, with a warning."""
    by_field: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        key = (r["plate"], r["well"], r["site"])
        if r["ch"] in by_field[key]:
            raise PlateError(f"{where}: two files for plate {key[0]} well {key[1]} site {key[2]} channel "
                             f"{r['ch']}: {by_field[key][r['ch']]['path']} and {r['path']}")
        by_field[key][r["ch"]] = r
    ids = sorted(channel_names)
    rows = []
    skipped = []
    for (plate, well, site), chans in by_field.items():
        missing = [i for i in ids if i not in chans]
        if missing:
            skipped.append(f"{plate} {well} site {site} (missing {', '.join(channel_names[i] for i in missing)})")
            continue
        row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site}
        for i in ids:
            p = Path(chans[i]["path"])
            s = channel_names[i]
            row[f"FileName_Orig{s}"] = p.name
            row[f"PathName_Orig{s}"] = str(p.parent)
            if multi_frame:
                row[f"Frame_Orig{s}"] = chans[i]["frame"]
        rows.append(row)
    if skipped:
        warnings.warn(f"{where}: skipped {len(skipped)} field(s) that lack a channel: " + "; ".join(skipped[:10])
                      + (" ..." if len(skipped) > 10 else ""), CellClipWarning, stacklevel=3)
    if not rows:
        raise PlateError(f"{where}: no field has all channels {[channel_names[i] for i in ids]}")
    return pd.DataFrame(rows)


def _scan(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_plate(
    path,
    *,
    channel_map=None,
    layout: str = "auto",
    pattern: str | None = None,
    axes: str | None = None,
    plate: str | None = None,
) -> pd.DataFrame:
    """Read a plate folder or a LoadData CSV into a fields table.

    Parameters
    ----------
    path : folder or LoadData CSV
    channel_map : ``{1: "DNA", ...}``, ``"1=DNA,2=ER,..."`` or a file; names the channels of
        Phenix / ImageXpress / multi-channel files (overrides a Harmony index).
    layout : "auto", "load_data", "phenix", "imagexpress" or "multichannel".
    pattern : regular expression with named groups ``well`` (or ``row`` and ``col``) and ``site``
        (optionally ``plate``) matched against file names, for one multi-channel TIFF per field.
    axes : "CYX" or "YXC", where the channel axis is in multi-channel TIFFs (required with them).
    plate : plate name to use instead of the folder / CSV value.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise PlateError(f"not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return read_load_data(path, plate=plate)
        raise PlateError(f"{path}: give a plate folder or a LoadData CSV")
    files = _scan(path)
    if not files:
        raise PlateError(f"{path}: the folder is empty")

    if layout in ("auto", "load_data"):
        csvs = [f for f in files if f.suffix.lower() == ".csv" and is_load_data_csv(f)]
        if csvs:
            tables = [read_load_data(c, plate=plate) for c in csvs]
            names = [stains(t) for t in tables]
            if any(n != names[0] for n in names):
                raise PlateError(f"{path}: the LoadData CSVs name different stains: "
                                 + "; ".join(f"{c.name}: {n}" for c, n in zip(csvs, names)))
            df = pd.concat(tables, ignore_index=True)
            return _finish(df, names[0], "load_data")
        if layout == "load_data":
            raise PlateError(f"{path}: no LoadData CSV (with FileName_Orig<Stain> columns) found")

    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if layout == "multichannel" or pattern is not None:
        return _read_multichannel(path, images, pattern, axes, channel_map, plate)

    records = []
    for f in images:
        if layout in ("auto", "phenix"):
            m = PHENIX_RE.match(f.name)
            if m:
                records.append({"layout": "phenix", "dir": f.parent, "well": well_name(m["row"], m["col"]),
                                "site": int(m["site"]), "ch": int(m["ch"]), "path": f})
                continue
        if layout in ("auto", "imagexpress"):
            m = IMAGEXPRESS_RE.match(f.name)
            if m:
                records.append({"layout": "imagexpress", "dir": f.parent, "well": normalize_well(m["well"]),
                                "site": int(m["site"]), "ch": int(m["ch"]), "path": f,
                                "prefix": m["prefix"]})
    if not records:
        examples = ", ".join(f.name for f in files[:3])
        raise PlateError(
            f"{path}: no recognised image names among {len(files)} file(s) (e.g. {examples}). Supported: "
            "Phenix 'r01c01f01p01-ch1sk1fk1fl1.tiff', ImageXpress 'plate_A01_s1_w1.tif', a LoadData CSV, "
            "or multi-channel TIFFs with a pattern and axes."
        )
    # group by folder: each folder of images is one plate
    tables = []
    by_dir: dict[Path, list[dict]] = defaultdict(list)
    for r in records:
        by_dir[r["dir"]].append(r)
    for folder, recs in sorted(by_dir.items()):
        index = find_index_xml(folder, stop=path)
        index_names, plate_id = read_index_xml(index) if index else ({}, None)
        name = plate or plate_id or _plate_name_for(folder)
        if recs[0]["layout"] == "imagexpress" and not plate and not plate_id:
            prefixes = {r["prefix"] for r in recs}
            name = prefixes.pop() if len(prefixes) == 1 else name
        for r in recs:
            r["plate"] = name
        names, _source = _stain_names([r["ch"] for r in recs], channel_map, index_names, str(folder))
        tables.append(_table_from_channels(recs, names, str(folder)))
    stain_sets = {tuple(stains(t)) for t in tables}
    if len(stain_sets) > 1:
        raise PlateError(f"{path}: plates under this folder have different stains: {sorted(stain_sets)}")
    df = pd.concat(tables, ignore_index=True)
    return _finish(df, stains(tables[0]), "folder")


def _read_multichannel(root: Path, images: list[Path], pattern, axes, channel_map, plate) -> pd.DataFrame:
    if pattern is None:
        raise PlateError("multi-channel TIFFs need a file-name pattern with named groups 'well' and 'site', "
                         r"e.g. '(?P<well>[A-P]\d{2})_s(?P<site>\d+)\.tiff?'")
    if axes is None or str(axes).upper() not in ("CYX", "YXC"):
        raise PlateError(f"state where the channel axis is in the multi-channel TIFFs: axes='CYX' or 'YXC' "
                         f"(got {axes!r})")
    axes = str(axes).upper()
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise PlateError(f"invalid file-name pattern {pattern!r}: {exc}") from exc
    if "site" not in regex.groupindex or not ("well" in regex.groupindex
                                              or {"row", "col"} <= set(regex.groupindex)):
        raise PlateError(f"pattern {pattern!r} needs named groups 'well' (or 'row' and 'col') and 'site'")
    import tifffile

    matched = []
    for f in images:
        if f.suffix.lower() not in TIFF_SUFFIXES:
            continue
        m = regex.search(f.name)
        if m:
            matched.append((f, m))
    if not matched:
        raise PlateError(f"{root}: no TIFF file name matches the pattern {pattern!r}")
    n_channels = None
    for f, _ in matched:
        try:
            with tifffile.TiffFile(f) as tf:
                shape = tf.series[0].shape
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"{f}: cannot read TIFF header ({exc}); skipped", CellClipWarning, stacklevel=3)
            continue
        if len(shape) != 3:
            raise PlateError(f"{f}: expected a 3-D {axes} image, got shape {tuple(shape)}")
        n_channels = shape[0] if axes == "CYX" else shape[-1]
        break
    if n_channels is None:
        raise PlateError(f"{root}: none of the matching TIFF files could be read")
    names, _source = _stain_names(range(1, n_channels + 1), channel_map, None, str(root))
    records = []
    for f, m in matched:
        gd = m.groupdict()
        well = normalize_well(gd["well"]) if gd.get("well") else well_name(gd["row"], gd["col"])
        p = plate or gd.get("plate") or _plate_name_for(f.parent)
        for ch in range(1, n_channels + 1):
            records.append({"plate": p, "well": well, "site": int(gd["site"]), "ch": ch, "path": f,
                            "frame": ch - 1})
    df = _table_from_channels(records, names, str(root), multi_frame=True)
    df["Metadata_ChannelAxes"] = axes
    return _finish(df, [names[i] for i in sorted(names)], "multichannel")


def summarize(fields: pd.DataFrame) -> str:
    """One line: plates, wells, fields, stains."""
    return (f"{fields['Metadata_Plate'].nunique()} plate(s), "
            f"{fields.groupby(['Metadata_Plate', 'Metadata_Well']).ngroups} well(s), "
            f"{len(fields)} field(s); stains {stains(fields)}")


__all__ = [
    "DEFAULT_STAINS", "read_plate", "read_load_data", "write_load_data", "stains", "reorder_stains",
    "parse_channel_map", "canonical_stain", "well_name", "normalize_well", "summarize",
]
