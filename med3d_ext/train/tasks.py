"""Jobs for the training engine: Med3D pretraining and segmentation transfer (classification
transfer: classification.py, which uses this module's helpers).

Data come from ``med3d_ext.data`` (preprocessing cache, counter-based multi-domain patch
sampler); models from ``med3d_ext.models``; the loss and augmentation through
``backends`` (the fused ops / GPU transforms when available).
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from .backends import augmenter, downsample_labels, resize_fn, seg_loss_fn
from .config import ConfigError
from .inference import sliding_window_probs
from .loops import Job, TrainingError
from .metrics import batch_dice, dice_per_class, nanmean

__all__ = ["DataFolderError", "resolve_data_dirs", "open_preprocessed", "split_cases",
           "subset", "head_name", "pretrain_job", "transfer_seg_job", "check_classes",
           "input_channel", "check_output_outside_data", "check_cache_outside_data",
           "dataset_folders"]  # and, from classification.py, _CLASSIFICATION's names


class DataFolderError(FileNotFoundError):
    """A problem met in a --data folder's contents (a bad labels.csv line, cases without
    labels, no foreground class): a failure while running, exit status 1. A --data path that
    does not exist, is a file or holds no dataset, or a folder of the wrong kind for the
    command, is a ConfigError (exit status 2), as a missing --run or --images is."""


def _is_dataset(p: Path) -> bool:
    if (p / "dataset.json").is_file() or (p / "labels.csv").is_file():
        return True  # a broken dataset.json is reported when it is read, not skipped here
    from med3d_ext.data import DataError, detect_layout

    try:  # MedicalNet lists (train.txt of 'image label' lines), with or without imagesTr
        return detect_layout(p) == "medicalnet"
    except DataError:
        return False


def resolve_data_dirs(paths, command: str) -> list[Path]:
    """Check every --data folder exists; a folder of dataset folders (e.g. synth's
    ``DIR/pretrain``) expands to its datasets."""
    if not paths:
        hint = ("python -m med3d_ext.data synth --out DIR, then --data DIR/pretrain"
                if command == "pretrain" else "--data DIR")
        # a usage error (exit 2, as a missing --run is), not a missing folder
        raise ConfigError(f"{command} needs --data (e.g. {hint})")
    out = []
    if any(not str(p).strip() for p in paths):  # an unset "$VAR": Path('') is the current folder
        raise ConfigError(f"--data {' '.join(repr(str(p)) for p in paths)}: an empty path "
                          "(give dataset folders)")
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".txt":  # a MedicalNet list file names its dataset
            out.append(p)
            continue
        # the command line names no dataset: a usage error (exit 2), as a missing --run is
        if p.is_file():
            raise ConfigError(f"--data {str(p)!r} is a file; name the dataset folder (the "
                              "one holding dataset.json, labels.csv or train.txt)")
        if not p.is_dir():
            raise ConfigError(f"--data {str(p)!r}: no such folder (create data with "
                              f"python -m med3d_ext.data synth --out DIR)")
        if _is_dataset(p):
            out.append(p)
            continue
        subs = sorted(q for q in p.iterdir() if q.is_dir() and _is_dataset(q))
        if not subs:
            raise ConfigError(f"--data {str(p)!r} holds no dataset (no dataset.json, "
                              "labels.csv, MedicalNet list (train.txt) or dataset "
                              "sub-folders)")
        out.extend(subs)
    if command != "pretrain" and len(out) != 1:
        # transfer/evaluate work on one dataset: never pick the first of several silently
        raise ConfigError(f"{command} takes one dataset, but --data {' '.join(map(str, paths))} "
                          f"holds {len(out)}: {', '.join(q.name for q in out)}; name one")
    return out


def source_folders(data_dir) -> set:
    """The folders that hold a dataset's own files: its root (dataset.json, labels.csv, a
    MedicalNet list's folder), its layout's images/labels folders and every folder with one of
    its images or labels (training and test splits), as absolute and as resolved paths."""
    from med3d_ext.data import DataError, load_dataset

    p = Path(data_dir)
    root = p.parent if p.is_file() else p
    # the layouts' own folders by name too: a label that is a symbolic link resolves to where
    # it points, not to labelsTr/ (both spellings of each folder: as given and resolved)
    named = [root] + [root / f"{k}{s}" for k in ("images", "labels") for s in ("Tr", "Ts")]
    folders = {q for n in named for q in (Path(os.path.abspath(n)), n.resolve())}
    for split in ("train", "test"):
        try:
            ds = load_dataset(p, skip_bad=True, split=split)
        except (DataError, ValueError, OSError):  # no such split; a broken one is said later
            continue
        for case in ds.cases:
            for f in [*case.images, case.label]:
                if f is not None:
                    folders.add(Path(f).resolve().parent)
    return folders


def dataset_folders(data_dirs) -> dict:
    """``{dataset dir: source_folders(dir)}``, for the output checks below: computed once by
    a caller that checks several outputs (each call reads every dataset's layout), or given
    as it is when it already is such a dict."""
    return data_dirs if isinstance(data_dirs, dict) else {d: source_folders(d) for d in data_dirs}


def check_output_outside_data(out, data_dirs, option: str, writes: str) -> None:
    """Refuse an output folder that is one of the datasets' own folders: ``writes`` (what
    goes there) could overwrite their images or labels (evaluate's ``<case>.nii.gz`` has the
    name of an MSD label file), and a later run would read the outputs as data. ``data_dirs``:
    the dataset dirs, or their :func:`dataset_folders`."""
    if not out:
        return
    o = {Path(os.path.abspath(out)), Path(out).resolve()}
    for d, folders in dataset_folders(data_dirs).items():
        if o & folders:
            raise ConfigError(
                f"{option} {str(out)!r} is a folder of the dataset {str(d)!r} (it holds the "
                f"dataset's own images, labels or dataset.json); {writes} there could overwrite "
                f"them or be read as data. Write to a folder of its own, e.g. {option} "
                f"{str(Path(d).resolve().parent / (Path(d).stem + '-' + writes.split()[0]))!r}")


def check_cache_outside_data(cache, data_dirs, refuse: bool = True) -> None:
    """Refuse a --cache root that is a dataset's own folder or a folder of the datasets: the
    per-dataset cache folders made there would sit among the data (and a folder of datasets
    read with --data would meet them as datasets). ``refuse=False`` (a cache a resumed run or
    an evaluated run was saved with, accepted by older versions): a warning instead."""
    if not cache:
        return
    data_dirs = dataset_folders(data_dirs)
    try:
        check_output_outside_data(cache, data_dirs, "--cache", "preprocessing caches")
        c = {Path(os.path.abspath(cache)), Path(cache).resolve()}
        for d in data_dirs:
            p = Path(d)
            root = p.parent if p.is_file() else p
            if c & {Path(os.path.abspath(root)).parent, root.resolve().parent}:
                raise ConfigError(
                    f"--cache {str(cache)!r} is the folder that holds the dataset {str(d)!r}: its "
                    "cache folders would sit among the datasets and be read as data by a later "
                    f"--data {str(cache)!r}. Give the caches a folder of their own, e.g. --cache "
                    f"{str(Path(cache).resolve().parent / (Path(cache).resolve().name + '-cache'))!r}")
    except ConfigError as e:
        if refuse:
            raise
        import warnings

        warnings.warn(f"{e} (kept for this run, which was saved with it)", stacklevel=2)


def _cache_of(folder: Path, path) -> bool:
    """Is ``folder`` itself the preprocessing cache of the raw dataset at ``path``?"""
    import json

    try:
        root = json.loads((folder / "cache.json").read_text())["root"]
    except (OSError, ValueError, KeyError):
        return False
    p = Path(path).resolve()
    return Path(root).resolve() == (p if p.is_dir() else p.parent)


def preprocess_options(cfg) -> dict:
    """The ``preprocess()`` keywords the commands use: workers, progress, skip_bad."""
    # a process pool pays off only with spare cores (and this may run under torchrun)
    workers = 0 if (os.cpu_count() or 1) <= 2 else None
    # the first run on a big dataset preprocesses for minutes: show it (rank 0 only)
    progress = bool(cfg.get("progress", True)) and os.environ.get("RANK", "0") == "0"
    return {"workers": workers, "progress": progress, "skip_bad": bool(cfg.get("skip_bad"))}


def open_preprocessed(path, cfg, split: str = "train", recipe: dict | None = None):
    """The preprocessed (cached) dataset for a raw folder.

    split "test": the folder's test images (``imagesTs/``, MSD ``test`` list), preprocessed
    with ``recipe`` (a training dataset's ``PreprocessedDataset.recipe()``: its target spacing
    and CT clip range) into ``imagesTs/`` inside the training cache folder."""
    from med3d_ext import data

    cache = None
    if cfg.get("cache"):
        from med3d_ext.data.cache import cache_subdir

        cache = cache_subdir(cfg["cache"], path)
        if _cache_of(Path(cfg["cache"]), path):  # `data preprocess DIR --out CACHE` made it
            cache = Path(cfg["cache"])
    opts = preprocess_options(cfg)
    workers, progress, skip_bad = opts["workers"], opts["progress"], opts["skip_bad"]
    if split == "train":
        return data.open_dataset(path, cache=cache, workers=workers, progress=progress,
                                 skip_bad=skip_bad)
    if recipe is None:
        raise ValueError("open_preprocessed(split='test') needs the training recipe")
    ds = data.load_dataset(path, skip_bad=skip_bad, split="test")
    # its own folder: the test cases' normalisation comes from the run, and must neither
    # replace the training cases nor be mixed into the training set's CT percentiles
    cache = (cache if cache is not None else data.default_cache_dir(ds.source or ds.root)) / "imagesTs"
    return data.preprocess(ds, cache, workers=workers, progress=progress, skip_bad=skip_bad,
                           target_spacing=recipe["target_spacing"], ct_clip=recipe["ct_clip"])


def split_cases(names, val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by hashed case names (independent of the seed, so that
    every run on a dataset holds out the same cases)."""
    names = list(names)
    n = len(names)
    n_val = 0 if n < 2 or val_fraction <= 0 else min(max(round(n * val_fraction), 1), n - 1)
    order = sorted(names, key=lambda s: (zlib.crc32(s.encode()), s))
    val = set(order[:n_val])
    return [s for s in names if s not in val], [s for s in names if s in val]


