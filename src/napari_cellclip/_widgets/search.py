"""Search widget: embed the open plate with a CellCLIP checkpoint and query it by text or by example.

The widget holds no model math.  It calls the core (``embed.load_model``,
``embed.embed_fields``, ``search.text_query`` / ``image_query`` / ``zero_shot`` /
``export_csv``), runs the slow calls in thread workers (:mod:`._workers`) and writes
what they return into the viewer's shared :class:`~._widgets.state.CellClipState`.
It reacts to ``state.selection`` (set here or by the Perturbation map) by selecting
those rows of its table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import _display, _notify
from ._workers import Job, start_job
from .state import CellClipState, get_state

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd

__all__ = ["SearchWidget", "DEVICES", "RESULT_COLUMNS", "ZERO_SHOT_COLUMNS"]

DEVICES = ("auto", "cuda", "mps", "cpu")

#: (header, column) of the results table for ranked queries
RESULT_COLUMNS = (
    ("rank", "rank"),
    ("score", "score"),
    ("plate", "Metadata_Plate"),
    ("well", "Metadata_Well"),
    ("site", "Metadata_Site"),
    ("perturbation", "Metadata_pert_iname"),
    ("MoA", "Metadata_moa"),
)
#: (header, column) of the results table for zero-shot scoring
ZERO_SHOT_COLUMNS = (
    ("plate", "Metadata_Plate"),
    ("well", "Metadata_Well"),
    ("best prompt", "best_prompt"),
    ("score", "best_score"),
    ("perturbation", "Metadata_pert_iname"),
    ("MoA", "Metadata_moa"),
    ("correct", "correct"),
)


def _fmt(v) -> str:
    if v is None:
        return ""
    try:
        import pandas as pd

        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer() and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.4f}"
    if hasattr(v, "item"):
        return _fmt(v.item())
    return str(v)


class SearchWidget(QWidget):
    """Text-to-phenotype search over the plate open in ``napari_viewer``."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state: CellClipState = get_state(napari_viewer)
        self._job: Job | None = None
        self._updating_table = False
        self._build()
        self._connect()
        self._on_fields()
        self._on_store()
        self._on_results()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)

        self.plate_label = QLabel("No plate open: File ▸ Open a plate folder, or File ▸ Open Sample ▸ CellCLIP")
        self.plate_label.setWordWrap(True)
        lay.addWidget(self.plate_label)

        # --- model + embedding
        box = QGroupBox("Model")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.checkpoint_edit = QLineEdit(self.state.model_path)
        self.checkpoint_edit.setToolTip("CellCLIP checkpoint folder (config.json + model.safetensors)")
        self.browse_btn = QPushButton("…")
        self.browse_btn.setMaximumWidth(30)
        self.browse_btn.setToolTip("Choose a checkpoint folder")
        row.addWidget(self.checkpoint_edit)
        row.addWidget(self.browse_btn)
        form.addRow("Checkpoint", row)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setCurrentText(self.state.device)
        form.addRow("Device", self.device_combo)
        brow = QHBoxLayout()
        self.embed_btn = QPushButton("Embed plate")
        self.embed_btn.setToolTip("Embed every field of the open plate (cached embeddings are reused)")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        brow.addWidget(self.embed_btn)
        brow.addWidget(self.cancel_btn)
        form.addRow(brow)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        form.addRow(self.progress_bar)
        self.status_label = QLabel("Not embedded yet")
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        lay.addWidget(box)

        # --- queries
        qbox = QGroupBox("Query")
        qlay = QVBoxLayout(qbox)
        self.query_edit = QLineEdit()
        self.query_edit.setPlaceholderText("e.g. A549 cells treated with compound: lonafarnib  (Enter runs)")
        qlay.addWidget(self.query_edit)
        qrow = QHBoxLayout()
        qrow.addWidget(QLabel("top-k"))
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(1, 100000)
        self.topk_spin.setValue(20)
        qrow.addWidget(self.topk_spin)
        self.level_combo = QComboBox()
        self.level_combo.addItems(["fields", "wells"])
        self.level_combo.setToolTip("Rank single fields of view, or wells (mean of their fields)")
        qrow.addWidget(self.level_combo)
        self.search_btn = QPushButton("Search")
        qrow.addWidget(self.search_btn)
        qlay.addLayout(qrow)
        self.more_btn = QPushButton("More like this field")
        self.more_btn.setToolTip("Rank by the image embedding of the selected result (or the field on screen)")
        qlay.addWidget(self.more_btn)
        lay.addWidget(qbox)

        # --- zero-shot
        zbox = QGroupBox("Zero-shot")
        zlay = QVBoxLayout(zbox)
        self.prompts_edit = QPlainTextEdit()
        self.prompts_edit.setPlaceholderText("Candidate prompts, one per line")
        self.prompts_edit.setMaximumHeight(70)
        zlay.addWidget(self.prompts_edit)
        zrow = QHBoxLayout()
        self.plate_prompts_check = QCheckBox("all prompts in the plate metadata")
        self.plate_prompts_check.setChecked(True)
        self.zero_shot_btn = QPushButton("Score wells")
        zrow.addWidget(self.plate_prompts_check)
        zrow.addWidget(self.zero_shot_btn)
        zlay.addLayout(zrow)
        lay.addWidget(zbox)

        # --- results
        self.results_label = QLabel("Results")
        lay.addWidget(self.results_label)
        self.table = QTableWidget(0, len(RESULT_COLUMNS))
        self.table.setHorizontalHeaderLabels([h for h, _ in RESULT_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setWordWrap(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(160)
        lay.addWidget(self.table, stretch=1)
        self.export_btn = QPushButton("Export table to CSV…")
        lay.addWidget(self.export_btn)

    def _connect(self) -> None:
        self.browse_btn.clicked.connect(self._browse)
        self.checkpoint_edit.editingFinished.connect(self._on_checkpoint_edited)
        self.device_combo.currentTextChanged.connect(self._on_device_changed)
        self.embed_btn.clicked.connect(self.embed_plate)
        self.cancel_btn.clicked.connect(self.cancel)
        self.query_edit.returnPressed.connect(self.run_query)
        self.search_btn.clicked.connect(self.run_query)
        self.more_btn.clicked.connect(self.more_like_this)
        self.zero_shot_btn.clicked.connect(self.run_zero_shot)
        self.export_btn.clicked.connect(self._export_dialog)
        self.table.itemSelectionChanged.connect(self._on_table_selection)
        self.table.cellClicked.connect(self._on_cell_clicked)
        ev = self.state.events
        ev.fields.connect(self._on_fields)
        ev.store.connect(self._on_store)
        ev.results.connect(self._on_results)
        ev.selection.connect(self._on_selection)
        ev.model_path.connect(self._on_state_model_path)

    # ---------------------------------------------------------------- state in
    def _on_fields(self, *_) -> None:
        f = self.state.fields
        if f is None:
            return
        plates = sorted({str(p) for p in f["Metadata_Plate"]}) if "Metadata_Plate" in f.columns else ["?"]
        wells = f["Metadata_Well"].nunique() if "Metadata_Well" in f.columns else "?"
        self.plate_label.setText(f"Plate {', '.join(plates)}: {len(f)} fields in {wells} wells")
        st = self.state.store
        if st is not None and _display.field_keys(st.fields) != _display.field_keys(f):
            self.status_label.setText("A new plate is open: embed it to search it")

    def _on_store(self, *_) -> None:
        st = self.state.store
        ready = st is not None
        for w in (self.search_btn, self.more_btn, self.zero_shot_btn):
            w.setEnabled(ready)
        if ready:
            skipped = len(st.info.get("skipped", []) or [])
            msg = f"Embedded {len(st)} fields"
            if skipped:
                msg += f" ({skipped} skipped: unreadable)"
            self.status_label.setText(msg + " — type a query and press Enter")

    def _on_state_model_path(self, *_) -> None:
        if self.checkpoint_edit.text() != self.state.model_path:
            self.checkpoint_edit.setText(self.state.model_path)

    def _on_results(self, *_) -> None:
        res = self.state.results
        kind = self.state.result_kind
        cols = ZERO_SHOT_COLUMNS if kind == "zero_shot" else RESULT_COLUMNS
        self._updating_table = True
        try:
            self.table.clearSelection()
            self.table.setColumnCount(len(cols))
            self.table.setHorizontalHeaderLabels([h for h, _ in cols])
            n = 0 if res is None else len(res)
            self.table.setRowCount(n)
            if res is not None:
                present = [(j, c) for j, (_, c) in enumerate(cols) if c in res.columns]
                for i, rec in enumerate(res.itertuples(index=False)):
                    d = rec._asdict() if hasattr(rec, "_asdict") else dict(zip(res.columns, rec))
                    for j, c in present:
                        item = QTableWidgetItem(_fmt(d.get(c)) if c in d else _fmt(res.iloc[i][c]))
                        if c in ("rank", "score", "best_score", "Metadata_Site"):
                            item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                        self.table.setItem(i, j, item)
            self.table.resizeColumnsToContents()
        finally:
            self._updating_table = False
        title = {"text": "Text query", "image": "More like this", "zero_shot": "Zero-shot (best prompt per well)",
                 "selection": "Selected on the map"}.get(kind, "Results")
        if res is not None:
            q = f": {self.state.query}" if self.state.query and kind != "selection" else ""
            self.results_label.setText(f"{title}{q} — {len(res)} rows")
        else:
            self.results_label.setText("Results")
        self._on_selection()

    def _on_selection(self, *_) -> None:
        """Select the table rows of ``state.selection`` (e.g. points picked on the map)."""
        res = self.state.results
        sel = set(int(s) for s in self.state.selection)
        if res is None or "store_row" not in res.columns:
            return
        rows = [i for i, r in enumerate(res["store_row"].tolist()) if r is not None and int(r) in sel]
        if not sel:
            return
        if not rows and self.state.store is not None:
            # the selection is not in the table: show the selected fields instead
            self._show_selection_table(sorted(sel))
            return
        self._updating_table = True
        try:
            self.table.clearSelection()
            sm = self.table.selectionModel()
            from qtpy.QtCore import QItemSelectionModel

            for i in rows:
                idx = self.table.model().index(i, 0)
                sm.select(idx, QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows)
            if rows:
                self.table.scrollTo(self.table.model().index(rows[0], 0))
        finally:
            self._updating_table = False

    def _show_selection_table(self, store_rows: Sequence[int]) -> None:
        import numpy as np
        import pandas as pd

        st = self.state.store
        meta = [c for c in st.fields.columns if str(c).startswith("Metadata_")]
        df = st.fields.iloc[list(store_rows)][meta].reset_index(drop=True)
        head = pd.DataFrame({
            "rank": np.arange(1, len(df) + 1, dtype=np.int64),
            "score": np.full(len(df), np.nan),
            "row": np.asarray(store_rows, dtype=np.int64),
        })
        res = pd.concat([head, df], axis=1)
        res["store_row"] = np.asarray(store_rows, dtype=np.int64)
        self.state.result_kind = "selection"
        self.state.results = res

    # --------------------------------------------------------------- controls
    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "CellCLIP checkpoint folder", self.checkpoint_edit.text())
        if path:
            self.checkpoint_edit.setText(path)
            self._on_checkpoint_edited()

    def _on_checkpoint_edited(self) -> None:
        self.state.model_path = self.checkpoint_edit.text().strip()

    def _on_device_changed(self, text: str) -> None:
        self.state.device = text

    def set_checkpoint(self, path) -> None:
        """Use checkpoint folder ``path`` (as if typed in the box)."""
        self.checkpoint_edit.setText(str(path))
        self._on_checkpoint_edited()

    # -------------------------------------------------------------- embedding
    def _busy(self, busy: bool) -> None:
        self.embed_btn.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy)
        self.zero_shot_btn.setEnabled(not busy and self.state.store is not None)
        if busy:
            self.progress_bar.setRange(0, 0)  # indeterminate until the first report

    def _on_progress(self, done: int, total: int) -> None:
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))

    def cancel(self) -> None:
        """Cancel the running job (embedding, model loading or zero-shot)."""
        if self._job is not None:
            self._job.cancel()
            self.status_label.setText("Cancelling…")

    def _model_for_job(self):
        """A callable for the worker: the loaded model, or load it (never touches widgets)."""
        path = self.state.model_path.strip()
        device = self.state.device
        key = (str(Path(path).expanduser().resolve()) if path else "", device)
        cached = self.state.model if self.state.model_key == key else None

        def get_model():
            if cached is not None:
                return cached
            from ..checkpoints import load_model
            from ..errors import CheckpointError

            if not path:
                raise CheckpointError("no checkpoint chosen: pick a CellCLIP checkpoint folder")
            return load_model(path, device)

        return key, get_model

    def embed_plate(self) -> Job | None:
        """Embed all fields of the open plate in a worker; returns the job (or None if refused)."""
        if self._job is not None and self._job.is_running:
            _notify.warning("CellCLIP is busy: wait for the running job or cancel it")
            return None
        fields = self.state.fields
        if fields is None:
            _notify.error("No plate is open: open a plate folder or LoadData CSV (File ▸ Open), "
                          "or File ▸ Open Sample ▸ CellCLIP")
            return None
        self.state.model_path = self.checkpoint_edit.text().strip()
        key, get_model = self._model_for_job()
        device = self.state.device

        def work(progress, should_stop):
            from ..embed import embed_fields

            model = get_model()
            if should_stop():
                from ..errors import Cancelled

                raise Cancelled()
            store = embed_fields(fields, model, device=device, progress=progress, should_stop=should_stop)
            return model, store

        def returned(result):
            model, store = result
            self.state.model = model
            self.state.model_key = key
            self.state.store = store
            self.show_prompt_form(model)

        self._busy(True)
        self.status_label.setText(f"Embedding {len(fields)} fields…")
        self._job = start_job(
            work, name="CellCLIP: embedding plate", on_returned=returned,
            on_finished=self._job_finished, on_progress=self._on_progress, total=2 * len(fields),
        )
        return self._job

    def show_prompt_form(self, model) -> None:
        """Show, as placeholder text, how the checkpoint's training prompts were written, so that
        typed queries and candidates match what the model learned (they are used as typed)."""
        from ..checkpoints import prompt_context

        ctx = prompt_context(model.config)
        if ctx is None:
            return
        self.query_edit.setPlaceholderText(f"e.g. {ctx.example()}  (Enter runs)")
        self.query_edit.setToolTip(f"This checkpoint learned prompts like “{ctx.example()}”")
        self.prompts_edit.setPlaceholderText(f"Candidate prompts, one per line, e.g. {ctx.example()}")

    def _job_finished(self) -> None:
        self._busy(False)
        self.progress_bar.setRange(0, 1)
        job = self._job
        if job is not None and job.cancelled:
            self.progress_bar.setValue(0)
            self.status_label.setText("Cancelled")
        else:
            self.progress_bar.setValue(1)
            if self.state.store is None:
                self.status_label.setText("Not embedded")
        self._on_store()

    @property
    def job(self) -> Job | None:
        """The last job started by this widget."""
        return self._job

    # ---------------------------------------------------------------- queries
    def _ready(self) -> bool:
        if self.state.store is None:
            _notify.error("Nothing is embedded yet: press 'Embed plate' first")
            return False
        if self.state.model is None:
            _notify.error("No model loaded: press 'Embed plate' first")
            return False
        return True

    def _level(self) -> str:
        return "well" if self.level_combo.currentText() == "wells" else "field"

    def _with_store_rows(self, res: "pd.DataFrame", level: str) -> "pd.DataFrame":
        """Add ``store_row`` (field position in the store) to a results table."""
        res = res.copy()
        if level == "field" and "row" in res.columns:
            res["store_row"] = res["row"].astype("int64")
            return res
        st = self.state.store
        first: dict[tuple, int] = {}
        for i, k in enumerate(_display.field_keys(st.fields)):
            first.setdefault(k[:2], i)
        keys = _display.field_keys(res)
        res["store_row"] = [first.get(k[:2], -1) for k in keys]
        return res

    def run_query(self, text: str | None = None) -> "pd.DataFrame | None":
        """Rank the plate by a text query (the query box's text by default)."""
        from ..errors import CellClipError

        if text is None or isinstance(text, bool):
            text = self.query_edit.text()
        else:
            self.query_edit.setText(text)
        if not self._ready():
            return None
        level = self._level()
        try:
            from ..search import text_query

            res = text_query(self.state.model, self.state.store, text, top_k=self.topk_spin.value(), level=level)
        except CellClipError as exc:
            _notify.error(str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - shown, never a traceback
            _notify.error(f"query failed: {type(exc).__name__}: {exc}")
            return None
        res = self._with_store_rows(res, level)
        self.state.query = text
        self.state.result_kind = "text"
        self.state.results = res
        return res

    def _selected_store_row(self) -> int | None:
        res = self.state.results
        rows = sorted({ix.row() for ix in self.table.selectionModel().selectedRows()})
        if res is not None and rows and "store_row" in res.columns:
            r = int(res["store_row"].iloc[rows[0]])
            return r if r >= 0 else None
        if self.state.selection:
            return int(self.state.selection[0])
        cur = _display.current_field(self.viewer)
        if cur is not None and self.state.store is not None:
            keys = _display.field_keys(self.state.store.fields)
            if cur[0] in keys:
                return keys.index(cur[0])
        return None

    def more_like_this(self, row: int | None = None) -> "pd.DataFrame | None":
        """Rank the plate by the image embedding of field ``row`` (store position).

        Default: the selected result, else the field on screen.
        """
        from ..errors import CellClipError

        if isinstance(row, bool):
            row = None
        if self.state.store is None:
            _notify.error("Nothing is embedded yet: press 'Embed plate' first")
            return None
        if row is None:
            row = self._selected_store_row()
        if row is None:
            _notify.error("Select a result (or show a field) first")
            return None
        try:
            from ..search import image_query

            res = image_query(self.state.store, int(row), top_k=self.topk_spin.value(), level="field")
        except CellClipError as exc:
            _notify.error(str(exc))
            return None
        res = self._with_store_rows(res, "field")
        f = self.state.store.fields.iloc[int(row)]
        self.state.query = f"{f.get('Metadata_Well', '')} site {_fmt(f.get('Metadata_Site', ''))}"
        self.state.result_kind = "image"
        self.state.results = res
        return res

    def candidate_prompts(self) -> list[str] | None:
        """Prompts for zero-shot: typed lines, plus the plate's prompts when ticked (None = plate's)."""
        typed = [ln.strip() for ln in self.prompts_edit.toPlainText().splitlines() if ln.strip()]
        if self.plate_prompts_check.isChecked():
            st = self.state.store
            plate = []
            if st is not None and "Metadata_prompt" in st.fields.columns:
                plate = [str(p) for p in st.fields["Metadata_prompt"].dropna() if str(p).strip()]
            return typed + plate if typed else None
        return typed

    def run_zero_shot(self, prompts: Sequence[str] | None = None) -> Job | None:
        """Score every well against candidate prompts in a worker; the table shows the best per well."""
        if isinstance(prompts, bool):
            prompts = None
        if not self._ready():
            return None
        if self._job is not None and self._job.is_running:
            _notify.warning("CellCLIP is busy: wait for the running job or cancel it")
            return None
        if prompts is None:
            prompts = self.candidate_prompts()
            if prompts is not None and not prompts:
                _notify.error("No candidate prompts: type prompts (one per line) or tick "
                              "'all prompts in the plate metadata'")
                return None
        else:
            prompts = list(prompts)
        model, store = self.state.model, self.state.store

        def work(progress, should_stop):
            from ..search import zero_shot

            return zero_shot(model, store, prompts, level="well")

        def returned(table):
            n = len(set(prompts)) if prompts is not None else table["best_prompt"].nunique()
            self.state.query = f"{n} prompts" if prompts is not None else "plate prompts"
            self.state.result_kind = "zero_shot"
            self.state.results = self._with_store_rows(table, "well")

        self._busy(True)
        self._job = start_job(work, name="CellCLIP: zero-shot scoring", on_returned=returned,
                              on_finished=self._job_finished)
        return self._job

    # -------------------------------------------------------- table selection
    def _table_store_rows(self) -> list[int]:
        res = self.state.results
        if res is None or "store_row" not in res.columns:
            return []
        rows = sorted({ix.row() for ix in self.table.selectionModel().selectedRows()})
        out = [int(res["store_row"].iloc[i]) for i in rows if i < len(res)]
        return [r for r in out if r >= 0]

    def _on_table_selection(self) -> None:
        if self._updating_table:
            return
        rows = self._table_store_rows()
        if rows:
            self.state.selection = tuple(rows)

    def _on_cell_clicked(self, row: int, _col: int) -> None:
        self.select_result(row)

    def select_result(self, i: int) -> bool:
        """Select result row ``i`` and show that field's channels in the viewer."""
        res = self.state.results
        if res is None or not 0 <= i < len(res) or "store_row" not in res.columns:
            return False
        self.table.selectRow(i)
        pos = int(res["store_row"].iloc[i])
        if pos < 0 or self.state.store is None:
            return False
        self.state.selection = (pos,)
        try:
            return _display.show_store_row(self.viewer, self.state.store.fields, pos)
        except Exception as exc:  # noqa: BLE001 - a missing image must not raise into Qt
            _notify.error(f"cannot show that field: {exc}")
            return False

    # ------------------------------------------------------------------ export
    def results_for_export(self) -> "pd.DataFrame | None":
        res = self.state.results
        if res is None:
            return None
        return res.drop(columns=[c for c in ("store_row",) if c in res.columns])

    def export_csv(self, path) -> Path | None:
        """Write the results table to CSV at ``path``."""
        from ..errors import CellClipError
        from ..search import export_csv

        res = self.results_for_export()
        if res is None:
            _notify.error("No results to export: run a query first")
            return None
        try:
            out = export_csv(res, path)
        except (CellClipError, OSError) as exc:
            _notify.error(f"could not write {path}: {exc}")
            return None
        _notify.info(f"Wrote {len(res)} rows to {out}")
        return out

    def _export_dialog(self) -> None:
        if self.state.results is None:
            _notify.error("No results to export: run a query first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export results", "cellclip_results.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)
