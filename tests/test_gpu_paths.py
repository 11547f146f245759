"""GPU code paths checked on the CPU (issue #15): what each test stands in for is in its docstring.

Nothing here needs CUDA; the tests that do are marked ``@pytest.mark.gpu`` (skipped without CUDA).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_cellclip.devices import cuda_flags

TINY = dict(embed_dim=32, vision_layers=1, vision_heads=4, quiet=True, no_progress=True)


def _flags():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_encoders import _save_tiny_dinov2

    return _save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


# ---------------------------------------------------------------- precision in the feature-cache key
def test_feature_cache_key_records_precision(tiny_dir, tmp_path, monkeypatch):
    """bf16 (GPU autocast) and fp32 features never share cache entries or job fingerprints."""
    from napari_cellclip.encoders import get_encoder
    from napari_cellclip.encoders.hf import HFEncoder
    from napari_cellclip.features import FeatureCache

    fp32 = get_encoder(f"hf:{tiny_dir}", device="cpu")
    assert fp32.precision == "fp32" and fp32.identity.endswith("|precision=fp32")
    # what CUDA with bf16 support picks: stand in on the CPU (CPU autocast in bf16)
    monkeypatch.setattr(HFEncoder, "_pick_precision", lambda self: "bf16")
    bf16 = get_encoder(f"hf:{tiny_dir}", device="cpu")
    assert bf16.precision == "bf16" and bf16.identity.endswith("|precision=bf16")
    assert bf16.identity.split("|precision=")[0] == fp32.identity.split("|precision=")[0]
    a, b = FeatureCache(tmp_path, fp32), FeatureCache(tmp_path, bf16)
    assert a.folder != b.folder
    row = {"FileName_OrigDNA": "x.tif", "PathName_OrigDNA": str(tmp_path)}
    (tmp_path / "x.tif").write_bytes(b"123")
    import pandas as pd

    r = pd.Series(row)
    assert a.key(r, ["DNA"], None, 1.0, 99.9) != b.key(r, ["DNA"], None, 1.0, 99.9)
    # the bf16 path keeps its weights in bf16 (half the memory) and still returns float32 features
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(fp32.model.parameters()).dtype == torch.float32
    x = torch.rand(2, 3, 70, 80)
    f32, f16 = fp32.encode(x), bf16.encode(x)
    assert f16.dtype == torch.float32 and f16.shape == f32.shape
    rel = ((f16 - f32).norm() / f32.norm()).item()
    assert 0 < rel < 0.05, rel  # close, yet not the same numbers: hence separate cache entries


def test_morphology_identity_is_fp32():
    from napari_cellclip.encoders import get_encoder

    assert get_encoder("morphology", device="cpu").identity.endswith("|precision=fp32")


# ---------------------------------------------------------------- TF32 / cudnn flags do not leak
def test_cuda_flags_are_scoped_and_the_job_restores_them(monkeypatch):
    from napari_cellclip import pipeline
    from napari_cellclip.errors import CellClipError

    before = _flags()
    with cuda_flags(tf32=not before[0], benchmark=not before[2]):
        assert _flags() == (not before[0], not before[0], not before[2])
    assert _flags() == before
    with pytest.raises(RuntimeError), cuda_flags(tf32=True, benchmark=True):
        raise RuntimeError("boom")
    assert _flags() == before
    # the embedding job sets TF32 + autotuning for itself only
    seen = []

    def spy(*a, **k):
        seen.append(_flags())
        raise CellClipError("stop here")

    monkeypatch.setattr("napari_cellclip.devices.resolve_device", spy)
    with pytest.raises(CellClipError, match="stop here"):
        pipeline.run_job("nothing", None, "out", device="cpu")
    assert seen == [(True, True, True)]
    assert _flags() == before


def test_fp32_encoder_forward_turns_tf32_off(monkeypatch):
    """On CUDA an fp32 encoder pins TF32 off for its forward (stand-in: the context it picks)."""
    from napari_cellclip.encoders import get_encoder

    enc = get_encoder("morphology", device="cpu")
    monkeypatch.setattr(enc, "device", torch.device("cuda", 0))
    with cuda_flags(tf32=True):
        with enc._autocast_context():
            assert _flags()[:2] == (False, False)
        assert _flags()[:2] == (True, True)


# ---------------------------------------------------------------- the loss is fp32 inside autocast
@pytest.mark.parametrize("name", ["cwcl", "clip", "siglip"])
def test_loss_is_fp32_inside_bf16_autocast(name):
    from napari_cellclip.losses import compute_loss

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    feats = torch.randn(6, 3, 8, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    kw = dict(channel_features=feats, logit_bias=torch.tensor(-2.0), labels=labels)
    ref = compute_loss(name, img, txt, torch.tensor(2.5), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute_loss(name, img, txt, torch.tensor(2.5), **kw)
        # what happened before: the same maths under autocast runs its matmuls in bf16
        raw = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    assert raw.dtype == torch.bfloat16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ---------------------------------------------------------------- distinct prompts through the text tower
def test_unique_prompt_text_encoding_gives_the_same_loss_and_gradients(tiny_bert_dir):
    from napari_cellclip.losses import compute_loss
    from napari_cellclip.model import CellCLIP, CellCLIPConfig

    torch.manual_seed(0)
    model = CellCLIP(CellCLIPConfig(embed_dim=16, vision_width=8, vision_layers=1, vision_heads=2, input_channels=3,
                                    text_encoder=str(tiny_bert_dir), text_tuning="full", stains=["A", "B", "C"]))
    model.eval()  # no dropout: the two paths must agree exactly
    prompts = ["dmso", "lonafarnib", "taxol"]
    tok = model.tokenize(prompts)
    pids = np.array([0, 0, 1, 0, 2, 1])
    uniq, inverse = np.unique(pids, return_inverse=True)
    x = torch.randn(6, 2, 3, 8)

    def run(all_prompts: bool):
        model.zero_grad()
        ids = torch.from_numpy(pids) if all_prompts else torch.from_numpy(uniq)
        img, txt, pooled = model(x, tok["input_ids"][ids], tok["attention_mask"][ids])
        if not all_prompts:
            assert txt.shape[0] == 3  # U distinct prompts encoded, not B = 6
            txt = txt[torch.from_numpy(inverse)]
        loss = compute_loss("cwcl", img, txt, model.logit_scale, channel_features=pooled, labels=torch.from_numpy(pids))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.text.parameters() if p.grad is not None]

    (l_all, g_all), (l_u, g_u) = run(True), run(False)
    torch.testing.assert_close(l_u, l_all, rtol=1e-6, atol=1e-6)
    assert len(g_all) == len(g_u) > 0
    for a, b in zip(g_all, g_u):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_fit_encodes_distinct_prompts_and_reads_numbers_only_when_logging(tmp_path, cellclip_cache_dir, monkeypatch):
    """Inside a training step nothing of ours reads a tensor back to the host (each such read is a
    device sync on CUDA); the text tower sees the batch's U distinct prompts only."""
    import training.train as tt
    from napari_cellclip.model import CellCLIP
    from training.loop import fit

    text_batches, syncs, inside = [], [], [False]
    real_encode_text, real_step = CellCLIP.encode_text, tt.train_step

    def encode_text(self, input_ids, attention_mask=None):
        text_batches.append(int(input_ids.shape[0]))
        return real_encode_text(self, input_ids, attention_mask)

    def step(run, rows):
        inside[0] = True
        try:
            return real_step(run, rows)
        finally:
            inside[0] = False

    ours = (str(Path(tt.__file__).parent), str(Path(sys.modules["napari_cellclip"].__file__).parent))

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and caller.startswith(ours):
                syncs.append((name, caller))
            return real(self, *a, **k)
        return wrapper

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(CellCLIP, "encode_text", encode_text)
    monkeypatch.setattr(tt, "train_step", step)
    out = fit(output=str(tmp_path / "run"), epochs=3, batch_size=4, log_every=2, cache_dir=str(cellclip_cache_dir),
              seed=2, **TINY)
    assert out["steps"] == 3
    assert syncs == []  # before: float(loss) and float(gnorm) every step
    # the bundled sample: one batch of 4 wells, 3 distinct prompts (2 DMSO wells)
    assert text_batches[:3] == [3, 3, 3]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in logged] == [2]
    assert all(isinstance(m[k], float) and np.isfinite(m[k]) for m in logged for k in ("loss", "grad_norm"))


