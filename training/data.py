"""Training data: well bags, batch samplers (distinct prompts / multi-positive), plate splits.

A training sample is one **well**: the frozen channel features of its fields,
shape (M, C, D), zero-padded to the largest M in the data set (all-zero
instances are padding and masked by the model).  Features are extracted once
into memory as one (N_fields, C, D) float32 array; a bag is just a row of an
index matrix (n_wells, M_max) into that array (-1 = padding → a zero row), so
building a batch is a single fancy-index, with no Python loop over fields or
channels.  Optional augmentation draws a random subset of each well's fields
(vectorised with random sort keys).

Two batchings (``fit --batching``)
---------------------------------
A contrastive loss treats every other sample of a batch as a negative.
Replicate wells share their prompt (DMSO sits in many wells of every plate,
every compound is on several replicate plates), so two DMSO wells in one batch
must never be pushed apart from each other's (identical) text — a false
negative that teaches the model to separate replicates, i.e. to learn the
plate and the well position instead of the phenotype.  Either batching
guarantees that:

* ``multipositive`` (the default, :class:`ShuffledBatchSampler`): ordinary
  shuffled batches of ``batch_size`` wells over all wells, prompts repeating
  freely; the prompt ids go to the loss as labels and the losses use
  label-aware multi-positive targets in both directions (the batch's distinct
  prompts are the text candidates; same-prompt wells are positives of each
  other, see ``napari_cellclip.losses``).  Batches are as large as asked, so
  each step contrasts many wells against all the batch's prompts.  Default:
  with CWCL on the real LINCS plates (morphology features, TVN without
  covariance shrinkage, 240 epochs, seeds 0-2; the benchmarks/lincs_eval.json
  of commit 11a336b) it is the better of the two over
  both directions -- spec split (test SQ00015231) well-level R@1
  image->text 1/1/0.75, text->image 1/1/1, against 1/1/1 and 1/0.67/0.67 for
  distinct batches -- and over leave-one-plate-out (well image->text mean
  0.69 vs 0.64, text->image 0.74 vs 0.59 over 9 fits), in a quarter of the
  steps.  Neither batching reaches well-level R@1 = 1 in every seed.
* ``distinct`` (:class:`DistinctPromptBatchSampler`): at most one well per
  prompt per batch (per *global* batch under DDP), every well exactly once per
  epoch in the fewest, balanced batches.  The batch size is then capped at the
  number of distinct prompts of the training set: the LINCS subset has only 3
  prompts (DMSO, orantinib, lonafarnib) and half of its wells are DMSO, so 2
  training plates (4 DMSO, 2 orantinib, 2 lonafarnib wells) give 4 batches of
  only 2 wells, where CWCL's soft targets are nearly uniform and each step
  sees little contrast.  Labels are passed here too (they cover DDP padding
  repeats).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from napari_cellclip.errors import CellClipError, CellClipWarning

PROMPT_COLUMN = "Metadata_prompt"
#: the cell line of the bundled LINCS sample, and fit's default for annotated plates
DEFAULT_CELL_LINE = "A549"


def read_training_fields(data=None, *, platemap=None, barcode_platemap=None, annotations=None,
                         channel_map=None, cell_line=None):
    """:func:`napari_cellclip.fields.read_fields` of ``data`` (no ``data``: the bundled LINCS sample),
    the Cell Painting stains in their canonical order (DNA, ER, RNA, AGP, Mito), as a new model
    records them."""
    from napari_cellclip.fields import read_fields
    from napari_cellclip.plates import DEFAULT_STAINS, reorder_stains, stains

    if data is None or (isinstance(data, (list, tuple)) and not data):
        from napari_cellclip.sample import sample_plate_dir, sample_platemap_dir

        data, platemap = [sample_plate_dir()], platemap or sample_platemap_dir()
        cell_line = cell_line or DEFAULT_CELL_LINE
    fields = read_fields(data, platemap=platemap, barcode_platemap=barcode_platemap, annotations=annotations,
                         channel_map=channel_map, cell_line=cell_line)
    have = stains(fields)
    if set(have) == set(DEFAULT_STAINS) and list(have) != list(DEFAULT_STAINS):
        fields = reorder_stains(fields, DEFAULT_STAINS)
    return fields


@dataclass
class WellBags:
    """Wells of a feature set as index bags.

    ``features`` (N_fields, C, D) float32; ``bag_index`` (n_wells, M_max) int64
    rows into features, -1 = padding; ``prompt_ids`` (n_wells,) into
    ``prompts``; ``wells`` a table (plate, well, prompt, n_fields).
    """

    features: np.ndarray
    bag_index: np.ndarray
    n_fields: np.ndarray
    prompt_ids: np.ndarray
    prompts: list[str]
    wells: "object"  # pandas DataFrame
    field_prompt_ids: np.ndarray = field(default=None)

    def __len__(self) -> int:
        return int(self.bag_index.shape[0])

    @property
    def max_fields(self) -> int:
        return int(self.bag_index.shape[1])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Feature rows by an index array of any shape (-1 → a zero row): idx.shape + (C, D).

        Reads only the rows asked for (:func:`napari_cellclip.towers.gather_bags`), so ``features``
        may be a memory-mapped ``.npy`` (as in :func:`training.loop.fit`) that is never copied
        into RAM as a whole.
        """
        from napari_cellclip.towers import gather_bags

        return gather_bags(self.features, idx)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), M_max, C, D) bags, padding rows zero."""
        return self.take(self.bag_index[np.asarray(rows, dtype=np.int64)])

    def gather_subsets(self, rows: np.ndarray, rng: np.random.Generator,
                       min_fields: int = 1, max_fields: int | None = None) -> np.ndarray:
        """Bags of a random subset of each well's fields (size uniform in [min, min(n, max)])."""
        rows = np.asarray(rows, dtype=np.int64)
        idx = self.bag_index[rows]
        n = self.n_fields[rows]
        hi = np.minimum(n, max_fields or idx.shape[1])
        lo = np.minimum(max(min_fields, 1), hi)
        k = lo + np.floor(rng.random(len(rows)) * (hi - lo + 1)).astype(np.int64)
        keys = rng.random(idx.shape)
        keys[idx < 0] = np.inf
        order = np.argsort(keys, axis=1, kind="stable")
        perm = np.take_along_axis(idx, order, axis=1)
        perm[np.arange(idx.shape[1])[None, :] >= k[:, None]] = -1
        return self.take(perm)

    def field_bags(self) -> np.ndarray:
        """Every field alone as a bag of one: (N_fields, 1, C, D)."""
        return self.features[:, None]


