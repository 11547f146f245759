"""training/train.py: metrics.jsonl on --resume (which lines are kept), read the same whatever the locale."""

from __future__ import annotations

import json
import locale

import pytest

from training.train import _trim_metrics

# transformers' own progress bars off while these tests load the tiny text tower (as quiet fits do)
pytestmark = pytest.mark.usefixtures("hf_bars_off")


def _write(path, lines):
    """JSON Lines as UTF-8 (the format's encoding; run.log itself writes ASCII escapes)."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode())
                              + b"\n" for x in lines))


def _read(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_resume_keeps_the_steps_up_to_the_checkpoint_and_the_events_before_it(tmp_path):
    m = tmp_path / "metrics.jsonl"
    _write(m, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"event": "val", "step": 2},
               {"step": 3, "loss": 1.2}, {"event": "val", "step": 3}, {"step": 4, "loss": 1.0}])
    _trim_metrics(m, 3)
    assert _read(m) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"event": "val", "step": 2},
                        {"step": 3, "loss": 1.2}]


def test_damaged_lines_are_dropped_and_the_lines_after_them_kept(tmp_path):
    m = tmp_path / "metrics.jsonl"
    _write(m, [{"step": 1}, b'{"step": 2, "lo', b"[1, 2]", b'"text"', {"step": 2}, b"\xff\xfe{", {"step": 3},
               {"step": 5}])
    _trim_metrics(m, 4)
    assert _read(m) == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_a_line_without_a_step_counts_as_written_before_the_first_step(tmp_path):
    """(e.g. the "done" line of a run by an older version, which had no step)."""
    m = tmp_path / "metrics.jsonl"
    _write(m, [{"event": "done", "steps": 4}, {"step": 1}, {"note": "x"}, {"step": 2}])
    _trim_metrics(m, 1)
    assert _read(m) == [{"event": "done", "steps": 4}, {"step": 1}, {"note": "x"}]


def test_metrics_are_read_as_utf8_whatever_the_locale(tmp_path):
    """A line holding UTF-8 text (JSON Lines are UTF-8; another tool may have added it) comes through a
    resume unchanged under a locale whose encoding is not UTF-8."""
    m = tmp_path / "metrics.jsonl"
    _write(m, [{"step": 1, "output": "/data/Läufe/run"}, {"step": 2}])
    old = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")  # an ASCII locale, as a Windows code page is not UTF-8
    except locale.Error:
        pytest.skip("no C locale")
    try:
        _trim_metrics(m, 1)
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
    assert _read(m) == [{"step": 1, "output": "/data/Läufe/run"}]
