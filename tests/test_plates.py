"""Plate discovery for every supported layout, and the bad-input cases."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cellclip.errors import CellClipWarning, ImageReadError, PlateError
from napari_cellclip.images import load_field, load_field_normalized
from napari_cellclip.plates import (
    DEFAULT_STAINS, normalize_well, parse_channel_map, read_plate, reorder_stains, stains, well_name,
    write_load_data,
)
from napari_cellclip.sample import sample_plate_dir



@pytest.fixture
def phenix_copy(tmp_path):
    """The bundled plate's PNGs without their LoadData CSV."""
    d = tmp_path / "SQ00015198"
    d.mkdir()
    for f in sample_plate_dir().glob("*.png"):
        shutil.copy(f, d)
    return d


def test_bundled_plate_via_load_data():
    df = read_plate(sample_plate_dir())
    assert stains(df) == list(DEFAULT_STAINS)
    assert sorted(df["Metadata_Well"].unique()) == ["A01", "A13", "J18", "P13"]
    assert df.groupby("Metadata_Well").size().tolist() == [3, 3, 3, 3]
    assert (df["Metadata_Plate"] == "SQ00015198").all()
    assert df.attrs["stain_source"] == "load_data"
    # PathName "." resolved against the CSV's folder (not the working folder)
    for stain in DEFAULT_STAINS:
        assert set(df[f"PathName_Orig{stain}"]) == {str(sample_plate_dir().resolve())}
    field = load_field(df.iloc[0])
    assert field.shape == (5, 540, 540) and field.dtype == np.uint8


def test_csv_path_directly_and_roundtrip(tmp_path):
    df = read_plate(sample_plate_dir() / "load_data.csv")
    out = write_load_data(df, tmp_path / "manifest.csv")
    again = read_plate(out)
    pd.testing.assert_frame_equal(df, again)


def test_shared_lincs_plates(shared_lincs):
    df = read_plate(shared_lincs / "images")
    assert stains(df) == list(DEFAULT_STAINS)
    for _plate, sub in df.groupby("Metadata_Plate"):
        assert sub["Metadata_Well"].nunique() == 4
        assert sub.groupby("Metadata_Well").size().tolist() == [9, 9, 9, 9]
    assert sorted(df["Metadata_Plate"].unique()) == ["SQ00015198", "SQ00015230", "SQ00015231"]


def test_phenix_without_names_warns_and_keeps_numbers(phenix_copy):
    with pytest.warns(CellClipWarning, match="ch1, ch2, ch3, ch4, ch5"):
        df = read_plate(phenix_copy)
    assert stains(df) == ["ch1", "ch2", "ch3", "ch4", "ch5"]
    assert len(df) == 12 and df["Metadata_Plate"].iloc[0] == "SQ00015198"
    assert set(df["Metadata_Site"]) == {1, 2, 3}
    with pytest.raises(PlateError, match="missing"):
        reorder_stains(df, DEFAULT_STAINS)


def test_phenix_with_channel_map(phenix_copy, tmp_path):
    df = read_plate(phenix_copy, channel_map="1=DNA,2=ER,3=RNA,4=AGP,5=Mito")
    assert stains(df) == list(DEFAULT_STAINS)
    cfg = tmp_path / "channels.json"
    cfg.write_text(json.dumps({"ch1": "DNA", "ch2": "ER", "ch3": "RNA", "ch4": "AGP", "ch5": "Mito"}))
    assert stains(read_plate(phenix_copy, channel_map=cfg)) == list(DEFAULT_STAINS)
    txt = tmp_path / "channels.txt"
    txt.write_text("# channel -> stain\n1=DNA\n2=ER\n3=RNA\n4=AGP\n5=Mito\n")
    assert stains(read_plate(phenix_copy, channel_map=txt)) == list(DEFAULT_STAINS)
    # canonical reorder of a differently numbered experiment
    df2 = read_plate(phenix_copy, channel_map="1=Mito,2=AGP,3=RNA,4=ER,5=DNA")
    assert stains(reorder_stains(df2)) == list(DEFAULT_STAINS)
    assert reorder_stains(df2)["FileName_OrigDNA"].iloc[0].endswith("-ch5sk1fk1fl1.png")


def test_channel_map_errors(phenix_copy):
    with pytest.raises(PlateError, match="no stain for channel"):
        read_plate(phenix_copy, channel_map="1=DNA,2=ER")
    with pytest.raises(PlateError, match="same stain"):
        parse_channel_map("1=DNA,2=DNA")
    with pytest.raises(PlateError, match="cannot read"):
        parse_channel_map("one=DNA")


