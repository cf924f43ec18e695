"""Loading of the compiled module ``med3d_ext._C``, with graceful degradation.

``import med3d_ext`` must always work. When ``_C`` is missing, fails to load, or was built
against another torch than the one running, we warn once and every op routes to
:mod:`med3d_ext.reference`. The torch check happens *before* ``_C`` is loaded, from the
generated ``_build_config.py``, so a mismatch gives a readable message instead of an
"undefined symbol" crash.
"""

from __future__ import annotations

import os
import warnings

import torch

_C = None
LOAD_ERROR: str | None = None
BUILD_CONFIG = None

REBUILD_HINT = (
    "Rebuild against the running torch with:\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "from the med3d_ext source folder (see README, 'Troubleshooting')."
)


class Med3dExtWarning(UserWarning):
    """Warned once when the compiled kernels are unavailable and the reference path is used."""


def _load() -> None:
    global _C, LOAD_ERROR, BUILD_CONFIG
    if os.environ.get("MED3D_EXT_DISABLE_EXTENSION", "") not in ("", "0"):
        LOAD_ERROR = "disabled by MED3D_EXT_DISABLE_EXTENSION"
        return
    try:
        from . import _build_config as cfg
    except ImportError:
        LOAD_ERROR = "the compiled extension is not built (no med3d_ext/_build_config.py)"
        return
    BUILD_CONFIG = cfg
    if cfg.TORCH_VERSION != torch.__version__:
        LOAD_ERROR = (
            f"med3d_ext._C was built against torch {cfg.TORCH_VERSION}, but torch "
            f"{torch.__version__} is running. " + REBUILD_HINT
        )
        return
    try:
        from . import _C as compiled
    except ImportError as exc:  # e.g. a missing shared library
        LOAD_ERROR = f"med3d_ext._C failed to load: {exc}. " + REBUILD_HINT
        return
    _C = compiled


_load()
if LOAD_ERROR is not None and os.environ.get("MED3D_EXT_DISABLE_EXTENSION", "") in ("", "0"):
    warnings.warn(
        f"{LOAD_ERROR}\nmed3d_ext falls back to its pure-PyTorch reference ops (slower).",
        Med3dExtWarning,
        stacklevel=3,
    )


def available() -> bool:
    """True when the compiled ops are loaded and ``torch.ops.med3d_ext.*`` can be called."""
    return _C is not None


def build_info() -> dict:
    """How the loaded extension was built, or why none is loaded."""
    if _C is None:
        return {"loaded": False, "error": LOAD_ERROR}
    info = dict(_C.build_info())
    info["loaded"] = True
    return info
