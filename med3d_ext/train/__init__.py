"""Training CLI and its building blocks: ``python -m med3d_ext.train
{pretrain,transfer,evaluate,predict}`` (no arguments: the Med3D-in-miniature demo).

Modules: ``config`` (schema, YAML, --set), ``checkpoint`` (atomic, RNG, our format),
``loops`` (the engine), ``tasks`` (pretrain / transfer jobs), ``inference`` (sliding window),
``metrics`` (Dice, HD95), ``evaluate``, ``predict`` (new images), ``distributed`` (torchrun),
``demo``.
"""

from .checkpoint import (CheckpointError, atomic_write, find_checkpoint, get_rng_state,
                         load_checkpoint, save_checkpoint, set_rng_state)
from .config import ConfigError, resolve
from .inference import gaussian_weight_map, sliding_window_predict, sliding_window_probs
from .metrics import dice_per_class, hd95

__all__ = ["CheckpointError", "ConfigError", "atomic_write", "dice_per_class",
           "find_checkpoint", "gaussian_weight_map", "get_rng_state", "hd95", "load_checkpoint",
           "main", "resolve", "run_evaluate", "run_predict", "run_pretrain", "run_transfer",
           "save_checkpoint", "set_rng_state", "sliding_window_predict", "sliding_window_probs"]


def __getattr__(name):  # the CLI pulls in models/data lazily
    if name in ("main", "run_pretrain", "run_transfer", "run_evaluate", "run_predict"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'med3d_ext.train' has no attribute {name!r}")
