"""The ``cells`` encoder: feature list, per-field profiles, empty fields, identity, the
feature engine (cache, worker processes), ``morphology+cells`` and training on it."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from test_segmentation import CENTERS, STAINS, synthetic_field

from napari_cellclip.cellfeatures import (
    CHANNEL_FEATURES,
    FEATURE_NAMES,
    FIELD_FEATURES,
    SHAPE_FEATURES,
    VERSION,
    field_profile,
    measure_cells,
    profile_cell_counts,
)
from napari_cellclip.encoders import get_encoder
from napari_cellclip.encoders.cells import CellFieldPrep, CellsEncoder, field_profile_of
from napari_cellclip.errors import CellClipError, CellClipWarning
from napari_cellclip.segmentation import segment_field

D = 200


def _idx(name: str) -> int:
    return FEATURE_NAMES.index(name)


@pytest.fixture(scope="module")
def synthetic():
    raw = synthetic_field(CENTERS)
    seg = segment_field(raw, STAINS)
    from napari_cellclip.images import normalize

    return raw, seg, measure_cells(normalize(raw), seg, STAINS)


def test_feature_list_is_fixed_and_documented():
    assert len(FEATURE_NAMES) == D == 2 * len(CHANNEL_FEATURES) + 2 * len(SHAPE_FEATURES) + len(FIELD_FEATURES)
    assert len(set(FEATURE_NAMES)) == D
    assert (len(CHANNEL_FEATURES), len(SHAPE_FEATURES), len(FIELD_FEATURES)) == (76, 20, 8)
    # stable order: a few anchors of the layout the module doc describes
    assert FEATURE_NAMES[0] == "median.Nuclei_Intensity_MeanIntensity"
    assert FEATURE_NAMES[27] == "median.Nuclei_Texture_AngularSecondMoment_3"
    assert FEATURE_NAMES[66] == "median.Cells_Granularity_1"
    assert FEATURE_NAMES[76] == "mad.Nuclei_Intensity_MeanIntensity"
    assert FEATURE_NAMES[152] == "median.Nuclei_AreaShape_Area"
    assert FEATURE_NAMES[-8:] == tuple(f"field.{n}" for n in FIELD_FEATURES)
    enc = CellsEncoder()
    assert enc.dim == D and enc.feature_names == FEATURE_NAMES


def test_profile_shape_order_and_values(synthetic):
    _raw, seg, m = synthetic
    assert m.channel.shape == (len(CENTERS), 5, 76) and m.shape.shape == (len(CENTERS), 20)
    p = field_profile(m, seg)
    assert p.shape == (5, D) and p.dtype == np.float32 and np.isfinite(p).all()
    assert profile_cell_counts(p) == len(CENTERS)
    assert p[0, _idx("field.Empty")] == 0
    # shape and field-level numbers belong to no stain: the same in every channel
    common = slice(_idx("median.Nuclei_AreaShape_Area"), D)
    assert np.all(p[:, common] == p[0, common])
    # a stain correlates perfectly with itself: DNA's nucleus-stain slot, RNA's cell-stain slot
    assert p[0, _idx("median.Cells_Correlation_Pearson_NucleusStain")] == pytest.approx(np.arcsinh(1.0))
    assert p[2, _idx("median.Cells_Correlation_Pearson_CellStain")] == pytest.approx(np.arcsinh(1.0))
    # DNA is bright in nuclei, not in the cytoplasm; the cytoplasm stains are bright in both
    nuc, cyto = _idx("median.Nuclei_Intensity_MeanIntensity"), _idx("median.Cytoplasm_Intensity_MeanIntensity")
    assert p[0, nuc] > 5 * p[0, cyto] and p[3, cyto] > 0.5 * p[3, nuc]
    # median nucleus area ~ pi * 8^2 (the asinh of it)
    assert np.sinh(p[0, _idx("median.Nuclei_AreaShape_Area")]) == pytest.approx(np.pi * 64, rel=0.15)


def test_empty_field_gives_the_defined_vector_and_a_warning():
    raw = np.random.default_rng(0).poisson(200, (5, 96, 96)).astype(np.uint16)
    p = field_profile_of(raw, STAINS)
    assert p.shape == (5, D) and np.isfinite(p).all()
    assert profile_cell_counts(p) == 0
    assert np.all(p[:, _idx("field.Empty")] == np.float32(np.arcsinh(1.0)))
    others = np.ones(D, bool)
    others[[_idx("field.Empty"), _idx("field.Count_NucleiFound")]] = False
    assert np.all(p[:, others] == 0)
    q = p.copy()
    q[:, _idx("field.Count_Cells")] = np.arcsinh(3.0)
    with pytest.warns(CellClipWarning, match="1 of 2 field"):
        out = CellsEncoder().encode(torch.from_numpy(np.stack([p, q])))
    assert out.shape == (2, 5, D)


def test_nan_input_gives_finite_profiles():
    raw = synthetic_field(CENTERS).astype(np.float32)
    raw[1, :20, :20] = np.nan
    raw[3, 50, 50] = -np.inf
    p = field_profile_of(raw, STAINS)
    assert np.isfinite(p).all() and profile_cell_counts(p) == len(CENTERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellClipWarning)
        q = field_profile_of(np.full((5, 64, 64), np.nan, np.float32), STAINS)
    assert np.isfinite(q).all() and profile_cell_counts(q) == 0


def test_spec_identity_and_options():
    enc = get_encoder("cells")
    assert isinstance(enc, CellsEncoder) and enc.spec == "cells"
    assert VERSION in enc.identity and "cp-measure=" in enc.identity and "cell=RNA" in enc.identity
    agp = get_encoder("cells:cell=AGP,nucleus_diameter=10-100")
    assert agp.spec == "cells:cell=AGP,nucleus_diameter=10-100"
    assert get_encoder(agp.spec).identity == agp.identity != enc.identity
    assert agp.params.nucleus_diameter == (10.0, 100.0)
    assert get_encoder("cells", min_distance="8").params.min_distance == 8  # --encoder-option strings
    assert get_encoder("cells", min_distance=8).identity != enc.identity
    for bad, match in [("cells:foo=1", "KEY=VALUE"), ("cells:min_distance=x", "expected a number"),
                       ("cells:threshold=otsu9", "threshold must be one of")]:
        with pytest.raises(CellClipError, match=match):
            get_encoder(bad)


def test_field_prep_is_picklable_and_checks_stains():
    enc = CellsEncoder()
    prep = enc.field_prep(["Mito", "AGP", "RNA", "ER", "DNA"])
    assert isinstance(prep, CellFieldPrep) and pickle.loads(pickle.dumps(prep)) == prep
    with pytest.raises(CellClipError, match="nucleus stain 'DNA'"):
        enc.field_prep(["Hoechst", "RNA"])
    with pytest.raises(CellClipError, match="cell stain 'RNA'"):
        enc.with_stains(["DNA", "ER", "AGP"])


def test_prep_reads_raw_fields_in_any_channel_order(synthetic):
    raw, _seg, _m = synthetic
    order = [4, 2, 0, 3, 1]  # Mito, RNA, DNA, AGP, ER
    stains = [STAINS[i] for i in order]
    a = CellsEncoder().field_prep(STAINS)(raw)
    b = CellsEncoder().field_prep(stains)(raw[order])
    np.testing.assert_allclose(b, a[order], rtol=1e-5, atol=1e-6)
    # the encoder's own path, on fields already in [0, 1], measures the same cells
    from napari_cellclip.images import normalize

    enc = CellsEncoder().with_stains(stains)
    c = enc.encode(torch.from_numpy(normalize(raw[order])[None])).numpy()[0]
    assert profile_cell_counts(c) == profile_cell_counts(b)
    with pytest.raises(CellClipError, match="built for 5 stains"):
        enc.encode(torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def sample_features(tmp_path_factory):
    """The 12 bundled fields through features.extract_features with 2 worker processes (cold cache)."""
    from napari_cellclip.features import extract_features
    from napari_cellclip.sample import load_sample_fields

    cache = tmp_path_factory.mktemp("cells-cache")
    fields = load_sample_fields()
    res = extract_features(fields, "cells", cache_dir=cache, num_workers=2, batch_size=2, normalization="plate")
    return fields, cache, res


def test_extract_features_runs_the_encoder_in_workers_and_caches(sample_features):
    from napari_cellclip.features import extract_features

    fields, cache, res = sample_features
    assert res.features.shape == (12, 5, D) and res.n_encoded == 12 and np.isfinite(res.features).all()
    counts = profile_cell_counts(res.features)
    assert np.all(counts > 15)
    again = extract_features(fields, get_encoder("cells"), cache_dir=cache, normalization="plate")
    assert again.n_cached == 12
    np.testing.assert_array_equal(again.features, res.features)
    # another segmentation setting is another cache entry
    sub = fields.iloc[[2]].reset_index(drop=True)
    other = extract_features(sub, "cells:min_distance=9", cache_dir=cache, normalization="plate")
    assert other.n_encoded == 1 and other.n_cached == 0
    # what the workers returned is the encoder's prep of the raw field with its plate's range
    from napari_cellclip.images import load_field, plate_ranges

    ranges = plate_ranges(fields, STAINS)["SQ00015198"]
    prep = get_encoder("cells").field_prep(STAINS)
    np.testing.assert_array_equal(prep(load_field(fields.iloc[2], STAINS), ranges), res.features[2])


def test_morphology_plus_cells_concatenates_per_channel(sample_features):
    from napari_cellclip.encoders.concat import ConcatEncoder
    from napari_cellclip.features import extract_features

    fields, cache, res = sample_features
    enc = get_encoder("morphology+cells")
    assert isinstance(enc, ConcatEncoder) and enc.dim == 128 + D and enc.spec == "morphology+cells"
    assert "morph-v1" in enc.identity and VERSION in enc.identity
    # each part comes from its own cache entries: the cells features of the fixture are reused
    seen = []
    both_plate = extract_features(fields, enc, cache_dir=cache, normalization="plate",
                                  progress=lambda d, t: seen.append((d, t)))
    np.testing.assert_array_equal(both_plate.features[..., 128:], res.features)
    # progress counts fields (total = n), each once, whatever the number of parts
    assert both_plate.n_cached == 0 and seen[-1] == (12, 12) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    sub = fields.iloc[[0, 7]].reset_index(drop=True)
    both = extract_features(sub, enc, cache_dir=cache, normalization="field")
    morph = extract_features(sub, "morphology", cache_dir=cache, normalization="field")
    np.testing.assert_array_equal(both.features[..., :128], morph.features)
    # the packed worker-side preparation unpacks to the same features; its cells part is the cells prep
    from napari_cellclip.images import load_field

    prep = enc.field_prep(STAINS)
    packed = np.stack([prep(load_field(sub.iloc[i], STAINS)) for i in range(2)])
    out = enc.encode(torch.from_numpy(packed)).numpy()
    assert out.shape == (2, 5, 128 + D)
    np.testing.assert_allclose(out, both.features, rtol=1e-6, atol=1e-6)
    cells_prep = prep.parts[1]
    assert isinstance(cells_prep, CellFieldPrep)
    np.testing.assert_array_equal(packed[0, -5 * D:].reshape(5, D), cells_prep(load_field(sub.iloc[0], STAINS)))
    with pytest.raises(CellClipError, match="ambiguous"):
        get_encoder("morphology+cells", size=128)
    with pytest.raises(CellClipError, match="'cells'"):
        get_encoder("resnet+cells")


def test_training_fits_and_evaluates_on_cells_features(sample_features, tmp_path):
    from training.loop import evaluate, fit

    _fields, cache, _res = sample_features
    summary = fit(output=str(tmp_path / "run"), encoder="cells", epochs=3, quiet=True, no_progress=True,
                  cache_dir=str(cache))
    from napari_cellclip.model import CellCLIP

    model = CellCLIP.from_pretrained(summary["model"])
    assert model.config.image_encoder == "cells" and model.config.vision_width == D
    rep = evaluate(summary["model"], cache_dir=str(cache), quiet=True, no_progress=True)
    assert rep["n_fields"] == 12
    # the plugin's embedding path (cached features) and the sharded job (measures in-process) take it too
    from napari_cellclip.embed import embed_fields, load_model
    from napari_cellclip.pipeline import run_job
    from napari_cellclip.store import EmbeddingStore

    fields = _fields
    store = embed_fields(fields, load_model(summary["model"]), cache_dir=str(cache), reuse=False)
    assert store.embeddings.shape[0] == 12 and store.info["image_encoder"] == "cells"
    two = fields.iloc[[0, 9]].reset_index(drop=True)  # a DMSO field and a lonafarnib field
    run_job(two, summary["model"], tmp_path / "job", quiet=True)
    job = EmbeddingStore.load(tmp_path / "job")
    assert job.embeddings.shape[0] == 2 and np.isfinite(job.embeddings).all()


def test_concatenated_encoder_joins_the_parts_batches_and_skips_what_a_part_cannot_read(tmp_path):
    """The engine takes a concatenated encoder part by part; a field a part cannot read is skipped
    (named), the others are joined per channel and cached under each part's identity."""
    from napari_cellclip.features import extract_features
    from napari_cellclip.sample import load_sample_fields

    fields = load_sample_fields().iloc[:4].reset_index(drop=True)
    fields.loc[1, "FileName_OrigRNA"] = "no-such-file.png"
    enc = get_encoder("morphology+morphology")
    with pytest.warns(CellClipWarning, match="no-such-file"):
        res = extract_features(fields, enc, cache_dir=tmp_path, batch_size=3)
    assert res.index.tolist() == [0, 2, 3] and [p for p, _ in res.skipped] == [1]
    assert res.features.shape == (3, 5, 256) and res.n_encoded == 3
    np.testing.assert_array_equal(res.features[..., :128], res.features[..., 128:])
    alone = extract_features(fields.iloc[[0, 2, 3]].reset_index(drop=True), "morphology", cache_dir=tmp_path)
    assert alone.n_cached == 3  # the part's own cache entries
    np.testing.assert_array_equal(alone.features, res.features[..., :128])
    with pytest.warns(CellClipWarning):
        again = extract_features(fields, enc, cache_dir=tmp_path, batch_size=3)
    assert again.n_cached == 3 and again.n_encoded == 0
