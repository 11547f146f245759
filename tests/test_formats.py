"""Formats real screens come in: compressed TIFF, OME-TIFF, OME-Zarr HCS plates, dye-named files;
the stain names they carry, channel maps beside a plate, and the bad-input cases of each."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from _formats_data import DYE_NAMES, PLATE, write_dye_folders, write_ome_tiffs, write_ome_zarr, write_phenix
from napari_cellclip.errors import CellClipWarning, ImageReadError, PlateError
from napari_cellclip.features import field_cache_key
from napari_cellclip.formats.dyes import canonical_stain
from napari_cellclip.images import channel_digest, channel_stamp, load_field, pyramid_shapes, read_image
from napari_cellclip.plates import (
    DEFAULT_STAINS, find_channel_map, parse_well_site, read_plate, rename_stains, reorder_stains, stains,
)

STAINS = list(DEFAULT_STAINS)


def _fields(n_wells=2, sites=2, shape=(40, 48), seed=0):
    """Small 16-bit fields spanning the whole 16-bit range: [(well, site, (5, H, W) uint16)]."""
    rng = np.random.default_rng(seed)
    wells = ["B03", "C05", "D07", "E09"][:n_wells]
    out = []
    for w in wells:
        for s in range(1, sites + 1):
            img = rng.integers(0, 65536, (5, *shape), dtype=np.uint16)
            img[:, 0, 0] = 65535
            out.append((w, s, img))
    return out


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        return fn(*args, **kwargs)


def _assert_same_pixels(df, fields):
    got = {(r["Metadata_Well"], r["Metadata_Site"]): load_field(r, STAINS) for _, r in df.iterrows()}
    assert len(got) == len(fields)
    for well, site, img in fields:
        np.testing.assert_array_equal(got[(well, site)], img)


# ----------------------------------------------------------------------------- compressed TIFF


@pytest.mark.parametrize("compression, args", [
    ("lzw", None), ("zstd", None), ("deflate", None), ("adobe_deflate", None), ("lzma", None),
    ("packbits", None), ("jpeg", {"lossless": True}), ("jpeg2000", {"reversible": True}),
    ("jpegxl", {"lossless": True}),
])
def test_compressed_16bit_phenix_tiffs_read_back_exact(tmp_path, compression, args):
    fields = _fields()
    plate = write_phenix(tmp_path, compression, fields=fields, compressionargs=args)
    with tifffile.TiffFile(next((plate / "Images").glob("*.tiff"))) as tf:
        assert tf.pages[0].compression.name.lower().replace("_", "") != "none"
    df = _quiet(read_plate, tmp_path)
    assert stains(df) == STAINS and len(df) == 4 and df["Metadata_Plate"].unique().tolist() == [PLATE]
    _assert_same_pixels(df, fields)


def test_lossy_jpeg_tiff_decodes_close(tmp_path):
    fields = [(w, s, (img >> 8).astype(np.uint8)) for w, s, img in _fields(shape=(64, 64))]
    smooth = [(w, s, np.broadcast_to(np.linspace(10, 240, 64, dtype=np.uint8), img.shape).copy())
              for w, s, img in fields]
    write_phenix(tmp_path, "jpeg", fields=smooth, compressionargs={"level": 95})
    df = _quiet(read_plate, tmp_path)
    for (_, row), (_, _, img) in zip(df.iterrows(), smooth):
        got = load_field(row, STAINS)
        assert got.dtype == np.uint8
        assert np.abs(got.astype(int) - img).mean() < 2.0


def test_codec_without_imagecodecs_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "r01c01f01p01-ch1sk1fk1fl1.tiff"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16), compression="lzw")

    def no_codec(self, *a, **k):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", no_codec)
    with pytest.raises(ImageReadError, match=r"r01c01f01p01-ch1sk1fk1fl1.tiff.*pip install imagecodecs"):
        read_image(path)


def test_phenix_planes_read_the_first_with_a_warning(tmp_path):
    fields = _fields(n_wells=1, sites=1)
    plate = write_phenix(tmp_path, "lzw", fields=fields)
    for f in (plate / "Images").glob("*p01-*"):
        tifffile.imwrite(f.with_name(f.name.replace("p01-", "p02-")), np.zeros((40, 48), np.uint16))
    with pytest.warns(CellClipWarning, match=r"2 planes \(p01..p02\); plane p01 is read"):
        df = read_plate(tmp_path)
    _assert_same_pixels(df, fields)


# ----------------------------------------------------------------------------- stain names


@pytest.mark.parametrize("name, stain", [
    ("HOECHST 33342", "DNA"), ("Hoechst", "DNA"), ("DAPI", "DNA"), ("Concanavalin A", "ER"), ("ConA", "ER"),
    ("ConA-AF488", "ER"), ("SYTO 14", "RNA"), ("SYTO14", "RNA"), ("Phalloidin/WGA", "AGP"), ("WGA", "AGP"),
    ("Ph_golgi", "AGP"), ("golgi", "AGP"), ("MitoTracker Deep Red", "Mito"), ("Mito", "Mito"), ("ERSyto", "ER"),
    ("ERSytoBleed", "RNA"), ("OrigDNA", "DNA"), ("OrigPh_golgi", "AGP"),
    ("HoechstBleed", None), ("Alexa 488", None), ("AF647", None), ("FITC", None), ("488 nm", None),
    ("Brightfield", None), ("ER/RNA", None), ("Filter", None),
])
def test_dye_vocabulary(name, stain):
    assert canonical_stain(name) == stain


def test_no_names_says_so_and_shows_a_map_not_one_experiments_numbering(tmp_path):
    write_phenix(tmp_path, "lzw", fields=_fields(), names=None)
    with pytest.warns(CellClipWarning) as rec:
        df = read_plate(tmp_path)
    text = " ".join(str(w.message) for w in rec)
    assert "nothing names the stains" in text and "channels.json" in text and "numbering differs" in text
    assert "1=DNA,2=ER" not in text
    assert stains(df) == ["ch1", "ch2", "ch3", "ch4", "ch5"]
    with pytest.raises(PlateError, match="channels.json") as err:
        reorder_stains(df)
    assert "1=DNA,2=ER" not in str(err.value)


def test_vocabulary_mapping_is_listed_and_fluorophores_stay(tmp_path):
    names = ("HOECHST 33342", "Alexa 488", "SYTO 14", "Phalloidin/WGA", "MitoTracker Deep Red")
    write_phenix(tmp_path, "lzw", fields=_fields(), names=names)
    with pytest.warns(CellClipWarning) as rec:
        df = read_plate(tmp_path)
    text = " ".join(str(w.message) for w in rec)
    assert "'HOECHST 33342' → DNA" in text and "'MitoTracker Deep Red' → Mito" in text
    assert "ch2 'Alexa 488'" in text and "kept as Alexa488" in text
    assert stains(df) == ["DNA", "Alexa488", "RNA", "AGP", "Mito"]


@pytest.mark.parametrize("where", ["beside", "above"])
def test_channels_json_beside_or_above_the_plate(tmp_path, where):
    write_phenix(tmp_path, "lzw", fields=_fields(), names=None)
    folder = tmp_path / PLATE if where == "beside" else tmp_path
    (folder / "channels.json").write_text(json.dumps({"1": "Mito", "2": "AGP", "3": "RNA", "4": "ER", "5": "DNA"}))
    assert find_channel_map(tmp_path / PLATE / "Images") == folder / "channels.json"
    with pytest.warns(CellClipWarning, match=r"stains from the channel map .*channels.json: ch1 → Mito"):
        df = read_plate(tmp_path / PLATE)
    assert stains(df) == ["Mito", "AGP", "RNA", "ER", "DNA"]
    # an explicit map wins over the file
    assert stains(_quiet(read_plate, tmp_path / PLATE, channel_map="1=DNA,2=ER,3=RNA,4=AGP,5=Mito")) == STAINS


def test_channels_txt_and_a_broken_channel_map_file(tmp_path):
    write_phenix(tmp_path, "lzw", fields=_fields(), names=None)
    (tmp_path / "channels.txt").write_text("# from the acquisition protocol\n1=DNA\n2=ER\n3=RNA\n4=AGP\n5=Mito\n")
    assert stains(_quiet(read_plate, tmp_path / PLATE)) == STAINS
    (tmp_path / "channels.txt").unlink()
    (tmp_path / "channels.json").write_text("[1, 2]")
    with pytest.raises(PlateError, match="channels.json: not a JSON object"):
        read_plate(tmp_path / PLATE)


def test_rename_stains_relabels_a_table():
    from napari_cellclip.sample import sample_plate_dir

    df = read_plate(sample_plate_dir())
    out = rename_stains(df, {"DNA": "Hoechst"})
    assert stains(out) == ["Hoechst", "ER", "RNA", "AGP", "Mito"]
    assert out["FileName_OrigHoechst"].tolist() == df["FileName_OrigDNA"].tolist()
    numbered = df.rename(columns={c: c.replace("OrigER", "Origch2") for c in df.columns})
    assert stains(rename_stains(numbered, "2=ER")) == STAINS
    with pytest.raises(PlateError, match="no stain"):
        rename_stains(df, {"Actin": "AGP"})
    with pytest.raises(PlateError, match="same stain"):
        rename_stains(df, {"DNA": "ER"})


@pytest.mark.parametrize("name, expected", [
    ("r02c03f04", ("B03", 4)), ("B03_s2.ome.tiff", ("B03", 2)), ("B03-2", ("B03", 2)), ("B3_site12", ("B03", 12)),
    ("plate1_well_B03_field_2", ("B03", 2)), ("B03", ("B03", None)), ("AA01_s1", ("AA01", 1)),
    ("SQ00015198", None), ("Images", None), ("holiday", None),
])
def test_well_and_site_from_names(name, expected):
    assert parse_well_site(name) == expected


# ----------------------------------------------------------------------------- OME-TIFF


def test_ome_tiff_names_pixel_size_and_pixels(tmp_path):
    fields = _fields()
    write_ome_tiffs(tmp_path, fields=fields)
    with pytest.warns(CellClipWarning, match="OME-XML channel names by the dye vocabulary.*'HOECHST 33342' → DNA"):
        df = read_plate(tmp_path)
    assert stains(df) == STAINS and df["Metadata_Plate"].unique().tolist() == [PLATE]
    assert sorted(set(zip(df["Metadata_Well"], df["Metadata_Site"]))) == [("B03", 1), ("B03", 2), ("C05", 1),
                                                                          ("C05", 2)]
    assert df["Metadata_PixelSizeX"].tolist() == [0.656] * 4
    assert df["Frame_OrigMito"].tolist() == [4] * 4
    _assert_same_pixels(df, fields)
    # one file opens as a one-field plate
    one = _quiet(read_plate, tmp_path / PLATE / "C05_s2.ome.tiff")
    assert one[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["C05", 2]]


def test_ome_tiff_z_stack_is_max_projected_and_t_takes_the_first(tmp_path):
    fields = _fields(n_wells=1, sites=1)
    write_ome_tiffs(tmp_path, fields=fields, axes="ZCYX")
    with pytest.warns(CellClipWarning, match="2 Z planes per channel.*maximum-intensity projection"):
        df = read_plate(tmp_path)
    _assert_same_pixels(df, fields)  # the second plane is the brighter one
    img = fields[0][2]
    tcz = np.stack([img[:, None], (img // 3)[:, None]])  # T=2, C=5, Z=1
    tifffile.imwrite(tmp_path / "t.ome.tif", tcz, metadata={"axes": "TCZYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "t.ome.tif", 3), img[3])


def test_ome_tiff_position_from_the_ome_plate_metadata(tmp_path):
    img = _fields(n_wells=1, sites=1)[0][2]
    ox = tifffile.OmeXml()
    ox.addimage(img.dtype, img.shape, (5, 1, 1, *img.shape[1:], 1), axes="CYX", Channel={"Name": list(DYE_NAMES)})
    xml = ox.tostring().replace(
        "<Image ", '<Plate ID="Plate:0" Name="JCP-PLATE-7"><Well ID="Well:0" Row="3" Column="11">'
                   '<WellSample ID="WellSample:0" Index="4"><ImageRef ID="Image:9"/></WellSample>'
                   '<WellSample ID="WellSample:1" Index="5"><ImageRef ID="Image:0"/></WellSample>'
                   "</Well></Plate><Image ", 1)
    tifffile.imwrite(tmp_path / "export_0001.ome.tif", img, description=xml, metadata=None)
    df = _quiet(read_plate, tmp_path)
    assert df[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].values.tolist() == [["JCP-PLATE-7", "D12", 2]]
    np.testing.assert_array_equal(load_field(df.iloc[0], STAINS), img)


def test_ome_tiff_without_channel_names_or_position(tmp_path):
    fields = _fields(n_wells=1, sites=1)
    write_ome_tiffs(tmp_path, fields=fields, names=None)
    with pytest.warns(CellClipWarning, match=r"B03_s1.ome.tiff: nothing names the stains.*channels.json"):
        df = read_plate(tmp_path)
    assert stains(df) == ["ch1", "ch2", "ch3", "ch4", "ch5"]
    (tmp_path / PLATE / "B03_s1.ome.tiff").rename(tmp_path / PLATE / "field_one.ome.tiff")
    with pytest.raises(PlateError, match=r"cannot tell the well and field.*field_one.ome.tiff.*pattern"):
        _quiet(read_plate, tmp_path)
    (tmp_path / PLATE / "field_one.ome.tiff").rename(tmp_path / PLATE / "x_G02_7.ome.tiff")
    df = _quiet(read_plate, tmp_path, pattern=r"_(?P<well>[A-P]\d{2})_(?P<site>\d+)")
    assert df[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["G02", 7]]


def test_broken_ome_tiff_is_named(tmp_path):
    write_ome_tiffs(tmp_path, fields=_fields(n_wells=1, sites=1))
    f = tmp_path / PLATE / "B03_s1.ome.tiff"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ImageReadError, match="B03_s1.ome.tiff"):
        read_plate(tmp_path)


def test_pyramidal_ome_tiff_levels(tmp_path):
    img = _fields(n_wells=1, sites=1, shape=(64, 64))[0][2]
    path = tmp_path / "B03_s1.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=1, metadata={"axes": "CYX", "Channel": {"Name": list(DYE_NAMES)}})
        tw.write(img[:, ::2, ::2], subfiletype=1)
    assert pyramid_shapes(path) == [(64, 64), (32, 32)]
    np.testing.assert_array_equal(read_image(path, 2, level=1), img[2, ::2, ::2])
    with pytest.raises(ImageReadError, match="level 2 out of range"):
        read_image(path, 2, level=2)


# ----------------------------------------------------------------------------- OME-Zarr


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def zarr_plate(request, tmp_path_factory):
    fields = _fields(n_wells=3, sites=2, shape=(48, 64))
    path = write_ome_zarr(tmp_path_factory.mktemp(f"zarr{request.param}"), request.param, fields=fields)
    return request.param, path, fields


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / path.name
    shutil.copytree(path, dst)
    return dst


def _chunk_files(image: Path) -> list[Path]:
    """The chunk files of an image's full-resolution array."""
    from napari_cellclip.formats.ome_zarr import image_meta

    level0 = image / image_meta(image).datasets[0]
    files = [f for f in level0.rglob("*") if f.is_file() and f.name not in (".zarray", ".zattrs", "zarr.json")]
    assert files
    return sorted(files)