def subset(pre, names):
    """A view of a PreprocessedDataset restricted to ``names`` (same cache folder)."""
    view = type(pre)(pre.dir)
    view.names = [n for n in view.names if n in set(names)]
    return view


def head_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(name)) or "dataset"


def check_classes(dataset: str, data_classes: int, head_classes: int, head: str) -> None:
    if data_classes > head_classes:
        raise ConfigError(
            f"dataset {dataset!r} has {data_classes} classes (labels 0..{data_classes - 1}) but "
            f"head {head!r} predicts {head_classes}; train a model with a matching head (the "
            "class count comes from the dataset's dataset.json labels)")


def seg_classes(pre, data_dir) -> int:
    """Class count of a segmentation dataset; a folder without segmentation labels (a
    classification folder, or labels that are all background) is an error, not a crash."""
    if pre.targets is not None:  # the command line's mismatch (exit 2), not bad data
        raise ConfigError(f"--data {str(data_dir)!r} is a classification folder "
                          "(labels.csv); use `transfer --task cls`, or give a segmentation "
                          "dataset (dataset.json with labels)")
    unlabelled = [c for i, c in enumerate(pre.names) if not pre.has_label(i)]
    if unlabelled:
        raise DataFolderError(f"--data {str(data_dir)!r}: {len(unlabelled)} case(s) have no "
                              f"label file, e.g. {unlabelled[:3]}; training needs a label for "
                              "every case (evaluate predicts unlabelled cases)")
    n = int(pre.num_classes)
    if n < 2:
        raise DataFolderError(f"--data {str(data_dir)!r}: dataset {pre.name!r} has no "
                              "foreground label (only 0 declared or found); segmentation needs "
                              "at least one class besides background")
    return n