# ---------------------------------------------------------------- compile: one graph for every batch size
def test_compiled_encoder_pads_to_one_shape(tiny_dir):
    from napari_cellclip.encoders import get_encoder

    def compiled(fixed: bool):
        enc = get_encoder(f"hf:{tiny_dir}", device="cpu", n_crops=1, max_batch=6)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)))
            return gm.forward

        torch._dynamo.reset()
        eager = [enc.encode(torch.rand(b, 2, 56, 56, generator=torch.Generator().manual_seed(b))) for b in (1, 2, 3)]
        enc.model = torch.compile(enc.model, backend=backend, dynamic=False)
        enc.fixed_batch = fixed
        got = [enc.encode(torch.rand(b, 2, 56, 56, generator=torch.Generator().manual_seed(b))) for b in (1, 2, 3)]
        for e, g in zip(eager, got):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
        return graphs

    assert len(compiled(True)) == 1  # every forward padded to max_batch = 6 crops
    assert len(compiled(False)) == 3  # what --compile did before: one graph per batch size
    torch._dynamo.reset()


def test_build_encoder_compile_sets_fixed_batch(tiny_dir, monkeypatch):
    from napari_cellclip import pipeline

    monkeypatch.setattr(torch, "compile", lambda m, **k: m)
    enc = pipeline.build_encoder(f"hf:{tiny_dir}", "cpu", batch_size=4, channels=5, compile_=True)
    assert enc.fixed_batch and enc.max_batch >= 4 * 5 * enc.n_crops


