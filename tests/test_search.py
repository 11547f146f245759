"""Ranking, image / text queries, zero-shot scoring and CSV export on synthetic embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.errors import QueryError
from napari_cellclip.search import (
    ExactSearcher,
    export_csv,
    get_searcher,
    image_query,
    rank,
    read_csv,
    text_query,
    zero_shot,
    zero_shot_accuracy,
    zero_shot_scores,
)
from napari_cellclip.store import EmbeddingStore

E = 6
PROMPTS = ["cells treated with DMSO", "cells treated with lonafarnib", "cells treated with orantinib"]


def _basis(i):
    v = np.zeros(E, np.float32)
    v[i] = 1.0
    return v


def _store(noise=0.05, seed=0):
    """3 wells x 3 sites; well w's fields point near basis vector w."""
    rng = np.random.default_rng(seed)
    rows, emb = [], []
    for w, (well, name) in enumerate([("A01", "DMSO"), ("P13", "lonafarnib"), ("A13", "orantinib")]):
        for s in (1, 2, 3):
            rows.append({"Metadata_Plate": "SQ1", "Metadata_Well": well, "Metadata_Site": s,
                         "Metadata_pert_iname": name, "Metadata_moa": "" if w == 0 else "x inhibitor",
                         "Metadata_prompt": PROMPTS[w], "FileName_OrigDNA": f"{well}_{s}.png"})
            emb.append(_basis(w) + noise * rng.normal(size=E))
    return EmbeddingStore(np.array(emb), pd.DataFrame(rows), "m-1")


class FakeModel:
    """Stand-in for CellCLIP.encode_prompts: prompt j → basis vector j."""

    training = False

    def __init__(self, table=None):
        self.table = table or {p: _basis(i) for i, p in enumerate(PROMPTS)}
        self.calls = []

    def eval(self):
        return self

    def encode_prompts(self, texts, batch_size=64):
        import torch

        self.calls.append(list(texts))
        out = []
        for t in texts:
            if len(t.split()) > 20:
                raise QueryError("prompt longer than the context length")
            out.append(self.table.get(t, np.ones(E, np.float32)) * 3.0)  # un-normalised
        return torch.tensor(np.array(out))


def test_rank_orders_by_cosine_and_respects_top_k():
    st = _store()
    res = rank(st, _basis(1) * 7, top_k=4)
    assert list(res.columns[:3]) == ["rank", "score", "row"]
    assert list(res["rank"]) == [1, 2, 3, 4] and len(res) == 4
    assert (np.diff(res["score"].to_numpy()) <= 0).all()
    assert set(res["row"][:3]) == {3, 4, 5}
    assert (res["Metadata_pert_iname"][:3] == "lonafarnib").all()
    expected = st.embeddings @ _basis(1)
    np.testing.assert_allclose(res["score"], np.sort(expected)[::-1][:4], rtol=1e-5)
    assert "FileName_OrigDNA" not in res.columns and "Metadata_Site" in res.columns
    assert len(rank(st, _basis(0), top_k=100)) == 9  # clipped
    assert len(rank(st, _basis(0), top_k=None)) == 9


def test_rank_well_level_and_query_stack():
    st = _store()
    res = rank(st, _basis(2), top_k=3, level="well")
    assert list(res["Metadata_Well"]) [0] == "A13" and len(res) == 3
    assert "Metadata_n_fields" in res.columns and "Metadata_Site" not in res.columns
    assert res["row"][0] == st.well_level().fields.index[st.well_level().fields.Metadata_Well == "A13"][0]
    # a (Q, E) stack is ensembled: mean of the unit queries
    both = rank(st, np.stack([_basis(1), _basis(2)]), top_k=6)
    assert set(both["Metadata_Well"]) == {"P13", "A13"}


def test_rank_errors():
    st = _store()
    with pytest.raises(QueryError, match="dimensions"):
        rank(st, np.ones(E + 1))
    with pytest.raises(QueryError, match="all zeros"):
        rank(st, np.zeros(E))
    with pytest.raises(QueryError, match="NaN"):
        rank(st, np.full(E, np.nan))
    with pytest.raises(QueryError, match="top_k"):
        rank(st, _basis(0), top_k=0)
    with pytest.raises(QueryError, match="level"):
        rank(st, _basis(0), level="plate")
    with pytest.raises(QueryError, match="field-level"):
        rank(st.well_level(), _basis(0), level="field")


def test_exact_searcher_ties_break_by_row():
    emb = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    scores, rows = ExactSearcher(emb).search(np.array([[1.0, 0.0]]), 2)
    assert rows.tolist() == [[0, 2]] and scores.tolist() == [[1.0, 1.0]]
    st = _store()
    assert get_searcher(st) is get_searcher(st)


def test_image_query_returns_itself_first():
    st = _store()
    for row in (0, 4, 8):
        res = image_query(st, row, top_k=3)
        assert res["row"][0] == row and res["rank"][0] == 1
        assert res["score"][0] == pytest.approx(1.0, abs=1e-5)
        assert res["Metadata_Well"][1] == st.fields["Metadata_Well"][row]  # same well next
    # duplicated vectors: the queried one is still first
    dup = EmbeddingStore(np.ones((3, 4)), _store().fields.iloc[:3], "m")
    assert image_query(dup, 2, top_k=3)["row"].tolist() == [2, 0, 1]
    assert 4 not in image_query(st, 4, top_k=3, exclude_self=True)["row"].tolist()
    wl = image_query(st, 1, top_k=2, level="well")
    assert wl["row"][0] == 1
    with pytest.raises(QueryError, match="outside"):
        image_query(st, 9)


