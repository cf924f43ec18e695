"""Where a training step's peak GPU memory goes.

``python -m benchmarks.memory_peak [--depth 50] [--arms eager,fused,memory-saving] [--out DIR]``

For each arm, the ResNet step of the ``train_step`` benchmark (bf16 autocast, channels_last_3d,
8 x 1 x 64 x 128 x 128, SGD with momentum) runs three warm-up steps, then one step under
``torch.cuda.memory._record_memory_history`` (Python stacks). The allocator's trace of that step
is replayed to find the moment of peak allocated memory, and the blocks live then are grouped
by where they were allocated: the innermost frame in the model's code (``torch/nn``,
``med3d_ext``) or, for blocks made inside the autograd engine, "backward". Memory allocated
before the step (parameters, gradients' storage, optimizer state, cuDNN's cached workspaces)
is one line. Between arms the garbage collector runs (and, on a GPU, the allocator's cache is
emptied), the memory still allocated when an arm starts is recorded, and an arm whose memory
before the step is well above its own parameters, gradients and optimizer state
(:func:`state_bytes`) says so: what an earlier arm left would otherwise land silently in that
line. Writes ``peak.json`` and ``peak.md`` into ``--out``; the issue's 2.5 GiB target for
ResNet-50 is about these numbers.

``--device cpu``: the same step on the CPU (bf16 autocast there too), one step under
``torch.profiler`` with ``profile_memory``; its memory timeline (``torch.profiler``'s memory
profile: every tensor's creation, version and destruction) is replayed the same way, and the
tensors live at the peak are grouped by the profiler's category (parameter, activation, ...)
and the op that made them. What a step keeps for backward does not depend on the device, so
this explains a GPU peak without a GPU: the fused ResNet-50 arm as the H100 ran it (its stem
algorithm, ``MED3D_EXT_STEM_CONV=space_to_depth_fold_w``, and the weights as cast then) peaks
at 3.00 GiB here against 3.01 GiB allocated there. It does not see cuDNN's workspaces or the caching
allocator's rounding. About 30 s per ResNet-50 arm on 2 cores; ``--batch`` scales it down.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ARMS = ("eager", "fused", "memory-saving")
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
            # every free counts, also of a block allocated before the trace (part of
            # ``baseline``, e.g. the gradients zero_grad(set_to_none=True) drops): counting
            # only the trace's own blocks put the new gradients on top of the old ones
            blk = live.pop(e["addr"], None)
            cur -= blk[0] if blk is not None else int(e.get("size", 0))
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in best_live.values():
        groups[where][0] += size
        groups[where][1] += 1
    rows = sorted(({"where": w, "bytes": b, "blocks": n} for w, (b, n) in groups.items()),
                  key=lambda r: -r["bytes"])
    return {"baseline_bytes": baseline, "step_peak_bytes": best, "peak_bytes": baseline + best,
            "groups": rows[:top], "other_groups": max(0, len(rows) - top),
            "other_bytes": sum(r["bytes"] for r in rows[top:])}


def _arm_step(name: str, depth: int, device: str = "cuda", batch: int | None = None):
    """The train_step benchmark's step function of one arm, on fresh copies of one model."""
    import copy
    from types import SimpleNamespace

    from . import bm_train_step as T

    model, source = T.base_model(depth)
    shape = T.GPU_SHAPE if batch is None else (batch,) + tuple(T.GPU_SHAPE[1:])
    st = T.Step(SimpleNamespace(device=device), shape, amp=True, cl=True)
    if name == "eager":
        return st.make(copy.deepcopy(model), False)[0]
    if name == "fused":
        return st.make(T.fused_copy(model, source), False)[0]
    if name == "memory-saving":
        return T.memory_saving(st, model, source)[0]
    raise SystemExit(f"memory_peak: unknown arm {name!r} (eager, fused, memory-saving)")


def _optimizer_of(fn, depth: int = 4):
    """The optimizer a step function closes over (through wrappers such as
    ``common.with_module_flag``), or None."""
    import torch

    seen, todo = set(), [(fn, 0)]
    while todo:
        obj, d = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.optim.Optimizer):
            return obj
        if d >= depth:
            continue
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append((cell.cell_contents, d + 1))
            except ValueError:  # an empty cell
                pass
        if getattr(obj, "__wrapped__", None) is not None:
            todo.append((obj.__wrapped__, d + 1))
    return None


def state_bytes(step) -> int | None:
    """Bytes of the arm's own state before a step: its parameters, their gradients and the
    optimizer's state (found through the step's optimizer; None when it has none)."""
    import torch

    opt = _optimizer_of(step)
    if opt is None:
        return None
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for g in opt.param_groups:
        for p in g["params"]:
            add(p)
            add(p.grad)
    for st in opt.state.values():
        for v in st.values():
            add(v)
    return total


# "well above" its own state: the memory before an arm's step exceeds its parameters,
# gradients and optimizer state by more than this fraction of them plus this many bytes (the
# step's input and target, cuDNN's cached workspaces); a whole earlier arm left behind is at
# least its own state again
LEFTOVER_FRACTION, LEFTOVER_BYTES = 0.5, 128 * 2 ** 20


