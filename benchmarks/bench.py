"""Issue 5 benchmarks: embedding throughput, text-query latency, memory — as ratios.

    python benchmarks/bench.py [--quick] [--device auto|cpu|cuda] [--no-write]

Each row compares implementations on identical inputs in one run (repetitions
interleaved, best of N):

1. DINOv2-S/14 (random weights, the dinov2-small architecture), 5-channel 1080×1080
   uint16 TIFF fields on disk, one 224 crop per channel:
   pipeline (napari_cellclip.pipeline.run_job, feature cache off: decode + normalise + crop in DataLoader
   workers → one forward per batch → shards → store) vs (a) the published-style baseline
   (per field, per channel: grey → RGB, HF BitImageProcessor on the CPU, one field per
   forward, fp32) vs (b) the bare encoder forward on crops already in memory (the floor).
2. Weight-free ``morphology`` encoder on 32 such fields: pipeline vs
   features.extract_features (no cache) vs its bare forward; and the pipeline with its default
   feature cache, cold (every file hashed, every entry written) and warm (filled before).
3. Training steps/s from cached features, CWCL, same CellCLIP model and identical random
   inputs: the fit path (vectorised CWCL weights, fused AdamW where torch has it, bf16
   autocast on CUDA, bags gathered by index arrays from a memory-mapped ``.npy``) vs a
   naive step (CWCL weights from a Python loop over channels, fp32, ``AdamW(foreach=False,
   fused=False)``, bags gathered from the in-RAM array).  Published size on CUDA (D=1536,
   12 layers, 8 heads, E=512, batch 256, a random BERT-base text tower trained in full);
   on a CPU a smaller one (D=384, 4 layers, batch 64, a 2-layer 256-wide random BERT).
4. Text query latency (tokenise + encode + rank, top-10) at 10k / 100k / 1M stored
   field embeddings (E = 512, clustered around prompt embeddings): exact matrix product
   vs the FAISS IVF index built alongside (memory-mapped), with recall@10 against exact.
5. Peak RSS of the embedding job (morphology at a reduced 128 px field / 64 px working
   size so 10k fields fit the time budget; 10k rows point at 64 distinct fields):
   1k vs 10k fields, main process and DataLoader worker.

Writes the table between the markers in benchmarks/RESULTS.md and the raw numbers to
benchmarks/bench_raw.json; with ``--no-write`` it only prints them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
warnings.filterwarnings("ignore")

STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]
START, END = "<!-- bench.py:start -->", "<!-- bench.py:end -->"


# ----------------------------------------------------------------------- helpers
def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def synth_fields(folder: Path, n: int, size: int, seed: int = 0, n_distinct: int | None = None):
    """n fields × 5 channels of size×size uint16 TIFFs (blobs on a noisy background)."""
    import pandas as pd
    import tifffile

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_distinct = n if n_distinct is None else min(n, n_distinct)
    yy, xx = np.mgrid[0:size, 0:size]
    names = []
    for i in range(n_distinct):
        per = {}
        for s in STAINS:
            img = rng.gamma(2.0, 80.0, (size, size)).astype(np.float32)
            for _ in range(max(4, size // 40)):
                cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 100, size / 30)
                img += 3000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * rng.uniform(0.3, 1)
            name = f"f{i:05d}_{s}.tif"
            tifffile.imwrite(folder / name, img.clip(0, 65535).astype(np.uint16))
            per[s] = name
        names.append(per)
    rows = []
    for i in range(n):
        per = names[i % n_distinct]
        rec = {"Metadata_Plate": f"P{i // 3456}", "Metadata_Well": f"{'ABCDEFGHIJKLMNOP'[(i // 9) % 16]}"
               f"{(i // 144) % 24 + 1:02d}", "Metadata_Site": i % 9 + 1}
        for s in STAINS:
            rec[f"FileName_Orig{s}"], rec[f"PathName_Orig{s}"] = per[s], str(folder)
        rows.append(rec)
    return pd.DataFrame(rows)


def make_dinov2(folder: Path) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                       image_size=518, patch_size=14, layerscale_value=1.0)
    Dinov2Model(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}))
    return folder


def make_checkpoint(folder: Path, image_encoder: str, width: int, embed_dim: int = 512) -> Path:
    import torch

    from napari_cellclip.model import CellCLIP, CellCLIPConfig

    torch.manual_seed(0)
    cfg = CellCLIPConfig(embed_dim=embed_dim, vision_width=width, vision_layers=2, vision_heads=8,
                         image_encoder=image_encoder, feature_correction=None)
    return CellCLIP(cfg).eval().save_pretrained(folder)


def best(times):
    return min(times)


def matmul_gflops(device) -> float:
    """Achievable fp32 (CPU) / bf16 (CUDA) matmul GFLOP/s: the roofline used below."""
    import torch

    n = 2048 if device.type == "cpu" else 8192
    dt = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def vit_gflop_per_crop(d=384, layers=12, tokens=257, patch=14) -> float:
    per_layer = 12 * tokens * d * d + 2 * tokens * tokens * d  # MACs: qkv+proj+mlp, attention
    return 2 * (layers * per_layer + (tokens - 1) * d * patch * patch) / 1e9


# -------------------------------------------------------------------------- rows
def row_dinov2(tmp: Path, n_fields: int, reps: int, device: str):
    import torch
    from transformers import BitImageProcessor, Dinov2Model

    from napari_cellclip.embed import load_model
    from napari_cellclip.encoders import resolve_device
    from napari_cellclip.images import load_field, normalize
    from napari_cellclip.pipeline import build_encoder, run_job

    dev = resolve_device(device)
    dino = make_dinov2(tmp / "dinov2-small")
    ckpt = make_checkpoint(tmp / "ckpt-dino", f"hf:{dino}", 384)
    log(f"row 1: writing {n_fields} 5×1080×1080 uint16 TIFF fields")
    fields = synth_fields(tmp / "fields1080", n_fields, 1080)
    fields.to_parquet(tmp / "fields1080.parquet")
    model = load_model(ckpt, device=str(dev))
    bs = 4
    enc = build_encoder(model.config.image_encoder, dev, n_crops=1, batch_size=bs, channels=5, compile_=False)
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))

    # baseline model: the unfolded RGB DINOv2 + the HF processor
    base_model = Dinov2Model.from_pretrained(dino).eval().to(dev)
    proc = BitImageProcessor.from_pretrained(dino)

    def pipeline():
        t = time.perf_counter()
        run_job(fields, None, tmp / "job-dino", model=model, encoder=enc, batch_size=bs, workers=workers,
                device=str(dev), overwrite=True, ann="never", quiet=True, cache_dir=False)
        return time.perf_counter() - t

    def baseline():
        t = time.perf_counter()
        with torch.inference_mode():
            for _, row in fields.iterrows():
                img = normalize(load_field(row, STAINS))
                pix = [proc(images=np.repeat(ch[..., None], 3, axis=2), do_rescale=False,
                            return_tensors="pt")["pixel_values"] for ch in img]
                base_model(pixel_values=torch.cat(pix).to(dev)).pooler_output.cpu()
        return time.perf_counter() - t

    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.random((n_fields, 5, 224, 224), dtype=np.float32))

    def bare(step):
        t = time.perf_counter()
        for a in range(0, n_fields, step):
            enc.encode(crops[a:a + step])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def floor():  # the fastest bare forward: the job's batch or all fields at once, whichever is faster
        return min(bare(bs), bare(n_fields))

    floor()  # warm-up (weights paged in, allocator)
    res = {"pipeline": [], "baseline": [], "floor": []}
    for r in range(reps):
        for name, fn in (("floor", floor), ("pipeline", pipeline), ("baseline", baseline)):
            res[name].append(fn())
            log(f"row 1 rep {r}: {name} {n_fields / res[name][-1]:.3f} fields/s")
    fps = {k: n_fields / best(v) for k, v in res.items()}
    roof = matmul_gflops(dev)
    gf = vit_gflop_per_crop() * 5  # per field
    decode = decode_fps_per_worker(fields, enc)
    return {"fps": fps, "roofline_gflops": roof, "gflop_per_field": gf, "n_fields": n_fields, "batch": bs,
            "workers": workers, "device": str(dev), "raw": res, "decode_fps_per_worker": decode,
            "encoder": encoder_rate(dev, quick=n_fields < 16)}


#: ViT sizes for the encoder-rate measurement: (hidden, layers, heads, MLP)
VIT_SIZES = {"S": (384, 12, 6, 1536), "L": (1024, 24, 16, 4096), "g": (1536, 40, 24, 6144)}


def encoder_rate(dev, *, quick: bool = False, size: str | None = None, crops: int | None = None) -> dict:
    """The image encoder alone on pre-decoded crops: achieved TFLOP/s of a random DINOv2 of ViT-L
    (CUDA; ViT-S on a CPU) size in the encoder's own precision (bf16 autocast and weights on CUDA)
    with hundreds of crops per forward, against the matmul rate measured now on the same device."""
    import tempfile as _tf

    import torch
    from transformers import Dinov2Config, Dinov2Model

    from napari_cellclip.encoders import get_encoder

    size = size or ("L" if dev.type == "cuda" else "S")
    d, layers, heads, mlp = VIT_SIZES[size]
    n = crops or (512 if dev.type == "cuda" else (16 if quick else 64))
    with _tf.TemporaryDirectory() as td:
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=mlp, patch_size=14, image_size=224)).save_pretrained(td)
        enc = get_encoder(f"hf:{td}", device=dev, n_crops=1, max_batch=n)
    x = torch.rand(n, 1, 224, 224)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    enc.encode(x[: max(1, n // 4)])  # warm-up
    times = []
    for _ in range(2 if quick else 3):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        enc.encode(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    gflop = vit_gflop_per_crop(d=d, layers=layers) * n  # every size here has the 4·D MLP the formula assumes
    achieved = gflop / min(times)
    roof = matmul_gflops(dev)
    return {"size": f"ViT-{size}/14 (D={d}, {layers} layers)", "crops_per_forward": n, "precision": enc.precision,
            "gflops": achieved, "matmul_gflops": roof, "fraction": achieved / roof,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(dev) / 2 ** 30) if dev.type == "cuda" else None}


def decode_fps_per_worker(fields, enc, limit: int = 8) -> float:
    """Fields/s one process decodes and prepares (read TIFFs, rescale, crop region): a worker's rate."""
    from napari_cellclip.images import load_field

    prep = enc.field_prep(STAINS)
    rows = fields.head(limit)
    t = time.perf_counter()
    for _, r in rows.iterrows():
        prep(load_field(r, STAINS))
    return len(rows) / (time.perf_counter() - t)


