"""Find the fields of view of a plate and the stain of every channel.

Layouts read (recursively under a folder; :func:`read_plate`):

* Phenix / Harmony exports: ``rXXcYYfZZpPP-chNsk1fk1fl1.(tiff|tif|png)`` (one plane per
  field is read: the lowest plane number, with a warning when there are several);
* ImageXpress: ``<prefix>_<well>_s<site>_w<channel><optional 36-char UUID>.tif``, also
  split into one folder per dye (``<plate>-Hoechst/``, ``<plate>-ERSyto/`` … as in the
  Bray et al. data);
* OME-TIFF, one file per field (``*.ome.tif(f)``): channels, pixel size and the plate
  position from its OME-XML; well and site from the file name otherwise;
* OME-Zarr HCS plates (``*.zarr`` folders with NGFF ``plate`` metadata, 0.4 or 0.5);
* one folder per field holding one image per stain named by dye (``A01_s1/Hoechst.tif``,
  ``ERSyto.tif``, ``ERSytoBleed.tif``, ``Ph_golgi.tif``, ``Mito.tif``: Bray / CLOOME);
* one multi-channel TIFF per field, with well and site from a user-given regular
  expression (named groups ``well``, ``site``, optionally ``plate``, ``row``, ``col``) and
  the channel axis stated explicitly (``CYX`` or ``YXC``);
* a CellProfiler LoadData CSV (the Cell Painting Gallery manifest): one row per field
  with ``Metadata_Plate/Well/Site`` and per stain ``FileName_Orig<Stain>`` +
  ``PathName_Orig<Stain>``.  A folder holding such a CSV is read through it.

This module recognises the layout (:func:`read_plate`, :func:`sniff`), names the stains and
builds the table; the layouts themselves live in :mod:`napari_cellclip.formats`.

The result is always a *fields table* in LoadData form (absolute ``PathName_Orig*``;
``Frame_Orig*`` = the channel index inside a multi-channel file or OME-Zarr image), so a
table read from any layout can be written back as a manifest with :func:`write_load_data`
and every other module reads any of them alike.

Stain names, first found wins: a channel map you give; a ``channels.json`` /
``channels.txt`` beside the plate (in its folder or up to two folders above); a LoadData
CSV; the channel names a format carries (OME-XML, OME-Zarr ``omero`` labels, a Harmony
``Index.idx.xml`` / ``Index.xml``, an ImageXpress ``.HTD``, dye-named files or folders),
turned into stains by the dye vocabulary of :mod:`napari_cellclip.formats.dyes` with a
warning listing the mapping used.  Otherwise channels stay ``ch1..chN`` and a warning says
how to name them.  Nothing is guessed silently.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

from .errors import PlateError, warn_at_caller
from .formats.dyes import canonical_stain, describe, stain_label
from .images import IMAGE_SUFFIXES

DEFAULT_STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")
LAYOUTS = ("auto", "load_data", "phenix", "imagexpress", "ome-tiff", "ome-zarr", "dye-folders", "multichannel")
CHANNEL_MAP_FILES = ("channels.json", "channels.txt")

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
# well (and field) inside a free-form name: "r02c03f04", "B03_s2", "B03-2", "well_B03_field_2", "B03"
_POSITION_RES = (
    re.compile(r"(?<![A-Za-z])r(?P<row>\d{1,2})c(?P<col>\d{1,2})(?:f(?P<site>\d{1,4}))?(?!\d)", re.IGNORECASE),
    re.compile(r"(?<![A-Za-z0-9])(?P<well>[A-Za-z]{1,2}\d{1,2})(?!\d)"
               r"(?:(?:[_\-\s.]*(?:site|field|fld|s|f)[_\-\s]*|[_\-\s.]+)(?P<site>\d{1,4})(?!\d))?", re.IGNORECASE),
)
_MAP_HELP = (
    "Name them with a channel map: a channels.json beside the plate such as "
    '{"<n>": "DNA", "<m>": "ER", ...} (or channels.txt with one "<n>=<stain>" per line), '
    'or channel_map="<n>=DNA,<m>=ER,..." / --channel-map, using the channel numbers of your '
    "acquisition: the numbering differs between experiments and instruments."
)


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
    if not m or int(m["col"]) < 1:
        raise PlateError(f"unknown well name {name!r} (expected a row letter and a column number, e.g. 'A01')")
    return f"{m['row'].upper()}{int(m['col']):02d}"


def parse_well_site(name: str) -> tuple[str, int | None] | None:
    """(well, site or None) found in a file or folder name, or None.

    Reads ``r02c03f04`` (Phenix-style), ``B03_s2``, ``B03-2``, ``B03_site2``,
    ``well_B03_field_2`` and a bare ``B03``.
    """
    for regex in _POSITION_RES:  # a suffix (.ome.tiff, .png, .zarr) has no digit: it never reads as a position
        m = regex.search(str(name))
        if not m:
            continue
        gd = m.groupdict()
        try:
            well = well_name(gd["row"], gd["col"]) if gd.get("row") else normalize_well(gd["well"])
        except PlateError:  # r00c05: not a well
            continue
        return well, (int(gd["site"]) if gd.get("site") else None)
    return None


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
        raise PlateError(f"the plate has stains {have} but {list(order)} are needed; missing {missing}. {_MAP_HELP}")
    channel_cols = [c for c in fields.columns if re.match(r"^(FileName|PathName|Frame)_Orig", c)]
    other = [c for c in fields.columns if c not in channel_cols]
    ordered = []
    for s in order:
        for prefix in ("FileName", "PathName", "Frame"):
            col = f"{prefix}_Orig{s}"
            if col in fields.columns:
                ordered.append(col)
    return fields[other + ordered]


def rename_stains(fields: pd.DataFrame, mapping) -> pd.DataFrame:
    """The fields table with its stains renamed: ``{"ch1": "DNA", "Alexa488": "ER"}`` or a channel
    map (``"1=DNA,2=ER"``, ``{1: "DNA"}``, a file: number ``n`` means stain ``ch<n>``).

    No file is read again: this relabels the columns of a table already read (the
    napari widget's "name the channels" control).  Raises PlateError for a stain the table
    does not have or when two stains would get the same name.
    """
    if isinstance(mapping, Mapping) and not all(re.match(r"(?i)^(ch|w|c)?\d+$", str(k).strip()) for k in mapping):
        new = {str(k): str(v).strip() for k, v in mapping.items()}
    else:
        new = {f"ch{k}": v for k, v in parse_channel_map(mapping).items()}
    have = stains(fields)
    unknown = [k for k in new if k not in have]
    if unknown:
        raise PlateError(f"the plate has no stain(s) {unknown}; its stains are {have}")
    result = [new.get(s, s) for s in have]
    if len(set(result)) != len(result):
        raise PlateError(f"renaming {have} to {result} gives two channels the same stain")
    cols = {f"{p}_Orig{old}": f"{p}_Orig{new[old]}" for old in new for p in ("FileName", "PathName", "Frame")}
    out = fields.rename(columns=cols)
    out.attrs = {**fields.attrs, "stain_source": "user"}
    return out


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
        if isinstance(spec, Path) or "=" not in text and path.suffix.lower() in (
                ".json", ".txt", ".csv", ".tsv", ".yaml", ".yml") or path.is_file():
            items = _channel_map_file_items(path)
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


def _channel_map_file_items(path: Path) -> list:
    if not path.is_file():
        raise PlateError(f"channel map file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, Mapping):
        return list(data.items())
    if path.suffix.lower() == ".json":
        raise PlateError(f"{path}: not a JSON object of channel number -> stain (e.g. {{\"1\": \"DNA\"}})")
    return [re.split(r"\s*[=,:\t]\s*", ln.strip(), maxsplit=1) for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def find_channel_map(folder, levels: int = 2) -> Path | None:
    """A ``channels.json`` / ``channels.txt`` in ``folder`` or up to ``levels`` folders above it."""
    folder = Path(folder).resolve()
    for d in [folder, *folder.parents][: levels + 1]:
        for name in CHANNEL_MAP_FILES:
            if (d / name).is_file():
                return d / name
    return None


# --------------------------------------------------------------------------- channel names


def _channel_map_from(channel_map, where: str) -> dict[int, str]:
    user = parse_channel_map(channel_map)
    if user and isinstance(channel_map, Path):
        warn_at_caller(f"{where}: stains from the channel map {channel_map}: "
              + ", ".join(f"ch{i} → {s}" for i, s in sorted(user.items())))
    return user


def _stain_names(channel_ids: Iterable[int], channel_map, names: Mapping[int, str] | None,
                 where: str, source: str = "the Harmony index") -> dict[int, str]:
    """Resolve channel numbers to stain names: a channel map, else ``names`` (from ``source``)
    through the dye vocabulary, else ``ch<n>``; every assumption is warned about."""
    ids = sorted(set(channel_ids))
    user = _channel_map_from(channel_map, where)
    if user:
        missing = [i for i in ids if i not in user]
        if missing:
            raise PlateError(f"{where}: the channel map {user} has no stain for channel(s) {missing}")
        return {i: user[i] for i in ids}
    names = {i: n for i, n in (names or {}).items() if n}
    if any(i in names for i in ids):
        out = {i: canonical_stain(names[i]) if i in names else None for i in ids}
        mapped = {i: s for i, s in out.items() if s is not None and s != names[i]}
        unknown = [i for i, s in out.items() if s is None]
        out = {i: s or stain_label(names.get(i, "")) or f"ch{i}" for i, s in out.items()}
        if len(set(out.values())) == len(out):
            if mapped:
                warn_at_caller(f"{where}: stains named from {source} by the dye vocabulary "
                      f"(napari_cellclip.formats.dyes): {describe(mapped, names)}. A channel map overrides "
                      "this.")
            if unknown:
                listed = ", ".join(f"ch{i} {names[i]!r}" if i in names else f"ch{i} (unnamed)" for i in unknown)
                warn_at_caller(f"{where}: {listed} from {source}: not a Cell Painting stain name, kept as "
                      f"{', '.join(out[i] for i in unknown)} (fluorophore and filter names are never "
                      "guessed). " + _MAP_HELP)
            return out
        warn_at_caller(f"{where}: the channel names from {source} ({', '.join(map(repr, names.values()))}) give "
              "two channels the same stain; channels are kept numbered.")
    else:
        warn_at_caller(
            f"{where}: nothing names the stains (no LoadData CSV, Harmony index, OME channel names, channels.json "
            f"or dye names); channels are kept as {', '.join(f'ch{i}' for i in ids)}. " + _MAP_HELP)
    return {i: f"ch{i}" for i in ids}


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
    ``Metadata_*`` columns are carried along.  Stain names that are dye names
    (``OrigHoechst``, ``OrigPh_golgi``, ``OrigSyto`` …) become the Cell Painting stains
    with a warning listing the mapping.
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
                    for p in df[pcol]]  # an empty PathName is Path(""), the CSV's folder
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
    df, names = _dye_named_columns(df, names, str(path))
    return _finish(df, names, source="load_data")


def _dye_named_columns(df: pd.DataFrame, names: list[str], where: str) -> tuple[pd.DataFrame, list[str]]:
    """Rename LoadData stains that are dye names (OrigHoechst -> OrigDNA) when that is unambiguous."""
    target = {n: canonical_stain(n) or n for n in names}
    if len(set(target.values())) != len(names) or all(target[n] == n for n in names):
        return df, names
    ids = dict(enumerate(names, start=1))
    changed = {i: target[n] for i, n in ids.items() if target[n] != n}
    warn_at_caller(f"{where}: LoadData stain names are dye names; renamed by the dye vocabulary "
          f"(napari_cellclip.formats.dyes): {describe(changed, ids)}")
    cols = {f"{p}_Orig{n}": f"{p}_Orig{target[n]}" for n in names for p in ("FileName", "PathName", "Frame")}
    return df.rename(columns=cols), [target[n] for n in names]


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
        plate, well, site = out.loc[dup, meta].iloc[0]
        raise PlateError(f"field {[plate, well, int(site)]} (plate, well, site) appears more than once")
    out = out.sort_values(meta).reset_index(drop=True)  # (plate, well, site) are unique: no ties to keep
    out.attrs["stain_source"] = source
    return out


# --------------------------------------------------------------------------- discovery


def _is_zarr(p: Path) -> bool:
    from .formats import ome_zarr

    return p.name.lower().endswith(".zarr") or ome_zarr.is_zarr_dir(p)


def is_utf8(name) -> bool:
    """Whether a path can be written as UTF-8 (tables, parquet and JSON need it; a name with bytes
    that are not UTF-8 comes back from the OS with surrogate escapes)."""
    try:
        str(name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8_path(path) -> None:
    """PlateError naming ``path`` (its bytes escaped) when it is not valid UTF-8."""
    if not is_utf8(path):
        shown = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
        raise PlateError(f"{shown}: the path is not valid UTF-8 text; rename the folder or file "
                         "(e.g. with convmv) so its name can be stored in the fields table")


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, zarr folders) under ``folder``; hidden entries skipped, zarr folders not entered; names
    that are not valid UTF-8 skipped with a warning naming them."""
    files, zarrs, odd = [], [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        odd += [Path(dirpath) / n for n in (*dirnames, *filenames) if not is_utf8(n)]
        subdirs = [Path(dirpath) / d for d in sorted(dirnames) if not d.startswith(".") and is_utf8(d)]
        zarrs += [d for d in subdirs if _is_zarr(d)]
        dirnames[:] = [d.name for d in subdirs if not _is_zarr(d)]
        base = Path(dirpath)
        files += [base / f for f in sorted(filenames) if not f.startswith(".") and is_utf8(f)]
    if odd:
        shown = [os.fsencode(str(p)).decode("utf-8", "backslashreplace") for p in odd[:5]]
        warn_at_caller(f"{folder}: {len(odd)} name(s) that are not valid UTF-8 skipped (rename them to read "
              f"them): {', '.join(shown)}")
    return files, zarrs  # folders in sorted order, files sorted within each


def image_kind(path) -> str | None:
    """The layout a single image file's *name* belongs to ("phenix", "imagexpress", "ome-tiff",
    "dye-folders"), or None; reads nothing but the name (and, for a dye name, its folder's name)."""
    from .formats.ome_tiff import is_ome_tiff_name

    p = path if isinstance(path, Path) else Path(path)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    if PHENIX_RE.match(p.name):
        return "phenix"
    if IMAGEXPRESS_RE.match(p.name):
        return "imagexpress"
    if is_ome_tiff_name(p.name):
        return "ome-tiff"
    if canonical_stain(p.stem) and (parse_well_site(p.parent.name) or
                                    p.parent.name.isdigit() and parse_well_site(p.parent.parent.name)):
        return "dye-folders"
    return None


def sniff(path, max_entries: int = 5000) -> str | None:
    """What a path holds, decided cheaply: a layout name, or None when it is not a plate.

    A file is judged by its name (a LoadData CSV by its header line); a folder by a
    breadth-first look at no more than ``max_entries`` entries (an OME-Zarr plate by its
    root metadata).  Used by the napari reader to decline foreign paths without reading
    whole trees.
    """
    from .formats import ome_zarr

    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "load_data" if is_load_data_csv(p) else None
        return image_kind(p)
    if not p.is_dir():
        return None
    if ome_zarr.is_zarr_dir(p):
        return "ome-zarr" if ome_zarr.is_plate(p) else None
    queue, seen = [p], 0
    while queue:
        try:
            with os.scandir(queue.pop(0)) as it:
                for e in it:
                    seen += 1
                    if seen > max_entries:
                        return None
                    if e.name.startswith("."):
                        continue
                    is_dir = e.is_dir(follow_symlinks=True)
                    kind = _sniff_entry(Path(e.path), is_dir)
                    if kind:
                        return kind
                    if is_dir and not e.name.lower().endswith(".zarr"):
                        queue.append(Path(e.path))
        except OSError:
            continue
    return None


def _sniff_entry(p: Path, is_dir: bool) -> str | None:
    from .formats import ome_zarr

    if is_dir:
        return "ome-zarr" if ome_zarr.is_zarr_dir(p) and ome_zarr.is_plate(p) else None
    if p.suffix.lower() == ".csv":
        return "load_data" if is_load_data_csv(p) else None
    return image_kind(p)


# --------------------------------------------------------------------------- read_plate


def read_plate(
    path,
    *,
    channel_map=None,
    layout: str = "auto",
    pattern: str | None = None,
    axes: str | None = None,
    plate: str | None = None,
) -> pd.DataFrame:
    """Read a plate folder, an OME-Zarr plate, an OME-TIFF or a LoadData CSV into a fields table.

    Parameters
    ----------
    path : folder, ``*.zarr`` plate, ``*.ome.tif(f)`` file or LoadData CSV
    channel_map : ``{1: "DNA", ...}``, ``"1=DNA,2=ER,..."`` or a file; names the channels by
        number (Phenix ``ch``, ImageXpress ``w``, the 1-based channel of an OME-TIFF or
        OME-Zarr image); overrides every name the files carry.  Default: a
        ``channels.json`` / ``channels.txt`` beside the plate, when there is one.
    layout : one of :data:`LAYOUTS` ("auto" recognises the layout).
    pattern : regular expression with named groups ``well`` (or ``row`` and ``col``) and ``site``
        (optionally ``plate``) matched against file names: one multi-channel TIFF per field
        (with ``axes``), or OME-TIFFs whose names the built-in rules do not read.
    axes : "CYX" or "YXC", where the channel axis is in plain multi-channel TIFFs.
    plate : plate name to use instead of the folder / CSV / metadata value.
    """
    path = Path(path).expanduser()
    check_utf8_path(path)
    if layout not in LAYOUTS:
        raise PlateError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not path.exists():
        raise PlateError(f"not found: {path}")
    if channel_map is None and path.suffix.lower() != ".csv":
        channel_map = find_channel_map(path if path.is_dir() else path.parent)
    if path.is_file():
        from .formats.ome_tiff import is_ome_tiff_name

        if path.suffix.lower() == ".csv":
            return read_load_data(path, plate=plate)
        if is_ome_tiff_name(path.name):
            from .formats import ome_tiff

            return ome_tiff.read_fields(path.parent, [path], channel_map, plate, pattern)
        raise PlateError(f"{path}: give a plate folder, an OME-Zarr plate, an OME-TIFF or a LoadData CSV")
    if _is_zarr(path):
        from .formats import ome_zarr

        return ome_zarr.read_fields(path, [path], channel_map, plate)
    files, zarrs = _scan(path)
    if not files and not zarrs:
        raise PlateError(f"{path}: the folder is empty")
    if layout in ("auto", "load_data"):
        table = _read_load_data_csvs(path, files, plate)
        if table is not None:
            return table
        if layout == "load_data":
            raise PlateError(f"{path}: no LoadData CSV (with FileName_Orig<Stain> columns) found")
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if layout == "multichannel" or (pattern is not None and axes is not None):
        from .formats import numbered

        return numbered.read_multichannel(path, images, pattern, axes, channel_map, plate)
    kinds = _classify(path, images, zarrs, layout)
    return _read_kind(path, kinds, channel_map, plate, pattern)


def _read_load_data_csvs(path: Path, files: list[Path], plate) -> pd.DataFrame | None:
    csvs = [f for f in files if f.suffix.lower() == ".csv" and is_load_data_csv(f)]
    if not csvs:
        return None
    tables = [read_load_data(c, plate=plate) for c in csvs]
    names = [stains(t) for t in tables]
    if any(n != names[0] for n in names):
        raise PlateError(f"{path}: the LoadData CSVs name different stains: "
                         + "; ".join(f"{c.name}: {n}" for c, n in zip(csvs, names)))
    return _finish(pd.concat(tables, ignore_index=True), names[0], "load_data")


def _classify(path: Path, images: list[Path], zarrs: list[Path], layout: str) -> dict[str, list[Path]]:
    """Files (and zarr folders) by layout; refuses a folder that mixes layouts."""
    kinds: dict[str, list[Path]] = defaultdict(list)
    other = []
    for f in images:
        kind = image_kind(f)
        (kinds[kind] if kind else other).append(f)
    if zarrs:
        kinds["ome-zarr"] = zarrs
    if layout != "auto":
        kinds = {layout: kinds.get(layout, [])} if kinds.get(layout) else {}
    if not kinds:
        examples = ", ".join(f.name for f in (other or images)[:3]) or "none"
        raise PlateError(
            f"{path}: no recognised image names among {len(images)} image file(s) (e.g. {examples}). Supported: "
            "Phenix 'r01c01f01p01-ch1sk1fk1fl1.tiff', ImageXpress 'plate_A01_s1_w1.tif', 'A01_s1.ome.tiff', "
            "an OME-Zarr plate ('*.zarr'), field folders of dye-named images ('A01_s1/Hoechst.tif'), a LoadData "
            "CSV, or multi-channel TIFFs with a pattern and axes."
        )
    if len(kinds) > 1:
        raise PlateError(f"{path}: the folder mixes layouts: " + "; ".join(
            f"{k} ({len(v)}, e.g. {v[0].relative_to(path)})" for k, v in sorted(kinds.items()))
            + ". Open one plate at a time, or give layout= to pick one.")
    # the other images of a dye-named field folder (Brightfield.tif) are read as extra channels
    dye_dirs = {f.parent for f in kinds.get("dye-folders", [])}
    other = [f for f in other if f.parent not in dye_dirs]
    if other and layout == "auto":
        warn_at_caller(f"{path}: {len(other)} image file(s) with unrecognised names skipped (e.g. "
              + ", ".join(str(f.relative_to(path)) for f in other[:3]) + ")")
    return kinds


def _read_kind(path: Path, kinds: dict, channel_map, plate, pattern) -> pd.DataFrame:
    from .formats import dye_folders, numbered, ome_tiff, ome_zarr

    (kind, found), = kinds.items()
    if kind == "ome-zarr":
        return ome_zarr.read_fields(path, found, channel_map, plate)
    if kind == "ome-tiff":
        return ome_tiff.read_fields(path, found, channel_map, plate, pattern)
    if kind == "dye-folders":
        return dye_folders.read_fields(path, found, plate)
    return numbered.read_fields(path, found, kind, channel_map, plate)


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
        row.update(chans[ids[0]].get("meta", {}))
        for i in ids:
            folder, name = os.path.split(str(chans[i]["path"]))
            s = channel_names[i]
            row[f"FileName_Orig{s}"] = chans[i].get("file", name)
            row[f"PathName_Orig{s}"] = chans[i].get("folder", folder)
            if multi_frame:
                row[f"Frame_Orig{s}"] = chans[i]["frame"]
        rows.append(row)
    if skipped:
        warn_at_caller(f"{where}: skipped {len(skipped)} field(s) that lack a channel: " + "; ".join(skipped[:10])
              + (" ..." if len(skipped) > 10 else ""))
    if not rows:
        raise PlateError(f"{where}: no field has all channels {[channel_names[i] for i in ids]}")
    return pd.DataFrame(rows)


def _concat_plates(path: Path, tables: list[pd.DataFrame], source: str) -> pd.DataFrame:
    stain_sets = {tuple(stains(t)) for t in tables}
    if len(stain_sets) > 1:
        raise PlateError(f"{path}: plates under this folder have different stains: {sorted(stain_sets)}")
    return _finish(pd.concat(tables, ignore_index=True), stains(tables[0]), source)


# --------------------------------------------------------------------------- shared by layouts


def _plate_name_for(folder: Path) -> str:
    name = folder.name
    if name.lower() == "images" or re.match(r"^timepoint_\d+$", name, re.IGNORECASE):
        name = folder.parent.name
    return name.split("__")[0] or name


def _match_pattern(root: Path, files: list[Path], pattern: str) -> list[tuple[Path, tuple]]:
    """[(file, (well, site, plate or None))] for the files whose name matches ``pattern``."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise PlateError(f"invalid file-name pattern {pattern!r}: {exc}") from exc
    if "site" not in regex.groupindex or not ("well" in regex.groupindex
                                              or {"row", "col"} <= set(regex.groupindex)):
        raise PlateError(f"pattern {pattern!r} needs named groups 'well' (or 'row' and 'col') and 'site'")
    out = []
    for f in files:
        m = regex.search(f.name)
        if m:
            gd = m.groupdict()
            well = normalize_well(gd["well"]) if gd.get("well") else well_name(gd["row"], gd["col"])
            out.append((f, (well, int(gd["site"]), gd.get("plate"))))
    if not out:
        raise PlateError(f"{root}: no file name matches the pattern {pattern!r}")
    return out


def summarize(fields: pd.DataFrame) -> str:
    """One line: plates, wells, fields, stains."""
    return (f"{fields['Metadata_Plate'].nunique()} plate(s), "
            f"{fields.groupby(['Metadata_Plate', 'Metadata_Well']).ngroups} well(s), "
            f"{len(fields)} field(s); stains {stains(fields)}")


__all__ = [
    "DEFAULT_STAINS", "LAYOUTS", "read_plate", "read_load_data", "write_load_data", "stains", "reorder_stains",
    "rename_stains", "parse_channel_map", "find_channel_map", "canonical_stain", "well_name", "normalize_well",
    "parse_well_site", "sniff", "image_kind", "summarize",
]
