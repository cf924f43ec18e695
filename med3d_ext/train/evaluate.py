"""``evaluate``: whole-volume sliding-window inference of a trained run.

Segmentation: each case is preprocessed as in training (cache), predicted with Gaussian-
weighted sliding windows (logits upsampled trilinearly to the window before softmax), the
probabilities mapped back to the source file's grid (undoing resampling, crop and RAS
reorientation) and arg-maxed there; the prediction is written as ``<case>.nii.gz`` with the
source image's affine, and compared with the source label: Dice per class and HD95 in mm.
``--tta`` averages each window's probabilities over its mirrored copies (``--tta-axes``; see
``inference.py``); ``metrics.json`` records ``tta`` and ``tta_axes``.
Cases without a label (``--split test``: the dataset's ``imagesTs/``; unlabelled training
entries) are predicted, and their metrics are skipped and marked so (``"labelled": false``).
Test images are preprocessed with the run's recorded training recipe (target spacing, CT clip
range; see ``PreprocessedDataset.recipe``), never with statistics of the test images.
Classification runs write ``predictions.csv`` (each image named as predict names it, with its
file, label and every class's probability: :func:`cls_table_names`) and report
accuracy, balanced accuracy, the confusion matrix, per-class sensitivity / specificity /
precision and ROC AUC (``metrics.classification_metrics``).
``predict`` (predict.py: image files in no dataset layout) reuses the checkpoint choice, the
training recipe, the per-case prediction (``predict_case``) and the classification helpers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._args import bar_disable
from .checkpoint import CheckpointError, atomic_write, find_checkpoint, load_checkpoint
from .config import ConfigError, load_config
from .inference import sliding_window_probs
from .loops import autocast_dtype
from .metrics import classification_metrics, dice_per_class, hd95, nanmean

__all__ = ["evaluate", "format_table", "format_cls_table"]


def _load_model(ckpt, dev, fused):
    from med3d_ext.models import build_model

    model = build_model(ckpt["arch"], fused=fused)
    model.load_state_dict(ckpt["state_dict"])
    model = model.to(dev).eval()
    if fused:  # inference only: BatchNorm folded into the convs, one conv + bias/ReLU epilogue
        from med3d_ext.nn import fold_bn  # a layer (nothing here saves this model's state)

        fold_bn(model)
    return model


def _split_filter(names, ckpt, split: str, key: str | None):
    if split in ("all", "test"):  # test: every case of the test folder
        return list(names)
    if split not in ("train", "val"):
        raise ConfigError(f"split: expected all, train, val or test, got {split!r}")
    sp = ckpt.get("split") or {}
    if key not in sp:
        raise ConfigError(f"--split {split}: the run holds no split for dataset {key!r} "
                          f"(it has {sorted(sp)}); use --split all")
    recorded = list(sp[key][split])
    have = set(names)
    missing = [n for n in recorded if n not in have]
    if missing and len(missing) == len(recorded):
        raise ConfigError(f"--split {split}: none of the run's {len(recorded)} {split} case(s) "
                          f"of {key!r} is in this folder (e.g. {missing[:3]}); is it the data "
                          "the run was trained on? (--split all scores every case here)")
    if missing:  # a part of the split scored as if it were all of it
        warnings.warn(f"--split {split}: {len(missing)} of the run's {len(recorded)} {split} "
                      f"case(s) of {key!r} are not in this folder ({missing[:5]}"
                      f"{', ...' if len(missing) > 5 else ''}); scoring the "
                      f"{len(recorded) - len(missing)} that are", stacklevel=2)
    keep = set(recorded)
    return [n for n in names if n in keep]


def evaluate(cfg: dict, dev: torch.device, fused: bool = False, log=print,
             explicit=()) -> dict:
    """Evaluate run cfg["run"] on cfg["data"][0]; predictions and metrics go to cfg["out"].
    The window (patch), input channel and cache come from the run's configuration unless
    given explicitly (keys in ``explicit``)."""
    which, named = checkpoint_choice(cfg, explicit, "evaluate")
    check_run_exists(cfg, which, named)
    if not cfg.get("data"):
        raise ConfigError("evaluate needs --data DIR (a raw dataset folder)")
    from .tasks import (check_cache_outside_data, check_output_outside_data, dataset_folders,
                        resolve_data_dirs)

    data_dir = resolve_data_dirs(cfg["data"], "evaluate")[0]
    folders = dataset_folders([data_dir])  # (evaluate always writes: --out is required)
    check_output_outside_data(cfg.get("out"), folders, "--out", "predictions (<case>.nii.gz)")
    cfg, ckpt_path, ckpt = load_run(cfg, which, named)
    run_cfg = ckpt.get("config") or {}
    cfg = dict(cfg)
    # overlap too: it changes the predictions (validation chose best.pt with the run's)
    for key in ("patch", "channel", "cache", "overlap"):
        if key not in explicit and run_cfg.get(key) is not None:
            cfg[key] = run_cfg[key]
    # after the run's own cache is merged in: given now, refused; the run's, said
    check_cache_outside_data(cfg.get("cache"), folders, refuse="cache" in explicit)
    out = Path(cfg["out"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; predictions need a folder")
    from .._args import unwritable_folder

    why = unwritable_folder(out)  # said now, not after preprocessing; created once all checks pass
    if why:
        raise ConfigError(f"--out {str(out)!r}: {why}")
    model = _load_model(ckpt, dev, fused)
    window = tuple(cfg["patch"])
    ctx = amp_context(cfg["amp"], dev)
    if ckpt["arch"]["task"] == "classification":
        if cfg["split"] == "test":
            raise ConfigError("--split test predicts a segmentation dataset's test images "
                              "(imagesTs/); a classification run reads the images to predict "
                              "from a labels.csv (--split all)")
        return _evaluate_cls(cfg, ckpt, ckpt_path, model, data_dir, out, dev, window, log)
    return _evaluate_seg(cfg, ckpt, ckpt_path, model, data_dir, out, dev, window, ctx, log)


def amp_context(amp: str, dev: torch.device):
    """A context factory for the forwards of inference: autocast as --amp says (auto: bf16 on
    a GPU, off on the CPU), else plain no_grad."""
    dtype = autocast_dtype(amp, dev)
    return (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype else torch.no_grad


def checkpoint_choice(cfg: dict, explicit, command: str) -> tuple[str, bool]:
    """``(which, named)`` from --run / --checkpoint, checked before anything is read: which is
    best, last or a checkpoint file (named); ``command`` names the command in the messages."""
    which = str(cfg.get("checkpoint") or "best")
    named = which not in ("best", "last")  # --checkpoint FILE
    if named and not Path(which).is_file():
        # a typo ("bset") used to fall back to best.pt silently, and a path was never read
        raise ConfigError(f"--checkpoint {which!r}: expected best, last or a checkpoint file, "
                          "and there is no such file")
    if not cfg.get("run") and not named:
        raise ConfigError(f"{command} needs --run RUN (a run folder or checkpoint)")
    if cfg.get("run") and Path(cfg["run"]).is_file() and "checkpoint" in explicit:
        # --run names a checkpoint file: a --checkpoint naming another one was ignored
        chosen = Path(which) if named else Path(cfg["run"]).parent / f"{which}.pt"
        if chosen.resolve() != Path(cfg["run"]).resolve():
            raise ConfigError(f"--run {cfg['run']!r} names a checkpoint file, and --checkpoint "
                              f"{which} another ({chosen}); give the run folder with "
                              "--checkpoint best|last, or the one file")
    return which, named


def warn_other_channel(given, channels, ch: int, trained: int, doing: str) -> None:
    """--channel picking another input channel than the run's: allowed (a user may mean it),
    but never silently."""
    if ch != trained:
        warnings.warn(f"--channel {given!r}: the run was trained on channel "
                      f"{channels[trained]!r}; {doing} from {channels[ch]!r}, which the model "
                      "never saw", stacklevel=3)


def check_run_exists(cfg: dict, which: str, named: bool) -> None:
    """A --run that is not there is an option error (exit 2, as a missing --checkpoint FILE),
    said before any data is read."""
    if not named:
        try:
            find_checkpoint(cfg["run"], which)
        except CheckpointError as e:
            raise ConfigError(f"--run: {e}") from None


def load_run(cfg: dict, which: str, named: bool) -> tuple[dict, Path, dict]:
    """The checkpoint that :func:`checkpoint_choice` picked, loaded and checked against --run
    and --head: ``(cfg with "run" set, checkpoint path, checkpoint)``."""
    ckpt_path = Path(which) if named else find_checkpoint(cfg["run"], which)
    if not cfg.get("run"):
        cfg = dict(cfg, run=str(ckpt_path))
    ckpt = load_checkpoint(ckpt_path)
    _check_finite_weights(ckpt_path, ckpt)
    if named:
        _check_checkpoint_of_run(cfg.get("run"), ckpt_path, ckpt)
    if cfg.get("head") and ckpt["arch"]["task"] != "pretrain":  # else ignored: one head
        raise ConfigError(f"--head {cfg['head']!r}: only a pretraining run has named heads; "
                          f"this {ckpt['arch']['task']} run has one (drop --head)")
    return cfg, ckpt_path, ckpt


def _check_finite_weights(ckpt_path, ckpt) -> None:
    """A diverged model's weights (NaN/Inf, e.g. saved by an earlier version's training) would
    predict NaN logits, whose argmax is background everywhere: Dice 0 and empty label files
    without a word."""
    bad = [k for k, v in (ckpt.get("state_dict") or {}).items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} has non-finite (NaN/Inf) weights "
                              f"in {len(bad)} tensor(s) ({shown}): its training diverged; use "
                              "an earlier checkpoint, or train again with lower learning rates")


def _check_checkpoint_of_run(run, ckpt_path, ckpt) -> None:
    """--run FOLDER with --checkpoint FILE of another kind of run (a classification
    checkpoint with a segmentation run) is a mix-up: it was evaluated as the file's kind and
    failed on the data with a message about labels.csv."""
    if not run or not Path(run).is_dir() or not (Path(run) / "config.yaml").is_file():
        return
    try:
        saved = load_config(Path(run) / "config.yaml") or {}
    except Exception:  # noqa: BLE001 - an unreadable config.yaml: nothing to compare with
        return
    run_kind = {"seg": "segmentation", "cls": "classification"}.get(saved.get("task"),
                                                                     "pretrain")
    if ckpt["arch"].get("task") != run_kind:
        raise ConfigError(f"--checkpoint {str(ckpt_path)!r} is a {ckpt['arch'].get('task')} "
                          f"checkpoint, but --run {str(run)!r} is a {run_kind} run; give the "
                          "checkpoint of that run (--checkpoint best|last) or drop --run")


def training_recipe(ckpt: dict, ckpt_path, head: str | None) -> tuple[dict, str]:
    """The preprocessing recipe (target spacing, CT clip range) of the data that ``head`` of
    the checkpoint was trained on, and where it was read: the checkpoint's ``preprocessing``
    record (runs of this version), else ``preprocessing.json`` beside the checkpoint."""
    ckpt_path = Path(ckpt_path)
    recs, src = ckpt.get("preprocessing"), f"checkpoint {str(ckpt_path)!r}"
    side = ckpt_path.parent / "preprocessing.json"
    if not recs and side.is_file():
        src = str(side)
        try:
            recs = json.loads(side.read_text())
        except ValueError as e:
            raise CheckpointError(f"{src}: not valid JSON ({e})") from None
    if not recs:
        raise CheckpointError(
            f"{src} records no training preprocessing (a run from before med3d_ext saved it) "
            f"and {str(side)!r} does not exist; --split test and predict need the training "
            "data's target spacing and CT clip range. Retrain the run, or write that file as "
            '{"<dataset>": {"channels": [...], "target_spacing": [x, y, z], "ct_clip": '
            '[[lo, hi], ...] or null}} with the values of the training cache\'s cache.json')
    if head in recs:
        rec = recs[head]
    elif len(recs) == 1:  # a transfer run: one dataset, whatever the test folder is called
        rec = next(iter(recs.values()))
    else:
        raise ConfigError(f"{src} records the preprocessing of {sorted(recs)}, not of head "
                          f"{head!r}; pick the head with --head")
    missing = [k for k in ("channels", "target_spacing", "ct_clip") if k not in rec]
    if missing:
        raise CheckpointError(f"{src}: the preprocessing record of {head!r} lacks {missing}")
    return rec, src


def _check_recipe(pre, rec, src, data_dir, split):
    """Test images must have the training data's channels. Labelled splits keep their own
    cache's statistics (as validation during training did): warn when those differ from the
    run's (another dataset, or one changed since training)."""
    have = [str(c).lower() for c in pre.channels]
    if split == "test" and have != [str(c).lower() for c in rec["channels"]]:
        raise ConfigError(f"--data {str(data_dir)!r} has channels {pre.channels}, but the run "
                          f"was trained on {rec['channels']} ({src})")
    if split == "test":
        return
    mine = pre.recipe()
    same_sp = np.allclose(mine["target_spacing"], rec["target_spacing"], rtol=1e-3)
    same_clip = (mine["ct_clip"] is None) == (rec["ct_clip"] is None) and (
        mine["ct_clip"] is None or np.allclose(
            [c or [0, 0] for c in mine["ct_clip"]], [c or [0, 0] for c in rec["ct_clip"]]))
    if not (same_sp and same_clip):
        warnings.warn(f"--data {str(data_dir)!r} is preprocessed with its own statistics "
                      f"(spacing {mine['target_spacing']} mm, CT clip {mine['ct_clip']}), not "
                      f"the run's training ones ({rec['target_spacing']} mm, CT clip "
                      f"{rec['ct_clip']}); --split test uses the training ones", stacklevel=3)


