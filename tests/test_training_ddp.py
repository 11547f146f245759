"""`python -m training fit` under torch.distributed.run: 2 CPU processes, gloo backend.

Two ranks with 2 wells each train on the same global batch of 4 wells as one process with
``--batch-size 4``: the loss all-gathers the global batch, so the logged losses and the final
weights must equal the single-process run's (up to float rounding; DDP averages gradients that
AdamW and gradient clipping make scale-free).  Bag augmentation is off: its random field
subsets are drawn per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARGS = {"epochs": 3, "embed_dim": 32, "vision_layers": 1, "bag_min_fields": 0, "seed": 4}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, cellclip_cache_dir):
    from safetensors.numpy import load_file

    from training.loop import fit

    # one process, global batch 4 (also fills the feature cache for the two ranks)
    single = fit(output=str(tmp_path / "single"), batch_size=4, device="cpu", cache_dir=str(cellclip_cache_dir),
                 quiet=True, no_progress=True, **ARGS)
    assert single["steps_per_epoch"] == 1 and single["batch_size"] == 4

    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               NAPARI_CELLCLIP_CACHE=str(cellclip_cache_dir))
    out = tmp_path / "ddp"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "training", "fit", "--device", "cpu", "--output", str(out),
           "--batch-size", "2", "--no-progress", "--cache-dir", str(cellclip_cache_dir), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    cks = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(cks) == 1  # only rank 0 writes, once
    args = json.loads((out / "model" / "config.json").read_text())["training"]
    assert args["world_size"] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]  # one line per step, not per rank
    assert [m["batch"] for m in metrics if "loss" in m] == [2, 2, 2]  # each rank: half the global batch

    # the same training as one process
    np.testing.assert_allclose(_losses(out), _losses(tmp_path / "single"), rtol=1e-5)
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=5e-5, err_msg=k)
    losses = _losses(out)
    assert losses[0] > losses[1] > losses[2]  # it trained: equality is not that of untouched weights
