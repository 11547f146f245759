"""Embed a plate's fields of view with a CellCLIP checkpoint → :class:`EmbeddingStore` (the plugin's road).

The path of a plate::

    fields table → fields_for_model        the checkpoint's stain order; prompts in its form
      → features.extract_features          frozen channel features (C, D), cached on disk
      → towers.image_embeddings            correction → pooling / CrossChannelFormer → L2,
                                           per field (bag of 1) and per well (bag of its fields)
      → EmbeddingStore(fields, wells)      kept under <cache>/embeddings for the next time

The embedding job (:mod:`napari_cellclip.pipeline`) walks the same road in shards; training's
evaluation uses the same towers.

Public API
----------
- :func:`embed_fields` ``(fields, model, *, encoder=None, device="auto", cache_dir=None,
  batch_size=8, progress=None, should_stop=None, reuse=True) -> EmbeddingStore``
- :func:`fields_for_model` ``(fields, model) -> fields`` in the checkpoint's stain order, prompts
  naming the checkpoint's cell line when the plate names none (a different one is warned about)
- :func:`check_stains` ``(fields, model) -> fields`` in the checkpoint's stain order
- :func:`get_cached_encoder` / :func:`clear_encoder_cache`
- :func:`load_model`, :func:`model_identity` (from :mod:`napari_cellclip.checkpoints`),
  :func:`embed_features` (from :mod:`napari_cellclip.towers`)

torch is imported inside the functions (importing this module stays cheap).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .checkpoints import load_model, model_identity, prompt_context
from .errors import CellClipError, CheckpointError, PlateError, warn_at_caller
from .store import EmbeddingStore, StoreError, cache_key
from .towers import ENCODE_BATCH, embed_features, image_embeddings

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import ChannelEncoder
    from .model import CellCLIP

__all__ = [
    "load_model",
    "embed_fields",
    "embed_features",
    "fields_for_model",
    "check_stains",
    "correction_spec",
    "model_identity",
    "get_cached_encoder",
    "clear_encoder_cache",
    "store_cache_dir",
]

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]
#: changes when what a cached store holds changes (v2: the model-pooled wells)
_STORE_KEY_VERSION = "store-v2"


# ------------------------------------------------------------------------ fields
def check_stains(fields: pd.DataFrame, model: Any) -> pd.DataFrame:
    """Return ``fields`` with its stain columns in the checkpoint's order.

    Raises :class:`PlateError` naming the stains the checkpoint needs, the ones the
    plate has and the missing ones.
    """
    from . import plates

    needed = list(getattr(model.config, "stains", None) or plates.DEFAULT_STAINS)
    have = list(plates.stains(fields))
    missing = [s for s in needed if s not in have]
    if missing:
        raise PlateError(
            f"this checkpoint needs the stains {needed} but the plate has {have} "
            f"(missing: {missing}); map the plate's channels to these stain names "
            "(channel_map when reading the plate)"
        )
    try:
        return plates.reorder_stains(fields, needed)
    except PlateError as e:
        raise PlateError(f"this checkpoint needs the stains {needed} but the plate has {have}: {e}") from e


def _plate_cell_lines(fields: pd.DataFrame) -> list[str]:
    if "Metadata_cell_line" not in fields.columns:
        return []
    return sorted({str(c).strip() for c in fields["Metadata_cell_line"].dropna() if str(c).strip()})


def fields_for_model(fields: pd.DataFrame, model: Any) -> pd.DataFrame:
    """``fields`` as ``model`` needs them: its stain order (:func:`check_stains`), and prompts in the
    form it was trained on (:func:`napari_cellclip.checkpoints.prompt_context`).

    A plate whose prompts name no cell line gets the checkpoint's; a plate naming another
    cell line than the checkpoint's keeps it, with a :class:`CellClipWarning` (typed queries and
    zero-shot candidates would not match what the model learned).
    """
    from .metadata import with_cell_line

    fields = check_stains(fields, model)
    ctx = prompt_context(model.config)
    if ctx is None or "Metadata_prompt" not in fields.columns:
        return fields
    have = _plate_cell_lines(fields)
    if not have and ctx.cell_line:
        return with_cell_line(fields, ctx.cell_line, ctx.templates)
    if have and have != [ctx.cell_line]:
        trained = f"{ctx.cell_line!r}" if ctx.cell_line else "no cell line"
        warn_at_caller(f"the plate's prompts name the cell line {', '.join(map(repr, have))} but the checkpoint was "
                       f"trained on prompts naming {trained} (e.g. {ctx.example()!r}); queries and zero-shot "
                       "scores compare texts the model did not learn")
    return fields


def correction_spec(model: Any):
    """``(correction module, spec)`` of the checkpoint's plate-effect correction, or ``(None, None)``."""
    spec = getattr(model.config, "feature_correction", None)
    if not spec:
        return None, None
    from . import correction

    return correction, correction.spec_for_model(model, getattr(model, "checkpoint_dir", None))


