"""End-to-end runs on tiny synthetic data: pretrain, exports, transfer (seg, cls, MedicalNet
file), evaluate, and the errors that help."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from med3d_ext.train.cli import main
from med3d_ext.train.runlog import read_metrics

from .conftest import cli, cli_env, tiny_args

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


@pytest.fixture(scope="module")
def pre_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pre"
    rc = main(["pretrain", *tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"])])
    assert rc == 0
    return out


def test_pretrain_outputs(pre_run, tiny_data):
    from med3d_ext.train.config import load_config, resolve

    import os

    umask = os.umask(0)
    os.umask(umask)
    for f in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "summary.json",
              "encoder_medicalnet.pth", "encoder.safetensors"):
        assert (pre_run / f).is_file(), f
    for f in ("last.pt", "encoder_medicalnet.pth", "encoder.safetensors"):
        # readable as any file the user writes (safetensors alone once made them 0600)
        assert (pre_run / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    ck = torch.load(pre_run / "last.pt", weights_only=True)
    assert ck["format"] == "med3d_ext" and ck["arch"]["task"] == "pretrain"
    assert len(ck["arch"]["heads"]) == 8 and ck["step"] == 4 and ck["epoch"] == 2
    for k in ("optimizer", "scheduler", "scaler", "rng", "config", "sampler"):
        assert k in ck, k
    rows = read_metrics(pre_run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    assert len(train) == 4 and len(val) == 2
    heads = ck["arch"]["heads"]
    seen = {k.split("/", 1)[1] for r in train for k in r if k.startswith("loss/")}
    assert seen and seen <= set(heads)
    assert any(k.startswith("dice/") for r in train for k in r)
    for r in train:
        assert {"samples_s", "voxels_s", "data_wait", "lr", "loss"} <= set(r)
    assert {f"val_dice/{h}" for h in heads} <= set(val[-1])
    cfg = load_config(pre_run / "config.yaml")
    assert resolve("pretrain", base=cfg)["patch"] == [16, 16, 16]
    # exports: MedicalNet layout (module.<key>, encoder only) and safetensors, same tensors
    from safetensors.torch import load_file

    mn = torch.load(pre_run / "encoder_medicalnet.pth", weights_only=True)["state_dict"]
    st = load_file(str(pre_run / "encoder.safetensors"))
    enc = {k[len("encoder."):]: v for k, v in ck["state_dict"].items() if k.startswith("encoder.")}
    assert set(mn) == {"module." + k for k in enc} and set(st) == set(enc)
    for k, v in enc.items():
        assert torch.equal(mn["module." + k], v) and torch.equal(st[k], v), k


def _source_arrays(case_image, case_label):
    import nibabel as nib

    img = nib.load(str(case_image))
    lab = np.asarray(nib.load(str(case_label)).dataobj).astype(np.int64)
    return img, lab


def test_transfer_seg_and_evaluate(pre_run, tiny_data, tmp_path):
    import nibabel as nib

    run = tmp_path / "seg"
    rc = main(["transfer", *tiny_args(tiny_data["transfer"], run, "--cache", tiny_data["cache"],
                                      "--pretrained", pre_run / "last.pt", "--freeze-epochs", 1)])
    assert rc == 0
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["arch"]["task"] == "segmentation" and ck["arch"]["depth"] == 10
    assert ck["config"]["lr"] == 1e-3 and ck["config"]["head_lr"] == 1e-1
    pred_dir = tmp_path / "pred"
    assert main(["evaluate", "--run", run, "--data", tiny_data["transfer"], "--out", pred_dir,
                 "--device", "cpu", "--cache", tiny_data["cache"]]) == 0
    summary = json.loads((pred_dir / "metrics.json").read_text())
    cases = sorted(p.name[:-len(".nii.gz")] for p in (tiny_data["transfer"] / "imagesTr").iterdir())
    assert sorted(r["case"] for r in summary["cases"]) == cases
    for r in summary["cases"]:
        img, lab = _source_arrays(tiny_data["transfer"] / "imagesTr" / f"{r['case']}.nii.gz",
                                  tiny_data["transfer"] / "labelsTr" / f"{r['case']}.nii.gz")
        pred_img = nib.load(str(pred_dir / f"{r['case']}.nii.gz"))
        pred = np.asarray(pred_img.dataobj)
        # the case's original space: shape, affine (orientation) of the source image
        assert pred.shape == img.shape[:3]
        np.testing.assert_allclose(pred_img.affine, img.affine, atol=1e-5)
        assert pred_img.header.get_xyzt_units()[0] == "mm"  # viewers read the spacing in mm
        assert int(pred_img.header["sform_code"]) == int(pred_img.header["qform_code"]) == 1
        for c in (1, 2):  # Dice recomputed independently from the written files
            p, t = pred == c, lab == c
            den = p.sum() + t.sum()
            want = None if den == 0 else 2 * (p & t).sum() / den
            assert (r[f"dice_{c}"] is None) if want is None else \
                r[f"dice_{c}"] == pytest.approx(want)
    assert "hd95" in summary and (pred_dir / "metrics.csv").is_file()
    # --fused evaluates with BatchNorm folded into the convs (med3d_ext.nn.fold_bn): the same
    # predictions up to round-off
    fused_dir = tmp_path / "pred_fused"
    assert main(["evaluate", "--run", run, "--data", tiny_data["transfer"], "--out", fused_dir,
                 "--device", "cpu", "--cache", tiny_data["cache"], "--fused"]) == 0
    for r in summary["cases"]:
        a = np.asarray(nib.load(str(pred_dir / f"{r['case']}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(fused_dir / f"{r['case']}.nii.gz")).dataobj)
        assert (a != b).mean() <= 1e-3, r["case"]


def _medicalnet_file(path, depth=10):
    from med3d_ext.models import resnet3d

    m = resnet3d(depth, 2)
    for n, b in m.named_buffers():  # non-trivial BN statistics, as in released files
        if n.endswith("running_mean"):
            b.normal_()
        elif n.endswith("running_var"):
            b.uniform_(0.5, 2.0)
    sd = {"module." + k: v for k, v in m.state_dict().items() if not k.startswith("conv_seg.")}
    torch.save({"state_dict": sd}, path)
    return {k[len("module."):]: v for k, v in sd.items()}


def test_transfer_from_medicalnet_layout_file(tiny_data, tmp_path, capsys):
    enc = _medicalnet_file(tmp_path / "resnet_10.pth")
    run = tmp_path / "mn"
    # the encoder stays frozen for the whole run, so it must end as the file's weights
    rc = main(["transfer", *tiny_args(tiny_data["transfer"], run, "--cache", tiny_data["cache"],
                                      "--pretrained", tmp_path / "resnet_10.pth",
                                      "--freeze-epochs", 2)])
    assert rc == 0
    # the user sees what the file filled (MedicalNet's module. prefix understood)
    assert f"Loaded {len(enc)} tensors from" in capsys.readouterr().out
    ck = torch.load(run / "last.pt", weights_only=True)
    sd = ck["state_dict"]
    for k, v in enc.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(sd[k], v), k
    # ... while the head did train: SGD momentum buffers exist for the head group only
    groups = ck["optimizer"]["param_groups"]
    head = next(g for g in groups if g["name"] == "head")
    enc_g = next(g for g in groups if g["name"] == "encoder")
    state = ck["optimizer"]["state"]
    assert all(i in state for i in head["params"])
    assert not any(i in state for i in enc_g["params"])


def test_transfer_wrong_depth_errors(tiny_data, tmp_path, capsys):
    _medicalnet_file(tmp_path / "resnet_10.pth")
    rc = main(["transfer", *tiny_args(tiny_data["transfer"], tmp_path / "x", "--pretrained",
                                      tmp_path / "resnet_10.pth", "--depth", 18)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ResNet-10" in err and "--depth 18" in err


def test_transfer_cls_and_evaluate(pre_run, tiny_data, tmp_path):
    run = tmp_path / "cls"
    rc = main(["transfer", "--task", "cls", *tiny_args(tiny_data["cls"], run, "--pretrained",
                                                        pre_run / "encoder.safetensors")])
    assert rc == 0
    ck = torch.load(run / "best.pt", weights_only=True)
    assert ck["arch"]["task"] == "classification" and ck["classes"] == ["0", "1"]
    # the folder's classes.json names (synthetic: 0 no tumour, 1 tumour) travel with the run
    assert ck["class_names"] == {"0": "no tumour", "1": "tumour"}
    pred = tmp_path / "pcls"
    assert main(["evaluate", "--run", run, "--data", tiny_data["cls"], "--out", pred,
                 "--device", "cpu", "--split", "val"]) == 0
    rows = (pred / "predictions.csv").read_text().splitlines()
    # the original columns first (with the classes' names), then each class's probability
    # (test_cls_metrics.py)
    assert rows[0] == ("case,file,label,label_name,prediction,prediction_name,probability,"
                       "prob_0,prob_1")
    assert len(rows) - 1 == len(ck["split"]["cls"]["val"])


def test_helpful_errors(pre_run, tiny_data, tmp_path):
    # missing data folder (through the real CLI: message, no traceback)
    r = subprocess.run(cli("pretrain", "--data", tmp_path / "nope", "--out", tmp_path / "r"),
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    # (a --data that is not there is the command line's error: exit 2, as a missing --run)
    assert r.returncode == 2 and "nope" in r.stderr and "no such folder" in r.stderr
    assert "Traceback" not in r.stderr
    # a dataset whose class count disagrees with the head: kidney has 3 classes, the
    # pretraining run's hippocampus head 3, brain tumour 4 -> evaluate with the wrong head
    with pytest.raises(Exception, match="classes"):
        from med3d_ext.train.cli import run_evaluate
        from med3d_ext.train.config import resolve

        run_evaluate(resolve("evaluate", {
            "run": str(pre_run), "data": [str(tiny_data["pretrain"] / "Task01_BrainTumour")],
            "out": str(tmp_path / "p"), "head": "Task09_Spleen", "device": "cpu",
            "cache": str(tiny_data["cache"])}))
    # transfer without --pretrained or --from-scratch
    assert main(["transfer", *tiny_args(tiny_data["transfer"], tmp_path / "t")]) == 2
    # an existing run folder is never overwritten
    assert main(["pretrain", *tiny_args(tiny_data["pretrain"], pre_run)]) == 2


def test_fused_and_plain_runs_agree(tiny_data, tmp_path):
    """--fused (compiled conv+BN+ReLU, loss and resample ops) and --no-fused (plain PyTorch)
    train the same model: the logged losses agree to float tolerance."""
    from med3d_ext.train.backends import fusion_available

    if not fusion_available():
        pytest.skip("fused ops not built")
    losses = {}
    for flag in ("--fused", "--no-fused"):
        run = tmp_path / flag.strip("-")
        assert main(["transfer", *tiny_args(tiny_data["transfer"], run, "--cache",
                                            tiny_data["cache"], "--from-scratch", "--no-augment",
                                            flag)]) == 0
        losses[flag] = [r["loss"] for r in read_metrics(run / "metrics.jsonl")
                        if r["kind"] == "train"]
    assert len(losses["--fused"]) == 4 and np.isfinite(losses["--fused"]).all()
    # same initial weights and batches: the first steps agree closely (later ones drift apart
    # the way any two float orderings do under SGD at lr 0.1)
    np.testing.assert_allclose(losses["--fused"][:2], losses["--no-fused"][:2], rtol=1e-4)


# ------------------------------------------------------------------ user-level regressions


def _copy_msd_as_medicalnet(src, root):
    """The MSD task ``src`` rewritten as a MedicalNet list folder (train.txt, no imagesTr)."""
    import shutil

    lines = []
    for img in sorted((src / "imagesTr").glob("*.nii.gz")):
        for sub, f in (("images", img), ("label", src / "labelsTr" / img.name)):
            (root / "Kidney" / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "Kidney" / sub / img.name)
        lines.append(f"Kidney/images/{img.name} Kidney/label/{img.name}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_medicalnet_list_folder_as_data(tiny_data, tmp_path):
    """--data on a MedicalNet list folder (or its train.txt) trains and evaluates; the
    training CLI once took such a folder for a folder of datasets and found none."""
    from med3d_ext.train.tasks import resolve_data_dirs

    root = _copy_msd_as_medicalnet(tiny_data["transfer"], tmp_path / "mn")
    assert resolve_data_dirs([root], "transfer") == [root]
    assert resolve_data_dirs([root / "train.txt"], "transfer") == [root / "train.txt"]
    assert resolve_data_dirs([tmp_path], "pretrain") == [root]  # a folder of datasets
    # README: `python -m med3d_ext.data preprocess DIR --out CACHE`; training with --cache
    # CACHE then reuses that cache (it once preprocessed again into CACHE/<name>-<hash>/)
    from med3d_ext.data.__main__ import main as data_main

    assert data_main(["preprocess", str(root), "--out", str(tmp_path / "c"), "--workers", "0",
                      "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(root / "train.txt", run, "--from-scratch", "--cache",
                                        tmp_path / "c", "--epochs", 1)]) == 0
    pred = tmp_path / "pred"
    assert main(["evaluate", "--run", run, "--data", root, "--out", pred, "--device", "cpu",
                 "--cache", tmp_path / "c"]) == 0
    assert len(list(pred.glob("*.nii.gz"))) == len(list((root / "Kidney/images").iterdir()))
    assert [d.name for d in (tmp_path / "c").iterdir() if d.is_dir()] == ["cases"]


def _copy_msd_as_nnunet(src, root):
    """The MSD task ``src`` rewritten in nnU-Net v2's layout (_0000 channel files)."""
    import shutil

    meta = json.loads((src / "dataset.json").read_text())
    for img in sorted((src / "imagesTr").glob("*.nii.gz")):
        case = img.name[:-len(".nii.gz")]
        for sub, f, name in (("imagesTr", img, f"{case}_0000.nii.gz"),
                             ("labelsTr", src / "labelsTr" / img.name, img.name)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / sub / name)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": meta["modality"]["0"]}, "file_ending": ".nii.gz",
        "labels": {v: int(k) for k, v in meta["labels"].items()},
        "numTraining": len(meta["training"])}))
    return root


