"""Embed a plate's fields of view with a CellCLIP checkpoint → :class:`EmbeddingStore`.

The path of one field::

    fields table row → stain planes (checkpoint's stain order)
      → frozen channel features (C, D)       encoders + features (cached on disk)
      → plate-effect correction              correction.apply, per config.feature_correction
      → model.encode_image(bag of M=1)       (E,), L2-normalised

Public API
----------
- :func:`load_model` ``(path, device="auto") -> CellCLIP``
- :func:`embed_fields` ``(fields, model, *, encoder=None, device="auto", cache_dir=None,
  batch_size=8, progress=None, should_stop=None, reuse=True) -> EmbeddingStore``
- :func:`embed_features` ``(features (N, C, D), model, ...) -> (N, E)`` float32 unit rows
- :func:`check_stains` ``(fields, model) -> fields`` in the checkpoint's stain order
- :func:`model_identity` ``(model) -> str`` (checkpoint identity used as ``store.model_id``)
- :func:`get_cached_encoder` / :func:`clear_encoder_cache`

torch is imported inside the functions (importing this module stays cheap).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import Cancelled, CellClipError, CellClipWarning, CheckpointError, PlateError
from .store import EmbeddingStore, StoreError, cache_key

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import ChannelEncoder
    from .model import CellCLIP

__all__ = [
    "load_model",
    "embed_fields",
    "embed_features",
    "check_stains",
    "model_identity",
    "get_cached_encoder",
    "clear_encoder_cache",
    "store_cache_dir",
]

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

#: model.encode_image batch size (the per-field work is tiny next to feature extraction)
ENCODE_BATCH = 256


# ------------------------------------------------------------------ checkpoints
def load_model(path: str | os.PathLike, device: str = "auto") -> CellCLIP:
    """Load a CellCLIP checkpoint folder (``config.json`` + ``model.safetensors`` + tokenizer).

    Returns the model in eval mode on ``device`` (``"auto"`` → cuda > mps > cpu), with
    ``model.checkpoint_dir`` set and its identity (:func:`model_identity`) computed once.
    A missing folder/file or a checkpoint that cannot be read raises :class:`CheckpointError`.
    """
    from .encoders import resolve_device
    from .model import CellCLIP

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint folder not found")
    if not p.is_dir():
        raise CheckpointError(f"{p}: a checkpoint is a folder (config.json + model.safetensors), not a file")
    for name in ("config.json", "model.safetensors"):
        if not (p / name).is_file():
            raise CheckpointError(f"{p}: not a CellCLIP checkpoint ({name} missing)")
    dev = resolve_device(device)
    try:
        model = CellCLIP.from_pretrained(p, device=dev)
    except CellClipError:
        raise
    except Exception as e:  # json / safetensors / shape errors from a damaged checkpoint
        raise CheckpointError(f"{p}: cannot load checkpoint ({type(e).__name__}: {e})") from e
    model.eval()
    if getattr(model, "checkpoint_dir", None) is None:
        try:
            model.checkpoint_dir = str(p)
        except Exception:  # pragma: no cover - exotic module attribute rules
            pass
    model._cellclip_id = model_identity(model, use_cached=False)
    return model


def _config_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config):
        d = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        d = dict(config.to_dict())
    else:
        d = dict(vars(config))
    fc = d.get("feature_correction")
    if isinstance(fc, dict):  # strip in-memory arrays (TVN state)
        d["feature_correction"] = {k: v for k, v in fc.items() if not str(k).startswith("_")}
    return d


def model_identity(model: Any, *, use_cached: bool = True) -> str:
    """Identity of a checkpoint: a hash of its config and of every weight tensor.

    Models from :func:`load_model` carry it precomputed (``model._cellclip_id``);
    otherwise it is computed from the state dict (≈0.1 s per 100 MB).  Two models with
    the same config and weights — in memory or reloaded from disk — get the same id.
    Returns 32 hex digits.
    """
    if use_cached:
        mid = getattr(model, "_cellclip_id", None)
        if mid:
            return str(mid)
    import torch

    h = hashlib.blake2b(digest_size=16)
    cfg = _config_dict(getattr(model, "config", {}))
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, t in sorted((getattr(model, "extra_tensors", None) or {}).items()):
        if torch.is_tensor(t):
            t = t.detach().cpu().contiguous()
            h.update(f"\0extra.{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    # TVN matrices live next to the weights and change the embeddings too
    spec = getattr(getattr(model, "config", None), "feature_correction", None)
    ckpt = getattr(model, "checkpoint_dir", None)
    if isinstance(spec, dict) and spec.get("state_file") and ckpt:
        f = Path(ckpt) / spec["state_file"]
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------ stains
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


# ------------------------------------------------------------------------ encode
def _model_device(model: Any):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def embed_features(
    features: np.ndarray,
    model: CellCLIP,
    *,
    batch_size: int = ENCODE_BATCH,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> np.ndarray:
    """Run ``model.encode_image`` on each field as a bag of one instance.

    ``features``: ``(N, C, D)`` (already corrected) → ``(N, E)`` float32, L2-normalised,
    computed on the model's device under ``torch.inference_mode``.
    ``progress(done, N)`` after each batch; ``should_stop()`` → :class:`Cancelled`.
    """
    import torch
    import torch.nn.functional as F

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 3:
        raise CellClipError(f"features must be (N, C, D), got shape {x.shape}")
    n = x.shape[0]
    dev = _model_device(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    out: list[np.ndarray] = []
    bs = max(1, int(batch_size))
    try:
        with torch.inference_mode():
            for start in range(0, n, bs):
                if should_stop is not None and should_stop():
                    raise Cancelled("embedding cancelled")
                xb = torch.from_numpy(x[start:start + bs]).to(dev)[:, None]  # (b, 1, C, D)
                e = model.encode_image(xb)
                e = F.normalize(e.float(), dim=-1)
                out.append(e.cpu().numpy().astype(np.float32))
                if progress is not None:
                    progress(min(start + bs, n), n)
    finally:
        if was_training:
            model.train()
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out, axis=0)


def store_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder where :func:`embed_fields` keeps finished stores (``<cache>/embeddings``)."""
    if cache_dir is None:
        from .features import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / "embeddings"


