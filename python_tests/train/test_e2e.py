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

    for f in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "summary.json",
              "encoder_medicalnet.pth", "encoder.safetensors"):
        assert (pre_run / f).is_file(), f
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
        for c in (1, 2):  # Dice recomputed independently from the written files
            p, t = pred == c, lab == c
            den = p.sum() + t.sum()
            want = None if den == 0 else 2 * (p & t).sum() / den
            assert (r[f"dice_{c}"] is None) if want is None else \
                r[f"dice_{c}"] == pytest.approx(want)
    assert "hd95" in summary and (pred_dir / "metrics.csv").is_file()


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


def test_transfer_from_medicalnet_layout_file(tiny_data, tmp_path):
    enc = _medicalnet_file(tmp_path / "resnet_10.pth")
    run = tmp_path / "mn"
    # the encoder stays frozen for the whole run, so it must end as the file's weights
    rc = main(["transfer", *tiny_args(tiny_data["transfer"], run, "--cache", tiny_data["cache"],
                                      "--pretrained", tmp_path / "resnet_10.pth",
                                      "--freeze-epochs", 2)])
    assert rc == 0
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
    pred = tmp_path / "pcls"
    assert main(["evaluate", "--run", run, "--data", tiny_data["cls"], "--out", pred,
                 "--device", "cpu", "--split", "val"]) == 0
    rows = (pred / "predictions.csv").read_text().splitlines()
    assert rows[0] == "case,label,prediction,probability"
    assert len(rows) - 1 == len(ck["split"]["cls"]["val"])


def test_helpful_errors(pre_run, tiny_data, tmp_path):
    # missing data folder (through the real CLI: message, no traceback)
    r = subprocess.run(cli("pretrain", "--data", tmp_path / "nope", "--out", tmp_path / "r"),
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 1 and "nope" in r.stderr and "no such folder" in r.stderr
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
