"""Training CLI guards from a user audit: non-finite float options (an infinite learning rate
was accepted), one labels.csv image listed under two spellings (taken as two cases), and the
options that act only when a run starts given again on --resume (ignored, yet recorded)."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from med3d_ext.train import config as C
from med3d_ext.train.cli import main

from .conftest import tiny_args

pytest.importorskip("med3d_ext.models")

# the float options with no upper bound, where inf passed the "> 0" / ">= 0" checks
UNBOUNDED = {"lr": "> 0", "head_lr": "> 0", "weight_decay": ">= 0", "grad_clip": ">= 0 (0 = off)",
             "step_sleep": ">= 0"}


def _rng() -> random.Random:
    return random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))


def test_infinite_float_options_are_refused_and_finite_ones_kept():
    r = _rng()
    for key, want in UNBOUNDED.items():
        for inf in ("inf", "Infinity", "+inf", float("inf"), "1e400"):  # 1e400 overflows
            with pytest.raises(C.ConfigError) as e:
                C.coerce(key, inf)
            assert str(e.value) == f"{key}: expected a finite number {want}, got inf"
        finite = r.uniform(1e-6, 1e3)  # a large finite value is still a value
        assert C.coerce(key, str(finite)) == finite
    # nan and -inf keep their range message (they fail the range check itself)
    assert_msg = "lr: expected > 0, got {}"
    for bad, shown in (("nan", "nan"), ("-inf", "-inf")):
        with pytest.raises(C.ConfigError, match=f"^{assert_msg.format(shown)}$"):
            C.coerce("lr", bad)
    # every float option of the schema refuses inf, with a message naming it
    floats = [k for k, o in C.OPTIONS.items() if o.kind == "float"]
    assert set(UNBOUNDED) <= set(floats)
    for key in floats:
        with pytest.raises(C.ConfigError, match=f"^{key}: expected .*, got -?inf$"):
            C.coerce(key, r.choice(["inf", "-inf"]))


def test_infinite_rates_refused_from_every_source(tmp_path, capsys):
    r = _rng()
    key = r.choice(["lr", "head_lr", "weight_decay"])
    flag = "--" + key.replace("_", "-")
    # the command line (what the auditor ran), --set (YAML's .inf) and a --config file: refused
    # before any data is read (the data folder does not exist)
    (tmp_path / "c.yaml").write_text(f"{key}: {r.choice(['.inf', '.Inf', '.INF'])}\n")
    for extra in ([flag, r.choice(["inf", "INF", "infinity"])], ["--set", f"{key}=.inf"],
                  ["--config", tmp_path / "c.yaml"]):
        rc = main(["transfer", "--data", tmp_path / "none", "--from-scratch", "--out",
                   tmp_path / "run", "--device", "cpu", *extra])
        err = capsys.readouterr().err
        assert rc == 2, extra
        # named as given: the flag, the key (--set), the key and its file (--config)
        name = {flag: flag, "--set": key}.get(extra[0], f"{key} (--config {extra[1]})")
        assert f"error: {name}: expected a finite number > 0" in err or \
            f"error: {name}: expected a finite number >= 0" in err, err
        assert not (tmp_path / "run").exists()


def _spellings(root, image: str) -> list[str]:
    """Other ways of writing labels.csv's relative path ``image`` (images/case_000.nii.gz) for
    the same file."""
    folder, name = image.split("/")
    return [f"./{image}", f"{folder}//{name}", f"{folder}/./{name}", f"{folder}/../{image}",
            str(root / image)]


def test_labels_csv_lists_one_image_under_two_spellings(tiny_data, tmp_path):
    from med3d_ext.train.tasks import DataFolderError, read_cls_csv

    r = _rng()
    root = tmp_path / "cls"
    shutil.copytree(tiny_data["cls"], root)
    head, *rows = (root / "labels.csv").read_text().splitlines()
    paths, labels = read_cls_csv(root)  # as written: one case per row
    assert len(paths) == len(rows) == len(set(map(os.path.realpath, paths)))
    i, j = sorted(r.sample(range(len(rows)), 2))
    image = rows[i].split(",")[0]
    first, again = r.sample([image] + _spellings(root, image), 2)
    label = r.choice("01")  # the same label or another: a duplicate either way
    bad = list(rows)
    bad[i] = f"{first},{rows[i].split(',')[1]}"
    bad.insert(j + 1, f"{again},{label}")
    (root / "labels.csv").write_text("\n".join([head, *bad]) + "\n")
    with pytest.raises(DataFolderError) as e:
        read_cls_csv(root)
    msg = str(e.value)
    # names the file, both lines (as an editor numbers them) and both spellings
    assert msg.startswith(f"{str(root / 'labels.csv')!r} line {j + 3}: image {again!r} already "
                          f"listed on line {i + 2} as {first!r} (the same file)"), msg
    # a symbolic link to a listed image is the same image too
    link = root / "images" / "link.nii.gz"
    link.symlink_to(root / image)
    (root / "labels.csv").write_text("\n".join([head, *rows, "images/link.nii.gz,1"]) + "\n")
    with pytest.raises(DataFolderError, match=f"already listed on line {i + 2} as {image!r}"):
        read_cls_csv(root)


def test_transfer_cls_refuses_a_duplicated_image(tiny_data, tmp_path, capsys):
    root = tmp_path / "cls"
    shutil.copytree(tiny_data["cls"], root)
    head, *rows = (root / "labels.csv").read_text().splitlines()
    image, label = rows[0].split(",")
    other = "1" if label == "0" else "0"
    (root / "labels.csv").write_text("\n".join([head, *rows, f"./{image},{other}"]) + "\n")
    run = tmp_path / "run"
    rc = main(["transfer", *tiny_args(root, run, "--task", "cls", "--from-scratch", "--epochs",
                                      1, "--steps", 1)])
    err = capsys.readouterr().err
    assert rc != 0 and f"line {len(rows) + 2}: image './{image}' already listed on line" in err
    assert not run.exists()  # refused before the run folder was made


def _weights(path):
    """A MedicalNet-layout ResNet-10 (shortcut A) file of random weights."""
    from med3d_ext.models import resnet3d

    sd = {"module." + k: (torch.randn_like(v) * 0.05 if k.endswith("weight") and v.dim() > 1
                          else v) for k, v in resnet3d(10, shortcut_type="A").state_dict().items()}
    torch.save({"state_dict": sd}, path)
    return path


def _groups(run) -> dict:
    ck = torch.load(run / "last.pt", weights_only=True)
    return {g["name"]: g["initial_lr"] for g in ck["optimizer"]["param_groups"]}


def _ck_config(run) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["config"]


def test_resume_keeps_the_runs_pretrained_and_from_scratch(tiny_data, tmp_path, capsys,
                                                            monkeypatch):
    r = _rng()
    a, b = _weights(tmp_path / "a.pth"), _weights(tmp_path / "b.pth")
    lr, head_lr = r.choice([1e-3, 2e-3, 5e-4]), r.choice([0.1, 0.05, 0.2])
    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(tiny_data["cls"], run, "--task", "cls", "--pretrained",
                                        a, "--epochs", 1, "--steps", 1, "--lr", lr,
                                        "--head-lr", head_lr)]) == 0
    assert _groups(run) == {"encoder": lr, "head": head_lr}
    capsys.readouterr()
    # another --pretrained (and --from-scratch) on resume: ignored, said once, not recorded
    extra = r.choice([["--pretrained", b], ["--pretrained", b, "--from-scratch"],
                      ["--from-scratch"]])
    assert main(["transfer", "--resume", run, "--epochs", 2, "--no-progress", *extra]) == 0
    err = capsys.readouterr().err
    warned = [x for x in err.splitlines() if x.startswith("warning: --resume")]
    assert len(warned) == 1, err
    if "--pretrained" in extra:
        assert f"--pretrained {b} is ignored, the run's pretrained {str(a)!r} is kept" \
            in warned[0], warned
    if "--from-scratch" in extra:
        assert "--from-scratch is ignored, the run's from_scratch False is kept" in warned[0]
    for cfg in (C.load_config(run / "config.yaml"), _ck_config(run)):
        assert cfg["pretrained"] == str(a) and cfg["from_scratch"] is False
    # --from-scratch switched the encoder to the head's rate (one rate for a new encoder)
    assert _groups(run) == {"encoder": lr, "head": head_lr}
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    # the same file named again (relative here, saved absolute): nothing to say
    monkeypatch.chdir(tmp_path)
    assert main(["transfer", "--resume", run, "--epochs", 3, "--no-progress",
                 "--pretrained", "a.pth", "--no-from-scratch"]) == 0
    assert "warning: --resume" not in capsys.readouterr().err
    assert C.load_config(run / "config.yaml")["pretrained"] == str(a)


def test_resume_of_a_scratch_run_ignores_a_new_pretrained(tiny_data, tmp_path, capsys):
    r = _rng()
    a = _weights(tmp_path / "a.pth")
    head_lr = r.choice([0.1, 0.05, 0.2])
    run = tmp_path / "scratch"
    assert main(["transfer", *tiny_args(tiny_data["cls"], run, "--task", "cls",
                                        "--from-scratch", "--epochs", 1, "--steps", 1,
                                        "--head-lr", head_lr)]) == 0
    assert _groups(run) == {"encoder": head_lr, "head": head_lr}
    capsys.readouterr()
    extra = r.choice([["--pretrained", a], ["--pretrained", a, "--no-from-scratch"]])
    assert main(["transfer", "--resume", run, "--epochs", 2, "--no-progress", *extra]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines()
              if x.startswith("warning: --resume")]
    assert len(warned) == 1 and f"--pretrained {a} is ignored, the run's pretrained None is " \
        "kept" in warned[0], warned
    assert ("--no-from-scratch is ignored" in warned[0]) == ("--no-from-scratch" in extra)
    for cfg in (C.load_config(run / "config.yaml"), _ck_config(run)):
        assert cfg["pretrained"] is None and cfg["from_scratch"] is True
    # a --pretrained made the encoder's rate --lr (the rate of a pretrained encoder)
    assert _groups(run) == {"encoder": head_lr, "head": head_lr}
