"""A fit's data: fields → frozen features (the feature engine, cached) → plate-effect correction → well bags.

The corrected (N_fields, C, D) features are written once to a scratch ``.npy`` in ``<output>``
and memory-mapped (removed when fit returns); each batch gathers its bags' rows by index arrays.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cellclip._fsutil import remove_stale_temps, temp_path
from napari_cellclip.errors import CellClipError, CellClipWarning

from . import data as training_data
from .data import WellBags, read_training_fields, split_by_plate

__all__ = ["TrainingData", "extract", "prepare"]


def extract(fields, encoder_spec="morphology", *, normalization="field", device="auto", cache_dir=None,
            batch_size=8, workers=None, progress=True, quiet=False):
    """Frozen features of every field (cached) → (features (N, C, D), fields of the rows kept, encoder);
    ``workers``: see :func:`extract_workers`."""
    from napari_cellclip.encoders import get_encoder
    from napari_cellclip.features import extract_features
    from napari_cellclip.plates import stains as stains_of

    encoder = get_encoder(encoder_spec, device=device)
    bar = cb = None
    if progress and not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fields), desc="features", unit="field", file=sys.stderr, leave=False)

        def cb(done, total):
            bar.n = done
            bar.refresh()
    try:
        res = extract_features(fields, encoder, stains=stains_of(fields), cache_dir=cache_dir,
                               normalization=normalization, batch_size=batch_size,
                               num_workers=extract_workers(workers, encoder.device), progress=cb)
    finally:
        if bar is not None:
            bar.close()
    if len(res.index) == 0:
        raise CellClipError("no field could be read: nothing to train on")
    kept = fields.iloc[np.asarray(res.index)].reset_index(drop=True)
    return np.ascontiguousarray(res.features, dtype=np.float32), kept, encoder


@dataclass
class TrainingData:
    """What a fit trains and validates on."""

    fields: object  # the fields whose features could be read (pandas DataFrame)
    train: WellBags
    val: WellBags | None
    correction_spec: dict | None
    encoder_spec: str
    feature_shape: tuple
    val_plates: list
    extract_seconds: float
    features_file: Path | None = None

    @property
    def stains(self) -> list[str]:
        from napari_cellclip.plates import stains

        return list(stains(self.fields))

    def close(self) -> None:
        """Remove the memory-mapped features file (mapped files cannot be removed on Windows)."""
        if self.features_file is not None:
            try:
                self.features_file.unlink()
            except OSError:
                pass


def _read(cfg):
    fields = read_training_fields(cfg.data, platemap=cfg.platemap, barcode_platemap=cfg.barcode_platemap,
                                  annotations=cfg.annotations, channel_map=cfg.channel_map, cell_line=cfg.cell_line)
    split_by_plate(fields, cfg.val_plate or [])  # validates the names before the slow part
    if "Metadata_prompt" not in fields.columns:
        raise CellClipError("the data has no prompts (no Metadata_prompt column): give --platemap "
                            "(and --annotations) so that wells get perturbation names")
    return fields


def _fill_cache_share(cfg, fields, dist, encoder) -> None:
    """This rank's share of the fields (rows r, r+W, …) encoded into the feature cache.

    Plate ranges (plate normalisation) come from the whole table, so every rank's cache keys are
    the ones the full pass looks up; unreadable fields are reported by the full pass, not here.
    """
    import warnings

    from napari_cellclip.errors import CellClipWarning
    from napari_cellclip.features import iter_features
    from napari_cellclip.plates import stains as stains_of

    mine = np.arange(dist.rank, len(fields), dist.world)
    step = max(1, int(cfg.extract_batch_size))
    batches = [mine[a:a + step].tolist() for a in range(0, len(mine), step)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        for _ in iter_features(fields, encoder, stains=stains_of(fields), cache_dir=cfg.cache_dir,
                               batch_size=step, num_workers=extract_workers(cfg.workers, encoder.device),
                               normalization=cfg.normalization, batches=batches):
            pass


def extract_workers(workers, device) -> int:
    """Decoding workers: ``workers`` as given; None: on a GPU half the CPU cores shared among the
    node's torchrun processes (at most 8), on a CPU none (the encoder needs the cores)."""
    from napari_cellclip.devices import default_workers

    if workers is not None:
        return max(0, int(workers))
    return default_workers() if getattr(device, "type", "cpu") == "cuda" else 0


