"""Quick side-by-side timing of the resample ops (used by gpu_resample.sh; CPU works too).

Medians of CUDA events (GPU) or process-wide wall time (CPU) after warm-up, with a correctness
check first. The full benchmark tables live in bm_resample.py / bm_augment.py.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import med3d_ext as m3d


def timed(fn, dev, iters=30):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main(dev):
    n = 8 if dev == "cuda" else 1
    s = 128
    img = torch.randn(n, 1, s, s, s, device=dev)
    lab = torch.randint(0, 8, (n, s, s, s), device=dev, dtype=torch.uint8)
    th = torch.eye(3, 4, device=dev).repeat(n, 1, 1) + 0.1 * torch.randn(n, 3, 4, device=dev)
    size = (n, 1, s, s, s)

    def eager_pair():
        g = F.affine_grid(th, size, align_corners=False)
        return (F.grid_sample(img, g, align_corners=False),
                F.grid_sample(lab[:, None].float(), g, mode="nearest", align_corners=False))

    small = img[:, :, ::2, ::2, ::2].contiguous()
    aug = m3d.transforms.RandomAugment3D(rotate=0.3, scale=(0.9, 1.1), flip=0.5, elastic=0.03,
                                         gamma=(0.8, 1.2), noise=(0, 0.1), seed=0)
    rows = [
        ("pair img+u8 label", lambda: m3d.ops.affine_resample_pair(img, lab, th, size), eager_pair),
        ("affine img", lambda: m3d.ops.affine_resample(img, th, size),
         lambda: F.grid_sample(img, F.affine_grid(th, size, align_corners=False),
                               align_corners=False)),
        ("resize 64->128", lambda: m3d.ops.resize(small, (s, s, s)),
         lambda: F.interpolate(small, size=(s, s, s), mode="trilinear")),
        ("RandomAugment3D", lambda: aug(img, lab, (s, s, s), (s // 4,) * 3), None),
    ]
    print(f"| {n}x{s}^3 on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} "
          f"(threads {torch.get_num_threads()}) | ours ms | eager ms | ratio |")
    print("|---|---|---|---|")
    for name, ours, eager in rows:
        if eager is not None:
            a, b = ours(), eager()
            a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
            err = (a - b).abs().max().item()
            assert err < 1e-3, (name, err)
        to = timed(ours, dev)
        te = timed(eager, dev) if eager is not None else float("nan")
        print(f"| {name} | {to:.4f} | {te:.4f} | {te / to:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
