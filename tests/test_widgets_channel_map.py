"""The Search widget's channel map (Display tab): re-read an open plate whose stains are numbered or
misnamed, with the layers replaced, the shared fields table renamed and stale embeddings dropped;
a map that does not fit is refused and loses nothing."""

from __future__ import annotations

import numpy as np
import pytest

from _formats_data import sample_fields, write_phenix
from napari_cellclip.errors import CellClipWarning, PlateError
from napari_cellclip.plates import stains

STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]
MAP = "1=DNA,2=ER,3=RNA,4=AGP,5=Mito"


@pytest.fixture(scope="module")
def numbered_fields():
    return sample_fields()[:3]


@pytest.fixture()
def numbered_plate(tmp_path, numbered_fields):
    """A Phenix export whose files name no stain (no Index.xml, no channels.json): ch1…ch5."""
    return write_phenix(tmp_path, "zlib", fields=numbered_fields, names=None)


@pytest.fixture()
def opened(make_napari_viewer, numbered_plate, cellclip_env, notes):
    from napari_cellclip._widgets.search import SearchWidget

    viewer = make_napari_viewer()
    with pytest.warns(CellClipWarning, match="nothing names the stains"):
        viewer.open(str(numbered_plate), plugin="napari-cellclip")
    widget = SearchWidget(viewer)
    viewer.window.add_dock_widget(widget, name="CellCLIP search")
    return viewer, widget


def _names(viewer):
    return [ly.name for ly in viewer.layers]


def _reread(qtbot, w, channel_map=None):
    """Re-read as the widget does (in a thread) and wait until it is done; True if it read."""
    worker = w.reread_plate(channel_map)
    if worker is None:
        return False
    got = []
    worker.returned.connect(got.append)
    assert not w.reread_btn.isEnabled()  # one re-read at a time
    qtbot.waitUntil(w.reread_btn.isEnabled, timeout=60_000)
    return bool(got)


def _store_of(fields):
    from napari_cellclip.store import EmbeddingStore

    return EmbeddingStore(np.random.default_rng(0).normal(size=(len(fields), 8)), fields, "test-model")


def test_rereading_with_a_channel_map_names_the_stain_layers(opened, qtbot, notes):
    from qtpy.QtCore import Qt

    from napari_cellclip._reader import stain_colormap

    viewer, w = opened
    assert _names(viewer) == ["ch1", "ch2", "ch3", "ch4", "ch5"]
    assert "stains unnamed (ch1, ch2, ch3, ch4, ch5)" in w.plate_label.text()
    viewer.dims.set_current_step(0, 2)  # the third field on screen
    w.channel_map_edit.setText(MAP)
    qtbot.mouseClick(w.reread_btn, Qt.MouseButton.LeftButton)
    assert "Re-reading SQ00015198" in w.status_label.text()
    qtbot.waitUntil(lambda: _names(viewer) == STAINS, timeout=60_000)
    qtbot.waitUntil(w.reread_btn.isEnabled)
    assert not notes["error"] and not notes["warning"], notes  # named now: no "nothing names the stains"
    assert "Re-reading" not in w.status_label.text()
    assert _names(viewer) == STAINS
    assert viewer.layers["DNA"].colormap.name == stain_colormap("DNA").name  # the reader's styling
    assert viewer.dims.current_step[0] == 2  # the same field stays on screen
    assert stains(w.state.fields) == STAINS and "FileName_OrigDNA" in w.state.fields.columns
    assert w.state.fields["FileName_OrigDNA"].str.contains("-ch1sk").all()
    assert w.state.fields["FileName_OrigMito"].str.contains("-ch5sk").all()
    assert "stains unnamed" not in w.plate_label.text()
    assert [w.stain_combo.itemText(i) for i in range(w.stain_combo.count())] == STAINS
    assert any("DNA, ER, RNA, AGP, Mito" in m for m in notes["info"])