# ---------------------------------------------------------------- torchrun: workers and timeouts
def test_workers_are_shared_among_a_nodes_ranks(monkeypatch):
    from napari_cellclip.devices import default_workers
    from training.prepare import extract_workers

    monkeypatch.setattr("os.cpu_count", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers() == 1
    assert extract_workers(None, torch.device("cpu")) == 0
    assert extract_workers(None, torch.device("cuda", 0)) == 1
    assert extract_workers(3, torch.device("cuda", 0)) == 3


def test_process_group_gets_the_configured_timeout(monkeypatch):
    import datetime

    import torch.distributed as dist

    from training.distributed import Dist

    got = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **k: got.update(k))
    Dist().init(torch.device("cpu"), 90)
    assert got == {"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}


_SHARD_SCRIPT = r"""
import json, os, sys
import torch
from napari_cellclip.encoders.morphology import MorphologyEncoder
from training.config import FitConfig
from training.distributed import Dist
from training.prepare import _features, _read

n = [0]
real = MorphologyEncoder._encode_planes
def counting(self, planes):
    n[0] += planes.shape[0]
    return real(self, planes)
MorphologyEncoder._encode_planes = counting
cfg = FitConfig(cache_dir=sys.argv[1], quiet=True, no_progress=True, output=sys.argv[2])
d = Dist()
d.init(torch.device("cpu"), 5)
feats, kept, spec = _features(cfg, _read(cfg), d, torch.device("cpu"))
json.dump({"rank": d.rank, "planes": n[0], "sum": float(feats.astype("float64").sum()), "n": len(kept)},
          open(os.path.join(sys.argv[2], f"rank{d.rank}.json"), "w"))
d.close()
"""


def test_fit_extraction_is_sharded_across_ranks(tmp_path):
    """Two gloo ranks each encode about half the fields into a fresh cache, then both read all of them."""
    import os
    import subprocess

    from test_training_ddp import REPO, _free_port

    script = tmp_path / "shard.py"
    script.write_text(_SHARD_SCRIPT)
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(cache), str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["n"] == r1["n"] > 0 and r0["sum"] == pytest.approx(r1["sum"], rel=1e-6)
    channels = r0["planes"] + r1["planes"]
    n_channels = channels // r0["n"]
    assert channels == r0["n"] * n_channels  # every field encoded exactly once, by one of the ranks
    assert abs(r0["planes"] - r1["planes"]) <= n_channels  # fields r, r+2, …: an even split


# ---------------------------------------------------------------- a test that needs the real device
@pytest.mark.gpu
def test_cuda_device_without_index_resolves_and_is_made_current():
    from napari_cellclip.devices import resolve_device, use_device

    dev = use_device(resolve_device("cuda"))
    assert dev.type == "cuda" and dev.index == torch.cuda.current_device()


# ---------------------------------------------------------------- FAISS on a GPU (a fake GPU index)
def test_faiss_gpu_nprobe_path_limit_and_fallback(monkeypatch):
    """nprobe on a GPU index goes through GpuParameterSpace, capped at the GPU limit and restored
    after a per-query value; a GPU failure falls back to the CPU index instead of escaping."""
    faiss = pytest.importorskip("faiss")
    from napari_cellclip import ann
    from napari_cellclip.errors import CellClipWarning

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = ann.build_index(x, nlist=32, use_gpu=False)
    set_calls = []

    class FakeGpuIndex:  # what index_cpu_to_all_gpus returns: no IVF object a CPU path could reach
        nprobe = None

        def __init__(self, cpu, fail=False):
            self.cpu, self.fail = cpu, fail

        def search(self, q, k):
            if self.fail:
                raise RuntimeError("Error in GpuIndexIVF: out of memory")
            self.seen = self.nprobe
            return self.cpu.search(q, k)

    class GpuParameterSpace:
        def set_index_parameter(self, index, name, value):
            set_calls.append((name, value))
            index.nprobe = value

    class Opts:
        shard = False

    fake = type("F", (), {})()
    for name in ("extract_index_ivf", "ParameterSpace", "IndexFlatIP"):
        setattr(fake, name, getattr(faiss, name))
    fake.get_num_gpus = lambda: 2
    fake.GpuMultipleClonerOptions = Opts
    fake.GpuParameterSpace = GpuParameterSpace
    gpu = FakeGpuIndex(idx.index)
    fake.index_cpu_to_all_gpus = lambda index, co=None: gpu
    monkeypatch.setattr(ann, "_faiss", lambda: fake)

    idx.nprobe = 4000  # above the GPU limit
    assert idx.use_gpu()
    assert set_calls == [("nprobe", ann.GPU_MAX_NPROBE)]
    q = x[:5]
    s, r = idx.search(q, 10, nprobe=3)
    assert gpu.seen == 3  # the per-query nprobe reached the GPU index
    assert gpu.nprobe == ann.GPU_MAX_NPROBE  # and was restored (capped) afterwards
    assert (r[:, 0] == np.arange(5)).all()
    idx.search(q, 10, nprobe=10_000)
    assert gpu.seen == ann.GPU_MAX_NPROBE
    # a failing GPU search: a warning, then the CPU index answers (and keeps answering)
    gpu.fail = True
    with pytest.warns(CellClipWarning, match="GPU ANN search failed"):
        s2, r2 = idx.search(q, 10)
    assert (r2[:, 0] == np.arange(5)).all() and idx._gpu is None


def test_without_faiss_the_message_says_how_to_install(without_faiss):
    from napari_cellclip import ann
    from napari_cellclip.errors import CellClipError

    assert not ann.faiss_available()
    with pytest.raises(CellClipError, match=r"napari-cellclip\[ann\].*faiss-gpu"):
        ann.build_index(np.eye(4, dtype=np.float32))
