"""The paper's preprocessing recipe, cached as memory-mappable ``.npy`` plus JSON metadata.

Per case (order as in nnU-Net, cropping first because it is cheaper and exactly invertible):
  1. read + reorient to RAS (:func:`io.read_volume`), validate image/label;
  2. crop to the bounding box of non-zero image voxels (union label foreground, so no label is
     ever cut off);
  3. resample to the dataset's median spacing: trilinear images, nearest labels (centre-
     aligned "nearest-exact", see :func:`resize`);
  4. intensity: clip to the 0.5-99.5 percentiles, then z-score each volume. MR: percentiles
     per volume. CT: percentiles over the dataset's foreground (label > 0) voxels.

The cache keeps the *resampled raw intensities* and records the per-channel normalisation
(lo, hi, mean, std) in the case's metadata; :meth:`PreprocessedDataset.normalize` applies it
to whole volumes or patches. So adding a CT case, which moves the dataset's percentiles,
only updates a few numbers instead of rewriting every volume.

Cache layout (CACHE_DIR): ``cache.json`` (dataset description, case order) and, in
``cases/``, per case ``<case>.image.npy`` (C, D, H, W) float32, ``<case>.label.npy`` (D, H, W)
uint8/int16/int32, ``<case>.locs.npz`` (foreground voxel samples per class), ``<case>.json``
(metadata, key), ``<case>.fg.npy`` (CT foreground samples); the folder's rules and the atomic
writes are in :mod:`med3d_ext.data.cache`.
A case's key hashes its source files' paths, sizes and mtimes plus the recipe settings.
Every file is written to a temporary and renamed; a case's ``.json`` is written last and is
removed first when a case is redone, so an entry is reused only when it is complete (checked
against its arrays' headers too). Interrupted (Ctrl-C, SIGTERM), the workers are stopped at
once, their temporaries removed, and a rerun redoes only the unfinished cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
import os
import signal
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._args import bar_disable, int_arg, is_real
from .io import DataError, DataPathError, read_header, read_volume
from .layouts import CT_NAMES, Case, Dataset, load_dataset
from .cache import (CACHE_VERSION, ENTRIES, _check_cache_folder, _entry_complete, _migrate_v1,
                    _remove_stale, _save_npy, _save_npz, _write_json, _writing,
                    default_cache_dir, entry_file)

# 2: NIfTI space units honoured, labels beyond 2^24 kept exact (2026-11-27): a cache of an
# earlier version is redone once, as a case whose source changed is
RECIPE_VERSION = 2
# foreground intensities kept per CT case for the dataset percentiles (nnU-Net's number): the
# percentiles are over these samples, so every case weighs the same, whatever its size
FG_SAMPLES = 10000
LOCS_PER_CLASS = 2000  # foreground voxel positions kept per class for patch sampling


def resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    """Resize (N, C, D, H, W) to ``size`` (D, H, W); mode "trilinear", "nearest" or
    "nearest-exact" (voxel-centre aligned nearest; what labels use).

    Uses the package kernel ``med3d_ext.ops.resize`` when this build has it (it is defined to
    equal F.interpolate(align_corners=False) for "trilinear" and "nearest"); older builds fall
    back to F.interpolate itself, so the results are the same either way. Labels use
    "nearest-exact": PyTorch's legacy "nearest" picks floor(i * in/out), which shifts the
    grid by up to half a voxel against the trilinear image (and against the affine we write),
    so image and label would no longer line up.
    """
    import med3d_ext.ops as ops

    size = tuple(int(s) for s in size)
    if mode != "nearest-exact" and hasattr(ops, "resize"):
        return ops.resize(x, size, mode)
    return F.interpolate(x, size=size, mode=mode,
                         align_corners=False if mode == "trilinear" else None)


class ChannelError(ValueError):
    """A channel index that an image does not have (:func:`classification_volume`): the
    caller's choice, not bad data. ``channel``, ``path`` and ``count`` (the image's channels)."""

    def __init__(self, channel: int, path, count: int):
        self.channel, self.path, self.count = int(channel), str(path), int(count)
        super().__init__(f"channel {self.channel}: {self.path!r} has {self.count} channel(s)")


def classification_volume(path, size, channel: int | None = None) -> torch.Tensor:
    """One image as classification runs see it: the single recipe of ``python -m
    med3d_ext.train transfer --task cls``, of evaluate and predict with such a run
    (``med3d_ext.train.classification.load_cls_volume`` calls this) and of
    :class:`~med3d_ext.data.ClassificationSet`.

    The file is read and reoriented to RAS (:func:`~med3d_ext.data.read_volume`); channel
    ``channel`` (an index, default 0) is clipped to its own 0.5-99.5 percentiles (CT too: no
    dataset-wide window), z-scored over the whole volume and resized (trilinear,
    align_corners=False) straight to ``size`` (D, H, W). Unlike the segmentation recipe
    (:func:`preprocess`) there is no crop to the non-zero box, no resampling to a target
    spacing and no cache: the image is prepared from its source file each time.

    Returns (1, D, H, W) float32. Raises :class:`DataError` naming the file (missing,
    unreadable, NaN/Inf voxels) and :class:`ChannelError` (a ValueError) for a channel the
    image does not have.
    """
    size = tuple(int(s) for s in size)
    c = 0 if channel is None else int(channel)
    if c < 0:
        raise ValueError(f"channel {channel!r}: expected an index >= 0")
    v = read_volume(path, dtype=np.float32)
    if c >= v.data.shape[0]:
        raise ChannelError(c, path, v.data.shape[0])
    x = v.data[c].astype(np.float32, copy=False)  # (np.clip below copies: v is not changed)
    lo, hi = np.percentile(x, [0.5, 99.5])
    x = np.clip(x, lo, hi)
    x = (x - x.mean()) / max(float(x.std()), 1e-6)
    t = torch.from_numpy(x.astype(np.float32, copy=False))[None, None]
    # F.interpolate itself, as the classification runs always did (resize() may use the
    # package kernel, defined to give the same numbers)
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0]


def resize_affine(affine: np.ndarray, old_shape, new_shape) -> np.ndarray:
    """Affine of an array resized with align_corners=False: new voxel i sits at old index
    (i + 0.5) * old/new - 0.5."""
    s = np.asarray(old_shape, float) / np.asarray(new_shape, float)
    m = np.eye(4)
    m[:3, :3] = np.diag(s)
    m[:3, 3] = (s - 1) / 2
    return affine @ m


def crop_affine(affine: np.ndarray, start) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = start
    return affine @ m


def target_shape(shape, spacing, target_spacing) -> tuple:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def nonzero_bbox(image: np.ndarray, label: np.ndarray | None = None) -> list:
    """[[start, stop) x 3] of voxels non-zero in any channel or in the label; the whole volume
    when everything is zero."""
    mask = np.any(image != 0, axis=0)
    if label is not None:
        mask |= label != 0
    if not mask.any():
        return [[0, int(n)] for n in mask.shape]
    box = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box


def file_key(paths, settings: dict) -> str:
    h = hashlib.sha1()
    for p in paths:
        p = Path(p)
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _affines_match(a: np.ndarray, b: np.ndarray, spacing) -> bool:
    # header floats are stored in float32: allow that precision plus 1% of a voxel
    tol = 1e-2 * float(np.min(spacing)) + 1e-4
    return bool(np.abs(a[:3, :3] - b[:3, :3]).max() <= 1e-3 and
                np.abs(a[:3, 3] - b[:3, 3]).max() <= tol)


def read_case(case: Case, labels: dict | None = None):
    """Read and validate one case: (image Volume (C, I, J, K) float32, label (I, J, K) or None).

    Raises DataError naming the file for: unreadable/corrupt files, NaN/Inf voxels, channel
    files that disagree, image/label shape or affine mismatch, undeclared label values."""
    vols = [read_volume(p) for p in case.images]
    img = vols[0]
    for v in vols[1:]:
        if v.orig_shape != img.orig_shape or not _affines_match(v.orig_affine, img.orig_affine,
                                                               img.spacing):
            raise DataError(v.path, f"channel file does not match {img.path} in shape/affine "
                                    f"({v.orig_shape} vs {img.orig_shape})")
    if len(vols) > 1:
        img.data = np.concatenate([v.data for v in vols], 0)
    img.data = img.data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(img.data)):  # finite as read, beyond float32's range (scl_slope)
        bad = int(img.data.size - np.count_nonzero(np.isfinite(img.data)))
        raise DataError(img.path, f"{bad} voxels overflow float32 (|value| > 3.4e38 after the "
                                  "header's scaling)")
    if case.label is None:
        return img, None
    lab = read_volume(case.label)
    if lab.orig_shape != img.orig_shape:
        raise DataError(case.label, f"label shape {lab.orig_shape} differs from image shape "
                                    f"{img.orig_shape} ({img.path})")
    if not _affines_match(lab.orig_affine, img.orig_affine, img.spacing):
        d = np.abs(lab.orig_affine - img.orig_affine).max()
        raise DataError(case.label, f"label affine differs from the image's ({img.path}) by "
                                    f"up to {d:.4g}")
    if lab.data.shape[0] != 1:
        raise DataError(case.label, f"label has {lab.data.shape[0]} channels, expected 1")
    ldata = lab.data[0]
    if ldata.dtype.kind == "f":
        r = np.rint(ldata)
        if not np.array_equal(r, ldata):
            odd = np.unique(ldata[r != ldata])
            raise DataError(case.label, f"label has {int((r != ldata).sum())} non-integer "
                                        f"values, e.g. {[float(v) for v in odd[:3]]} (a resampled"
                                        " or interpolated label map?)")
        ldata = r
    values = np.unique(ldata).astype(np.int64)
    if values.min() < 0:
        raise DataError(case.label, f"negative label values {values[values < 0].tolist()}")
    if labels is not None:
        bad = sorted(set(values.tolist()) - set(labels))
        if bad:
            raise DataError(case.label, f"label values {bad} not declared in dataset.json "
                                        f"(declared: {sorted(labels)})")
    return img, ldata.astype(label_storage_dtype(int(values.max())))


def label_storage_dtype(max_label: int, min_label: int = 0):
    """The narrowest integer dtype for label maps with values in [min_label, max_label]: uint8,
    else int16, int32 or int64 (a fixed uint8/int16 choice silently wrapped labels >= 256 or
    >= 32768)."""
    if min_label >= 0 and max_label < 256:
        return np.uint8
    if -32768 <= min_label and max_label < 32768:
        return np.int16
    if -2**31 <= min_label and max_label < 2**31:
        return np.int32
    return np.int64


def nib_axcodes(affine):
    from nibabel.orientations import aff2axcodes

    return aff2axcodes(affine)


def exact_float(labels: np.ndarray):
    """The float dtype that holds these integer labels exactly, for nearest resampling (which
    goes through floats): float32 up to 2^24, float64 beyond (a label 16777217 came back as
    16777216, a class the dataset does not have)."""
    top = max(abs(int(labels.max())), abs(int(labels.min()))) if labels.size and \
        labels.dtype.kind in "iu" else 0
    if top > 2**24:
        if top > 2**53:
            raise ValueError(f"label values up to {int(labels.max())} cannot be resampled "
                             "exactly (beyond 2^53)")
        return np.float64
    return np.float32


def process_case(case: Case, target_spacing, labels=None, seed: int = 0) -> dict:
    """Steps 1-3 for one case. Returns arrays and metadata (no normalisation yet)."""
    img, lab = read_case(case, labels)
    box = nonzero_bbox(img.data, lab)
    sl = tuple(slice(a, b) for a, b in box)
    data = img.data[(slice(None),) + sl]
    lab_c = lab[sl] if lab is not None else None
    cshape = data.shape[1:]
    cropped_affine = crop_affine(img.affine, [a for a, _ in box])
    new_shape = target_shape(cshape, img.spacing, target_spacing)
    if new_shape != tuple(cshape):
        data = resize(torch.from_numpy(np.ascontiguousarray(data))[None], new_shape,
                      "trilinear")[0].numpy()
        if lab_c is not None:
            lab_c = resize(torch.from_numpy(lab_c.astype(exact_float(lab_c)))[None, None],
                           new_shape, "nearest-exact")[0, 0].numpy().astype(lab.dtype)
    affine = resize_affine(cropped_affine, cshape, new_shape)
    rng = np.random.default_rng([seed, int(hashlib.sha1(case.name.encode()).hexdigest()[:8],
                                             16)])
    fg_vals, locs = None, {}
    if lab_c is not None:
        for c in np.unique(lab_c):
            if c == 0:
                continue
            idx = np.argwhere(lab_c == c).astype(np.int32)
            if len(idx) > LOCS_PER_CLASS:
                idx = idx[np.sort(rng.choice(len(idx), LOCS_PER_CLASS, replace=False))]
            locs[f"c{int(c)}"] = idx
        fg = lab_c > 0
        if fg.any():
            vals = data[:, fg]
            if vals.shape[1] > FG_SAMPLES:
                vals = vals[:, rng.choice(vals.shape[1], FG_SAMPLES, replace=False)]
            fg_vals = vals.astype(np.float32)
    meta = {
        "case": case.name,
        "images": [str(p) for p in case.images],
        "label": str(case.label) if case.label is not None else None,
        "orig_affine": img.orig_affine.tolist(),
        "orig_shape": list(img.orig_shape),
        "ornt": img.ornt.tolist(),
        "axcodes": "".join(nib_axcodes(img.orig_affine)),
        "ras_affine": img.affine.tolist(),
        "ras_shape": list(img.data.shape[1:]),
        "spacing": img.spacing.tolist(),
        "crop_box": box,
        "target_spacing": list(map(float, target_spacing)),
        "affine": affine.tolist(),
        "shape": list(new_shape),
        "out_spacing": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "channels": int(data.shape[0]),
        "label_values": [int(v) for v in np.unique(lab_c)] if lab_c is not None else [],
    }
    return {"image": np.ascontiguousarray(data, dtype=np.float32), "label": lab_c,
            "meta": meta, "fg_values": fg_vals, "locs": locs}


def _job(args):
    """Worker: process one case and write its cache files. Returns (name, None | error)."""
    case, target, labels, out, key, seed = args
    try:
        r = process_case(case, target, labels, seed)
    except DataError as e:
        return case.name, str(e)
    except Exception as e:  # noqa: BLE001 - one odd file must not stop the whole dataset
        return case.name, (f"{case.images[0]}: could not be preprocessed "
                           f"({type(e).__name__}: {e})")
    stem = entry_file(out, case.name, "")
    # an older entry's metadata goes first: were this rewrite cut short, the entry must not
    # pass for complete (its files would be part old, part new)
    Path(f"{stem}.json").unlink(missing_ok=True)
    _save_npy(Path(f"{stem}.image.npy"), r["image"])
    # tests: a case that takes a while to write, so that a signal can land in the middle of one
    if os.environ.get("MED3D_EXT_TEST_CASE_DELAY"):
        time.sleep(float(os.environ["MED3D_EXT_TEST_CASE_DELAY"]))
    for suffix, arr in ((".label.npy", r["label"]), (".fg.npy", r["fg_values"])):
        if arr is not None:
            _save_npy(Path(f"{stem}{suffix}"), arr)
        else:  # a label removed since the last run must not linger
            Path(f"{stem}{suffix}").unlink(missing_ok=True)
    _save_npz(Path(f"{stem}.locs.npz"), r["locs"])
    meta = dict(r["meta"], key=key)
    _write_json(Path(f"{stem}.json"), meta)  # written last: its key marks the entry complete
    return case.name, None


def preprocess(data, out=None, *, workers: int | None = None, skip_bad: bool = False,
               target_spacing=None, progress: bool = True, seed: int = 0,
               ct_clip="dataset"):
    """Preprocess a raw dataset into a cache folder; reruns only redo changed cases.

    data:  dataset folder (MSD / nnU-Net v2 / MedicalNet list) or a :class:`Dataset`
    out:   cache folder (default :func:`default_cache_dir`)
    workers: processes (default: min(cpu count, 8), in-process below 4 cases to do; 0 = in
             this process)
    skip_bad: drop bad cases with a warning listing them, instead of raising DataError
    target_spacing: mm per axis (default: the spacing an earlier call was given for this
             cache folder, else the dataset's median spacing)
    ct_clip: "dataset" (default): CT channels are clipped to the 0.5-99.5 percentiles of this
             dataset's labelled foreground; or the clip range to use instead, one [lo, hi] (or
             None) per channel, e.g. a training set's ``info["ct_clip"]`` when preprocessing
             its unlabelled test images; None: per-volume percentiles, as a training set
             without foreground had. Each volume is then z-scored with its own clipped mean
             and std, as in training.
    Returns a :class:`PreprocessedDataset`.
    """
    _check_preprocess_args(workers, target_spacing, seed, ct_clip)
    ds = data if isinstance(data, Dataset) else load_dataset(data, skip_bad=skip_bad)
    out = Path(out) if out is not None else default_cache_dir(ds.source or ds.root)
    _check_cache_folder(out, ds)
    try:
        (out / ENTRIES).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # before any work: name the folder and where its path comes from
        raise DataPathError(out, f"cannot create this preprocessing cache folder "
                                 f"({e.strerror or e}); choose another with --cache / --out, "
                                 "or set $MED3D_EXT_CACHE") from None
    problems = list(ds.problems)
    good = []
    spacings = []
    channels = _ChannelCount(ds)
    for c in ds.cases:  # headers only: cheap, and catches unreadable files early
        try:
            heads = [read_header(p) for p in c.images]
            channels.check(c, sum(int(h[2]) for h in heads))
            spacings.append(heads[0][0])
            good.append(c)
        except DataError as e:
            if not skip_bad:
                raise
            problems.append(str(e))
    channels.apply()
    if not good:
        raise DataError(ds.root, "empty dataset: no usable cases")
    spacing_from = "given"
    if target_spacing is None:
        # a spacing chosen for this cache (`data preprocess --spacing`) is kept: training's
        # --cache CACHE redid every case at the median spacing and overwrote it, silently
        target_spacing = _given_spacing(out)
    if target_spacing is None:
        target_spacing, spacing_from = np.median(np.stack(spacings), 0), "median"
    target = [round(float(t), 4) for t in np.broadcast_to(np.asarray(target_spacing), 3)]
    settings = {"recipe": RECIPE_VERSION, "target_spacing": target, "seed": seed,
                "labels": sorted(ds.labels) if ds.labels else None}
    todo, keys = [], {}
    for c in good:
        files = [*c.images] + ([c.label] if c.label is not None else [])
        keys[c.name] = key = file_key(files, settings)
        if _entry_complete(out, c.name, key):
            continue
        todo.append((c, target, ds.labels, str(out), key, seed))
    t0 = time.perf_counter()
    failed = _run_jobs(todo, workers, progress, ds.name)
    seconds = time.perf_counter() - t0
    for name, err in failed:
        if not skip_bad:
            raise DataError(err.split(": ", 1)[0], err.split(": ", 1)[-1])
        problems.append(err)
    bad_names = {n for n, _ in failed}
    names = [c.name for c in good if c.name not in bad_names]
    if not names:
        raise DataError(ds.root, "empty dataset: every case is bad:\n  " + "\n  ".join(problems))
    if problems:
        warnings.warn(f"{ds.name}: skipped {len(problems)} bad case(s):\n  " +
                      "\n  ".join(problems), stacklevel=2)
    _migrate_v1(out)
    _remove_stale(out, set(names))
    norm = _finalize_norm(out, names, ds, ct_clip)
    _write_json(out / "cache.json", {
        "cache_version": CACHE_VERSION, "name": ds.name, "root": str(Path(ds.root).resolve()), "layout": ds.layout,
        "channels": ds.channels,
        "labels": {str(k): v for k, v in ds.labels.items()} if ds.labels else None,
        "modality": ds.modality, "target_spacing": target,
        "target_spacing_from": spacing_from, "cases": names,
        "problems": problems, "ct_clip": norm,
        "ct_clip_from": "dataset" if isinstance(ct_clip, str) else "given",
        "targets": [ds.targets[n] for n in names] if ds.targets is not None else None,
        "classes": {str(k): v for k, v in ds.classes.items()} if ds.classes else None})
    pre = PreprocessedDataset(out)
    # this call's work (not stored: a cache is the same whoever filled it): cases processed
    # now, their wall time, and cases reused from an earlier run
    pre.stats = {"processed": len(todo) - len(failed), "seconds": seconds,
                 "reused": len(good) - len(todo), "workers": worker_count(workers, len(todo))}
    return pre


def _check_preprocess_args(workers, target_spacing, seed, ct_clip) -> None:
    """preprocess()'s arguments, each named, before any case is read: a bad seed failed in
    every case job and was reported as the image files' fault, a reversed or NaN ct_clip made
    every voxel 0 or NaN, and workers="2" failed deep in the job runner."""
    if workers is not None:
        int_arg("workers (--workers; 0 = in this process): expected an int >= 0", workers, 0)
    int_arg("seed: expected an int >= 0", seed, 0)
    if target_spacing is not None:
        vals = [target_spacing] if is_real(target_spacing) else (
            list(target_spacing) if isinstance(target_spacing, (list, tuple, np.ndarray))
            else None)
        if vals is None or not all(is_real(v) for v in vals):
            raise TypeError("target spacing (--spacing): expected one or 3 mm values, got "
                            f"{target_spacing!r}")
        # a zero spacing crashed every case, and a negative one collapsed an axis to 1 voxel
        if len(vals) not in (1, 3) or not all(math.isfinite(v) and v > 0 for v in vals):
            raise ValueError("target spacing (--spacing): expected one or 3 positive mm values, "
                             f"got {target_spacing!r}")
    if isinstance(ct_clip, str):
        if ct_clip != "dataset":
            raise ValueError(f"ct_clip: expected \"dataset\", None or one [lo, hi] (or None) per "
                             f"channel, got {ct_clip!r}")
    elif ct_clip is not None:
        for c in ct_clip:
            ok = c is None or (isinstance(c, (list, tuple, np.ndarray)) and len(c) == 2 and all(
                isinstance(v, numbers.Real) and math.isfinite(v) for v in c) and c[0] <= c[1])
            # lo == hi is allowed: a CT foreground of one intensity gives it, and a test split
            # replays the training recipe
            if not ok:
                raise ValueError(f"ct_clip: each channel's range must be None or [lo, hi] with "
                                 f"finite lo <= hi, got {c!r} in {ct_clip!r}")


def _given_spacing(out: Path):
    """The target spacing an earlier preprocess call was given for this cache folder (its
    cache.json says so), or None (none given, no readable cache.json)."""
    try:
        info = json.loads((out / "cache.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("target_spacing_from") != "given":
        return None
    ts = info.get("target_spacing")
    try:
        ts = [float(v) for v in ts]
    except (TypeError, ValueError):
        return None
    return ts if len(ts) == 3 and all(np.isfinite(ts)) and min(ts) > 0 else None


class _ChannelCount:
    """Every case must have the channels its dataset has: as many as dataset.json declares
    (MSD ``modality``, nnU-Net ``channel_names``), or, where the layout declares none (MedicalNet
    lists, classification folders), as many as the first case. A mismatch failed only later, as
    an IndexError in the sampler, or passed silently."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self.declared = ds.layout in ("msd", "nnunet")
        self.want = len(ds.channels) if self.declared else None
        self.first = None

    def check(self, case: Case, n: int) -> None:
        if self.want is None:
            self.want, self.first = n, case.images[0]
        if n == self.want:
            return
        if self.declared:
            what = "'modality'" if self.ds.layout == "msd" else "'channel_names'"
            raise DataError(case.images[0], f"has {n} channel(s), but dataset.json {what} "
                                            f"declares {self.want} ({', '.join(map(str, self.ds.channels))})")
        raise DataError(case.images[0], f"has {n} channel(s), but the dataset's first case "
                                        f"({self.first}) has {self.want}; all cases need the "
                                        "same channels")

    def apply(self) -> None:
        """An undeclared dataset of multi-channel images: one channel name per channel."""
        if not self.declared and self.want and self.want != len(self.ds.channels):
            self.ds.channels = [self.ds.channels[0]] * self.want


