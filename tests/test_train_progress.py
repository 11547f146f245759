"""training/train.py: the progress bar on a terminal follows the terminal's width while training."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import sys
import termios

import pytest
import transformers.models.bert.modeling_bert  # noqa: F401  (imported at collection, not per test)

import training.train as tt
from _train_data import cfg, fit, make_data

# transformers' own progress bars off while these tests load the tiny text tower (as quiet fits do)
pytestmark = pytest.mark.usefixtures("hf_bars_off")

pty = pytest.importorskip("pty")


def _set_width(fd, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))


def test_the_bar_follows_a_resized_terminal(monkeypatch, tmp_path, tiny_bert_dir):
    master, slave = pty.openpty()
    _set_width(slave, 60)
    term = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", term)
    real = tt.train_step

    def step(run, rows):
        _set_width(slave, 100)  # the user widens the window while training
        return real(run, rows)

    monkeypatch.setattr(tt, "train_step", step)
    try:
        fit(monkeypatch, make_data(), cfg(tmp_path / "run", tiny_bert_dir, epochs=1, quiet=False, no_progress=False))
        term.flush()
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        term.close()
        os.close(master)
    bars = [b for b in out.decode(errors="replace").replace("\n", "\r").split("\r") if b.startswith("train:")]
    assert bars and len(bars[-1].rstrip()) > 60  # the last bar fills the wider terminal
