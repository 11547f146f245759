"""training/train.py, what a fit writes: checkpoints (their training state, how many are kept), the
final model and its config, metrics.jsonl cadence, validation, early stop, the summary, messages
(tiny synthetic data, a tiny text tower; no images)."""

from __future__ import annotations

import json
import random
import re
import time

import numpy as np
import pytest
import torch
import transformers.models.bert.modeling_bert  # noqa: F401  (imported at collection, not per test)

import training.train as tt
from _train_data import cfg, fit, make_data, metrics, run_of, step_lines, weights
from napari_cellclip.checkpoints import TRAINING_STATE
from napari_cellclip.model import CellCLIP
from training.checkpoints import load_training_state

# transformers' own progress bars off while these tests load the tiny text tower (as quiet fits do)
pytestmark = pytest.mark.usefixtures("hf_bars_off")


@pytest.fixture(scope="module")
def data():
    return make_data(val=True, correction="tvn")


def test_a_finished_fit(monkeypatch, tmp_path, tiny_bert_dir, data):
    """3 epochs of 2 steps, a checkpoint every step (2 kept), validation every epoch: the summary, the
    final model and its config, the checkpoints, metrics.jsonl.  (One test: mutmut credits a fixture's
    fit to the first test using it only.)"""
    out = tmp_path / "run"
    t0 = time.perf_counter()
    s = fit(monkeypatch, data, cfg(out, tiny_bert_dir, epochs=3, save_every=1, keep=2, eval_every=1, vision_heads=5,
                                   context_length=12, text_tuning="last:1", pooling="mean", loss="siglip",
                                   normalization="plate", data=[tmp_path / "plate"]))  # not the config's "field"
    assert s["seconds"] <= time.perf_counter() - t0 + 0.01  # the fit's own wall time
    _check_summary(out, s, data)
    _check_model(out, data, tiny_bert_dir, tmp_path)
    _check_checkpoints(out)
    _check_metrics(out, s)


def _check_summary(out, s, data):
    assert s["output"] == str(out) and s["model"] == str(out / "model")
    assert (s["steps"], s["total_steps"], s["epochs"], s["stopped_early"]) == (6, 6, 3, False)
    assert (s["steps_per_epoch"], s["batch_size"], s["batching"]) == (2, 3, "multipositive")
    assert (s["precision"], s["optimizer"], s["world_size"]) == ("fp32", "fused", 1)
    assert s["extract_seconds"] == 0.12 and s["feature_correction"]["method"] == "tvn"
    assert s["train_seconds"] >= 0 and s["seconds"] >= s["train_seconds"]
    for k in ("train_seconds", "seconds", "extract_seconds"):  # float seconds, to the hundredth
        assert isinstance(s[k], float) and round(s[k], 2) == s[k], k
    rep = json.loads((out / "val_report.json").read_text())
    assert rep["plates"] == ["VAL"] and rep["step"] == 6 and rep["epoch"] == 3
    assert rep["feature_correction"] == s["feature_correction"]
    assert s["val"] == {lvl: {d: rep[lvl][d]["R@1"] for d in ("image_to_text", "text_to_image")}
                        for lvl in ("field", "well")}
    done = metrics(out)[-1]
    assert done["event"] == "done" and done["steps"] == 6 and "val" not in done and done["model"] == s["model"]