def _correction_spec(model: Any):
    spec = getattr(model.config, "feature_correction", None)
    if not spec:
        return None, None
    try:
        from . import correction
    except ImportError as e:
        raise CheckpointError(
            f"this checkpoint applies the plate-effect correction {spec!r}, but "
            f"napari_cellclip.correction cannot be imported ({e})"
        ) from e
    return correction, correction.spec_for_model(model, getattr(model, "checkpoint_dir", None))


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
    """Embed every field of ``fields`` with ``model`` → field-level :class:`EmbeddingStore`.

    Parameters
    ----------
    fields
        Fields table (``plates.read_plate`` + ``metadata.annotate``).  Its stains must
        include ``model.config.stains`` (reordered as needed; otherwise :class:`PlateError`).
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
        caching at all).  Finished stores
        are also kept under ``<cache_dir>/embeddings/<cache_key>`` and reused when the same
        fields are embedded with the same checkpoint again (``reuse=False`` recomputes).
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
    from . import features as features_mod
    from .encoders import resolve_device

    if not isinstance(fields, pd.DataFrame):
        raise PlateError(f"fields must be a fields table (pandas DataFrame), got {type(fields).__name__}")
    if len(fields) == 0:
        raise PlateError("the fields table is empty: nothing to embed")
    fields = fields.reset_index(drop=True)
    cfg = model.config
    fields = check_stains(fields, model)
    stains = list(getattr(cfg, "stains", None) or [])
    n = len(fields)

    dev = resolve_device(device)
    if _model_device(model) != dev:
        model.to(dev)

    if encoder is None:
        encoder = get_cached_encoder(cfg.image_encoder, dev)
    else:
        spec = getattr(encoder, "spec", None)
        if spec and getattr(cfg, "image_encoder", None) and spec != cfg.image_encoder:
            warnings.warn(
                f"the checkpoint was trained on '{cfg.image_encoder}' features but the encoder "
                f"given is '{spec}'; embeddings may be meaningless",
                CellClipWarning, stacklevel=2,
            )
    width = getattr(cfg, "vision_width", None)
    if width is not None and getattr(encoder, "dim", width) != width:
        raise CheckpointError(
            f"the image encoder '{getattr(encoder, 'spec', encoder)}' gives {encoder.dim}-dim channel "
            f"features but this checkpoint expects {width} (config.image_encoder = "
            f"'{getattr(cfg, 'image_encoder', '?')}')"
        )

    correction, spec = _correction_spec(model)
    model_id = model_identity(model)
    info_base = {
        "image_encoder": getattr(encoder, "spec", str(encoder)),
        "encoder_identity": getattr(encoder, "identity", ""),
        "stains": stains,
        "input_normalization": getattr(cfg, "input_normalization", "field"),
        "feature_correction": (correction.to_json(spec) if correction is not None else None),
        "n_input_fields": n,
    }

    # ---- reuse a finished store of the same data + checkpoint
    key = cache_key(fields, f"{model_id}|{info_base['encoder_identity']}")
    cached_path = None
    if reuse and cache_dir is not False:
        cached_path = store_cache_dir(cache_dir) / key
        if EmbeddingStore.exists(cached_path):
            try:
                store = EmbeddingStore.load(cached_path)
            except StoreError:
                store = None
            if store is not None and store.model_id == model_id:
                for _pos, msg in store.info.get("skipped", []):
                    warnings.warn(f"skipped field: {msg}", CellClipWarning, stacklevel=2)
                if progress is not None:
                    progress(n, n)
                return store

    # ---- frozen channel features
    def _extract_progress(done: int, tot: int) -> None:
        if progress is not None and done < n:  # (n, n) only once the store is complete
            progress(done, n)

    no_cache = cache_dir is False
    res = features_mod.extract_features(
        fields, encoder, stains=stains or None, cache_dir=None if no_cache else cache_dir,
        batch_size=batch_size, progress=_extract_progress, should_stop=should_stop,
        use_cache=not no_cache, normalization=getattr(cfg, "input_normalization", "field"),
    )
    index = np.asarray(res.index, dtype=np.int64)
    skipped = [[int(p), str(m)] for p, m in (res.skipped or [])]
    if index.size == 0:
        first = f"; first error: {skipped[0][1]}" if skipped else ""
        raise PlateError(f"none of the {n} fields could be read{first}")
    ok_fields = fields.iloc[index].reset_index(drop=True)
    feats = np.asarray(res.features, dtype=np.float32)

    # ---- plate-effect correction (statistics from this plate's controls)
    if spec is not None:
        feats = correction.apply(feats, ok_fields, spec)

    # ---- CellCLIP image tower
    m = len(index)
    emb = embed_features(feats, model, batch_size=max(ENCODE_BATCH, batch_size), should_stop=should_stop)
    if emb.shape[0] != m:  # pragma: no cover - defensive
        raise CellClipError(f"model returned {emb.shape[0]} embeddings for {m} fields")
    info = dict(info_base, skipped=skipped, n_embedded=m)
    store = EmbeddingStore(emb, ok_fields, model_id, level="field", info=info, normalize=False)
    if cached_path is not None:
        try:
            store.save(cached_path)
        except OSError as e:  # a read-only cache must not break embedding
            warnings.warn(f"could not cache embeddings in {cached_path}: {e}", CellClipWarning, stacklevel=2)
    if progress is not None:
        progress(n, n)
    return store
