"""Cross-modal retrieval metrics and evaluation reports.

Evaluated over the *distinct prompts* of the evaluated set (the candidates of
image→text retrieval), at two levels:

* field level — each field alone is a bag of one (M=1) through ``encode_image``;
* well level — the bag of all the well's fields (M = fields of the well).

image→text: for each image, the rank of its own prompt among the P prompts.
text→image: for each prompt, the rank of its best-ranked matching image among
all N images (the other images with the same prompt are not counted against
it).  Ties are counted pessimistically (a wrong candidate with the same score
ranks ahead), so a collapsed model with constant scores gets no credit.
Recall@k = fraction of queries whose rank ≤ k; mean rank is 1-based.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

KS = (1, 5, 10)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranks_image_to_text(sim: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """sim (N images, P prompts); labels (N,) prompt index → rank (N,) 1-based."""
    sim = np.asarray(sim)
    labels = np.asarray(labels, dtype=np.int64)
    true = sim[np.arange(len(labels)), labels][:, None]
    wrong = np.ones_like(sim, dtype=bool)
    wrong[np.arange(len(labels)), labels] = False
    return 1 + ((sim >= true) & wrong).sum(axis=1)


def ranks_text_to_image(sim: np.ndarray, labels: np.ndarray, prompt_ids=None) -> np.ndarray:
    """sim (N images, P prompts) → rank (len(prompt_ids),) of each prompt's best matching image."""
    sim = np.asarray(sim)
    labels = np.asarray(labels, dtype=np.int64)
    if prompt_ids is None:
        prompt_ids = np.unique(labels)
    out = []
    for p in prompt_ids:
        pos = labels == p
        best = sim[pos, p].max()
        out.append(1 + int((sim[~pos, p] >= best).sum()))
    return np.asarray(out, dtype=np.int64)


def recall_summary(ranks: np.ndarray, ks=KS) -> dict:
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float((ranks <= k).mean()) if ranks.size else float("nan") for k in ks}
    out["mean_rank"] = float(ranks.mean()) if ranks.size else float("nan")
    out["n_queries"] = int(ranks.size)
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, labels: np.ndarray,
                      ks=KS) -> dict:
    """Both directions; image_emb (N, E), text_emb (P, E), labels (N,) into text rows."""
    sim = _normalise(image_emb) @ _normalise(text_emb).T
    labels = np.asarray(labels, dtype=np.int64)
    i2t = ranks_image_to_text(sim, labels)
    t2i = ranks_text_to_image(sim, labels)
    pred = sim.argmax(axis=1)
    per_prompt = {}
    for p in np.unique(labels):
        m = labels == p
        per_prompt[int(p)] = float((i2t[m] == 1).mean())
    return {"image_to_text": recall_summary(i2t, ks), "text_to_image": recall_summary(t2i, ks),
            "accuracy": float((pred == labels).mean()), "per_prompt_image_to_text_R@1": per_prompt,
            "n_images": int(len(labels)), "n_prompts": int(text_emb.shape[0])}