def _check_model(out, data, tiny_bert_dir, tmp_path):
    model = CellCLIP.from_pretrained(out / "model")
    c = model.config
    assert (c.embed_dim, c.vision_width, c.vision_layers, c.input_channels, c.context_length) == (8, 12, 1, 2, 12)
    assert c.vision_heads == 4  # 5 heads do not divide the 12-wide features: the largest number below that does
    assert (c.pooling, c.loss, c.text_tuning, c.input_normalization) == ("mean", "siglip", "last:1", "plate")
    assert c.text_encoder == str(tiny_bert_dir)
    assert c.stains == ["DNA", "RNA"] and c.image_encoder == "morphology"
    assert c.feature_correction == {k: v for k, v in data.correction_spec.items() if k != "_state"}
    assert "feature_correction.whiten" in model.extra_tensors
    assert c.prompt_context["cell_line"] == "A549"  # the training plate's; the val plate's MCF7 is not trained on
    t = c.training
    assert (t["world_size"], t["n_train_wells"], t["prompts"], t["val_plates"]) == \
        (1, 6, ["DMSO", "compound alpha", "compound beta"], ["VAL"])
    assert t["epochs"] == 3 and t["save_every"] == 1 and t["data"] == [str(tmp_path / "plate")]
    assert t["optimizer"] == "fused" and json.loads((out / "train_args.json").read_text()) == t
    card = (out / "model" / "README.md").read_text()  # the model card: data, run, held-out metrics
    assert "22 fields of view in 9 wells on 2 plate(s): TRAIN, VAL" in card
    assert "3 epochs, 6 steps" in card and "(feature extraction 0.12 s)" in card
    assert "Retrieval on the held-out plate(s) VAL (3 wells, 7 fields, 3 prompts" in card
    # the model is the last checkpoint's
    a, b = weights(out / "model"), weights(out / "checkpoints" / "checkpoint-0000006")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _check_checkpoints(out):
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-0000005", "checkpoint-0000006"]
    assert (ck / "latest").read_text() == "checkpoint-0000006"
    st = load_training_state(ck / "checkpoint-0000005")
    assert (st["step"], st["epoch"], st["total_steps"], st["world_size"]) == (5, 2, 6, 1)
    assert st["sampler"] == {"epoch": 2, "start": 1, "seed": 3}
    assert st["scaler"] == {} and "rank_rng" not in st
    assert set(st["rng"]) >= {"torch", "python", "numpy"}
    assert st["scheduler"]["last_epoch"] == 5 and st["scheduler"]["_step_count"] == 6
    assert st["optimizer"]["state"] and len(st["optimizer"]["param_groups"]) == 2
    assert all(int(s["step"]) == 5 for s in st["optimizer"]["state"].values())
    end = load_training_state(ck / "checkpoint-0000006")  # the final one, after the last epoch
    assert (end["step"], end["epoch"], end["sampler"]["start"]) == (6, 3, 0)


def _check_metrics(out, s):
    events = [(m.get("event"), m["step"], m.get("epoch")) for m in metrics(out)]
    assert events == [(None, 1, 0), (None, 2, 0), ("val", 2, 1), (None, 3, 1), (None, 4, 1), ("val", 4, 2),
                      (None, 5, 2), (None, 6, 2), ("final_val", 6, 3), ("done", 6, None)]
    lines = step_lines(out)
    assert [m["batch"] for m in lines] == [3] * 6
    assert all(set(m) == {"step", "epoch", "loss", "lr", "logit_scale", "grad_norm", "batch", "time"} for m in lines)
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in lines)
    assert all(1 <= m["logit_scale"] <= 100 for m in lines)
    times = [m["time"] for m in lines]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= s["train_seconds"] + 0.01
    assert all(isinstance(t, float) and round(t, 3) == t for t in times)  # seconds, to the millisecond
    val = metrics(out)[2]
    assert set(val) == {"event", "step", "epoch", "val_field_i2t_R@1", "val_field_t2i_R@1", "val_well_i2t_R@1",
                        "val_well_t2i_R@1"}


def test_cadence_of_logs_checkpoints_and_validation(monkeypatch, tmp_path, tiny_bert_dir):
    """log_every 3, save_every 3 (not again at the end: the final checkpoint is written once),
    eval_every 2 of 4 epochs (the last epoch's is the final validation), no checkpoint pruning."""
    data = make_data(val=True)
    out = tmp_path / "run"
    s = fit(monkeypatch, data, cfg(out, tiny_bert_dir, epochs=4, log_every=3, save_every=3, eval_every=2, keep=0,
                                   text_tuning="full"))
    assert s["total_steps"] == 8
    events = [(m.get("event"), m["step"]) for m in metrics(out)]
    assert events == [(None, 3), ("val", 4), (None, 6), ("final_val", 8), ("done", 8)]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-0000003", "checkpoint-0000006", "checkpoint-0000008"]
    assert load_training_state(out / "checkpoints" / "checkpoint-0000003")["sampler"] == \
        {"epoch": 1, "start": 1, "seed": 3}


def test_no_logging_and_no_validation_plates(monkeypatch, tmp_path, tiny_bert_dir):
    out = tmp_path / "run"
    s = fit(monkeypatch, make_data(), cfg(out, tiny_bert_dir, log_every=0, eval_every=1, save_every=0))
    assert "val" not in s and not (out / "val_report.json").exists()
    assert [m["event"] for m in metrics(out)] == ["done"]
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-0000004"]