def test_layouts_through_the_cli(tiny_data, tmp_path):
    """pretrain on a folder holding an nnU-Net v2 and a MedicalNet-list dataset, then evaluate
    one of its heads on the nnU-Net dataset: predictions in each case's source space."""
    import nibabel as nib

    raw = tmp_path / "raw"
    nn = _copy_msd_as_nnunet(tiny_data["transfer"], raw / "Dataset011_Kidney")
    _copy_msd_as_medicalnet(tiny_data["pretrain"] / "Task09_Spleen", raw / "spleen_mn")
    run = tmp_path / "pre"
    assert main(["pretrain", *tiny_args(raw, run, "--epochs", 1, "--cache", tmp_path / "c",
                                        "--no-export")]) == 0
    heads = torch.load(run / "last.pt", weights_only=True)["arch"]["heads"]
    assert heads == {"Dataset011_Kidney": 3, "spleen_mn": 2}
    pred = tmp_path / "pred"
    assert main(["evaluate", "--run", run, "--data", nn, "--out", pred, "--device", "cpu",
                 "--cache", tmp_path / "c"]) == 0
    for src in sorted((nn / "imagesTr").iterdir()):
        img = nib.load(str(src))
        out = nib.load(str(pred / src.name.replace("_0000", "")))
        assert out.shape == img.shape and np.allclose(out.affine, img.affine, atol=1e-5)


