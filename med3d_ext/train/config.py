"""Configuration of the training CLI: one schema, four sources, one resolved dict.

Every key has a default, a type and a help line; the same schema builds the ``--help`` of each
command, checks YAML files and ``--set key=value`` overrides, and is what ``config.yaml`` in
the run folder holds. Precedence, lowest first: schema defaults, ``--config FILE.yaml``,
explicit command-line options, ``--set`` (applied last, so a script can override anything).
An unknown key anywhere is an error that names the closest valid keys (difflib).
"""

from __future__ import annotations

import argparse
import difflib
import math
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Option", "OPTIONS", "keys_for", "defaults", "add_options",
           "resolve", "save_config", "load_config", "patch_size", "check_training",
           "check_evaluate"]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what was given."""


@dataclass(frozen=True)
class Option:
    default: Any
    kind: str  # int, float, str, bool, list, patch, axes, auto_bool / auto_int (None = auto)
    help: str
    commands: tuple = ("pretrain", "transfer", "evaluate")
    flag: bool = True  # also a command-line option (--key-name)
    by_command: tuple = ()  # ((command, default), ...) where a command's default differs
    help_by_command: tuple = ()  # ((command, help), ...) where a command's meaning differs

    def default_for(self, command: str):
        return dict(self.by_command).get(command, self.default)

    def help_for(self, command: str) -> str:
        return dict(self.help_by_command).get(command, self.help)


_T = ("pretrain", "transfer")
_ALL = ("pretrain", "transfer", "evaluate")
_INFER = ("evaluate", "predict")  # the commands that apply a trained run
_ANY = _ALL + ("predict",)

OPTIONS: dict[str, Option] = {
    # -- where / what
    "data": Option(None, "list", "raw dataset folder(s) (MSD / nnU-Net layout; transfer cls: a "
                   "folder with labels.csv)", _ALL),
    "out": Option(None, "str", "run folder (default: runs/<command>-<time>)", _ANY,
                  help_by_command=(
                      ("evaluate", "prediction folder (default: predictions/<run>)"),
                      ("predict", "prediction folder (required)"))),
    "cache": Option(None, "str", "preprocessing cache root (default: med3d_ext.data's)", _ALL),
    "resume": Option(None, "str", "run folder (or checkpoint) to resume", _T),
    "pretrained": Option(None, "str", "our checkpoint, a MedicalNet .pth or .safetensors",
                         ("transfer",)),
    "task": Option("seg", "str", "transfer task: seg | cls", ("transfer",)),
    "from_scratch": Option(False, "bool", "ignore --pretrained: random encoder (baseline)",
                           ("transfer",)),
    "skip_bad": Option(False, "bool", "drop bad cases (unreadable or NaN images, image/label "
                       "mismatch, undeclared labels, missing files) with a warning list "
                       "instead of stopping", _ANY,
                       help_by_command=(("predict", "drop bad images (unreadable, NaN, a wrong "
                                                    "channel count) with a warning list instead "
                                                    "of stopping"),)),
    "run": Option(None, "str", "run folder (or checkpoint) to evaluate or predict with",
                  _INFER),
    "checkpoint": Option("best", "str", "which checkpoint of the run: best | last | a path",
                         _INFER),
    "images": Option(None, "list", "predict: image files (.nii, .nii.gz, .nrrd, .nhdr, .mha, "
                     ".mhd; a 3-D .dcm) and folders of them (every image file directly "
                     "inside; a folder of one DICOM series is one image); nnU-Net channel "
                     "files <case>_0000, <case>_0001, ... of a folder make one case",
                     ("predict",)),
    "split": Option("all", "str", "cases to evaluate: all | val | train (the run's split of "
                    "the labelled cases) | test (the dataset's test images: imagesTs/ or "
                    "dataset.json's test list, usually unlabelled; preprocessed with the run's "
                    "training spacing and CT clip range)", ("evaluate",)),
    "head": Option(None, "str", "pretrain runs: head to predict with (default: evaluate, the "
                   "head named like the dataset; predict, the run's only head)", _INFER),
    # -- model
    "depth": Option(None, "int", "ResNet depth (default: pretrain 10; transfer: read from "
                    "--pretrained, else 10)", _T),
    "shortcut_type": Option(None, "str", "A | B (default: MedicalNet's for the depth)", _T),
    "channel": Option(None, "str", "input channel (sequence) of multi-channel datasets "
                      "(default: the first)", _ANY,
                      help_by_command=tuple((c, "input channel (sequence) of multi-channel "
                                                "images (default: the run's)") for c in _INFER)),
    "dropout": Option(0.5, "float", "classification head dropout", ("transfer",)),
    # -- optimisation
    "seed": Option(0, "int", "random seed (model init, sampling, augmentation)", _ALL,
                   help_by_command=(("evaluate", "not used by evaluate (taken so that a "
                                                 "training config file works)"),)),
    "epochs": Option(10, "int", "epochs (validation + checkpoint after each)", _T),
    "steps": Option(50, "int", "optimizer steps per epoch", _T),
    "batch_size": Option(4, "int", "samples per step (per process under torchrun)", _T),
    "patch": Option(48, "patch", "training patch: N or [D, H, W] (multiples of 8)", _ANY,
                    help_by_command=tuple(
                        (c, "sliding window: N or [D, H, W] (multiples of 8; default: the "
                            "run's training patch)") for c in _INFER)),
    "optimizer": Option("sgd", "str", "sgd (MedicalNet) | adamw", _T),
    "lr": Option(1e-2, "float", "learning rate", _T, by_command=(("transfer", 1e-3),),
                 help_by_command=(("transfer", "learning rate of the encoder (MedicalNet 1e-3)"),)),
    "head_lr": Option(1e-1, "float", "transfer: learning rate of the new head (MedicalNet "
                      "1e-1); from scratch every parameter uses it", ("transfer",)),
    "momentum": Option(0.9, "float", "SGD momentum", _T),
    "weight_decay": Option(1e-3, "float", "weight decay", _T),
    "schedule": Option("poly", "str", "lr schedule per step: poly | cosine | constant", _T),
    "freeze_epochs": Option(0, "int", "transfer: epochs with the encoder frozen", ("transfer",)),
    "grad_clip": Option(12.0, "float", "max gradient norm (0 = off)", _T),
    "fg_fraction": Option(1 / 3, "float", "share of patches centred on foreground", _T),
    "val_fraction": Option(0.2, "float", "share of cases held out for validation", _ALL,
                           help_by_command=(("evaluate", "not used by evaluate (--split val "
                                                         "reads the run's recorded split; taken "
                                                         "so that a training config file "
                                                         "works)"),)),
    "target_dice": Option(0.5, "float", "record the first step whose validation Dice reaches "
                          "this (target_step; classification runs: --target-acc)", _T),
    "target_acc": Option(None, "float", "transfer --task cls: record the first step whose "
                         "validation accuracy reaches this (target_step; default: --target-"
                         "dice's value, the target classification runs took before this "
                         "option)", ("transfer",)),
    "augment": Option(True, "bool", "random augmentation (segmentation: RandomAugment3D with "
                      "rotation up to 15 degrees, scale 0.85-1.15, flips, contrast, brightness "
                      "and noise, no elastic field; classification: axis flips)", _T),
    "label_grid": Option("logits", "str", "where the loss is computed: logits (labels sampled "
                         "nearest onto the 1/4 logit grid, MedicalNet) | patch (logits "
                         "upsampled trilinearly to the patch, as in evaluation; better for "
                         "small structures, slower)", _T),
    # -- performance
    "device": Option("auto", "str", "auto | cpu | cuda | cuda:N", _ANY),
    "amp": Option("auto", "str", "autocast: auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off",
                  _ANY),
    "channels_last": Option(None, "auto_bool", "channels_last_3d memory format (default: on "
                            "GPU)", _ALL),
    "fused": Option(None, "auto_bool", "fused C++/CUDA model ops (default: on a GPU when the "
                    "extension and med3d_ext.nn are available; the loss and augmentation ops "
                    "are used on the CPU too); --no-fused = plain PyTorch everywhere", _ANY),
    "memory_saving": Option(False, "bool", "fused model: rebuild each block's inner "
                            "activations and the stem's convolution input and output in "
                            "backward instead of keeping them (a bf16 ResNet-50 step at "
                            "8 x 64 x 128 x 128: peak 2.40 GiB instead of 2.92; costs some "
                            "extra work in backward)", _T),
    "compile": Option(False, "bool", "torch.compile the model (pretrain: its shared encoder; "
                      "the per-dataset heads stay eager)", _ALL),
    "compile_mode": Option("default", "str", "torch.compile mode with --compile: default | "
                           "reduce-overhead (CUDA graphs: replays each step's kernels without "
                           "the host's per-op work; patches have fixed shapes) | max-autotune | "
                           "max-autotune-no-cudagraphs", _ALL),
    "cudnn_benchmark": Option(True, "bool", "cuDNN autotuning on a GPU (patches have fixed "
                              "shapes, so each convolution is tuned once; --no-cudnn-benchmark "
                              "uses cuDNN's heuristics)", _ALL),
    "tune_heads": Option(True, "bool", "pretrain on a GPU with cuDNN autotuning: tune every "
                         "batch size a head is likely to meet before the first step "
                         "(--no-tune-heads: as they turn up, mid-run)", ("pretrain",)),
    "num_workers": Option(None, "auto_int", "DataLoader worker processes (default: auto = 0 "
                          "on the CPU, which keeps a resumed run bitwise reproducible; on a GPU "
                          "min(8, CPUs per process - 1), since loading in the training process "
                          "left the GPU waiting for data most of the time)", _T),
    "threads": Option(0, "int", "torch CPU threads (0 = torch's default)", _ANY),
    "profile": Option(None, "str", "torch.profiler over training steps: START:STEPS profiles "
                      "STEPS steps after the first START (e.g. 20:5); writes RUN/profile/ "
                      "(summary.json: kernel time and launches per step, the costliest ops; "
                      "ops.txt; trace.json for Perfetto)", _T),
    "sync_bn": Option(False, "bool", "SyncBatchNorm under torchrun", _T),
    # -- evaluation
    "overlap": Option(0.5, "float", "sliding-window overlap (0..1)", _ANY,
                      help_by_command=tuple((c, "sliding-window overlap (0..1; default: the "
                                                "run's, as its validation used)")
                                            for c in _INFER)),
    "sw_batch_size": Option(2, "int", "windows per forward in sliding-window inference (with "
                            "--tta: window copies, flips included, so a forward's memory stays "
                            "the same; raise it on a GPU that has room)", _ANY),
    "tta": Option(False, "bool", "mirroring test-time augmentation (nnU-Net's default at "
                  "inference): each window is also predicted flipped along every combination of "
                  "--tta-axes and the probabilities averaged; 2^k times the inference work for "
                  "k axes (8x with three)", _INFER),
    "tta_axes": Option((0, 1, 2), "axes", "axes mirrored by --tta, of the preprocessed (RAS) "
                       "volume: 0 = left-right, 1 = posterior-anterior, 2 = inferior-superior; "
                       "e.g. --tta-axes 0 1 (default: 0 1 2)", _INFER),
    "val_cases": Option(0, "int", "max validation cases per dataset (0 = all held out)", _T),
    # -- logging / checkpoints
    "log_every": Option(10, "int", "steps between metrics.jsonl lines", _T),
    "ckpt_every": Option(0, "int", "steps between extra last.pt saves (0 = each epoch)", _T),
    "export": Option(True, "bool", "pretrain: export the encoder (MedicalNet .pth and "
                     ".safetensors) at the end", ("pretrain",)),
    "progress": Option(True, "bool", "tqdm progress bar", _ANY),
    "step_sleep": Option(0.0, "float", "seconds to sleep after each step (tests of "
                         "interruption)", _T),
}


# Allowed values, checked wherever a value comes from (defaults, YAML, command line, --set,
# a resumed run's saved config): (predicate, what the message says is expected).
_DEPTHS = (10, 18, 34, 50, 101, 152, 200)
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
VALID: dict[str, tuple] = {
    "task": (lambda v: v in ("seg", "cls"), "seg | cls"),
    "checkpoint": (lambda v: bool(v), "best | last | a path"),
    "split": (lambda v: v in ("all", "val", "train", "test"), "all | val | train | test"),
    "depth": (lambda v: v in _DEPTHS, "one of " + ", ".join(map(str, _DEPTHS))),
    "shortcut_type": (lambda v: v in ("A", "B"), "A | B"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v >= 0, ">= 0 (numpy's generators take no negative seed)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "optimizer": (lambda v: v in ("sgd", "adamw"), "sgd | adamw"),
    "lr": (lambda v: v > 0, "> 0"),
    "head_lr": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "schedule": (lambda v: v in ("poly", "cosine", "constant"), "poly | cosine | constant"),
    "freeze_epochs": (lambda v: v >= 0, ">= 0"),
    "target_dice": (lambda v: 0 <= v <= 1, "in [0, 1] (a Dice score)"),
    "target_acc": (lambda v: 0 <= v <= 1, "in [0, 1] (an accuracy)"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "fg_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "val_fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "label_grid": (lambda v: v in ("logits", "patch"), "logits | patch"),
    "amp": (lambda v: v in ("auto", "bf16", "fp16", "off"), "auto | bf16 | fp16 | off"),
    "compile_mode": (lambda v: v in _COMPILE_MODES, " | ".join(_COMPILE_MODES)),
    "num_workers": (lambda v: v >= 0, ">= 0"),
    "threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    "overlap": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "sw_batch_size": (lambda v: v >= 1, ">= 1"),
    "tta_axes": (lambda v: 1 <= len(v) == len(set(v)) and all(0 <= a <= 2 for a in v),
                 "1 to 3 distinct axes among 0, 1, 2 (e.g. 0,1,2 or [0, 2]; no mirroring is "
                 "--no-tta, tta: false)"),
    "val_cases": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "ckpt_every": (lambda v: v >= 0, ">= 0 (0 = each epoch)"),
    "step_sleep": (lambda v: v >= 0, ">= 0"),
    "profile": (lambda v: _profile_spec_ok(v), "START:STEPS (START >= 0, STEPS >= 1), e.g. 20:5; "
                "in YAML and --set, quote it (profile: \"20:5\"): YAML 1.1 reads an unquoted "
                "20:5 as the base-60 number 1205"),
}


def _profile_spec_ok(v) -> bool:
    from .profiling import parse_spec

    try:
        return parse_spec(v) is not None
    except ValueError:
        return False


def keys_for(command: str) -> list[str]:
    return [k for k, o in OPTIONS.items() if command in o.commands]


def defaults(command: str) -> dict:
    # through coerce, so a default has the same type as the value a user would give
    return {k: coerce(k, OPTIONS[k].default_for(command)) for k in keys_for(command)}


def _bool(key, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true/false, got {v!r}")


def _nullable(key: str) -> bool:
    """Whether None (YAML null, ``key:`` with no value, ``--set key=``) means something for
    ``key``: only for options whose default is None ("auto", "not given")."""
    o = OPTIONS[key]
    return o.default is None or any(d is None for _, d in o.by_command)


def coerce(key: str, value):
    """Bring ``value`` (from YAML, --set or argparse) to the type of option ``key``."""
    if value is None and not _nullable(key):
        # else None slipped past every check and failed later as a TypeError deep in training
        # (or switched a feature off: augment=null)
        want = {"patch": "an int or 3 ints, multiples of 8", "list": "a path or a list"}
        kind = OPTIONS[key].kind
        raise ConfigError(f"{key}: expected {want.get(kind, kind)}, got no value (an empty "
                          f"`{key}:` in YAML, null, or --set {key}=)")
    value = _coerce_kind(key, value)
    want = ""
    if value is not None and key in VALID:
        ok, want = VALID[key]
        if not ok(value):
            raise ConfigError(f"{key}: expected {want}, got {value!r}")
    if OPTIONS[key].kind == "float" and value is not None and not math.isfinite(value):
        # no float option has a use for inf: a learning rate or weight decay of inf passed the
        # "> 0" / ">= 0" checks above and made every weight NaN at the first step (nan fails
        # them, as it compares false); --step-sleep inf slept forever, --grad-clip inf is off
        # (said as 0)
        raise ConfigError(f"{key}: expected a finite number{' ' + want if want else ''}, got "
                          f"{value!r}")
    return value


def _coerce_kind(key: str, value):
    kind = OPTIONS[key].kind
    if value is None:
        return None
    try:
        if kind == "auto_bool":
            return None if str(value).lower() in ("auto", "none") else _bool(key, value)
        if kind == "bool":
            return _bool(key, value)
        if kind == "auto_int" and str(value).lower() in ("auto", "none"):
            return None
        if kind in ("int", "auto_int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            return str(value)
        if kind == "list":
            if isinstance(value, (str, Path)):
                return [str(value)]
            return [str(v) for v in value]
        if kind == "patch":
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            p = [int(value)] * 3 if isinstance(value, (int, str)) and not \
                isinstance(value, bool) and "," not in str(value) else \
                [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
            if len(p) != 3 or min(p) < 8 or any(v % 8 for v in p):
                raise ValueError
            return p
        if kind == "axes":  # ints: 0 2, "0,2", [0, 2] (ranges are VALID's)
            items = value if isinstance(value, (list, tuple)) else [value]
            out = []
            for v in items:
                if isinstance(v, str):
                    out += [int(a) for a in v.replace(",", " ").split()]
                elif isinstance(v, bool):  # True is 1: a flag's value, never an axis
                    raise ValueError
                else:
                    out.append(operator.index(v))
            return sorted(out)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    want = {"patch": "an int or 3 ints, multiples of 8 (>= 8)", "list": "a path or a list",
            "auto_int": "an int or auto", "axes": "axes among 0, 1, 2 (e.g. 0,1,2 or [0, 2])"}
    raise ConfigError(f"{key}: expected {want.get(kind, kind)}, got {value!r}")


# Names that MedicalNet's train.py / setting.py, MONAI and nnU-Net users type for our keys:
# used only to suggest the right key, never accepted silently.
ALIASES = {
    "learning_rate": "lr", "base_lr": "lr", "n_epochs": "epochs", "num_epochs": "epochs",
    "max_epochs": "epochs", "model_depth": "depth", "resnet_shortcut": "shortcut_type",
    "pretrain_path": "pretrained", "pretrained_path": "pretrained", "manual_seed": "seed",
    "gpu_id": "device", "gpu": "device", "input_d": "patch", "patch_size": "patch",
    "roi_size": "patch", "spatial_size": "patch", "data_root": "data", "data_dir": "data",
    "img_list": "data", "save_folder": "out", "output_dir": "out", "save_intervals": "ckpt_every",
    "workers": "num_workers", "batchsize": "batch_size", "iterations": "steps",
    "num_iterations": "steps", "sw_overlap": "overlap", "lr_head": "head_lr",
    "new_layer_lr": "head_lr", "frozen_epochs": "freeze_epochs", "no_cuda": "device",
}


def suggest(key: str, command: str) -> list[str]:
    """Up to 3 valid keys of ``command`` close to ``key`` (by spelling, or a name other tools
    use for it: ALIASES)."""
    valid = keys_for(command)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    low = key.lower()
    alias = [ALIASES[a] for a in difflib.get_close_matches(low, list(ALIASES), n=3, cutoff=0.8)]
    return list(dict.fromkeys([a for a in alias if a in valid] + close))[:3]


def _unknown(key: str, command: str, where: str) -> ConfigError:
    valid = keys_for(command)
    if key in OPTIONS:
        return ConfigError(f"configuration key {key!r} ({where}) is an option of "
                           f"{' and '.join(f'`{c}`' for c in OPTIONS[key].commands)}, not of "
                           f"`{command}`")
    close = suggest(key, command)
    if close:
        return ConfigError(f"unknown configuration key {key!r} ({where}) for `{command}`; did "
                           f"you mean {', '.join(close)}? (`--help` lists every key)")
    return ConfigError(f"unknown configuration key {key!r} ({where}) for `{command}`. Valid "
                       f"keys: {', '.join(sorted(valid))}")


def patch_size(p) -> tuple[int, int, int]:
    return tuple(coerce("patch", p))


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """--key-name for every option of ``command`` (defaults suppressed: resolve() knows them)
    plus --config FILE.yaml and --set key=value."""
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of key: value (same keys as the options)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        dest="overrides", help="override any key (repeatable; applied last)")
    for key in keys_for(command):
        o = OPTIONS[key]
        if not o.flag:
            continue
        name = "--" + key.replace("_", "-")
        d = o.default_for(command)
        # options whose help already explains their default say it once
        h = o.help_for(command).replace("<command>", command)
        if "default:" not in h and "(required)" not in h:
            h = f"{h} (default: {d if d is not None else 'none'})"
        if o.kind in ("bool", "auto_bool"):
            parser.add_argument(name, dest=key, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=h)
        elif o.kind == "list":  # --data A --data B is --data A B (only B was kept)
            parser.add_argument(name, dest=key, nargs="+", action="extend",
                                default=argparse.SUPPRESS, help=h)
        elif o.kind in ("patch", "axes"):
            parser.add_argument(name, dest=key, nargs="+", action=_Once,
                                default=argparse.SUPPRESS, help=h)
        else:
            parser.add_argument(name, dest=key, default=argparse.SUPPRESS, help=h)


class _Once(argparse.Action):
    """An option of several values that may be given once: a second --patch (or --tta-axes)
    replaced the first silently, and the two cannot be joined the way --data's can."""

    def __call__(self, parser, namespace, values, option_string=None):
        if hasattr(namespace, self.dest):  # the default is SUPPRESS: set only when given
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and "
                         f"{values}); give it once")
        setattr(namespace, self.dest, values)


