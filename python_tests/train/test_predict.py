"""``predict``: a run applied to image files and folders in no dataset layout. Predictions are
checked bit for bit against an independent route, ``evaluate`` of the same images in their
dataset (which writes ``<case>.nii.gz`` in the source grid too), down to the network's input;
then the inputs' rules (folders, single files, nnU-Net channel files, names), the refusals,
--skip-bad, the options' sources and a Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from med3d_ext.train import evaluate as ev
from med3d_ext.train.cli import main

from .conftest import cli, cli_env, tiny_args

pytest.importorskip("med3d_ext.models")
nib = pytest.importorskip("nibabel")

KIDNEY = ["kidney_000", "kidney_001", "kidney_002", "kidney_003"]
BRAIN = "Task01_BrainTumour"


def _spy(mp, store):
    """Spies on evaluate.predict_case (the code both commands predict a case with) and the
    sliding window it calls: each case's network input, padding value, crop box, window
    options and probabilities, by case name."""
    real_case, real_swp = ev.predict_case, ev.sliding_window_probs
    current = []

    def case(pre, i, ch, *a, **k):
        x, _, meta = pre.load_case(i, ch)
        current.append(pre.names[i])
        store[pre.names[i]] = {"x": np.array(x), "pad": pre.background_value(i, ch),
                               "box": meta["crop_box"]}
        return real_case(pre, i, ch, *a, **k)

    def swp(*a, **k):
        probs = real_swp(*a, **k)
        store[current[-1]].update(probs=probs.numpy().copy(), window=a[2], **{
            n: k[n] for n in ("overlap", "sw_batch_size", "pad_value", "mirror_axes")})
        return probs
    mp.setattr(ev, "predict_case", case)
    mp.setattr(ev, "sliding_window_probs", swp)


def _same_inputs(a: dict, b: dict):
    """The same network input (bit for bit), window options and probabilities."""
    assert a.keys() == b.keys() and a["x"].dtype == np.float32
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
        else:
            assert a[k] == b[k], k


def _evaluate(run, data, out, *extra):
    inputs = {}
    with pytest.MonkeyPatch.context() as mp:
        _spy(mp, inputs)
        assert main(["evaluate", "--run", run, "--data", data, "--out", out, "--device", "cpu",
                     "--no-progress", *extra]) == 0
    return {"out": out, "inputs": inputs}


def _predict(run, out, *args):
    return main(["predict", "--run", run, "--out", out, "--device", "cpu", "--no-progress",
                 *args])


def _same_nifti(a, b):
    """Two NIfTI files with the same header bytes (shape, affine, sform/qform, dtype) and the
    same voxels, bit for bit (the gzip wrappers differ: they name their temporaries)."""
    x, y = nib.load(str(a)), nib.load(str(b))
    assert x.header.binaryblock == y.header.binaryblock, (a, b)
    vx, vy = np.asarray(x.dataobj), np.asarray(y.dataobj)
    assert vx.dtype == vy.dtype == np.uint8 and vx.shape == vy.shape
    assert vx.tobytes() == vy.tobytes(), (a, b, int((vx != vy).sum()))


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _tree(folder):
    """Every file under a folder with its size and mtime: what a write would change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tmpdir_checked(tmp_path, monkeypatch):
    """The temporary folder predict preprocesses in, made visible: must be empty after."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture(scope="module")
def kidney_eval(kidney_run, tiny_data, tmp_path_factory):
    """evaluate's predictions of the kidney set (every case is a training case there, read
    from the training cache) and the network inputs it predicted them from."""
    return _evaluate(kidney_run, tiny_data["transfer"],
                     tmp_path_factory.mktemp("kidney_eval") / "pred")


def test_segmentation_matches_evaluate_bit_for_bit(kidney_run, kidney_eval, tiny_data,
                                                    tmp_path, tmpdir_checked, monkeypatch,
                                                    capsys):
    """A folder of three of the kidney images. evaluate predicts them as training cases of
    their dataset, from the training cache; predict preprocesses copies of the files with the
    run's recorded recipe. Both give the same network input, hence the same voxels: the same
    target spacing (the recipe's is the cache's), the same CT clip (the recipe's is the one the
    cache computed from the labelled foreground), each volume z-scored by itself, and the same
    crop (non-zero image voxels, plus the label in training; the synthetic CT is -1000 air at
    its border, never 0, so the label adds nothing). Nothing is written into the training
    cache, and no temporary is left."""
    src = tiny_data["transfer"] / "imagesTr"
    scans = tmp_path / "scans"
    scans.mkdir()
    for c in KIDNEY[:3]:
        shutil.copy(src / f"{c}.nii.gz", scans)
    (scans / "notes.txt").write_text("not an image")
    cache = _tree(tiny_data["cache"])
    inputs = {}
    _spy(monkeypatch, inputs)
    out = tmp_path / "pred"
    capsys.readouterr()
    assert _predict(kidney_run, out, "--images", scans) == 0
    log = capsys.readouterr().out
    assert f"--images {scans}: 3 image file(s) (left out: notes.txt; sub-folders are not " \
           "searched)" in log
    assert "3 image(s) to predict" in log and "with the run's training recipe (spacing" in log
    assert _files(out) == [f"{c}.nii.gz" for c in KIDNEY[:3]] + ["predictions.json"]
    for c in KIDNEY[:3]:
        _same_nifti(out / f"{c}.nii.gz", kidney_eval["out"] / f"{c}.nii.gz")
        _same_inputs(inputs[c], kidney_eval["inputs"][c])
        # and in the image's own grid: its shape and affine
        img, pred = nib.load(str(src / f"{c}.nii.gz")), nib.load(str(out / f"{c}.nii.gz"))
        assert pred.shape == img.shape
        np.testing.assert_allclose(pred.affine, img.affine, atol=1e-5)
    assert list(tmpdir_checked.iterdir()) == []
    assert _tree(tiny_data["cache"]) == cache
    s = json.loads((out / "predictions.json").read_text())
    ck = kidney_run / ("best.pt" if (kidney_run / "best.pt").is_file() else "last.pt")
    assert s["command"] == "predict" and s["task"] == "segmentation"
    assert s["checkpoint"] == str(ck.resolve()) and s["run"] == str(kidney_run)
    assert s["images"] == [str(scans)] and s["skipped"] == [] and s["num_classes"] == 3
    assert s["settings"] == {"patch": [16, 16, 16], "device": "cpu", "fused": False,
                             "amp": "auto", "overlap": 0.5, "sw_batch_size": 2, "tta": False,
                             "tta_axes": [], "channel": "CT"}
    recipe = json.loads((kidney_run / "preprocessing.json").read_text())["Task11_Kidney"]
    assert {k: s["preprocessing"][k] for k in recipe} == recipe
    assert [r["case"] for r in s["cases"]] == KIDNEY[:3]
    for r in s["cases"]:
        v = np.asarray(nib.load(r["prediction"]).dataobj)
        assert r["files"] == [str(scans / f"{r['case']}.nii.gz")]
        assert r["shape"] == list(v.shape) and r["labels_present"] == np.unique(v).tolist()
    assert s["seconds"] > 0 and s["started"][:4].isdigit()


def test_single_files_and_files_with_folders(kidney_run, kidney_eval, tiny_data, tmp_path,
                                             capsys):
    src = tiny_data["transfer"] / "imagesTr"
    # one file, named where it is (the dataset's own folder: only --out must be elsewhere)
    assert _predict(kidney_run, tmp_path / "one", "--images", src / "kidney_003.nii.gz") == 0
    assert _files(tmp_path / "one") == ["kidney_003.nii.gz", "predictions.json"]
    _same_nifti(tmp_path / "one" / "kidney_003.nii.gz",
                kidney_eval["out"] / "kidney_003.nii.gz")
    # a folder, then a file from elsewhere and an uncompressed .nii: cases in the given order
    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(src / "kidney_002.nii.gz", folder)
    nii = tmp_path / "loose" / "kidney_000.nii"
    nii.parent.mkdir()
    nib.save(nib.load(str(src / "kidney_000.nii.gz")), str(nii))
    capsys.readouterr()
    assert _predict(kidney_run, tmp_path / "mix", "--images", folder,
                    src / "kidney_001.nii.gz", nii) == 0
    assert "3 image(s) to predict" in capsys.readouterr().out
    s = json.loads((tmp_path / "mix" / "predictions.json").read_text())
    assert [r["case"] for r in s["cases"]] == ["kidney_002", "kidney_001", "kidney_000"]
    assert s["cases"][2]["files"] == [str(nii)]
    for c in ("kidney_000", "kidney_001", "kidney_002"):
        _same_nifti(tmp_path / "mix" / f"{c}.nii.gz", kidney_eval["out"] / f"{c}.nii.gz")


def test_nrrd_input(kidney_run, kidney_eval, tiny_data, tmp_path):
    """An NRRD copy of a case (read by SimpleITK) gives the same voxels, written with the
    NRRD's own affine."""
    sitk = pytest.importorskip("SimpleITK")
    src = tiny_data["transfer"] / "imagesTr" / "kidney_001.nii.gz"
    nrrd = tmp_path / "in" / "kidney_001.nrrd"
    nrrd.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(src)), str(nrrd))
    assert _predict(kidney_run, tmp_path / "p", "--images", nrrd.parent) == 0
    a = np.asarray(nib.load(str(tmp_path / "p" / "kidney_001.nii.gz")).dataobj)
    b = nib.load(str(kidney_eval["out"] / "kidney_001.nii.gz"))
    assert a.dtype == np.uint8 and a.tobytes() == np.asarray(b.dataobj).tobytes()
    np.testing.assert_allclose(nib.load(str(tmp_path / "p" / "kidney_001.nii.gz")).affine,
                               b.affine, atol=1e-4)


