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
def embed_bags(model, bags: np.ndarray, *, device="cpu", batch_size: int = 64) -> np.ndarray:
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(bags), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(bags[i:i + batch_size])).to(device)
            out.append(model.encode_image(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def embed_prompts(model, prompts: list[str], *, device="cpu") -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return model.encode_prompts(list(prompts)).float().cpu().numpy()


def evaluate_bags(model, wb, *, device="cpu", correction_spec=None, extra: dict | None = None) -> dict:
    """Field- and well-level retrieval of a :class:`training.data.WellBags` set."""
    t0 = time.perf_counter()
    text = embed_prompts(model, wb.prompts, device=device)
    well_emb = embed_bags(model, wb.gather(np.arange(len(wb))), device=device)
    field_rows = np.flatnonzero(wb.field_prompt_ids >= 0)
    field_emb = embed_bags(model, wb.features[field_rows][:, None], device=device)
    from napari_cellclip.correction import to_json

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
    for lvl in ("field", "well"):
        report[lvl]["per_prompt_image_to_text_R@1"] = {
            wb.prompts[k]: v for k, v in report[lvl]["per_prompt_image_to_text_R@1"].items()}
    if extra:
        report.update(extra)
    return report


def write_report(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default))
    tmp.replace(path)
    return path


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
