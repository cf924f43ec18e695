"""Resample benchmarks: fused affine/pair/resize vs affine_grid + grid_sample / F.interpolate.

    python -m benchmarks.bm_resample [--device cpu|cuda] [--quick]

A correctness check precedes every timing; medians are reported (CUDA events on GPU,
torch.utils.benchmark on CPU), with the ratio to the eager baseline and the effective GB/s.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

import med3d_ext as m3d


def _time(fn, device, iters=50):
    if device == "cuda":
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[len(times) // 2]
    import torch.utils.benchmark as tb

    return tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3


def _theta(n, device):
    a = torch.eye(3, 4, device=device).repeat(n, 1, 1)
    return a + 0.1 * torch.randn(n, 3, 4, device=device)


def cases(device, quick):
    n = 8 if device == "cuda" else 1
    s = 128
    img = torch.randn(n, 1, s, s, s, device=device)
    lab = torch.randint(0, 8, (n, s, s, s), device=device, dtype=torch.uint8)
    th = _theta(n, device)
    size = (n, 1, s, s, s)

    def ours_pair():
        return m3d.ops.affine_resample_pair(img, lab, th, size)

    def torch_pair():
        g = F.affine_grid(th, size, align_corners=False)
        return (F.grid_sample(img, g, align_corners=False),
                F.grid_sample(lab[:, None].float(), g, mode="nearest", align_corners=False))

    def ours_img():
        return m3d.ops.affine_resample(img, th, size)

    def torch_img():
        return F.grid_sample(img, F.affine_grid(th, size, align_corners=False),
                             align_corners=False)

    small = img[:, :, ::2, ::2, ::2].contiguous()

    def ours_resize():
        return m3d.ops.resize(small, (s, s, s))

    def torch_resize():
        return F.interpolate(small, size=(s, s, s), mode="trilinear", align_corners=False)

    aug = m3d.transforms.RandomAugment3D(rotate=0.3, scale=(0.9, 1.1), flip=0.5, elastic=0.03,
                                         gamma=(0.8, 1.2), noise=(0, 0.1), seed=0)

    def ours_aug():
        return aug(img, lab, (s, s, s), (s // 4,) * 3)

    bytes_pair = img.numel() * 4 * 2 + lab.numel() * 2
    bytes_img = img.numel() * 4 * 2
    yield "pair image+uint8 label", ours_pair, torch_pair, bytes_pair
    yield "affine image", ours_img, torch_img, bytes_img
    yield "resize x2 trilinear", ours_resize, torch_resize, bytes_img + small.numel() * 4
    yield "RandomAugment3D (all on)", ours_aug, None, bytes_pair


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, ours, base, nbytes in cases(args.device, args.quick):
        if base is not None:  # correctness before timing
            a, b = ours(), base()
            a = a if isinstance(a, tuple) else (a,)
            b = b if isinstance(b, tuple) else (b,)
            err = (a[0].float() - b[0].float()).abs().max().item()
            assert err < 1e-3, f"{name}: max error {err}"
        t_ours = _time(ours, args.device)
        t_base = _time(base, args.device) if base is not None else float("nan")
        rows.append({"case": name, "device": args.device, "ours_ms": t_ours, "eager_ms": t_base,
                     "speedup": t_base / t_ours, "GB/s": nbytes / t_ours / 1e6})
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"| case ({dev}) | ours ms | eager ms | speedup | GB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_ms']:.4f} | {r['eager_ms']:.4f} | {r['speedup']:.2f} "
              f"| {r['GB/s']:.0f} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"bm_resample_{args.device}.json"), "w") as f:
            json.dump({"device": dev, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
