"""``--profile START:STEPS``: torch.profiler over a few training steps of a real run.

Answers "where does a step's time go" for the whole training step (loader wait, augmentation,
model, heads, loss, optimizer), which the single-op benchmarks cannot: the profiler is on for
steps START+1 .. START+STEPS (after START optimizer steps) and writes, into ``RUN/profile/``:

- ``summary.json``: per step, the wall time under the profiler, the GPU kernel time and
  launches (CUDA), and the host time spent in operators; the 15 costliest operators;
- ``ops.txt``: torch's operator table (self time, sorted by device time on a GPU);
- ``trace.json``: the Chrome / Perfetto trace (open in https://ui.perfetto.dev);
- ``python_sites.txt`` (with ``PYTHON_STACKS`` on, or ``MED3D_EXT_PROFILE_STACKS=1``): the host
  time of the package's own Python functions per step, each inclusive of what it calls (the
  profiler records Python frames then, at more overhead): which part of a host-bound step
  (heads, loss, augmentation, optimizer, logging) its launches come from.

On a GPU the summary also says where the host waited for the device, which the kernel table
cannot show: the CUDA runtime calls per step (launches, copies, synchronisations, with their
host time), and every synchronising operation torch saw (``torch.cuda.set_sync_debug_mode``
on for the profiled steps) with the line of Python that caused it. A step whose host blocks on
the GPU cannot queue the next step's work in advance; these lines name the culprit.

Wall times under the profiler are inflated by its own per-op cost; the kernel time and the
launch count are not. A window is a span of the training loop: a log row, validation or
checkpoint that falls after one of its steps but the last is inside it. Only the main process
(rank 0) profiles. A run resumed inside the window profiles what is left of it; one that never
reaches it says so and writes nothing.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
import warnings
from pathlib import Path

import torch


# torch's warning for a synchronising CUDA operation under set_sync_debug_mode("warn")
SYNC_WARNING = "called a synchronizing CUDA operation"


class SyncRecorder:
    """Records the synchronising CUDA operations of a window of steps: torch's sync debug
    mode is set to "warn" on entry, and each of its warnings is counted by the line of Python
    that caused it instead of being shown (the autograd engine's threads have no Python frame
    of their own: "<backward>"). Every other warning is shown as it would be, through the same
    filters (only the sync warning's filter and the display function are swapped, inside a
    ``warnings.catch_warnings`` that restores both). ``cuda=False``: records nothing (the CPU
    has nothing to wait for)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.sites = collections.Counter()
        self._cm = None
        self._prev_mode = 0

    def __enter__(self):
        if self.cuda:
            self._cm = warnings.catch_warnings()
            self._cm.__enter__()
            shown = warnings.showwarning
            # each sync is counted, not de-duplicated per location as a warning would be
            warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")

            def show(message, category, filename, lineno, file=None, line=None):
                if not self.count(message, filename, lineno):
                    shown(message, category, filename, lineno, file, line)
            warnings.showwarning = show
            self._prev_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self._cm is None:
            return False
        try:
            torch.cuda.set_sync_debug_mode(self._prev_mode)
        finally:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)
        return False

    def count(self, message, filename, lineno) -> bool:
        """Count ``message`` if it is torch's sync warning (True), else leave it (False)."""
        if SYNC_WARNING not in str(message):
            return False
        f = str(filename or "").replace("\\", "/")
        site = "<backward>" if not f or "/torch/autograd/" in f else f"{f}:{lineno}"
        self.sites[site] += 1
        return True

    def summary(self, steps: int) -> dict:
        n = max(steps, 1)
        return {"host_syncs_per_step": sum(self.sites.values()) / n if self.cuda else None,
                "host_sync_sites": [{"where": k, "per_step": v / n}
                                    for k, v in self.sites.most_common(10)]}


# CUDA runtime (cudaLaunchKernel, ...) and driver (cuLaunchKernel, ...) API calls; not kernels
# named cutlass_..., nor cuDNN's API (cudnn...)
_CUDA_API = re.compile(r"^cu(da)?[A-Z]")

# Record Python frames in the profiled steps (python_sites.txt); the environment variable sets
# the initial value (e.g. for benchmarks.train_throughput's runs)
PYTHON_STACKS = os.environ.get("MED3D_EXT_PROFILE_STACKS", "") not in ("", "0")

