"""Hit gallery: the top fields of a result side by side on the canvas, next to the plate.

:func:`field_thumbnails` (numpy only; runs in the background process) reads the
fields and shrinks them by a whole factor (block means, raw intensities).
:func:`show_gallery` (GUI) lays them out as a grid placed to the right of the plate at
the same physical scale: one RGB image layer ``"hits"``, drawn from the raw tiles exactly
as the plate's stain layers are drawn now (colours, contrast, gamma, opacity,
visibility: change those on the plate's layers and the gallery follows), and a Points
layer ``"hits: labels"`` whose squares frame the tiles, whose text labels each with
rank, well, site, perturbation and score, and whose ``features`` table holds those
values.  (One RGB layer rather than one per stain: each napari layer costs a fraction
of a second on the GUI thread to create.)  Clicking a tile opens that field (the plate's slider moves to it and
the view zooms onto it; the tile's frame turns yellow).
"""

from __future__ import annotations

import math
import re
import weakref
from typing import Callable, Sequence

import numpy as np

from ._display import plate_layers

__all__ = ["field_thumbnails", "grid_shape", "mosaic", "build_gallery", "display_luts", "composite",
           "show_gallery", "clear_gallery", "gallery_layers", "open_tile", "redraw",
           "MAX_TILES", "TILE_PX", "IMAGE_LAYER", "LABELS_LAYER"]

#: at most this many fields in a gallery
MAX_TILES = 24
#: tiles are shrunk by a whole factor to at most this many pixels a side
TILE_PX = 192
IMAGE_LAYER = "hits"
LABELS_LAYER = "hits: labels"
GALLERY_KEY = "cellclip_gallery"
_GAP = 0.06  # gap between tiles, as a fraction of a tile
_LABEL_ROOM = 0.5  # gap between rows: room for a tile's three-line label above it (at the default zoom)
_LUT = 1024  # levels of the colour look-up tables
_SELECTED, _FRAME = "#ffd400", "#b0b0b0"


# ------------------------------------------------------------------ thumbnails (numpy)
def _shrink(img: np.ndarray, f: int) -> np.ndarray:
    c, h, w = img.shape
    h2, w2 = h // f, w // f
    x = img[:, : h2 * f, : w2 * f].astype(np.float32).reshape(c, h2, f, w2, f)
    return x.mean(axis=(2, 4))


def field_thumbnails(fields, stains: Sequence[str], size: int = TILE_PX, *,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, int, list[bool]]:
    """Thumbnails of the fields of ``fields`` → ``(tiles (k, C, t, t) float32, factor, readable)``.

    Each field is shrunk by ``factor`` (the smallest whole factor bringing the first
    readable field to ``size`` pixels a side) and padded/cropped to ``t x t``; an
    unreadable field gives a black tile (``readable[i]`` False).
    """
    from ..errors import Cancelled, CellClipError
    from ..images import load_field

    k = len(fields)
    imgs: list[np.ndarray | None] = []
    for i in range(k):
        if should_stop is not None and should_stop():
            raise Cancelled("gallery cancelled")
        try:
            imgs.append(load_field(fields.iloc[i], list(stains)))
        except CellClipError:
            imgs.append(None)
        if progress is not None:
            progress(i + 1, k)
    ok = [im for im in imgs if im is not None]
    if not ok:
        return np.zeros((k, len(stains), 1, 1), np.float32), 1, [False] * k
    f = max(1, math.ceil(max(ok[0].shape[1:]) / size))
    t = max(ok[0].shape[1:]) // f
    tiles = np.zeros((k, len(stains), t, t), np.float32)
    for i, im in enumerate(imgs):
        if im is not None:
            small = _shrink(im, f)[:, :t, :t]
            tiles[i, :, : small.shape[1], : small.shape[2]] = small
    return tiles, f, [im is not None for im in imgs]


def grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols) of a gallery of ``k`` tiles: near-square, wider than tall."""
    cols = max(1, math.ceil(math.sqrt(k)))
    return max(1, math.ceil(k / cols)), cols


def mosaic(tiles: np.ndarray, cols: int, gap: int, row_gap: int) -> np.ndarray:
    """``(k, C, t, t)`` tiles → ``(C, H, W)`` grid, row by row, ``gap`` pixels apart (black);
    rows ``row_gap`` pixels apart, each row's labels sit in the gap above it."""
    k, c, t, _ = tiles.shape
    rows = max(1, math.ceil(k / cols))
    step, row_step = t + gap, t + row_gap
    out = np.zeros((c, rows * row_step - (row_step - t), cols * step - gap), tiles.dtype)
    for i in range(k):
        r, q = divmod(i, cols)
        out[:, r * row_step: r * row_step + t, q * step: q * step + t] = tiles[i]
    return out


# ------------------------------------------------------------------------- layers (GUI)
def _stain_of(layer) -> str:
    return re.sub(r" \[\d+\]$", "", layer.name)


def gallery_layers(viewer) -> list:
    """The gallery's layers in ``viewer`` (the composite image and the labels)."""
    return [ly for ly in viewer.layers if GALLERY_KEY in getattr(ly, "metadata", {})]


def clear_gallery(viewer) -> None:
    for ly in gallery_layers(viewer):
        viewer.layers.remove(ly)
    _MOSAICS.pop(viewer, None)


def _plate_geometry(viewer):
    """(plate layers, world height, world width, pixel size) of the open plate."""

    layers = plate_layers(viewer)
    if not layers:
        return [], 0.0, 0.0, 1.0
    ly = layers[0]
    scale = np.asarray(ly.scale, dtype=float)
    h, w = ly.data.shape[-2:]
    return layers, h * scale[-2], w * scale[-1], float(scale[-1])


def _label(rec: dict, score_name: str) -> str:
    site = rec.get("Metadata_Site")
    site = "" if site is None or (isinstance(site, float) and np.isnan(site)) else f" s{int(float(site))}"
    pert = rec.get("Metadata_pert_iname")
    pert = "" if pert is None or (isinstance(pert, float) and np.isnan(pert)) else f"\n{pert}"
    score = rec.get("score")
    score = "" if score is None or (isinstance(score, float) and np.isnan(score)) else f"\n{score_name} {score:.2f}"
    return f"{int(rec.get('rank', 0))}. {rec.get('Metadata_Well', '')}{site}{pert}{score}"  # three short lines


def display_luts(viewer, stains: Sequence[str]) -> list:
    """How the plate's layers draw each stain now: ``(lut (L, 3), low, high)`` per stain
    (colormap with gamma, times opacity; contrast limits), or ``None`` when it is hidden."""
    from .._reader import stain_colormap
    from ._display import stain_layers

    by_stain = {}
    for name, ly in stain_layers(viewer):
        by_stain.setdefault(name, ly)
    out = []
    for c, stain in enumerate(stains):
        ly = by_stain.get(stain)
        if ly is not None and not ly.visible:
            out.append(None)
            continue
        if ly is not None:
            cmap, gamma, alpha, (lo, hi) = ly.colormap, ly.gamma, ly.opacity, ly.contrast_limits
        else:
            cmap, gamma, alpha, (lo, hi) = stain_colormap(stain, c), 1.0, 1.0, (None, None)
        lut = np.asarray(cmap.map(np.linspace(0.0, 1.0, _LUT) ** gamma), np.float32)[:, :3] * alpha
        out.append((lut, lo, hi))
    return out


