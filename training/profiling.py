"""Profiling metrics: mean average precision (mAP) with copairs, as image-based profiling judges profiles.

The numbers are copairs' (Kalinin et al. 2025, "A versatile information retrieval
framework for evaluating profile strength and similarity", Nat Commun 16:5181;
https://github.com/cytomining/copairs): ``copairs.map.average_precision`` (or its
multilabel variant) ranks, for each query profile, every other profile of its
comparison set by cosine similarity and scores the positives' ranks (AP);
``copairs.map.mean_average_precision`` averages the APs of a group (a perturbation,
an annotation) and draws a null of random rankings with the same numbers of
positives and negatives (``null_size`` draws).  The p-value counts the null mAPs at
or above the observed one, p = (k + 1) / (n + 1), from copairs' own null draws (see
:func:`mean_average_precision` for why not copairs 0.5's strict count), and copairs
corrects the p-values for multiple testing (Benjamini–Hochberg FDR).  A group is
*significant* when its corrected p-value is below ``threshold`` (0.05).

Metrics (rows are well profiles unless ``level="field"``):

``replicate``  replicate retrieval.  Query: each profile of a treatment (not a
               negative control).  Positives: the other profiles of the same
               perturbation.  Negatives: every profile of another perturbation,
               negative controls included.
``activity``   phenotypic activity (copairs' recipe).  Query: each treatment profile.
               Positives: its replicates.  Negatives: the negative-control profiles
               only.  High mAP = replicates look alike *and* unlike the controls;
               the fraction of perturbations with significant mAP is the fraction
               "active".
``consistency`` phenotypic consistency.  Treatments are first reduced to one
               consensus profile each (median of its replicates); query: each
               consensus profile with an annotation (MoA, target; ``a|b`` = several,
               copairs' multilabel AP); positives: perturbations sharing an
               annotation value; negatives: those sharing none.  One mAP per
               annotation value (group), per annotation column.
``sister``     compound ↔ gene matching (CP-JUMP1's evaluation).  Consensus
               profiles per perturbation; each is given its gene(s) and modality by
               compound–gene tables (``cpjump1_{compound,crispr,orf}_metadata.tsv``
               shape: a key column such as ``broad_sample`` and a ``target`` /
               ``genes`` column).  Query: each compound; positives: the genetic
               perturbations (CRISPR guides, ORFs) of its target gene; negatives:
               genetic perturbations of other genes.  One result per genetic modality.

Where a metric cannot be computed (no negative controls, no perturbation with
replicates, no annotation shared by two perturbations, no sister table), the report
says why instead of giving a number.  ``query_plates`` restricts the queries of
``replicate`` and ``activity`` to those plates' profiles (their positives and
negatives still come from every plate): leave-one-plate-out, a held-out well
finding its replicates on the training plates.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_cellclip.errors import CellClipError, CellClipWarning

METRICS = ("retrieval", "replicate", "activity", "consistency", "sister")
PROFILE_METRICS = METRICS[1:]  # the copairs ones; "retrieval" is the cross-modal R@k of training.evaluate
# a perturbation's identity: the first filled of these (per row), then its dose when there is one
ID_COLUMNS = ("Metadata_broad_sample", "Metadata_JCP2022", "Metadata_pert_iname", "Metadata_InChIKey",
              "Metadata_gene", "Metadata_Symbol", "Metadata_pert_id", "Metadata_compound", "Metadata_prompt")
DOSE_COLUMNS = ("Metadata_dose", "Metadata_mmoles_per_liter", "Metadata_dose_recode", "Metadata_concentration")
ANNOTATION_COLUMNS = ("Metadata_moa", "Metadata_target")
GENE_COLUMNS = ("target", "genes", "gene", "Metadata_target", "Metadata_genes", "Metadata_gene",
                "Metadata_Symbol")
MODALITIES = ("compound", "crispr", "orf")


class NotComputable(Exception):
    """A metric has no comparison to make on these profiles; the message says why."""


@dataclass
class ProfilingOptions:
    """How profiles are compared (see the module docstring)."""

    perturbation: Sequence[str] | None = None  # columns naming a perturbation (default: ID_COLUMNS + dose)
    control: str | None = None  # "COLUMN=VALUE[,VALUE]" (default: control_type negcon / is_control / DMSO)
    annotations: Sequence[str] | None = None  # consistency columns (default: those of ANNOTATION_COLUMNS present)
    sister: Sequence[str] = field(default_factory=tuple)  # compound–gene tables ("[modality=]path")
    query_plates: Sequence[str] | None = None
    null_size: int = 10000
    threshold: float = 0.05
    seed: int = 0

    def to_json(self) -> dict:
        return {"perturbation": list(self.perturbation) if self.perturbation else "auto",
                "control": self.control or "auto", "annotations": list(self.annotations or []) or "auto",
                "sister": [str(s) for s in self.sister], "query_plates": list(self.query_plates or []),
                "null_size": int(self.null_size), "fdr_threshold": float(self.threshold), "seed": int(self.seed),
                "similarity": "cosine", "fdr": "Benjamini-Hochberg"}


@dataclass
class Profiles:
    """A profile table (``Metadata_*`` + feature columns) and what it is."""

    frame: pd.DataFrame
    features: list[str]
    info: dict


def parse_metrics(text) -> list[str]:
    """``"activity,replicate"`` (or a list) → validated metric names, in :data:`METRICS` order."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    names = [s.strip().lower() for s in items if str(s).strip()]
    unknown = [n for n in names if n not in METRICS + ("all",)]
    if unknown or not names:
        raise CellClipError(f"unknown metric(s) {', '.join(unknown) or repr(text)}; choose from "
                            f"{', '.join(METRICS)} or all")
    return list(METRICS) if "all" in names else [m for m in METRICS if m in names]


