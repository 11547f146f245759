"""Shared fixtures.  Qt-free at import time: fixtures needing Qt/napari import inside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: where ../shared is looked for, unless NAPARI_CELLCLIP_SHARED names the folder
SHARED_ENV = "NAPARI_CELLCLIP_SHARED"


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
