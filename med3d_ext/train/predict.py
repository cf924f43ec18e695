"""``predict``: a trained run applied to image files that sit in no dataset layout, as
nnU-Net's ``nnUNetv2_predict -i IN -o OUT``.

Inputs (``--images PATH [PATH ...]``): image files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd;
a 3-D .dcm named directly) and folders. A folder gives every image file directly inside it,
sorted by name (sub-folders are not searched); a folder without any, but with a DICOM series,
is one image. A case is named by its file name without the image ending (a DICOM series: by
its folder). nnU-Net channel files, ``<case>_0000<ending>``, ``<case>_0001<ending>``, ... of one
folder, make one case named ``<case>``, as in a dataset's ``imagesTs/``, for a run trained on
several channels: the ``_XXXX`` suffix is read as a channel only where a ``_0000`` file of that
name is there, so ``scan_2019.nii.gz`` stays case ``scan_2019``; for a one-channel run (and a
classification run) such files are separate scans, each named by its whole file name.

Segmentation runs: the images are preprocessed as ``evaluate --split test`` preprocesses a
dataset's test images, by the same code (``med3d_ext.data.preprocess`` with the run's recorded
training recipe: target spacing, CT clip range; ``evaluate.training_recipe``), into a temporary
folder removed at the end (never the training cache); each is predicted by the sliding windows
``evaluate`` uses (``evaluate.predict_case``) and written as ``OUT/<case>.nii.gz`` in the
image's own grid, orientation and affine. Classification runs: ``OUT/predictions.csv``
(``evaluate``'s columns, with the image file instead of a label). Both write
``OUT/predictions.json``: inputs, outputs, the run and checkpoint, the settings, the times.
Every file is written atomically: an interrupted run leaves whole predictions (and no summary).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._args import bar_disable
from .checkpoint import CheckpointError
from .config import ConfigError

__all__ = ["predict", "find_images", "image_case_names", "Image", "IMAGE_ENDINGS"]

# what a folder is searched for; a file named directly may also be a (multi-frame) .dcm
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
FILE_ENDINGS = IMAGE_ENDINGS + (".dcm",)
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net: <case>_<channel, 4 digits>


@dataclass
class Image:
    """One case to predict: ``files`` has one path per nnU-Net channel file, else one file
    (or DICOM series folder); ``given`` is the --images argument it came from."""

    name: str
    files: list
    given: str
    folder: str = ""  # nnU-Net channel files: the folder they are in
    missing: tuple = ()  # nnU-Net channel files: the channel numbers absent from the group


def _ending(name: str) -> str | None:
    low = name.lower()
    return next((e for e in FILE_ENDINGS if low.endswith(e)), None)


def _strip_ending(name: str) -> str:
    """``name`` without its image ending (a name that is only an ending is kept whole)."""
    e = _ending(name)
    return name[: -len(e)] if e and len(name) > len(e) else name


def _stem(path: Path) -> str:
    e = _ending(path.name)
    stem = path.name[: -len(e)] if e else path.name
    if not stem:  # ".nii.gz": a case named '' (its cache entry was ".json": a crash)
        raise ConfigError(f"--images {str(path)!r}: the file has no name before its ending "
                          f"({e}); predictions are named after it: rename it")
    return stem


def _is_dicom_series(folder: Path) -> bool:
    """A folder of DICOM slices: .dcm files, or (with SimpleITK) any series GDCM finds (DICOM
    files often have no ending)."""
    files = [q for q in folder.iterdir() if q.is_file()]
    if any(q.name.lower().endswith(".dcm") for q in files):
        return True
    try:
        import SimpleITK as sitk
    except ImportError:
        return False
    if not files:
        return False
    # ITK prints "No Series were found" to stderr for any other folder: asked quietly
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _shown(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _folder_name(p: Path) -> str:
    """A DICOM series folder's case name: its own name, also when given as '.', './' or '..'
    (whose Path.name is '' or '..')."""
    name = Path(os.path.abspath(p)).name
    if not name:
        raise ConfigError(f"--images {str(p)!r}: a DICOM series needs a folder with a name "
                          "(its case is named after it), not the file system's root")
    return name


def check_groups(images: list[Image]) -> None:
    """For a run that reads several channels: nnU-Net channel files must be 0, 1, ... without
    a gap (a ConfigError naming the case and the channels)."""
    for im in images:
        if im.missing:
            have = [_stem(f)[-4:] for f in im.files]
            raise ConfigError(
                f"--images: nnU-Net channel files of case {im.name!r} in {im.folder!r} have "
                f"channels {_shown(have)} but not {_shown(f'{k:04d}' for k in im.missing)} "
                f"({len(im.missing)} missing); give every channel file ({im.name}_0000, "
                f"{im.name}_0001, ...), or rename files that are not channels of one case")


def split_channel_groups(images: list[Image], log=print) -> list[Image]:
    """nnU-Net channel groups undone: one case per file, named by the whole file name. For a
    run that reads one channel per image: ``liver_0000``, ``liver_0001``, ... are then three
    scans, not one 3-channel case."""
    out = []
    for im in images:
        if len(im.files) > 1:
            log(f"--images: {', '.join(f.name for f in im.files[:3])}"
                f"{', ...' if len(im.files) > 3 else ''} read as {len(im.files)} separate "
                "images (the run reads one channel per image), not as nnU-Net channel files")
            out += [Image(_stem(f), [f], im.given) for f in im.files]
        else:
            out.append(im)
    _check_unique(out)
    if len(out) != len(images):  # the count said before the split was the groups'
        log(f"{len(out)} image(s) to predict")
    return out


def image_case_names(files) -> list[str]:
    """The case name of each of ``files`` as predict names it when they are given together to
    a one-channel or classification run (:func:`find_images`, then
    :func:`split_channel_groups`): the file name without its ending (a DICOM series folder: its
    name), except a lone nnU-Net channel file ``<case>_0000`` (no other ``<case>_XXXX`` file of
    its folder among ``files``), which is the case ``<case>``. Names are not made unique here.
    evaluate names a classification dataset's images by it, so that its predictions.csv and
    predict's name an image alike."""
    files = [Path(f) for f in files]
    stems, keys = [], []
    for f in files:
        if f.is_dir():
            stems.append(Path(os.path.abspath(f)).name)
            keys.append(None)
            continue
        stem = _strip_ending(f.name)
        m = _CHANNEL.match(stem)
        stems.append(stem)
        keys.append((f.resolve().parent, m.group(1), m.group(2)) if m else None)
    members: dict = {}
    for k in keys:
        if k is not None:
            members[k[:2]] = members.get(k[:2], 0) + 1
    return [k[1] if k is not None and k[2] == "0000" and members[k[:2]] == 1 else stem
            for k, stem in zip(keys, stems)]