def test_stop_after_steps_checkpoints_and_stops(monkeypatch, tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "run"
    data = make_data()
    s = fit(monkeypatch, data, cfg(out, tiny_bert_dir, epochs=3, stop_after_steps=3, log_every=2, quiet=False))
    assert s["stopped_early"] and (s["steps"], s["epochs"], s["total_steps"]) == (3, 1, 6)
    assert "model" not in s and "seconds" not in s and not (out / "model").exists()
    assert (out / "checkpoints" / "latest").read_text() == "checkpoint-0000003"
    assert [m["step"] for m in metrics(out)] == [2]  # the pending line is written before stopping
    assert load_training_state(out / "checkpoints" / "checkpoint-0000003")["sampler"] == \
        {"epoch": 1, "start": 1, "seed": 3}
    err = capsys.readouterr().err
    assert "stopped after 3 steps (--stop-after-steps); resume with --resume" in err
    assert "train:" not in err  # --no-progress: the messages without the bar
    # a stop at or past the last step is no early stop
    s = fit(monkeypatch, data, cfg(tmp_path / "all", tiny_bert_dir, epochs=2, stop_after_steps=4))
    assert not s["stopped_early"] and s["steps"] == 4 and (tmp_path / "all" / "model").is_dir()


def test_quiet_says_nothing_and_progress_goes_to_stderr(monkeypatch, tmp_path, tiny_bert_dir, capsys):
    data = make_data(val=True)
    fit(monkeypatch, data, cfg(tmp_path / "q", tiny_bert_dir, epochs=1))
    assert capsys.readouterr() == ("", "")
    fit(monkeypatch, data, cfg(tmp_path / "loud", tiny_bert_dir, epochs=1, quiet=False, no_progress=False))
    got = capsys.readouterr()
    assert got.out == ""
    assert "train: 100%" in got.err and "2/2" in got.err  # the progress bar
    assert re.search(r"epoch=0, loss=\d+\.\d{4}\b", got.err) and re.search(r"step/s|s/step", got.err)
    assert f"saved {tmp_path / 'loud' / 'model'} (2 steps," in got.err and "data: 22 fields" in got.err
    assert "R@1" in got.err  # the validation report


def test_a_fresh_fit_replaces_old_metrics_and_keeps_writing_in_place(monkeypatch, tmp_path, tiny_bert_dir):
    out = tmp_path / "deep" / "run"
    data = make_data()
    fit(monkeypatch, data, cfg(out, tiny_bert_dir, epochs=1))
    fit(monkeypatch, data, cfg(out, tiny_bert_dir, epochs=1))
    assert [m.get("event") for m in metrics(out)] == [None, None, "done"]
    assert json.loads((out / "train_args.json").read_text())["epochs"] == 1
    assert (out / "train_args.json").read_text().startswith('{\n  "')


def test_precision_auto_on_the_cpu_is_fp32_and_the_data_is_closed(monkeypatch, tmp_path, tiny_bert_dir):
    feats = tmp_path / "features-rank0.npy"
    data = make_data(features_file=feats)
    seen = []
    s = fit(monkeypatch, data, cfg(tmp_path / "run", tiny_bert_dir, epochs=1, precision="auto"), prepared=seen)
    assert s["precision"] == "fp32" and seen[0][0].precision == "fp32" and seen[0][2] == torch.device("cpu")
    assert seen[0][1].world == 1 and not feats.exists()
    # also when training fails
    data = make_data(features_file=feats)
    monkeypatch.setattr(tt, "train", lambda run: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        fit(monkeypatch, data, cfg(tmp_path / "bad", tiny_bert_dir, epochs=1))
    assert not feats.exists()


def test_another_rank_trains_but_writes_nothing(monkeypatch, tmp_path, tiny_bert_dir, capsys):
    """Rank 1 (of a world of one here, so no process group is needed): only rank 0 writes."""
    from training.distributed import Dist

    class Rank1(Dist):
        def __init__(self):
            super().__init__()
            self.rank = 1

    monkeypatch.setattr(tt, "Dist", Rank1)
    out = tmp_path / "run"
    s = fit(monkeypatch, make_data(val=True), cfg(out, tiny_bert_dir, epochs=2, save_every=1, eval_every=1,
                                                  quiet=False, no_progress=False, stop_after_steps=3))
    assert s["steps"] == 3 and not out.exists()
    assert capsys.readouterr().err == ""
    s = fit(monkeypatch, make_data(val=True), cfg(out, tiny_bert_dir, epochs=1, quiet=False))
    assert s["steps"] == 2 and "val" not in s and not out.exists()


def test_build_model_seeds_every_rng_and_puts_the_model_on_the_device(tmp_path, tiny_bert_dir):
    from training.distributed import Dist

    data = make_data()
    c = cfg(tmp_path, tiny_bert_dir, seed=11)
    m1, _ = tt.build_model(c, data, Dist(), torch.device("cpu"))
    draws = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)
    assert draws == (random.random(), np.random.random())
    m2, args = tt.build_model(c, data, Dist(), torch.device("meta"))
    assert next(m2.parameters()).device.type == "meta"
    m3, _ = tt.build_model(c, data, Dist(), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))
    m4, _ = tt.build_model(cfg(tmp_path, tiny_bert_dir, seed=12), data, Dist(), torch.device("cpu"))
    assert not torch.equal(m1.image_pool.V.weight, m4.image_pool.V.weight)
    assert args["seed"] == 11 and args["n_train_wells"] == 6


