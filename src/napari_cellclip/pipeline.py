"""Streaming, sharded, resumable embedding of large plate sets.

``python -m napari_cellclip.pipeline --data PLATES --checkpoint RUN --output DIR`` embeds every
field of one or many plates with a CellCLIP checkpoint and leaves an
:class:`~napari_cellclip.store.EmbeddingStore` folder in ``--output`` (plus a FAISS index for
large sets), in bounded memory and resumably.  It walks the road the plugin walks — the fields
front door (:func:`napari_cellclip.fields.read_fields`), the feature engine
(:func:`napari_cellclip.features.iter_features`, with its feature cache), the towers
(:func:`napari_cellclip.towers.image_embeddings`) and the store writer
(:class:`napari_cellclip.store.StoreWriter`) — and adds only sharding, resume and ranks:

* **plan** — fields are grouped by plate (first-appearance order, the within-plate order
  kept) and cut into shards of ``--shard-size`` fields that never cross a plate.  Rank 0
  writes ``job.json`` (the inputs' fingerprint and each plate's intensity range under plate
  normalisation, sampled once) and ``job_fields.parquet``; other ranks and ``--resume`` read them.
* **features** — each shard's features go to ``shards/features/shard-NNNNN.npy`` (+ ``.rows.npy``,
  the job rows that succeeded) and then a ``.json`` marker, each written atomically; a killed job
  leaves only complete shards, and ``--resume`` skips every shard whose marker exists.  Fields
  already in the feature cache are not decoded or encoded again.
* **embeddings** — per plate (the correction's statistics come from the whole plate's controls,
  and a well's fields are pooled together): field and well embeddings, ``shards/embeddings/unit-NNNNN``.
* **merge** — rank 0 streams the plates into the store (``embeddings.npy`` via a memory map,
  ``fields.parquet``, ``wells/``, ``store.json`` last) and builds ``ann.faiss`` when the store
  has at least :data:`napari_cellclip.ann.ANN_THRESHOLD` rows (``--ann``).
* **several GPUs / machines** — the same command under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``): rank ``r`` computes the shards ``s ≡ r (mod W)`` on ``cuda:LOCAL_RANK`` and the
  plates ``p ≡ r (mod W)``; a plate waits (polling the shard markers on the shared ``--output``
  folder) for shards of other ranks; rank 0 merges.  No process group is needed.
* **memory** — one shard of features, ``workers × prefetch × batch`` decoded fields and one
  plate of features at a time; the merge streams.  Only the fields table itself (a few hundred
  bytes per field) grows with the number of fields.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ._fsutil import atomic_file, atomic_save_npy, atomic_write_text, load_npy, verify_npy
from .cli import check_output_dir
from .devices import cuda_flags
from .errors import CellClipError, CorruptFileError, PlateError, warn_at_caller

__all__ = ["run_job", "main", "plan", "DEFAULT_SHARD_SIZE"]

DEFAULT_SHARD_SIZE = 512
JOB_FORMAT = "napari-cellclip-embedding-job-v2"
_FEAT_DIR = "shards/features"
_EMB_DIR = "shards/embeddings"
_JOB_FILE = "job.json"
_JOB_FIELDS = "job_fields.parquet"


# ------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """Job rows (plates contiguous), their rows in the input table, and shards inside plates."""

    fields: pd.DataFrame
    source_rows: np.ndarray
    shards: list[tuple[int, int]]
    shard_plate: list[int]
    plates: list[str]

    @property
    def units(self) -> list[list[int]]:
        """The shards of each plate: the unit of the embedding stage."""
        return [[s for s, p in enumerate(self.shard_plate) if p == k] for k in range(len(self.plates))]


def plan(fields: pd.DataFrame, shard_size: int) -> Plan:
    """Order rows by plate (first appearance; stable) and cut shards inside plates."""
    if "Metadata_Plate" in fields.columns:
        keys = fields["Metadata_Plate"].astype(str).to_numpy()
    else:
        keys = np.full(len(fields), "", dtype=object)
    codes, uniques = pd.factorize(keys, sort=False)
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    shards, shard_plate = [], []
    bounds = np.flatnonzero(np.diff(codes)) + 1
    for a, b in zip(np.concatenate([[0], bounds]).astype(int), np.concatenate([bounds, [len(codes)]]).astype(int)):
        for s in range(a, b, shard_size):
            shards.append((int(s), int(min(s + shard_size, b))))
            shard_plate.append(int(codes[a]))
    return Plan(fields.iloc[order].reset_index(drop=True), order.astype(np.int64), shards, shard_plate,
                [str(u) for u in uniques])


@dataclass
class Job:
    """A job folder being worked on by one rank."""

    out: Path
    plan: Plan
    meta: dict
    rank: int = 0
    world: int = 1
    wait_timeout: float = 24 * 3600.0
    quiet: bool = False
    stats: dict = field(default_factory=dict)

    def mine(self, n: int) -> list[int]:
        return [i for i in range(n) if i % self.world == self.rank]

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[cellclip-embed rank {self.rank}] {msg}", file=sys.stderr, flush=True)

    def wait(self, ok: Callable[[], bool], what: str, poll: float = 0.25) -> None:
        t0 = time.monotonic()
        while not ok():
            if time.monotonic() - t0 > self.wait_timeout:
                raise CellClipError(f"timed out after {self.wait_timeout:.0f} s waiting for {what} "
                                    "(did another rank fail?)")
            time.sleep(poll)


# ------------------------------------------------------------------ shard files
def _shard_paths(out: Path, kind: str, i: int) -> tuple[Path, Path, Path]:
    d = out / (_FEAT_DIR if kind == "features" else _EMB_DIR)
    stem = f"shard-{i:05d}" if kind == "features" else f"unit-{i:05d}"
    return d / f"{stem}.npy", d / f"{stem}.rows.npy", d / f"{stem}.json"


def _done(out: Path, kind: str, i: int) -> bool:
    return all(p.is_file() for p in _shard_paths(out, kind, i))


def _write_part(out: Path, kind: str, i: int, data: np.ndarray, rows: np.ndarray, meta: dict,
                extra: dict | None = None) -> None:
    d, r, m = _shard_paths(out, kind, i)
    for name, arr in (extra or {}).items():
        atomic_save_npy(d.with_name(f"{d.stem}.{name}.npy"), arr)
    atomic_save_npy(d, data)
    atomic_save_npy(r, rows.astype(np.int64))
    atomic_write_text(m, json.dumps(meta))  # the completion marker, last


def _read_part(out: Path, kind: str, i: int, mmap: bool = True, extra: Sequence[str] = ()):
    """(data, rows, meta, *extra arrays) of a finished part; every array checked against its checksum."""
    d, r, m = _shard_paths(out, kind, i)
    data = load_npy(d, mmap=mmap)
    more = [load_npy(d.with_name(f"{d.stem}.{name}.npy")) for name in extra]
    try:
        meta = json.loads(m.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptFileError(m, f"unreadable ({exc})") from None
    return (data, load_npy(r), meta, *more)


def _part_files(out: Path, kind: str, i: int) -> list[Path]:
    d, r, m = _shard_paths(out, kind, i)
    return [d, r, m, *d.parent.glob(f"{d.stem}.*.npy")]


def redo_damaged(job: Job, kind: str, parts: Sequence[int]) -> list[int]:
    """Of this rank's finished ``parts``, those whose files fail their checksum (cut short, a flipped
    bit): named in a warning and removed, so that they are computed again → their indices."""
    bad = []
    for i in parts:
        if not _done(job.out, kind, i):
            continue
        try:
            for p in _part_files(job.out, kind, i):
                if p.suffix == ".npy":
                    verify_npy(p)
            _read_part(job.out, kind, i, mmap=True)
        except (CorruptFileError, OSError) as exc:
            warn_at_caller(f"damaged {kind} shard {i} ({exc}): computed again")
            job.log(f"damaged {kind} shard {i}: computed again")
            for p in _part_files(job.out, kind, i):
                p.unlink(missing_ok=True)
            bad.append(i)
    return bad


# -------------------------------------------------------------------- job folder
def open_job(out: Path, meta: dict, fields: pd.DataFrame, *, rank: int, resume: bool, overwrite: bool,
             wait: Callable, plate_ranges: Callable[[], dict]) -> dict:
    """Create, resume or overwrite the job in ``out`` (rank 0), or wait for it (other ranks).

    Returns the job's ``job.json`` (with ``plate_ranges``, computed once by rank 0 when the job is
    created); an ``out`` holding another job or a store needs ``resume`` / ``overwrite``.
    """
    from .store import has_store_files, jsonable, parquet_safe, remove_store

    jf = out / _JOB_FILE
    if rank != 0:
        wait(lambda: jf.is_file(), f"rank 0 to create {jf}")
        stored = json.loads(jf.read_text())
        if stored.get("fingerprint") != meta["fingerprint"]:
            raise CellClipError(f"rank {rank}: {jf} describes different inputs than this rank read")
        return stored
    if jf.is_file():
        _existing_job(out, json.loads(jf.read_text()), meta, resume=resume, overwrite=overwrite)
    elif not overwrite and not (out / "shards").exists() and has_store_files(out):
        raise CellClipError(f"{out} already holds an embedding store; use another --output or --overwrite")

    out.mkdir(parents=True, exist_ok=True)
    (out / _FEAT_DIR).mkdir(parents=True, exist_ok=True)
    (out / _EMB_DIR).mkdir(parents=True, exist_ok=True)
    if not jf.is_file():
        with atomic_file(out / _JOB_FIELDS) as tmp:
            parquet_safe(fields).to_parquet(tmp, index=False)
        meta["plate_ranges"] = {p: np.asarray(r).tolist() for p, r in plate_ranges().items()}
        atomic_write_text(jf, json.dumps(jsonable(meta), indent=1))
    remove_store(out)  # the store is complete only after the merge
    return json.loads(jf.read_text())


def _existing_job(out: Path, old: dict, meta: dict, *, resume: bool, overwrite: bool) -> None:
    if overwrite:
        import shutil

        from . import ann as ann_mod
        from .store import remove_store

        shutil.rmtree(out / "shards", ignore_errors=True)
        for name in (_JOB_FILE, _JOB_FIELDS, ann_mod.INDEX_FILE, ann_mod.META_FILE):
            (out / name).unlink(missing_ok=True)
        remove_store(out)
    elif not resume:
        raise CellClipError(f"{out} already holds an embedding job; pass --resume to continue it "
                            "or --overwrite to start again")
    elif old.get("fingerprint") != meta["fingerprint"]:
        raise CellClipError(f"{out} holds a job for different inputs (fields, files, checkpoint, encoder or shard "
                            "size changed); use another --output or --overwrite")


# ------------------------------------------------------------------ stage: features
class _ShardBuffer:
    """The features of one shard as its batches arrive (any order), until it is complete."""

    def __init__(self, a: int, b: int, shape: tuple):
        self.a, self.b = a, b
        self.feats = np.zeros((b - a,) + tuple(shape), np.float32)
        self.ok = np.zeros(b - a, bool)
        self.seen = self.n_cached = 0
        self.skipped: list = []

    def add(self, fb, source_rows: np.ndarray) -> None:
        idx = fb.positions - self.a
        self.feats[idx] = fb.features
        self.ok[idx] = True
        self.n_cached += fb.n_cached
        for r, msg, _path in fb.errors:
            self.skipped.append([int(source_rows[r]), str(msg)])
            warn_at_caller(f"skipped field (row {int(source_rows[r])}): {msg}")
        self.seen += len(fb.positions) + len(fb.errors)

    @property
    def complete(self) -> bool:
        return self.seen == self.b - self.a


def stage_features(job: Job, encoder, *, cache_dir, batch_size: int, workers: int, prefetch: int,
                   stop_after_shards: int | None = None) -> None:
    """Features of this rank's shards not done yet, through the feature engine (and its cache)."""
    from .features import iter_features

    p, meta = job.plan, job.meta
    mine = job.mine(len(p.shards))
    redo_damaged(job, "features", mine)
    todo = [s for s in mine if not _done(job.out, "features", s)]
    job.stats.update(shards_on_rank=len(mine), shards_resumed=len(mine) - len(todo), shards_computed=0,
                     fields_encoded=0, fields_cached=0, seconds_features=0.0)
    job.log(f"{len(p.fields)} fields, {len(p.shards)} shards ({len(mine)} on this rank, {len(mine) - len(todo)} "
            f"already done), encoder {encoder.spec} on {getattr(encoder, 'device', '?')}, batch {batch_size}, "
            f"{workers} workers")
    if not todo:
        return
    t1 = time.perf_counter()
    batches = [list(range(a, min(a + batch_size, b))) for s in todo for a0, b in [p.shards[s]]
               for a in range(a0, b, batch_size)]
    starts = np.array([a for a, _ in p.shards])
    shape, buffers = (len(meta["stains"]), int(encoder.dim)), {}
    ranges = {k: np.asarray(v, np.float32) for k, v in (meta.get("plate_ranges") or {}).items()}
    for fb in iter_features(p.fields, encoder, stains=meta["stains"], cache_dir=cache_dir,
                            use_cache=cache_dir is not False, num_workers=workers, prefetch=prefetch,
                            normalization=meta["input_normalization"], ranges=ranges, batches=batches):
        first = fb.positions[0] if len(fb.positions) else fb.errors[0][0]
        s = int(np.searchsorted(starts, first, side="right") - 1)
        buf = buffers.setdefault(s, _ShardBuffer(*p.shards[s], shape))
        buf.add(fb, p.source_rows)
        job.stats["fields_encoded"] += fb.n_encoded
        job.stats["fields_cached"] += fb.n_cached
        if buf.complete:
            _finish_shard(job, s, buffers.pop(s), time.perf_counter() - t1)
            if stop_after_shards is not None and job.stats["shards_computed"] >= stop_after_shards:
                job.log(f"--stop-after-shards {stop_after_shards}: killing myself")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    job.stats["seconds_features"] = time.perf_counter() - t1


