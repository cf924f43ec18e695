"""``evaluate``: whole-volume sliding-window inference of a trained run.

Segmentation: each case is preprocessed as in training (cache), predicted with Gaussian-
weighted sliding windows (logits upsampled trilinearly to the window before softmax), the
probabilities mapped back to the source file's grid (undoing resampling, crop and RAS
reorientation) and arg-maxed there; the prediction is written as ``<case>.nii.gz`` with the
source image's affine, and compared with the source label: Dice per class and HD95 in mm.
Classification runs write ``predictions.csv`` and report accuracy.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import find_checkpoint, load_checkpoint
from .config import ConfigError
from .inference import sliding_window_probs
from .loops import autocast_dtype
from .metrics import dice_per_class, hd95, nanmean

__all__ = ["evaluate", "format_table"]


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
    if split == "all":
        return list(names)
    if split not in ("train", "val"):
        raise ConfigError(f"split: expected all, train or val, got {split!r}")
    sp = ckpt.get("split") or {}
    if key not in sp:
        raise ConfigError(f"--split {split}: the run holds no split for dataset {key!r} "
                          f"(it has {sorted(sp)}); use --split all")
    keep = set(sp[key][split])
    return [n for n in names if n in keep]


def evaluate(cfg: dict, dev: torch.device, fused: bool = False, log=print,
             explicit=()) -> dict:
    """Evaluate run cfg["run"] on cfg["data"][0]; predictions and metrics go to cfg["out"].
    The window (patch), input channel and cache come from the run's configuration unless
    given explicitly (keys in ``explicit``)."""
    if not cfg.get("run"):
        raise ConfigError("evaluate needs --run RUN (a run folder or checkpoint)")
    if not cfg.get("data"):
        raise ConfigError("evaluate needs --data DIR (a raw dataset folder)")
    from .tasks import resolve_data_dirs

    data_dir = resolve_data_dirs(cfg["data"], "evaluate")[0]
    ckpt = load_checkpoint(find_checkpoint(cfg["run"], cfg["checkpoint"]))
    run_cfg = ckpt.get("config") or {}
    cfg = dict(cfg)
    for key in ("patch", "channel", "cache"):
        if key not in explicit and run_cfg.get(key) is not None:
            cfg[key] = run_cfg[key]
    out = Path(cfg["out"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; predictions need a folder")
    out.mkdir(parents=True, exist_ok=True)
    model = _load_model(ckpt, dev, fused)
    window = tuple(cfg["patch"])
    amp = autocast_dtype(cfg["amp"], dev)
    ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp else torch.no_grad
    if ckpt["arch"]["task"] == "classification":
        return _evaluate_cls(cfg, ckpt, model, data_dir, out, dev, window, run_cfg, log)
    return _evaluate_seg(cfg, ckpt, model, data_dir, out, dev, window, ctx, log)


def _evaluate_seg(cfg, ckpt, model, data_dir, out, dev, window, ctx, log):
    import nibabel as nib

    from med3d_ext.data import save_nifti

    from .tasks import check_classes, head_name, input_channel, open_preprocessed

    pre = open_preprocessed(data_dir, cfg)
    arch = ckpt["arch"]
    name = head_name(pre.name)
    if arch["task"] == "pretrain":
        head = cfg.get("head") or name
        if head not in arch["heads"]:
            raise ConfigError(f"this pretraining run has heads {list(arch['heads'])}; none is "
                              f"named {head!r} (the dataset); pick one with --head")
        n_cls = arch["heads"][head]
        predictor = lambda x: model.forward_head(x, head)  # noqa: E731
    else:
        head, n_cls, predictor = "conv_seg", arch["num_classes"], model
    check_classes(pre.name, int(pre.num_classes), int(n_cls), head)
    names = _split_filter(pre.names, ckpt, cfg["split"], name)
    ch = input_channel(pre, cfg.get("channel"), lenient=arch["task"] == "pretrain")
    rows = []
    for i, case in enumerate(pre.names):
        if case not in names:
            continue
        x, _, meta = pre.load_case(i, ch)
        try:
            with torch.no_grad(), ctx():
                probs = sliding_window_probs(
                    torch.from_numpy(x)[None].to(dev), predictor, window,
                    overlap=cfg["overlap"], sw_batch_size=cfg["sw_batch_size"],
                    pad_value=pre.background_value(i, ch))
        except torch.OutOfMemoryError as e:
            from .loops import TrainingError

            raise TrainingError(f"out of GPU memory in sliding-window inference of {case!r} "
                                f"(window {list(window)}, {cfg['sw_batch_size']} windows per "
                                "forward); use --sw-batch-size 1 or a smaller --patch") from e
        pred = _to_source(probs[0].cpu(), meta)
        affine = np.asarray(meta["orig_affine"], np.float64)
        path = save_nifti(pred, affine, out / f"{case}.nii.gz")  # atomic, qform = sform
        row = {"case": case, "prediction": str(path)}
        if meta.get("label"):
            gt = np.asarray(nib.load(meta["label"]).dataobj).astype(np.int64)
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
            dice = dice_per_class(pred, gt, n_cls)
            for c in range(1, n_cls):
                row[f"dice_{c}"] = dice[c - 1]
                row[f"hd95_{c}"] = hd95(pred == c, gt == c, spacing)
            row["dice"] = nanmean(dice)
            row["hd95"] = nanmean(row[f"hd95_{c}"] for c in range(1, n_cls))
        rows.append(row)
        log(f"  {case}: Dice {row.get('dice', float('nan')):.3f}  "
            f"HD95 {row.get('hd95', float('nan')):.2f} mm")
    summary = {"run": str(cfg["run"]), "data": str(data_dir), "head": head,
               "num_classes": int(n_cls), "cases": rows}
    for c in range(1, n_cls):
        summary[f"dice_{c}"] = nanmean(r.get(f"dice_{c}") for r in rows)
        summary[f"hd95_{c}"] = nanmean(r.get(f"hd95_{c}") for r in rows)
    summary["dice"] = nanmean(r.get("dice") for r in rows)
    summary["hd95"] = nanmean(r.get("hd95") for r in rows)
    _write(out, summary, rows)
    log(format_table(summary))
    return summary


def _to_source(probs: torch.Tensor, meta) -> np.ndarray:
    """(C, D, H, W) probabilities on the preprocessed grid -> uint8 labels in the source
    file's voxel grid and axis order (trilinear on probabilities, then argmax)."""
    from med3d_ext.data import to_source_space

    src = to_source_space(probs.numpy(), meta)  # (I, J, K, C), outside the crop: 0
    return np.argmax(src, -1).astype(np.uint8)


