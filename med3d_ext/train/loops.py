"""The training engine shared by ``pretrain`` and ``transfer``.

A :class:`Job` says what to train (model, batches, forward + loss, validation, parameter
groups); :func:`run_training` does everything else the same way for every job: optimizer and
schedule, autocast / grad scaler, DDP, freezing, NaN/Inf stop, logging, atomic checkpoints and
exact resume.

Exact resume: the checkpoint holds model, optimizer, scheduler, grad scaler, every RNG state,
step/epoch and the batch loader's position. Batches are counter-based (batch b depends only on
the seed and b), augmentation draws from torch's global RNG (restored), and everything that
would otherwise consume that RNG out of order (creating DataLoader iterators) runs under
``torch.random.fork_rng``. So a resumed CPU run with num_workers=0 and a fixed thread count
ends with bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._args import bar_disable
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .config import ConfigError
from .distributed import DistContext, all_reduce_mean, any_rank, barrier, run_on_main, wrap_ddp
from .profiling import StepProfiler
from .runlog import RunLogger, truncate_metrics

__all__ = ["TrainingError", "TrainingInterrupted", "Job", "run_training", "autocast_dtype",
           "build_optimizer", "build_scheduler"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, bad resume); the message says
    why and what to do."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM: the message says which checkpoint holds the work done and how to
    resume. ``signum``: the signal that stopped the run (the CLI exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


@dataclass
class Job:
    kind: str                       # "pretrain" | "seg" | "cls"
    model: torch.nn.Module          # on the device
    arch: dict                      # rebuilds the model (stored in checkpoints)
    loader: object                  # iterable of batch dicts with state_dict/load_state_dict
    prepare: Callable               # (batch, device) -> inputs for step_fn (augmentation here)
    step_fn: Callable               # (model, inputs) -> (loss, {name: float-able}, dice_fn|None)
    validate: Callable              # (raw model) -> {"score": float, ...}
    groups: list                    # [(name, [params], lr)]
    samples_per_step: int
    voxels_per_sample: int
    freeze_epochs: int = 0
    find_unused: bool = False
    augment: object = None          # an augmenter with its own RNG (state_dict) or None
    extra: dict = field(default_factory=dict)  # saved in every checkpoint (split, classes)


def _apply_hyperparameters(opt, sched, job: Job, cfg: dict) -> None:
    """After a resume: the configuration's learning rates, momentum and weight decay replace
    the ones saved with the optimizer (``load_state_dict`` restores those too, so a resumed
    ``--lr`` was ignored while config.yaml recorded it); the optimizer's state (momentum
    buffers, Adam moments) is kept, and the schedule goes on from its step with the new base
    rates. Unchanged values give back exactly the checkpoint's, so the resumed run is bitwise
    the uninterrupted one."""
    lrs = {name: lr for name, params, lr in job.groups if params}
    for g in opt.param_groups:
        if g.get("name") in lrs:
            g["initial_lr"] = lrs[g["name"]]
        if cfg["optimizer"] == "sgd":
            g["momentum"] = cfg["momentum"]
        g["weight_decay"] = cfg["weight_decay"]
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    for g, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * f(sched.last_epoch)  # what LambdaLR.get_lr gives at this step


def resume_command(kind, run_dir) -> str:
    """The command that continues the run in ``run_dir``, ready to paste: ``kind`` the job's
    ("pretrain", "seg", "cls") or the config's task."""
    import shlex

    command = "pretrain" if kind == "pretrain" else "transfer"
    return f"python -m med3d_ext.train {command} --resume {shlex.quote(str(run_dir))}"


def _non_finite_message(what, step, epoch, epochs, run_dir, saved_step, opt, cfg,
                        kind) -> str:
    """``what``: "non-finite loss (nan)", or the weights named by _non_finite_weights."""
    keep = (f"The last good checkpoint is {Path(run_dir) / 'last.pt'} (step {saved_step}; "
            f"resume with `{resume_command(kind, run_dir)}`)" if saved_step is not None else
            "No checkpoint was written before it (run again with different settings)")
    rates = ", ".join(f"{g.get('name', i)} {g['lr']:.3g}" for i, g in enumerate(opt.param_groups))
    flags = "--lr" + (" / --head-lr (the head's, and a from-scratch encoder's)"
                      if "head_lr" in cfg else "")
    return (f"{what} at step {step} (epoch {epoch} of {epochs}); stopped without "
            f"saving. {keep}. Try lower learning rates ({flags}; now {rates}), --grad-clip, or "
            "--amp off.")


