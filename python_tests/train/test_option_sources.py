"""Errors name an option as the user gave it, and classification has its own target.

- A bad value from the command line named the YAML key (``head_lr: expected > 0``) instead of
  the flag typed (``--head-lr``); from a --config file, the key without the file.
- ``transfer --task cls`` took ``--target-dice`` (a Dice threshold) as its accuracy target:
  it has ``--target-acc`` now; ``--target-dice`` still works for it (older commands and
  configs), with a warning."""

from __future__ import annotations

import json
import warnings

import pytest

from med3d_ext.train import config as C
from med3d_ext.train.cli import build_parser, main, resolve_args

from .conftest import tiny_args


def _resolve(argv):
    return resolve_args(build_parser().parse_args(argv), set())


def test_a_bad_value_is_named_as_given(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("head_lr: -1\n")
    base = ["transfer", "--data", str(tmp_path)]
    with pytest.raises(C.ConfigError) as e:
        _resolve(base + ["--head-lr", "-1"])
    assert str(e.value) == "--head-lr: expected > 0, got -1.0"
    with pytest.raises(C.ConfigError) as e:
        _resolve(base + ["--config", str(f)])
    assert str(e.value) == f"head_lr (--config {f}): expected > 0, got -1.0"
    with pytest.raises(C.ConfigError) as e:  # --set names the key: what was typed
        _resolve(base + ["--set", "head_lr=-1"])
    assert str(e.value) == "head_lr: expected > 0, got -1.0"
    # kinds other than a range: a patch, an empty value in YAML
    with pytest.raises(C.ConfigError, match=r"^--patch: expected an int or 3 ints"):
        _resolve(base + ["--patch", "12"])
    f.write_text("epochs:\n")
    with pytest.raises(C.ConfigError, match=rf"^epochs \(--config {f}\): expected int, got no "):
        _resolve(base + ["--config", str(f)])


def test_cross_option_checks_name_options_as_given(tmp_path, capsys):
    base = ["transfer", "--data", str(tmp_path), "--from-scratch"]
    with pytest.raises(C.ConfigError, match=r"^--patch \[8, 8, 8\] with --batch-size 1: "):
        _resolve(base + ["--patch", "8", "--batch-size", "1"])
    f = tmp_path / "c.yaml"
    f.write_text("patch: 8\nfreeze_epochs: 2\n")
    with pytest.raises(C.ConfigError, match=rf"^patch \(--config {f}\) \[8, 8, 8\] with "
                                            r"--batch-size 1: "):
        _resolve(base + ["--config", str(f), "--batch-size", "1"])
    f.write_text("freeze_epochs: 2\n")
    with pytest.raises(C.ConfigError, match=rf"^freeze_epochs \(--config {f}\) 2 with "
                                            r"--from-scratch would freeze"):
        _resolve(base + ["--config", str(f)])
    # through main: the one-line error, exit 2
    assert main(base + ["--head-lr", "0", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "error: --head-lr: expected > 0, got 0.0"


def test_target_acc_option():
    assert C.defaults("transfer")["target_acc"] is None  # --target-dice's value
    assert "target_acc" not in C.keys_for("pretrain")
    with pytest.raises(C.ConfigError, match=r"^target_acc: expected in \[0, 1\] \(an accuracy\)"):
        C.resolve("transfer", overrides=["target_acc=1.5"])
    with pytest.raises(C.ConfigError) as e:
        C.resolve("transfer", overrides=["target_dice=1.5"])
    assert "accuracy" not in str(e.value)

    from med3d_ext.train.loops import score_target

    cfg = C.resolve("transfer")
    assert score_target(cfg, "cls") == score_target(cfg, "seg") == 0.5
    cfg = C.resolve("transfer", overrides=["target_acc=0.9", "target_dice=0.3"])
    assert score_target(cfg, "cls") == 0.9 and score_target(cfg, "seg") == 0.3
    assert score_target(C.resolve("pretrain", overrides=["target_dice=0.2"]), "pretrain") == 0.2


def test_target_dice_for_classification_warns_and_target_acc_for_seg_warns(tmp_path):
    base = ["transfer", "--data", str(tmp_path), "--from-scratch"]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cfg = _resolve(base + ["--task", "cls", "--target-dice", "0.7"])
        assert cfg["target_dice"] == 0.7 and cfg["target_acc"] is None  # still the target
        _resolve(base + ["--target-acc", "0.7"])
        _resolve(base + ["--task", "cls", "--target-acc", "0.7"])  # the right one: quiet
        _resolve(base + ["--task", "cls"])
    msgs = [str(w.message) for w in said]
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("--target-dice 0.7 with --task cls: taken as the validation "
                              "accuracy target") and "--target-acc" in msgs[0]
    assert msgs[1].startswith("--target-acc 0.7: has no effect on a segmentation run")


def test_classification_run_records_its_accuracy_target(tiny_data, tmp_path):
    run = tmp_path / "cls"
    assert main(["transfer", *tiny_args(tiny_data["cls"], run, "--task", "cls",
                                        "--from-scratch", "--epochs", 1, "--steps", 1,
                                        "--target-acc", 0.0)]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["target"] == 0.0 and s["target_step"] == 1 and s["score_metric"] == "accuracy"
    # --target-acc 1.0 with a target Dice it reaches: the accuracy target decides (not reached
    # by a one-step model whose accuracy is that of predicting one class)
    run2 = tmp_path / "cls2"
    assert main(["transfer", *tiny_args(tiny_data["cls"], run2, "--task", "cls",
                                        "--from-scratch", "--epochs", 1, "--steps", 1,
                                        "--target-acc", 1.0, "--target-dice", 0.0)]) == 0
    s = json.loads((run2 / "summary.json").read_text())
    assert s["target"] == 1.0
    assert s["target_step"] is None or s["best_score"] == 1.0
