"""The one front door to a fields table, from any input.

:func:`read_fields` turns what a user points at — a plate folder, a LoadData CSV, a
fields-table ``.parquet``, a ``.txt`` manifest (one of those per line), a DataFrame, or a
list of these — into one fields table (one row per field of view, ``Metadata_*`` columns,
``FileName_Orig<Stain>`` / ``PathName_Orig<Stain>`` per stain).  Each plate is read by
:func:`napari_cellclip.plates.read_plate`; with a platemap or annotations the table is
annotated (:func:`napari_cellclip.metadata.annotate`: perturbation columns and the prompt).
The plugin's reader, the embedding job and training all read fields through it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import PlateError

__all__ = ["read_fields", "FIELD_KEYS", "MANIFEST_SUFFIXES"]

#: the columns that name one field of view
FIELD_KEYS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
MANIFEST_SUFFIXES = (".txt", ".lst", ".manifest")


def read_fields(data, *, platemap=None, barcode_platemap=None, annotations=None, channel_map=None,
                cell_line: str | None = None) -> pd.DataFrame:
    """One fields table from ``data`` (see the module doc), annotated when asked.

    Parameters
    ----------
    data : path, DataFrame, or a list of these
        Plate folder, LoadData CSV, fields-table ``.parquet`` or ``.txt`` manifest (one
        plate per line, relative to the manifest's folder, ``#`` comments).
    platemap : folder or file, optional
        A platemap folder (``barcode_platemap.csv``, the platemap files named in it, and an
        annotation table found by name) or one platemap file used for every plate.
    barcode_platemap, annotations : file, optional
        The plate barcode → platemap name table and the perturbation annotation table, when
        they are not in the platemap folder.
    channel_map : mapping, ``"1=DNA,2=ER,..."`` or file, optional
        Stain of each channel number, for plates whose files do not name their stains.
    cell_line : str, optional
        Cell line named in the prompts (``"A549 cells treated with ..."``).

    Stains keep the plate's channel order (a model reorders them to its own).  The same
    (plate, well, site) twice, an empty table, or a path that does not exist raise
    :class:`~napari_cellclip.errors.PlateError`.
    """
    fields = _read_any(data, channel_map, top=True)
    if platemap is not None or barcode_platemap is not None or annotations is not None:
        fields = _annotate(fields, platemap, barcode_platemap, annotations, cell_line)
    elif cell_line and "Metadata_prompt" in fields.columns:
        from .metadata import with_cell_line

        fields = with_cell_line(fields, cell_line)
    if len(fields) == 0:
        raise PlateError("the fields table is empty: nothing to read")
    _check_unique(fields)
    return fields.reset_index(drop=True)


def _read_any(data, channel_map, *, top: bool = False) -> pd.DataFrame:
    from . import plates

    if isinstance(data, pd.DataFrame):
        return data.reset_index(drop=True).copy()
    if isinstance(data, (list, tuple)):
        if not data:
            raise PlateError("no plates given")
        return _concat([_read_any(d, channel_map, top=top) for d in data])
    p = Path(data).expanduser()
    plates.check_utf8_path(p)
    if not p.exists():
        raise PlateError(f"{p}: no such plate folder or manifest")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(p)
    if suffix in MANIFEST_SUFFIXES:
        if not top:
            raise PlateError(f"{p}: a manifest cannot list another manifest")
        return _read_manifest(p, channel_map)
    return plates.read_plate(p, channel_map=channel_map)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        fields = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise PlateError(f"{path}: cannot read as a parquet table ({exc})") from None
    if not any(str(c).startswith("FileName_Orig") for c in fields.columns):
        raise PlateError(f"{path}: not a fields table (no FileName_Orig<Stain> columns)")
    return fields


def _read_manifest(path: Path, channel_map) -> pd.DataFrame:
    try:
        entries = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise PlateError(f"{path}: cannot read the manifest as UTF-8 text ({exc})") from None
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise PlateError(f"{path}: the manifest lists no plates")
    parts = []
    for e in entries:
        q = Path(e).expanduser()
        parts.append(_read_any(q if q.is_absolute() else path.parent / q, channel_map))
    return _concat(parts)


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    from .plates import stains

    sets = {tuple(sorted(stains(t))) for t in parts}
    if len(sets) > 1:
        raise PlateError(f"the plates given have different stains: {sorted(sets)}")
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _annotate(fields, platemap, barcode_platemap, annotations, cell_line) -> pd.DataFrame:
    from .metadata import annotate

    kw = {"barcode_platemap": barcode_platemap, "annotations": annotations, "cell_line": cell_line}
    if platemap is not None:
        kw["platemap" if Path(platemap).is_file() else "platemap_dir"] = platemap
    return annotate(fields, **kw)


def _check_unique(fields: pd.DataFrame) -> None:
    if not all(k in fields.columns for k in FIELD_KEYS):
        return
    dup = fields.duplicated(list(FIELD_KEYS))
    if dup.any():
        plate, well, site = fields.loc[dup, list(FIELD_KEYS)].iloc[0].tolist()
        raise PlateError(f"{int(dup.sum())} field(s) appear more than once (same plate, well and site), "
                         f"e.g. plate {plate} well {well} site {site}: is a plate given twice?")