def worker_count(workers: int | None, cases: int) -> int:
    """Worker processes for ``cases`` cases (0: in this process): ``workers``, or by default a
    process per core (at most 8) when there are 4 cases or more."""
    if workers is None:  # a process per core, when there is enough work to share
        workers = min(os.cpu_count() or 1, 8) if cases >= 4 else 0
    return min(workers, cases)


def _run_jobs(todo, workers, progress, name):
    from tqdm.auto import tqdm

    if not todo:
        return []
    workers = worker_count(workers, len(todo))
    bar = tqdm(total=len(todo), desc=f"preprocess {name}", disable=bar_disable(progress), unit="case")
    failed = []
    if workers <= 1:
        for t in todo:
            n, err = _job(t)
            if err:
                failed.append((n, err))
            bar.update()
    else:
        import multiprocessing as mp

        # fork on Linux, as torch's DataLoader does: it starts fast and, unlike spawn, needs
        # no `if __name__ == "__main__"` guard in the user's script. It is safe because each
        # job first sets one intra-op thread, so the child never enters the OpenMP pool it
        # inherited. Elsewhere (or MED3D_EXT_MP_START=spawn) processes are spawned.
        method = os.environ.get("MED3D_EXT_MP_START") or (
            "fork" if sys.platform.startswith("linux") else "spawn")
        ex = ProcessPoolExecutor(workers, mp_context=mp.get_context(method),
                                 initializer=_worker_init)
        try:
            for n, err in ex.map(_job, todo):
                if err:
                    failed.append((n, err))
                bar.update()
        except BaseException:  # Ctrl-C (or SIGTERM, see data/__main__.py), or an error
            _stop_workers(ex)
            raise
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    bar.close()
    return failed