def test_ome_zarr_plate_fields_and_pixels(zarr_plate):
    version, path, fields = zarr_plate
    marker = "zarr.json" if version == "0.5" else ".zattrs"
    assert (path / marker).is_file()
    with pytest.warns(CellClipWarning, match="omero channel labels by the dye vocabulary"):
        df = read_plate(path)
    assert stains(df) == STAINS and df["Metadata_Plate"].unique().tolist() == [PLATE]
    assert df.groupby("Metadata_Well").size().to_dict() == {"B03": 2, "C05": 2, "D07": 2}
    assert df.loc[0, "FileName_OrigDNA"] == "B/3/0" and df.loc[0, "PathName_OrigDNA"] == str(path.resolve())
    assert df["Frame_OrigAGP"].tolist() == [3] * 6
    assert df["Metadata_PixelSizeX"].tolist() == [0.656] * 6  # from the scale transform, in micrometres
    _assert_same_pixels(df, fields)
    image = Path(df.loc[0, "PathName_OrigDNA"]) / df.loc[0, "FileName_OrigDNA"]
    assert pyramid_shapes(image) == [(48, 64), (24, 32)]
    assert read_image(image, 1, level=1).shape == (24, 32)
    # the parent folder of one or more plates reads them all
    assert len(_quiet(read_plate, path.parent)) == 6


