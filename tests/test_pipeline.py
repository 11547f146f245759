"""Streaming sharded embedding job: kill/resume, rank sharding, the shared feature cache, plate ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from napari_cellclip import model as model_mod
from napari_cellclip import pipeline
from napari_cellclip.errors import CellClipError, CellClipWarning
from napari_cellclip.store import EmbeddingStore

STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]
REPO = Path(__file__).resolve().parents[1]
#: a small morphology working size keeps these tests fast (the default 256 costs ~0.5 s per field here);
#: no feature cache, so that a resumed job recomputes exactly what was not done (the cache has its own tests)
OPT = {"encoder_options": {"size": 64}, "cache_dir": False}
CLI_OPT = ["--encoder-option", "size=64", "--no-cache"]


@pytest.fixture(autouse=True)
def _quiet_option_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="encoder options")
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (OpenMP spin-waits cost 100x on a busy 2-core CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """Two synthetic plates × 6 fields of 5 × 96×96 uint16 TIFFs, as a fields parquet."""
    d = tmp_path_factory.mktemp("plates")
    rng = np.random.default_rng(0)
    rows = []
    for p in ("P1", "P2"):
        for i in range(6):
            well, site = f"A{i // 2 + 1:02d}", i % 2 + 1
            rec = {"Metadata_Plate": p, "Metadata_Well": well, "Metadata_Site": site,
                   "Metadata_is_control": well == "A01",
                   "Metadata_control_type": "negcon" if well == "A01" else ""}
            for c, s in enumerate(STAINS):
                img = rng.gamma(1.0 + c, 300 + 100 * i, (96, 96)).clip(0, 65535).astype(np.uint16)
                name = f"{p}_{well}_s{site}_{s}.tif"
                tifffile.imwrite(d / name, img)
                rec[f"FileName_Orig{s}"], rec[f"PathName_Orig{s}"] = name, str(d)
            rows.append(rec)
    path = d / "fields.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_bert_dir) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = model_mod.CellCLIPConfig(
        embed_dim=16, vision_width=128, vision_layers=1, vision_heads=2, input_channels=5, context_length=64,
        text_encoder=str(tiny_bert_dir), text_pooling="mean", image_encoder="morphology",
        feature_correction={"method": "center_scale"})
    return model_mod.CellCLIP(cfg).eval().save_pretrained(d / "model")


@pytest.fixture(scope="module")
def reference(plate, checkpoint, tmp_path_factory) -> EmbeddingStore:
    out = tmp_path_factory.mktemp("ref") / "job"
    s = pipeline.run_job(plate, checkpoint, out, shard_size=2, batch_size=2, workers=1, device="cpu",
                         quiet=True, **OPT)
    assert s["shards_computed"] == 6 and s["n_embedded"] == 12
    return EmbeddingStore.load(out)


def _cli(args, env=None, **kw):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "napari_cellclip.pipeline", *map(str, args)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_matches_embed_fields(plate, checkpoint, reference):
    from napari_cellclip.embed import embed_fields, load_model

    fields = pd.read_parquet(plate)
    from napari_cellclip.encoders import get_encoder

    st = embed_fields(fields, load_model(checkpoint, device="cpu"), device="cpu", cache_dir=False,
                      encoder=get_encoder("morphology", device="cpu", size=64))
    np.testing.assert_allclose(reference.embeddings, st.embeddings, atol=1e-5)
    assert list(reference.fields["Metadata_Well"]) == list(st.fields["Metadata_Well"])
    assert reference.model_id == st.model_id
    # the wells: each well's fields pooled by the model, in both
    assert reference.has_model_wells and st.has_model_wells
    wj, wp = reference.well_level(), st.well_level()
    np.testing.assert_allclose(wj.embeddings, wp.embeddings, atol=1e-5)
    pd.testing.assert_frame_equal(wj.fields, wp.fields)
    assert list(wj.fields["Metadata_n_fields"]) == [2] * 6


def test_plate_normalisation_matches_embed_fields(plate, checkpoint, reference, tmp_path):
    """A checkpoint trained on plate-normalised inputs embeds the same way in the job and the plugin."""
    from napari_cellclip.embed import embed_fields, load_model
    from napari_cellclip.encoders import get_encoder

    m = model_mod.CellCLIP.from_pretrained(checkpoint)
    m.config.input_normalization = "plate"
    ck = m.save_pretrained(tmp_path / "plate-model")
    out = tmp_path / "job"
    s = pipeline.run_job(plate, ck, out, shard_size=4, batch_size=2, workers=1, device="cpu", quiet=True, **OPT)
    job = EmbeddingStore.load(out)
    assert json.loads((out / "job.json").read_text())["input_normalization"] == "plate"
    st = embed_fields(pd.read_parquet(plate), load_model(ck, device="cpu"), device="cpu", cache_dir=False,
                      encoder=get_encoder("morphology", device="cpu", size=64))
    assert s["n_embedded"] == 12 and st.info["input_normalization"] == "plate"
    np.testing.assert_allclose(job.embeddings, st.embeddings, atol=1e-5)
    assert not np.allclose(job.embeddings, reference.embeddings, atol=1e-3)


def test_kill_and_resume(plate, checkpoint, reference, tmp_path):
    out = tmp_path / "job"
    p = _cli(["--data", plate, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", "--shard-size", 2,
              "--batch-size", 2, "--workers", 1, "--stop-after-shards", 2, *CLI_OPT])
    _, err = p.communicate(timeout=120)
    assert p.returncode == -9, err  # SIGKILLed mid-job
    feat = out / "shards" / "features"
    done = sorted(feat.glob("shard-*.json"))
    assert len(done) == 2 and not (out / "store.json").exists()
    mtimes = {f: f.stat().st_mtime_ns for f in feat.iterdir()}

    with pytest.raises(CellClipError, match="--resume"):
        pipeline.run_job(plate, checkpoint, out, shard_size=2, batch_size=2, workers=1, device="cpu",
                         quiet=True, **OPT)
    with pytest.raises(CellClipError, match="different inputs"):
        pipeline.run_job(plate, checkpoint, out, shard_size=3, resume=True, device="cpu", quiet=True, **OPT)

    s = pipeline.run_job(plate, checkpoint, out, shard_size=2, batch_size=2, workers=1, device="cpu",
                         resume=True, quiet=True, **OPT)
    assert s["shards_resumed"] == 2 and s["shards_computed"] == 4 and s["fields_encoded"] == 8
    for f, t in mtimes.items():  # finished shards were not rewritten
        assert f.stat().st_mtime_ns == t, f
    st = EmbeddingStore.load(out)
    np.testing.assert_array_equal(st.embeddings, reference.embeddings)
    pd.testing.assert_frame_equal(st.fields, reference.fields)

    # a finished job resumed again recomputes nothing
    s2 = pipeline.run_job(plate, checkpoint, out, shard_size=2, batch_size=2, workers=0, device="cpu",
                          resume=True, quiet=True, **OPT)
    assert s2["shards_computed"] == 0 and s2["units_computed"] == 0


def test_two_ranks_shard_the_fields(plate, checkpoint, reference, tmp_path):
    out = tmp_path / "job"
    args = ["--data", plate, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", "--shard-size", 2,
            "--batch-size", 2, "--workers", 0, "--json", "--wait-timeout", 120, *CLI_OPT]
    procs = [_cli(args, env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e
    summaries = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert [s["shards_computed"] for s in summaries] == [3, 3]
    st = EmbeddingStore.load(out)
    np.testing.assert_allclose(st.embeddings, reference.embeddings, atol=1e-6)
    pd.testing.assert_frame_equal(st.fields, reference.fields)


def test_unreadable_field_is_skipped(plate, checkpoint, tmp_path):
    fields = pd.read_parquet(plate)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    fields.loc[3, "FileName_OrigER"], fields.loc[3, "PathName_OrigER"] = bad.name, str(tmp_path)
    with pytest.warns(CellClipWarning, match="bad.tif"):
        s = pipeline.run_job(fields, checkpoint, tmp_path / "job", shard_size=4, workers=0, device="cpu",
                             quiet=True, **OPT)
    st = EmbeddingStore.load(tmp_path / "job")
    assert s["n_embedded"] == 11 and len(st) == 11
    assert st.info["skipped"][0][0] == 3 and "bad.tif" in st.info["skipped"][0][1]


def test_the_job_and_the_plugin_share_the_feature_cache(plate, checkpoint, reference, tmp_path, monkeypatch):
    """Defect: the job did not reuse the features the plugin and training cached (nor fill the cache)."""
    from napari_cellclip.embed import embed_fields, load_model
    from napari_cellclip.encoders import get_encoder
    from napari_cellclip.features import extract_features

    cache = tmp_path / "cache"
    enc = get_encoder("morphology", device="cpu", size=64)
    fields = pd.read_parquet(plate)
    st = embed_fields(fields, load_model(checkpoint, device="cpu"), device="cpu", cache_dir=cache, encoder=enc)
    opt = dict(OPT, cache_dir=cache)
    s = pipeline.run_job(plate, checkpoint, tmp_path / "job", shard_size=4, batch_size=2, workers=1, device="cpu",
                         quiet=True, **opt)
    assert s["fields_encoded"] == 0 and s["fields_cached"] == 12  # nothing decoded or encoded again
    job = EmbeddingStore.load(tmp_path / "job")
    np.testing.assert_allclose(job.embeddings, st.embeddings, atol=1e-6)
    # ... and the other way round: a job's features are the plugin's, bit for bit
    cache2 = tmp_path / "cache2"
    s2 = pipeline.run_job(plate, checkpoint, tmp_path / "job2", shard_size=4, batch_size=2, workers=1, device="cpu",
                          quiet=True, **dict(OPT, cache_dir=cache2))
    assert s2["fields_encoded"] == 12
    res = extract_features(fields, enc, cache_dir=cache2)
    assert res.n_cached == 12 and res.n_encoded == 0
    shards = sorted((tmp_path / "job2" / "shards" / "features").glob("shard-?????.npy"))
    shard = np.concatenate([np.load(f) for f in shards])
    np.testing.assert_array_equal(shard, res.features)  # both plates' rows in table order here


def test_plate_ranges_are_sampled_once_per_job(plate, checkpoint, tmp_path, monkeypatch):
    """Defect: the job re-sampled every plate's intensity range on each start, resume and rank."""
    from napari_cellclip import images

    m = model_mod.CellCLIP.from_pretrained(checkpoint)
    m.config.input_normalization = "plate"
    ck = m.save_pretrained(tmp_path / "plate-model")
    calls = []
    real = images.sample_range
    monkeypatch.setattr(images, "sample_range",
                        lambda f, rows, *a, **k: calls.append(len(rows)) or real(f, rows, *a, **k))
    out = tmp_path / "job"
    pipeline.run_job(plate, ck, out, shard_size=4, batch_size=2, workers=0, device="cpu", quiet=True, **OPT)
    assert calls == [6, 6]  # once per plate
    meta = json.loads((out / "job.json").read_text())
    assert sorted(meta["plate_ranges"]) == ["P1", "P2"] and np.asarray(meta["plate_ranges"]["P1"]).shape == (5, 2)
    (out / "store.json").unlink()
    for f in (out / "shards" / "embeddings").glob("unit-00001*"):
        f.unlink()
    s = pipeline.run_job(plate, ck, out, shard_size=4, batch_size=2, workers=0, device="cpu", quiet=True,
                         resume=True, **OPT)
    assert calls == [6, 6] and s["units_computed"] == 1  # the resumed job reads them from job.json
    # with the feature cache, a new job of the same plates takes them from the cache
    opt = dict(OPT, cache_dir=tmp_path / "cache")
    pipeline.run_job(plate, ck, tmp_path / "a", shard_size=4, workers=0, device="cpu", quiet=True, **opt)
    pipeline.run_job(plate, ck, tmp_path / "b", shard_size=4, workers=0, device="cpu", quiet=True, **opt)
    assert calls == [6, 6, 6, 6]


