"""evaluate reads reference labels as training does: an NRRD/MHA label (SimpleITK) is scored
exactly like the same label in NIfTI (it crashed in nibabel with a raw traceback)."""

from __future__ import annotations

import json
import shutil

import pytest

from med3d_ext.train.cli import main

from .conftest import tiny_args

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")
sitk = pytest.importorskip("SimpleITK")


def _list_dataset(src, root, ending):
    """A MedicalNet list dataset (train.txt) of the MSD dataset ``src``'s cases, in ``ending``."""
    (root / "img").mkdir(parents=True)
    (root / "seg").mkdir()
    lines = []
    for img in sorted((src / "imagesTr").glob("*.nii.gz")):
        name = img.name[:-len(".nii.gz")]
        for sub, f in (("img", img), ("seg", src / "labelsTr" / img.name)):
            dst = root / sub / f"{name}{ending}"
            if ending == ".nii.gz":
                shutil.copy(f, dst)
            else:
                sitk.WriteImage(sitk.ReadImage(str(f)), str(dst))
        lines.append(f"img/{name}{ending} seg/{name}{ending}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_mha_labels_score_like_nifti(tiny_data, tmp_path, capsys):
    nii = _list_dataset(tiny_data["transfer"], tmp_path / "nii", ".nii.gz")
    mha = _list_dataset(tiny_data["transfer"], tmp_path / "mha", ".mha")
    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(nii, run, "--from-scratch", "--epochs", 1, "--steps", 1,
                                        "--cache", tmp_path / "cache")]) == 0
    res = {}
    for name, data in (("nii", nii), ("mha", mha)):
        assert main(["evaluate", "--run", run, "--data", data, "--out", tmp_path / f"p_{name}",
                     "--device", "cpu", "--cache", tmp_path / "cache", "--no-progress"]) == 0
        assert "Traceback" not in capsys.readouterr().err
        cases = json.loads((tmp_path / f"p_{name}" / "metrics.json").read_text())["cases"]
        res[name] = {c["case"]: (c["dice_1"], c["hd95_1"], c["dice_2"]) for c in cases}
        assert all(c["labelled"] for c in cases)
    assert res["mha"] == res["nii"] and len(res["nii"]) >= 2
