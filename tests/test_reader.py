"""Reader contribution: plate folder / LoadData CSV / channel files → one lazy layer per stain."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from napari_cellclip._reader import STAIN_DISPLAY, get_reader, read_fields

STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def _layer_data(path):
    reader = get_reader(str(path))
    assert reader is not None
    return reader(str(path))


def test_plate_folder_gives_one_lazy_layer_per_stain(sample_plate_path):
    import dask.array as da

    (data, kwargs, kind), = _layer_data(sample_plate_path)
    assert kind == "image"
    assert isinstance(data, da.Array)
    assert data.shape == (12, 5, 540, 540)  # fields, stains, y, x
    assert kwargs["channel_axis"] == 1
    assert kwargs["name"] == STAINS
    assert [c.name for c in kwargs["colormap"]] == ["DNA blue", "ER green", "RNA cyan", "AGP red", "Mito magenta"]
    assert kwargs["gamma"] == [STAIN_DISPLAY[s].gamma for s in STAINS]
    assert kwargs["blending"] == "additive"
    for lo, hi in kwargs["contrast_limits"]:
        assert 0 <= lo < hi <= 255
    assert "scale" not in kwargs  # the LINCS sample has no pixel size
    fields = kwargs["metadata"]["cellclip_fields"]
    assert len(fields) == 12
    assert set(fields["Metadata_Well"]) == {"A01", "A13", "J18", "P13"}
    # annotated with the bundled platemap: perturbations and prompts are known
    assert set(fields["Metadata_pert_iname"]) == {"DMSO", "orantinib", "lonafarnib"}
    assert fields["Metadata_prompt"].str.contains("lonafarnib").any()


def test_only_the_viewed_field_is_decoded(sample_plate_path, monkeypatch):
    from napari_cellclip import images

    (data, _, _), = _layer_data(sample_plate_path)
    calls = []
    real = images.load_field

    def spy(row, stains=None):
        calls.append((row["Metadata_Well"], row["Metadata_Site"], tuple(stains or ())))
        return real(row, stains)

    monkeypatch.setattr(images, "load_field", spy)
    plane = np.asarray(data[4, 0])  # field 4 (A13 site 2), DNA only
    assert plane.shape == (540, 540) and plane.dtype == np.uint8
    assert calls == [("A13", 2, ("DNA",))]
    expected = real(read_fields(sample_plate_path).iloc[4], ["DNA"])[0]
    np.testing.assert_array_equal(plane, expected)


def test_viewer_opens_plate_as_stain_layers(make_napari_viewer, sample_plate_path):
    viewer = make_napari_viewer()
    layers = viewer.open(str(sample_plate_path), plugin="napari-cellclip")
    assert [ly.name for ly in layers] == STAINS
    assert [ly.name for ly in viewer.layers] == STAINS
    for ly in layers:
        assert ly.data.shape == (12, 540, 540)
        assert ly.blending == "additive"
        assert ly.metadata["cellclip_fields"] is layers[0].metadata["cellclip_fields"]
    assert viewer.layers["DNA"].colormap.name == "DNA blue"
    assert viewer.layers["Mito"].colormap.name == "Mito magenta"
    np.testing.assert_allclose(viewer.layers["DNA"].colormap.colors[-1][:3], [0x26 / 255, 0x66 / 255, 1.0])
    assert viewer.dims.nsteps[0] == 12  # a slider over the fields


def test_loaddata_csv_and_channel_files(sample_plate_path):
    (data, kwargs, _), = _layer_data(sample_plate_path / "load_data.csv")
    assert data.shape[:2] == (12, 5) and kwargs["name"] == STAINS

    one = sample_plate_path / "r16c13f02p01-ch3sk1fk1fl1.png"  # P13 site 2, RNA
    (data, kwargs, _), = _layer_data(one)
    fields = kwargs["metadata"]["cellclip_fields"]
    assert data.shape[:2] == (1, 5)
    assert fields[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["P13", 2]]

    files = sorted(sample_plate_path.glob("r01c01f03p01-ch*.png"))
    reader = get_reader([str(f) for f in files])
    (data, kwargs, _), = reader([str(f) for f in files])
    assert data.shape[:2] == (1, 5)
    assert kwargs["metadata"]["cellclip_fields"]["Metadata_Well"].tolist() == ["A01"]


def test_foreign_files_give_none_and_never_raise(tmp_path):
    from PIL import Image

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    (tmp_path / "empty").mkdir()
    lone = tmp_path / "lone"
    lone.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(lone / "holiday.png")
    for p in ["notes.txt", "table.csv", "broken.tif", "empty", "missing.png", "lone/holiday.png"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert get_reader(str(tmp_path / p)) is None, p
    assert get_reader(12345) is None
    assert get_reader([]) is None


def test_corrupt_field_is_blank_with_a_warning(tmp_path, sample_plate_path):
    from napari_cellclip.errors import CellClipWarning

    plate = tmp_path / "SQ00015198"
    shutil.copytree(sample_plate_path, plate)
    bad = plate / "r01c13f01p01-ch2sk1fk1fl1.png"  # A13 site 1, ER
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (data, _, _), = _layer_data(plate)
    with pytest.warns(CellClipWarning, match="r01c13f01p01-ch2"):
        plane = np.asarray(data[3, 1])
    assert plane.shape == (540, 540) and not plane.any()
    assert np.asarray(data[3, 0]).any()  # the other stains of that field still read


def test_composite_keeps_the_five_stains_apart(sample_plate_path):
    """Each stain has its own hue; the diffuse cytoplasmic stains are weighted down so the sum
    of the composite saturates on only a small part of a field."""
    import colorsys

    (data, kwargs, _), = _layer_data(sample_plate_path)
    hues = [colorsys.rgb_to_hsv(*c.colors[-1][:3])[0] * 360 for c in kwargs["colormap"]]
    gaps = [abs((a - b + 180) % 360 - 180) for i, a in enumerate(hues) for b in hues[i + 1:]]
    assert min(gaps) >= 30, hues
    field = np.asarray(data[9], dtype=np.float64)  # P13 site 1, lonafarnib
    rgb = np.zeros(field.shape[1:] + (3,))
    for img, cmap, (lo, hi), g, a in zip(field, kwargs["colormap"], kwargs["contrast_limits"],
                                          kwargs["gamma"], kwargs["opacity"]):
        rgb += a * np.clip((img - lo) / (hi - lo), 0, 1)[..., None] ** g * np.asarray(cmap.colors[-1][:3])
    saturated = (rgb.max(axis=-1) >= 1.0).mean()
    assert saturated < 0.03, f"{saturated:.1%} of the composite saturates"


def test_pixel_size_scales_the_layers(sample_plate_path):
    from napari_cellclip._reader import PIXEL_SIZE_KEY, fields_layer_data

    fields = read_fields(sample_plate_path)
    fields["Metadata_PixelSizeUm"] = 0.656
    (data, kwargs, _), = fields_layer_data(fields, str(sample_plate_path))
    assert kwargs["scale"] == (1.0, 0.656, 0.656) and kwargs["units"][1:] == ("um", "um")
    assert kwargs["metadata"][PIXEL_SIZE_KEY] == 0.656
