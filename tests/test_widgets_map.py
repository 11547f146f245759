"""Perturbation-map widget: points per well/field, colour by metadata, selection, hits, parquet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

LONAFARNIB = "A549 cells treated with compound: lonafarnib"




@pytest.fixture()
def widgets(make_napari_viewer, trained_checkpoint, cellclip_env, sample_plate_path, qtbot, notes, wait_job):
    from napari_cellclip._widgets.perturbation_map import PerturbationMapWidget
    from napari_cellclip._widgets.search import SearchWidget

    viewer = make_napari_viewer()
    viewer.open(str(sample_plate_path), plugin="napari-cellclip")
    search = SearchWidget(viewer)
    cmap = PerturbationMapWidget(viewer)
    viewer.window.add_dock_widget(search, name="search")
    viewer.window.add_dock_widget(cmap, name="map")
    assert not cmap.compute_btn.isEnabled()  # nothing embedded yet
    search.set_checkpoint(trained_checkpoint)
    wait_job(search.embed_plate())
    assert search.state.store is not None, notes["error"]
    return viewer, search, cmap


def test_one_point_per_well_coloured_by_metadata(widgets, qtbot, notes, wait_job):
    viewer, search, cmap = widgets
    assert cmap.state is search.state  # one shared state per viewer
    cmap.level_combo.setCurrentText("wells")
    wait_job(cmap.compute("pca"))
    assert cmap.coords.shape == (4, 2) and len(cmap.view.points) == 4
    wells = cmap.map_store.fields
    assert sorted(wells["Metadata_Well"]) == ["A01", "A13", "J18", "P13"]
    for col in ("Metadata_pert_iname", "Metadata_moa", "Metadata_prompt", "Metadata_Plate"):
        assert col in wells.columns
    items = [cmap.color_combo.itemText(i) for i in range(cmap.color_combo.count())]
    assert all(c.startswith("Metadata_") for c in items) and "Metadata_pert_iname" in items
    # hover labels
    tips = [p.toolTip() for p in cmap.view.points]
    assert any("lonafarnib" in t for t in tips) and all("SQ00015198" in t for t in tips)
    # colour by perturbation: the two DMSO wells share a colour, the compounds differ
    cmap.color_combo.setCurrentText("Metadata_pert_iname")
    col = {wells["Metadata_Well"].iloc[i]: p.brush().color().name() for i, p in enumerate(cmap.view.points)}
    assert col["A01"] == col["J18"] and len({col["A01"], col["A13"], col["P13"]}) == 3
    assert "DMSO" in cmap.legend.text()
    cmap.color_combo.setCurrentText("Metadata_n_fields")  # numbers work too
    assert not notes["error"]


def test_selecting_points_selects_fields_and_shows_them(widgets, qtbot, wait_job):
    viewer, search, cmap = widgets
    cmap.level_combo.setCurrentText("wells")
    wait_job(cmap.compute("pca"))
    search.run_query(LONAFARNIB)
    i = cmap.map_store.fields["Metadata_Well"].tolist().index("A13")
    # a lasso around that one point (scene coordinates)
    x, y = cmap.view.point_scene_pos(i)
    cmap.view.select_in_polygon([(x - 5, y - 5), (x + 5, y - 5), (x + 5, y + 5), (x - 5, y + 5)])
    store_fields = search.state.store.fields
    sel = search.state.selection
    assert sorted(store_fields.iloc[list(sel)]["Metadata_Well"]) == ["A13"] * 3
    # the results table selects those fields
    res = search.state.results
    rows = sorted({ix.row() for ix in search.table.selectionModel().selectedRows()})
    assert sorted(res.iloc[rows]["store_row"]) == sorted(sel)
    # the viewer shows the first of them
    shown = viewer.layers["DNA"].metadata["cellclip_fields"].iloc[viewer.dims.current_step[0]]
    assert shown["Metadata_Well"] == "A13"
    # a click on one point replaces the selection
    cmap.select_points([cmap.map_store.fields["Metadata_Well"].tolist().index("P13")])
    assert set(store_fields.iloc[list(search.state.selection)]["Metadata_Well"]) == {"P13"}
    assert cmap.view.selected() == [cmap.map_store.fields["Metadata_Well"].tolist().index("P13")]


def test_query_hits_are_highlighted(widgets, qtbot, wait_job):
    viewer, search, cmap = widgets
    cmap.level_combo.setCurrentText("fields")
    wait_job(cmap.compute("pca"))
    assert len(cmap.view.points) == 12
    search.topk_spin.setValue(3)
    search.run_query(LONAFARNIB)
    hits = sorted(p.index for p in cmap.view.points if p.hit)
    assert hits == sorted(search.state.results["store_row"])
    big = {p.index: p.rect().width() for p in cmap.view.points}
    assert all(big[h] > big[o] for h in hits for o in set(big) - set(hits))
    # a selection made in the results table shows on the map
    search.select_result(1)
    assert cmap.view.selected() == [int(search.state.results["store_row"].iloc[1])]


def test_parquet_export_round_trips(widgets, qtbot, tmp_path, wait_job):
    viewer, search, cmap = widgets
    assert cmap.export_parquet(tmp_path / "none.parquet") is None  # no map yet
    cmap.level_combo.setCurrentText("wells")
    wait_job(cmap.compute("pca"))
    out = cmap.export_parquet(tmp_path / "map.parquet")
    back = pd.read_parquet(out)
    st = search.state.store.well_level()
    assert len(back) == 4
    emb = back[[f"emb_{i}" for i in range(st.dim)]].to_numpy()
    np.testing.assert_allclose(emb, st.embeddings, rtol=1e-6)
    np.testing.assert_allclose(back[["PCA_1", "PCA_2"]].to_numpy(), cmap.coords, rtol=1e-6)
    meta = [c for c in back.columns if c.startswith("Metadata_")]
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_pert_iname", "Metadata_moa"} <= set(meta)
    assert back["Metadata_Well"].tolist() == st.fields["Metadata_Well"].tolist()


def test_profile_export_in_a_worker(widgets, tmp_path, notes, wait_job):
    from napari_cellclip.profiles import read_profiles

    viewer, search, cmap = widgets
    wait_job(cmap.export_profiles(tmp_path / "profiles"))
    assert not notes["error"], notes["error"]
    wells, cols, info = read_profiles(tmp_path / "profiles" / "wells.parquet")
    fields, _, _ = read_profiles(tmp_path / "profiles" / "fields.parquet")
    assert len(fields) == 12 and len(wells) == 4 and len(cols) == search.state.store.dim
    assert info["well_profiles"] == "median of the well's field embeddings"


def test_umap_of_fields_in_a_worker(widgets, qtbot, tmp_path, notes, wait_job):
    """The one UMAP test (first call compiles with numba, ~30 s)."""
    import time

    from qtpy.QtCore import QTimer

    viewer, search, cmap = widgets
    cmap.level_combo.setCurrentText("fields")
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    started = time.perf_counter()
    job = cmap.compute("umap")
    assert cmap.progress_bar.maximum() == 0  # busy indicator while it runs
    wait_job(job)
    elapsed = time.perf_counter() - started
    timer.stop()
    assert not notes["error"], notes["error"]
    assert cmap.method_used == "umap" and cmap.coords.shape == (12, 2)
    assert np.isfinite(cmap.coords).all()
    assert "UMAP of 12 fields" in cmap.status_label.text()
    print(f"UMAP: {elapsed:.1f} s, {len(ticks)} ticks, max gap {np.diff(ticks).max() * 1000:.0f} ms")
    # the event loop kept running: at least a third of the 10 ms ticks arrived, however long UMAP took
    # (seconds on a first call that compiles with numba, well under one when numba is already warm)
    assert len(ticks) >= elapsed / 0.010 / 3 - 2
    df = pd.read_parquet(cmap.export_parquet(tmp_path / "umap.parquet"))
    assert {"UMAP_1", "UMAP_2"} <= set(df.columns) and len(df) == 12
