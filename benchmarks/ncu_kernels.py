"""Nsight Compute over the hand-written CUDA kernels of the open performance targets.

Two modes:

``python -m benchmarks.ncu_kernels run [CASE ...]``
    Warms every case up, then runs each once between ``cudaProfilerStart``/``Stop``, so that
    ``ncu --profile-from-start off`` sees exactly one call of each (gpu_check.sh's ``ncu`` stage):
      loss     8-head multihead_seg_loss (2-5 classes, 1 x 32 x 64 x 64, fp32, int64 labels),
               forward + backward, validate=False (the #6 target row);
      augment  affine_resample_pair, 8 x 1 x 128^3 fp32 image + uint8 label (the #5 target row);
      augment_cli  the same with the training CLI's intensity draws (scale, shift, noise; gamma 1)
               and the label on its quarter grid (its default --label-grid logits);
      augment_pairs, augment_cli_pairs  those two with MED3D_EXT_PLAIN_RESAMPLE_LAYOUT=pairs (the
               kPlain kernel's rows two at a time; set around the call only);
      layer    conv_bn_relu3d, bf16 channels_last_3d, 8 x 64 x 16 x 32 x 32, 3^3 conv, training,
               forward + backward (the BatchNorm statistics / apply / backward kernels, #4);
      stem     conv_bn_relu_maxpool3d on the MedicalNet stem, 8 x 1 x 64 x 128 x 128 bf16, fwd + bwd;
      stem_lines, stem_hw_lines  the same with the line-staged im2col3d kernel
               (MED3D_EXT_IM2COL_KERNEL=lines) for the default W-folded input, and for the H and
               W-folded one (STEM_CONV=space_to_depth_fold_hw); both set around the call only;
      stem_tiles  the stem with the tiled pool kernels (MED3D_EXT_POOL_KERNEL=tiles).
``python -m benchmarks.ncu_kernels summary DETAILS.csv``
    Condenses ``ncu --import R --page details --csv`` into one line per kernel: duration, memory
    and DRAM throughput, registers, theoretical and achieved occupancy, and what limits the
    blocks per SM. The full report stays beside it for the stall breakdown.
"""

from __future__ import annotations

import csv
import re
import sys

KEYS = [  # (metric name in the details page, column label)
    ("Duration", "time"),
    ("Memory Throughput", "mem%"),
    ("DRAM Throughput", "dram%"),
    ("Compute (SM) Throughput", "sm%"),
    ("Registers Per Thread", "regs"),
    ("Theoretical Occupancy", "occ.theo%"),
    ("Achieved Occupancy", "occ.ach%"),
    ("Block Limit Registers", "lim.regs"),
    ("Block Limit Shared Mem", "lim.smem"),
    ("L2 Hit Rate", "L2hit%"),
    ("Warp Cycles Per Issued Instruction", "cyc/issue"),
]