def _evaluate_seg(cfg, ckpt, ckpt_path, model, data_dir, out, dev, window, ctx, log):
    from med3d_ext.data import read_volume, save_nifti
    from med3d_ext.data.io import ras_to_source

    from .tasks import check_classes, head_name, input_channel, open_preprocessed

    arch = ckpt["arch"]
    split = cfg["split"]
    rec = src = None
    if split == "test":
        from med3d_ext.data import load_dataset

        # the dataset's name picks the head of a pretraining run, as for labelled splits
        ds_name = load_dataset(data_dir, split="test").name if arch["task"] == "pretrain" \
            else None
        want = (cfg.get("head") or head_name(ds_name)) if ds_name is not None else None
        rec, src = training_recipe(ckpt, ckpt_path, want)
        pre = open_preprocessed(data_dir, cfg, split="test", recipe=rec)
    else:
        pre = open_preprocessed(data_dir, cfg)
    if pre.targets is not None:  # it predicted every image and scored none ("no label")
        raise ConfigError(f"--data {str(data_dir)!r} is a classification folder (labels.csv)"
                          f", and this run segments; evaluate a classification run on it, "
                          "or give a segmentation dataset")
    name = head_name(pre.name)
    if arch["task"] == "pretrain":
        head = cfg.get("head") or name
        if head not in arch["heads"]:
            what = "--head" if cfg.get("head") else "the dataset's name"
            raise ConfigError(f"this pretraining run has heads {list(arch['heads'])}; none is "
                              f"named {head!r} ({what}); pick one with --head")
        n_cls = arch["heads"][head]
        predictor = lambda x: model.forward_head(x, head)  # noqa: E731
    else:
        head, n_cls, predictor = "conv_seg", arch["num_classes"], model
    n_data = int(pre.num_classes)
    check_classes(pre.name, n_data, int(n_cls), head)
    # classes 1..scored-1 have ground truth here; a head with more classes than the dataset
    # declares (another dataset's model, or --head naming another dataset's head) predicts
    # classes that can only be wrong: kept in the files, counted as spurious, not scored
    # (a dataset that declares no labels, a MedicalNet list, has its count from the label
    # values it holds: every class of the head is scored there, as before)
    scored = min(int(n_cls), n_data) if pre.labels else int(n_cls)
    if scored < n_cls:
        log(f"warning: head {head!r} predicts {n_cls} classes but dataset {pre.name!r} declares "
            f"{n_data} (labels 0..{n_data - 1}): classes {n_data}..{n_cls - 1} have no ground "
            "truth here. They stay in the predicted files, are counted as spurious where "
            "predicted, and are left out of Dice and HD95. Is this the model (or --head) for "
            "this dataset?")
    if rec is None and ckpt.get("preprocessing"):
        rec, src = training_recipe(ckpt, ckpt_path, head if arch["task"] == "pretrain" else None)
    if rec is not None:
        _check_recipe(pre, rec, src, data_dir, split)
    names = _split_filter(pre.names, ckpt, split, name)
    ch = input_channel(pre, cfg.get("channel"), lenient=arch["task"] == "pretrain")
    trained = input_channel(pre, (ckpt.get("config") or {}).get("channel"),
                            lenient=arch["task"] == "pretrain")
    warn_other_channel(cfg.get("channel"), pre.channels, ch, trained, "evaluating")
    if split == "test":
        log(f"{len(names)} test image(s) of {str(data_dir)!r}, preprocessed with the run's "
            f"training recipe ({recipe_note(rec)})")
    mirror = _tta_axes(cfg)
    _open_output(out, [f"{n}.nii.gz" for n in names], "metrics.json")
    tta_note = f", TTA x{2 ** len(mirror)}" if mirror else ""  # the bar counts every flip
    if mirror:
        log(f"mirroring TTA: each window predicted {2 ** len(mirror)} times (flipped along axes "
            f"{list(mirror)}) and the probabilities averaged")
    rows = []
    bar, tick = _window_bar(cfg)
    for i, case in enumerate(pre.names):
        if case not in names:
            continue
        bar.set_description(f"evaluate {case} ({len(rows) + 1}/{len(names)}{tta_note})")
        pred, affine, meta = predict_case(pre, i, ch, predictor, window, cfg, dev, ctx, tick,
                                          mirror)
        path = save_nifti(pred, affine, out / f"{case}.nii.gz")  # atomic, qform = sform
        row = {"case": case, "prediction": str(path), "labelled": bool(meta.get("label"))}
        if meta.get("label"):
            # read as training read it (NIfTI, NRRD/MHA, DICOM; a bad file is a DataError), in
            # the label file's stored voxel order, which is the prediction's
            lv = read_volume(meta["label"])
            gt = ras_to_source(lv.data[0], lv.ornt).astype(np.int64)
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
            dice = dice_per_class(pred, gt, n_cls)[:scored - 1]
            for c in range(1, scored):
                row[f"dice_{c}"] = dice[c - 1]
                row[f"hd95_{c}"] = hd95(pred == c, gt == c, spacing)
                # HD95 is NaN (left out of the means, as MONAI does) when one side lacks the
                # class: counted, so that a missed structure cannot pass for a good distance
                in_pred, in_gt = bool((pred == c).any()), bool((gt == c).any())
                row[f"missed_{c}"] = in_gt and not in_pred
                row[f"spurious_{c}"] = in_pred and not in_gt
            for c in range(scored, n_cls):  # no ground truth: any prediction is spurious
                row[f"spurious_{c}"] = bool((pred == c).any())
            row["dice"] = nanmean(dice)
            row["hd95"] = nanmean(row[f"hd95_{c}"] for c in range(1, scored))
        rows.append(row)
        with bar.external_write_mode():  # the case's line above the bar, not through it
            if row["labelled"]:
                log(f"  {case}: Dice {row.get('dice', float('nan')):.3f}  "
                    f"HD95 {row.get('hd95', float('nan')):.2f} mm")
            else:
                log(f"  {case}: no label, prediction only ({path.name})")
    bar.close()
    if not rows:
        raise ConfigError(f"--split {split}: no case of {str(data_dir)!r} to evaluate")
    n_lab = sum(r["labelled"] for r in rows)
    summary = {"run": str(cfg["run"]), "checkpoint": str(Path(ckpt_path).resolve()),
               "data": str(data_dir), "split": split, "head": head,
               "overlap": cfg["overlap"],
               # how the predictions were made: mirrored test-time augmentation, and its axes
               "tta": bool(mirror), "tta_axes": list(mirror),
               "num_classes": int(n_cls), "scored_classes": scored, "labelled_cases": n_lab,
               "unlabelled_cases": len(rows) - n_lab,
               # means over the labelled cases only; none labelled -> null
               "metrics_over": "labelled cases" if n_lab else "none (no case has a label)",
               "cases": rows}
    if split == "test":  # what the test images were preprocessed with
        summary["preprocessing"] = dict(rec, source=src)
    if pre.labels:  # the dataset's names of the classes whose Dice/HD95 the table reports
        summary["class_names"] = {str(c): str(pre.labels[c]) for c in range(1, scored)
                                  if c in pre.labels}
    for c in range(1, scored):
        summary[f"dice_{c}"] = nanmean(r.get(f"dice_{c}") for r in rows)
        summary[f"hd95_{c}"] = nanmean(r.get(f"hd95_{c}") for r in rows)
    for c in range(1, n_cls):
        if c < scored:
            summary[f"missed_{c}"] = sum(bool(r.get(f"missed_{c}")) for r in rows)
        summary[f"spurious_{c}"] = sum(bool(r.get(f"spurious_{c}")) for r in rows)
    summary["dice"] = nanmean(r.get("dice") for r in rows)
    summary["hd95"] = nanmean(r.get("hd95") for r in rows)
    _write(out, summary, rows)
    log(format_table(summary))
    # where the results are (the default --out is derived from the run's name)
    log(f"{len(rows)} prediction(s) as <case>.nii.gz in {out} (each case's original grid and "
        f"affine); metrics in {out / 'metrics.json'} and {out / 'metrics.csv'}")
    return summary