def _worker_init():
    # one case per process; more intra-op threads would oversubscribe the cores
    torch.set_num_threads(1)
    # A terminal's Ctrl-C reaches every process of the group. Only the parent acts on it (one
    # "interrupted", not a traceback from each worker); it stops the workers with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_stop)
    if sys.platform.startswith("linux"):
        try:  # a parent killed outright (SIGKILL, OOM) takes its workers along: no orphans
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker_stop(signum, frame):
    """SIGTERM in a worker: remove the temporaries it was writing and exit at once. A case in
    progress has no metadata file yet, so a rerun does it again."""
    for tmp in list(_writing):
        tmp.unlink(missing_ok=True)
    os._exit(128 + signum)


def _stop_workers(ex: ProcessPoolExecutor) -> None:
    """Stop the pool now: cancel the cases not started and terminate the workers (their
    cases in progress are dropped, to be redone by a rerun) instead of waiting for them."""
    procs = list((getattr(ex, "_processes", None) or {}).values())  # no public handle < 3.14
    # shutdown(wait=False) forgets the pool's manager thread, so the later shutdown(wait=True)
    # no longer joins it: left running, it closed its wake-up pipe while the interpreter's exit
    # hook (concurrent.futures' _python_exit) was writing to it, and an interrupted run printed
    # "Exception ignored ... OSError: [Errno 9] Bad file descriptor" after "interrupted"
    # (CPython 3.11; seen once in the interrupt test under load)
    manager = getattr(ex, "_executor_manager_thread", None)
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if manager is not None:
        manager.join(10)  # it ends once it sees the workers gone