def build_well_bags(features: np.ndarray, fields, *, prompt_column: str = PROMPT_COLUMN,
                    prompts: list[str] | None = None) -> WellBags:
    """Group the rows of ``fields`` (aligned with ``features``) into well bags: the wells of
    :func:`napari_cellclip.store.well_groups` (the store's and the image tower's), over the
    fields that have a prompt."""
    import pandas as pd

    from napari_cellclip.store import well_groups

    if not (isinstance(features, np.ndarray) and features.dtype == np.float32
            and features.flags.c_contiguous):
        features = np.ascontiguousarray(features, dtype=np.float32)  # a memmap stays a memmap
    if len(fields) != len(features):
        raise CellClipError(f"{len(features)} feature rows for {len(fields)} fields")
    text = _prompts_of(fields, prompt_column)
    keep = (text != "").to_numpy()
    if not keep.all():
        warnings.warn(f"{int((~keep).sum())} field(s) without a prompt are left out", CellClipWarning,
                      stacklevel=2)
    pos = np.flatnonzero(keep)
    sub = fields.iloc[pos].reset_index(drop=True)
    if "Metadata_Plate" not in sub.columns:
        sub = sub.assign(Metadata_Plate="plate")
    codes, table, bag = well_groups(sub)
    bag_index = np.where(bag >= 0, pos[np.maximum(bag, 0)], -1)
    sub_text = text.to_numpy()[pos]
    if prompts is None:
        prompts = sorted(set(sub_text))
    pid_of = {p: i for i, p in enumerate(prompts)}
    prompt_ids = np.empty(len(table), dtype=np.int64)
    for w in range(len(table)):
        wp = set(sub_text[codes == w])
        plate, well = table["Metadata_Plate"].iloc[w], table["Metadata_Well"].iloc[w]
        if len(wp) > 1:
            raise CellClipError(f"plate {plate} well {well}: fields have different prompts")
        wp = wp.pop()
        if wp not in pid_of:
            raise CellClipError(f"plate {plate} well {well}: prompt {wp!r} is not among the known prompts")
        prompt_ids[w] = pid_of[wp]
    wells = pd.DataFrame({"plate": table["Metadata_Plate"].astype(str), "well": table["Metadata_Well"].astype(str),
                          "prompt": [prompts[i] for i in prompt_ids], "n_fields": table["Metadata_n_fields"]})
    field_pids = np.full(len(fields), -1, dtype=np.int64)
    field_pids[pos] = [pid_of.get(t, -1) for t in sub_text]
    return WellBags(features=features, bag_index=bag_index, n_fields=table["Metadata_n_fields"].to_numpy(np.int64),
                    prompt_ids=prompt_ids, prompts=list(prompts), wells=wells, field_prompt_ids=field_pids)


