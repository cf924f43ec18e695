"""``python -m med3d_ext.train {pretrain,transfer,evaluate,predict,demo}`` (no arguments: the
demo).

Plain functions: :func:`run_pretrain`, :func:`run_transfer`, :func:`run_evaluate` and
:func:`run_predict` take a resolved configuration dict (``config.resolve``) and return a
summary dict; :func:`main` is the argument parsing around them.

Exit status of :func:`main` (``python -m med3d_ext.data`` uses the same), decided by the kind
of error, wherever it is met (:func:`exit_status`):

* 0: done.
* 2 (``EXIT_USAGE``, argparse's status for usage errors): the command cannot run as given and
  its command line (or ``--config`` file) has to change: an unknown option or key, a bad
  value, options that contradict each other or the run (``--resume`` with a smaller
  ``--epochs``, ``--checkpoint`` of another kind of run, a ``--head`` the run lacks, a
  classification folder for a segmentation run), a path named by an option that is not there
  or not what it needs (``--data``, ``--pretrained``, ``--run``, ``--checkpoint``,
  ``--images``, ``--resume``, ``--config``), an ``--out``/``--cache`` that cannot be used, a
  ``--device`` this machine lacks. :class:`~.config.ConfigError`,
  :class:`med3d_ext.data.DataPathError`, :class:`~.distributed.DeviceError`.
* 1 (``EXIT_FAILURE``): a failure while running, met in what was read or computed: bad data
  (a :class:`med3d_ext.data.DataError` or a bad ``labels.csv``: an unreadable, corrupt or NaN
  image, a malformed ``dataset.json``, an undeclared label; whatever ``--skip-bad`` skips, in
  every command, predict included), an unreadable checkpoint or weights file, non-finite
  weights or outputs, a run that diverged, out of memory, a disk error.
* 130 / 143: interrupted (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import _signals
from . import config as C

__all__ = ["build_parser", "main", "run_pretrain", "run_transfer", "run_evaluate",
           "run_predict", "train_command", "resolve_args", "exit_status", "EXIT_FAILURE",
           "EXIT_USAGE"]

EXIT_FAILURE = 1  # a failure while running: bad data, a bad checkpoint, divergence, a disk
EXIT_USAGE = 2  # the command cannot run as given (argparse's status for usage errors)

_DESC = {
    "pretrain": "Med3D co-training: one encoder, one head per --data dataset",
    "transfer": "fine-tune a pretrained encoder (ours or MedicalNet's) on a seg or cls task",
    "evaluate": "sliding-window inference of a run: NIfTI predictions in each case's source "
                "space, Dice and HD95 where labelled (--split test: the dataset's unlabelled "
                "test images, imagesTs/)",
    "predict": "apply a trained run to image files or folders of them (no dataset layout "
               "needed): <case>.nii.gz in each image's own grid (segmentation) or "
               "predictions.csv (classification), preprocessed with the run's training recipe",
}


# torch's CPU bf16 conv3d weight gradient is unreliable for some shapes: F.conv3d alone, 2 x 128
# x 2^3 input, 128 x 128 x 3^3 weight, padding 1, torch 2.13.0+cpu on this project's 2-core AMD
# EPYC: four identical backward calls gave weight gradients up to 1e36 apart (ResNet-10's
# layer2.0.conv2 on a 16-voxel patch). Related upstream report of wrong CPU bf16 convolutions:
# pytorch/pytorch#169688. Training on the CPU runs fp32 by default (--amp auto).
CPU_BF16_WARNING = ("warning: --amp bf16 on the CPU: torch's CPU bf16 conv3d weight gradient "
                    "has given wrong values for small inputs (garbage in one of four identical "
                    "calls, torch 2.13); --amp auto (fp32 on the CPU) is safe")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m med3d_ext.train",
        description="Med3D pretraining, transfer and evaluation. Without arguments: the "
                    "embedded demo (Med3D in miniature).")
    sub = p.add_subparsers(dest="command")
    for cmd in ("pretrain", "transfer", "evaluate", "predict"):
        sp = sub.add_parser(cmd, help=_DESC[cmd], description=_DESC[cmd])
        C.add_options(sp, cmd)
    d = sub.add_parser("demo", help="Med3D in miniature (the default without arguments)")
    d.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    d.add_argument("--quick", action="store_true", help="reduced sizes (tests)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--threads", type=_demo_threads, default=None,
                   help="torch CPU threads (default: torch's own; 1 on a shared or small machine)")
    return p


def _demo_threads(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v!r}")
    return n


def resolve_args(ns: argparse.Namespace, explicit: set | None = None) -> dict:
    """Namespace of one command -> resolved configuration (a resumed run starts from its
    saved config.yaml, then applies what was given now)."""
    cmd = ns.command
    cli = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "overrides")}
    explicit = set() if explicit is None else explicit
    sources: dict = {}  # where each given value came from: errors name it as it was given
    cfg = C.resolve(cmd, cli, ns.config, ns.overrides, explicit=explicit, sources=sources)
    if cmd != "evaluate" and cfg.get("resume"):
        given = Path(cfg["resume"])
        run = given.parent if given.is_file() else given
        saved = run / "config.yaml"
        if not saved.is_file():
            where = f"in {str(run)!r}, the file's folder" if given.is_file() else "there"
            raise C.ConfigError(f"--resume {str(given)!r}: no config.yaml {where} (not a run "
                                "folder, nor a checkpoint in one)")
        if not any((run / f).is_file() for f in ("last.pt", "best.pt")):
            raise C.ConfigError(f"--resume {str(run)!r}: the run stopped before its first "
                                f"checkpoint; start it again with --out {run} (no --resume)")
        saved_cfg = C.load_config(saved)
        # a transfer run's config has "task"; a pretraining run's has not
        other = {"pretrain": "task" in saved_cfg, "transfer": "task" not in saved_cfg}[cmd]
        if other:
            kind = "transfer" if cmd == "pretrain" else "pretrain"
            raise C.ConfigError(f"--resume {str(run)!r} is a {kind} run; resume it with "
                                f"`python -m med3d_ext.train {kind} --resume {run}`")
        if cli.get("out") and Path(cli["out"]).resolve() != run.resolve():
            raise C.ConfigError(f"--resume continues {str(run)!r} in that folder; drop --out "
                                f"{cli['out']} (to branch off, copy the run folder first)")
        base = {k: v for k, v in saved_cfg.items() if k in C.keys_for(cmd)}
        td = base.get("target_dice")
        if isinstance(td, (int, float)) and not isinstance(td, bool) and td > 1:
            # saved before --target-dice was checked to be a score in [0, 1] (the convergence
            # study's runs used 2.0 for "never"): a resume must not be refused for it
            base["target_dice"] = 1.0
        sources.clear()
        cfg = C.resolve(cmd, cli, ns.config, ns.overrides, base=base, explicit=explicit,
                        sources=sources)
        for key, why in _FIXED_ON_RESUME.items():
            if key in base and cfg.get(key) != base[key]:
                raise C.ConfigError(
                    f"--resume {str(run)!r}: {C.option_name(key, sources.get(key))} "
                    f"{cfg[key]!r} differs from the run's {base[key]!r}, and {why}; resume with "
                    f"the run's {key}, or start a new run")
        _check_resumed_data(run, base.get("data"), cfg.get("data"))
        _keep_start_options(run, cfg, base, explicit)
        cfg["out"] = str(run)
        # a checkpoint named by its file is the one resumed (RUN/best.pt went on from last.pt)
        cfg["resume"] = str(given) if given.is_file() else str(run)
    if cmd in ("pretrain", "transfer"):
        C.check_training(cfg, sources)
    elif cmd in ("evaluate", "predict"):
        C.check_evaluate(cfg, explicit)
    return cfg


def _check_resumed_data(run: Path, saved, given) -> None:
    """A resumed run trains on the data it started with: a --data naming other datasets was
    taken silently (a kidney run went on with liver, its metrics and best checkpoint mixing
    the two). Datasets are compared by their folders (a MedicalNet list file counts as its
    folder): the same folders where the saved ones still exist, else folders of the same
    names, so a dataset moved to another disk can be named at its new place."""
    if not saved or not given:
        return

    def folder(d) -> Path:
        p = Path(os.path.abspath(str(d)))  # "." and ".." have names once absolute
        return p.parent if p.suffix == ".txt" else p

    old, new = [folder(d) for d in saved], [folder(d) for d in given]
    if all(p.exists() for p in old):
        same = sorted(map(os.path.realpath, old)) == sorted(map(os.path.realpath, new))
    else:
        same = sorted(p.name for p in old) == sorted(p.name for p in new)
    if not same:
        raise C.ConfigError(
            f"--resume {str(run)!r}: --data {' '.join(map(str, given))} is not the run's data "
            f"({' '.join(map(str, saved))}); a resumed run goes on with the same dataset(s) "
            "(a folder moved elsewhere, no longer at its old path, is fine under its old "
            "name). Drop --data, or start a new run "
            "to train on other data")


def _keep_start_options(run: Path, cfg: dict, base: dict, explicit: set) -> None:
    """A resumed run keeps the options that only act when a run starts (_START_ONLY): given
    again with another value they were ignored, yet recorded in config.yaml and every
    checkpoint (``pretrained: other.pth`` for an encoder that came from the first file), and
    --pretrained or --from-scratch also switched the encoder's learning rate (one rate for a
    new encoder, two for a pretrained one). One warning names what was ignored and what was
    kept."""
    said = []
    for key in _START_ONLY:
        if key not in cfg or key not in explicit:
            continue
        kept = base.get(key, C.defaults("transfer")[key])
        given = cfg[key]
        if key == "pretrained" and given and kept:  # saved absolute: the same file is fine
            same = os.path.abspath(str(given)) == os.path.abspath(str(kept))
        else:
            same = given == kept
        cfg[key] = kept
        if not same:
            flag = "--" + key.replace("_", "-")
            shown = flag if given is True else f"--no-{key.replace('_', '-')}" \
                if given is False else f"{flag} {given}"
            said.append(f"{shown} is ignored, the run's {key} {kept!r} is kept")
    if said:
        warnings.warn(f"--resume {str(run)!r}: " + "; ".join(said) + " (it acts only when a run "
                      "starts: a resumed run's weights come from its checkpoint); to start from "
                      "other weights, start a new run", stacklevel=3)


# Options that act only when a run starts (the encoder's initial weights, and from them the
# learning rate of its parameter group): a resumed run keeps the run's own values.
_START_ONLY = ("pretrained", "from_scratch")


# What a resumed run cannot change (the learning rates, momentum, weight decay, epochs and the
# rest can: the checkpoint's optimizer state is kept and the new values apply from there).
_FIXED_ON_RESUME = {
    "steps": "an epoch's length is what the run's step, epoch and log numbers count in",
    "optimizer": "the checkpoint's optimizer state (momentum buffers or Adam moments) belongs "
                 "to the other optimizer",
}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup(cfg, command):
    from .backends import fusion_available
    from .distributed import init_distributed

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    ctx = init_distributed(cfg["device"])
    fused = cfg.get("fused")
    if fused is None:
        fused = ctx.device.type == "cuda" and fusion_available()
    elif fused and not fusion_available():
        raise C.ConfigError("--fused: the fused ops are not available in this build (compiled "
                            "extension or med3d_ext.nn missing); use --no-fused")
    if cfg.get("sync_bn") and ctx.device.type != "cuda":
        # before any data is read or model built (it failed on every rank with a traceback)
        raise C.ConfigError(f"--sync-bn: SyncBatchNorm runs on CUDA devices only (this run is "
                            f"on {ctx.device}); drop --sync-bn for gloo/CPU runs")
    cl = cfg.get("channels_last")
    if cl is None:
        cl = ctx.device.type == "cuda"
    if ctx.device.type == "cuda":
        # what the benchmarks measure with: the 3-D convolutions' default algorithms (cuDNN's
        # heuristics) can be several times slower than the tuned ones at these shapes
        torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark", True))
    return ctx, bool(fused), bool(cl)


def _run_dir(cfg, command, ctx) -> Path:
    from .distributed import broadcast_object, run_on_main

    out = cfg.get("out") or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(broadcast_object(str(out), ctx))

    def check_and_make():  # rank 0; a refusal reaches every rank (no rank left at a barrier)
        if out.exists() and not out.is_dir():
            raise C.ConfigError(f"--out {str(out)!r} is a file; a run folder is needed")
        if not cfg.get("resume") and (out / "last.pt").exists():
            raise C.ConfigError(f"run folder {str(out)!r} already holds a checkpoint; resume it "
                                f"with --resume {out} or choose another --out")
        make_output_dir(out, "--out")

    run_on_main(check_and_make, ctx)
    return out


def make_output_dir(path, option: str) -> Path:
    """Create an output folder, or fail with an error that names the option and the reason
    (a parent that is a file, no permission, a read-only disk) before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise C.ConfigError(f"{option} {str(path)!r}: cannot create this folder "
                            f"({e.strerror or e}{_where(e, path)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise C.ConfigError(f"{option} {str(path)!r}: this folder is not writable")
    return path


def _where(e: OSError, path) -> str:
    return f": {e.filename}" if e.filename and str(e.filename) != str(path) else ""


def _absolute_paths(cfg: dict) -> dict:
    """Input paths made absolute, so that the saved config.yaml (what --resume reads) and the
    checkpoint's config work from any working directory (a resumed cluster job rarely starts
    where the first one did)."""
    cfg = dict(cfg)
    if cfg.get("data"):
        cfg["data"] = [os.path.abspath(d) for d in cfg["data"]]
    for key in ("pretrained", "cache"):
        if cfg.get(key):
            cfg[key] = os.path.abspath(cfg[key])
    return cfg


def train_command(command: str, cfg: dict, log=print) -> dict:
    """Run ``pretrain`` or ``transfer`` with a resolved configuration; returns the summary."""
    from .distributed import barrier, cleanup, run_on_main
    from .loops import run_training
    from .tasks import (check_cache_outside_data, check_output_outside_data, dataset_folders,
                        pretrain_job, resolve_data_dirs, transfer_cls_job, transfer_seg_job)

    cfg = dict(cfg)
    ctx, fused, channels_last = _setup(cfg, command)
    made = None  # the run folder, when this call created it
    try:
        _check_memory_saving(cfg, fused, ctx.world_size)
        dirs = resolve_data_dirs(cfg.get("data"), command)
        folders = dataset_folders(dirs) if cfg.get("out") or cfg.get("cache") else {}
        check_output_outside_data(cfg.get("out"), folders, "--out", "checkpoints and logs")
        # a resumed run keeps the cache it was saved with (older versions accepted any)
        check_cache_outside_data(cfg.get("cache"), folders, refuse=not cfg.get("resume"))
        cfg = _absolute_paths(cfg)
        out_before = Path(cfg.get("out") or "").exists() if cfg.get("out") else False
        run = _run_dir(cfg, command, ctx)
        made = None if out_before else run
        cfg["out"] = str(run)
        if ctx.enabled and not (command == "transfer" and cfg["task"] == "cls"):
            from .tasks import open_preprocessed

            # one process fills the preprocessing cache, the others reuse it (bad data met
            # there stops every rank, not rank 0 alone)
            def fill_caches():
                for d in dirs:
                    open_preprocessed(d, cfg)

            run_on_main(fill_caches, ctx)
        barrier(ctx)
        _seed_everything(cfg["seed"])  # same on every rank: identical initial weights
        if command == "pretrain":
            cfg["depth"] = cfg.get("depth") or 10
            job = pretrain_job(cfg, dirs, ctx.device, ctx.rank, fused, channels_last)
        elif cfg["task"] == "seg":
            job = transfer_seg_job(cfg, dirs[0], ctx.device, ctx.rank, fused, channels_last)
        elif cfg["task"] == "cls":
            job = transfer_cls_job(cfg, dirs[0], ctx.device, ctx.rank, fused, channels_last)
        else:
            raise C.ConfigError(f"task: expected seg or cls, got {cfg['task']!r}")
        if cfg.get("memory_saving"):  # this model only (not the process-wide flag)
            from med3d_ext.nn import set_memory_saving

            set_memory_saving(job.model)
        if ctx.is_main:
            log(f"{command}: {job.arch} on {ctx.device} (world size {ctx.world_size}, "
                f"fused={fused}, amp={cfg['amp']}); run folder {run}")
            if ctx.device.type == "cpu" and cfg["amp"] == "bf16":
                log(CPU_BF16_WARNING)
            if job.extra.get("pretrained_load"):  # what the weights file filled, and what not
                log(job.extra["pretrained_load"])
            elif cfg.get("from_scratch") and cfg.get("pretrained") and not cfg.get("resume"):
                # both given (e.g. a config file's --pretrained plus the baseline's flag): say
                # which wins, so that a baseline is never mistaken for a transfer run
                log(f"from scratch: --pretrained {cfg['pretrained']} sets the architecture only "
                    "(depth, shortcut); none of its weights are loaded")
        tuning = None
        if command == "pretrain" and ctx.device.type == "cuda" and \
                torch.backends.cudnn.benchmark and cfg.get("tune_heads", True):
            tuning = _tune_heads(job, cfg, ctx, channels_last, log)
        # config.yaml is written once the data, model and any resumed checkpoint are accepted:
        # a refused --resume (other model, bad option) must not replace the run's config
        def save():
            C.save_config(cfg, run / "config.yaml")
            if job.extra.get("preprocessing"):  # also in every checkpoint; this copy is to read
                from .checkpoint import atomic_write

                text = json.dumps(job.extra["preprocessing"], indent=1)
                atomic_write(run / "preprocessing.json", lambda t: Path(t).write_text(text))
        save = save if ctx.is_main else None
        named = Path(cfg["resume"]) if cfg.get("resume") else None
        if ctx.is_main and named is not None and named.is_file() and \
                named.resolve() != (run / "last.pt").resolve() and (run / "last.pt").is_file():
            log(f"resuming from {named} as named (not the run's last.pt): the steps after it "
                f"are trained again, and {run / 'last.pt'} is replaced at the next save")
        summary = run_training(cfg, job, run, ctx, resume_from=cfg.get("resume"),
                               on_start=save)
        if tuning is not None:
            summary["head_tuning_s"] = tuning["seconds"]
        if ctx.is_main and cfg.get("resume") and summary["start_step"] >= summary["steps"]:
            # a finished run resumed as it was: say so, and how to train it longer
            log(f"nothing to train: {run} already did its {summary['steps']} steps "
                f"(--epochs {cfg['epochs']} x --steps {cfg['steps']}); to train longer, resume "
                f"it with a larger --epochs, e.g. --resume {run} --epochs {cfg['epochs'] * 2}")
        if ctx.is_main:
            if command == "pretrain" and cfg.get("export", True):
                from med3d_ext.models import save_encoder_medicalnet, save_encoder_safetensors

                summary["encoder_medicalnet"] = str(save_encoder_medicalnet(
                    job.model, run / "encoder_medicalnet.pth"))
                summary["encoder_safetensors"] = str(save_encoder_safetensors(
                    job.model, run / "encoder.safetensors"))
                ck = run / ("best.pt" if summary["best_step"] >= 0 else "last.pt")
                log(f"encoder exported (final weights): {summary['encoder_medicalnet']} "
                    f"(MedicalNet layout) and {summary['encoder_safetensors']}; transfer it "
                    f"with --pretrained {ck} or one of these")
            summary["run"] = str(run)
            validated = summary["best_step"] >= 0
            # no validation cases (--val-fraction 0, a one-case dataset): no best.pt, and no
            # -Infinity in summary.json (not JSON for most parsers)
            on_disk = summary if validated else dict(summary, best_score=None, best=None)
            (run / "summary.json").write_text(json.dumps(on_disk, indent=1, default=str))
            if validated:
                log(f"done: best validation score {summary['best_score']:.4f} at step "
                    f"{summary['best_step']}; run folder {run}")
            else:
                log(f"done: no validation cases (--val-fraction {cfg.get('val_fraction')}), so "
                    f"no best.pt; the final weights are {run / 'last.pt'}")
        barrier(ctx)
        return summary
    except BaseException:
        # a run refused before it started (bad --pretrained, data, option) leaves no empty run
        # folder behind to puzzle over (nor one that a retry with another --out would ignore)
        if made is not None and ctx.is_main and made.is_dir() and not any(made.iterdir()):
            made.rmdir()
        raise
    finally:
        cleanup(ctx)


def _check_memory_saving(cfg, fused: bool, world_size: int = 1) -> None:
    """--memory-saving needs the fused model, and does nothing under torch.compile (which
    plans its own graph's memory) or with SyncBatchNorm layers (not fused): refused rather
    than ignored."""
    if not cfg.get("memory_saving"):
        return
    if not fused:
        raise C.ConfigError("--memory-saving: rebuilds activations of the fused model only; "
                            "this run uses the plain PyTorch model (add --fused, or drop "
                            "--memory-saving)")
    if cfg.get("compile"):
        raise C.ConfigError("--memory-saving: has no effect under --compile (torch.compile "
                            "plans the compiled graph's memory itself); drop one of them")
    if cfg.get("sync_bn") and world_size > 1:
        raise C.ConfigError("--memory-saving: has no effect with --sync-bn (SyncBatchNorm "
                            "layers run unfused); drop one of them")


def run_pretrain(cfg: dict, log=print) -> dict:
    return train_command("pretrain", cfg, log)


def run_transfer(cfg: dict, log=print) -> dict:
    return train_command("transfer", cfg, log)


def _inference_setup(cfg: dict):
    """(device, fused) of evaluate and predict: --threads, --device, and --fused's default (on a
    GPU when the fused ops are available)."""
    from .distributed import resolve_device

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    dev = resolve_device(cfg["device"])
    fused = cfg.get("fused")
    if fused is None:
        from .backends import fusion_available

        fused = dev.type == "cuda" and fusion_available()
    return dev, bool(fused)


def run_predict(cfg: dict, log=print, explicit=()) -> dict:
    """``predict``: a run applied to --images; returns what predictions.json holds."""
    from .predict import predict

    dev, fused = _inference_setup(cfg)
    return predict(cfg, dev, fused=fused, log=log, explicit=explicit)


def run_evaluate(cfg: dict, log=print, explicit=()) -> dict:
    from .evaluate import evaluate

    dev, fused = _inference_setup(cfg)
    if not cfg.get("out"):
        # named after the run folder, also when --run / --checkpoint name a file in it (it was
        # predictions/best.pt/ for --run runs/x/best.pt)
        src = Path(str(cfg.get("run") or cfg.get("checkpoint") or "run"))
        name = src.resolve().parent.name if src.suffix in (".pt", ".pth") else src.name
        cfg = dict(cfg, out=f"predictions/{name}")
    return evaluate(cfg, dev, fused=fused, log=log, explicit=explicit)


def _printable_streams() -> None:
    """Class and case names may be in any language: on a console that cannot show a character
    it is escaped (\\xe9), not a UnicodeEncodeError after the work is done (predict's log
    failed before predictions.json was written)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream we may change
            pass


def main(argv=None) -> int:
    _printable_streams()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        # options without a command (`--out DIR`, `--device cuda`) configure the default demo
        argv = ["demo"] + argv
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv) if argv else (None, [])
    if extra:
        if ns.command == "demo":  # the demo takes only a few options: name them
            print(f"error: `demo` (what options without a command run): unknown option(s) "
                  f"{' '.join(extra)}; it takes --out, --device, --quick, --seed, --threads and "
                  "--no-progress (`python -m med3d_ext.train demo --help`)", file=sys.stderr)
            return EXIT_USAGE
        if ns.command not in ("pretrain", "transfer", "evaluate", "predict"):
            parser.parse_args(argv)  # argparse's own message (and exit 2)
        print(f"error: {_unrecognized(ns.command, extra)}", file=sys.stderr)
        return EXIT_USAGE
    if ns is not None and ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .loops import TrainingInterrupted
    try:
        with warnings.catch_warnings():
            # a user reads "warning: <what>" (e.g. the --skip-bad list), not a source line
            warnings.showwarning = _show_warning
            if ns is None or ns.command == "demo":  # no arguments: the demo
                from .demo import run_demo

                kw = {} if ns is None else dict(out=ns.out, device=ns.device, quick=ns.quick,
                                                seed=ns.seed, progress=not ns.no_progress,
                                                threads=ns.threads)
                run_demo(**kw)
                return 0
            explicit: set = set()
            cfg = resolve_args(ns, explicit)
            if ns.command in ("evaluate", "predict"):
                run = run_evaluate if ns.command == "evaluate" else run_predict
                with _signals.sigterm_as_interrupt():
                    run(cfg, explicit=explicit)
            else:
                train_command(ns.command, cfg)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, from the rank that saved
            print(str(e), file=sys.stderr)
        return 128 + getattr(e, "signum", 2)  # 130 after Ctrl-C, 143 after SIGTERM
    except KeyboardInterrupt as e:  # outside the training loop (preprocessing, evaluation)
        print("interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except Exception as e:  # noqa: BLE001 - the known kinds get one line and their status
        status = exit_status(e)
        if status is None:  # a bug: its traceback
            raise
        # every rank says it: under srun/mpirun each rank's output may go to a log of its own
        if isinstance(e, OSError) and not isinstance(e, _known_errors()):
            # a disk full or an unwritable path met mid-run
            print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
                  file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return status
    return 0


def exit_status(e: BaseException) -> int | None:
    """The exit status of an error that stops a command (the module docstring's table):
    EXIT_USAGE for the command line's errors, EXIT_FAILURE for failures while running, None
    for anything else (a bug, shown with its traceback)."""
    if isinstance(e, _usage_errors()):
        return EXIT_USAGE
    if isinstance(e, _known_errors()) or isinstance(e, OSError):
        return EXIT_FAILURE
    return None


def _usage_errors() -> tuple:
    from .distributed import DeviceError

    errs = [C.ConfigError, DeviceError]
    try:
        from med3d_ext.data import DataPathError

        errs.append(DataPathError)
    except ImportError:
        pass
    return tuple(errs)


def _tune_heads(job, cfg, ctx, channels_last, log) -> dict | None:
    """cuDNN's autotuning of every batch size a head will meet, before the first step rather
    than at random steps of the run (head_tuning.py says why)."""
    from .head_tuning import tune_head_shapes
    from .loops import autocast_dtype

    try:
        info = tune_head_shapes(job.model, cfg["patch"], cfg["batch_size"],
                                autocast_dtype(cfg["amp"], ctx.device), channels_last)
    except Exception as e:  # noqa: BLE001 - an optimisation: the run goes on without it
        if isinstance(e, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        if ctx.is_main:
            log(f"warning: cuDNN tuning of the heads' batch sizes failed, skipped (sizes are "
                f"tuned as they turn up): {type(e).__name__}: {e}")
        return None
    if ctx.is_main:
        log(f"cuDNN tuned for the heads' batch sizes {min(info['sizes'], default=0)}.."
            f"{max(info['sizes'], default=0)} "
            f"(class counts {info['class_counts']}) in {info['seconds']:.1f} s")
    return info


def _unrecognized(command: str, extra: list) -> str:
    """argparse's "unrecognized arguments", with the closest options (as --set key=value gets
    for a typo) and under the subcommand's name."""
    flags = [a for a in extra if a.startswith("--")]
    if not flags:
        return (f"`{command}`: unexpected argument(s) {' '.join(extra)} (options take the form "
                "--name value; `--help` lists them)")
    parts = []
    for a in flags:
        key = a[2:].split("=", 1)[0].replace("-", "_")
        if key.startswith("no_"):
            key = key[3:]
        if key in C.OPTIONS and command not in C.OPTIONS[key].commands:
            where = " and ".join(f"`{c}`" for c in C.OPTIONS[key].commands)
            parts.append(f"{a.split('=', 1)[0]} is an option of {where}, not of `{command}`")
            continue
        close = ["--" + k.replace("_", "-") for k in C.suggest(key, command)]
        parts.append(f"unknown option {a.split('=', 1)[0]}"
                     + (f"; did you mean {', '.join(close)}?" if close else ""))
    return f"`{command}`: " + "; ".join(parts) + " (`--help` lists every option)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr)


def _known_errors() -> tuple:
    """The failures while running (EXIT_FAILURE) that are said in one line."""
    from .checkpoint import CheckpointError
    from .loops import TrainingError

    errs = [CheckpointError, TrainingError, FileNotFoundError]
    try:
        from med3d_ext.models import MedicalNetWeightsError

        errs.append(MedicalNetWeightsError)
    except ImportError:
        pass
    try:
        from med3d_ext.data import DataError

        errs.append(DataError)
    except ImportError:
        pass
    return tuple(errs)
