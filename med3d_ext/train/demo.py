"""The embedded default: Med3D in miniature.

1. generate the synthetic 3DSeg-8 (cached under $MED3D_EXT_CACHE or ~/.cache/med3d_ext/demo);
2. pretrain a ResNet-10 briefly on the eight domains (one head each);
3. transfer to the held-out segmentation task twice with the same budget: from the
   pretrained encoder and from scratch;
4. evaluate both on the held-out cases and print Dice, the steps needed to reach a target
   validation Dice, and the time.

Sizes: small enough for a 2-core CPU in under 10 minutes; larger on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ["run_demo", "demo_sizes", "demo_data"]


def demo_sizes(gpu: bool, quick: bool) -> dict:
    # the synthetic volumes are anisotropic (~0.8 x 0.8 x 2.9 mm): thin patches in the last axis
    if quick:  # tests: a couple of minutes on 2 cores
        return dict(cases=2, size=24, patch=[16, 16, 8], batch=2, pre_epochs=2, pre_steps=8,
                    tr_epochs=3, tr_steps=4, target=0.2, workers=0)
    if gpu:
        return dict(cases=8, size=96, patch=[64, 64, 32], batch=8, pre_epochs=20,
                    pre_steps=100, tr_epochs=20, tr_steps=25, target=0.5, workers=6)
    # 64 voxels in-plane: at 48 the kidney (~150 voxels) is a single cell of the encoder's 1/8
    # grid and neither arm learns it within the budget
    return dict(cases=4, size=64, patch=[32, 32, 16], batch=4, pre_epochs=6, pre_steps=40,
                tr_epochs=10, tr_steps=10, target=0.2, workers=0)


def demo_data(cases: int, size: int, seed: int, log=print) -> dict:
    """Synthetic 3DSeg-8, generated once per (cases, size, seed) and reused."""
    from med3d_ext.data import synth

    base = Path(os.environ.get("MED3D_EXT_CACHE", Path.home() / ".cache" / "med3d_ext"))
    root = base / "demo" / f"synth-c{cases}-s{size}-seed{seed}"
    done = root / ".complete"
    if not done.exists():
        log(f"generating synthetic 3DSeg-8 in {root} ...")
        synth(root, cases=cases, size=size, seed=seed)
        done.write_text("ok\n")
    return {"pretrain": root / "pretrain", "transfer": next(
        p for p in sorted((root / "transfer").iterdir()) if p.is_dir()), "root": root}


def run_demo(out=None, device: str = "auto", quick: bool = False, seed: int = 0,
             log=print, progress: bool = True) -> dict:
    from . import config as C
    from .cli import run_evaluate, run_pretrain, run_transfer
    from .distributed import resolve_device

    t_all, cpu_all = time.perf_counter(), time.process_time()
    dev = resolve_device(device)
    sz = demo_sizes(dev.type == "cuda", quick)
    run = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    d = demo_data(sz["cases"], sz["size"], seed, log)
    t_data = time.perf_counter() - t0
    # AdamW and the loss on the patch grid: in a budget of a few hundred steps, MedicalNet's
    # SGD recipe (lr 1e-3 / 1e-1) and the 1/4-grid loss still predict background everywhere
    common = {"device": str(dev), "seed": seed, "batch_size": sz["batch"],
              "patch": sz["patch"], "progress": progress and not quick, "val_cases": 2,
              "cache": str(d["root"] / "cache"), "optimizer": "adamw", "weight_decay": 1e-4,
              "label_grid": "patch", "num_workers": sz["workers"],
              # validation during training: fewer windows (evaluation below uses 0.5)
              "overlap": 0.25, "sw_batch_size": 4}
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
            checkpoint="last",
            cache=common["cache"])), log=lambda *a: None)
        rows.append({"method": name, "dice": ev["dice"], "hd95": ev["hd95"],
                     "target_step": tr["target_step"], "steps": tr["steps"],
                     "time_s": tr["time_s"], "run": str(run / folder)})
    total, cpu = time.perf_counter() - t_all, time.process_time() - cpu_all
    table = format_demo_table(rows, sz["target"])
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


def format_demo_table(rows, target) -> str:
    lines = [f"| transfer | Dice (held-out) | HD95 (mm) | steps to Dice >= {target} | time |",
             "|---|---|---|---|---|"]
    for r in rows:
        reach = (f"{r['target_step']}" if r["target_step"] is not None
                 else f"not in {r['steps']}")
        lines.append(f"| {r['method']} | {_f(r['dice'], '.3f')} | {_f(r['hd95'], '.1f')} | "
                     f"{reach} | {r['time_s']:.0f} s |")
    return "\n".join(lines)