def _finish_shard(job: Job, s: int, buf: _ShardBuffer, elapsed: float) -> None:
    ok = np.flatnonzero(buf.ok)
    _write_part(job.out, "features", s, buf.feats[ok], ok + buf.a,
                {"shard": s, "start": buf.a, "stop": buf.b, "n_ok": int(ok.size), "n_cached": buf.n_cached,
                 "skipped": buf.skipped, "plate": job.plan.plates[job.plan.shard_plate[s]]})
    job.stats["shards_computed"] += 1
    done = job.stats["fields_encoded"] + job.stats["fields_cached"]
    job.log(f"features shard {s + 1}/{len(job.plan.shards)} written ({done / max(elapsed, 1e-9):.2f} fields/s)")


# ---------------------------------------------------------------- stage: embeddings
def stage_embeddings(job: Job, model, spec, *, batch_size: int) -> None:
    """Field and well embeddings of this rank's plates (waiting for their shards)."""
    from .towers import ENCODE_BATCH, image_embeddings

    t2 = time.perf_counter()
    units, done = job.plan.units, 0
    redo_damaged(job, "embeddings", job.mine(len(units)))
    for u in job.mine(len(units)):
        if _done(job.out, "embeddings", u):
            continue
        need = units[u]
        job.wait(lambda need=need: all(_done(job.out, "features", s) for s in need), f"feature shards {need}")
        parts = [_read_part(job.out, "features", s) for s in need]
        rows = np.concatenate([q[1] for q in parts])
        feats = np.concatenate([np.asarray(q[0], np.float32) for q in parts])
        e = int(model.config.embed_dim)
        if len(rows):
            emb = image_embeddings(model, feats, job.plan.fields.iloc[rows].reset_index(drop=True),
                                   correction_spec=spec, batch_size=max(ENCODE_BATCH, batch_size))
            fields_emb, wells, well_rows = emb.fields, emb.wells, rows[emb.well_index[:, 0]]
        else:
            fields_emb, wells, well_rows = (np.zeros((0, e), np.float32), np.zeros((0, e), np.float32),
                                            np.zeros(0, np.int64))
        _write_part(job.out, "embeddings", u, np.ascontiguousarray(fields_emb, np.float32), rows,
                    {"unit": u, "shards": need, "n": int(len(rows)), "n_wells": int(len(well_rows))},
                    extra={"wells": np.ascontiguousarray(wells, np.float32), "wells.rows": well_rows})
        done += 1
    job.stats.update(units_computed=done, seconds_embed=time.perf_counter() - t2)


