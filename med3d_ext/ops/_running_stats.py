"""BatchNorm running-statistics updates of the fused ops, applied one layer at a time or, during
a fused model's forward, all together at its end.

Per BatchNorm layer and training step, ``F.batch_norm`` bookkeeping costs two small launches:
``num_batches_tracked += 1`` and the running mean / variance update. In an eager ResNet-50
step, whose speed is set by the host's launches (an H100 replays the same step 5.4 ms faster
from a CUDA graph, ``benchmarks/results/2026-11-27_h100-s10``), that is ~106 of ~870
launches. :func:`med3d_ext.nn.fuse_modules` therefore opens a *batch* around its model's forward
(root-module hooks): while it is open, the fused layers queue their updates here, and closing
it applies them as one ``torch._foreach_add_`` and one ``torch._foreach_lerp_`` per
(momentum, device, dtype) group. The values are the same as layer-by-layer updates; only when
they land differs (at the end of the forward, also when it raised). Outside a batch, and
under ``torch.compile`` (which traces the updates itself), every update is applied at once.
"""

from __future__ import annotations

import threading

import torch

_STATE = threading.local()


class _Batch:
    def __init__(self):
        self.counts: list[torch.Tensor] = []
        self.groups: dict[tuple, tuple[list, list]] = {}
        self.seen: set[int] = set()

    def _fresh(self, *tensors) -> None:
        """A buffer already queued (a module run twice in one forward): apply what is queued
        first, so the updates land in the order they were made (one foreach launch updating
        the same tensor twice would lose one of them)."""
        if any(id(t) in self.seen for t in tensors):
            self.apply()
        self.seen.update(id(t) for t in tensors)

    def count(self, num_batches_tracked: torch.Tensor) -> None:
        self._fresh(num_batches_tracked)
        self.counts.append(num_batches_tracked)

    def lerp(self, bufs: list, new: list, momentum: float) -> None:
        self._fresh(*bufs)
        for b, v in zip(bufs, new):
            key = (float(momentum), b.device, b.dtype)
            dst, src = self.groups.setdefault(key, ([], []))
            dst.append(b)
            src.append(v)

    def apply(self) -> None:
        counts, groups = self.counts, self.groups
        self.counts, self.groups, self.seen = [], {}, set()
        if counts:
            torch._foreach_add_(counts, 1)
        for (momentum, _, _), (dst, src) in groups.items():
            torch._foreach_lerp_(dst, src, momentum)


def _active() -> _Batch | None:
    # is_compiling first: a traced read of the thread-local made Dynamo guard on it, and the
    # first compiled step (before which no batch had ever been opened) was compiled twice
    if torch.compiler.is_compiling():
        return None
    return getattr(_STATE, "batch", None)


def open_batch() -> None:
    """Start queueing (nested calls share the outermost batch)."""
    if torch.compiler.is_compiling():
        return
    depth = getattr(_STATE, "depth", 0)
    if depth == 0:
        _STATE.batch = _Batch()
    _STATE.depth = depth + 1


def close_batch() -> None:
    """End of the outermost batch: apply everything queued."""
    if torch.compiler.is_compiling():
        return
    depth = getattr(_STATE, "depth", 0)
    if depth <= 0:
        return
    _STATE.depth = depth - 1
    if depth == 1:
        batch, _STATE.batch = _STATE.batch, None
        batch.apply()


def count_batch(num_batches_tracked: torch.Tensor) -> None:
    """``num_batches_tracked += 1``, queued while a batch is open."""
    batch = _active()
    if batch is None:
        num_batches_tracked.add_(1)
    else:
        batch.count(num_batches_tracked)


def update_running_stats(running_mean, running_var, mean, var, momentum) -> None:
    """(1 - momentum) * running + momentum * batch, as F.batch_norm, as one foreach lerp
    (running + momentum * (batch - running): the same value to rounding, one launch not two),
    queued while a batch is open. No torch.no_grad() needed (it costs ~7 us of host time per
    layer): the buffers and the statistics (non-differentiable outputs) never require grad.
    Callers skip it for an empty batch, which leaves them alone as F.batch_norm does (its
    statistics are NaN)."""
    bufs = [running_mean] + ([running_var] if running_var is not None else [])
    new = [mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype)]
    if running_var is not None:
        new.append(var if var.dtype == running_var.dtype else var.to(running_var.dtype))
    batch = _active()
    if batch is None:
        torch._foreach_lerp_(bufs, new, momentum)
    else:
        batch.lerp(bufs, new, momentum)