def test_ome_zarr_opening_decodes_no_chunk(zarr_plate, tmp_path):
    _, path, _ = zarr_plate
    plate = _copy(path, tmp_path)
    for f in _chunk_files(plate / "B" / "3" / "0"):
        f.write_bytes(b"garbage")
    df = _quiet(read_plate, plate)  # reads metadata only
    assert len(df) == 6
    with pytest.raises(ImageReadError, match=r"B/3/0"):
        load_field(df.iloc[0], STAINS)
    assert load_field(df.iloc[1], STAINS).shape == (5, 48, 64)  # other fields unaffected


def test_ome_zarr_content_digest_keys_the_cache(zarr_plate, tmp_path):
    _, path, _ = zarr_plate
    plate = _copy(path, tmp_path)
    df = _quiet(read_plate, plate)
    row0, row1 = df.iloc[0], df.iloc[1]
    d0 = channel_digest(row0, "DNA")
    assert d0 == channel_digest(row0, "ER")  # the field's array, whatever the channel
    assert d0 != channel_digest(row1, "DNA")
    key0, key1 = field_cache_key(row0, STAINS, "enc"), field_cache_key(row1, STAINS, "enc")
    stamp = channel_stamp(plate / row0["FileName_OrigDNA"])
    chunk = _chunk_files(plate / "B" / "3" / "0")[0]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    os_stat = chunk.stat()
    os.utime(chunk, ns=(os_stat.st_atime_ns, os_stat.st_mtime_ns + 10**9))
    assert channel_digest(row0, "DNA") != d0
    assert field_cache_key(row0, STAINS, "enc") != key0 and field_cache_key(row1, STAINS, "enc") == key1
    assert channel_stamp(plate / row0["FileName_OrigDNA"]) != stamp


