"""bnlab-report: every study's figures (PNG + SVG), summary.csv and a REPORT.md whose sections open
with a claim table and whose captions state the findings in numbers (mean and 95% interval, n
seeds), how to reproduce them and the code's git commit. What a section holds is the study's own
analysis (analysis/study.py: built-in, named by its YAML, or the default section): this module knows
no study by name.

    bnlab-report [study=NAME[,NAME...]] [tracking.uri=URI] [out=DIR] [--force]

Defaults: every known study (bnlab.studies: bnlab's and the project's conf/study/) that has runs, the project's store, <project>/results.
A study section already in DIR is never replaced by one with fewer runs used in the means (a store
with fewer or only failed runs) unless --force is given; each (config group, seed) counts once.
"""
from __future__ import annotations

import re
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import study as ST
from bnlab.analysis import verdicts as V
from bnlab.analysis.frames import COLLAPSE_RULE
from bnlab.analysis.runs import StoreNotFound, list_experiments, load_curves, load_runs
from bnlab.config import DIVERGED_LOSS
from bnlab import studies as study_files
from bnlab.store import project_home, resolve_uri

USAGE = "usage: bnlab-report [study=NAME[,NAME...]] [tracking.uri=URI] [out=DIR] [--force]"


DPI = 120


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per config group (the params that vary, seeds pooled): run counts, then for every
    final/ metric its mean, 95% CI half-width and n over the usable (finished, converged) seeds."""
    groups = fr.varying(runs)
    metrics = sorted(c for c in runs.columns if c.startswith(fr.FINAL))
    key = runs[groups].apply(fr.hashable) if groups else pd.DataFrame(index=runs.index)
    rows = []
    grouped = key.groupby(groups, dropna=False, sort=True) if groups else [((), key)]
    for k, idx in grouped:
        g = runs.loc[idx.index]
        ok, left, n_div = fr.split_runs(g)
        row = dict(zip(groups, k if isinstance(k, tuple) else (k,))) if groups else {}
        row.update(n_runs=len(g), n_seeds=int(ok["seed"].nunique()) if "seed" in ok else len(ok),
                   n_diverged=n_div, left_out=fr.left_out_text(left),
                   n_collapsed=int(g["collapsed"].sum()) if "collapsed" in g else 0)
        for m in metrics:
            mean, ci, n = S.mean_ci(ok[m])
            name = m[len(fr.FINAL):]
            row[f"{name}:mean"], row[f"{name}:ci95"], row[f"{name}:n"] = mean, ci, n
        rows.append(row)
    return pd.DataFrame(rows)


def commits_text(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "unknown"
    c = runs["git_commit"].fillna("unknown").astype(str)
    d = runs["git_dirty"].map(lambda v: "uncommitted changes" if v is True else
                              ("clean" if v is False else "dirty flag unknown"))
    if "tags.bnlab.version" in runs:  # an installed bnlab has no commit: its version says which code ran
        none = (c == "unknown") & runs["tags.bnlab.version"].notna()
        c, d = c.where(~none, "bnlab " + runs["tags.bnlab.version"].astype(str)), d.where(~none, "installed")
    counts = pd.DataFrame({"c": c, "d": d}).value_counts()
    return "; ".join(f"`{sha if sha.startswith('bnlab ') else sha[:12]}` ({state}, {n} run{'s' if n != 1 else ''})"
                     for (sha, state), n in counts.items())


def devices_text(runs: pd.DataFrame) -> str:
    """What the runs ran on (tag bnlab.device_used), with counts; runs made before bnlab recorded it
    show the device they asked for (train.device, e.g. auto) as such."""
    if runs.empty:
        return "unknown"
    used = runs["tags.bnlab.device_used"] if "tags.bnlab.device_used" in runs else pd.Series(None, index=runs.index)
    asked = runs["tags.bnlab.train.device"] if "tags.bnlab.train.device" in runs else pd.Series(None, index=runs.index)
    text = used.where(used.notna(), "not recorded (train.device=" + asked.fillna("?").astype(str) + ")")
    return "; ".join(f"{name} ({n} {_runs(n)})" for name, n in text.value_counts().items())


def _runs(n: int) -> str:
    return "run" if n == 1 else "runs"


def runs_text(runs: pd.DataFrame) -> str:
    ok, left, n_div = fr.split_runs(runs)
    txt = f"{len(runs)} {_runs(len(runs))}, {len(ok)} used in the means. Left out: "
    txt += f"{fr.left_out_text(left)} {_runs(sum(left.values()))}" if left else "none"
    if n_div:
        txt += (f". Diverged (finished, loss NaN/inf or above {DIVERGED_LOSS:g}): {n_div} {_runs(n_div)}, "
                "marked in the figures, not averaged")
    dup = int(runs["collapsed"].sum()) if "collapsed" in runs else int(runs.attrs.get("duplicates", 0))
    txt += (f". Each (config group, seed) counted once (the first FINISHED run): {dup} more {_runs(dup)} of a "
            "group and seed already counted collapsed" if dup else ". Collapsed (a group and seed counted once): none")
    return txt + "."


def reproduce_text(study: str) -> str:
    if ST.study_file(study) is not None:
        return f"`bnlab-train study={study}` then `bnlab-report study={study}`"
    return (f"each run's overrides are in its tag bnlab.overrides (`bnlab-train <overrides> "
            f"tracking.experiment={study}`), then `bnlab-report study={study}`")


def safe_uri(uri: str) -> str:
    """The URI without a user:password@ part (REPORT.md is committed)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def store_text(uri: str) -> str:
    """The store as REPORT.md shows it: a SQLite file inside the project as sqlite:///<relative
    path> (no machine's absolute path in a committed file), anything else without credentials."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        try:
            return f"sqlite:///{path.resolve().relative_to(project_home().resolve()).as_posix()} (in the project)"
        except ValueError:
            return f"sqlite:///.../{path.name} (outside the project)"
    return safe_uri(uri)


def _save(fig, base: Path) -> List[Path]:
    paths = [base.with_suffix(".png"), base.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=DPI)
    fig.savefig(paths[1], metadata={"Date": None})  # no timestamp: the SVG changes only with the data
    return paths


class Kept(RuntimeError):
    """A study section was left as it is: the store would give fewer runs used in the means."""


def used_in_section(section: Path) -> Optional[int]:
    """Runs used in the means according to an existing section.md, if there is one."""
    if not section.is_file():
        return None
    m = re.search(r"(\d+) used in the means", section.read_text())
    return int(m.group(1)) if m else None


def report_study(study: str, uri: str, out: Path, log=print, force: bool = False) -> Optional[Path]:
    """Figures, summary.csv and section.md of one study in out/<study>/; None if it has no runs.
    Raises Kept (writing nothing) where out/<study> holds a section with more runs used in the
    means than the store gives, unless force."""
    runs = load_runs(study, uri)
    if runs.empty:
        log(f"[{study}] no runs in {safe_uri(uri)}: skipped")
        return None
    folder = out / study
    before, now = used_in_section(folder / "section.md"), len(fr.split_runs(runs)[0])
    if before is not None and now < before and not force:
        raise Kept(f"[{study}] kept {folder}: it uses {before} runs in the means, the store gives {now} "
                   f"({runs_text(runs)}); --force replaces it")
    curves = load_curves(study, uri, runs=runs)
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{study}] {runs_text(runs)}")
    summary = summary_table(runs)
    summary.to_csv(folder / "summary.csv", index=False)
    log(f"[{study}] wrote {folder / 'summary.csv'} ({len(summary)} config groups)")
    analysis = ST.get_study(study)
    data = analysis.prepare(runs, curves)  # what the study derives from its runs: once
    # Seeds added round by round (bnlab-decide tags its runs) are read with the anytime-valid
    # confidence sequence; seeds fixed before the study ran, with the fixed-n t-interval.
    method = V.method_for(runs)
    with V.using(method):
        lines = [f"## {study}", ""] + ST.claim_table(analysis, data)
    q = ST.study_question(study)
    if q:
        lines += [f"**Question.** {q}", ""]
    lines += [f"- Runs: {runs_text(runs)}",
              f"- Reproduce: {reproduce_text(study)}",
              f"- Code: {commits_text(runs)}",
              f"- Device: {devices_text(runs)}",
              f"- Store: `{store_text(uri)}`, report generated {time.strftime('%Y-%m-%d %H:%M %Z')}",
              f"- Summary per config group: [{study}/summary.csv]({study}/summary.csv)",
              f"- Verdicts: {'anytime-valid confidence sequence (seeds added in rounds)' if method == V.SEQUENTIAL else 'fixed-n t-interval (seeds fixed in advance)'}"
              + (f"; {decided}" if (decided := _decide_summary(study, uri)) else ""),
              "- Intervals: accuracies on the logit scale, other quantities mean ± t half-width (see the header)", ""]
    if analysis.module == "default":
        lines[-1:-1] = ["- Analysis: the default section (final metrics against each key the study varies); a "
                        "study YAML can name its own module (`analysis: package.module`) and declare claims"]
    failed = 0
    for spec in analysis.figures:
        if not spec.needs(data):
            log(f"[{study}] {spec.name}: no data for it, skipped")
            continue
        try:
            fig = spec.make(data)
            caption = spec.caption(data)
            paths = _save(fig, folder / spec.name)
        except Exception as e:  # one broken figure must not lose the others
            failed += 1
            log(f"[{study}] {spec.name}: FAILED: {e}\n{traceback.format_exc()}")
            lines += [f"### {spec.name}", "", f"Figure could not be drawn: `{e}`", ""]
            continue
        title = " ".join(fig.get_suptitle().split()) or spec.name
        lines += [f"### {title}", "",
                  f"![{spec.name}]({study}/{paths[0].name})", "",
                  f"*{caption}* Vector version: [{study}/{paths[1].name}]({study}/{paths[1].name}).", ""]
        log(f"[{study}] wrote {paths[0]} and {paths[1].name}")
    section = folder / "section.md"
    section.write_text("\n".join(lines))
    _attach(study, uri, folder, log)
    if failed:
        raise RuntimeError(f"{failed} figure(s) of study {study} failed")
    return section


def _decide_summary(study: str, uri: str) -> Optional[str]:
    """What bnlab-decide recorded on the study's experiment (rounds, wall time, last line), if it ran."""
    from bnlab.decide import summary

    try:
        return summary(study, uri)
    except Exception:  # noqa: BLE001 - the record is extra information, never a reason to fail
        return None


