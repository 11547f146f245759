"""A ``Metadata_is_control`` column read as text (a CSV read with ``dtype=str``, a spreadsheet export)
marks the controls as the prompts read it: "False", "no", "0" are not controls.  Before, the column
was cast with ``astype(bool)``, so every non-empty string -- "False" included -- was a control and the
plate was centred on all its fields."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import correction as corr
from napari_cellclip.prompts import build_prompt


@pytest.mark.parametrize("text,expected", [
    (["True", "False", "TRUE", "false", "1", "0", "yes", "no", "", "nan"], [1, 0, 1, 0, 1, 0, 1, 0, 0, 0]),
    (["1.0", "0.0", "0", "2", " False ", "F", "N", "off", "None", "NA"], [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
])
def test_text_flags_mark_only_the_true_rows(text, expected):
    f = pd.DataFrame({"Metadata_is_control": pd.Series(text, dtype=object)})
    assert corr.control_mask(f).tolist() == [bool(v) for v in expected]


def test_a_csv_read_as_text_centres_on_its_controls_not_on_every_field():
    csv = "Metadata_Plate,Metadata_is_control\n" + "\n".join(
        f"P,{'True' if i % 4 == 0 else 'False'}" for i in range(8))
    fields = pd.read_csv(io.StringIO(csv), dtype=str)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32) * 2 + 7
    y = corr.apply(x, fields, corr.make_spec("center_scale"))
    ref = x[[0, 4]].astype(np.float64)
    np.testing.assert_allclose(y, (x - ref.mean(0)) / ref.std(0), rtol=1e-5, atol=1e-5)


def test_the_correction_and_the_prompt_agree_on_which_wells_are_controls():
    """One reading of the flag: a well the prompt calls a control is a control of the correction."""
    values = ["False", "True", "0", "no", "1", "", "off"]
    f = pd.DataFrame({"Metadata_is_control": pd.Series(values, dtype=object)})
    prompts = [build_prompt({"modality": "crispr", "gene": "TP53", "is_control": v}) for v in values]
    said_control = ["TP53" not in p for p in prompts]
    assert corr.control_mask(f).tolist() == said_control == [False, True, False, False, True, False, False]
