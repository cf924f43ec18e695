"""Shared machinery of ``python -m benchmarks``: cases, timing, correctness checks, results.

An area module (``bm_<area>.py``) defines ``run(ctx)``; it builds :class:`Case` objects, adds one
implementation per row (the med3d_ext op, the eager reference, ``torch.compile``, MONAI, ...)
and calls ``case.run()``. For every case the runner:

1. builds each implementation lazily (``make()``), so an op missing from this build, a missing
   optional package or an out-of-memory becomes an ``unavailable: <reason>`` row, never a crash;
2. checks each implementation's output against the case's reference implementation *before*
   timing it; a wrong result is recorded as ``FAILED`` with its error and is not timed. Two
   check modes:

   - direct (default): ``max|out - ref| <= atol + rtol * max|ref|`` per output (:func:`compare`);
   - error ratio vs a high-precision reference (the case has ``precise``): for low-precision or
     long computations (a bf16 or fp32 training step through 10-50 layers) two valid
     implementations can differ by more than any fixed tolerance, because each is far from
     the exact result. The case's ``precise()`` computes the reference implementation's outputs
     in high precision (:func:`high_precision`: float64 on the CPU, fp32 with TF32 off on a
     GPU) from the same inputs and weights. The reference implementation's own error against
     it is the yardstick: every other implementation passes when, per output,
     ``err <= err_ratio * err_reference + atol + rtol * max|precise|`` (:func:`compare_ratio`;
     ``err_ratio`` 2 as in python_tests' dtype policy; rtol/atol are only a floor here, e.g.
     for a ReLU mask decided differently at a value within round-off of zero);
3. times with warm-up, then the median of repeats (CUDA events on a GPU,
   ``time.perf_counter`` + synchronize on the CPU), records peak memory on a GPU;
4. stores the speed-up of every non-baseline row against every baseline of the same case
   (``speedup[baseline] = baseline_ms / ms``), all measured in the same process; a row added
   with ``compare_to=[baseline names]`` gets ratios against those baselines only (a bf16 row
   against the bf16 baseline, not the fp32 one; a GPU row never against a baseline timed on
   the CPU).
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .environment import collect_env  # noqa: F401  (re-exported: the runner and the studies use it from here)
from .rows import caveats

OK, FAILED, UNAVAILABLE, ERROR = "ok", "FAILED", "unavailable", "error"
# --profile-only rows: what one call runs (torch.profiler), deliberately not timed
PROFILED = "profiled"


class Unavailable(Exception):
    """Raised by a ``make()`` when an implementation cannot run here (missing op or package)."""


# ----------------------------------------------------------------------------- availability


def m3d_attr(path: str):
    """``m3d_attr("ops.conv_bn_relu3d")`` -> the object, or raise :class:`Unavailable`.

    Any import error of med3d_ext or of a subpackage, and any missing attribute, is turned
    into a reason string so the row reads e.g. ``unavailable: med3d_ext.ops has no
    conv_bn_relu3d``.
    """
    import importlib

    try:
        obj = importlib.import_module("med3d_ext")
    except Exception as exc:  # a broken install must not stop the suite
        raise Unavailable(f"import med3d_ext failed: {exc!r}") from None
    done = "med3d_ext"
    for part in path.split("."):
        try:
            nxt = getattr(obj, part)
        except ImportError as exc:
            raise Unavailable(f"{done}.{part} failed to import: {exc}") from None
        except AttributeError:
            raise Unavailable(f"{done} has no {part}") from None
        obj, done = nxt, f"{done}.{part}"
    return obj


def op_backend(name: str, device: str = "cpu") -> str:
    """What a med3d_ext op row times: 'compiled (CUDA kernel)', 'compiled (CPU kernel)', or
    'reference fallback' (the ops route to med3d_ext.reference when the extension is not loaded;
    such a row must say so, or a slow reference would pass for the kernel)."""
    try:
        from med3d_ext import _extension

        if _extension.available() and hasattr(torch.ops.med3d_ext, name):
            key = "CUDA" if device == "cuda" else "CPU"
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"med3d_ext::{name}", key):
                return f"compiled ({key} kernel)"
            return f"compiled op without a {key} kernel"
    except Exception:
        pass
    return "reference fallback"


def optional_import(name: str):
    """Import an optional peer library (MONAI, TorchIO) or raise :class:`Unavailable`."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise Unavailable(f"{name} not installed ({type(exc).__name__})") from None


# ----------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def module_flag(module: str, name: str, value):
    """``module.name = value`` for the duration (e.g. a med3d_ext switch such as
    ``med3d_ext.nn.fused.RECOMPUTE_BLOCK_INPUTS``), restored afterwards."""
    mod = importlib.import_module(module)
    old = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, old)


def with_module_flag(fn, module: str, name: str, value):
    """``fn`` with :func:`module_flag` set around each call."""
    def call(*args, **kwargs):
        with module_flag(module, name, value):
            return fn(*args, **kwargs)
    return call


def with_env(fn, var: str, value: str):
    """``fn`` with the environment variable ``var`` set to ``value`` around each call (for the
    extension's switches read at every launch, e.g. MED3D_EXT_IM2COL_KERNEL), restored after."""
    def call(*args, **kwargs):
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old
    return call


