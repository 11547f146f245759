"""The feature engine: frozen per-channel features of a fields table, batched, with an on-disk cache.

One road for every caller (the plugin's :func:`napari_cellclip.embed.embed_fields`, the
embedding job :mod:`napari_cellclip.pipeline`, training): :func:`iter_features` runs one
torch ``DataLoader`` over the fields (:class:`FieldSource`, one collate), where each worker
process, per field, looks the field up in the cache or decodes its channel files and runs the
encoder's picklable preparation (``encoder.field_prep``: rescale to [0, 1] by the field's own
percentiles or its plate's range, keep the region the encoder sees); the main process puts each
batch through ``encoder.encode`` on the device (from pinned memory on CUDA), writes new cache
entries and yields a :class:`FeatureBatch`.  :func:`extract_features` collects it into a
``(N_ok, C, D)`` array with progress and cancel.  A concatenated encoder (``"morphology+cells"``,
:mod:`napari_cellclip.encoders.concat`) takes this road once per part, over the same batches,
each part under its own cache identity, and the parts' features are joined per channel.

Cache layout (``default_cache_dir()`` unless ``cache_dir`` is given)::

    <cache_dir>/<encoder identity hash, 16 hex>/
        encoder.json                 # the full identity string, for humans
        <key[:2]>/<key>.npy          # float32 (C, D), one per field
    <cache_dir>/plate-ranges/<key[:2]>/<key>.npy   # (C, 2) per-plate intensity range

``key`` is a blake2b digest of: the encoder identity, the normalisation
parameters (the percentiles, or under plate normalisation the plate's fixed
per-channel range itself), and, per channel in order, the stain name, the content digest of
the channel's data (:func:`images.channel_digest`: a file's raw bytes, or an OME-Zarr field's
metadata and array chunks) and the frame index (channel in a multi-channel file) — so a cached
field is never decoded, and a changed file, stain order, frame, normalisation or
encoder gives a new key.  A plate's range is keyed by the digests of the fields it is sampled
from.  Entries are written atomically (:mod:`napari_cellclip._fsutil`), so a cancelled or
killed job leaves only complete entries; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ._fsutil import atomic_save_npy, atomic_write_text, load_npy
from .errors import Cancelled, CellClipError, CorruptFileError, ImageReadError, warn_at_caller
from .images import NORM_HIGH, NORM_LOW

_KEY_VERSION = "features-v1"

__all__ = ["FeatureResult", "FeatureBatch", "FeatureCache", "default_cache_dir", "extract_features",
           "iter_features", "field_cache_key", "clear_cache", "NORM_LOW", "NORM_HIGH"]


@dataclass
class FeatureResult:
    """Output of :func:`extract_features`.

    features : float32 ``(N_ok, C, D)``; index : int64 ``(N_ok,)`` row positions
    in the fields table; skipped : ``[(row position, message)]`` of fields that
    could not be read; stains : channel order of ``features``; n_cached /
    n_encoded : how many fields came from the cache / were encoded now.
    """

    features: np.ndarray
    index: np.ndarray
    skipped: list = field(default_factory=list)
    stains: list = field(default_factory=list)
    n_cached: int = 0
    n_encoded: int = 0


@dataclass
class FeatureBatch:
    """One batch of :func:`iter_features`: ``features`` (n, C, D) float32 of the table rows
    ``positions`` (n,), ``errors`` ``[(position, message, path or None)]`` of the batch's rows
    that could not be read, and how many rows came from the cache / were encoded now (the first
    ``n_cached`` positions are the cached rows)."""

    positions: np.ndarray
    features: np.ndarray
    errors: list
    n_cached: int
    n_encoded: int


def default_cache_dir() -> Path:
    """``$NAPARI_CELLCLIP_CACHE`` or ``$XDG_CACHE_HOME/napari-cellclip/features``
    (``~/.cache/napari-cellclip/features`` when XDG_CACHE_HOME is unset)."""
    env = os.environ.get("NAPARI_CELLCLIP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "napari-cellclip" / "features"


def clear_cache(cache_dir=None) -> None:
    """Delete the feature cache folder (all encoders)."""
    import shutil

    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if d.exists():
        shutil.rmtree(d)


# -- keys --------------------------------------------------------------------
def _hash_channels(h, row, stains: Sequence[str]) -> None:
    """Each channel's stain, content digest (:func:`images.channel_digest`: a file's bytes, or an
    OME-Zarr field's metadata and chunks) and frame; an unreadable one is an ImageReadError naming it."""
    from .images import channel_digest, channel_frame

    for stain in stains:
        frame = channel_frame(row, stain)
        h.update(f"{stain}\0{channel_digest(row, stain)}\0{'' if frame is None else frame}\0".encode())


