"""One checkpoint convention: the run folder fit prints, its model/, checkpoints/checkpoint-N."""

from __future__ import annotations

import shutil

import pytest
import torch

from napari_cellclip import model as model_mod
from napari_cellclip.checkpoints import (
    load_model,
    model_identity,
    prompt_context,
    record_prompt_context,
    resolve_checkpoint,
)
from napari_cellclip.errors import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_bert_dir):
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    cfg = model_mod.CellCLIPConfig(embed_dim=8, vision_width=128, vision_layers=1, vision_heads=2,
                                   input_channels=5, context_length=32, text_encoder=str(tiny_bert_dir),
                                   text_pooling="mean", image_encoder="morphology")
    return model_mod.CellCLIP(cfg).eval().save_pretrained(d / "model")


def _run_folder(tmp_path, ckpt, *, final: bool, steps=(3, 6)):
    """The layout `python -m training fit --output RUN` leaves (RUN/model only when it finished)."""
    run = tmp_path / "run"
    for s in steps:
        c = run / "checkpoints" / f"checkpoint-{s:07d}"
        shutil.copytree(ckpt, c)
        (c / "training_state.pt").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text(f"checkpoint-{steps[0]:07d}")  # the pointer wins
    if final:
        shutil.copytree(ckpt, run / "model")
    return run


def test_resolve_accepts_run_model_and_checkpoint_folders(tmp_path, ckpt):
    run = _run_folder(tmp_path, ckpt, final=True)
    assert resolve_checkpoint(run) == run / "model"
    assert resolve_checkpoint(run / "model") == run / "model"
    c6 = run / "checkpoints" / "checkpoint-0000006"
    assert resolve_checkpoint(c6) == c6
    shutil.rmtree(run / "model")  # still training: the latest checkpoint
    assert resolve_checkpoint(run) == run / "checkpoints" / "checkpoint-0000003"
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "checkpoint-0000003"
    m = load_model(run, device="cpu")
    assert m.checkpoint_dir == str(run / "checkpoints" / "checkpoint-0000003")
    assert model_identity(m) == model_identity(load_model(ckpt, device="cpu"))


def test_resolve_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a file"):
        resolve_checkpoint(tmp_path / "f.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json missing") as e:
        resolve_checkpoint(tmp_path / "empty")
    assert "run folder" in str(e.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors missing"):
        load_model(tmp_path / "half")


@pytest.mark.filterwarnings("ignore:encoder options")
def test_the_job_accepts_the_run_folder_fit_prints(tmp_path, ckpt):
    """Defect: the job said "not a CellCLIP checkpoint (config.json missing)" for a fit run folder."""
    import pandas as pd

    from napari_cellclip import pipeline
    from napari_cellclip.sample import load_sample_fields
    from napari_cellclip.store import EmbeddingStore

    run = _run_folder(tmp_path, ckpt, final=True)
    fields = load_sample_fields().iloc[:2]
    s = pipeline.run_job(fields, run, tmp_path / "out", device="cpu", workers=0, quiet=True, cache_dir=False,
                         encoder_options={"size": 64})
    assert s["n_embedded"] == 2
    st = EmbeddingStore.load(tmp_path / "out")
    assert st.model_id == model_identity(load_model(run / "model", device="cpu"))
    assert isinstance(st.fields, pd.DataFrame)


def test_prompt_context_recorded_or_read_off_the_trained_prompts():
    from napari_cellclip.prompts import DEFAULT_TEMPLATES

    cfg = model_mod.CellCLIPConfig(vision_width=16, vision_heads=2, embed_dim=8)
    assert prompt_context(cfg) is None  # nothing recorded, no trained prompts: unknown
    cfg.training = {"prompts": ["A549 cells treated with compound: control, DMSO",
                                "A549 cells treated with compound: lonafarnib"]}
    ctx = prompt_context(cfg)
    assert ctx.cell_line == "A549" and ctx.templates == DEFAULT_TEMPLATES
    assert ctx.example() == "A549 cells treated with compound: <name>"
    cfg.training = {"prompts": ["Cells treated with compound: lonafarnib"]}
    assert prompt_context(cfg).cell_line is None
    cfg.training = {"prompts": ["A549 cells treated with x", "U2OS cells treated with y"]}
    assert prompt_context(cfg) is None
    import pandas as pd

    rec = record_prompt_context(pd.DataFrame({"Metadata_cell_line": ["U2OS", "U2OS", ""]}))
    cfg.prompt_context = rec
    assert prompt_context(cfg).cell_line == "U2OS"
    assert model_mod.CellCLIPConfig.from_dict(cfg.to_dict()).prompt_context == rec
    several = record_prompt_context(pd.DataFrame({"Metadata_cell_line": ["U2OS", "A549"]}))
    assert several["cell_line"] is None and several["cell_lines"] == ["A549", "U2OS"]
    cfg.prompt_context = several
    assert prompt_context(cfg) is None