def input_channel(pre, channel, lenient: bool = False) -> int:
    """Index of --channel in a dataset. ``lenient`` (pretraining, whose domains are mostly
    single-channel): a single-channel dataset uses its only channel whatever --channel says;
    multi-channel datasets must have it."""
    if channel is None and len(pre.channels) > 1 and not lenient:
        # a multi-channel dataset (e.g. MSD brain: FLAIR, T1w, ...) with no --channel: say
        # which channel the single-channel model reads, rather than pick it silently
        warnings.warn(f"dataset {pre.name!r} has {len(pre.channels)} channels "
                      f"{list(pre.channels)}; using the first ({pre.channels[0]!r}). "
                      "--channel NAME|INDEX picks another", stacklevel=2)
    try:
        return pre.channel_index(channel)
    except ValueError as e:
        if lenient and len(pre.channels) == 1:
            return 0
        raise ConfigError(f"--channel {channel!r}: {e}") from None


def _check_patch(pres, patch) -> None:
    """Warn when the patch dwarfs every case: such patches are mostly padding, and a mistyped
    --patch 512 costs tens of GB (on a CPU the kernel kills the process, with no message)."""
    biggest = [max(int(pre.meta(i)["shape"][a]) for pre in pres for i in range(len(pre)))
               for a in range(3)]
    if np.prod(patch) > 8 * np.prod(biggest):
        fit = [max(8, -(-b // 8) * 8) for b in biggest]
        warnings.warn(f"--patch {list(patch)} is over 8x the volume of the largest "
                      f"preprocessed case {biggest}; patches are mostly padding and use much "
                      f"more memory. --patch {' '.join(map(str, fit))} covers every case",
                      stacklevel=2)


def _use_ops(cfg) -> bool:
    """--no-fused means plain PyTorch everywhere; otherwise the loss and augmentation use the
    package's ops (compiled kernels when built) while the model's fused path is switched on
    by default only on GPU (cli._setup)."""
    return cfg.get("fused") is not False


def loader_workers(cfg, dev) -> int:
    """--num-workers, or its automatic value: 0 on the CPU (a resumed CPU run is bitwise
    reproducible only without workers, and there they compete with the step for the same
    cores); on a GPU min(8, CPUs per process - 1). Measured on an H200 (pipeline benchmark,
    batch 8 x 128x128x64, benchmarks/results/2026-11-26_h200-s9): the ResNet-10 step waited for
    data 75% of the time with in-process loading, 4% with 8 workers."""
    n = cfg.get("num_workers")
    if n is not None:
        return int(n)
    if torch.device(dev).type != "cuda":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:  # torchrun's processes on this machine share its CPUs
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(0, min(8, cpus // local - 1))


def _to_dev(x, dev):
    return x.to(dev, non_blocking=True)


def _label_size(cfg, patch):
    grid = cfg.get("label_grid", "logits")
    if grid not in ("logits", "patch"):
        raise ConfigError(f"label_grid: expected logits or patch, got {grid!r}")
    return tuple(patch) if grid == "patch" else tuple(p // 4 for p in patch)


def _fit(logits, label, resize=None):
    """Logits on the label's grid: trilinear upsampling (``resize``: backends.resize_fn) when
    the loss is computed at patch resolution (label_grid=patch); unchanged on the logit grid."""
    if tuple(logits.shape[2:]) == tuple(label.shape[1:]):
        return logits
    return (resize or resize_fn(False))(logits, tuple(label.shape[1:]))


def _prep_seg(cfg, patch, aug, channels_last):
    lsize = _label_size(cfg, patch)

    def prepare(batch, dev):
        image = _to_dev(batch["image"], dev).float()
        label = _to_dev(batch["label"], dev)
        if aug is not None:
            image, label = aug(image, label, patch, label_size=lsize)
        else:
            label = downsample_labels(label, lsize)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        # dataset_id stays on the host, as a list (which DDP does not move to the device):
        # Med3DNet routes the batch on the host, and a device copy would have to come back (a
        # host sync per step)
        # uint8 labels stay uint8 (the losses take uint8 or int64; a conversion would be one
        # more kernel and 8x the label bytes per step); other integer types become int64
        if label.dtype not in (torch.uint8, torch.int64):
            label = label.long()
        return {"image": image, "label": label,
                "dataset_id": torch.as_tensor(batch["dataset_id"]).tolist()}
    return prepare


def _validate_seg(model, sets, cfg, predictor_for):
    """Mean foreground Dice of sliding-window predictions on held-out cases, per dataset."""
    dev = next(model.parameters()).device
    out, scores = {}, []
    with torch.no_grad():
        for k, (name, pre) in enumerate(sets):
            vals = []
            ch = input_channel(pre, cfg.get("channel"), lenient=True)  # loader checked it
            for i in range(len(pre)):
                x, lab, _ = pre.load_case(i, ch)
                probs = sliding_window_probs(
                    torch.from_numpy(x)[None].to(dev), predictor_for(k), cfg["patch"],
                    overlap=cfg["overlap"], sw_batch_size=cfg["sw_batch_size"],
                    pad_value=pre.background_value(i, ch))
                if not bool(torch.isfinite(probs).all()):
                    # the argmax of NaN is background: scored Dice 0 and saved as a checkpoint
                    raise TrainingError(
                        f"validation of {name!r} case {pre.names[i]!r}: the model's output is "
                        "not finite (NaN/Inf): its weights overflow (the training diverged); "
                        "stopped without saving. Try lower learning rates (--lr / --head-lr), "
                        "--grad-clip, or --amp off")
                pred = probs.argmax(1)[0].cpu()
                # the head's classes, as evaluate scores them: a validation subset of a dataset
                # without declared labels counts only the values its own cases hold, and a
                # class predicted but absent from them (Dice 0) went unscored
                vals.append(nanmean(dice_per_class(pred, torch.from_numpy(lab.astype(np.int64)),
                                                   int(probs.shape[1]))))
            d = nanmean(vals)
            out[f"val_dice/{name}"] = d
            scores.append(d)
    out["score"] = out["dice"] = nanmean(scores)
    return out


def _groups(model, enc_lr, head_lr):
    from med3d_ext.models import encoder_parameters, head_parameters

    return [("encoder", encoder_parameters(model), enc_lr),
            ("head", head_parameters(model), head_lr)]


def _finish_model(model, cfg, dev, channels_last):
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def _val_sets(pres, names_val, cfg):
    sets = []
    for pre, val in zip(pres, names_val):
        if not val:
            continue
        if cfg.get("val_cases"):
            val = val[:cfg["val_cases"]]
        sets.append((head_name(pre.name), subset(pre, val)))
    return sets


# -------------------------------------------------------------------------------- pretrain


def pretrain_job(cfg, dirs, dev, rank: int, fused: bool, channels_last: bool) -> Job:
    from med3d_ext import data
    from med3d_ext.models import Med3DNet
    from med3d_ext.models.med3d import rows_by_head

    pres = [open_preprocessed(d, cfg) for d in dirs]
    heads, split = {}, {}
    for pre, d in zip(pres, dirs):
        name = head_name(pre.name)
        if name in heads:
            first = dirs[list(heads).index(name)]
            raise ConfigError(f"two --data datasets are both named {pre.name!r} ({str(first)!r} "
                              f"and {str(d)!r}); each pretraining head is named after its "
                              "dataset: give them folders of distinct names (a MedicalNet list "
                              "file is named after its folder)")
        heads[name] = seg_classes(pre, d)
        tr, va = split_cases(pre.names, cfg["val_fraction"])
        split[name] = {"train": tr, "val": va}
    patch = tuple(cfg["patch"])
    _check_patch(pres, patch)
    model = Med3DNet(cfg["depth"] or 10, heads, fused=fused, shortcut_type=cfg["shortcut_type"])
    model = _finish_model(model, cfg, dev, channels_last)
    total = cfg["epochs"] * cfg["steps"]
    loader = data.make_loader(
        [subset(p, split[head_name(p.name)]["train"]) for p in pres], patch, cfg["batch_size"],
        num_workers=loader_workers(cfg, dev), seed=cfg["seed"] * 1000003 + rank, steps=total,
        fg_fraction=cfg["fg_fraction"], device=dev,
        channels=[input_channel(p, cfg.get("channel"), lenient=True) for p in pres])
    loss_fn = seg_loss_fn(_use_ops(cfg))
    resize = resize_fn(_use_ops(cfg))
    names = list(heads)

    def step_fn(net, inp):
        outs = net(inp["image"], inp["dataset_id"])
        targets = rows_by_head(inp["label"], outs)
        logits = [_fit(o.logits, t, resize) for o, t in zip(outs, targets)]
        loss, per = loss_fn(logits, targets)
        info = {f"loss/{names[o.head]}": per[j] for j, o in enumerate(outs)}

        def dice_fn():
            d = {f"dice/{names[o.head]}": batch_dice(lg.detach(), tg)
                 for o, lg, tg in zip(outs, logits, targets)}
            d["dice"] = nanmean(d.values())
            return d
        return loss, info, dice_fn

    sets = _val_sets(pres, [split[head_name(p.name)]["val"] for p in pres], cfg)
    set_heads = [s[0] for s in sets]

    def validate(m):
        return _validate_seg(m, sets, cfg, lambda k: (lambda x: m.forward_head(x, set_heads[k])))

    aug = augmenter(cfg["augment"], _use_ops(cfg), cfg["seed"] * 1000003 + rank)
    return Job("pretrain", model, model.arch, loader, _prep_seg(cfg, patch, aug, channels_last),
               step_fn, validate, _groups(model, cfg["lr"], cfg["lr"]), cfg["batch_size"],
               int(np.prod(patch)), find_unused=True, augment=aug,
               extra={"split": split, "datasets": [str(d) for d in dirs],
                      "preprocessing": {head_name(p.name): p.recipe() for p in pres}})


# -------------------------------------------------------------------------------- transfer


def _pretrained_depth(cfg):
    """(depth, shortcut) for a transfer model: from the pretrained file (checked against an
    explicit --depth), else --depth or 10. Recorded in ``cfg`` (so in config.yaml): a resumed
    run takes its weights from last.pt and no longer needs the pretrained file."""
    depth, shortcut = _pretrained_arch(cfg)
    cfg["depth"] = depth
    if shortcut is not None:
        cfg["shortcut_type"] = shortcut
    return depth, shortcut


def _transfer_weights(cfg):
    """The file to initialise the encoder from: none from scratch, nor when resuming (the
    checkpoint overwrites every weight)."""
    return None if cfg.get("from_scratch") or cfg.get("resume") else cfg.get("pretrained")


def _pretrained_arch(cfg):
    path = cfg.get("pretrained")
    if path and cfg.get("resume") and cfg.get("depth"):
        # resumed: the checkpoint holds every weight and is checked against this architecture;
        # the pretrained file is not read (it may have moved, changed or gone since)
        return int(cfg["depth"]), cfg.get("shortcut_type")
    if path:
        from med3d_ext.models import infer_medicalnet_depth

        if Path(path).is_dir():
            have = [f.name for f in sorted(Path(path).iterdir()) if f.is_file() and f.suffix
                    in (".pt", ".pth", ".safetensors")]
            raise ConfigError(f"--pretrained {path!r} is a folder; name a weights file in it"
                              + (f" (it holds {', '.join(have)})" if have else ""))
        if not Path(path).is_file():  # exit 2, as a --pretrained that is a folder
            raise ConfigError(f"--pretrained {path!r}: no such file")
        depth, shortcut = infer_medicalnet_depth(path)
        if cfg.get("depth") and int(cfg["depth"]) != depth:
            raise ConfigError(f"--pretrained {path!r} holds a ResNet-{depth} encoder (shortcut "
                              f"{shortcut}) but --depth {cfg['depth']} was asked; drop --depth "
                              f"(transfer reads it from the file) or pick a ResNet-"
                              f"{cfg['depth']} file")
        asked = cfg.get("shortcut_type")
        # a mismatch failed later in the weight loader, with Python advice (resnet3d(...));
        # from scratch the file gives the depth only, and an explicit shortcut is the model's
        if asked and shortcut and asked != shortcut and not cfg.get("from_scratch"):
            raise ConfigError(f"--pretrained {path!r} holds a ResNet-{depth} encoder with "
                              f"shortcut {shortcut}, but --shortcut-type {asked} was asked; "
                              "drop --shortcut-type (transfer reads it from the file) or pick a "
                              f"file with shortcut {asked}")
        return depth, asked or shortcut
    if not cfg.get("from_scratch"):
        raise ConfigError("transfer needs --pretrained PATH (our checkpoint, a MedicalNet .pth "
                          "or .safetensors) or --from-scratch")
    return int(cfg.get("depth") or 10), cfg.get("shortcut_type")


def _lrs(cfg):
    scratch = cfg.get("from_scratch") or not cfg.get("pretrained")
    # from scratch the encoder is as new as the head: one learning rate for both
    return (cfg["head_lr"] if scratch else cfg["lr"]), cfg["head_lr"]


def transfer_seg_job(cfg, data_dir, dev, rank: int, fused: bool, channels_last: bool) -> Job:
    from med3d_ext import data
    from med3d_ext.models import build_transfer_model

    depth, shortcut = _pretrained_depth(cfg)
    pre = open_preprocessed(data_dir, cfg)
    name = head_name(pre.name)
    n_cls = seg_classes(pre, data_dir)
    tr, va = split_cases(pre.names, cfg["val_fraction"])
    weights = _transfer_weights(cfg)
    model, report = build_transfer_model("segmentation", depth, n_cls, weights=weights,
                                         shortcut_type=shortcut, fused=fused,
                                         return_report=True)
    model = _finish_model(model, cfg, dev, channels_last)
    patch = tuple(cfg["patch"])
    _check_patch([pre], patch)
    total = cfg["epochs"] * cfg["steps"]
    loader = data.make_loader([subset(pre, tr)], patch, cfg["batch_size"],
                              num_workers=loader_workers(cfg, dev),
                              seed=cfg["seed"] * 1000003 + rank,
                              steps=total, fg_fraction=cfg["fg_fraction"], device=dev,
                              channels=[input_channel(pre, cfg.get("channel"))])
    loss_fn = seg_loss_fn(_use_ops(cfg))
    resize = resize_fn(_use_ops(cfg))

    def step_fn(net, inp):
        logits = _fit(net(inp["image"]), inp["label"], resize)
        loss, per = loss_fn([logits], [inp["label"]])

        def dice_fn():
            return {"dice": batch_dice(logits.detach(), inp["label"])}
        return loss, {}, dice_fn

    sets = _val_sets([pre], [va], cfg)

    def validate(m):
        return _validate_seg(m, sets, cfg, lambda k: m)

    enc_lr, head_lr = _lrs(cfg)
    aug = augmenter(cfg["augment"], _use_ops(cfg), cfg["seed"] * 1000003 + rank)
    return Job("seg", model, model.arch, loader, _prep_seg(cfg, patch, aug, channels_last),
        step_fn, validate, _groups(model, enc_lr, head_lr), cfg["batch_size"],
        int(np.prod(patch)), freeze_epochs=cfg["freeze_epochs"], augment=aug,
        extra={"split": {name: {"train": tr, "val": va}}, "datasets": [str(data_dir)],
               "preprocessing": {name: pre.recipe()},
               "pretrained_load": str(report) if report else None})


# The classification job and its helpers live in classification.py (which imports this
# module's helpers); ``tasks.read_cls_csv`` etc. keep working, looked up on first use.
_CLASSIFICATION = ("ClsLoader", "class_list", "cls_case_names", "cls_class_names",
                   "load_cls_volume", "read_cls_csv", "transfer_cls_job")


def __getattr__(name):
    if name in _CLASSIFICATION:
        from . import classification

        return getattr(classification, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