# --------------------------------------------------------------------- stage: merge
def stage_merge(job: Job, model_id: str, e_dim: int, info: dict, *, ann: str) -> None:
    """Rank 0: stream every plate's embeddings into the store in ``out`` (+ wells, + ANN index)."""
    from . import ann as ann_mod
    from .store import EmbeddingStore, StoreWriter

    t3, out, units = time.perf_counter(), job.out, job.plan.units
    job.wait(lambda: all(_done(out, "embeddings", u) for u in range(len(units))), "all plates' embeddings")
    total = sum(json.loads(_shard_paths(out, "embeddings", u)[2].read_text())["n"] for u in range(len(units)))
    if total == 0:
        raise PlateError(f"none of the {len(job.plan.fields)} fields could be read")
    skipped = [x for s in range(len(job.plan.shards))
               for x in json.loads(_shard_paths(out, "features", s)[2].read_text()).get("skipped", [])]
    all_rows, pos = np.empty(total, dtype=np.int64), 0
    with StoreWriter(out, total, e_dim, model_id, level="field", info=info) as w:
        for u in range(len(units)):
            e, r, _ = _read_part(out, "embeddings", u)
            w.write(pos, e)
            all_rows[pos:pos + len(r)] = r
            pos += len(r)
        fields_out = job.plan.fields.iloc[all_rows].reset_index(drop=True)
        wells = _merged_wells(job, fields_out, all_rows, model_id, e_dim, info)
        w.finish(fields_out, wells=wells, info={"n_embedded": int(total), "skipped": skipped})
    t_ann = 0.0
    if ann == "auto" and total >= ann_mod.ANN_THRESHOLD and not ann_mod.faiss_available():
        job.log(f"no ANN index: faiss is not installed (searches of this store run exactly); {ann_mod.FAISS_HINT}")
    elif ann == "always" or (ann == "auto" and total >= ann_mod.ANN_THRESHOLD):
        ta = time.perf_counter()
        ann_mod.build_index(EmbeddingStore.load(out, mmap=True).embeddings, use_gpu=False).save(out)
        t_ann = time.perf_counter() - ta
        job.log(f"ANN index built in {t_ann:.1f} s")
    job.stats.update(n_embedded=int(total), n_skipped=len(skipped), seconds_merge=time.perf_counter() - t3,
                     seconds_ann=t_ann)