def row_morphology(tmp: Path, n_fields: int, reps: int, device: str):
    import torch

    from napari_cellclip.embed import load_model
    from napari_cellclip.encoders import get_encoder, resolve_device
    from napari_cellclip.features import extract_features
    from napari_cellclip.encoders.base import FieldPrep
    from napari_cellclip.images import load_field
    from napari_cellclip.pipeline import run_job

    dev = resolve_device(device)
    ckpt = make_checkpoint(tmp / "ckpt-morph", "morphology", 128)
    model = load_model(ckpt, device=str(dev))
    # its own field set, large enough that the job's fixed start-up (DataLoader worker, shard
    # files, merge) is a small part of the time
    log(f"row 2: writing {n_fields} 5×1080×1080 uint16 TIFF fields")
    fields = synth_fields(tmp / "fields1080m", n_fields, 1080, seed=2)
    enc = get_encoder("morphology", device=dev)
    bs = 4
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    x = torch.stack([torch.from_numpy(FieldPrep()(load_field(r, STAINS))) for _, r in fields.iterrows()])

    def pipeline(cache=False):
        t = time.perf_counter()
        run_job(fields, None, tmp / "job-morph", model=model, encoder=enc, batch_size=bs, workers=workers,
                device=str(dev), overwrite=True, ann="never", quiet=True, cache_dir=cache)
        return time.perf_counter() - t

    def cold_cache():  # the job's default: hash every field's files, encode, write the cache entries
        shutil.rmtree(tmp / "cache-cold", ignore_errors=True)
        return pipeline(tmp / "cache-cold")

    def warm_cache():  # the plugin or training cached these fields before: nothing decoded or encoded
        return pipeline(tmp / "cache-warm")

    def features():
        t = time.perf_counter()
        extract_features(fields, enc, stains=STAINS, use_cache=False, batch_size=bs)
        return time.perf_counter() - t

    def floor():
        t = time.perf_counter()
        for a in range(0, n_fields, bs):
            enc.encode(x[a:a + bs])
        return time.perf_counter() - t

    floor()
    extract_features(fields, enc, stains=STAINS, cache_dir=tmp / "cache-warm", batch_size=bs)
    res = {"pipeline": [], "extract_features": [], "floor": [], "cold_cache": [], "warm_cache": []}
    for r in range(reps):
        for name, fn in (("floor", floor), ("pipeline", pipeline), ("extract_features", features),
                         ("cold_cache", cold_cache), ("warm_cache", warm_cache)):
            res[name].append(fn())
            log(f"row 2 rep {r}: {name} {n_fields / res[name][-1]:.3f} fields/s")
    return {"fps": {k: n_fields / best(v) for k, v in res.items()}, "n_fields": n_fields, "raw": res}