def _write_dicom_series(src, folder):
    """A NIfTI volume as a DICOM series, one slice file each (SimpleITK's series example)."""
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.Cast(sitk.ReadImage(str(src)), sitk.sitkInt16)
    folder.mkdir(parents=True)
    d = img.GetDirection()
    tags = [("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.4242"),
            ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))))]
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        for t, v in tags:
            s.SetMetaData(t, v)
        s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint(
            (0, 0, i)))))
        s.SetMetaData("0020|0013", str(i))
        w.SetFileName(str(folder / f"{i:03d}.dcm"))
        w.Execute(s)


def test_dicom_series_folder(kidney_run, kidney_eval, tiny_data, tmp_path, capsys):
    """A folder holding one DICOM series is one case, named after the folder; its prediction
    is evaluate's in world space (GDCM may stack the slices the other way round)."""
    series = tmp_path / "patient7"
    _write_dicom_series(tiny_data["transfer"] / "imagesTr" / "kidney_001.nii.gz", series)
    capsys.readouterr()
    assert _predict(kidney_run, tmp_path / "p", "--images", series) == 0
    assert f"--images {series}: a DICOM series" in capsys.readouterr().out
    assert _files(tmp_path / "p") == ["patient7.nii.gz", "predictions.json"]
    a = nib.as_closest_canonical(nib.load(str(tmp_path / "p" / "patient7.nii.gz")))
    b = nib.as_closest_canonical(nib.load(str(kidney_eval["out"] / "kidney_001.nii.gz")))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    assert np.asarray(a.dataobj).tobytes() == np.asarray(b.dataobj).tobytes()


