"""Channel numbers to stains on a real Harmony export: a channel map first, else the names the
plate carries through the dye vocabulary, else ch<n> — and the exact warning for every guess."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from napari_cellclip.errors import CellClipWarning, PlateError
from napari_cellclip.plates import read_plate, stains

HELP = ('Name them with a channel map: a channels.json beside the plate such as {"<n>": "DNA", "<m>": "ER", ...} '
        '(or channels.txt with one "<n>=<stain>" per line), or channel_map="<n>=DNA,<m>=ER,..." / --channel-map, '
        "using the channel numbers of your acquisition: the numbering differs between experiments and "
        "instruments.")


def _harmony(root: Path, names: dict[int, str] | None, channels=(1, 2, 3, 4)) -> Path:
    """One field of a Phenix export, ``root/PLATE/Images``, with an Index.xml naming ``names``."""
    images = root.resolve() / "PLATE" / "Images"
    images.mkdir(parents=True)
    for ch in channels:
        (images / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff").write_bytes(b"")
    if names is not None:
        entries = "".join(f'<Entry ChannelID="{i}"><ChannelName>{n}</ChannelName></Entry>' for i, n in names.items())
        (root.resolve() / "PLATE" / "Index.xml").write_text(
            f"<EvaluationInputData><Maps><Map>{entries}</Map></Maps></EvaluationInputData>")
    return images


def _read(path, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        df = read_plate(path, **kw)
    ours = [w for w in rec if issubclass(w.category, CellClipWarning)]
    # every warning points at the line that called read_plate, not into the readers
    assert [w.filename for w in ours] == [__file__] * len(ours)
    return df, [str(w.message) for w in ours]


def test_mapped_unknown_and_unnamed_channels_are_each_said(tmp_path):
    images = _harmony(tmp_path, {1: "HOECHST 33342", 2: "Alexa 488", 3: "Mito"})
    index = images.parent / "Index.xml"
    df, said = _read(tmp_path)
    assert stains(df) == ["DNA", "Alexa488", "Mito", "ch4"]
    assert said == [
        f"{images}: stains named from the Harmony index {index} by the dye vocabulary "
        "(napari_cellclip.formats.dyes): ch1 'HOECHST 33342' → DNA. A channel map overrides this.",
        f"{images}: ch2 'Alexa 488', ch4 (unnamed) from the Harmony index {index}: not a Cell Painting stain name, "
        "kept as Alexa488, ch4 (fluorophore and filter names are never guessed). " + HELP,
    ]
    assert df.attrs["stain_source"] == "folder"


def test_names_that_are_already_stains_are_taken_silently(tmp_path):
    _harmony(tmp_path, {1: "DNA", 2: "ER", 3: "RNA", 4: "Mito"})
    df, said = _read(tmp_path)
    assert stains(df) == ["DNA", "ER", "RNA", "Mito"] and said == []


def test_only_unknown_names_give_only_the_unknown_warning(tmp_path):
    images = _harmony(tmp_path, {1: "DNA", 2: "FITC"}, channels=(1, 2))
    df, said = _read(tmp_path)
    assert stains(df) == ["DNA", "FITC"]
    assert said == [f"{images}: ch2 'FITC' from the Harmony index {images.parent / 'Index.xml'}: not a Cell "
                    "Painting stain name, kept as FITC (fluorophore and filter names are never guessed). " + HELP]


@pytest.mark.parametrize("names", [{1: "Hoechst", 2: "DAPI"}, {1: "Alexa 488", 2: "Alexa-488"}])
def test_names_giving_two_channels_one_stain_keep_the_numbers(tmp_path, names):
    images = _harmony(tmp_path, names, channels=(1, 2))
    df, said = _read(tmp_path)
    assert stains(df) == ["ch1", "ch2"]
    listed = ", ".join(repr(n) for n in names.values())
    assert said == [f"{images}: the channel names from the Harmony index {images.parent / 'Index.xml'} "
                    f"({listed}) give two channels the same stain; channels are kept numbered."]


def test_empty_channel_names_count_as_no_name(tmp_path):
    images = _harmony(tmp_path, {1: " ", 2: ""}, channels=(1, 2))
    df, said = _read(tmp_path)
    assert stains(df) == ["ch1", "ch2"]
    assert said == [f"{images}: nothing names the stains (no LoadData CSV, Harmony index, OME channel names, "
                    "channels.json or dye names); channels are kept as ch1, ch2. " + HELP]


def test_nothing_names_the_stains(tmp_path):
    images = _harmony(tmp_path, None, channels=(3, 1))
    df, said = _read(tmp_path)
    assert stains(df) == ["ch1", "ch3"]
    assert said == [f"{images}: nothing names the stains (no LoadData CSV, Harmony index, OME channel names, "
                    "channels.json or dye names); channels are kept as ch1, ch3. " + HELP]


def test_a_channel_map_wins_over_names_and_is_not_warned_about(tmp_path):
    _harmony(tmp_path, {1: "HOECHST 33342", 2: "Alexa 488", 3: "Mito", 4: "WGA"})
    df, said = _read(tmp_path, channel_map="1=Mito,2=ER,3=DNA,4=AGP")
    assert stains(df) == ["Mito", "ER", "DNA", "AGP"] and said == []
    assert df["FileName_OrigDNA"].tolist() == ["r01c01f01p01-ch3sk1fk1fl1.tiff"]


def test_a_channel_map_file_found_beside_the_plate_is_said(tmp_path):
    images = _harmony(tmp_path, {1: "HOECHST 33342"}, channels=(2, 1))
    cfg = tmp_path.resolve() / "PLATE" / "channels.json"
    cfg.write_text(json.dumps({"2": "ER", "1": "DNA", "7": "Unused"}))
    df, said = _read(tmp_path / "PLATE")
    assert stains(df) == ["DNA", "ER"]
    assert said == [f"{images}: stains from the channel map {cfg}: ch1 → DNA, ch2 → ER, ch7 → Unused"]


def test_a_channel_map_missing_a_channel_is_refused(tmp_path):
    images = _harmony(tmp_path, None, channels=(1, 2, 3, 5))
    with pytest.raises(PlateError) as err:
        read_plate(tmp_path, channel_map="2=ER,1=DNA")
    assert str(err.value) == f"{images}: the channel map {{2: 'ER', 1: 'DNA'}} has no stain for channel(s) [3, 5]"


def test_an_empty_channel_map_means_no_map(tmp_path):
    _harmony(tmp_path, {1: "DNA", 2: "ER"}, channels=(1, 2))
    for empty in ("", {}, " , "):
        df, said = _read(tmp_path, channel_map=empty)
        assert stains(df) == ["DNA", "ER"] and said == []
