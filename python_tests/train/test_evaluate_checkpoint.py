"""evaluate --checkpoint: best | last | a file, as --help says; a typo is an error (it used to
fall back to best.pt silently) and the default prediction folder is named after the run."""

from __future__ import annotations

import json

import pytest

from med3d_ext.train.cli import main

from .conftest import tiny_args

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


@pytest.fixture
def run(kidney_run):
    return kidney_run


def _eval(tiny_data, *extra):
    return main(["evaluate", "--data", tiny_data["transfer"], "--device", "cpu", "--cache",
                 tiny_data["cache"], "--no-progress", *extra])


def test_checkpoint_typo_is_an_error(run, tiny_data, tmp_path, capsys):
    assert _eval(tiny_data, "--run", run, "--checkpoint", "bset", "--out", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "--checkpoint 'bset'" in err and "best, last" in err
    assert not (tmp_path / "p").exists()


def test_checkpoint_file_with_or_without_run(run, tiny_data, tmp_path, capsys):
    ck = run / "last.pt"
    assert _eval(tiny_data, "--checkpoint", ck, "--out", tmp_path / "a") == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["run"] == str(ck)
    # with --run naming another folder, the file given is the one evaluated
    assert _eval(tiny_data, "--run", tmp_path, "--checkpoint", ck, "--out", tmp_path / "b") == 0
    assert (tmp_path / "b" / "metrics.json").is_file()


def test_default_out_is_named_after_the_run_folder(run, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _eval(tiny_data, "--run", run / "best.pt") == 0  # was predictions/best.pt/
    assert (tmp_path / "predictions" / run.name / "metrics.json").is_file()


def test_evaluate_says_where_the_predictions_are(run, tiny_data, tmp_path, capsys):
    assert _eval(tiny_data, "--run", run, "--out", tmp_path / "p") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert str(tmp_path / "p") in lines[-1] and "metrics.json" in lines[-1]
    assert ".nii.gz" in lines[-1]
    # the table names the classes as the dataset does (it said "Dice 1", "Dice 2")
    labels = json.loads((tiny_data["transfer"] / "dataset.json").read_text())["labels"]
    header = next(ln for ln in lines if ln.startswith("case |"))
    for c in range(1, len(labels)):
        assert f"Dice {c} {labels[str(c)]}" in header
    names = json.loads((tmp_path / "p" / "metrics.json").read_text())["class_names"]
    assert names == {str(c): labels[str(c)] for c in range(1, len(labels))}


def test_unknown_head_names_where_the_name_came_from(tiny_data, tmp_path, capsys):
    one = sorted(tiny_data["pretrain"].iterdir())[0]
    pre = tmp_path / "pre"
    assert main(["pretrain", *tiny_args(one, pre, "--cache", tiny_data["cache"], "--epochs", 1,
                                        "--steps", 1, "--no-export")]) == 0
    capsys.readouterr()
    assert _eval(tiny_data, "--run", pre, "--out", tmp_path / "a") == 2
    assert "(the dataset's name); pick one with --head" in capsys.readouterr().err
    assert _eval(tiny_data, "--run", pre, "--head", "nope", "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err  # it said "(the dataset)" for a --head typo too
    assert "'nope' (--head)" in err and one.name in err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_a_prediction_is_written_leaves_no_temporary(run, tiny_data, tmp_path,
                                                                  monkeypatch, capsys, sig):
    """A real Ctrl-C (or SIGTERM) arrives once the prediction's temporary is on disk, before
    the rename: evaluate exits 130 (143) with one line, and the folder holds no temporary nor
    torn file."""
    import signal

    import nibabel as nib

    sig = getattr(signal, sig)

    real_save = nib.save
    written = []

    def save_then_ctrl_c(img, name):
        real_save(img, name)
        written.append(name)
        signal.raise_signal(sig)  # as the terminal or a scheduler delivers it, mid-write

    out = tmp_path / "pred"
    monkeypatch.setattr(nib, "save", save_then_ctrl_c)
    assert _eval(tiny_data, "--run", run, "--out", out) == 128 + sig
    assert written and ".tmp" in written[0]  # it was interrupted inside the write
    assert capsys.readouterr().err.strip() == "interrupted"
    assert sorted(p.name for p in out.iterdir()) == []  # neither the temporary nor a torn file

    # a prediction that was there before is kept whole (the rename never happened)
    monkeypatch.setattr(nib, "save", real_save)
    assert _eval(tiny_data, "--run", run, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    monkeypatch.setattr(nib, "save", save_then_ctrl_c)
    assert _eval(tiny_data, "--run", run, "--out", out) == 128 + sig
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")} == before
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after evaluate


def test_disk_error_while_results_are_written_keeps_no_torn_file(run, tiny_data, tmp_path,
                                                                 monkeypatch):
    import med3d_ext.train.checkpoint as ck

    out = tmp_path / "pred"
    assert _eval(tiny_data, "--run", run, "--out", out) == 0
    good = (out / "metrics.json").read_text()
    real_fsync = ck.os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck.os, "fsync", full_disk)
    assert _eval(tiny_data, "--run", run, "--out", out) == 1
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    assert (out / "metrics.json").read_text() == good
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or p.name.startswith(".")]


def test_checkpoint_of_another_kind_of_run_is_a_mix_up(run, tiny_data, tmp_path, capsys):
    # a classification checkpoint named with a segmentation run folder: it was evaluated as a
    # classifier and failed with "classification needs a labels.csv"
    cls = tmp_path / "cls"
    assert main(["transfer", *tiny_args(tiny_data["cls"], cls, "--task", "cls", "--from-scratch",
                                        "--epochs", 1, "--steps", 1)]) == 0
    capsys.readouterr()
    assert _eval(tiny_data, "--run", run, "--checkpoint", cls / "best.pt", "--out",
                 tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "is a classification checkpoint, but --run" in err and "segmentation run" in err
    assert not (tmp_path / "p").exists()
    # the run's own checkpoint named as a file is fine
    assert _eval(tiny_data, "--run", run, "--checkpoint", run / "last.pt", "--out",
                 tmp_path / "q") == 0


def test_table_shows_the_summary_means_over_all_classes():
    # the README said the table's last line held the summary's dice/hd95 (each case's mean over
    # its classes, then over cases); it held only per-class means, which do not give them
    from med3d_ext.train.evaluate import format_table

    cases = [{"case": "a", "dice_1": 1.0, "dice_2": 0.0, "hd95_1": 0.0, "hd95_2": 4.0,
              "dice": 0.5, "hd95": 2.0},
             {"case": "b", "dice_1": 0.5, "dice_2": float("nan"), "hd95_1": 1.0,
              "hd95_2": float("nan"), "dice": 0.5, "hd95": 1.0},
             {"case": "c", "labelled": False}]
    summary = {"num_classes": 3, "cases": cases, "labelled_cases": 2, "dice_1": 0.75,
               "dice_2": 0.0, "hd95_1": 0.5, "hd95_2": 4.0, "dice": 0.5, "hd95": 1.5}
    lines = format_table(summary).splitlines()
    assert lines[0].split(" | ")[-2:] == ["Dice all classes", "HD95 all classes (mm)"]
    assert lines[1].split(" | ")[-2:] == ["0.500", "2.00"]
    assert lines[3].split(" | ") == ["c"] + ["no label"] * 6
    mean = lines[4].split(" | ")
    assert mean[0] == "mean (2 labelled)" and mean[-2:] == ["0.500", "1.50"]
    assert all(len(line.split(" | ")) == 7 for line in lines[:5])


def test_a_runs_own_config_file_works_for_evaluate(run, tiny_data, tmp_path, monkeypatch,
                                                   capsys):
    # --seed / --val-fraction are taken "so that a training config file works", but the
    # training options in it (augment, epochs, lr, ...) refused the file; they are ignored now,
    # said once, and a misspelt key in the file is still an error. Its `out` (the run's own
    # folder) is ignored too: the predictions went into the training run's folder
    cfg = run / "config.yaml"
    assert cfg.exists()
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.chdir(tmp_path)
    assert _eval(tiny_data, "--run", run, "--config", cfg) == 0
    err = capsys.readouterr().err
    assert err.count("is another command's configuration") == 1
    assert "augment" in err and "epochs" in err and "out (the training run's folder)" in err
    assert sorted(p.name for p in run.iterdir()) == before
    assert (tmp_path / "predictions" / run.name / "metrics.json").exists()
    # an --out given on the command line wins, and is not said to be ignored
    assert _eval(tiny_data, "--run", run, "--config", cfg, "--out", tmp_path / "p") == 0
    assert "out (the training" not in capsys.readouterr().err
    assert (tmp_path / "p" / "metrics.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text() + "\nepochz: 3\n")
    assert _eval(tiny_data, "--run", run, "--config", bad, "--out", tmp_path / "q") == 2
    assert "unknown configuration key 'epochz'" in capsys.readouterr().err