# --- classification --------------------------------------------------------------------------

def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_classification_matches_evaluate(cls_run, tiny_data, tmp_path, capsys):
    assert main(["evaluate", "--run", cls_run, "--data", tiny_data["cls"], "--out",
                 tmp_path / "ev", "--device", "cpu", "--no-progress"]) == 0
    want = {r["file"]: r for r in _csv(tmp_path / "ev" / "predictions.csv")}
    images = tiny_data["cls"] / "images"
    capsys.readouterr()
    assert _predict(cls_run, tmp_path / "p", "--images", images) == 0
    assert "8 prediction(s) in" in capsys.readouterr().out
    assert _files(tmp_path / "p") == ["predictions.csv", "predictions.json"]
    header = (tmp_path / "p" / "predictions.csv").read_text().splitlines()[0]
    assert header == "case,file,prediction,prediction_name,probability,prob_0,prob_1"
    rows = _csv(tmp_path / "p" / "predictions.csv")
    assert [r["file"] for r in rows] == [str(p) for p in sorted(images.glob("*.nii.gz"))]
    assert sorted(r["file"] for r in rows) == sorted(want)
    for r in rows:
        e = want[r["file"]]
        assert r["case"] == os.path.basename(r["file"])[:-len(".nii.gz")] == e["case"]
        # the same numbers, to the last digit written
        keys = ("prediction", "prediction_name", "probability", "prob_0", "prob_1")
        assert [r[k] for k in keys] == [e[k] for k in keys]
    s = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert s["task"] == "classification" and s["classes"] == ["0", "1"]
    assert s["class_names"] == {"0": "no tumour", "1": "tumour"}
    assert s["settings"]["patch"] == [16, 16, 16] and len(s["cases"]) == 8
    assert s["cases"][0]["prob_1"] == float(rows[0]["prob_1"])
    # --tta on a classification run is said to do nothing (it was ignored silently), by
    # predict and by evaluate
    capsys.readouterr()
    assert _predict(cls_run, tmp_path / "pt", "--images", images, "--tta") == 0
    assert "warning: --tta: a classification run classifies each image once" in \
        capsys.readouterr().err
    assert main(["evaluate", "--run", cls_run, "--data", tiny_data["cls"], "--out",
                 tmp_path / "evt", "--device", "cpu", "--no-progress", "--tta"]) == 0
    assert "warning: --tta: a classification run" in capsys.readouterr().err
    # a channel the images do not have
    first = sorted(images.glob("*.nii.gz"))[0]
    err = _refused(capsys, cls_run, tmp_path / "c", "--images", images, "--channel", 1)
    assert err == f"error: --channel 1: {str(first)!r} has 1 channel(s)"
    assert not (tmp_path / "c").exists()
    # a corrupt image: named; skipped with --skip-bad, the others predicted as before
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    err = _bad_data(capsys, cls_run, tmp_path / "c", "--images", images, bad)
    assert err.startswith(f"error: {bad}: not a readable image file")
    assert _predict(cls_run, tmp_path / "c", "--images", bad, images, "--skip-bad") == 0
    assert f"warning: --images: skipped 1 bad image(s):\n  {bad}: not a readable" in \
        capsys.readouterr().err
    assert _csv(tmp_path / "c" / "predictions.csv") == rows
    assert json.loads((tmp_path / "c" / "predictions.json").read_text())["skipped"][0] \
        .startswith(f"{bad}: not a readable image file")


# --- refusals --------------------------------------------------------------------------------

def _refused(capsys, run, out, *args, status=2):
    """predict's exit status and its one-line error: 2 for the command line's errors, 1
    (``status``) for bad data, what --skip-bad skips (as in evaluate and training)."""
    capsys.readouterr()
    rc = _predict(run, out, *args)
    err = capsys.readouterr().err.strip()
    assert rc == status and err.startswith("error: ") and "\n" not in err, (rc, err)
    return err


def _bad_data(capsys, run, out, *args):
    return _refused(capsys, run, out, *args, status=1)


def test_input_errors_name_the_path(kidney_run, tiny_data, tmp_path, capsys):
    src = tiny_data["transfer"] / "imagesTr" / "kidney_000.nii.gz"
    out = tmp_path / "out"
    err = _refused(capsys, kidney_run, out, "--images", tmp_path / "nope")
    assert f"--images '{tmp_path / 'nope'}': no such file or folder" in err
    (tmp_path / "empty").mkdir()
    err = _refused(capsys, kidney_run, out, "--images", tmp_path / "empty")
    assert f"--images '{tmp_path / 'empty'}': no image files in this folder" in err
    assert err.endswith("it holds nothing")
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "readme.txt").write_text("x")
    shutil.copy(src, notes / "sub")  # sub-folders are not searched
    err = _refused(capsys, kidney_run, out, "--images", notes)
    assert err.endswith("it holds readme.txt, sub/")
    err = _refused(capsys, kidney_run, out, "--images", src, notes / "readme.txt")
    assert f"--images '{notes / 'readme.txt'}' is not an image file" in err
    # one case name from two files: both named
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(src, tmp_path / d)
    err = _refused(capsys, kidney_run, out, "--images", tmp_path / "a", tmp_path / "b")
    assert f"case name 'kidney_000' comes from two inputs, '{tmp_path / 'a' / src.name}' and " \
           f"'{tmp_path / 'b' / src.name}'" in err
    nib.save(nib.load(str(src)), str(tmp_path / "a" / "kidney_000.nii"))
    err = _refused(capsys, kidney_run, out, "--images", tmp_path / "a")
    assert "'kidney_000' comes from two inputs" in err and "kidney_000.nii'" in err
    # the same file twice
    err = _refused(capsys, kidney_run, out, "--images", tmp_path / "b",
                   tmp_path / "b" / src.name)
    assert f"'{tmp_path / 'b' / src.name}' is given twice" in err
    assert not out.exists()


def test_one_channel_run_reads_channel_named_files_as_separate_scans(kidney_run, tiny_data,
                                                                     tmp_path, capsys):
    # liver_0000, liver_0002 (a gap) are nnU-Net-like names, but the run reads one channel: two
    # scans, each predicted under its whole name (they were grouped into one 2-channel case and
    # refused with "give a single-channel image")
    src = tiny_data["transfer"] / "imagesTr" / "kidney_000.nii.gz"
    nn = tmp_path / "nn"
    nn.mkdir()
    for k in (0, 2):
        shutil.copy(src, nn / f"liver_{k:04d}.nii.gz")
    capsys.readouterr()
    assert _predict(kidney_run, tmp_path / "p", "--images", nn) == 0
    out = capsys.readouterr().out
    assert "read as 2 separate images" in out
    # the count after the split is said too (the first said 1 image, from channel files)
    assert out.index("read as 2 separate images") < out.index("2 image(s) to predict")
    assert _files(tmp_path / "p") == ["liver_0000.nii.gz", "liver_0002.nii.gz",
                                      "predictions.json"]
    a, b = (nib.load(str(tmp_path / "p" / f"liver_{k:04d}.nii.gz")) for k in (0, 2))
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))  # the same scan twice
    # a DICOM-less folder given as "." is named after itself, not '' (it crashed)
    from med3d_ext.train.predict import _folder_name

    assert _folder_name(Path(".")) == Path.cwd().name
    assert _folder_name(nn / ".." / "nn") == "nn"


def test_out_that_holds_inputs_is_refused(kidney_run, tiny_data, tmp_path, capsys):
    src = tiny_data["transfer"] / "imagesTr" / "kidney_000.nii.gz"
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(src, scans)
    before = _tree(scans)
    err = _refused(capsys, kidney_run, scans, "--images", scans)
    assert f"--out '{scans}' is a folder of the input images" in err
    assert f"e.g. --out '{tmp_path / 'scans-predictions'}'" in err
    # a file's folder, spelt otherwise
    err = _refused(capsys, kidney_run, tmp_path / "x" / ".." / "scans", "--images",
                   scans / "kidney_000.nii.gz")
    assert "is a folder of the input images" in err
    err = _refused(capsys, kidney_run, scans / "kidney_000.nii.gz", "--images", scans)
    assert "is a file; predictions need a folder" in err
    assert _tree(scans) == before


def test_run_and_option_errors(kidney_run, tiny_data, tmp_path, capsys):
    scans = tiny_data["transfer"] / "imagesTr"
    out = tmp_path / "out"
    err = _refused(capsys, tmp_path / "norun", out, "--images", scans)
    assert f"--run: run '{tmp_path / 'norun'}' does not exist" in err
    (tmp_path / "empty_run").mkdir()
    err = _refused(capsys, tmp_path / "empty_run", out, "--images", scans)
    assert "holds no checkpoint (best.pt / last.pt)" in err
    err = _refused(capsys, kidney_run, out, "--images", scans, "--channel", "T2")
    assert err == "error: --channel 'T2': the run: no channel named 'T2'; channels are ['CT']"
    err = _refused(capsys, kidney_run, out, "--images", scans, "--checkpoint", "bset")
    assert "--checkpoint 'bset': expected best, last or a checkpoint file" in err
    err = _refused(capsys, kidney_run, out, "--images", scans, "--overlp", "0.2")
    assert err == "error: `predict`: unknown option --overlp; did you mean --overlap? " \
                  "(`--help` lists every option)"
    err = _refused(capsys, kidney_run, out, "--images", scans, "--data", scans)
    assert "--data is an option of `pretrain` and `transfer` and `evaluate`, not of " \
           "`predict`" in err
    err = _refused(capsys, kidney_run, out)
    assert err == "error: predict needs --images PATH [PATH ...] (image files or folders)"
    capsys.readouterr()
    assert main(["predict", "--run", kidney_run, "--images", scans]) == 2
    assert "predict needs --out DIR" in capsys.readouterr().err
    assert not out.exists()


def test_cli_subprocess_exit_status(kidney_run, tmp_path):
    r = subprocess.run(cli("predict", "--run", kidney_run, "--images", tmp_path / "nope",
                           "--out", tmp_path / "o"), env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --images '{tmp_path / 'nope'}': no such file or folder"


def test_corrupt_image_with_and_without_skip_bad(kidney_run, kidney_eval, tiny_data, tmp_path,
                                                  tmpdir_checked, capsys):
    src = tiny_data["transfer"] / "imagesTr"
    scans = tmp_path / "scans"
    scans.mkdir()
    for c in ("kidney_000", "kidney_002"):
        shutil.copy(src / f"{c}.nii.gz", scans)
    bad = scans / "kidney_001.nii.gz"
    bad.write_bytes(b"not a nifti file")
    out = tmp_path / "pred"
    err = _bad_data(capsys, kidney_run, out, "--images", scans)
    assert err.startswith(f"error: {bad}: not a readable image file")
    assert not out.exists()  # refused before any prediction: no folder left
    # cut short after a good header: found while preprocessing, not in the header check
    big = tmp_path / "big" / "cut.nii.gz"
    big.parent.mkdir()
    r = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(r.normal(0, 100, (40, 40, 20)).astype(np.int16),
                             np.diag([0.8, 0.8, 3.0, 1.0])), str(big))
    big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
    err = _bad_data(capsys, kidney_run, out, "--images", big, scans / "kidney_000.nii.gz")
    assert err.startswith(f"error: {big}: corrupt or truncated file")
    assert not out.exists() and list(tmpdir_checked.iterdir()) == []
    capsys.readouterr()
    assert _predict(kidney_run, out, "--images", scans, big, "--skip-bad") == 0
    cap = capsys.readouterr()
    assert "warning: --images: skipped 2 bad case(s):" in cap.err
    assert f"{bad}: not a readable image file" in cap.err and f"{big}: corrupt" in cap.err
    assert "2 image(s) skipped as bad" in cap.out
    assert _files(out) == ["kidney_000.nii.gz", "kidney_002.nii.gz", "predictions.json"]
    for c in ("kidney_000", "kidney_002"):
        _same_nifti(out / f"{c}.nii.gz", kidney_eval["out"] / f"{c}.nii.gz")
    s = json.loads((out / "predictions.json").read_text())
    assert [p.split(":")[0] for p in s["skipped"]] == [str(bad), str(big)]
    assert list(tmpdir_checked.iterdir()) == []
    # every image bad: an error, not an empty result
    err = _bad_data(capsys, kidney_run, tmp_path / "none", "--images", bad, "--skip-bad")
    assert "no image left to predict (--skip-bad skipped all 1)" in err and str(bad) in err


def test_ctrl_c_leaves_whole_predictions_only(kidney_run, kidney_eval, tiny_data, tmp_path,
                                              tmpdir_checked, monkeypatch, capsys):
    import signal

    src = tiny_data["transfer"] / "imagesTr"
    real_save, saves = nib.save, []

    def save(img, name, at):
        saves.append(name)
        real_save(img, name)
        if len(saves) == at:  # a Ctrl-C with the temporary on disk, before its rename
            signal.raise_signal(signal.SIGINT)

    out = tmp_path / "pred"
    monkeypatch.setattr(nib, "save", lambda img, name: save(img, name, 1))
    assert _predict(kidney_run, out, "--images", src) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert ".tmp" in saves[0] and not out.exists()  # the folder it made, empty: removed
    saves.clear()
    monkeypatch.setattr(nib, "save", lambda img, name: save(img, name, 2))
    assert _predict(kidney_run, out, "--images", src) == 130
    assert _files(out) == ["kidney_000.nii.gz"]  # whole; no temporary, no predictions.json
    _same_nifti(out / "kidney_000.nii.gz", kidney_eval["out"] / "kidney_000.nii.gz")
    assert list(tmpdir_checked.iterdir()) == []
    # into a folder holding an earlier predict's summary: interrupted, it must not leave that
    # summary beside this run's predictions (which it would describe)
    (out / "predictions.json").write_text('{"cases": ["an earlier run"]}')
    saves.clear()
    assert _predict(kidney_run, out, "--images", src) == 130
    assert "predictions.json" not in _files(out)


# --- options ---------------------------------------------------------------------------------

def test_help_and_options_from_yaml_and_set(kidney_run, kidney_eval, tiny_data, tmp_path,
                                            monkeypatch, capsys):
    from med3d_ext.train import config as C

    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    keys = C.keys_for("predict")
    assert {"images", "run", "checkpoint", "out", "overlap", "sw_batch_size", "tta",
            "tta_axes", "skip_bad", "device", "fused", "amp", "progress"} <= set(keys)
    assert "data" not in keys and "cache" not in keys
    for key in keys:
        assert "--" + key.replace("_", "-") in text, key
    src = tiny_data["transfer"] / "imagesTr"
    # the same sliding-window settings as evaluate's, from YAML and --set
    evald = _evaluate(kidney_run, tiny_data["transfer"], tmp_path / "ev", "--tta",
                      "--tta-axes", "0", "2", "--overlap", "0.25", "--sw-batch-size", "3")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"images": [str(src)], "overlap": 0.25, "tta": True,
                                 "run": str(kidney_run)}))
    inputs = {}
    _spy(monkeypatch, inputs)
    assert main(["predict", "--config", f, "--out", tmp_path / "p", "--device", "cpu",
                 "--no-progress", "--set", "tta_axes=2,0", "--set", "sw_batch_size=3"]) == 0
    s = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert {k: s["settings"][k] for k in ("overlap", "sw_batch_size", "tta", "tta_axes")} == \
        {"overlap": 0.25, "sw_batch_size": 3, "tta": True, "tta_axes": [0, 2]}
    for c in KIDNEY:
        _same_nifti(tmp_path / "p" / f"{c}.nii.gz", evald["out"] / f"{c}.nii.gz")
        _same_inputs(inputs[c], evald["inputs"][c])
        assert inputs[c]["mirror_axes"] == (0, 2) and inputs[c]["overlap"] == 0.25
        # the mirrored probabilities, not the plain ones
        assert not np.allclose(inputs[c]["probs"], kidney_eval["inputs"][c]["probs"])
    f.write_text(yaml.safe_dump({"overlapp": 0.3}))
    capsys.readouterr()
    assert main(["predict", "--config", f, "--run", kidney_run, "--images", src, "--out",
                 tmp_path / "q"]) == 2
    assert "unknown configuration key 'overlapp'" in capsys.readouterr().err


# --- pretraining runs, multi-channel images, nnU-Net channel files ---------------------------

@pytest.fixture(scope="module")
def pre_run(tiny_data, tmp_path_factory):
    """A one-step pretraining run with two heads, one of them on 4-channel MR (brain)."""
    run = tmp_path_factory.mktemp("pre_run") / "pre"
    data = [tiny_data["pretrain"] / BRAIN, tiny_data["pretrain"] / "Task04_Hippocampus"]
    assert main(["pretrain", *tiny_args(data, run, "--epochs", 1, "--steps", 1, "--cache",
                                        tiny_data["cache"], "--no-export")]) == 0
    return run


def test_pretrain_head_and_nnunet_channel_files(pre_run, kidney_run, tiny_data, tmp_path,
                                                monkeypatch, capsys):
    from med3d_ext.data import save_nifti

    brain = tiny_data["pretrain"] / BRAIN / "imagesTr"
    evald = _evaluate(pre_run, tiny_data["pretrain"] / BRAIN, tmp_path / "ev")
    cases = sorted(p.name[:-7] for p in brain.glob("*.nii.gz"))
    assert len(cases) == 2
    err = _refused(capsys, pre_run, tmp_path / "p", "--images", brain)
    assert err == f"error: this pretraining run has heads ['{BRAIN}', 'Task04_Hippocampus']; " \
                  "pick one with --head"
    err = _refused(capsys, pre_run, tmp_path / "p", "--images", brain, "--head", "Brain")
    assert "none is named 'Brain' (--head)" in err
    inputs = {}
    _spy(monkeypatch, inputs)
    assert _predict(pre_run, tmp_path / "p", "--images", brain, "--head", BRAIN) == 0
    for c in cases:
        _same_nifti(tmp_path / "p" / f"{c}.nii.gz", evald["out"] / f"{c}.nii.gz")
        _same_inputs(inputs[c], evald["inputs"][c])
        assert inputs[c]["x"].shape[0] == 1  # the run's channel of the four
    s = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert s["head"] == BRAIN and s["num_classes"] == 4
    assert s["preprocessing"]["channels"] == ["FLAIR", "T1w", "t1gd", "T2w"]
    # one case as nnU-Net channel files <case>_0000..0003: the same case, the same voxels
    img = nib.load(str(brain / f"{cases[0]}.nii.gz"))
    data = np.asarray(img.dataobj)
    nn = tmp_path / "nn"
    for k in range(4):
        save_nifti(data[..., k], img.affine, nn / f"{cases[0]}_{k:04d}.nii.gz")
    capsys.readouterr()
    assert _predict(pre_run, tmp_path / "pn", "--images", nn, "--head", BRAIN) == 0
    assert "1 image(s) to predict (1 of them from nnU-Net channel files)" in \
        capsys.readouterr().out
    assert _files(tmp_path / "pn") == [f"{cases[0]}.nii.gz", "predictions.json"]
    _same_nifti(tmp_path / "pn" / f"{cases[0]}.nii.gz", evald["out"] / f"{cases[0]}.nii.gz")
    _same_inputs(inputs[cases[0]], evald["inputs"][cases[0]])
    s = json.loads((tmp_path / "pn" / "predictions.json").read_text())
    assert s["cases"][0]["files"] == [str(nn / f"{cases[0]}_{k:04d}.nii.gz") for k in range(4)]
    # channels that do not fit the run's: a single-channel CT image, one channel file alone
    kid = tiny_data["transfer"] / "imagesTr" / "kidney_000.nii.gz"
    err = _bad_data(capsys, pre_run, tmp_path / "pk", "--images", kid, "--head", BRAIN)
    assert err.startswith(f"error: {kid}: has 1 channel(s), but the run was trained on 4 "
                          "(FLAIR, T1w, t1gd, T2w;")
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(nn / f"{cases[0]}_0000.nii.gz", one)
    err = _bad_data(capsys, pre_run, tmp_path / "pk", "--images", one, "--head", BRAIN)
    assert f"{one / (cases[0] + '_0000.nii.gz')}: has 1 channel(s)" in err
    assert f"nnU-Net channel files {cases[0]}_0000 .. {cases[0]}_0003" in err
    # --skip-bad: the misfit skipped, the others predicted
    capsys.readouterr()
    assert _predict(pre_run, tmp_path / "ps", "--images", kid, brain, "--head", BRAIN,
                    "--skip-bad") == 0
    assert f"{kid}: has 1 channel(s)" in capsys.readouterr().err
    assert _files(tmp_path / "ps") == sorted([f"{c}.nii.gz" for c in cases]
                                             + ["predictions.json"])
    # nnU-Net channel files with a gap, for this 4-channel run: the case and channels named
    gap = tmp_path / "gap"
    for k in (0, 2, 3):
        save_nifti(data[..., k], img.affine, gap / f"{cases[0]}_{k:04d}.nii.gz")
    err = _refused(capsys, pre_run, tmp_path / "pg", "--images", gap, "--head", BRAIN)
    assert f"channel files of case '{cases[0]}'" in err and "but not 0001 (1 missing)" in err
    # a segmentation run's single channel, given a 4-channel image
    err = _bad_data(capsys, kidney_run, tmp_path / "pk", "--images", brain)
    assert "has 4 channel(s), but the run was trained on 1 (CT;" in err


def test_user_audit_refusals_and_warnings(kidney_run, pre_run, tiny_data, tmp_path, capsys):
    """What a black-box audit found: a dataset's labelsTr/ as --out (its labels were replaced
    by predictions, silently), earlier predictions left beside new ones unsaid, a file named
    only '.nii' (a crash), one 2-D DICOM slice taken for a volume, and --channel switching to a
    channel the run never saw, unsaid."""
    kid = tiny_data["transfer"]
    src = kid / "imagesTr" / "kidney_000.nii.gz"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src, inp)
    before = _tree(kid)
    for out in (kid / "labelsTr", kid):
        err = _refused(capsys, kidney_run, out, "--images", inp)
        assert f"--out {str(out)!r} is a folder of the dataset" in err
    assert _tree(kid) == before
    # a folder with earlier files: the replaced and the staying ones are said
    out = tmp_path / "p"
    out.mkdir()
    (out / "kidney_000.nii.gz").write_bytes(b"old")
    (out / "other.nii.gz").write_bytes(b"old")
    capsys.readouterr()
    assert _predict(kidney_run, out, "--images", inp) == 0
    err = capsys.readouterr().err
    assert "already holds 2 .nii.gz file(s): 1 will be replaced by this run's (kidney_000.nii.gz)" \
        in err and "1 from elsewhere stay beside them (other.nii.gz" in err
    assert (out / "other.nii.gz").read_bytes() == b"old"
    # '.nii' alone: no case name
    bad = tmp_path / "nameless"
    bad.mkdir()
    shutil.copy(src, bad / ".nii.gz")
    err = _refused(capsys, kidney_run, tmp_path / "q", "--images", bad / ".nii.gz")
    assert "has no name before its ending (.nii.gz)" in err
    # one 2-D DICOM slice
    sitk = pytest.importorskip("SimpleITK")
    sl = sitk.Cast(sitk.ReadImage(str(src)), sitk.sitkInt16)[:, :, 0]
    sitk.WriteImage(sl, str(tmp_path / "slice.dcm"))
    err = _bad_data(capsys, kidney_run, tmp_path / "q", "--images", tmp_path / "slice.dcm")
    assert "one 2-D DICOM slice" in err and "give the folder of its series" in err
    # --channel: another channel than the run's, warned
    brain = tiny_data["pretrain"] / BRAIN / "imagesTr"
    capsys.readouterr()
    assert _predict(pre_run, tmp_path / "b", "--images", brain, "--head", BRAIN,
                    "--channel", "T2w") == 0
    assert "--channel 'T2w': the run was trained on channel 'FLAIR'" in capsys.readouterr().err
    # ... and by evaluate (it switched unsaid)
    assert main(["evaluate", "--run", pre_run, "--data", tiny_data["pretrain"] / BRAIN,
                 "--out", tmp_path / "e", "--device", "cpu", "--no-progress", "--channel",
                 "T2w"]) == 0
    err = capsys.readouterr().err
    assert "--channel 'T2w': the run was trained on channel 'FLAIR'; evaluating from 'T2w'" \
        in err, err


def test_classification_says_channel_and_patch_choices(cls_run, tiny_data, tmp_path, capsys):
    # a 2-channel file was classified from channel 0 unsaid; a --patch other than the run's
    # changed the probabilities unsaid
    src = sorted((tiny_data["cls"] / "images").glob("*.nii.gz"))[0]
    img = nib.load(str(src))
    two = tmp_path / "two"
    two.mkdir()
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), str(two / "x.nii.gz"))
    capsys.readouterr()
    assert _predict(cls_run, tmp_path / "p", "--images", two, "--patch", 24) == 0
    err = capsys.readouterr().err
    assert "x.nii.gz: 2 channels; the classification run reads one: channel 0" in err
    assert "--patch [24, 24, 24]: the run was trained on patches of [16, 16, 16]" in err
    # a corrupt file is found before any image is classified (the loop found it last)
    (two / "z.nii.gz").write_bytes(b"not an image")
    capsys.readouterr()
    assert _predict(cls_run, tmp_path / "q", "--images", two) == 1  # bad data
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "z.nii.gz" in last and not (tmp_path / "q").exists()