def field_cache_key(row, stains: Sequence[str], encoder_identity: str,
                    low: float = NORM_LOW, high: float = NORM_HIGH, ranges=None) -> str:
    """Cache key of one field (see module doc); raises ImageReadError for a missing file.

    ``ranges``: the field's fixed (C, 2) intensity range under plate normalisation
    (None: per-field percentiles ``low``/``high``).
    """
    from .images import row_value

    h = hashlib.blake2b(digest_size=20)
    if ranges is None:
        norm = f"p{low:g}-{high:g}"
    else:
        norm = "range:" + ",".join(f"{float(v):.7g}" for v in np.asarray(ranges).ravel())
    h.update(f"{_KEY_VERSION}\0{encoder_identity}\0norm={norm}\0".encode())
    axes = row_value(row, "Metadata_ChannelAxes")
    if axes:
        h.update(f"axes={axes}\0".encode())
    _hash_channels(h, row, stains)
    return h.hexdigest()


# -- the cache ---------------------------------------------------------------
def _entry_path(folder: Path, key: str) -> Path:
    return folder / key[:2] / f"{key}.npy"


def _load_entry(path: Path, shape: tuple) -> np.ndarray | None:
    """The cached array, or None to recompute (and overwrite) it: missing, damaged (said in a
    warning), without a checksum, or of another shape."""
    try:
        arr = load_npy(path)
    except CorruptFileError as exc:
        if not exc.unverified:
            warn_at_caller(f"feature cache entry {exc}; recomputed")
        return None
    except OSError:
        return None
    if arr.shape != tuple(shape) or arr.dtype != np.float32 or not np.all(np.isfinite(arr)):
        return None
    return arr


class FeatureCache:
    """The on-disk feature cache of one encoder (see the module doc); picklable for workers.

    Creating it writes ``encoder.json``: an unwritable cache folder is a CellClipError naming it.
    """

    def __init__(self, root, encoder):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.identity = str(encoder.identity)
        self.folder = self.root / hashlib.blake2b(self.identity.encode(), digest_size=8).hexdigest()
        meta = self.folder / "encoder.json"
        if not meta.exists():
            try:
                atomic_write_text(meta, json.dumps({"spec": getattr(encoder, "spec", ""), "identity": self.identity,
                                                    "dim": int(encoder.dim)}, indent=1))
            except OSError as exc:
                raise CellClipError(f"feature cache folder {self.folder} is not writable: {exc}") from None

    def key(self, row, stains, ranges, low: float, high: float) -> str:
        return field_cache_key(row, stains, self.identity, low, high, ranges)

    def load(self, key: str, shape: tuple) -> np.ndarray | None:
        return _load_entry(_entry_path(self.folder, key), shape)

    def save(self, key: str, features: np.ndarray) -> None:
        atomic_save_npy(_entry_path(self.folder, key), np.ascontiguousarray(features, dtype=np.float32))


def _plate_range_path(root: Path | None, fields, rows, stains, low, high) -> Path | None:
    """Where a plate's range is cached: keyed by the content of the fields it is sampled from
    (None without a cache, or when a sampled file cannot be hashed: then it is computed, not cached)."""
    from . import images

    if root is None:
        return None
    h = hashlib.blake2b(digest_size=20)
    h.update(f"plate-ranges-v1\0p{low:g}-{high:g}\0stride={images.PLATE_SAMPLE_STRIDE}\0"
             f"px={images.PLATE_SAMPLE_PIXELS}\0".encode())
    try:
        for i in rows:
            _hash_channels(h, fields.iloc[int(i)], stains)
    except (CellClipError, OSError):
        return None
    return _entry_path(root / "plate-ranges", h.hexdigest())


