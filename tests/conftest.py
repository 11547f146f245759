"""Shared fixtures.  Qt-free at import time: fixtures needing Qt/napari import inside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