def _clipped_stats(x: np.ndarray, lo: float, hi: float):
    c = np.clip(x, lo, hi, dtype=np.float64) if x.size else np.zeros(1)
    return float(c.mean()), float(max(c.std(), 1e-8))


def _finalize_norm(out: Path, names: list, ds: Dataset, given="dataset"):
    """Step 4: fill each case's ``norm`` (per channel lo, hi, mean, std); rewrite a case's
    metadata only when its numbers change. ``given``: see ``preprocess(ct_clip=...)``."""
    ct_chan = [c.strip().lower() in CT_NAMES for c in ds.channels]
    ct_clip = None
    if not isinstance(given, str):
        if given is not None:
            given = [None if c is None else [float(c[0]), float(c[1])] for c in given]
            if len(given) != len(ds.channels):
                raise ValueError(f"ct_clip: one [lo, hi] per channel of {ds.name} "
                                 f"{ds.channels} expected, got {given}")
        ct_clip = given
    elif any(ct_chan):
        samples = [np.load(entry_file(out, n, ".fg.npy")) for n in names
                   if entry_file(out, n, ".fg.npy").exists()]
        if samples:
            allv = np.concatenate(samples, 1)
            ct_clip = [[float(np.percentile(v, 0.5)), float(np.percentile(v, 99.5))]
                       for v in allv]

    def fixed_clip(ch):
        """[lo, hi] shared by the dataset for CT channel ch, or None (per-volume)."""
        if ct_clip is None or ch >= len(ct_chan) or not ct_chan[ch] or ch >= len(ct_clip):
            return None
        return ct_clip[ch]

    for n in names:
        mp = entry_file(out, n, ".json")
        meta = json.loads(mp.read_text())
        img = np.load(entry_file(out, n, ".image.npy"), mmap_mode="r")
        old = meta.get("norm")
        norm = []
        for ch in range(img.shape[0]):
            fixed = fixed_clip(ch)
            if fixed is not None:
                lo, hi = fixed
                if old and len(old) > ch and not old[ch].get("per_volume") and \
                        [old[ch]["lo"], old[ch]["hi"]] == [lo, hi]:
                    norm.append(old[ch])
                    continue
            elif old and len(old) > ch and old[ch].get("per_volume"):
                norm.append(old[ch])  # MR numbers depend only on this case: still valid
                continue
            x = np.asarray(img[ch])
            if fixed is None:
                lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5])) if x.size else (0, 1)
            mean, std = _clipped_stats(x, lo, hi)
            norm.append({"lo": lo, "hi": hi, "mean": mean, "std": std,
                         "per_volume": fixed is None})
        if norm != old:
            meta["norm"] = norm
            _write_json(mp, meta)
    return ct_clip


