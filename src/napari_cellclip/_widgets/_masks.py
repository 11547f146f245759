"""Labels layer data of one field's segmentation, computed in the widgets' background process.

Qt-free (the ``"cells"`` background process of :mod:`._workers` runs it, :mod:`._child`'s
``segment`` task); the :class:`~._segmentation.SegmentationWidget` adds the layers.
"""

from __future__ import annotations

from ._display import field_key

__all__ = ["LAYER_NAMES", "SEG_KEY", "segmentation_layer_data"]

#: names of the two Labels layers the segmentation widget keeps up to date
LAYER_NAMES = ("nuclei", "cells")
#: the layers' metadata key naming the field and the segmentation settings they show
SEG_KEY = "cellclip_segmentation"


def segmentation_layer_data(row, stains, *, nuclei_stain: str = "DNA", cell_stain: str = "RNA") -> list[tuple]:
    """Labels LayerData tuples ``[(nuclei, kwargs, "labels"), (cells, kwargs, "labels")]`` of one field.

    ``row`` is a fields-table row, ``stains`` its channel order.  The layers' metadata
    names the field (plate, well, site) and how many cells were found.
    """
    from ..images import load_field
    from ..segmentation import segment_field

    raw = load_field(row, list(stains))
    seg = segment_field(raw, list(stains), nuclei_stain=nuclei_stain, cell_stain=cell_stain)
    meta = {SEG_KEY: {"field": field_key(row), "n_cells": seg.n, "note": seg.note,
                      "nuclei_stain": nuclei_stain, "cell_stain": cell_stain}}
    return [(seg.nuclei, {"name": LAYER_NAMES[0], "metadata": dict(meta), "opacity": 0.5}, "labels"),
            (seg.cells, {"name": LAYER_NAMES[1], "metadata": dict(meta), "opacity": 0.6}, "labels")]