def _check_unique(images: list[Image]) -> None:
    """Each case name once: predictions are named by case."""
    first: dict = {}
    for im in images:
        if im.name in first:
            raise ConfigError(f"--images: case name {im.name!r} comes from two inputs, "
                              f"{str(first[im.name].files[0])!r} and {str(im.files[0])!r}; "
                              f"predictions are named by case (<case>.nii.gz): rename one, or "
                              "predict them separately")
        first[im.name] = im


def find_images(paths, log=print) -> list[Image]:
    """The cases of --images PATH [PATH ...] (see the module docstring), or a ConfigError
    naming the path: missing, not an image, a folder without images, a file given twice, a
    case name from two inputs (nnU-Net channel files with a gap: :func:`check_groups`, for a
    run that reads several channels)."""
    if not paths:
        raise ConfigError("predict needs --images PATH [PATH ...] (image files or folders)")
    found = []  # (file or DICOM folder, the argument it came from), in order
    for given in map(str, paths):
        if not given.strip():  # an unset "$VAR": Path('') is the current folder
            raise ConfigError("--images '': an empty path (give image files or folders)")
        p = Path(given)
        if not p.exists():
            raise ConfigError(f"--images {given!r}: no such file or folder")
        if p.is_file():
            if _ending(p.name) is None:
                raise ConfigError(f"--images {given!r} is not an image file (expected "
                                  f"{', '.join(FILE_ENDINGS)}, or a folder)")
            found.append((p, given))
            continue
        entries = [q for q in sorted(p.iterdir()) if not q.name.startswith(".")]
        files = [q for q in entries if q.is_file() and
                 (_ending(q.name) or "") in IMAGE_ENDINGS]
        if files:
            other = [q.name + ("/" if q.is_dir() else "") for q in entries if q not in files]
            log(f"--images {given}: {len(files)} image file(s)"
                + (f" (left out: {_shown(other)}; sub-folders are not searched)"
                   if other else ""))
            found += [(q, given) for q in files]
        elif _is_dicom_series(p):
            log(f"--images {given}: a DICOM series")
            found.append((p, given))
        else:
            held = _shown(q.name + ("/" if q.is_dir() else "") for q in entries) or "nothing"
            raise ConfigError(f"--images {given!r}: no image files in this folder (expected "
                              f"{', '.join(IMAGE_ENDINGS)}, or one DICOM series; sub-folders "
                              f"are not searched); it holds {held}")
    seen: dict = {}
    for p, given in found:
        r = p.resolve()
        if r in seen:
            raise ConfigError(f"--images: {str(p)!r} is given twice ({seen[r]!r} and "
                              f"{given!r}); name each image once")
        seen[r] = given
    return _cases(found, log)


