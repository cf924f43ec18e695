"""The embedded default: Med3D in miniature.

1. generate the synthetic 3DSeg-8 (cached under $MED3D_EXT_CACHE or ~/.cache/med3d_ext/demo);
2. pretrain a ResNet-10 briefly on the eight domains (one head each);
3. transfer to the held-out segmentation task twice with the same budget: from the
   pretrained encoder and from scratch;
4. evaluate both on the held-out cases and print Dice, the steps needed to reach a target
   validation Dice, and the time.

Sizes: about 5 minutes on an idle 2-core CPU (the target is under 10); larger on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ["run_demo", "demo_sizes", "demo_recipe", "demo_data", "val_curve", "steps_to_target"]


def demo_sizes(gpu: bool, quick: bool) -> dict:
    """Budgets of the demo (and of ``benchmarks.convergence_study``). Transfer runs
    ``tr_epochs`` x ``tr_steps`` steps and validates after every epoch, so ``tr_steps`` is the
    resolution of "steps to the target Dice"."""
    # the synthetic volumes are anisotropic (~0.8 x 0.8 x 2.9 mm): thin patches in the last axis
    if quick:  # tests: a couple of minutes on 2 cores
        return dict(cases=2, size=24, patch=[16, 16, 8], batch=2, pre_epochs=2, pre_steps=8,
                    tr_epochs=3, tr_steps=4, target=0.2, workers=0)
    if gpu:
        return dict(cases=8, size=96, patch=[64, 64, 32], batch=8, pre_epochs=20,
                    pre_steps=100, tr_epochs=20, tr_steps=25, target=0.5, workers=6)
    # CPU, ~5 min on 2 idle cores (a step of batch 4 takes ~0.2 s). 64 voxels in-plane: at 48
    # the kidney (~150 voxels) is a single cell of the encoder's 1/8 grid and neither arm
    # learns it. Measured on this recipe (seed 0): from scratch, validation Dice 0.12 / 0.15 /
    # 0.23 / 0.30 after 100 / 150 / 200 / 300 steps; from a 240-step pretraining 0.25 / 0.31 /
    # 0.32 / 0.32 - the paper's effect (faster convergence) in miniature. Short validation
    # intervals (10 steps) made both arms' curves too noisy to read.
    return dict(cases=4, size=64, patch=[32, 32, 16], batch=4, pre_epochs=2, pre_steps=300,
                tr_epochs=12, tr_steps=25, target=0.25, workers=0)


def demo_recipe(device, sizes: dict, cache) -> dict:
    """Training options shared by every run of the demo and of the convergence study."""
    # AdamW and the loss on the patch grid: in a budget of a few hundred steps, MedicalNet's
    # SGD recipe (lr 1e-3 / 1e-1) and the 1/4-grid loss still predict background everywhere
    return {"device": str(device), "batch_size": sizes["batch"], "patch": sizes["patch"],
            "cache": str(cache), "optimizer": "adamw", "weight_decay": 1e-4,
            "label_grid": "patch", "num_workers": sizes["workers"],
            # validation during training: fewer windows (evaluation uses 0.5)
            "overlap": 0.25, "sw_batch_size": 4}


def build_once(root: Path, build) -> Path:
    """Call ``build(root)`` unless an earlier call finished (``root/.complete``); a build
    interrupted half-way is redone."""
    done = root / ".complete"
    if not done.exists():
        build(root)
        done.write_text("ok\n")
    return root


def demo_data(cases: int, size: int, seed: int, log=print) -> dict:
    """Synthetic 3DSeg-8, generated once per (cases, size, seed) and reused."""
    from med3d_ext.data import synth

    base = Path(os.environ.get("MED3D_EXT_CACHE", Path.home() / ".cache" / "med3d_ext"))
    root = base / "demo" / f"synth-c{cases}-s{size}-seed{seed}"

    def build(r):
        log(f"generating synthetic 3DSeg-8 in {r} ...")
        synth(r, cases=cases, size=size, seed=seed)
    build_once(root, build)
    return {"pretrain": root / "pretrain", "transfer": next(
        p for p in sorted((root / "transfer").iterdir()) if p.is_dir()), "root": root}


def val_curve(run_dir) -> dict:
    """A run's validation curve from its metrics.jsonl: ``{"steps": [...], "epochs": [...],
    "dice": [...]}`` (epochs 1-based, as the rows count them; NaN where a validation had no
    score)."""
    from .runlog import read_metrics

    va = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("kind") == "val"]
    score = [r.get("score") for r in va]
    return {"steps": [int(r["step"]) for r in va], "epochs": [r.get("epoch") for r in va],
            "dice": [float("nan") if v is None else float(v) for v in score]}


def steps_to_target(steps, values, target):
    """First step whose value reaches ``target`` (None if it never does). NaN never counts."""
    for s, v in zip(steps, values):
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v >= target:
            return s
    return None


def run_demo(out=None, device: str = "auto", quick: bool = False, seed: int = 0,
             log=print, progress: bool = True, threads: int | None = None) -> dict:
    """The demo; ``threads``: torch's CPU threads for all of it (None: torch's default)."""
    from .loops import TrainingInterrupted

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        return _run_demo(out, device, quick, seed, log, progress, threads)
    except TrainingInterrupted as e:
        # the runs' "--resume RUN" hint does not apply: the demo is a fixed recipe, not resumable
        raise TrainingInterrupted("demo interrupted; it does not resume: run it again with "
                                  "another --out (the synthetic data are reused)",
                                  e.signum) from None


def _run_demo(out, device, quick, seed, log, progress, threads=None) -> dict:
    from . import config as C
    from .cli import run_evaluate, run_pretrain, run_transfer
    from .distributed import resolve_device

    t_all, cpu_all = time.perf_counter(), time.process_time()
    dev = resolve_device(device)
    sz = demo_sizes(dev.type == "cuda", quick)
    run = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if run.exists() and not run.is_dir():
        raise C.ConfigError(f"--out {str(run)!r} is a file; the demo needs a folder")
    if any((run / sub / "last.pt").exists() for sub in ("pretrain", "transfer-pretrained",
                                                        "transfer-scratch")):
        raise C.ConfigError(f"--out {str(run)!r} already holds a demo run; choose another --out")
    from .cli import make_output_dir

    make_output_dir(run, "--out")
    t0 = time.perf_counter()
    d = demo_data(sz["cases"], sz["size"], seed, log)
    t_data = time.perf_counter() - t0
    common = dict(demo_recipe(dev, sz, d["root"] / "cache"), seed=seed, val_cases=2,
                  progress=progress and not quick)
    if threads:
        common["threads"] = int(threads)
    log(f"[1/3] pretraining ResNet-10 on {len(list(d['pretrain'].iterdir()))} domains")
    pre = run_pretrain(C.resolve("pretrain", dict(
        common, data=[str(d["pretrain"])], out=str(run / "pretrain"), depth=10,
        epochs=sz["pre_epochs"], steps=sz["pre_steps"], val_fraction=0.25, lr=1e-3)), log=log)
    rows = []
    for k, (name, extra) in enumerate((
            ("pretrained (Med3D)", {"pretrained": str(run / "pretrain" / "last.pt"),
                                    "lr": 1e-3, "head_lr": 1e-3}),
            ("from scratch", {"from_scratch": True, "depth": 10, "head_lr": 1e-3}))):
        log(f"[{2 + k}/3] transfer to {d['transfer'].name}: {name}")
        folder = "transfer-pretrained" if k == 0 else "transfer-scratch"
        tr = run_transfer(C.resolve("transfer", dict(
            common, data=[str(d["transfer"])], out=str(run / folder), task="seg",
            epochs=sz["tr_epochs"], steps=sz["tr_steps"], target_dice=sz["target"],
            val_fraction=0.25, **extra)), log=log)
        ev = run_evaluate(C.resolve("evaluate", dict(
            device=str(dev), run=str(run / folder), data=[str(d["transfer"])],
            out=str(run / f"predictions-{folder.split('-')[1]}"), split="val",
            # the final weights: best.pt was chosen on these same held-out cases
            checkpoint="last", cache=common["cache"], progress=common["progress"],
            threads=common.get("threads", 0))), log=lambda *a: None)
        rows.append({"method": name, "dice": ev["dice"], "hd95": ev["hd95"],
                     "target_step": tr["target_step"], "steps": tr["steps"],
                     "time_s": tr["time_s"], "run": str(run / folder)})
    # the convergence study's rule as well: steps to the from-scratch arm's final validation
    # Dice (a target set by the baseline itself, not chosen after seeing the curves)
    curves = [val_curve(r["run"]) for r in rows]
    ref = curves[1]["dice"][-1] if curves[1]["dice"] else float("nan")
    for r, c in zip(rows, curves):
        r["val_curve"] = c
        r["steps_to_scratch_final"] = steps_to_target(c["steps"], c["dice"], ref)
    total, cpu = time.perf_counter() - t_all, time.process_time() - cpu_all
    table = format_demo_table(rows, sz["target"], ref)
    log("\n" + table)
    log(f"\npretraining: {pre['time_s']:.0f} s, data: {t_data:.0f} s, total {total:.0f} s wall "
        f"({cpu:.0f} s CPU) on {dev}")
    log(f"run folder: {run.resolve()}")
    result = {"rows": rows, "pretrain": pre, "total_s": total, "cpu_s": cpu, "data_s": t_data,
              "sizes": sz, "run": str(run)}
    (run / "demo.json").write_text(json.dumps(result, indent=1, default=str))
    (run / "demo.md").write_text(table + "\n")
    return result


def _f(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_demo_table(rows, target, scratch_final=None) -> str:
    """The demo's result table; ``scratch_final``: the from-scratch arm's final validation Dice,
    the target of the last column (omitted when None)."""
    extra = scratch_final is not None
    lines = [f"| transfer | Dice (held-out) | HD95 (mm) | steps to Dice >= {target} |"
             + (f" steps to scratch's final val Dice ({_f(scratch_final, '.3f')}) |" if extra else "")
             + " time |", "|---|---|---|---|" + ("---|" if extra else "") + "---|"]
    for r in rows:
        reach = (f"{r['target_step']}" if r["target_step"] is not None
                 else f"not in {r['steps']}")
        line = f"| {r['method']} | {_f(r['dice'], '.3f')} | {_f(r['hd95'], '.1f')} | {reach} |"
        if extra:
            st = r.get("steps_to_scratch_final")
            line += f" {st if st is not None else 'not in ' + str(r['steps'])} |"
        lines.append(line + f" {r['time_s']:.0f} s |")
    return "\n".join(lines)
