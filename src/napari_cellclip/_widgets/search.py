"""Search widget: embed the open plate with a CellCLIP checkpoint and query it by text or by example.

The widget holds no model math and no model: every action is one core call run by
the background process of :mod:`._workers` (``embed``, ``text_query``,
``more_like_this``, ``zero_shot``, ``gallery``); what comes back is written into the
viewer's shared :class:`~._widgets.state.CellClipState`.  Ranked results are shown in
the table and, side by side on the canvas, as a hit gallery (:mod:`._gallery`).  It
reacts to ``state.selection`` (set here or by the Perturbation map) by selecting those
rows of its table.

Layout (fits a 1366×768 screen, docked with the Perturbation map): the plate, Embed /
Cancel and the progress line stay on top; the rest is in tabs: *Search* (query, results,
gallery), *Zero-shot*, *Display* (composite or one stain; the channel map: re-read the plate
when its stains are numbered or misnamed) and *Model* (checkpoint, device, "About this model":
the checkpoint's model card).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from . import _display, _notify
from ._dock import tabify_when_docked
from ._workers import Job, engine, format_duration, submit
from .state import CellClipState, get_state

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd

__all__ = ["SearchWidget", "ProgressPanel", "DEVICES", "RESULT_COLUMNS", "ZERO_SHOT_COLUMNS",
           "SCORE_HELP", "resolve_checkpoint"]

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
#: what the score column means, per kind of result (the header's tooltip)
SCORE_HELP = {
    "text": "Cosine similarity between the field's image embedding and the query's text embedding "
            "(−1…1). Compare scores within one query: the ranking is what matters.",
    "image": "Phenotype similarity: cosine between the two fields' embeddings after subtracting their "
             "plate's negative-control (DMSO) mean. 1 = the same change from control, 0 = unrelated, "
             "below 0 = the opposite change. A control field has no change to compare.",
    "zero_shot": "Cosine similarity of the well's image embedding with its best-matching prompt.",
    "selection": "Fields selected on the map (no score).",
}
#: table rows a results table keeps visible at its minimum height
MIN_TABLE_ROWS = 6


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
        return f"{v:.3f}"
    if hasattr(v, "item"):
        return _fmt(v.item())
    return str(v)


def resolve_checkpoint(path) -> Path:
    """The checkpoint folder ``path`` means (:func:`napari_cellclip.checkpoints.resolve_checkpoint`:
    a checkpoint, a run folder, its ``model/``); a folder it refuses is passed on unchanged, so
    that loading it names what is missing."""
    from ..checkpoints import resolve_checkpoint as resolve
    from ..errors import CheckpointError

    try:
        return resolve(path)
    except CheckpointError:
        return Path(path).expanduser()


def _channel_map_arg(text: str, source: str):
    """The channel map typed: ``None`` when empty, a file named relative to the plate (or the
    current folder) as a path, else the text (``"1=DNA,2=ER"``)."""
    if not text or "=" in text:
        return text or None
    path = Path(text).expanduser()
    plate = Path(source)
    beside = (plate if plate.is_dir() else plate.parent) / path
    if path.is_file():
        return path
    return beside if not path.is_absolute() and beside.is_file() else text


def _reread(source: str, channel_map) -> list:
    """The reader's layer data for the plate at ``source`` read with ``channel_map`` (in a thread)."""
    from .._reader import fields_layer_data, read_fields

    return fields_layer_data(read_fields(source, channel_map=channel_map, strict=True), source)


def _same_channels(a, b) -> bool:
    """Whether two fields tables give every stain the same files (embeddings of one fit the other)."""
    from ..plates import stains

    if a is None or b is None or stains(a) != stains(b) or len(a) != len(b):
        return False
    cols = [c for c in a.columns if str(c).startswith(("FileName_Orig", "PathName_Orig", "Frame_Orig"))]
    return all(c in b.columns and a[c].astype(str).tolist() == b[c].astype(str).tolist() for c in cols)


