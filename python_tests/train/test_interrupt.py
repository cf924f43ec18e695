"""Ctrl-C never loses work: the first one (or a SIGTERM, which a cluster scheduler sends
before it kills a job) stops after the step in progress and saves it (a resume is then
bitwise the uninterrupted run), a second one stops at once with the last checkpoint named;
neither prints a traceback. Under torchrun: python_tests/train/test_ddp.py."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch

from med3d_ext.train import config as C
from med3d_ext.train.loops import Job, TrainingInterrupted, run_training
from med3d_ext.train.runlog import read_metrics

from .conftest import ToyLoader, cli, cli_env, default_sigint, tiny_args, wait_for_train_step

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


def _job(model, step_fn, n):
    return Job("pretrain", model, {"task": "toy"}, ToyLoader(n), lambda b, d: b, step_fn,
               lambda m: {"score": 0.0}, [("all", list(model.parameters()), 0.1)], 4, 3)


def _ctrl_c_at(calls: dict, at: set):
    def step_fn(net, inp):
        calls["n"] += 1
        if calls["n"] in at:  # as the terminal would deliver it, in the middle of a step
            signal.raise_signal(signal.SIGINT)
        return net(inp["x"]).pow(2).mean(), {}, None
    return step_fn


def test_first_ctrl_c_finishes_the_step_and_saves_it(tmp_path):
    model = torch.nn.Linear(3, 1)
    calls = {"n": 0}
    cfg = C.resolve("pretrain", {"epochs": 2, "steps": 5, "progress": False, "log_every": 1})
    with pytest.raises(TrainingInterrupted) as e:
        run_training(cfg, _job(model, _ctrl_c_at(calls, {3}), 10), tmp_path)
    msg = str(e.value)
    assert "step 3 of 10" in msg and "last.pt" in msg and f"--resume {tmp_path}" in msg
    assert calls["n"] == 3  # the step in progress was finished, no further one started
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["step"] == 3 and ck["sampler"] == {"position": 3}
    for k, v in model.state_dict().items():  # the saved weights are the ones after step 3
        assert torch.equal(ck["state_dict"][k], v)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    # the handler was only borrowed for the run
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _twice_at(calls: dict, k: int):
    def step_fn(net, inp):
        calls["n"] += 1
        if calls["n"] == k:  # Ctrl-C, Ctrl-C
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return net(inp["x"]).pow(2).mean(), {}, None
    return step_fn


def test_second_ctrl_c_stops_at_once_and_names_the_last_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1)
    cfg = C.resolve("pretrain", {"epochs": 2, "steps": 3, "progress": False})
    # both in the fifth step (epoch 2): the epoch-1 checkpoint (step 3) is what is kept
    with pytest.raises(TrainingInterrupted) as e:
        run_training(cfg, _job(model, _twice_at({"n": 0}, 5), 6), tmp_path)
    assert "step 4 of 6" in str(e.value) and "(step 3)" in str(e.value)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # before any checkpoint: nothing to resume, and the message says so
    cfg1 = dict(cfg, log_every=1)
    (tmp_path / "fresh").mkdir()  # as the CLI makes it
    with pytest.raises(TrainingInterrupted, match="no checkpoint was written yet"):
        run_training(cfg1, _job(torch.nn.Linear(3, 1), _twice_at({"n": 0}, 3), 6),
                     tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "last.pt").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "fresh" / "metrics.jsonl")] == [1, 2]
    # ... and doing what it says (the same run again) starts over: each step logged once;
    # a tb/ folder's other contents (a user's own event folders) are left alone
    (tmp_path / "fresh" / "tb" / "older").mkdir(parents=True)
    (tmp_path / "fresh" / "tb" / "older" / "events.out.tfevents.1").write_text("x")
    (tmp_path / "fresh" / "tb" / "events.out.tfevents.2").write_text("x")
    run_training(cfg1, _job(torch.nn.Linear(3, 1), _twice_at({"n": 0}, 99), 6),
                 tmp_path / "fresh")
    assert (tmp_path / "fresh" / "tb" / "older" / "events.out.tfevents.1").is_file()
    assert not (tmp_path / "fresh" / "tb" / "events.out.tfevents.2").exists()
    rows = read_metrics(tmp_path / "fresh" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_on_the_cli_saves_mid_epoch_and_resumes_bitwise(tiny_data, tmp_path):
    args = ["--from-scratch", "--epochs", 1, "--steps", 8, "--num-workers", 0,
            "--cache", tiny_data["cache"]]
    full = tmp_path / "full"
    r = subprocess.run(cli("transfer", *tiny_args(tiny_data["transfer"], full, *args)),
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    cut = tmp_path / "cut"
    p = subprocess.Popen(cli("transfer", *tiny_args(tiny_data["transfer"], cut, *args,
                                                    "--step-sleep", 0.5)),
                         env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=default_sigint)
    try:
        wait_for_train_step(p, cut / "metrics.jsonl", 2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted after step" in err and "--resume" in err
    stopped = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 2 <= stopped < 8  # mid-epoch: without the fix, nothing was saved before step 8

    r = subprocess.run(cli("transfer", "--resume", cut, "--step-sleep", 0, "--no-progress"),
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs after resume"
    la = [(r["step"], r["loss"]) for r in read_metrics(full / "metrics.jsonl")
          if r["kind"] == "train"]
    lb = [(r["step"], r["loss"]) for r in read_metrics(cut / "metrics.jsonl")
          if r["kind"] == "train"]
    assert la == lb


def test_ctrl_c_to_the_process_group_with_dataloader_workers(tiny_data, tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader workers too: they inherit the handler and
    must neither stop the run early nor print the message again."""
    import os

    run = tmp_path / "run"
    p = subprocess.Popen(cli("transfer", *tiny_args(tiny_data["transfer"], run, "--from-scratch",
                                                    "--epochs", 1, "--steps", 8,
                                                    "--num-workers", 2, "--step-sleep", 0.5,
                                                    "--cache", tiny_data["cache"])),
                         env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         preexec_fn=default_sigint)
    try:
        wait_for_train_step(p, run / "metrics.jsonl", 2)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.count("Ctrl-C: stopping") == 1, err[-3000:]
    assert 2 <= torch.load(run / "last.pt", weights_only=True)["step"] < 8



