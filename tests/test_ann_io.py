"""Saving and loading an ANN index (issue 16): what ann.json records, and what a broken,
partial or foreign folder gives (a CellClipError that says which)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_cellclip import ann
from napari_cellclip.errors import CellClipError

faiss = pytest.importorskip("faiss")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def saved(tmp_path):
    x = _unit(np.random.default_rng(31).standard_normal((1500, 12)))
    idx = ann.build_index(x, nlist=16, k=5, use_gpu=False)
    idx.save(tmp_path)
    return x, idx, tmp_path


def test_ann_json_records_the_index(saved):
    x, idx, folder = saved
    meta = json.loads((folder / ann.META_FILE).read_text())
    assert meta["format"] == "napari-cellclip-ann-v1"
    assert meta["kind"] == "IVFFlat-IP"
    assert (meta["n"], meta["dim"], meta["nlist"]) == (1500, 12, 16)
    assert meta["nprobe"] == idx.nprobe
    assert meta["calibration_k"] == 5 and meta["target_recall"] == ann.TARGET_RECALL
    assert 0.0 < meta["calibration_recall"] <= 1.0
    assert meta["n_train"] == 1500  # fewer rows than the sample size: all of them
    assert meta["fingerprint"] == ann.fingerprint(x)


def test_loaded_index_keeps_its_metadata(saved):
    x, idx, folder = saved
    loaded = ann.load_index(folder, embeddings=x, use_gpu=False)
    assert loaded.meta == json.loads((folder / ann.META_FILE).read_text())
    assert loaded.meta["calibration_recall"] == idx.meta["calibration_recall"]
    assert (len(loaded), loaded.dim, loaded.nprobe) == (1500, 12, idx.nprobe)


@pytest.mark.parametrize("missing", [ann.INDEX_FILE, ann.META_FILE])
def test_half_an_index_is_no_index(saved, missing):
    _, _, folder = saved
    (folder / missing).unlink()
    with pytest.raises(CellClipError, match=rf"no ANN index here \({ann.INDEX_FILE} \+ {ann.META_FILE}\)$"):
        ann.load_index(folder)


def test_unreadable_ann_json(saved):
    _, _, folder = saved
    (folder / ann.META_FILE).write_text("{not json")
    with pytest.raises(CellClipError, match=r"ann\.json: unreadable \(Expecting property name"):
        ann.load_index(folder)


def test_foreign_ann_json(saved):
    _, _, folder = saved
    (folder / ann.META_FILE).write_text(json.dumps({"format": "someone-else", "nprobe": 3}))
    with pytest.raises(CellClipError, match=r"ann\.json: not a napari-cellclip ANN index$"):
        ann.load_index(folder)


@pytest.mark.parametrize("mmap", [True, False])
def test_corrupt_index_file(saved, mmap):
    _, _, folder = saved
    (folder / ann.INDEX_FILE).write_bytes(b"this is not a faiss index")
    with pytest.raises(CellClipError, match=r"ann\.faiss: cannot read ANN index \(.+\)"):
        ann.load_index(folder, mmap=mmap)


def test_ann_json_without_nprobe_probes_one_list(saved):
    """A hand-written ann.json without ``nprobe`` loads, with the cheapest setting (one list)."""
    x, _, folder = saved
    meta = json.loads((folder / ann.META_FILE).read_text())
    del meta["nprobe"]
    (folder / ann.META_FILE).write_text(json.dumps(meta))
    loaded = ann.load_index(folder, embeddings=x, use_gpu=False)
    assert loaded.nprobe == 1
    assert faiss.extract_index_ivf(loaded.index).nprobe == 1
    assert loaded.search(x[[9]], 3)[1][0, 0] == 9
