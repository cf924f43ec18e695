"""evaluate and predict on what a user audit found: a diverged model (non-finite weights, or an
output that overflows) scored as "predicts background"; results overwritten without a word and
not saying which checkpoint made them; the run's window overlap ignored; an empty folder left
by a refused evaluation; a classification evaluation of zero cases."""

from __future__ import annotations

import json

import pytest
import torch

from med3d_ext.train.cli import main

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


def _eval(data, cache, *extra):
    args = ["evaluate", "--data", data, "--device", "cpu", "--no-progress", *extra]
    return main(args + (["--cache", cache] if cache else []))


def _edited(src, dst, edit):
    """A copy of checkpoint src at dst, changed by edit(checkpoint dict)."""
    ck = torch.load(src, map_location="cpu", weights_only=False)
    edit(ck)
    torch.save(ck, dst)
    return dst


def test_evaluate_records_the_checkpoint_and_warns_over_earlier_results(kidney_run, tiny_data,
                                                                        tmp_path, capsys):
    out = tmp_path / "p"
    assert _eval(tiny_data["transfer"], tiny_data["cache"], "--run", kidney_run,
                 "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"] == str((kidney_run / "best.pt").resolve())
    assert "already holds" not in capsys.readouterr().err
    (out / "zz_other.nii.gz").write_bytes(b"not ours")
    assert _eval(tiny_data["transfer"], tiny_data["cache"], "--run", kidney_run,
                 "--checkpoint", "last", "--out", out) == 0
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} already holds an earlier evaluation's metrics.json" in err
    assert "1 prediction(s) of cases this evaluation does not write (zz_other.nii.gz)" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"] == str((kidney_run / "last.pt").resolve())
    assert (out / "zz_other.nii.gz").read_bytes() == b"not ours"


