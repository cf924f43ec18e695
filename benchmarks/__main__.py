"""``python -m benchmarks [AREA ...] [--quick] [--device cpu|cuda] [--out DIR] [--with-compile]
[--profile | --profile-only] [--append]``

Runs the benchmark areas (all by default, in the order given), writes ``results.json`` and
``results.md`` to ``--out`` and prints a summary table last. Every area and every case is isolated: a missing
op, a missing peer library, an out-of-memory or a crash becomes a row, never the end of the run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

# the target rows first (training steps, stem, augmentation pair, loss), then the other
# kernels, then the data-bound areas: results are written after every case, so a run cut short by
# a time limit keeps the measurements that matter most (gpu_check.sh runs them in the same order)
AREAS = ["train_step", "stem", "augment", "loss", "bn_stats", "conv_bn_relu", "resample", "pipeline",
         "convergence"]
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("areas", nargs="*", metavar="AREA", help=f"areas to run (default: all): {', '.join(AREAS)}")
    p.add_argument("--quick", action="store_true",
                   help="few repeats and, on the CPU, small sizes (CI smoke test; GPU suite in ~3 min)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    p.add_argument("--with-compile", action="store_true",
                   help="add the torch.compile baselines that --quick leaves out (ResNet-50 step, augmentation)")
    p.add_argument("--verbose", "-v", action="store_true", help="print tracebacks of failing rows")
    p.add_argument("--profile", action="store_true",
                   help="also profile each timed row (torch.profiler): its kernels on a GPU, its "
                        "ATen ops on the CPU, per call, in results.json/md")
    p.add_argument("--profile-only", action="store_true",
                   help="only profile each row (warm-up, then torch.profiler), no check and no timing; "
                        "compiled rows only with --with-compile (gpu_check.sh runs it after the timed run)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of other areas already in --out/results.json (one results file "
                        "from several runs, e.g. gpu_check.sh's stages); rows of the areas run now are replaced")
    a = p.parse_args(argv)
    if a.profile and a.profile_only:
        p.error("--profile and --profile-only: pick one")
    if a.append and a.profile_only:
        p.error("--append and --profile-only: a profile goes to its own --out")
    # the arguments first, then --out: a refused run must not leave a folder behind
    bad = [x for x in a.areas if x not in AREAS]
    if bad:
        import difflib

        hints = {b: difflib.get_close_matches(b, AREAS, n=2) for b in bad}
        p.error("unknown area(s): " + "; ".join(f"{b!r} (did you mean {', '.join(h) or 'one of ' + ', '.join(AREAS)}?)"
                                                for b, h in hints.items()))
    a.areas = list(dict.fromkeys(a.areas))  # an area named twice runs once
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():  # (it left an empty --out folder behind)
            p.exit(2, "--device cuda: no CUDA device is available\n")
    try:  # before any measuring: results are written after every case, the first within seconds
        os.makedirs(a.out, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {a.out!r}: cannot create this folder ({exc.strerror or exc})")
    if not os.access(a.out, os.W_OK | os.X_OK):
        p.error(f"--out {a.out!r}: this folder is not writable")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from . import common

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    ctx = common.Context(device, args.quick, args.with_compile, args.verbose, args.profile, args.profile_only)
    t_start = time.perf_counter()
    env = common.collect_env(device)
    print(common.env_line(env), flush=True)
    areas = args.areas or AREAS
    run_args = {"areas": areas, "quick": args.quick, "device": device, "with_compile": args.with_compile}
    if args.profile_only:
        run_args["profile_only"] = True
    prior_s = 0.0
    if args.append:
        try:
            prior = common.load_prior(args.out, device, args.quick, areas, args.with_compile)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        if prior is not None:
            ctx.rows, ctx.areas = prior["rows"], prior["areas"]
            run_args["areas"] = [a for a in prior["args"]["areas"] if a not in areas] + list(areas)
            prior_s = float(prior.get("total_s") or 0.0)

    def save():  # after every case, so a run killed by a time limit keeps what it measured
        common.write_results(args.out, ctx, env, run_args, prior_s + time.perf_counter() - t_start)
    ctx.on_rows = save
    for area in areas:
        t0 = time.perf_counter()
        info: dict = {}
        print(f"== {area}", flush=True)
        try:
            mod = importlib.import_module(f".bm_{area}", __package__)
            mod.run(ctx)
        except Exception as exc:  # an area that dies is recorded; the next one still runs
            info["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if args.verbose:
                traceback.print_exc()
            ctx.record(area, "(area)", "-", common.ERROR, info["error"], traceback=traceback.format_exc()[-2000:])
        finally:
            if device == "cuda":
                try:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception:
                    pass
        info["seconds"] = round(time.perf_counter() - t0, 1)
        ctx.areas[area] = info
        save()
    total = prior_s + time.perf_counter() - t_start
    jpath, mpath = common.write_results(args.out, ctx, env, run_args, total)
    data = {"env": env, "areas": ctx.areas, "rows": ctx.rows, "total_s": round(total, 1)}
    print(f"\nwrote {jpath} and {mpath}")
    print(common.summary_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
