"""Show fields of the embedding store in the viewer (shared by the Search and Map widgets).

A field is identified by ``(Metadata_Plate, Metadata_Well, Metadata_Site)``.  If a
plate opened by the reader holds it, the viewer's field slider moves there; otherwise
that plate's fields are added as new (lazy) layers first.
"""

from __future__ import annotations

import weakref
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

    return _add_layer_data(viewer, fields_layer_data(fields, source))


def replace_plate(viewer, old_layers, layer_data) -> list:
    """Replace a plate's stain layers by ``layer_data`` (the reader's
    :func:`~napari_cellclip._reader.fields_layer_data` of the plate re-read, e.g. with a channel
    map), keeping the field on screen; returns the new layers."""
    step = viewer.dims.current_step
    for ly in old_layers:
        if ly in viewer.layers:
            viewer.layers.remove(ly)
    new = _add_layer_data(viewer, layer_data)
    if len(viewer.dims.current_step) == len(step):
        viewer.dims.current_step = step
    return new


def _add_layer_data(viewer, layer_data) -> list:
    new = []
    for data, kwargs, _kind in layer_data:
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


# -------------------------------------------------------------- what the canvas shows
#: readable names of fields-table columns (the rest: "Metadata_" dropped, words split)
COLUMN_LABELS = {
    "Metadata_Plate": "Plate", "Metadata_Well": "Well", "Metadata_Site": "Site",
    "Metadata_pert_iname": "Perturbation", "Metadata_moa": "Mechanism of action",
    "Metadata_target": "Target", "Metadata_broad_sample": "Broad sample ID",
    "Metadata_pert_type": "Perturbation type", "Metadata_cell_line": "Cell line",
    "Metadata_prompt": "Prompt (CellCLIP text)", "Metadata_dose": "Dose",
    "Metadata_mmoles_per_liter": "Dose (mM)", "Metadata_n_fields": "Fields in the well",
    "Metadata_control_type": "Control type", "Metadata_is_control": "Control",
    "Metadata_gene": "Gene", "Metadata_smiles": "SMILES", "Metadata_PixelSizeUm": "Pixel size (µm)",
}


def column_label(column: str) -> str:
    """``"Metadata_pert_iname"`` → ``"Perturbation"``; unknown ones: ``"Metadata_cell_count"`` → ``"Cell count"``."""
    import re

    if column in COLUMN_LABELS:
        return COLUMN_LABELS[column]
    name = str(column)
    name = name[len("Metadata_"):] if name.startswith("Metadata_") else name
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ").strip()
    return name[:1].upper() + name[1:] if name else str(column)


def _present(v) -> bool:
    return v is not None and str(v).strip() not in ("", "nan", "None", "<NA>")


def field_caption(row) -> str:
    """``"SQ00015198 · P13 · site 2 · lonafarnib (farnesyltransferase inhibitor)"``."""
    parts = [str(row[c]) for c in ("Metadata_Plate", "Metadata_Well") if c in row and _present(row[c])]
    if "Metadata_Site" in row and _present(row["Metadata_Site"]):
        parts.append(f"site {_norm(row['Metadata_Site'])}")
    pert = next((row[c] for c in ("Metadata_pert_iname", "Metadata_broad_sample", "Metadata_gene")
                 if c in row and _present(row[c])), None)
    if pert is not None:
        moa = str(row["Metadata_moa"]).replace("|", ", ") if "Metadata_moa" in row and _present(row["Metadata_moa"]) \
            else None
        if moa and len(moa) > 40:
            moa = moa[:40].rsplit(" ", 1)[0].rstrip(", ") + "…"  # whole words
        parts.append(f"{pert} ({moa})" if moa else str(pert))
    return " · ".join(parts)


def _plate_pixel_size(viewer) -> float | None:
    from .._reader import PIXEL_SIZE_KEY

    for ly in plate_layers(viewer):
        px = ly.metadata.get(PIXEL_SIZE_KEY)
        if px:
            return float(px)
    return None


_CANVAS: "weakref.WeakSet" = weakref.WeakSet()


def install_canvas_info(viewer) -> None:
    """Caption the canvas with the field on screen (plate · well · site · perturbation),
    following the slider and the layers, and show a scale bar when the plate's pixel
    size is known.  Once per viewer."""
    if viewer in _CANVAS:
        return
    _CANVAS.add(viewer)
    ref = weakref.ref(viewer)

    def update(*_):
        v = ref()
        if v is not None:
            update_canvas_info(v)

    viewer.dims.events.current_step.connect(update)
    viewer.layers.events.inserted.connect(update)
    viewer.layers.events.removed.connect(update)
    viewer.layers.selection.events.active.connect(update)
    update_canvas_info(viewer)


def text_overlay(viewer):
    """The canvas's text overlay (``viewer.canvas.overlays.text`` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.overlays.text if canvas is not None else viewer.text_overlay


def scale_bar(viewer):
    """The canvas's scale bar (``viewer.canvas.overlays.scale_bar`` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.overlays.scale_bar if canvas is not None else viewer.scale_bar


def update_canvas_info(viewer) -> None:
    cur = current_field(viewer)
    overlay = text_overlay(viewer)
    if cur is None:
        overlay.visible = False
        return
    text = field_caption(cur[1])
    if overlay.text != text:
        overlay.text = text
    if not overlay.visible:
        overlay.position = "top_left"
        overlay.font_size = 11
        overlay.color = "white"
        if hasattr(overlay, "box"):  # a dark box keeps it legible over bright cells
            overlay.box = True
        overlay.visible = True
    px = _plate_pixel_size(viewer)
    bar = scale_bar(viewer)
    if px is not None and not bar.visible:
        bar.unit = "um"
        bar.visible = True


# ------------------------------------------------------------------ composite / one stain
def stain_layers(viewer) -> list[tuple[str, Any]]:
    """``(stain, layer)`` for the plate's stain layers (the hit gallery draws like them)."""
    import re

    return [(re.sub(r" \[\d+\]$", "", ly.name), ly) for ly in plate_layers(viewer)]


def show_stains(viewer, stain: str | None = None) -> None:
    """All stains in their Cell Painting colours (``stain=None``: the composite), or only
    ``stain``, in grey (one stain at a time: the most legible view of one channel)."""
    from .._reader import stain_colormap

    layers = stain_layers(viewer)
    order = list(dict.fromkeys(s for s, _ in layers))
    for name, ly in layers:
        if stain is None:
            ly.colormap = stain_colormap(name, order.index(name))
            ly.visible = True
        else:
            ly.visible = name == stain
            if name == stain:
                ly.colormap = "gray"


def focus_plate(viewer) -> None:
    """Zoom the view onto the plate's field (e.g. after a gallery tile was opened)."""
    layers = plate_layers(viewer)
    if not layers:
        return
    try:
        viewer.fit_to_view(layers=layers)
    except (AttributeError, TypeError):  # napari without fit_to_view(layers=)
        viewer.reset_view()
