"""Batched feature extraction with the on-disk cache (real bundled fields, copied to tmp_path)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from napari_cellclip.encoders.morphology import MorphologyEncoder
from napari_cellclip.errors import Cancelled, CellClipWarning, ImageReadError
from napari_cellclip.features import default_cache_dir, extract_features, field_cache_key

N_FIELDS = 4


class CountingEncoder(MorphologyEncoder):
    """Morphology on a small working size, counting the fields it encodes."""

    def __init__(self, size=64):
        super().__init__(device="cpu", size=size)
        self.calls = 0
        self.fields = 0

    def encode(self, x):
        self.calls += 1
        self.fields += x.shape[0]
        return super().encode(x)


@pytest.fixture
def plate(tmp_path):
    """The first fields of the bundled plate, copied (so files can be changed) and re-read."""
    from napari_cellclip.plates import read_plate, stains
    from napari_cellclip.sample import sample_plate_dir

    src = read_plate(sample_plate_dir()).iloc[:N_FIELDS].reset_index(drop=True)
    dst = tmp_path / "plate"
    dst.mkdir()
    fields = src.copy()
    for s in stains(src):
        for _, row in src.iterrows():
            shutil.copy(f"{row[f'PathName_Orig{s}']}/{row[f'FileName_Orig{s}']}", dst / row[f"FileName_Orig{s}"])
        fields[f"PathName_Orig{s}"] = str(dst)
    return fields


class WholeFieldEncoder(CountingEncoder):
    """Takes whole normalised fields (the base preparation), so fields keep their own shapes."""

    def field_prep(self, stains=None, *, low=1.0, high=99.9):
        from napari_cellclip.encoders.base import FieldPrep

        return FieldPrep(low, high)


def _path(fields, pos, stain="DNA"):
    row = fields.iloc[pos]
    return f"{row[f'PathName_Orig{stain}']}/{row[f'FileName_Orig{stain}']}"


def test_extract_and_cache_hit(plate, tmp_path):
    enc = CountingEncoder()
    calls = []
    res = extract_features(plate, enc, cache_dir=tmp_path / "cache", batch_size=3,
                           progress=lambda d, n: calls.append((d, n)))
    assert res.features.shape == (N_FIELDS, 5, enc.dim) and res.features.dtype == np.float32
    assert res.index.tolist() == list(range(N_FIELDS)) and res.index.dtype == np.int64
    assert res.skipped == [] and res.stains == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert enc.fields == N_FIELDS and enc.calls == 2 and res.n_encoded == N_FIELDS
    assert calls[0] == (0, N_FIELDS) and calls[-1] == (N_FIELDS, N_FIELDS)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == N_FIELDS and not list((tmp_path / "cache").rglob("*.tmp"))
    assert (entries[0].parent.parent / "encoder.json").is_file()

    res2 = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    assert enc.fields == N_FIELDS  # nothing re-encoded
    assert res2.n_cached == N_FIELDS and res2.n_encoded == 0
    np.testing.assert_array_equal(res2.features, res.features)

    # same numbers as encoding directly
    from napari_cellclip.images import load_field_normalized

    x = torch.from_numpy(load_field_normalized(plate.iloc[1], res.stains))[None]
    np.testing.assert_allclose(res.features[1], enc.encode(x)[0].numpy(), atol=1e-5)


def test_cache_key_changes_with_encoder_and_content(plate, tmp_path):
    stains = ["DNA", "ER", "RNA", "AGP", "Mito"]
    row = plate.iloc[0]
    k = field_cache_key(row, stains, "enc-a")
    assert k == field_cache_key(row, stains, "enc-a")
    assert k != field_cache_key(row, stains, "enc-b")
    assert k != field_cache_key(row, stains[::-1], "enc-a")
    assert k != field_cache_key(row, stains, "enc-a", low=2.0)

    cache = tmp_path / "cache"
    enc = CountingEncoder()
    extract_features(plate, enc, cache_dir=cache)
    other = CountingEncoder(size=96)  # other identity → all fields again
    assert other.identity != enc.identity
    extract_features(plate, other, cache_dir=cache)
    assert other.fields == N_FIELDS

    # change the pixels of one file → only that field is encoded again
    p = _path(plate, 2)
    img = np.array(Image.open(p))
    img[:10, :10] = 255 - img[:10, :10]
    Image.fromarray(img).save(p)
    assert field_cache_key(plate.iloc[2], stains, enc.identity) != field_cache_key(row, stains, enc.identity)
    before = enc.fields
    res = extract_features(plate, enc, cache_dir=cache)
    assert enc.fields - before == 1 and res.n_cached == N_FIELDS - 1


def test_corrupt_field_is_skipped(plate, tmp_path):
    p = _path(plate, 1, "RNA")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 3])  # truncated PNG
    enc = CountingEncoder()
    with pytest.warns(CellClipWarning, match=plate.iloc[1]["FileName_OrigRNA"]):
        res = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    assert res.index.tolist() == [0, 2, 3]
    assert [pos for pos, _ in res.skipped] == [1] and plate.iloc[1]["FileName_OrigRNA"] in res.skipped[0][1]
    assert res.features.shape == (3, 5, enc.dim)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3

    # a missing file is skipped the same way (the cache key cannot be computed)
    import os

    os.remove(_path(plate, 3, "Mito"))
    with pytest.warns(CellClipWarning) as record:
        res = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    assert any("file not found" in str(w.message) for w in record)
    assert res.index.tolist() == [0, 2] and [pos for pos, _ in res.skipped] == [1, 3]


def test_all_fields_corrupt_raises(plate, tmp_path):
    for pos in range(N_FIELDS):
        p = _path(plate, pos)
        open(p, "wb").write(b"\x89PNG\r\n\x1a\nbroken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        with pytest.raises(ImageReadError, match=f"none of the {N_FIELDS} fields could be read"):
            extract_features(plate, CountingEncoder(), cache_dir=tmp_path / "cache")


def test_cancel_leaves_only_complete_entries(plate, tmp_path):
    enc = CountingEncoder()
    seen = []

    def stop():
        return len(seen) >= 2  # after the first batch has been reported

    with pytest.raises(Cancelled):
        extract_features(plate, enc, cache_dir=tmp_path / "cache", batch_size=1,
                         progress=lambda d, n: seen.append(d), should_stop=stop)
    assert enc.fields == 1
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != "encoder.json"]
    assert len(files) == 1 and files[0].suffix == ".npy"
    assert np.load(files[0], allow_pickle=False).shape == (5, enc.dim)
    # the next run picks up where it stopped
    res = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    assert res.n_cached == 1 and enc.fields == N_FIELDS


def test_corrupt_cache_entry_is_recomputed(plate, tmp_path):
    enc = CountingEncoder()
    ref = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    entry = sorted((tmp_path / "cache").rglob("*.npy"))[0]
    entry.write_bytes(b"garbage")
    res = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    assert res.n_encoded == 1
    np.testing.assert_allclose(res.features, ref.features, atol=1e-6)


def test_mixed_shapes_workers_and_no_cache(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(64, 64), (80, 96), (64, 64)]):
        row = {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": i + 1}
        for s in ("DNA", "ER"):
            name = f"f{i}_{s}.png"
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(tmp_path / name)
            row[f"FileName_Orig{s}"], row[f"PathName_Orig{s}"] = name, str(tmp_path)
        rows.append(row)
    fields = pd.DataFrame(rows)
    enc = WholeFieldEncoder()
    res = extract_features(fields, enc, batch_size=3, use_cache=False)
    assert res.features.shape == (3, 2, enc.dim) and enc.calls == 2  # one call per shape group
    res_w = extract_features(fields, CountingEncoder(), batch_size=2, num_workers=2, cache_dir=tmp_path / "c")
    np.testing.assert_allclose(res_w.features, res.features, atol=1e-6)
    assert res_w.index.tolist() == [0, 1, 2]
    morph = CountingEncoder()  # its preparation resamples every field to the working size in the worker
    np.testing.assert_allclose(extract_features(fields, morph, batch_size=3, use_cache=False).features,
                               res.features, atol=1e-6)
    assert morph.calls == 1


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_CELLCLIP_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("NAPARI_CELLCLIP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "napari-cellclip" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().parts[-3:] == (".cache", "napari-cellclip", "features")


# ---------------------------------------------------------------- plate normalisation
def _two_plate_table(tmp_path):
    """2 plates × 3 fields of 2 uint16 channels; field k of a plate is (k + 1) × as bright."""
    import tifffile

    rng = np.random.default_rng(0)
    rows = []
    for p, gain in (("P1", 1.0), ("P2", 3.0)):
        for k in range(3):
            rec = {"Metadata_Plate": p, "Metadata_Well": f"A{k + 1:02d}", "Metadata_Site": 1}
            for c, s in enumerate(("DNA", "ER")):
                img = (rng.gamma(2.0, 50.0, (40, 40)) * (k + 1) * gain * (c + 1)).clip(0, 65535).astype(np.uint16)
                name = f"{p}_{k}_{s}.tif"
                tifffile.imwrite(tmp_path / name, img)
                rec[f"FileName_Orig{s}"], rec[f"PathName_Orig{s}"] = name, str(tmp_path)
            rows.append(rec)
    return pd.DataFrame(rows)


def test_plate_ranges_keep_intensity_differences_within_a_plate(tmp_path):
    from napari_cellclip.images import (PLATE_SAMPLE_STRIDE, field_ranges, load_field, load_field_normalized,
                                        normalize_range, plate_ranges)

    fields = _two_plate_table(tmp_path)
    stains = ["DNA", "ER"]
    ranges = plate_ranges(fields, stains)
    assert set(ranges) == {"P1", "P2"} and ranges["P1"].shape == (2, 2)
    k = PLATE_SAMPLE_STRIDE  # every k-th pixel in y and x of each sampled field
    pix = np.concatenate([load_field(fields.iloc[i], stains)[:, ::k, ::k].reshape(2, -1) for i in range(3)],
                         axis=1)
    np.testing.assert_allclose(ranges["P1"], np.percentile(pix.astype(np.float32), [1, 99.9], axis=1).T,
                               rtol=1e-5)
    # P2 is 3x as bright: its range scales with it, so the same field position maps alike
    np.testing.assert_allclose(ranges["P2"][:, 1] / ranges["P1"][:, 1], 3.0, rtol=0.15)
    per_row = field_ranges(fields, stains, "plate")
    assert all(np.array_equal(r, ranges[p]) for r, p in zip(per_row, fields["Metadata_Plate"]))
    assert field_ranges(fields, stains, "field") == [None] * 6
    bright = [normalize_range(load_field(fields.iloc[i], stains), per_row[i]).mean() for i in range(3)]
    assert bright[0] < bright[1] < bright[2]  # the plate's dim field stays dim
    own = [load_field_normalized(fields.iloc[i], stains).mean() for i in range(3)]
    assert max(own) - min(own) < 0.25 * (bright[2] - bright[0])  # per-field percentiles erase it


def test_plate_ranges_subsample_big_fields(tmp_path, monkeypatch):
    import napari_cellclip.images as images

    fields = _two_plate_table(tmp_path)  # 40 x 40 fields
    seen = []
    real = np.percentile
    monkeypatch.setattr(images, "PLATE_SAMPLE_PIXELS", 100)  # a 40x40 field is now "big": stride 4
    monkeypatch.setattr(images.np, "percentile", lambda a, *k, **kw: seen.append(a.shape) or real(a, *k, **kw))
    images.plate_ranges(fields.iloc[:3], ["DNA", "ER"])
    assert seen == [(2, 3 * 10 * 10)]


def test_plate_ranges_skip_unreadable_fields_and_bad_name(tmp_path):
    from napari_cellclip.errors import CellClipError
    from napari_cellclip.images import field_ranges, plate_ranges

    fields = _two_plate_table(tmp_path)
    (tmp_path / fields.loc[0, "FileName_OrigDNA"]).write_bytes(b"not a tiff")
    r = plate_ranges(fields, ["DNA", "ER"])
    assert set(r) == {"P1", "P2"}  # P1 from its 2 readable fields
    with pytest.raises(CellClipError, match="normalization"):
        field_ranges(fields, ["DNA", "ER"], "well")


def test_extract_features_with_plate_normalisation(tmp_path):
    import torch

    from napari_cellclip.images import load_field, normalize_range, plate_ranges

    fields = _two_plate_table(tmp_path)
    enc = CountingEncoder()
    by_field = extract_features(fields, enc, cache_dir=tmp_path / "cache")
    by_plate = extract_features(fields, enc, cache_dir=tmp_path / "cache", normalization="plate")
    assert enc.fields == 12  # different cache entries: nothing reused across normalisations
    again = extract_features(fields, enc, cache_dir=tmp_path / "cache", normalization="plate")
    assert enc.fields == 12
    np.testing.assert_array_equal(again.features, by_plate.features)
    ranges = plate_ranges(fields, ["DNA", "ER"])
    x = normalize_range(load_field(fields.iloc[4], ["DNA", "ER"]), ranges["P2"])
    want = enc.encode(torch.from_numpy(x)[None]).numpy()[0]
    np.testing.assert_allclose(by_plate.features[4], want, atol=1e-5)
    assert not np.allclose(by_plate.features, by_field.features)


def test_plate_ranges_are_cached_by_sampled_file_content(tmp_path, monkeypatch):
    import napari_cellclip.images as images

    fields = _two_plate_table(tmp_path)
    calls = []
    real = images.sample_range
    monkeypatch.setattr(images, "sample_range",
                        lambda f, rows, *a, **k: calls.append(len(rows)) or real(f, rows, *a, **k))
    enc = CountingEncoder()
    first = extract_features(fields, enc, cache_dir=tmp_path / "cache", normalization="plate")
    assert calls == [3, 3]  # one sample per plate
    assert len(list((tmp_path / "cache" / "plate-ranges").rglob("*.npy"))) == 2
    again = extract_features(fields, enc, cache_dir=tmp_path / "cache", normalization="plate")
    assert calls == [3, 3] and enc.fields == 6  # neither the ranges nor the features recomputed
    np.testing.assert_array_equal(again.features, first.features)
    # a changed file in P2's sample: P2's range (and its fields' features) are recomputed
    img = np.full((40, 40), 7, np.uint16)
    import tifffile

    tifffile.imwrite(tmp_path / fields.loc[4, "FileName_OrigER"], img)
    extract_features(fields, enc, cache_dir=tmp_path / "cache", normalization="plate")
    assert calls == [3, 3, 3] and enc.fields == 9
    extract_features(fields, enc, use_cache=False, normalization="plate")
    assert calls == [3, 3, 3, 3, 3]


def test_damaged_cache_entry_is_recomputed_and_named(plate, tmp_path):
    """Issue 12: a flipped bit in a cache entry was served as features; now it fails its checksum,
    is named in a warning and recomputed (an entry without a checksum is recomputed quietly)."""
    from napari_cellclip.errors import CellClipWarning

    enc = CountingEncoder()
    res = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    raw = bytearray(entries[0].read_bytes())
    raw[len(raw) // 2] ^= 0x04
    entries[0].write_bytes(bytes(raw))
    np.save(entries[1], np.load(entries[1]))  # an old-style entry: no checksum
    with pytest.warns(CellClipWarning, match=f"{entries[0]}.*checksum.*recomputed") as got:
        res2 = extract_features(plate, enc, cache_dir=tmp_path / "cache")
    assert not any(str(entries[1]) in str(w.message) for w in got)
    assert res2.n_encoded == 2 and res2.n_cached == N_FIELDS - 2
    np.testing.assert_allclose(res2.features, res.features, atol=1e-6)
    res3 = extract_features(plate, enc, cache_dir=tmp_path / "cache")  # both rewritten with checksums
    assert res3.n_cached == N_FIELDS