def _cases(found, log) -> list[Image]:
    """Files -> cases: nnU-Net channel files of one folder grouped (a group is one whose
    ``_0000`` file is there; its channels must then be 0, 1, ... without a gap); names
    unique."""
    groups: dict = {}
    for p, given in found:
        m = _CHANNEL.match(_stem(p)) if p.is_file() else None
        if m:
            key = (p.resolve().parent, m.group(1))
            chans = groups.setdefault(key, {})
            k = int(m.group(2))
            if k in chans:  # e.g. a_0000.nii.gz and a_0000.nrrd
                raise ConfigError(f"--images: {str(chans[k][0])!r} and {str(p)!r} are both "
                                  f"channel {k:04d} of case {m.group(1)!r}; keep one")
            chans[k] = (p, given)
    groups = {key: chans for key, chans in groups.items() if 0 in chans}
    images, done = [], set()
    for p, given in found:
        m = _CHANNEL.match(_stem(p)) if p.is_file() else None
        key = (p.resolve().parent, m.group(1)) if m else None
        if key in groups:
            if key in done:
                continue
            done.add(key)
            chans = groups[key]
            # a gap is an error only for a run that reads several channels (check_groups):
            # for a one-channel run these files are separate scans (split_channel_groups)
            missing = tuple(k for k in range(max(chans) + 1) if k not in chans)
            images.append(Image(key[1], [chans[k][0] for k in sorted(chans)], chans[0][1],
                                str(key[0]), missing))
        else:
            images.append(Image(_folder_name(p) if p.is_dir() else _stem(p), [p], given))
    _check_unique(images)
    grouped = sum(len(im.files) > 1 for im in images)
    log(f"{len(images)} image(s) to predict"
        + (f" ({grouped} of them from nnU-Net channel files)" if grouped else ""))
    return images


def _datasets_around(out: Path) -> list:
    """The dataset folders --out is, or is a layout folder of (imagesTr/, labelsTr/, ...):
    itself or its parent, when a dataset layout is found there."""
    from med3d_ext.data import DataError
    from med3d_ext.data.layouts import detect_layout

    found = []
    for c in (out, out.parent):
        if not c.is_dir():
            continue
        try:
            detect_layout(c)
        except (DataError, OSError, ValueError):
            continue
        found.append(c)
    return found