def _open_output(out: Path, mine, summary_name: str) -> None:
    """Create --out once every check has passed (a refused evaluation left an empty folder),
    and say what it already holds: an earlier evaluation's results, replaced (another run's,
    or another --checkpoint's: metrics.json names the checkpoint), and predictions of cases
    this one does not write (another --split), which stay beside the new ones."""
    from .cli import make_output_dir

    if out.is_dir():
        old = sorted(q.name for q in out.iterdir() if q.name.endswith(".nii.gz"))
        mine = set(mine)
        kept = [q for q in old if q not in mine]
        parts = []
        if (out / summary_name).exists():
            parts.append(f"an earlier evaluation's {summary_name}, replaced now")
        if kept:
            shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
            parts.append(f"{len(kept)} prediction(s) of cases this evaluation does not write "
                         f"({shown}), which stay beside the new ones")
        if parts:
            warnings.warn(f"--out {str(out)!r} already holds " + "; and ".join(parts)
                          + "; give another --out to keep results apart", stacklevel=3)
    make_output_dir(out, "--out")


def recipe_note(rec: dict) -> str:
    """A training recipe in words, for the log: target spacing and CT clip range."""
    clip = "per volume" if rec["ct_clip"] is None else ", ".join(
        "per volume" if c is None else f"[{c[0]:.1f}, {c[1]:.1f}]" for c in rec["ct_clip"])
    return f"spacing {[round(v, 3) for v in rec['target_spacing']]} mm, CT clip {clip}"


