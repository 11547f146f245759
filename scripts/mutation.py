#!/usr/bin/env python
"""Mutation testing of napari-cellclip, one module at a time, with mutmut 3.

    python scripts/mutation.py                      # every module in MODULES
    python scripts/mutation.py ann store --max-children 2
    python scripts/mutation.py --list               # modules, sources, test selections
    python scripts/mutation.py --source src/napari_cellclip/fields.py --tests tests/test_fields.py
    make mutation MODULES="ann store"
    python scripts/mutation.py model --survivors    # rerun only the last run's survivors

Each module is mutated alone (mutmut's ``only_mutate``) and judged by its own scoped, fast set
of test files (``MODULES`` below), in a scratch copy of the repository under
``build/mutation/<module>/`` (the working tree is never touched).  mutmut runs, for every
mutant, only the tests that reach the mutated function.  Results go to
``benchmarks/mutation_results.json`` and the table + survivor lists of
``benchmarks/MUTATION.md`` are regenerated from it (modules not run keep their last result).

A surviving mutant is either killed by a new test or listed in
``benchmarks/mutation_equivalents.toml`` (module, function, the line removed and the line added
by the mutant, and why no test can tell it from the original); the table shows the raw score
and the score without those.

Not part of CI: a module takes minutes to an hour on 2 cores.  Rerun it after big changes.
"""

from __future__ import annotations

import argparse
import hashlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "mutation_results.json"
REPORT = ROOT / "benchmarks" / "MUTATION.md"
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalents.toml"
WORK = ROOT / "build" / "mutation"
TARGET = 0.85
#: pytest plugins the core selections do not need and every mutant's fresh pytest session would
#: pay for (a virtual X server, napari's fixtures: ~10 s per mutant)
NO_PLUGINS = ["-p", "no:xvfb", "-p", "no:napari", "-p", "no:npe2"]


@dataclass
class Module:
    source: str
    tests: list[str]
    #: extra pytest arguments (e.g. ``-k "not slow_cli"``) narrowing the selection
    pytest_args: list[str] = field(default_factory=list)


#: module -> (source file, the test files that judge it).  Keep each selection to the tests that
#: exercise the module and run in seconds; no subprocess tests (they would import the
#: unmutated package) and no widget tests.
MODULES: dict[str, Module] = {
    "losses": Module("src/napari_cellclip/losses.py", ["tests/test_losses.py", "tests/test_losses_contract.py"]),
    "correction": Module("src/napari_cellclip/correction.py",
                         ["tests/test_correction.py", "tests/test_tvn_shrinkage.py",
                          "tests/test_correction_persistence.py", "tests/test_correction_options.py",
                          "tests/test_correction_inputs.py", "tests/test_correction_numerics.py",
                          "tests/test_correction_control_flags.py"]),
    "prompts": Module("src/napari_cellclip/prompts.py",
                      ["tests/test_metadata.py", "tests/test_prompt_length.py", "tests/test_prompts_rules.py",
                       "tests/test_prompts_identifiers.py", "tests/test_prompts_controls.py",
                       "tests/test_prompts_clauses.py"]),
    "ann": Module("src/napari_cellclip/ann.py",
                  ["tests/test_ann.py", "tests/test_ann_behaviour.py", "tests/test_ann_gpu.py",
                   "tests/test_ann_calibration.py", "tests/test_ann_contract.py", "tests/test_ann_io.py",
                   "tests/test_ann_store.py"]),
    "store": Module("src/napari_cellclip/store.py",
                    ["tests/test_store.py", "tests/test_search.py", "tests/test_store_files.py",
                     "tests/test_store_wells.py", "tests/test_store_tables.py"]),
    "model": Module("src/napari_cellclip/model.py",
                    ["tests/test_model.py", "tests/test_model_behaviour.py", "tests/test_model_config.py",
                     "tests/test_model_text.py", "tests/test_model_devices.py", "tests/test_model_tuning.py",
                     "tests/test_model_visual.py", "tests/test_model_layernorm.py"]),
    "images": Module("src/napari_cellclip/images.py",
                     ["tests/test_plates.py", "tests/test_plate_sampling.py", "tests/test_features.py",
                      "tests/test_formats.py", "tests/test_reader.py", "tests/test_bad_input.py",
                      "tests/test_images_read.py", "tests/test_images_finite.py", "tests/test_images_rows.py",
                      "tests/test_images_normalize.py", "tests/test_images_sampling.py"],
                     # test_bad_input: only its pixel tests (the rest trains, loads checkpoints, runs CLIs)
                     ["-k", "not viewer_opens and (not test_bad_input or pixels or all_nan or tiny_first)"]),
    "plates": Module("src/napari_cellclip/plates.py",
                     ["tests/test_plates.py", "tests/test_plate_sampling.py", "tests/test_formats.py",
                      "tests/test_fields.py", "tests/test_plates_sniff.py", "tests/test_plates_names.py",
                      "tests/test_plates_load_data.py", "tests/test_plates_layouts.py",
                      "tests/test_plates_stain_names.py"]),
    "search": Module("src/napari_cellclip/search.py",
                     ["tests/test_search.py", "tests/test_ann.py", "tests/test_ann_behaviour.py",
                      "tests/test_search_ranking.py", "tests/test_search_zero_shot.py",
                      "tests/test_search_control.py"]),
    # the training loop lives in training/train.py since the one-road split (loop.py is its entry point)
    # judged by fast tests on tiny synthetic features and a tiny text tower (tests/_train_data.py): the
    # fits of test_training*.py (real plates, MiniLM) take ~100 s, paid again by every mutant
    "training/train": Module("training/train.py",
                             ["tests/test_train_step.py", "tests/test_train_outputs.py", "tests/test_train_resume.py",
                              "tests/test_train_metrics.py", "tests/test_train_ddp_rank.py",
                              "tests/test_train_progress.py"]),
}