def _prompts_of(fields, prompt_column: str):
    if prompt_column not in fields.columns:
        raise CellClipError(
            f"the fields table has no {prompt_column!r} column: no prompts to train on "
            "(give a platemap / annotations so that wells get perturbation names)")
    text = fields[prompt_column].fillna("").astype(str).str.strip()
    if (text == "").all():
        raise CellClipError("no field has a prompt: no prompts to train on "
                            "(check the platemap / annotations cover these wells)")
    return text


def split_by_plate(fields, val_plates: list[str] | None):
    """Boolean masks (train, val) of the rows of ``fields``; val plates must exist."""
    plates = fields["Metadata_Plate"].astype(str).to_numpy()
    known = sorted(set(plates))
    val_plates = [str(p) for p in (val_plates or [])]
    missing = [p for p in val_plates if p not in known]
    if missing:
        raise CellClipError(f"validation plate(s) {', '.join(missing)} not in the data "
                            f"(plates: {', '.join(known)})")
    val = np.isin(plates, val_plates)
    train = ~val
    if val_plates and not train.any():
        raise CellClipError("every plate is a validation plate: nothing left to train on")
    return train, val


# ------------------------------------------------------------------- sampler
def n_batches(prompt_ids: np.ndarray, batch_size: int) -> int:
    """Fewest batches of distinct prompts covering every position once."""
    counts = np.unique(np.asarray(prompt_ids), return_counts=True)[1]
    if counts.size == 0:
        return 0
    return int(max(counts.max(), math.ceil(counts.sum() / batch_size)))


def distinct_prompt_batches(prompt_ids: np.ndarray, batch_size: int, rng: np.random.Generator
                            ) -> list[np.ndarray]:
    """One epoch of batches (arrays of positions into prompt_ids), no prompt twice in a batch.

    Every position appears exactly once, in the fewest batches possible,
    ``nb = max(wells of the commonest prompt, ceil(n / batch_size))``, and the
    batches are balanced (sizes differ by at most one, so none is left with a
    single sample and nothing to contrast with while others are full): prompts
    are placed from the commonest down, each one's wells (shuffled) into the
    currently smallest batches (random tie-break), one per batch.
    """
    prompt_ids = np.asarray(prompt_ids)
    uniq, counts = np.unique(prompt_ids, return_counts=True)
    nb = n_batches(prompt_ids, batch_size)
    batches: list[list[int]] = [[] for _ in range(nb)]
    sizes = np.zeros(nb, dtype=np.int64)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], rng.random()))
    for i in order:
        pos = rng.permutation(np.flatnonzero(prompt_ids == uniq[i]))
        targets = np.lexsort((rng.random(nb), sizes))[: len(pos)]  # smallest first, random ties
        for b, q in zip(targets, pos):
            batches[b].append(int(q))
            sizes[b] += 1
    out = [np.array(b, dtype=np.int64)[rng.permutation(len(b))] for b in batches]
    return [out[i] for i in rng.permutation(nb)]


