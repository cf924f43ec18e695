"""The classification transfer job (``transfer --task cls``) and what evaluate and predict
share with it: ``labels.csv`` and ``classes.json`` reading, case names, the per-image volume
(RAS, a channel, clipped and z-scored, resized to the patch) and its seeded loader."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .loops import Job, TrainingError
from .tasks import (DataFolderError, _finish_model, _groups, _lrs, _pretrained_depth, _to_dev,
                    _transfer_weights, split_cases)

__all__ = ["read_cls_csv", "cls_class_names", "cls_case_names", "class_list", "load_cls_volume",
           "ClsLoader", "transfer_cls_job"]


def read_cls_csv(folder) -> tuple[list[Path], list[str]]:
    """``labels.csv`` (columns image,label; image paths relative to the folder; labels integer
    classes). Returns the image paths and the labels as canonical integer strings."""
    folder = Path(folder)
    p = folder / "labels.csv" if folder.is_dir() else folder
    if not p.is_file():  # the wrong folder for --task cls: the command line's (exit 2)
        raise ConfigError(f"--data {str(folder)!r}: classification needs a labels.csv with "
                          "columns image,label")
    with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(f, skipinitialspace=True)
        cols = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = cols
        rows = list(reader)
    if not {"image", "label"} <= set(cols) or not rows:
        raise DataFolderError(f"{str(p)!r}: expected a header line 'image,label' and rows, got "
                              f"columns {cols} and {len(rows)} row(s)")
    paths, labels, seen = [], [], {}
    for n, r in enumerate(rows, 2):  # line numbers as an editor shows them (header = 1)
        image, label = (r.get("image") or "").strip(), (r.get("label") or "").strip()
        if not image:
            raise DataFolderError(f"{str(p)!r} line {n}: empty image path")
        try:
            label = str(int(label))
        except ValueError:
            raise DataFolderError(f"{str(p)!r} line {n}: label {label!r} of {image!r} is not an "
                                  "integer class") from None
        if int(label) < 0:  # as med3d_ext.data's classification layout: classes are 0, 1, ...
            raise DataFolderError(f"{str(p)!r} line {n}: label {label} of {image!r} is negative;"
                                  " classes are 0, 1, ...")
        # the same file under another spelling (./images/a, images//a, an absolute path, a
        # symbolic link) is the same case: it was taken twice, into both the training and the
        # validation split, possibly with two labels
        key = os.path.realpath(p.parent / image)
        if key in seen:
            m, first = seen[key]
            same = "" if first == image else f" as {first!r} (the same file)"
            raise DataFolderError(f"{str(p)!r} line {n}: image {image!r} already listed on "
                                  f"line {m}{same}")
        seen[key] = (n, image)
        paths.append(p.parent / image)
        labels.append(label)
    missing = [str(x) for x in paths if not x.exists()]
    if missing:
        raise DataFolderError(f"{str(p)!r}: {len(missing)} image(s) do not exist, e.g. "
                              f"{missing[:3]}")
    declared, side = _declared_classes(p.parent)
    bad = sorted({int(v) for v in labels} - set(declared))
    if declared and bad:  # declared classes: a label outside them is a typo, not a new class
        raise DataFolderError(f"{str(p)!r}: labels {bad} are not declared in {side} "
                              f"(classes {sorted(declared)})")
    return paths, labels


_SAID_NO_CLASSES_KEY: set = set()


def _declared_classes(folder: Path) -> tuple[dict, Path]:
    """classes.json's {"classes": {index: name}} beside labels.csv, as {int: name} ({} when
    there is none), and the file's path."""
    side = folder / "classes.json"
    if not side.is_file():
        return {}, side
    from med3d_ext.data.layouts import _int_keyed, _load_json

    meta = _load_json(side)
    if "classes" not in meta and meta and all(str(k).strip().isdigit() for k in meta) \
            and str(side) not in _SAID_NO_CLASSES_KEY:  # once per file (it is read twice)
        _SAID_NO_CLASSES_KEY.add(str(side))
        warnings.warn(f"{side}: no 'classes' key, so no class names; the file is "
                      '{"classes": {"0": "name", ...}}', stacklevel=3)
    return _int_keyed(side, "classes", meta.get("classes", {})), side


