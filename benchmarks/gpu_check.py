"""The first thing to run with a GPU for ten minutes: every GPU path of napari-cellclip once, PASS/FAIL each.

    python benchmarks/gpu_check.py [--device cuda] [--short] [--no-write]

Checks (each prints PASS, FAIL or SKIP with what it measured):

1. ``cuda_bf16``      CUDA visible, bf16 supported, a bf16 matmul runs
2. ``hf_sdpa``        an HF DINOv2 encoder on the device (flash SDPA kernel forced on CUDA) vs CPU fp32
3. ``giant_forward``  a ViT-g-sized encoder forward (ViT-S on a CPU): TFLOP/s, share of the matmul rate, peak memory
4. ``compile_graphs`` ``--compile``'s fixed shapes: one graph for three batch sizes
5. ``morphology``     the morphology encoder on the device vs the CPU
6. ``fit``            ``python -m training fit`` on the bundled plate on the device (a few epochs)
7. ``job``            the embedding job with ``cuda`` and ``cuda:0`` (``cpu`` on a CPU), same embeddings
8. ``faiss_gpu``      FAISS search on the GPUs vs the CPU index (when the installed faiss has GPUs)
9. ``gpu_tests``      the tests marked ``gpu`` (pytest -m gpu)
10. ``bench``         ``bench.py --quick --rows 1,2,3`` on the device (not with ``--short``)

On a machine without CUDA the CUDA-only checks are SKIPped and the rest run on the CPU; ``--short``
(what CI runs) also skips the benchmark.  Unless ``--no-write``, the results go into
benchmarks/RESULTS.md between the gpu_check markers, with the device's name.  Exit status 1 if
any check FAILs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "src"), str(REPO), str(HERE)]

START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"


class Skip(Exception):
    """A check that cannot run here (the reason is its message)."""


def _cuda(ctx):
    if ctx["dev"].type != "cuda":
        raise Skip("needs CUDA")


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _dinov2(folder: Path, d=64, layers=2, heads=2) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=4 * d, patch_size=14, image_size=224)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- checks
def check_cuda_bf16(ctx):
    import torch

    _cuda(ctx)
    if not torch.cuda.is_bf16_supported():
        raise AssertionError("this GPU has no bf16: training and encoders fall back to fp16 autocast")
    a = torch.randn(256, 256, device=ctx["dev"], dtype=torch.bfloat16)
    out = a @ a
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    return f"{torch.cuda.get_device_name(ctx['dev'])}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def check_hf_sdpa(ctx):
    import torch

    from napari_cellclip.encoders import get_encoder

    folder = _dinov2(ctx["tmp"] / "dinov2-check")
    x = torch.rand(4, 5, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = get_encoder(f"hf:{folder}", device="cpu", n_crops=1).encode(x)
    enc = get_encoder(f"hf:{folder}", device=ctx["dev"], n_crops=1)
    assert enc.model.config._attn_implementation == "sdpa", enc.model.config._attn_implementation
    if ctx["dev"].type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
            got = enc.encode(x)
        tol = 0.03
    else:
        got = enc.encode(x)
        tol = 1e-5
    rel = _rel(got, ref)
    assert rel < tol, f"relative difference to CPU fp32 {rel:.2e} ≥ {tol}"
    return f"{enc.precision} on {ctx['dev']}: relative difference to CPU fp32 {rel:.2e}"


def check_giant_forward(ctx):
    from bench import encoder_rate

    gpu = ctx["dev"].type == "cuda"
    r = encoder_rate(ctx["dev"], quick=ctx["short"], size="g" if gpu else "S",
                     crops=(256 if gpu else (4 if ctx["short"] else 16)))
    mem = f", peak memory {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
    return (f"{r['size']} {r['precision']}, {r['crops_per_forward']} crops: {r['gflops'] / 1e3:.2f} TFLOP/s = "
            f"{r['fraction']:.0%} of the {r['matmul_gflops'] / 1e3:.2f} TFLOP/s matmul rate{mem}")


def check_compile_graphs(ctx):
    import torch

    from napari_cellclip.pipeline import build_encoder

    folder = ctx["tmp"] / "dinov2-check"
    graphs = []

    def counting(gm, inputs):
        graphs.append(1)
        return gm.forward

    real = torch.compile
    torch._dynamo.reset()
    try:
        torch.compile = lambda m, **k: real(m, backend=counting, **k)  # the job's own call, counted
        enc = build_encoder(f"hf:{folder}", ctx["dev"], n_crops=1, batch_size=2, channels=5, compile_=True)
    finally:
        torch.compile = real
    for b in (1, 2, 3):
        enc.encode(torch.rand(b, 5, 224, 224))
    torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 batch sizes"
    return "1 graph for batches of 1, 2 and 3 fields (padded to one shape)"


def check_morphology(ctx):
    import torch

    from napari_cellclip.encoders import get_encoder

    _cuda(ctx)
    x = torch.rand(4, 5, 512, 512, generator=torch.Generator().manual_seed(1))
    ref = get_encoder("morphology", device="cpu").encode(x)
    got = get_encoder("morphology", device=ctx["dev"]).encode(x)
    rel = _rel(got, ref)
    assert rel < 1e-3, f"relative difference {rel:.2e}"
    return f"relative difference to the CPU {rel:.2e}"


def check_fit(ctx):
    from training.loop import fit

    out = fit(output=str(ctx["tmp"] / "fit"), epochs=3 if ctx["short"] else 20, device=str(ctx["dev"]),
              embed_dim=32, vision_layers=1, quiet=True, no_progress=True, cache_dir=str(ctx["tmp"] / "cache"))
    ctx["model"] = out["model"]
    return f"{out['steps']} steps in {out['train_seconds']} s, precision {out['precision']}, {out['optimizer']}"


def check_job(ctx):
    import numpy as np

    from napari_cellclip.pipeline import run_job
    from napari_cellclip.sample import load_sample_fields
    from napari_cellclip.store import EmbeddingStore

    if "model" not in ctx:
        raise Skip("needs the fit check's model")
    names = ["cuda", "cuda:0"] if ctx["dev"].type == "cuda" else ["cpu"]
    fields = load_sample_fields()
    embs = []
    for name in names:
        out = ctx["tmp"] / f"job-{name.replace(':', '')}"
        run_job(fields, ctx["model"], out, device=name, workers=1, quiet=True, ann="never",
                cache_dir=str(ctx["tmp"] / "cache"))
        embs.append(np.asarray(EmbeddingStore.load(out).embeddings))
    assert all(e.shape == embs[0].shape and np.allclose(e, embs[0], atol=1e-5) for e in embs)
    return f"{' and '.join(names)}: {len(embs[0])} fields embedded, same embeddings"


def check_faiss_gpu(ctx):
    import numpy as np

    try:
        import faiss
    except ImportError:
        raise Skip("faiss is not installed") from None
    if not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0):
        raise Skip(f"faiss {faiss.__version__} has no GPU support")
    from napari_cellclip import ann

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = ann.build_index(x)
    cpu = idx.search(x[:100], 10)[1]
    assert idx.use_gpu()
    gpu = idx.search(x[:100], 10, nprobe=idx.nprobe)[1]
    agree = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu, gpu)]))
    assert agree >= 0.95, f"GPU and CPU top-10 agree on {agree:.0%}"
    return f"{faiss.get_num_gpus()} GPU(s), nprobe {idx.nprobe}, top-10 agreement with the CPU index {agree:.0%}"


def check_gpu_tests(ctx):
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600, check=False)
    last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
    assert p.returncode in (0, 5), p.stdout[-2000:] + p.stderr[-2000:]
    return last


def check_bench(ctx):
    if ctx["short"]:
        raise Skip("--short")
    p = subprocess.run([sys.executable, str(HERE / "bench.py"), "--quick", "--rows", "1,2,3", "--device",
                        str(ctx["dev"]), "--no-write"], cwd=REPO, capture_output=True, text=True, env=_env(),
                       timeout=1800, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    ctx["bench_table"] = p.stdout
    rows = [line for line in p.stdout.splitlines() if line.startswith("| 1") or line.startswith("| 3")]
    return "; ".join(r.split("|")[1].strip() + ": " + r.split("|")[5].strip() for r in rows)


CHECKS = [("cuda_bf16", check_cuda_bf16), ("hf_sdpa", check_hf_sdpa), ("giant_forward", check_giant_forward),
          ("compile_graphs", check_compile_graphs), ("morphology", check_morphology), ("fit", check_fit),
          ("job", check_job), ("faiss_gpu", check_faiss_gpu), ("gpu_tests", check_gpu_tests), ("bench", check_bench)]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_checks(device: str, short: bool, only=None) -> tuple[list, dict]:
    from napari_cellclip.devices import resolve_device

    results = []
    with tempfile.TemporaryDirectory(prefix="cellclip-gpucheck-") as td:
        ctx = {"dev": resolve_device(device), "short": short, "tmp": Path(td)}
        for name, fn in CHECKS:
            if only and name not in only:
                continue
            t = time.perf_counter()
            try:
                status, detail = "PASS", fn(ctx)
            except Skip as e:
                status, detail = "SKIP", str(e)
            except Exception as e:  # noqa: BLE001 - every failure is reported, the other checks still run
                status, detail = "FAIL", f"{type(e).__name__}: {e}"
                traceback.print_exc()
            secs = time.perf_counter() - t
            results.append((name, status, detail, secs))
            print(f"{status:4} {name:15} {secs:6.1f} s  {detail}", flush=True)
        return results, ctx


def render(results, device_name: str, command: str, bench_table: str | None) -> str:
    lines = [f"Device: **{device_name}** — `{command}` ({time.strftime('%Y-%m-%d')})", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {n} | {s} | {t:.1f} | {d.replace('|', '/')} |" for n, s, d, t in results]
    if bench_table:
        lines += ["", "bench.py --quick --rows 1,2,3 on this device:", "", bench_table.strip()]
    return "\n".join(lines)


def write_results(section: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## GPU check (benchmarks/gpu_check.py)\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cuda, cuda:N or cpu")
    ap.add_argument("--short", action="store_true", help="smaller sizes and no benchmark (what CI runs)")
    ap.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    import torch

    only = {c.strip() for c in args.only.split(",")} if args.only else None
    results, ctx = run_checks(args.device, args.short, only)
    dev = ctx["dev"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU only ({os.cpu_count()} cores, no CUDA)"
    failed = [n for n, s, _, _ in results if s == "FAIL"]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed or skipped on {name}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if not args.no_write:
        cmd = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(render(results, name, cmd.strip(), ctx.get("bench_table")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
