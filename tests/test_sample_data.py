"""Sample-data contributions: the bundled LINCS plate and one field."""

from __future__ import annotations

import numpy as np

from napari_cellclip._sample_data import sample_field, sample_plate


def test_sample_plate_layer_data():
    (data, kwargs, kind), = sample_plate()
    assert kind == "image" and data.shape == (12, 5, 540, 540)
    assert kwargs["name"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert len(kwargs["metadata"]["cellclip_fields"]) == 12


def test_sample_field_layer_data():
    (data, kwargs, kind), = sample_field()
    assert isinstance(data, np.ndarray) and data.shape == (5, 540, 540)
    assert kwargs["channel_axis"] == 0
    fields = kwargs["metadata"]["cellclip_fields"]
    assert fields["Metadata_pert_iname"].tolist() == ["lonafarnib"]


def test_open_sample_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cellclip", "lincs_plate")
    assert [ly.name for ly in viewer.layers] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    viewer.layers.clear()
    viewer.open_sample("napari-cellclip", "lincs_field")
    assert len(viewer.layers) == 5
    assert viewer.layers["DNA"].data.shape == (540, 540)