def _merged_wells(job: Job, fields_out: pd.DataFrame, all_rows: np.ndarray, model_id: str, e_dim: int, info: dict):
    """The model-pooled wells of every plate, in the store's well order (:func:`store.well_groups`)."""
    from .store import WELL_KEYS, EmbeddingStore, well_groups

    if not all(k in fields_out.columns for k in WELL_KEYS):
        return None
    codes, table, _ = well_groups(fields_out)
    where = np.full(int(all_rows.max()) + 1, -1, dtype=np.int64)
    where[all_rows] = np.arange(len(all_rows))
    wells = np.zeros((len(table), e_dim), np.float32)
    for u in range(len(job.plan.units)):
        _, _, _, emb, first_rows = _read_part(job.out, "embeddings", u, extra=("wells", "wells.rows"))
        wells[codes[where[first_rows]]] = emb
    return EmbeddingStore(wells, table, model_id, level="well", info=dict(info, well_pooling="model"),
                          normalize=False)


# ---------------------------------------------------------------------- set-up
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


def build_encoder(spec: str, dev, *, n_crops: int | None = None, batch_size: int = 8, channels: int = 5,
                  compile_: bool = False, options: dict | None = None):
    """The checkpoint's encoder for a long job: every B·C·crops plane of a batch in one forward,
    optionally ``torch.compile``-d."""
    from .encoders import get_encoder

    opts = dict(options or {})
    if opts:
        warn_at_caller(f"encoder options {opts} differ from the checkpoint's {spec!r} defaults; the features "
                       "(and embeddings) may not match what the model was trained on")
    if n_crops is not None and str(spec).startswith("hf:"):
        opts["n_crops"] = n_crops
    enc = get_encoder(spec, device=dev, **opts)
    if hasattr(enc, "max_batch"):
        enc.max_batch = max(int(enc.max_batch), batch_size * channels * int(getattr(enc, "n_crops", 1)))
    if compile_:
        import torch

        if hasattr(enc, "model"):
            enc.model = torch.compile(enc.model, dynamic=False)
            enc.fixed_batch = True  # every forward padded to max_batch crops: one graph, not one per size
        else:
            warn_at_caller(f"--compile: encoder {enc.spec!r} has no model to compile; running eagerly")
    return enc


