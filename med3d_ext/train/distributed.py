"""torchrun / DDP helpers: NCCL on GPU, gloo on CPU; rank 0 writes logs and checkpoints.

Launched by torchrun, the environment holds RANK, WORLD_SIZE and LOCAL_RANK; without them
everything here degrades to a single process (rank 0 of 1) and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "wrap_ddp", "all_reduce_mean", "barrier", "run_on_main",
           "cleanup", "broadcast_object", "any_rank"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(RuntimeError):
    """--device names a device this machine does not have (the message says what to use)."""


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec in (None, "auto"):
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise DeviceError(f"--device {spec!r}: not a device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {spec!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine "
                              "(use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun; else a 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local, device)


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, *, sync_bn: bool = False,
             find_unused: bool = False) -> torch.nn.Module:
    """DDP-wrap for torchrun (SyncBatchNorm first when asked); unchanged in one process.
    find_unused: Med3D's heads get no gradient when their dataset is absent from a batch."""
    if not ctx.enabled:
        return model
    if sync_bn:
        if ctx.device.type != "cuda":
            raise RuntimeError("--sync-bn: SyncBatchNorm runs on CUDA devices only (this run "
                               f"is on {ctx.device}); drop --sync-bn for gloo/CPU runs")
        try:  # a fused model needs its stem unfused around the conversion (med3d_ext.nn)
            from med3d_ext.nn import convert_sync_batchnorm
        except ImportError:
            convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     find_unused_parameters=find_unused)


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world_size


def broadcast_object(obj, ctx: DistContext):
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn, ctx: DistContext):
    """``fn()`` on rank 0 only; every rank returns its result, or raises its error. Without this
    a failure on rank 0 alone (a refused --out, bad data met while filling the cache) leaves the
    other ranks waiting forever at the next collective. Other ranks re-raise the same exception
    class with the same message when it can be rebuilt from the message, else RuntimeError."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every failure must reach every rank
            error = exc
    if not ctx.enabled:
        if error is not None:
            raise error
        return result
    sent = broadcast_object((result, None if error is None else (type(error), str(error))), ctx)
    if error is not None:
        raise error
    result, failed = sent
    if failed is not None:
        raise _rebuild(*failed)
    return result


def _rebuild(cls, message: str) -> BaseException:
    """An exception of ``cls`` whose str() is ``message``, for a rank that did not raise it,
    so that the CLI reports it as on rank 0 (a one-line error, not a traceback). A class whose
    constructor takes other arguments (DataError(path, problem)) is built without it."""
    try:
        return cls(message)
    except Exception:  # noqa: BLE001 - a constructor that takes other arguments
        pass
    try:
        exc = cls.__new__(cls)
        BaseException.__init__(exc, message)
        if str(exc) == message:
            return exc
    except Exception:  # noqa: BLE001
        pass
    return RuntimeError(message)


_flag_group = None  # a gloo group for host-side flags when the default group is NCCL


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on any rank; every rank must call it at the
    same point (the training loop: once per step, to agree on stopping after a signal). The
    reduction is on CPU tensors, on a gloo group made for it when the default group is NCCL,
    so it never waits for the GPU's queued work (no host sync per step)."""
    global _flag_group
    if not ctx.enabled:
        return bool(flag)
    group = None
    if dist.get_backend() != "gloo":
        if _flag_group is None:
            _flag_group = dist.new_group(backend="gloo")
        group = _flag_group
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    global _flag_group
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _flag_group = None
