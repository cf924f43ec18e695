"""Configuration: defaults, --help, YAML, --set, precedence, errors with close matches."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import yaml

from med3d_ext.train import config as C
from med3d_ext.train.cli import build_parser, main, resolve_args

from .conftest import cli, cli_env

COMMANDS = ("pretrain", "transfer", "evaluate")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_default_and_help(command, capsys):
    cfg = C.defaults(command)
    assert set(cfg) == set(C.keys_for(command))
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for key in C.keys_for(command):
        assert "--" + key.replace("_", "-") in text, key
    for common in ("--out", "--config", "--set", "--seed", "--device", "--patch"):
        assert common in text
    if command != "evaluate":
        for k in ("--epochs", "--steps", "--batch-size", "--depth", "--lr"):
            assert k in text


def test_precedence_defaults_yaml_cli_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"epochs": 3, "lr": 0.5, "batch_size": 7, "patch": [16, 24, 32]}))
    ns = build_parser().parse_args(["pretrain", "--config", str(f), "--lr", "0.25",
                                    "--set", "batch_size=5", "--set", "seed=9"])
    explicit = set()
    cfg = resolve_args(ns, explicit)
    assert cfg["epochs"] == 3            # YAML over default
    assert cfg["lr"] == 0.25             # command line over YAML
    assert cfg["batch_size"] == 5        # --set over YAML
    assert cfg["seed"] == 9
    assert cfg["patch"] == [16, 24, 32]
    assert cfg["steps"] == C.OPTIONS["steps"].default
    assert {"epochs", "lr", "batch_size", "seed", "patch"} <= explicit
    assert "steps" not in explicit


def test_command_specific_defaults():
    assert C.defaults("transfer")["lr"] == 1e-3  # MedicalNet's encoder learning rate
    assert C.defaults("transfer")["head_lr"] == 1e-1
    assert C.defaults("pretrain")["lr"] != C.defaults("transfer")["lr"]


@pytest.mark.parametrize("bad,close", [("batchsize", "batch_size"), ("epoch", "epochs"),
                                       ("learning_rate", "lr"), ("pach", "patch"),
                                       ("n_epochs", "epochs"), ("model_depth", "depth")])
def test_unknown_key_names_closest(bad, close):
    with pytest.raises(C.ConfigError) as e:
        C.resolve("pretrain", overrides=[f"{bad}=1"])
    msg = str(e.value)
    assert repr(bad) in msg
    if close:
        assert f"did you mean {close}" in msg or close in msg.split("did you mean")[1]


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stepz: 3\n")
    with pytest.raises(C.ConfigError, match="steps"):
        C.resolve("transfer", config_file=f)


@pytest.mark.parametrize("key,value", [("epochs", "many"), ("patch", "12"), ("patch", "[8, 8]"),
                                       ("augment", "maybe"), ("lr", "true")])
def test_bad_values(key, value):
    with pytest.raises(C.ConfigError, match=key):
        C.resolve("pretrain", overrides=[f"{key}={value}"])


@pytest.mark.parametrize("key,value,want", [
    ("batch_size", "0", ">= 1"), ("batch_size", "-1", ">= 1"), ("depth", "11", "one of 10, 18"),
    ("optimizer", "adam", "sgd | adamw"), ("overlap", "1.0", "in [0, 1)"),
    ("val_fraction", "1", "[0, 1)"), ("lr", "0", "> 0"), ("fg_fraction", "1.5", "[0, 1]"),
    ("amp", "fp8", "bf16"), ("label_grid", "voxel", "logits | patch"), ("steps", "0", ">= 1"),
    ("compile_mode", "fast", "default | reduce-overhead"), ("target_dice", "2", "in [0, 1]")])
def test_out_of_range_values_name_key_value_and_range(key, value, want):
    with pytest.raises(C.ConfigError) as e:
        C.resolve("pretrain", overrides=[f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"{key}:") and want in msg and value in msg


def test_defaults_have_the_types_of_given_values():
    # the default patch is an int in the schema; resolved it is [D, H, W] like a given one
    # (an int default once crashed `pretrain --data DIR` without --patch)
    for command in ("pretrain", "transfer", "evaluate"):
        cfg = C.resolve(command)
        assert cfg["patch"] == [48, 48, 48]
        assert C.resolve(command, overrides=["patch=48"])["patch"] == cfg["patch"]


def test_device_errors_are_clean(tmp_path):
    from med3d_ext.train.distributed import DeviceError, resolve_device

    with pytest.raises(DeviceError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    r = subprocess.run(cli("pretrain", "--device", "nonsense", "--data", tmp_path),
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--device" in r.stderr


def test_key_of_other_command_rejected():
    # the message says which command the key belongs to
    with pytest.raises(C.ConfigError, match="'pretrained'.*`transfer`, not of `pretrain`"):
        C.resolve("pretrain", overrides=["pretrained=x.pth"])
    with pytest.raises(C.ConfigError, match="'epochs'.*not of `evaluate`"):
        C.resolve("evaluate", overrides=["epochs=3"])


def test_cli_config_error_exit_code(tmp_path):
    r = subprocess.run(cli("pretrain", "--set", "bach_size=2", "--data", tmp_path),
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2
    assert "batch_size" in r.stderr and "Traceback" not in r.stderr


def test_save_load_roundtrip(tmp_path):
    cfg = C.resolve("transfer", overrides=["patch=[16,16,8]", "task=cls", "fused=false"])
    C.save_config(cfg, tmp_path / "config.yaml")
    back = C.resolve("transfer", base=C.load_config(tmp_path / "config.yaml"))
    assert back == cfg


def test_num_workers_auto(monkeypatch):
    """--num-workers defaults to auto: 0 on the CPU (bitwise resume), min(8, CPUs per process
    - 1) on a GPU, where loading in the training process left the GPU waiting most of the
    time; an explicit value (0 included) is kept, and "auto" can be given."""
    from med3d_ext.train.tasks import loader_workers

    cfg = C.resolve("pretrain")
    assert cfg["num_workers"] is None
    assert loader_workers(cfg, torch.device("cpu")) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(cfg, torch.device("cuda")) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun processes share the 16 CPUs
    assert loader_workers(cfg, torch.device("cuda")) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader_workers(cfg, torch.device("cuda")) == 0
    for given, want in (("0", 0), ("3", 3), ("auto", None)):
        c = C.resolve("transfer", overrides=[f"num_workers={given}"])
        assert c["num_workers"] == want
    assert loader_workers(C.resolve("pretrain", overrides=["num_workers=0"]), "cuda") == 0
    with pytest.raises(C.ConfigError, match=r"num_workers: expected >= 0, got -1"):
        C.resolve("pretrain", overrides=["num_workers=-1"])
    with pytest.raises(C.ConfigError, match=r"num_workers: expected an int or auto, got 'many'"):
        C.resolve("pretrain", overrides=["num_workers=many"])


def test_option_combinations_that_do_nothing_useful():
    # --freeze-epochs with --from-scratch froze a random encoder (validation 0.0000, silently)
    cfg = C.resolve("transfer", overrides=["freeze_epochs=2", "from_scratch=true"])
    with pytest.raises(C.ConfigError, match="would freeze a randomly initialised encoder"):
        C.check_training(cfg)
    C.check_training(C.resolve("transfer", overrides=["freeze_epochs=2"]))  # pretrained: fine
    # --compile-mode without --compile was ignored without a word
    with pytest.warns(UserWarning, match="--compile-mode reduce-overhead has no effect without "
                                         "--compile"):
        C.check_training(C.resolve("pretrain", overrides=["compile_mode=reduce-overhead"]))
    # --freeze-epochs covering the whole run trained a frozen encoder without a word (README
    # audit): allowed (a linear probe), said
    with pytest.warns(UserWarning, match=r"--freeze-epochs 5 >= --epochs 1: the encoder stays "
                                         "frozen for the whole run"):
        C.check_training(C.resolve("transfer", overrides=["freeze_epochs=5", "epochs=1"]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.check_training(C.resolve("transfer", overrides=["freeze_epochs=1", "epochs=3"]))


def test_repeated_list_options_add_up_and_repeated_patch_is_refused(tiny_data, capsys):
    # --data A --data B kept only B (pretrain trained one head; evaluate skipped its
    # one-dataset check); a second --patch replaced the first silently
    from med3d_ext.train.cli import build_parser

    p = build_parser()
    ns, _ = p.parse_known_args(["pretrain", "--data", "a", "--data", "b", "c"])
    assert ns.data == ["a", "b", "c"]
    with pytest.raises(SystemExit) as e:
        p.parse_known_args(["pretrain", "--data", "a", "--patch", "16", "--patch", "32"])
    assert e.value.code == 2
    assert "--patch given twice (['16'] and ['32']); give it once" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS + ("predict",))
def test_help_says_each_commands_own_default(command, capsys):
    """--patch and --out mean different things for training and inference; predict's help
    showed the training patch's default (48) for the sliding window, which is the run's patch,
    and every command's --out help listed all the commands' defaults then '(default: none)'."""
    import re

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    patch = re.search(r"--patch PATCH \[PATCH \.\.\.\] (.*?) --", text).group(1)
    out = re.search(r"--out OUT (.*?) --", text).group(1)
    if command in ("evaluate", "predict"):
        assert "sliding window" in patch and "the run's training patch" in patch, patch
        assert "48" not in patch, patch
    else:
        assert "training patch" in patch and "(default: 48)" in patch, patch
    want = {"pretrain": "run folder (default: runs/pretrain-<time>)",
            "transfer": "run folder (default: runs/transfer-<time>)",
            "evaluate": "prediction folder (default: predictions/<run>)",
            "predict": "prediction folder (required)"}[command]
    assert out == want, out