# --------------------------------------------------------------- model-level
def evaluate_bags(model, wb, *, device="cpu", correction_spec=None, extra: dict | None = None) -> dict:
    """Field- and well-level retrieval of a :class:`training.data.WellBags` set, through the towers
    the plugin and search use (:func:`napari_cellclip.towers.encode_bags` / ``encode_texts``);
    the model runs where it is (``device`` is not used)."""
    from napari_cellclip.correction import to_json
    from napari_cellclip.towers import encode_bags, encode_texts

    t0 = time.perf_counter()
    text = encode_texts(model, wb.prompts)
    well_emb = encode_bags(model, wb.features, wb.bag_index)
    field_rows = np.flatnonzero(wb.field_prompt_ids >= 0)
    field_emb = encode_bags(model, wb.features, field_rows[:, None])
    report = {
        "prompts": list(wb.prompts),
        "chance_R@1_image_to_text": 1.0 / max(len(wb.prompts), 1),
        "field": retrieval_metrics(field_emb, text, wb.field_prompt_ids[field_rows]),
        "well": retrieval_metrics(well_emb, text, wb.prompt_ids),
        "n_wells": int(len(wb)),
        "n_fields": int(len(field_rows)),
        "plates": sorted(set(wb.wells["plate"])),
        "feature_correction": to_json(correction_spec),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    sim = _normalise(well_emb) @ _normalise(text).T
    ranks = ranks_image_to_text(sim, wb.prompt_ids)
    best = sim.argmax(1)
    report["well"]["per_well"] = [
        {"plate": p, "well": w, "prompt": wb.prompts[t], "best_prompt": wb.prompts[int(b)],
         "best_score": float(sim[i, b]), "rank": int(r)}
        for i, (p, w, t, b, r) in enumerate(zip(wb.wells["plate"], wb.wells["well"], wb.prompt_ids, best, ranks))]
    for lvl in ("field", "well"):
        report[lvl]["per_prompt_image_to_text_R@1"] = {
            wb.prompts[k]: v for k, v in report[lvl]["per_prompt_image_to_text_R@1"].items()}
    if extra:
        report.update(extra)
    return report


def write_report(report: dict, path) -> Path:
    from napari_cellclip._fsutil import atomic_write_text

    return atomic_write_text(Path(path), json.dumps(report, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def format_report(report: dict) -> str:
    lines = []
    for lvl in [lvl for lvl in ("field", "well") if lvl in report]:
        r = report[lvl]
        i2t, t2i = r["image_to_text"], r["text_to_image"]
        lines.append(
            f"{lvl:>5}: image→text R@1 {i2t['R@1']:.3f} R@5 {i2t['R@5']:.3f} mean rank {i2t['mean_rank']:.2f}"
            f" (n={i2t['n_queries']}) | text→image R@1 {t2i['R@1']:.3f} R@5 {t2i['R@5']:.3f}"
            f" mean rank {t2i['mean_rank']:.2f} (n={t2i['n_queries']})")
    if "profiling" in report:
        from .profiling import format_profiling

        lines.append(format_profiling(report["profiling"]))
    return "\n".join(lines)


def _check_override(model, ck, correction: str) -> str | None:
    """A warning (also returned, for the report) when ``correction`` is not the one the checkpoint
    was trained with: the model then reads features unlike any it saw."""
    import warnings

    from napari_cellclip.errors import CellClipWarning

    trained = (getattr(model.config, "feature_correction", None) or {}).get("method") or "none"
    if correction in ("checkpoint", trained):
        return None
    msg = (f"--correction {correction} overrides the {trained!r} correction {ck} was trained with: the model reads "
           f"features unlike any it was trained on, so the scores measure that mismatch (typically near chance, "
           f"every well alike), not the model; use --correction checkpoint to evaluate the model itself")
    warnings.warn(msg, CellClipWarning, stacklevel=3)
    return msg


@dataclasses.dataclass
class EvaluationData:
    """What judging a checkpoint on plates needs: the model, the plates' corrected frozen features
    (rows aligned with ``fields``), their well bags and how they were made."""

    model: object
    checkpoint: Path
    device: object
    features: np.ndarray
    fields: object
    encoder: object
    correction: dict | None
    wells: object
    correction_override: str | None = None  # the warning when ``correction`` is not the checkpoint's


def load_evaluation(checkpoint, data=None, *, platemap=None, barcode_platemap=None, annotations=None,
                    channel_map=None, cell_line=None, correction="checkpoint", device="auto", cache_dir=None,
                    extract_batch_size=8, workers=None, quiet=False, no_progress=False) -> EvaluationData:
    """The checkpoint (the run folder ``fit`` printed, its ``model/`` or a ``checkpoints/checkpoint-N``)
    and the plates as it sees them: its stain order and prompt form
    (:func:`napari_cellclip.embed.fields_for_model`), its encoder and input normalisation, its
    correction (or ``correction``), wells as the store pools them."""
    from napari_cellclip import correction as corr
    from napari_cellclip.checkpoints import load_model, resolve_checkpoint
    from napari_cellclip.embed import fields_for_model

    from .data import build_well_bags, read_training_fields
    from .distributed import Dist, resolve_train_device
    from .prepare import extract

    ck = resolve_checkpoint(checkpoint)
    dev = resolve_train_device(device, Dist())
    model = load_model(ck, device=dev)
    override = _check_override(model, ck, correction)
    fields = fields_for_model(read_training_fields(data, platemap=platemap, barcode_platemap=barcode_platemap,
                                                   annotations=annotations, channel_map=channel_map,
                                                   cell_line=cell_line), model)
    feats, fields, enc = extract(fields, model.config.image_encoder or "morphology",
                                 normalization=getattr(model.config, "input_normalization", "field"),
                                 device=str(dev), cache_dir=cache_dir, batch_size=extract_batch_size,
                                 workers=workers, progress=not no_progress, quiet=quiet)
    if correction == "checkpoint":
        spec = corr.spec_for_model(model, ck)
    else:
        spec = corr.make_spec(correction)
        if spec and spec["method"] == "tvn":
            spec = corr.fit(feats, fields, spec)
    feats = corr.apply(feats, fields, spec)
    return EvaluationData(model, ck, dev, feats, fields, enc, spec, build_well_bags(feats, fields), override)


def evaluate_checkpoint(checkpoint, data=None, *, output=None, metrics=("retrieval",), profiling=None,
                        **load) -> dict:
    """Report of a checkpoint on a data set (:func:`load_evaluation` takes ``load``).

    ``metrics``: "retrieval" (cross-modal R@k) and/or the copairs profiling metrics of
    :mod:`training.profiling` ("replicate", "activity", "consistency", "sister"), whose options
    ``profiling`` holds (:func:`training.profile_sources.model_report`'s keywords).
    """
    import sys

    import torch

    from napari_cellclip import correction as corr

    t0 = time.perf_counter()
    ev = load_evaluation(checkpoint, data, **load)
    with torch.no_grad():
        if "retrieval" in metrics:
            rep = evaluate_bags(ev.model, ev.wells, device=ev.device, correction_spec=ev.correction,
                                extra={"checkpoint": str(ev.checkpoint)})
        else:
            rep = {"checkpoint": str(ev.checkpoint), "plates": sorted(set(ev.wells.wells["plate"])),
                   "n_wells": len(ev.wells), "feature_correction": corr.to_json(ev.correction)}
        if any(m != "retrieval" for m in metrics):
            from .profile_sources import model_report

            rep["profiling"] = model_report(ev, metrics, **(profiling or {}))
    rep["seconds"] = round(time.perf_counter() - t0, 2)
    if ev.correction_override:
        rep["correction_override"] = ev.correction_override
    if output:
        write_report(rep, output)
    if not load.get("quiet"):
        print(format_report(rep), file=sys.stderr)
    return rep
