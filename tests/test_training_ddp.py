"""`python -m training fit` under torch.distributed.run: 2 CPU processes, gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path, cellclip_cache_dir):
    # fill the feature cache first (rank 0 would do it anyway; keeps this test's time small)
    from napari_cellclip.sample import load_sample_fields
    from training.loop import extract

    extract(load_sample_fields(), "morphology", device="cpu", cache_dir=str(cellclip_cache_dir), progress=False)
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               NAPARI_CELLCLIP_CACHE=str(cellclip_cache_dir))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()),
           "-m", "training", "fit", "--epochs", "2", "--device", "cpu", "--output", str(out),
           "--embed-dim", "32", "--vision-layers", "1", "--no-progress", "--cache-dir", str(cellclip_cache_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cks = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(cks) == 1  # only rank 0 writes, once
    assert (out / "model" / "config.json").is_file()
    args = json.loads((out / "model" / "config.json").read_text())["training"]
    assert args["world_size"] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # one line per step, not per rank