def cls_class_names(folder, classes=None) -> dict[str, str]:
    """The names classes.json gives the classes of a classification folder (or labels.csv),
    keyed like the run's classes (canonical integer strings), only those in ``classes`` when
    given (a head's outputs); {} without classes.json."""
    folder = Path(folder)
    declared, _ = _declared_classes(folder if folder.is_dir() else folder.parent)
    names = {str(k): " ".join(str(v).split()) for k, v in sorted(declared.items())
             if v is not None}
    # one line each (a newline in a name broke the metrics table and the log); null or blank
    # is no name
    return {c: n for c, n in names.items() if n and (classes is None or c in classes)}


def cls_case_names(folder, paths) -> list[str]:
    """Case names of classification images: their paths relative to the labels.csv folder
    (base names collide in per-class folders such as benign/001.nii.gz, malignant/001.nii.gz)."""
    folder = Path(folder)
    root = folder if folder.is_dir() else folder.parent
    out = []
    for p in paths:
        try:
            out.append(Path(p).relative_to(root).as_posix())
        except ValueError:  # an absolute path in labels.csv
            out.append(str(p))
    return out


def class_list(labels) -> list[str]:
    u = sorted(set(labels))
    try:
        return sorted(u, key=float)
    except ValueError:
        return u


def load_cls_volume(path, patch, channel=None) -> torch.Tensor:
    """One image for classification: RAS, one channel, clipped to its 0.5-99.5 percentiles,
    z-scored, resized (trilinear) to the patch: (1, D, H, W) float32. The recipe is
    :func:`med3d_ext.data.classification_volume` (which ``med3d_ext.data.ClassificationSet``
    uses too); here ``--channel`` problems are the command line's (ConfigError, exit 2)."""
    from med3d_ext.data.preprocess import ChannelError, classification_volume

    if channel is not None and not str(channel).isdigit():
        raise ConfigError(f"--channel {channel!r}: classification images have no channel "
                          "names; give a channel index")
    try:
        return classification_volume(path, patch, None if channel is None else int(channel))
    except ChannelError as e:
        raise ConfigError(f"--channel {e.channel}: {e.path!r} has {e.count} channel(s)") \
            from None


class ClsLoader:
    """Counter-based classification batches (batch b depends only on seed and b): random
    cases, with random axis flips when ``flip`` (the classification task's augmentation,
    ``--augment``; ``--no-augment`` used to be ignored here)."""

    def __init__(self, images, labels, batch_size, seed, steps, flip: bool = True):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.steps = batch_size, int(seed), steps
        self.flip = bool(flip)
        self.position = 0

    def state_dict(self):
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, s):
        self.seed, self.position = int(s["seed"]), int(s["position"])

    def batch(self, b):
        rng = np.random.default_rng([self.seed, b])
        idx = rng.integers(len(self.images), size=self.batch_size)
        flips = rng.random((self.batch_size, 3)) < 0.5  # drawn either way: same cases
        if not self.flip:
            flips[:] = False
        imgs = []
        for i, f in zip(idx, flips):
            x = self.images[int(i)]
            dims = [d + 1 for d in range(3) if f[d]]
            imgs.append(x.flip(dims) if dims else x)
        return {"image": torch.stack(imgs), "label": self.labels[torch.from_numpy(idx)],
                "dataset_id": torch.zeros(self.batch_size, dtype=torch.int64),
                "case": [str(int(i)) for i in idx]}

    def __iter__(self):
        while self.position < self.steps:
            b = self.batch(self.position)
            self.position += 1
            yield b


