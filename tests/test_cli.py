"""Both command lines: the same names for the same things, old spellings still parse, clean --help."""

from __future__ import annotations

import argparse

import pytest

SHARED = ("--data", "--platemap", "--barcode-platemap", "--annotations", "--channel-map", "--cell-line",
          "--device", "--workers", "--cache-dir", "--quiet")


def _parsers():
    from napari_cellclip.pipeline import _parser
    from training.__main__ import build_parser

    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"pipeline": _parser(), "fit": subs["fit"], "extract": subs["extract"], "evaluate": subs["evaluate"]}


def _options(p):
    return {s: a for a in p._actions for s in a.option_strings}


def test_shared_names():
    ps = _parsers()
    for name, p in ps.items():
        missing = [o for o in SHARED if o not in _options(p)]
        assert not missing, (name, missing)
    for name in ("pipeline", "evaluate"):
        assert "--checkpoint" in _options(ps[name])
    for name in ("pipeline", "extract", "evaluate"):  # fields per encoder forward
        assert "--batch-size" in _options(ps[name])


def test_old_spellings_parse_but_are_hidden():
    ps = _parsers()
    a = ps["pipeline"].parse_args(["--data", "d", "--checkpoint", "c", "--out", "o", "--platemap-dir", "pm",
                                   "--num-workers", "3"])
    assert (a.output, a.platemap, a.workers, a.data) == ("o", "pm", 3, ["d"])
    a = ps["fit"].parse_args(["--num-workers", "2", "--platemap-dir", "pm", "--extract-batch-size", "5"])
    assert (a.workers, a.platemap, a.extract_batch_size) == (2, "pm", 5)
    a = ps["evaluate"].parse_args(["--checkpoint", "c", "--extract-batch-size", "5", "--workers", "1"])
    assert (a.batch_size, a.workers) == (5, 1)
    for name, p in ps.items():
        text = p.format_help()
        hidden = ["--platemap-dir", "--num-workers", "--out "] + (["--extract-batch-size"] if name != "fit" else [])
        assert not [old for old in hidden if old in text], name


@pytest.mark.parametrize("name", ["pipeline", "fit", "extract", "evaluate"])
def test_help_is_clean(name):
    p = _parsers()[name]
    for a in p._actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        assert a.help and a.help.strip(), f"{name}: {a.option_strings} has no help"
    text = " ".join(p.format_help().split())
    assert "(default: None)" not in text and "default: False" not in text
    for a in p._actions:  # never two defaults in one option's help
        if a.help and a.help != argparse.SUPPRESS:
            assert p._get_formatter()._expand_help(a).lower().count("default") <= 1, a.option_strings