def test_text_query_uses_the_model():
    st, model = _store(), FakeModel()
    res = text_query(model, st, PROMPTS[2], top_k=3)
    assert model.calls == [[PROMPTS[2]]]
    assert (res["Metadata_pert_iname"] == "orantinib").all()
    assert res["score"][0] == pytest.approx(float(st.embeddings[res["row"][0]] @ _basis(2)), rel=1e-5)
    for bad in ("", "   "):
        with pytest.raises(QueryError, match="empty"):
            text_query(model, st, bad)
    with pytest.raises(QueryError, match="longer"):
        text_query(model, st, "word " * 30)


def test_text_query_refuses_other_checkpoint():
    st, model = _store(), FakeModel()
    model._cellclip_id = "another-model"
    with pytest.raises(QueryError, match="different checkpoint"):
        text_query(model, st, PROMPTS[0])


def test_zero_shot_wells_and_fields():
    st, model = _store(), FakeModel()
    table = zero_shot(model, st)  # prompts default to the store's Metadata_prompt values
    assert len(table) == 3 and list(table["Metadata_Well"]) == ["A01", "A13", "P13"]  # sorted
    assert list(table["best_prompt"]) == list(table["Metadata_prompt"])
    assert table["correct"].all() and zero_shot_accuracy(table) == 1.0
    assert (table["true_prompt_rank"] == 1).all()
    assert {"row", "best_score", "Metadata_Well", "Metadata_n_fields"} <= set(table.columns)

    res = zero_shot_scores(model, st, prompts=[PROMPTS[1], PROMPTS[0], PROMPTS[1]], level="field")
    assert res.prompts == [PROMPTS[1], PROMPTS[0]] and res.scores.shape == (9, 2)
    np.testing.assert_allclose(res.scores[:, 1], st.embeddings @ _basis(0), rtol=1e-5)
    np.testing.assert_allclose(res.table["best_score"], res.scores.max(axis=1))
    # orantinib wells' true prompt was not offered: ignored by the accuracy
    assert res.table["correct"].isna().sum() == 3
    assert res.accuracy() == 1.0
    assert list(res.score_frame().columns) == res.prompts


def test_zero_shot_wrong_predictions_counted():
    st = _store()
    swapped = FakeModel({PROMPTS[0]: _basis(1), PROMPTS[1]: _basis(0), PROMPTS[2]: _basis(2)})
    table = zero_shot(swapped, st)
    assert zero_shot_accuracy(table) == pytest.approx(1 / 3)
    assert list(table["true_prompt_rank"]) == [2, 1, 2]  # A01, A13, P13


def test_zero_shot_without_prompts():
    st = _store()
    st.fields = st.fields.drop(columns="Metadata_prompt")
    with pytest.raises(QueryError, match="Metadata_prompt"):
        zero_shot(FakeModel(), st)


def test_export_csv_round_trip(tmp_path):
    st = _store()
    res = rank(st, _basis(0), top_k=9)
    res["Metadata_dose"] = [np.nan] + [10.0] * 8
    res["Metadata_is_control"] = [True] * 3 + [False] * 6
    path = export_csv(res, tmp_path / "out" / "hits.csv")
    back = read_csv(path)
    pd.testing.assert_frame_equal(back, res, check_dtype=False)
    assert back["Metadata_moa"][0] == "" and np.isnan(back["Metadata_dose"][0])
    assert back["rank"].dtype.kind == "i" and back["Metadata_is_control"].dtype == bool


def test_more_like_this_compares_changes_from_the_plate_controls():
    """Raw embeddings sharing one large direction all score ~1 with each other; centred on each
    plate's DMSO mean, the same phenotype ranks first and the scores spread out."""
    from napari_cellclip.search import control_centered, more_like_this

    rng = np.random.default_rng(0)
    common = np.zeros(16)
    common[0] = 10.0
    effect = {"DMSO": np.zeros(16), "a": np.eye(16)[1], "b": np.eye(16)[2]}
    rows, emb = [], []
    for plate, shift in (("P1", np.eye(16)[3] * 2.0), ("P2", -np.eye(16)[3] * 2.0)):  # a plate effect
        for pert in ("DMSO", "DMSO", "a", "a", "b", "b"):
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"{pert}{len(rows)}", "Metadata_pert_iname": pert})
            emb.append(common + shift + effect[pert] + 0.05 * rng.normal(size=16))
    store = EmbeddingStore(np.array(emb), pd.DataFrame(rows), "m")
    raw = store.embeddings @ store.embeddings[2]
    assert raw.min() > 0.9  # raw cosines hide the difference
    centred = control_centered(store)
    for plate in ("P1", "P2"):
        ctrl = (store.fields["Metadata_Plate"] == plate) & (store.fields["Metadata_pert_iname"] == "DMSO")
        assert centred.embeddings[ctrl.to_numpy()].shape[0] == 2
    res = more_like_this(store, 2, top_k=None)  # an "a" field of plate P1
    assert res["row"].iloc[0] == 2 and res["score"].iloc[0] == pytest.approx(1.0)
    assert set(res["Metadata_pert_iname"].iloc[1:4]) == {"a"}  # the other "a" fields, on both plates
    assert res.loc[res["Metadata_pert_iname"] == "a", "score"].iloc[1:].min() > 0.8
    assert res.loc[res["Metadata_pert_iname"] == "b", "score"].max() < 0.3
    assert control_centered(store) is centred  # cached