def test_long_prompts_are_truncated_to_the_context(monkeypatch, tmp_path, tiny_bert_dir):
    data = make_data()
    data.train.prompts[1] = "compound " + " ".join(["alpha"] * 40)
    s = fit(monkeypatch, data, cfg(tmp_path / "run", tiny_bert_dir, epochs=1, context_length=8))
    assert s["steps"] == 2


def test_the_training_loss_goes_down(monkeypatch, tmp_path, tiny_bert_dir):
    out = tmp_path / "run"
    fit(monkeypatch, make_data(), cfg(out, tiny_bert_dir, epochs=12, batch_size=6, lr=3e-3, warmup=0, loss="clip"))
    losses = [m["loss"] for m in step_lines(out)]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_the_distinct_batch_cap_is_not_warned_again(monkeypatch, tmp_path, tiny_bert_dir, recwarn):
    s = fit(monkeypatch, make_data(), cfg(tmp_path / "run", tiny_bert_dir, epochs=1, batching="distinct",
                                          batch_size=5))
    assert s["batch_size"] == 3 and s["steps_per_epoch"] == 2
    assert not [w for w in recwarn if "capped" in str(w.message)]  # prepare says it once, as a note
    assert TRAINING_STATE


def test_batches_follow_the_seed(tmp_path, tiny_bert_dir):
    from training.data import ShuffledBatchSampler

    data = make_data()
    for seed in (3, 4):
        run = run_of(cfg(tmp_path, tiny_bert_dir, seed=seed, batch_size=2), data)
        want = ShuffledBatchSampler(data.train.prompt_ids, 2, seed=seed).batches(0)
        assert [b.tolist() for b in run.sampler] == [b.tolist() for b in want]


def test_validation_logs_and_returns_to_training_mode(tmp_path, tiny_bert_dir):
    run = run_of(cfg(tmp_path, tiny_bert_dir, text_tuning="full"), make_data(val=True))
    run.output.mkdir(parents=True, exist_ok=True)
    run.step, run.epoch = 4, 2
    rep = tt.validate(run, "val")
    assert run.model.training and run.model.text.training  # dropout on again for the next steps
    assert (rep["step"], rep["epoch"], rep["plates"]) == (4, 2, ["VAL"])
    assert metrics(run.output)[0]["val_well_i2t_R@1"] == rep["well"]["image_to_text"]["R@1"]
    run.data.val = None
    assert tt.validate(run, "val") is None


def test_metrics_lines_take_numpy_and_torch_numbers(tmp_path, tiny_bert_dir):
    run = run_of(cfg(tmp_path, tiny_bert_dir), make_data())
    run.output.mkdir(parents=True, exist_ok=True)
    run.log({"step": 1, "a": np.float32(0.5), "b": torch.tensor(2.0), "c": np.int64(3)})
    assert metrics(run.output) == [{"step": 1, "a": 0.5, "b": 2.0, "c": 3.0}]


def test_an_explicit_cpu_device_is_kept_where_a_gpu_is_available(monkeypatch, tmp_path, tiny_bert_dir):
    """--device cpu on a machine with CUDA ("auto" would pick the GPU); a data error reaches the user as
    itself."""
    from napari_cellclip.errors import CellClipError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    def prepare(c, dist, device, say):
        seen.append(device)
        raise CellClipError("no such plate: P1")

    monkeypatch.setattr(tt, "prepare", prepare)
    with pytest.raises(CellClipError, match="no such plate: P1"):
        tt.fit(cfg(tmp_path / "run", tiny_bert_dir))
    assert seen == [torch.device("cpu")]


def test_setup_puts_the_model_and_the_prompts_on_the_device(tmp_path, tiny_bert_dir):
    run = tt.setup(cfg(tmp_path, tiny_bert_dir), make_data(), tt.Dist(), torch.device("meta"), lambda *m: None)
    assert next(run.model.parameters()).device.type == "meta"
    assert [t.device.type for t in run.tokens] == ["meta", "meta"]