class DistinctPromptBatchSampler:
    """Batches of wells with pairwise distinct prompts; DDP-aware; resumable.

    Under ``world_size > 1`` a *global* batch of ``batch_size * world_size``
    distinct prompts is drawn and sharded contiguously across ranks (like
    ``DistributedSampler``, a short global batch is padded by repeating its own
    wells so that every rank gets the same number of samples — the repeats
    share a prompt with their original and the loss labels make them
    positives).  ``batch_size`` is per rank.  The order of epoch ``e`` depends
    only on (seed, e), so resuming needs just (epoch, batch position).
    """

    def __init__(self, prompt_ids, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, warn: bool = True):
        self.prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        n_prompts = len(np.unique(self.prompt_ids))
        if n_prompts == 0:
            raise CellClipError("no wells to train on")
        global_bs = int(batch_size) * world_size
        if global_bs > n_prompts:
            per_rank = max(1, n_prompts // world_size)
            if warn:
                warnings.warn(
                    f"batch size {batch_size}{' x ' + str(world_size) + ' ranks' if world_size > 1 else ''}"
                    f" exceeds the {n_prompts} distinct prompts of the training set; batches hold at "
                    f"most one well per prompt, so the batch size is capped at {per_rank}"
                    f"{' per rank' if world_size > 1 else ''}", CellClipWarning, stacklevel=2)
            batch_size = per_rank
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.start = 0  # batch position inside the epoch (resume)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, int(epoch), 0x5A3])
        return distinct_prompt_batches(self.prompt_ids, self.global_batch_size, rng)

    def _shard(self, batch: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return batch
        per = math.ceil(len(batch) / self.world_size)
        padded = np.resize(batch, per * self.world_size)  # repeats its own wells
        return padded[self.rank * per:(self.rank + 1) * per]

    def batches(self, epoch: int) -> list[np.ndarray]:
        return [self._shard(b) for b in self.global_batches(epoch)]

    def __len__(self) -> int:
        return n_batches(self.prompt_ids, self.global_batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        for b in self.batches(self.epoch)[self.start:]:
            yield b

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"], state.get("start", 0))


class ShuffledBatchSampler:
    """Shuffled batches of ``batch_size`` wells (prompts may repeat); DDP-aware; resumable.

    For multi-positive training: the loss gets the prompt ids as labels, so
    repeated prompts are positives.  Each epoch is a permutation of all wells
    (depending only on (seed, epoch)) cut into ``ceil(n / global batch)``
    batches of balanced sizes (differing by at most one, so no batch is left
    with a lone well); a global batch is sharded contiguously across ranks,
    padded by repeating its own wells like :class:`DistinctPromptBatchSampler`.
    ``batch_size`` is per rank and capped at the number of wells.
    """

    def __init__(self, prompt_ids, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, warn: bool = True):
        self.prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        n = len(self.prompt_ids)
        if n == 0:
            raise CellClipError("no wells to train on")
        if int(batch_size) * world_size > n:
            batch_size = max(1, math.ceil(n / world_size))
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.start = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return int(math.ceil(len(self.prompt_ids) / self.global_batch_size))

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, int(epoch), 0x3B7])
        perm = rng.permutation(len(self.prompt_ids)).astype(np.int64)
        return [b for b in np.array_split(perm, len(self)) if len(b)]

    _shard = DistinctPromptBatchSampler._shard
    batches = DistinctPromptBatchSampler.batches
    set_epoch = DistinctPromptBatchSampler.set_epoch
    __iter__ = DistinctPromptBatchSampler.__iter__
    state_dict = DistinctPromptBatchSampler.state_dict
    load_state_dict = DistinctPromptBatchSampler.load_state_dict


BATCHINGS = ("multipositive", "distinct")


def make_batch_sampler(batching: str, prompt_ids, batch_size: int, **kw):
    """The sampler of ``fit --batching``: "multipositive" | "distinct"."""
    if batching == "multipositive":
        return ShuffledBatchSampler(prompt_ids, batch_size, **kw)
    if batching == "distinct":
        return DistinctPromptBatchSampler(prompt_ids, batch_size, **kw)
    raise CellClipError(f"unknown batching {batching!r}; choose {' or '.join(BATCHINGS)}")
