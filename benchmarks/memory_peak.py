"""Where a training step's peak GPU memory goes.

``python -m benchmarks.memory_peak [--depth 50] [--arms eager,fused,memory-saving] [--out DIR]``

For each arm, the ResNet step of the ``train_step`` benchmark (bf16 autocast, channels_last_3d,
8 x 1 x 64 x 128 x 128, SGD with momentum) runs three warm-up steps, then one step under
``torch.cuda.memory._record_memory_history`` (Python stacks). The allocator's trace of that step
is replayed to find the moment of peak allocated memory, and the blocks live then are grouped
by where they were allocated: the innermost frame in the model's code (``torch/nn``,
``med3d_ext``) or, for blocks made inside the autograd engine, "backward". Memory allocated
before the step (parameters, gradients' storage, optimizer state, cuDNN's cached workspaces)
is one line. Writes ``peak.json`` and ``peak.md`` into ``--out``; the issue's 2.5 GiB target for
ResNet-50 is about these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

_MODEL_PATHS = ("med3d_ext/", "torch/nn/modules/", "torch/nn/functional", "benchmarks/")


def _where(frames: list[dict]) -> str:
    """The allocation's place: the innermost frame in model code, else "backward" for blocks
    the autograd engine made (no Python frame but the backward call), else the innermost."""
    for f in frames:
        name = f.get("filename", "")
        if any(p in name for p in _MODEL_PATHS) and "memory_peak" not in name:
            short = name.split("site-packages/")[-1].split("/work/main/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    if any(f.get("name") in ("backward", "_engine_run_backward") for f in frames):
        return "backward (autograd engine)"
    if frames:
        f = frames[0]
        return f"{f.get('filename', '?')}:{f.get('line')} {f.get('name')}"
    return "(no stack)"


def peak_breakdown(trace: list[dict], baseline: int = 0, top: int = 25) -> dict:
    """Replays an allocator trace (``_snapshot()["device_traces"][device]``): ``alloc`` adds a
    block, ``free_requested`` removes it (what ``torch.cuda.memory_allocated`` counts). Returns
    the peak (bytes over ``baseline``, the memory allocated before the trace) and the blocks
    live at the peak grouped by :func:`_where`, largest first."""
    live: dict[int, tuple[int, str]] = {}
    cur = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for e in trace:
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = (int(e["size"]), _where(e.get("frames") or []))
            cur += int(e["size"])
            if cur > best:
                best, best_live = cur, dict(live)
        elif act == "free_requested":
            blk = live.pop(e["addr"], None)
            if blk is not None:
                cur -= blk[0]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in best_live.values():
        groups[where][0] += size
        groups[where][1] += 1
    rows = sorted(({"where": w, "bytes": b, "blocks": n} for w, (b, n) in groups.items()),
                  key=lambda r: -r["bytes"])
    return {"baseline_bytes": baseline, "step_peak_bytes": best, "peak_bytes": baseline + best,
            "groups": rows[:top], "other_groups": max(0, len(rows) - top),
            "other_bytes": sum(r["bytes"] for r in rows[top:])}


def _arm_step(name: str, depth: int):
    """The train_step benchmark's step function of one arm, on fresh copies of one model."""
    import copy
    from types import SimpleNamespace

    from . import bm_train_step as T

    model, source = T.base_model(depth)
    st = T.Step(SimpleNamespace(device="cuda"), T.GPU_SHAPE, amp=True, cl=True)
    if name == "eager":
        return st.make(copy.deepcopy(model), False)[0]
    if name == "fused":
        return st.make(T.fused_copy(model, source), False)[0]
    if name == "memory-saving":
        return T.memory_saving(st, model, source)[0]
    raise SystemExit(f"memory_peak: unknown arm {name!r} (eager, fused, memory-saving)")


def measure(name: str, depth: int) -> dict:
    import torch

    step = _arm_step(name, depth)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=1_000_000)
    try:
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    dev = torch.cuda.current_device()
    r = peak_breakdown(snap["device_traces"][dev], baseline)
    r["max_allocated_bytes"] = torch.cuda.max_memory_allocated()  # the allocator's own count
    r["arm"], r["depth"] = name, depth
    return r


def markdown(results: list[dict], env: dict) -> str:
    gib = 2.0 ** 30
    lines = ["# Peak GPU memory of a training step, by where it was allocated", "",
             f"{env.get('gpu')}; torch {env.get('torch')}; ResNet step, bf16 autocast, "
             "channels_last_3d, 8 x 1 x 64 x 128 x 128, SGD momentum", ""]
    for r in results:
        lines += [f"## ResNet-{r['depth']} {r['arm']}: peak {r['peak_bytes'] / gib:.2f} GiB "
                  f"(allocator max {r['max_allocated_bytes'] / gib:.2f} GiB)", "",
                  "| allocated at | GiB | blocks |", "|---|---|---|",
                  f"| before the step (parameters, optimizer state, ...) | "
                  f"{r['baseline_bytes'] / gib:.3f} | |"]
        lines += [f"| `{g['where']}` | {g['bytes'] / gib:.3f} | {g['blocks']} |" for g in r["groups"]]
        if r["other_groups"]:
            lines.append(f"| {r['other_groups']} other places | {r['other_bytes'] / gib:.3f} | |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_peak",
                                description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=50, help="ResNet depth (default 50)")
    p.add_argument("--arms", default="eager,fused,memory-saving",
                   help="comma-separated: eager, fused, memory-saving")
    p.add_argument("--out", default="benchmarks/results/latest/memory", help="results folder")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("memory_peak: needs a CUDA device", file=sys.stderr)
        return 2
    from .common import collect_env

    env = collect_env("cuda")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for arm in [s.strip() for s in a.arms.split(",") if s.strip()]:
        results.append(measure(arm, a.depth))
        (out / "peak.json").write_text(json.dumps({"env": env, "results": results}, indent=1,
                                                  default=str))
        (out / "peak.md").write_text(markdown(results, env))
        torch.cuda.empty_cache()
    print(markdown(results, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