def _features(cfg, fields, dist, device):
    """Features of every field.  Under torchrun every rank first encodes its own share into the
    feature cache (all GPUs work; none waits for another's whole extraction), then, after a
    barrier, reads every field from the cache (a rank whose cache folder is not shared encodes
    what it lacks).  The frozen encoder is dropped and its GPU memory freed before training."""
    from napari_cellclip.devices import free_device_memory
    from napari_cellclip.encoders import get_encoder

    encoder = get_encoder(cfg.encoder, device=device)
    if dist.enabled:
        _fill_cache_share(cfg, fields, dist, encoder)
        dist.barrier()
    feats, kept, encoder = extract(fields, encoder, normalization=cfg.normalization, device=device,
                                   cache_dir=cfg.cache_dir, batch_size=cfg.extract_batch_size,
                                   workers=cfg.workers, progress=not cfg.no_progress and dist.main,
                                   quiet=cfg.quiet)
    spec = encoder.spec
    del encoder
    free_device_memory(device)
    return feats, kept, spec


def _corrected(cfg, feats, fields, train_mask, val_mask, spec, rank: int):
    """Corrected features, training rows first then validation rows (memory-mapped unless
    ``features_mmap=False``) → (array, its file or None)."""
    from napari_cellclip import correction as corr

    n_train = int(train_mask.sum())
    path = None
    if cfg.features_mmap:
        scratch = Path(cfg.output) / f"features-rank{rank}.npy"
        for p in remove_stale_temps(scratch.parent, scratch.name):  # a killed fit's (as large as the features)
            warnings.warn(f"removed {p}, the scratch features of an interrupted fit", CellClipWarning, stacklevel=2)
        path = temp_path(scratch)  # a scratch file, removed by close()
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=feats.shape)
    else:
        out = np.empty(feats.shape, dtype=np.float32)
    out[:n_train] = corr.apply(feats[train_mask], fields[train_mask], spec)
    if val_mask.any():
        out[n_train:] = corr.apply(feats[val_mask], fields[val_mask], spec)
    if path is not None:
        out.flush()
        del out
        out = np.load(path, mmap_mode="r", allow_pickle=False)
    return out, path


def prepare(cfg, dist, device, say) -> TrainingData:
    """Read, extract, correct (fitted on the training plates) and bag a fit's data."""
    from napari_cellclip import correction as corr

    fields = _read(cfg)
    t0 = time.perf_counter()
    feats, fields, encoder_spec = _features(cfg, fields, dist, device)
    t_extract = time.perf_counter() - t0
    val_plates = list(cfg.val_plate or [])
    train_mask, val_mask = split_by_plate(fields, val_plates)
    spec = corr.fit(feats[train_mask], fields[train_mask], corr.make_spec(cfg.correction))
    feats_c, path = _corrected(cfg, feats, fields, train_mask, val_mask, spec, dist.rank)
    n_train = int(train_mask.sum())
    wb = training_data.build_well_bags(feats_c[:n_train], fields[train_mask].reset_index(drop=True))
    val_wb = training_data.build_well_bags(feats_c[n_train:], fields[val_mask].reset_index(drop=True)) \
        if val_mask.any() else None
    data = TrainingData(fields, wb, val_wb, spec, encoder_spec, tuple(feats.shape), val_plates, t_extract, path)
    n_prompts = len(wb.prompts)
    say(f"data: {len(fields)} fields, {len(wb)} training wells on {len(set(wb.wells['plate']))} plate(s), "
        f"{n_prompts} distinct prompts; features {data.feature_shape} from {encoder_spec!r} in {t_extract:.1f}s; "
        f"correction {corr.describe(spec)}")
    if cfg.batching == "distinct" and cfg.batch_size * dist.world > n_prompts:
        say(f"note: batches hold distinct prompts only, so the batch size is capped at "
            f"{max(1, n_prompts // dist.world)} per process (the training set has {n_prompts} prompts)")
    return data