HARMONY_XML = """<?xml version="1.0" encoding="utf-8"?>
<EvaluationInputData xmlns="http://www.perkinelmer.com/PEHH/HarmonyV5">
  <Plates><Plate><PlateID>MYPLATE01</PlateID></Plate></Plates>
  <Maps><Map>
    <Entry ChannelID="1"><ChannelName>HOECHST 33342</ChannelName></Entry>
    <Entry ChannelID="2"><ChannelName>ConA</ChannelName></Entry>
    <Entry ChannelID="3"><ChannelName>SYTO 14</ChannelName></Entry>
    <Entry ChannelID="4"><ChannelName>Phalloidin/WGA</ChannelName></Entry>
    <Entry ChannelID="5"><ChannelName>MitoTracker Deep Red</ChannelName></Entry>
  </Map></Maps>
</EvaluationInputData>
"""


def test_harmony_index_in_parent_names_stains(tmp_path):
    images = tmp_path / "plate__2024" / "Images"
    images.mkdir(parents=True)
    (tmp_path / "plate__2024" / "Index.idx.xml").write_text(HARMONY_XML)
    for f in sorted(sample_plate_dir().glob("r01c01f0[12]*.png")):
        tifffile.imwrite(images / f.name.replace(".png", ".tiff"), np.full((8, 8), 7, np.uint16))
    df = read_plate(tmp_path)
    assert stains(df) == list(DEFAULT_STAINS)
    assert df["Metadata_Plate"].unique().tolist() == ["MYPLATE01"]
    assert len(df) == 2 and load_field(df.iloc[0]).dtype == np.uint16


def test_harmony_fluorophore_names_are_not_guessed(tmp_path):
    xml = HARMONY_XML.replace("ConA", "Alexa 488")
    (tmp_path / "Index.xml").write_text(xml)
    for f in sorted(sample_plate_dir().glob("r01c01f01*.png")):
        shutil.copy(f, tmp_path)
    with pytest.warns(CellClipWarning, match="Alexa 488"):
        df = read_plate(tmp_path)
    assert stains(df) == ["DNA", "Alexa488", "RNA", "AGP", "Mito"]


def test_imagexpress_with_and_without_uuid(tmp_path):
    uuid = "0F2A6C1E-7D43-4B7E-9C0A-1234567890AB"
    for well in ("B02", "C03"):
        for site in (1, 2):
            for ch in (1, 2, 3, 4, 5):
                suffix = uuid if (site == 1 and ch % 2) else ""
                arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * ch)
                tifffile.imwrite(tmp_path / f"PLATE7_{well}_s{site}_w{ch}{suffix}.tif", arr)
    df = read_plate(tmp_path, channel_map="1=DNA,2=ER,3=RNA,4=AGP,5=Mito")
    assert len(df) == 4 and df["Metadata_Plate"].unique().tolist() == ["PLATE7"]
    assert sorted(df["Metadata_Well"].unique()) == ["B02", "C03"]
    f = load_field(df.iloc[0])
    assert f.shape == (5, 8, 8) and f[1, 0, 1] == 2


@pytest.mark.parametrize("axes", ["CYX", "YXC"])
def test_multichannel_tiff(tmp_path, axes):
    rng = np.random.default_rng(0)
    for well in ("A01", "B02"):
        for site in (1, 2, 3):
            data = rng.random((5, 16, 16), dtype=np.float32)
            data[2] = 3.0
            tifffile.imwrite(tmp_path / f"{well}_site{site}.tif", data if axes == "CYX" else np.moveaxis(data, 0, -1))
    pattern = r"(?P<well>[A-P]\d{2})_site(?P<site>\d+)\.tif"
    with pytest.raises(PlateError, match="axes"):
        read_plate(tmp_path, pattern=pattern)
    df = read_plate(tmp_path, pattern=pattern, axes=axes, channel_map="1=DNA,2=ER,3=RNA,4=AGP,5=Mito", plate="P1")
    assert len(df) == 6 and stains(df) == list(DEFAULT_STAINS)
    f = load_field(df.iloc[0])
    assert f.shape == (5, 16, 16) and f.dtype == np.float32 and np.all(f[2] == 3.0)
    norm = load_field_normalized(df.iloc[0])
    assert norm.dtype == np.float32 and norm.min() >= 0 and norm.max() <= 1
    assert np.all(norm[2] == 0)  # a flat channel normalises to zeros, not NaN


def test_reading_is_lazy(phenix_copy):
    for f in phenix_copy.glob("*ch3*.png"):
        f.write_bytes(b"not a png")
    with pytest.warns(CellClipWarning):
        df = read_plate(phenix_copy)  # no image is decoded here
    assert len(df) == 12
    with pytest.raises(ImageReadError, match="ch3sk1fk1fl1.png"):
        load_field(df.iloc[0])


