"""Argument checks shared by the data and transform APIs (the ops have their own, _common.py).

The README's rule: a wrong type (None, a float or a bool where an int is needed) is a
TypeError, a bad value a ValueError. Several checks raised ValueError for both before the rule
was written down; :class:`ArgumentTypeError` is both, so that code catching either keeps
working.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

_BOOLS = (bool, np.bool_)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a TypeError, and a ValueError for older callers)."""


def is_int(v) -> bool:
    """An integer, numpy's included, but not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, _BOOLS)


def int_arg(what: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int in [lo, hi]: ArgumentTypeError for a non-integer, ValueError out of
    range; ``what`` names the argument ("patch", "batch_size must be an int >= 1")."""
    if not is_int(v):
        raise ArgumentTypeError(f"{what}, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{what}, got {v!r}")
    return int(v)


def real_arg(what: str, v, lo: float | None = None, hi: float | None = None) -> float:
    """``v`` as a finite float in [lo, hi]; as :func:`int_arg`."""
    if isinstance(v, _BOOLS) or not isinstance(v, numbers.Real):
        raise ArgumentTypeError(f"{what}, got {v!r}")
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{what}, got {v!r}")
    return float(v)