# ----------------------------------------------------------------------- encoders
_ENCODERS: dict[tuple[str, str], Any] = {}
_ENCODERS_LOCK = threading.Lock()


def get_cached_encoder(spec: str, device: Any = "auto") -> ChannelEncoder:
    """``encoders.get_encoder(spec, device)``, built once per (spec, device) and reused."""
    from .encoders import get_encoder, resolve_device

    dev = resolve_device(device)
    key = (str(spec), str(dev))
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(key)
        if enc is None:
            enc = get_encoder(spec, device=dev)
            _ENCODERS[key] = enc
    return enc


def clear_encoder_cache() -> None:
    """Forget the encoders built by :func:`get_cached_encoder` (frees GPU memory)."""
    with _ENCODERS_LOCK:
        _ENCODERS.clear()


def check_encoder(encoder, config) -> None:
    """Warn when ``encoder`` is not the checkpoint's; raise when its feature width differs."""
    spec = getattr(encoder, "spec", None)
    if spec and getattr(config, "image_encoder", None) and spec != config.image_encoder:
        warn_at_caller(f"the checkpoint was trained on '{config.image_encoder}' features but the encoder "
                       f"given is '{spec}'; embeddings may be meaningless")
    width = getattr(config, "vision_width", None)
    if width is not None and int(getattr(encoder, "dim", width)) != int(width):
        raise CheckpointError(
            f"the image encoder '{getattr(encoder, 'spec', encoder)}' gives {encoder.dim}-dim channel "
            f"features but this checkpoint expects {width} (config.image_encoder = "
            f"'{getattr(config, 'image_encoder', '?')}')")