def _job_meta(job_fields: pd.DataFrame, model, encoder, prep, *, checkpoint, shard_size: int, correction,
              spec) -> dict:
    from .store import cache_key

    model_id = getattr(model, "_cellclip_id", None)
    stains = list(model.config.stains)
    return {
        "format": JOB_FORMAT, "n_fields": len(job_fields), "shard_size": shard_size, "stains": stains,
        "fingerprint": cache_key(job_fields, f"{model_id}|{encoder.identity}|{prep}|shard={shard_size}|{JOB_FORMAT}"),
        "model_id": model_id, "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "image_encoder": getattr(encoder, "spec", ""), "encoder_identity": encoder.identity,
        "feature_dim": int(encoder.dim), "prep": repr(prep),
        "input_normalization": getattr(model.config, "input_normalization", "field"),
        "feature_correction": (correction.to_json(spec) if correction is not None else None),
    }


def _setup(data, checkpoint, *, model, encoder, dev, read: dict, batch_size: int, n_crops, compile_: bool,
           encoder_options):
    """(model, fields in its form, encoder) of a job."""
    from .checkpoints import load_model, model_identity
    from .embed import check_encoder, fields_for_model
    from .fields import read_fields

    if model is None:
        model = load_model(checkpoint, device=dev)
    else:
        model.to(dev).eval()
        model._cellclip_id = model_identity(model)
    fields = fields_for_model(read_fields(data, **read), model)
    if encoder is None:
        encoder = build_encoder(model.config.image_encoder, dev, n_crops=n_crops, batch_size=batch_size,
                                channels=len(model.config.stains), compile_=compile_,
                                options=_parse_options(encoder_options))
    check_encoder(encoder, model.config)
    return model, fields, encoder