def _evaluate_cls(cfg, ckpt, model, data_dir, out, dev, window, run_cfg, log):
    from med3d_ext.data import DataError

    from .tasks import cls_case_names, load_cls_volume, read_cls_csv

    paths, labels = read_cls_csv(data_dir)
    classes = list(ckpt.get("classes") or [])
    unknown = sorted(set(labels) - set(classes), key=int)
    if classes and unknown:  # the classification analogue of check_classes
        raise ConfigError(f"{str(data_dir)!r}: labels.csv has classes {unknown} that the run's "
                          f"head does not predict (it was trained on {classes})")
    cases = cls_case_names(data_dir, paths)
    names = _split_filter(cases, ckpt, cfg["split"], "cls")
    rows = []
    with torch.no_grad():
        for p, case, lab in zip(paths, cases, labels):
            if case not in names:
                continue
            try:
                x = load_cls_volume(p, window, cfg.get("channel"))[None].to(dev)
            except DataError as e:
                if not cfg.get("skip_bad"):
                    raise
                warnings.warn(f"skipped bad image: {e}", stacklevel=2)
                continue
            prob = torch.softmax(model(x).float(), 1)[0].cpu()
            k = int(prob.argmax())
            rows.append({"case": case, "label": lab,
                         "prediction": classes[k] if k < len(classes) else str(k),
                         "probability": float(prob[k])})
    acc = nanmean(float(r["label"] == r["prediction"]) for r in rows)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["case", "label", "prediction", "probability"])
        w.writeheader()
        w.writerows(rows)
    summary = {"run": str(cfg["run"]), "data": str(data_dir), "accuracy": acc, "cases": rows}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    log(f"accuracy {acc:.3f} on {len(rows)} cases; predictions in {out / 'predictions.csv'}")
    return summary


def _fmt(v, spec):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(summary) -> str:
    n = summary["num_classes"]
    head = ["case"] + [f"Dice {c}" for c in range(1, n)] + [f"HD95 {c} (mm)" for c in range(1, n)]
    lines = [" | ".join(head)]
    for r in summary["cases"] + [dict(summary, case="mean")]:
        cells = [str(r["case"])] + [_fmt(r.get(f"dice_{c}"), ".3f") for c in range(1, n)] + \
            [_fmt(r.get(f"hd95_{c}"), ".2f") for c in range(1, n)]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _write(out: Path, summary, rows):
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    (out / "metrics.json").write_text(json.dumps(
        {k: ([{a: clean(b) for a, b in r.items()} for r in v] if k == "cases" else clean(v))
         for k, v in summary.items()}, indent=1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