def _non_finite_weights(model) -> list[str]:
    """The names of the model's non-finite (NaN/Inf) parameters and floating buffers, with one
    host sync: an optimizer step can make the weights non-finite while the loss it was computed
    from was finite (a huge learning rate diverges in one step), which the loss check only sees
    a step later, or never when it was the run's last step."""
    named = [(k, t) for k, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_floating_point() and t.numel()]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu().tolist()
    return [k for (k, _), good in zip(named, ok) if not good]


def _check_resumed_spacing(was: dict | None, now: dict | None, path) -> None:
    """A resumed run reads its data at the spacing it trained at: a cache preprocessed again
    at another --spacing since (which a cache now keeps) would switch it mid-run."""
    for name, rec in (now or {}).items():
        old = (was or {}).get(name) or {}
        a, b = old.get("target_spacing"), rec.get("target_spacing")
        if a and b and any(abs(float(x) - float(y)) > 1e-3 for x, y in zip(a, b)):
            a, b = ([round(float(v), 4) for v in t] for t in (a, b))
            raise TrainingError(
                f"--resume {str(path)!r}: dataset {name!r} is now preprocessed at {b} mm, but "
                f"the run trained at {a} mm (its cache was preprocessed again with another "
                "--spacing); preprocess it at the run's spacing (python -m med3d_ext.data "
                f"preprocess DATA --spacing {' '.join(map(str, a))} --out CACHE) or start a new "
                "run")


def _keep_class_names(ck: dict, job, path) -> None:
    """A resumed classification run keeps the class names it recorded: its folder's
    classes.json, read again, renamed the classes in last.pt but not in best.pt (or dropped
    them when the file was gone). A change is said."""
    if "class_names" not in ck or "class_names" not in job.extra:
        return
    was, now = dict(ck["class_names"] or {}), dict(job.extra["class_names"] or {})
    if now != was:
        warnings.warn(f"--resume {str(path)!r}: the data's classes.json now names the classes "
                      f"{now or 'nothing'}; the run keeps the names it was trained with {was}",
                      stacklevel=2)
    job.extra["class_names"] = was


def autocast_dtype(amp: str, device: torch.device):
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None, "none": None}[amp]