def test_damaged_shards_are_detected_and_computed_again(plate, checkpoint, reference, tmp_path):
    """Issue 12: a shard cut short (which made every --resume crash) or with one flipped bit (which was
    served as data) fails its checksum on resume, is named in a warning and is computed again."""
    from napari_cellclip.errors import CellClipWarning

    out = tmp_path / "job"
    pipeline.run_job(plate, checkpoint, out, shard_size=2, batch_size=2, workers=0, device="cpu", quiet=True, **OPT)
    cut = out / "shards" / "features" / "shard-00001.npy"
    cut.write_bytes(cut.read_bytes()[:200])
    flip = out / "shards" / "embeddings" / "unit-00000.npy"
    raw = bytearray(flip.read_bytes())
    raw[200] ^= 0x10  # inside the array data: np.load alone would serve it
    flip.write_bytes(bytes(raw))
    with pytest.warns(CellClipWarning) as got:
        s = pipeline.run_job(plate, checkpoint, out, shard_size=2, batch_size=2, workers=0, device="cpu",
                             resume=True, quiet=True, **OPT)
    said = [str(w.message) for w in got if "damaged" in str(w.message)]
    assert any("features shard 1" in m and str(cut) in m for m in said), said
    assert any("embeddings shard 0" in m and str(flip) in m for m in said), said
    assert s["shards_computed"] == 1 and s["units_computed"] == 1
    st = EmbeddingStore.load(out)
    np.testing.assert_array_equal(st.embeddings, reference.embeddings)


def test_damaged_shard_read_later_is_an_error_not_data(plate, checkpoint, tmp_path):
    from napari_cellclip.errors import CorruptFileError

    out = tmp_path / "job"
    pipeline.run_job(plate, checkpoint, out, shard_size=4, batch_size=2, workers=0, device="cpu", quiet=True, **OPT)
    f = out / "shards" / "features" / "shard-00000.npy"
    raw = bytearray(f.read_bytes())
    raw[-40] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="shard-00000.npy.*checksum"):
        pipeline._read_part(out, "features", 0)