# A Python frame's event under with_stack: "path/file.py(123): function", "<string>(5): f", or a
# C function called from Python ("<built-in method ...>")
_PY_FRAME = re.compile(r"^(.+\.py|<[^>]+>)\(\d+\): |^<built-in ")
# the package's own frames, by path: .../med3d_ext/<module>.py(line): function
_OWN_FRAME = re.compile(r"(?:^|/)(med3d_ext/[^()]+\.py\(\d+\): .+)$")


def is_python_frame(name: str) -> bool:
    return bool(_PY_FRAME.match(name))


def top_level_ops(events) -> list:
    """The host operators no other operator called (Python frames, recorded with with_stack,
    do not count as callers): their CPU time is the host work a step queues."""
    def op_parent(e):
        p = e.cpu_parent
        while p is not None and is_python_frame(p.name):
            p = p.cpu_parent
        return p
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
            and not is_python_frame(e.name) and op_parent(e) is None]


def own_python_sites(events, steps: int, top: int = 60) -> list[dict]:
    """The package's Python functions among with_stack's frames: calls and inclusive host
    milliseconds per step, costliest first (a function that calls itself counts twice)."""
    n = max(steps, 1)
    acc: dict[str, list] = {}
    for e in events:
        m = _OWN_FRAME.search(e.name) if is_python_frame(e.name) else None
        if m:
            a = acc.setdefault(m.group(1), [0, 0.0])
            a[0] += 1
            a[1] += e.cpu_time_total
    rows = [{"site": k, "calls_per_step": c / n, "host_ms_per_step": t / 1e3 / n}
            for k, (c, t) in acc.items()]
    return sorted(rows, key=lambda r: -r["host_ms_per_step"])[:top]


