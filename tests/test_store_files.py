"""The store on disk: what StoreWriter writes, what EmbeddingStore.load refuses and with which
message, memory-mapped loading, model-pooled wells surviving a round trip, has_store_files /
remove_store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.store import (
    EmbeddingStore,
    StoreError,
    StoreWriter,
    has_store_files,
    l2_normalize,
    remove_store,
    well_groups,
)


def _fields(n_wells=3, sites=2):
    return pd.DataFrame({
        "Metadata_Plate": "P1",
        "Metadata_Well": [f"A{w + 1:02d}" for w in range(n_wells) for _ in range(sites)],
        "Metadata_Site": [s + 1 for _ in range(n_wells) for s in range(sites)],
    })


def _unit(n, dim=4, seed=0):
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, dim)))


def _with_model_wells(seed=0):
    """A field store carrying wells 'pooled by the model' (vectors unrelated to the field means)."""
    f = _fields()
    _, table, _ = well_groups(f)
    wells = EmbeddingStore(_unit(len(table), seed=seed + 100), table, "m1", level="well",
                           info={"well_pooling": "model"})
    return EmbeddingStore(_unit(len(f), seed=seed), f, "m1", wells=wells)


def _meta(folder):
    return json.loads((folder / "store.json").read_text())


def _edit_meta(folder, drop=(), **changes):
    meta = {k: v for k, v in _meta(folder).items() if k not in drop}
    meta.update(changes)
    (folder / "store.json").write_text(json.dumps(meta))


def _write_raw(folder, emb, fields=None, **writer_kw):
    """A store whose rows are written as given (StoreWriter does not normalise)."""
    emb = np.asarray(emb, np.float32)
    fields = _fields(len(emb), 1) if fields is None else fields
    with StoreWriter(folder, len(emb), emb.shape[1], "m", **writer_kw) as w:
        w.write(0, emb)
        w.finish(fields)
    return folder


# ------------------------------------------------------------------ what is written
def test_store_json_records_the_format_level_and_the_writers_info(tmp_path):
    from pathlib import Path

    with StoreWriter(tmp_path / "s", 2, 4, "model-x", level="well",
                     info={"encoder": "cnn", "source": Path("/data/plate1"), "n_embedded": 0}) as w:
        w.write(0, _unit(2))
        w.finish(_fields(2, 1), info={"n_embedded": 2, "skipped": [[5, "bad.tif"]]})
    meta = _meta(tmp_path / "s")
    assert meta["format"] == "napari-cellclip-embedding-store" and meta["version"] == 1
    assert meta["level"] == "well" and meta["model_id"] == "model-x" and (meta["n"], meta["dim"]) == (2, 4)
    # the writer's info and finish()'s info are both kept, finish() winning; paths become text
    assert meta["info"] == {"encoder": "cnn", "source": "/data/plate1", "n_embedded": 2,
                            "skipped": [[5, "bad.tif"]]}
    back = EmbeddingStore.load(tmp_path / "s")
    assert back.level == "well" and back.info["source"] == "/data/plate1"


def test_writer_defaults_make_a_field_store_without_model_id_in_a_new_nested_folder(tmp_path):
    folder = tmp_path / "a" / "b" / "store"  # parents do not exist yet
    with StoreWriter(folder, 3, 4) as w:
        w.write(0, _unit(3))
        w.finish(_fields(3, 1))
    back = EmbeddingStore.load(folder)
    assert back.level == "field" and back.model_id == ""
    assert np.load(folder / "embeddings.npy").dtype == np.float32  # the format holds float32


def test_rows_can_be_streamed_in_pieces(tmp_path):
    emb = _unit(5)
    with StoreWriter(tmp_path / "s", 5, 4, "m") as w:
        w.write(3, emb[3:])
        w.write(0, emb[:3])
        w.finish(_fields(5, 1))
    np.testing.assert_array_equal(EmbeddingStore.load(tmp_path / "s").embeddings, emb)


def test_finish_refuses_a_fields_table_of_another_length_and_publishes_nothing(tmp_path):
    with pytest.raises(StoreError, match="^3 embeddings but 2 rows in the fields table$"):
        with StoreWriter(tmp_path / "s", 3, 4, "m") as w:
            w.write(0, _unit(3))
            w.finish(_fields(2, 1))
    assert not EmbeddingStore.exists(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []  # the partial embeddings are gone


def test_an_error_while_writing_propagates_and_leaves_no_partial_store(tmp_path):
    folder = _with_model_wells().save(tmp_path / "s")  # an older complete store in the folder
    with pytest.raises(RuntimeError, match="encoder crashed"):
        with StoreWriter(folder, 6, 4, "m2") as w:
            w.write(0, _unit(3))
            raise RuntimeError("encoder crashed")
    assert not EmbeddingStore.exists(folder)  # the old store.json is gone: not mistaken for complete
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_fields_parquet_holds_exactly_the_table_columns(tmp_path):
    import pyarrow.parquet as pq

    f = _fields(2, 1)
    f.index = [10, 20]  # a table selected from a bigger one
    _write_raw(tmp_path / "s", _unit(2), f)
    assert pq.read_schema(tmp_path / "s" / "fields.parquet").names == list(f.columns)  # no index column
    assert list(EmbeddingStore.load(tmp_path / "s").fields.index) == [0, 1]


def test_a_writer_over_an_older_store_does_not_inherit_its_wells(tmp_path):
    """A store written without model wells into a folder that held one with wells: the old
    wells (other rows, another model) must not be attached to the new fields on load."""
    folder = _with_model_wells().save(tmp_path / "s")
    assert EmbeddingStore.load(folder).has_model_wells
    new = _unit(6, seed=7)
    _write_raw(folder, new, _fields())
    back = EmbeddingStore.load(folder)
    assert not back.has_model_wells
    m = new[0:2].mean(axis=0)
    np.testing.assert_allclose(back.well_level().embeddings[0], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)


def test_a_well_store_written_over_a_field_store_ignores_its_wells_folder(tmp_path):
    folder = _with_model_wells().save(tmp_path / "s")
    with StoreWriter(folder, 3, 4, "m", level="well") as w:  # a well-level store, not via save()
        w.write(0, _unit(3))
        w.finish(well_groups(_fields())[1])
    _with_model_wells().well_level().save(folder / "wells")  # whatever lies there
    back = EmbeddingStore.load(folder)
    assert back.level == "well" and len(back) == 3


# ------------------------------------------------------------------ round trips
def test_model_pooled_wells_survive_save_and_load(tmp_path):
    st = _with_model_wells()
    out = st.save(tmp_path / "s")
    assert (out / "wells" / "store.json").is_file()
    for mmap in (False, True):
        back = EmbeddingStore.load(out, mmap=mmap)
        assert back.has_model_wells and back.path == out
        np.testing.assert_array_equal(back.well_level().embeddings, st.well_level().embeddings)
        assert back.well_level().path == out / "wells"


def test_mean_wells_are_not_stored(tmp_path):
    st = EmbeddingStore(_unit(6), _fields(), "m")
    st.well_level()  # computed and cached, but only model-pooled wells belong in the folder
    out = st.save(tmp_path / "s")
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "fields.parquet", "store.json"]


def test_a_well_level_store_round_trips_as_well_level(tmp_path):
    wl = EmbeddingStore(_unit(6), _fields(), "m", info={"encoder": "cnn"}).well_level()
    back = EmbeddingStore.load(wl.save(tmp_path / "w"))
    assert back.level == "well" and back.model_id == "m"
    assert back.info == {"encoder": "cnn", "aggregated_from": "field", "well_pooling": "mean"}
    np.testing.assert_array_equal(back.embeddings, wl.embeddings)


def test_store_json_without_optional_keys_still_loads(tmp_path):
    """An older store.json (no version, level or model_id) with model wells: a field store."""
    folder = _with_model_wells().save(tmp_path / "s")
    _edit_meta(folder, drop=("version", "level", "model_id", "checksums"))
    back = EmbeddingStore.load(folder)
    assert back.level == "field" and back.model_id == "" and back.has_model_wells


def test_mmap_loading_maps_the_file_read_only_and_plain_loading_reads_it(tmp_path):
    folder = _with_model_wells().save(tmp_path / "s")
    plain, mapped = EmbeddingStore.load(folder), EmbeddingStore.load(folder, mmap=True)
    assert plain.embeddings.flags.writeable and plain.well_level().embeddings.flags.writeable
    assert not mapped.embeddings.flags.writeable  # backed by the file, not a copy in memory
    assert not mapped.well_level().embeddings.flags.writeable
    np.testing.assert_array_equal(plain.embeddings, mapped.embeddings)
    # a store written by the streaming writer maps just the same (its file is float32)
    raw = EmbeddingStore.load(_write_raw(tmp_path / "r", _unit(3)), mmap=True)
    assert not raw.embeddings.flags.writeable


def test_in_memory_store_has_no_folder():
    assert EmbeddingStore(_unit(6), _fields(), "m").path is None


# ------------------------------------------------------------------ refused on load
def test_unreadable_or_foreign_store_json(tmp_path):
    folder = _write_raw(tmp_path / "s", _unit(2))
    (folder / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"store\.json: unreadable \("):
        EmbeddingStore.load(folder)
    (folder / "store.json").write_text(json.dumps({"format": "something-else", "n": 2}))
    with pytest.raises(StoreError, match=r"s/store\.json: not a napari-cellclip embedding store$"):
        EmbeddingStore.load(folder)


def test_a_newer_format_version_is_refused_with_upgrade_advice(tmp_path):
    folder = _write_raw(tmp_path / "s", _unit(2))
    _edit_meta(folder, version=2)
    with pytest.raises(StoreError, match=r"store format version 2 is newer than this napari-cellclip "
                                         r"understands \(1\); please upgrade"):
        EmbeddingStore.load(folder)


def test_unreadable_embeddings_or_fields_are_named(tmp_path):
    folder = _write_raw(tmp_path / "s", _unit(2))
    _edit_meta(folder, drop=("checksums",))  # as a store from before checksums
    (folder / "embeddings.npy").write_bytes(b"not an npy file")
    with pytest.raises(StoreError, match=r"embeddings\.npy: unreadable \("):
        EmbeddingStore.load(folder)
    folder = _write_raw(tmp_path / "t", _unit(2))
    _edit_meta(folder, drop=("checksums",))
    (folder / "fields.parquet").write_bytes(b"not parquet")
    with pytest.raises(StoreError, match=r"fields\.parquet: unreadable \("):
        EmbeddingStore.load(folder)


def test_pickled_embeddings_are_never_unpickled(tmp_path):
    folder = _write_raw(tmp_path / "s", _unit(2))
    _edit_meta(folder, drop=("checksums",))
    obj = np.empty((2, 4), dtype=object)
    obj[:] = _unit(2)
    np.save(folder / "embeddings.npy", obj, allow_pickle=True)
    with pytest.raises(StoreError, match=r"embeddings\.npy: unreadable \(.*pickle"):
        EmbeddingStore.load(folder)


def test_row_count_disagreements_are_inconsistent(tmp_path):
    folder = _write_raw(tmp_path / "s", _unit(3))
    _edit_meta(folder, n=7)
    with pytest.raises(StoreError, match=r"inconsistent store \(embeddings \(3, 4\), 3 field rows, store\.json n=7\)"):
        EmbeddingStore.load(folder)
    # fields table shorter than the embeddings, n agreeing with the embeddings
    folder = _write_raw(tmp_path / "t", _unit(3))
    _fields(2, 1).to_parquet(folder / "fields.parquet", index=False)
    _edit_meta(folder, drop=("checksums",))
    with pytest.raises(StoreError, match=r"inconsistent store \(embeddings \(3, 4\), 2 field rows, store\.json n=3\)"):
        EmbeddingStore.load(folder)
    # one-dimensional embeddings
    folder = _write_raw(tmp_path / "u", _unit(3))
    np.save(folder / "embeddings.npy", np.ones(3, np.float32))
    _edit_meta(folder, drop=("checksums",))
    with pytest.raises(StoreError, match="inconsistent store"):
        EmbeddingStore.load(folder)


def test_store_json_without_a_row_count_is_refused_even_for_one_row(tmp_path):
    folder = _write_raw(tmp_path / "s", _unit(1))
    _edit_meta(folder, drop=("n",))
    with pytest.raises(StoreError, match=r"inconsistent store .*store\.json n=None\)"):
        EmbeddingStore.load(folder)


# ------------------------------------------------------------------ unit-length rows
def _bad_rows_message(tmp_path, emb):
    folder = _write_raw(tmp_path / "s", emb)  # checksums match: only the row check can refuse it
    with pytest.raises(StoreError) as exc:
        EmbeddingStore.load(folder)
    return str(exc.value)


def test_a_single_long_row_is_named_with_its_position_and_length(tmp_path):
    emb = _unit(8)
    emb[5] *= 1.5
    msg = _bad_rows_message(tmp_path, emb)
    assert msg.startswith(f"{tmp_path / 's' / 'embeddings.npy'}: row 5 has length 1.5, not 1 (1 such rows from row 0)")
    assert msg.endswith("embed the plates again")


def test_the_first_row_and_nan_rows_are_checked(tmp_path):
    emb = _unit(4)
    emb[0] *= 1.01  # just beyond the tolerance
    assert "row 0 has length 1.01" in _bad_rows_message(tmp_path / "a", emb)
    emb = _unit(4)
    emb[2, 1] = np.nan
    assert "row 2 has length nan" in _bad_rows_message(tmp_path / "b", emb)


def test_rows_within_tolerance_and_zero_rows_load(tmp_path):
    emb = _unit(4)
    emb[1] *= 1.0005
    emb[3] = 0.0  # an all-zero row (a field with no signal) is allowed
    back = EmbeddingStore.load(_write_raw(tmp_path / "s", emb))
    np.testing.assert_array_equal(back.embeddings, emb)


def test_rows_no_longer_than_the_tolerance_count_as_zero_rows(tmp_path):
    emb = _unit(3)
    emb[1] = (np.float32(1e-3), 0, 0, 0)  # as short as the tolerance: a zero row up to rounding
    back = EmbeddingStore.load(_write_raw(tmp_path / "a", emb))
    np.testing.assert_array_equal(back.embeddings[1], emb[1])
    emb[1] = (np.float32(2e-3), 0, 0, 0)  # longer: neither zero nor unit
    assert "row 1 has length 0.002" in _bad_rows_message(tmp_path / "b", emb)


def test_rows_are_checked_beyond_the_first_chunks(tmp_path):
    """Large stores are checked in chunks of 65 536 rows: a bad row far down is still found."""
    n = 140_000
    emb = np.zeros((n, 2), np.float32)
    emb[:, 0] = 1.0
    emb[n - 1] = (3.0, 0.0)
    with StoreWriter(tmp_path / "s", n, 2, "m") as w:
        w.write(0, emb)
        w.finish(pd.DataFrame({"Metadata_Site": np.arange(n)}))
    with pytest.raises(StoreError, match=f"row {n - 1} has length 3, not 1 \\(1 such rows from row 131072\\)"):
        EmbeddingStore.load(tmp_path / "s", mmap=True)


def test_non_finite_values_far_down_a_large_array_are_refused():
    n = 140_000
    emb = np.zeros((n, 2), np.float32)
    emb[:, 0] = 1.0
    emb[n - 1, 1] = np.inf
    with pytest.raises(StoreError, match="^embeddings contain NaN or infinite values$"):
        EmbeddingStore(emb, pd.DataFrame({"Metadata_Site": np.arange(n)}), "m", normalize=False)


# ------------------------------------------------------------------ folder helpers
def test_has_store_files_sees_complete_and_incomplete_stores(tmp_path):
    assert not has_store_files(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    assert not has_store_files(tmp_path)
    (tmp_path / "embeddings.npy").write_bytes(b"")  # a writer that died before store.json
    assert has_store_files(tmp_path)
    (tmp_path / "embeddings.npy").unlink()
    (tmp_path / "store.json").write_text("{}")
    assert has_store_files(str(tmp_path))


def test_remove_store_removes_only_the_store_files(tmp_path):
    folder = _with_model_wells().save(tmp_path / "s")
    (folder / "run.log").write_text("keep me")
    remove_store(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["run.log"]
    remove_store(folder)  # nothing left to remove: no error
    (folder / "embeddings.npy").write_bytes(b"partial")  # an incomplete store, no wells
    remove_store(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["run.log"]


# ------------------------------------------------------------------ checksums
def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    # embeddings: the low byte of the last float (its row still unit length); fields: inside a page
    at = len(data) - 4 if path.name == "embeddings.npy" else len(data) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["embeddings.npy", "fields.parquet"])
def test_a_flipped_bit_is_refused_naming_the_file(tmp_path, name):
    folder = _write_raw(tmp_path / "s", _unit(4))
    assert set(_meta(folder)["checksums"]) == {"embeddings.npy", "fields.parquet"}
    _flip_a_bit(folder / name)
    for mmap in (False, True):
        with pytest.raises(StoreError, match=f"^{folder / name}: its contents do not match the checksum in "
                                             r"store\.json \(damaged or edited since it was written\); "
                                             "embed the plate again$"):
            EmbeddingStore.load(folder, mmap=mmap)


def test_each_file_is_checked_against_its_own_checksum(tmp_path):
    """A store.json with a checksum for the fields table only (the embeddings' one left out)."""
    folder = _write_raw(tmp_path / "s", _unit(4))
    sums = _meta(folder)["checksums"]
    _edit_meta(folder, checksums={"fields.parquet": sums["fields.parquet"]})
    EmbeddingStore.load(folder)  # intact: loads
    _flip_a_bit(folder / "fields.parquet")
    with pytest.raises(StoreError, match="fields.parquet: its contents do not match"):
        EmbeddingStore.load(folder)


def test_a_read_error_while_checking_is_a_store_error(tmp_path, monkeypatch):
    import napari_cellclip.store as store_mod

    folder = _write_raw(tmp_path / "s", _unit(4))

    def failing_digest(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_mod, "file_digest", failing_digest)  # a disk that fails while reading
    with pytest.raises(StoreError, match=f"^{folder / 'embeddings.npy'}: unreadable \\(.*Input/output error\\)$"):
        EmbeddingStore.load(folder)


# ------------------------------------------------------------------ finite values
def test_a_non_finite_first_row_is_refused():
    emb = _unit(3)
    emb[0, 2] = np.nan
    with pytest.raises(StoreError, match="NaN or infinite"):
        EmbeddingStore(emb, _fields(3, 1), "m", normalize=False)


def test_checking_a_large_store_for_finite_values_is_one_pass():
    """A million rows (as a memory-mapped store is loaded): chunks of rows, each row read once."""
    from napari_cellclip import store as store_mod

    class CountingRows:
        """An array stand-in that counts the rows handed out (a memmap reads what is sliced)."""

        def __init__(self, a):
            self.a, self.shape, self.rows_read = a, a.shape, 0

        def __getitem__(self, index):
            out = self.a[index]
            self.rows_read += len(out)
            return out

    n = 1_000_000
    emb = np.ones((n, 1), np.float32)
    rows = CountingRows(emb)
    assert store_mod._all_finite(rows) and rows.rows_read == n
    emb[n - 1, 0] = np.nan
    assert not store_mod._all_finite(CountingRows(emb))
    EmbeddingStore(np.ones((n, 1), np.float32), pd.DataFrame({"Metadata_Site": np.arange(n)}), "m",
                   normalize=False)