# ----------------------------------------------------------------- design
def _filled(s: pd.Series) -> pd.Series:
    """Strings, missing values as ""."""
    s = s.astype(object)
    return s.where(s.notna(), "").astype(str).str.strip().replace({"nan": "", "None": "", "<NA>": ""})


def perturbation_keys(meta: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.Series:
    """One string per row naming its perturbation ("" when nothing names it)."""
    if columns:
        missing = [c for c in columns if c not in meta.columns]
        if missing:
            raise CellClipError(f"perturbation column(s) {', '.join(missing)} not in the profiles")
        parts = [_filled(meta[c]) for c in columns]
        key = parts[0]
        for p in parts[1:]:
            key = key.str.cat(p, sep="|")
        return key.where(key.str.strip("|") != "", "")
    key = pd.Series("", index=meta.index)
    for c in ID_COLUMNS:
        if c in meta.columns:
            key = key.where(key != "", _filled(meta[c]))
    dose = next((c for c in DOSE_COLUMNS if c in meta.columns), None)
    if dose is not None:
        d = _filled(meta[dose])
        key = key.where((key == "") | (d == ""), key + "@" + d)
    return key


def control_rows(meta: pd.DataFrame, control: str | None = None) -> np.ndarray:
    """Negative-control rows: ``control`` = "COLUMN=VALUE[,VALUE]", else the usual annotations
    (``Metadata_control_type``/``Metadata_pert_type`` negcon, ``Metadata_is_control``, DMSO)."""
    from napari_cellclip.correction import control_mask

    if control:
        col, sep, values = str(control).partition("=")
        col = col.strip()
        if not sep or col not in meta.columns:
            raise CellClipError(f"--control {control!r}: expected COLUMN=VALUE with a column of the profiles")
        wanted = {v.strip().lower() for v in values.split(",")}
        return _filled(meta[col]).str.lower().isin(wanted).to_numpy()
    mask = control_mask(meta)
    if "Metadata_pert_type" in meta.columns:
        mask = mask | (_filled(meta["Metadata_pert_type"]).str.lower() == "negcon").to_numpy()
    for c in ID_COLUMNS[:4]:
        if c in meta.columns:
            mask = mask | (_filled(meta[c]).str.upper() == "DMSO").to_numpy()
    return mask


def design(meta: pd.DataFrame, options: ProfilingOptions) -> pd.DataFrame:
    """The comparison table copairs sees: ``pert``, ``negcon``, ``plate``, ``query`` per row."""
    pert = perturbation_keys(meta, options.perturbation)
    negcon = control_rows(meta, options.control)
    pert = pert.where(~negcon | (pert != ""), "negative control")
    plate = _filled(meta["Metadata_Plate"]) if "Metadata_Plate" in meta.columns else pd.Series("", index=meta.index)
    query = np.ones(len(meta), dtype=bool)
    if options.query_plates:
        wanted = {str(p) for p in options.query_plates}
        unknown = wanted - set(plate)
        if unknown:
            raise CellClipError(f"query plate(s) {', '.join(sorted(unknown))} not among the profiles' plates "
                                f"({', '.join(sorted(set(plate)))})")
        query = plate.isin(wanted).to_numpy()
    name = _filled(meta["Metadata_pert_iname"]) if "Metadata_pert_iname" in meta.columns else pert
    return pd.DataFrame({"pert": pert.to_numpy(), "negcon": negcon, "plate": plate.to_numpy(), "query": query,
                         "name": name.to_numpy()})


def _named(out: dict, d: pd.DataFrame) -> dict:
    """Add each perturbation group's readable name (``Metadata_pert_iname``) where it differs from its key."""
    names = d.drop_duplicates("pert").set_index("pert")["name"]
    for key, g in out["groups"].items():
        if key in names.index and names[key] and names[key] != key:
            g["name"] = str(names[key])
    return out


# ----------------------------------------------------------------- copairs
def _copairs():
    try:
        from copairs import map as cmap
        from copairs.matching import UnpairedException
    except ImportError:
        raise CellClipError("the profiling metrics need copairs: pip install 'napari-cellclip[profiling]'"
                            ) from None
    return cmap, UnpairedException


def average_precision(meta: pd.DataFrame, x: np.ndarray, pos_sameby, pos_diffby, neg_sameby, neg_diffby,
                      multilabel: str | None = None) -> pd.DataFrame:
    """copairs' AP per query row (rows in ``meta`` order; ``multilabel``: copairs' multilabel AP)."""
    cmap, unpaired = _copairs()
    kw = dict(pos_sameby=list(pos_sameby), pos_diffby=list(pos_diffby), neg_sameby=list(neg_sameby),
              neg_diffby=list(neg_diffby), progress_bar=False)
    try:
        if multilabel:
            return cmap.multilabel.average_precision(meta, x, multilabel_col=multilabel, **kw)
        return cmap.average_precision(meta, x, **kw)
    except unpaired as exc:
        what = "positive" if "positive" in str(exc) else "negative"
        raise NotComputable(f"no {what} pairs to rank") from None


def mean_average_precision(ap: pd.DataFrame, group: str, options: ProfilingOptions) -> dict:
    """copairs' mAP per ``group`` value, its p-value and FDR-corrected p-value, and a summary.

    ``p_value`` counts the null mAPs *at or above* the observed one;
    copairs 0.5 counts only those strictly above (kept as ``p_value_strict``), which gives a
    perfect ranking p = 1/(null_size + 1) however often chance ranks perfectly: with 2 positives
    among 8 it does 1 time in 28.  Significance uses the tie-inclusive p-values, BH-corrected
    by copairs' ``apply_fdr_correction``.
    """
    cmap, _ = _copairs()
    scored = ap[(ap["n_pos_pairs"] > 0) & ap["average_precision"].notna()].reset_index(drop=True)
    if scored.empty:
        raise NotComputable("no query has a positive to retrieve")
    # a fresh null-distribution cache per call: copairs' shared cache makes p-values depend on past runs
    with tempfile.TemporaryDirectory(prefix="copairs-null-") as tmp:
        m = cmap.mean_average_precision(scored, [group], null_size=int(options.null_size),
                                        threshold=float(options.threshold), seed=int(options.seed),
                                        progress_bar=False, cache_dir=tmp)
        m = _tie_inclusive(m, scored, options, tmp)
    groups = {str(getattr(r, group)): {"mAP": round(float(r.mean_average_precision), 4),
                                       "p_value": float(r.p_value), "corrected_p_value": float(r.corrected_p_value),
                                       "p_value_strict": float(r.p_value_strict),
                                       "significant": bool(r.below_corrected_p), "n_queries": len(r.indices)}
              for r in m.itertuples(index=False)}
    n_sig = int(m["below_corrected_p"].sum())
    return {"mAP": round(float(m["mean_average_precision"].mean()), 4),
            "normalized_mAP": round(float(m["mean_normalized_average_precision"].mean()), 4),
            "n_groups": len(m), "n_significant": n_sig, "fraction_significant": round(n_sig / len(m), 4),
            "n_queries": len(scored), "groups": groups}


def _tie_inclusive(m: pd.DataFrame, scored: pd.DataFrame, options: ProfilingOptions, cache_dir) -> pd.DataFrame:
    """p-values counting null mAPs >= the observed one, from the very null draws copairs used
    (same configurations, seed and cache), then copairs' BH correction."""
    from copairs.compute import get_null_dists
    from copairs.map import apply_fdr_correction

    confs, rev = np.unique(scored[["n_pos_pairs", "n_total_pairs"]].to_numpy(), axis=0, return_inverse=True)
    nulls = get_null_dists(confs, int(options.null_size), seed=int(options.seed), cache_dir=cache_dir,
                           progress_bar=False)
    rev = np.asarray(rev).reshape(-1)
    p = [(int((nulls[rev[list(idx)]].mean(axis=0) >= score - 1e-9).sum()) + 1) / (int(options.null_size) + 1)
         for score, idx in zip(m["mean_average_precision"], m["indices"])]
    m = m.rename(columns={"p_value": "p_value_strict"}).drop(columns=["corrected_p_value"])
    m["p_value"] = p
    m = apply_fdr_correction(m)
    m["below_corrected_p"] = m["corrected_p_value"] < float(options.threshold)
    return m


def _treatments(d: pd.DataFrame) -> np.ndarray:
    return (~d["negcon"] & (d["pert"] != "")).to_numpy()


def replicate_map(d: pd.DataFrame, x: np.ndarray, options: ProfilingOptions) -> dict:
    """Replicate retrieval: a treatment's replicates against every other perturbation's profiles."""
    treat = _treatments(d)
    if not treat.any():
        raise NotComputable("no treatment profiles (every profile is a negative control or unnamed)")
    _need_replicates(d, treat)
    keep = treat | d["negcon"].to_numpy()
    ap = average_precision(d.loc[keep, ["pert"]].reset_index(drop=True), x[keep],
                           ["pert"], [], [], ["pert"])
    ap = ap[(treat & d["query"].to_numpy())[keep]]
    out = _named(mean_average_precision(ap, "pert", options), d)
    out["n_without_replicates"] = _without_replicates(d, treat)
    return out


def activity_map(d: pd.DataFrame, x: np.ndarray, options: ProfilingOptions) -> dict:
    """Phenotypic activity (copairs' recipe): a treatment's replicates against the negative controls."""
    treat, ctrl = _treatments(d), d["negcon"].to_numpy()
    if not ctrl.any():
        raise NotComputable("no negative-control profiles (give --control COLUMN=VALUE if the metadata "
                            "names them differently)")
    if not treat.any():
        raise NotComputable("no treatment profiles (every profile is a negative control or unnamed)")
    _need_replicates(d, treat)
    keep = treat | ctrl
    meta = pd.DataFrame({"pert": d["pert"].to_numpy()[keep],
                         "ref": np.where(ctrl[keep], np.arange(int(keep.sum())), -1)})  # controls: no positives
    ap = average_precision(meta, x[keep], ["pert", "ref"], [], [], ["pert", "ref"])
    ap = ap[(treat & d["query"].to_numpy())[keep]]
    out = _named(mean_average_precision(ap, "pert", options), d)
    out["n_without_replicates"] = _without_replicates(d, treat)
    return out


def _need_replicates(d: pd.DataFrame, treat: np.ndarray) -> None:
    counts = d.loc[treat, "pert"].value_counts()
    queried = set(d.loc[treat & d["query"].to_numpy(), "pert"])
    if not any(counts[p] >= 2 for p in queried):
        raise NotComputable(f"no perturbation has two or more profiles (replicates) to retrieve: "
                            f"{len(queried)} queried perturbation(s), one profile each")


def _without_replicates(d: pd.DataFrame, treat: np.ndarray) -> int:
    counts = d.loc[treat, "pert"].value_counts()
    queried = set(d.loc[treat & d["query"].to_numpy(), "pert"])
    return int(sum(1 for p in queried if counts[p] < 2))


def consensus(keys: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, median profile of each key's rows)."""
    codes, uniq = pd.factorize(pd.Series(keys), sort=True)
    med = pd.DataFrame(x).groupby(codes, sort=True).median().to_numpy(dtype=np.float64)
    return np.asarray(uniq, dtype=object), med


def _labels(values: pd.Series) -> list[list[str]]:
    return [sorted({t.strip() for t in str(v).split("|") if t.strip()}) for v in _filled(values)]


def _labelled_map(keys, labels: list[list[str]], x: np.ndarray, options: ProfilingOptions, *,
                  extra: dict | None = None, diff: Sequence[str] = (), queries=None) -> dict:
    """mAP of profiles sharing a label (``label``, several allowed) against those sharing none."""
    have = np.array([bool(lab) for lab in labels])
    counts = pd.Series([t for lab, h in zip(labels, have) if h for t in lab]).value_counts()
    if not (counts >= 2).any():
        raise NotComputable("no annotation value is shared by two perturbations")
    multi = any(len(lab) > 1 for lab in labels)
    meta = pd.DataFrame({"key": np.asarray(keys)[have],
                         "label": [lab if multi else lab[0] for lab, h in zip(labels, have) if h],
                         **{k: np.asarray(v)[have] for k, v in (extra or {}).items()}})
    ap = average_precision(meta, x[have], ["label"], list(diff), [], ["label", *diff],
                           multilabel="label" if multi else None)
    if queries is not None:
        ap = ap[ap["modality"] == queries]
    return mean_average_precision(ap, "key" if queries is not None else "label", options)


def consistency_map(meta: pd.DataFrame, d: pd.DataFrame, x: np.ndarray, column: str,
                    options: ProfilingOptions) -> dict:
    """Phenotypic consistency: consensus profiles sharing a ``column`` value against the others."""
    treat = _treatments(d)
    if column not in meta.columns:
        raise NotComputable(f"the profiles have no {column} column")
    keys, xc = consensus(d.loc[treat, "pert"].to_numpy(), x[treat])
    first = (pd.DataFrame({"pert": d.loc[treat, "pert"].to_numpy(), "v": _filled(meta.loc[treat, column]).to_numpy()})
             .query("v != ''").groupby("pert")["v"].first())
    labels = _labels(pd.Series([first.get(k, "") for k in keys]))
    out = _labelled_map(keys, labels, xc, options)
    out["n_perturbations"] = int(sum(bool(lab) for lab in labels))
    return out


def read_sister_tables(specs: Sequence[str]) -> list[dict]:
    """Compound–gene tables: ``[modality=]path`` → [{modality, key_column, genes: {key: [gene, ...]}}].

    The key column is ``broad_sample`` (or another ``*broad_sample``/``JCP2022``/``pert_id`` column,
    else the first); genes come from ``target``/``genes``/``gene``; the modality from the spec,
    else from the file name (compound, crispr, orf).
    """
    out = []
    for spec in specs:
        mod, sep, path = str(spec).partition("=")
        if not sep or "/" in mod or "\\" in mod:
            mod, path = "", str(spec)
        path = Path(path)
        if not path.is_file():
            raise CellClipError(f"{path}: no such compound–gene table")
        name = path.name.lower()
        try:
            t = pd.read_csv(path, sep="\t" if ".tsv" in name or ".txt" in name else ",", dtype=str)
        except Exception as exc:  # noqa: BLE001 - pandas raises several types
            raise CellClipError(f"{path}: unreadable compound–gene table ({exc})") from None
        mod = mod or next((m for m in MODALITIES if m in name), "")
        if not mod:
            raise CellClipError(f"{path}: cannot tell the modality (compound, crispr, orf) from the file name; "
                                "give it as --sister MODALITY=PATH")
        gene = next((c for c in GENE_COLUMNS if c in t.columns), None)
        ids = [c for c in t.columns if c.lower().removeprefix("metadata_") in ("broad_sample", "jcp2022", "pert_id")]
        key = ids[0] if ids else t.columns[0]
        if gene is None or gene == key:
            raise CellClipError(f"{path}: no gene column (one of {', '.join(GENE_COLUMNS)})")
        genes: dict[str, list[str]] = {}
        for k, g in zip(_filled(t[key]), _labels(t[gene])):
            if k and g:
                genes.setdefault(k, [])
                genes[k] = sorted(set(genes[k]) | set(g))
        out.append({"modality": mod.lower(), "key_column": key, "path": str(path), "genes": genes})
    return out


def _profile_column(meta: pd.DataFrame, key_column: str, path: str) -> str:
    for c in (key_column, "Metadata_" + key_column.removeprefix("Metadata_")):
        if c in meta.columns:
            return c
    raise CellClipError(f"{path}: its key column {key_column!r} has no Metadata_{key_column.removeprefix('Metadata_')} "
                        "column in the profiles to join on")


def sister_map(meta: pd.DataFrame, d: pd.DataFrame, x: np.ndarray, tables: list[dict],
               options: ProfilingOptions) -> dict:
    """Compound ↔ gene matching: per genetic modality, compounds retrieving their target's perturbations."""
    if not tables:
        raise NotComputable("no compound–gene table given (--sister)")
    n = len(meta)
    key, gene, mod = np.full(n, "", object), [[] for _ in range(n)], np.full(n, "", object)
    for t in tables:
        vals = _filled(meta[_profile_column(meta, t["key_column"], t["path"])]).to_numpy()
        for i in np.flatnonzero(~d["negcon"].to_numpy() & (mod == "")):
            if vals[i] in t["genes"]:
                key[i], gene[i], mod[i] = vals[i], t["genes"][vals[i]], t["modality"]
    rows = np.flatnonzero(mod != "")
    if not len(rows):
        raise NotComputable("no profile's perturbation is in the compound–gene tables")
    keys, xc = consensus(np.array([f"{mod[i]}\x1f{key[i]}" for i in rows], dtype=object), x[rows])
    first = {f"{mod[i]}\x1f{key[i]}": (mod[i], gene[i]) for i in rows}
    kmod = np.array([first[k][0] for k in keys], dtype=object)
    query = "compound" if "compound" in set(kmod) else tables[0]["modality"]
    out = {}
    for target in [t for t in dict.fromkeys(tm["modality"] for tm in tables) if t != query]:
        sel = np.isin(kmod, [query, target])
        pair = f"{query}→{target}"
        labels = [first[k][1] for k in keys[sel]]
        shared = {g for lab, m in zip(labels, kmod[sel]) if m == query for g in lab} & \
                 {g for lab, m in zip(labels, kmod[sel]) if m == target for g in lab}
        if not shared:
            out[pair] = {"not_computed": f"no {query} shares a gene with a {target} perturbation in these profiles"}
            continue
        names = np.array([k.split("\x1f", 1)[1] for k in keys[sel]], dtype=object)
        out[pair] = _labelled_map(names, labels, xc[sel], options, extra={"modality": kmod[sel]},
                                  diff=("modality",), queries=query)
    if not out:
        raise NotComputable(f"only {query} perturbations in the compound–gene tables: nothing to match")
    return out


# ----------------------------------------------------------------- report
def profile_metrics(p: Profiles, metrics: Sequence[str], options: ProfilingOptions,
                    sisters: list[dict] | None = None) -> dict:
    """The copairs metrics of one profile table (a dict per metric, or why it was not computed)."""
    x = p.frame[p.features].to_numpy(np.float64)
    finite = np.isfinite(x).all(axis=0)
    if not finite.all():
        warnings.warn(f"{int((~finite).sum())} feature column(s) with missing or infinite values left out "
                      f"of the profiling metrics ({p.info.get('source', 'profiles')})", CellClipWarning, stacklevel=2)
        x = x[:, finite]
    if x.shape[1] == 0:
        raise CellClipError(f"{p.info.get('source', 'profiles')}: no feature column without missing values")
    d = design(p.frame, options)
    out = {**p.info, "n_profiles": len(x), "n_features": int(x.shape[1]),
           "n_negative_controls": int(d["negcon"].sum()),
           "n_perturbations": int(d.loc[_treatments(d), "pert"].nunique())}
    for m in [m for m in metrics if m in PROFILE_METRICS]:
        out[m] = _one_metric(m, p.frame, d, x, options, sisters)
    return out


def _one_metric(m: str, meta, d, x, options, sisters) -> dict:
    try:
        if m == "replicate":
            return replicate_map(d, x, options)
        if m == "activity":
            return activity_map(d, x, options)
        if m == "sister":
            return sister_map(meta, d, x, sisters or [], options)
        cols = list(options.annotations or [c for c in ANNOTATION_COLUMNS if c in meta.columns])
        if not cols:
            raise NotComputable("no annotation column (Metadata_moa, Metadata_target; --annotation COLUMN)")
        return {c: _safe(consistency_map, meta, d, x, c, options) for c in cols}
    except NotComputable as exc:
        return {"not_computed": str(exc)}


def _safe(fn, *args) -> dict:
    try:
        return fn(*args)
    except NotComputable as exc:
        return {"not_computed": str(exc)}


def profiling_report(sources: dict[str, Profiles], metrics: Sequence[str], options: ProfilingOptions, *,
                     required: bool = True) -> dict:
    """``{"options": ..., "sources": {name: metrics}}`` for every profile source.

    Without copairs installed: a CellClipError when ``required``, else a report saying so.
    """
    try:
        _copairs()
    except CellClipError as exc:
        if required:
            raise
        return {"not_computed": str(exc), "metrics": [m for m in metrics if m in PROFILE_METRICS]}
    sisters = read_sister_tables(options.sister) if "sister" in metrics and options.sister else None
    return {"metrics": [m for m in metrics if m in PROFILE_METRICS], "options": options.to_json(),
            "sources": {name: profile_metrics(p, metrics, options, sisters) for name, p in sources.items()}}


def _cells(res: dict) -> list[tuple[str, dict]]:
    """(column title, result) pairs of one source's report, in metric order."""
    out = []
    for m in PROFILE_METRICS:
        r = res.get(m)
        if r is None:
            continue
        if m in ("consistency", "sister") and "not_computed" not in r:
            out += [(f"{m} {k.removeprefix('Metadata_')}", v) for k, v in r.items()]
        else:
            out.append((m, r))
    return out


def format_profiling(report: dict) -> str:
    """A readable table: one row per profile source, mAP (significant/scored groups) per metric."""
    if "sources" not in report:
        return f"profiling metrics not computed: {report.get('not_computed', '?')}"
    rows = {name: dict(_cells(res)) for name, res in report["sources"].items()}
    titles = list(dict.fromkeys(t for cells in rows.values() for t in cells))
    notes: list[str] = []

    def cell(r):
        if r is None:
            return "-"
        if "not_computed" in r:
            if r["not_computed"] not in notes:
                notes.append(r["not_computed"])
            return f"n/a [{notes.index(r['not_computed']) + 1}]"
        return f"{r['mAP']:.3f} ({r['n_significant']}/{r['n_groups']})"

    head = ["profiles", "level", "n"] + titles
    body = [[name, str(res.get("level", "")), str(res.get("n_profiles", ""))]
            + [cell(rows[name].get(t)) for t in titles]
            for name, res in report["sources"].items()]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    opts = report.get("options", {})
    title = (f"mAP (copairs, cosine); in brackets: groups with FDR-corrected p < {opts.get('fdr_threshold', 0.05)} "
             "/ groups scored")
    lines = [title, fmt.format(*head)] + [fmt.format(*r) for r in body]
    lines += [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    for name, res in report["sources"].items():
        if res.get("well_profiles") and res.get("level") == "well":
            lines.append(f"{name}: well profile = {res['well_profiles']}")
    return "\n".join(lines)