def check_out(out, images) -> None:
    """Refuse an --out that is an input image or a folder holding one (its own, or a DICOM
    series folder): predictions there could overwrite inputs (a prediction <case>.nii.gz has
    its image's name), and a later predict of that folder would read them as images. Also
    refuse a dataset's own folders (its root, labelsTr/, ...), as evaluate does: a prediction
    named like a label file silently replaced it."""
    from .tasks import check_output_outside_data

    around = _datasets_around(Path(os.path.abspath(out)))
    if around:
        check_output_outside_data(out, around, "--out", "predictions (<case>.nii.gz)")
    o = {Path(os.path.abspath(out)), Path(out).resolve()}
    for im in images:
        for f in im.files:
            both = {Path(os.path.abspath(f)), f.resolve()}
            if o & both:
                raise ConfigError(f"--out {str(out)!r} is an input image; give a folder of "
                                  "its own for the predictions")
            folders = both if f.is_dir() else {q.parent for q in both}
            if o & folders:
                fix = Path(os.path.abspath(out))
                raise ConfigError(
                    f"--out {str(out)!r} is a folder of the input images (it holds "
                    f"{str(f)!r}); predictions (<case>.nii.gz) there could overwrite them or "
                    "be read as images by a later predict. Write to a folder of its own, e.g. "
                    f"--out {str(fix.parent / (fix.name + '-predictions'))!r}")


