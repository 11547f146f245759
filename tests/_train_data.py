"""Tiny synthetic training data for the tests of training/train.py (no images, no feature engine).

``make_data()`` builds a :class:`training.prepare.TrainingData` from random (N, C, D) features of a
few wells (3 prompts, 2-3 fields a well); ``cfg(tmp, text_dir, **kw)`` a FitConfig of a tiny model
whose text tower is the session's tiny BERT; ``fit(monkeypatch, data, cfg)`` runs training.train.fit
on that data (prepare replaced: it would read and encode plates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

C, D = 2, 12
PROMPTS = ["DMSO", "compound alpha", "compound beta"]


def fields_table(plate: str, n_wells: int = 6, cell_line: str = "A549", fields_per_well=(2, 3)) -> pd.DataFrame:
    rows = []
    for w in range(n_wells):
        for f in range(fields_per_well[w % len(fields_per_well)]):
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"A{w + 1:02d}", "Metadata_Site": f + 1,
                         "Metadata_prompt": PROMPTS[w % len(PROMPTS)], "Metadata_cell_line": cell_line,
                         "Metadata_pert_iname": PROMPTS[w % len(PROMPTS)].split()[-1],
                         "FileName_OrigDNA": f"{plate}_{w}_{f}_dna.tif",
                         "FileName_OrigRNA": f"{plate}_{w}_{f}_rna.tif"})
    return pd.DataFrame(rows)


def make_data(*, val: bool = False, seed: int = 0, n_wells: int = 6, correction: str | None = None,
              features_file: Path | None = None):
    """TrainingData of one training plate (and with ``val`` a validation plate of another cell line)."""
    from napari_cellclip import correction as corr
    from training.data import build_well_bags
    from training.prepare import TrainingData

    train_f = fields_table("TRAIN", n_wells)
    val_f = fields_table("VAL", 3, cell_line="MCF7") if val else train_f.iloc[:0]
    fields = pd.concat([train_f, val_f], ignore_index=True)
    rng = np.random.default_rng(seed)
    # each prompt has its own mean so that a model can learn to tell them apart
    means = rng.normal(size=(len(PROMPTS), C, D)).astype(np.float32)
    pid = fields["Metadata_prompt"].map({p: i for i, p in enumerate(PROMPTS)}).to_numpy()
    feats = (means[pid] + 0.3 * rng.normal(size=(len(fields), C, D))).astype(np.float32)
    n_train = len(train_f)
    spec = None
    if correction:
        spec = corr.fit(feats[:n_train], train_f, corr.make_spec(correction))
        feats = np.concatenate([corr.apply(feats[:n_train], train_f, spec),
                                corr.apply(feats[n_train:], val_f, spec)]).astype(np.float32)
    wb = build_well_bags(feats[:n_train], train_f.reset_index(drop=True))
    vb = build_well_bags(feats[n_train:], val_f.reset_index(drop=True)) if val else None
    if features_file is not None:
        np.save(features_file, feats)
    return TrainingData(fields, wb, vb, spec, "morphology", tuple(feats.shape), ["VAL"] if val else [], 0.123456,
                        features_file)


def cfg(tmp, text_dir, **kw):
    from training.config import FitConfig

    base = dict(output=str(tmp), text_encoder=str(text_dir), embed_dim=8, vision_layers=1, vision_heads=2,
                context_length=16, epochs=2, batch_size=3, lr=1e-2, warmup=1, seed=3, correction="none",
                quiet=True, no_progress=True, device="cpu", precision="fp32", bag_min_fields=0)
    base.update(kw)
    return FitConfig(**base)


def fit(monkeypatch, data, config, prepared=None):
    """training.train.fit(config) on ``data`` (``prepared``: a list the (cfg, dist, device) go to)."""
    import training.train as tt

    def fake_prepare(c, dist, device, say):
        if prepared is not None:
            prepared.append((c, dist, device))
        say(f"data: {len(data.fields)} fields")  # as prepare says what it read
        return data

    monkeypatch.setattr(tt, "prepare", fake_prepare)
    return tt.fit(config)


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_lines(out) -> list[dict]:
    return [m for m in metrics(out) if "loss" in m]


def run_of(config, data, say=None):
    """A set-up training.train.Run (no training yet), single process on the CPU."""
    import torch

    from training.distributed import Dist
    from training.train import setup

    return setup(config, data, Dist(), torch.device("cpu"), say or (lambda *m: None))


def weights(model_dir) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))