def _cases():
    import torch

    import med3d_ext.ops as ops

    from .bm_augment import plain_layout_call, random_theta
    from .bm_loss import HEADS
    from .bm_stem import with_stem
    from .common import with_env

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def loss():
        logits = [torch.randn(1, c, 32, 64, 64, device=dev, generator=g, requires_grad=True)
                  for c in HEADS]
        targets = [torch.randint(0, c, (1, 32, 64, 64), device=dev, generator=g) for c in HEADS]

        def f():
            total, _ = ops.multihead_seg_loss(logits, targets, validate=False)
            torch.autograd.grad(total, logits)
        return f

    def pair_inputs():  # the #5 target row's image, label and matrices
        size = (8, 1, 128, 128, 128)
        img = torch.randn(size, device=dev, generator=g)
        lab = torch.randint(0, 8, size, device=dev, dtype=torch.uint8, generator=g)
        return img, lab, random_theta(8, dev), size

    def augment():
        img, lab, theta, size = pair_inputs()
        return lambda: ops.affine_resample_pair(img, lab, theta, size)

    def augment_cli():
        img, lab, theta, size = pair_inputs()
        b = size[0]
        inten = {"scale": torch.full((b,), 1.05, device=dev), "shift": torch.full((b,), 0.02, device=dev),
                 "gamma": torch.ones(b, device=dev), "noise_std": torch.full((b,), 0.03, device=dev),
                 "seed": torch.arange(b, device=dev, dtype=torch.int64)}
        quarter = tuple(n // 4 for n in size[2:])
        return lambda: ops.affine_resample_pair(img, lab, theta, size, quarter, intensity=inten)

    def bn_train(op, x, w, **kw):
        """One bf16-autocast training call of a conv+BN op (identity BN parameters, fresh
        running statistics) and its backward."""
        c = w.shape[0]
        bw = torch.ones(c, device=dev, requires_grad=True)
        bb = torch.zeros(c, device=dev, requires_grad=True)
        rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)

        def f():
            with torch.autocast(dev, dtype=torch.bfloat16):
                y = op(x, w, bw, bb, rm, rv, **kw)
            y.backward(torch.ones_like(y))
        return f

    def layer():
        cl = torch.channels_last_3d
        x = torch.randn(8, 64, 16, 32, 32, device=dev, generator=g).to(memory_format=cl)
        w = (0.05 * torch.randn(64, 64, 3, 3, 3, device=dev, generator=g)).to(memory_format=cl)
        return bn_train(ops.conv_bn_relu3d, x.requires_grad_(True), w.requires_grad_(True),
                        stride=1, padding=1)

    def stem():
        x = torch.randn(8, 1, 64, 128, 128, device=dev, generator=g)
        w = (0.05 * torch.randn(64, 1, 7, 7, 7, device=dev, generator=g)).requires_grad_(True)
        return bn_train(ops.conv_bn_relu_maxpool3d, x, w, stride=2, padding=3)

    def pairs(make):  # the case with the kPlain kernel's row-pairs layout
        return lambda: plain_layout_call(make(), "pairs")

    def lines(make, algo):  # the stem with the lines im2col3d kernel and STEM_CONV = algo
        return lambda: with_stem(make(), algo, lines=True)

    return {"loss": loss, "augment": augment, "augment_cli": augment_cli,
            "augment_pairs": pairs(augment), "augment_cli_pairs": pairs(augment_cli),
            "layer": layer, "stem": stem,
            "stem_lines": lines(stem, "space_to_depth_fold_w"),
            "stem_hw_lines": lines(stem, "space_to_depth_fold_hw"),
            "stem_tiles": lambda: with_env(stem(), "MED3D_EXT_POOL_KERNEL", "tiles")}


def run(names: list[str]) -> None:
    import torch

    cases = _cases()
    names = names or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"ncu_kernels: unknown case(s) {unknown}; known: {sorted(cases)}")
    fns = {}
    for n in names:
        fns[n] = cases[n]()
        for _ in range(3):  # warm-up: allocator pools, cuDNN autotuning, lazy module loading
            fns[n]()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for n in names:
        torch.cuda.nvtx.range_push(n)
        fns[n]()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("ncu_kernels: ran", ", ".join(names))


def _short(name: str) -> str:
    """``void med3d_ext::(anonymous namespace)::partial_kernel<float, 8>(...)`` -> the function
    name and its template arguments, without namespaces or the parameter list."""
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"^void ", "", name)
    depth, out = 0, []
    for ch in name:  # drop the parameter list (the first '(' outside template brackets)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            break
        out.append(ch)
    name = "".join(out)
    name = re.sub(r"\b[\w:]*::(\w+)", r"\1", name)  # namespaces off, also inside <...>
    return name[:70]


def summary(path: str) -> None:
    rows: dict[str, dict] = {}
    order = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            kid = r.get("ID", "")
            if kid not in rows:
                rows[kid] = {"name": _short(r.get("Kernel Name", "?")),
                             "grid": r.get("Grid Size", ""), "block": r.get("Block Size", "")}
                order.append(kid)
            m = r.get("Metric Name")
            for key, label in KEYS:
                if m == key and label not in rows[kid]:
                    unit = r.get("Metric Unit", "")
                    val = r.get("Metric Value", "")
                    rows[kid][label] = f"{val} {unit}".strip() if label == "time" else val
    labels = ["grid", "block"] + [label for _, label in KEYS]
    print("| kernel | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for kid in order:
        r = rows[kid]
        print(f"| {r['name']} | " + " | ".join(r.get(label, "") for label in labels) + " |")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("run", "summary"):
        raise SystemExit(__doc__)
    if argv[0] == "run":
        run(argv[1:])
    else:
        if len(argv) != 2:
            raise SystemExit("usage: python -m benchmarks.ncu_kernels summary DETAILS.csv")
        summary(argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