def test_resume_from_another_directory_and_refused_resume_keeps_config(tiny_data, tmp_path,
                                                                      monkeypatch, capsys):
    """Relative --data/--pretrained are saved absolute (a resumed job may start elsewhere); a
    refused --resume leaves config.yaml as it was."""
    import shutil

    from med3d_ext.train.config import load_config

    work = tmp_path / "work"
    shutil.copytree(tiny_data["transfer"], work / "kidney")
    _medicalnet_file(work / "resnet_10.pth")
    monkeypatch.chdir(work)
    assert main(["transfer", *tiny_args("kidney", "run", "--pretrained", "resnet_10.pth",
                                        "--epochs", 1, "--cache", tmp_path / "c")]) == 0
    saved = load_config(work / "run" / "config.yaml")
    assert saved["data"] == [str(work / "kidney")]
    assert saved["pretrained"] == str(work / "resnet_10.pth")
    before = (work / "run" / "config.yaml").read_text()
    # refused: another architecture, the other command
    assert main(["transfer", "--resume", "run", "--depth", 18, "--no-progress"]) != 0
    assert main(["pretrain", "--resume", "run", "--no-progress"]) == 2
    assert "is a transfer run" in capsys.readouterr().err
    assert (work / "run" / "config.yaml").read_text() == before
    # the resumed run takes its weights from last.pt: the pretrained file may be gone
    assert saved["depth"] == 10 and saved["shortcut_type"] == "B"
    (work / "resnet_10.pth").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["transfer", "--resume", work / "run", "--epochs", 2, "--no-progress"]) == 0
    assert torch.load(work / "run" / "last.pt", weights_only=True)["step"] == 4


