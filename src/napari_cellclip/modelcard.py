"""Model cards: a ``README.md`` in a checkpoint folder saying what the model is and how to use it.

``python -m training fit`` writes one next to ``config.json`` (:func:`write_model_card`):
the data it was trained on, the frozen image encoder and input normalisation, the text
encoder and prompts, the loss and schedule, the held-out metrics, and how to load it.
:func:`describe_checkpoint` returns that card, or, for a checkpoint without one (older
or published checkpoints), a shorter card built from its ``config.json``.  The Search
widget shows it under "About this model".

Imports neither torch nor Qt.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

__all__ = ["CARD_FILE", "write_model_card", "read_model_card", "describe_checkpoint", "render_card"]

CARD_FILE = "README.md"
_MAX_LISTED = 12


def _config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _listing(values, limit: int = _MAX_LISTED) -> str:
    values = [str(v) for v in values]
    more = f" … (+{len(values) - limit})" if len(values) > limit else ""
    return ", ".join(values[:limit]) + more


def _data_section(fields, training: Mapping) -> list[str]:
    out = ["## Data", ""]
    if fields is None:
        n_wells = training.get("n_train_wells")
        out.append(f"- {n_wells} training wells" if n_wells else "- (not recorded)")
    else:
        plates = sorted({str(p) for p in fields.get("Metadata_Plate", [])})
        wells = fields[["Metadata_Plate", "Metadata_Well"]].drop_duplicates() \
            if {"Metadata_Plate", "Metadata_Well"} <= set(fields.columns) else None
        out.append(f"- {len(fields)} fields of view in {len(wells) if wells is not None else '?'} wells "
                   f"on {len(plates)} plate(s): {_listing(plates)}")
        if "Metadata_cell_line" in fields.columns:
            lines = sorted(fields['Metadata_cell_line'].dropna().astype(str).unique())
            out.append(f"- Cell line(s): {_listing(lines)}")
        if "Metadata_pert_iname" in fields.columns and wells is not None:
            per = fields.drop_duplicates(["Metadata_Plate", "Metadata_Well"])["Metadata_pert_iname"]
            counts = per.fillna("(none)").astype(str).value_counts()
            out.append("- Perturbations (wells): " + _listing([f"{k} ({v})" for k, v in counts.items()]))
    val = training.get("val_plates") or []
    out.append(f"- Held out for validation: {_listing(val)}" if val else
               "- No plate was held out (`--val-plate`): the metrics below are missing")
    if "data" in training:  # fit's --data; none = the bundled sample
        data = training["data"]
        out.append(f"- Source: `{data}`" if data else "- Source: the LINCS sample plate bundled with napari-cellclip")
    return out + [""]


def _encoder_section(cfg: Mapping) -> list[str]:
    fc = cfg.get("feature_correction") or {}
    fc_text = fc.get("method", "none") if isinstance(fc, Mapping) else str(fc)
    return [
        "## Image encoder", "",
        f"- Frozen per-channel encoder: `{cfg.get('image_encoder', '?')}` "
        f"({cfg.get('vision_width', '?')} features per channel)",
        f"- Stains, in this order: {_listing(cfg.get('stains') or ['?'])}",
        f"- Input normalisation: `{cfg.get('input_normalization', 'field')}` (1st–99.9th percentiles, "
        "per plate or per field)",
        f"- Plate-effect correction of the frozen features: `{fc_text}` (fitted on negative controls)",
        f"- Fields of a well pooled by `{cfg.get('pooling', '?')}`; CrossChannelFormer with "
        f"{cfg.get('vision_layers', '?')} layers, {cfg.get('vision_heads', '?')} heads; "
        f"embedding size {cfg.get('embed_dim', '?')}",
        "",
    ]


def _text_section(cfg: Mapping, training: Mapping) -> list[str]:
    prompts = list(training.get("prompts") or [])
    out = [
        "## Text encoder and prompts", "",
        f"- Text encoder: `{cfg.get('text_encoder', '?')}` ({cfg.get('text_tuning', '?')}; "
        f"context {cfg.get('context_length', '?')} tokens)",
    ]
    if prompts:
        out.append(f"- {len(prompts)} distinct training prompts, e.g.:")
        out += [f"  - `{p}`" for p in prompts[:_MAX_LISTED]]
        if len(prompts) > _MAX_LISTED:
            out.append(f"  - … (+{len(prompts) - _MAX_LISTED})")
    out.append("- Queries work best phrased like these prompts.")
    return out + [""]


def _training_section(cfg: Mapping, training: Mapping, summary: Mapping) -> list[str]:
    def g(key, default="?"):
        return summary.get(key, training.get(key, default))

    return [
        "## Training", "",
        f"- Loss: `{cfg.get('loss', '?')}`; batching `{g('batching')}`, batch size {g('batch_size')}",
        f"- {g('epochs')} epochs, {g('steps')} steps; AdamW lr {training.get('lr', '?')}, weight decay "
        f"{training.get('weight_decay', '?')}, precision {g('precision')}, seed {training.get('seed', '?')}",
        f"- Device {training.get('device', '?')} × {g('world_size', 1)}; training took "
        f"{g('train_seconds')} s (feature extraction {g('extract_seconds')} s)",
        "",
    ]


def _metrics_section(report: Mapping | None) -> list[str]:
    out = ["## Metrics", ""]
    if not report:
        return out + ["No held-out evaluation (train with `--val-plate PLATE` to get one).", ""]
    chance = report.get("chance_R@1_image_to_text")
    out.append(f"Retrieval on the held-out plate(s) {_listing(report.get('plates', []))} "
               f"({report.get('n_wells', '?')} wells, {report.get('n_fields', '?')} fields, "
               f"{len(report.get('prompts', []))} prompts; chance R@1 {chance:.2f}):" if chance else
               "Retrieval on the held-out plate(s):")
    out += ["", "| level | image→text R@1 | image→text R@5 | text→image R@1 | text→image R@5 |",
            "|---|---|---|---|---|"]
    for lvl in ("field", "well"):
        r = report.get(lvl) or {}
        i2t, t2i = r.get("image_to_text", {}), r.get("text_to_image", {})
        out.append(f"| {lvl} | {i2t.get('R@1', float('nan')):.2f} | {i2t.get('R@5', float('nan')):.2f} | "
                   f"{t2i.get('R@1', float('nan')):.2f} | {t2i.get('R@5', float('nan')):.2f} |")
    return out + [""]


def _how_to_load(model_dir: Path) -> list[str]:
    return [
        "## How to load", "",
        "```python",
        "from napari_cellclip.embed import load_model, embed_fields",
        "from napari_cellclip.search import text_query",
        f'model = load_model("{model_dir}")            # this folder',
        "store = embed_fields(fields, model)               # fields: napari_cellclip.plates.read_plate(...)",
        'text_query(model, store, "A549 cells treated with compound: lonafarnib")',
        "```",
        "",
        "In napari: Plugins ▸ CellCLIP ▸ Search, choose this folder as the checkpoint, *Embed plate*.",
        "",
    ]


def render_card(model_dir, *, config: Mapping | None = None, summary: Mapping | None = None,
                fields=None, report: Mapping | None = None) -> str:
    """The Markdown text of the model card of ``model_dir`` (see :func:`write_model_card`)."""
    model_dir = Path(model_dir)
    cfg = dict(config if config is not None else _config(model_dir))
    training = dict(cfg.get("training") or {})
    summary = dict(summary or {})
    from . import __version__

    title = Path(str(summary.get("output") or model_dir)).name or model_dir.name
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# CellCLIP model: {title}", "",
             f"Trained with `python -m training fit` (napari-cellclip {__version__}), {when}. "
             "CellCLIP (Lu et al., NeurIPS 2025) aligns Cell Painting images with text prompts "
             "describing their perturbation.", ""]
    lines += _data_section(fields, training)
    lines += _encoder_section(cfg)
    lines += _text_section(cfg, training)
    lines += _training_section(cfg, training, summary)
    lines += _metrics_section(report)
    lines += _how_to_load(model_dir)
    return "\n".join(lines)


def write_model_card(model_dir, *, summary: Mapping | None = None, fields=None,
                     report: Mapping | None = None) -> Path:
    """Write ``README.md`` into checkpoint folder ``model_dir`` (which holds ``config.json``).

    ``summary``: :func:`training.loop.fit`'s summary; ``fields``: the fields table trained
    and validated on; ``report``: the held-out evaluation report (``None`` without one).
    Written atomically; returns the path.
    """
    model_dir = Path(model_dir)
    text = render_card(model_dir, summary=summary, fields=fields, report=report)
    from ._fsutil import atomic_write_text

    return atomic_write_text(model_dir / CARD_FILE, text)


def read_model_card(path) -> str | None:
    """The ``README.md`` of a checkpoint folder, or ``None`` when it has none."""
    try:
        return (Path(path) / CARD_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def describe_checkpoint(path) -> str:
    """The model card of checkpoint folder ``path``; without ``README.md`` a short card from its
    ``config.json``; without that, a sentence saying what is missing."""
    p = Path(path).expanduser()
    card = read_model_card(p)
    if card:
        return card
    cfg = _config(p)
    if not cfg:
        return f"No CellCLIP checkpoint in `{p}` (no config.json)."
    training: dict[str, Any] = dict(cfg.get("training") or {})
    lines = [f"# CellCLIP model: {p.name}", "",
             "This checkpoint has no model card (README.md); from its config.json:", ""]
    lines += _encoder_section(cfg) + _text_section(cfg, training)
    lines += [f"Loss: `{cfg.get('loss', '?')}`.", ""] + _how_to_load(p)
    return "\n".join(lines)
