"""training/: prompt-distinct batching, metrics, CLI errors, fit/resume, default sample run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.errors import CellClipError, CellClipWarning

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, vision_layers=1, vision_heads=4, quiet=True, no_progress=True)


def _env(cache):
    env = dict(os.environ)
    env["NAPARI_CELLCLIP_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ----------------------------------------------------------------------- sampler
def test_distinct_prompt_batches_cover_every_well_once():
    from training.data import DistinctPromptBatchSampler, n_batches

    rng = np.random.default_rng(0)
    pids = rng.choice(6, size=57, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    s = DistinctPromptBatchSampler(pids, 4, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == n_batches(pids, 4)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(len(pids)))  # every well exactly once
        for b in batches:
            assert len(set(pids[b].tolist())) == len(b)  # no prompt twice in a batch
            assert 1 <= len(b) <= 4
        sizes = [len(b) for b in batches]
        assert max(sizes) - min(sizes) <= 1  # balanced
    s.set_epoch(0)
    e0 = [b.tolist() for b in s]
    s.set_epoch(1)
    assert [b.tolist() for b in s] != e0  # reshuffled per epoch
    s.set_epoch(0, start=2)
    assert [b.tolist() for b in s] == e0[2:]  # resumable mid-epoch


def test_batch_size_capped_at_distinct_prompts_and_ddp_shards():
    from training.data import DistinctPromptBatchSampler

    pids = np.array([0, 0, 0, 0, 1, 1, 2, 2])  # LINCS-like: DMSO in half the wells
    with pytest.warns(CellClipWarning, match="capped at 3"):
        s = DistinctPromptBatchSampler(pids, 64)
    assert s.batch_size == 3
    assert [len(b) for b in s] == [2, 2, 2, 2]
    shards = [DistinctPromptBatchSampler(pids, 1, seed=5, rank=r, world_size=2, warn=False) for r in (0, 1)]
    glob = shards[0].global_batches(0)
    per = [list(sh) for sh in shards]
    assert len(per[0]) == len(per[1]) == len(glob)
    for g, a, b in zip(glob, *per):
        assert len(a) == len(b)
        assert sorted(np.concatenate([a, b]).tolist()) == sorted(g.tolist())
        assert len(set(pids[g].tolist())) == len(g)


def test_multipositive_batches_repeat_prompts_cover_every_well_and_shard():
    from training.data import ShuffledBatchSampler, make_batch_sampler

    pids = np.array([0] * 8 + [1] * 4 + [2] * 4)  # 16 wells, 3 prompts
    s = make_batch_sampler("multipositive", pids, 6, seed=2)
    assert isinstance(s, ShuffledBatchSampler) and s.batch_size == 6 and len(s) == 3
    repeats = False
    for epoch in range(4):
        s.set_epoch(epoch)
        batches = list(s)
        assert sorted(np.concatenate(batches).tolist()) == list(range(16))
        assert {len(b) for b in batches} <= {5, 6}  # balanced, no lone well
        repeats |= any(len(set(pids[b].tolist())) < len(b) for b in batches)
        s.set_epoch(epoch, 1)  # resume inside the epoch: the same remaining batches
        assert [b.tolist() for b in s] == [b.tolist() for b in batches[1:]]
    assert repeats  # prompts repeat inside a batch (the loss makes them positives)
    assert make_batch_sampler("multipositive", pids, 64).batch_size == 16  # capped at the wells
    shards = [ShuffledBatchSampler(pids, 3, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for g, b0, b1 in zip(shards[0].global_batches(0), shards[0].batches(0), shards[1].batches(0)):
        assert np.concatenate([b0, b1]).tolist() == np.resize(g, len(b0) + len(b1)).tolist()
    with pytest.raises(CellClipError, match="batching"):
        make_batch_sampler("nope", pids, 4)


def test_fit_batching_multipositive_vs_distinct(tmp_path, cellclip_cache_dir, capsys):
    from transformers.utils import logging as hf_logging

    from training.loop import fit

    kw = dict(TINY, epochs=2, cache_dir=str(cellclip_cache_dir), seed=1)
    assert hf_logging.is_progress_bar_enabled()
    mp = fit(output=str(tmp_path / "mp"), batching="multipositive", batch_size=4, **kw)
    d = fit(output=str(tmp_path / "d"), batching="distinct", batch_size=4, **kw)
    # quiet: not even transformers' "Loading weights" bar; its setting is restored afterwards
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()
    # the sample: 4 wells (2 DMSO) → one batch of all 4 wells vs 2 batches of 2 distinct prompts
    assert (mp["batch_size"], mp["steps_per_epoch"], mp["batching"]) == (4, 1, "multipositive")
    assert (d["batch_size"], d["steps_per_epoch"], d["batching"]) == (3, 2, "distinct")
    metrics = [json.loads(x) for x in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["batch"] for m in metrics if "loss" in m] == [4, 4]


def test_well_bags_and_random_subsets():
    from training.data import build_well_bags

    fields = pd.DataFrame({
        "Metadata_Plate": ["P"] * 7, "Metadata_Well": ["A01"] * 3 + ["B02"] * 4,
        "Metadata_prompt": ["dmso"] * 3 + ["drug"] * 4})
    feats = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3) + 1
    wb = build_well_bags(feats, fields)
    assert wb.bag_index.tolist() == [[0, 1, 2, -1], [3, 4, 5, 6]]
    bags = wb.gather(np.array([0, 1]))
    assert bags.shape == (2, 4, 2, 3)
    assert not bags[0, 3].any() and np.array_equal(bags[1, 3], feats[6])
    rng = np.random.default_rng(0)
    for _ in range(20):
        sub = wb.gather_subsets(np.array([0, 1]), rng, 1, 2)
        real = sub.reshape(2, 4, -1).any(-1).sum(1)
        assert ((real >= 1) & (real <= 2)).all()
        for i, w in enumerate((0, 1)):  # only fields of that well
            rows = {tuple(r.ravel()) for r in feats[wb.bag_index[w][wb.bag_index[w] >= 0]]}
            assert all(tuple(r.ravel()) in rows for r in sub[i] if r.any())
    with pytest.raises(CellClipError, match="no prompts|prompt"):
        build_well_bags(feats, fields.drop(columns="Metadata_prompt"))


# ----------------------------------------------------------------------- metrics
def test_retrieval_metrics_hand_computed():
    from training.evaluate import retrieval_metrics

    text = np.eye(3)
    # 4 images; labels 0,0,1,2
    img = np.array([[1.0, 0.1, 0.0],    # label 0: ranks prompt 0 first          -> i2t rank 1
                    [0.2, 0.9, 0.0],    # label 0: prompt 1 first, 0 second       -> rank 2
                    [0.0, 1.0, 0.5],    # label 1: rank 1
                    [0.9, 0.0, 0.3]])   # label 2: prompts 0 then 2               -> rank 2
    r = retrieval_metrics(img, text, np.array([0, 0, 1, 2]))
    i2t = r["image_to_text"]
    assert i2t["R@1"] == pytest.approx(0.5) and i2t["R@5"] == 1.0
    assert i2t["mean_rank"] == pytest.approx((1 + 2 + 1 + 2) / 4)
    # text->image (cosine): prompt 0 best image = #0 (rank 1); prompt 1: image #2 (1.0/1.118=.894)
    # vs image #1 (.9/.922=.976, a label-0 image) -> rank 2; prompt 2: image #3 (.3/.949=.316)
    # vs image #2 (.5/1.118=.447) -> rank 2
    t2i = r["text_to_image"]
    assert t2i["n_queries"] == 3
    assert t2i["R@1"] == pytest.approx(1 / 3)
    assert t2i["mean_rank"] == pytest.approx((1 + 2 + 2) / 3)
    # ties count against the query: constant scores give no credit
    flat = retrieval_metrics(np.ones((4, 3)), text + 1, np.array([0, 0, 1, 2]))
    assert flat["image_to_text"]["R@1"] == 0.0


# ----------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, message", [
    (["fit", "--data", "/no/such/plate"], "/no/such/plate"),
    (["fit", "--val-plate", "NOPE"], "NOPE"),
    (["fit", "--encoder", "resnet-from-mars", "--cache-dir", "{cache}"], "resnet-from-mars"),
    (["fit", "--data", "{plate}", "--cache-dir", "{cache}"], "prompt"),
    (["evaluate", "--checkpoint", "/no/such/ckpt"], "/no/such/ckpt"),
])
def test_cli_user_mistakes_exit_2(argv, message, capsys, cellclip_cache_dir):
    from napari_cellclip.sample import sample_plate_dir
    from training.__main__ import main

    argv = [a.format(cache=cellclip_cache_dir, plate=sample_plate_dir()) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_subprocess_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "training", "fit", "--data", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such plate folder or manifest"]


# ----------------------------------------------------------------------- fit / resume
def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("batching", ["multipositive", "distinct"])
def test_kill_and_resume_gives_the_same_weights(tmp_path, cellclip_cache_dir, batching):
    from training.loop import fit

    kw = dict(TINY, epochs=3, cache_dir=str(cellclip_cache_dir), bag_min_fields=1, bag_max_fields=2,
              lr=1e-3, warmup=2, seed=3, batch_size=2, batching=batching)  # 2 batches of 2 wells per epoch
    full = fit(output=str(tmp_path / "full"), **kw)
    assert full["steps"] == 6 and not full["stopped_early"]
    part = fit(output=str(tmp_path / "part"), stop_after_steps=3, **kw)
    assert part["stopped_early"] and part["steps"] == 3
    assert not (tmp_path / "part" / "model").exists()
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text() == "checkpoint-0000003"
    resumed = fit(output=str(tmp_path / "part"), resume=True, **kw)
    assert resumed["steps"] == 6
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "part" / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
    metrics = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]


def test_fit_trains_from_memory_mapped_features_like_in_memory(tmp_path, cellclip_cache_dir, monkeypatch):
    """The (N, C, D) features are a memory-mapped .npy during training (removed afterwards); the
    weights equal those of the in-RAM path; fused AdamW on CPU, fp32 by default off CUDA."""
    import training.data as data
    from training.loop import fit

    seen = []
    real = data.build_well_bags

    def spy(features, fields, **kw):
        wb = real(features, fields, **kw)
        seen.append((wb.features, getattr(wb.features, "filename", None)))
        return wb

    monkeypatch.setattr(data, "build_well_bags", spy)
    kw = dict(TINY, epochs=2, cache_dir=str(cellclip_cache_dir), bag_min_fields=1, bag_max_fields=2,
              lr=1e-3, warmup=1, seed=5, batch_size=2)
    (tmp_path / "mm").mkdir()
    killed = tmp_path / "mm" / ".features-rank0.npy.tmp-0badcafe"  # left by a killed fit
    other = tmp_path / "mm" / ".features-rank1.npy.tmp-0badcafe"  # another rank's: not this one's to remove
    for p in (killed, other):
        p.write_bytes(b"x" * 64)
    with pytest.warns(CellClipWarning, match=r"removed .*features-rank0.*interrupted fit"):
        m = fit(output=str(tmp_path / "mm"), **kw)
    assert not killed.exists() and other.exists()
    assert isinstance(seen[0][0], np.memmap) and seen[0][1] is not None
    assert Path(seen[0][1]).parent == (tmp_path / "mm").resolve()
    assert not Path(seen[0][1]).exists()  # removed at the end of fit
    assert m["optimizer"] == "fused" and m["precision"] == "fp32"
    seen.clear()
    r = fit(output=str(tmp_path / "ram"), features_mmap=False, **kw)
    assert not isinstance(seen[0][0], np.memmap)
    a, b = _weights(tmp_path / "mm" / "model"), _weights(tmp_path / "ram" / "model")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert r["steps"] == m["steps"]


def test_fit_with_val_plate_tvn_and_evaluate(tmp_path, cellclip_cache_dir, sample_plate_copies):
    """Two copies of the sample plate (the second renamed) → train on one, validate on the other."""
    from napari_cellclip.model import CellCLIP
    from napari_cellclip.sample import sample_platemap_dir
    from training.loop import evaluate, fit

    plates = [str(p) for p in sample_plate_copies()]
    out = tmp_path / "run"
    s = fit(data=plates, platemap=str(sample_platemap_dir()), val_plate=["SQ00015230"], output=str(out),
            epochs=2, correction="tvn", cache_dir=str(cellclip_cache_dir), **TINY)
    assert set(s["val"]) == {"field", "well"}
    rep = json.loads((out / "val_report.json").read_text())
    assert rep["plates"] == ["SQ00015230"] and rep["feature_correction"]["method"] == "tvn"
    assert rep["well"]["image_to_text"]["n_queries"] == 4 and rep["field"]["image_to_text"]["n_queries"] == 12
    model = CellCLIP.from_pretrained(out / "model")
    assert model.config.feature_correction["method"] == "tvn"
    assert "feature_correction.whiten" in model.extra_tensors
    assert model.config.training["val_plates"] == ["SQ00015230"]
    rep2 = evaluate(out, [plates[1]], platemap=str(sample_platemap_dir()), cache_dir=str(cellclip_cache_dir),
                    quiet=True, no_progress=True)
    assert rep2["well"]["image_to_text"]["R@1"] == rep["well"]["image_to_text"]["R@1"]
    assert rep2["feature_correction"]["method"] == "tvn"


def test_default_fit_on_the_sample_writes_a_loadable_checkpoint(tmp_path, cellclip_cache_dir):
    """`python -m training fit` with nothing but a short epoch count, as in the README demo."""
    p = subprocess.run([sys.executable, "-m", "training", "fit", "--epochs", "1", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path, env=_env(cellclip_cache_dir), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "checkpoints" / "cellclip-lincs-sample"
    from napari_cellclip.model import CellCLIP

    model = CellCLIP.from_pretrained(out / "model")
    cfg = model.config
    assert cfg.stains == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert cfg.image_encoder == "morphology" and cfg.loss == "cwcl"
    assert cfg.feature_correction["method"] == "tvn"  # the default: per-plate DMSO centre-scale + TVN
    assert cfg.input_normalization == "plate"  # the default: channels rescaled by plate percentiles
    assert "feature_correction.whiten" in model.extra_tensors
    assert cfg.training["epochs"] == 1 and cfg.text_tuning == "frozen"
    assert (out / "checkpoints" / "latest").is_file()
    assert (out / "metrics.jsonl").is_file()
    emb = model.encode_prompts(["A549 cells treated with compound: lonafarnib"])
    assert emb.shape == (1, cfg.embed_dim)


def test_extract_subcommand_caches_features(tmp_path, cellclip_cache_dir, capsys):
    from training.__main__ import main

    npz = tmp_path / "feats.npz"
    assert main(["extract", "--cache-dir", str(cellclip_cache_dir), "--output", str(npz), "--no-progress"]) == 0
    with np.load(npz, allow_pickle=False) as z:
        assert z["features"].shape[:2] == (12, 5) and z["features"].dtype == np.float32
        assert sorted(set(z["well"].tolist())) == ["A01", "A13", "J18", "P13"]
    assert json.loads(capsys.readouterr().out)["fields"] == 12


def test_fit_with_cloob_loss(tmp_path, cellclip_cache_dir):
    """`fit --loss cloob` trains (finite, decreasing-capable loss) and records the loss in the checkpoint."""
    from napari_cellclip.losses import LOSSES
    from napari_cellclip.model import CellCLIP
    from training.__main__ import build_parser
    from training.loop import fit

    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["fit"]._actions
                   if a.dest == "loss").choices
    assert tuple(choices) == LOSSES  # the CLI offers every loss the library has
    s = fit(output=str(tmp_path / "cloob"), loss="cloob", epochs=3, batch_size=4,
            cache_dir=str(cellclip_cache_dir), **TINY)
    metrics = [json.loads(x) for x in (tmp_path / "cloob" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == s["steps"] == 3 and all(np.isfinite(losses)) and losses[0] != 0.0
    assert CellCLIP.from_pretrained(tmp_path / "cloob" / "model").config.loss == "cloob"
    with pytest.raises(CellClipError, match="cloob"):
        fit(output=str(tmp_path / "bad"), loss="infonce", epochs=1, cache_dir=str(cellclip_cache_dir), **TINY)
