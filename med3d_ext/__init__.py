"""med3d_ext: Med3D-style transfer learning for 3D medical images, with fused C++/CUDA kernels.

Subpackages: ``ops`` (kernels), ``reference`` (pure-PyTorch references of every op), ``nn``,
``models``, ``data``, ``transforms``, ``train``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _extension  # noqa: F401  (loads _C, or warns once and falls back)
from . import ops, reference  # noqa: E402

__all__ = ["ops", "reference", "__version__"]


def __getattr__(name):  # lazy subpackages: keep `import med3d_ext` light
    import importlib

    if name in ("models", "nn", "data", "transforms", "train", "losses"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'med3d_ext' has no attribute {name!r}")