def transfer_cls_job(cfg, data_dir, dev, rank: int, fused: bool, channels_last: bool) -> Job:
    from med3d_ext.data import DataError
    from med3d_ext.models import build_transfer_model

    depth, shortcut = _pretrained_depth(cfg)
    paths, labels = read_cls_csv(data_dir)
    names = cls_case_names(data_dir, paths)
    patch = tuple(cfg["patch"])
    imgs, bad = {}, []
    for n, p in zip(names, paths):
        try:
            imgs[n] = load_cls_volume(p, patch, cfg.get("channel"))
        except DataError as e:  # unreadable, NaN/Inf, ...: stop, or drop with --skip-bad
            if not cfg.get("skip_bad"):
                raise
            bad.append(str(e))
    if bad:
        warnings.warn(f"{data_dir}: skipped {len(bad)} bad image(s):\n  " + "\n  ".join(bad),
                      stacklevel=2)
        keep = [i for i, n in enumerate(names) if n in imgs]
        paths, labels, names = ([v[i] for i in keep] for v in (paths, labels, names))
        if not names:
            raise DataFolderError(f"{data_dir}: every image is bad")
    classes = class_list(labels)
    if len(classes) < 2:
        raise DataFolderError(f"{data_dir}: labels.csv has a single class {classes}; "
                              "classification needs at least two")
    y = torch.tensor([classes.index(v) for v in labels], dtype=torch.int64)
    tr, va = split_cases(names, cfg["val_fraction"])
    ti = [names.index(n) for n in tr]
    vi = [names.index(n) for n in va]
    weights = _transfer_weights(cfg)
    model, report = build_transfer_model("classification", depth, len(classes),
                                         weights=weights, shortcut_type=shortcut,
                                         dropout=cfg["dropout"], fused=fused,
                                         return_report=True)
    model = _finish_model(model, cfg, dev, channels_last)
    loader = ClsLoader([imgs[names[i]] for i in ti], y[ti], cfg["batch_size"],
                       cfg["seed"] * 1000003 + rank, cfg["epochs"] * cfg["steps"],
                       flip=bool(cfg.get("augment", True)))

    def prepare(batch, d):
        image = _to_dev(batch["image"], d)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        return {"image": image, "label": _to_dev(batch["label"], d)}

    def step_fn(net, inp):
        logits = net(inp["image"]).float()
        loss = F.cross_entropy(logits, inp["label"])

        def acc():
            return {"acc": float((logits.argmax(1) == inp["label"]).float().mean())}
        return loss, {}, acc

    val_x = torch.stack([imgs[names[i]] for i in vi]) if vi else None
    val_y = y[vi]

    def validate(m):
        if val_x is None:
            return {"score": float("nan")}
        with torch.no_grad():
            logits = torch.cat([m(val_x[i:i + cfg["sw_batch_size"]].to(dev)).float().cpu()
                                for i in range(0, len(val_x), cfg["sw_batch_size"])])
        if not bool(torch.isfinite(logits).all()):  # the argmax of NaN is class 0: a made-up
            raise TrainingError("validation: the model's output is not finite (NaN/Inf): its "
                                "weights overflow (the training diverged); stopped without "
                                "saving. Try lower learning rates (--lr / --head-lr), "
                                "--grad-clip, or --amp off")
        pred = logits.argmax(1)
        acc = float((pred == val_y).float().mean())
        return {"score": acc, "acc": acc}

    enc_lr, head_lr = _lrs(cfg)
    if cfg["freeze_epochs"] < 0:
        raise TrainingError("freeze_epochs must be >= 0")
    return Job("cls", model, model.arch, loader, prepare, step_fn, validate,
               _groups(model, enc_lr, head_lr), cfg["batch_size"], int(np.prod(patch)),
               freeze_epochs=cfg["freeze_epochs"],
               extra={"classes": classes,
                      "class_names": cls_class_names(data_dir, classes),
                      "split": {"cls": {"train": tr, "val": va}},
                      "datasets": [str(data_dir)],
                      "pretrained_load": str(report) if report else None})