def test_user_errors_are_one_clean_line(tiny_data, tmp_path, capsys):
    """Each mistake: exit code != 0, one 'error:' line naming the argument and the value."""
    tr = tiny_data["transfer"]
    brain = tiny_data["pretrain"] / "Task01_BrainTumour"
    (tmp_path / "afile").write_text("")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file at all")
    (tmp_path / "half").mkdir()
    import json
    import shutil

    unlab = tmp_path / "unlabelled"  # test images only: evaluate them, never train on them
    shutil.copytree(tr, unlab)
    meta = json.loads((unlab / "dataset.json").read_text())
    meta["training"] = [{"image": e["image"]} for e in meta["training"]]
    (unlab / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "half" / "config.yaml").write_text("data: [x]\ntask: seg\n")
    pre_like = tmp_path / "pre_like"  # a run folder as far as resume's checks go
    pre_like.mkdir()
    (pre_like / "config.yaml").write_text("data: [x]\n")
    (pre_like / "last.pt").write_bytes(b"")
    cases = [
        (["transfer", *tiny_args(brain, tmp_path / "r1", "--from-scratch", "--channel",
                                 "FLAIRX")], ["--channel 'FLAIRX'", "FLAIR", "T2w"]),
        (["transfer", *tiny_args(tr, tmp_path / "afile", "--from-scratch")],
         ["--out", "afile", "is a file"]),
        (["transfer", *tiny_args(tiny_data["cls"], tmp_path / "r2", "--from-scratch")],
         ["classification folder", "--task cls"]),
        (["transfer", *tiny_args(tr, tmp_path / "r3", "--pretrained", tmp_path / "half")],
         ["--pretrained", "is a folder"]),
        (["transfer", *tiny_args(tr, tmp_path / "r4", "--pretrained",
                                 tmp_path / "garbage.pth")], ["garbage.pth", "not a PyTorch"]),
        (["transfer", "--resume", tmp_path / "half"], ["before its first checkpoint"]),
        (["transfer", "--resume", tmp_path / "r5"], ["not a run folder"]),
        (["pretrain", "--resume", pre_like, "--out", tmp_path / "elsewhere"],
         ["drop --out", "elsewhere"]),
        (["evaluate", "--run", tmp_path / "half", "--data", tr, "--out", tmp_path / "p"],
         ["holds no checkpoint"]),
        (["transfer", *tiny_args(unlab, tmp_path / "r7", "--from-scratch", "--cache",
                                 tmp_path / "c")], ["have no label file"]),
        # a folder of datasets: transfer once trained on the first of them, silently
        (["transfer", *tiny_args(tiny_data["pretrain"], tmp_path / "r6", "--from-scratch")],
         ["takes one dataset", "holds 8", "Task01_BrainTumour"]),
    ]
    for argv, want in cases:
        assert main(argv) != 0, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, (argv, err)
        for w in want:
            assert w in err, (argv, err)


