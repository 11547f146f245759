"""The bundled real LINCS Cell Painting subset (see sample_data/README.md)."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).parent / "sample_data" / "lincs"
SAMPLE_PLATE = "SQ00015198"


def sample_root() -> Path:
    """Folder holding ``images/``, ``platemap/`` and ``nuclei/`` of the bundled subset."""
    return _ROOT


def sample_plate_dir() -> Path:
    """Folder of the bundled plate (Phenix PNGs + CellProfiler ``load_data.csv``)."""
    return _ROOT / "images" / SAMPLE_PLATE


def sample_platemap_dir() -> Path:
    """Folder with ``barcode_platemap.csv``, the platemap and the Drug Repurposing Hub annotations."""
    return _ROOT / "platemap"


def load_sample_fields():
    """The bundled plate as an annotated fields table (metadata joined, prompts built)."""
    from .fields import read_fields

    return read_fields(sample_plate_dir(), platemap=sample_platemap_dir(), cell_line="A549")