def sync_stream(device: str) -> None:
    """Wait for the current stream only: a device-wide sync would also wait for work running
    beside it on purpose (e.g. the next batch's copy on the loader's side stream)."""
    if device == "cuda":
        torch.cuda.current_stream().synchronize()


def replays_graphs(impl_name: str) -> bool:
    """A row whose calls replay CUDA graphs (captured by hand, or torch.compile's
    reduce-overhead mode): their memory is a private pool allocated when the graphs were
    recorded, before the timed window, so the allocator's peak over that window says nothing."""
    return "CUDA graph" in impl_name or "reduce-overhead" in impl_name


def capture_cuda_graph(fn: Callable, warmup: int = 3):
    """``(graph, out)``: ``fn()`` captured once in a CUDA graph, whose replays rerun its kernels
    and overwrite ``out`` (its static outputs). PyTorch's capture recipe: ``warmup`` calls on a
    side stream first (lazy initialisation, cuDNN autotuning, allocator pools)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graphed(make: Callable) -> Callable:
    """``make()``'s function captured once in a CUDA graph (capture_cuda_graph): each call
    replays it and returns the graph's static outputs (overwritten by the next replay). The
    launch-free cost of the same work: what ``torch.compile(mode="reduce-overhead")`` or a
    whole-step graph gives. A function whose host code syncs (e.g. a device-to-host read)
    cannot be captured: unavailable."""
    if not torch.cuda.is_available():
        raise Unavailable("CUDA graphs need a CUDA device")
    try:
        graph, out = capture_cuda_graph(make())
    except RuntimeError as exc:
        raise Unavailable(f"not capturable in a CUDA graph: {str(exc).splitlines()[0][:150]}") from None

    def replay():
        graph.replay()
        return out
    return replay


def time_fn(fn: Callable, device: str, warmup: int, repeats: int, budget_s: float | None = None,
            soft_s: float = 0.2, after_warmup: Callable | None = None) -> list[float]:
    """Per-call times in ms after ``warmup`` calls. ``budget_s`` caps the repeats for slow
    functions (at least 3 are taken) so a slow baseline cannot eat the quick suite's time; fast
    functions get up to 5x ``repeats`` while under ``soft_s`` seconds, which steadies their
    median on a shared machine. ``after_warmup()`` runs once the warm-up has finished (e.g. to
    reset the peak-memory counter, so cuDNN autotuning and compilation do not count)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if after_warmup is not None:
        after_warmup()
    times: list[float] = []
    start = time.perf_counter()
    for i in range(5 * repeats):
        if i >= repeats and time.perf_counter() - start > soft_s:
            break
        if device == "cuda":
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ----------------------------------------------------------------------------- comparison


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return []


def _pairs(actual, expected) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], str]:
    """The (index, actual, expected) output pairs, non-empty and with matching shapes (a
    same-size shape is reshaped: squeezed dims), or ([], message) when they do not line up."""
    a_list, e_list = _flatten(actual), _flatten(expected)
    if len(a_list) != len(e_list):
        return [], f"{len(a_list)} outputs, reference has {len(e_list)}"
    out = []
    for i, (a, e) in enumerate(zip(a_list, e_list)):
        if a.shape != e.shape:
            if a.numel() != e.numel():
                return [], f"output {i}: shape {tuple(a.shape)} vs reference {tuple(e.shape)}"
            a = a.reshape(e.shape)
        if a.numel():
            out.append((i, a.detach(), e.detach()))
    return out, ""