def test_evaluate_and_predict_use_the_runs_overlap(kidney_run, tiny_data, tmp_path):
    """Validation chose best.pt with the run's --overlap; evaluate used the default 0.5."""
    ck = _edited(kidney_run / "best.pt", tmp_path / "ov.pt",
                 lambda c: c["config"].update(overlap=0.25))
    assert _eval(tiny_data["transfer"], tiny_data["cache"], "--checkpoint", ck,
                 "--out", tmp_path / "a") == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["overlap"] == 0.25
    assert _eval(tiny_data["transfer"], tiny_data["cache"], "--checkpoint", ck, "--overlap",
                 "0.75", "--out", tmp_path / "b") == 0  # given: it wins
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["overlap"] == 0.75

    from med3d_ext.train import evaluate as E  # predict imports predict_case from it per call

    seen = []
    real = E.predict_case

    def spy(pre, i, ch, predictor, window, cfg, *a):
        seen.append(cfg["overlap"])
        return real(pre, i, ch, predictor, window, cfg, *a)

    image = next((tiny_data["transfer"] / "imagesTr").glob("*.nii.gz"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "predict_case", spy)
        assert main(["predict", "--checkpoint", str(ck), "--images", str(image), "--out",
                     str(tmp_path / "c"), "--device", "cpu", "--no-progress"]) == 0
    assert seen == [0.25]


def test_non_finite_weights_are_refused(kidney_run, tiny_data, tmp_path, capsys):
    def poison(c):
        key = next(k for k, v in c["state_dict"].items() if v.is_floating_point())
        c["state_dict"][key] = c["state_dict"][key].clone().fill_(float("nan"))

    ck = _edited(kidney_run / "best.pt", tmp_path / "nan.pt", poison)
    assert _eval(tiny_data["transfer"], tiny_data["cache"], "--checkpoint", ck,
                 "--out", tmp_path / "e") == 1
    err = capsys.readouterr().err
    assert f"checkpoint {str(ck)!r} has non-finite (NaN/Inf) weights in 1 tensor(s)" in err
    assert not (tmp_path / "e").exists()
    image = next((tiny_data["transfer"] / "imagesTr").glob("*.nii.gz"))
    assert main(["predict", "--checkpoint", str(ck), "--images", str(image), "--out",
                 str(tmp_path / "f"), "--device", "cpu", "--no-progress"]) == 1
    assert "non-finite (NaN/Inf) weights" in capsys.readouterr().err


def test_an_output_that_overflows_is_refused(kidney_run, tiny_data, tmp_path, capsys):
    """Finite weights whose logits overflow float32 (inf - inf = NaN in the softmax): the
    argmax of NaN is class 0, which gave a file of background and Dice 0 without a word."""
    def blow_up(c):  # the head's BatchNorm and last conv each scaled by 1e30: logits ~1e60
        sd = c["state_dict"]
        for key in ("conv_seg.4.weight", "conv_seg.6.weight"):
            sd[key] = sd[key] * 1e30
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())

    ck = _edited(kidney_run / "best.pt", tmp_path / "big.pt", blow_up)
    assert _eval(tiny_data["transfer"], tiny_data["cache"], "--checkpoint", ck,
                 "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "output values of the model are not finite (NaN/Inf)" in err and "case '" in err


def test_a_refused_evaluation_leaves_no_folder(cls_run, tiny_data, tmp_path, capsys):
    # a segmentation run on a classification folder: refused after the run is loaded
    out = tmp_path / "e1"
    assert _eval(tiny_data["cls"], None, "--run", cls_run.parent.parent / "none",
                 "--checkpoint", cls_run / "best.pt", "--out", out, "--split", "test") == 2
    assert not out.exists()
    capsys.readouterr()


def test_classification_evaluation_of_zero_cases_is_an_error(cls_run, tiny_data, tmp_path,
                                                             capsys):
    ck = _edited(cls_run / "best.pt", tmp_path / "noval.pt",
                 lambda c: c["split"]["cls"].update(val=[]))
    out = tmp_path / "z"
    assert _eval(tiny_data["cls"], None, "--checkpoint", ck, "--split", "val",
                 "--out", out) == 2
    assert f"--split val: no case of {str(tiny_data['cls'])!r} to evaluate" in \
        capsys.readouterr().err
    assert not out.exists()
    # and one that has cases says its split and checkpoint
    assert _eval(tiny_data["cls"], None, "--run", cls_run, "--out", tmp_path / "y") == 0
    m = json.loads((tmp_path / "y" / "metrics.json").read_text())
    assert m["split"] == "all" and m["checkpoint"] == str((cls_run / "best.pt").resolve())


def test_validation_of_a_non_finite_output_stops_the_run_unsaved(tiny_data, tmp_path, capsys,
                                                                  monkeypatch):
    """A model whose weights are finite but whose output overflows was validated as Dice 0
    ("predicts background") and saved as best.pt; the run now stops there, saving nothing."""
    from med3d_ext.train import tasks

    from .conftest import tiny_args

    real = tasks.sliding_window_probs
    monkeypatch.setattr(tasks, "sliding_window_probs",
                        lambda *a, **k: real(*a, **k) * float("nan"))
    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(tiny_data["transfer"], run, "--from-scratch", "--epochs",
                                        1, "--steps", 1, "--cache", tiny_data["cache"])]) == 1
    err = capsys.readouterr().err
    assert "validation of 'Task11_Kidney' case 'kidney_" in err and "the model's output is not finite" in err
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()


def test_classification_validation_of_a_non_finite_output_stops_the_run(tiny_data, tmp_path,
                                                                       capsys, monkeypatch):
    """The classification run's validation took the argmax of NaN logits (class 0) as a
    prediction and saved the model; it stops there now, saving nothing."""
    from med3d_ext.models import heads

    from .conftest import tiny_args

    real = heads.ClassificationNet.forward
    monkeypatch.setattr(heads.ClassificationNet, "forward",
                        lambda self, x: real(self, x) * (1.0 if self.training else float("nan")))
    run = tmp_path / "cls"
    assert main(["transfer", *tiny_args(tiny_data["cls"], run, "--task", "cls", "--from-scratch",
                                        "--epochs", 1, "--steps", 1)]) == 1
    assert "validation: the model's output is not finite" in capsys.readouterr().err
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()