def predict_case(pre, i: int, ch: int, predictor, window, cfg, dev, ctx, tick, mirror):
    """Case i of a preprocessed dataset, predicted with sliding windows (channel ch, the
    options overlap / sw_batch_size of cfg, mirroring TTA over ``mirror``) and mapped back to
    its source file's grid: ``(labels (I, J, K), source affine, case metadata)``. ``evaluate``
    and ``predict`` share it, so that both give the same voxels for the same image."""
    case = pre.names[i]
    x, _, meta = pre.load_case(i, ch)
    try:
        with torch.no_grad(), ctx():
            probs = sliding_window_probs(
                torch.from_numpy(x)[None].to(dev), predictor, window,
                overlap=cfg["overlap"], sw_batch_size=cfg["sw_batch_size"],
                pad_value=pre.background_value(i, ch), progress=tick, mirror_axes=mirror)
    except torch.OutOfMemoryError as e:
        from .loops import TrainingError

        raise TrainingError(f"out of GPU memory in sliding-window inference of {case!r} "
                            f"(window {list(window)}, {cfg['sw_batch_size']} windows per "
                            "forward); use --sw-batch-size 1 or a smaller --patch") from e
    probs = probs[0].cpu()
    bad = int((~torch.isfinite(probs)).sum())
    if bad:  # its argmax would be background everywhere: a file of zeros, Dice 0, no word
        raise CheckpointError(f"case {case!r}: {bad} of {probs.numel()} output values of the "
                              "model are not finite (NaN/Inf): the checkpoint's weights overflow on "
                              "this input (a diverged training?); its prediction would be "
                              "meaningless")
    pred = _to_source(probs, meta)
    return pred, np.asarray(meta["orig_affine"], np.float64), meta