def _err_scale(a: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    a64, e64 = a.double().to(e.device), e.double()
    return (a64 - e64).abs().max().item(), e64.abs().max().item()


def compare(actual, expected, rtol: float, atol: float, label_mismatch: float = 1e-3) -> tuple[bool, float, str]:
    """Scale-aware comparison of (nested) outputs: float tensors pass when
    ``max|a - e| <= atol + rtol * max|e|`` (a gradient summed over 10^6 voxels has a large
    scale; this keeps one tolerance meaningful); integer tensors (labels) pass when at most a
    ``label_mismatch`` fraction differs (nearest sampling may break exact .5 ties differently).
    Returns (ok, max abs error, message). Nothing to compare (no non-empty tensor output, e.g.
    Python numbers) is a failure: a check that compared nothing must not pass."""
    pairs, msg = _pairs(actual, expected)
    if msg:
        return False, float("nan"), msg
    if not pairs:
        return False, float("nan"), "nothing compared: no non-empty tensor output"
    worst, ok, msgs = 0.0, True, []
    for i, a, e in pairs:
        if not e.is_floating_point():
            frac = (a.to(e.device) != e).float().mean().item()
            err = (a.to(e.device).long() - e.long()).abs().max().item()
            worst = max(worst, float(err))
            if frac > label_mismatch:
                ok = False
                msgs.append(f"output {i}: {frac:.2%} labels differ")
            continue
        err, scale = _err_scale(a, e)
        worst = max(worst, err)
        if not math.isfinite(err) or err > atol + rtol * scale:
            ok = False
            msgs.append(f"output {i}: max abs err {err:.3g} > {atol:g} + {rtol:g} * {scale:.3g}")
    return ok, worst, "; ".join(msgs)


def _per_output(tol, n: int, what: str) -> list[float]:
    if isinstance(tol, (int, float)):
        return [float(tol)] * n
    tol = [float(t) for t in tol]
    if len(tol) != n:
        raise ValueError(f"{what}: {len(tol)} values for {n} outputs")
    return tol


def output_errors(actual, precise) -> list[float]:
    """Max abs error of each float output against the high-precision ``precise`` outputs."""
    pairs, msg = _pairs(actual, precise)
    if msg:
        raise ValueError(msg)
    if not pairs:
        raise ValueError("nothing to check: no non-empty tensor output")
    if any(not e.is_floating_point() for _, _, e in pairs):
        raise ValueError("the error-ratio check is for float outputs only")
    return [_err_scale(a, e)[0] for _, a, e in pairs]


def compare_ratio(actual, precise, ref_errors: list[float], ratio: float, rtol, atol,
                  detail: list | None = None) -> tuple[bool, float, float, str]:
    """The error-ratio check (module docstring, item 2): output i passes when
    ``err_i <= ratio * ref_errors[i] + atol_i + rtol_i * max|precise_i|``, with ``err_i`` the
    max abs error of ``actual`` against ``precise`` and ``ref_errors`` that of the reference
    implementation (:func:`output_errors`). ``rtol`` / ``atol``: one float, or one per output.
    Returns (ok, max abs error, largest err_i / ref_errors[i], message); that ratio may exceed
    ``ratio`` on a passing row when the floor admits it (e.g. a loss both compute to 1e-8).
    ``detail``: a list that gets one dict per output (its error, the reference
    implementation's, the bound and whether the floor or the ratio set it), so that a row
    whose ratio is large shows which output and how far inside the floor it was."""
    pairs, msg = _pairs(actual, precise)
    if msg:
        return False, float("nan"), float("nan"), msg
    if not pairs:
        return False, float("nan"), float("nan"), "nothing compared: no non-empty tensor output"
    if len(pairs) != len(ref_errors):
        return False, float("nan"), float("nan"), f"{len(pairs)} outputs, the reference checked {len(ref_errors)}"
    n = len(_flatten(precise))  # per-output floors are indexed like the outputs, empty ones too
    rtols, atols = _per_output(rtol, n, "rtol"), _per_output(atol, n, "atol")
    worst, worst_ratio, ok, msgs = 0.0, 0.0, True, []
    for (i, a, e), ref_err in zip(pairs, ref_errors):
        rt, at = rtols[i], atols[i]
        err, scale = _err_scale(a, e)
        worst = max(worst, err)
        worst_ratio = max(worst_ratio, err / ref_err if ref_err > 0 else (0.0 if err == 0 else math.inf))
        bound = ratio * ref_err + at + rt * scale
        if detail is not None:
            detail.append({"output": i, "err": err, "ref_err": ref_err, "bound": bound,
                           "set_by": "ratio" if ratio * ref_err >= at + rt * scale else "floor",
                           # within the bound only thanks to the floor: beyond ratio x ref
                           "floor_only": bool(ratio * ref_err < err <= bound)})
        if not math.isfinite(err) or err > bound:
            ok = False
            msgs.append(f"output {i}: max abs err {err:.3g} vs the high-precision reference > {ratio:g} x "
                        f"the reference implementation's {ref_err:.3g} + floor {at:g} + {rt:g} * {scale:.3g}")
    return ok, worst, worst_ratio, "; ".join(msgs)


# Families of GPU kernels by name (lower-cased), first match wins: (family, substrings). Our own
# kernels first (their names hold "med3d_ext"; the stem's implicit GEMM says fprop/wgrad too),
# then cuDNN's and the rest.
_OUR_FAMILIES = (
    ("med3d_ext stem pool", ("pool",)),
    ("med3d_ext stem GEMM / im2col", ("im2col", "stem", "space_to_depth", "gemm")),
    ("med3d_ext BN statistics", ("statsacc", "stats_finish", "welford")),
    ("med3d_ext BN backward reduce", ("backwardacc", "reduce_finish")),
    ("med3d_ext BN forward apply", ("forwardop",)),
    ("med3d_ext BN backward apply", ("backwardapplyop",)),
    ("med3d_ext seg loss", ("seg_loss", "headtable")),
    ("med3d_ext resample", ("::rs::", "pair_kernel", "resize")),
)
_OTHER_FAMILIES = (
    ("cuDNN BatchNorm", ("bn_fw", "bn_bw", "batchnorm")),
    ("cuDNN layout transforms", ("nchwtonhwc", "nhwctonchw")),
    ("cuDNN conv dgrad", ("dgrad",)),
    ("cuDNN conv wgrad", ("wgrad",)),
    ("cuDNN conv fprop", ("fprop", "implicit_gemm", "implicit_convolve", "conv2d", "conv3d",
                          "cudnn")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "cublas", "cutlass", "sm90_xmma")),
    ("optimizer", ("multi_tensor", "foreach", "optimizer", "adam", "sgd")),
    ("memcpy / memset", ("memcpy", "memset")),
    ("ATen pooling", ("pool",)),
    ("ATen element-wise (casts, ReLU, adds)", ("elementwise", "copy_kernel", "fill")),
    ("ATen reductions / BatchNorm", ("reduce", "batch_norm", "welford", "norm")),
)