TRAIN_SIZES = {
    # published CellCLIP: CrossChannelFormer D=1536, 12 layers, 8 heads, E=512, batch 256, BERT-base text
    "cuda": dict(D=1536, layers=12, heads=8, E=512, batch=256, M=4, C=5, n_fields=16384,
                 text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072), tokens=77),
    "cpu": dict(D=384, layers=4, heads=8, E=512, batch=64, M=4, C=5, n_fields=4096,
                text=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=1024), tokens=32),
}


def _naive_cwcl(image_emb, text_emb, channel_features, logit_scale, labels):
    """losses.cwcl_loss with the channel-similarity weights from a Python loop over channels."""
    import torch
    import torch.nn.functional as F

    from napari_cellclip import losses as Ls

    img, txt, scale = Ls._prep(image_emb, text_emb, logit_scale)
    member = Ls._groups(labels, img.shape[0], img.device, img.dtype)
    logits = scale * img @ Ls._dedup_text(txt, member).t()
    loss_cl = Ls._soft_ce(logits.t(), Ls._text_to_image_targets(member))
    u = channel_features.detach().float()
    C = u.shape[1]
    w = torch.zeros(u.shape[0], u.shape[0], device=u.device)
    for c in range(C):  # one (B, B) cosine matrix per channel
        uc = F.normalize(u[:, c], dim=-1, eps=1e-8)
        w = w + (uc @ uc.t()) / C
    w = w / 2 + 0.5
    w = torch.where(labels[:, None] == labels[None, :], torch.ones_like(w), w)
    w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
    w = w @ member
    w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return loss_cl + Ls._soft_ce(logits, w)