class ProgressPanel(QWidget):
    """A progress bar and a line of text following a :class:`~._workers.Job`: counts, rate and
    time left while it runs; 100 % exactly when it has returned."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.bar.setMaximumHeight(18)
        self.label = QLabel("")
        self.label.setWordWrap(True)
        lay.addWidget(self.bar)
        lay.addWidget(self.label)
        self.job: Job | None = None
        self._idle_text = ""

    def follow(self, job: Job, text: str) -> None:
        """Show ``job`` (busy until its first report) with ``text`` until then."""
        self.job = job
        self.bar.setRange(0, 0)
        self.label.setText(text)

    def update_progress(self, job: Job) -> None:
        if job is not self.job or job.done:
            return
        m = job.meter
        if m.total > 0:
            self.bar.setRange(0, m.total)
            self.bar.setValue(min(m.done, m.total))
            self.label.setText(m.text())

    def finish(self, job: Job, text: str) -> None:
        """The job ended: full when it returned, empty when cancelled or failed."""
        if job is not self.job:
            return
        ok = job.result is not None and not job.cancelled and job.error is None
        total = max(job.meter.total, 1)
        self.bar.setRange(0, total)
        self.bar.setValue(total if ok else 0)
        self.label.setText(text)

    def set_text(self, text: str) -> None:
        self.label.setText(text)


class SearchWidget(QWidget):
    """Text-to-phenotype search over the plate open in ``napari_viewer``."""

    _cellclip_dock = True

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state: CellClipState = get_state(napari_viewer)
        self._job: Job | None = None  # embedding / zero-shot (one at a time)
        self._query_job: Job | None = None
        self._gallery_job: Job | None = None
        self._reread_worker = None  # the last plate re-read (a thread: reading a plate is I/O)
        self._updating_table = False
        self._engine = engine("model")  # starts the background process; it warms up now
        self._build()
        self._connect()
        _display.install_canvas_info(napari_viewer)
        self._on_fields()
        self._on_store()
        self._on_results()
        self._on_state_model_path()
        self._on_engine_status(self._engine.status, self._engine.ready)
        tabify_when_docked(self)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.setSpacing(4)
        self.plate_label = QLabel("No plate open: File ▸ Open a plate folder, or File ▸ Open Sample ▸ CellCLIP")
        self.plate_label.setWordWrap(True)
        lay.addWidget(self.plate_label)
        brow = QHBoxLayout()
        self.embed_btn = QPushButton("Embed plate")
        self.embed_btn.setToolTip("Embed every field of the open plate with the checkpoint of the Model tab "
                                  "(cached embeddings are reused)")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        brow.addWidget(self.embed_btn)
        brow.addWidget(self.cancel_btn)
        lay.addLayout(brow)
        self.progress = ProgressPanel()
        self.progress_bar = self.progress.bar
        self.status_label = self.progress.label
        self.status_label.setText("Not embedded yet")
        lay.addWidget(self.progress)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self._build_search_tab(), "Search")
        self.tabs.addTab(self._build_zero_shot_tab(), "Zero-shot")
        self.tabs.addTab(self._build_display_tab(), "Display")
        self.tabs.addTab(self._build_model_tab(), "Model")
        lay.addWidget(self.tabs, stretch=1)

    def _build_search_tab(self) -> QWidget:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        lay.setContentsMargins(2, 4, 2, 2)
        lay.setSpacing(4)
        self.query_edit = QLineEdit()
        self.query_edit.setPlaceholderText("e.g. A549 cells treated with compound: lonafarnib  (Enter runs)")
        lay.addWidget(self.query_edit)
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
        lay.addLayout(qrow)
        mrow = QHBoxLayout()
        self.more_btn = QPushButton("More like this field")
        self.more_btn.setToolTip("Rank the plate by phenotype similarity to the selected result (or the field on "
                                 "screen): " + SCORE_HELP["image"])
        self.gallery_check = QCheckBox("gallery")
        self.gallery_check.setChecked(True)
        self.gallery_check.setToolTip("Show the top hits side by side on the canvas, next to the plate "
                                      "(click a tile to open that field)")
        mrow.addWidget(self.more_btn, stretch=1)
        mrow.addWidget(self.gallery_check)
        lay.addLayout(mrow)
        self.results_label = QLabel("Results")
        self.results_label.setWordWrap(True)
        lay.addWidget(self.results_label)
        self.table = QTableWidget(0, len(RESULT_COLUMNS))
        self.table.setHorizontalHeaderLabels([h for h, _ in RESULT_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        self.table.setWordWrap(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        rows_h = MIN_TABLE_ROWS * self.table.verticalHeader().defaultSectionSize()
        self.table.setMinimumHeight(rows_h + self.table.horizontalHeader().sizeHint().height() + 4)
        lay.addWidget(self.table, stretch=1)
        self.export_btn = QPushButton("Export table to CSV…")
        lay.addWidget(self.export_btn)
        return tab

    def _build_zero_shot_tab(self) -> QWidget:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        lay.setContentsMargins(2, 4, 2, 2)
        lay.addWidget(QLabel("Score every well against candidate prompts; the results table shows the best "
                             "prompt per well."))
        lay.itemAt(0).widget().setWordWrap(True)
        self.prompts_edit = QPlainTextEdit()
        self.prompts_edit.setPlaceholderText("Candidate prompts, one per line")
        lay.addWidget(self.prompts_edit, stretch=1)
        zrow = QHBoxLayout()
        self.plate_prompts_check = QCheckBox("all prompts in the plate metadata")
        self.plate_prompts_check.setChecked(True)
        self.zero_shot_btn = QPushButton("Score wells")
        zrow.addWidget(self.plate_prompts_check)
        zrow.addWidget(self.zero_shot_btn)
        lay.addLayout(zrow)
        return tab

    def _build_display_tab(self) -> QWidget:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        lay.setContentsMargins(2, 4, 2, 2)
        self.composite_radio = QRadioButton("Composite: all stains in their Cell Painting colours")
        self.one_stain_radio = QRadioButton("One stain at a time, in grey:")
        self.composite_radio.setChecked(True)
        group = QButtonGroup(tab)
        group.addButton(self.composite_radio)
        group.addButton(self.one_stain_radio)
        lay.addWidget(self.composite_radio)
        row = QHBoxLayout()
        row.addWidget(self.one_stain_radio)
        self.stain_combo = QComboBox()
        row.addWidget(self.stain_combo, stretch=1)
        lay.addLayout(row)
        self.legend_label = QLabel("")
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.legend_label.setWordWrap(True)
        lay.addWidget(self.legend_label)
        self.caption_check = QCheckBox("Caption the canvas with the field on screen")
        self.caption_check.setChecked(True)
        lay.addWidget(self.caption_check)
        hint = QLabel("Stains numbered (ch1, ch2…) or wrong? Give the channel map and re-read the plate:")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        row = QHBoxLayout()
        self.channel_map_edit = QLineEdit()
        self.channel_map_edit.setPlaceholderText("1=DNA,2=ER,3=RNA,4=AGP,5=Mito  or  channels.json")
        self.channel_map_edit.setToolTip("Stain of each channel number of your acquisition (Phenix ch<n>, "
                                         "ImageXpress w<n>, OME channel n), or a channels.json / .txt file. "
                                         "Empty: the channels.json beside the plate, if any.")
        self.channel_map_btn = QPushButton("…")
        self.channel_map_btn.setMaximumWidth(30)
        self.channel_map_btn.setToolTip("Choose a channels.json / channels.txt")
        self.reread_btn = QPushButton("Re-read plate")
        row.addWidget(self.channel_map_edit, stretch=1)
        row.addWidget(self.channel_map_btn)
        row.addWidget(self.reread_btn)
        lay.addLayout(row)
        lay.addStretch(1)
        return tab

    def _build_model_tab(self) -> QWidget:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        lay.setContentsMargins(2, 4, 2, 2)
        form = QFormLayout()
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
        lay.addLayout(form)
        lay.addWidget(QLabel("About this model"))
        self.card_view = QTextBrowser()
        self.card_view.setOpenExternalLinks(True)
        self.card_view.setMinimumHeight(80)
        lay.addWidget(self.card_view, stretch=1)
        return tab

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
        self.composite_radio.toggled.connect(self._apply_display)
        self.stain_combo.currentTextChanged.connect(self._apply_display)
        self.caption_check.toggled.connect(self._on_caption_toggled)
        self.channel_map_btn.clicked.connect(self._browse_channel_map)
        self.channel_map_edit.returnPressed.connect(self.reread_plate)
        self.reread_btn.clicked.connect(self.reread_plate)
        self.gallery_check.toggled.connect(self._on_gallery_toggled)
        self._engine.status_changed.connect(self._on_engine_status)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(lambda _e: self._update_display_controls())  # a plate's stains come one by one
        ev = self.state.events
        ev.fields.connect(self._on_fields)
        ev.store.connect(self._on_store)
        ev.results.connect(self._on_results)
        ev.selection.connect(self._on_selection)
        ev.model_path.connect(self._on_state_model_path)

    # ---------------------------------------------------------------- state in
    def _busy_now(self) -> bool:
        return self._job is not None and self._job.is_running

    def _on_engine_status(self, text: str, ready: bool) -> None:
        if self._job is not None or self.state.store is not None:
            return  # the line reports the last job now
        if ready:
            self.status_label.setText("Not embedded yet: press Embed plate")
        else:
            self.status_label.setText(f"Not embedded yet. Preparing CellCLIP in the background: {text}")

    def _on_fields(self, *_) -> None:
        f = self.state.fields
        if f is None:
            return
        plates = sorted({str(p) for p in f["Metadata_Plate"]}) if "Metadata_Plate" in f.columns else ["?"]
        wells = f["Metadata_Well"].nunique() if "Metadata_Well" in f.columns else "?"
        from ..plates import stains

        numbered = [s for s in stains(f) if s[:2] == "ch" and s[2:].isdigit()]
        hint = f" — stains unnamed ({', '.join(numbered)}): name them in the Display tab" if numbered else ""
        self.plate_label.setText(f"Plate {', '.join(plates)}: {len(f)} fields in {wells} wells{hint}")
        st = self.state.store
        if st is not None and _display.field_keys(st.fields) != _display.field_keys(f):
            self.status_label.setText("A new plate is open: embed it to search it")
        self._update_display_controls()

    def _on_store(self, *_) -> None:
        st = self.state.store
        ready = st is not None
        for w in (self.search_btn, self.more_btn, self.zero_shot_btn):
            w.setEnabled(ready)
        if ready and not self._busy_now():
            skipped = len(st.info.get("skipped", []) or [])
            msg = f"Embedded {len(st)} fields"
            if skipped:
                msg += f" ({skipped} skipped: unreadable)"
            self.status_label.setText(msg + " — type a query and press Enter")

    def _on_state_model_path(self, *_) -> None:
        if self.checkpoint_edit.text() != self.state.model_path:
            self.checkpoint_edit.setText(self.state.model_path)
        self._show_model_card()

    def _show_model_card(self) -> None:
        from ..modelcard import describe_checkpoint

        path = self.state.model_path.strip()
        self.card_view.setMarkdown(describe_checkpoint(resolve_checkpoint(path)) if path else
                                   "No checkpoint chosen.")

    def _on_results(self, *_) -> None:
        res = self.state.results
        kind = self.state.result_kind
        cols = ZERO_SHOT_COLUMNS if kind == "zero_shot" else RESULT_COLUMNS
        self._updating_table = True
        try:
            self.table.clearSelection()
            self.table.setColumnCount(len(cols))
            self.table.setHorizontalHeaderLabels([h for h, _ in cols])
            score_col = [h for h, _ in cols].index("score")
            self.table.horizontalHeaderItem(score_col).setToolTip(SCORE_HELP.get(kind, ""))
            n = 0 if res is None else len(res)
            self.table.setRowCount(n)
            if res is not None:
                present = [(j, c) for j, (_, c) in enumerate(cols) if c in res.columns]
                for i, rec in enumerate(res.to_dict("records")):
                    for j, c in present:
                        item = QTableWidgetItem(_fmt(rec.get(c)))
                        if c in ("rank", "score", "best_score", "Metadata_Site"):
                            item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                        if c in ("score", "best_score"):
                            item.setToolTip(SCORE_HELP.get(kind, ""))
                        self.table.setItem(i, j, item)
            self.table.resizeColumnsToContents()
        finally:
            self._updating_table = False
        title = {"text": "Text query", "image": "More like this (phenotype similarity)",
                 "zero_shot": "Zero-shot (best prompt per well)",
                 "selection": "Selected on the map"}.get(kind, "Results")
        if res is not None:
            q = f": {self.state.query}" if self.state.query and kind != "selection" else ""
            self.results_label.setText(f"{title}{q} — {len(res)} rows")
            self.results_label.setToolTip(SCORE_HELP.get(kind, ""))
        else:
            self.results_label.setText("Results")
        self._on_selection()
        self._update_gallery()

    def _on_selection(self, *_) -> None:
        """Select the table rows of ``state.selection`` (e.g. points picked on the map)."""
        res = self.state.results
        sel = set(int(s) for s in self.state.selection)
        if res is None or "store_row" not in res.columns or not sel:
            if sel and res is None and self.state.store is not None:
                self._show_selection_table(sorted(sel))
            return
        rows = [i for i, r in enumerate(res["store_row"].tolist()) if r is not None and int(r) in sel]
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

    # ---------------------------------------------------------------- display
    def _update_display_controls(self) -> None:
        from .._reader import stain_style

        stains = list(dict.fromkeys(s for s, _ in _display.stain_layers(self.viewer)))
        cur = self.stain_combo.currentText()
        self.stain_combo.blockSignals(True)
        self.stain_combo.clear()
        self.stain_combo.addItems(stains)
        if cur in stains:
            self.stain_combo.setCurrentText(cur)
        self.stain_combo.blockSignals(False)
        self.legend_label.setText(" ".join(
            f"<span style='color:{stain_style(s, i).color}'>■</span>&nbsp;{s}" for i, s in enumerate(stains)))

    def _apply_display(self, *_) -> None:
        stain = None if self.composite_radio.isChecked() else (self.stain_combo.currentText() or None)
        _display.show_stains(self.viewer, stain)

    def show_one_stain(self, stain: str | None) -> None:
        """Composite (``None``) or only ``stain``, as the Display tab's controls do."""
        self._update_display_controls()
        if stain is None:
            self.composite_radio.setChecked(True)
        else:
            self.stain_combo.setCurrentText(stain)
            self.one_stain_radio.setChecked(True)
        self._apply_display()

    def _browse_channel_map(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Channel map", str(Path(self.state.source or ".").parent),
                                              "Channel map (*.json *.txt);;All files (*)")
        if path:
            self.channel_map_edit.setText(path)

    def reread_plate(self, channel_map: str | None = None):
        """Re-read the open plate with ``channel_map`` (the Display tab's box by default: ``"1=DNA,..."``
        or a file; empty: the ``channels.json`` beside the plate) and replace its layers.

        Reading runs in a thread (a big plate takes seconds: the display contrast decodes a few
        fields); returns that worker, or None if refused.  The embeddings and results of the old
        stain names are dropped (embed again).  A map that does not fit the plate is refused with
        a message, and the old layers stay.
        """
        from superqt.utils import create_worker

        from ..errors import CellClipWarning
        from .state import FIELDS_KEY, SOURCE_KEY

        if channel_map is None or isinstance(channel_map, bool):
            channel_map = self.channel_map_edit.text()
        channel_map = channel_map.strip()
        if self._busy_now() or not self.reread_btn.isEnabled():
            _notify.warning("CellCLIP is busy: wait for the running job or cancel it, then re-read the plate")
            return None
        old = self.state.fields
        layers = [ly for ly in _display.plate_layers(self.viewer) if ly.metadata[FIELDS_KEY] is old]
        source = layers[0].metadata.get(SOURCE_KEY, "") if layers else ""
        if not source or not Path(source).exists():
            _notify.error("No plate read from a file is open: open a plate folder (File ▸ Open) to re-read it")
            return None
        worker = create_worker(_reread, source, _channel_map_arg(channel_map, source), _start_thread=False,
                               _connect={"errored": lambda exc: _notify.error(
                                   f"could not re-read {source} with the channel map {channel_map or '(none)'}: "
                                   f"{exc}")})
        worker.returned.connect(lambda layer_data: self._replace_plate(layers, old, source, layer_data))
        worker.warned.connect(lambda w: _notify.warning(str(w[0])) if issubclass(w[1], CellClipWarning) else None)
        status = self.status_label.text()
        worker.finished.connect(lambda: self._reread_done(status))
        for w in (self.reread_btn, self.embed_btn):
            w.setEnabled(False)
        self.status_label.setText(f"Re-reading {Path(source).name}…")
        worker.start()
        self._reread_worker = worker
        return worker

    def _replace_plate(self, layers: list, old, source: str, layer_data: list) -> None:
        from ..plates import stains
        from .state import FIELDS_KEY

        new = _display.replace_plate(self.viewer, layers, layer_data)
        self.state.fields = new[0].metadata[FIELDS_KEY]
        self._apply_display()
        st = self.state.store
        if st is not None and not _same_channels(old, self.state.fields) \
                and set(_display.field_keys(st.fields)) & set(_display.field_keys(old)):
            self._drop_embeddings()
        _notify.info(f"Re-read {Path(source).name}: stains {', '.join(stains(self.state.fields))}")

    def _reread_done(self, status: str) -> None:
        self.reread_btn.setEnabled(True)
        self.embed_btn.setEnabled(not self._busy_now())
        if self.status_label.text().startswith("Re-reading"):
            self.status_label.setText(status)

    def _drop_embeddings(self) -> None:
        """Forget the store, results and hit gallery of a plate whose stains were renamed."""
        from ._gallery import clear_gallery

        clear_gallery(self.viewer)
        old = self.state.store
        self.state.selection = ()
        self.state.results = None
        self.state.store = None
        self._engine.forget(old)
        self.status_label.setText("Stains renamed: embed the plate again to search it")

    def _on_caption_toggled(self, on: bool) -> None:
        if on:
            _display.update_canvas_info(self.viewer)
        else:
            _display.text_overlay(self.viewer).visible = False

    # -------------------------------------------------------------- embedding
    def _busy(self, busy: bool) -> None:
        self.embed_btn.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy)
        self.zero_shot_btn.setEnabled(not busy and self.state.store is not None)

    def cancel(self) -> None:
        """Cancel the running job (embedding or zero-shot)."""
        if self._job is not None and not self._job.done:
            self._job.cancel()
            self.status_label.setText("Cancelling…")

    def _model_args(self) -> dict:
        """Checkpoint and device of the model the embeddings came from (queries use the same)."""
        handle = self.state.model or {}
        return {"path": handle.get("path") or str(resolve_checkpoint(self.state.model_path)),
                "device": self.state.device if not handle else handle["device"]}

    def _waiting_text(self, what: str) -> str:
        if self._engine.ready:
            return what
        return f"{what} (the background process is still starting: {self._engine.status})"

    def embed_plate(self) -> Job | None:
        """Embed all fields of the open plate in the background; returns the job (or None if refused)."""
        if self._busy_now():
            _notify.warning("CellCLIP is busy: wait for the running job or cancel it")
            return None
        fields = self.state.fields
        if fields is None:
            _notify.error("No plate is open: open a plate folder or LoadData CSV (File ▸ Open), "
                          "or File ▸ Open Sample ▸ CellCLIP")
            return None
        self.state.model_path = self.checkpoint_edit.text().strip()
        path = self.state.model_path
        if not path:
            _notify.error("No checkpoint chosen: pick a CellCLIP checkpoint folder in the Model tab")
            return None
        key = (str(resolve_checkpoint(path)), self.state.device)

        def returned(result):
            info, store = result
            old = self.state.store
            self.state.model = info
            self.state.model_key = key
            self.state.store = store
            if old is not None and old is not store:
                self._engine.forget(old)
            self.show_prompt_form(info)

        self._busy(True)
        self._job = submit("model", "embed", {"path": key[0], "device": key[1], "fields": fields,
                                              "token": uuid.uuid4().hex},
                           name="CellCLIP: embedding plate", unit="fields", on_returned=returned,
                           on_finished=self._job_finished, on_progress=self.progress.update_progress)
        self.progress.follow(self._job, self._waiting_text(f"Loading the model to embed {len(fields)} fields…"))
        return self._job

    def show_prompt_form(self, info: dict) -> None:
        """Show, as placeholder text, how the checkpoint's training prompts were written, so that
        typed queries and candidates match what the model learned (they are used as typed)."""
        example = info.get("prompt_example")
        if not example:
            return
        self.query_edit.setPlaceholderText(f"e.g. {example}  (Enter runs)")
        self.query_edit.setToolTip(f"This checkpoint learned prompts like “{example}”")
        self.prompts_edit.setPlaceholderText(f"Candidate prompts, one per line, e.g. {example}")

    def _job_finished(self) -> None:
        job = self._job
        self._busy(False)
        if job is None:
            return
        if job.cancelled:
            self.progress.finish(job, "Cancelled")
        elif job.error is not None:
            self.progress.finish(job, f"Failed: {job.error}")
        elif job.task == "embed" and self.state.store is not None:
            st = self.state.store
            skipped = len(st.info.get("skipped", []) or [])
            text = f"Embedded {len(st)} fields in {format_duration(job.meter.elapsed())}"
            if skipped:
                text += f" ({skipped} skipped: unreadable)"
            self.progress.finish(job, text + " — type a query and press Enter")
        else:
            self.progress.finish(job, "Done")
        self._on_store_buttons()

    def _on_store_buttons(self) -> None:
        ready = self.state.store is not None
        for w in (self.search_btn, self.more_btn, self.zero_shot_btn):
            w.setEnabled(ready)

    @property
    def job(self) -> Job | None:
        """The last embedding / zero-shot job started by this widget."""
        return self._job

    @property
    def query_job(self) -> Job | None:
        """The last query job (text or more-like-this)."""
        return self._query_job

    @property
    def gallery_job(self) -> Job | None:
        """The last job reading the hit gallery's thumbnails."""
        return self._gallery_job

    # ---------------------------------------------------------------- queries
    def _ready(self) -> bool:
        if self.state.store is None or self.state.model is None:
            _notify.error("Nothing is embedded yet: press 'Embed plate' first")
            return False
        if self._busy_now() and self._job.task == "embed":
            _notify.warning("The plate is being embedded: query it when that is done")
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

    def _submit_query(self, task: str, payload: dict, *, kind: str, query: str, level: str) -> Job:
        store = self.state.store

        def returned(res):
            if self.state.store is not store:
                return  # re-embedded meanwhile: this answer is about the old plate
            self.state.query = query
            self.state.result_kind = kind
            self.state.results = self._with_store_rows(res, level)

        self._query_job = submit("model", task, dict(payload, store=self._engine.store_spec(store)),
                                 name=f"CellCLIP: {'text query' if kind == 'text' else 'more like this'}",
                                 unit="queries", on_returned=returned)
        return self._query_job

    def run_query(self, text: str | None = None) -> Job | None:
        """Rank the plate by a text query (the query box's text by default), in the background."""
        if text is None or isinstance(text, bool):
            text = self.query_edit.text()
        else:
            self.query_edit.setText(text)
        if not self._ready():
            return None
        level = self._level()
        return self._submit_query("text_query", dict(self._model_args(), text=text, top_k=self.topk_spin.value(),
                                                     level=level), kind="text", query=text, level=level)

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

    def more_like_this(self, row: int | None = None) -> Job | None:
        """Rank the plate by phenotype similarity to field ``row`` (store position), in the background.

        Default: the selected result, else the field on screen.
        """
        if isinstance(row, bool):
            row = None
        if not self._ready():
            return None
        if row is None:
            row = self._selected_store_row()
        if row is None:
            _notify.error("Select a result (or show a field) first")
            return None
        f = self.state.store.fields.iloc[int(row)]
        query = f"{f.get('Metadata_Well', '')} site {_fmt(f.get('Metadata_Site', ''))}"
        return self._submit_query("more_like_this", dict(row=int(row), top_k=self.topk_spin.value(), level="field"),
                                  kind="image", query=query, level="field")

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
        """Score every well against candidate prompts in the background; the table shows the best per well."""
        if isinstance(prompts, bool):
            prompts = None
        if not self._ready():
            return None
        if self._busy_now():
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
        store = self.state.store

        def returned(table):
            n = len(set(prompts)) if prompts is not None else table["best_prompt"].nunique()
            self.state.query = f"{n} prompts" if prompts is not None else "plate prompts"
            self.state.result_kind = "zero_shot"
            self.state.results = self._with_store_rows(table, "well")

        self._busy(True)
        payload = dict(self._model_args(), store=self._engine.store_spec(store), prompts=prompts, level="well")
        self._job = submit("model", "zero_shot", payload, name="CellCLIP: zero-shot scoring", unit="wells",
                           on_returned=returned, on_finished=self._job_finished,
                           on_progress=self.progress.update_progress)
        self.progress.follow(self._job, self._waiting_text("Scoring every well against the prompts…"))
        return self._job

    # --------------------------------------------------------------- gallery
    def _on_gallery_toggled(self, on: bool) -> None:
        from ._gallery import clear_gallery

        if on:
            self._update_gallery()
        else:
            clear_gallery(self.viewer)

    def _update_gallery(self) -> None:
        """Read the thumbnails of the current hits in the background, then show them side by side."""
        from ._gallery import MAX_TILES, TILE_PX, clear_gallery, display_luts, show_gallery

        res, st = self.state.results, self.state.store
        if not self.gallery_check.isChecked() or res is None or st is None or "store_row" not in res.columns \
                or self.state.result_kind not in ("text", "image", "selection"):
            return
        if self._gallery_job is not None and not self._gallery_job.done:
            self._gallery_job.cancel()
        table = res[res["store_row"] >= 0].head(MAX_TILES).reset_index(drop=True)
        if table.empty:
            clear_gallery(self.viewer)
            return
        from ..plates import stains as plate_stains

        fields = st.fields.iloc[table["store_row"].astype(int).tolist()].reset_index(drop=True)
        stains = plate_stains(fields)
        kind = self.state.result_kind

        def returned(gallery):
            if self.state.results is res:
                show_gallery(self.viewer, gallery, table, stains,
                             score_name="similarity" if kind == "image" else "score", on_open=self.open_field)

        payload = {"fields": fields, "stains": stains, "luts": display_luts(self.viewer, stains), "size": TILE_PX}
        self._gallery_job = submit("model", "gallery", payload, name="CellCLIP: hit gallery", unit="fields",
                                   on_returned=returned)

    def open_field(self, store_row: int) -> bool:
        """Show field ``store_row`` of the store on the canvas (zoomed onto it) and select it."""
        st = self.state.store
        if st is None or not 0 <= int(store_row) < len(st):
            return False
        self.state.selection = (int(store_row),)
        try:
            shown = _display.show_store_row(self.viewer, st.fields, int(store_row))
        except Exception as exc:  # noqa: BLE001 - a missing image must not raise into Qt
            _notify.error(f"cannot show that field: {exc}")
            return False
        if shown:
            _display.focus_plate(self.viewer)
        return shown

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
