"""Outputs never land on a dataset's own files, and evaluate says when the model predicts
classes the dataset does not have (both found by a black-box audit of the CLI: evaluate
--out DATASET/labelsTr replaced every label with a prediction and then scored Dice 1.000; a
3-class model on a 2-class dataset scored the undeclared class as Dice 0 in every mean)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from med3d_ext.train.cli import main

from .conftest import tiny_args

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


@pytest.fixture
def run(kidney_run):
    return kidney_run


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _eval(data, cache, *extra):
    return main(["evaluate", "--data", data, "--device", "cpu", "--cache", cache,
                 "--no-progress", *extra])


@pytest.mark.parametrize("where", ["labelsTr", "imagesTr", "."])
def test_evaluate_refuses_an_out_folder_of_the_dataset(run, tiny_data, tmp_path, capsys, where):
    data = tmp_path / "Task11_Kidney"
    shutil.copytree(tiny_data["transfer"], data)
    before = _digests(data)
    out = data / where
    assert _eval(data, tmp_path / "cache", "--run", run, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} is a folder of the dataset" in err, err
    assert "Write to a folder of its own" in err
    assert _digests(data) == before  # nothing written, nothing replaced
    # a folder of its own inside the dataset's folder is fine
    assert _eval(data, tmp_path / "cache", "--run", run, "--out", data / "predictions") == 0
    assert (data / "predictions" / "metrics.json").is_file()
    assert {k: v for k, v in _digests(data).items() if k in before} == before


def test_training_refuses_an_out_folder_of_the_dataset(tiny_data, tmp_path, capsys):
    data = tmp_path / "Task11_Kidney"
    shutil.copytree(tiny_data["transfer"], data)
    before = _digests(data)
    rc = main(["transfer", *tiny_args(data, data / "labelsTr", "--from-scratch", "--epochs", 1,
                                      "--steps", 1, "--cache", tmp_path / "cache")])
    assert rc == 2
    assert "is a folder of the dataset" in capsys.readouterr().err
    assert _digests(data) == before


def test_a_cache_in_the_dataset_or_among_the_datasets_is_refused(run, tiny_data, tmp_path,
                                                                  capsys):
    """--cache DATASET made the cache folders inside the dataset, and --cache of the folder of
    datasets put them among the datasets, where the README says such a folder is refused
    (README audit)."""
    data = tmp_path / "sets" / "Task11_Kidney"
    shutil.copytree(tiny_data["transfer"], data)
    before = _digests(tmp_path / "sets")
    args = ("--from-scratch", "--epochs", 1, "--steps", 1)
    assert main(["transfer", *tiny_args(data, tmp_path / "r1", *args, "--cache", data)]) == 2
    assert "--cache" in (err := capsys.readouterr().err) and "is a folder of the dataset" in err
    assert main(["transfer", *tiny_args(data, tmp_path / "r2", *args,
                                        "--cache", tmp_path / "sets")]) == 2
    err = capsys.readouterr().err
    assert f"--cache {str(tmp_path / 'sets')!r} is the folder that holds the dataset" in err
    assert "sets-cache" in err and len(err.strip().splitlines()) == 1
    assert _eval(data, data / "imagesTr", "--run", run, "--out", tmp_path / "p") == 2
    assert "--cache" in capsys.readouterr().err
    assert _digests(tmp_path / "sets") == before  # nothing written there
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    # a cache a run was saved with (older versions accepted any) is kept on resume / evaluate,
    # with a warning, rather than forcing the cases to be preprocessed again
    from med3d_ext.train.tasks import check_cache_outside_data

    with pytest.warns(UserWarning, match=r"is the folder that holds the dataset.*kept for this "
                                         r"run"):
        check_cache_outside_data(tmp_path / "sets", [data], refuse=False)
    check_cache_outside_data(tmp_path / "cache", [data])  # a folder of its own: fine


def test_evaluate_scores_only_the_classes_the_dataset_declares(run, tiny_data, tmp_path,
                                                               capsys):
    # the kidney run predicts 3 classes; the spleen dataset declares 2 (background, spleen)
    spleen = tiny_data["pretrain"] / "Task09_Spleen"
    assert len(json.loads((spleen / "dataset.json").read_text())["labels"]) == 2
    capsys.readouterr()
    assert _eval(spleen, tiny_data["cache"], "--run", run, "--out", tmp_path / "p") == 0
    out = capsys.readouterr().out
    assert "warning: head 'conv_seg' predicts 3 classes but dataset" in out, out
    assert "classes 2..2 have no ground truth here" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("case |"))
    assert "Dice 1" in header and "Dice 2" not in header and "HD95 2" not in header
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert m["num_classes"] == 3 and m["scored_classes"] == 2
    assert "dice_2" not in m and "hd95_2" not in m and "missed_2" not in m
    assert isinstance(m["spurious_2"], int)
    for r in m["cases"]:  # the case mean is the mean over the declared classes
        assert "dice_2" not in r
        assert (r["dice"] is None and r["dice_1"] is None) or r["dice"] == pytest.approx(r["dice_1"])


def test_a_dataset_of_symbolic_links_is_guarded_too(run, tiny_data, tmp_path, capsys):
    # labelsTr/ holding links into another folder: the resolved label paths name that folder,
    # and evaluate --out DATASET/labelsTr replaced every link with a prediction
    data = tmp_path / "Task11_Kidney"
    shutil.copytree(tiny_data["transfer"], data)
    store = tmp_path / "store"
    shutil.move(str(data / "labelsTr"), store)
    (data / "labelsTr").mkdir()
    for f in sorted(store.iterdir()):
        (data / "labelsTr" / f.name).symlink_to(f)
    before = _digests(store)
    assert _eval(data, tmp_path / "cache", "--run", run, "--out", data / "labelsTr") == 2
    assert "is a folder of the dataset" in capsys.readouterr().err
    assert all((data / "labelsTr" / f.name).is_symlink() for f in store.iterdir())
    assert _digests(store) == before


def test_two_datasets_of_one_name_are_named_with_their_folders(tiny_data, tmp_path, capsys):
    """Heads are named after their datasets: the refusal said only the name, not which two
    --data folders clash or what to do (README audit)."""
    a, b = tmp_path / "a" / "Task11_Kidney", tmp_path / "b" / "Task11_Kidney"
    shutil.copytree(tiny_data["transfer"], a)
    shutil.copytree(tiny_data["transfer"], b)
    assert main(["pretrain", *tiny_args([a, b], tmp_path / "r", "--cache",
                                        tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "both named 'Task11_Kidney'" in err and str(a) in err and str(b) in err
    assert "folders of distinct names" in err