def test_labels_csv_checked_and_per_class_folders(tiny_data, tmp_path, capsys):
    """labels.csv: non-integer / blank labels and repeated images are errors naming the line;
    a spreadsheet's BOM and spaced header are fine; images in per-class folders that share a
    base name stay distinct cases (they once overwrote each other's image)."""
    import shutil

    from med3d_ext.train.tasks import cls_case_names, read_cls_csv

    root = tmp_path / "cls"
    shutil.copytree(tiny_data["cls"], root)
    rows = (root / "labels.csv").read_text().splitlines()[1:]
    for bad, want in [("1.5", "line 3: label '1.5'"), ("", "line 3: label ''"),
                      ("yes", "not an integer")]:
        body = [rows[0], rows[1].rsplit(",", 1)[0] + "," + bad, *rows[2:]]
        (root / "labels.csv").write_text("\n".join(["image,label", *body]) + "\n")
        with pytest.raises(FileNotFoundError, match=want.replace("(", r"\(")):
            read_cls_csv(root)
    (root / "labels.csv").write_text("\n".join(["image,label", rows[0], *rows]) + "\n")
    with pytest.raises(FileNotFoundError, match="already listed on line 2"):
        read_cls_csv(root)
    imgs = sorted((root / "images").glob("*.nii.gz"))
    for k, cls in enumerate(("neg", "pos")):
        (root / cls).mkdir()
        shutil.copy(imgs[k], root / cls / "001.nii.gz")
    (root / "labels.csv").write_text("\ufeffimage, label\nneg/001.nii.gz, 0\npos/001.nii.gz,1\n"
                                     + "\n".join(rows) + "\n", encoding="utf-8")
    paths, labels = read_cls_csv(root)
    assert labels[:2] == ["0", "1"]
    names = cls_case_names(root, paths)
    assert names[:2] == ["neg/001.nii.gz", "pos/001.nii.gz"] and len(set(names)) == len(names)
    # a corrupt image: an error naming it, or skipped with a warning under --skip-bad
    imgs[2].write_bytes(imgs[2].read_bytes()[:200])
    args = ["transfer", "--task", "cls", *tiny_args(root, tmp_path / "r", "--from-scratch",
                                                     "--epochs", 1)]
    assert main(args) == 1 and imgs[2].name in capsys.readouterr().err
    assert main([*args, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "skipped 1 bad image" in err and imgs[2].name in err
    ck = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    split = ck["split"]["cls"]
    assert "neg/001.nii.gz" in split["train"] + split["val"]
    assert not any(imgs[2].name in n for n in split["train"] + split["val"])
    assert main(["evaluate", "--run", tmp_path / "r", "--data", root, "--out", tmp_path / "p",
                 "--device", "cpu", "--skip-bad"]) == 0
    pred = (tmp_path / "p" / "predictions.csv").read_text()
    assert "neg/001.nii.gz" in pred and "pos/001.nii.gz" in pred and imgs[2].name not in pred
    # a class the run's head does not predict: an error, not a silently wrong accuracy
    (root / "labels.csv").write_text("image,label\nneg/001.nii.gz,0\npos/001.nii.gz,7\n")
    ev = ["evaluate", "--run", tmp_path / "r", "--data", root, "--out", tmp_path / "p",
          "--device", "cpu"]
    assert main(ev) == 1  # classes.json declares 0 and 1: 7 is a typo, named as such
    assert "labels [7] are not declared in" in capsys.readouterr().err
    (root / "classes.json").unlink()  # undeclared classes: the head's count decides
    assert main(ev) == 2
    assert "['7']" in capsys.readouterr().err


def test_skip_bad_in_training(tiny_data, tmp_path, capsys):
    """A NaN case stops a run with an error naming the file; --skip-bad trains on the rest
    and prints the warning list."""
    import shutil

    import nibabel as nib

    root = tmp_path / "kid"
    shutil.copytree(tiny_data["transfer"], root)
    bad = sorted((root / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(str(bad))
    x = np.asarray(img.dataobj).astype(np.float32)
    x[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(x, img.affine), str(bad))
    args = ["transfer", *tiny_args(root, tmp_path / "r", "--from-scratch", "--epochs", 1,
                                   "--cache", tmp_path / "c")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and bad.name in err and "NaN" in err
    assert main([*args, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "skipped 1 bad case" in err and bad.name in err
    split = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["split"]
    (cases,) = split.values()
    assert bad.name.split(".")[0] not in cases["train"] + cases["val"]


def test_run_without_validation(tiny_data, tmp_path, capsys):
    """--val-fraction 0: no best.pt, summary.json stays strict JSON (it held -Infinity), the
    message says where the weights are, and evaluate uses last.pt."""
    run = tmp_path / "nv"
    assert main(["transfer", *tiny_args(tiny_data["transfer"], run, "--from-scratch",
                                        "--epochs", 1, "--val-fraction", 0, "--cache",
                                        tiny_data["cache"])]) == 0
    assert "no validation cases" in capsys.readouterr().out
    assert not (run / "best.pt").exists() and (run / "last.pt").is_file()

    def strict(c):
        raise ValueError(f"non-JSON constant {c}")
    summary = json.loads((run / "summary.json").read_text(), parse_constant=strict)
    assert summary["best_score"] is None and summary["best_step"] == -1
    assert main(["evaluate", "--run", run, "--data", tiny_data["transfer"], "--out",
                 tmp_path / "p", "--device", "cpu", "--cache", tiny_data["cache"]]) == 0


def test_patch_far_larger_than_every_case_warns(tiny_data, tmp_path):
    """A mistyped --patch (512 for 48) costs tens of GB of padding; on a CPU the kernel then
    kills the run without a message. The run warns first, with a patch that fits."""
    import warnings

    from med3d_ext.train.tasks import _check_patch, open_preprocessed

    pre = open_preprocessed(tiny_data["transfer"], {"cache": str(tmp_path / "c"),
                                                     "progress": False})
    with pytest.warns(UserWarning, match=r"--patch \[256, 256, 256\] is over 8x.*covers every"):
        _check_patch([pre], (256, 256, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_patch([pre], (16, 16, 16))


def test_pretrain_says_where_the_exported_encoder_is(tiny_data, tmp_path, capsys):
    one = sorted(tiny_data["pretrain"].iterdir())[0]
    assert main(["pretrain", *tiny_args(one, tmp_path / "pre", "--cache", tiny_data["cache"],
                                        "--epochs", 1, "--steps", 1)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "pre" / "encoder_medicalnet.pth") in out
    assert str(tmp_path / "pre" / "encoder.safetensors") in out
    assert f"--pretrained {tmp_path / 'pre' / 'best.pt'}" in out
    # without validation cases there is no best.pt: the hint names last.pt
    assert main(["pretrain", *tiny_args(one, tmp_path / "nv", "--cache", tiny_data["cache"],
                                        "--epochs", 1, "--steps", 1, "--val-fraction", 0)]) == 0
    assert f"--pretrained {tmp_path / 'nv' / 'last.pt'}" in capsys.readouterr().out


def test_from_scratch_with_pretrained_says_no_weights_are_loaded(tiny_data, tmp_path, capsys):
    from med3d_ext.models import resnet3d, save_encoder_medicalnet

    w = save_encoder_medicalnet(resnet3d(10), tmp_path / "r10.pth")
    assert main(["transfer", *tiny_args(tiny_data["transfer"], tmp_path / "run", "--cache",
                                        tiny_data["cache"], "--epochs", 1, "--steps", 1,
                                        "--pretrained", w, "--from-scratch")]) == 0
    out = capsys.readouterr().out  # was silent: the run looked like a transfer run
    assert "from scratch" in out and "none of its weights are loaded" in out
    assert "Loaded" not in out


def test_cpu_bf16_autocast_warns(tiny_data, tmp_path, capsys):
    """--amp bf16 on the CPU trains, but says that torch's CPU bf16 conv3d weight gradient has
    given wrong values (see cli.CPU_BF16_WARNING); the default (fp32 on the CPU) says nothing."""
    one = tiny_data["pretrain"] / sorted(p.name for p in tiny_data["pretrain"].iterdir())[0]
    base = ["--cache", tiny_data["cache"], "--epochs", 1, "--steps", 1, "--val-fraction", 0]
    assert main(["pretrain", *tiny_args(one, tmp_path / "bf", *base, "--set", "amp=bf16")]) == 0
    assert "--amp bf16 on the CPU" in capsys.readouterr().out
    assert main(["pretrain", *tiny_args(one, tmp_path / "fp", *base)]) == 0
    assert "--amp bf16 on the CPU" not in capsys.readouterr().out


def test_memory_saving_option(tiny_data, tmp_path, capsys, recipe_builds):
    """--memory-saving turns the fused model's recompute mode on for the run's model (recipes
    are rebuilt in backward) without touching the process-wide flag, and is refused with the
    plain model and with --compile (where it would do nothing)."""
    import med3d_ext.nn.fused as fz

    built = recipe_builds
    one = tiny_data["pretrain"] / sorted(p.name for p in tiny_data["pretrain"].iterdir())[0]
    base = ["--cache", tiny_data["cache"], "--epochs", 1, "--steps", 1, "--val-fraction", 0]
    assert fz.RECOMPUTE_BLOCK_INPUTS is False
    assert main(["pretrain", *tiny_args(one, tmp_path / "ms", *base, "--fused",
                                        "--memory-saving")]) == 0
    assert built and fz.RECOMPUTE_BLOCK_INPUTS is False
    n = len(built)
    assert main(["pretrain", *tiny_args(one, tmp_path / "plain", *base, "--fused")]) == 0
    assert len(built) == n  # off by default
    capsys.readouterr()
    assert main(["pretrain", *tiny_args(one, tmp_path / "nf", *base, "--no-fused",
                                        "--memory-saving")]) != 0
    err = capsys.readouterr().err
    assert "--memory-saving" in err and "--fused" in err
    assert main(["pretrain", *tiny_args(one, tmp_path / "co", *base, "--fused", "--compile",
                                        "--memory-saving")]) != 0
    err = capsys.readouterr().err
    assert "--memory-saving" in err and "--compile" in err
    assert fz.RECOMPUTE_BLOCK_INPUTS is False  # the run's model only, never the global flag
    assert not (tmp_path / "nf").exists() and not (tmp_path / "co").exists()


def test_memory_saving_refusals():
    """The cases where --memory-saving would do nothing, refused up front (the DDP + SyncBatchNorm
    case only arises on several GPUs, so it is checked here directly)."""
    from med3d_ext.train import config as C
    from med3d_ext.train.cli import _check_memory_saving

    _check_memory_saving({"memory_saving": True}, True, 1)
    _check_memory_saving({"memory_saving": True, "sync_bn": True}, True, 1)  # no DDP: no SyncBN
    _check_memory_saving({"memory_saving": False, "compile": True}, False, 4)
    for cfg, fused, world, word in [({}, False, 1, "--fused"), ({"compile": True}, True, 1,
                                     "--compile"), ({"sync_bn": True}, True, 2, "--sync-bn")]:
        with pytest.raises(C.ConfigError, match=word):
            _check_memory_saving(dict(cfg, memory_saving=True), fused, world)


def test_multichannel_dataset_without_channel_says_which_it_uses():
    """A single-channel model on a multi-channel dataset read its first channel silently."""
    import warnings

    from med3d_ext.train.tasks import input_channel

    class Pre:  # the two members input_channel uses
        name, channels = "Task01_BrainTumour", ["FLAIR", "T1w", "t1gd", "T2w"]

        def channel_index(self, channel):
            return 0 if channel is None else [c.lower() for c in self.channels].index(channel.lower())

    with pytest.warns(UserWarning, match=r"4 channels \['FLAIR', 'T1w', 't1gd', 'T2w'\]; "
                                         r"using the first \('FLAIR'\)\. --channel"):
        assert input_channel(Pre(), None) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice, or one channel: nothing to say
        assert input_channel(Pre(), "t2w") == 3
        single = Pre()
        single.channels = ["CT"]
        assert input_channel(single, None) == 0
        assert input_channel(Pre(), None, lenient=True) == 0  # pretraining: domain by domain
