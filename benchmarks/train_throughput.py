"""Pretraining throughput of the real CLI path, fused against plain, data pipeline included.

``python -m benchmarks.train_throughput [--device cuda|cpu] [--steps N] [--quick] [--out DIR]``

Runs ``med3d_ext.train``'s Med3D pretraining (``run_pretrain``: eight synthetic 3DSeg-8 domains,
one head each, the multi-head loss, the loader with workers, augmentation on the device) twice
with the same seed and budget: ``--fused`` (our ops) and ``--no-fused`` (plain PyTorch). The
two arms differ in more than the fused layers: ``--no-fused`` (``tasks._use_ops``) also swaps the
multi-head loss (``multihead_seg_loss`` -> the plain loss), the logits resize (``ops.resize`` ->
``F.interpolate``) and the augmentation (``RandomAugment3D`` -> ``PlainAugment3D``), so "fused /
plain" is the whole stack's ratio, not the fused layers' alone (ARM_DIFFERENCE). The
numbers are the loop's own: samples/s and voxels/s over the logged windows after the first
(the first holds cuDNN autotuning and worker start-up) that start after the batches the loader
workers prefetched, and the data-wait fraction (time blocked on the next batch over step time). On a GPU the batch is the perf-baselines training shape,
8 x 64 x 128 x 128 voxels. Writes ``throughput.json`` and ``throughput.md`` into ``--out``.
``--compile-arms`` adds the fused model under ``--compile`` (and, on a GPU, with
``--compile-mode reduce-overhead``), each against the fused arm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# the CLI's --fused against its --no-fused: more than the layers differ (tasks._use_ops), and
# the names say so; the first word of each is its profile folder ("med3d_ext", "plain")
ARMS = (("med3d_ext fused", True),
        ("plain PyTorch stack (--no-fused: plain layers, loss, resize and augmentation)", False))
# what differs between the two arms, in the results and the markdown
ARM_DIFFERENCE = ("the whole training stack differs between the arms, not only the fused layers: "
                  "med3d_ext fused = --fused (fused Conv-BN-ReLU layers, the multi-head loss op "
                  "multihead_seg_loss, ops.resize for the logits, RandomAugment3D); plain PyTorch "
                  "stack = --no-fused (plain layers, the loss in plain PyTorch, F.interpolate, "
                  "PlainAugment3D)")


def sizes(gpu: bool, quick: bool, steps: int | None) -> dict:
    if gpu:  # RAS x, y, z = 128 x 128 x 64 per sample, batch 8 (perf-baselines.md); 48 steps:
        # windows of 12, the last two start after the 16 prefetched batches
        sz = dict(cases=2, size=128, patch=[128, 128, 64], batch=8, steps=48,
                  workers=min(8, os.cpu_count() or 1))
    elif quick:
        sz = dict(cases=1, size=24, patch=[16, 16, 8], batch=2, steps=6, workers=0)
    else:
        sz = dict(cases=2, size=48, patch=[32, 32, 16], batch=4, steps=30, workers=0)
    if steps:
        sz["steps"] = steps
    return sz


def _windows(run_dir) -> list[dict]:
    from med3d_ext.train.runlog import read_metrics

    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("kind") == "train"]


def summarize_windows(rows: list[dict], prefetched: int = 0) -> dict:
    """Mean samples/s, voxels/s and data wait over the windows after the first (it holds cuDNN
    autotuning and worker start-up) that start after the first ``prefetched`` steps: until
    the batches the loader workers prefetched are consumed, a data-bound loop looks as fast as
    a compute-bound one. Falls back to all windows after the first (all of them when there is
    only one) when none is left, and then says so: ``prefetch_fallback`` is True (the means
    include windows fed from the prefetched batches; more steps are needed)."""
    if not rows:
        raise ValueError("no training windows were logged")
    use = rows[1:] if len(rows) > 1 else rows
    fallback = False
    if prefetched and len(rows) > 1:
        every = rows[1]["step"] - rows[0]["step"]
        steady = [r for r in use if r["step"] - every >= prefetched]
        fallback = not steady
        use = steady or use
    elif prefetched:  # one window: it starts at the first step, inside the prefetched batches
        fallback = True
    mean = lambda k: sum(r[k] for r in use) / len(use)  # noqa: E731
    return {"samples_s": mean("samples_s"), "voxels_s": mean("voxels_s"),
            "data_wait": mean("data_wait"), "windows": len(use),
            "steps": int(rows[-1]["step"]), "prefetched": int(prefetched),
            "prefetch_fallback": fallback,
            # every window's rate, the first included: a rate still rising at the end means a
            # one-off cost (autotuning, start-up) was inside the measured windows
            "window_samples_s": [round(float(r["samples_s"]), 2) for r in rows]}


# --profile: steps profiled after the measured ones (so the measured windows are untouched)
PROFILE_STEPS = 4


def _log_every(measured: int) -> int:
    """About a quarter of the measured steps, and a divisor of them: a window then ends exactly
    at the last measured step, with or without profiled steps after it."""
    k = max(1, measured // 4)
    while measured % k:
        k -= 1
    return k


def _arm_name(name: str, grid: str, first: str) -> str:
    return name if grid == first else f"{name} [--label-grid {grid}]"


# --compile-arms: the fused model under --compile (the shared encoder compiled, the heads
# eager), and on a GPU with --compile-mode reduce-overhead (the encoder's forward and backward
# replayed as CUDA graphs: what the CLI's step costs once the encoder's per-op host work is gone)
COMPILE_ARMS = (("med3d_ext fused + compile", {"compile": True}, False),
                ("med3d_ext fused + compile reduce-overhead",
                 {"compile": True, "compile_mode": "reduce-overhead"}, True))


def _arm_key(name: str) -> str:
    """A folder name for an arm (its run folder and profile)."""
    return "".join(c if c.isalnum() else "-" for c in name.split(" [")[0]).strip("-")


def run(device="auto", quick=False, steps=None, out=None, log=print, profile=False,
        label_grids=None, compile_arms=False) -> dict:
    """label_grids: where the loss is computed, one pair of arms each; default on a GPU both
    the demo's ``patch`` (logits upsampled to the patch) and the CLI default ``logits`` (labels
    on the 1/4 logit grid), on the CPU ``patch`` only. compile_arms: also the fused model
    under --compile (COMPILE_ARMS; the reduce-overhead one on a GPU only), with the first
    label grid."""
    from med3d_ext.train import config as C
    from med3d_ext.train.cli import run_pretrain
    from med3d_ext.train.demo import demo_data, demo_recipe
    from med3d_ext.train.distributed import resolve_device

    dev = resolve_device(device)
    sz = sizes(dev.type == "cuda", quick, steps)
    t_all = time.perf_counter()
    d = demo_data(sz["cases"], sz["size"], 0, log)
    grids = list(label_grids or (["patch", "logits"] if dev.type == "cuda" else ["patch"]))
    result = {"device": str(dev), "sizes": sz, "arms": {}, "label_grids": grids,
              "arm_difference": ARM_DIFFERENCE}
    measured = sz["steps"]
    extra = PROFILE_STEPS if profile else 0
    arms = [(g, base, fused, {}) for g in grids for base, fused in ARMS]
    if compile_arms:
        arms += [(grids[0], name, True, over) for name, over, gpu_only in COMPILE_ARMS
                 if dev.type == "cuda" or not gpu_only]
    result["compile_arms"] = [a[1] for a in arms[len(grids) * len(ARMS):]]
    with tempfile.TemporaryDirectory(prefix="m3d-throughput-") as tmp:
        for grid, base, fused, over in arms:
            name = _arm_name(base, grid, grids[0])
            # the first word of a main arm (as the committed results name their profiles)
            key = (_arm_key(base) if over else base.split()[0]) + (
                "" if grid == grids[0] else f"-{grid}")
            cfg = C.resolve("pretrain", dict(
                demo_recipe(dev, sz, d["root"] / "cache"),  # the demo's training options
                label_grid=grid,
                data=[str(d["pretrain"])], out=str(Path(tmp) / key), seed=0,
                depth=10, epochs=1, steps=measured + extra, fused=fused, lr=1e-3,
                log_every=_log_every(measured), val_cases=1, export=False, progress=False,
                profile=f"{measured}:{extra}" if extra else None, **over))
            if over.get("compile"):
                import torch

                # a fresh Dynamo cache: graphs an earlier arm compiled (its validation's batch
                # sizes included) would shape this arm's compile (e.g. a dynamic batch size)
                torch._dynamo.reset()
            t0 = time.perf_counter()
            res = run_pretrain(cfg, log=lambda *a: None)
            # DataLoader workers hold prefetch_factor (2) batches each
            rows = [r for r in _windows(cfg["out"]) if r["step"] <= measured]
            arm = summarize_windows(rows, prefetched=2 * sz["workers"])
            if res.get("profile"):  # the profiled steps, after the measured ones
                arm["profile"] = json.loads((Path(res["profile"]) / "summary.json").read_text())
                if out:
                    dst = Path(out) / "profile" / key
                    dst.mkdir(parents=True, exist_ok=True)
                    for f in ("summary.json", "ops.txt", "python_sites.txt"):
                        if (Path(res["profile"]) / f).exists():  # python_sites: --profile-stacks
                            (dst / f).write_text((Path(res["profile"]) / f).read_text())
            arm.update(wall_s=time.perf_counter() - t0, final_val=res.get("best_score"),
                       # cuDNN tuning of the heads' batch sizes before the first step (GPU)
                       head_tuning_s=res.get("head_tuning_s"))
            result["arms"][name] = arm
            log(f"{name}: {arm['samples_s']:.2f} samples/s, {arm['voxels_s'] / 1e6:.2f} Mvoxel/s, "
                f"data wait {100 * arm['data_wait']:.1f}% ({arm['wall_s']:.0f} s)"
                + (f" [no window starts after the {arm['prefetched']} prefetched batches: "
                   "the means include them]" if arm["prefetch_fallback"] else ""))
    ratios = {}
    for g in grids:
        fused, plain = (result["arms"][_arm_name(n, g, grids[0])] for n, _ in ARMS)
        ratios[g] = fused["samples_s"] / plain["samples_s"]
    result["fused_vs_plain"] = ratios[grids[0]]
    fused0 = result["arms"][_arm_name(ARMS[0][0], grids[0], grids[0])]
    result["compiled_vs_fused"] = {n: result["arms"][n]["samples_s"] / fused0["samples_s"]
                                   for n in result["compile_arms"]}
    result["fused_vs_plain_by_label_grid"] = ratios
    result["total_s"] = time.perf_counter() - t_all
    try:
        from .common import collect_env
    except ImportError:
        from benchmarks.common import collect_env
    result["env"] = collect_env(dev.type)
    if out:
        write(out, result)
    return result


def markdown(r: dict) -> str:
    sz, env = r["sizes"], r.get("env", {})
    # arms whose means include windows fed from the prefetched batches (too few steps)
    fell_back = [n for n, a in r["arms"].items() if a.get("prefetch_fallback")]
    lines = ["# Med3D pretraining throughput (python -m med3d_ext.train pretrain)", "",
             f"device {r['device']} ({env.get('gpu') or env.get('cpu') or ''}); torch "
             f"{env.get('torch')}, cuDNN {env.get('cudnn')}; ResNet-10, 8 heads, batch "
             f"{sz['batch']} x patch {sz['patch']}, {sz['steps']} steps, {sz['workers']} loader "
             f"workers, augmentation on the device; means over the logged windows after the "
             f"first that start after the {2 * sz['workers']} prefetched batches "
             f"({r['arms'][next(iter(r['arms']))].get('windows')} windows"
             + ("; but see the warning below" if fell_back else "") + ").", "",
             "Arms: " + r.get("arm_difference", ARM_DIFFERENCE) + ".", "",
             "| pipeline | samples/s | Mvoxel/s | data wait | wall | samples/s per window |",
             "|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        per = ", ".join(f"{v:.0f}" for v in a.get("window_samples_s") or [])
        lines.append(f"| {name} | {a['samples_s']:.2f} | {a['voxels_s'] / 1e6:.2f} | "
                     f"{100 * a['data_wait']:.1f}% | {a['wall_s']:.0f} s | {per or '-'} |")
    if fell_back:
        pre = r["arms"][fell_back[0]].get("prefetched", 2 * sz["workers"])
        lines += ["", f"**Warning**: no logged window starts after the {pre} "
                  "prefetched batches for " + "; ".join(fell_back) + ": their means fall back "
                  "to windows that include them (a data-bound loop looks compute-bound there); "
                  "rerun with more --steps."]
    tuned = [(n, a["head_tuning_s"]) for n, a in r["arms"].items() if a.get("head_tuning_s")]
    if tuned:  # the arms share one process, so one cuDNN cache: the first arm tunes the most
        lines += ["", "cuDNN tuned for the heads' batch sizes before the first step (outside the "
                  "measured windows): " + "; ".join(f"{n} {t:.1f} s" for n, t in tuned) + "."]
    by_grid = r.get("fused_vs_plain_by_label_grid") or {}
    grids = r.get("label_grids") or ["patch"]
    lines += ["", f"fused stack / plain PyTorch stack samples/s: {r['fused_vs_plain']:.2f}x (same "
              f"run, same device; --label-grid {grids[0]}). A whole-stack ratio: layers, loss, "
              "resize and augmentation all differ between the arms, so it is not the fused "
              "layers' speed-up alone."]
    lines += [f"fused stack / plain PyTorch stack samples/s with --label-grid {g}: {by_grid[g]:.2f}x."
              for g in grids[1:] if g in by_grid]
    lines += [f"{n} / med3d_ext fused samples/s: {v:.2f}x (--label-grid {grids[0]}; the "
              "compile time is outside the measured windows, in the first)."
              for n, v in (r.get("compiled_vs_fused") or {}).items()]
    lines.append("")
    profiled = [(n, a["profile"]) for n, a in r["arms"].items() if a.get("profile")]
    if profiled:
        lines += [f"Profiled: {profiled[0][1]['steps']} steps after the measured ones "
                  "(torch.profiler; wall and host times are inflated by it, kernel times are "
                  "not). Per step:", "",
                  "| pipeline | wall (profiled) ms | kernels ms | launches | host syncs | host ops ms | costliest ops (self ms) |",
                  "|---|---|---|---|---|---|---|"]
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        for name, p in profiled:
            top = "; ".join(f"{o['name']} {o['self_ms_per_step']:.2f}" for o in p["top_ops"][:5])
            lines.append(f"| {name} | {p['wall_ms_per_step']:.1f} | {fmt(p['kernel_ms_per_step'], '.2f')} | "
                         f"{fmt(p['launches_per_step'], '.0f')} | {fmt(p.get('host_syncs_per_step'), '.1f')} | "
                         f"{p['host_op_ms_per_step']:.1f} | {top} |")
        lines.append("")
        for name, p in profiled:  # where the host waited for the GPU (a GPU run only)
            rt = "; ".join(f"{c['name']} x{c['calls_per_step']:.0f} {c['host_ms_per_step']:.2f} ms"
                           for c in p.get("cuda_runtime") or [])
            sites = "; ".join(f"{s['where']} x{s['per_step']:.1f}" for s in p.get("host_sync_sites") or [])
            if rt or sites:
                lines.append(f"- {name}: CUDA runtime per step: {rt or '-'}; synchronising "
                             f"operations per step by site: {sites or 'none'}")
        lines.append("")
        for name, p in profiled:  # --profile-stacks: the package's functions by host time
            own = "; ".join(f"{s['site']} {s['host_ms_per_step']:.2f} ms x{s['calls_per_step']:.1f}"
                            for s in (p.get("python_sites") or [])[:10])
            if own:
                lines.append(f"- {name}: host time per step by the package's functions "
                             f"(inclusive, under the profiler): {own}")
        lines.append("")
    return "\n".join(lines)


def write(out, r: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(r, indent=1, default=str))
    (out / "throughput.md").write_text(markdown(r))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per arm (default: 48 GPU, 30 CPU, 6 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny CPU sizes (a smoke test, not a result)")
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest",
                               "throughput")  # the git-ignored folder, wherever this is run
    p.add_argument("--out", default=default_out, help=f"results folder (default {default_out})")
    p.add_argument("--label-grids", default=None,
                   help="comma-separated label grids, one pair of arms each (default: GPU "
                        "patch,logits; CPU patch)")
    p.add_argument("--profile", action="store_true",
                   help=f"also profile {PROFILE_STEPS} steps of each arm after the measured ones "
                        "(the training CLI's --profile): kernel time, launches and the costliest "
                        "ops per step, into OUT/profile/ and the table")
    p.add_argument("--profile-stacks", action="store_true",
                   help="with --profile: record Python frames too (more profiler overhead), and "
                        "rank the package's functions by their host time per step "
                        "(python_sites.txt, and a line per arm in the table)")
    p.add_argument("--compile-arms", action="store_true",
                   help="also the fused model under --compile (its encoder), and on a GPU with "
                        "--compile-mode reduce-overhead, with the first label grid")
    a = p.parse_args(argv)
    if a.profile_stacks:
        if not a.profile:
            p.error("--profile-stacks needs --profile")
        from med3d_ext.train import profiling

        profiling.PYTHON_STACKS = True
    if a.steps is not None and a.steps < 2:
        p.error(f"--steps: need at least 2, got {a.steps}")
    grids = None
    if a.label_grids:
        grids = [g.strip() for g in a.label_grids.split(",") if g.strip()]
        bad = [g for g in grids if g not in ("patch", "logits")]
        if bad or not grids:
            p.error(f"--label-grids: expected patch and/or logits, got {a.label_grids!r}")
    from med3d_ext.train.distributed import DeviceError, resolve_device

    try:  # the device first: a refused run leaves no --out folder behind
        resolve_device(a.device)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # before training: a bad --out lost both arms' results at the end
        Path(a.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {a.out}: {exc.strerror or exc}")
    try:
        r = run(a.device, a.quick, a.steps, a.out, profile=a.profile, label_grids=grids,
                compile_arms=a.compile_arms)
    except DeviceError as exc:  # --device cuda without a GPU: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
