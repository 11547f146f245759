"""training/train.py, --resume: a killed run resumed from its checkpoint ends as an uninterrupted one
(weights, metrics.jsonl, validations), with a trainable text tower whose dropout draws from the
restored RNG (tiny synthetic data, a tiny text tower; no images)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers.models.bert.modeling_bert  # noqa: F401  (imported at collection, not per test)

from _train_data import cfg, fit, make_data, metrics, weights

# transformers' own progress bars off while these tests load the tiny text tower (as quiet fits do)
pytestmark = pytest.mark.usefixtures("hf_bars_off")

KW = dict(epochs=3, eval_every=1, text_tuning="full", bag_min_fields=1, bag_max_fields=2, warmup=2)


@pytest.fixture(scope="module")
def data():
    return make_data(val=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert_dir, data):
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("resume") / "full"
    try:
        fit(mp, data, cfg(out, tiny_bert_dir, **KW))
    finally:
        mp.undo()
    return out


def _lines(out):
    """metrics.jsonl without the wall times and paths."""
    return [{k: v for k, v in m.items() if k not in ("time", "seconds", "train_seconds", "output", "model")}
            for m in metrics(out)]


def _same_lines(a, b):
    assert [sorted(m) for m in a] == [sorted(m) for m in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not isinstance(v, float)} == \
            {k: v for k, v in y.items() if not isinstance(v, float)}
        for k, v in x.items():
            if isinstance(v, float):
                assert v == pytest.approx(y[k], rel=1e-5), (k, x, y)


@pytest.mark.parametrize("stop", [3, 2], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_run_ends_as_an_uninterrupted_one(monkeypatch, tmp_path, tiny_bert_dir, data, uninterrupted,
                                                    stop, capsys):
    out = tmp_path / "part"
    part = fit(monkeypatch, data, cfg(out, tiny_bert_dir, stop_after_steps=stop, **KW))
    assert part["stopped_early"] and part["steps"] == stop
    with open(out / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 9, "loss": 1.\xff')  # a line cut short by the kill (mid-character)
    resumed = fit(monkeypatch, data, cfg(out, tiny_bert_dir, resume=True, quiet=False, no_progress=False, **KW))
    assert resumed["steps"] == 6 and not resumed["stopped_early"]
    epoch, batch = divmod(stop, 2)
    said = capsys.readouterr().err
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{stop:07d}'} at step {stop} " \
           f"(epoch {epoch if batch else epoch - 1}, batch {batch or 2})" in said
    assert f"{stop}/6" in said and "6/6" in said  # the bar goes on from the step resumed from
    a, b = weights(uninterrupted / "model"), weights(out / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
    # the same lines, validations at the same steps included
    _same_lines(_lines(out), _lines(uninterrupted))


def test_resume_without_a_checkpoint_starts_from_scratch(monkeypatch, tmp_path, tiny_bert_dir, data, capsys):
    out = tmp_path / "run"
    s = fit(monkeypatch, data, cfg(out, tiny_bert_dir, resume=True, quiet=False, epochs=1))
    assert s["steps"] == 2
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch" in capsys.readouterr().err


def test_resuming_a_finished_run_finishes_it_again_without_duplicate_lines(monkeypatch, tmp_path, tiny_bert_dir,
                                                                            data):
    out = tmp_path / "run"
    c = dict(epochs=2, eval_every=1)
    fit(monkeypatch, data, cfg(out, tiny_bert_dir, **c))
    first = _lines(out)
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + "not json\n[1, 2]\n")
    s = fit(monkeypatch, data, cfg(out, tiny_bert_dir, resume=True, **c))
    assert s["steps"] == 4
    _same_lines(_lines(out), first)


def test_resume_restores_the_fp16_scale_and_clears_an_interrupted_write(monkeypatch, tmp_path, tiny_bert_dir, data):
    """The fp16 scaler goes on with its scale (this model overflows at the first scale, which backs off);
    a temporary folder left by a killed checkpoint write is removed, with a warning."""
    import torch

    import training.train as tt
    from napari_cellclip.errors import CellClipWarning
    from training.distributed import Dist

    out = tmp_path / "run"
    fit(monkeypatch, data, cfg(out, tiny_bert_dir, precision="fp16", epochs=2, stop_after_steps=1))
    stale = out / "checkpoints" / ".checkpoint-0000002.tmp-0123abcd"
    stale.mkdir()
    with pytest.warns(CellClipWarning, match="interrupted write"):
        run = tt.setup(cfg(out, tiny_bert_dir, precision="fp16", epochs=2, resume=True), data, Dist(),
                       torch.device("cpu"), lambda *m: None)
    assert run.step == 1 and run.scaler.get_scale() == 32768.0 and not stale.exists()
