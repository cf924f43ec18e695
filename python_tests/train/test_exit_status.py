"""One exit-status scheme for both CLIs (``python -m med3d_ext.train`` and ``python -m
med3d_ext.data``), decided by the kind of error wherever it is met: 2 for the command line's
errors (argparse's usage status: a bad option, a path that is not there or not what the option
needs, an unusable --out/--cache, a --device the machine lacks), 1 for failures while running
(bad data: what --skip-bad skips, in every command; a bad checkpoint; a disk error).

A user walkthrough found the same kind of error exiting differently by where it was met: a
missing --data folder 1 but a missing --run, --images or --resume 2; a missing --pretrained
file 1 but a --pretrained folder 2; a --cache under a file 1 in training and 2 in
``data preprocess``; a corrupt image 1 in transfer/evaluate but 2 in predict and in
``data preprocess``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from med3d_ext.train.cli import main

from .conftest import tiny_args

EXIT_FAILURE, EXIT_USAGE = 1, 2

pytest.importorskip("med3d_ext.data")


def _status(capsys, argv, data_cli=False):
    """(exit status, the one-line error) of a CLI call."""
    from med3d_ext.data.__main__ import main as data_main

    capsys.readouterr()
    rc = (data_main if data_cli else main)([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return rc, err.splitlines()[-1] if err else ""


def test_exit_status_by_error_kind():
    from med3d_ext.data import DataError, DataPathError
    from med3d_ext.train import cli
    from med3d_ext.train.cli import exit_status
    from med3d_ext.train.checkpoint import CheckpointError
    from med3d_ext.train.config import ConfigError
    from med3d_ext.train.distributed import DeviceError
    from med3d_ext.train.loops import TrainingError
    from med3d_ext.train.tasks import DataFolderError

    assert (cli.EXIT_FAILURE, cli.EXIT_USAGE) == (EXIT_FAILURE, EXIT_USAGE)
    for e in (ConfigError("x"), DataPathError("p", "dataset folder does not exist"),
              DeviceError("--device cuda: CUDA is not available")):
        assert exit_status(e) == EXIT_USAGE, e
    for e in (DataError("p", "NaN/Inf voxels"), DataFolderError("labels.csv line 2: ..."),
              CheckpointError("cannot read checkpoint"), TrainingError("non-finite loss"),
              OSError(28, "No space left on device")):
        assert exit_status(e) == EXIT_FAILURE, e
    assert exit_status(RuntimeError("a bug")) is None  # its traceback, not a one-liner


def test_command_line_errors_exit_2(tiny_data, kidney_run, tmp_path, capsys):
    """Each was 1 before (a path the command line names, or an option the machine or run
    cannot take), beside like errors that were 2."""
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    kid = tiny_data["transfer"]
    cases = [
        (["transfer", *tiny_args(tmp_path / "nope", tmp_path / "r1", "--from-scratch")],
         "no such folder"),
        (["transfer", *tiny_args(kid, tmp_path / "r2", "--pretrained",
                                 tmp_path / "missing.pth")], "missing.pth': no such file"),
        (["transfer", *tiny_args(kid, tmp_path / "r3", "--from-scratch", "--cache",
                                 a_file / "c")], "cache folder"),
        # the wrong kind of folder for the command: a classification folder for segmentation
        (["evaluate", "--run", kidney_run, "--data", tiny_data["cls"], "--out", tmp_path / "e",
          "--device", "cpu", "--no-progress"], "is a classification folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["transfer", *tiny_args(kid, tmp_path / "r4", "--from-scratch"),
                       "--device", "cuda"], "CUDA is not available"))
    for argv, want in cases:
        rc, err = _status(capsys, argv)
        assert rc == EXIT_USAGE and err.startswith("error: ") and want in err, (argv, rc, err)
    # as they were: a missing --run / --images, and the data CLI's missing dataset and
    # unusable --out
    rc, err = _status(capsys, ["predict", "--run", tmp_path / "norun", "--images", kid,
                               "--out", tmp_path / "p"])
    assert rc == EXIT_USAGE and "does not exist" in err
    rc, err = _status(capsys, ["preprocess", tmp_path / "nope", "--no-progress"], data_cli=True)
    assert rc == EXIT_USAGE and "dataset folder does not exist" in err
    rc, err = _status(capsys, ["preprocess", kid, "--out", a_file / "c", "--no-progress"],
                      data_cli=True)
    assert rc == EXIT_USAGE and "cache folder" in err


def test_bad_data_exits_1_in_every_command(tiny_data, kidney_run, tmp_path, capsys):
    """A corrupt image: 1 in transfer, evaluate, predict and data preprocess (predict and
    preprocess said 2)."""
    root = tmp_path / "kid"
    shutil.copytree(tiny_data["transfer"], root)
    bad = sorted((root / "imagesTr").glob("*.nii.gz"))[0]
    bad.write_bytes(bad.read_bytes()[:100])
    runs = [
        (["transfer", *tiny_args(root, tmp_path / "r", "--from-scratch", "--epochs", 1,
                                 "--cache", tmp_path / "c1")], False),
        (["evaluate", "--run", kidney_run, "--data", root, "--out", tmp_path / "e", "--cache",
          tmp_path / "c2", "--device", "cpu", "--no-progress"], False),
        (["predict", "--run", kidney_run, "--images", bad, "--out", tmp_path / "p",
          "--device", "cpu", "--no-progress"], False),
        (["preprocess", root, "--out", tmp_path / "c3", "--workers", 0, "--no-progress"], True),
    ]
    for argv, data_cli in runs:
        rc, err = _status(capsys, argv, data_cli)
        assert rc == EXIT_FAILURE and bad.name in err, (argv, rc, err)
    # --skip-bad skipping every image: bad data too (predict said 2)
    rc, err = _status(capsys, ["predict", "--run", kidney_run, "--images", bad, "--out",
                               tmp_path / "p", "--device", "cpu", "--no-progress", "--skip-bad"])
    assert rc == EXIT_FAILURE and "no image left to predict" in err


def test_classification_label_problems(tiny_data, cls_run, tmp_path, capsys):
    """A labels.csv line that is wrong is bad data (1); labels.csv classes the run's head
    does not predict, the run and the data not fitting, the command line's (2)."""
    root = tmp_path / "cls"
    shutil.copytree(tiny_data["cls"], root)
    head, *rows = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([head, rows[0].rsplit(",", 1)[0] + ",x",
                                                *rows[1:]]) + "\n")
    ev = ["evaluate", "--run", cls_run, "--data", root, "--out", tmp_path / "e", "--device",
          "cpu", "--no-progress"]
    rc, err = _status(capsys, ev)
    assert rc == EXIT_FAILURE and "not an integer" in err
    (root / "labels.csv").write_text("\n".join([head, *rows, rows[0].split(",")[0].replace(
        "case_000", "case_000b") + ",5"]) + "\n")
    shutil.copy(root / "images" / "case_000.nii.gz", root / "images" / "case_000b.nii.gz")
    (root / "classes.json").unlink()
    rc, err = _status(capsys, ev)
    assert rc == EXIT_USAGE and "['5']" in err


def test_predict_channel_mismatch_is_bad_data(kidney_run, tiny_data, tmp_path, capsys):
    """An image without the run's channels is what --skip-bad skips: bad data (1)."""
    import nibabel as nib

    src = nib.load(str(sorted((tiny_data["transfer"] / "imagesTr").glob("*.nii.gz"))[0]))
    data = np.asarray(src.dataobj)
    two = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), src.affine), str(two))
    rc, err = _status(capsys, ["predict", "--run", kidney_run, "--images", two, "--out",
                               tmp_path / "p", "--device", "cpu", "--no-progress"])
    assert rc == EXIT_FAILURE and "has 2 channel(s)" in err
