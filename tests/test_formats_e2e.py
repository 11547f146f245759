"""Every format end to end: open (the napari reader's path) → embed → query, and the layers napari gets.

The bundled LINCS fields are written in each format (16-bit, as a camera gives them);
a field is a field whatever file holds it, so each format's embeddings equal those of
the PNG original and the lonafarnib query finds the lonafarnib wells.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from _formats_data import (
    BRAY_NAMES, PLATE, sample_fields, write_dye_folders, write_ome_tiffs, write_ome_zarr, write_phenix,
)
from napari_cellclip._reader import get_reader, read_fields, stain_colormap
from napari_cellclip.errors import CellClipWarning
from napari_cellclip.metadata import annotate
from napari_cellclip.sample import load_sample_fields, sample_platemap_dir

STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]
LONAFARNIB = "A549 cells treated with compound: lonafarnib"
FORMATS = ("jump-tiff", "ome-tiff", "ome-zarr-0.4", "ome-zarr-0.5", "dye-folders")


def _write(fmt: str, dst: Path, fields) -> Path:
    dst.mkdir(parents=True)
    if fmt == "jump-tiff":  # JUMP / Cell Painting Gallery: Phenix names, 16-bit, LZW
        return write_phenix(dst, "lzw", fields=fields)
    if fmt == "ome-tiff":
        return write_ome_tiffs(dst, fields=fields)
    if fmt.startswith("ome-zarr"):
        return write_ome_zarr(dst, fmt.rsplit("-", 1)[1], fields=fields)
    return write_dye_folders(dst, fields=fields, names=BRAY_NAMES)


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    fields = sample_fields()
    root = tmp_path_factory.mktemp("formats")
    return {fmt: _write(fmt, root / fmt, fields) for fmt in FORMATS}


@pytest.fixture(scope="module")
def model(trained_checkpoint):
    from napari_cellclip.embed import load_model

    return load_model(trained_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def reference(model, cellclip_cache_dir):
    from napari_cellclip.embed import embed_fields

    return embed_fields(load_sample_fields(), model, device="cpu", cache_dir=cellclip_cache_dir)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_embed_query(fmt, plates, model, reference, cellclip_cache_dir):
    from napari_cellclip.embed import embed_fields
    from napari_cellclip.search import image_query, text_query

    fields = _quiet(read_fields, str(plates[fmt]))  # what `napari <plate>` reads
    assert fields is not None and len(fields) == 12
    fields = annotate(fields, platemap_dir=sample_platemap_dir(), cell_line="A549")
    store = embed_fields(fields, model, device="cpu", cache_dir=cellclip_cache_dir)
    assert store.info.get("skipped", []) == [] and len(store.fields) == 12
    keys = list(zip(store.fields["Metadata_Well"], store.fields["Metadata_Site"]))
    ref_keys = list(zip(reference.fields["Metadata_Well"], reference.fields["Metadata_Site"]))
    assert keys == ref_keys
    # the same pixels (×257) give the same embedding up to float rounding at feature thresholds
    cos = np.sum(store.embeddings * reference.embeddings, axis=1) / (
        np.linalg.norm(store.embeddings, axis=1) * np.linalg.norm(reference.embeddings, axis=1))
    assert cos.min() > 0.999
    hits = text_query(model, store, LONAFARNIB, top_k=3)
    assert hits["Metadata_pert_iname"].tolist() == ["lonafarnib"] * 3
    assert image_query(store, 5, top_k=1)["row"].tolist() == [5]


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_gives_one_named_layer_per_stain(fmt, plates):
    import dask.array as da

    path = str(plates[fmt])
    reader = _quiet(get_reader, path)
    assert reader is not None
    (data, kwargs, kind), = _quiet(reader, path)
    assert kind == "image" and kwargs["name"] == STAINS and kwargs["channel_axis"] == 1
    zarr = fmt.startswith("ome-zarr")
    assert kwargs["multiscale"] is zarr
    levels = data if zarr else [data]
    assert [lv.shape for lv in levels] == ([(12, 5, 540, 540), (12, 5, 270, 270)] if zarr else [(12, 5, 540, 540)])
    assert all(isinstance(lv, da.Array) for lv in levels)
    assert levels[0].dtype == np.uint16
    fields = kwargs["metadata"]["cellclip_fields"]
    assert fields["Metadata_Plate"].unique().tolist() == [PLATE]
    for lo, hi in kwargs["contrast_limits"]:
        assert 0 <= lo < hi <= 65535
    expected = sample_fields()[4][2][2]  # field 4 (A13 site 2), RNA
    np.testing.assert_array_equal(np.asarray(levels[0][4, 2]), expected)
    if zarr:
        assert np.asarray(levels[1][4, 2]).shape == (270, 270)


def test_reader_opens_a_well_or_field_inside_an_ome_zarr_plate(plates):
    plate = plates["ome-zarr-0.5"]
    well = _quiet(read_fields, str(plate / "P" / "13"))
    assert well[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["P13", 1], ["P13", 2], ["P13", 3]]
    field = _quiet(read_fields, str(plate / "P" / "13" / "1"))
    assert field[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["P13", 2]]


def test_napari_opens_an_ome_zarr_plate_as_multiscale_stain_layers(make_napari_viewer, plates):
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        layers = viewer.open(str(plates["ome-zarr-0.4"]), plugin="napari-cellclip")
    assert [ly.name for ly in layers] == STAINS
    for ly in layers:
        assert ly.multiscale and len(ly.data) == 2 and ly.data[0].shape == (12, 540, 540)
    assert viewer.layers["DNA"].colormap.name == stain_colormap("DNA").name
    assert viewer.dims.nsteps[0] == 12


def test_channels_json_names_the_layers(tmp_path):
    fields = sample_fields()[:3]
    plate = write_phenix(tmp_path, "zstd", fields=fields, names=None)
    (plate / "channels.json").write_text('{"1": "DNA", "2": "ER", "3": "RNA", "4": "AGP", "5": "Mito"}')
    reader = _quiet(get_reader, str(plate))
    (_, kwargs, _), = _quiet(reader, str(plate))
    assert kwargs["name"] == STAINS
    relabelled = _quiet(read_fields, str(plate), channel_map="1=Mito,2=AGP,3=RNA,4=ER,5=DNA")
    assert [c[len("FileName_Orig"):] for c in relabelled.columns if c.startswith("FileName_Orig")] == \
        ["Mito", "AGP", "RNA", "ER", "DNA"]


def test_declining_a_foreign_path_reads_no_tree(tmp_path, monkeypatch):
    """A stray PNG in a big tree, and the big tree itself, are declined without a whole-tree scan."""
    from PIL import Image

    big = tmp_path / "big"
    for i in range(60):
        d = big / f"dir{i:02d}"
        d.mkdir(parents=True)
        for j in range(200):
            (d / f"file{j:03d}.dat").touch()
    stray = big / "dir30" / "holiday.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(stray)
    seen = []
    real = os.scandir

    class Counting:
        def __init__(self, path):
            self.it = real(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            for entry in self.it:
                seen.append(entry.name)
                yield entry

        def close(self):
            self.it.close()

    monkeypatch.setattr(os, "scandir", Counting)
    assert get_reader(str(stray)) is None
    assert seen == []  # judged by its name alone
    assert get_reader(str(big)) is None
    assert 0 < len(seen) <= 5001 < 12_000  # a bounded look, not all 12,001 entries
    seen.clear()
    assert get_reader([str(stray)]) is None and seen == []