# --------------------------------------------------------------------------- running
def _workdir(name: str) -> Path:
    return WORK / name.replace("/", "_")


def _prepare(name: str, mod: Module, timeout_constant: float = 30.0) -> Path:
    """A fresh scratch copy: src/, training/, tests/, pyproject.toml, and mutmut's setup.cfg."""
    work = _workdir(name)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for d in ("src", "training", "tests"):
        shutil.copytree(ROOT / d, work / d, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    missing = [t for t in mod.tests if not (ROOT / t).is_file()]
    if missing or not (ROOT / mod.source).is_file():
        raise SystemExit(f"{name}: missing {[mod.source] if not (ROOT / mod.source).is_file() else missing}")

    def lines(values):
        return "".join(f"\n    {v}" for v in values)

    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        f"source_paths ={lines(['src', 'training'])}\n"
        f"only_mutate ={lines([mod.source])}\n"
        f"pytest_add_cli_args_test_selection ={lines(mod.tests)}\n"
        f"pytest_add_cli_args ={lines(['-p', 'no:cacheprovider', *NO_PLUGINS, *mod.pytest_args])}\n"
        # torch is not fork-safe once its thread pools run: fork each mutant from a clean server
        "process_isolation = forkserver\n"
        "use_git_change_detection = false\n"
        # a mutant's tests may take (estimate + constant) * multiplier seconds of wall time before
        # it counts as a timeout (killed): generous, the machine is shared
        f"timeout_constant = {timeout_constant}\n"
        "timeout_multiplier = 10\n"
    )
    return work