def _attach(study: str, uri: str, folder: Path, log) -> None:
    """The figures and summary.csv also go to the study's latest sweep run (MLflow UI, Artifacts)."""
    from bnlab.tracking import attach_to_latest_sweep

    try:
        run_id = attach_to_latest_sweep(uri, study, folder)
    except Exception as e:  # noqa: BLE001 - a read-only store must not lose the report itself
        log(f"[{study}] could not attach the report to its sweep run: {e}")
        return
    if run_id:
        log(f"[{study}] attached to sweep run {run_id} (artifacts report/)")


def assemble(out: Path, studies_first: Sequence[str]) -> Path:
    """REPORT.md from every out/<study>/section.md (known studies first, in their order)."""
    sections = {p.parent.name: p for p in out.glob("*/section.md")}
    order = [s for s in studies_first if s in sections] + sorted(s for s in sections if s not in studies_first)
    head = ["# bnlab report", "",
            "Generated by `bnlab-report` from the MLflow runs. Every number is a mean over seeds with its 95% "
            f"interval and n the number of seeds (no interval for n = 1). Intervals: {S.CI_METHOD}. In the "
            f"figures, where a group has at most {P.SEED_LINES_MAX_N} seeds each seed is also drawn as a thin line. "
            "Each study section opens with a table: the claim and its source, what bnlab measured, its verdict "
            "by the rule stated in the row, and how the rule's interval was made (sections without an 'Intervals' line were written by an "
            "earlier bnlab-report: mean ± the 95% t half-width for every quantity, and no claim table). Runs that "
            "failed, were killed or are still running are left out and counted; diverged runs are marked "
            "in the figures and not averaged. Each section gives the command that reproduces it and the "
            f"git commit of its runs. Each (config group, seed) counts once: {COLLAPSE_RULE}; each section says "
            "how many runs were collapsed (summary.csv: n_collapsed).", "",
            "Verdicts: " + "; ".join(f"*{w}*: {V.MEANINGS[w]}" for w in V.VERDICTS) + ". " + V.METHODS_TEXT, ""]
    body = [sections[s].read_text() for s in order]
    report = out / "REPORT.md"
    report.write_text("\n".join(head + body))
    return report


