"""The preprocessing cache folder: where each case's files go, which folders may be used as a
cache, and atomic writes. ``CACHE/cache.json`` is the index (dataset description, case order);
``CACHE/cases/<case>{.image.npy,.label.npy,.locs.npz,.fg.npy,.json}`` are the entries (see
:mod:`med3d_ext.data.preprocess` for what they hold). The entries have a folder of their own so
that no case name (a case called "cache") can overwrite the index, and the clean-up of stale
entries never reaches other files; a folder that is neither empty nor a cache is refused as a
cache, since preprocessing writes and deletes files in it."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from pathlib import Path

import numpy as np

from .io import DataPathError
from .layouts import Dataset

CACHE_VERSION = 2  # 2: the per-case files moved into cases/ (1: beside cache.json)
ENTRIES = "cases"  # the cache's sub-folder of per-case files
_ENTRY_SUFFIXES = (".json", ".image.npy", ".label.npy", ".locs.npz", ".fg.npy")



def default_cache_dir(dataset_root) -> Path:
    """$MED3D_EXT_CACHE/<name>-<hash of the absolute path>, default ~/.cache/med3d_ext.

    ``dataset_root``: the dataset folder, or a MedicalNet list file (``Dataset.source``): two
    lists in one folder are two datasets, each with a cache of its own."""
    root = Path(dataset_root).resolve()
    base = Path(os.environ.get("MED3D_EXT_CACHE", Path.home() / ".cache" / "med3d_ext"))
    return base / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"


def entry_file(cache_dir, name: str, suffix: str) -> Path:
    """A case's file in a cache: ``CACHE/cases/<name><suffix>`` (suffix one of ".json",
    ".image.npy", ".label.npy", ".locs.npz", ".fg.npy")."""
    return Path(cache_dir) / ENTRIES / f"{name}{suffix}"


def _is_cache_index(path: Path) -> bool:
    """Whether ``path`` is a cache.json this module wrote (any version)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"name", "layout", "cases", "target_spacing"} <= set(info)


def _check_cache_folder(out: Path, ds: Dataset) -> None:
    """Refuse an ``out`` that preprocessing could damage: the dataset's own folder, or any
    folder that is neither empty nor a cache (cache.json of ours, or only what an interrupted
    first run leaves: cases/ and temporaries). An empty ``--out ""`` is the current folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataPathError(out, "the preprocessing cache folder (--out / --cache) is a file; "
                                 "give a folder")
    src = Path(ds.root).resolve()
    if out.resolve() in (src, *src.parents):
        raise DataPathError(out, f"the preprocessing cache folder (--out / --cache) holds "
                                 f"the dataset itself ({ds.root}); give a new or empty folder")
    if (out / "cache.json").exists():
        if _is_cache_index(out / "cache.json"):
            return
        raise DataPathError(out, "holds a cache.json that is not a med3d_ext preprocessing "
                                 "index; give the preprocessing cache (--out / --cache) a new or "
                                 "empty folder")
    # an interrupted first run leaves cases/ and temporaries; imagesTs/ is the test split's
    # cache, which the training CLI keeps inside the training set's
    other = sorted(p.name for p in out.iterdir()
                   if p.name not in (ENTRIES, "imagesTs") and not p.name.startswith("cache.json."))
    if other:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        raise DataPathError(out, f"is not empty ({shown}) and is not a med3d_ext "
                                 "preprocessing cache: preprocessing writes and deletes files in "
                                 "its cache folder; give --out / --cache a new or empty folder")


def _migrate_v1(out: Path) -> None:
    """Remove a version-1 cache's entries (beside cache.json), for the cases its index lists:
    they are rebuilt in cases/. Nothing else in the folder is touched."""
    try:
        info = json.loads((out / "cache.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(info, dict) or info.get("cache_version", 1) >= CACHE_VERSION:
        return
    for name in info.get("cases") or []:
        if isinstance(name, str) and name != "cache" and "/" not in name:
            for suffix in _ENTRY_SUFFIXES:
                (out / f"{name}{suffix}").unlink(missing_ok=True)


def cache_subdir(cache_root, dataset_root) -> Path:
    """The cache folder of a dataset under a cache root given by the user (training's
    ``--cache CACHE``, ``data preprocess`` of a folder of datasets with ``--out CACHE``):
    ``CACHE/<name>-<crc32 of the absolute path>``."""
    key = zlib.crc32(str(Path(dataset_root).resolve()).encode()) & 0xFFFFFFFF
    return Path(cache_root) / f"{Path(dataset_root).name}-{key:08x}"


def _tmp_name(path: Path, suffix: str = "") -> Path:
    # unique per process and thread: two processes filling one cache (DDP ranks, parallel runs
    # on a shared disk) must never write into each other's partial file before the rename
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp{suffix}")


# the temporaries this process is writing: a worker stopped by SIGTERM (the parent's Ctrl-C)
# removes them before it exits (see _worker_stop)
_writing: set = set()


def _atomic(path: Path, suffix: str, write) -> None:
    tmp = _tmp_name(path, suffix)
    _writing.add(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _writing.discard(tmp)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    # np.save / np.savez append .npy / .npz unless the name already ends in it
    _atomic(path, ".npy", lambda tmp: np.save(tmp, arr))


def _save_npz(path: Path, arrays: dict) -> None:
    _atomic(path, ".npz", lambda tmp: np.savez(tmp, **arrays))


def _write_json(path: Path, obj) -> None:
    _atomic(path, "", lambda tmp: tmp.write_text(json.dumps(obj)))


def _entry_complete(out: Path, name: str, key: str) -> bool:
    """Whether the cache entry of case ``name`` can be reused: its metadata (written last, so
    its key marks the entry complete) has ``key``, and its arrays are there with the shapes
    the metadata gives. An entry with a file removed or cut short since (a copy of the cache
    interrupted, a full disk) is preprocessed again instead of failing in training."""
    import zipfile

    try:
        meta = json.loads(entry_file(out, name, ".json").read_text())
        if meta.get("key") != key:
            return False
        shape = [int(v) for v in meta["shape"]]
        # mmap: reads the header and checks that the file holds the whole array
        if list(np.load(entry_file(out, name, ".image.npy"), mmap_mode="r").shape) != \
                [int(meta["channels"]), *shape]:
            return False
        if meta.get("label") is not None:
            if list(np.load(entry_file(out, name, ".label.npy"), mmap_mode="r").shape) != shape:
                return False
            if any(int(v) > 0 for v in meta.get("label_values", [])):
                np.load(entry_file(out, name, ".fg.npy"), mmap_mode="r")
        with zipfile.ZipFile(entry_file(out, name, ".locs.npz")) as z:
            return z.testzip() is None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return False


def _remove_stale(out: Path, keep: set) -> None:
    """Delete the entries in cases/ of cases no longer in the dataset."""
    for p in (out / ENTRIES).glob("*.json"):
        if p.name[:-5] not in keep:
            for suffix in _ENTRY_SUFFIXES:
                entry_file(out, p.name[:-5], suffix).unlink(missing_ok=True)