def kernel_family(name: str) -> str:
    """The family of one GPU kernel name (_OUR_FAMILIES for med3d_ext's, else _OTHER_FAMILIES;
    'other med3d_ext' / 'other' when none matches)."""
    low = name.lower()
    ours = "med3d_ext" in low
    table = _OUR_FAMILIES if ours else _OTHER_FAMILIES
    return next((f for f, keys in table if any(k in low for k in keys)),
                "other med3d_ext" if ours else "other")


def kernel_families(rows: list[dict]) -> list[dict]:
    """GPU time and calls per call of fn by kernel family (kernel_family), largest first;
    ``rows`` as profile_kernels collects them."""
    fam: dict = {}
    for r in rows:
        f = kernel_family(r["name"])
        acc = fam.setdefault(f, {"family": f, "us": 0.0, "calls": 0.0})
        acc["us"] += r["us"]
        acc["calls"] += r["calls"]
    return sorted(fam.values(), key=lambda a: -a["us"])


def op_rows(averages, gpu: bool, calls: int) -> list[dict]:
    """profile_kernels' rows from torch.profiler's key_averages(), per call of fn, largest
    first: on a GPU every CUDA kernel, memset and copy, but not a user annotation's span on the
    GPU timeline (record_function, e.g. "Optimizer.step#SGD.step": it has a device time of its
    own, the span of the kernels inside it, which are counted themselves; it was counted as
    one more kernel of ~0.6 ms in a ResNet-50 step, as torch's own totals do not); on the CPU
    the ATen and med3d_ext ops by self CPU time."""
    rows = []
    for e in averages:
        if gpu:
            us = getattr(e, "self_device_time_total", None)
            if us is None:  # older torch
                us = getattr(e, "self_cuda_time_total", 0)
            if not us or getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
                continue
            if getattr(e, "is_user_annotation", False):
                continue
        else:
            us = e.self_cpu_time_total
            if not e.key.startswith(("aten::", "med3d_ext::")) or not us:
                continue
        rows.append({"name": e.key[:120], "calls": e.count / calls, "us": us / calls})
    rows.sort(key=lambda r: -r["us"])
    return rows


