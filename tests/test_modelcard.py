"""Model cards: fit writes README.md into the checkpoint folder; checkpoints without one get a card
from their config.json."""

from __future__ import annotations

import json
import shutil

from napari_cellclip.modelcard import describe_checkpoint, read_model_card, render_card


def test_fit_writes_a_model_card(trained_checkpoint):
    card = read_model_card(trained_checkpoint)
    assert card is not None and card.startswith("# CellCLIP model: ")
    for section in ("## Data", "## Image encoder", "## Text encoder and prompts", "## Training", "## Metrics",
                    "## How to load"):
        assert section in card
    cfg = json.loads((trained_checkpoint / "config.json").read_text())
    assert "12 fields of view in 4 wells on 1 plate(s): SQ00015198" in card
    assert "DMSO (2)" in card and "lonafarnib (1)" in card and "orantinib (1)" in card
    assert f"`{cfg['image_encoder']}`" in card and "Stains, in this order: DNA, ER, RNA, AGP, Mito" in card
    assert "`A549 cells treated with compound: lonafarnib`" in card
    assert f"Loss: `{cfg['loss']}`" in card and "30 epochs" in card
    assert "No held-out evaluation" in card  # the fixture trains without --val-plate
    assert f'load_model("{trained_checkpoint}")' in card


def test_metrics_table_from_a_report(tmp_path, trained_checkpoint):
    report = {"plates": ["SQ00015231"], "n_wells": 4, "n_fields": 36, "prompts": ["a", "b", "c"],
              "chance_R@1_image_to_text": 1 / 3,
              "field": {"image_to_text": {"R@1": 0.64, "R@5": 1.0}, "text_to_image": {"R@1": 1.0, "R@5": 1.0}},
              "well": {"image_to_text": {"R@1": 0.75, "R@5": 1.0}, "text_to_image": {"R@1": 1.0, "R@5": 1.0}}}
    card = render_card(trained_checkpoint, report=report)
    assert "held-out plate(s) SQ00015231 (4 wells, 36 fields, 3 prompts; chance R@1 0.33)" in card
    assert "| field | 0.64 | 1.00 | 1.00 | 1.00 |" in card and "| well | 0.75 | 1.00 | 1.00 | 1.00 |" in card


def test_checkpoints_without_a_card_are_described_from_their_config(tmp_path, trained_checkpoint):
    bare = tmp_path / "published"
    bare.mkdir()
    shutil.copy(trained_checkpoint / "config.json", bare / "config.json")
    text = describe_checkpoint(bare)
    assert "has no model card" in text and "## Image encoder" in text and "## How to load" in text
    assert "No CellCLIP checkpoint" in describe_checkpoint(tmp_path / "nothing")
