"""Loading of the compiled module ``med3d_ext._C``, with graceful degradation.

``import med3d_ext`` must always work. When ``_C`` is missing, fails to load, or was built
against another torch than the one running, we warn once and every op routes to
:mod:`med3d_ext.reference`. The torch check happens *before* ``_C`` is loaded, from the
generated ``_build_config.py``, so a mismatch gives a readable message instead of an
"undefined symbol" crash.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import struct
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
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or not spec.origin:
        # "from . import _C" said "cannot import name '_C' from partially initialized module
        # (most likely due to a circular import)" for a module that is simply not there
        LOAD_ERROR = ("the compiled extension is not built: no med3d_ext/_C*.so for this Python "
                      "(its file name carries the Python version and ABI). " + REBUILD_HINT)
        return
    damaged = _damaged_elf(spec.origin)
    if damaged:  # dlopen of a truncated ELF file dies of SIGBUS: no exception to catch
        LOAD_ERROR = f"{spec.origin} is damaged ({damaged}). " + REBUILD_HINT
        return
    try:
        compiled = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:  # e.g. a missing shared library, an undefined symbol
        LOAD_ERROR = f"med3d_ext._C failed to load: {exc}. " + REBUILD_HINT
        return
    _C = compiled


def _damaged_elf(path: str) -> str | None:
    """Why the shared library at ``path`` cannot be mapped whole, or None. A file cut short (a
    copy or an install interrupted, a full disk) passes Python's checks, and dlopen then maps
    pages beyond its end: the process dies of SIGBUS inside ``import med3d_ext``. A 64-bit ELF
    file must hold every loadable segment and its section header table."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
                return None  # not a 64-bit ELF file: let the importer say what it is
            end = "<" if head[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 0x36)
            if shoff + shentsize * shnum > size or phoff + phentsize * phnum > size:
                return f"{size} bytes, shorter than its headers say"
            f.seek(phoff)
            table = f.read(phentsize * phnum)
        for k in range(phnum):
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIQQQQ", table,
                                                                     k * phentsize)
            if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD past the end of the file
                return f"{size} bytes, a loadable segment ends at byte {p_offset + p_filesz}"
    except (OSError, struct.error) as exc:
        return f"unreadable: {exc}"
    return None


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
