"""The background process of the widgets: runs the heavy core calls away from napari's GUI.

:mod:`._workers` starts one such process per kind of work (``"model"``: checkpoint
loading, plate embedding, text queries, zero-shot, the hit gallery; ``"map"``: 2-D
maps; ``"cells"``: segmentation masks and per-cell tables) with the ``spawn`` start
method and talks to it over a pipe.  Running torch,
the image decoders and numba in another process keeps napari's event loop free even
when they hold the GIL for seconds (imports, UMAP's compilation) or the CPU is busy,
gives a real cancel (the process is terminated when a polite cancel is not heeded)
and frees the GPU memory with the process.

Messages from the GUI: ``("run", job_id, task, payload, env)``, ``("forget", token)``,
``("stop",)``.  Messages to the GUI: ``("progress", job_id, done, total)``,
``("status", text, ready)``, ``("warning", job_id, category, is_cellclip, text)``,
``("done", job_id, result)``, ``("cancelled", job_id)``,
``("error", job_id, kind, message, details)``.

Each task is one call into the core.  This module imports neither Qt nor napari
(the process never loads them); torch, transformers and umap load in a background
thread as soon as the process starts ("warming"), so the first job finds them ready.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable

__all__ = ["main", "TASKS", "ENV_PREFIX"]

#: environment variables copied from the GUI process into each job (e.g. the cache folder)
ENV_PREFIX = "NAPARI_CELLCLIP_"
#: size of a 2-D map computed to compile UMAP while warming (numba compiles on first use)
_WARM_MAP_POINTS = 32

TASKS: dict[str, Callable[..., Any]] = {}


def _task(fn):
    TASKS[fn.__name__] = fn
    return fn


class _Child:
    """State of the background process: loaded models and the stores the GUI sent."""

    def __init__(self, conn, cancel, kind: str):
        self.conn, self.cancel, self.kind = conn, cancel, kind
        self.send_lock = threading.Lock()
        self.models: dict[tuple, Any] = {}
        self.model_lock = threading.Lock()
        self.stores: dict[str, Any] = {}
        self.job_id = -1
        self._last_progress: tuple = ()

    # ---------------------------------------------------------------- messages
    def send(self, *msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def progress(self, done: int, total: int) -> None:
        key = (self.job_id, int(done), int(total))
        if key != self._last_progress:
            self._last_progress = key
            self.send("progress", self.job_id, int(done), int(total))

    def should_stop(self) -> bool:
        return self.cancel.value == self.job_id

    def status(self, text: str, ready: bool = False) -> None:
        self.send("status", text, ready)

    # ---------------------------------------------------------------- helpers
    def model(self, path: str, device: str):
        """The checkpoint at ``path`` on ``device``, loaded once (only the latest is kept)."""
        from ..embed import load_model

        key = (str(path), str(device))
        with self.model_lock:
            if key not in self.models:
                self.models.clear()  # one model at a time: GPU memory
                self.models[key] = load_model(path, device)
            return self.models[key]

    def store(self, spec: dict):
        """A store the GUI sends (kept under its token) or one sent or made before."""
        token = spec["token"]
        if spec.get("store") is not None:
            self.stores[token] = spec["store"]
        try:
            return self.stores[token]
        except KeyError:
            raise RuntimeError(f"the background process lost embedding store {token}") from None


def model_info(model, path: str) -> dict:
    """What the GUI needs to know about a loaded checkpoint (it never holds the model itself)."""
    from ..checkpoints import prompt_context

    cfg = model.config
    dev = next(iter(model.parameters())).device
    ctx = prompt_context(cfg)
    return {"path": str(path), "device": str(dev), "model_id": getattr(model, "_cellclip_id", ""),
            "stains": list(getattr(cfg, "stains", None) or []),
            "image_encoder": getattr(cfg, "image_encoder", ""), "embed_dim": int(cfg.embed_dim),
            "prompt_example": ctx.example() if ctx is not None else None}


# ----------------------------------------------------------------------- tasks
@_task
def load(child: _Child, path: str, device: str) -> dict:
    """Load a checkpoint (or find it loaded) → its info."""
    return model_info(child.model(path, device), path)


@_task
def embed(child: _Child, path: str, device: str, fields, token: str):
    """Embed a plate → ``(model info, field-level store)``; the store stays here as ``token``."""
    from ..embed import embed_fields

    model = child.model(path, device)
    if child.should_stop():
        from ..errors import Cancelled

        raise Cancelled()
    store = embed_fields(fields, model, device=device, progress=child.progress, should_stop=child.should_stop)
    store._engine_token = token
    child.stores[token] = store
    return model_info(model, path), store


@_task
def text_query(child: _Child, path: str, device: str, store: dict, text, top_k: int, level: str):
    from ..search import text_query as run

    return run(child.model(path, device), child.store(store), text, top_k=top_k, level=level)


@_task
def more_like_this(child: _Child, store: dict, row: int, top_k: int, level: str):
    from ..search import more_like_this as run

    return run(child.store(store), row, top_k=top_k, level=level)


@_task
def zero_shot(child: _Child, path: str, device: str, store: dict, prompts, level: str):
    from ..search import zero_shot as run

    return run(child.model(path, device), child.store(store), prompts, level=level)


@_task
def gallery(child: _Child, fields, stains, luts, size: int):
    from ._gallery import build_gallery

    return build_gallery(fields, stains, luts, size, progress=child.progress, should_stop=child.should_stop)


@_task
def segment(child: _Child, row: dict, stains, nuclei_stain: str, cell_stain: str):
    """Nuclei and cell masks of one field, as Labels layer data."""
    from ._masks import segmentation_layer_data

    return segmentation_layer_data(row, stains, nuclei_stain=nuclei_stain, cell_stain=cell_stain)


@_task
def cell_table(child: _Child, fields, path: str, nuclei_stain: str, cell_stain: str) -> dict:
    """One row per cell of every field of ``fields`` written to ``path`` → the export's summary."""
    from ..celltable import export_cell_table

    return export_cell_table(fields, path, nuclei_stain=nuclei_stain, cell_stain=cell_stain,
                             progress=child.progress, should_stop=child.should_stop)


