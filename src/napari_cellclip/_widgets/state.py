"""The one evented object the CellCLIP widgets of a viewer share.

Widgets never reach into each other: the Search widget writes the embedding
store and the ranked results here, the Perturbation-map widget writes the
points a user selected here, and each listens to the fields it cares about
(``state.events.<field>.connect(...)``).  Workers never touch this object
from their thread: their results are written on the GUI thread when the
worker returns.

There is one state per viewer (:func:`get_state`), kept in a
:class:`weakref.WeakKeyDictionary` so that closing a viewer frees it; the state
holds no reference to its viewer.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from pathlib import Path
import os
from typing import Any, Optional

from psygnal import evented

__all__ = ["CellClipState", "get_state", "default_checkpoint", "FIELDS_KEY", "SOURCE_KEY"]

#: key of the fields table in the metadata of the image layers the reader makes
FIELDS_KEY = "cellclip_fields"
#: key of the path the layers were read from
SOURCE_KEY = "cellclip_source"

#: where ``python -m training fit`` (and the demo) writes its checkpoint
DEFAULT_CHECKPOINT = Path("checkpoints") / "cellclip-lincs-sample"


def default_checkpoint() -> str:
    """The checkpoint the Search widget starts with.

    ``$NAPARI_CELLCLIP_CHECKPOINT`` if set, else ``./checkpoints/cellclip-lincs-sample``
    (the one ``python -m training fit`` and the demo train).
    """
    env = os.environ.get("NAPARI_CELLCLIP_CHECKPOINT")
    if env:
        return env
    return str((Path.cwd() / DEFAULT_CHECKPOINT).resolve())


@evented(equality_operators={
    "fields": operator.is_,
    "model": operator.is_,
    "store": operator.is_,
    "results": operator.is_,
})
@dataclass(eq=False)
class CellClipState:
    """Shared state of the CellCLIP widgets of one viewer.

    Attributes
    ----------
    fields
        Fields table (pandas DataFrame) of the plate open in the viewer, as the
        reader put it into the layers' metadata (``FIELDS_KEY``).
    source
        Where that plate was read from.
    model_path, device
        Checkpoint directory and device (``auto/cuda/mps/cpu``) chosen in the Search widget.
    model
        What the background process loaded (``None`` until it has): a dict with the
        checkpoint's ``path``, ``device``, ``model_id``, ``stains``, ``image_encoder``.
        The model itself lives in that process (:mod:`._workers`), never here;
        ``model_key`` says which ``(path, device)`` was asked for.
    store
        Field-level :class:`~napari_cellclip.store.EmbeddingStore` of the plate.
    query
        Text of the last query (or a description of the last image / zero-shot query).
    results
        Ranked table shown in the Search widget (``rank``, ``score``, ``Metadata_*``
        and ``store_row``: the position of the field in ``store``), or ``None``.
    result_kind
        ``"text"``, ``"image"``, ``"zero_shot"`` or ``"selection"``.
    selection
        Positions (rows of ``store.fields``) of the fields the user selected, in
        the results table or on the map.
    """

    fields: Optional[Any] = None
    source: str = ""
    model_path: str = field(default_factory=default_checkpoint)
    device: str = "auto"
    model: Optional[Any] = None
    model_key: tuple = ()
    store: Optional[Any] = None
    query: str = ""
    results: Optional[Any] = None
    result_kind: str = ""
    selection: tuple = ()

    # ------------------------------------------------------------ helpers
    def hit_rows(self) -> list[int]:
        """Store rows of the current results (empty if none)."""
        res = self.results
        if res is None or "store_row" not in getattr(res, "columns", ()):
            return []
        return [int(r) for r in res["store_row"].dropna().tolist()]


_STATES: "weakref.WeakKeyDictionary[Any, CellClipState]" = weakref.WeakKeyDictionary()
_WATCHERS: "weakref.WeakKeyDictionary[Any, _LayerWatcher]" = weakref.WeakKeyDictionary()


class _LayerWatcher:
    """Keeps ``state.fields`` in step with the CellCLIP plate layers of a viewer.

    Connected to the viewer's layer-list events; holds only the state (never
    the viewer), so the WeakKeyDictionary entry can go away with the viewer.
    """

    def __init__(self, state: CellClipState):
        self.state = state

    def _take(self, layer) -> None:
        md = getattr(layer, "metadata", None) or {}
        fields = md.get(FIELDS_KEY)
        if fields is None or fields is self.state.fields:
            return
        self.state.source = str(md.get(SOURCE_KEY, ""))
        self.state.fields = fields

    def on_inserted(self, event) -> None:
        self._take(event.value)

    def on_active(self, event) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            self._take(layer)


def get_state(viewer) -> CellClipState:
    """The :class:`CellClipState` of ``viewer`` (made on first use).

    On creation the state takes the fields table of any CellCLIP plate already
    open and follows plates opened later.
    """
    state = _STATES.get(viewer)
    if state is not None:
        return state
    state = CellClipState()
    watcher = _LayerWatcher(state)
    layers = viewer.layers
    _WATCHERS[viewer] = watcher  # alive exactly as long as the viewer
    layers.events.inserted.connect(watcher.on_inserted)
    try:
        layers.selection.events.active.connect(watcher.on_active)
    except AttributeError:  # pragma: no cover - older napari
        pass
    for layer in layers:
        watcher._take(layer)
    _STATES[viewer] = state
    return state