# ----------------------------------------------------------------------------- bad input


def test_empty_folder(tmp_path):
    with pytest.raises(PlateError, match="empty"):
        read_plate(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(PlateError, match="not found"):
        read_plate(tmp_path / "nope")


def test_no_recognised_names(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PlateError, match="no recognised image names"):
        read_plate(tmp_path)


def test_corrupt_and_truncated_images(phenix_copy):
    df = read_plate(phenix_copy, channel_map="1=DNA,2=ER,3=RNA,4=AGP,5=Mito")
    target = Path(df.loc[0, "PathName_OrigER"]) / df.loc[0, "FileName_OrigER"]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(ImageReadError, match=target.name):
        load_field(df.iloc[0])
    target.write_bytes(b"\x89PNG garbage")  # corrupt
    with pytest.raises(ImageReadError, match="cannot decode"):
        load_field(df.iloc[0])
    assert load_field(df.iloc[1]).shape == (5, 540, 540)  # other fields unaffected


def test_field_missing_a_channel_is_skipped_with_warning(phenix_copy):
    (phenix_copy / "r01c13f02p01-ch4sk1fk1fl1.png").unlink()
    with pytest.warns(CellClipWarning, match=r"A13 site 2 \(missing AGP\)"):
        df = read_plate(phenix_copy, channel_map="1=DNA,2=ER,3=RNA,4=AGP,5=Mito")
    assert len(df) == 11


def test_channels_with_different_shapes(tmp_path):
    for ch in (1, 2, 3, 4, 5):
        shape = (10, 10) if ch != 3 else (12, 10)
        tifffile.imwrite(tmp_path / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff", np.zeros(shape, np.uint16))
    df = read_plate(tmp_path, channel_map="1=DNA,2=ER,3=RNA,4=AGP,5=Mito")
    with pytest.raises(ImageReadError, match=r"r01c01f01p01-ch3sk1fk1fl1.tiff: shape \(12, 10\) differs"):
        load_field(df.iloc[0])


def test_unknown_well_name_in_load_data(tmp_path):
    src = pd.read_csv(sample_plate_dir() / "load_data.csv", dtype=str)
    src.loc[3, "Metadata_Well"] = "Z1x"
    for c in src.columns:
        if c.startswith("PathName"):
            src[c] = str(sample_plate_dir())
    src.to_csv(tmp_path / "load_data.csv", index=False)
    with pytest.raises(PlateError, match=r"unknown well name.*'Z1x'"):
        read_plate(tmp_path)


def test_load_data_missing_columns(tmp_path):
    (tmp_path / "load_data.csv").write_text("Metadata_Well,FileName_OrigDNA\nA01,x.png\n")
    with pytest.raises(PlateError, match="Metadata_Site"):
        read_plate(tmp_path / "load_data.csv")


def test_well_names():
    assert well_name(1, 1) == "A01" and well_name(16, 24) == "P24" and well_name(27, 3) == "AA03"
    assert normalize_well("a1") == "A01" and normalize_well("P13") == "P13"
    with pytest.raises(PlateError, match="unknown well name"):
        normalize_well("13P")


def test_16bit_and_float_normalisation(tmp_path):
    rng = np.random.default_rng(1)
    img16 = rng.integers(0, 65535, (32, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", img16)
    from napari_cellclip.images import normalize, read_image

    x = read_image(tmp_path / "a.tif")
    assert x.dtype == np.uint16
    n = normalize(x, 1, 99)
    assert n.dtype == np.float32 and 0 <= n.min() and n.max() <= 1
    assert np.isclose(np.mean(n == 0), 0.01, atol=0.01) and np.isclose(np.mean(n == 1), 0.01, atol=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(normalize(np.zeros((4, 4))) == 0)


def test_blank_frame_column_means_single_channel_files(tmp_path):
    """A LoadData CSV with an empty Frame_Orig<Stain> column (pandas NA) reads single-channel files."""
    from napari_cellclip.features import field_cache_key

    src = pd.read_csv(sample_plate_dir() / "load_data.csv", dtype=str)
    for c in src.columns:
        if c.startswith("PathName"):
            src[c] = str(sample_plate_dir())
    src["Frame_OrigDNA"] = ""
    src.to_csv(tmp_path / "load_data.csv", index=False)
    df = read_plate(tmp_path)
    assert df["Frame_OrigDNA"].isna().all()
    assert load_field(df.iloc[0]).shape == (5, 540, 540)
    assert field_cache_key(df.iloc[0], ["DNA"], "enc") == field_cache_key(
        read_plate(sample_plate_dir()).iloc[0], ["DNA"], "enc")