@cuda_flags(tf32=True, benchmark=True)  # frozen encoders under inference; restored when the job returns
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
    platemap=None,
    barcode_platemap=None,
    annotations=None,
    cell_line: str | None = None,
    channel_map=None,
    cache_dir=None,
    prefetch: int = 2,
    wait_timeout: float = 24 * 3600.0,
    stop_after_shards: int | None = None,
    quiet: bool = False,
    model=None,
    encoder=None,
) -> dict:
    """Run (or resume) an embedding job; see the module doc.  Returns a summary dict.

    ``data``: anything :func:`napari_cellclip.fields.read_fields` reads (plate folder, LoadData
    CSV, fields parquet, manifest, DataFrame, list), annotated with ``platemap`` /
    ``barcode_platemap`` / ``annotations`` / ``cell_line``.  ``checkpoint``: any folder
    :func:`napari_cellclip.checkpoints.resolve_checkpoint` accepts (or pass ``model=``).
    ``out``: the job and store folder.  ``resume``: continue a job already in ``out`` (its inputs
    must be the same); ``overwrite``: delete it first.  ``cache_dir``: the feature cache (None:
    the default one; ``False``: none).  ``ann``: ``"auto"`` (build the FAISS index when the store
    reaches the search threshold), ``"always"``, ``"never"``.  ``stop_after_shards``: debug —
    SIGKILL this process after writing that many shards (used by the kill/resume test).
    """
    from .devices import default_workers, resolve_device, torchrun_env, use_device
    from .embed import correction_spec
    from .features import plate_ranges

    t_start = time.perf_counter()
    rank, world, local_rank = torchrun_env()
    out, shard_size, batch_size = check_output_dir(out), max(1, int(shard_size)), max(1, int(batch_size))
    workers = default_workers() if workers is None else int(workers)
    if ann not in ("auto", "always", "never"):
        raise CellClipError(f"ann must be 'auto', 'always' or 'never', got {ann!r}")
    dev = use_device(resolve_device(device, local_rank=local_rank if world > 1 else None))
    read = dict(platemap=platemap, barcode_platemap=barcode_platemap, annotations=annotations, cell_line=cell_line,
                channel_map=channel_map)
    model, fields, encoder = _setup(data, checkpoint, model=model, encoder=encoder, dev=dev, read=read,
                                    batch_size=batch_size, n_crops=n_crops, compile_=compile,
                                    encoder_options=encoder_options)
    correction, spec = correction_spec(model)
    p = plan(fields, shard_size)
    stains = list(model.config.stains)
    meta = _job_meta(p.fields, model, encoder, encoder.field_prep(stains), checkpoint=checkpoint,
                     shard_size=shard_size, correction=correction, spec=spec)
    job = Job(out, p, meta, rank, world, wait_timeout, quiet)
    job.meta = open_job(out, meta, p.fields, rank=rank, resume=resume, overwrite=overwrite, wait=job.wait,
                        plate_ranges=lambda: plate_ranges(p.fields, stains, cache_dir, use_cache=cache_dir is not False)
                        if meta["input_normalization"] == "plate" else {})
    stage_features(job, encoder, cache_dir=cache_dir, batch_size=batch_size, workers=workers, prefetch=prefetch,
                   stop_after_shards=stop_after_shards)
    stage_embeddings(job, model, spec, batch_size=batch_size)
    job.stats.update(rank=rank, world_size=world, n_fields=len(p.fields), n_shards=len(p.shards), out=str(out),
                     device=str(dev))
    if rank == 0:
        info = {k: job.meta[k] for k in ("image_encoder", "encoder_identity", "stains", "input_normalization",
                                          "feature_correction")}
        info.update(n_input_fields=len(p.fields),
                    pipeline={"shards": len(p.shards), "shard_size": shard_size, "world_size": world})
        stage_merge(job, meta["model_id"], int(model.config.embed_dim), info, ann=ann)
    job.stats["seconds_total"] = time.perf_counter() - t_start
    if rank == 0:
        job.log(f"store written: {out} ({job.stats['n_embedded']} fields, {job.stats['n_skipped']} skipped) in "
                f"{job.stats['seconds_total']:.1f} s")
    return job.stats


