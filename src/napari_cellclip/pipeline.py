"""Streaming, sharded, resumable embedding of large plate sets (issue 5).

``python -m napari_cellclip.pipeline --data PLATE_OR_CSV --checkpoint DIR --out DIR``
embeds every field of one or many plates with a CellCLIP checkpoint and leaves an
:class:`~napari_cellclip.store.EmbeddingStore` folder in ``--out`` (plus a FAISS index
for large sets), in bounded memory and resumably.

How a field travels::

    DataLoader workers (processes)            main process (the device)
    ───────────────────────────────           ─────────────────────────────────────────────
    decode channel files (tifffile/PIL)
    percentiles from an integer histogram  →  pinned batch (B, C, h, w) → encoder.encode:
    cut the region the encoder will see       all B·C·crops planes in one forward
    (HF: the crop grid; morphology: the       (bf16 autocast + SDPA attention on CUDA,
    area-resampled working image),            optional torch.compile)
    normalise only that, stack the batch   →  features shard (n, C, D) .npy, atomically
                                           →  per plate (or shard): correction.apply →
                                              model.encode_image → embeddings unit .npy
                                           →  rank 0: merge into the store + ANN index

* **Stage 1 (features)** — fields are grouped by plate (first-appearance order, the
  within-plate order kept) and cut into shards of ``--shard-size`` fields that never
  cross a plate.  Each shard is written as ``shards/features/shard-NNNNN.npy`` (+
  ``.rows.npy``, the job rows that succeeded) and then a ``.json`` marker, each via a
  temporary file and :func:`os.replace`; a killed job leaves only complete shards, and
  ``--resume`` skips every shard whose marker exists.
* **Stage 2 (embeddings)** — per *unit*: a plate when the checkpoint applies a
  plate-effect correction (its statistics come from the whole plate's controls, exactly
  as :func:`napari_cellclip.embed.embed_fields`), else one shard.  Cheap next to stage 1.
* **Merge** — rank 0 streams the units into ``embeddings.npy`` (float32, via a memmap),
  writes ``fields.parquet`` and ``store.json`` last, and builds ``ann.faiss`` when the
  store has at least :data:`napari_cellclip.ann.ANN_THRESHOLD` rows (``--ann``).
* **Several GPUs / machines** — the same command under ``torchrun`` (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``): rank ``r`` computes the shards ``s ≡ r (mod W)`` on
  ``cuda:LOCAL_RANK`` and the units ``u ≡ r (mod W)``; a unit waits (polling the shard
  markers on the shared ``--out`` folder) for shards of other ranks; rank 0 merges.
  No process group is needed.
* **Memory** — one shard of features, ``workers × prefetch × batch`` decoded fields and
  one plate of features (correction) at a time; the merge streams.  Only the fields
  table itself (a few hundred bytes per field) grows with the number of fields.

Normalisation is the checkpoint's ``input_normalization``.  ``field``: the one of
:func:`napari_cellclip.images.normalize` (1st–99.9th percentile per channel over the
whole field), computed from a histogram for 8/16-bit images (bit-identical to
``np.percentile``, ~8× faster).  ``plate``: each plate's fixed per-channel range from
:func:`napari_cellclip.images.plate_ranges`, computed once when the job starts.  Either
way it is applied to the encoder's region only.  Features therefore match
:func:`napari_cellclip.features.extract_features` to float rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .errors import CellClipError, CellClipWarning, PlateError

__all__ = ["run_job", "read_fields", "FieldPrep", "field_prep_for", "dist_env", "main",
           "fast_percentiles", "DEFAULT_SHARD_SIZE"]

DEFAULT_SHARD_SIZE = 512
JOB_FORMAT = "napari-cellclip-embedding-job-v1"
_FEAT_DIR = "shards/features"
_EMB_DIR = "shards/embeddings"
_JOB_FILE = "job.json"
_JOB_FIELDS = "job_fields.parquet"


# ------------------------------------------------------------------ environment
def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 without it)."""
    def _int(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise CellClipError(f"environment variable {name}={os.environ.get(name)!r} is not an integer") from None

    world = max(1, _int("WORLD_SIZE", 1))
    rank = _int("RANK", 0)
    local = _int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise CellClipError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    return rank, world, local


# ------------------------------------------------------------- normalisation
def fast_percentiles(plane: np.ndarray, low: float, high: float) -> tuple[np.float32, np.float32]:
    """``np.percentile(plane.astype(float32), [low, high])`` cast to float32, bit-identical,
    from a histogram for uint8/uint16 planes (falls back to ``np.percentile`` otherwise)."""
    a = np.asarray(plane)
    n = a.size
    if a.dtype in (np.uint8, np.uint16) and n > 0:
        cum = np.cumsum(np.bincount(a.ravel(), minlength=1))
        out = []
        for q in (low, high):
            v = (q / 100.0) * (n - 1)
            i = int(math.floor(v))
            g = v - i
            lo = float(np.searchsorted(cum, i, side="right"))
            hi = float(np.searchsorted(cum, min(i + 1, n - 1), side="right"))
            d = hi - lo  # numpy's _lerp, in float64, then cast (as images.normalize does)
            out.append(np.float32(lo + d * g if g < 0.5 else hi - d * (1.0 - g)))
        return out[0], out[1]
    lo, hi = np.percentile(a.astype(np.float32, copy=False).reshape(1, -1), [low, high], axis=1)
    return np.float32(lo[0]), np.float32(hi[0])


@dataclass(frozen=True)
class FieldPrep:
    """Picklable per-field preparation run in the DataLoader workers.

    ``kind``: ``"full"`` (normalise the whole field), ``"crop"`` (HF encoders: keep only
    the centred ``grid·size`` square the crop grid covers, when it fits), ``"resize"``
    (morphology: area-resample to ``size × size`` as the encoder would).  The encoder
    gives identical features on the prepared array as on the whole normalised field.
    """

    low: float = 1.0
    high: float = 99.9
    kind: str = "full"
    size: int = 0
    grid: int = 1

    def region(self, h: int, w: int) -> tuple[slice, slice]:
        if self.kind != "crop" or min(h, w) < self.size:
            return slice(0, h), slice(0, w)
        span = self.grid * self.size

        def _axis(length: int) -> slice:
            if span <= length:
                off = (length - span) // 2
                return slice(off, off + span)
            return slice(0, length)

        return _axis(h), _axis(w)

    def __call__(self, raw: np.ndarray, ranges: np.ndarray | None = None) -> np.ndarray:
        """``ranges``: fixed (C, 2) (lo, hi) per channel (plate normalisation); None: the
        field's own ``low``/``high`` percentiles."""
        c, h, w = raw.shape
        ys, xs = self.region(h, w)
        out = np.empty((c, ys.stop - ys.start, xs.stop - xs.start), dtype=np.float32)
        for i in range(c):
            if ranges is None:
                lo, hi = fast_percentiles(raw[i], self.low, self.high)
            else:
                lo, hi = np.float32(ranges[i][0]), np.float32(ranges[i][1])
            if hi - lo <= 0:
                out[i] = 0.0
                continue
            np.subtract(raw[i, ys, xs].astype(np.float32, copy=False), lo, out=out[i])
            out[i] /= np.float32(hi - lo)
        np.clip(out, 0.0, 1.0, out=out)
        if self.kind == "resize" and (h, w) != (self.size, self.size):
            import torch
            import torch.nn.functional as F

            t = torch.from_numpy(out)[:, None]
            mode = {"mode": "area"} if min(h, w) >= self.size else {"mode": "bilinear", "align_corners": False}
            out = F.interpolate(t, size=(self.size, self.size), **mode)[:, 0].numpy()
        return np.ascontiguousarray(out)


def field_prep_for(encoder, low: float = 1.0, high: float = 99.9) -> FieldPrep:
    """The :class:`FieldPrep` matching ``encoder`` (crop for ``hf:``, resize for morphology)."""
    n_crops, size = getattr(encoder, "n_crops", None), getattr(encoder, "input_size", None)
    if isinstance(n_crops, int) and isinstance(size, int) and math.isqrt(n_crops) ** 2 == n_crops:
        return FieldPrep(low, high, "crop", size, math.isqrt(n_crops))
    if getattr(encoder, "spec", "") == "morphology" and isinstance(getattr(encoder, "size", None), int):
        return FieldPrep(low, high, "resize", encoder.size, 1)
    return FieldPrep(low, high, "full")


# ------------------------------------------------------------------- loading
class _Fields:
    """Map-style dataset over job rows: item → (row, prepared array | None, error | None)."""

    def __init__(self, records: list[dict], stains: list[str], prep: FieldPrep, ranges: list | None = None):
        self.records, self.stains, self.prep = records, stains, prep
        self.ranges = ranges if ranges is not None else [None] * len(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from .images import load_field

        try:
            return i, self.prep(load_field(self.records[i], self.stains), self.ranges[i]), None
        except CellClipError as exc:
            return i, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill a long job
            return i, None, f"field at job row {i}: cannot load ({type(exc).__name__}: {exc})"


def _collate(items):
    """In the worker: stack same-shaped fields into tensors (pinned by the loader)."""
    import torch

    groups: dict[tuple, list] = {}
    errors = []
    for row, arr, err in items:
        if arr is None:
            errors.append((row, err))
        else:
            groups.setdefault(arr.shape, []).append((row, arr))
    out = []
    for items_ in groups.values():
        rows = torch.tensor([r for r, _ in items_], dtype=torch.int64)
        out.append((rows, torch.from_numpy(np.stack([a for _, a in items_]))))
    return {"groups": out, "errors": errors}


class _ShardBatches:
    """Batch sampler: batches of ``batch_size`` job rows that never straddle a shard."""

    def __init__(self, shards: list[tuple[int, int]], batch_size: int):
        self.batches = [list(range(a, min(a + batch_size, b))) for a, b in shards
                        for a in range(a, b, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ------------------------------------------------------------------ file I/O
def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _shard_paths(out: Path, kind: str, i: int) -> tuple[Path, Path, Path]:
    d = out / (_FEAT_DIR if kind == "features" else _EMB_DIR)
    stem = f"shard-{i:05d}" if kind == "features" else f"unit-{i:05d}"
    return d / f"{stem}.npy", d / f"{stem}.rows.npy", d / f"{stem}.json"


def _done(out: Path, kind: str, i: int) -> bool:
    return all(p.is_file() for p in _shard_paths(out, kind, i))


def _write_part(out: Path, kind: str, i: int, data: np.ndarray, rows: np.ndarray, meta: dict) -> None:
    d, r, m = _shard_paths(out, kind, i)
    d.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(d, data)
    _atomic_save_npy(r, rows.astype(np.int64))
    _atomic_write_text(m, json.dumps(meta))  # the completion marker, last


def _read_part(out: Path, kind: str, i: int, mmap: bool = True):
    d, r, m = _shard_paths(out, kind, i)
    data = np.load(d, allow_pickle=False, mmap_mode="r" if mmap else None)
    return data, np.load(r, allow_pickle=False), json.loads(m.read_text())


def _wait(paths_ok: Callable[[], bool], what: str, timeout: float, poll: float = 0.25) -> None:
    t0 = time.monotonic()
    while not paths_ok():
        if time.monotonic() - t0 > timeout:
            raise CellClipError(f"timed out after {timeout:.0f} s waiting for {what} (did another rank fail?)")
        time.sleep(poll)


# ------------------------------------------------------------------- inputs
def read_fields(data, *, platemap_dir=None, cell_line: str | None = None,
                channel_map=None) -> pd.DataFrame:
    """Fields table from a plate folder, a LoadData CSV, a fields-table parquet, or a
    manifest (``.txt``: one plate folder / CSV per line, ``#`` comments); plates are
    concatenated.  With ``platemap_dir`` the table is annotated
    (:func:`napari_cellclip.metadata.annotate`)."""
    from . import plates

    if isinstance(data, pd.DataFrame):
        fields = data.reset_index(drop=True)
    else:
        p = Path(data).expanduser()
        if not p.exists():
            raise PlateError(f"{p}: no such plate folder, CSV, parquet or manifest")
        if p.suffix.lower() == ".parquet":
            fields = pd.read_parquet(p)
        elif p.suffix.lower() in (".txt", ".lst", ".manifest"):
            entries = [ln.strip() for ln in p.read_text().splitlines()]
            entries = [e for e in entries if e and not e.startswith("#")]
            if not entries:
                raise PlateError(f"{p}: the manifest lists no plates")
            parts = []
            for e in entries:
                q = Path(e).expanduser()
                q = q if q.is_absolute() else (p.parent / q)
                parts.append(plates.read_plate(q, channel_map=channel_map))
            fields = pd.concat(parts, ignore_index=True)
        else:
            fields = plates.read_plate(p, channel_map=channel_map)
    if platemap_dir is not None:
        from . import metadata

        kw = {"cell_line": cell_line} if cell_line else {}
        fields = metadata.annotate(fields, platemap_dir=platemap_dir, **kw)
    if len(fields) == 0:
        raise PlateError("the fields table is empty: nothing to embed")
    return fields.reset_index(drop=True)


def _plan(fields: pd.DataFrame, shard_size: int):
    """Order rows by plate (first appearance; stable) and cut shards inside plates.

    Returns (job_fields, source_rows, shards [(start, stop)], shard_plate [int], plates [str]).
    """
    if "Metadata_Plate" in fields.columns:
        keys = fields["Metadata_Plate"].astype(str).to_numpy()
    else:
        keys = np.full(len(fields), "", dtype=object)
    codes, uniques = pd.factorize(keys, sort=False)
    order = np.argsort(codes, kind="stable")
    job = fields.iloc[order].reset_index(drop=True)
    codes = codes[order]
    shards, shard_plate = [], []
    bounds = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], bounds]).astype(int)
    stops = np.concatenate([bounds, [len(codes)]]).astype(int)
    for a, b in zip(starts, stops):
        for s in range(a, b, shard_size):
            shards.append((int(s), int(min(s + shard_size, b))))
            shard_plate.append(int(codes[a]))
    return job, order.astype(np.int64), shards, shard_plate, [str(u) for u in uniques]


def _records(job: pd.DataFrame, stains: Sequence[str]) -> list[dict]:
    cols = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ChannelAxes")
            if c in job.columns]
    for s in stains:
        cols += [c for c in (f"FileName_Orig{s}", f"PathName_Orig{s}", f"Frame_Orig{s}") if c in job.columns]
    return job[cols].to_dict(orient="records")


