"""Cell segmentation widget: Labels layers for the field on screen (in the background process), per-cell export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def test_segmentation_layer_data_is_two_labels_layers(sample_plate_path):
    from napari_cellclip._reader import read_fields
    from napari_cellclip._widgets._masks import LAYER_NAMES, segmentation_layer_data

    fields = read_fields(sample_plate_path)
    stains = ["DNA", "ER", "RNA", "AGP", "Mito"]
    layers = segmentation_layer_data(fields.iloc[4], stains)
    assert [(kw["name"], kind) for _d, kw, kind in layers] == [(LAYER_NAMES[0], "labels"), (LAYER_NAMES[1], "labels")]
    nuclei, cells = layers[0][0], layers[1][0]
    assert nuclei.shape == cells.shape == (540, 540)
    n = int(nuclei.max())
    assert n > 20 and int(cells.max()) == n
    info = layers[0][1]["metadata"]["cellclip_segmentation"]
    assert info["field"] == ("SQ00015198", "A13", "2") and info["n_cells"] == n


@pytest.fixture()
def seg_widget(make_napari_viewer, sample_plate_path, qtbot, notes):
    from napari_cellclip._widgets._segmentation import SegmentationWidget

    viewer = make_napari_viewer()
    viewer.open(str(sample_plate_path), plugin="napari-cellclip")
    widget = SegmentationWidget(viewer)
    viewer.window.add_dock_widget(widget, name="segmentation")
    return viewer, widget


def test_masks_follow_the_field_on_screen(seg_widget, qtbot, notes, wait_job):
    viewer, w = seg_widget
    assert w.nuclei_stain.currentText() == "DNA" and w.cell_stain.currentText() == "RNA"
    assert "nuclei" not in viewer.layers  # nothing computed until asked
    viewer.dims.set_current_step(0, 0)  # A01 site 1
    w.show_masks.setChecked(True)
    wait_job(w._job)
    nuclei, cells = viewer.layers["nuclei"], viewer.layers["cells"]
    assert nuclei.data.shape == (540, 540) and nuclei.data.max() > 20
    assert nuclei.metadata["cellclip_segmentation"]["field"] == ("SQ00015198", "A01", "1")
    first = np.asarray(nuclei.data).copy()
    viewer.dims.set_current_step(0, 10)  # P13 site 2
    qtbot.waitUntil(lambda: nuclei.metadata["cellclip_segmentation"]["field"][1] == "P13", timeout=120_000)
    wait_job(w._job)
    assert not np.array_equal(np.asarray(nuclei.data), first)
    assert int(cells.data.max()) == int(nuclei.data.max()) and cells.contour == 2
    assert "P13" in w.status.text() and "cells" in w.status.text()
    w.show_masks.setChecked(False)
    assert not nuclei.visible and not cells.visible
    assert not notes["error"]


def test_export_writes_one_row_per_cell(seg_widget, tmp_path, qtbot, notes, wait_job, monkeypatch):
    import napari_cellclip.celltable as ct

    viewer, w = seg_widget
    fields = viewer.layers[0].metadata["cellclip_fields"]
    few = fields.iloc[[0, 10]].reset_index(drop=True)  # two fields keep the test short
    monkeypatch.setattr(w, "_fields", lambda: few)
    out = tmp_path / "cells.csv"
    wait_job(w.export(str(out)))
    assert not notes["error"], notes["error"]
    table = pd.read_csv(out)
    assert set(table["Metadata_Well"]) == {"A01", "P13"}
    assert table.columns[0].startswith("Metadata_") and "ObjectNumber" in table.columns
    for col in ("Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_RNA", "Nuclei_Texture_Contrast_DNA_3",
                "Cells_Granularity_1_Mito", "Cells_Correlation_Pearson_AGP_DNA"):
        assert col in table.columns
    assert any("cells written to" in m for m in notes["info"])
    assert ct.cell_columns  # the module the widget calls