def test_ome_zarr_bad_metadata(zarr_plate, tmp_path):
    version, path, _ = zarr_plate
    plate = _copy(path, tmp_path)
    meta = "zarr.json" if version == "0.5" else ".zattrs"
    # a well whose metadata is corrupt is skipped by name; the rest is read
    (plate / "C" / "5" / meta).write_text("{not json")
    with pytest.warns(CellClipWarning, match=rf"skipped 1 well.*C/5/{re.escape(meta)}: corrupt zarr metadata"):
        df = read_plate(plate)
    assert sorted(df["Metadata_Well"].unique()) == ["B03", "D07"]
    # a field without omero channel labels: said, and channels stay numbered
    img_meta = plate / "B" / "3" / "0" / meta
    doc = json.loads(img_meta.read_text())
    attrs = doc["attributes"]["ome"] if version == "0.5" else doc
    attrs.pop("omero")
    img_meta.write_text(json.dumps(doc))
    with pytest.warns(CellClipWarning, match=r"no 'omero' channel labels"):
        df = read_plate(plate)
    assert stains(df) == ["ch1", "ch2", "ch3", "ch4", "ch5"]
    # corrupt plate metadata is an error naming the file
    (plate / meta).write_text("{")
    with pytest.raises(PlateError, match=rf"{re.escape(meta)}: corrupt zarr metadata"):
        read_plate(plate)
    with pytest.raises(PlateError, match="without HCS 'plate' metadata"):
        read_plate(plate / "B" / "3")


