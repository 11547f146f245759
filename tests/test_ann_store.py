"""Which searcher a large store gets (issue 16): without faiss, in memory, with ``save=False``,
with a stale index in its folder -- and what the user is told."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from napari_cellclip import ann, search
from napari_cellclip.errors import CellClipError, CellClipWarning
from napari_cellclip.store import EmbeddingStore

pytest.importorskip("faiss")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(n=1200, seed=41):
    x = _unit(np.random.default_rng(seed).standard_normal((n, 12)))
    fields = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"A{i % 24 + 1:02d}" for i in range(n)],
                           "Metadata_Site": np.arange(n) // 24})
    return EmbeddingStore(x, fields, "m", normalize=False)


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(ann, "ANN_THRESHOLD", 1000)


def _points_here(w):
    """A warning points at the line in this test that called the library, not into it."""
    return w.filename == __file__


def test_without_faiss_large_stores_are_searched_exactly_with_one_warning(monkeypatch, tmp_path, without_faiss):
    monkeypatch.setattr(ann, "_WARNED_NO_FAISS", False)
    assert ann.faiss_available() is False
    with pytest.raises(CellClipError, match=r"^the ANN index needs faiss, which is not installed \(No module named "
                                            r"'faiss'\): pip install 'napari-cellclip\[ann\]' \(faiss-cpu\)"):
        ann.build_index(np.eye(4, dtype=np.float32))
    st = _store()
    with pytest.warns(CellClipWarning) as rec:
        s = search.get_searcher(st)
    assert [str(w.message) for w in rec] == [
        f"faiss is not installed: searching large stores exactly (slower); {ann.FAISS_HINT}"]
    assert _points_here(rec[0])
    assert isinstance(s, search.ExactSearcher)
    assert search.rank(st, st.embeddings[77], top_k=1)["row"].tolist() == [77]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(search.get_searcher(_store(seed=42)), search.ExactSearcher)  # said once is enough


def test_in_memory_store_gets_an_index_and_nothing_is_written(tmp_path):
    st = _store()
    assert st.path is None
    s = ann.searcher_for_store(st)
    assert isinstance(s, ann.AnnIndex) and len(s) == len(st)
    assert s.search(st.embeddings[[5]], 3)[1][0, 0] == 5


def test_save_false_leaves_the_store_folder_alone(tmp_path):
    _store().save(tmp_path / "s")
    st = EmbeddingStore.load(tmp_path / "s")
    s = ann.searcher_for_store(st, save=False)
    assert isinstance(s, ann.AnnIndex)
    assert not (tmp_path / "s" / ann.INDEX_FILE).exists() and not (tmp_path / "s" / ann.META_FILE).exists()
    ann.searcher_for_store(st)  # the default saves it
    assert (tmp_path / "s" / ann.INDEX_FILE).is_file() and (tmp_path / "s" / ann.META_FILE).is_file()


def test_stale_index_is_rebuilt_with_a_warning(tmp_path):
    _store().save(tmp_path / "old")
    ann.searcher_for_store(EmbeddingStore.load(tmp_path / "old"))  # built and saved for these embeddings
    _store(seed=43).save(tmp_path / "s")  # other embeddings of the same shape ...
    for name in (ann.INDEX_FILE, ann.META_FILE):  # ... next to the old store's index
        shutil.copy(tmp_path / "old" / name, tmp_path / "s" / name)
    new = EmbeddingStore.load(tmp_path / "s")
    with pytest.warns(CellClipWarning) as rec:
        s = ann.searcher_for_store(new)
    msgs = [str(w.message) for w in rec]
    assert msgs == [f"{tmp_path / 's'}: the ANN index does not match these embeddings (stale); rebuild it; "
                    "rebuilding it"]
    assert _points_here(rec[0])
    assert s.meta["fingerprint"] == ann.fingerprint(new.embeddings)
    assert s.search(new.embeddings[[11]], 3)[1][0, 0] == 11
    again = ann.searcher_for_store(EmbeddingStore.load(tmp_path / "s"))  # the rebuilt one was saved
    assert again.meta["fingerprint"] == ann.fingerprint(new.embeddings)