def build_optimizer(groups, cfg) -> torch.optim.Optimizer:
    pg = [{"params": p, "lr": lr, "name": n, "initial_lr": lr} for n, p, lr in groups if p]
    if cfg["optimizer"] == "sgd":
        # torch's default kernels: its fused SGD fails once some momentum buffers exist and
        # others do not yet (a pretraining head whose first sample comes after step 1;
        # torch 2.13: "expected Tensor as element 8 in argument 2, but got NoneType")
        return torch.optim.SGD(pg, lr=pg[0]["lr"], momentum=cfg["momentum"],
                               weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        impl = optimizer_impl([q for g in pg for q in g["params"]])
        return torch.optim.AdamW(pg, lr=pg[0]["lr"], weight_decay=cfg["weight_decay"], **impl)
    raise TrainingError(f"optimizer: expected sgd or adamw, got {cfg['optimizer']!r}")


def optimizer_impl(params) -> dict:
    """AdamW's ``fused=True`` where torch has the fused kernel for these tensors (floating, all
    on the CPU or all on CUDA): one kernel updates every tensor. Torch's default is the
    per-tensor loop on the CPU (a Med3DNet ResNet-10, 100 tensors, 2-core CPU, torch 2.13: 102
    ms a step against 17 fused) and foreach kernels, several launches per group, on a GPU."""
    devices = {p.device.type for p in params}
    if len(devices) == 1 and devices <= {"cpu", "cuda"} and all(
            p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def build_scheduler(opt, cfg, total: int):
    kind = cfg["schedule"]
    if kind == "poly":
        f = lambda s: max(1.0 - s / max(total, 1), 0.0) ** 0.9  # noqa: E731
    elif kind == "cosine":
        f = lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(total, 1), 1.0)))  # noqa: E731
    elif kind == "constant":
        f = lambda s: 1.0  # noqa: E731
    else:
        raise TrainingError(f"schedule: expected poly, cosine or constant, got {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def compile_for_training(net, model, mode: str = "default"):
    """--compile: torch.compile of the training forward (``net``: ``model``, or its DDP wrap).

    A model that routes each batch to per-dataset heads (Med3DNet: pretraining) has only its
    shared encoder compiled, in place (``nn.Module.compile``: state-dict keys unchanged): the
    routing reads the batch's dataset ids on the host, so a compiled Med3DNet forward broke its
    graph there and recompiled for every new mix of datasets in a batch, until Dynamo's
    recompile limit sent it back to eager (seen on the CPU: 8 recompiles in 12 steps). The
    encoder always sees the whole batch, one shape; the heads, small and fed a different share
    of the batch each step, stay eager. Returns the module to call."""
    from med3d_ext.models import Med3DNet

    kw = {"mode": None if mode == "default" else mode}
    if isinstance(model, Med3DNet):
        model.encoder.compile(**kw)
        return net
    return torch.compile(net, **kw)


def _set_frozen(model, frozen: bool) -> None:
    from med3d_ext.models import freeze_encoder, unfreeze_encoder

    (freeze_encoder if frozen else unfreeze_encoder)(model)


class _CtrlC:
    """A first Ctrl-C (SIGINT) or a SIGTERM asks the loop to stop after the step in progress
    and to save it (model, optimizer, RNG and loader position agree only between steps); a
    second Ctrl-C stops at once. SIGTERM never escalates: a cluster scheduler (SLURM) sends it
    before killing a job, often to every process of the job and again through torchrun, and
    a repeated SIGTERM must not cost the save. Installed only from the main thread, for each
    signal whose handler is Python's default (a caller's handler, or an ignored signal, is
    left as it is). Under torchrun every rank installs it: torchrun forwards SIGINT/SIGTERM
    to each rank, and the ranks agree on the step to stop at (:func:`any_rank`)."""

    def __init__(self, enabled: bool = True, announce: bool = True):
        self.asked = False
        self.announce = announce
        self.prev = {}
        main = threading.current_thread() is threading.main_thread()
        self.signals = [s for s, default in ((signal.SIGINT, signal.default_int_handler),
                                             (signal.SIGTERM, signal.SIG_DFL))
                        if enabled and main and signal.getsignal(s) is default]

    def __enter__(self):
        self.pid = os.getpid()
        for s in self.signals:
            self.prev[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        if os.getpid() != self.pid:
            # a forked DataLoader worker inherits this handler. It gets the terminal's Ctrl-C
            # too: it keeps serving batches, and the training process stops it when it
            # leaves. A SIGTERM there is the DataLoader stopping it: die as by default.
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if signum == signal.SIGINT and self.asked == signal.SIGINT:
            raise KeyboardInterrupt
        if self.asked:  # a SIGTERM after either, or a first Ctrl-C after a SIGTERM
            self.asked = signum if signum == signal.SIGINT else self.asked
            return
        self.asked = signum
        if not self.announce:
            return
        msg = ("\nCtrl-C: stopping after this step and saving it (press Ctrl-C again to stop at "
               "once, losing the steps since the last checkpoint)\n" if signum == signal.SIGINT
               else "\nSIGTERM: stopping after this step and saving it\n")
        try:  # unbuffered: print() here could re-enter a write the bar was in the middle of
            os.write(sys.stderr.fileno(), msg.encode())
        except (OSError, ValueError, AttributeError):  # no real stderr (captured, closed)
            pass

    def __exit__(self, *exc):
        for s, prev in self.prev.items():
            signal.signal(s, prev)
        self.prev = {}
        return False


def _new_window(state: dict | None = None) -> dict:
    """The running sums of the steps since the last train row (from a checkpoint's state)."""
    win = {"n": 0, "loss": 0.0, "wait": 0.0, "time": 0.0, "heads": {}, "lr": None}
    if state:
        win.update({k: state[k] for k in ("n", "loss", "wait", "time")})
        win["lr"] = state.get("lr")
        win["heads"] = {k: list(v) for k, v in state.get("heads", {}).items()}
    return win


def _window_state(win: dict) -> dict:
    # floats, not device tensors: weights_only-loadable, and resumable on another device
    return {"n": int(win["n"]), "loss": float(win["loss"]), "wait": float(win["wait"]),
            "time": float(win["time"]), "lr": win["lr"],
            "heads": {k: [float(x) for x in v] for k, v in win["heads"].items()}}


def _is_fused(model) -> bool:
    """A model med3d_ext.nn.fuse_modules switched to the fused path (its classes say so)."""
    return any(getattr(type(m), "_m3d_fused", False) for m in model.modules())


def _oom_message(cfg, where: str, model=None) -> str:
    p = cfg.get("patch")
    # --memory-saving where it would be taken and would do something (see cli)
    suggest = (where == "training" and model is not None and _is_fused(model)
               and not (cfg.get("memory_saving") or cfg.get("compile") or cfg.get("sync_bn")))
    saving = "--memory-saving, " if suggest else ""
    return (f"out of GPU memory during {where} (patch {p}, batch size {cfg.get('batch_size')}). "
            f"Use a smaller --patch (e.g. {[max(8, (v // 2) // 8 * 8) for v in p]}) or "
            f"--batch-size, {saving}--amp bf16, or --sw-batch-size 1 for evaluation.")


def score_target(cfg: dict, kind: str) -> float:
    """The validation score whose first reaching step is recorded (``target_step``): for a
    classification run (``kind`` "cls") the accuracy target ``target_acc`` (--target-acc),
    else ``target_dice``'s value (what classification runs took before --target-acc); for
    segmentation and pretraining the Dice target ``target_dice``. Never reached when unset."""
    if kind == "cls" and cfg.get("target_acc") is not None:
        return float(cfg["target_acc"])
    return float(cfg.get("target_dice", math.inf))


def run_training(cfg: dict, job: Job, run_dir, ctx: DistContext | None = None,
                 resume_from=None, on_start=None) -> dict:
    """Train ``job`` for cfg["epochs"] x cfg["steps"] steps. Returns a summary dict
    (best score/step, first step reaching :func:`score_target`, wall time, checkpoint paths).
    ``on_start()`` runs once the run is known to go ahead (a resumed checkpoint accepted),
    before the first step: the CLI writes config.yaml there, so a refused resume leaves the
    run's saved configuration as it was."""
    from tqdm.auto import tqdm

    ctx = ctx or DistContext(device=next(job.model.parameters()).device)
    run_dir = Path(run_dir)
    dev = ctx.device
    model = job.model
    steps_per_epoch, epochs = int(cfg["steps"]), int(cfg["epochs"])
    total = steps_per_epoch * epochs
    opt = build_optimizer(job.groups, cfg)
    sched = build_scheduler(opt, cfg, total)
    amp = autocast_dtype(cfg["amp"], dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    if resume_from is None and ctx.is_main:
        # a fresh run in a folder where an earlier one stopped before its first checkpoint
        # ("run the same command again to start over"): its rows and events would otherwise
        # stay, and every step it logged would be in the log twice
        # (only the files this loop writes: tb/ may hold a user's other event folders)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        for f in (run_dir / "tb").glob("events.out.tfevents.*"):
            f.unlink(missing_ok=True)
    logger = RunLogger(run_dir, enabled=ctx.is_main)
    start, best, target_step = 0, {"score": -math.inf, "step": -1}, None
    target = score_target(cfg, job.kind)
    frozen = False
    saved_at = {"step": None}  # the step of the newest last.pt (what an interruption keeps)
    # the steps since the last train row of metrics.jsonl; saved in every checkpoint, so that a
    # run resumed after a kill writes the row that covers them as the uninterrupted run did
    win = _new_window()

    if resume_from is not None:
        path = find_checkpoint(resume_from, "last")
        ck = load_checkpoint(path)
        # the options given with --resume do not fit the run: the command line's error (exit
        # status 2, as the other refusals of --resume), not a failure of the run
        if ck["arch"] != job.arch:
            raise ConfigError(f"--resume {str(path)!r}: the checkpoint's model {ck['arch']} "
                              f"differs from the one this configuration builds {job.arch}")
        if int(ck["step"]) > total:  # before anything is loaded (the sampler, bounded by the
            # run's steps, would refuse the position first), and before on_start: config.yaml
            # keeps describing the run
            done = -(-int(ck["step"]) // max(steps_per_epoch, 1))
            raise ConfigError(
                f"--resume {str(path)!r}: the run already did {int(ck['step'])} steps, more "
                f"than --epochs {epochs} x --steps {steps_per_epoch} = {total}; --epochs "
                f"extends a run, it does not shorten one: give --epochs {done} or more (or "
                "evaluate the run as it is)")
        # frozen after the DDP wrap below, as a fresh run is: DDP registers only parameters
        # that require grad when it is built, and an encoder frozen before it never had its
        # gradients averaged once it thawed (the ranks' encoders drifted apart)
        resume_frozen = ck["epoch"] < job.freeze_epochs
        _check_resumed_spacing(ck.get("preprocessing"), job.extra.get("preprocessing"), path)
        _keep_class_names(ck, job, path)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _apply_hyperparameters(opt, sched, job, cfg)
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        # The checkpoint holds rank 0's streams (rank 0 alone saves). Each rank keeps its own
        # sampler seed (batches depend only on seed and position: exact) and, under torchrun,
        # restarts its augmentation stream from its own seed and the step (else every rank
        # trained on rank 0's patches after a resume).
        own_seed = job.loader.state_dict().get("seed")
        job.loader.load_state_dict(ck["sampler"] if own_seed is None else
                                   dict(ck["sampler"], seed=own_seed))
        if ck.get("augment") is not None and hasattr(job.augment, "load_state_dict"):
            own_aug = job.augment.state_dict().get("seed") if ctx.world_size > 1 else None
            job.augment.load_state_dict(ck["augment"])
            if own_aug is not None and hasattr(job.augment, "reseed"):
                job.augment.reseed((int(own_aug) * 1000003 + int(ck["step"])) % 2**63)
        start = int(ck["step"])
        saved_at["step"] = start
        best = dict(ck.get("best") or best)
        target_step = ck.get("target_step")
        if ck.get("log_window"):
            win = _new_window(ck["log_window"])
        if ctx.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start, steps_per_epoch)

    net = wrap_ddp(model, ctx, sync_bn=cfg.get("sync_bn", False),
                   find_unused=job.find_unused or job.freeze_epochs > 0)
    if resume_from is not None and resume_frozen:
        _set_frozen(model, True)
        frozen = True
    graphed = False  # compiled with CUDA graphs: each step must be marked (below)
    if cfg.get("compile"):
        mode = cfg.get("compile_mode", "default")
        net = compile_for_training(net, model, mode)
        graphed = mode in ("reduce-overhead", "max-autotune") and dev.type == "cuda"
    if on_start is not None:
        on_start()

    def save(name: str, step: int) -> Path:
        path = save_checkpoint(
            run_dir / f"{name}.pt", arch=job.arch, model=model, optimizer=opt, scheduler=sched,
            scaler=scaler, step=step, epoch=step // max(steps_per_epoch, 1), config=cfg,
            extra={"sampler": job.loader.state_dict(), "best": dict(best),
                   "augment": (job.augment.state_dict()
                               if hasattr(job.augment, "state_dict") else None),
                   "target_step": target_step, "log_window": _window_state(win),
                   **job.extra})
        if name == "last":  # once written: a Ctrl-C during the write keeps the previous one
            saved_at["step"] = step
        return path

    it = iter(job.loader)

    def next_batch():
        # creating the DataLoader iterator draws from torch's global RNG: keep it out of the
        # augmentation stream so that resuming mid-run replays the same random numbers
        with torch.random.fork_rng(devices=[]):
            return next(it)

    bar = tqdm(total=total, initial=start, disable=bar_disable(ctx.is_main and cfg.get("progress")),
               desc=job.kind, dynamic_ncols=True, leave=False)
    last_dice = {"fn": None}  # the newest step's dice_fn (a train row reports its batch)
    # Each step's loss stays on the device until the next log or checkpoint, where all of them
    # are checked and summed with one host sync: a per-step .item() / isfinite() would make the
    # host wait for every step's GPU work before queueing the next, and on a GPU whose steps
    # are as short as their host-side work that idles the GPU for about half of each step.
    # A non-finite loss is still reported with its step, and no checkpoint is written after it.
    pending = []  # (step, epoch, loss tensor) not yet checked

    def flush_losses():
        if not pending:
            return
        vals = torch.stack([v for _, _, v in pending]).cpu().tolist()
        for (at_step, at_epoch, _), v in zip(pending, vals):
            if not math.isfinite(v):
                raise TrainingError(_non_finite_message(f"non-finite loss ({v})", at_step,
                                                        at_epoch, epochs, run_dir,
                                                        saved_at["step"], opt, cfg, job.kind))
            win["loss"] += v
        pending.clear()

    def check_weights(at_step: int) -> None:
        """Before a validation or checkpoint: a diverged model would be validated as "predicts
        background" and saved as a checkpoint that every later command reads."""
        bad = _non_finite_weights(model)
        if bad:
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise TrainingError(_non_finite_message(
                f"non-finite weights ({len(bad)} tensor(s): {shown})", at_step,
                (at_step - 1) // steps_per_epoch + 1, epochs, run_dir, saved_at["step"], opt, cfg,
                job.kind))

    def log_train_row(at_step: int) -> None:
        """One train row: the means over the steps since the previous row (losses flushed)."""
        nonlocal win
        if not win["n"]:
            return
        sps = win["n"] * job.samples_per_step * ctx.world_size / max(win["time"], 1e-9)
        # metrics.jsonl: "step" counts optimizer steps done, "epoch" is the 1-based
        # number of the epoch the row belongs to, for train and val rows alike
        # lr: the rate the window's last step trained with (the optimizer's now is the next's)
        lr = win["lr"] if win["lr"] is not None else opt.param_groups[-1]["lr"]
        rec = {"kind": "train", "step": at_step, "epoch": (at_step - 1) // steps_per_epoch + 1,
               "loss": win["loss"] / win["n"], "lr": lr,
               "samples_s": sps, "voxels_s": sps * job.voxels_per_sample,
               "data_wait": win["wait"] / max(win["time"], 1e-9)}
        for k, v in win["heads"].items():
            rec[k] = float(sum(v)) / len(v)
        if last_dice["fn"] is not None:
            rec.update(last_dice["fn"]())
        logger.log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", dice=f"{rec.get('dice', float('nan')):.3f}",
                        sps=f"{sps:.1f}", vox_s=f"{rec['voxels_s']:.2g}",
                        wait=f"{rec['data_wait']:.0%}")
        win = _new_window()

    def stop_here(step: int):
        """After a Ctrl-C or SIGTERM (every rank calls it at the same step): keep the steps
        done (unless a non-finite loss is among them), log the train row of the steps since
        the last one, then leave with a message saying how to go on."""
        flush_losses()
        logged = win["n"] > 0
        log_train_row(step)
        # re-saved after the row, also when last.pt already has this step: its log window
        # would otherwise make a resumed run log these steps a second time
        if saved_at["step"] != step or logged:
            run_on_main(lambda: save("last", step), ctx)  # every rank waits for the save
        raise TrainingInterrupted(
            f"interrupted after step {step} of {total}; saved {run_dir / 'last.pt'}; continue "
            f"with `{resume_command(job.kind, run_dir)}`", ctrl_c.asked or signal.SIGINT)

    t_run = time.perf_counter()
    model.train()
    step = start
    profiler = StepProfiler(cfg.get("profile"), run_dir, dev, enabled=ctx.is_main,
                            log=lambda m: bar.write(m) if ctx.is_main else None)
    ctrl_c = _CtrlC(announce=ctx.is_main)
    try:
        ctrl_c.__enter__()
        while step < total:
            # under torchrun the ranks may see the signal at different steps: they agree to
            # stop at the first step boundary where any of them has seen it
            if any_rank(bool(ctrl_c.asked), ctx):
                stop_here(step)
            epoch = step // steps_per_epoch
            want_frozen = epoch < job.freeze_epochs
            if want_frozen != frozen:
                _set_frozen(model, want_frozen)
                frozen = want_frozen
            profiler.before(step)
            t0 = time.perf_counter()
            try:
                batch = next_batch()
            except StopIteration:
                raise TrainingError("the batch loader ran out before the last step") from None
            except Exception:
                if ctrl_c.asked:  # the terminal's Ctrl-C also stopped the DataLoader workers
                    stop_here(step)
                raise
            t1 = time.perf_counter()
            try:
                inputs = job.prepare(batch, dev)
                if graphed:  # a new iteration: the last step's graph outputs may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss, info, dice_fn = job.step_fn(net, inputs)
                pending.append((step + 1, epoch + 1, all_reduce_mean(loss.detach().float(), ctx)))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.get("grad_clip", 0) > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                scaler.step(opt)
                scaler.update()
                win["lr"] = opt.param_groups[-1]["lr"]
                if scaler.is_enabled():
                    # fp16: the scaler skips the optimizer step when its scale overflows (the
                    # first steps, by design) and torch then warns that the schedule stepped
                    # "before optimizer.step()"; the schedule follows the step count on purpose
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=r"Detected call of "
                                                r"`lr_scheduler\.step\(\)` before")
                        sched.step()
                else:
                    sched.step()
            except torch.OutOfMemoryError as e:
                raise TrainingError(_oom_message(cfg, "training", model)) from e
            step += 1
            profiler.after(step)
            if cfg.get("step_sleep"):
                time.sleep(cfg["step_sleep"])
            t2 = time.perf_counter()
            win["n"] += 1
            win["wait"] += t1 - t0
            win["time"] += t2 - t0
            for k, v in info.items():  # tensors: converted at log time (no per-step sync)
                win["heads"].setdefault(k, []).append(v.detach() if torch.is_tensor(v) else v)
            last_dice["fn"] = dice_fn
            end_of_epoch = step % steps_per_epoch == 0
            log_now = step % max(cfg["log_every"], 1) == 0 or step == total or end_of_epoch
            if log_now or end_of_epoch or (cfg.get("ckpt_every") and step % cfg["ckpt_every"] == 0):
                t_flush = time.perf_counter()
                flush_losses()  # before any log row or checkpoint
                # the wait for the queued GPU work belongs to the steps' time (samples/s)
                win["time"] += time.perf_counter() - t_flush
            if end_of_epoch or (cfg.get("ckpt_every") and step % cfg["ckpt_every"] == 0):
                check_weights(step)  # every rank: all stop together under torchrun
            if log_now:
                log_train_row(step)
            bar.update(1)
            if end_of_epoch:
                if ctx.is_main:
                    model.eval()
                    # whole-volume validation can take minutes: the bar says what it waits for
                    bar.set_description(f"{job.kind} (validating)")
                    try:
                        with torch.autocast(dev.type, dtype=amp or torch.float32,
                                            enabled=amp is not None):
                            val = job.validate(model)
                    except torch.OutOfMemoryError as e:
                        raise TrainingError(_oom_message(cfg, "validation")) from e
                    bar.set_description(job.kind)
                    model.train()
                    if frozen:  # model.train() must not wake frozen BatchNorm
                        _set_frozen(model, True)
                    score = float(val.get("score", float("nan")))
                    if target_step is None and score >= target:
                        target_step = step
                    improved = score > best["score"]
                    if improved:
                        best = {"score": score, "step": step}
                    logger.log({"kind": "val", "step": step, "epoch": epoch + 1, **val,
                                "target_step": target_step})
                    save("last", step)
                    if improved:
                        save("best", step)
                    logger.curves()
                barrier(ctx)
            elif cfg.get("ckpt_every") and step % cfg["ckpt_every"] == 0 and ctx.is_main:
                save("last", step)
    except KeyboardInterrupt:  # a second Ctrl-C, or one where the handler is not installed
        last = saved_at["step"]
        keep = (f"the last checkpoint is {run_dir / 'last.pt'} (step {last}); continue with "
                f"`{resume_command(job.kind, run_dir)}`" if last is not None else
                "no checkpoint was written yet; run the same command again to start over")
        raise TrainingInterrupted(f"interrupted after step {step} of {total}; {keep}",
                                  signal.SIGINT) from None
    finally:
        ctrl_c.__exit__()
        bar.close()
        logger.close()
        profiler.close()  # never raises
    return {"best_score": best["score"], "best_step": best["step"], "target_step": target_step,
            # what the score (and the target: --target-dice, classification --target-acc)
            # measures
            "score_metric": "accuracy" if job.kind == "cls" else "dice",
            "target": target if math.isfinite(target) else None,
            "steps": total, "start_step": start, "time_s": time.perf_counter() - t_run,
            "last": str(run_dir / "last.pt"), "best": str(run_dir / "best.pt"),
            "profile": str(run_dir / "profile") if profiler.written else None}

