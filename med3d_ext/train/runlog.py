"""Run-folder logging: metrics.jsonl (always), TensorBoard events (when tensorboard is
installed), PNG curves (when matplotlib is installed). Only rank 0 logs.

metrics.jsonl holds one JSON object per line:

- ``{"kind": "train", "step": S, "epoch": E, "loss", "lr", "samples_s", "voxels_s",
  "data_wait", ...}``: the mean over the steps since the previous train row (every
  ``log_every`` steps and at each epoch's end), plus per-head ``loss/<head>``, ``dice``,
  ``dice/<head>`` (pretraining) or ``acc`` (classification) of the row's last batch. A run
  stopped by Ctrl-C also writes the row of the steps since the previous one (at the step it
  saved), and every checkpoint keeps the sums of the steps not yet in a row, so that a resumed
  run logs each step once;
- ``{"kind": "val", "step": S, "epoch": E, "score", "dice" | "acc", "val_dice/<dataset>",
  "target_step"}``: validation after each epoch.

``step`` is the number of optimizer steps done when the row was written (1-based; the val row
of an epoch has the step of that epoch's last train row). ``epoch`` is the 1-based number of
the epoch the row belongs to, the same convention for both kinds: with S steps per epoch, a
train row has ``epoch == (step - 1) // S + 1`` and epoch E's val row has ``step == E * S``.
Non-finite numbers are written as null (NaN) or "inf"/"-inf".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["RunLogger", "read_metrics", "truncate_metrics", "plot_curves"]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


def read_metrics(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill: ignore it
            pass
    return out


def truncate_metrics(path, step: int, steps_per_epoch: int | None = None) -> None:
    """Keep only records up to ``step`` (a resumed run re-logs what came after its
    checkpoint). With ``steps_per_epoch``, the kept rows' ``epoch`` is rewritten from their
    step by the module's convention, so a run logged before it (train rows once counted
    epochs from 0) continues with one numbering."""
    p = Path(path)
    rows = [r for r in read_metrics(p) if int(r.get("step", 0)) <= step]
    if steps_per_epoch:
        for r in rows:
            s = int(r.get("step", 0))
            if r.get("kind") == "train" and s >= 1:
                r["epoch"] = (s - 1) // steps_per_epoch + 1
            elif r.get("kind") == "val":
                r["epoch"] = s // steps_per_epoch
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, p)
    finally:  # a second Ctrl-C mid-write leaves the old log, and no temporary
        tmp.unlink(missing_ok=True)


class RunLogger:
    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: jsonl only
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def curves(self) -> None:
        if self.enabled:
            plot_curves(self.dir / "metrics.jsonl", self.dir / "curves.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path, out_png) -> Path | None:
    """Training loss and validation Dice against step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    tr = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    va = [r for r in rows if r.get("kind") == "val" and r.get("score") is not None]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr])
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss")
    ax[1].plot([r["step"] for r in va], [r["score"] for r in va], marker="o")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("validation score")
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out_png
