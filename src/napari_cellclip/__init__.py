"""napari-cellclip: text-to-phenotype search for Cell Painting in napari.

Importing this package is cheap: torch, transformers and umap are imported
only when a name that needs them is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CellCLIP": "napari_cellclip.model",
    "CellCLIPConfig": "napari_cellclip.model",
    "read_plate": "napari_cellclip.plates",
    "read_fields": "napari_cellclip.fields",
    "load_model": "napari_cellclip.checkpoints",
    "annotate": "napari_cellclip.metadata",
    "build_prompt": "napari_cellclip.prompts",
    "load_field": "napari_cellclip.images",
    "get_encoder": "napari_cellclip.encoders",
    "extract_features": "napari_cellclip.features",
    "embed_fields": "napari_cellclip.embed",
    "EmbeddingStore": "napari_cellclip.store",
    "CellClipError": "napari_cellclip.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_cellclip' has no attribute {name!r}")


def __dir__():
    return __all__