def leftover(r: dict) -> int | None:
    """Bytes by which the memory before ``r``'s step is well above its own state (see
    LEFTOVER_FRACTION), else None."""
    own, before = r.get("state_bytes"), r.get("baseline_bytes")
    if own is None or before is None:
        return None
    extra = before - own
    return extra if extra > LEFTOVER_FRACTION * own + LEFTOVER_BYTES else None


def between_arms(device: str) -> int | None:
    """Frees what the previous arm left (its step, model and optimizer, reference cycles
    included) and returns the memory still allocated (CUDA; None on the CPU)."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()
    return None


def measure(name: str, depth: int, batch: int | None = None) -> dict:
    import torch

    before_arm = torch.cuda.memory_allocated()  # what earlier arms left, if anything
    step = _arm_step(name, depth, "cuda", batch)
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
    r["arm"], r["depth"], r["batch"] = name, depth, batch
    r["allocated_before_arm_bytes"], r["state_bytes"] = before_arm, state_bytes(step)
    return r


def timeline_breakdown(timeline, category_of, made_by, top: int = 25,
                       anonymous=lambda key: False) -> dict:
    """Replays ``torch.profiler``'s memory timeline (``(time, action, (key, version), bytes)``;
    actions by name: PREEXISTING, CREATE, INCREMENT_VERSION, DESTROY) and returns the peak and
    the tensors live at it grouped by ``category_of(key, version)`` and ``made_by(key)``, in
    :func:`peak_breakdown`'s layout: ``baseline_bytes`` are the tensors that existed before the
    profiled step and are still live at its peak (parameters, optimizer state, ...), the groups
    the tensors the step made. Allocations without a tensor identity (``anonymous(key)``: the
    profiler gives them all one key per device) are a signed running sum, one group."""
    live: dict = {}
    before: set = set()
    cur = best = anon = anon_before = best_anon = 0
    best_live: dict = {}
    for _, action, (key, version), size in timeline:
        act = getattr(action, "name", str(action))
        if anonymous(key):
            # INCREMENT_VERSION here: an address allocated again without a recorded free
            delta = size if act in ("PREEXISTING", "CREATE", "INCREMENT_VERSION") else \
                -size if act == "DESTROY" else 0
            anon += delta
            cur += delta
            anon_before += size if act == "PREEXISTING" else 0
        elif act in ("PREEXISTING", "CREATE"):
            live[(key, version)] = size
            cur += size
            if act == "PREEXISTING":
                before.add(key)
        elif act == "INCREMENT_VERSION":
            cur += size - live.pop((key, version), 0)
            live[(key, version + 1)] = size
        elif act == "DESTROY":
            cur -= live.pop((key, version), 0)
        if cur > best:
            best, best_live, best_anon = cur, dict(live), anon
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    # anonymous memory from before the step counts as baseline as far as it is still live
    baseline = max(0, min(best_anon, anon_before))
    best_anon -= baseline
    for (key, version), size in best_live.items():
        if key in before:
            baseline += size
            continue
        where = f"{category_of(key, version)}: {made_by(key)}"
        groups[where][0] += size
        groups[where][1] += 1
    if best_anon:
        groups["allocations without a tensor (workspaces, ...)"] = [best_anon, 0]
    rows = sorted(({"where": w, "bytes": b, "blocks": n} for w, (b, n) in groups.items()),
                  key=lambda r: -r["bytes"])
    return {"baseline_bytes": baseline, "step_peak_bytes": best - baseline, "peak_bytes": best,
            "groups": rows[:top], "other_groups": max(0, len(rows) - top),
            "other_bytes": sum(r["bytes"] for r in rows[top:])}


def _made_by(memory_profile) -> dict:
    """TensorKey -> "op @ innermost model-code frame" of the op that first output it."""
    made = {}
    for node in memory_profile._data_flow_graph.flow_nodes:
        ev, where = node._event, ""
        p = ev.parent
        while p is not None:
            if ".py(" in p.name and any(m in p.name for m in _MODEL_PATHS + ("torch/optim",)):
                where = p.name.split("site-packages/")[-1].split("/work/main/")[-1]
                break
            p = p.parent
        for key in node.outputs:
            made.setdefault(key, f"{ev.name} @ {where}" if where else ev.name)
    return made


def measure_cpu(name: str, depth: int, batch: int | None = None) -> dict:
    """:func:`measure` on the CPU, from ``torch.profiler``'s memory timeline of one step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import MemoryProfile, TensorKey
    except ImportError as e:  # a private module: say which torch lacks it
        raise SystemExit(f"memory_peak --device cpu: torch {torch.__version__} has no "
                         f"torch.profiler._memory_profiler ({e})") from None
    step = _arm_step(name, depth, "cpu", batch)
    step()  # warm-up: optimizer state and oneDNN's caches exist before the profiled step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    mp = MemoryProfile(prof.profiler.kineto_results)
    made = _made_by(mp)

    def category(key, version):
        c = mp._categories.get(key, version)
        return c.name.lower() if c is not None else "unknown"
    r = timeline_breakdown(mp.timeline, category, lambda k: made.get(k, "(unknown op)"),
                           anonymous=lambda k: not isinstance(k, TensorKey))
    r["max_allocated_bytes"] = None  # no allocator on the CPU: nothing independent to show
    r["arm"], r["depth"], r["batch"] = name, depth, batch
    r["allocated_before_arm_bytes"], r["state_bytes"] = None, state_bytes(step)
    return r


