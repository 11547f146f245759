"""Search widget: embedding in the background process, text / image / zero-shot queries, hit gallery,
CSV, errors, progress, and the event loop staying free while the cores are busy."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

LONAFARNIB = "A549 cells treated with compound: lonafarnib"


@pytest.fixture()
def make_search(make_napari_viewer, trained_checkpoint, cellclip_env, sample_plate_path):
    from napari_cellclip._widgets.search import SearchWidget

    def factory(plate=sample_plate_path, checkpoint=trained_checkpoint, open_plate=True):
        viewer = make_napari_viewer()
        if open_plate:
            viewer.open(str(plate), plugin="napari-cellclip")
        widget = SearchWidget(viewer)
        viewer.window.add_dock_widget(widget, name="CellCLIP search")
        widget.set_checkpoint(checkpoint)
        return viewer, widget

    return factory


@pytest.fixture()
def embedded(make_search, qtbot, notes, wait_job):
    viewer, widget = make_search()
    widget.gallery_check.setChecked(False)  # the gallery has its own test
    job = widget.embed_plate()
    wait_job(job)
    assert not notes["error"], notes["error"]
    assert widget.state.store is not None
    return viewer, widget


def test_embed_then_text_query_ranks_that_compound_first(embedded, notes, wait_job):
    viewer, w = embedded
    st = w.state.store
    assert len(st) == 12 and st.embeddings.shape[0] == 12
    assert "Embedded 12 fields" in w.status_label.text()
    assert w.state.model["path"] and w.state.model["model_id"] == st.model_id  # the model stays in the child
    w.query_edit.setText(LONAFARNIB)
    w.query_edit.returnPressed.emit()  # Enter runs the query
    wait_job(w.query_job)
    res = w.state.results
    assert res is not None and w.state.result_kind == "text"
    assert res["Metadata_pert_iname"].head(3).tolist() == ["lonafarnib"] * 3
    assert res["score"].is_monotonic_decreasing
    headers = [w.table.horizontalHeaderItem(j).text() for j in range(w.table.columnCount())]
    assert headers == ["rank", "score", "plate", "well", "site", "perturbation", "MoA"]
    assert "cosine" in w.table.horizontalHeaderItem(1).toolTip().lower()
    assert w.table.rowCount() == 12
    assert w.table.item(0, 3).text() == "P13"
    assert w.table.item(0, 6).text() == "farnesyltransferase inhibitor"
    # top-k
    w.topk_spin.setValue(3)
    wait_job(w.run_query(LONAFARNIB))
    assert len(w.state.results) == 3 and w.table.rowCount() == 3
    # wells
    w.level_combo.setCurrentText("wells")
    wait_job(w.run_query(LONAFARNIB))
    assert w.state.results["Metadata_Well"].iloc[0] == "P13"
    assert not notes["error"]


def test_clicking_a_result_shows_that_field_and_the_caption_names_it(embedded, qtbot, wait_job):
    from qtpy.QtCore import Qt

    from napari_cellclip._widgets import _display

    viewer, w = embedded
    wait_job(w.run_query("A549 cells treated with compound: orantinib"))
    res = w.state.results
    i = 1
    target = res.iloc[i]
    rect = w.table.visualItemRect(w.table.item(i, 0))
    qtbot.mouseClick(w.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    fields = viewer.layers["DNA"].metadata["cellclip_fields"]
    step = viewer.dims.current_step[0]
    shown = fields.iloc[step]
    assert (shown["Metadata_Well"], int(shown["Metadata_Site"])) == \
        (target["Metadata_Well"], int(target["Metadata_Site"]))
    assert w.state.selection == (int(target["store_row"]),)
    # the canvas says which field it shows, and follows the slider
    overlay = _display.text_overlay(viewer)
    caption = overlay.text
    assert overlay.visible
    assert caption.startswith(f"SQ00015198 · {target['Metadata_Well']} · site {int(target['Metadata_Site'])} · ")
    assert str(target["Metadata_pert_iname"]) in caption
    p13 = fields.index[fields["Metadata_Well"] == "P13"][0]
    viewer.dims.set_current_step(0, int(p13))
    assert "P13" in overlay.text and "lonafarnib (farnesyltransferase inhibitor)" in overlay.text
    a13 = fields.index[fields["Metadata_Well"] == "A13"][0]
    viewer.dims.set_current_step(0, int(a13))  # a long MoA is shortened
    assert overlay.text.endswith("orantinib (FGFR inhibitor, PDGFR tyrosine kinase…)"), overlay.text
    assert not _display.scale_bar(viewer).visible  # the sample has no pixel size
    w.caption_check.setChecked(False)
    assert not overlay.visible


def test_more_like_this_ranks_by_phenotype(embedded, notes, wait_job):
    """The query field first (1.0); the same compound's fields above the other compound's; scores
    spread over a readable range instead of all sitting at 0.98-0.99."""
    viewer, w = embedded
    fields = w.state.store.fields
    p13 = [int(i) for i in np.flatnonzero(fields["Metadata_Well"] == "P13")]
    wait_job(w.more_like_this(p13[0]))
    res = w.state.results
    assert w.state.result_kind == "image"
    assert int(res["store_row"].iloc[0]) == p13[0]
    assert res["score"].iloc[0] == pytest.approx(1.0, abs=1e-4)
    others = res.iloc[1:]
    same = others.loc[others["Metadata_Well"] == "P13", "score"]
    orantinib = others.loc[others["Metadata_pert_iname"] == "orantinib", "score"]
    assert same.min() > orantinib.max()
    assert others["score"].max() - others["score"].min() > 0.5
    assert "control" in w.table.horizontalHeaderItem(1).toolTip()
    # from the field on screen, with no result selected
    w.table.clearSelection()
    w.state.selection = ()
    viewer.dims.set_current_step(0, 7)
    wait_job(w.more_like_this())
    assert int(w.state.results["store_row"].iloc[0]) == 7
    assert not notes["error"]


def test_zero_shot_best_prompt_per_well(embedded, qtbot, notes, wait_job):
    viewer, w = embedded
    wait_job(w.run_zero_shot())  # all prompts in the plate metadata
    res = w.state.results
    assert w.state.result_kind == "zero_shot"
    assert sorted(res["Metadata_Well"]) == ["A01", "A13", "J18", "P13"]
    prompts = set(w.state.store.fields["Metadata_prompt"])
    assert set(res["best_prompt"]) <= prompts
    assert res.set_index("Metadata_Well").loc["P13", "best_prompt"] == LONAFARNIB
    assert w.table.rowCount() == 4
    assert w.table.horizontalHeaderItem(2).text() == "best prompt"
    # typed candidates only
    w.plate_prompts_check.setChecked(False)
    w.prompts_edit.setPlainText(f"{LONAFARNIB}\nA549 cells treated with compound: orantinib\n")
    wait_job(w.run_zero_shot())
    assert set(w.state.results["best_prompt"]) <= {LONAFARNIB, "A549 cells treated with compound: orantinib"}
    assert not notes["error"]


def test_export_csv_round_trips(embedded, tmp_path, notes, wait_job):
    from napari_cellclip.search import read_csv

    viewer, w = embedded
    wait_job(w.run_query(LONAFARNIB))
    out = w.export_csv(tmp_path / "hits.csv")
    back = read_csv(out)
    expected = w.results_for_export()
    assert list(back.columns) == list(expected.columns)
    assert "store_row" not in back.columns
    pd.testing.assert_frame_equal(back, expected.reset_index(drop=True), check_dtype=False)
    assert any("Wrote 12 rows" in m for m in notes["info"])


def test_cached_embeddings_are_reused(embedded, qtbot, wait_job):
    viewer, w = embedded
    first = w.state.store
    wait_job(w.embed_plate())
    again = w.state.store
    assert again is not first
    assert again.path is not None  # loaded from the embedding cache, not recomputed
    np.testing.assert_allclose(again.embeddings, first.embeddings)


def test_user_errors_are_notifications(make_search, qtbot, notes, tmp_path, wait_job):
    # no plate open
    viewer, w = make_search(open_plate=False)
    assert w.embed_plate() is None
    assert "No plate is open" in notes["error"][-1]
    # queries before embedding
    assert w.run_query(LONAFARNIB) is None
    assert "Embed plate" in notes["error"][-1]

    # no checkpoint there
    viewer.open(str(_plate()), plugin="napari-cellclip")
    w.set_checkpoint(tmp_path / "nowhere")
    assert "No CellCLIP checkpoint" in w.card_view.toPlainText()
    wait_job(w.embed_plate())
    assert "checkpoint" in notes["error"][-1] and "nowhere" in notes["error"][-1]
    assert w.state.store is None and w.embed_btn.isEnabled()
    assert w.status_label.text().startswith("Failed:") and w.progress_bar.value() == 0


def test_unavailable_device_is_a_notification(make_search, qtbot, notes, wait_job):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    viewer, w = make_search()
    w.device_combo.setCurrentText("cuda")
    assert w.state.device == "cuda"
    wait_job(w.embed_plate())
    assert "cuda" in notes["error"][-1].lower()
    assert w.state.store is None


def _plate():
    from napari_cellclip.sample import sample_plate_dir

    return sample_plate_dir()


def test_checkpoint_with_other_channels_than_the_plate(make_search, qtbot, notes, wait_job):
    viewer, w = make_search()
    fields = w.state.fields
    four = fields.drop(columns=[c for c in fields.columns if c.endswith("OrigMito")])
    w.state.fields = four
    wait_job(w.embed_plate())
    assert "Mito" in notes["error"][-1]
    assert w.state.store is None


def test_empty_and_too_long_queries(embedded, notes, wait_job):
    viewer, w = embedded
    wait_job(w.run_query(LONAFARNIB))
    before = w.state.results
    wait_job(w.run_query("   "))
    assert "empty" in notes["error"][-1]
    wait_job(w.run_query(" ".join(["mitochondria"] * 300)))
    assert "long" in notes["error"][-1].lower() or "token" in notes["error"][-1].lower()
    assert w.state.results is before  # the table is kept


def test_corrupt_field_is_skipped_with_a_warning(make_search, qtbot, notes, tmp_path, sample_plate_path, wait_job):
    plate = tmp_path / "SQ00015198"
    shutil.copytree(sample_plate_path, plate)
    bad = plate / "r10c18f02p01-ch4sk1fk1fl1.png"  # J18 site 2, AGP
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    viewer, w = make_search(plate=plate)
    wait_job(w.embed_plate())
    assert not notes["error"], notes["error"]
    assert any("r10c18f02p01-ch4" in m for m in notes["warning"]), notes["warning"]
    assert len(w.state.store) == 11
    assert "1 skipped" in w.status_label.text()


def test_cancel_embedding(make_search, qtbot, notes, tmp_path, monkeypatch, wait_job):
    monkeypatch.setenv("NAPARI_CELLCLIP_CACHE", str(tmp_path / "fresh-cache"))
    viewer, w = make_search()
    job = w.embed_plate()
    w.cancel_btn.click()
    wait_job(job)
    assert job.cancelled
    assert w.state.store is None
    assert w.status_label.text() == "Cancelled"
    assert w.progress_bar.value() == 0
    assert not notes["error"], notes["error"]
    # the next embedding works (a fresh background process if the old one had to be stopped)
    wait_job(w.embed_plate())
    assert w.state.store is not None and len(w.state.store) == 12


def test_progress_panel_counts_rate_and_time_left(qtbot):
    """A fake job feeding progress: the bar moves per report, the text gives counts, rate and
    time left, and the bar is full only once the job has returned."""
    from napari_cellclip._widgets._workers import Job
    from napari_cellclip._widgets.search import ProgressPanel

    now = [0.0]
    panel = ProgressPanel()
    qtbot.addWidget(panel)
    job = Job("test", unit="fields", clock=lambda: now[0], on_progress=panel.update_progress)
    panel.follow(job, "Loading the model…")
    assert panel.bar.maximum() == 0  # busy before the first report
    seen = []
    for t, done in [(0.0, 0), (10.0, 8), (20.0, 16), (30.0, 24), (40.0, 32), (50.0, 36)]:
        now[0] = t
        job._progress(done, 72)
        seen.append((panel.bar.value(), panel.bar.maximum(), panel.label.text()))
    assert [v for v, _, _ in seen] == [0, 8, 16, 24, 32, 36] and {m for _, m, _ in seen} == {72}
    assert seen[0][2] == "0 / 72 fields · measuring speed…"
    # 36 fields in 50 s: 0.72 fields/s, 36 left: 50 s
    assert seen[-1][2] == "36 / 72 fields · 43.2 fields/min · about 50 s left"
    now[0] = 100.0
    job._progress(72, 72)
    assert panel.bar.value() == 72 and "about" not in panel.label.text()
    job._returned("the result")
    panel.finish(job, "Done")
    assert panel.bar.value() == panel.bar.maximum() == 72
    # a failed job leaves the bar empty
    failed = Job("test", unit="fields", on_progress=panel.update_progress)
    panel.follow(failed, "…")
    failed._progress(3, 10)
    failed.error = "boom"
    failed._finish()
    panel.finish(failed, "Failed")
    assert panel.bar.value() == 0


def test_embedding_progress_moves_per_batch_and_ends_at_100_when_done(make_search, qtbot, notes, tmp_path,
                                                                      monkeypatch, wait_job):
    monkeypatch.setenv("NAPARI_CELLCLIP_CACHE", str(tmp_path / "fresh-cache"))  # really compute
    viewer, w = make_search()
    job = w.embed_plate()
    seen = []
    w.progress_bar.valueChanged.connect(lambda v: seen.append((v, w.progress_bar.maximum(), job.done)))
    texts = []
    job.on_progress = lambda j: (w.progress.update_progress(j), texts.append(w.status_label.text()))
    wait_job(job)
    assert not notes["error"], notes["error"]
    reports = [(v, m) for v, m, _ in seen if m == 12]
    assert reports[0][0] < 12 and [v for v, _ in reports] == sorted(v for v, _ in reports)  # moves, never back
    assert any(0 < v < 12 for v, _ in reports)  # a batch in the middle (batches of 8)
    assert all(not done for v, m, done in seen if v < m)
    assert w.progress_bar.value() == w.progress_bar.maximum() == 12  # full when done
    assert texts[0].startswith("0 / 12 fields") or texts[0].startswith("8 / 12 fields")
    assert any("fields/" in t for t in texts[1:])  # a rate once two reports came in
    assert w.status_label.text().startswith("Embedded 12 fields in ")


def test_hit_gallery_shows_the_top_hits_side_by_side(make_search, qtbot, notes, wait_job):
    from napari_cellclip._widgets import _gallery

    viewer, w = make_search()
    wait_job(w.embed_plate())
    w.topk_spin.setValue(5)
    wait_job(w.run_query(LONAFARNIB))
    wait_job(w.gallery_job)
    assert not notes["error"], notes["error"]
    image, labels = viewer.layers[_gallery.IMAGE_LAYER], viewer.layers[_gallery.LABELS_LAYER]
    res = w.state.results
    assert image.rgb and len(labels.data) == 5
    feats = labels.features
    assert feats["store_row"].tolist() == res["store_row"].tolist()
    assert feats["label"].iloc[0].startswith(f"1. {res['Metadata_Well'].iloc[0]} s{int(res['Metadata_Site'].iloc[0])}")
    assert feats["label"].iloc[0].splitlines()[1:] == ["lonafarnib", f"score {res['score'].iloc[0]:.2f}"]
    # beside the plate, each tile as large as a field, never over it
    plate_w = viewer.layers["DNA"].data.shape[-1]
    assert image.translate[1] > plate_w
    g = labels.metadata[_gallery.GALLERY_KEY]
    assert g["cols"] * g["step"] > 2 * plate_w and g["tile"] == pytest.approx(plate_w, rel=0.02)
    # the tiles hold the fields' pixels; the gaps between them are black
    t, step, row_step = (round(g[k] / image.scale[0]) for k in ("tile", "step", "row_step"))
    for i in range(5):
        r, q = divmod(i, g["cols"])
        assert image.data[r * row_step: r * row_step + t, q * step: q * step + t].mean() > 10
    assert image.data[:t, t + 1: step - 1].max() == 0
    # rows leave room for the three-line label above each tile (it overlapped the row above)
    assert row_step - t >= 0.45 * t and image.data[t + 1: row_step - 1].max() == 0
    # clicking a tile opens that field
    i = 3
    centre = labels.data[i]
    assert _gallery.tile_at(viewer, centre) == i
    row = _gallery.open_tile(viewer, i, w.open_field)
    assert row == res["store_row"].iloc[i]
    fields = viewer.layers["DNA"].metadata["cellclip_fields"]
    shown = fields.iloc[viewer.dims.current_step[0]]
    assert (shown["Metadata_Well"], shown["Metadata_Site"]) == \
        (res["Metadata_Well"].iloc[i], res["Metadata_Site"].iloc[i])
    assert w.state.selection == (row,)
    # one stain at a time: the plate and the gallery show that stain in grey
    before = image.data.copy()
    w.show_one_stain("DNA")
    assert [ly.visible for ly in (viewer.layers[s] for s in ("DNA", "ER", "RNA", "AGP", "Mito"))] == \
        [True, False, False, False, False]
    assert viewer.layers["DNA"].colormap.name == "gray"
    qtbot.waitUntil(lambda: not np.array_equal(image.data, before), timeout=5000)
    assert np.array_equal(image.data[..., 0], image.data[..., 2])  # grey
    w.show_one_stain(None)
    assert all(viewer.layers[s].visible for s in ("DNA", "ER", "RNA", "AGP", "Mito"))
    assert viewer.layers["DNA"].colormap.name == "DNA blue"
    # a new query updates the same two layers in place
    wait_job(w.more_like_this(row))
    wait_job(w.gallery_job)
    assert viewer.layers[_gallery.LABELS_LAYER] is labels and "similarity" in labels.features["label"].iloc[1]
    assert [ly.name for ly in viewer.layers].count(_gallery.IMAGE_LAYER) == 1


def test_model_card_is_shown(make_search, trained_checkpoint):
    viewer, w = make_search(open_plate=False)
    text = w.card_view.toPlainText()
    assert "CellCLIP model" in text and "How to load" in text and "morphology" in text
    assert "Metrics" in text


def test_widgets_dock_from_the_plugin_manifest(make_napari_viewer, sample_plate_path):
    from napari_cellclip._widgets.perturbation_map import PerturbationMapWidget
    from napari_cellclip._widgets.search import SearchWidget
    from napari_cellclip._widgets.state import get_state

    viewer = make_napari_viewer()
    _, search = viewer.window.add_plugin_dock_widget("napari-cellclip", "Search")
    _, cmap = viewer.window.add_plugin_dock_widget("napari-cellclip", "Perturbation map")
    assert isinstance(search, SearchWidget) and isinstance(cmap, PerturbationMapWidget)
    assert search.state is cmap.state is get_state(viewer)
    assert "No plate open" in search.plate_label.text()
    viewer.open(str(sample_plate_path), plugin="napari-cellclip")  # the state follows the layers
    assert len(search.state.fields) == 12 and "12 fields in 4 wells" in search.plate_label.text()
    other = make_napari_viewer()
    assert get_state(other) is not get_state(viewer)  # one state per viewer, no global singleton


def test_both_widgets_fit_a_laptop_screen(make_napari_viewer, sample_plate_path, qtbot):
    """Search + Perturbation map docked: the window's minimum size fits 1366x768, and at that size
    the results table shows a useful number of rows."""
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer(show=True)
    viewer.open(str(sample_plate_path), plugin="napari-cellclip")
    search_dock, search = viewer.window.add_plugin_dock_widget("napari-cellclip", "Search")
    map_dock, _ = viewer.window.add_plugin_dock_widget("napari-cellclip", "Perturbation map")
    qtbot.wait(50)  # the docks tabify once they are docked
    win = viewer.window._qt_window
    assert map_dock in win.tabifiedDockWidgets(search_dock)
    hint = win.minimumSizeHint()
    assert hint.width() <= 1366 and hint.height() <= 768, (hint.width(), hint.height())
    win.resize(1366, 768)
    search_dock.raise_()
    QApplication.processEvents()
    qtbot.wait(50)
    assert win.height() <= 768
    rows = search.table.viewport().height() // search.table.verticalHeader().defaultSectionSize()
    assert rows >= 10, rows


def test_gui_stays_responsive_while_embedding_with_the_cores_busy(make_search, qtbot, notes, tmp_path,
                                                                  monkeypatch, wait_job, busy_cpus, loop_gaps):
    monkeypatch.setenv("NAPARI_CELLCLIP_CACHE", str(tmp_path / "fresh-cache"))  # really compute
    viewer, w = make_search()
    w.state.fields = w.state.fields.iloc[:6].reset_index(drop=True)  # 6 fields: the load slows the work
    w.gallery_check.setChecked(False)  # adding napari layers is napari's own work on the GUI thread
    loop_gaps.start()
    job = w.embed_plate()
    wait_job(job, timeout=600_000)
    wait_job(w.run_query(LONAFARNIB))
    loop_gaps.stop()
    assert not notes["error"], notes["error"]
    assert w.state.store is not None and len(w.state.store) == 6
    print(f"embedding + text query under load: {loop_gaps.summary()}")
    assert len(loop_gaps.ticks) > 50
    assert loop_gaps.max_ms <= 100, loop_gaps.summary()
# ---------------------------------------------------------------------- one road: the widget vs evaluate
def test_zero_shot_ranks_wells_like_evaluate(embedded, qtbot, notes, wait_job, trained_checkpoint,
                                             cellclip_cache_dir, sample_plate_path):
    """Defect: "Score wells" averaged field embeddings while `python -m training evaluate` pools a
    well's fields through the model.  Same checkpoint, same plate → the same well ranking."""
    from napari_cellclip.sample import sample_platemap_dir
    from training.loop import evaluate

    viewer, w = embedded
    store = w.state.store
    assert store.has_model_wells
    wait_job(w.run_zero_shot())
    zs = w.state.results.set_index(["Metadata_Plate", "Metadata_Well"])
    rep = evaluate(trained_checkpoint.parent, [sample_plate_path], platemap=sample_platemap_dir(),
                   cache_dir=str(cellclip_cache_dir), quiet=True, no_progress=True)  # the run folder fit printed
    per_well = rep["well"]["per_well"]
    assert len(per_well) == len(zs) == 4
    for r in per_well:
        z = zs.loc[(r["plate"], r["well"])]
        assert z["best_prompt"] == r["best_prompt"] and int(z["true_prompt_rank"]) == r["rank"], r
        assert float(z["best_score"]) == pytest.approx(r["best_score"], abs=1e-5)
    assert float(zs["correct"].astype(bool).mean()) == rep["well"]["image_to_text"]["R@1"]
    # the wells are the model's pooling of each well's fields, not their mean
    feats = store.well_level().embeddings
    mean = store.embeddings.reshape(4, 3, -1).mean(1)  # the sample: 4 wells x 3 sites, in well order
    assert not np.allclose(feats, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-3)
    assert not notes["error"], notes["error"]


