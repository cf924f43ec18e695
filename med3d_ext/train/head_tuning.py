"""cuDNN tuning for the pretraining heads' batch sizes, done once before the first step.

With ``torch.backends.cudnn.benchmark`` (the CLI's default on a GPU), cuDNN times its
algorithms for every new input shape the first time it meets it: tens of milliseconds per
convolution and direction. The encoder sees one shape per run. A Med3D head does not: the
sampler draws each sample's dataset at random, so head h gets n_h ~ Binomial(B, p_h) samples of a
batch, and a new n_h (with that head's class count for its last conv) can first turn up a
hundred steps in. Without this, that tuning lands inside the run at random steps: in a short
throughput measurement it can be most of the time measured.

:func:`tune_head_shapes` runs one forward and backward of a copy of a head for each class count
and each batch size a head is likely to meet, on inputs made the way the model makes them (the
encoder's output layout and dtype, then the gather ``take_rows``), so the autotuner's cache
holds every shape before training starts. The model itself, its weights and BatchNorm statistics, and every
random number generator are left alone (the inputs are constant, not random).
"""

from __future__ import annotations

import copy
import itertools
import math
import time

import torch

from med3d_ext.models.med3d import take_rows


def head_batch_sizes(batch_size: int, n_heads: int, tail: float = 1e-3) -> list[int]:
    """The per-head batch sizes worth tuning up front: every n >= 1 with P(n_h <= n) >= ``tail``
    and P(n_h >= n) >= ``tail``, for n_h ~ Binomial(batch_size, 1 / n_heads) (the sampler's
    equal dataset weights). One head always gets the whole batch; sizes rarer than ``tail`` at
    either end are tuned when they turn up."""
    if batch_size < 1 or n_heads < 1:
        return []
    p = 1.0 / n_heads
    pmf = [math.comb(batch_size, n) * p ** n * (1.0 - p) ** (batch_size - n)
           for n in range(batch_size + 1)]
    below = list(itertools.accumulate(pmf))  # P(n_h <= n)
    above = list(itertools.accumulate(reversed(pmf)))[::-1]  # P(n_h >= n)
    return [n for n in range(1, batch_size + 1) if below[n] >= tail and above[n] >= tail]


def encoder_output_size(patch) -> list[int]:
    """Spatial size of the MedicalNet encoder's output for a patch: each of its three stride-2
    stages (stem conv, max-pool, layer2) maps n -> ceil(n / 2)."""
    return [math.ceil(math.ceil(math.ceil(int(s) / 2) / 2) / 2) for s in patch]


def tune_head_shapes(med3d, patch, batch_size: int, amp: torch.dtype | None,
                     channels_last: bool) -> dict:
    """Tune cuDNN for the batch sizes of :func:`head_batch_sizes` on copies of ``med3d``'s heads
    (a ``Med3DNet``; one head per distinct class count). Returns ``{"sizes", "class_counts",
    "seconds"}``."""
    dev = next(med3d.parameters()).device
    sizes = head_batch_sizes(batch_size, len(med3d.head_names))
    one_per_count = {}
    for name, c in zip(med3d.head_names, med3d.head_classes):
        one_per_count.setdefault(c, med3d.heads[name])
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    # the encoder's last output: the autocast dtype, the model's layout
    feats = torch.ones((max(sizes, default=1), med3d.encoder.out_channels,
                        *encoder_output_size(patch)), device=dev, dtype=amp or torch.float32)
    feats = feats.contiguous(memory_format=fmt)
    t0 = time.perf_counter()
    for head in one_per_count.values():
        twin = copy.deepcopy(head).train()
        for p in twin.parameters():
            p.requires_grad_(True)
        for n in sizes:
            x = feats.detach().requires_grad_(True)
            # a gather, as Med3DNet.forward makes a head's input (its layout included)
            x_head = take_rows(x, torch.arange(n, device=dev))
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = twin(x_head)
            # the loss returns contiguous gradients in the logits' dtype
            out.backward(torch.ones_like(out, memory_format=torch.contiguous_format))
        del twin
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"sizes": sizes, "class_counts": sorted(one_per_count),
            "seconds": time.perf_counter() - t0}