@pytest.mark.parametrize("bad, says", [
    ("1=DNA,2=ER", "no stain for channel"),  # the plate has five channels
    ("1=DNA,2=DNA,3=RNA,4=AGP,5=Mito", "same stain"),
    ("DNA,ER,RNA,AGP,Mito", "cannot read channel map entry"),
    ("missing_channels.json", "not found"),
])
def test_a_channel_map_that_does_not_fit_is_refused_and_loses_nothing(opened, qtbot, notes, bad, says):
    viewer, w = opened
    layers, fields = list(viewer.layers), w.state.fields
    store = w.state.store = _store_of(fields)
    w.channel_map_edit.setText(bad)
    w.channel_map_edit.returnPressed.emit()  # Enter in the box re-reads too
    qtbot.waitUntil(lambda: bool(notes["error"]), timeout=60_000)
    qtbot.waitUntil(w.reread_btn.isEnabled)
    assert len(notes["error"]) == 1 and says in notes["error"][0], notes["error"]
    assert bad in notes["error"][0]  # the message shows what was typed
    assert list(viewer.layers) == layers and _names(viewer) == ["ch1", "ch2", "ch3", "ch4", "ch5"]
    assert w.state.fields is fields and w.state.store is store


def test_renamed_stains_drop_the_embeddings_of_the_old_names(opened, qtbot, notes):
    viewer, w = opened
    w.state.store = _store_of(w.state.fields)
    w.state.results = w.state.store.fields.assign(rank=1, score=0.5, store_row=range(len(w.state.store)))
    assert _reread(qtbot, w, MAP)
    assert w.state.store is None and w.state.results is None
    assert not w.search_btn.isEnabled() and "embed the plate again" in w.status_label.text()
    same = _store_of(w.state.fields)  # embedded with the new names: the same map again keeps it
    w.state.store = same
    assert _reread(qtbot, w, MAP) and w.state.store is same


def test_a_channel_map_file_beside_the_plate(opened, numbered_plate, qtbot, notes):
    viewer, w = opened
    (numbered_plate / "stains.txt").write_text("# ch = stain\n1=DNA\n2=ER\n3=RNA\n4=AGP\n5=Mito\n")
    assert _reread(qtbot, w, "stains.txt"), notes["error"]  # named relative to the plate folder
    assert _names(viewer) == STAINS
    assert any("stains from the channel map" in m and "stains.txt" in m for m in notes["warning"])
    (numbered_plate / "channels.json").write_text('{"1": "Mito", "2": "AGP", "3": "RNA", "4": "ER", "5": "DNA"}')
    assert _reread(qtbot, w, ""), notes["error"]  # empty box: the channels.json beside the plate
    assert _names(viewer) == STAINS[::-1]
    assert any("channels.json: ch1 → Mito" in m for m in notes["warning"])


def test_nothing_to_reread_without_a_plate(make_napari_viewer, cellclip_env, notes):
    from napari_cellclip._widgets.search import SearchWidget

    w = SearchWidget(make_napari_viewer())
    assert not w.reread_plate(MAP)
    assert notes["error"] and "open a plate folder" in notes["error"][0]


def test_reader_strict_read_says_why(numbered_plate, tmp_path):
    from napari_cellclip._reader import read_fields

    assert read_fields(str(numbered_plate), channel_map="1=DNA") is None  # napari's reader never raises
    with pytest.raises(PlateError, match=r"no stain for channel\(s\) \[2, 3, 4, 5\]"):
        read_fields(str(numbered_plate), channel_map="1=DNA", strict=True)
    (tmp_path / "notes.md").write_text("not a plate")
    with pytest.raises(PlateError, match="no plate napari-cellclip can read"):
        read_fields(str(tmp_path / "notes.md"), strict=True)


def test_the_gui_keeps_turning_while_a_plate_is_re_read(opened, qtbot, notes, monkeypatch, loop_gaps):
    """A big plate takes seconds to re-read (the display contrast decodes a few full fields): that
    happens off the GUI thread.  Here reading is made 1.5 s slow; the event loop must not stop."""
    import time

    from napari_cellclip import _reader

    viewer, w = opened
    slow, done = _reader._display_sample, []

    def slow_sample(*args, **kwargs):
        time.sleep(1.5)  # as slow decoding: the GIL is free
        out = slow(*args, **kwargs)
        done.append(time.perf_counter())
        return out

    monkeypatch.setattr(_reader, "_display_sample", slow_sample)
    loop_gaps.start()
    assert _reread(qtbot, w, MAP)
    loop_gaps.stop()
    assert _names(viewer) == STAINS and len(done) == 1
    # until the read returned (adding the layers after is napari's own work on the GUI thread)
    assert loop_gaps.max_ms_until(done[0]) <= 100, loop_gaps.summary()