# ------------------------------------------------------------------------ embed
def store_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder where :func:`embed_fields` keeps finished stores (``<cache>/embeddings``)."""
    if cache_dir is None:
        from .features import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / "embeddings"


def _cached_store(path: Path, model_id: str) -> EmbeddingStore | None:
    if not EmbeddingStore.exists(path):
        return None
    try:
        store = EmbeddingStore.load(path)
    except StoreError:
        return None
    if store.model_id != model_id:
        return None
    for _pos, msg in store.info.get("skipped", []):
        warn_at_caller(f"skipped field: {msg}")
    return store


def embed_fields(
    fields: pd.DataFrame,
    model: CellCLIP,
    *,
    encoder: ChannelEncoder | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    reuse: bool = True,
) -> EmbeddingStore:
    """Embed every field of ``fields`` with ``model`` → field-level :class:`EmbeddingStore` with
    the model's well embeddings (``store.well_level()``).

    Parameters
    ----------
    fields
        Fields table (:func:`napari_cellclip.fields.read_fields`).  Its stains must include
        ``model.config.stains`` (reordered as needed; otherwise :class:`PlateError`); its prompts
        are put in the checkpoint's form (:func:`fields_for_model`).
    model
        A :class:`~napari_cellclip.model.CellCLIP` (e.g. from :func:`load_model`).  It is
        moved to ``device`` (in place) and run in eval mode.
    encoder
        Frozen channel encoder; default: ``model.config.image_encoder`` built on ``device``
        and cached for the process (:func:`get_cached_encoder`).
    device
        ``"auto"`` | ``"cpu"`` | ``"cuda[:N]"`` | ``"mps"``.
    cache_dir
        Feature cache folder (``None``: ``features.default_cache_dir()``; ``False``: no
        caching at all).  Finished stores are also kept under ``<cache_dir>/embeddings/<key>``
        and reused when the same fields are embedded with the same checkpoint again
        (``reuse=False`` recomputes).
    batch_size
        Fields per feature-extraction batch.
    progress
        ``progress(done, total)`` with ``total = len(fields)``, after each feature batch:
        ``done`` counts the fields read and encoded so far.  ``(total, total)`` is reported
        once, when the store is complete (after the model tower and the store cache write).
    should_stop
        Polled between batches; returning True raises :class:`~napari_cellclip.errors.Cancelled`.

    Fields whose images cannot be read are skipped (a :class:`CellClipWarning` names the
    file, see ``features.extract_features``) and left out of the store;
    ``store.info["skipped"]`` lists ``[row position in fields, message]``.
    If no field can be read, :class:`PlateError` is raised.
    """
    from .encoders import resolve_device

    if not isinstance(fields, pd.DataFrame):
        raise PlateError(f"fields must be a fields table (pandas DataFrame), got {type(fields).__name__}")
    if len(fields) == 0:
        raise PlateError("the fields table is empty: nothing to embed")
    fields = fields_for_model(fields.reset_index(drop=True), model)
    total = len(fields)
    dev = resolve_device(device)
    if next(iter(model.parameters())).device != dev:
        model.to(dev)
    if encoder is None:
        encoder = get_cached_encoder(model.config.image_encoder, dev)
    check_encoder(encoder, model.config)
    model_id = model_identity(model)
    key = cache_key(fields, f"{model_id}|{getattr(encoder, 'identity', '')}|{_STORE_KEY_VERSION}")
    cached_path = store_cache_dir(cache_dir) / key if reuse and cache_dir is not False else None
    store = _cached_store(cached_path, model_id) if cached_path is not None else None
    if store is None:
        store = _embed(fields, model, encoder, model_id, cache_dir=cache_dir, batch_size=batch_size,
                       progress=progress, should_stop=should_stop)
        if cached_path is not None:
            try:
                store.save(cached_path)
            except OSError as e:  # a read-only cache must not break embedding
                warn_at_caller(f"could not cache embeddings in {cached_path}: {e}")
    if progress is not None:
        progress(total, total)
    return store


def _embed(fields: pd.DataFrame, model, encoder, model_id: str, *, cache_dir, batch_size: int,
           progress: ProgressFn | None, should_stop: StopFn | None) -> EmbeddingStore:
    """Features (cached) → towers → store.  ``progress(done, n)`` per feature batch, below ``n``:
    the caller reports ``(n, n)`` once the store is complete."""
    from . import features as features_mod

    n = len(fields)
    cfg = model.config
    no_cache = cache_dir is False
    res = features_mod.extract_features(
        fields, encoder, stains=list(cfg.stains) or None, cache_dir=None if no_cache else cache_dir,
        batch_size=batch_size, progress=(lambda d, t: d < n and progress(d, n)) if progress else None,
        should_stop=should_stop, use_cache=not no_cache, normalization=getattr(cfg, "input_normalization", "field"))
    skipped = [[int(p), str(m)] for p, m in (res.skipped or [])]
    if len(res.index) == 0:
        first = f"; first error: {skipped[0][1]}" if skipped else ""
        raise PlateError(f"none of the {n} fields could be read{first}")
    ok_fields = fields.iloc[np.asarray(res.index, dtype=np.int64)].reset_index(drop=True)
    correction, spec = correction_spec(model)
    emb = image_embeddings(
        model, res.features, ok_fields, correction_spec=spec, batch_size=max(ENCODE_BATCH, batch_size),
        should_stop=should_stop)
    if emb.fields.shape[0] != len(ok_fields):  # pragma: no cover - defensive
        raise CellClipError(f"model returned {emb.fields.shape[0]} embeddings for {len(ok_fields)} fields")
    info = {"image_encoder": getattr(encoder, "spec", str(encoder)),
            "encoder_identity": getattr(encoder, "identity", ""),
            "stains": list(cfg.stains), "input_normalization": getattr(cfg, "input_normalization", "field"),
            "feature_correction": correction.to_json(spec) if correction is not None else None,
            "n_input_fields": n, "skipped": skipped, "n_embedded": len(ok_fields)}
    wells = EmbeddingStore(emb.wells, emb.well_table, model_id, level="well", normalize=False,
                           info=dict(info, well_pooling="model"))
    return EmbeddingStore(emb.fields, ok_fields, model_id, level="field", info=info, normalize=False, wells=wells)
