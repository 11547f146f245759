"""benchmarks/gpu_check.py in its CI form: on a CPU the CUDA-only checks SKIP and the rest PASS."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_green_on_the_cpu(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    # the ViT forward and the `pytest -m gpu` subprocess are the slow ones (run by hand / in the suite itself)
    only = "cuda_bf16,hf_sdpa,compile_graphs,morphology,fit,job,faiss_gpu,bench"
    rc = gpu_check.main(["--device", "cpu", "--short", "--no-write", "--only", only])
    out = capsys.readouterr().out
    assert rc == 0, out
    status = {line.split()[1]: line.split()[0] for line in out.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")}
    assert status["cuda_bf16"] == status["morphology"] == status["bench"] == "SKIP"
    assert status["hf_sdpa"] == status["compile_graphs"] == status["fit"] == status["job"] == "PASS"
    assert "FAIL" not in status.values() and len(status) == len(only.split(","))
    sys.modules.pop("gpu_check", None)
