"""Perturbation map widget: a 2-D map (UMAP, PCA for few points) of field or well embeddings.

The map is drawn in the widget (a Qt graphics scatter: hover a point for its label,
click or drag a lasso to select).  Selected points go to ``state.selection`` (the
Search widget selects those rows and the viewer shows the first field); the hits of
the current query (``state.results``) are drawn with a ring.  The projection runs in
a thread worker through :func:`napari_cellclip.reduce.embed_2d` (UMAP's first call
compiles for ~30 s; the GUI stays live).  Export writes embeddings + ``Metadata_*``
+ map coordinates to parquet.
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
from ._workers import Job, start_job
from .state import CellClipState, get_state

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd

__all__ = ["PerturbationMapWidget", "ScatterView", "METHODS", "LEVELS"]

METHODS = ("auto", "umap", "pca")
LEVELS = ("wells", "fields")
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
        self.setMinimumHeight(260)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.points: list[_Point] = []
        self._lasso: list[QPointF] = []
        self._lasso_item: QGraphicsPathItem | None = None
        self._bounds = QRectF(0, 0, 1, 1)
        self._silent = False

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
                add = bool(event.modifiers() & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier))
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
        return cols, [(f"{lo:.3g}", cols[int(np.nanargmin(np.where(finite, v, np.inf)))] if finite.any() else "#777777"),
                      (f"{hi:.3g}", cols[int(np.nanargmax(np.where(finite, v, -np.inf)))] if finite.any() else "#777777")]
    labels = ["" if (x is None or (isinstance(x, float) and np.isnan(x))) else str(x) for x in s.tolist()]
    cats = list(dict.fromkeys(labels))
    cmap = {c: palette[i % len(palette)] for i, c in enumerate(cats)}
    return [cmap[x] for x in labels], [(c or "(none)", cmap[c]) for c in cats]


# ----------------------------------------------------------------------------- widget
class PerturbationMapWidget(QWidget):
    """2-D map of the embeddings in the viewer's shared state."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state: CellClipState = get_state(napari_viewer)
        self._job: Job | None = None
        self.coords: np.ndarray | None = None
        self.map_store = None  # the store (field- or well-level) the map shows
        self.method_used = ""
        self._point_rows: list[list[int]] = []  # point -> field rows of state.store
        self._build()
        self._connect()
        self._on_store()

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        form = QFormLayout()
        self.level_combo = QComboBox()
        self.level_combo.addItems(LEVELS)
        form.addRow("Points", self.level_combo)
        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.method_combo.setToolTip("auto: UMAP, or PCA below a handful of points")
        form.addRow("Method", self.method_combo)
        self.color_combo = QComboBox()
        self.color_combo.setToolTip("Colour points by a Metadata_ column")
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
        self.color_combo.currentTextChanged.connect(self._recolor)
        self.view.selection_made.connect(self._on_points_selected)
        self.export_btn.clicked.connect(self._export_dialog)
        self.profiles_btn.clicked.connect(self._profiles_dialog)
        ev = self.state.events
        ev.store.connect(self._on_store)
        ev.results.connect(self._on_results)
        ev.selection.connect(self._on_selection)

    # ------------------------------------------------------------------ state in
    def _on_store(self, *_) -> None:
        st = self.state.store
        self.compute_btn.setEnabled(st is not None)
        self.export_btn.setEnabled(st is not None)
        self.profiles_btn.setEnabled(st is not None)
        if st is None:
            return
        cols = [c for c in st.fields.columns if str(c).startswith("Metadata_")]
        cur = self.color_combo.currentText()
        self.color_combo.blockSignals(True)
        self.color_combo.clear()
        self.color_combo.addItems(cols)
        pick = cur if cur in cols else ("Metadata_pert_iname" if "Metadata_pert_iname" in cols else (cols[0] if cols else ""))
        self.color_combo.setCurrentText(pick)
        self.color_combo.blockSignals(False)
        if self.map_store is not None and self.map_store.model_id != st.model_id:
            self.status_label.setText("New embeddings: compute the map again")
        else:
            self.status_label.setText(f"{len(st)} fields embedded: compute the map")

    def _hit_points(self) -> set[int]:
        if self.state.result_kind == "selection":  # the table only echoes a map selection
            return {i for i, p in enumerate(self.view.points) if p.hit}
        rows = set(self.state.hit_rows())
        return {i for i, rs in enumerate(self._point_rows) if rows.intersection(rs)}

    def _on_results(self, *_) -> None:
        if self.view.points:
            self.view.set_hits(self._hit_points())

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
        if self._job is not None:
            self._job.cancel()

    def compute(self, method: str | None = None) -> Job | None:
        """Project the embeddings to 2-D in a worker (method: auto/umap/pca; default: the dropdown)."""
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
        X = target.embeddings

        def work(progress, should_stop):
            from ..reduce import MIN_UMAP_POINTS, embed_2d

            used = "pca" if method == "pca" or len(X) < MIN_UMAP_POINTS else "umap"
            return embed_2d(X, method=method, random_state=0), used

        def returned(result):
            coords, used = result
            self._show(target, np.asarray(coords), used, level)

        self.compute_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress_bar.setRange(0, 0)  # busy (UMAP's first call compiles for ~30 s)
        first = method != "pca" and len(X) >= 10
        self.status_label.setText(
            f"Computing the map of {len(X)} {level}s…" + (" (UMAP's first run compiles, ~30 s)" if first else "")
        )
        self._job = start_job(work, name="CellCLIP: perturbation map", on_returned=returned,
                              on_finished=self._job_finished)
        return self._job

    def _job_finished(self) -> None:
        self.compute_btn.setEnabled(self.state.store is not None)
        self.cancel_btn.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        job = self._job
        self.progress_bar.setValue(0 if job is not None and job.cancelled else 1)
        if job is not None and job.cancelled:
            self.status_label.setText("Cancelled")

    def _show(self, target, coords: np.ndarray, used: str, level: str) -> None:
        st = self.state.store
        self.map_store = target
        self.coords = coords
        self.method_used = used
        keys = _display.field_keys(st.fields)
        if level == "well":
            by_well: dict[tuple, list[int]] = {}
            for i, k in enumerate(keys):
                by_well.setdefault(k[:2], []).append(i)
            self._point_rows = [by_well.get(k[:2], []) for k in _display.field_keys(target.fields)]
        else:
            self._point_rows = [[i] for i in range(len(target))]
        self.view.set_points(coords, self._labels(target.fields, level))
        self._recolor()
        self.view.set_hits(self._hit_points())
        self._on_selection()
        self.status_label.setText(
            f"{used.upper()} of {len(target)} {level}s — hover for labels, click or lasso to select"
        )

    @staticmethod
    def _labels(fields: "pd.DataFrame", level: str) -> list[str]:
        out = []
        for _, r in fields.iterrows():
            parts = [f"{r.get('Metadata_Plate', '')} {r.get('Metadata_Well', '')}"]
            if level == "field" and "Metadata_Site" in r:
                parts[0] += f" site {r['Metadata_Site']}"
            for c in ("Metadata_pert_iname", "Metadata_moa", "Metadata_dose"):
                v = r.get(c)
                if v is not None and str(v) not in ("", "nan"):
                    parts.append(f"{c[len('Metadata_'):]}: {v}")
            out.append("\n".join(parts))
        return out

    def _recolor(self, *_) -> None:
        if self.map_store is None or not self.view.points:
            return
        col = self.color_combo.currentText()
        f = self.map_store.fields
        values = f[col] if col in f.columns else [""] * len(f)
        colors, legend = colors_for(values)
        self.view.set_colors(colors)
        items = legend[:20]
        html = " ".join(
            f"<span style='color:{c}'>●</span>&nbsp;{_html(lbl)}" for lbl, c in items
        )
        if len(legend) > 20:
            html += f" … (+{len(legend) - 20})"
        self.legend.setText(html)

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
        """Write the embedded store's field and well profiles into ``folder`` in a worker
        (:func:`napari_cellclip.profiles.write_store_profiles`)."""
        st = self.state.store
        if st is None:
            _notify.error("Nothing is embedded yet: press 'Embed plate' in the Search widget first")
            return None

        def work(progress, should_stop):
            from ..profiles import write_store_profiles

            return write_store_profiles(st, folder)

        return start_job(work, name="CellCLIP: export profiles",
                         on_returned=lambda paths: _notify.info(f"Wrote {', '.join(map(str, paths.values()))}"))

    def _profiles_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export profiles into folder")
        if folder:
            self.export_profiles(folder)


def _html(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