def _tta_axes(cfg) -> tuple:
    """The axes that --tta mirrors (--tta-axes), or () without --tta; checked before any case
    is predicted (a configuration built in Python skips the CLI's checks)."""
    from .inference import _mirror_axes

    return _mirror_axes(cfg.get("tta_axes", (0, 1, 2))) if cfg.get("tta") else ()


def _window_bar(cfg):
    """A progress bar of the sliding windows of the case being predicted (--progress, the
    default): a whole CT volume takes minutes on a CPU. With --tta it counts every flip's
    prediction of a window (sliding_window_probs' count). Returns (bar, progress callback)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=0, unit="window", leave=False, dynamic_ncols=True,
               disable=bar_disable(cfg.get("progress", True)))

    def tick(done, total):
        if bar.total != total:
            bar.reset(total=total)
        bar.update(done - bar.n)
    return bar, tick


def _to_source(probs: torch.Tensor, meta) -> np.ndarray:
    """(C, D, H, W) probabilities on the preprocessed grid -> labels in the source file's
    voxel grid and axis order (trilinear on probabilities, then argmax); uint8 unless the head
    has more than 256 classes (then int16/int32: never a wrapped class index)."""
    from med3d_ext.data import to_source_space
    from med3d_ext.data.preprocess import label_storage_dtype

    src = to_source_space(probs.numpy(), meta)  # (I, J, K, C), outside the crop: 0
    return np.argmax(src, -1).astype(label_storage_dtype(int(probs.shape[0]) - 1))


def warn_cls_tta(cfg) -> None:
    """--tta on a classification run: said, not silently ignored (a classifier sees each image
    once, whole, with no sliding windows to mirror)."""
    if cfg.get("tta"):
        warnings.warn("--tta: a classification run classifies each image once, whole; "
                      "mirroring test-time augmentation applies to segmentation runs only and "
                      "is not used here", stacklevel=2)


def _evaluate_cls(cfg, ckpt, ckpt_path, model, data_dir, out, dev, window, log):
    from med3d_ext.data import DataError

    from .classification import cls_case_names, cls_class_names, read_cls_csv

    warn_cls_tta(cfg)

    paths, labels = read_cls_csv(data_dir)
    classes = list(ckpt.get("classes") or [])
    unknown = sorted(set(labels) - set(classes), key=int)
    if classes and unknown:  # the classification analogue of check_classes
        raise ConfigError(f"{str(data_dir)!r}: labels.csv has classes {unknown} that the run's "
                          f"head does not predict (it was trained on {classes})")
    order = cls_order(ckpt)
    n_out = len(order)
    outside = sorted(set(labels) - set(order), key=int)
    if outside:  # a label no output stands for has no row in the confusion matrix
        raise ConfigError(f"{str(data_dir)!r}: labels.csv has classes {outside} that the run's "
                          f"head ({n_out} outputs: classes {order}) does not predict")
    # the run's class names (its classes.json); else the evaluated folder's
    folder_names = cls_class_names(data_dir, order)
    class_names = dict(ckpt.get("class_names") or folder_names)
    differ = sorted((c for c in set(class_names) & set(folder_names)
                     if class_names[c] != folder_names[c]), key=int)
    if differ:  # e.g. a swapped label convention: the labels may not mean what the run learnt
        pairs = "; ".join(f"{c}: {folder_names[c]!r} here, {class_names[c]!r} in the run"
                          for c in differ)
        warnings.warn(f"{str(data_dir)!r}: classes.json names class(es) {differ} differently "
                      f"from the run ({pairs}); predictions.csv uses the run's names",
                      stacklevel=2)
    cases = cls_case_names(data_dir, paths)  # the run's split records these
    names = _split_filter(cases, ckpt, cfg["split"], "cls")
    shown = cls_table_names(paths, cases)  # predictions.csv's, as predict names an image
    rows, probs, preds = [], [], []
    with torch.no_grad():
        for p, case, lab, name in zip(paths, cases, labels, shown):
            if case not in names:
                continue
            try:
                prob = classify_image(model, p, window, cfg.get("channel"), dev)
            except DataError as e:
                if not cfg.get("skip_bad"):
                    raise
                warnings.warn(f"skipped bad image: {e}", stacklevel=2)
                continue
            k = int(prob.argmax())
            label = {"label": lab, **({"label_name": class_names.get(lab, "")}
                                       if class_names else {})}
            rows.append({"case": name, "file": os.path.abspath(p), **label,
                         **cls_fields(prob, order, class_names)})
            probs.append(prob)
            preds.append(k)
    if not rows and names:  # bad data (exit status 1), as predict's "no image left"
        raise DataError(data_dir, f"--split {cfg['split']}: no case to evaluate (every image "
                                  "was skipped as bad)")
    if not rows:  # as the segmentation evaluation says it (an accuracy of nan on 0 cases)
        raise ConfigError(f"--split {cfg['split']}: no case of {str(data_dir)!r} to evaluate")
    acc = nanmean(float(r["label"] == r["prediction"]) for r in rows)
    fields = ["case", "file", "label"] + cls_columns(order, class_names)
    if class_names:
        fields.insert(3, "label_name")
    _open_output(out, [], "metrics.json")
    _write_csv(out / "predictions.csv", fields, rows)
    y = [order.index(r["label"]) for r in rows]
    pm = torch.stack(probs) if probs else torch.zeros(0, len(order))
    summary = {"run": str(cfg["run"]), "checkpoint": str(Path(ckpt_path).resolve()),
               "data": str(data_dir), "split": cfg["split"], "accuracy": acc,
               **classification_metrics(y, pm, order, preds), "class_names": class_names,
               "cases": rows}
    write_json(out / "metrics.json", summary)
    log(format_cls_table(summary))
    log(f"accuracy {acc:.3f} on {len(rows)} cases; predictions in {out / 'predictions.csv'}")
    return summary


def cls_table_names(paths, cases) -> list[str]:
    """The case names of a classification dataset's images in evaluate's predictions.csv and
    metrics.json: the names predict gives the same files (``predict.image_case_names``: the
    file name without its ending), so that the two commands' tables name an image alike
    (evaluate wrote the path under the folder, ``images/case_000.nii.gz``, and predict
    ``case_000``). Images whose names would collide (per-class folders: ``neg/001.nii.gz``,
    ``pos/001.nii.gz``) are named by their path under the folder without the ending
    (``neg/001``), else as ``cases`` (the run's split names: that path with its ending)."""
    from collections import Counter

    from .predict import _strip_ending, image_case_names

    names = image_case_names(paths)
    count = Counter(names)
    for i, n in enumerate(names):
        if count[n] > 1:
            names[i] = _strip_ending(cases[i])
    count = Counter(names)
    return [n if count[n] == 1 else c for n, c in zip(names, cases)]


def cls_order(ckpt) -> list[str]:
    """A classification head's outputs in order: the run's classes (a head wider than them,
    which no run of this version has, gets its extra outputs named by index)."""
    classes = list(ckpt.get("classes") or [])
    n_out = int(ckpt["arch"].get("num_classes") or len(classes))
    return classes + [str(k) for k in range(len(classes), n_out)]


def classify_image(model, path, window, channel, dev) -> torch.Tensor:
    """One image's class probabilities (K,) on the CPU: read and normalised as training read
    it (``load_cls_volume``: RAS, the channel, per-image clip and z-score, resized to the
    window). A bad file raises DataError naming it."""
    from .classification import load_cls_volume

    x = load_cls_volume(path, window, channel)[None].to(dev)
    with torch.no_grad():  # float64: a confident model's probabilities round to 1.0 later
        return torch.softmax(model(x).double(), 1)[0].cpu()


def cls_fields(prob: torch.Tensor, order, class_names=None) -> dict:
    """predictions.csv's columns of one image: the predicted class (and its name, when the run
    has ``class_names`` from a classes.json), its probability and every class's probability
    (``prob_<class>``: what ROC curves / AUC are computed from)."""
    k = int(prob.argmax())
    name = {"prediction_name": class_names.get(order[k], "")} if class_names else {}
    return {"prediction": order[k], **name, "probability": float(prob[k]),
            **{f"prob_{c}": float(v) for c, v in zip(order, prob.tolist())}}


def cls_columns(order, class_names=None) -> list[str]:
    """The cls_fields columns, in order."""
    return (["prediction"] + (["prediction_name"] if class_names else []) + ["probability"]
            + [f"prob_{c}" for c in order])


def class_label(c, class_names) -> str:
    """A class as tables and logs show it: ``1 (malignant)`` when it has a name, else ``1``."""
    name = (class_names or {}).get(str(c))
    return f"{c} ({name})" if name else str(c)


def _json_clean(v):
    """NaN -> null at any depth (json.dumps writes NaN, which is not JSON: strict readers, e.g.
    JavaScript's or jq's, refuse the file)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


def format_cls_table(summary) -> str:
    """A classification evaluation as a table: one line per class (cases, sensitivity,
    specificity, precision, one-vs-rest AUC), then accuracy, balanced accuracy and the AUC
    (what it averages), then why any value is undefined (nan)."""
    lines = [" | ".join(["class", "n", "sensitivity", "specificity", "precision", "AUC"])]
    for c in summary["confusion_matrix"]["classes"]:
        lines.append(" | ".join([class_label(c, summary.get("class_names")),
                                 str(summary["support"][c])] + [
            _fmt(summary[k][c], ".3f")
            for k in ("sensitivity", "specificity", "precision", "auc_per_class")]))
    lines.append(f"accuracy {_fmt(summary['accuracy'], '.3f')} | balanced accuracy "
                 f"{_fmt(summary['balanced_accuracy'], '.3f')} | AUC "
                 f"{_fmt(summary['auc'], '.3f')} ({summary['auc_averaging']})")
    lines += summary["notes"]
    return "\n".join(lines)


def _fmt(v, spec):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(summary) -> str:
    """One line per case and a mean line; an unlabelled case shows "no label" instead of
    metrics, and the mean line says how many labelled cases it averages. The "all classes"
    columns are the summary's ``dice`` / ``hd95`` (each case's mean over its classes; the mean
    line's is their mean over cases, which the per-class means do not give)."""
    n_all = summary["num_classes"]
    n = summary.get("scored_classes", n_all)  # the classes with ground truth: the columns
    names = summary.get("class_names") or {}
    cls = [f"{c} {names[str(c)]}" if str(c) in names else str(c) for c in range(1, n)]
    head = ["case"] + [f"Dice {c}" for c in cls] + [f"HD95 {c} (mm)" for c in cls] \
        + ["Dice all classes", "HD95 all classes (mm)"]
    lines = [" | ".join(head)]
    cases = summary["cases"]
    n_lab = summary.get("labelled_cases", len(cases))
    for r in cases + [dict(summary, case=f"mean ({n_lab} labelled)"
                           if n_lab != len(cases) else "mean", labelled=n_lab > 0)]:
        if not r.get("labelled", True):
            cells = [str(r["case"])] + ["no label"] * (2 * n)
        else:
            cells = [str(r["case"])] + [_fmt(r.get(f"dice_{c}"), ".3f") for c in range(1, n)] \
                + [_fmt(r.get(f"hd95_{c}"), ".2f") for c in range(1, n)] \
                + [_fmt(r.get("dice"), ".3f"), _fmt(r.get("hd95"), ".2f")]
        lines.append(" | ".join(cells))
    if n_lab < len(cases):
        lines.append(f"{len(cases) - n_lab} of {len(cases)} case(s) have no label: predicted "
                     "only, Dice and HD95 skipped")
    odd = [f"class {c}: {summary.get(f'missed_{c}', 0)} missed, "
           f"{summary.get(f'spurious_{c}', 0)} spurious"
           for c in range(1, n_all) if summary.get(f"missed_{c}") or summary.get(f"spurious_{c}")]
    if odd:
        lines.append("HD95 is undefined (nan, left out of the mean) where a class is in only one "
                     "of prediction and label: " + "; ".join(odd))
    return "\n".join(lines)


def _write(out: Path, summary, rows):
    write_json(out / "metrics.json", summary)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    _write_csv(out / "metrics.csv", keys, rows)


# Results are written atomically, as predictions are: a Ctrl-C or a full disk mid-write keeps
# the previous file (or none), never a torn one that a script would read as the results.
def _write_text(path: Path, text: str) -> None:
    # UTF-8 whatever the locale: class names and case names may be in any language
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, NaN as null at any depth, written atomically."""
    _write_text(path, json.dumps(_json_clean(obj), indent=1))


def _write_csv(path: Path, fields, rows) -> None:
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8",
                                                        newline=""))
