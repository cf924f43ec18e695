"""Plumbing shared by the op wrappers: routing to the compiled op or the reference, and
registration helpers that are no-ops when the extension is not loaded."""

from __future__ import annotations

import numpy as np
import torch

from .. import _extension
from .._args import is_real

_BOOLS = (bool, np.bool_)


_OPS: dict = {}


def compiled(name: str):
    """``torch.ops.med3d_ext.<name>.default`` when the extension is loaded, else ``None``.

    The overload itself, looked up once: calling the packet (``torch.ops.med3d_ext.<name>``)
    resolves the overload on every call, host time that a fused ResNet pays ~50 times a step."""
    if not _extension.available():
        return None
    if torch.compiler.is_compiling():
        # traced, the memo is no help (the graph holds the op) and a harm: Dynamo guards on
        # the dict's contents, so the first compiled step, which fills it, was compiled twice
        return getattr(torch.ops.med3d_ext, name).default
    op = _OPS.get(name)
    if op is None:
        op = _OPS[name] = getattr(torch.ops.med3d_ext, name).default
    return op


def call_without_grad(op, tensors, *args):
    """``op(*args)``, skipping the autograd layer when no tensor of ``tensors`` needs a gradient.

    The autograd formula that torch.library.register_autograd installs is Python, and it runs on
    every call, also when nothing requires grad: ~13 us of host time per call (CPU, tiny inputs:
    19.6 us through it, 6.8 us below it), as much as a small augmentation kernel takes on a GPU.
    An augmentation call never needs it. Outside torch.compile (which traces the op itself) and
    functorch transforms (whose wrapped tensors must meet the autograd layer), a call on tensors
    that need no gradient goes straight to the CPU/CUDA kernel; the result is the same (outputs
    that need no gradient either)."""
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)) \
            or torch.compiler.is_compiling() \
            or torch._C._functorch.peek_interpreter_stack() is not None:
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def register_fake(name: str):
    """Decorator: ``torch.library.register_fake`` for a med3d_ext op, skipped without ``_C``."""

    def wrap(fn):
        if _extension.available():
            torch.library.register_fake(f"med3d_ext::{name}")(fn)
        return fn

    return wrap


def register_autograd(name: str, backward, setup_context) -> None:
    if _extension.available():
        torch.library.register_autograd(f"med3d_ext::{name}", backward, setup_context=setup_context)


def check_tensor(op: str, name: str, t) -> None:
    """A TypeError naming the argument when a required tensor argument is not a tensor (None
    would otherwise fail deep inside, e.g. as "'NoneType' object has no attribute 'device'")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"med3d_ext.{op}: argument '{name}' must be a tensor, got "
                        f"{type(t).__name__}")


def check_bool(op: str, name: str, v) -> None:
    """A TypeError naming a flag argument that is not a bool (numpy's bool counts): None ran
    as False (training=None normalised with the running statistics, relu=None dropped the
    ReLU) and 1.5 as True, silently."""
    if not isinstance(v, _BOOLS):
        raise TypeError(f"med3d_ext.{op}: argument '{name}' must be True or False, got {v!r}")


def check_real(op: str, name: str, v) -> None:
    """A TypeError naming a number argument that is not a real number (a bool, None, a string:
    "0.1" as momentum failed inside torch._foreach_lerp_, None as a loss weight in float()).
    Symbolic numbers of torch.compile pass."""
    if is_real(v) or isinstance(v, (torch.SymFloat, torch.SymInt)):
        return  # (0-d real tensors and numpy numbers too: they worked before this check)
    raise TypeError(f"med3d_ext.{op}: argument '{name}' must be a real number, got {v!r}")


def check_same_device(op: str, ref: torch.Tensor, **tensors) -> None:
    """For fake (meta) kernels: every given tensor (None skipped) on ``ref``'s device. A fake
    kernel also runs when one argument is on the meta device and the others are not, and
    would otherwise return an uninitialised tensor on the others' device."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: (
                f"med3d_ext.{op}: argument '{name}' is on {t.device} but the input is on "
                f"{ref.device}"))


def op_names() -> list[str]:
    """Every op of the med3d_ext library registered with the dispatcher."""
    if not _extension.available():
        return []
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("med3d_ext::"))


def dispatch_keys(qualname: str) -> list[str]:
    """The dispatch keys with a kernel for ``qualname`` (for ``python -m med3d_ext.info``)."""
    keys = [k for k in ("CPU", "CUDA", "Autograd")
            if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k)]
    # a CompositeExplicitAutograd kernel (e.g. a torch.library.custom_op defined in Python)
    # serves every device
    if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd"):
        keys.insert(0, "CompositeExplicitAutograd (any device)")
    try:  # fake (meta) kernels registered from Python live in torch's simple registry
        from torch._library.simple_registry import singleton

        if singleton.find(qualname).fake_impl.kernel is not None:
            keys.append("Fake")
    except Exception:  # private API; absence only affects the info printout
        pass
    return keys