def plate_ranges(fields, stains: Sequence[str], cache_dir=None, *, use_cache: bool = True,
                 low: float = NORM_LOW, high: float = NORM_HIGH) -> dict:
    """:func:`napari_cellclip.images.plate_ranges`, each plate's range cached under
    ``<cache>/plate-ranges/`` (so a cached plate is not decoded again)."""
    from . import images

    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) if use_cache else None
    out = {}
    for plate, rows in images.plate_samples(fields).items():
        path = _plate_range_path(root, fields, rows, stains, low, high)
        cached = _load_entry(path, (len(stains), 2)) if path is not None else None
        r = cached if cached is not None else images.sample_range(fields, rows, stains, low, high)
        if r is None:
            continue
        out[plate] = r
        if path is not None and cached is None:
            try:
                atomic_save_npy(path, r)
            except OSError:
                pass  # an unwritable cache only costs the recomputation next time
    return out


# -- loading (DataLoader) ----------------------------------------------------
class FieldSource:
    """Map-style dataset over the fields to encode, run in the DataLoader workers.

    Item → ``(position, array, error, cache key, cached)``: the cached ``(C, D)`` features, or
    the prepared field (``encoder.field_prep``); ``error`` = ``(message, path)`` when the field
    cannot be read (its array is then None).
    """

    def __init__(self, records: list[dict], stains: list[str], prep, ranges: list, cache: FeatureCache | None,
                 shape: tuple, low: float, high: float):
        self.records, self.stains, self.prep, self.ranges = records, stains, prep, ranges
        self.cache, self.shape, self.low, self.high = cache, shape, low, high

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from .images import load_field

        key = None
        try:
            if self.cache is not None:
                key = self.cache.key(self.records[i], self.stains, self.ranges[i], self.low, self.high)
                hit = self.cache.load(key, self.shape)
                if hit is not None:
                    return i, hit, None, key, True
            arr = self.prep(load_field(self.records[i], self.stains), self.ranges[i])
            return i, arr, None, key, False
        except CellClipError as exc:
            return i, None, (str(exc), getattr(exc, "path", None)), None, False
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill a long job
            return i, None, (f"field at row {i}: cannot load ({type(exc).__name__}: {exc})", None), None, False


def _stack(items) -> tuple:
    import torch

    return (torch.tensor([p for p, _, _ in items], dtype=torch.int64),
            torch.from_numpy(np.stack([a for _, a, _ in items])), [k for _, _, k in items])


def collate(items) -> dict:
    """In the worker: cached features together, prepared fields stacked by shape (pinned by the loader)."""
    groups: dict[tuple, list] = {}
    cached, errors = [], []
    for pos, arr, err, key, hit in items:
        if arr is None:
            errors.append((pos, err[0], err[1]))
        else:
            (cached if hit else groups.setdefault(arr.shape, [])).append((pos, arr, key))
    return {"groups": [_stack(g) for g in groups.values()], "cached": _stack(cached) if cached else None,
            "errors": errors}


def _records(fields, stains: Sequence[str]) -> list[dict]:
    """The columns a worker needs, as plain dicts (cheap to send to worker processes)."""
    cols = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ChannelAxes")
            if c in fields.columns]
    for s in stains:
        cols += [c for c in (f"FileName_Orig{s}", f"PathName_Orig{s}", f"Frame_Orig{s}") if c in fields.columns]
    return fields[cols].to_dict(orient="records")


def _encode(batch: dict, encoder, cache: FeatureCache | None, shape: tuple) -> FeatureBatch:
    """The main process's half of a batch: encode the prepared fields, store them in the cache."""
    positions, feats = [], []
    if batch["cached"] is not None:
        rows, x, _ = batch["cached"]
        positions.append(rows.numpy())
        feats.append(x.numpy())
    n_cached = sum(len(p) for p in positions)
    for rows, x, keys in batch["groups"]:  # fields of different shapes are encoded apart
        f = encoder.encode(x).numpy().astype(np.float32, copy=False)
        if f.shape != (len(rows),) + tuple(shape):
            raise CellClipError(f"encoder {getattr(encoder, 'spec', encoder)!r} returned shape {f.shape}, "
                                f"expected {(len(rows),) + tuple(shape)}")
        if cache is not None:
            for k, v in zip(keys, f):
                cache.save(k, v)
        positions.append(rows.numpy())
        feats.append(f)
    pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    out = np.concatenate(feats) if feats else np.zeros((0,) + tuple(shape), np.float32)
    return FeatureBatch(pos.astype(np.int64), out, list(batch["errors"]), n_cached, len(pos) - n_cached)


