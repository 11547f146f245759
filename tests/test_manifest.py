"""The npe2 manifest is installed with the package and valid; importing the plugin stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from npe2 import PluginManifest


def test_manifest_is_installed_and_valid():
    pm = PluginManifest.from_distribution("napari-cellclip")
    assert pm.name == "napari-cellclip"
    pm.validate_imports()  # every command's python_name resolves
    contrib = pm.contributions
    assert {w.display_name for w in contrib.widgets} == {"Search", "Perturbation map", "Cell segmentation"}
    assert contrib.readers and contrib.sample_data
    # the repository's top-level napari.yaml is the packaged manifest
    top = Path(__file__).resolve().parents[1] / "napari.yaml"
    assert top.resolve() == (Path(__file__).resolve().parents[1] / "src" / "napari_cellclip" / "napari.yaml")


def test_importing_the_plugin_does_not_import_heavy_libraries():
    code = (
        "import sys, napari_cellclip, napari_cellclip._widgets.search, napari_cellclip._widgets.perturbation_map, "
        "napari_cellclip._reader, napari_cellclip.plates, napari_cellclip.store, napari_cellclip.search, "
        "napari_cellclip._widgets._segmentation, napari_cellclip.segmentation, napari_cellclip.cellfeatures, "
        "napari_cellclip.celltable\n"
        "heavy = [m for m in ('torch', 'transformers', 'umap', 'faiss') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at plugin import: {out.stdout.strip()}"
