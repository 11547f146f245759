"""napari widgets of napari-cellclip (Qt lives only here, in _reader.py and _sample_data.py).

* :class:`~.search.SearchWidget` — embed the open plate, query by text / by example, zero-shot, CSV.
* :class:`~.perturbation_map.PerturbationMapWidget` — UMAP/PCA map of the embeddings, parquet.
* :mod:`.state` — the evented object the widgets of one viewer share.

Nothing heavy is imported here; torch / transformers / umap load inside the jobs.
"""

from __future__ import annotations

__all__ = ["SearchWidget", "PerturbationMapWidget", "get_state"]


def __getattr__(name: str):
    if name == "SearchWidget":
        from .search import SearchWidget

        return SearchWidget
    if name == "PerturbationMapWidget":
        from .perturbation_map import PerturbationMapWidget

        return PerturbationMapWidget
    if name == "get_state":
        from .state import get_state

        return get_state
    raise AttributeError(name)