def gpu_kernels(events) -> list:
    """The CUDA kernels, memsets and copies among torch.profiler's events: not a user
    annotation's span on the GPU timeline (record_function, such as an optimizer's
    "Optimizer.step#AdamW.step"), whose device time is that of the kernels inside it, which are
    counted themselves (it was counted as one more, long, kernel and launch)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def runtime_calls(averages, steps: int, top: int = 8) -> list[dict]:
    """The CUDA runtime / driver API calls among torch.profiler's key averages (cudaLaunchKernel,
    cudaMemcpyAsync, cudaStreamSynchronize, ...): calls and host milliseconds per step, the
    costliest first. Host time in a synchronising call is time the host waited for the GPU."""
    n = max(steps, 1)
    rows = [{"name": a.key, "calls_per_step": a.count / n,
             "host_ms_per_step": a.cpu_time_total / 1e3 / n}
            for a in averages if _CUDA_API.match(a.key)]
    return sorted(rows, key=lambda r: -r["host_ms_per_step"])[:top]


def parse_spec(spec) -> tuple[int, int] | None:
    """``"START:STEPS"`` -> (START, STEPS); None or "" -> None (off). Raises ValueError."""
    if spec is None or spec == "":
        return None
    parts = str(spec).split(":")
    try:
        start, steps = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = steps = None
    if start is None or start < 0 or steps < 1:
        raise ValueError(f"profile: expected START:STEPS (START >= 0 optimizer steps to skip, "
                         f"STEPS >= 1 to profile, e.g. 20:5), got {spec!r}")
    return start, steps


class StepProfiler:
    """Call ``before(step)`` before each training step (``step`` = optimizer steps done) and
    ``after(step)`` after it; ``close()`` when training ends (a run that stops inside the
    profiled steps still writes what it has)."""

    def __init__(self, spec, run_dir, device: torch.device, enabled: bool = True, log=print):
        self.range = parse_spec(spec) if enabled else None
        self.out = Path(run_dir) / "profile"
        self.cuda = device.type == "cuda"
        self.log = log
        self.prof = None
        self.stacks = False  # Python frames recorded (PYTHON_STACKS when the window opened)
        self.done = 0
        self.t0 = 0.0
        self.written = False  # by this run (an earlier run's profile/ may be there)
        self.syncs = SyncRecorder(self.cuda)

    def before(self, step: int) -> None:
        if self.range is None or self.prof is not None:
            return
        start, steps = self.range
        if not start <= step < start + steps:
            return
        if step > start:  # a resumed run starts inside the window: profile what is left
            self.log(f"profile: the run resumed at step {step}, inside --profile {start}:{steps}; "
                     f"profiling steps {step + 1}..{start + steps}")
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.stacks = PYTHON_STACKS
        self.prof = torch.profiler.profile(activities=acts, with_stack=self.stacks)
        self.prof.__enter__()
        self.syncs.__enter__()
        self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        if self.prof is None:
            return
        self.done += 1
        if step >= sum(self.range):  # the window's last step is done
            self.close()

    def close(self) -> None:
        """Stop and write (after the last profiled step, or when training ends); says so when
        the window was never reached. Never raises: a failed profile must not replace the
        training's own outcome."""
        try:
            self._close()
        except Exception as exc:
            self.prof = None
            self.log(f"profile: could not finish: {type(exc).__name__}: {exc}")

    def _close(self) -> None:
        if self.prof is None:
            if self.range is not None:
                start, steps = self.range
                self.log(f"profile: steps {start + 1}..{start + steps} were not reached "
                         f"(--profile {start}:{steps}); nothing written")
                self.range = None
            return
        prof, self.prof = self.prof, None
        self.range = None  # once per run
        try:
            self.syncs.__exit__(None, None, None)
            if self.cuda:
                torch.cuda.synchronize()  # after the sync recorder: this one is ours
        finally:  # whatever failed above, the profiler is switched off
            wall = time.perf_counter() - self.t0
            prof.__exit__(None, None, None)
        try:
            self._write(prof, wall)
            self.written = True
        except Exception as exc:  # a failed report must not end a training run
            self.log(f"profile: could not write {self.out}: {type(exc).__name__}: {exc}")

    def _write(self, prof, wall: float) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        n = max(self.done, 1)
        events = prof.events()
        kernels = gpu_kernels(events)
        kernel_us = sum(e.device_time for e in kernels) if kernels else 0.0
        # top-level host operators: their CPU time is the host work a step queues
        host_us = sum(e.cpu_time_total for e in top_level_ops(events))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        avg = prof.key_averages()
        key = (lambda a: getattr(a, "self_device_time_total", 0.0)) if self.cuda else \
            (lambda a: a.self_cpu_time_total)
        # on a GPU a user annotation's device time is its kernels' (counted themselves); on the
        # CPU its self time is host work counted nowhere else (an optimizer step's loop)
        # operators only: with Python stacks the averages also hold Python frames, whose times
        # include the operators under them (python_sites.txt ranks the package's)
        costly = sorted((a for a in avg
                         if not (self.cuda and getattr(a, "is_user_annotation", False))
                         and not is_python_frame(a.key)),
                        key=key, reverse=True)[:15]
        summary = {
            "steps": self.done, "device": "cuda" if self.cuda else "cpu",
            "wall_ms_per_step": 1e3 * wall / n,
            "kernel_ms_per_step": kernel_us / 1e3 / n if self.cuda else None,
            "launches_per_step": len(kernels) / n if self.cuda else None,
            "host_op_ms_per_step": host_us / 1e3 / n,
            "top_ops": [{"name": a.key, "calls_per_step": a.count / n,
                         "self_ms_per_step": key(a) / 1e3 / n} for a in costly],
            "cuda_runtime": runtime_calls(avg, n),
            **self.syncs.summary(n),
            "note": "wall and host times are inflated by the profiler; kernel time is not",
        }
        if self.stacks:
            sites = own_python_sites(events, n)
            # in the summary, functions run at least once a step: a span entered less often
            # (the run itself, the training loop) holds the whole window and says nothing
            summary["python_sites"] = [r for r in sites if r["calls_per_step"] >= 1][:15]
            lines = [f"{'host ms/step':>12}  {'calls/step':>10}  site (inclusive; under the "
                     "profiler, so inflated)"]
            lines += [f"{r['host_ms_per_step']:12.3f}  {r['calls_per_step']:10.1f}  {r['site']}"
                      for r in sites]
            (self.out / "python_sites.txt").write_text("\n".join(lines) + "\n")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.out / "ops.txt").write_text(avg.table(sort_by=sort, row_limit=60))
        prof.export_chrome_trace(str(self.out / "trace.json"))
        k = (f", kernels {summary['kernel_ms_per_step']:.2f} ms and "
             f"{summary['launches_per_step']:.0f} launches per step, "
             f"{summary['host_syncs_per_step']:.1f} host syncs per step" if self.cuda else "")
        self.log(f"profile: {self.done} steps, {summary['wall_ms_per_step']:.1f} ms per step "
                 f"under the profiler{k}; {self.out}")
