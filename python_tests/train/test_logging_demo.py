"""Run-folder logging (optional TensorBoard / matplotlib) and the embedded demo (slow)."""

from __future__ import annotations

import json

import pytest

from med3d_ext.train.runlog import RunLogger, plot_curves, read_metrics, truncate_metrics


def test_metrics_jsonl_roundtrip_and_truncate(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log({"kind": "train", "step": s, "loss": 1.0 / s, "dice": float("nan")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line torn by a kill
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["dice"] is None
    truncate_metrics(tmp_path / "metrics.jsonl", 3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLogger(tmp_path)
    log.log({"kind": "train", "step": 1, "loss": 0.5})
    log.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_png_curves(tmp_path):
    pytest.importorskip("matplotlib")
    log = RunLogger(tmp_path, tensorboard=False)
    log.log({"kind": "train", "step": 1, "loss": 0.5})
    log.log({"kind": "val", "step": 1, "score": 0.2})
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_default_demo_quick(tmp_path, monkeypatch, capsys, device):
    """The embedded demo end to end, at reduced size (python -m med3d_ext.train demo --quick);
    on a GPU with the GPU defaults (fused ops, bf16 autocast, channels_last_3d, augmentation on
    the device, cuDNN tuning of the heads' batch sizes, fused AdamW): the CLI's whole GPU path,
    pretrain, transfer twice and evaluate, in one test."""
    pytest.importorskip("med3d_ext.models")
    pytest.importorskip("med3d_ext.data")
    from med3d_ext.train.cli import main

    monkeypatch.setenv("MED3D_EXT_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--device", device, "--out", tmp_path / "demo"]) == 0
    text = capsys.readouterr().out
    assert "| pretrained (Med3D) |" in text and "| from scratch |" in text
    assert f"run folder: {(tmp_path / 'demo').resolve()}" in text
    res = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["pretrained (Med3D)", "from scratch"]
    for r in res["rows"]:
        assert r["steps"] > 0 and r["time_s"] > 0
        # the curve the steps-to-target columns are read from: one validation per epoch
        assert r["val_curve"]["steps"] == [4, 8, 12] and len(r["val_curve"]["dice"]) == 3
        assert r["val_curve"]["epochs"] == [1, 2, 3]  # metrics.jsonl's 1-based epochs
    scratch_final = res["rows"][1]["val_curve"]["dice"][-1]
    assert res["rows"][1]["steps_to_scratch_final"] is not None  # the baseline reaches itself
    assert f"steps to scratch's final val Dice ({scratch_final:.3f})" in text
    for sub in ("pretrain", "transfer-pretrained", "transfer-scratch"):
        assert (tmp_path / "demo" / sub / "best.pt").is_file()
    preds = list((tmp_path / "demo" / "predictions-pretrained").glob("*.nii.gz"))
    assert preds


def test_options_without_command_configure_the_demo(monkeypatch, tmp_path):
    """`python -m med3d_ext.train --out DIR --device cpu` runs the default demo with those
    options (the demo is what no command means); --help still prints the help."""
    import med3d_ext.train.demo as demo
    from med3d_ext.train.cli import main

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert main(["--out", tmp_path / "d", "--device", "cpu"]) == 0
    assert seen["out"] == str(tmp_path / "d") and seen["device"] == "cpu"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0



def test_the_demo_takes_threads_and_names_its_options(monkeypatch, tmp_path, capsys):
    """Troubleshooting's `--threads 1` was refused by the demo with the top-level usage, which
    named none of the options the demo takes (README audit)."""
    import torch

    import med3d_ext.train.demo as demo
    from med3d_ext.train.cli import main

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert main(["--threads", "1", "--quick", "--device", "cpu"]) == 0 and seen["threads"] == 1
    assert main(["demo", "--out", tmp_path / "d"]) == 0 and seen["threads"] is None
    # an unknown option is still an error, not the demo, and the message lists the demo's
    assert main(["--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) --no-such-option" in err and "--threads" in err and "--quick" in err
    with pytest.raises(SystemExit) as e:
        main(["demo", "--threads", "0"])
    assert e.value.code == 2 and "expected an integer >= 1, got '0'" in capsys.readouterr().err
    # run_demo sets torch's threads for all of it, and passes them to the runs it makes
    monkeypatch.undo()
    got = {}
    monkeypatch.setattr(demo, "_run_demo", lambda *a: got.update(threads=a[-1],
                                                                  torch=torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        demo.run_demo(threads=1)
    finally:
        torch.set_num_threads(before)
    assert got == {"threads": 1, "torch": 1}


def test_demo_user_errors_are_clean(tmp_path, capsys):
    """The demo's mistakes (bad --device, --out a file or a finished demo) are one error line,
    not a traceback: the demo once ran outside the CLI's error handling."""
    from med3d_ext.train.cli import main

    (tmp_path / "afile").write_text("")
    (tmp_path / "old" / "pretrain").mkdir(parents=True)
    (tmp_path / "old" / "pretrain" / "last.pt").write_bytes(b"")
    for argv, rc, want in [(["--device", "tpu", "--quick"], 2, "--device 'tpu'"),
                           (["--out", tmp_path / "afile", "--device", "cpu"], 2, "is a file"),
                           (["demo", "--out", tmp_path / "old", "--device", "cpu"], 2,
                            "already holds a demo run"),
                           # was "error: <path>: Not a directory", without the option's name
                           (["demo", "--out", tmp_path / "afile" / "d", "--device", "cpu"], 2,
                            "--out")]:
        assert main(argv) == rc, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and len(err.splitlines()) == 1, err


def test_demo_ctrl_c_says_how_to_start_again(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the demo exits 130 with one line; the runs' "--resume RUN" hint would be wrong
    there (the demo refuses a folder that holds a run), so it says to start again."""
    import med3d_ext.train.cli as cli
    import med3d_ext.train.demo as demo
    from med3d_ext.train.loops import TrainingInterrupted

    def stopped(cfg, log=print):
        raise TrainingInterrupted(f"interrupted at step 3 of 16; saved {cfg['out']}/last.pt; "
                                  f"continue with --resume {cfg['out']}")
    monkeypatch.setattr(demo, "demo_data", lambda *a, **k: {
        "pretrain": tmp_path, "transfer": tmp_path, "root": tmp_path})
    monkeypatch.setattr(cli, "run_pretrain", stopped)
    assert cli.main(["demo", "--out", tmp_path / "d", "--device", "cpu", "--quick"]) == 130
    err = capsys.readouterr().err.strip()
    assert "demo interrupted" in err and "--resume" not in err and len(err.splitlines()) == 1


def _toy_training(tmp_path, capsys):
    """A two-step toy run with progress on; returns what stderr held at validation and after."""
    import torch

    from med3d_ext.train import config as C
    from med3d_ext.train.loops import Job, run_training

    class _Loader:
        position = 0

        def state_dict(self):
            return {"position": self.position}

        def __iter__(self):
            while True:
                self.position += 1
                yield {"x": torch.randn(4, 3)}

    model = torch.nn.Linear(3, 1)
    seen = []

    def validate(m):
        seen.append(capsys.readouterr().err)  # the bar as it stands while validating
        return {"score": 0.0}
    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 2, "progress": True})
    job = Job("pretrain", model, {"task": "toy"}, _Loader(), lambda b, d: b,
              lambda n, i: (n(i["x"]).pow(2).mean(), {}, None), validate,
              [("all", list(model.parameters()), 0.1)], 4, 3)
    run_training(cfg, job, tmp_path)
    return seen, capsys.readouterr().err


def test_progress_bar_says_when_it_validates(tmp_path, capsys, monkeypatch):
    """The bar sat still, unexplained, during each epoch's whole-volume validation."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar is drawn
    seen, _ = _toy_training(tmp_path, capsys)
    assert len(seen) == 1 and "pretrain (validating)" in seen[0]


def test_progress_bar_stays_out_of_redirected_output(tmp_path, capsys, monkeypatch):
    """Redirected to a file (a SLURM log), the bar wrote a carriage-return line per update;
    where stderr is not a terminal it is hidden, and the log's lines still come."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    seen, rest = _toy_training(tmp_path, capsys)
    assert len(seen) == 1 and "\r" not in seen[0] + rest and "validating" not in seen[0]


def test_missing_required_options_are_usage_errors(capsys, tmp_path, monkeypatch):
    """A missing --data (pretrain, transfer, evaluate) or --run exits 2 with a line naming the
    option, as argparse's usage errors do; a missing --data exited 1 (a missing folder's code),
    and so did a --data folder that is not there (2 now, as a --run that is not there)."""
    from med3d_ext.train.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, needs in ((["pretrain"], "--data"), (["transfer", "--task", "seg"], "--data"),
                        (["transfer", "--task", "cls"], "--data"), (["evaluate"], "--run"),
                        (["predict"], "--run")):
        assert main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and f"needs {needs}" in err, (argv, err)
        assert len(err.splitlines()) == 1, err
    # a --data folder that is not there: the command line's error, as a missing --run
    assert main(["pretrain", "--data", tmp_path / "absent", "--no-progress"]) == 2
    assert "no such folder" in capsys.readouterr().err
    # a --run that is not there is an option error for evaluate and predict alike (evaluate
    # exited 1, predict 2 and only after reading every image), said before any data is read
    for argv in (["evaluate", "--data", tmp_path / "absent"],
                 ["predict", "--images", tmp_path / "absent", "--out", tmp_path / "p"]):
        assert main([*argv, "--run", tmp_path / "norun", "--no-progress"]) == 2, argv
        assert f"--run: run '{tmp_path / 'norun'}' does not exist" in capsys.readouterr().err


def test_empty_paths_are_refused(capsys, tmp_path, monkeypatch):
    """--data '' / --images '' (an unset "$VAR") meant the current folder: it was searched for
    datasets or images."""
    from med3d_ext.train.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--data", "", "--no-progress"]) == 2
    assert "--data '': an empty path" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")  # there (the images are read before it is loaded)
    assert main(["predict", "--run", run, "--out", tmp_path / "p", "--images", "",
                 "--no-progress"]) == 2
    assert "--images '': an empty path" in capsys.readouterr().err


def test_a_console_that_cannot_show_a_name_gets_it_escaped(tmp_path):
    """Class names in any language reach the log: on an ASCII console printing one raised
    UnicodeEncodeError after the work was done."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    code = ("from med3d_ext.train.cli import _printable_streams; _printable_streams(); "
            "print('class 1 (b\\u00e9nin)'); import sys; print('\\u00e9', file=sys.stderr)")
    env = dict(os.environ, PYTHONIOENCODING="ascii", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert r.stdout.decode("ascii").strip() == "class 1 (b\\xe9nin)"


def test_resume_hint_is_a_command_to_paste(tmp_path):
    """The interrupt / divergence messages said "continue with --resume RUN", not a command."""
    from med3d_ext.train.loops import resume_command

    assert resume_command("pretrain", tmp_path / "a b") == (
        f"python -m med3d_ext.train pretrain --resume '{tmp_path / 'a b'}'")
    for kind in ("seg", "cls"):
        assert resume_command(kind, "runs/k") == "python -m med3d_ext.train transfer --resume runs/k"