def _read_yaml(path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {str(p)!r}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(p)!r}: expected a mapping of key: value, got "
                          f"{type(data).__name__}")
    return data


def _parse_set(item: str) -> tuple[str, Any]:
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().replace("-", "_"), value


def option_name(key: str, where: str | None) -> str:
    """How an error names option ``key`` whose value came from ``where`` (a source of
    :func:`resolve`; see ``sources``): as the user gave it. The command line: the flag
    (``--head-lr``); a --config file: the key and the file (``head_lr (--config c.yaml)``);
    --set, the defaults and unknown sources: the key."""
    if where == "command line":
        return "--" + key.replace("_", "-")
    if where and where.startswith("--config"):
        return f"{key} ({where})"
    if where == "saved config":
        return f"{key} (the resumed run's config.yaml)"
    return key


def _named(e: ConfigError, key: str, where: str) -> ConfigError:
    """``e`` (coerce's "key: expected ...") naming the option as its source spells it."""
    msg = str(e)
    name = option_name(key, where)
    if name != key and msg.startswith(f"{key}:"):
        return ConfigError(name + msg[len(key):])
    return e


def resolve(command: str, cli: dict | None = None, config_file=None, overrides=(),
            base: dict | None = None, explicit: set | None = None,
            sources: dict | None = None) -> dict:
    """The resolved configuration of ``command``.

    cli: explicit command-line values {key: value}; config_file: YAML path; overrides:
    ["key=value", ...]; base: a starting dict instead of the schema defaults (e.g. the saved
    config of a resumed run); explicit: a set that receives the keys given by the user (file,
    command line, --set); sources: a dict that receives, per key given, where its value came
    from ("command line", "--config FILE", "--set", "saved config"; see
    :func:`option_name`). Raises ConfigError on unknown keys or bad values; a bad value is
    named as it was given: ``--head-lr`` from the command line, ``head_lr (--config FILE)``
    from a file.
    """
    valid = set(keys_for(command))
    cfg = defaults(command)
    layers = []
    if base:
        layers.append(("saved config", base))
    if config_file:
        layers.append((f"--config {config_file}", _read_yaml(config_file)))
    if cli:
        layers.append(("command line", cli))
    if overrides:
        layers.append(("--set", dict(_parse_set(s) for s in overrides)))
    ignored, source = [], {}
    for where, layer in layers:
        for key, value in layer.items():
            key = str(key).replace("-", "_")
            if key not in valid:
                if where.startswith("--config") and command in _INFER and key in OPTIONS:
                    # a training run's config.yaml given to evaluate/predict: the options of
                    # other commands do not apply (a misspelt key is still an error)
                    ignored.append(key)
                    continue
                raise _unknown(key, command, where)
            try:
                cfg[key] = coerce(key, value)
            except ConfigError as e:
                raise _named(e, key, where) from None
            source[key] = where
            if explicit is not None and where != "saved config":
                explicit.add(key)
    if ignored and source.get("out", "").startswith("--config"):
        # ... and its `out` is the training run's folder: predictions went into the run
        cfg["out"] = defaults(command)["out"]
        ignored.append("out (the training run's folder)")
        if explicit is not None:
            explicit.discard("out")
    if sources is not None:
        sources.update(source)
    if ignored:
        warnings.warn(f"{command}: --config {config_file} is another command's configuration "
                      f"(a training run's?); its options that {command} does not take are "
                      f"ignored: {', '.join(ignored)}", stacklevel=2)
    return cfg


