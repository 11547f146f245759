"""text_tuning: which text-encoder parameters train, for the encoder layouts the model knows, and
the encoder's train/eval mode (issue 16)."""

from __future__ import annotations

import pytest
import torch
from _model_tiny import bert, distilbert, model
from torch import nn

from napari_cellclip.errors import CheckpointError
from napari_cellclip.model import set_text_trainable


def _trainable(text):
    return {n for n, p in text.named_parameters() if p.requires_grad}


def _under(names, *prefixes):
    return {n for n in names if n.startswith(prefixes)}


def test_last_k_trains_the_last_k_layers_and_the_used_pooler():
    m = model(text=bert(layers=3), text_pooling="pooler", text_tuning="last:1")
    names = {n for n, _ in m.text.named_parameters()}
    want = _under(names, "encoder.layer.2.", "pooler.")
    assert _trainable(m.text) == want and _under(want, "pooler.") and _under(want, "encoder.layer.2.")
    m.apply_text_tuning("last:2")
    assert _trainable(m.text) == _under(names, "encoder.layer.1.", "encoder.layer.2.", "pooler.")


def test_an_unused_pooler_stays_frozen():
    m = model(text=bert(layers=3), text_pooling="mean", text_tuning="last:1")
    names = {n for n, _ in m.text.named_parameters()}
    assert _trainable(m.text) == _under(names, "encoder.layer.2.")
    m.apply_text_tuning("full")
    assert _trainable(m.text) == names - _under(names, "pooler.")


def test_full_tuning_trains_everything_including_the_used_pooler():
    m = model(text_pooling="pooler", text_tuning="full")
    assert _trainable(m.text) == {n for n, _ in m.text.named_parameters()}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("tuning", ["last:1", "full", "frozen"])
def test_an_encoder_without_pooler_tunes(tuning, pooling):
    m = model(text=bert(pooler=False), text_pooling=pooling, text_tuning=tuning)
    names = {n for n, _ in m.text.named_parameters()}
    want = {"last:1": _under(names, "encoder.layer.1."), "full": names, "frozen": set()}[tuning]
    assert _trainable(m.text) == want


def test_a_distilbert_encoders_layers_are_found():
    m = model(text=distilbert(), text_pooling="mean", text_tuning="last:1")
    names = {n for n, _ in m.text.named_parameters()}
    assert _trainable(m.text) == _under(names, "transformer.layer.1.") != set()


def _nested(path):
    """A module whose blocks (3 Linear layers) sit at attribute ``path``."""
    root = nn.Module()
    obj = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        setattr(obj, part, child)
        obj = child
    setattr(obj, parts[-1], nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
    root.embed = nn.Linear(2, 2)
    return root


@pytest.mark.parametrize("path", ["encoder.layer", "encoder.layers", "transformer.layer", "layers", "layer"])
def test_last_k_finds_the_layers_of_each_known_layout(path):
    text = _nested(path)
    set_text_trainable(text, "last:1", "mean")
    assert _trainable(text) == {f"{path}.2.weight", f"{path}.2.bias"}


def test_last_k_on_an_encoder_without_known_layers_says_so():
    with pytest.raises(CheckpointError, match=r"^text_tuning 'last:1': cannot find the layers of Linear$"):
        set_text_trainable(nn.Linear(2, 2), "last:1", "mean")


def test_a_bad_tuning_names_the_choices():
    with pytest.raises(CheckpointError, match=r"^text_tuning must be frozen\|full\|last:k, got 'last'$"):
        model().apply_text_tuning("last")


def test_only_a_frozen_encoder_is_put_in_eval_mode():
    m = model(text_tuning="full").train()
    assert m.text.training
    m.apply_text_tuning("last:1")
    assert m.text.training  # it trains: dropout stays on
    m.apply_text_tuning("full")
    assert m.text.training
    m.apply_text_tuning("frozen")
    assert not m.text.training and not _trainable(m.text)
    m.train()
    assert not m.text.training and m.visual.training
    with torch.no_grad():
        assert m.encode_prompts(["cells"]).shape[0] == 1
