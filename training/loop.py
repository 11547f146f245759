"""The entry points of ``python -m training``: :func:`fit`, :func:`extract`, :func:`evaluate`.

``fit`` is a :class:`training.config.FitConfig` (validated options) run by :mod:`training.train`
(set-up, epochs of steps, checkpoints, validation) on the data :mod:`training.prepare` readies
(the fields front door, the feature engine, the plate-effect correction, well bags); the
optimiser, schedule, precision, process group and training checkpoints each have their module
(:mod:`training.optim`, :mod:`training.scheduler`, :mod:`training.precision`,
:mod:`training.distributed`, :mod:`training.checkpoints`).
"""

from __future__ import annotations

import functools

from .config import DEFAULT_OUTPUT, FIT_DEFAULTS, FitConfig
from .prepare import extract

__all__ = ["fit", "extract", "evaluate", "FIT_DEFAULTS", "DEFAULT_OUTPUT"]


def _hf_bars_follow_quiet(fn):
    """``quiet=True`` or ``no_progress=True`` also silences transformers' own
    "Loading weights" bars while ``fn`` runs (restored afterwards)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (kwargs.get("quiet") or kwargs.get("no_progress")):
            return fn(*args, **kwargs)
        from transformers.utils import logging as hf_logging

        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                hf_logging.enable_progress_bar()
    return wrapper


@_hf_bars_follow_quiet
def fit(**kwargs) -> dict:
    """Train CellCLIP with the options of ``python -m training fit`` (:class:`FitConfig`, same
    names); returns a summary dict (paths, steps, validation report)."""
    from .train import fit as run

    return run(FitConfig.from_kwargs(**kwargs))


@_hf_bars_follow_quiet
def evaluate(checkpoint, data=None, **kwargs) -> dict:
    """Retrieval report of a checkpoint on annotated plates (:func:`training.evaluate.evaluate_checkpoint`)."""
    from .evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, data, **kwargs)