# ---------------------------------------------------------------------- the job
def _log(quiet: bool, rank: int, msg: str) -> None:
    if not quiet:
        print(f"[cellclip-embed rank {rank}] {msg}", file=sys.stderr, flush=True)


def _device_for(device: str, local_rank: int, world: int):
    import torch

    from .encoders import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None and (world > 1 or local_rank):
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev


def _parse_options(items) -> dict:
    """``["size=64", "n_crops=9"]`` or a dict → encoder keyword options (ints/floats parsed)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for it in items:
        k, sep, v = str(it).partition("=")
        if not sep or not k.strip():
            raise CellClipError(f"encoder option {it!r} is not KEY=VALUE")
        v = v.strip()
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        out[k.strip()] = v
    return out


def _build_encoder(spec: str, dev, *, n_crops: int | None, batch_size: int, channels: int, compile_: bool,
                   options: dict | None = None):
    from .encoders import get_encoder

    opts = dict(options or {})
    if opts:
        warnings.warn(f"encoder options {opts} differ from the checkpoint's {spec!r} defaults; the features "
                      "(and embeddings) may not match what the model was trained on", CellClipWarning,
                      stacklevel=3)
    if n_crops is not None and str(spec).startswith("hf:"):
        opts["n_crops"] = n_crops
    enc = get_encoder(spec, device=dev, **opts)
    if hasattr(enc, "max_batch"):  # every B·C·crops plane of a batch in one forward
        enc.max_batch = max(int(enc.max_batch), batch_size * channels * int(getattr(enc, "n_crops", 1)))
    if compile_:
        import torch

        if hasattr(enc, "model"):
            enc.model = torch.compile(enc.model, dynamic=False)
        else:
            warnings.warn(f"--compile: encoder {enc.spec!r} has no model to compile; running eagerly",
                          CellClipWarning, stacklevel=2)
    return enc


def run_job(
    data,
    checkpoint,
    out,
    *,
    batch_size: int = 8,
    workers: int | None = None,
    device: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    n_crops: int | None = None,
    encoder_options=None,
    ann: str = "auto",
    platemap_dir=None,
    cell_line: str | None = None,
    channel_map=None,
    prefetch: int = 2,
    wait_timeout: float = 24 * 3600.0,
    stop_after_shards: int | None = None,
    quiet: bool = False,
    model=None,
    encoder=None,
) -> dict:
    """Run (or resume) an embedding job; see the module doc.  Returns a summary dict.

    ``data``: plate folder / LoadData CSV / fields parquet / manifest, or a fields
    DataFrame.  ``checkpoint``: CellCLIP folder (or pass ``model=``).  ``out``: the job
    and store folder.  ``resume``: continue a job already in ``out`` (its inputs must be
    the same); ``overwrite``: delete it first.  ``ann``: ``"auto"`` (build the FAISS
    index when the store reaches the search threshold), ``"always"``, ``"never"``.
    ``stop_after_shards``: debug — SIGKILL this process after writing that many shards
    (used by the kill/resume test).
    """
    import torch

    from . import ann as ann_mod
    from .embed import _correction_spec, check_stains, embed_features, load_model, model_identity
    from .store import (_EMB_FILE, _FIELDS_FILE, _META_FILE, FORMAT_NAME, FORMAT_VERSION,
                        parquet_safe, _jsonable, cache_key)

    t_start = time.perf_counter()
    rank, world, local_rank = dist_env()
    out = Path(out).expanduser()
    shard_size = max(1, int(shard_size))
    batch_size = max(1, int(batch_size))
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    if ann not in ("auto", "always", "never"):
        raise CellClipError(f"ann must be 'auto', 'always' or 'never', got {ann!r}")

    dev = _device_for(device, local_rank, world)
    if model is None:
        model = load_model(checkpoint, device=str(dev))
    else:
        model.to(dev).eval()
    cfg = model.config
    fields = check_stains(read_fields(data, platemap_dir=platemap_dir, cell_line=cell_line,
                                      channel_map=channel_map), model)
    stains = list(getattr(cfg, "stains", None) or [])
    if encoder is None:
        encoder = _build_encoder(cfg.image_encoder, dev, n_crops=n_crops, batch_size=batch_size,
                                 channels=len(stains), compile_=compile,
                                 options=_parse_options(encoder_options))
    if stains and hasattr(encoder, "with_stains"):  # encoders that must know which channel is which (cells)
        encoder = encoder.with_stains(stains)
    width = getattr(cfg, "vision_width", None)
    if width is not None and int(encoder.dim) != int(width):
        raise CellClipError(f"the image encoder gives {encoder.dim}-dim features but the checkpoint expects {width}")
    prep = field_prep_for(encoder)
    model_id = model_identity(model)
    correction, spec = _correction_spec(model)

    job, source_rows, shards, shard_plate, plate_names = _plan(fields, shard_size)
    n = len(job)
    per_plate = spec is not None
    if per_plate:  # one unit per plate
        units = [[s for s, p in enumerate(shard_plate) if p == k] for k in range(len(plate_names))]
    else:
        units = [[s] for s in range(len(shards))]
    fp = cache_key(job, f"{model_id}|{encoder.identity}|{prep}|shard={shard_size}|{JOB_FORMAT}")
    job_meta = {
        "format": JOB_FORMAT, "fingerprint": fp, "n_fields": n, "n_shards": len(shards),
        "n_units": len(units), "shard_size": shard_size, "stains": stains, "model_id": model_id,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "image_encoder": getattr(encoder, "spec", ""), "encoder_identity": encoder.identity,
        "feature_dim": int(encoder.dim), "prep": prep.__dict__, "per_plate_units": per_plate,
        "input_normalization": getattr(cfg, "input_normalization", "field"),
        "feature_correction": (correction.to_json(spec) if correction is not None else None),
    }

    # ---- job folder: new / resume / overwrite
    jf = out / _JOB_FILE
    if rank == 0:
        if jf.is_file():
            old = json.loads(jf.read_text())
            if overwrite:
                import shutil

                for sub in ("shards", _JOB_FILE, _JOB_FIELDS, _META_FILE, _EMB_FILE, _FIELDS_FILE,
                            ann_mod.INDEX_FILE, ann_mod.META_FILE):
                    p = out / sub
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            elif not resume:
                raise CellClipError(f"{out} already holds an embedding job; pass --resume to continue it "
                                    "or --overwrite to start again")
            elif old.get("fingerprint") != fp:
                raise CellClipError(
                    f"{out} holds a job for different inputs (fields, files, checkpoint, encoder or shard "
                    "size changed); use another --out or --overwrite")
        elif out.exists() and any(out.iterdir()) and not overwrite and not (out / "shards").exists():
            if any((out / f).exists() for f in (_META_FILE, _EMB_FILE)):
                raise CellClipError(f"{out} already holds an embedding store; use another --out or --overwrite")
        out.mkdir(parents=True, exist_ok=True)
        (out / _FEAT_DIR).mkdir(parents=True, exist_ok=True)
        (out / _EMB_DIR).mkdir(parents=True, exist_ok=True)
        if not jf.is_file():
            parquet_safe(job).to_parquet(out / _JOB_FIELDS, index=False)
            _atomic_write_text(jf, json.dumps(_jsonable(job_meta), indent=1))
        (out / _META_FILE).unlink(missing_ok=True)  # the store is complete only after the merge
    else:
        _wait(lambda: jf.is_file(), f"rank 0 to create {jf}", wait_timeout)
        if json.loads(jf.read_text()).get("fingerprint") != fp:
            raise CellClipError(f"rank {rank}: {jf} describes different inputs than this rank read")

    # ---- stage 1: features
    mine = [s for s in range(len(shards)) if s % world == rank]
    todo = [s for s in mine if not _done(out, "features", s)]
    _log(quiet, rank, f"{n} fields, {len(shards)} shards ({len(mine)} on this rank, "
         f"{len(mine) - len(todo)} already done), encoder {encoder.spec} on {dev}, batch {batch_size}, "
         f"{workers} workers")
    c, d = len(stains), int(encoder.dim)
    n_written = 0
    t1 = time.perf_counter()
    n_fields_encoded = 0
    if todo:
        from .images import field_ranges

        records = _records(job, stains)
        # plate normalisation: ranges from a fixed sample of each plate's fields, so every
        # rank and a resumed job get the same values
        ranges = field_ranges(job, stains, job_meta["input_normalization"], prep.low, prep.high)
        dataset = _Fields(records, stains, prep, ranges)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_ShardBatches([shards[s] for s in todo], batch_size),
            num_workers=workers, collate_fn=_collate, pin_memory=(dev.type == "cuda"),
            prefetch_factor=(prefetch if workers > 0 else None), persistent_workers=False,
        )
        starts = np.array([a for a, _ in shards])
        buf: dict[int, dict] = {}
        it = iter(loader)
        try:
            for batch in it:
                rows_in = [int(r) for rows, _ in batch["groups"] for r in rows] + [r for r, _ in batch["errors"]]
                if not rows_in:
                    continue
                s = int(np.searchsorted(starts, rows_in[0], side="right") - 1)
                a, b = shards[s]
                st = buf.setdefault(s, {"feats": np.zeros((b - a, c, d), np.float32),
                                        "ok": np.zeros(b - a, bool), "seen": 0, "skipped": []})
                for rows, x in batch["groups"]:
                    f = encoder.encode(x).numpy()
                    if f.shape != (len(rows), c, d):
                        raise CellClipError(f"encoder returned {f.shape}, expected {(len(rows), c, d)}")
                    idx = rows.numpy() - a
                    st["feats"][idx] = f
                    st["ok"][idx] = True
                    st["seen"] += len(rows)
                    n_fields_encoded += len(rows)
                for r, err in batch["errors"]:
                    st["skipped"].append([int(source_rows[r]), str(err)])
                    st["seen"] += 1
                    warnings.warn(f"skipped field (row {int(source_rows[r])}): {err}", CellClipWarning,
                                  stacklevel=2)
                if st["seen"] == b - a:
                    ok = np.flatnonzero(st["ok"])
                    _write_part(out, "features", s, st["feats"][ok], ok + a,
                                {"shard": s, "start": a, "stop": b, "n_ok": int(ok.size),
                                 "skipped": st["skipped"], "plate": plate_names[shard_plate[s]]})
                    del buf[s]
                    n_written += 1
                    el = time.perf_counter() - t1
                    _log(quiet, rank, f"features shard {s + 1}/{len(shards)} written "
                         f"({n_fields_encoded / max(el, 1e-9):.2f} fields/s)")
                    if stop_after_shards is not None and n_written >= stop_after_shards:
                        _log(quiet, rank, f"--stop-after-shards {stop_after_shards}: killing myself")
                        sys.stderr.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
        finally:
            del it
    t_features = time.perf_counter() - t1

    # ---- stage 2: embeddings per unit
    t2 = time.perf_counter()
    my_units = [u for u in range(len(units)) if u % world == rank]
    units_done = 0
    for u in my_units:
        if _done(out, "embeddings", u):
            continue
        need = units[u]
        _wait(lambda: all(_done(out, "features", s) for s in need), f"feature shards {need}", wait_timeout)
        parts = [_read_part(out, "features", s) for s in need]
        feats = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts]) if parts else \
            np.zeros((0, c, d), np.float32)
        rows = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        if len(rows) and spec is not None:
            feats = correction.apply(feats, job.iloc[rows].reset_index(drop=True), spec)
        emb = embed_features(feats, model, batch_size=max(256, batch_size)) if len(rows) else \
            np.zeros((0, int(cfg.embed_dim)), np.float32)
        _write_part(out, "embeddings", u, np.ascontiguousarray(emb, dtype=np.float32), rows,
                    {"unit": u, "shards": need, "n": int(len(rows))})
        units_done += 1
    t_embed = time.perf_counter() - t2

    summary = {"rank": rank, "world_size": world, "n_fields": n, "n_shards": len(shards),
               "shards_on_rank": len(mine), "shards_computed": n_written,
               "shards_resumed": len(mine) - len(todo), "units_computed": units_done,
               "fields_encoded": n_fields_encoded, "seconds_features": t_features,
               "seconds_embed": t_embed, "out": str(out), "device": str(dev)}
    if rank != 0:
        summary["seconds_total"] = time.perf_counter() - t_start
        return summary

    # ---- merge (rank 0)
    t3 = time.perf_counter()
    _wait(lambda: all(_done(out, "embeddings", u) for u in range(len(units))), "all embedding units",
          wait_timeout)
    metas = [json.loads(_shard_paths(out, "embeddings", u)[2].read_text()) for u in range(len(units))]
    total = sum(m["n"] for m in metas)
    if total == 0:
        raise PlateError(f"none of the {n} fields could be read")
    e_dim = int(cfg.embed_dim)
    tmp_emb = out / f".{_EMB_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    mm = np.lib.format.open_memmap(tmp_emb, mode="w+", dtype=np.float32, shape=(total, e_dim))
    all_rows = np.empty(total, dtype=np.int64)
    pos = 0
    for u in range(len(units)):
        e, r, _ = _read_part(out, "embeddings", u)
        mm[pos:pos + len(r)] = e
        all_rows[pos:pos + len(r)] = r
        pos += len(r)
    mm.flush()
    del mm
    skipped = []
    for s in range(len(shards)):
        skipped += json.loads(_shard_paths(out, "features", s)[2].read_text()).get("skipped", [])
    fields_out = job.iloc[all_rows].reset_index(drop=True)
    tmp_f = out / f".{_FIELDS_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    parquet_safe(fields_out).to_parquet(tmp_f, index=False)
    os.replace(tmp_emb, out / _EMB_FILE)
    os.replace(tmp_f, out / _FIELDS_FILE)
    info = {"image_encoder": job_meta["image_encoder"], "encoder_identity": encoder.identity,
            "stains": stains, "feature_correction": job_meta["feature_correction"],
            "n_input_fields": n, "n_embedded": int(total), "skipped": skipped,
            "pipeline": {"shards": len(shards), "shard_size": shard_size, "world_size": world}}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_id": model_id, "level": "field",
            "n": int(total), "dim": e_dim, "info": _jsonable(info)}
    t_ann = 0.0
    if ann == "always" or (ann == "auto" and total >= ann_mod.ANN_THRESHOLD):
        ta = time.perf_counter()
        emb_mm = np.load(out / _EMB_FILE, mmap_mode="r", allow_pickle=False)
        ann_mod.build_index(emb_mm, use_gpu=False).save(out)
        t_ann = time.perf_counter() - ta
        _log(quiet, rank, f"ANN index built in {t_ann:.1f} s")
    _atomic_write_text(out / _META_FILE, json.dumps(meta, indent=2))  # the store is complete
    summary.update(n_embedded=int(total), n_skipped=len(skipped), seconds_merge=time.perf_counter() - t3,
                   seconds_ann=t_ann, seconds_total=time.perf_counter() - t_start)
    _log(quiet, rank, f"store written: {out} ({total} fields, {len(skipped)} skipped) in "
         f"{summary['seconds_total']:.1f} s")
    return summary


# ------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m napari_cellclip.pipeline",
        description="Embed large plate sets with a CellCLIP checkpoint: streaming, sharded, resumable; "
                    "run under torchrun to shard the fields across GPUs/machines.")
    p.add_argument("--data", required=True,
                   help="plate folder, LoadData CSV, fields-table .parquet, or a .txt manifest (one plate per line)")
    p.add_argument("--checkpoint", required=True, help="CellCLIP checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (job shards + embedding store + ANN index)")
    p.add_argument("--batch-size", type=int, default=8, help="fields per encoder forward (default 8)")
    p.add_argument("--workers", type=int, default=None, help="decoding worker processes (default: cores/2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--resume", action="store_true", help="continue a killed job in --out")
    p.add_argument("--overwrite", action="store_true", help="delete a job/store in --out and start again")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="fields per shard")
    p.add_argument("--n-crops", type=int, default=None, help="crops per plane for hf: encoders (1, 4, 9...)")
    p.add_argument("--encoder-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option for the image encoder (e.g. size=128 for morphology); repeatable")
    p.add_argument("--ann", choices=("auto", "always", "never"), default="auto",
                   help="build the FAISS index alongside the embeddings (auto: above the search threshold)")
    p.add_argument("--platemap-dir", default=None, help="annotate the fields with this platemap folder")
    p.add_argument("--cell-line", default=None)
    p.add_argument("--channel-map", default=None, help="e.g. 1=DNA,2=ER,3=RNA,4=AGP,5=Mito")
    p.add_argument("--wait-timeout", type=float, default=24 * 3600.0,
                   help="seconds a rank waits for other ranks' shards")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = run_job(
            args.data, args.checkpoint, args.out, batch_size=args.batch_size, workers=args.workers,
            device=args.device, shard_size=args.shard_size, resume=args.resume, overwrite=args.overwrite,
            compile=args.compile, n_crops=args.n_crops, encoder_options=args.encoder_option, ann=args.ann, platemap_dir=args.platemap_dir,
            cell_line=args.cell_line, channel_map=args.channel_map, wait_timeout=args.wait_timeout,
            stop_after_shards=args.stop_after_shards, quiet=args.quiet,
        )
    except CellClipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
