"""A plate without a cell line is described the way the checkpoint learned; a mismatch is warned about."""

from __future__ import annotations

import warnings

import pytest

from napari_cellclip.embed import fields_for_model
from napari_cellclip.errors import CellClipWarning
from napari_cellclip.fields import read_fields
from napari_cellclip.sample import sample_plate_dir, sample_platemap_dir


class _Model:
    def __init__(self, **cfg):
        from napari_cellclip.model import CellCLIPConfig

        self.config = CellCLIPConfig(vision_width=16, vision_heads=2, embed_dim=8, **cfg)


def _plate(cell_line=None):
    return read_fields(sample_plate_dir(), platemap=sample_platemap_dir(), cell_line=cell_line)


def test_checkpoint_cell_line_fills_a_plate_without_one():
    model = _Model(prompt_context={"cell_line": "A549"})
    plain = _plate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellClipWarning)
        got = fields_for_model(plain, model)
    assert got["Metadata_prompt"].tolist() == _plate("A549")["Metadata_prompt"].tolist()
    assert set(got["Metadata_cell_line"]) == {"A549"}
    # an older checkpoint: the cell line is read off the prompts it was trained on
    old = _Model(training={"prompts": ["A549 cells treated with compound: lonafarnib"]})
    assert fields_for_model(plain, old)["Metadata_prompt"].tolist() == got["Metadata_prompt"].tolist()


def test_other_cell_line_is_kept_and_warned_about():
    model = _Model(prompt_context={"cell_line": "A549"})
    u2os = _plate("U2OS")
    with pytest.warns(CellClipWarning, match="U2OS.*A549"):
        got = fields_for_model(u2os, model)
    assert got["Metadata_prompt"].tolist() == u2os["Metadata_prompt"].tolist()
    with pytest.warns(CellClipWarning, match="no cell line"):
        fields_for_model(u2os, _Model(prompt_context={"cell_line": None}))


def test_unknown_context_changes_nothing():
    plain = _plate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellClipWarning)
        assert fields_for_model(plain, _Model())["Metadata_prompt"].tolist() == plain["Metadata_prompt"].tolist()


def test_fit_records_the_prompt_context(trained_checkpoint):
    from napari_cellclip.checkpoints import load_model, prompt_context

    ctx = prompt_context(load_model(trained_checkpoint, device="cpu").config)
    assert ctx.cell_line == "A549" and ctx.example() == "A549 cells treated with compound: <name>"
