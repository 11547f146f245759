"""Zero-shot scoring and accuracy: defaults, prompts, the truth columns of wells whose true prompt is
missing or not offered, messages, and agreement with text search (issue 16)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.errors import QueryError
from napari_cellclip.search import text_query, zero_shot, zero_shot_accuracy, zero_shot_scores
from napari_cellclip.store import EmbeddingStore

E = 6
P = ["cells treated with DMSO", "cells treated with lonafarnib", "cells treated with orantinib"]


def _basis(i, n=E):
    v = np.zeros(n, np.float32)
    v[i] = 1.0
    return v


def _store(prompts=P, sites=3, seed=0, model_id="m-1"):
    """One well per entry of ``prompts`` (``sites`` fields each); well w's fields point near basis w."""
    rng = np.random.default_rng(seed)
    rows, emb = [], []
    for w, prompt in enumerate(prompts):
        for s in range(sites):
            rows.append({"Metadata_Plate": "SQ1", "Metadata_Well": f"A{w + 1:02d}", "Metadata_Site": s + 1,
                         "Metadata_prompt": prompt, "FileName_OrigDNA": f"{w}_{s}.png"})
            emb.append(_basis(w) + 0.05 * rng.normal(size=E))
    return EmbeddingStore(np.array(emb), pd.DataFrame(rows), model_id)


class FakeModel:
    """Stand-in for CellCLIP.encode_prompts: a fixed vector per prompt (basis j for P[j])."""

    training = False

    def __init__(self, table=None, model_id=None):
        self.table = table or {p: _basis(i) for i, p in enumerate(P)}
        self.calls = []
        if model_id is not None:
            self._cellclip_id = model_id

    def eval(self):
        return self

    def encode_prompts(self, texts, batch_size=64):
        import torch

        self.calls.append(list(texts))
        return torch.tensor(np.array([np.asarray(self.table[t], np.float32) * 2.0 for t in texts]))


# --------------------------------------------------------------------------- defaults
def test_zero_shot_scores_wells_by_default_and_fields_on_request():
    st, model = _store(), FakeModel()
    res = zero_shot_scores(model, st)
    assert res.level == "well" and len(res.table) == 3 and res.scores.shape == (3, 3)
    assert res.table["best_prompt"].tolist() == P
    assert res.table["Metadata_n_fields"].tolist() == [3, 3, 3]
    fres = zero_shot_scores(model, st, level="field")
    assert fres.level == "field" and len(fres.table) == 9
    assert fres.table["best_prompt"].tolist() == [p for p in P for _ in range(3)]


def test_zero_shot_passes_its_prompts_and_level_on():
    st, model = _store(), FakeModel()
    table = zero_shot(model, st, prompts=[P[1], P[2]], level="field")
    assert model.calls == [[P[1], P[2]]]
    assert len(table) == 9 and set(table["best_prompt"]) == {P[1], P[2]}


def test_one_prompt_given_as_a_string():
    st, model = _store(), FakeModel()
    res = zero_shot_scores(model, st, prompts=P[2])
    assert res.prompts == [P[2]] and model.calls == [[P[2]]]
    assert (res.table["best_prompt"] == P[2]).all()
    assert res.table["correct"].tolist() == [pd.NA, pd.NA, True]


def test_blank_store_prompts_are_not_scored():
    st = _store([P[0], "  ", P[1], ""])
    model = FakeModel()
    res = zero_shot_scores(model, st)
    assert res.prompts == [P[0], P[1]] and model.calls == [[P[0], P[1]]]


def test_a_store_of_one_well_can_be_scored():
    res = zero_shot_scores(FakeModel(), _store([P[1]], sites=1))
    assert res.table["best_prompt"].tolist() == [P[1]] and res.accuracy() == 1.0


# --------------------------------------------------------------------------- refusals
def test_zero_shot_refusals_say_why():
    st, model = _store(), FakeModel()
    empty = EmbeddingStore(np.zeros((0, E)), st.fields.iloc[:0], "m-1")
    with pytest.raises(QueryError, match="^nothing is embedded yet: the store is empty$"):
        zero_shot_scores(model, empty, level="field")
    for none in ([], ()):
        with pytest.raises(QueryError, match="^no prompts to score against$"):
            zero_shot_scores(model, st, prompts=none)
    with pytest.raises(QueryError, match="^no prompts to score against$"):
        zero_shot_scores(model, _store(["", " "]))
    st = _store()
    st.fields = st.fields.drop(columns="Metadata_prompt")
    with pytest.raises(QueryError, match="^no prompts given and the store has no Metadata_prompt column$"):
        zero_shot_scores(model, st)
    wide = FakeModel({p: _basis(i, E + 1) for i, p in enumerate(P)})
    with pytest.raises(QueryError, match="^text embeddings have 7 dimensions but the store has 6$"):
        zero_shot_scores(wide, _store())


def test_zero_shot_refuses_a_model_other_than_the_stores():
    st = _store(model_id="store-checkpoint-0123456789")
    model = FakeModel(model_id="model-checkpoint-abcdefghij")
    msg = ("the embeddings were computed with a different checkpoint than the loaded model "
           "(store store-checkp…, model model-checkp…); re-embed the plate with this model")
    with pytest.raises(QueryError, match=f"^{re.escape(msg)}$"):
        zero_shot_scores(model, st)
    with pytest.raises(QueryError, match=f"^{re.escape(msg)}$"):
        zero_shot(model, st)
    assert model.calls == []  # refused before running the text tower
    same = FakeModel(model_id="store-checkpoint-0123456789")
    assert len(zero_shot_scores(same, st).table) == 3  # its own checkpoint is fine


