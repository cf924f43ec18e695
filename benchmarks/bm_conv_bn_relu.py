"""Fused conv3d + BatchNorm + ReLU: MedicalNet ResNet training steps, eager vs fused (and
torch.compile of the plain model with --compile), plus single-layer forward+backward timings.

    python -m benchmarks.bm_conv_bn_relu [--quick] [--compile] [--out DIR]

Correctness is checked (fused vs plain outputs of the first step) before timing. Times are CUDA
event medians after warm-up; the model is MedicalNet's structure (python_tests/nn/_tiny_resnet.py
at width 64), bf16 autocast, channels_last_3d, SGD with momentum.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch

import med3d_ext as m3d
from med3d_ext import reference
from python_tests.nn._tiny_resnet import resnet


def _time(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_model(depth, batch, patch, fused, compiled=False, dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = resnet(depth, "B", width=64).cuda().to(memory_format=torch.channels_last_3d)
    if fused:
        m3d.nn.fuse_modules(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 1, *patch, device="cuda").to(memory_format=torch.channels_last_3d)
    fwd = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            out = fwd(x)
        out.float().square().mean().backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    ms = _time(step)
    return {"ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def check_model(depth, batch, patch):
    torch.manual_seed(0)
    plain = resnet(depth, "B", width=64).cuda().to(memory_format=torch.channels_last_3d)
    fused = m3d.nn.fuse_modules(copy.deepcopy(plain))
    x = torch.randn(batch, 1, *patch, device="cuda").to(memory_format=torch.channels_last_3d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = plain(x).float(), fused(x).float()
    return ((a - b).norm() / a.norm()).item()


def bench_layer(n, cin, cout, k, stride, sp, residual, dtype=torch.bfloat16):
    x = torch.randn(n, cin, *sp, device="cuda", dtype=dtype).to(memory_format=torch.channels_last_3d)
    w = (torch.randn(cout, cin, k, k, k, device="cuda", dtype=dtype) * 0.05)
    w = w.to(memory_format=torch.channels_last_3d)
    x.requires_grad_(cin > 1)
    w.requires_grad_()
    bw = torch.ones(cout, device="cuda", requires_grad=True)
    bb = torch.zeros(cout, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(cout, device="cuda"), torch.ones(cout, device="cuda")
    pad = k // 2
    out_sp = [(s + 2 * pad - k) // stride + 1 for s in sp]
    r = torch.randn(n, cout, *out_sp, device="cuda", dtype=dtype)
    r = r.to(memory_format=torch.channels_last_3d) if residual else None
    from med3d_ext.ops import conv_bn_relu as mod

    res = {}
    cases = [("eager", reference.conv_bn_relu3d, False), ("fused", m3d.ops.conv_bn_relu3d, True)]
    if cin <= 4 and stride == 2:  # the stem, with and without the space-to-depth rewrite
        cases.append(("fused_no_s2d", m3d.ops.conv_bn_relu3d, False))
    for name, fn, s2d in cases:
        mod.STEM_SPACE_TO_DEPTH = s2d

        def run():
            out = fn(x, w, bw, bb, rm, rv, stride=stride, padding=pad, residual=r)
            out.backward(torch.ones_like(out))
        res[name] = _time(run)
        with torch.no_grad():
            res[name + "_fwd"] = _time(
                lambda: fn(x, w, bw, bb, rm, rv, stride=stride, padding=pad, residual=r))
    mod.STEM_SPACE_TO_DEPTH = True
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(plain)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    rows = []
    patch, batch = (64, 128, 128), 8
    for depth in ((10, 50) if not a.quick else (10, 50)):
        err = check_model(depth, 2, (32, 64, 64))
        row = {"case": f"resnet{depth} step bf16 cl3d {batch}x1x{patch}", "rel_err": err}
        for name, fused, comp in (("eager", False, False), ("fused", True, False)) + (
                (("compile", False, True),) if a.compile else ()):
            try:
                r = bench_model(depth, batch, patch, fused, comp)
                row[name + "_ms"], row[name + "_gib"] = r["ms"], r["peak_gib"]
            except Exception as e:  # OOM or a compile failure is recorded, not fatal
                row[name + "_ms"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
            torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    layers = [("stem", 8, 1, 64, 7, 2, (64, 128, 128), False),
              ("l1 3x3", 8, 64, 64, 3, 1, (16, 32, 32), True),
              ("l4 1x1", 8, 512, 2048, 1, 1, (8, 16, 16), True)]
    for name, *args in layers:
        r = bench_layer(*args)
        row = {"case": f"layer {name} fwd+bwd bf16 cl3d", **{k + "_ms": v for k, v in r.items()}}
        rows.append(row)
        print(row, flush=True)
    meta = {"device": dev, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    with open(os.path.join(a.out, "bm_conv_bn_relu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)
    for row in rows:
        print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()))


if __name__ == "__main__":
    main()