def _recording(losses: list, signals: dict):
    """step_fn that records each step's loss and raises the signals given for a step number."""
    def step_fn(net, inp):
        loss = net(inp["x"]).pow(2).mean()
        losses.append(loss.item())
        for sig in signals.get(len(losses), ()):
            signal.raise_signal(sig)
        return loss, {"loss/toy": loss.detach()}, None
    return step_fn


def _train_rows(path):
    return [r for r in read_metrics(path) if r["kind"] == "train"]


def test_ctrl_c_logs_the_steps_since_the_last_row_and_resume_continues_the_log(tmp_path):
    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 10, "progress": False, "log_every": 4})
    torch.manual_seed(0)
    losses = []
    with pytest.raises(TrainingInterrupted, match="step 6 of 10"):
        run_training(cfg, _job(torch.nn.Linear(3, 1), _recording(losses, {6: [signal.SIGINT]}),
                               10), tmp_path)
    rows = _train_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 6]  # the partial row of steps 5-6
    assert set(rows[1]) == set(rows[0])  # the same fields as a normal row
    assert rows[1]["loss"] == pytest.approx(sum(losses[4:6]) / 2, rel=1e-6)
    assert rows[1]["loss/toy"] == pytest.approx(sum(losses[4:6]) / 2, rel=1e-6)
    assert rows[1]["epoch"] == 1 and rows[1]["samples_s"] > 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6

    # the resumed run neither repeats steps 5-6 nor leaves out any later step
    more = []
    run_training(cfg, _job(torch.nn.Linear(3, 1), _recording(more, {}), 10), tmp_path,
                 resume_from=tmp_path)
    rows = _train_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 6, 8, 10]
    assert rows[2]["loss"] == pytest.approx(sum(more[0:2]) / 2, rel=1e-6)
    assert rows[3]["loss"] == pytest.approx(sum(more[2:4]) / 2, rel=1e-6)


def test_ctrl_c_just_after_a_checkpoint_still_logs_its_steps_once(tmp_path):
    # --ckpt-every 3 saved step 3 with steps 1-3 not yet logged (--log-every 4); the stop at
    # step 3 logs them and re-saves, so the resumed run does not log them again
    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 8, "progress": False, "log_every": 4,
                                 "ckpt_every": 3})
    losses = []
    with pytest.raises(TrainingInterrupted, match="step 3 of 8"):
        run_training(cfg, _job(torch.nn.Linear(3, 1), _recording(losses, {3: [signal.SIGINT]}),
                               8), tmp_path)
    assert [r["step"] for r in _train_rows(tmp_path / "metrics.jsonl")] == [3]
    more = []
    run_training(cfg, _job(torch.nn.Linear(3, 1), _recording(more, {}), 8), tmp_path,
                 resume_from=tmp_path)
    rows = _train_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4, 8]
    assert rows[1]["loss"] == pytest.approx(more[0], rel=1e-6)


