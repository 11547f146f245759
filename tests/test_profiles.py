"""napari_cellclip.profiles: profile tables that pycytominer and copairs read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.profiles import (ProfileError, aggregate_wells, feature_columns, feature_names,
                                      feature_profiles, load_store, read_profiles, store_profiles, write_profiles,
                                      write_store_profiles)
from napari_cellclip.store import EmbeddingStore


def _fields(n_plates=2, sites=3):
    rows = []
    for p in range(n_plates):
        for w, pert in [("A01", "DMSO"), ("B02", "DMSO"), ("C03", "lonafarnib"), ("D04", "orantinib")]:
            for s in range(1, sites + 1):
                rows.append({"Metadata_Plate": f"SQ{p}", "Metadata_Well": w, "Metadata_Site": s,
                             "Metadata_pert_iname": pert, "Metadata_control_type": "negcon" if pert == "DMSO" else "",
                             "Metadata_moa": "" if pert == "DMSO" else "kinase inhibitor",
                             "FileName_OrigDNA": f"{w}-{s}.png", "PathName_OrigDNA": "/x"})
    return pd.DataFrame(rows)


def _store(seed=0, dim=16):
    f = _fields()
    rng = np.random.default_rng(seed)
    return EmbeddingStore(rng.normal(size=(len(f), dim)), f, "model-xyz", info={"encoder": "morphology"})


def test_feature_names_are_cellprofiler_image_columns():
    assert feature_names("CellCLIP", 3) == ["Image_CellCLIP_0000", "Image_CellCLIP_0001", "Image_CellCLIP_0002"]
    cols = feature_names("morphology", stains=["DNA", "Mito"], names=["mean", "cover>0.5"])
    assert cols == ["Image_Morphology_DNA_mean", "Image_Morphology_DNA_cover_gt_0p5",
                    "Image_Morphology_Mito_mean", "Image_Morphology_Mito_cover_gt_0p5"]
    clash = feature_names("x", names=["a-b", "a b"])
    assert len(set(clash)) == 2  # names equal once sanitised stay distinct


def test_store_profiles_round_trip_through_pycytominer_and_copairs(tmp_path):
    from copairs.map import average_precision
    from pycytominer import feature_select, normalize
    from pycytominer.cyto_utils import infer_cp_features

    st = _store()
    paths = write_store_profiles(st, tmp_path / "profiles")
    assert set(paths) == {"fields", "wells"}
    fields, fcols, finfo = read_profiles(paths["fields"])
    wells, wcols, winfo = read_profiles(paths["wells"])
    assert len(fields) == 24 and len(wells) == 8 and fcols == wcols == feature_names("CellCLIP", 16)
    assert winfo["well_profiles"] == "median of the well's field embeddings" and winfo["level"] == "well"
    assert "Metadata_Site" not in wells and (wells["Metadata_n_fields"] == 3).all()
    assert not any(c.startswith(("FileName_", "PathName_")) for c in fields.columns)
    # pycytominer finds the features by itself (Image_ columns) and normalises / selects them
    assert infer_cp_features(wells, image_features=True) == wcols
    norm = normalize(wells, image_features=True, samples="Metadata_control_type == 'negcon'",
                     method="standardize")
    ctrl = norm[norm["Metadata_control_type"] == "negcon"][wcols]
    np.testing.assert_allclose(ctrl.mean().to_numpy(), 0, atol=1e-5)
    sel = feature_select(norm, image_features=True, operation=["variance_threshold", "correlation_threshold"])
    assert set(infer_cp_features(sel, image_features=True)) <= set(wcols)
    assert sel.filter(like="Metadata_").columns.tolist() == norm.filter(like="Metadata_").columns.tolist()
    # copairs reads the same table: Metadata_ columns and the feature matrix
    ap = average_precision(wells[["Metadata_pert_iname"]], wells[wcols].to_numpy(),
                           ["Metadata_pert_iname"], [], [], ["Metadata_pert_iname"], progress_bar=False)
    assert ap["average_precision"].notna().sum() == 8  # every well has a replicate on the other plate


def test_well_aggregation_median_mean_and_store_well_rows(tmp_path):
    st = _store()
    fields, _, _ = store_profiles(st)
    cols = feature_columns(fields)
    med = aggregate_wells(fields, cols, "median")
    mean = aggregate_wells(fields, cols, "mean")
    one = fields[(fields["Metadata_Plate"] == "SQ1") & (fields["Metadata_Well"] == "C03")][cols]
    row = (med["Metadata_Plate"] == "SQ1") & (med["Metadata_Well"] == "C03")
    np.testing.assert_allclose(med.loc[row, cols].to_numpy()[0], one.median().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(mean.loc[row, cols].to_numpy()[0], one.mean().to_numpy(), rtol=1e-6)
    with pytest.raises(ProfileError, match="max"):
        aggregate_wells(fields, cols, "max")
    # a pipeline output with the model's own well rows in <store>/wells: those are used, and said
    folder = st.save(tmp_path / "store")
    wells = EmbeddingStore(np.ones((8, 16)), med[[c for c in med if c.startswith("Metadata_")]], "model-xyz",
                           level="well", info={"well_pooling": "gated attention over the well's fields"})
    wells.save(folder / "wells")
    store, wstore = load_store(folder)
    f2, w2, info = store_profiles(store, wells=wstore)
    assert info["well_profiles"] == "gated attention over the well's fields"
    np.testing.assert_allclose(w2[cols].to_numpy(), 0.25, rtol=1e-6)  # the stored (normalised) well rows
    assert len(f2) == 24
    other = EmbeddingStore(np.ones((8, 16)), wells.fields, "another-model", level="well")
    with pytest.raises(ProfileError, match="another model"):
        store_profiles(store, wells=other)


def test_feature_profiles_apply_the_checkpoint_correction():
    from napari_cellclip import correction as corr

    f = _fields()
    x = np.random.default_rng(1).normal(size=(len(f), 2, 3)).astype(np.float32) + 5
    spec = corr.make_spec("center_scale")
    prof = feature_profiles(x, f, source="morphology", stains=["DNA", "ER"], names=["a", "b", "c"], correction=spec)
    cols = feature_columns(prof)
    assert cols[:3] == ["Image_Morphology_DNA_a", "Image_Morphology_DNA_b", "Image_Morphology_DNA_c"]
    np.testing.assert_allclose(prof[cols].to_numpy(), corr.apply(x, f, spec).reshape(len(f), -1), rtol=1e-6)


def test_read_profiles_formats_and_errors(tmp_path):
    df = pd.DataFrame({"Metadata_Plate": ["P"] * 3, "Metadata_Well": ["A01", "A02", "A03"],
                       "ImageNumber": [1, 2, 3], "Cells_AreaShape_Area": [1.0, 2.0, 3.0],
                       "Nuclei_Intensity_Mean": [0.1, 0.2, 0.3], "Count_note": ["a", "b", "c"]})
    df.to_csv(tmp_path / "p.csv.gz", index=False)
    df.to_csv(tmp_path / "p.tsv", sep="\t", index=False)
    for name in ("p.csv.gz", "p.tsv"):
        got, cols, info = read_profiles(tmp_path / name)
        assert cols == ["Cells_AreaShape_Area", "Nuclei_Intensity_Mean"] and info == {}  # no bookkeeping, no text
    _, cols, _ = read_profiles(tmp_path / "p.tsv", features=["Nuclei_Intensity_Mean"])
    assert cols == ["Nuclei_Intensity_Mean"]
    with pytest.raises(ProfileError, match="Cells_Nope"):
        read_profiles(tmp_path / "p.tsv", features=["Cells_Nope"])
    with pytest.raises(ProfileError, match="not numeric"):
        read_profiles(tmp_path / "p.tsv", features=["Count_note"])
    df.drop(columns=[c for c in df if c.startswith("Metadata_")]).to_csv(tmp_path / "nometa.csv", index=False)
    with pytest.raises(ProfileError, match="nometa.csv: no Metadata_"):
        read_profiles(tmp_path / "nometa.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ProfileError, match="bad.parquet: unreadable"):
        read_profiles(tmp_path / "bad.parquet")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(ProfileError, match="unknown profile format"):
        read_profiles(tmp_path / "p.xlsx")
    with pytest.raises(ProfileError, match="no such profile file"):
        read_profiles(tmp_path / "missing.parquet")
    # written by write_profiles: the feature list travels with the file
    out = write_profiles(df, tmp_path / "w.parquet", features=["Nuclei_Intensity_Mean"], info={"source": "test"})
    _, cols, info = read_profiles(out)
    assert cols == ["Nuclei_Intensity_Mean"] and info["source"] == "test" and info["n_rows"] == 3