class PreprocessedDataset:
    """A preprocessed dataset in a cache folder (see :func:`preprocess`). Arrays open
    memory-mapped; nothing is loaded until asked for.

    names:        case names, in dataset order
    labels:       {value: class name} or None; ``num_classes``
    channels:     channel names; ``channel_index(name_or_index)``
    image(i):     raw (resampled, cropped) intensities (C, D, H, W), memory-mapped
    label(i):     (D, H, W) uint8/int16/int32, memory-mapped (None if unlabelled)
    meta(i):      metadata dict (affines, crop box, shapes, norm)
    recipe():     target spacing and CT clip range, to preprocess new images the same way
    targets:      classification datasets: class index per case (else None); ``classes``
    load_case(i, channel=None): (normalized image float32 (C|1, D, H, W), label, meta)
    """

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        info = self.dir / "cache.json"
        if not info.exists():
            raise DataError(self.dir, "not a preprocessed cache (no cache.json); run "
                                      "python -m med3d_ext.data preprocess DATASET --out DIR")
        try:  # a cut-off or hand-edited cache.json: name the file, not a KeyError
            self.info = json.loads(info.read_text())
            self.names = list(self.info["cases"])
            self.name = self.info["name"]
            self.channels = self.info["channels"]
            lab = self.info.get("labels")
            self.labels = {int(k): v for k, v in lab.items()} if lab else None
            self.modality = self.info["modality"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(info, f"corrupt cache index ({type(e).__name__}: {e}); delete the "
                                  "cache folder to rebuild it") from None
        if self.info.get("cache_version", 1) != CACHE_VERSION:
            raise DataError(info, f"a cache of another med3d_ext version (layout "
                                  f"{self.info.get('cache_version', 1)}, this one reads "
                                  f"{CACHE_VERSION}); preprocess the dataset again (python -m "
                                  "med3d_ext.data preprocess DATASET --out DIR, or train with "
                                  "--data DATASET), which updates it in place")
        # classification datasets: one class index per case, and the class names
        self.targets = self.info.get("targets")
        cls = self.info.get("classes")
        self.classes = {int(k): v for k, v in cls.items()} if cls else None
        self._meta: dict = {}
        self._locs: dict = {}

    def __len__(self):
        return len(self.names)

    @property
    def num_classes(self) -> int:
        if self.labels is not None:
            return max(self.labels) + 1
        return max((max(self.meta(i)["label_values"] or [0]) for i in range(len(self))),
                   default=0) + 1

    def recipe(self) -> dict:
        """What it takes to preprocess new images (e.g. the dataset's unlabelled test images)
        exactly as this dataset's cases were: JSON-able, stored in training checkpoints.
        Replay it with ``preprocess(ds, target_spacing=r["target_spacing"],
        ct_clip=r["ct_clip"])``."""
        return {"dataset": self.name, "modality": self.modality,
                "channels": list(self.channels), "recipe": RECIPE_VERSION,
                "target_spacing": [float(v) for v in self.info["target_spacing"]],
                "ct_clip": self.info.get("ct_clip"),
                "intensity": "CT channels: clip to ct_clip (the dataset's labelled-foreground "
                             "0.5-99.5 percentiles); other channels: clip to the volume's own "
                             "0.5-99.5 percentiles; then z-score each volume with its own "
                             "clipped mean and std"}

    def channel_index(self, channel) -> int:
        if channel is None:
            return 0
        if isinstance(channel, int) or str(channel).isdigit():
            i = int(channel)
            if 0 <= i < len(self.channels):
                return i
        else:
            low = [c.lower() for c in self.channels]
            if channel.lower() in low:
                return low.index(channel.lower())
        raise ValueError(f"{self.name}: no channel {channel!r}; channels are {self.channels}")

    def meta(self, i: int) -> dict:
        if i not in self._meta:
            self._meta[i] = json.loads(self.entry(i, ".json").read_text())
        return self._meta[i]

    def image(self, i: int) -> np.ndarray:
        return np.load(self.entry(i, ".image.npy"), mmap_mode="r")

    def entry(self, i: int, suffix: str) -> Path:
        """Case i's file with ``suffix`` (".json", ".image.npy", ".label.npy", ...)."""
        return entry_file(self.dir, self.names[i], suffix)

    def has_label(self, i: int) -> bool:
        return self.entry(i, ".label.npy").exists()

    def label(self, i: int):
        p = self.entry(i, ".label.npy")
        return np.load(p, mmap_mode="r") if p.exists() else None

    def locations(self, i: int) -> dict:
        """{class value: (K, 3) int32 foreground voxel positions}."""
        if i not in self._locs:
            with np.load(self.entry(i, ".locs.npz")) as z:
                self._locs[i] = {int(k[1:]): z[k] for k in z.files}
        return self._locs[i]

    def normalize(self, x: np.ndarray, i: int, channels=None, out=None) -> np.ndarray:
        """Clip + z-score raw intensities ``x`` (C, ...) of case i; ``channels`` are the
        channel indices the rows of x come from (default all). ``out``: a float32 array of x's
        shape to write into (may be x itself), else a new one."""
        norm = self.meta(i)["norm"]
        channels = range(len(x)) if channels is None else channels
        if out is None:
            out = np.empty(x.shape, np.float32)
        elif out.dtype != np.float32 or out.shape != x.shape:
            raise ValueError(f"normalize: out must be float32 of shape {x.shape}, got "
                             f"{out.dtype} {out.shape}")
        for r, ch in enumerate(channels):
            n = norm[ch]
            if x.dtype == np.float32:  # the cache's dtype: in place, without temporaries (the
                # same float32 operations as the formula below, in the same order)
                np.clip(x[r], n["lo"], n["hi"], out=out[r])
                out[r] -= n["mean"]
                out[r] /= n["std"]
            else:  # computed in x's precision, rounded to float32 once
                out[r] = (np.clip(x[r], n["lo"], n["hi"]) - n["mean"]) / n["std"]
        return out

    def background_value(self, i: int, ch: int) -> float:
        """Normalized value of a raw 0 voxel: what padding outside the volume means."""
        n = self.meta(i)["norm"][ch]
        return float((np.clip(0.0, n["lo"], n["hi"]) - n["mean"]) / n["std"])

    def load_case(self, i: int, channel=None):
        img = self.image(i)
        chans = list(range(img.shape[0])) if channel is None else [self.channel_index(channel)]
        x = self.normalize(np.asarray(img[chans]), i, chans)
        lab = self.label(i)
        return x, (np.asarray(lab) if lab is not None else None), self.meta(i)


# --------------------------------------------------------------------------------------------
# inverse: preprocessed grid -> source file space


def to_source_space(pred, meta: dict, *, fill=0) -> np.ndarray:
    """Map an array on a case's preprocessed grid back onto its source file's voxel grid.

    pred: (D, H, W) integer labels (resampled nearest) or (C, D, H, W) float maps (trilinear),
          numpy or torch, on the grid of ``meta["shape"]``.
    Undoes the resampling, the crop (voxels outside the crop box get ``fill``) and the RAS
    reorientation. Returns (I, J, K) or (I, J, K, C) in the stored file's axis order, to be
    written with ``meta["orig_affine"]`` (see :func:`write_prediction`).
    """
    from .io import ras_to_source

    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    pred = np.array(pred)  # a copy: memory-mapped cache arrays are read-only
    is_label = pred.dtype.kind in "iub"
    spatial = pred.shape if is_label else pred.shape[1:]
    if pred.ndim != (3 if is_label else 4) or list(spatial) != list(meta["shape"]):
        raise ValueError(f"prediction for case {meta['case']!r} has shape {pred.shape}; "
                         f"expected (D, H, W) integer labels or (C, D, H, W) floats with "
                         f"(D, H, W) = {tuple(meta['shape'])}")
    box = meta["crop_box"]
    cshape = tuple(b - a for a, b in box)
    if is_label:
        t = torch.from_numpy(np.ascontiguousarray(pred.astype(exact_float(pred))))
        t = resize(t[None, None], cshape, "nearest-exact")[0, 0].numpy().astype(pred.dtype)
        full = np.full(meta["ras_shape"], fill, dtype=pred.dtype)
        full[tuple(slice(a, b) for a, b in box)] = t
    else:
        t = resize(torch.from_numpy(np.ascontiguousarray(pred))[None].float(), cshape,
                   "trilinear")[0].numpy()
        full = np.full([t.shape[0], *meta["ras_shape"]], fill, dtype=np.float32)
        full[(slice(None),) + tuple(slice(a, b) for a, b in box)] = t
    return ras_to_source(full, np.asarray(meta["ornt"]))


def write_prediction(pred, meta: dict, path, *, fill=0):
    """Write a preprocessed-grid prediction as NIfTI in the case's original space (shape,
    orientation and affine of the source image). Returns the path."""
    from .io import save_nifti

    arr = to_source_space(pred, meta, fill=fill)
    if arr.dtype.kind in "iub":
        arr = arr.astype(label_storage_dtype(int(arr.max(initial=0)), int(arr.min(initial=0))))
    return save_nifti(arr, np.asarray(meta["orig_affine"]), path)
