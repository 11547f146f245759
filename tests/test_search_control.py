"""control_centered / more_like_this: each plate centred on its own negative controls (its own mean
without any), in float64, keeping the store's identity, level and provenance (issue 16)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.errors import QueryError
from napari_cellclip.search import control_centered, more_like_this, text_query
from napari_cellclip.store import EmbeddingStore

E = 8


def _store(plates=("P1", "P2", "P3"), controls=(True, True, False), seed=0):
    """Per plate: 2 DMSO (or, without controls, 2 "c") fields and 2 fields each of "a" and "b"; a well per pair."""
    rng = np.random.default_rng(seed)
    rows, emb = [], []
    for plate, has_ctrl in zip(plates, controls):
        shift = rng.normal(size=E)
        for i, pert in enumerate(("DMSO" if has_ctrl else "c",) * 2 + ("a", "a", "b", "b")):
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"W{i // 2:02d}", "Metadata_pert_iname": pert})
            emb.append(5.0 * np.eye(E)[0] + shift + rng.normal(size=E))
    return EmbeddingStore(np.array(emb), pd.DataFrame(rows), "ckpt-1", info={"source": "unit test"})


def _expected(store):
    """Each plate's rows minus the mean of its DMSO rows (of all its rows without), renormalised."""
    emb = store.embeddings.astype(np.float64)
    out = np.zeros_like(emb)
    f = store.fields
    for plate in f["Metadata_Plate"].unique():
        rows = (f["Metadata_Plate"] == plate).to_numpy()
        ctrl = rows & (f["Metadata_pert_iname"] == "DMSO").to_numpy()
        ref = ctrl if ctrl.any() else rows
        out[rows] = emb[rows] - emb[ref].mean(axis=0)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # a lone control well: 0


def test_each_plate_is_centred_on_its_own_controls():
    st = _store()
    centred = control_centered(st)
    np.testing.assert_allclose(centred.embeddings, _expected(st), atol=1e-6)
    # a plate's two controls, centred on their mean, are opposite changes
    c = centred.embeddings
    assert float(c[0] @ c[1]) == pytest.approx(-1.0, abs=1e-5)
    assert float(c[6] @ c[7]) == pytest.approx(-1.0, abs=1e-5)


def test_a_single_plate_and_a_plate_without_controls():
    one = _store(plates=("P1",), controls=(True,))
    np.testing.assert_allclose(control_centered(one).embeddings, _expected(one), atol=1e-6)
    none = _store(plates=("P1",), controls=(False,))
    np.testing.assert_allclose(control_centered(none).embeddings, _expected(none), atol=1e-6)


def test_controls_a_float32_step_apart_are_still_centred():
    """Two control fields differing by one float32 step: centred on their exact mean they are opposite
    changes; a mean rounded to float32 would be one of them, leaving it an all-zero vector."""
    a = np.float32(0.6)
    c1 = np.array([a, np.float32(0.8), 0, 0], np.float32)
    c2 = c1.copy()
    c2[0] = np.nextafter(a, np.float32(1))
    t = np.array([0.6, 0.79, 0.1, 0], np.float32)
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A02", "A03"],
                           "Metadata_pert_iname": ["DMSO", "DMSO", "x"]})
    st = EmbeddingStore(np.stack([c1, c2, t]), fields, "m", normalize=False)
    c = control_centered(st).embeddings
    assert np.linalg.norm(c, axis=1) == pytest.approx([1, 1, 1], abs=1e-6)
    assert float(c[0] @ c[1]) == pytest.approx(-1.0, abs=1e-6)
    assert more_like_this(st, 0, top_k=3)["row"].tolist() == [0, 2, 1]


def test_the_centred_store_keeps_checkpoint_level_and_provenance():
    st = _store()
    centred = control_centered(st)
    assert centred.model_id == "ckpt-1" and centred.level == "field"
    assert centred.info == {"source": "unit test", "space": "control-centred"}
    assert st.info == {"source": "unit test"}  # the raw store's own provenance is untouched

    class OtherModel:
        _cellclip_id = "another-ckpt"

    with pytest.raises(QueryError, match="different checkpoint"):  # still guarded in the centred space
        text_query(OtherModel(), centred, "cells treated with DMSO")
    wells = control_centered(st.well_level())
    assert wells.level == "well" and wells.model_id == "ckpt-1"
    assert wells.info["space"] == "control-centred" and wells.info["aggregated_from"] == "field"


def test_more_like_this_at_well_level_and_its_top_k():
    st = _store()
    wl = st.well_level()
    res = more_like_this(st, 4, top_k=4, level="well")  # plate P2's "a" well
    assert len(res) == 4 and res["row"].iloc[0] == 4 and res["score"].iloc[0] == pytest.approx(1.0)
    assert (res["Metadata_n_fields"] == 2).all()
    assert res[["Metadata_Plate", "Metadata_Well"]].iloc[0].tolist() == ["P2", "W01"]
    expected = _expected(wl) @ _expected(wl)[4]
    np.testing.assert_allclose(res["score"].iloc[1:], np.sort(np.delete(expected, 4))[::-1][:3], atol=1e-5)
    assert len(more_like_this(st, 3, top_k=2)) == 2
    assert len(more_like_this(st, 3, top_k=None)) == len(st)
    assert len(more_like_this(st, 4, top_k=None, level="well")) == 9
    with pytest.raises(QueryError, match=re.escape("row 18 is outside the store (0..17)")):
        more_like_this(st, 18)