# ----------------------------------------------------------------------------- dye-named files


def test_bray_dye_folders(tmp_path):
    fields = _fields()
    write_dye_folders(tmp_path, fields=fields)
    (tmp_path / PLATE / "B03_s1" / "HoechstBleed.tif").write_bytes(
        (tmp_path / PLATE / "B03_s1" / "Hoechst.tif").read_bytes())
    with pytest.warns(CellClipWarning) as rec:
        df = read_plate(tmp_path)
    text = " ".join(str(w.message) for w in rec)
    assert "'ERSyto' → ER" in text and "'ERSytoBleed' → RNA" in text and "'Ph_golgi' → AGP" in text
    assert "'HoechstBleed'" in text  # an unknown bleed-through channel: kept, not merged
    assert stains(df) == STAINS + ["HoechstBleed"]
    assert len(df) == 1  # only B03 site 1 has the extra channel; the others are skipped by name
    assert "missing HoechstBleed" in text


def test_bray_dye_folders_well_then_site_and_unreadable_folder(tmp_path):
    fields = _fields(n_wells=1, sites=2)
    write_dye_folders(tmp_path, fields=fields)
    for _, s, _ in fields:
        (tmp_path / PLATE / f"B03_s{s}").rename(tmp_path / PLATE / f"B03_{s}")
    (tmp_path / PLATE / "B03").mkdir()
    for _, s, _ in fields:
        (tmp_path / PLATE / f"B03_{s}").rename(tmp_path / PLATE / "B03" / str(s))
    df = _quiet(read_plate, tmp_path)
    assert df[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].values.tolist() == [[PLATE, "B03", 1],
                                                                                        [PLATE, "B03", 2]]
    _assert_same_pixels(df, fields)
    # one dye file opens its field through the reader path
    from napari_cellclip._reader import read_fields

    one = _quiet(read_fields, str(tmp_path / PLATE / "B03" / "2" / "Mito.tif"))
    assert one[["Metadata_Well", "Metadata_Site"]].values.tolist() == [["B03", 2]]


