"""Show fields of the embedding store in the viewer (shared by the Search and Map widgets).

A field is identified by ``(Metadata_Plate, Metadata_Well, Metadata_Site)``.  If a
plate opened by the reader holds it, the viewer's field slider moves there; otherwise
that plate's fields are added as new (lazy) layers first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .state import FIELDS_KEY

KEY_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")


def _norm(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    if isinstance(v, np.generic):
        v = v.item()
    return str(v)


def field_key(row) -> tuple[str, str, str]:
    """Hashable identity of a field (plate, well, site) from a row / mapping."""
    return tuple(_norm(row[c]) if c in row and row[c] is not None else "" for c in KEY_COLUMNS)


def field_keys(df) -> list[tuple[str, str, str]]:
    cols = [c for c in KEY_COLUMNS if c in df.columns]
    if not cols:
        return [("", "", "")] * len(df)
    sub = df[cols]
    out = []
    for rec in sub.itertuples(index=False, name=None):
        d = dict(zip(cols, rec))
        out.append(tuple(_norm(d[c]) if c in d else "" for c in KEY_COLUMNS))
    return out


def plate_layers(viewer) -> list:
    """Image layers made by the CellCLIP reader (they carry a fields table)."""
    return [ly for ly in viewer.layers if isinstance(getattr(ly, "metadata", None), dict)
            and ly.metadata.get(FIELDS_KEY) is not None]


def _find(viewer, key) -> tuple[list, int] | None:
    """Layers holding field ``key`` and its index along their first axis."""
    groups: dict[int, tuple[list, Any]] = {}
    for ly in plate_layers(viewer):
        f = ly.metadata[FIELDS_KEY]
        groups.setdefault(id(f), ([], f))[0].append(ly)
    for layers, fields in groups.values():
        keys = field_keys(fields)
        if key in keys:
            return layers, keys.index(key)
        # a site-less key (well-level row): first field of that well
        if key[2] == "":
            for i, k in enumerate(keys):
                if k[:2] == key[:2]:
                    return layers, i
    return None


def current_field(viewer) -> tuple[tuple[str, str, str], Any] | None:
    """``(key, fields row)`` of the field on screen (first CellCLIP plate layer), or ``None``."""
    layers = plate_layers(viewer)
    if not layers:
        return None
    active = viewer.layers.selection.active
    ly = active if active in layers else layers[0]
    fields = ly.metadata[FIELDS_KEY]
    if ly.ndim < 3:
        idx = 0
    else:
        axis = viewer.dims.ndim - ly.ndim
        idx = int(viewer.dims.current_step[axis])
    idx = max(0, min(idx, len(fields) - 1))
    row = fields.iloc[idx]
    return field_key(row), row


def show_field(viewer, row) -> bool:
    """Bring the field of ``row`` (a fields-table row with plate/well/site) on screen.

    Returns True when it is shown.  Fields of a plate not open yet are added as layers
    (all that plate's fields in ``row``'s table are not known here, so only this one).
    """
    key = field_key(row)
    found = _find(viewer, key)
    if found is None:
        return False
    layers, idx = found
    for ly in layers:
        ly.visible = True
    ly = layers[0]
    if ly.ndim >= 3:
        axis = viewer.dims.ndim - ly.ndim
        viewer.dims.set_current_step(axis, idx)
    return True


def open_fields(viewer, fields, source: str = "") -> list:
    """Add the (lazy) stain layers of ``fields`` to the viewer; returns the new layers."""
    from .._reader import fields_layer_data

    new = []
    for data, kwargs, _kind in fields_layer_data(fields, source):
        added = viewer.add_image(data, **kwargs)
        new.extend(added if isinstance(added, list) else [added])
    return new


def show_store_row(viewer, store_fields, pos: int) -> bool:
    """Show field ``pos`` of a store's fields table, opening its plate when needed."""
    row = store_fields.iloc[int(pos)]
    if show_field(viewer, row):
        return True
    plate = row.get("Metadata_Plate")
    same = store_fields
    if plate is not None and "Metadata_Plate" in store_fields.columns:
        same = store_fields[store_fields["Metadata_Plate"].astype(str) == str(plate)]
    if not any(str(c).startswith("FileName_") for c in same.columns):
        return False
    open_fields(viewer, same.reset_index(drop=True), source=str(plate))
    return show_field(viewer, row)
