"""Argument checks shared by the data and transform APIs (the ops have their own, _common.py).

The README's rule: a wrong type (None, a float or a bool where an int is needed) is a
TypeError, a bad value a ValueError. Several checks raised ValueError for both before the rule
was written down; :class:`ArgumentTypeError` is both, so that code catching either keeps
working.
"""

from __future__ import annotations

import math
import os
import numbers
import operator

import numpy as np
import torch

_BOOLS = (bool, np.bool_)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a TypeError, and a ValueError for older callers)."""


def is_int(v) -> bool:
    """An integer: a Python or numpy integer, or a 0-d integer array or tensor (what
    ``operator.index`` takes, without its bools and one-element arrays)."""
    if isinstance(v, _BOOLS):
        return False
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not (v.is_floating_point() or v.is_complex()
                                     or v.dtype == torch.bool)
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and v.dtype.kind in "iu"
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def int_arg(what: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int in [lo, hi]: ArgumentTypeError for a non-integer, ValueError out of
    range; ``what`` names the argument ("patch", "batch_size must be an int >= 1")."""
    if not is_int(v):
        raise ArgumentTypeError(f"{what}, got {v!r}")
    i = operator.index(v)
    if (lo is not None and i < lo) or (hi is not None and i > hi):
        raise ValueError(f"{what}, got {v!r}")
    return i


def real_arg(what: str, v, lo: float | None = None, hi: float | None = None) -> float:
    """``v`` as a finite float in [lo, hi]; as :func:`int_arg`."""
    if not is_real(v):
        raise ArgumentTypeError(f"{what}, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or (lo is not None and f < lo) or (hi is not None and f > hi):
        raise ValueError(f"{what}, got {v!r}")
    return f


def is_real(v) -> bool:
    """A real number: a Python or numpy number, or a 0-d real array or tensor; not a bool."""
    if type(v) is float or type(v) is int:  # the usual case, first (host time in hot paths)
        return True
    if isinstance(v, _BOOLS):
        return False
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not (v.is_complex() or v.dtype == torch.bool)
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and v.dtype.kind in "iuf"
    return isinstance(v, numbers.Real)


def unwritable_folder(path) -> str | None:
    """Why a folder cannot be created or written at ``path`` (None if it can), judged by its
    nearest existing ancestor: said before any work, without creating anything."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        return f"cannot create this folder ({p!r} is a file)"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"cannot create or write this folder ({p!r} is not writable)"
    return None


def bar_disable(enabled) -> bool | None:
    """tqdm's ``disable=`` for a progress bar: off when the user turned it off (True); else None,
    which lets tqdm hide it where its stream is not a terminal (a redirected log, a SLURM job's
    output file), which would otherwise fill with carriage-return lines."""
    return None if enabled else True
