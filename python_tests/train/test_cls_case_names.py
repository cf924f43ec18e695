"""evaluate and predict name a classification image alike: ``case`` is the file name without
its ending in both predictions.csv files (evaluate wrote ``images/case_000.nii.gz``, predict
``case_000``), and both have the image's ``file``."""

from __future__ import annotations

import csv
import shutil

from med3d_ext.train.cli import main


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_image_case_names(tmp_path):
    from med3d_ext.train.predict import image_case_names

    for name in ("a.nii.gz", "b.nrrd", "c_0000.nii.gz", "d_0000.nii.gz", "d_0001.nii.gz",
                 "e_0001.nii.gz", "scan_2019.nii"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "series").mkdir()
    files = sorted(p for p in tmp_path.iterdir())
    got = dict(zip((p.name for p in files), image_case_names(files)))
    assert got == {"a.nii.gz": "a", "b.nrrd": "b", "c_0000.nii.gz": "c",  # a lone channel 0
                   "d_0000.nii.gz": "d_0000", "d_0001.nii.gz": "d_0001",  # separate scans
                   "e_0001.nii.gz": "e_0001", "scan_2019.nii": "scan_2019", "series": "series"}


def test_evaluate_and_predict_name_cases_alike(cls_run, tiny_data, tmp_path, capsys):
    root = tmp_path / "cls"
    shutil.copytree(tiny_data["cls"], root)
    # a lone nnU-Net channel file: predict names it "extra" (its case), as evaluate must
    shutil.copy(root / "images" / "case_000.nii.gz", root / "images" / "extra_0000.nii.gz")
    with open(root / "labels.csv", "a") as f:
        f.write("images/extra_0000.nii.gz,1\n")
    ev, pr = tmp_path / "ev", tmp_path / "pr"
    common = ["--run", cls_run, "--device", "cpu", "--no-progress"]
    assert main(["evaluate", *common, "--data", root, "--out", ev]) == 0
    assert main(["predict", *common, "--images", root / "images", "--out", pr]) == 0
    capsys.readouterr()
    e, p = _rows(ev / "predictions.csv"), _rows(pr / "predictions.csv")
    assert sorted(r["case"] for r in e) == sorted(r["case"] for r in p)
    assert "case_000" in {r["case"] for r in e} and "extra" in {r["case"] for r in e}
    # the same image: the same case, file and probabilities in both
    by_case = {r["case"]: r for r in p}
    for r in e:
        q = by_case[r["case"]]
        assert r["file"] == q["file"] and r["prob_1"] == q["prob_1"], (r, q)
    assert list(e[0])[:3] == ["case", "file", "label"]


def test_per_class_folders_keep_distinct_cases(cls_run, tiny_data, tmp_path, capsys):
    """Base names that collide (neg/001, pos/001) are named by their path under the folder."""
    root = tmp_path / "cls"
    root.mkdir()
    imgs = sorted((tiny_data["cls"] / "images").glob("*.nii.gz"))
    for k, cls in enumerate(("neg", "pos")):
        (root / cls).mkdir()
        shutil.copy(imgs[k], root / cls / "001.nii.gz")
    shutil.copy(imgs[2], root / "002.nii.gz")
    (root / "labels.csv").write_text("image,label\nneg/001.nii.gz,0\npos/001.nii.gz,1\n"
                                     "002.nii.gz,0\n")
    assert main(["evaluate", "--run", cls_run, "--data", root, "--out", tmp_path / "ev",
                 "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    rows = _rows(tmp_path / "ev" / "predictions.csv")
    assert [r["case"] for r in rows] == ["neg/001", "pos/001", "002"]
    assert [r["file"] for r in rows] == [str(root / "neg" / "001.nii.gz"),
                                        str(root / "pos" / "001.nii.gz"),
                                        str(root / "002.nii.gz")]