def check_training(cfg: dict, sources: dict | None = None) -> None:
    """Checks across options of a training command, before any data is read (``sources``:
    where each value came from, as :func:`resolve` records it, to name the options as given)."""
    sources = sources or {}

    def name(key):  # a default (no source) is named by its flag
        return option_name(key, sources.get(key, "command line"))

    patch, batch = cfg.get("patch"), cfg.get("batch_size")
    if patch and batch:
        # the deepest layers (stride 8: conv1, the max-pool and layer2 each halve) have
        # batch x prod(patch / 8) values per channel, and training BatchNorm needs more than one
        deep = [int(p) // 8 for p in patch]
        if int(batch) * deep[0] * deep[1] * deep[2] < 2:
            raise ConfigError(
                f"{name('patch')} {list(patch)} with {name('batch_size')} {batch}: the "
                "encoder's deepest BatchNorm "
                f"layers would see one value per channel ({'x'.join(map(str, deep))} voxel at "
                "1/8 of the patch, one sample), which training cannot normalise; use "
                "--batch-size 2 or more, or a patch with a side of 16 or more")


    if cfg.get("freeze_epochs") and cfg.get("from_scratch") and not cfg.get("resume"):
        # (a run saved with both before this check still resumes)
        # it trained the heads on a randomly initialised encoder that never learnt
        raise ConfigError(f"{name('freeze_epochs')} {cfg['freeze_epochs']} with "
                          f"{name('from_scratch')} would freeze a randomly initialised encoder; "
                          f"drop {name('freeze_epochs')} (it is for a pretrained encoder)")
    if cfg.get("freeze_epochs") and cfg.get("epochs") and cfg["freeze_epochs"] >= cfg["epochs"]:
        # allowed (a linear-probe run), but as often a typo: said, as the frozen encoder
        # otherwise shows only as a training curve that stops improving early
        warnings.warn(f"--freeze-epochs {cfg['freeze_epochs']} >= --epochs {cfg['epochs']}: "
                      "the encoder stays frozen for the whole run and only the head trains",
                      stacklevel=2)
    given = {k for k, where in sources.items() if where != "saved config"}  # given now
    if cfg.get("task") == "cls" and "target_dice" in given and "target_acc" not in given:
        # kept working (a classification run took --target-dice as its accuracy target), but
        # a Dice threshold read as an accuracy is said
        warnings.warn(f"{name('target_dice')} {cfg['target_dice']} with --task cls: taken as "
                      "the validation accuracy target, as before; a classification run's "
                      "target is --target-acc (target_acc)", stacklevel=2)
    if cfg.get("task", "seg") == "seg" and "target_acc" in given and \
            cfg.get("target_acc") is not None:
        warnings.warn(f"{name('target_acc')} {cfg['target_acc']}: has no effect on a "
                      "segmentation run (its target is --target-dice, a Dice score)",
                      stacklevel=2)
    mode = cfg.get("compile_mode", "default")
    if mode != "default" and not cfg.get("compile"):
        warnings.warn(f"--compile-mode {mode} has no effect without --compile", stacklevel=2)


def check_evaluate(cfg: dict, explicit=()) -> None:
    """Checks across options of ``evaluate`` and ``predict``: axes given without --tta do
    nothing (said, as --compile-mode without --compile is: whoever gave them meant a mirrored
    evaluation)."""
    if "tta_axes" in explicit and not cfg.get("tta"):
        warnings.warn(f"--tta-axes {' '.join(map(str, cfg['tta_axes']))} has no effect without "
                      "--tta", stacklevel=2)


def save_config(cfg: dict, path) -> Path:
    """Write ``cfg`` as YAML (atomically)."""
    import os

    import yaml

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(dict(cfg), sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_config(path) -> dict:
    return _read_yaml(path)
