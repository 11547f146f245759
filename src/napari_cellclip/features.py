"""Batched extraction of frozen per-channel features, with an on-disk cache.

:func:`extract_features` reads the fields of a fields table, encodes every stain
plane with a :class:`~napari_cellclip.encoders.ChannelEncoder` and returns a
``(N_ok, C, D)`` array.  Each field's features are cached on disk so that
training, evaluation and the napari plugin never encode the same field twice.

Cache layout (``default_cache_dir()`` unless ``cache_dir`` is given)::

    <cache_dir>/<encoder identity hash, 16 hex>/
        encoder.json                 # the full identity string, for humans
        <key[:2]>/<key>.npy          # float32 (C, D), one per field

``key`` is a blake2b digest of: the encoder identity, the normalisation
parameters (the percentiles, or under plate normalisation the plate's fixed
per-channel range itself), and, per channel in order, the stain name, the blake2b digest of the
channel file's raw bytes and the frame index (multi-channel TIFF) — so a cached
field is never decoded, and a changed file, stain order, frame, normalisation or
encoder gives a new key.  Entries are written to a temporary file and moved into
place with :func:`os.replace`, so a cancelled or killed job leaves only complete
entries; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._fsutil import file_digest
from .errors import Cancelled, CellClipError, CellClipWarning, ImageReadError

#: percentile normalisation applied by images.load_field_normalized
NORM_LOW = 1.0
NORM_HIGH = 99.9
_KEY_VERSION = "features-v1"

__all__ = ["FeatureResult", "default_cache_dir", "extract_features", "field_cache_key", "clear_cache"]


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


def default_cache_dir() -> Path:
    """``$NAPARI_CELLCLIP_CACHE`` or ``$XDG_CACHE_HOME/napari-cellclip/features``
    (``~/.cache/napari-cellclip/features`` when XDG_CACHE_HOME is unset)."""
    env = os.environ.get("NAPARI_CELLCLIP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "napari-cellclip" / "features"


# -- hashing -----------------------------------------------------------------
def _file_digest(path: Path) -> str:
    """Content digest of an image file; an unreadable file is an ImageReadError naming it."""
    try:
        return file_digest(path)
    except OSError as exc:
        raise ImageReadError(path, f"file not found or not readable ({exc.strerror or exc})") from None


def field_cache_key(row, stains: Sequence[str], encoder_identity: str,
                    low: float = NORM_LOW, high: float = NORM_HIGH, ranges=None) -> str:
    """Cache key of one field (see module doc); raises ImageReadError for a missing file.

    ``ranges``: the field's fixed (C, 2) intensity range under plate normalisation
    (None: per-field percentiles ``low``/``high``).
    """
    from .images import channel_frame, channel_path, row_value

    h = hashlib.blake2b(digest_size=20)
    if ranges is None:
        norm = f"p{low:g}-{high:g}"
    else:
        norm = "range:" + ",".join(f"{float(v):.7g}" for v in np.asarray(ranges).ravel())
    h.update(f"{_KEY_VERSION}\0{encoder_identity}\0norm={norm}\0".encode())
    axes = row_value(row, "Metadata_ChannelAxes")
    if axes:
        h.update(f"axes={axes}\0".encode())
    for stain in stains:
        path = channel_path(row, stain)
        frame = channel_frame(row, stain)
        h.update(f"{stain}\0{_file_digest(path)}\0{'' if frame is None else frame}\0".encode())
    return h.hexdigest()


def _cached_plate_ranges(fields, stains: Sequence[str], low: float, high: float, root: Path | None) -> dict:
    """:func:`images.plate_ranges`, each plate's range cached under ``<root>/plate-ranges/``
    by the content digests of the fields it is sampled from (so a cached plate is not
    decoded again).  A plate whose sample has a file that cannot be hashed is computed
    and not cached."""
    from . import images

    out = {}
    for plate, rows in images.plate_samples(fields).items():
        path = None
        if root is not None:
            h = hashlib.blake2b(digest_size=20)
            h.update(f"plate-ranges-v1\0p{low:g}-{high:g}\0stride={images.PLATE_SAMPLE_STRIDE}\0"
                     f"px={images.PLATE_SAMPLE_PIXELS}\0".encode())
            try:
                for i in rows:
                    row = fields.iloc[int(i)]
                    for stain in stains:
                        frame = images.channel_frame(row, stain)
                        h.update(f"{stain}\0{_file_digest(images.channel_path(row, stain))}\0"
                                 f"{'' if frame is None else frame}\0".encode())
                path = _entry_path(root / "plate-ranges", h.hexdigest())
            except (CellClipError, OSError):
                path = None
        cached = _load_entry(path, (len(stains), 2)) if path is not None else None
        if cached is not None:
            out[plate] = cached
            continue
        r = images.sample_range(fields, rows, stains, low, high)
        if r is not None:
            out[plate] = r
            if path is not None:
                try:
                    _save_entry(path, r)
                except OSError:
                    pass  # an unwritable cache only costs the recomputation next time
    return out


# -- cache I/O ---------------------------------------------------------------
def _entry_path(encoder_dir: Path, key: str) -> Path:
    return encoder_dir / key[:2] / f"{key}.npy"


def _load_entry(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):
        return None  # unreadable entry: recompute and overwrite
    if arr.shape != shape or arr.dtype != np.float32 or not np.all(np.isfinite(arr)):
        return None
    return arr


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _save_entry(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    _atomic_write_bytes(path, buf.getvalue())


def _encoder_dir(cache_dir: Path, encoder) -> Path:
    digest = hashlib.blake2b(str(encoder.identity).encode(), digest_size=8).hexdigest()
    d = cache_dir / digest
    meta = d / "encoder.json"
    if not meta.exists():
        try:
            _atomic_write_bytes(meta, json.dumps({"spec": getattr(encoder, "spec", ""),
                                                  "identity": encoder.identity,
                                                  "dim": int(encoder.dim)}, indent=1).encode())
        except OSError as exc:
            raise CellClipError(f"feature cache folder {d} is not writable: {exc}") from None
    return d


def clear_cache(cache_dir=None) -> None:
    """Delete the feature cache folder (all encoders)."""
    import shutil

    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if d.exists():
        shutil.rmtree(d)


# -- loading (DataLoader) ----------------------------------------------------
class _FieldDataset:
    """Map-style dataset over fields to decode: item → (pos, array | None, message | None)."""

    def __init__(self, rows: list[dict], positions: list[int], stains: list[str], low: float, high: float,
                 ranges: list | None = None, prep=None):
        self.rows, self.positions, self.stains = rows, positions, stains
        self.low, self.high = low, high
        self.prep = prep  # the encoder's field_prep: raw field, ranges -> prepared array (in the worker)
        self.ranges = ranges if ranges is not None else [None] * len(rows)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        from .images import load_field, load_field_normalized, normalize_range

        pos = self.positions[i]
        try:
            if self.prep is not None:
                arr = self.prep(load_field(self.rows[i], self.stains), self.ranges[i])
            elif self.ranges[i] is None:
                arr = load_field_normalized(self.rows[i], self.stains, low=self.low, high=self.high)
            else:
                arr = normalize_range(load_field(self.rows[i], self.stains), self.ranges[i])
            return pos, np.ascontiguousarray(arr, dtype=np.float32), None
        except CellClipError as exc:
            return pos, None, (str(exc), getattr(exc, "path", None))
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill a long job
            return pos, None, (f"field at row {pos}: cannot load ({type(exc).__name__}: {exc})", None)


def _collate(items):
    return items


def _stains_of(fields) -> list[str]:
    try:
        from .plates import stains as plate_stains

        return list(plate_stains(fields))
    except ImportError:  # pragma: no cover - plates always present in the package
        return [c[len("FileName_Orig"):] for c in fields.columns if str(c).startswith("FileName_Orig")]


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
    """Per-channel frozen features of every field of ``fields``.

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
        Called after each batch (and once at the start with the cached count).
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
    import torch

    if isinstance(encoder, str):
        from .encoders import get_encoder

        encoder = get_encoder(encoder)
    stains = list(stains) if stains is not None else _stains_of(fields)
    if not stains:
        raise CellClipError("the fields table has no FileName_Orig<stain> columns; no channels to encode")
    if hasattr(encoder, "with_stains"):  # encoders that must know which channel is which (cells)
        encoder = encoder.with_stains(stains)
    if getattr(encoder, "parts", None):  # "morphology+cells": each part through its own cache entries
        return _extract_concat(fields, encoder.parts, stains, progress, dict(
            cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, should_stop=should_stop,
            use_cache=use_cache, low=low, high=high, normalization=normalization))
    n = len(fields)
    c, d = len(stains), int(encoder.dim)
    batch_size = max(1, int(batch_size))
    rows = [r for r in fields.to_dict(orient="records")]
    from .images import check_normalization, field_ranges

    root = None
    if use_cache:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    plates = (_cached_plate_ranges(fields, stains, low, high, root)
              if check_normalization(normalization) == "plate" else None)
    ranges = field_ranges(fields, stains, normalization, low, high, ranges=plates)

    def _stop():
        if should_stop is not None and should_stop():
            raise Cancelled("feature extraction cancelled")

    enc_dir = _encoder_dir(root, encoder) if root is not None else None

    results: dict[int, np.ndarray] = {}
    errors: dict[int, tuple[str, str | None]] = {}
    keys: dict[int, str] = {}
    todo: list[int] = []
    for pos, row in enumerate(rows):
        if use_cache:
            try:
                key = field_cache_key(row, stains, encoder.identity, low, high, ranges[pos])
            except CellClipError as exc:
                errors[pos] = (str(exc), getattr(exc, "path", None))
                continue
            keys[pos] = key
            cached = _load_entry(_entry_path(enc_dir, key), (c, d))
            if cached is not None:
                results[pos] = cached
                continue
        todo.append(pos)
    n_cached = len(results)
    done = n_cached + len(errors)
    if progress is not None:
        progress(done, n)

    if todo:
        _stop()
        prep = encoder.field_prep(stains, low=low, high=high) if hasattr(encoder, "field_prep") else None
        dataset = _FieldDataset([rows[p] for p in todo], todo, stains, low, high, [ranges[p] for p in todo],
                                prep=prep)
        workers = max(0, int(num_workers))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=_collate, persistent_workers=False,
        )
        iterator = iter(loader)
        try:
            for batch in iterator:
                groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
                for pos, arr, err in batch:
                    if arr is None:
                        errors[pos] = err
                    elif prep is None and arr.shape[0] != c:
                        errors[pos] = (f"field at row {pos}: {arr.shape[0]} channels, expected {c}", None)
                    else:
                        groups.setdefault(arr.shape, []).append((pos, arr))
                for items in groups.values():  # fields of different H, W are encoded apart
                    x = torch.from_numpy(np.stack([a for _, a in items]))
                    feats = encoder.encode(x).numpy().astype(np.float32, copy=False)
                    if feats.shape != (len(items), c, d):
                        raise CellClipError(
                            f"encoder {getattr(encoder, 'spec', encoder)!r} returned shape {feats.shape}, "
                            f"expected {(len(items), c, d)}"
                        )
                    for (pos, _), f in zip(items, feats):
                        results[pos] = f
                        if use_cache:
                            _save_entry(_entry_path(enc_dir, keys[pos]), f)
                done += len(batch)
                if progress is not None:
                    progress(done, n)
                _stop()
        finally:
            del iterator

    skipped = []
    for pos in sorted(errors):
        msg, _path = errors[pos]
        skipped.append((pos, msg))
        warnings.warn(f"skipped field (row {pos}): {msg}", CellClipWarning, stacklevel=2)
    if n and not results:
        first_msg, first_path = errors[min(errors)]
        if first_path is not None and first_msg.startswith(f"{first_path}: "):
            first_msg = first_msg[len(first_path) + 2:]
        summary = f"none of the {n} fields could be read; first failure: {first_msg}"
        if first_path is not None:
            raise ImageReadError(first_path, summary)
        raise ImageReadError("<fields table>", summary)

    order = np.array(sorted(results), dtype=np.int64)
    feats = np.stack([results[p] for p in order]).astype(np.float32) if len(order) else \
        np.zeros((0, c, d), dtype=np.float32)
    return FeatureResult(features=feats, index=order, skipped=skipped, stains=stains,
                         n_cached=n_cached, n_encoded=len(order) - n_cached)


def _extract_concat(fields, parts, stains, progress, kw) -> FeatureResult:
    """Features of a concatenated encoder: each part's (cached under its own identity, so
    ``cells`` features computed once serve ``cells`` and ``morphology+cells``), joined per channel."""
    n, k = len(fields), len(parts)
    results = []
    for i, part in enumerate(parts):
        prog = None if progress is None else (lambda d, _t, i=i: progress(i * n + d, k * n))
        results.append(extract_features(fields, part, stains=stains, progress=prog, **kw))
    keep = np.asarray(sorted(set.intersection(*[set(r.index.tolist()) for r in results])), dtype=np.int64)
    feats = np.concatenate([r.features[np.searchsorted(r.index, keep)] for r in results], axis=-1)
    skipped = sorted({pos: msg for r in results for pos, msg in r.skipped}.items())
    return FeatureResult(features=np.ascontiguousarray(feats, dtype=np.float32), index=keep, skipped=skipped,
                         stains=list(stains), n_cached=min(r.n_cached for r in results),
                         n_encoded=max(r.n_encoded for r in results))