def markdown(results: list[dict], env: dict, device: str = "cuda") -> str:
    gib = 2.0 ** 30
    batch = next((r.get("batch") for r in results if r.get("batch")), None) or 8
    if device == "cpu":
        head = ["# Peak memory of a training step on the CPU (torch.profiler memory timeline), "
                "by category and the op that made each tensor", "",
                f"{env.get('cpu')}; torch {env.get('torch')}; ResNet step, bf16 autocast, "
                f"channels_last_3d, {batch} x 1 x 64 x 128 x 128, SGD momentum. The tensors a "
                "step keeps do not depend on the device; cuDNN workspaces are not seen here.", ""]
    else:
        head = ["# Peak GPU memory of a training step, by where it was allocated", "",
                f"{env.get('gpu')}; torch {env.get('torch')}; ResNet step, bf16 autocast, "
                f"channels_last_3d, {batch} x 1 x 64 x 128 x 128, SGD momentum", ""]
    lines = head
    for r in results:
        alloc = (f"allocator max {r['max_allocated_bytes'] / gib:.2f} GiB"
                 if r.get("max_allocated_bytes") is not None else "no allocator max on the CPU")
        own = ("" if r.get("state_bytes") is None else  # the arm's own, for comparison
               f"; its own parameters, gradients and optimizer state {r['state_bytes'] / gib:.3f}")
        lines += [f"## ResNet-{r['depth']} {r['arm']}: peak {r['peak_bytes'] / gib:.2f} GiB "
                  f"({alloc})", "",
                  "| allocated at | GiB | blocks |", "|---|---|---|",
                  f"| before the step (parameters, optimizer state, ...{own}) | "
                  f"{r['baseline_bytes'] / gib:.3f} | |"]
        extra, warn = leftover(r), None
        if extra is not None:  # said under the table: a row here would break it
            warn = (f"**Warning**: the memory before this arm's step is {extra / gib:.3f} GiB "
                    f"above its own parameters, gradients and optimizer state "
                    f"({r['state_bytes'] / gib:.3f} GiB): something an earlier arm left (or a "
                    "cache) is counted in \"before the step\"")
            if r.get("allocated_before_arm_bytes"):
                warn += (f"; {r['allocated_before_arm_bytes'] / gib:.3f} GiB was still allocated "
                         "when the arm started")
        lines += [f"| `{g['where']}` | {g['bytes'] / gib:.3f} | {g['blocks']} |" for g in r["groups"]]
        if r["other_groups"]:
            lines.append(f"| {r['other_groups']} other places | {r['other_bytes'] / gib:.3f} | |")
        if warn:
            lines += ["", warn + "."]
        elif r.get("allocated_before_arm_bytes"):
            lines += ["", f"{r['allocated_before_arm_bytes'] / gib:.3f} GiB was still allocated "
                      "when this arm started (after the garbage collector and emptying the "
                      "allocator's cache)."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_peak",
                                description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=50, choices=(10, 18, 34, 50, 101, 152, 200),
                   help="ResNet depth (default 50)")
    p.add_argument("--arms", default="eager,fused,memory-saving",
                   help="comma-separated: eager, fused, memory-saving")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (the allocator's trace; default) or cpu (torch.profiler's memory "
                        "timeline of the same step)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 8, the perf-baselines shape)")
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest",
                               "memory")  # the git-ignored folder, wherever this is run
    p.add_argument("--out", default=default_out, help=f"results folder (default {default_out})")
    a = p.parse_args(argv)
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad or not arms:
        p.error(f"--arms: expected some of {', '.join(ARMS)}, got {a.arms!r}")
    if a.batch is not None and a.batch < 1:
        p.error(f"--batch: need at least 1, got {a.batch}")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("memory_peak: needs a CUDA device (or --device cpu)", file=sys.stderr)
        return 2
    from .common import collect_env

    env = collect_env(a.device)
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file, or a place that cannot be written: named, no traceback
        p.error(f"--out {a.out}: {exc.strerror or exc}")
    results = []
    for arm in arms:
        # what the previous arm left must not count as this arm's "before the step"
        between_arms(a.device)
        if a.device == "cpu":
            results.append(measure_cpu(arm, a.depth, a.batch))
        else:
            results.append(measure(arm, a.depth, a.batch))
        extra = leftover(results[-1])
        if extra is not None:
            print(f"memory_peak: {arm}: the memory before the step is {extra / 2 ** 30:.3f} GiB "
                  "above the arm's own parameters and optimizer state (see peak.md)",
                  file=sys.stderr)
        (out / "peak.json").write_text(json.dumps({"env": env, "device": a.device,
                                                   "results": results}, indent=1, default=str))
        (out / "peak.md").write_text(markdown(results, env, a.device))
    print(markdown(results, env, a.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