def profile_kernels(fn: Callable, device: str, calls: int = 3, top: int = 10) -> dict:
    """What one call of ``fn`` runs, from torch.profiler over ``calls`` calls (already warm):
    on a GPU every CUDA kernel, memset and copy (``launches`` per call and the ``top`` by GPU
    time); on the CPU the ATen ops by self CPU time. Per-call numbers are totals / ``calls``.
    This is where a slow row's time goes (e.g. an extra layout copy or a slow reduction)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    rows = op_rows(prof.key_averages(), gpu, calls)
    total = sum(r["us"] for r in rows)
    out = {"per_call_us": total, "top": rows[:top], "source": "CUDA kernels" if gpu else "ATen and med3d_ext ops (self CPU)"}
    if gpu:  # every kernel, by family: the top rows alone left half a ResNet-50 step unnamed
        out["families"] = kernel_families(rows)
    if gpu:
        out["launches"] = sum(r["calls"] for r in rows)  # rows' calls are per call already
        # Host time, outside the profiler (it inflates CPU time): how long the host takes to
        # issue one call without waiting for the GPU, against the call's wall time. host ~ wall
        # with GPU time well below it means a host-bound call (Python / dispatch overhead);
        # a call that syncs (or fills the launch queue) also shows host ~ wall.
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter() - t0
        sync(device)
        out["host_us"] = issued / calls * 1e6
        out["wall_us"] = (time.perf_counter() - t0) / calls * 1e6
    return out


def _profile_head(k: dict) -> str:
    """'N us of <source>[, L launches][, host H us of W us wall]' for a profile_kernels result."""
    n = f", {k['launches']:.0f} launches" if k.get("launches") is not None else ""
    h = (f", host {k['host_us']:.0f} us of {k['wall_us']:.0f} us wall"
         if k.get("host_us") is not None else "")
    return f"{k['per_call_us']:.0f} us of {k['source']}{n}{h}"


@contextmanager
def high_precision(device: str):
    """Context for computing a case's ``precise`` outputs; yields the dtype to compute in:
    float64 on the CPU; on a GPU fp32 with TF32 off for cuDNN and matmuls (float64 is
    impractically slow there at the benchmark shapes). Restores the TF32 flags after."""
    if device != "cuda":
        yield torch.float64
        return
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.float32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


# ----------------------------------------------------------------------------- cases


@dataclass
class Impl:
    name: str
    make: Callable  # () -> fn | (fn, check_fn); may raise Unavailable
    baseline: bool = False
    reference: bool = False  # the output every other impl is checked against
    check: bool = True  # False: a different algorithm (e.g. MONAI's random transform), not comparable
    note: str = ""
    warmup: int | None = None
    repeats: int | None = None
    # speed-ups only against these baselines (names of the case's baselines); None: against
    # every baseline. For rows unlike some baselines: another dtype or layout, or a baseline
    # timed on the CPU in a GPU case (a ratio across those measures the difference, not the op)
    compare_to: list | None = None
    # this row's check tolerance where the case's does not fit it (an fp32 row in a case whose
    # tolerance is for bf16); None: the case's
    rtol: Any = None
    atol: Any = None


@dataclass
class Case:
    """One benchmark case: a fixed workload, several implementations, one row each."""

    ctx: "Context"
    area: str
    name: str
    params: dict = field(default_factory=dict)  # shapes, dtypes, layout: reported per row
    # direct check: the tolerance; error-ratio check: the floor (a float, or one per output)
    rtol: Any = 1e-4
    atol: Any = 1e-5
    # () -> the reference implementation's check outputs computed in high precision, inside
    # ``high_precision(device)``: switches the case to the error-ratio check (module docstring)
    precise: Callable | None = None
    err_ratio: float = 2.0
    bytes_floor: float | None = None  # minimum bytes moved: gives a physical floor in ms
    flops: float | None = None
    targets: dict = field(default_factory=dict)  # {"eager": 3.0}: speed-up wanted vs that baseline
    impls: list = field(default_factory=list)
    # each timed call runs this many units (e.g. a window of batches): rows report ms per unit,
    # divided before the rows are printed and saved (a run cut short keeps per-unit values);
    # a --profile's per-call figures stay per call
    units_per_call: int = 1

    def add(self, name: str, make: Callable, **kw) -> "Case":
        self.impls.append(Impl(name, make, **kw))
        return self

    def _row(self, impl: Impl, **kw) -> dict:
        row = {"area": self.area, "case": self.name, "impl": impl.name, "baseline": impl.baseline,
               "reference": impl.reference, "params": self.params, "status": OK}
        if impl.note:
            row["note"] = impl.note
        row.update(kw)
        return row

    def run(self) -> list[dict]:
        ctx = self.ctx
        baselines = {i.name for i in self.impls if i.baseline}
        for i in self.impls:  # a misspelt name would silently drop the row's ratios
            unknown = sorted(set(i.compare_to or ()) - baselines)
            if unknown:
                raise ValueError(f"{self.name} / {i.name}: compare_to names no baseline of the case: {unknown}")
        rows: list[dict] = []
        ref = _Ref()
        if self.precise is not None and not ctx.profile_only:
            ref.precise, ref.missing = self._precise()
        ordered = sorted(self.impls, key=lambda i: not i.reference)  # reference first
        for impl in ordered:
            row = self._one(impl, ref)
            if impl.reference:
                ref.out = row.pop("_out", None)
                if row["status"] != OK:
                    ref.out = ref.errors = None
            row.pop("_out", None)
            rows.append(row)
            _free(ctx.device)
        self._ratios(rows)
        ctx.add_rows(rows)
        return rows

    def _precise(self):
        """(high-precision outputs, None) or (None, why they could not be computed)."""
        try:
            out = self.precise()
            sync(self.ctx.device)
            return out, None
        except torch.OutOfMemoryError:
            return None, "out of memory"
        except Exception as exc:
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            _free(self.ctx.device)

    def _check(self, impl: Impl, ref: "_Ref", out, row: dict) -> bool:
        """Check ``out`` (None: not computed) and note the result in ``row``; False = FAILED."""
        ratio_mode = self.precise is not None
        rtol = self.rtol if impl.rtol is None else impl.rtol
        atol = self.atol if impl.atol is None else impl.atol
        if not impl.check:
            row["check"] = "not comparable (different algorithm), not checked"
        elif ratio_mode and ref.precise is None:
            row["check"] = f"high-precision reference unavailable ({ref.missing}), not checked"
        elif out is None:
            row["check"] = "no reference output this run, not checked"
        elif ratio_mode and impl.reference:
            ref.errors = output_errors(out, ref.precise)
            row["max_abs_err"] = max(ref.errors, default=0.0)
            row["check"] = "the yardstick: its error vs the high-precision reference bounds the others'"
        elif ratio_mode:
            per_output = []
            good, err, ratio, msg = compare_ratio(out, ref.precise, ref.errors, self.err_ratio,
                                                  rtol, atol, detail=per_output)
            row.update(max_abs_err=err, err_ratio=ratio, errors_by_output=per_output)
            if not good:
                row.update(status=FAILED, reason=f"wrong result: {msg}")
                return False
        elif not impl.reference:
            good, err, msg = compare(out, ref.out, rtol, atol)
            row["max_abs_err"] = err
            if not good:
                row.update(status=FAILED, reason=f"wrong result vs reference: {msg}")
                return False
        return True

    def _one(self, impl: Impl, ref: "_Ref") -> dict:
        ctx = self.ctx
        t0 = time.perf_counter()
        fn = None
        try:
            if ctx.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if ctx.profile_only and "compile" in impl.name and not ctx.with_compile:
                raise Unavailable("left out of --profile-only unless --with-compile (compiling is slow)")
            made = impl.make()
            fn, check_fn = made if isinstance(made, tuple) else (made, made)
            out = None
            if not ctx.profile_only and impl.check and ref.can_check(impl, self.precise is not None):
                out = check_fn()
                sync(ctx.device)
            row = self._row(impl)
            if ctx.profile_only:
                row["check"] = "profile only: not checked (the timed run checks)"
            elif not self._check(impl, ref, out, row):
                return row
            if impl.reference:
                row["_out"] = out  # what the other rows are checked against
            # every row then holds one set of outputs during its timing (the reference row its
            # own, the others the reference's): an extra set would bias their peak memory
            out = None
            first_s = time.perf_counter() - t0
            warmup = impl.warmup if impl.warmup is not None else ctx.warmup
            if ctx.profile_only:  # only what one call runs: no timing (a separate, later stage)
                for _ in range(max(1, warmup)):
                    fn()
                k = profile_kernels(fn, ctx.device)
                row.update(status=PROFILED, kernels=k, setup_s=round(first_s, 2),
                           reason=f"{_profile_head(k)} per call (not timed)")
                return row
            reset = torch.cuda.reset_peak_memory_stats if ctx.device == "cuda" else None
            times = time_fn(fn, ctx.device, warmup, impl.repeats if impl.repeats is not None else ctx.repeats,
                            ctx.budget_s, after_warmup=reset)
            # per unit (e.g. per batch of a timed window), before anything is derived from them
            times = [t / self.units_per_call for t in times]
            ms = median(times)
            row.update(median_ms=ms, min_ms=min(times), repeats=len(times), setup_s=round(first_s, 2))
            if ctx.device == "cuda" and not replays_graphs(impl.name):
                # peak over the timed calls (steady state: inputs, weights, optimizer state,
                # activations), not the warm-up's cuDNN autotuning or compilation. Not for a
                # CUDA graph's replays: its memory is a private pool, captured before this
                # window and not counted by the allocator's peak (0.57 GiB was shown for a
                # 3.6 GiB step)
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if self.bytes_floor:
                row["gbps"] = self.bytes_floor / (ms * 1e-3) / 1e9
                try:  # the floor is extra information: never lose a timed row over it
                    bw = ctx.copy_bandwidth()
                except Exception:
                    bw = None
                if bw:
                    row["floor_ms"] = self.bytes_floor / bw * 1e3
            if self.flops:
                row["tflops"] = self.flops / (ms * 1e-3) / 1e12
            if ctx.profile:
                try:  # like the floor: extra information, never the reason a row is lost
                    row["kernels"] = profile_kernels(fn, ctx.device)
                except Exception as exc:
                    row["kernels"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            return row
        except Unavailable as exc:
            return self._row(impl, status=UNAVAILABLE, reason=str(exc))
        except torch.OutOfMemoryError as exc:
            return self._row(impl, status=UNAVAILABLE, reason=f"out of memory: {str(exc).splitlines()[0][:200]}")
        except Exception as exc:  # one broken implementation must not stop the case
            tb = traceback.format_exc(limit=-3)
            if ctx.verbose:
                print(tb, file=sys.stderr)
            return self._row(impl, status=ERROR, reason=f"{type(exc).__name__}: {str(exc)[:300]}", traceback=tb[-2000:])
        finally:
            del fn

    def _ratios(self, rows: list[dict]) -> None:
        base = {r["impl"]: r["median_ms"] for r in rows if r["baseline"] and r["status"] == OK}
        like_of = {i.name: i.compare_to for i in self.impls}
        for r in rows:
            if r["status"] != OK or r["baseline"]:
                continue
            like = like_of.get(r["impl"])  # None: every baseline
            mine = {b: ms for b, ms in base.items() if like is None or b in like}
            r["speedup"] = {b: ms / r["median_ms"] for b, ms in mine.items()}
            if self.targets:
                r["targets"] = {b: {"want": want, "met": (r["speedup"][b] >= want) if b in mine else None}
                                for b, want in self.targets.items()}


@dataclass
class _Ref:
    """What a case's rows are checked against."""

    out: Any = None  # the reference implementation's check output (direct mode)
    precise: Any = None  # high-precision outputs (error-ratio mode)
    missing: str | None = None  # why ``precise`` could not be computed
    errors: list | None = None  # the reference implementation's errors vs ``precise``

    def can_check(self, impl: Impl, ratio_mode: bool) -> bool:
        if ratio_mode:
            return self.precise is not None and (impl.reference or self.errors is not None)
        return impl.reference or self.out is not None


