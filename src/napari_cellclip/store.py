"""Embedding store: CellCLIP image embeddings plus the fields table they belong to.

An :class:`EmbeddingStore` holds

* ``embeddings`` — ``(N, E)`` float32, every row L2-normalised (cosine = dot product),
* ``fields`` — a pandas DataFrame with ``N`` rows (index ``0..N-1``) carrying the
  ``Metadata_*`` columns (plate, well, site, perturbation, MoA, prompt, ...) and the
  image paths of each field,
* ``model_id`` — the identity of the checkpoint that produced the vectors
  (see :func:`napari_cellclip.checkpoints.model_identity`); vectors from different
  checkpoints live in different spaces and must never be compared,
* ``level`` — ``"field"`` (one row per field of view) or ``"well"`` (see :meth:`EmbeddingStore.well_level`),
* ``info`` — a small JSON-serialisable dict (skipped fields, encoder identity, ...),
* ``wells`` — optionally, the well-level store the model computed by pooling each well's
  fields through its multi-instance pooling (:func:`napari_cellclip.embed.image_embeddings`);
  without it, :meth:`EmbeddingStore.well_level` falls back to the mean of a well's fields.

On disk a store is a folder with ``embeddings.npy`` + ``fields.parquet`` + ``store.json``
(+ ``wells/``, a well-level store in the same format), written by the one
:class:`StoreWriter`: the embeddings stream into a memory-mapped file, ``store.json`` comes
last, so a folder without it is an incomplete store.  :meth:`EmbeddingStore.save` swaps a whole
folder into place.  Loading never unpickles (``np.load(..., allow_pickle=False)``).

This module imports neither torch nor Qt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._fsutil import atomic_dir, atomic_file, atomic_write_text, discard, file_digest, publish, temp_path
from .errors import CellClipError, MetadataError

__all__ = [
    "EmbeddingStore",
    "StoreError",
    "StoreWriter",
    "has_store_files",
    "jsonable",
    "parquet_safe",
    "remove_store",
    "well_groups",
    "cache_key",
    "l2_normalize",
    "metadata_columns",
    "well_groups",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "napari-cellclip-embedding-store"
FORMAT_VERSION = 1
_EMB_FILE = "embeddings.npy"
_FIELDS_FILE = "fields.parquet"
_META_FILE = "store.json"
_WELLS_DIR = "wells"
LEVELS = ("field", "well")
WELL_KEYS = ("Metadata_Plate", "Metadata_Well")


class StoreError(CellClipError):
    """An embedding store folder is missing, incomplete or malformed."""


def _check_sums(folder: Path, sums: dict) -> None:
    """StoreError unless each file ``store.json`` has a checksum for matches it (stores written
    before checksums have none: their rows are still checked for unit length)."""
    for name in (_EMB_FILE, _FIELDS_FILE):
        want = sums.get(name)
        if not want:
            continue
        try:
            got = file_digest(folder / name)
        except OSError as e:
            raise StoreError(f"{folder / name}: unreadable ({e})") from None
        if got != want:
            raise StoreError(f"{folder / name}: its contents do not match the checksum in {_META_FILE} (damaged "
                             "or edited since it was written); embed the plate again")


def _check_unit_rows(emb: np.ndarray, where, tol: float = 1e-3, chunk: int = 1 << 16) -> None:
    """StoreError unless every row is finite and of length 1 (or 0): cosine scores read the rows as
    they are, so a damaged or hand-made file would otherwise score outside [-1, 1]."""
    for a in range(0, len(emb), chunk):
        block = np.asarray(emb[a:a + chunk], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        bad = ~np.isfinite(norms) | ((np.abs(norms - 1) > tol) & (norms > tol))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StoreError(f"{where}: row {a + i} has length {norms[i]:.4g}, not 1 ({int(bad.sum())} such rows "
                             f"from row {a}): not the unit embeddings a store holds (damaged or edited); "
                             "embed the plates again")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation as float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        n = float(np.linalg.norm(x))
        return (x / max(n, eps)).astype(np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)


def metadata_columns(df: pd.DataFrame) -> list[str]:
    """The ``Metadata_*`` columns of ``df``, in table order."""
    return [c for c in df.columns if str(c).startswith("Metadata_")]


class EmbeddingStore:
    """L2-normalised embeddings ``(N, E)`` + their fields table ``(N rows)`` + checkpoint identity.

    Parameters
    ----------
    embeddings
        ``(N, E)`` array.  Stored as float32; rows are (re)normalised unless
        ``normalize=False`` (then they must already be unit length or zero).
    fields
        DataFrame with ``N`` rows; its index is reset to ``0..N-1`` (a copy is kept).
    model_id
        Identity string of the checkpoint that produced ``embeddings``.
    level
        ``"field"`` or ``"well"``.
    info
        Optional JSON-serialisable dict of provenance (saved in ``store.json``).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        fields: pd.DataFrame,
        model_id: str = "",
        *,
        level: str = "field",
        info: dict[str, Any] | None = None,
        normalize: bool = True,
        wells: EmbeddingStore | None = None,
    ) -> None:
        emb = np.asarray(embeddings)
        if emb.ndim != 2:
            raise StoreError(f"embeddings must be a 2-D (N, E) array, got shape {emb.shape}")
        if not isinstance(fields, pd.DataFrame):
            raise StoreError(f"fields must be a pandas DataFrame, got {type(fields).__name__}")
        if len(fields) != emb.shape[0]:
            raise StoreError(
                f"embeddings have {emb.shape[0]} rows but the fields table has {len(fields)}"
            )
        if level not in LEVELS:
            raise StoreError(f"level must be one of {LEVELS}, got {level!r}")
        emb = emb.astype(np.float32, copy=False)
        if not _all_finite(emb):
            raise StoreError("embeddings contain NaN or infinite values")
        self.embeddings: np.ndarray = l2_normalize(emb) if normalize else np.ascontiguousarray(emb)
        self.fields: pd.DataFrame = fields.reset_index(drop=True).copy()
        self.model_id: str = str(model_id)
        self.level: str = level
        self.info: dict[str, Any] = dict(info or {})
        if wells is not None and (wells.level != "well" or level != "field"):
            raise StoreError("wells= must be a well-level store of a field-level one")
        self._well_cache: EmbeddingStore | None = wells
        self._searcher = None  # filled lazily by napari_cellclip.search
        self.path: Path | None = None  # the folder it was loaded from, if any

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore(n={len(self)}, dim={self.dim}, level={self.level!r}, "
            f"model_id={self.model_id[:12]!r})"
        )

    @property
    def dim(self) -> int:
        """Embedding width ``E``."""
        return int(self.embeddings.shape[1])

    @property
    def metadata_columns(self) -> list[str]:
        """The ``Metadata_*`` columns of the fields table."""
        return metadata_columns(self.fields)

    def subset(self, rows) -> EmbeddingStore:
        """A new store with only ``rows`` (positions or boolean mask), same model/level."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64).reshape(-1)
        return EmbeddingStore(
            self.embeddings[idx], self.fields.iloc[idx], self.model_id,
            level=self.level, info=self.info, normalize=False,
        )

    # ------------------------------------------------------------- aggregation
    @property
    def has_model_wells(self) -> bool:
        """Whether the well embeddings come from the model's pooling (else: means of the fields)."""
        return self.level == "field" and self._well_cache is not None and \
            self._well_cache.info.get("well_pooling") == "model"

    def well_level(self) -> EmbeddingStore:
        """One row per ``(Metadata_Plate, Metadata_Well)``, sorted by plate then well.

        The wells the model pooled, when the store has them (``wells=``; what
        :func:`napari_cellclip.embed.embed_fields` and the embedding job save); else the mean
        of each well's field embeddings, renormalised.  Metadata columns whose value is
        constant within every well are kept (per-field ones such as ``Metadata_Site`` and the
        image path columns are dropped); ``Metadata_n_fields`` counts the well's fields.  A
        well-level store returns itself.  The result is cached on the store.
        """
        if self.level == "well":
            return self
        if self._well_cache is not None:
            return self._well_cache
        codes, table, _ = well_groups(self.fields)
        sums = np.zeros((len(table), self.dim), dtype=np.float64)
        np.add.at(sums, codes, self.embeddings.astype(np.float64))
        means = (sums / np.maximum(table["Metadata_n_fields"].to_numpy(), 1)[:, None]).astype(np.float32)
        info = dict(self.info, aggregated_from="field", well_pooling="mean")
        self._well_cache = EmbeddingStore(means, table, self.model_id, level="well", info=info)
        return self._well_cache

    # ------------------------------------------------------------------ export
    def to_frame(
        self, coords: np.ndarray | None = None, *, prefix: str = "emb_", coord_names=("UMAP_1", "UMAP_2")
    ) -> pd.DataFrame:
        """Metadata columns + one column per embedding dimension (``emb_0..emb_{E-1}``).

        ``coords`` (``(N, 2)``, e.g. from :func:`napari_cellclip.reduce.embed_2d`) adds
        ``UMAP_1``/``UMAP_2`` (names configurable).  Suitable for ``to_parquet``/``to_csv``.
        """
        meta = self.fields[self.metadata_columns].reset_index(drop=True)
        emb = pd.DataFrame(self.embeddings, columns=[f"{prefix}{i}" for i in range(self.dim)])
        parts = [meta, emb]
        if coords is not None:
            coords = np.asarray(coords)
            if coords.shape != (len(self), len(coord_names)):
                raise StoreError(
                    f"coords must have shape ({len(self)}, {len(coord_names)}), got {coords.shape}"
                )
            parts.append(pd.DataFrame(coords, columns=list(coord_names)))
        return pd.concat(parts, axis=1)

    def export_parquet(self, path, coords: np.ndarray | None = None, *,
                       coord_names=("UMAP_1", "UMAP_2")) -> Path:
        """Write :meth:`to_frame` (metadata + embeddings + optional map coordinates) to parquet."""
        path = Path(path)
        with atomic_file(path) as tmp:
            parquet_safe(self.to_frame(coords, coord_names=coord_names)).to_parquet(tmp, index=False)
        return path

    # --------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write the store (and its model-pooled wells) into folder ``path``; returns the folder.

        The folder is written next to its final place and swapped in, so a crash
        never leaves a half-written store behind.  An existing store at ``path`` is replaced.
        """
        path = Path(path)
        with atomic_dir(path) as tmp:
            with StoreWriter(tmp, len(self), self.dim, self.model_id, level=self.level, info=self.info) as w:
                w.write(0, self.embeddings)
                w.finish(self.fields, wells=self._well_cache if self.has_model_wells else None)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> EmbeddingStore:
        """Read a store written by :meth:`save` (raises :class:`StoreError` if incomplete).

        ``mmap=True`` memory-maps ``embeddings.npy`` read-only instead of reading it
        (large stores written by :mod:`napari_cellclip.pipeline`).  The folder is kept
        as ``store.path`` (an ANN index saved there is found by the searcher).
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path}: no embedding store folder here")
        for name in (_META_FILE, _EMB_FILE, _FIELDS_FILE):
            if not (path / name).is_file():
                raise StoreError(f"{path}: embedding store is incomplete ({name} missing)")
        try:
            meta = json.loads((path / _META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{path / _META_FILE}: unreadable ({e})") from None
        if meta.get("format") != FORMAT_NAME:
            raise StoreError(f"{path / _META_FILE}: not a napari-cellclip embedding store")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format version {meta.get('version')} is newer than this "
                f"napari-cellclip understands ({FORMAT_VERSION}); please upgrade"
            )
        _check_sums(path, meta.get("checksums") or {})
        try:
            emb = np.load(path / _EMB_FILE, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path / _EMB_FILE}: unreadable ({e})") from None
        try:
            fields = pd.read_parquet(path / _FIELDS_FILE)
        except Exception as e:  # pyarrow raises several types
            raise StoreError(f"{path / _FIELDS_FILE}: unreadable ({e})") from None
        if emb.ndim != 2 or emb.shape[0] != len(fields) or emb.shape[0] != int(meta.get("n", -1)):
            raise StoreError(
                f"{path}: inconsistent store (embeddings {emb.shape}, {len(fields)} field rows, "
                f"store.json n={meta.get('n')})"
            )
        _check_unit_rows(emb, path / _EMB_FILE)
        wells = None
        if meta.get("level", "field") == "field" and EmbeddingStore.exists(path / _WELLS_DIR):
            wells = cls.load(path / _WELLS_DIR, mmap=mmap)
        store = cls(
            emb, fields, meta.get("model_id", ""), level=meta.get("level", "field"),
            info=meta.get("info") or {}, normalize=False, wells=wells,
        )
        store.path = path
        return store

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a complete store."""
        p = Path(path)
        return all((p / n).is_file() for n in (_META_FILE, _EMB_FILE, _FIELDS_FILE))

    @staticmethod
    def cache_key(fields: pd.DataFrame, model_id: str) -> str:
        """Same as the module-level :func:`cache_key`."""
        return cache_key(fields, model_id)


# ---------------------------------------------------------------------- wells
def well_groups(fields: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """The wells of a fields table: the one definition of a well and of the well table.

    Returns ``codes`` (N,) — each row's well, ``table`` — one row per ``(Metadata_Plate,
    Metadata_Well)`` sorted by plate then well, with the Metadata columns constant within every
    well and ``Metadata_n_fields`` — and ``bag_index`` (W, M) int64: each well's rows in table
    order, padded with -1 to the largest well (a bag of instances for the model's pooling).
    """
    missing = [k for k in WELL_KEYS if k not in fields.columns]
    if missing:
        raise MetadataError(f"well-level aggregation needs the columns {missing} in the fields table")
    keys = list(WELL_KEYS)
    codes = fields.groupby(keys, sort=True, dropna=False).ngroup().to_numpy()
    n_wells = int(codes.max()) + 1 if len(codes) else 0
    counts = np.bincount(codes, minlength=n_wells)
    starts = np.cumsum(counts) - counts  # where each well's rows begin in `order`
    order = np.argsort(codes, kind="stable")
    first = order[starts]
    table = fields.iloc[first][keys].reset_index(drop=True)
    meta = [c for c in metadata_columns(fields) if c not in keys and c != "Metadata_n_fields"]
    if meta:
        nun = fields[meta].groupby(codes).nunique(dropna=False)
        constant = [c for c in meta if bool((nun[c] <= 1).all())]
        if constant:
            table = pd.concat([table, fields.iloc[first][constant].reset_index(drop=True)], axis=1)
    table["Metadata_n_fields"] = counts.astype(np.int64)
    bag_index = np.full((n_wells, int(counts.max()) if n_wells else 0), -1, dtype=np.int64)
    slot = np.arange(len(codes)) - np.repeat(starts, counts)
    bag_index[codes[order], slot] = order
    return codes, table, bag_index


# ---------------------------------------------------------------------- writing
class StoreWriter:
    """The one writer of the store format, streaming: ``write`` rows into a memory-mapped
    ``embeddings.npy`` as they come, then ``finish`` with the fields table (and the wells);
    ``store.json`` is written last.  Use as a context manager: on an error nothing partial is
    published (an older ``store.json`` in the folder is removed first).
    """

    def __init__(self, folder, n: int, dim: int, model_id: str = "", *, level: str = "field",
                 info: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.n, self.dim, self.model_id, self.level = int(n), int(dim), str(model_id), level
        self.info = dict(info or {})
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / _META_FILE).unlink(missing_ok=True)  # incomplete until finish()
        self._tmp: Path | None = temp_path(self.folder / _EMB_FILE)
        self._mm = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.float32, shape=(self.n, self.dim))

    def write(self, start: int, embeddings: np.ndarray) -> None:
        """Rows ``start .. start + len(embeddings)`` (unit rows, float32)."""
        self._mm[start:start + len(embeddings)] = embeddings

    def finish(self, fields: pd.DataFrame, *, wells: EmbeddingStore | None = None,
               info: dict[str, Any] | None = None) -> None:
        """Publish the embeddings, the fields table, the wells and (last) ``store.json``."""
        if len(fields) != self.n:
            raise StoreError(f"{self.n} embeddings but {len(fields)} rows in the fields table")
        self._mm.flush()
        self._mm = None
        sums = {_EMB_FILE: file_digest(self._tmp)}
        publish(self._tmp, self.folder / _EMB_FILE)
        self._tmp = None
        with atomic_file(self.folder / _FIELDS_FILE) as tmp:
            parquet_safe(fields).to_parquet(tmp, index=False)
            sums[_FIELDS_FILE] = file_digest(tmp)
        if wells is not None:
            wells.save(self.folder / _WELLS_DIR)
        else:  # an older store's wells in the folder belong to other rows
            shutil.rmtree(self.folder / _WELLS_DIR, ignore_errors=True)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_id": self.model_id, "level": self.level,
                "n": self.n, "dim": self.dim, "info": jsonable(dict(self.info, **(info or {}))),
                "checksums": sums}  # blake2b of each file, checked on load (a flipped bit is not data)
        atomic_write_text(self.folder / _META_FILE, json.dumps(meta, indent=2))

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._tmp is not None:  # not finished: discard the partial embeddings
            self._mm = None
            discard(self._tmp)
            self._tmp = None
        return False


def has_store_files(folder) -> bool:
    """Whether ``folder`` holds a store, complete or not (its ``store.json`` or its embeddings)."""
    return any((Path(folder) / name).exists() for name in (_META_FILE, _EMB_FILE))


def remove_store(folder) -> None:
    """Delete the store files in ``folder`` (its embeddings, fields, wells and store.json)."""
    folder = Path(folder)
    for name in (_META_FILE, _EMB_FILE, _FIELDS_FILE):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / _WELLS_DIR, ignore_errors=True)


# ---------------------------------------------------------------------- helpers


def cache_key(fields: pd.DataFrame, model_id: str) -> str:
    """A key for reusing a plate's embeddings from disk: data identity + model identity.

    Hashes, in row order, every ``Metadata_*`` value (annotations and control flags
    change the stored table and the plate-effect correction), every image file
    reference (``FileName_``/``PathName_``/``Frame_`` columns) with the file's size and
    modification time (:func:`images.channel_stamp`: cheap; a rewritten image or OME-Zarr
    chunk changes the key), and ``model_id``.
    Returns a 32-character hex string.
    """
    from .images import channel_stamp

    h = hashlib.blake2b(digest_size=16)
    h.update(f"{FORMAT_NAME}:{FORMAT_VERSION}\0{model_id}\0".encode())
    cols = [
        c for c in fields.columns
        if str(c).startswith(("Metadata_", "FileName_", "PathName_", "Frame_", "URL_"))
    ]
    cols = sorted(cols, key=str)
    h.update(("\x1f".join(map(str, cols)) + "\0").encode())
    file_cols = [c for c in cols if str(c).startswith("FileName_")]
    stamps: dict[Path, bytes] = {}  # a multi-channel file / zarr field is stamped once, not per stain
    for row in fields[cols].itertuples(index=False, name=None):
        rec = dict(zip(cols, row))
        h.update("\x1f".join(_key_str(rec[c]) for c in cols).encode())
        for fc in file_cols:
            stain = str(fc)[len("FileName_"):]
            p = Path(str(rec.get(f"PathName_{stain}", "") or "")) / str(rec[fc])
            if p not in stamps:
                try:
                    stamps[p] = f"|{channel_stamp(p)}".encode()
                except (OSError, CellClipError):
                    stamps[p] = b"|missing"
            h.update(stamps[p])
        h.update(b"\0")
    return h.hexdigest()


def _all_finite(x: np.ndarray, chunk: int = 65_536) -> bool:
    """``np.isfinite(x).all()`` in row chunks (no N×E temporary for large/memory-mapped stores)."""
    return all(bool(np.isfinite(x[a:a + chunk]).all()) for a in range(0, x.shape[0], chunk))


def _key_str(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "<NA>"
    try:
        if pd.isna(v):
            return "<NA>"
    except (TypeError, ValueError):
        pass
    return repr(v.item() if isinstance(v, np.generic) else v)


def parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A parquet-safe copy of a table: mixed-type object columns (e.g. doses given as numbers and text)
    become strings."""
    out = df.copy()
    out.columns = [str(c) for c in out.columns]
    for c in out.columns:
        s = out[c]
        if s.dtype == object:
            kinds = {type(v) for v in s if v is not None and not (isinstance(v, float) and np.isnan(v))}
            if len(kinds) > 1 or (kinds and not kinds <= {str, bool, int, float}):
                out[c] = s.map(lambda v: v if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return out


def jsonable(obj: Any) -> Any:
    """Best-effort conversion of numpy scalars/arrays/paths inside ``obj`` for json.dumps."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj
