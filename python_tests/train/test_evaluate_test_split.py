"""``evaluate --split test``: predictions for a dataset's unlabelled test images (imagesTs/),
preprocessed with the run's training recipe; and metrics.jsonl's epoch numbering."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from med3d_ext.train.cli import main
from med3d_ext.train.runlog import read_metrics, truncate_metrics

from .conftest import tiny_args

pytest.importorskip("med3d_ext.models")
nib = pytest.importorskip("nibabel")

TRAIN_SPACING = (1.5, 1.5, 2.0)


def _ct(shape, r):
    """A CT-like volume: fat with an organ (label 1), an air slab (a long low tail that the
    image's own percentiles would keep and the training foreground's cut off); never 0, so
    the crop keeps every voxel."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    d = np.sqrt(((grid - r.uniform(-0.2, 0.2, 3)[:, None, None, None]) ** 2).sum(0))
    lab = (d < 0.6).astype(np.uint8)
    x = np.where(lab > 0, 150.0, -100.0) + r.normal(0, 15, shape)
    x[:2] = -1000.0 + r.normal(0, 5, x[:2].shape)
    lab[:2] = 0
    x = np.rint(x)
    x[x == 0] = 1.0
    return x.astype(np.int16), lab


def _affine(spacing, codes, shape, rot_deg=0.0):
    from python_tests._datahelp import affine

    return affine(spacing, codes, shape, rot_deg=rot_deg)


def _save(path, arr, aff):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, aff), str(path))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A CT MSD dataset (training cases all on one grid, so preprocessing resamples none of
    them), three test images in imagesTs/ (one with a reference label in labelsTs/), and a
    short from-scratch transfer run on it."""
    root = tmp_path_factory.mktemp("toy") / "Task20_Toy"
    r = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
    shape, fg, training = (20, 18, 12), [], []
    for i in range(5):
        img, lab = _ct(shape, r)
        aff = _affine(TRAIN_SPACING, ("RAS", "LAS", "LPS")[i % 3], shape)
        _save(root / "imagesTr" / f"toy_{i}.nii.gz", img, aff)
        _save(root / "labelsTr" / f"toy_{i}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/toy_{i}.nii.gz",
                         "label": f"./labelsTr/toy_{i}.nii.gz"})
        fg.append(img[lab > 0].astype(np.float64))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Task20_Toy", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ"}, "training": training, "test": []}))
    # test images: on the training grid but stored LPS; anisotropic PIR; oblique
    tests = {"ts_a": ((22, 16, 12), TRAIN_SPACING, "LPS", 0.0),
             "ts_b": ((14, 19, 17), (1.1, 2.6, 1.3), "PIR", 0.0),
             "ts_c": ((17, 15, 9), (1.3, 1.3, 2.4), "RAS", 12.0)}
    for name, (sh, sp, codes, rot) in tests.items():
        img, lab = _ct(sh, r)
        aff = _affine(sp, codes, sh, rot)
        _save(root / "imagesTs" / f"{name}.nii.gz", img, aff)
        if name == "ts_c":
            _save(root / "labelsTs" / f"{name}.nii.gz", lab, aff)
    run = root.parent / "run"
    cache = root.parent / "cache"
    assert main(["transfer", *tiny_args(root, run, "--from-scratch", "--cache", cache,
                                        "--val-fraction", 0.2)]) == 0
    return {"root": root, "run": run, "cache": cache, "fg": np.concatenate(fg),
            "tests": sorted(tests)}


def test_test_split_writes_predictions_in_source_space(toy, tmp_path, capsys):
    pred = tmp_path / "pred"
    capsys.readouterr()
    assert main(["evaluate", "--run", toy["run"], "--data", toy["root"], "--out", pred,
                 "--split", "test", "--device", "cpu", "--cache", toy["cache"]]) == 0
    out = capsys.readouterr().out
    for name in toy["tests"]:
        src = nib.load(str(toy["root"] / "imagesTs" / f"{name}.nii.gz"))
        p = nib.load(str(pred / f"{name}.nii.gz"))
        assert p.shape == src.shape, name
        np.testing.assert_allclose(p.affine, src.affine, atol=1e-5)
        assert np.asarray(p.dataobj).dtype == np.uint8
        assert set(np.unique(np.asarray(p.dataobj))) <= {0, 1}
    assert not list(pred.glob("toy_*"))  # the labelled training cases are not predicted
    summary = json.loads((pred / "metrics.json").read_text())
    assert summary["split"] == "test"
    assert summary["labelled_cases"] == 1 and summary["unlabelled_cases"] == 2
    rows = {r["case"]: r for r in summary["cases"]}
    assert sorted(rows) == toy["tests"]
    for name in ("ts_a", "ts_b"):
        assert rows[name]["labelled"] is False and "dice" not in rows[name]
    assert rows["ts_c"]["labelled"] is True
    # the labelled test case's Dice, recomputed from the written files
    pc = np.asarray(nib.load(str(pred / "ts_c.nii.gz")).dataobj) == 1
    gt = np.asarray(nib.load(str(toy["root"] / "labelsTs" / "ts_c.nii.gz")).dataobj) == 1
    den = pc.sum() + gt.sum()
    want = None if den == 0 else 2 * (pc & gt).sum() / den
    assert rows["ts_c"]["dice_1"] == (None if want is None else pytest.approx(want))
    assert summary["dice"] == rows["ts_c"]["dice"]  # means over the labelled case only
    # what the images were preprocessed with, and from where
    assert summary["preprocessing"]["target_spacing"] == pytest.approx(TRAIN_SPACING)
    assert "last.pt" in summary["preprocessing"]["source"] or \
        "best.pt" in summary["preprocessing"]["source"]
    # the table and the log say which cases have no label
    assert "ts_a | no label | no label" in out
    assert "2 of 3 case(s) have no label" in out and "mean (1 labelled)" in out
    assert "ts_a: no label, prediction only" in out


def test_ct_test_images_use_the_training_statistics(toy, tmp_path, monkeypatch):
    """The network's input for a test image is clipped to the training foreground's
    0.5-99.5 percentiles (recorded in the run) and z-scored per volume, as the training cases
    were: checked against an explicit computation from the NIfTI files."""
    import med3d_ext.train.evaluate as ev
    from med3d_ext.train.cli import run_evaluate
    from med3d_ext.train.config import resolve

    lo, hi = np.percentile(toy["fg"], [0.5, 99.5])
    ck = torch.load(toy["run"] / "last.pt", weights_only=True)
    rec = ck["preprocessing"]["Task20_Toy"]
    assert rec["ct_clip"][0] == pytest.approx([lo, hi], rel=1e-6)
    assert rec["target_spacing"] == pytest.approx(TRAIN_SPACING)
    assert json.loads((toy["run"] / "preprocessing.json").read_text()) == ck["preprocessing"]
    seen = []
    real = ev.sliding_window_probs

    def spy(volume, *a, **kw):
        seen.append(volume.detach().cpu().numpy()[0, 0].astype(np.float64))
        return real(volume, *a, **kw)

    monkeypatch.setattr(ev, "sliding_window_probs", spy)
    run_evaluate(resolve("evaluate", {
        "run": str(toy["run"]), "data": [str(toy["root"])], "out": str(tmp_path / "p"),
        "split": "test", "device": "cpu", "cache": str(toy["cache"]), "progress": False}),
        log=lambda *a: None)
    assert len(seen) == 3
    # ts_a is on the training grid (stored LPS: flips only), so nothing is resampled
    src = nib.load(str(toy["root"] / "imagesTs" / "ts_a.nii.gz"))
    ras = np.asarray(nib.as_closest_canonical(src).dataobj, np.float64)
    (x,) = [v for v in seen if v.shape == ras.shape]
    c = np.clip(ras, lo, hi)
    np.testing.assert_allclose(x, (c - c.mean()) / c.std(), rtol=1e-4, atol=1e-4)
    # the image's own percentiles (a per-volume recipe) would give another input entirely
    own_lo, own_hi = np.percentile(ras, [0.5, 99.5])
    assert own_lo < lo - 500
    c2 = np.clip(ras, own_lo, own_hi)
    assert np.abs(x - (c2 - c2.mean()) / c2.std()).max() > 0.5
    # ts_b (1.1 x 2.6 x 1.3 mm, stored PIR) is resampled to the training spacing
    b = nib.load(str(toy["root"] / "imagesTs" / "ts_b.nii.gz"))
    ras_b = nib.as_closest_canonical(b)
    sp = ras_b.header.get_zooms()[:3]
    want_shape = tuple(max(1, int(round(n * s / t)))
                       for n, s, t in zip(ras_b.shape, sp, TRAIN_SPACING))
    assert any(v.shape == want_shape for v in seen), ([v.shape for v in seen], want_shape)


def test_test_split_errors(toy, tmp_path, capsys):
    """No test images, an empty imagesTs, a run that predates the recorded recipe: one
    error line each, naming the folder or file."""
    bare = tmp_path / "Task20_Toy"
    shutil.copytree(toy["root"], bare, ignore=shutil.ignore_patterns("imagesTs", "labelsTs"))
    args = ["--run", toy["run"], "--out", tmp_path / "p", "--split", "test", "--device", "cpu",
            "--cache", tmp_path / "c"]
    assert main(["evaluate", "--data", bare, *args]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "no test images" in err and "imagesTs" in err
    (bare / "imagesTs").mkdir()
    assert main(["evaluate", "--data", bare, *args]) != 0
    err = capsys.readouterr().err.strip()
    assert "imagesTs holds no images" in err and len(err.splitlines()) == 1
    # an old run: the checkpoint has no preprocessing record and no preprocessing.json
    old = tmp_path / "old"
    old.mkdir()
    ck = torch.load(toy["run"] / "last.pt", weights_only=True)
    del ck["preprocessing"]
    torch.save(ck, old / "last.pt")
    assert main(["evaluate", "--run", old, "--data", toy["root"], "--out", tmp_path / "p",
                 "--split", "test", "--device", "cpu", "--cache", tmp_path / "c"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(old / "last.pt") in err
    assert "preprocessing.json" in err and "records no training preprocessing" in err
    # ... which a preprocessing.json beside it (the run folder's copy) repairs
    shutil.copy(toy["run"] / "preprocessing.json", old / "preprocessing.json")
    assert main(["evaluate", "--run", old, "--data", toy["root"], "--out", tmp_path / "p",
                 "--split", "test", "--device", "cpu", "--cache", tmp_path / "c"]) == 0
    assert len(list((tmp_path / "p").glob("ts_*.nii.gz"))) == 3
    # labelled splits of an old run still work as before (the dataset's own cache)
    assert main(["evaluate", "--run", old, "--data", toy["root"], "--out", tmp_path / "p2",
                 "--split", "val", "--device", "cpu", "--cache", toy["cache"]]) == 0


def test_nnunet_imagesTs(toy, tmp_path):
    """nnU-Net v2 layout: imagesTs/<case>_0000.nii.gz predicted as <case>.nii.gz in the
    source space, with the run's recipe although the folder has another name."""
    nn = tmp_path / "Dataset020_Toy"
    for img in sorted((toy["root"] / "imagesTr").glob("*.nii.gz")):
        case = img.name[:-len(".nii.gz")]
        (nn / "imagesTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(img, nn / "imagesTr" / f"{case}_0000.nii.gz")
        (nn / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(toy["root"] / "labelsTr" / img.name, nn / "labelsTr" / img.name)
    for name in toy["tests"]:
        (nn / "imagesTs").mkdir(parents=True, exist_ok=True)
        shutil.copy(toy["root"] / "imagesTs" / f"{name}.nii.gz",
                    nn / "imagesTs" / f"{name}_0000.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
        "file_ending": ".nii.gz", "numTraining": 5}))
    pred = tmp_path / "pred"
    assert main(["evaluate", "--run", toy["run"], "--data", nn, "--out", pred, "--split",
                 "test", "--device", "cpu", "--cache", tmp_path / "c"]) == 0
    summary = json.loads((pred / "metrics.json").read_text())
    assert summary["labelled_cases"] == 0 and summary["unlabelled_cases"] == 3
    assert summary["dice"] is None
    for name in toy["tests"]:
        src = nib.load(str(nn / "imagesTs" / f"{name}_0000.nii.gz"))
        p = nib.load(str(pred / f"{name}.nii.gz"))
        assert p.shape == src.shape and np.allclose(p.affine, src.affine, atol=1e-5)


def test_pretrain_run_test_split_and_changed_data_warning(toy, tmp_path, capsys):
    """A pretraining run takes the recipe of the head it evaluates with; evaluating labelled
    cases whose cache statistics differ from the run's training ones says so."""
    run = tmp_path / "pre"
    assert main(["pretrain", *tiny_args(toy["root"], run, "--epochs", 1, "--steps", 1,
                                        "--cache", toy["cache"], "--no-export")]) == 0
    ck = torch.load(run / "last.pt", weights_only=True)
    assert list(ck["preprocessing"]) == list(ck["arch"]["heads"]) == ["Task20_Toy"]
    pred = tmp_path / "pred"
    capsys.readouterr()
    assert main(["evaluate", "--run", run, "--data", toy["root"], "--out", pred, "--split",
                 "test", "--device", "cpu", "--cache", toy["cache"]]) == 0
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == \
        [f"{n}.nii.gz" for n in toy["tests"]]
    assert "CT clip [" in capsys.readouterr().out
    # the same dataset less two cases: other CT percentiles than the run was trained with
    fewer = tmp_path / "Task20_Toy"
    shutil.copytree(toy["root"], fewer)
    meta = json.loads((fewer / "dataset.json").read_text())
    meta["training"] = meta["training"][:3]
    (fewer / "dataset.json").write_text(json.dumps(meta))
    assert main(["evaluate", "--run", toy["run"], "--data", fewer, "--out", tmp_path / "p2",
                 "--device", "cpu", "--cache", tmp_path / "c"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "preprocessed with its own statistics" in err


def test_metrics_jsonl_epoch_numbering(toy):
    """Train and val rows number epochs the same way: 1-based, the epoch the row belongs to
    (2 epochs x 2 steps, a train row per step, a val row per epoch)."""
    rows = read_metrics(toy["run"] / "metrics.jsonl")
    train = [(r["step"], r["epoch"]) for r in rows if r["kind"] == "train"]
    val = [(r["step"], r["epoch"]) for r in rows if r["kind"] == "val"]
    assert train == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert val == [(2, 1), (4, 2)]
    # each val row carries the epoch of the train rows just before it
    last_train_epoch = {}
    for r in rows:
        if r["kind"] == "train":
            last_train_epoch["e"] = r["epoch"]
        else:
            assert r["epoch"] == last_train_epoch["e"]
    ck = torch.load(toy["run"] / "last.pt", weights_only=True)
    assert ck["epoch"] == val[-1][1]  # the checkpoint's count of completed epochs


def test_resume_renumbers_rows_of_an_older_run(tmp_path):
    """A resumed run's kept rows follow one convention, whatever version logged them (train
    rows once counted epochs from 0)."""
    old = [{"kind": "train", "step": 1, "epoch": 0}, {"kind": "train", "step": 3, "epoch": 0},
           {"kind": "val", "step": 3, "epoch": 1}, {"kind": "train", "step": 5, "epoch": 1},
           {"kind": "train", "step": 6, "epoch": 1}, {"kind": "val", "step": 6, "epoch": 2},
           {"kind": "train", "step": 8, "epoch": 2}]
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in old))
    truncate_metrics(p, 6, steps_per_epoch=3)
    got = [(r["kind"], r["step"], r["epoch"]) for r in read_metrics(p)]
    assert got == [("train", 1, 1), ("train", 3, 1), ("val", 3, 1), ("train", 5, 2),
                   ("train", 6, 2), ("val", 6, 2)]


def test_convergence_table_has_the_epoch_of_each_validation():
    """benchmarks.convergence_study reads the validation curve (steps and, now, epochs) from
    metrics.jsonl; its table gains an epoch column, and curves without epochs (results
    recorded before) render as before."""
    import copy
    from pathlib import Path

    from benchmarks import convergence_study as cs

    res = Path(__file__).resolve().parents[2] / "benchmarks/results/2026-11-26_cpu-convergence"
    if not (res / "convergence.json").is_file():
        pytest.skip("no recorded convergence study")
    s = json.loads((res / "convergence.json").read_text())
    assert cs.markdown(copy.deepcopy(s)).strip() == (res / "convergence.md").read_text().strip()
    steps = next(iter(s["arms"].values()))["steps"]
    for a in s["arms"].values():
        a["epochs"] = list(range(1, len(steps) + 1))
    lines = [ln for ln in cs.markdown(s).splitlines() if ln.startswith("| step |")]
    assert lines and lines[0].startswith("| step | epoch |")
    assert f"| {steps[1]} | 2 |" in cs.markdown(s)
    curve = {"steps": [4, 8], "epochs": [1, 2], "dice": [0.1, 0.2]}
    assert cs.summarize({cs.SCRATCH: {0: curve}})["arms"][cs.SCRATCH]["epochs"] == [1, 2]