# ------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, add_alias, add_checkpoint_arg, add_data_args, add_run_args, number, output_dir

    p = argparse.ArgumentParser(
        prog="python -m napari_cellclip.pipeline", formatter_class=HelpFormatter,
        description="Embed large plate sets with a CellCLIP checkpoint: streaming, sharded, resumable; "
                    "run under torchrun to share the fields out over GPUs and machines.")
    add_data_args(p, data_required=True)
    add_checkpoint_arg(p)
    p.add_argument("--output", "-o", metavar="DIR", type=output_dir,
                   help="output folder, required: the embedding store (with its ANN index) and the job's shards")
    add_alias(p, "--out", "output", type=output_dir)
    g = add_run_args(p, batch_help="fields per encoder forward", batch_default=8, workers_default=None,
                     workers_help="worker processes decoding images (default: half the CPU cores, divided among the "
                                  "node's torchrun processes, at most 8)",
                     cache_help="feature cache folder, shared with the plugin and training: fields already "
                                "encoded there are not encoded again (default: $NAPARI_CELLCLIP_CACHE or "
                                "~/.cache/napari-cellclip/features)")
    g.add_argument("--no-cache", action="store_true",
                   help="neither read nor fill the feature cache (a very large screen: ~30 kB per field)")
    j = p.add_argument_group("job")
    j.add_argument("--resume", action="store_true", help="continue a killed job in --output")
    j.add_argument("--overwrite", action="store_true", help="delete a job or store in --output and start again")
    j.add_argument("--shard-size", type=number(int, 1, 1 << 24), default=DEFAULT_SHARD_SIZE,
                   help="fields per shard, the unit of work saved to disk and resumed")
    j.add_argument("--wait-timeout", type=number(float, 0.0, above=True), default=24 * 3600.0, metavar="SECONDS",
                   help="how long one process waits for the shards of the others under torchrun (default: one day)")
    j.add_argument("--ann", choices=("auto", "always", "never"), default="auto",
                   help="build the FAISS search index with the store (auto: from 50 000 fields, where search uses it)")
    j.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    j.add_argument("--stop-after-shards", type=number(int, 1), default=None, help=argparse.SUPPRESS)
    e = p.add_argument_group("image encoder")
    e.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    e.add_argument("--n-crops", type=number(int, 1, 1024), default=None,
                   help="crops per plane for hf: encoders, a square number (default: the encoder's, 4)")
    e.add_argument("--encoder-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another option for the image encoder (e.g. size=128 for morphology); repeatable")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.output is None:  # not required= in argparse: --out, its old spelling, fills it too
        parser.error("the following arguments are required: --output/-o")
    try:
        summary = run_job(
            args.data, args.checkpoint, args.output, batch_size=args.batch_size, workers=args.workers,
            device=args.device, shard_size=args.shard_size, resume=args.resume, overwrite=args.overwrite,
            compile=args.compile, n_crops=args.n_crops, encoder_options=args.encoder_option, ann=args.ann,
            platemap=args.platemap, barcode_platemap=args.barcode_platemap, annotations=args.annotations,
            cell_line=args.cell_line, channel_map=args.channel_map, wait_timeout=args.wait_timeout,
            cache_dir=False if args.no_cache else args.cache_dir,
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