def _as_encoder(encoder):
    if isinstance(encoder, str):
        from .encoders import get_encoder

        return get_encoder(encoder)
    return encoder


def _stains_of(fields, stains) -> list[str]:
    from .plates import stains as plate_stains

    out = list(stains) if stains is not None else list(plate_stains(fields))
    if not out:
        raise CellClipError("the fields table has no FileName_Orig<stain> columns; no channels to encode")
    return out


def iter_features(fields, encoder, *, stains: Sequence[str] | None = None, cache_dir=None, use_cache: bool = True,
                  batch_size: int = 8, num_workers: int = 0, normalization: str = "field", ranges: dict | None = None,
                  batches: Sequence[Sequence[int]] | None = None, prefetch: int = 2,
                  low: float = NORM_LOW, high: float = NORM_HIGH) -> Iterator[FeatureBatch]:
    """Features of the fields of ``fields``, one :class:`FeatureBatch` per batch (see the module doc).

    ``batches``: the row positions of each batch (default: consecutive runs of ``batch_size``
    rows); ``ranges``: precomputed ``{plate: (C, 2) range}`` under plate normalisation (default:
    computed now, cached); ``num_workers``: decoding worker processes (0: in this process);
    ``prefetch``: batches each worker prepares ahead.  Other parameters as :func:`extract_features`.
    """
    import torch

    from .images import check_normalization, field_ranges

    encoder = _as_encoder(encoder)
    stains = _stains_of(fields, stains)
    if check_normalization(normalization) == "plate" and ranges is None:
        ranges = plate_ranges(fields, stains, cache_dir, use_cache=use_cache, low=low, high=high)
    if batches is None:
        step = max(1, int(batch_size))
        batches = [list(range(a, min(a + step, len(fields)))) for a in range(0, len(fields), step)]
    if getattr(encoder, "parts", None):  # "morphology+cells": each part through this road, under its own cache
        yield from _iter_parts(fields, encoder.parts, dict(
            stains=stains, cache_dir=cache_dir, use_cache=use_cache, num_workers=num_workers,
            normalization=normalization, ranges=ranges, batches=batches, prefetch=prefetch, low=low, high=high))
        return
    shape = (len(stains), int(encoder.dim))
    cache = FeatureCache(cache_dir, encoder) if use_cache else None
    prep = encoder.field_prep(stains, low=low, high=high)
    row_ranges = field_ranges(fields, stains, normalization, low, high, ranges=ranges)
    dataset = FieldSource(_records(fields, stains), stains, prep, row_ranges, cache, shape, low, high)
    workers = max(0, int(num_workers))
    device = getattr(encoder, "device", None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
        pin_memory=getattr(device, "type", "cpu") == "cuda", prefetch_factor=prefetch if workers else None,
        persistent_workers=False)
    it = iter(loader)
    try:
        for batch in it:
            yield _encode(batch, encoder, cache, shape)
    finally:
        del it


def _iter_parts(fields, parts, kw: dict) -> Iterator[FeatureBatch]:
    """Batches of a concatenated encoder: the parts' batches (same rows, each part read from and
    written to its own cache, so ``cells`` features measured once serve ``cells`` and
    ``morphology+cells``) joined per channel; a row any part could not read is an error of the join."""
    streams = [iter_features(fields, part, **kw) for part in parts]
    try:
        for fbs in zip(*streams):
            errors = {pos: (msg, path) for fb in fbs for pos, msg, path in fb.errors}
            rows = [dict(zip(fb.positions.tolist(), range(len(fb.positions)))) for fb in fbs]
            keep = [p for p in fbs[0].positions.tolist() if p not in errors and all(p in r for r in rows)]
            cached = set.intersection(*(set(fb.positions[:fb.n_cached].tolist()) for fb in fbs))
            keep.sort(key=lambda p: p not in cached)  # rows cached in every part first, as in any batch
            n_cached = sum(p in cached for p in keep)
            feats = [fb.features[[r[p] for p in keep]] for fb, r in zip(fbs, rows)]
            out = np.concatenate(feats, axis=-1)  # (0, C, D1 + D2 ...) when no row is kept
            yield FeatureBatch(np.asarray(keep, np.int64), np.ascontiguousarray(out, dtype=np.float32),
                               [(p, m, path) for p, (m, path) in sorted(errors.items())], n_cached,
                               len(keep) - n_cached)
    finally:
        for s in streams:
            s.close()