def test_widget_shows_the_checkpoints_prompt_form(embedded):
    viewer, w = embedded
    assert "A549 cells treated with compound: <name>" in w.query_edit.placeholderText()
    assert "A549 cells treated with compound" in w.prompts_edit.placeholderText()


def test_plate_without_cell_line_gets_the_checkpoints(make_search, qtbot, notes, wait_job, tmp_path,
                                                      sample_plate_path):
    """Defect: a plate opened in napari (no cell line) got "Cells treated with …" prompts although the
    checkpoint learned "A549 cells treated with …"; a plate naming another cell line is warned about."""
    from napari_cellclip.sample import sample_platemap_dir

    root = tmp_path / "screen"
    shutil.copytree(sample_plate_path, root / "images" / sample_plate_path.name)
    shutil.copytree(sample_platemap_dir(), root / "platemap")  # found next to the plate by the reader
    viewer, w = make_search(plate=root / "images" / sample_plate_path.name)
    assert w.state.fields["Metadata_prompt"].iloc[0].startswith("Cells treated with")
    wait_job(w.embed_plate())
    prompts = set(w.state.store.fields["Metadata_prompt"])
    assert LONAFARNIB in prompts and all(p.startswith("A549 cells") for p in prompts)
    assert not notes["warning"], notes["warning"]
    wait_job(w.run_zero_shot())
    assert w.state.results.set_index("Metadata_Well").loc["P13", "best_prompt"] == LONAFARNIB

    other = w.state.fields.copy()
    other["Metadata_cell_line"] = "U2OS"
    other["Metadata_prompt"] = other["Metadata_prompt"].str.replace("Cells treated", "U2OS cells treated")
    w.state.fields = other
    wait_job(w.embed_plate())
    assert any("U2OS" in m and "A549" in m for m in notes["warning"]), notes["warning"]
    assert all(p.startswith("U2OS cells") for p in w.state.store.fields["Metadata_prompt"])  # kept as it is