def row_train(tmp: Path, steps: int, reps: int, device: str):
    import copy

    import pandas as pd
    import torch
    from transformers import BertConfig, BertModel

    sys.path.insert(0, str(REPO))
    from napari_cellclip.encoders import resolve_device
    from napari_cellclip.losses import compute_loss
    from napari_cellclip.model import CellCLIP, CellCLIPConfig
    from training.data import build_well_bags
    from training.optim import make_adamw, param_groups
    from training.precision import resolve_precision

    dev = resolve_device(device)
    sz = TRAIN_SIZES["cuda" if dev.type == "cuda" else "cpu"]
    D, C, M, B, N = sz["D"], sz["C"], sz["M"], sz["batch"], sz["n_fields"]
    log(f"row 3: D={D} layers={sz['layers']} heads={sz['heads']} E={sz['E']} batch={B} M={M} C={C} "
        f"on {dev}")
    torch.manual_seed(0)
    text = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **sz["text"]),
                     add_pooling_layer=False)
    cfg = CellCLIPConfig(embed_dim=sz["E"], vision_width=D, vision_layers=sz["layers"],
                         vision_heads=sz["heads"], input_channels=C, text_pooling="mean",
                         text_tuning="full", feature_correction=None, loss="cwcl")
    base = CellCLIP(cfg, text_model=text)
    models = {"optimised": copy.deepcopy(base).to(dev).train(), "naive": copy.deepcopy(base).to(dev).train()}
    del base, text

    # cached features: N fields in wells of M fields; one copy memory-mapped, one in RAM
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((N, C, D), dtype=np.float32)
    n_wells = N // M
    n_prompts = max(2, n_wells // 8)
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": np.repeat(np.arange(n_wells), M).astype(str),
                           "Metadata_Site": np.tile(np.arange(M), n_wells),
                           "Metadata_prompt": [f"prompt {i % n_prompts}" for i in np.repeat(np.arange(n_wells), M)]})
    np.save(tmp / "train-features.npy", feats)
    wb = {"optimised": build_well_bags(np.load(tmp / "train-features.npy", mmap_mode="r"), fields),
          "naive": build_well_bags(feats, fields)}
    assert isinstance(wb["optimised"].features, np.memmap)
    prompt_ids = torch.from_numpy(rng.integers(1000, 30000, (n_prompts, sz["tokens"]))).to(dev)
    attn = torch.ones_like(prompt_ids)
    batches = [rng.choice(n_wells, B, replace=False) for _ in range(steps)]

    precision = resolve_precision(dev)
    amp = torch.bfloat16 if precision == "bf16" else None
    opts = {}
    opts["optimised"], impl = make_adamw(param_groups(models["optimised"], 0.1), dev, lr=1e-4,
                                         betas=(0.9, 0.98), eps=1e-6)
    opts["naive"] = torch.optim.AdamW(param_groups(models["naive"], 0.1), lr=1e-4, betas=(0.9, 0.98),
                                      eps=1e-6, foreach=False, fused=False)

    def one_step(name, rows):
        model, opt = models[name], opts[name]
        x = torch.from_numpy(wb[name].gather(rows)).to(dev, non_blocking=True)
        pids = torch.from_numpy(wb[name].prompt_ids[rows]).to(dev)
        use_amp = name == "optimised" and amp is not None
        with torch.autocast(device_type=dev.type, dtype=amp or torch.float32, enabled=use_amp):
            img, txt, pooled = model(x, prompt_ids[pids], attn[pids])
        if name == "optimised":
            loss = compute_loss("cwcl", img.float(), txt.float(), model.logit_scale,
                                channel_features=pooled.float(), labels=pids)
        else:
            loss = _naive_cwcl(img, txt, pooled, model.logit_scale, pids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        model.clamp_logit_scale_()
        return loss

    # the two losses are the same function of the same outputs (fp32 check on the first batch)
    with torch.no_grad():
        m = models["naive"]
        rows = batches[0]
        x = torch.from_numpy(wb["naive"].gather(rows)).to(dev)
        pids = torch.from_numpy(wb["naive"].prompt_ids[rows]).to(dev)
        img, txt, pooled = m(x, prompt_ids[pids], attn[pids])
        a_ = float(compute_loss("cwcl", img, txt, m.logit_scale, channel_features=pooled, labels=pids))
        b_ = float(_naive_cwcl(img, txt, pooled, m.logit_scale, pids))
        assert abs(a_ - b_) <= 1e-4 * max(1.0, abs(a_)), (a_, b_)

    def run(name):
        for r in batches[:2]:  # warm-up (allocator, kernels)
            one_step(name, r)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for r in batches:
            loss = one_step(name, r)
        float(loss)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    from napari_cellclip.devices import cuda_flags

    res = {"optimised": [], "naive": []}
    for r in range(reps):
        for name in ("naive", "optimised"):
            with cuda_flags(tf32=False, benchmark=False):  # the naive baseline is plain fp32, whatever ran before
                res[name].append(run(name))
            log(f"row 3 rep {r}: {name} {steps / res[name][-1]:.2f} steps/s")
    return {"sps": {k: steps / best(v) for k, v in res.items()}, "size": {k: v for k, v in sz.items()},
            "steps": steps, "device": str(dev), "optimizer": impl, "precision": precision,
            "loss_check": [a_, b_], "raw": res}


def row_query(tmp: Path, sizes, n_queries: int):
    import pandas as pd

    from napari_cellclip import ann, search
    from napari_cellclip.embed import load_model
    from napari_cellclip.store import EmbeddingStore

    model = load_model(tmp / "ckpt-dino", device="cpu")
    model._cellclip_id = ""
    prompts = [f"A549 cells treated with compound: drug-{i}" for i in range(300)]
    # a "trained" space: 300 clusters sit on the prompt directions with the text modality's
    # common offset removed (CLIP's modality gap), 1700 more on random directions
    t = search.encode_text_queries(model, prompts)
    rng = np.random.default_rng(0)
    delta = t - t.mean(axis=0, keepdims=True)
    extra = rng.standard_normal((1700, t.shape[1])).astype(np.float32)
    centres = np.concatenate([delta / np.linalg.norm(delta, axis=1, keepdims=True),
                              extra / np.linalg.norm(extra, axis=1, keepdims=True)])
    out = []
    for n in sizes:
        log(f"row 4: {n} embeddings")
        e = centres.shape[1]
        x = np.empty((n, e), dtype=np.float32)
        for a in range(0, n, 100_000):
            b = min(n, a + 100_000)
            lab = rng.integers(0, len(centres), b - a)
            v = centres[lab] + rng.standard_normal((b - a, e)).astype(np.float32) * (0.8 / math.sqrt(e))
            x[a:b] = v / np.linalg.norm(v, axis=1, keepdims=True)
        fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": "A01",
                               "Metadata_Site": np.arange(n, dtype=np.int64)})
        d = tmp / f"store-{n}"
        EmbeddingStore(x, fields, "", normalize=False).save(d)
        del x
        t = time.perf_counter()
        emb = np.load(d / "embeddings.npy", mmap_mode="r")
        idx = ann.build_index(emb, use_gpu=False)
        idx.save(d)
        t_build = time.perf_counter() - t
        store = EmbeddingStore.load(d, mmap=True)
        exact = search.ExactSearcher(store.embeddings)
        index = ann.load_index(d, embeddings=store.embeddings)
        qtexts = [f"A549 cells treated with compound: drug-{i}" for i in rng.choice(300, n_queries)]

        def timed(searcher, store=store, qtexts=qtexts):
            lat, rows = [], []
            for t_ in qtexts:
                t0 = time.perf_counter()
                q = search.encode_text_queries(model, t_)
                s, r = searcher.search(q, 10)
                search._results(store, r[0], s[0])
                lat.append(time.perf_counter() - t0)
                rows.append(r[0])
            return lat, np.array(rows)

        timed(exact)
        timed(index)  # warm-up (pages of the memory-mapped lists)
        le, re_ = timed(exact)
        la, ra = timed(index)
        # the public API path (uses ANN at/above the threshold)
        lp = []
        for t_ in qtexts:
            t0 = time.perf_counter()
            search.text_query(model, store, t_, top_k=10)
            lp.append(time.perf_counter() - t0)
        qv = search.encode_text_queries(model, qtexts)
        te = []
        for q in qv:
            t0 = time.perf_counter()
            exact.search(q[None], 10)
            te.append(time.perf_counter() - t0)
        ta = []
        for q in qv:
            t0 = time.perf_counter()
            index.search(q[None], 10)
            ta.append(time.perf_counter() - t0)
        # in-distribution queries too (stored vectors + noise)
        qi = ann._calibration_queries(store.embeddings, 200, np.random.default_rng(7))
        _, truth = ann.exact_topk(store.embeddings, qi, 10)
        _, got = index.search(qi, 10)
        out.append({
            "n": n, "exact_ms": 1000 * statistics.median(le), "ann_ms": 1000 * statistics.median(la),
            "api_ms": 1000 * statistics.median(lp), "api_uses_ann": n >= ann.ANN_THRESHOLD,
            "exact_rank_ms": 1000 * statistics.median(te), "ann_rank_ms": 1000 * statistics.median(ta),
            "recall_text": ann.recall_at_k(ra, re_), "recall_indist": ann.recall_at_k(got, truth),
            "nlist": index.meta["nlist"], "nprobe": index.nprobe, "build_s": t_build,
        })
        log(f"row 4: {out[-1]}")
        del store, exact, index, emb
    return out