def extract_features(
    fields,
    encoder,
    *,
    stains: Sequence[str] | None = None,
    cache_dir=None,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    use_cache: bool = True,
    low: float = NORM_LOW,
    high: float = NORM_HIGH,
    normalization: str = "field",
) -> FeatureResult:
    """Per-channel frozen features of every field of ``fields`` (:func:`iter_features`, collected).

    Parameters
    ----------
    fields : DataFrame
        Fields table (one row per field, ``FileName_Orig*`` / ``PathName_Orig*``).
    encoder : ChannelEncoder or str
        An encoder, or a spec for :func:`napari_cellclip.encoders.get_encoder`.
    stains : list of str, optional
        Channel order (default: the table's, :func:`napari_cellclip.plates.stains`).
    cache_dir : path, optional
        Cache root (default :func:`default_cache_dir`); ``use_cache=False`` turns
        the cache off.
    batch_size, num_workers :
        Fields per encoder call; decoding worker processes (0 = in-process).
    progress : callable(done, total), optional
        Called once at the start and after each batch.
    should_stop : callable() -> bool, optional
        Checked between batches; when it returns True, :class:`Cancelled` is raised.
    normalization : ``"field"`` or ``"plate"``
        How channels are rescaled before encoding (:data:`napari_cellclip.images.NORMALIZATIONS`):
        by each field's own ``low``/``high`` percentiles, or by its plate's
        (:func:`napari_cellclip.images.plate_ranges`, from a sample of the plate's fields).

    Returns
    -------
    FeatureResult
        Unreadable fields are skipped with a :class:`CellClipWarning` naming the
        file; if *no* field can be read, the first :class:`ImageReadError` is raised.
    """
    encoder = _as_encoder(encoder)
    stains = _stains_of(fields, stains)
    n, done = len(fields), 0
    parts, errors, n_cached = [], {}, 0

    def _stop():
        if should_stop is not None and should_stop():
            raise Cancelled("feature extraction cancelled")

    if progress is not None:
        progress(0, n)
    _stop()
    for fb in iter_features(fields, encoder, stains=stains, cache_dir=cache_dir, use_cache=use_cache,
                            batch_size=batch_size, num_workers=num_workers, normalization=normalization,
                            low=low, high=high):
        parts.append(fb)
        errors.update({pos: (msg, path) for pos, msg, path in fb.errors})
        n_cached += fb.n_cached
        done += len(fb.positions) + len(fb.errors)
        if progress is not None:
            progress(done, n)
        _stop()
    return _collect(parts, errors, n, stains, n_cached, (len(stains), int(encoder.dim)))


def _collect(parts: list[FeatureBatch], errors: dict, n: int, stains: list, n_cached: int,
             shape: tuple) -> FeatureResult:
    """Batches → one :class:`FeatureResult` in table order; warn about (or raise for) unreadable fields."""
    skipped = []
    for pos in sorted(errors):
        msg, _path = errors[pos]
        skipped.append((pos, msg))
        warn_at_caller(f"skipped field (row {pos}): {msg}")
    pos = np.concatenate([p.positions for p in parts]) if parts else np.zeros(0, np.int64)
    if n and not len(pos):
        first_msg, first_path = errors[min(errors)]
        if first_path is not None and first_msg.startswith(f"{first_path}: "):
            first_msg = first_msg[len(first_path) + 2:]
        raise ImageReadError(first_path if first_path is not None else "<fields table>",
                             f"none of the {n} fields could be read; first failure: {first_msg}")
    order = np.argsort(pos, kind="stable")
    feats = np.concatenate([p.features for p in parts])[order] if parts else np.zeros((0,) + shape, np.float32)
    return FeatureResult(features=np.ascontiguousarray(feats, dtype=np.float32), index=pos[order].astype(np.int64),
                         skipped=skipped, stains=stains, n_cached=n_cached, n_encoded=len(pos) - n_cached)
