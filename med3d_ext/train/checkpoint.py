"""Checkpoints in our format (design.md "Checkpoints"), written atomically, with every RNG.

A checkpoint is one ``torch.save`` dict that ``torch.load(weights_only=True)`` reads: only
tensors, numbers, strings, lists, tuples and dicts. So the numpy and python RNG states are
converted to tensors / lists here (numpy's MT19937 key is a uint32 array: stored as int64).
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMAT", "VERSION", "CheckpointError", "atomic_write", "save_checkpoint",
           "load_checkpoint", "get_rng_state", "set_rng_state", "find_checkpoint"]

FORMAT = "med3d_ext"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names it."""


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)``, fsync, then ``os.replace(tmp, path)``: readers see the old file
    or the new one, never a torn one. The temporary lives in the same folder (rename is atomic
    only within a filesystem) and is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


# ------------------------------------------------------------------------------------- RNG


def get_rng_state() -> dict:
    """Every RNG this package draws from, as weights_only-loadable values."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    state = {
        "cpu": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": list(pstate),
                   "gauss": None if pgauss is None else float(pgauss)},
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])
        else:  # another machine: restore what lines up
            for i, t in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(t.to(torch.uint8), i)


# ------------------------------------------------------------------------------ save / load


def save_checkpoint(path, *, arch: dict, model: torch.nn.Module, optimizer=None,
                    scheduler=None, scaler=None, step: int = 0, epoch: int = 0,
                    config: dict | None = None, extra: dict | None = None) -> Path:
    """Write our checkpoint format atomically. ``extra`` adds keys (sampler state, metrics)."""
    raw = getattr(model, "module", model)  # DDP / compiled wrappers keep the real module
    raw = getattr(raw, "_orig_mod", raw)
    obj = {
        "format": FORMAT, "version": VERSION, "arch": dict(arch),
        "state_dict": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step), "epoch": int(epoch), "rng": get_rng_state(),
        "config": _plain(config or {}),
    }
    obj.update(extra or {})
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _plain(x):
    """YAML-ish values only (weights_only load rejects arbitrary objects such as Paths)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read one of our checkpoints (weights_only=True); clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    from med3d_ext.models.weights import not_torch_save_file, pickled_global

    foreign = not_torch_save_file(path)
    if foreign:  # torch.load said "KeyError: 101" of a text file (a config.yaml, say)
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: it {foreign}. A run folder "
                              "holds best.pt and last.pt")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: say which
        name = pickled_global(e)
        if name:
            why, cause = (f"it pickles {name!r}, which weights_only loading refuses",
                          "not a med3d_ext checkpoint")
        else:  # torch's first sentence: the rest is a paragraph of advice
            why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
            cause = "a file cut short, or not a med3d_ext checkpoint"
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: "
                              f"{why} ({cause})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a med3d_ext checkpoint (no "
                              f"format={FORMAT!r}); MedicalNet weights go to transfer "
                              "--pretrained")
    if int(obj.get("version", 0)) > VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {obj['version']}, newer "
                              f"than this med3d_ext reads ({VERSION}); upgrade med3d_ext")
    return obj


def find_checkpoint(run_or_file, which: str = "last") -> Path:
    """A checkpoint path from a run folder (``which``: last | best) or a file."""
    p = Path(run_or_file)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"run {str(p)!r} does not exist")
    order = [which, "last" if which == "best" else "best"]
    for w in order:
        c = p / f"{w}.pt"
        if c.is_file():
            return c
    raise CheckpointError(f"run folder {str(p)!r} holds no checkpoint (best.pt / last.pt)")