def composite(grid: np.ndarray, luts: Sequence) -> np.ndarray:
    """``(C, H, W)`` raw intensities → ``(H, W, 3)`` uint8, each stain through its look-up table
    (:func:`display_luts`) and summed (additive blending), as napari draws the plate."""
    from .._reader import display_limits

    rgb = np.zeros(grid.shape[1:] + (3,), np.float32)
    for c, entry in enumerate(luts):
        if entry is None:
            continue
        lut, lo, hi = entry
        if lo is None:
            lo, hi = display_limits([grid[c:c + 1]], grid.dtype)[0]
        idx = np.clip((grid[c] - lo) * ((len(lut) - 1) / max(hi - lo, 1e-12)), 0, len(lut) - 1).astype(np.intp)
        rgb += lut[idx]
    return (np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def build_gallery(fields, stains: Sequence[str], luts: Sequence, size: int = TILE_PX, *,
                  progress=None, should_stop=None) -> dict:
    """Thumbnails of ``fields`` laid out as a grid and drawn with ``luts`` (runs in the background
    process): ``{"grid" (C, H, W), "rgb" (H, W, 3), "factor", "tile", "gap", "cols", "readable"}``."""
    tiles, factor, readable = field_thumbnails(fields, stains, size, progress=progress, should_stop=should_stop)
    k, _, t, _ = tiles.shape
    cols = grid_shape(k)[1]
    gap, row_gap = max(2, int(round(_GAP * t))), max(2, int(round(_LABEL_ROOM * t)))
    grid = mosaic(tiles, cols, gap, row_gap)
    return {"grid": grid, "rgb": composite(grid, luts), "factor": factor, "tile": t, "gap": gap,
            "row_gap": row_gap, "cols": cols, "readable": readable}


_MOSAICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # viewer -> (grid, stains)


def redraw(viewer) -> None:
    """Draw the gallery again with the plate layers' current display settings."""
    got = _MOSAICS.get(viewer)
    image = next((ly for ly in gallery_layers(viewer) if ly.name == IMAGE_LAYER), None)
    if got is not None and image is not None:
        image.data = composite(got[0], display_luts(viewer, got[1]))


def show_gallery(viewer, gallery: dict, table, stains: Sequence[str], *,
                 score_name: str = "score", on_open: Callable[[int], None] | None = None) -> list:
    """Show ``gallery`` (from :func:`build_gallery`) for the rows of ``table`` (``rank``,
    ``score``, ``store_row``, ``Metadata_*``), replacing the previous one (its layers are
    updated in place: adding napari layers is slow).

    ``on_open(store_row)`` runs when a tile is clicked.  Returns the two layers.
    """
    plate, _plate_h, plate_w, px = _plate_geometry(viewer)
    factor, t, gap, cols = gallery["factor"], gallery["tile"], gallery["gap"], gallery["cols"]
    k = len(gallery["readable"])
    step = (t + gap) * factor * px  # world units from one tile to the next
    row_step = (t + gallery["row_gap"]) * factor * px  # from one row to the next
    tile = t * factor * px
    origin = np.array([0.0, plate_w + max(step - tile, 0.08 * plate_w)])
    geometry = {"origin": origin.tolist(), "step": step, "row_step": row_step, "tile": tile, "cols": cols, "n": k}
    _MOSAICS[viewer] = (gallery["grid"], list(stains))
    rgb = gallery["rgb"]
    centres = np.array([origin + [(i // cols) * row_step + tile / 2, (i % cols) * step + tile / 2]
                        for i in range(k)])
    keep = [c for c in table.columns if c in ("rank", "score", "store_row") or str(c).startswith("Metadata_")]
    features = table.head(k)[keep].reset_index(drop=True)
    features["label"] = [_label(r, score_name) for r in table.head(k).to_dict("records")]
    # the text's anchor is the point (the tile's centre): move it to the tile's top-left corner, the
    # text rising from there into the gap above the tile
    text = {"string": "{label}", "anchor": "upper_left", "size": 9, "color": "white",
            "translation": [-tile * 0.52, -tile * 0.47]}  # its bottom just above the tile's top edge
    layers = {ly.name: ly for ly in gallery_layers(viewer)}
    first = not layers
    image, labels = layers.get(IMAGE_LAYER), layers.get(LABELS_LAYER)
    if image is None:
        image = viewer.add_image(rgb, name=IMAGE_LAYER, rgb=True, scale=(factor * px, factor * px),
                                 translate=tuple(origin), metadata={GALLERY_KEY: geometry})
    else:
        image.data, image.scale, image.translate = rgb, (factor * px, factor * px), tuple(origin)
        image.metadata[GALLERY_KEY] = geometry
    if labels is None:
        labels = viewer.add_points(
            centres, name=LABELS_LAYER, symbol="square", size=tile, face_color="transparent",
            border_color=_FRAME, border_width=0.012, border_width_is_relative=True, features=features,
            text=text, metadata={GALLERY_KEY: geometry})
        labels.editable = False
    else:
        labels.data = centres
        labels.features = features
        labels.size = tile
        labels.border_color = _FRAME
        labels.text = text
        labels.metadata[GALLERY_KEY] = geometry
    _install_click(viewer, on_open)
    _follow_display(viewer, plate)
    if first:
        viewer.reset_view()
    return [image, labels]


_FOLLOWED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # plate layer -> its redraw timer


def _follow_display(viewer, layers) -> None:
    """Redraw the gallery (at most every 150 ms) when a plate layer's display settings change."""
    from qtpy.QtCore import QTimer

    ref = weakref.ref(viewer)
    for ly in layers:
        if ly in _FOLLOWED:
            continue
        timer = _FOLLOWED[ly] = QTimer()
        timer.setSingleShot(True)
        timer.setInterval(150)

        def fire(timer=timer):
            v = ref()
            if v is not None:
                redraw(v)

        timer.timeout.connect(fire)
        for name in ("contrast_limits", "gamma", "colormap", "opacity", "visible"):
            getattr(ly.events, name).connect(lambda *_, timer=timer: timer.start())


def tile_at(viewer, world_yx) -> int | None:
    """Index of the gallery tile under world position ``(y, x)``, or None."""
    labels = next((ly for ly in gallery_layers(viewer) if ly.name == LABELS_LAYER), None)
    if labels is None:
        return None
    g = labels.metadata[GALLERY_KEY]
    row_step = g["row_step"]
    dy, dx = np.asarray(world_yx[-2:], float) - np.asarray(g["origin"])
    y, x = dy / row_step, dx / g["step"]
    if y < 0 or x < 0 or x >= g["cols"]:
        return None
    r, q = int(y), int(x)
    inside = (y - r) * row_step <= g["tile"] and (x - q) * g["step"] <= g["tile"]
    i = r * g["cols"] + q
    return i if inside and i < g["n"] else None


def open_tile(viewer, i: int, on_open: Callable[[int], None] | None = None) -> int | None:
    """Open gallery tile ``i``: highlight it and call ``on_open(store_row)``; returns the store row."""
    labels = next((ly for ly in gallery_layers(viewer) if ly.name == LABELS_LAYER), None)
    if labels is None or not 0 <= i < len(labels.data):
        return None
    colors = np.tile(np.asarray([int(_FRAME[j:j + 2], 16) / 255 for j in (1, 3, 5)] + [1.0]), (len(labels.data), 1))
    colors[i, :3] = [int(_SELECTED[j:j + 2], 16) / 255 for j in (1, 3, 5)]
    labels.border_color = colors
    row = int(labels.features["store_row"].iloc[i])
    if on_open is not None and row >= 0:
        on_open(row)
    return row


_CLICK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # viewer -> on_open
_INSTALLED: "weakref.WeakSet" = weakref.WeakSet()


def _install_click(viewer, on_open) -> None:
    """One mouse callback per viewer: a click (not a drag) on a tile opens it."""
    _CLICK[viewer] = on_open
    if viewer in _INSTALLED:
        return
    ref = weakref.ref(viewer)

    def on_mouse(_viewer, event):
        if event.type != "mouse_press":
            return
        start = np.asarray(event.position, float)
        yield
        while event.type == "mouse_move":
            yield
        v = ref()
        if v is None or event.type != "mouse_release":
            return
        if np.linalg.norm(np.asarray(event.position, float)[-2:] - start[-2:]) > _drag_tolerance(v):
            return  # a pan, not a click
        i = tile_at(v, event.position)
        if i is not None:
            open_tile(v, i, _CLICK.get(v))

    viewer.mouse_drag_callbacks.append(on_mouse)
    _INSTALLED.add(viewer)


def _drag_tolerance(viewer) -> float:
    """A few screen pixels, in world units."""
    try:
        return 4.0 / float(viewer.camera.zoom)
    except Exception:  # noqa: BLE001
        return 0.0
