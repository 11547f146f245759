"""training/profiling.py: copairs mAP metrics against brute-force average precision written here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_cellclip.errors import CellClipError
from training.profiling import (METRICS, Profiles, ProfilingOptions, format_profiling, parse_metrics,
                                profiling_report, read_sister_tables)

OPTS = dict(null_size=2000, seed=0)


# --------------------------------------------------------------------- brute force
def _cos(a, b):
    return float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


def _ap(x, q, positives, negatives):
    """AP of query q: candidates ranked by cosine similarity; mean precision at each positive."""
    cands = sorted([(j, True) for j in positives] + [(j, False) for j in negatives],
                   key=lambda c: -_cos(x[q], x[c[0]]))
    hits, precisions = 0, []
    for rank, (_, pos) in enumerate(cands, start=1):
        if pos:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def _plates(seed=0, n_plates=3, effect=2.0, noise=1.0, dim=12):
    """Wells on replicate plates: 2 DMSO, compounds a, b (strong), c (no effect) per plate."""
    rng = np.random.default_rng(seed)
    centre = {"a": rng.normal(size=dim) * effect, "b": rng.normal(size=dim) * effect, "c": np.zeros(dim),
              "DMSO": np.zeros(dim)}
    moa = {"a": "kinase inhibitor", "b": "kinase inhibitor|HDAC inhibitor", "c": "HDAC inhibitor", "DMSO": ""}
    rows, x = [], []
    for p in range(n_plates):
        for w, pert in [("A01", "DMSO"), ("B01", "DMSO"), ("C01", "a"), ("D01", "b"), ("E01", "c")]:
            rows.append({"Metadata_Plate": f"P{p}", "Metadata_Well": w, "Metadata_pert_iname": pert,
                         "Metadata_moa": moa[pert], "Metadata_control_type": "negcon" if pert == "DMSO" else ""})
            x.append(centre[pert] + rng.normal(size=dim) * noise)
    x = np.array(x)
    cols = [f"Image_Test_{i}" for i in range(dim)]
    df = pd.concat([pd.DataFrame(rows), pd.DataFrame(x, columns=cols)], axis=1)
    return Profiles(df, cols, {"source": "synthetic", "level": "well"}), x


def _report(p, metrics, **kw):
    return profiling_report({"p": p}, metrics, ProfilingOptions(**{**OPTS, **kw}))["sources"]["p"]


# --------------------------------------------------------------------- metrics
@pytest.mark.parametrize("query_plates", [None, ["P2"]])
def test_replicate_and_activity_equal_brute_force(query_plates):
    p, x = _plates()
    rep = _report(p, ["replicate", "activity"], query_plates=query_plates)
    pert = p.frame["Metadata_pert_iname"].to_numpy()
    plate = p.frame["Metadata_Plate"].to_numpy()
    ctrl = pert == "DMSO"
    for compound in ("a", "b", "c"):
        queries = [i for i in np.flatnonzero(pert == compound) if query_plates is None or plate[i] in query_plates]
        reps = [[j for j in np.flatnonzero(pert == compound) if j != q] for q in queries]
        # replicate retrieval: negatives = every profile of another perturbation, controls included
        want = np.mean([_ap(x, q, r, np.flatnonzero(pert != compound)) for q, r in zip(queries, reps)])
        got = rep["replicate"]["groups"][compound]
        assert got["mAP"] == pytest.approx(want, abs=1e-4) and got["n_queries"] == len(queries)
        # phenotypic activity: negatives = the negative controls only
        want = np.mean([_ap(x, q, r, np.flatnonzero(ctrl)) for q, r in zip(queries, reps)])
        assert rep["activity"]["groups"][compound]["mAP"] == pytest.approx(want, abs=1e-4)
    assert set(rep["activity"]["groups"]) == {"a", "b", "c"}  # controls are never queries
    assert rep["n_negative_controls"] == 6 and rep["n_perturbations"] == 3
    for m in ("replicate", "activity"):
        r = rep[m]
        assert r["mAP"] == pytest.approx(np.mean([g["mAP"] for g in r["groups"].values()]), abs=1e-4)
        assert r["n_significant"] == sum(g["significant"] for g in r["groups"].values())
        assert r["fraction_significant"] == pytest.approx(r["n_significant"] / 3, abs=1e-4)


def test_significance_follows_the_effect():
    strong, _ = _plates(seed=1, n_plates=4, effect=4.0, noise=0.5)
    act = _report(strong, ["activity"])["activity"]["groups"]
    assert act["a"]["significant"] and act["b"]["significant"]
    assert act["a"]["mAP"] == 1.0
    # a perfect ranking: copairs 0.5 counts null mAPs strictly above it (none: p at the null's floor);
    # the tie-inclusive p is the chance of a perfect ranking, 3 positives among 11: 1 / C(11, 3) = 1/165
    assert act["a"]["p_value_strict"] == pytest.approx(1 / 2001)
    assert 0.002 < act["a"]["p_value"] < 0.015
    # LINCS's design: one held-out query, 2 replicates among 8 wells -> a perfect ranking has p = 1/28
    lincs, _ = _plates(seed=1, n_plates=3, effect=4.0, noise=0.5)
    one = _report(lincs, ["activity"], query_plates=["P2"])["activity"]["groups"]["a"]
    assert one["n_queries"] == 1 and one["mAP"] == 1.0 and one["p_value"] == pytest.approx(1 / 28, abs=0.01)
    assert not act["c"]["significant"]  # no effect: indistinguishable from DMSO
    assert act["c"]["corrected_p_value"] >= act["c"]["p_value"]


def test_consistency_multilabel_equals_brute_force():
    p, x = _plates(n_plates=2, effect=3.0)
    rep = _report(p, ["consistency"])["consistency"]["Metadata_moa"]
    pert = p.frame["Metadata_pert_iname"].to_numpy()
    cons = {c: np.median(x[pert == c], axis=0) for c in ("a", "b", "c")}  # consensus = median of replicates
    labels = {"a": {"kinase inhibitor"}, "b": {"kinase inhibitor", "HDAC inhibitor"}, "c": {"HDAC inhibitor"}}
    keys = list(cons)
    xc = np.stack([cons[k] for k in keys])
    for label in ("kinase inhibitor", "HDAC inhibitor"):
        aps = []
        for qi, q in enumerate(keys):
            if label not in labels[q]:
                continue
            pos = [j for j, k in enumerate(keys) if k != q and label in labels[k]]
            neg = [j for j, k in enumerate(keys) if not labels[k] & labels[q]]
            if neg:  # b shares a label with every other compound: nothing to rank it against, no AP
                aps.append(_ap(xc, qi, pos, neg))
        assert rep["groups"][label]["mAP"] == pytest.approx(np.mean(aps), abs=1e-4)
    assert rep["n_perturbations"] == 3


def _sister_files(tmp_path):
    (tmp_path / "cpjump1_compound_metadata.tsv").write_text(
        "broad_sample\ttarget\tpert_type\tcontrol_type\nBRD-1\tG1\ttrt\t\nBRD-2\tG2\ttrt\t\nBRD-3\tG9\ttrt\t\n")
    (tmp_path / "cpjump1_crispr_metadata.tsv").write_text(
        "broad_sample\tgenes\tpert_type\tcontrol_type\nCR-1a\tG1\ttrt\t\nCR-1b\tG1\ttrt\t\nCR-2\tG2\ttrt\t\n"
        "CR-3\tG3\ttrt\t\n")
    return [str(tmp_path / "cpjump1_compound_metadata.tsv"), str(tmp_path / "cpjump1_crispr_metadata.tsv")]


def test_sister_matching_equals_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    gene_dir = {g: rng.normal(size=10) * 2 for g in ("G1", "G2", "G3", "G9")}
    perts = [("BRD-1", "G1"), ("BRD-2", "G2"), ("BRD-3", "G9"), ("CR-1a", "G1"), ("CR-1b", "G1"),
             ("CR-2", "G2"), ("CR-3", "G3"), ("DMSO", None)]
    rows, x = [], []
    for plate in ("P1", "P2"):
        for i, (key, gene) in enumerate(perts):
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"A{i:02d}",
                         "Metadata_broad_sample": "" if key == "DMSO" else key,
                         "Metadata_pert_iname": key})
            x.append((gene_dir[gene] if gene else 0) + rng.normal(size=10))
    x = np.array(x)
    cols = [f"Image_T_{i}" for i in range(10)]
    p = Profiles(pd.concat([pd.DataFrame(rows), pd.DataFrame(x, columns=cols)], axis=1), cols, {"level": "well"})
    rep = _report(p, ["sister"], sister=tuple(_sister_files(tmp_path)))["sister"]["compound→crispr"]
    key = p.frame["Metadata_pert_iname"].to_numpy()
    names = [k for k, _ in perts[:-1]]
    cons = np.stack([np.median(x[key == k], axis=0) for k in names])
    gene = dict(perts[:-1])
    for qi, q in enumerate(names[:3]):  # compounds query the CRISPR guides
        pos = [j for j, k in enumerate(names) if k.startswith("CR") and gene[k] == gene[q]]
        neg = [j for j, k in enumerate(names) if k.startswith("CR") and gene[k] != gene[q]]
        if pos:
            assert rep["groups"][q]["mAP"] == pytest.approx(_ap(cons, qi, pos, neg), abs=1e-4)
    assert set(rep["groups"]) == {"BRD-1", "BRD-2"}  # BRD-3's gene has no guide: nothing to retrieve
    # an ORF table whose genes no compound shares: said, not scored
    (tmp_path / "cpjump1_orf_metadata.tsv").write_text("broad_sample\tgenes\nCR-3\tG3\n")
    tables = read_sister_tables(_sister_files(tmp_path) + [f"orf={tmp_path / 'cpjump1_orf_metadata.tsv'}"])
    assert [t["modality"] for t in tables] == ["compound", "crispr", "orf"]
    assert tables[0]["key_column"] == "broad_sample" and tables[1]["genes"]["CR-1a"] == ["G1"]


def test_not_computable_is_said_not_scored():
    p, _ = _plates(n_plates=1)  # one plate: every compound has a single well
    rep = _report(p, list(METRICS))
    for m in ("replicate", "activity"):
        assert "two or more profiles" in rep[m]["not_computed"]
    assert "no annotation value is shared" not in str(rep["consistency"])  # a and b share a MoA
    assert "no compound–gene table" in rep["sister"]["not_computed"]
    nodmso = Profiles(p.frame[p.frame["Metadata_pert_iname"] != "DMSO"].reset_index(drop=True), p.features, {})
    nodmso.frame["Metadata_control_type"] = ""
    assert "no negative-control" in _report(nodmso, ["activity"])["activity"]["not_computed"]
    text = format_profiling(profiling_report({"p": p}, ["replicate", "activity"], ProfilingOptions(**OPTS)))
    assert "n/a [1]" in text and "[1] no perturbation has two or more profiles" in text


def test_controls_and_perturbations_from_gallery_style_columns():
    """CellProfiler well profiles name DMSO in Metadata_broad_sample and the dose apart."""
    p, _ = _plates()
    df = p.frame.drop(columns=["Metadata_control_type"])
    df = df.rename(columns={"Metadata_pert_iname": "Metadata_broad_sample"})
    df["Metadata_mmoles_per_liter"] = np.where(df["Metadata_broad_sample"] == "DMSO", 0.0, 10.0)
    rep = _report(Profiles(df, p.features, {}), ["activity"])
    assert rep["n_negative_controls"] == 6
    assert set(rep["activity"]["groups"]) == {"a@10.0", "b@10.0", "c@10.0"}
    explicit = _report(Profiles(df, p.features, {}), ["activity"], control="Metadata_broad_sample=dmso",
                       perturbation=["Metadata_broad_sample"])
    assert set(explicit["activity"]["groups"]) == {"a", "b", "c"}
    with pytest.raises(CellClipError, match="COLUMN=VALUE"):
        _report(Profiles(df, p.features, {}), ["activity"], control="Metadata_nope=DMSO")
    with pytest.raises(CellClipError, match="P9"):
        _report(p, ["activity"], query_plates=["P9"])


def test_parse_metrics_and_missing_features():
    assert parse_metrics("activity, replicate") == ["replicate", "activity"]
    assert parse_metrics("all") == list(METRICS)
    with pytest.raises(CellClipError, match="bogus"):
        parse_metrics("activity,bogus")
    p, _ = _plates()
    p.frame.loc[0, p.features[0]] = np.nan
    with pytest.warns(UserWarning, match="1 feature column"):
        rep = _report(p, ["replicate"])
    assert rep["n_features"] == len(p.features) - 1


# --------------------------------------------------------------------- CLI on the bundled sample
def _run(argv, capsys):
    from training.__main__ import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    return cap


def test_evaluate_reports_profiling_metrics_on_the_sample(trained_checkpoint, cellclip_cache_dir, tmp_path, capsys):
    import json

    base = ["evaluate", "--checkpoint", trained_checkpoint, "--cache-dir", cellclip_cache_dir, "--no-progress",
            "--null-size", 1000]
    cap = _run(base + ["--level", "field", "--representations", "embeddings,features,intensity",
                       "--report", tmp_path / "field.json"], capsys)
    rep = json.loads((tmp_path / "field.json").read_text())
    assert rep["well"]["image_to_text"]["n_queries"] == 4  # retrieval is still there
    src = rep["profiling"]["sources"]
    assert list(src) == ["embeddings", "features", "intensity"]
    for s in src.values():
        assert s["level"] == "field" and s["n_profiles"] == 12 and s["n_negative_controls"] == 6
        act = s["activity"]
        # the fields of a well are its replicates at this level: 2 compounds x 3 fields
        assert act["n_groups"] == 2 and act["n_queries"] == 6 and 0 <= act["mAP"] <= 1
        assert {g.get("name") for g in act["groups"].values()} == {"orantinib", "lonafarnib"}
        assert "two perturbations" in s["consistency"]["Metadata_moa"]["not_computed"]
    assert src["features"]["n_features"] == 5 * 128 and src["intensity"]["n_features"] == 5 * 9
    assert "profiles" in cap.err and "activity" in cap.err and "embeddings" in cap.err  # the readable table
    # well level (the default): one well per compound on one plate -- said, not scored
    _run(base + ["--metrics", "activity", "--report", tmp_path / "well.json"], capsys)
    rep = json.loads((tmp_path / "well.json").read_text())
    assert "field" not in rep and "well" not in rep  # --metrics chose: no retrieval
    emb = rep["profiling"]["sources"]["embeddings"]
    assert "two or more profiles" in emb["activity"]["not_computed"]
    assert emb["well_profiles"].startswith("the model's multi-instance pooling")


def test_profiles_verb_and_evaluate_on_profile_tables(trained_checkpoint, cellclip_cache_dir, tmp_path, capsys,
                                                      sample_plate_copies):
    """Two copies of the sample plate: wells have replicates across plates; profiles written by
    `profiles` are judged by `evaluate --profiles` alone (the path for CellProfiler tables)."""
    import json

    from napari_cellclip.profiles import read_profiles
    from napari_cellclip.sample import sample_platemap_dir

    plates = sample_plate_copies()
    data = ["--data", plates[0], "--data", plates[1], "--platemap", sample_platemap_dir(),
            "--cache-dir", cellclip_cache_dir, "--no-progress", "--quiet"]
    _run(["profiles", *data, "--checkpoint", trained_checkpoint, "--output", tmp_path / "emb"], capsys)
    _run(["profiles", *data, "--output", tmp_path / "feat"], capsys)
    _run(["profiles", *data, "--representation", "intensity", "--aggregate", "mean", "--output", tmp_path / "int"],
         capsys)
    for name, n_feat, pooling in (("emb", None, "multi-instance"), ("feat", 640, "median"), ("int", 45, "mean")):
        fields, fcols, _ = read_profiles(tmp_path / name / "fields.parquet")
        wells, wcols, winfo = read_profiles(tmp_path / name / "wells.parquet")
        assert len(fields) == 24 and len(wells) == 8 and fcols == wcols
        assert n_feat is None or len(wcols) == n_feat
        assert pooling in winfo["well_profiles"]
        assert set(wells["Metadata_pert_iname"]) == {"DMSO", "orantinib", "lonafarnib"}
    out = tmp_path / "tables.json"
    _run(["evaluate", "--profiles", tmp_path / "feat" / "wells.parquet",
          "--profiles", tmp_path / "int" / "fields.parquet",
          "--query-plate", "SQ00015230", "--null-size", 1000, "--report", out, "--quiet"], capsys)
    src = json.loads(out.read_text())["profiling"]["sources"]
    assert list(src) == ["wells", "fields"]
    assert src["fields"]["well_profiles"] == "median of the table's rows per well" and src["fields"]["n_profiles"] == 8
    for s in src.values():
        act = s["activity"]  # identical plate copies: each held-out well's replicate is its twin
        assert act["mAP"] == 1.0 and act["n_groups"] == 2 and act["n_queries"] == 2


def test_profiles_verb_from_an_embedding_store(tmp_path, capsys):
    import json

    from napari_cellclip.store import EmbeddingStore

    f = pd.DataFrame({"Metadata_Plate": ["P"] * 4, "Metadata_Well": ["A01", "A01", "B01", "B01"],
                      "Metadata_Site": [1, 2, 1, 2], "Metadata_pert_iname": ["DMSO", "DMSO", "x", "x"]})
    EmbeddingStore(np.random.default_rng(0).normal(size=(4, 8)), f, "m").save(tmp_path / "store")
    cap = _run(["profiles", "--data", tmp_path / "store", "--output", tmp_path / "out", "--aggregate", "mean"], capsys)
    out = json.loads(cap.out)
    assert set(out) == {"fields", "wells"}
    assert len(pd.read_parquet(out["wells"])) == 2


@pytest.mark.parametrize("argv, message", [
    (["evaluate"], "--checkpoint"),
    (["evaluate", "--profiles", "/no/such.parquet"], "/no/such.parquet"),
    (["evaluate", "--profiles", "{table}", "--metrics", "activity,bogus"], "bogus"),
    (["evaluate", "--profiles", "{table}", "--sister", "{table}"], "modality"),
    (["evaluate", "--profiles", "{table}", "--control", "Metadata_nope=1"], "Metadata_nope"),
    (["profiles", "--output", "{tmp}/o", "--representation", "embeddings"], "--checkpoint"),
])
def test_profiling_cli_mistakes_exit_2(argv, message, tmp_path, capsys):
    from training.__main__ import main

    p, _ = _plates()
    p.frame.to_csv(tmp_path / "t.csv", index=False)
    argv = [a.format(table=tmp_path / "t.csv", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_sister_matching_with_the_cpjump1_tables():
    """The CP-JUMP1 tables as published (tests/data/cpjump1): compounds find their target's CRISPR
    guides and ORFs when their profiles share the gene's direction, not when they do not."""
    from pathlib import Path

    data = Path(__file__).parent / "data" / "cpjump1"
    specs = [str(data / f"cpjump1_{m}_metadata.tsv") for m in ("compound", "crispr", "orf")]
    tables = read_sister_tables(specs)
    assert [t["modality"] for t in tables] == ["compound", "crispr", "orf"]
    assert tables[0]["genes"]["BRD-K87632963-001-03-0"] == ["ABL1"]
    assert "BRDN0001147100" not in tables[1]["genes"]  # a non-targeting guide has no gene
    perts = {"ABL1": ["BRD-K87632963-001-03-0", "BRD-K59831625-001-03-9", "BRDN0001147538", "BRDN0001145303",
                      "ccsbBroad304_14525"],
             "ADA": ["BRD-K66788707-001-14-3", "BRD-K91543828-001-02-0", "BRDN0001486925", "BRDN0001479710",
                     "ccsbBroad304_00023"],
             "ADH1C": ["BRD-K56810756-003-07-7", "BRD-K55567017-001-12-3", "BRDN0001483052", "BRDN0001479262",
                       "ccsbBroad304_05777"]}
    rng = np.random.default_rng(7)
    direction = {g: rng.normal(size=16) * 3 for g in perts}
    rows, x = [], []
    for plate in ("P1", "P2"):
        for gene, keys in perts.items():
            for k in keys:
                own = gene != "ADH1C" or not k.startswith("BRD-K")  # ADH1C's compounds miss their target
                rows.append({"Metadata_Plate": plate, "Metadata_Well": k[-6:], "Metadata_broad_sample": k})
                x.append((direction[gene] if own else rng.normal(size=16) * 3) + rng.normal(size=16) * 0.5)
        for k in ("BRDN0001147100", ""):  # a non-targeting guide and DMSO
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"Z{len(k)}", "Metadata_broad_sample": k,
                         "Metadata_control_type": "negcon"})
            x.append(rng.normal(size=16) * 0.5)
    cols = [f"Image_T_{i}" for i in range(16)]
    p = Profiles(pd.concat([pd.DataFrame(rows), pd.DataFrame(np.array(x), columns=cols)], axis=1), cols, {})
    rep = _report(p, ["sister"], sister=tuple(specs))["sister"]
    assert set(rep) == {"compound→crispr", "compound→orf"}
    for pair in rep.values():
        assert set(pair["groups"]) == {k for keys in perts.values() for k in keys[:2]}  # the 6 compounds query
        for k in perts["ABL1"][:2] + perts["ADA"][:2]:
            assert pair["groups"][k]["mAP"] == 1.0
        assert all(pair["groups"][k]["mAP"] < 1.0 for k in perts["ADH1C"][:2])