def test_resume_after_a_crash_logs_the_row_the_uninterrupted_run_logged(tmp_path):
    # a crash (here an error at step 6; a kill -9 alike) after the step-3 checkpoint: the
    # checkpoint keeps the sums of steps 1-3, so the row at step 4 still covers steps 1-4
    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 8, "progress": False, "log_every": 4,
                                 "ckpt_every": 3})
    torch.manual_seed(0)
    full = []
    run_training(cfg, _job(torch.nn.Linear(3, 1), _recording(full, {}), 8), tmp_path / "full")

    def crash_at_6(net, inp):
        if len(cut) == 5:
            raise RuntimeError("crash")
        return _recording(cut, {})(net, inp)

    torch.manual_seed(0)
    cut = []
    with pytest.raises(RuntimeError, match="crash"):
        run_training(cfg, _job(torch.nn.Linear(3, 1), crash_at_6, 8), tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 3
    run_training(cfg, _job(torch.nn.Linear(3, 1), _recording([], {}), 8), tmp_path / "cut",
                 resume_from=tmp_path / "cut")
    a = _train_rows(tmp_path / "full" / "metrics.jsonl")
    b = _train_rows(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8]
    assert a[0]["loss"] == pytest.approx(sum(full[:4]) / 4, rel=1e-6)
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)


def test_sigterm_stops_after_the_step_and_saves_even_when_repeated(tmp_path):
    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 10, "progress": False, "log_every": 4})
    losses = []
    # a scheduler may send SIGTERM to every process and torchrun forwards it again: a repeated
    # SIGTERM must not turn into the immediate stop of a second Ctrl-C
    with pytest.raises(TrainingInterrupted, match="step 5 of 10") as e:
        run_training(cfg, _job(torch.nn.Linear(3, 1),
                               _recording(losses, {5: [signal.SIGTERM, signal.SIGTERM]}), 10),
                     tmp_path)
    assert e.value.signum == signal.SIGTERM and len(losses) == 5
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 5
    assert [r["step"] for r in _train_rows(tmp_path / "metrics.jsonl")] == [4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # a Ctrl-C after a SIGTERM is a first Ctrl-C; the next one stops at once
    with pytest.raises(TrainingInterrupted, match="no checkpoint was written yet"):
        run_training(cfg, _job(torch.nn.Linear(3, 1), _recording(
            [], {2: [signal.SIGTERM, signal.SIGINT, signal.SIGINT]}), 10), tmp_path / "b")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_on_the_cli_saves_logs_and_resumes(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["--from-scratch", "--epochs", 1, "--steps", 12, "--num-workers", 0,
            "--cache", tiny_data["cache"]]
    p = subprocess.Popen(cli("transfer", *tiny_args(tiny_data["transfer"], run, *args,
                                                    "--step-sleep", 0.4, "--log-every", 3)),
                         env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        wait_for_train_step(p, run / "metrics.jsonl", 3)
        time.sleep(0.5)  # into the next window of rows
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: stopping" in err and "--resume" in err
    stopped = torch.load(run / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped < 12
    steps = [r["step"] for r in _train_rows(run / "metrics.jsonl")]
    assert steps[-1] == stopped  # the steps since the last row were logged (partial row)

    r = subprocess.run(cli("transfer", "--resume", run, "--step-sleep", 0, "--no-progress"),
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [r["step"] for r in _train_rows(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 12, steps
    # rows at every third step, plus the stop's row: no step logged twice or left out
    assert set(steps) == {3, 6, 9, 12} | {stopped}


def test_a_second_ctrl_c_while_run_files_are_rewritten_leaves_no_temporary(tmp_path,
                                                                           monkeypatch):
    """metrics.jsonl (cut back on resume), config.yaml and curves.png are replaced through a
    temporary: stopped mid-write, the old file stays and the temporary goes."""
    import os

    from med3d_ext.train import runlog

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
    C.save_config({"lr": 0.1}, tmp_path / "config.yaml")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        runlog.truncate_metrics(log, 1)
    with pytest.raises(KeyboardInterrupt):
        C.save_config({"lr": 0.2}, tmp_path / "config.yaml")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        with pytest.raises(KeyboardInterrupt):
            runlog.plot_curves(log, tmp_path / "curves.png")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_ctrl_c_while_the_cli_imports_torch_is_a_word_not_a_traceback():
    """Ctrl-C in the seconds torch takes to load printed an import traceback (CLI audit). The
    interrupt is raised deterministically at the import of the CLI module."""
    import sys

    code = (
        "import importlib.abc, runpy, sys\n"
        "class Stop(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'med3d_ext.train.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "runpy.run_module('med3d_ext.train', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stderr.strip() == "interrupted"