_MEM_SNIPPET = r"""
import json, resource, sys, time
from napari_cellclip.pipeline import main
t = time.perf_counter()
rc = main(sys.argv[1:])
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "self_kb": hwm,  # VmHWM: peak RSS of this process (reset on exec, unlike ru_maxrss)
                  "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def row_memory(tmp: Path, sizes):
    import pandas as pd

    ckpt = tmp / "ckpt-morph"
    base = synth_fields(tmp / "fields128", 64, 128, seed=1)
    out = []
    for n in sizes:
        reps = int(math.ceil(n / len(base)))
        f = pd.concat([base] * reps, ignore_index=True).iloc[:n].copy()
        f["Metadata_Plate"] = [f"P{i // 3456}" for i in range(n)]
        f["Metadata_Site"] = np.arange(n)
        f.to_parquet(tmp / f"mem-{n}.parquet")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
        cmd = [sys.executable, "-c", _MEM_SNIPPET, "--data", str(tmp / f"mem-{n}.parquet"), "--checkpoint",
               str(ckpt), "--output", str(tmp / f"mem-job-{n}"), "--device", "cpu", "--batch-size", "32", "--no-cache",
               "--workers", "1", "--shard-size", "512", "--encoder-option", "size=64", "--quiet", "--ann", "never"]
        log(f"row 5: {n} fields")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["n"] = n
        out.append(r)
        log(f"row 5: {r}")
    return out


# ------------------------------------------------------------------------ report
def machine_info(device: str) -> str:
    import faiss
    import torch

    cpu = platform.processor() or ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1e6:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{cpu}, {os.cpu_count()} cores, {mem}, {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), faiss {faiss.__version__}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; load average at start {load[0]:.2f}")


def render(r1, r2, r4, r5, info, cmd, elapsed, r3=None, runs=None) -> str:
    L = [f"Machine: {info}", "", f"This run: `{cmd}` ({elapsed / 60:.1f} min)", ""]
    if runs:
        by_cmd = {}
        for key in sorted(runs):
            r = runs[key]
            extra = ", ".join(x for x in (f"{r['minutes']} min" if "minutes" in r else "",
                                          f"load average {r['load_average_at_start']} at its start"
                                          if "load_average_at_start" in r else "") if x)
            by_cmd.setdefault(r["command"], []).append(f"row {key[1:]}" + (f": {extra}" if extra else ""))
        L += ["Rows come from: " + "; ".join(f"`{c}` ({'; '.join(v)})" for c, v in by_cmd.items()), ""]
    L += ["| # | measurement | A | B | ratio A/B | goal | met |", "|---|---|---|---|---|---|---|"]
    if r1:
        f = r1["fps"]
        p_floor = f["pipeline"] / f["floor"]
        p_base = f["pipeline"] / f["baseline"]
        L.append(f"| 1 | DINOv2-S fields/s ({r1['n_fields']} fields, 1080², 5 ch × 1 crop, {r1['device']}): "
                 f"pipeline vs bare forward (floor) | {f['pipeline']:.3f} | {f['floor']:.3f} | {p_floor:.2f} | "
                 f"≥ 0.90 (CPU) | {'yes' if p_floor >= 0.9 else 'no'} |")
        L.append(f"| 1a | DINOv2-S fields/s: pipeline vs published-style baseline | {f['pipeline']:.3f} | "
                 f"{f['baseline']:.3f} | {p_base:.2f} | ≥ 3 (GPU only) | n/a on CPU |")
        enc = r1.get("encoder")
        if enc:
            gpu = str(r1["device"]).startswith("cuda")
            L.append(f"| 1b | encoder alone, {enc['size']}, {enc['crops_per_forward']} pre-decoded crops per forward, "
                     f"{enc['precision']}: achieved vs matmul GFLOP/s (same device, same run) | {enc['gflops']:.1f} | "
                     f"{enc['matmul_gflops']:.1f} | {enc['fraction']:.2f} | ≥ 0.50 (GPU) | "
                     f"{('yes' if enc['fraction'] >= 0.5 else 'no') if gpu else 'n/a on CPU'} |")
        if r1.get("decode_fps_per_worker"):
            dec = r1["decode_fps_per_worker"] * r1["workers"]
            L.append(f"| 1c | decode fields/s: one worker × {r1['workers']} workers vs the bare forward; the "
                     f"pipeline is bound by the smaller | {dec:.3f} | {f['floor']:.3f} | {dec / f['floor']:.2f} | "
                     f"— | pipeline bound {min(dec, f['floor']):.3f} fields/s |")
    if r2:
        f = r2["fps"]
        L.append(f"| 2 | morphology fields/s ({r2['n_fields']} fields, 1080²): pipeline vs bare forward | "
                 f"{f['pipeline']:.3f} | {f['floor']:.3f} | {f['pipeline'] / f['floor']:.2f} | — | — |")
        L.append(f"| 2a | morphology fields/s: pipeline vs features.extract_features | {f['pipeline']:.3f} | "
                 f"{f['extract_features']:.3f} | {f['pipeline'] / f['extract_features']:.2f} | — | — |")
        if "cold_cache" in f:
            L.append(f"| 2b | morphology fields/s: pipeline with its default feature cache, cold (files hashed, "
                     f"entries written) vs no cache | {f['cold_cache']:.3f} | {f['pipeline']:.3f} | "
                     f"{f['cold_cache'] / f['pipeline']:.2f} | — | — |")
            L.append(f"| 2c | morphology fields/s: pipeline with a warm feature cache (the plugin or training "
                     f"filled it) vs no cache | {f['warm_cache']:.3f} | {f['pipeline']:.3f} | "
                     f"{f['warm_cache'] / f['pipeline']:.2f} | — | — |")
    if r3:
        f, z = r3["sps"], r3["size"]
        ratio = f["optimised"] / f["naive"]
        gpu = r3["device"].startswith("cuda")
        L.append(f"| 3 | training steps/s from cached features ({r3['device']}, D={z['D']}, {z['layers']} layers, "
                 f"{z['heads']} heads, E={z['E']}, batch {z['batch']}, M={z['M']}, C={z['C']}, CWCL): fit path "
                 f"(vectorised CWCL, {r3['optimizer']} AdamW, {r3['precision']}, memmap bags) vs naive "
                 f"(per-channel loop, fp32, unfused AdamW) | {f['optimised']:.2f} | {f['naive']:.2f} | "
                 f"{ratio:.2f} | ≥ 2 (GPU) | {('yes' if ratio >= 2 else 'no') if gpu else 'n/a on CPU'} |")
    for q in r4 or []:
        goal = 50 if q["n"] <= 100_000 else 100
        L.append(f"| 4 | text query ms at {q['n']:,} (tokenise+encode+rank top-10): ANN vs exact "
                 f"(nlist {q['nlist']}, nprobe {q['nprobe']}; recall@10 text {q['recall_text']:.3f}, "
                 f"in-dist {q['recall_indist']:.3f}; API path {q['api_ms']:.1f} ms "
                 f"{'ANN' if q['api_uses_ann'] else 'exact'}) | {q['ann_ms']:.1f} | {q['exact_ms']:.1f} | "
                 f"{q['ann_ms'] / q['exact_ms']:.2f} | ≤ {goal} ms, recall ≥ 0.95 | "
                 f"{'yes' if _row4_met(q, goal) else 'no'} |")
        L.append(f"| 4r | rank only (no text encode) ms at {q['n']:,}: ANN vs exact | {q['ann_rank_ms']:.2f} | "
                 f"{q['exact_rank_ms']:.2f} | {q['ann_rank_ms'] / q['exact_rank_ms']:.3f} | — | — |")
    if r5 and len(r5) >= 2:
        a, b = r5[-1], r5[0]
        L.append(f"| 5 | peak RSS MB of the job, main process: {a['n']:,} vs {b['n']:,} fields | "
                 f"{a['self_kb'] / 1024:.0f} | {b['self_kb'] / 1024:.0f} | {a['self_kb'] / b['self_kb']:.2f} | "
                 f"≈ 1 (flat) | {'yes' if a['self_kb'] / b['self_kb'] < 1.15 else 'no'} |")
        L.append(f"| 5w | peak RSS MB, DataLoader worker: {a['n']:,} vs {b['n']:,} fields | "
                 f"{a['children_kb'] / 1024:.0f} | {b['children_kb'] / 1024:.0f} | "
                 f"{a['children_kb'] / max(b['children_kb'], 1):.2f} | ≈ 1 | "
                 f"{'yes' if a['children_kb'] / max(b['children_kb'], 1) < 1.15 else 'no'} |")
        L.append(f"| 5t | morphology@64 fields/s in those runs ({a['n']:,} vs {b['n']:,}) | "
                 f"{a['n'] / a['seconds']:.1f} | {b['n'] / b['seconds']:.1f} | "
                 f"{(a['n'] / a['seconds']) / (b['n'] / b['seconds']):.2f} | — | — |")
    return "\n".join(L)


def _row4_met(q: dict, goal: float) -> bool:
    return q["api_ms"] <= goal and (not q["api_uses_ann"] or min(q["recall_text"], q["recall_indist"]) >= 0.95)


def write_results(section: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results (issue 5)\n\n" + START + "\n" + END + "\n"
    if START not in text:
        text += "\n" + START + "\n" + END + "\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + "\n" + section + "\n" + END + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Measure how fast napari-cellclip embeds plates, trains, answers text queries and how much "
                    "memory it needs, each against a simpler way of doing the same in the same run, and print "
                    "the ratios (about 15 minutes on 2 CPU cores; --quick about 3).  The images are made up "
                    "on the spot; nothing is downloaded.",
        epilog="Rows: 1 = embedding with a DINOv2-small image model, 2 = embedding with the built-in "
               "morphology features, 3 = training steps per second, 4 = text-query time on 10 thousand to "
               "1 million stored fields, 5 = peak memory for 1 thousand vs 10 thousand fields.")
    ap.add_argument("--quick", action="store_true", help="fewer fields and smaller sizes: about 3 minutes")
    ap.add_argument("--device", default="auto",
                    help="where to run the models: auto (a GPU when there is one), cpu, cuda, cuda:1 … "
                         "(default: auto)")
    ap.add_argument("--rows", default="1,2,3,4,5",
                    help="which rows of the table to measure, e.g. 2,4 (default: all; the others are taken "
                         "from the last full run)")
    ap.add_argument("--no-write", action="store_true",
                    help="only print the table: leave benchmarks/RESULTS.md and benchmarks/bench_raw.json as they are")
    ap.add_argument("--workdir", default=None,
                    help="keep the made-up images and models in this folder (default: a temporary folder, deleted)")
    args = ap.parse_args(argv)
    rows = {int(r) for r in args.rows.split(",") if r.strip()}
    t0 = time.perf_counter()
    info = machine_info(args.device)
    log(info)
    q = args.quick
    cmd = "python benchmarks/bench.py" + (" --quick" if q else "") + \
        (f" --device {args.device}" if args.device != "auto" else "") + \
        (f" --rows {args.rows}" if args.rows != "1,2,3,4,5" else "")
    with tempfile.TemporaryDirectory(prefix="cellclip-bench-") as td:
        tmp = Path(args.workdir) if args.workdir else Path(td)
        tmp.mkdir(parents=True, exist_ok=True)
        runs = {}

        def timed(key, fn, *a):
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            t = time.perf_counter()
            out = fn(*a)
            runs[key] = {"command": cmd, "minutes": round((time.perf_counter() - t) / 60, 1),
                         "load_average_at_start": round(load, 2)}
            return out

        # 48 fields: the job's fixed start-up (worker process, first batch, merge: ~1 s) is then
        # a small part of a run, as it is on a real plate
        r1 = timed("r1", row_dinov2, tmp, 8 if q else 48, 1 if q else 2, args.device) if 1 in rows else None
        r2 = timed("r2", row_morphology, tmp, 8 if q else 32, 1 if q else 2, args.device) if 2 in rows else None
        if not (tmp / "ckpt-dino").exists():
            make_checkpoint(tmp / "ckpt-dino", f"hf:{make_dinov2(tmp / 'dinov2-small')}", 384)
        if not (tmp / "ckpt-morph").exists():
            make_checkpoint(tmp / "ckpt-morph", "morphology", 128)
        r3 = timed("r3", row_train, tmp, 4 if q else 10, 2 if q else 3, args.device) if 3 in rows else None
        r4 = timed("r4", row_query, tmp, [10_000, 100_000] if q else [10_000, 100_000, 1_000_000], 10 if q else 30) \
            if 4 in rows else None
        r5 = timed("r5", row_memory, tmp, [200, 2000] if q else [1000, 10_000]) if 5 in rows else None
    prev_path = HERE / "bench_raw.json"
    if rows != {1, 2, 3, 4, 5} and prev_path.exists():  # keep the other rows of the last run
        prev = json.loads(prev_path.read_text())
        r1 = r1 or prev.get("r1")
        r2 = r2 or prev.get("r2")
        r3 = r3 or prev.get("r3")
        r4 = r4 or prev.get("r4")
        r5 = r5 or prev.get("r5")
        for key in ("r1", "r2", "r3", "r4", "r5"):
            if key not in runs and prev.get(key) is not None:
                runs[key] = prev.get("runs", {}).get(key, {"command": prev.get("command", "?")})
    table = render(r1, r2, r4, r5, info, cmd, time.perf_counter() - t0, r3=r3, runs=runs)
    print(table)
    raw = {"r1": r1, "r2": r2, "r3": r3, "r4": r4, "r5": r5, "machine": info, "command": cmd, "runs": runs}
    if not args.no_write:
        (HERE / "bench_raw.json").write_text(json.dumps(raw, indent=1, default=str))
        write_results(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
