"""Regenerate the README "Performance" section from the committed benchmark results.

    python -m benchmarks.publish --print          # show the section
    python -m benchmarks.publish --write          # replace it in README.md, between
                                                  # <!-- perf:begin --> and <!-- perf:end -->

Reads ``benchmarks/results/<run>/results.json`` (run folders named like ``2026-11-26_h200``;
``latest`` is the scratch folder and is skipped unless named with --runs), newest first. For each
run: the conditions (device, torch, CUDA, cuDNN), then one line per med3d_ext row with its median
and its ratio against every baseline measured in the same run (marked where that baseline's own
output was not checked), with shapes and dtypes; a row without a ratio says why. What was not
measured, baselines included, is listed under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    from .rows import caveats, unchecked
except ImportError:  # run as a file, not as benchmarks.publish
    from benchmarks.rows import caveats, unchecked

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


class PublishError(ValueError):
    """Nothing (or not everything asked for) could be read: the README is left as it is."""


def run_names(results_dir: str = RESULTS, runs: list[str] | None = None,
              max_runs: int | None = None) -> list[str]:
    """The run folders to publish: ``runs`` as given, else every folder with a results.json
    but ``latest``, newest first; at most ``max_runs``."""
    if runs is None:
        if not os.path.isdir(results_dir):
            raise PublishError(f"--results {results_dir!r}: no such folder")
        runs = sorted((d for d in os.listdir(results_dir) if d != "latest"
                       and os.path.isfile(os.path.join(results_dir, d, "results.json"))),
                      reverse=True)
        return runs[:max_runs] if max_runs is not None else runs
    return list(runs)  # runs named on the command line: all of them (--max-runs cut them)


def read_run(results_dir: str, name: str) -> dict:
    """One run's results.json, or a PublishError saying what is wrong with it."""
    path = os.path.join(results_dir, name, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows", []), list) or \
            not all(isinstance(r, dict) for r in data.get("rows", [])):
        raise PublishError(f"{path}: not a benchmark results file (expected an object with a "
                           "list of row objects under 'rows')")
    # the run's own write-up (what was built from which commit, what the numbers mean): the
    # rendered block points to it
    data["_notes"] = os.path.isfile(os.path.join(results_dir, name, "NOTES.md"))
    return data


def load_runs(results_dir: str = RESULTS, runs: list[str] | None = None,
              max_runs: int | None = None, strict: bool = False) -> list[tuple[str, dict]]:
    """(name, results) of the runs to publish. A run that cannot be read is skipped with a
    message, or with ``strict`` raises PublishError (what --write does: it must not replace the
    README's tables with fewer than were asked for)."""
    out = []
    for name in run_names(results_dir, runs, max_runs):
        try:
            out.append((name, read_run(results_dir, name)))
        except PublishError as exc:
            if strict:
                raise
            print(f"publish: skipping {exc}", file=sys.stderr)
    return out


def _conditions(env: dict) -> str:
    dev = env.get("gpu") or env.get("cpu") or env.get("device", "?")
    parts = [f"**{dev}**", f"torch {env.get('torch')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    m = env.get("med3d_ext") or {}
    ext = "compiled kernels" if m.get("extension_loaded") else "NO compiled kernels (reference fallback)"
    parts.append(f"med3d_ext {m.get('med3d_ext', '?')} ({ext})")
    if env.get("git_commit"):
        parts.append(f"commit {env['git_commit']}")
    parts.append(str(env.get("date_utc") or "")[:10])
    return ", ".join(p for p in parts if p)


def _params(p: dict) -> str:
    keep = []
    for k, v in p.items():
        if k == "model_source" and isinstance(v, str):
            v = v.split(" (")[0]
        if isinstance(v, list):
            v = "x".join(str(i) for i in v)
        keep.append(f"{k} {v}")
    return "; ".join(keep)


# a ratio against a baseline whose own output was not compared with the reference (a different
# algorithm, e.g. MONAI's random transform; the pipeline's CPU arm): a timing, not a checked one
BASELINE_UNCHECKED = "[baseline output not checked]"


def baseline_unchecked(b: dict) -> bool:
    """A baseline row whose output was not checked against the case's reference: rows.py's
    markers (its ``check`` says "not checked", "not compared", "loss finite", ...), an explicit
    ``check``/``checked`` False, or a note saying it was not compared ("own conventions, same
    work; not compared"). The case's reference row is what the others are checked against."""
    if b.get("reference"):
        return False
    if b.get("check") is False or b.get("checked") is False:
        return True
    if unchecked(dict(b, baseline=False, status="ok")):  # rows.py's markers, for a baseline
        return True
    note = str(b.get("note") or "")
    return "not compared" in note or "not checked" in note


def _ms(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ratios(r: dict, bases: dict) -> str:
    """The speed-up cell of med3d_ext row ``r``: one ratio per baseline, its time beside it when
    the results hold one (never a made-up 0.000), a baseline whose output was not checked
    marked; without any ratio, why (no baseline measured, or the baselines' times)."""
    key = (r["area"], r["case"])
    out = []
    for b, v in (r.get("speedup") or {}).items():
        if not _ms(v):
            continue
        base = bases.get(key + (b,)) or {}
        ms = base.get("median_ms")
        s = f"{v:.2f}x vs {b}" + (f" ({ms:.3f})" if _ms(ms) else " (baseline time not recorded)")
        if baseline_unchecked(base):
            s += f" {BASELINE_UNCHECKED}"
        out.append(s)
    if not out:
        ok = [(b[2], row["median_ms"]) for b, row in bases.items() if b[:2] == key
              and row.get("status") == "ok" and _ms(row.get("median_ms"))]
        out.append("no ratio recorded; baseline " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in ok)
                   if ok else "no baseline measured")
    text = ", ".join(out)
    if r.get("floor_ms") is not None:
        text += f"; floor {r['floor_ms']:.3f} ms"
    return text


def render_run(name: str, data: dict) -> str:
    env = data.get("env") or {}
    rows = [dict({"area": "?", "case": "?", "impl": "?"}, **r) for r in data.get("rows") or []]
    bases = {(r["area"], r["case"], r["impl"]): r for r in rows if r.get("baseline")}
    quick = (data.get("args") or {}).get("quick")
    notes = (f"; see `benchmarks/results/{name}/NOTES.md` for the build, the commits and "
             "the reading" if data.get("_notes") else "")
    lines = [f"### {name}", "", _conditions(env) + (" — quick suite" if quick else "") + notes,
             "", "| area | case | med3d_ext | median ms | speed-up vs baseline (baseline ms) | shapes, dtypes |",
             "|---|---|---|---|---|---|"]
    missing = []
    for r in rows:
        if r.get("impl") == "-" or r.get("status") == "profiled":
            continue  # profiled rows (--profile-only) are not measurements
        if r.get("status") != "ok" or not _ms(r.get("median_ms")):
            # a baseline too: a ratio against it is then missing from its case's rows
            missing.append(f"{r['area']}/{r['case']} " + ("baseline " if r.get("baseline") else "")
                           + f"{r['impl']}: {r.get('status')}"
                           + ("" if r.get("status") != "ok" else " without a median"))
            continue
        if r.get("baseline"):
            continue
        note = r.get("note") or ""
        impl = r["impl"] + (f" ({note})" if note and not note.startswith("compiled (") else "")
        impl += caveats(r)  # a caveat added later; an output that was not checked
        lines.append(f"| {r['area']} | {r['case']} | {impl} | {r['median_ms']:.3f} | "
                     f"{_ratios(r, bases)} | {_params(r.get('params') or {})} |")
    if missing:
        lines += ["", f"Not measured in this run ({len(missing)}): " + "; ".join(missing[:12])
                  + (" ..." if len(missing) > 12 else "")]
    return "\n".join(lines)


def render(runs: list[tuple[str, dict]], source: str = "benchmarks/results/") -> str:
    head = [  # the README section "## Performance" holds this block: no heading of its own
            f"Generated by `python -m benchmarks.publish` from `{source}`. Each ratio is the "
            "baseline's median over med3d_ext's, both measured in the same process on the same device "
            "(`python -m benchmarks`); each row's output is checked against the reference before "
            "timing, except where the row says `[output not checked: ...]` (e.g. the pipeline's "
            "arms, which draw different random transforms); a ratio marked "
            f"`{BASELINE_UNCHECKED}` is against a baseline whose own output was not compared "
            "(a different algorithm, e.g. MONAI's random transform), so it is a timing only. "
            "Baselines that failed or were unavailable are listed under the run's \"Not "
            "measured\" line. The pipeline's baseline is CPU "
            "augmentation in loader workers, so its ratios compare the GPU path with a CPU "
            "one. Older runs are in `benchmarks/results/` (the README's text cites them by "
            "folder).", ""]
    if not runs:
        return "\n".join(head + ["No committed benchmark results yet."]) + "\n"
    return "\n".join(head + ["\n\n".join(render_run(n, d) for n, d in runs)]) + "\n"


def replace_section(text: str, section: str) -> str:
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README has no '{BEGIN}' ... '{END}' block to replace")
    a = text.index(BEGIN) + len(BEGIN)
    b = text.index(END)
    return text[:a] + "\n" + section + text[b:]


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of runs, got {v}")
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--print", action="store_true", help="print the section to stdout")
    g.add_argument("--write", action="store_true", help="replace the section in the README in place")
    p.add_argument("--results", default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--runs", nargs="*", help="run folders to include (default: all but latest, newest first)")
    p.add_argument("--max-runs", type=_positive, default=3,
                   help="newest N runs when --runs is not given (default 3)")
    p.add_argument("--readme", default=README, help=f"file to edit with --write (default {README})")
    a = p.parse_args(argv)
    try:
        # --write replaces the README's tables: every run asked for must be readable, and at
        # least one must be there (a mistyped --results once wrote "No committed ... results")
        # strict also when runs are named: a mistyped name printed an empty section, exit 0
        runs = load_runs(a.results, a.runs, a.max_runs, strict=a.write or bool(a.runs))
        if a.write and not runs:
            raise PublishError(f"--results {a.results!r}: no run with a results.json")
    except PublishError as exc:
        print(f"publish: {exc}; {'README left unchanged' if a.write else 'nothing to print'}",
              file=sys.stderr)
        return 2
    same = os.path.abspath(a.results) == os.path.abspath(RESULTS)
    section = render(runs, "benchmarks/results/" if same else a.results)
    if a.print:
        sys.stdout.write(section)
        return 0
    try:
        with open(a.readme) as f:
            text = f.read()
        new = replace_section(text, section)
    except (OSError, ValueError) as exc:
        print(f"publish: {a.readme}: {exc}", file=sys.stderr)
        return 1
    with open(a.readme, "w") as f:
        f.write(new)
    print(f"publish: wrote the performance section of {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
