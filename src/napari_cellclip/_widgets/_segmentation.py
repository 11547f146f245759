"""Cell segmentation widget: nuclei and cell masks of the field on screen, per-cell table export.

A small dock widget.  With "Show masks of the field on screen" ticked, the field on
screen (the field slider of a plate opened by the CellCLIP reader) is segmented in the
widgets' ``"cells"`` background process (:mod:`._workers`; the segmentation the ``cells``
encoder measures, :func:`._masks.segmentation_layer_data`) and shown as two Labels
layers, ``nuclei`` and ``cells``; moving the slider recomputes them for the new field,
so only fields that are looked at are segmented.  "Export per-cell table…" writes one
row per cell of every field of the plate (:func:`napari_cellclip.celltable.export_cell_table`)
in the same process, with progress and cancel.

The widget holds no image analysis: the background process calls the core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import _display, _notify
from ._masks import LAYER_NAMES, SEG_KEY
from ._workers import Job, submit
from .state import FIELDS_KEY

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["LAYER_NAMES", "SegmentationWidget"]


class SegmentationWidget(QWidget):
    """Nuclei / cell masks of the field on screen, and a per-cell table of the plate."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._job: Job | None = None
        self._export_job: Job | None = None
        self._pending = False
        self.nuclei_stain = QComboBox()
        self.cell_stain = QComboBox()
        self.show_masks = QCheckBox("Show masks of the field on screen")
        self.export_button = QPushButton("Export per-cell table…")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Nuclei stain", self.nuclei_stain)
        form.addRow("Cell stain", self.cell_stain)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.show_masks)
        layout.addWidget(self.export_button)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.show_masks.toggled.connect(self._on_toggled)
        self.export_button.clicked.connect(self._on_export_clicked)
        self.nuclei_stain.currentTextChanged.connect(lambda _t: self.refresh())
        self.cell_stain.currentTextChanged.connect(lambda _t: self.refresh())
        self.viewer.dims.events.current_step.connect(lambda _e: self.refresh())
        self.viewer.layers.events.inserted.connect(lambda _e: self._fill_stains())
        self.viewer.layers.events.removed.connect(lambda _e: self._fill_stains())
        self._fill_stains()

    # ------------------------------------------------------------------ plate
    def _fields(self):
        layers = _display.plate_layers(self.viewer)
        return layers[0].metadata[FIELDS_KEY] if layers else None

    def _stains(self) -> list[str]:
        from ..plates import stains

        fields = self._fields()
        return list(stains(fields)) if fields is not None else []

    def _fill_stains(self) -> None:
        stains = self._stains()
        for combo, preferred in ((self.nuclei_stain, "DNA"), (self.cell_stain, "RNA")):
            if [combo.itemText(i) for i in range(combo.count())] == stains:
                continue
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(stains)
            if preferred in stains:
                combo.setCurrentText(preferred)
            combo.blockSignals(False)
        self.export_button.setEnabled(bool(stains))
        if not stains:
            self.status.setText("Open a plate (File > Open, or the LINCS sample) to segment its fields.")

    # ------------------------------------------------------------------ masks
    def _on_toggled(self, on: bool) -> None:
        for name in LAYER_NAMES:
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = on
        self.refresh()

    def refresh(self) -> None:
        """Segment the field on screen (in a worker) if masks are shown and not current."""
        if not self.show_masks.isChecked():
            return
        if self._job is not None and self._job.is_running:
            self._pending = True  # the field changed while segmenting: redo when done
            return
        found = _display.current_field(self.viewer)
        if found is None:
            self.status.setText("No CellCLIP plate is open.")
            return
        key, row = found
        nuc, cell = self.nuclei_stain.currentText(), self.cell_stain.currentText()
        if self._shown() == (key, nuc, cell):
            return
        stains = self._stains()
        self.status.setText(f"segmenting {key[1]} site {key[2]}…")
        self._pending = False
        self._job = submit("cells", "segment", {"row": row, "stains": stains, "nuclei_stain": nuc, "cell_stain": cell},
                           name=f"segment {key[1]} site {key[2]}", unit="fields", on_returned=self._apply,
                           on_finished=self._finished)

    def _shown(self):
        if LAYER_NAMES[0] not in self.viewer.layers:
            return None
        info = self.viewer.layers[LAYER_NAMES[0]].metadata.get(SEG_KEY) or {}
        return info.get("field"), info.get("nuclei_stain"), info.get("cell_stain")

    def _apply(self, layer_data: list[tuple]) -> None:
        for data, kwargs, _kind in layer_data:
            name = kwargs["name"]
            if name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.data = data
                layer.metadata.update(kwargs["metadata"])
            else:
                layer = self.viewer.add_labels(data, **kwargs)
                if name == LAYER_NAMES[1]:
                    layer.contour = 2  # cells as outlines over the stains, nuclei filled
        info = layer_data[0][1]["metadata"][SEG_KEY]
        _plate, well, site = info["field"]
        note = f" ({info['note']})" if info["note"] else ""
        self.status.setText(f"{well} site {site}: {info['n_cells']} cells{note}")

    def _finished(self) -> None:
        if self._pending:
            self.refresh()

    # ------------------------------------------------------------------ export
    def _on_export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Per-cell table", "cells.parquet",
                                              "Parquet (*.parquet);;CSV (*.csv)")
        if path:
            self.export(path)

    def export(self, path: str) -> Job | None:
        """Write the per-cell table of every field of the open plate to ``path`` (in the background process)."""
        fields = self._fields()
        if fields is None:
            _notify.error("Open a plate first: there is nothing to export.")
            return None
        nuc, cell = self.nuclei_stain.currentText(), self.cell_stain.currentText()

        def done(summary: dict) -> None:
            extra = f", {summary['empty_fields']} fields without cells" if summary["empty_fields"] else ""
            skipped = f", {len(summary['skipped'])} fields skipped" if summary["skipped"] else ""
            _notify.info(f"{summary['cells']} cells written to {summary['path']}{extra}{skipped}")

        self._export_job = submit("cells", "cell_table", {"fields": fields, "path": str(path), "nuclei_stain": nuc,
                                                          "cell_stain": cell},
                                  name="per-cell table", unit="fields", on_returned=done)
        return self._export_job