# --------------------------------------------------------------------------- the table
def test_wells_without_an_offered_true_prompt_have_no_truth():
    """A well whose Metadata_prompt is missing, or was not among the prompts, gets no true score,
    rank -1 and correct NA; the others their prompt's score and rank."""
    st = _store([P[0], P[1], P[2], None])
    model = FakeModel()
    res = zero_shot_scores(model, st, prompts=[P[1], P[0]], level="well")
    t = res.table
    assert list(t.columns) == ["row", "best_prompt", "best_score", "true_prompt_score", "true_prompt_rank",
                               "correct", "Metadata_Plate", "Metadata_Well", "Metadata_prompt", "Metadata_n_fields"]
    assert t["row"].tolist() == [0, 1, 2, 3]
    assert t["Metadata_Well"].tolist() == ["A01", "A02", "A03", "A04"]
    assert t["true_prompt_rank"].tolist() == [1, 1, -1, -1]
    assert t["correct"].dtype == "boolean" and t["correct"].tolist() == [True, True, pd.NA, pd.NA]
    assert t["true_prompt_score"].dtype == np.float64
    assert t["true_prompt_score"].iloc[0] == res.scores[0, 1] and t["true_prompt_score"].iloc[1] == res.scores[1, 0]
    assert np.isnan(t["true_prompt_score"].iloc[2:]).all()
    np.testing.assert_array_equal(t["best_score"], res.scores.max(axis=1))
    assert res.accuracy() == 1.0


def test_true_prompt_rank_counts_the_prompts_scoring_higher():
    st = _store()
    # prompt j points away from well j and towards well j + 1: each well's own prompt scores last
    model = FakeModel({p: _basis((j + 1) % 3) - _basis(j) for j, p in enumerate(P)})
    t = zero_shot(model, st)
    assert t["best_prompt"].tolist() == [P[2], P[0], P[1]]
    assert t["true_prompt_rank"].tolist() == [3, 3, 3] and not t["correct"].any()
    assert zero_shot_accuracy(t) == 0.0


def test_score_frame_holds_every_prompts_score():
    st, model = _store(), FakeModel()
    res = zero_shot_scores(model, st, prompts=[P[2], P[0]])
    frame = res.score_frame()
    assert list(frame.columns) == [P[2], P[0]] and frame.index.tolist() == res.table.index.tolist()
    np.testing.assert_array_equal(frame.to_numpy(), res.scores)
    assert frame[P[2]].idxmax() == 2 and frame[P[0]].idxmax() == 0


def test_zero_shot_and_text_search_report_the_same_cosine():
    """The same well and prompt score the same in the zero-shot table and a text search: the vectors
    below make the float32 cosine exactly 1.0 in any summation order (their float64 one is 1 + 2**-24)."""
    v = np.zeros(E, np.float32)
    v[0], v[1] = 1.0, 2.0 ** -12
    emb = np.stack([v, _basis(2), _basis(3)])
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A02", "A03"],
                           "Metadata_prompt": [P[0], P[1], P[2]]})
    st = EmbeddingStore(emb, fields, "m-1", level="well", normalize=False)
    model = FakeModel({P[0]: v, P[1]: _basis(2), P[2]: _basis(3)})
    zs = zero_shot_scores(model, st)
    hit = text_query(model, st, P[0], top_k=1, level="well")
    assert hit["row"].tolist() == [0]
    assert zs.table["best_score"].iloc[0] == hit["score"].iloc[0] == 1.0


# --------------------------------------------------------------------------- accuracy
def test_accuracy_of_a_table_without_a_correct_column():
    """E.g. a table assembled elsewhere: best_prompt against Metadata_prompt."""
    t = pd.DataFrame({"best_prompt": ["a", "b", "c", "d"], "Metadata_prompt": ["a", "x", "c", "y"]})
    assert zero_shot_accuracy(t) == 0.5
    assert zero_shot_accuracy(t.iloc[[1]]) == 0.0
    assert zero_shot_accuracy(t.iloc[[0]]) == 1.0
    msg = "^accuracy needs Metadata_prompt \\(the true prompt\\) in the table$"
    for cols in (["best_prompt"], ["Metadata_prompt"], []):
        with pytest.raises(QueryError, match=msg):
            zero_shot_accuracy(t[cols])


def test_accuracy_ignores_rows_without_truth_and_needs_one():
    t = pd.DataFrame({"correct": pd.array([pd.NA, False, pd.NA], dtype="boolean")})
    assert zero_shot_accuracy(t) == 0.0  # one scorable row, wrong
    t = pd.DataFrame({"correct": pd.array([pd.NA, True], dtype="boolean")})
    assert zero_shot_accuracy(t) == 1.0
    with pytest.raises(QueryError, match="^no row's true prompt was among the scored prompts$"):
        zero_shot_accuracy(pd.DataFrame({"correct": pd.array([pd.NA, pd.NA], dtype="boolean")}))