def parse_args(argv: Sequence[str]) -> Dict[str, str]:
    args: Dict[str, str] = {}
    for a in argv:
        if a == "--force":
            args["force"] = "true"
            continue
        key, sep, value = a.partition("=")
        if not sep or key not in ("study", "tracking.uri", "out"):
            raise ValueError(f"unknown argument {a!r}")
        args[key] = value
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """bnlab-report [study=NAME[,NAME...]] [tracking.uri=URI] [out=DIR]"""
    import matplotlib

    matplotlib.use("Agg")
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"bnlab-report: {e}\n{USAGE}", file=sys.stderr)
        return 2
    uri = resolve_uri(args.get("tracking.uri") or None)
    out = Path(args["out"]).expanduser().resolve() if args.get("out") else project_home() / "results"
    inside = study_files.installed_location(out)
    if inside:
        print(f"bnlab-report: out={out} is inside {inside}; run bnlab-report in your project folder "
              f"(or set BNLAB_HOME, or out=DIR)", file=sys.stderr)
        return 2
    known = ST.known_studies()
    try:
        if args.get("study"):
            studies = [s for s in args["study"].split(",") if s]
            unknown = [s for s in studies if s not in known]
            if unknown:
                # An experiment that is not a study (tracking.experiment=NAME) may be reported too.
                try:
                    exps = set(list_experiments(uri)["name"]) - {"Default"}
                except StoreNotFound:
                    exps = set()
                unknown = [s for s in unknown if s not in exps]
                if unknown:
                    extra = f"; other experiments in the store: {', '.join(sorted(exps - set(known)))}" \
                        if exps - set(known) else ""
                    print(f"bnlab-report: unknown study {', '.join(map(repr, unknown))}; studies: "
                          f"{', '.join(known)}{extra}", file=sys.stderr)
                    return 2
        else:
            exps = list_experiments(uri)
            have = set(exps.loc[exps["n_runs"] > 0, "name"])
            studies = [s for s in known if s in have]
            others = sorted(have - set(known) - {"Default"})
            if others:
                print(f"bnlab-report: also in the store (not studies; `bnlab-report study=NAME`): {', '.join(others)}")
            if not studies:
                print(f"bnlab-report: no study has runs in {uri}")
                return 0
    except StoreNotFound as e:
        print(f"bnlab-report: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unreachable server, a store of an unknown schema
        print(f"bnlab-report: cannot read the runs in {safe_uri(uri)}: {e}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    print(f"bnlab-report: studies {', '.join(studies)} from {safe_uri(uri)} -> {out}")
    errors = 0
    written = 0
    for study in studies:
        try:
            written += report_study(study, uri, out, force=bool(args.get("force"))) is not None
        except Kept as e:
            print(f"bnlab-report: {e}", file=sys.stderr)
            errors += 1
        except StoreNotFound as e:
            print(f"bnlab-report: {e}", file=sys.stderr)
            return 1
        except RuntimeError as e:
            print(f"bnlab-report: {e}", file=sys.stderr)
            errors += 1
    if written:
        print(f"bnlab-report: wrote {assemble(out, known)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