def _run_mutmut(work: Path, max_children: int, names: list[str] = ()) -> float:
    env = dict(os.environ)
    # subprocesses started by tests import the mutated copy, never the working tree (the
    # folders must exist before Python starts: a missing sys.path entry is cached as empty)
    (work / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    env["PYTHONPATH"] = os.pathsep.join([str(work / "mutants" / "src"), str(work / "mutants")])
    env["NAPARI_CELLCLIP_CACHE"] = str(work / "cache")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"  # one thread per mutant process; --max-children sets the parallelism
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut) if mutmut.exists() else "mutmut", "run", "--max-children", str(max_children), *names]
    t0 = time.perf_counter()
    with open(work / "mutmut.log", "w") as log:
        p = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if p.returncode != 0:
        tail = (work / "mutmut.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"mutmut failed in {work} (exit {p.returncode}):\n{tail}")
    return time.perf_counter() - t0


_SHOW = r"""
import json, sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
out = {}
for name in json.load(sys.stdin):
    out[name] = get_diff_for_mutant(name, path=find_mutant(name).path)
print(json.dumps(out))
"""


def _diffs(work: Path, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    p = subprocess.run([sys.executable, "-c", _SHOW], cwd=work, input=json.dumps(names), capture_output=True,
                       text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"could not read the mutant diffs in {work}:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _changed_lines(diff: str) -> tuple[str, str]:
    """(removed, added) code of a mutant's unified diff, whitespace-stripped, joined by ' / '."""
    rem = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    add = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " / ".join(rem), " / ".join(add)


def _function(mutant: str) -> str:
    """``napari_cellclip.ann.xǁAnnIndexǁsearch__mutmut_3`` -> ``AnnIndex.search``."""
    base = mutant.rpartition("__mutmut_")[0].rpartition(".")[2]
    if base.startswith("x\u01c1"):
        return ".".join(base[2:].split("\u01c1"))
    return base[2:] if base.startswith("x_") else base


ALIVE = ("survived", "no tests", "suspicious")


def _source_digest(source: str, root: Path = ROOT) -> str:
    return hashlib.sha256((root / source).read_bytes()).hexdigest()


def _survivors_to_rerun(name: str, mod: Module, previous: dict | None) -> list[str]:
    """The last full run's live mutants, if the source is byte for byte the one that run mutated.

    Tests were only added since (never removed), so a mutant killed then is still killed: only the
    survivors need to run again.  Mutant names are stable while the source file is unchanged."""
    if not previous:
        raise SystemExit(f"{name}: --survivors needs an earlier full run of the module")
    digest = previous.get("source_sha256")
    if digest is None:  # results saved before digests were recorded: compare with the run's commit
        commit = previous["commit"].partition("+")[0]
        same = subprocess.run(["git", "diff", "--quiet", commit, "--", mod.source], cwd=ROOT,
                              check=False).returncode == 0 and "+changes" not in previous["commit"]
    else:
        same = digest == _source_digest(mod.source)
    if not same:
        raise SystemExit(f"{name}: {mod.source} changed since its last full run; run the module in full")
    return [s["mutant"] for s in previous["survivors"]]


def _collect(work: Path, mod: Module, previous: dict | None = None) -> dict:
    """Counts and live mutants; with ``previous`` (a survivors-only rerun) the mutants not rerun
    keep their earlier status."""
    from mutmut.stats import status_by_exit_code

    meta = work / "mutants" / (mod.source + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    if previous is not None:
        rerun = {s["mutant"] for s in previous["survivors"]}
        codes = {k: c for k, c in codes.items() if k in rerun}
        counts = dict(previous["counts"])
        for s in previous["survivors"]:
            counts[s["status"]] -= 1
        codes_status = {k: status_by_exit_code[c] for k, c in codes.items()}
        for st in codes_status.values():
            counts[st] = counts.get(st, 0) + 1
        counts = {k: v for k, v in counts.items() if v}
    else:
        counts = {}
        for code in codes.values():
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
    alive = [k for k, c in codes.items() if status_by_exit_code[c] in ALIVE]
    diffs = _diffs(work, alive)
    survivors = []
    for k in sorted(alive, key=lambda s: (_function(s), int(s.rpartition("_")[2]))):
        removed, added = _changed_lines(diffs.get(k, ""))
        survivors.append({"mutant": k, "status": status_by_exit_code[codes[k]], "function": _function(k),
                          "removed": removed, "added": added})
    return {"counts": counts, "survivors": survivors}


# --------------------------------------------------------------------------- equivalents
def load_equivalents() -> list[dict]:
    if not EQUIVALENTS.is_file():
        return []
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(EQUIVALENTS.read_text()).get("equivalent", [])


def _norm(code: str) -> str:
    return " ".join(code.split())


def equivalence(module: str, survivor: dict, equivalents: list[dict]) -> str | None:
    """The recorded reason why ``survivor`` is equivalent, or None."""
    for e in equivalents:
        if (e.get("module") == module and e.get("function") == survivor["function"]
                and _norm(e.get("removed", "")) == _norm(survivor["removed"])
                and _norm(e.get("added", "")) == _norm(survivor["added"])):
            return e.get("why", "")
    return None


def score(counts: dict, n_equivalent: int = 0) -> float | None:
    judged = sum(counts.values()) - counts.get("skipped", 0) - counts.get("not checked", 0) - n_equivalent
    killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("caught by type check", 0) \
        + counts.get("segfault", 0)
    return killed / judged if judged > 0 else None


# --------------------------------------------------------------------------- report
def _git_commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "training", "tests"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    return (p.stdout.strip() or "?") + ("+changes" if dirty else "")


def _rerun_note(r: dict) -> str:
    x = r.get("survivors_rerun")
    return f"; its {x['mutants']} survivors rerun {x['date']} `{x['commit']}` ({x['minutes']} min)" if x else ""


def _stale(results: dict, equivalents: list[dict]) -> str:
    """The equivalents of measured modules that no survivor of their last run matches."""
    stale = [e for e in equivalents if e.get("module") in results
             and not any(equivalence(e["module"], s, [e]) is not None for s in results[e["module"]]["survivors"])]
    if not stale:
        return "\nNone."
    return "\n" + "\n".join(f"- {e['module']}: `{e['function']}`: `{e['removed']}` → `{e['added']}`" for e in stale)


def write_report(results: dict) -> None:
    eq = load_equivalents()
    rows, eq_parts, open_parts = [], [], []
    for name in [m for m in MODULES if m in results] + sorted(set(results) - set(MODULES)):
        r = results[name]
        c = r["counts"]
        equiv = [(s, why) for s in r["survivors"] if (why := equivalence(name, s, eq)) is not None]
        unexplained = [s for s in r["survivors"] if equivalence(name, s, eq) is None]
        raw, adj = score(c), score(c, len(equiv))
        fmt = (lambda v: "–" if v is None else f"{100 * v:.1f} %")  # noqa: E731
        ok = "✓" if adj is not None and adj >= TARGET else "✗"
        rows.append(f"| {name} | `{r['source']}` | {len(r['tests'])} files | {sum(c.values())} | "
                    f"{c.get('killed', 0)} | {c.get('timeout', 0)} | {c.get('survived', 0)} | "
                    f"{c.get('no tests', 0)} | {len(equiv)} | {fmt(raw)} | {fmt(adj)} {ok} | "
                    f"{r['minutes']:.0f} min | {r['date']} `{r['commit']}`{_rerun_note(r)} |")
        if equiv:
            eq_parts.append(f"\n### {name}\n")
            eq_parts += [f"- `{s['function']}`: `{s['removed']}` → `{s['added']}` — {why}" for s, why in equiv]
        if unexplained:
            open_parts.append(f"\n### {name}\n")
            open_parts += [f"- {s['status']}: `{s['function']}`: `{s['removed']}` → `{s['added']}` "
                           f"(`{s['mutant']}`)" for s in unexplained]
    selections = "\n".join(f"- **{n}**: `{m.source}` ← {', '.join(f'`{t}`' for t in m.tests)}"
                           + (f" (pytest {' '.join(m.pytest_args)})" if m.pytest_args else "")
                           for n, m in MODULES.items())
    cols = ["module", "source", "tests", "mutants", "killed", "timeout", "survived", "no tests", "equivalent",
            "score", "score w/o equivalent", "time", "run"]
    table_head = "| " + " | ".join(cols) + " |"
    text = f"""# Mutation testing

How well the tests catch bugs: [mutmut](https://github.com/boxed/mutmut) 3 changes one thing at a
time in a module (an operator, a constant, a condition, an argument) and runs the tests that reach
the changed function; a mutant the tests do not notice *survives*.  Score = killed (failed test or
timeout) / mutants.  Each module is judged only by its own scoped test files (below), so the
score says how well *those* tests pin the module.  Target: ≥ {100 * TARGET:.0f} % per module, every
survivor either killed by a new test or listed as equivalent (it cannot change behaviour) in
`benchmarks/mutation_equivalents.toml`.

Command (not run in CI: minutes to an hour per module on 2 cores; rerun after big changes):

    make mutation                                   # all modules below
    make mutation MODULES="ann store"               # some of them
    nice python scripts/mutation.py ann --max-children 2

Raw results: `benchmarks/mutation_results.json`; scratch copies in `build/mutation/<module>/`
(`cd` there and `mutmut browse` / `mutmut show <mutant>` to inspect).

{table_head}
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Test selections

{selections}

## Surviving mutants judged equivalent
{chr(10).join(eq_parts) if eq_parts else chr(10) + "None."}

## Surviving mutants not explained yet
{chr(10).join(open_parts) if open_parts else chr(10) + "None."}

## Recorded equivalents that match no survivor of the last run

Left from an older source or test set (the line changed, or a test now kills the mutant): delete them
from `benchmarks/mutation_equivalents.toml`.
{_stale(results, eq)}
"""
    REPORT.write_text(text)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"modules to run (default: all of {', '.join(MODULES)})")
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (default 2)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds added to a mutant's estimated test time before x10 wall-clock timeout (30)")
    ap.add_argument("--list", action="store_true", help="print the modules and their test selections")
    ap.add_argument("--source", help="an ad-hoc module: its source file (with --tests)")
    ap.add_argument("--tests", nargs="+", help="test files for --source")
    ap.add_argument("--survivors", action="store_true",
                    help="rerun only the last full run's surviving mutants (after adding tests; the source "
                         "must be unchanged), keeping the other mutants' results")
    ap.add_argument("--report-only", action="store_true", help="rewrite MUTATION.md from the saved results")
    a = ap.parse_args(argv)
    if a.list:
        for n, m in MODULES.items():
            print(f"{n:14s} {m.source:40s} {' '.join(m.tests)} {' '.join(m.pytest_args)}")
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if a.report_only:
        write_report(results)
        return 0
    todo = dict(MODULES)
    if a.source:
        if not a.tests:
            ap.error("--source needs --tests")
        name = Path(a.source).with_suffix("").as_posix().removeprefix("src/napari_cellclip/")
        todo = {name: Module(a.source, a.tests)}
    elif a.modules:
        unknown = [m for m in a.modules if m not in MODULES]
        if unknown:
            ap.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
        todo = {m: MODULES[m] for m in a.modules}
    status = 0
    for name, mod in todo.items():
        print(f"== {name}: {mod.source} <- {' '.join(mod.tests)}", flush=True)
        previous = results.get(name) if a.survivors else None
        names = _survivors_to_rerun(name, mod, previous) if a.survivors else []
        if a.survivors and not names:
            print("   no survivors to rerun", flush=True)
            continue
        work = _prepare(name, mod, a.timeout)
        # what was mutated: the copy made now (the working tree may change during a long run)
        commit, digest = _git_commit(), _source_digest(mod.source, work)
        seconds = _run_mutmut(work, a.max_children, names)
        r = _collect(work, mod, previous)
        r.update(source=mod.source, tests=mod.tests, pytest_args=mod.pytest_args, minutes=seconds / 60,
                 date=_dt.date.today().isoformat(), commit=commit, source_sha256=digest,
                 command=f"python scripts/mutation.py {name} --max-children {a.max_children}")
        if previous is not None:  # the full run's time and commit, and what this rerun did
            r.update(minutes=previous["minutes"], command=previous["command"],
                     full_run={k: previous[k] for k in ("date", "commit")},
                     survivors_rerun={"date": r["date"], "commit": r["commit"], "mutants": len(names),
                                      "minutes": round(seconds / 60, 1)})
            r["date"], r["commit"] = previous["date"], previous["commit"]
        # re-read before writing: another run (another module) may have saved its rows meanwhile
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        results[name] = r
        RESULTS.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        write_report(results)
        eq = load_equivalents()
        n_eq = sum(equivalence(name, s, eq) is not None for s in r["survivors"])
        adj = score(r["counts"], n_eq)
        print(f"   {r['counts']}  score {score(r['counts']):.3f}, without {n_eq} equivalent {adj:.3f} "
              f"({seconds / 60:.1f} min)", flush=True)
        if adj is None or adj < TARGET:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