@_task
def map_2d(child: _Child, X, method: str, random_state: int):
    from ..reduce import MIN_UMAP_POINTS, embed_2d

    used = "pca" if method == "pca" or len(X) < MIN_UMAP_POINTS else "umap"
    return embed_2d(X, method=method, random_state=random_state), used


@_task
def export_profiles(child: _Child, store: dict, folder: str) -> dict:
    """Write a store's field and well profiles (pycytominer convention) → their paths."""
    from ..profiles import write_store_profiles

    return {k: str(v) for k, v in write_store_profiles(child.store(store), folder).items()}


# ---------------------------------------------------------------------- warming
def _warm(child: _Child) -> None:
    """Import (and for maps, compile) what the jobs of this kind need, saying what is happening."""
    try:
        if child.kind == "map":
            child.status("loading UMAP…")
            import numpy as np

            from ..reduce import embed_2d

            child.status("compiling UMAP (first map of this session only, about a minute)…")
            embed_2d(np.random.default_rng(0).normal(size=(_WARM_MAP_POINTS, 8)).astype("float32"), method="umap")
        elif child.kind == "cells":
            child.status("loading scikit-image and cp-measure…")
            from .. import celltable, segmentation  # noqa: F401
        else:
            child.status("loading torch…")
            import torch  # noqa: F401

            child.status("loading the model code…")
            from .. import embed, features, model, search  # noqa: F401
            from ..encoders import morphology  # noqa: F401
        child.status("ready", True)
    except Exception as exc:  # noqa: BLE001 - a job will report the real error
        child.status(f"could not prepare ({type(exc).__name__}: {exc})", True)


# ------------------------------------------------------------------------ loop
def _apply_env(env: dict) -> None:
    for k in [k for k in os.environ if k.startswith(ENV_PREFIX) and k not in env]:
        del os.environ[k]
    os.environ.update(env)


def _run(child: _Child, job_id: int, task: str, payload: dict) -> None:
    from ..errors import Cancelled, CellClipError

    child.job_id = job_id
    try:
        result = TASKS[task](child, **payload)
    except Cancelled:
        child.send("cancelled", job_id)
    except CellClipError as exc:
        child.send("error", job_id, "cellclip", str(exc), type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - reported to the user, traceback on stderr
        details = traceback.format_exc()
        print(details, file=sys.stderr, flush=True)
        child.send("error", job_id, "other", f"{type(exc).__name__}: {exc}", details)
    else:
        child.send("done", job_id, result)
    finally:
        child.job_id = -1


def main(conn, cancel, kind: str) -> None:
    """Entry point of the background process (``multiprocessing`` spawn target)."""
    from ..errors import CellClipWarning

    child = _Child(conn, cancel, kind)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        child.send("warning", child.job_id, getattr(category, "__name__", str(category)),
                   isinstance(category, type) and issubclass(category, CellClipWarning), str(message))

    warnings.showwarning = showwarning
    warnings.simplefilter("always", CellClipWarning)
    threading.Thread(target=_warm, args=(child,), name="cellclip-warm", daemon=True).start()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "forget":
            child.stores.pop(msg[1], None)
        elif msg[0] == "run":
            _, job_id, task, payload, env = msg
            _apply_env(env)
            t0 = time.perf_counter()
            _run(child, job_id, task, payload)
            if os.environ.get(ENV_PREFIX + "DEBUG"):
                print(f"[cellclip child {kind}] {task} took {time.perf_counter() - t0:.2f}s", file=sys.stderr)