def predict(cfg: dict, dev: torch.device, fused: bool = False, log=print,
            explicit=()) -> dict:
    """Predict --images with run cfg["run"] (--checkpoint as in evaluate) into cfg["out"];
    returns the summary written to predictions.json."""
    from .evaluate import check_run_exists, checkpoint_choice, load_run

    started = time.time()
    which, named = checkpoint_choice(cfg, explicit, "predict")
    check_run_exists(cfg, which, named)
    if not cfg.get("out"):
        raise ConfigError("predict needs --out DIR (the folder for the predictions)")
    out = Path(cfg["out"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; predictions need a folder")
    images = find_images(cfg.get("images"), log)
    check_out(out, images)
    cfg, ckpt_path, ckpt = load_run(cfg, which, named)
    run_cfg = ckpt.get("config") or {}
    cfg = dict(cfg)
    # the run's window, input channel and window overlap, unless given (as evaluate does: the
    # same voxels for the same image)
    for key in ("patch", "channel", "overlap"):
        if key not in explicit and run_cfg.get(key) is not None:
            cfg[key] = run_cfg[key]
    if "patch" in explicit and run_cfg.get("patch") is not None \
            and list(cfg["patch"]) != list(run_cfg["patch"]):
        warnings.warn(f"--patch {list(cfg['patch'])}: the run was trained on patches of "
                      f"{list(run_cfg['patch'])}; predictions at another size can differ "
                      "(a classification run sees each image resized to it)", stacklevel=2)
    task = ckpt["arch"].get("task")
    if task not in ("segmentation", "classification", "pretrain"):
        raise CheckpointError(f"{str(ckpt_path)!r}: a {task!r} checkpoint; predict takes "
                              "segmentation, classification and pretraining runs")
    from .cli import make_output_dir

    made = not out.exists()
    make_output_dir(out, "--out")
    # an earlier predict's summary in this folder would describe this run's predictions if it
    # stopped before its own: gone first (an interrupted run leaves no predictions.json)
    for stale in ("predictions.json", "predictions.csv"):
        (out / stale).unlink(missing_ok=True)
    try:
        summary = {"command": "predict", "run": str(cfg["run"]),
                   "checkpoint": str(Path(ckpt_path).resolve()), "step": ckpt.get("step"),
                   "task": task, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                          time.localtime(started)),
                   "images": [str(p) for p in cfg["images"]]}
        if task == "classification":
            summary = _predict_cls(cfg, ckpt, images, out, dev, fused, log, summary)
        else:
            summary = _predict_seg(cfg, ckpt, ckpt_path, images, out, dev, fused, log, summary)
    except BaseException:
        # refused or interrupted before any prediction: no empty folder left to puzzle over
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    summary["seconds"] = round(time.time() - started, 3)
    from .evaluate import write_json

    write_json(out / "predictions.json", summary)
    return summary


def _settings(cfg, dev, fused, window, **more) -> dict:
    return {"patch": list(window), "device": str(dev), "fused": bool(fused), **more}


def _predict_seg(cfg, ckpt, ckpt_path, images, out, dev, fused, log, summary) -> dict:
    from med3d_ext.data import Case, DataError, Dataset, preprocess, save_nifti
    from med3d_ext.data.io import read_header
    from tqdm.auto import tqdm

    from .evaluate import (_load_model, _tta_axes, _window_bar, amp_context, predict_case,
                           recipe_note, training_recipe, warn_other_channel)
    from .tasks import input_channel, preprocess_options

    arch = ckpt["arch"]
    if arch["task"] == "pretrain":
        heads = list(arch["heads"])
        head = cfg.get("head") or (heads[0] if len(heads) == 1 else None)
        if head not in heads:
            what = f"none is named {head!r} (--head)" if head else "pick one with --head"
            raise ConfigError(f"this pretraining run has heads {heads}; {what}")
        n_cls, rec_key = int(arch["heads"][head]), head
    else:
        head, n_cls, rec_key = "conv_seg", int(arch["num_classes"]), None
    rec, src = training_recipe(ckpt, ckpt_path, rec_key)
    mirror = _tta_axes(cfg)  # checked before any image is read
    skip = bool(cfg.get("skip_bad"))
    channels = list(rec["channels"])
    if len(channels) == 1:
        images = split_channel_groups(images, log)
    else:
        check_groups(images)
    # the input channel among the run's (a Dataset picks it as the preprocessed one does),
    # before any image is read
    runs = Dataset(Path("."), "the run", "files", channels, None, [])
    ch = input_channel(runs, cfg.get("channel"), lenient=arch["task"] == "pretrain")
    trained = input_channel(runs, (ckpt.get("config") or {}).get("channel"),
                            lenient=arch["task"] == "pretrain")
    warn_other_channel(cfg.get("channel"), channels, ch, trained, "predicting")
    good, problems = [], []
    for im in images:  # headers: unreadable files and wrong channel counts, before any work
        try:
            heads = [read_header(f) for f in im.files]
            for f, (_, shape, _) in zip(im.files, heads):
                if f.is_file() and _ending(f.name) == ".dcm" and min(shape) == 1:
                    raise DataError(f, f"one 2-D DICOM slice ({'x'.join(map(str, shape))}); "
                                       "give the folder of its series to predict the volume")
            n = sum(int(h[2]) for h in heads)
            if n != len(channels):
                raise DataError(im.files[0], _channel_problem(im, n, channels, src))
            good.append(im)
        except DataError as e:  # bad data: exit status 1 (as in evaluate and training), the
            if not skip:  # file named; --skip-bad skips it
                raise
            problems.append(str(e))
    if not good:
        raise DataError("--images", f"no image left to predict (--skip-bad skipped all "
                                    f"{len(images)}): " + "; ".join(problems))
    _say_existing(out, [im.name for im in good])
    log(f"preprocessing {len(good)} image(s) with the run's training recipe "
        f"({recipe_note(rec)})")
    by_name = {im.name: im for im in good}
    tmp = Path(tempfile.mkdtemp(prefix="med3d_ext-predict-"))
    try:
        # the images as a dataset of their own (channels named as the run's, so that CT
        # channels are clipped to the run's range), preprocessed as evaluate --split test does
        ds = Dataset(root=tmp, name="--images", layout="files", channels=channels, labels=None,
                     cases=[Case(im.name, list(im.files)) for im in good], problems=problems,
                     source=tmp)
        try:
            pre = preprocess(ds, tmp / "cache", target_spacing=rec["target_spacing"],
                             ct_clip=rec["ct_clip"], **preprocess_options(cfg))
        except DataError as e:
            if Path(e.path) == tmp:  # "every case is bad", over several lines
                raise DataError("--images", "no image could be read (--skip-bad skipped all "
                                f"{len(images)}): " + "; ".join(
                                    ln.strip() for ln in e.problem.splitlines()[1:])) from None
            raise
        skipped = list(pre.info.get("problems") or [])
        model = _load_model(ckpt, dev, fused)
        predictor = (lambda x: model.forward_head(x, head)) if arch["task"] == "pretrain" \
            else model
        window, ctx = tuple(cfg["patch"]), amp_context(cfg["amp"], dev)
        if mirror:
            log(f"mirroring TTA: each window predicted {2 ** len(mirror)} times (flipped along "
                f"axes {list(mirror)}) and the probabilities averaged")
        tta_note = f", TTA x{2 ** len(mirror)}" if mirror else ""
        cases_bar = tqdm(total=len(pre.names), unit="case", desc="predict", dynamic_ncols=True,
                         disable=bar_disable(cfg.get("progress", True)))
        bar, tick = _window_bar(cfg)
        rows = []
        for i, case in enumerate(pre.names):
            bar.set_description(f"{case} ({i + 1}/{len(pre.names)}{tta_note})")
            t0 = time.perf_counter()
            pred, affine, meta = predict_case(pre, i, ch, predictor, window, cfg, dev, ctx,
                                              tick, mirror)
            path = save_nifti(pred, affine, out / f"{case}.nii.gz")  # atomic
            rows.append({"case": case, "files": [os.path.abspath(f) for f in by_name[case].files],
                         "prediction": str(path), "shape": [int(v) for v in pred.shape],
                         "labels_present": _present(pred),
                         "seconds": round(time.perf_counter() - t0, 3)})
            cases_bar.update()
            with tqdm.external_write_mode():  # the case's line above the bars
                log(f"  {case}: {path.name} {'x'.join(map(str, pred.shape))} (classes "
                    f"{rows[-1]['labels_present']})")
        bar.close()
        cases_bar.close()
    finally:  # also on Ctrl-C: no preprocessed copy of the images is left behind
        shutil.rmtree(tmp, ignore_errors=True)
    summary.update({
        "head": head, "num_classes": n_cls,
        "settings": _settings(cfg, dev, fused, window, amp=cfg["amp"], overlap=cfg["overlap"],
                              sw_batch_size=cfg["sw_batch_size"], tta=bool(mirror),
                              tta_axes=list(mirror), channel=channels[ch]),
        "preprocessing": dict(rec, source=src), "skipped": skipped, "cases": rows})
    log(f"{len(rows)} prediction(s) as <case>.nii.gz in {out} (each image's own grid and "
        f"affine); summary in {out / 'predictions.json'}"
        + (f"; {len(skipped)} image(s) skipped as bad" if skipped else ""))
    return summary


def _present(pred) -> list[int]:
    """The classes a prediction holds (a quick look for an empty one): labels are small
    non-negative integers, so a bincount (np.unique sorts every voxel)."""
    return np.flatnonzero(np.bincount(pred.ravel().astype(np.int64))).tolist()


def _say_existing(out: Path, names) -> None:
    """Warn when --out already holds NIfTI files: the ones named like this run's cases are
    replaced, the others stay beside the new predictions (predictions.json lists this run's
    only)."""
    old = sorted(q.name for q in out.glob("*.nii.gz"))
    if not old:
        return
    mine = {f"{n}.nii.gz" for n in names}
    replaced = [q for q in old if q in mine]
    kept = [q for q in old if q not in mine]
    parts = ([f"{len(replaced)} will be replaced by this run's ({_shown(replaced)})"]
             if replaced else []) + ([f"{len(kept)} from elsewhere stay beside them "
                                      f"({_shown(kept)}; predictions.json lists this run's "
                                      "only)"] if kept else [])
    warnings.warn(f"--out {str(out)!r} already holds {len(old)} .nii.gz file(s): "
                  + "; ".join(parts), stacklevel=3)


def _channel_problem(im: Image, n: int, channels, src) -> str:
    k = len(channels)
    files = f"{im.name}_0000 .. {im.name}_{k - 1:04d}" if k > 1 else im.name
    return (f"has {n} channel(s), but the run was trained on {k} ({', '.join(channels)}; {src})"
            + (f"; give the image with every channel (one 4-D file, or nnU-Net channel files "
               f"{files})" if k > 1 else "; give a single-channel image"))


def _predict_cls(cfg, ckpt, images, out, dev, fused, log, summary) -> dict:
    from med3d_ext.data import DataError
    from tqdm.auto import tqdm

    from .evaluate import (_load_model, _write_csv, class_label, classify_image, cls_columns,
                           cls_fields, cls_order, warn_cls_tta)

    warn_cls_tta(cfg)

    order = cls_order(ckpt)
    class_names = dict(ckpt.get("class_names") or {})
    # a classification run reads one image file per case (--channel picks the channel of a
    # multi-channel file)
    images = split_channel_groups(images, log)
    from med3d_ext.data.io import read_header

    good, problems = [], []
    for im in images:  # headers first, as for segmentation: a bad file found after an hour of
        try:           # work cost every result (nothing was written)
            n = int(read_header(im.files[0])[2])
            if n > 1 and cfg.get("channel") is None:
                warnings.warn(f"{im.files[0]}: {n} channels; the classification run reads one: "
                              "channel 0 (--channel INDEX picks another)", stacklevel=2)
            good.append(im)
        except DataError as e:
            if not cfg.get("skip_bad"):
                raise
            problems.append(str(e))
    images = good
    model = _load_model(ckpt, dev, fused)
    window = tuple(cfg["patch"])
    rows = []
    bar = tqdm(images, unit="case", desc="predict", dynamic_ncols=True,
               disable=bar_disable(cfg.get("progress", True)))
    for im in bar:
        try:
            prob = classify_image(model, im.files[0], window, cfg.get("channel"), dev)
        except DataError as e:
            if not cfg.get("skip_bad"):
                raise
            problems.append(str(e))
            continue
        rows.append({"case": im.name, "file": os.path.abspath(im.files[0]),
                     **cls_fields(prob, order, class_names)})
    bar.close()
    if problems:
        warnings.warn(f"--images: skipped {len(problems)} bad image(s):\n  "
                      + "\n  ".join(problems), stacklevel=2)
    if not rows:
        raise DataError("--images", f"no image left to predict (--skip-bad skipped all "
                                    f"{len(images) + len(problems)}): " + "; ".join(problems))
    _write_csv(out / "predictions.csv", ["case", "file"] + cls_columns(order, class_names),
               rows)
    for r in rows:
        log(f"  {r['case']}: class {class_label(r['prediction'], class_names)} "
            f"({r['probability']:.3f})")
    summary.update({"classes": order, "class_names": class_names,
                    "settings": _settings(cfg, dev, fused, window, channel=cfg.get("channel")),
                    "skipped": problems, "cases": rows})
    log(f"{len(rows)} prediction(s) in {out / 'predictions.csv'}; summary in "
        f"{out / 'predictions.json'}" + (f"; {len(problems)} image(s) skipped as bad"
                                         if problems else ""))
    return summary