def test_bray_per_dye_imagexpress_folders_are_one_plate(tmp_path):
    fields = _fields()
    for dye, ch in zip(("Hoechst", "ERSyto", "ERSytoBleed", "Ph_golgi", "Mito"), range(5)):
        folder = tmp_path / f"24277-{dye}"
        folder.mkdir()
        for well, site, img in fields:
            tifffile.imwrite(folder / f"cdp2bioactives_{well}_s{site}_w{ch + 1}.tif", img[ch], compression="lzw")
    with pytest.warns(CellClipWarning, match="'ERSytoBleed' → RNA"):
        df = read_plate(tmp_path)
    assert stains(df) == STAINS and df["Metadata_Plate"].unique().tolist() == ["24277"]
    _assert_same_pixels(df, fields)


def test_imagexpress_htd_wave_names(tmp_path):
    fields = _fields()
    for well, site, img in fields:
        for ch in range(5):
            tifffile.imwrite(tmp_path / f"PLATE9_{well}_s{site}_w{ch + 1}.tif", img[ch])
    (tmp_path / "PLATE9.HTD").write_text('"HTSInfoFile", Version 1.0\n' + "".join(
        f'"WaveName{i}", "{n}"\n' for i, n in enumerate(("DAPI", "ConA", "SYTO14", "WGA", "MitoTracker"), 1)))
    with pytest.warns(CellClipWarning, match=r"the \.HTD file by the dye vocabulary.*'DAPI' → DNA"):
        df = read_plate(tmp_path)
    assert stains(df) == STAINS
    _assert_same_pixels(df, fields)


# ----------------------------------------------------------------------------- folders


def test_mixed_layouts_are_refused_by_name(tmp_path):
    write_phenix(tmp_path, "lzw", fields=_fields(n_wells=1, sites=1))
    write_ome_tiffs(tmp_path / "more", fields=_fields(n_wells=1, sites=1))
    with pytest.raises(PlateError, match=r"mixes layouts: ome-tiff \(1, e.g. more/.*B03_s1.ome.tiff\); phenix"):
        read_plate(tmp_path)
    assert len(_quiet(read_plate, tmp_path, layout="ome-tiff")) == 1


def test_unrecognised_images_are_skipped_by_name(tmp_path):
    write_phenix(tmp_path, "lzw", fields=_fields(n_wells=1, sites=1))
    tifffile.imwrite(tmp_path / PLATE / "Images" / "overview.tif", np.zeros((4, 4), np.uint8))
    with pytest.warns(CellClipWarning, match=r"1 image file\(s\) with unrecognised names skipped.*overview.tif"):
        read_plate(tmp_path)


def test_unknown_layout_name(tmp_path):
    with pytest.raises(PlateError, match="unknown layout 'zarr'"):
        read_plate(tmp_path, layout="zarr")


def test_a_table_of_any_format_round_trips_through_load_data(tmp_path, zarr_plate):
    from napari_cellclip.plates import write_load_data

    _, path, fields = zarr_plate
    df = _quiet(read_plate, path)
    again = read_plate(write_load_data(df, tmp_path / "manifest.csv"))
    cols = [c for c in df.columns if c.startswith(("FileName", "PathName", "Metadata_Well", "Metadata_Plate"))]
    pd.testing.assert_frame_equal(df[cols], again[cols])
    _assert_same_pixels(again, fields)


def test_load_data_with_dye_named_stains(tmp_path):
    """A LoadData CSV naming stains by dye (cpg0012 / Bray: OrigHoechst, OrigSyto, OrigPh_golgi …)."""
    from napari_cellclip.sample import sample_plate_dir

    src = pd.read_csv(sample_plate_dir() / "load_data.csv", dtype=str)
    dyes = {"DNA": "Hoechst", "ER": "ER", "RNA": "Syto", "AGP": "Ph_golgi", "Mito": "Mito"}
    src = src.rename(columns={f"{p}_Orig{s}": f"{p}_Orig{d}" for s, d in dyes.items()
                              for p in ("FileName", "PathName")})
    for c in src.columns:
        if c.startswith("PathName"):
            src[c] = str(sample_plate_dir())
    src.to_csv(tmp_path / "load_data.csv", index=False)
    with pytest.warns(CellClipWarning, match=r"LoadData stain names are dye names.*'Hoechst' → DNA.*'Syto' → RNA"):
        df = read_plate(tmp_path / "load_data.csv")
    assert stains(df) == STAINS
    assert df["FileName_OrigAGP"].tolist() == src["FileName_OrigPh_golgi"].tolist()