def _free(device: str) -> None:
    # Each compiled row compiles its own function; dropping dynamo's caches between rows frees
    # their memory and keeps a shared code object (one wrapper used for many cases) from
    # hitting the recompile limit, past which dynamo silently runs eager.
    if "torch._dynamo" in sys.modules:
        try:
            torch._dynamo.reset()
        except Exception:
            pass
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- context


class Context:
    """Run-wide settings and the collected rows."""

    def __init__(self, device: str, quick: bool, with_compile: bool, verbose: bool = False,
                 profile: bool = False, profile_only: bool = False):
        self.device = device
        self.profile = profile  # per timed row: the kernels (GPU) or ATen ops (CPU) of one call
        # rows are profiled (warm-up, then one profile) and neither checked nor timed: a cheap
        # separate stage after the timed run (gpu_check.sh), whose crash cannot cost timings
        self.profile_only = profile_only
        self.quick = quick
        self.with_compile = with_compile
        self.verbose = verbose
        self.gpu = device == "cuda"
        # quick: few repeats; the GPU medians are still stable at 10
        self.warmup = 3 if (quick or not self.gpu) else 5
        self.repeats = (10 if self.gpu else 3) if quick else (30 if self.gpu else 7)
        self.budget_s = 3.0 if quick else 20.0
        self.rows: list[dict] = []
        self.areas: dict[str, dict] = {}
        self._bw = None
        self.on_rows: Callable | None = None  # e.g. write partial results

    def case(self, area: str, name: str, **kw) -> Case:
        return Case(self, area, name, **kw)

    def add_rows(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        for r in rows:
            print("  " + format_row_line(r), flush=True)
        if self.on_rows is not None:
            try:
                self.on_rows()
            except Exception as exc:  # a full disk must not stop the measurements
                print(f"  (could not write partial results: {exc})", file=sys.stderr)

    def record(self, area: str, case: str, impl: str, status: str, reason: str, **kw) -> None:
        """A row that was never timed (e.g. a whole area unavailable)."""
        self.add_rows([{"area": area, "case": case, "impl": impl, "baseline": False, "reference": False,
                        "params": kw.pop("params", {}), "status": status, "reason": reason, **kw}])

    def copy_bandwidth(self) -> float | None:
        """Device-to-device copy rate in bytes/s (read + write), measured once per run: the
        physical floor of a memory-bound op is its bytes over this."""
        if not self.gpu:
            return None
        if self._bw is None:
            n = (256 if self.quick else 1024) << 20
            a = torch.empty(n // 4, dtype=torch.float32, device="cuda").normal_()
            b = torch.empty_like(a)
            ms = median(time_fn(lambda: b.copy_(a), "cuda", 3, 10))
            self._bw = 2 * n / (ms * 1e-3)
            del a, b
            torch.cuda.empty_cache()
        return self._bw

    def can_compile(self) -> tuple[bool, str]:
        try:
            import torch._dynamo  # noqa: F401
        except Exception as exc:
            return False, f"torch.compile unavailable: {exc}"
        if sys.version_info >= (3, 14) and tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 9):
            return False, "torch.compile unsupported on this Python"
        return True, ""


def format_row_line(r: dict) -> str:
    head = f"[{r['area']}] {r['case']} :: {r['impl']}"
    if r["status"] != OK:
        return f"{head}: {r['status']}: {r.get('reason', '')}"
    s = f"{head}: {r['median_ms']:.3f} ms"
    if "peak_mem_gib" in r:
        s += f", {r['peak_mem_gib']:.2f} GiB"
    if r.get("speedup"):
        s += ", " + ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
    if r.get("data_wait") is not None:
        s += f", data wait {100 * r['data_wait']:.1f}%"
    return s


# ----------------------------------------------------------------------------- output


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return str(x)


def write_results(out_dir: str, ctx: Context, env: dict, args: dict, total_s: float) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    data = {"schema": 1, "env": env, "args": args, "total_s": round(total_s, 1), "areas": ctx.areas,
            "rows": ctx.rows}
    jpath = os.path.join(out_dir, "results.json")
    mpath = os.path.join(out_dir, "results.md")
    # written after every case: a run killed by a time limit half-way through a write must
    # leave the previous complete file (which --append and the GPU summary read), not half of one
    _write_atomic(jpath, json.dumps(_jsonable(data), indent=1))
    _write_atomic(mpath, markdown(data))
    return jpath, mpath


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# what --append requires the file's env and this run's to agree on: the same device (its name),
# the same torch / CUDA / cuDNN, the same code (commit and extension sources). gpu_check.sh's
# stages (one machine, one checkout, GIT_COMMIT exported) agree on all of them
APPEND_ENV_FIELDS = ("gpu", "cpu", "torch", "cuda", "cudnn", "git_commit", "source_hash")


def load_prior(out_dir: str, device: str, quick: bool, areas: list[str],
               with_compile: bool = False, env: dict | None = None) -> dict | None:
    """``--append``: the results already in ``out_dir/results.json`` without the rows and area
    entries of ``areas`` (they are about to be measured again), or None when there are none.
    Raises ValueError when they were measured under other conditions (device, --quick,
    --with-compile, --profile-only; or, per the file's env, another device name, torch, CUDA,
    cuDNN, commit or extension sources than ``env``, this run's, collected when not given):
    one results file holds one kind of run, on one machine and one version of the code. A
    field the file's env does not record (an older file) is not compared."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        args, rows = data["args"], data["rows"]
        if not isinstance(args, dict) or not isinstance(rows, list):
            raise TypeError("'args' must be an object and 'rows' a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--append: cannot read {path}: {exc}") from None
    if args.get("device") != device or bool(args.get("quick")) != bool(quick):
        raise ValueError(f"--append: {path} holds a run with device={args.get('device')} quick="
                         f"{args.get('quick')}, this one is device={device} quick={quick}; use another --out")
    if bool(args.get("with_compile")) != bool(with_compile):
        raise ValueError(f"--append: {path} holds a run with with_compile={bool(args.get('with_compile'))}, "
                         f"this one is with_compile={bool(with_compile)}; use another --out")
    if args.get("profile_only"):
        raise ValueError(f"--append: {path} holds a --profile-only run; use another --out")
    old_env = data.get("env") or {}
    if not isinstance(old_env, dict):
        raise ValueError(f"--append: cannot read {path}: 'env' must be an object")
    if env is None:
        env = collect_env(device)
    diff = [f"{k}={old_env[k]!r} there, {env.get(k)!r} now" for k in APPEND_ENV_FIELDS
            if k in old_env and old_env[k] != env.get(k)]
    if diff:
        raise ValueError(f"--append: {path} holds a run measured under another environment ("
                         + "; ".join(diff) + "); use another --out")
    keep = set(areas)
    return {"args": args, "total_s": data.get("total_s"),
            "rows": [r for r in rows if r.get("area") not in keep],
            "areas": {a: v for a, v in (data.get("areas") or {}).items() if a not in keep}}


def fmt_params(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def env_line(env: dict) -> str:
    dev = env.get("gpu") or env.get("cpu") or env.get("device")
    parts = [f"device: {dev}", f"torch {env.get('torch')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    m = env.get("med3d_ext") or {}
    parts.append(f"med3d_ext {m.get('med3d_ext', '?')} (extension {'loaded' if m.get('extension_loaded') else 'NOT loaded'})")
    parts.append(f"python {env.get('python')}, {env.get('date_utc')}")
    return "; ".join(parts)


def markdown(data: dict) -> str:
    lines = ["# med3d_ext benchmarks", "", env_line(data["env"]), "",
             f"args: `{data['args']}`; total {data['total_s']} s", "",
             "| area | case | impl | status | median ms | peak GiB | max abs err | speed-up | params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ms = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else ""
        mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else ""
        err = f"{r['max_abs_err']:.2g}" if r.get("max_abs_err") is not None else ""
        by_output = r.get("errors_by_output") or []
        if by_output and all(d.get("ref_err") == 0 for d in by_output):
            # the reference implementation computed exactly what the high-precision one did
            # (the CPU's float64 rows): no ratio to speak of ("infx"), the floor is the check
            err += " (reference exact: checked against the floor)"
        elif r.get("err_ratio") is not None:  # error-ratio check: error vs the reference impl's
            # an output more than the ratio above the reference's error passed on the floor
            floor = any(d.get("floor_only") for d in by_output)
            err += f" ({r['err_ratio']:.2g}x ref{', inside the floor' if floor else ''})"
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in (r.get("speedup") or {}).items() if v is not None)
        st = r["status"] if r["status"] == OK else f"{r['status']}: {r.get('reason', '')}".replace("|", "/")
        if r.get("floor_ms") is not None:
            sp += f" (floor {r['floor_ms']:.3f} ms)"
        if r.get("data_wait") is not None:
            sp += f" (data wait {100 * r['data_wait']:.1f}% of the step)"
        impl = r["impl"] + (" (baseline)" if r.get("baseline") else "") + (f" [{r['note']}]" if r.get("note") else "")
        impl += caveats(r)
        lines.append(f"| {r['area']} | {r['case']} | {impl} | {st} "
                     f"| {ms} | {mem} | {err} | {sp} | {fmt_params(r.get('params') or {})} |")
    prof = [r for r in data["rows"] if r.get("kernels")]
    if prof:
        lines += ["", "## Where the time goes (`--profile`: per call, torch.profiler)", ""]
        for r in prof:
            k = r["kernels"]
            head = f"**{r['area']} / {r['case']} / {r['impl']}**"
            if "error" in k:
                lines += [f"{head}: profile failed: {k['error']}", ""]
                continue
            lines += [f"{head}: {_profile_head(k)}", "",
                      "| us | calls | name |", "|---|---|---|"]
            lines += [f"| {t['us']:.1f} | {t['calls']:.3g} | `{t['name'][:90]}` |" for t in k["top"]]
            if k.get("families"):
                lines += ["", "| us | calls | kernel family (all kernels) |", "|---|---|---|"]
                lines += [f"| {f['us']:.1f} | {f['calls']:.3g} | {f['family']} |"
                          for f in k["families"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def headline(rows: list[dict]) -> list[str]:
    """One line per (case, med3d_ext row): the speed-ups; used by the summary and gpu_check."""
    out = []
    for r in rows:
        if r["baseline"] or r["status"] != OK or not r.get("speedup"):
            continue
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
        for b, t in (r.get("targets") or {}).items():
            sp += f" [target {t['want']}x vs {b}: {'met' if t['met'] else 'NOT met' if t['met'] is False else 'no baseline'}]"
        note = r.get("note") or ""
        impl = r["impl"] + (f" [{note}]" if note and not note.startswith("compiled (") else "")
        out.append(f"{r['area']}/{r['case']} {impl}{caveats(r)}: {r['median_ms']:.3f} ms; {sp}")
    return out


def summary_table(data: dict) -> str:
    rows = data["rows"]
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        c = counts.setdefault(r["area"], {})
        c[r["status"]] = c.get(r["status"], 0) + 1
    lines = ["", "==== benchmark summary ====", env_line(data["env"]),
             f"{'area':<14} {'s':>6}  {'ok':>3} {'FAILED':>6} {'unavail':>7} {'error':>5}"]
    for area, info in data["areas"].items():
        c = counts.get(area, {})
        lines.append(f"{area:<14} {info.get('seconds', 0):>6.1f}  {c.get(OK, 0):>3} {c.get(FAILED, 0):>6} "
                     f"{c.get(UNAVAILABLE, 0):>7} {c.get(ERROR, 0):>5}"
                     + (f"  profiled {c[PROFILED]}" if c.get(PROFILED) else "")
                     + (f"  area error: {info['error']}" if info.get("error") else ""))
    hl = headline(rows)
    if hl:
        lines.append("speed-ups (median, same run):")
        lines += ["  " + h for h in hl]
    bad = [r for r in rows if r["status"] in (FAILED, ERROR)]
    for r in bad:
        lines.append(f"  {r['status']}: {r['area']}/{r['case']} {r['impl']}: {r.get('reason', '')[:160]}")
    lines.append(f"total {data['total_s']} s")
    return "\n".join(lines)
