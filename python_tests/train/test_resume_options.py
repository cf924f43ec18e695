"""What a resumed run may change and what it may not, empty option values, option typos, the
batch x patch that BatchNorm cannot train on, the logged learning rate, the NaN message, and
evaluate's --run FILE --checkpoint conflict. Each was found as a silent wrong result or a
traceback."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from med3d_ext.train import config as C
from med3d_ext.train.cli import main
from med3d_ext.train.loops import Job, TrainingError, run_training
from med3d_ext.train.runlog import read_metrics

from .conftest import ToyLoader, cli, cli_env, tiny_args

pytest.importorskip("med3d_ext.models")


def _toy_job(model, steps, lr=0.1, bad_at=None):
    calls = {"n": 0}

    def step_fn(net, inp):
        calls["n"] += 1
        loss = net(inp["x"]).square().mean()
        if bad_at is not None and calls["n"] == bad_at:
            loss = loss * float("nan")
        return loss, {}, None

    groups = [("encoder", [model.weight], lr), ("head", [model.bias], lr * 10)]
    return Job("pretrain", model, {"task": "toy"}, ToyLoader(steps), lambda b, d: b, step_fn,
               lambda m: {"score": 0.0}, groups, 4, 3)


def _cfg(**kw):
    base = {"epochs": 2, "steps": 3, "progress": False, "log_every": 1, "schedule": "poly"}
    return C.resolve("pretrain", dict(base, **kw))


def test_resume_applies_new_rates_and_momentum_and_logs_the_rate_used(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    run_training(_cfg(epochs=1), _toy_job(model, 6), tmp_path)
    first = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    # the rate a step trained with: poly over 3 steps from 0.1 (the head's group is logged)
    want = [1.0 * (1 - s / 3) ** 0.9 for s in range(3)]
    assert [r["lr"] for r in first] == pytest.approx(want)
    # resumed for a second epoch with other rates, momentum and weight decay: they apply from
    # the resumed step on (the schedule goes on over the new total of 6 steps)
    cfg = _cfg(momentum=0.5, weight_decay=0.25)
    run_training(cfg, _toy_job(model, 6, lr=0.01), tmp_path, resume_from=tmp_path)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows[3:]] == pytest.approx([0.1 * (1 - s / 6) ** 0.9
                                                        for s in (3, 4, 5)])
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["name"], g["initial_lr"], g["momentum"], g["weight_decay"]) for g in groups] == \
        [("encoder", 0.01, 0.5, 0.25), ("head", 0.1, 0.5, 0.25)]


def test_resume_with_unchanged_options_is_bitwise_the_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 1)
    b = torch.nn.Linear(3, 1)
    b.load_state_dict(a.state_dict())
    for d in ("full", "cut"):
        (tmp_path / d).mkdir()
    # a constant schedule: the first part's shorter total does not change its rates (the
    # CLI's kill-and-resume test, test_resume.py, covers poly with the same total)
    torch.manual_seed(1)
    run_training(_cfg(schedule="constant"), _toy_job(a, 6), tmp_path / "full")
    torch.manual_seed(1)
    run_training(_cfg(epochs=1, schedule="constant"), _toy_job(b, 6), tmp_path / "cut")
    run_training(_cfg(schedule="constant"), _toy_job(b, 6), tmp_path / "cut",
                 resume_from=tmp_path / "cut")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    lr = lambda p: [r["lr"] for r in read_metrics(p / "metrics.jsonl") if r["kind"] == "train"]  # noqa: E731
    assert lr(tmp_path / "full") == lr(tmp_path / "cut")


def test_non_finite_loss_message_without_a_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(TrainingError) as e:
        run_training(_cfg(), _toy_job(model, 6, bad_at=2), tmp_path)
    msg = str(e.value)
    assert "No checkpoint was written before it" in msg and "last.pt" not in msg
    # the learning rates in use, by group, and the options that set them
    assert re.search(r"--lr; now encoder [0-9.]+, head [0-9.]+\)", msg), msg
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("how", [["--set", "epochs="], ["--set", "amp=null"],
                                 ["--set", "augment=null"], ["--set", "seed="],
                                 ["--set", "patch="], "yaml"])
def test_empty_values_are_config_errors(tmp_path, capsys, how):
    if how == "yaml":
        (tmp_path / "c.yaml").write_text("epochs:\nlr: 0.1\n")
        how = ["--config", tmp_path / "c.yaml"]
    # named as given: a --config file's key with the file, --set's key
    key = f"epochs (--config {how[-1]})" if "yaml" in str(how[-1]) else \
        str(how[-1]).split("=")[0]
    assert main(["transfer", "--data", tmp_path, "--from-scratch", *how]) == 2
    err = capsys.readouterr().err
    assert f"error: {key}: expected" in err and "got no value" in err, err


def test_nullable_options_still_take_null(tmp_path):
    cfg = C.resolve("transfer", {}, overrides=["depth=", "pretrained=null", "fused=null"])
    assert cfg["depth"] is None and cfg["pretrained"] is None and cfg["fused"] is None


def test_option_typos_get_suggestions(capsys):
    assert main(["transfer", "--learning-rate", "0.1", "--n-epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "`transfer`: unknown option --learning-rate; did you mean --lr?" in err
    assert "unknown option --n-epochs; did you mean --epochs" in err
    assert main(["pretrain", "--checkpoint", "last"]) == 2
    assert "--checkpoint is an option of `evaluate` and `predict`, not of `pretrain`" in \
        capsys.readouterr().err


@pytest.mark.parametrize("patch,batch,ok", [(8, 1, False), (8, 2, True), ([8, 8, 16], 1, True),
                                            (16, 1, True)])
def test_patch_and_batch_that_batchnorm_cannot_train_on(patch, batch, ok):
    cfg = C.resolve("transfer", {"patch": patch, "batch_size": batch})
    if ok:
        C.check_training(cfg)
    else:
        with pytest.raises(C.ConfigError, match=r"--batch-size 1: the encoder's deepest "
                                                r"BatchNorm layers would see one value"):
            C.check_training(cfg)


def _run(args, timeout=600):
    r = subprocess.run(cli(*args), env=cli_env(), capture_output=True, text=True,
                       timeout=timeout)
    return r


def test_cli_resume_rules_and_evaluate_checkpoint_conflict(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = tiny_args(tiny_data["transfer"], run, "--from-scratch", "--cache",
                     tiny_data["cache"], "--epochs", 1, "--schedule", "constant")
    r = _run(["transfer", *base])
    assert r.returncode == 0, r.stderr[-3000:]
    # a new head rate applies, and config.yaml says what ran
    r = _run(["transfer", "--resume", run, "--epochs", 2, "--head-lr", 0.0001,
              "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]
    assert rows[-1]["lr"] == pytest.approx(0.0001) and rows[0]["lr"] == pytest.approx(0.1)
    assert C.load_config(run / "config.yaml")["head_lr"] == pytest.approx(0.0001)
    # what a resume cannot change is refused, naming it, before anything is written
    before = (run / "config.yaml").read_text()
    for opt, val, what in (("--optimizer", "adamw", "optimizer 'adamw' differs"),
                           ("--steps", 3, "steps 3 differs")):
        r = _run(["transfer", "--resume", run, "--epochs", 3, opt, val, "--no-progress"])
        assert r.returncode == 2 and what in r.stderr, r.stderr[-2000:]
    # other data: refused (a kidney run went on with liver, silently)
    liver = tiny_data["pretrain"] / "Task03_Liver"
    r = _run(["transfer", "--resume", run, "--epochs", 3, "--data", liver, "--no-progress"])
    assert r.returncode == 2 and f"--data {liver} is not the run's data" in r.stderr, \
        r.stderr[-2000:]
    assert (run / "config.yaml").read_text() == before
    # evaluate: --run FILE with --checkpoint naming another is a conflict, not a silent pick
    r = _run(["evaluate", "--run", run / "best.pt", "--checkpoint", "last", "--data",
              tiny_data["transfer"], "--cache", tiny_data["cache"], "--out", tmp_path / "p",
              "--device", "cpu", "--no-progress"])
    assert r.returncode == 2 and "names a checkpoint file, and --checkpoint last another" \
        in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "p").exists()
    # a segmentation run on a classification folder: refused (it scored nothing, silently)
    r = _run(["evaluate", "--run", run, "--data", tiny_data["cls"], "--cache",
              tiny_data["cache"], "--out", tmp_path / "p2", "--device", "cpu", "--no-progress"])
    # (the command line's error, exit 2: the run and the data do not fit)
    assert r.returncode == 2 and "is a classification folder" in r.stderr, r.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["score_metric"] == "dice"
    # --head on a transfer run was ignored (its conv_seg evaluated)
    r = _run(["evaluate", "--run", run, "--head", "Task03_Liver", "--data", tiny_data["transfer"],
              "--cache", tiny_data["cache"], "--out", tmp_path / "p3", "--device", "cpu"])
    assert r.returncode == 2 and "only a pretraining run has named heads" in r.stderr


def test_cls_labels_outside_classes_json_or_negative(tmp_path, tiny_data):
    from med3d_ext.train.tasks import DataFolderError, read_cls_csv
    import shutil

    root = tmp_path / "cls"
    shutil.copytree(tiny_data["cls"], root)
    lines = (root / "labels.csv").read_text().splitlines()
    assert (root / "classes.json").is_file()
    head, first, *rest = lines
    img = first.split(",")[0]
    (root / "labels.csv").write_text("\n".join([head, f"{img},7", *rest]) + "\n")
    with pytest.raises(DataFolderError, match=r"labels \[7\] are not declared in .*classes.json"):
        read_cls_csv(root)
    (root / "labels.csv").write_text("\n".join([head, f"{img},-1", *rest]) + "\n")
    with pytest.raises(DataFolderError, match=r"line 2: label -1 .* is negative"):
        read_cls_csv(root)
    json.loads((root / "classes.json").read_text())  # untouched


def test_sync_bn_on_cpu_is_refused_before_any_work(tmp_path, capsys):
    assert main(["pretrain", "--data", tmp_path / "nothing", "--sync-bn", "--device", "cpu"]) == 2
    assert "--sync-bn: SyncBatchNorm runs on CUDA devices only" in capsys.readouterr().err


def test_other_ranks_rebuild_errors_with_two_argument_constructors():
    """run_on_main re-raises rank 0's error on the others: DataError(path, problem) could not be
    rebuilt from its message and became a RuntimeError (a traceback on rank 1)."""
    from med3d_ext.data import DataError
    from med3d_ext.train.distributed import _rebuild

    err = _rebuild(DataError, "/x/a.nii.gz: not a readable image file")
    assert type(err) is DataError and str(err) == "/x/a.nii.gz: not a readable image file"
    assert type(_rebuild(ValueError, "v")) is ValueError


def test_validation_scores_every_class_of_the_head():
    """A validation subset of a dataset without declared labels counted only the label values
    its own cases hold: a class the model predicted but those cases lack (Dice 0) went unscored
    and the logged validation Dice (best checkpoint, --target-dice) was too high."""
    import numpy as np

    from med3d_ext.train.tasks import _validate_seg

    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 1
    x = lab.astype(np.float32)[None].copy()
    x[0, :, :, :2] = 2.0  # the "model" below predicts class 2 there: truth is background

    class Val:  # the view of a held-out case that a dataset without labels.json gives
        name, channels, num_classes = "v", ["MR"], 2  # num_classes from its own values

        def __len__(self):
            return 1

        def channel_index(self, c):
            return 0

        def load_case(self, i, ch):
            return x, lab, {}

        def background_value(self, i, ch):
            return 0.0

    def model(w):  # logits: 10 for the class equal to the input value
        return torch.cat([(w == k).float() * 10 for k in range(3)], 1)

    cfg = {"patch": [8, 8, 8], "overlap": 0.5, "sw_batch_size": 1, "channel": None}
    out = _validate_seg(torch.nn.Linear(1, 1), [("v", Val())], cfg, lambda k: model)
    assert out["dice"] == pytest.approx(0.5)  # class 1 perfect, class 2 spurious (0)


def test_cls_loader_flips_only_with_augment():
    """transfer --task cls ignored --no-augment: its loader flipped every batch regardless."""
    from med3d_ext.train.tasks import ClsLoader

    imgs = [torch.randn(1, 4, 5, 6) for _ in range(3)]
    y = torch.tensor([0, 1, 0])
    on, off = (ClsLoader(imgs, y, 4, seed=3, steps=8, flip=f) for f in (True, False))
    flipped = 0
    for b in range(8):
        a, p = on.batch(b), off.batch(b)
        assert a["case"] == p["case"]  # the same cases either way
        for k, c in enumerate(p["case"]):
            assert torch.equal(p["image"][k], imgs[int(c)])  # never flipped
            flipped += not torch.equal(a["image"][k], imgs[int(c)])
    assert flipped > 0


def test_resumed_data_compares_dataset_folders(tmp_path, monkeypatch):
    from med3d_ext.train.cli import _check_resumed_data

    run = tmp_path / "run"
    # saved folders gone: compared by name (moved to another disk)
    _check_resumed_data(run, ["/a/Task11_Kidney"], ["/elsewhere/Task11_Kidney"])
    _check_resumed_data(run, ["/a/x", "/a/y"], ["/b/y", "/b/x"])  # any order
    _check_resumed_data(run, ["/a/x"], None)  # not given: the run's own
    with pytest.raises(C.ConfigError, match="is not the run's data"):
        _check_resumed_data(run, ["/a/x", "/a/y"], ["/a/x"])
    # saved folders present: the same folders, however they are written
    ds, other = tmp_path / "ds", tmp_path / "other" / "ds"
    ds.mkdir()
    other.mkdir(parents=True)
    (ds / "train.txt").write_text("")
    monkeypatch.chdir(ds)
    _check_resumed_data(run, [str(ds)], ["."])  # "." had no name
    _check_resumed_data(run, [str(ds / "train.txt")], [str(ds)])  # a list file is its folder
    (tmp_path / "link").symlink_to(ds)
    _check_resumed_data(run, [str(ds)], [str(tmp_path / "link")])
    with pytest.raises(C.ConfigError, match="is not the run's data"):
        _check_resumed_data(run, [str(ds)], [str(other)])  # same name, another folder


def test_resume_from_a_named_checkpoint_file(tiny_data, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    base = tiny_args(tiny_data["transfer"], run, "--from-scratch", "--cache", tiny_data["cache"],
                     "--epochs", 1)
    assert main(["transfer", *base]) == 0
    shutil.copy(run / "last.pt", run / "early.pt")  # step 2
    assert main(["transfer", "--resume", run, "--epochs", 2, "--no-progress"]) == 0  # to 4
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    capsys.readouterr()
    # the file named is the one resumed (RUN/best.pt used to go on from last.pt, silently)
    assert main(["transfer", "--resume", run / "early.pt", "--epochs", 3, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'early.pt'} as named" in out, out
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3..4 trained again, logged once
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 6
    # a file outside any run folder is named in the refusal (it named the folder '.')
    (tmp_path / "afile").write_text("x")
    assert main(["transfer", "--resume", tmp_path / "afile", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {str(tmp_path / 'afile')!r}: no config.yaml in" in err, err


def test_pretrained_shortcut_and_folder_messages(tiny_data, tmp_path, capsys):
    from med3d_ext.models import resnet3d

    p = tmp_path / "resnet_10_a.pth"  # MedicalNet's layout: module.-prefixed, shortcut A
    torch.save({"state_dict": {"module." + k: v for k, v in
                               resnet3d(10, shortcut_type="A").state_dict().items()}}, p)
    args = tiny_args(tiny_data["transfer"], tmp_path / "r", "--cache", tiny_data["cache"],
                     "--epochs", 1, "--steps", 1, "--pretrained", p)
    # an explicit other shortcut: refused up front in the CLI's terms (it failed in the weight
    # loader with Python advice, "build the model as resnet3d(10, shortcut_type='A')")
    assert main(["transfer", *args, "--shortcut-type", "B"]) == 2
    err = capsys.readouterr().err
    assert "with shortcut A, but --shortcut-type B was asked; drop --shortcut-type" in err, err
    assert "resnet3d(" not in err
    assert main(["transfer", *args, "--shortcut-type", "A"]) == 0
    # a folder: only its weight files are listed (sub-folders were, as if they were weights)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "sub.pt").mkdir()
    (tmp_path / "w" / "enc.pth").write_bytes(p.read_bytes())
    folder = tiny_args(tiny_data["transfer"], tmp_path / "r2", "--cache", tiny_data["cache"],
                       "--epochs", 1, "--steps", 1, "--pretrained", tmp_path / "w")
    assert main(["transfer", *folder]) == 2
    err = capsys.readouterr().err
    assert "is a folder; name a weights file in it (it holds enc.pth)" in err, err


def test_runs_saved_before_the_new_option_checks_still_resume(tiny_data, tmp_path):
    import yaml

    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(tiny_data["transfer"], run, "--from-scratch", "--cache",
                                        tiny_data["cache"], "--epochs", 1, "--steps", 1)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # what older versions wrote: a target above 1 ("never", the convergence study's), and
    # frozen epochs with a from-scratch encoder
    saved.update(target_dice=2.0, freeze_epochs=1)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["transfer", "--resume", run, "--epochs", 2, "--no-progress"]) == 0
    assert C.load_config(run / "config.yaml")["target_dice"] == 1.0


def test_resume_refuses_a_cache_preprocessed_again_at_another_spacing(tiny_data, tmp_path,
                                                                     capsys):
    from med3d_ext.data.__main__ import main as data_main
    from med3d_ext.data.cache import cache_subdir

    run, caches = tmp_path / "run", tmp_path / "cache"
    assert main(["transfer", *tiny_args(tiny_data["transfer"], run, "--from-scratch", "--cache",
                                        caches, "--epochs", 1, "--steps", 1)]) == 0
    cache = cache_subdir(caches, tiny_data["transfer"])  # the dataset's, under --cache
    was = json.loads((run / "preprocessing.json").read_text())
    (rec,) = was.values()
    # the cache is preprocessed again at another spacing, which the cache now keeps
    assert data_main(["preprocess", str(tiny_data["transfer"]), "--spacing", "3", "3", "3",
                      "--out", str(cache)]) == 0
    capsys.readouterr()
    assert main(["transfer", "--resume", run, "--epochs", 2, "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "is now preprocessed at [3.0, 3.0, 3.0] mm, but the run trained at" in err, err
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1  # nothing trained
    # preprocessed back at the run's spacing, as the message says: the run goes on
    assert data_main(["preprocess", str(tiny_data["transfer"]), "--spacing",
                      *map(str, rec["target_spacing"]), "--out", str(cache)]) == 0
    assert main(["transfer", "--resume", run, "--epochs", 2, "--no-progress"]) == 0
