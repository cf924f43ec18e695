"""Never lose work: exact resume after a real kill, NaN stop keeping the last good checkpoint."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch

from med3d_ext.train import config as C
from med3d_ext.train.loops import Job, TrainingError, run_training
from med3d_ext.train.runlog import read_metrics

from .conftest import ToyLoader, cli, cli_env, tiny_args

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


def _step_of(path):
    try:
        return torch.load(path, weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def test_resume_after_kill_is_bitwise_identical(tiny_data, tmp_path):
    args = ["--epochs", 2, "--steps", 6, "--ckpt-every", 2, "--num-workers", 0,
            "--cache", tiny_data["cache"], "--no-export"]
    full = tmp_path / "full"
    r = subprocess.run(cli("pretrain", *tiny_args(tiny_data["pretrain"], full, *args)),
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    cut = tmp_path / "cut"
    p = subprocess.Popen(cli("pretrain", *tiny_args(tiny_data["pretrain"], cut, *args,
                                                    "--step-sleep", 0.4)),
                         env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if _step_of(cut / "last.pt") >= 4:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before it could be interrupted"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    stopped = _step_of(cut / "last.pt")
    assert 4 <= stopped < 12
    r = subprocess.run(cli("pretrain", "--resume", cut, "--step-sleep", 0, "--no-progress"),
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = _same_last_checkpoints(full, cut, 12, ("momentum_buffer",))
    assert a["sampler"] == b["sampler"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    # the log of the resumed run has every step once, with the same losses
    la = [(r["step"], r["loss"]) for r in read_metrics(full / "metrics.jsonl")
          if r["kind"] == "train"]
    lb = [(r["step"], r["loss"]) for r in read_metrics(cut / "metrics.jsonl")
          if r["kind"] == "train"]
    assert la == lb


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1)
    calls = {"n": 0}

    def step_fn(net, inp):
        calls["n"] += 1
        loss = net(inp["x"]).pow(2).mean()
        if calls["n"] == 5:  # epoch 2, second step
            loss = loss * float("nan")
        return loss, {}, None

    cfg = C.resolve("pretrain", {"epochs": 3, "steps": 3, "progress": False, "log_every": 1})
    job = Job("pretrain", model, {"task": "toy"}, ToyLoader(9), lambda b, d: b, step_fn,
              lambda m: {"score": 0.0}, [("all", list(model.parameters()), 0.1)], 4, 3)
    with pytest.raises(TrainingError) as e:
        run_training(cfg, job, tmp_path)
    msg = str(e.value)
    # the fifth step, in the second of three epochs (1-based, as metrics.jsonl counts them)
    assert "non-finite loss" in msg and "step 5 (epoch 2 of 3)" in msg and "last.pt" in msg
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["step"] == 3  # the end of the first epoch: the last good state
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_diverged_weights_stop_before_validation_and_saving(tmp_path):
    """A learning rate huge enough to overflow the weights in one step, on a finite loss: the
    loss check cannot see it (the loss came from the weights before the step), so the run
    validated a NaN model as "predicts background" and saved it as best.pt. The weights are
    checked before each validation and checkpoint."""
    model = torch.nn.Linear(3, 1)
    validated = []

    def step_fn(net, inp):
        return net(inp["x"]).mul(1e15).pow(2).mean(), {}, None  # finite, its gradient ~1e30

    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 1, "progress": False, "log_every": 1,
                                 "grad_clip": 0})
    job = Job("pretrain", model, {"task": "toy"}, ToyLoader(1), lambda b, d: b, step_fn,
              lambda m: validated.append(1) or {"score": 0.0},
              [("all", list(model.parameters()), 1e30)], 4, 3)
    with pytest.raises(TrainingError) as e:
        run_training(cfg, job, tmp_path)
    msg = str(e.value)
    assert "non-finite weights (2 tensor(s): weight, bias)" in msg, msg
    assert "step 1 (epoch 1 of 1)" in msg and "No checkpoint was written" in msg
    assert not validated and not (tmp_path / "best.pt").exists()
    assert not (tmp_path / "last.pt").exists()


def test_resume_refuses_other_architecture(tmp_path):
    model = torch.nn.Linear(3, 1)
    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 2, "progress": False})
    mk = lambda arch: Job("pretrain", model, arch, ToyLoader(2), lambda b, d: b,  # noqa: E731
                          lambda n, i: (n(i["x"]).mean(), {}, None), lambda m: {"score": 0.0},
                          [("all", list(model.parameters()), 0.1)], 4, 3)
    run_training(cfg, mk({"task": "toy", "depth": 10}), tmp_path)
    # the options given with --resume do not fit the run: the command line's error (exit 2)
    with pytest.raises(C.ConfigError, match="differs"):
        run_training(cfg, mk({"task": "toy", "depth": 18}), tmp_path, resume_from=tmp_path)


def test_out_of_memory_suggests_smaller_patch_or_batch(tmp_path):
    model = torch.nn.Linear(3, 1)

    def step_fn(net, inp):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 2, "progress": False, "patch": [64, 64, 32],
                                 "batch_size": 8})
    job = Job("pretrain", model, {"task": "toy"}, ToyLoader(2), lambda b, d: b, step_fn,
              lambda m: {"score": 0.0}, [("all", list(model.parameters()), 0.1)], 8, 3)
    with pytest.raises(TrainingError) as e:
        run_training(cfg, job, tmp_path)
    msg = str(e.value)
    assert "out of GPU memory" in msg and "[64, 64, 32]" in msg and "batch size 8" in msg
    assert "[32, 32, 16]" in msg  # a concrete smaller patch to try
    assert "--memory-saving" not in msg  # not a fused model: the option would be refused


def test_out_of_memory_suggests_memory_saving_for_a_fused_model():
    from med3d_ext.models import resnet3d
    from med3d_ext.nn import fuse_modules
    from med3d_ext.train.loops import _oom_message

    fused, plain = fuse_modules(resnet3d(10)), resnet3d(10)
    cfg = C.resolve("pretrain", {"patch": [64, 64, 32], "batch_size": 8})
    assert "--memory-saving" in _oom_message(cfg, "training", fused)
    assert "--memory-saving" not in _oom_message(cfg, "training", plain)
    assert "--memory-saving" not in _oom_message(cfg, "validation", fused)
    for key in ("memory_saving", "compile", "sync_bn"):  # on already, or refused with it
        assert "--memory-saving" not in _oom_message(dict(cfg, **{key: True}), "training", fused)


def test_nan_loss_found_at_the_next_log_names_its_step(tmp_path, monkeypatch):
    # losses are checked in batches at log / checkpoint points (one host sync there, none per
    # step): a NaN at step 2 with log_every 100 still names step 2, and the epoch-end checkpoint
    # that follows it is not written
    model = torch.nn.Linear(3, 1)
    calls = {"n": 0}

    def step_fn(net, inp):
        calls["n"] += 1
        loss = net(inp["x"]).pow(2).mean()
        if calls["n"] == 2:
            loss = loss * float("inf")
        return loss, {}, None

    synced = []
    real_stack = torch.stack

    def counting_stack(ts, *a, **k):  # the loop gathers the pending scalar losses with it
        ts = list(ts)
        if ts and all(t.dim() == 0 for t in ts):
            synced.append(len(ts))
        return real_stack(ts, *a, **k)
    monkeypatch.setattr(torch, "stack", counting_stack)
    cfg = C.resolve("pretrain", {"epochs": 2, "steps": 4, "progress": False, "log_every": 100})
    job = Job("pretrain", model, {"task": "toy"}, ToyLoader(8), lambda b, d: b, step_fn,
              lambda m: {"score": 0.0}, [("all", list(model.parameters()), 0.1)], 4, 3)
    with pytest.raises(TrainingError) as e:
        run_training(cfg, job, tmp_path)
    assert "step 2 (epoch 1 of 2)" in str(e.value) and "inf" in str(e.value)
    # the 4 losses were gathered (and checked) once, at the end of the first epoch
    assert calls["n"] == 4 and synced.count(4) == 1 and synced[-1] == 4
    assert not (tmp_path / "last.pt").exists()


def test_resuming_a_finished_run_says_how_to_train_longer(tiny_data, tmp_path, capsys):
    from med3d_ext.train.cli import main

    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(tiny_data["transfer"], run, "--from-scratch", "--epochs",
                                        1, "--steps", 1, "--cache", tiny_data["cache"])]) == 0
    capsys.readouterr()
    assert main(["transfer", "--resume", run, "--no-progress"]) == 0  # was: a bare "done"
    out = capsys.readouterr().out
    assert "nothing to train" in out and "--epochs 2" in out
    assert main(["transfer", "--resume", run, "--no-progress", "--epochs", 2]) == 0
    assert "nothing to train" not in capsys.readouterr().out
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    # a smaller --epochs than already done was accepted, saved to config.yaml, and said
    # "already did its 1 steps" of a run of 2 (README audit): refused, config.yaml kept
    before = (run / "config.yaml").read_text()
    assert main(["transfer", "--resume", run, "--no-progress", "--epochs", 1]) == 2
    err = capsys.readouterr().err
    assert "already did 2 steps, more than --epochs 1 x --steps 1 = 1" in err
    assert "give --epochs 2 or more" in err and "Traceback" not in err
    assert (run / "config.yaml").read_text() == before


def test_fp16_skipped_first_step_does_not_warn_about_the_schedule(tmp_path):
    """With --amp fp16 the grad scaler skips the steps whose scaled gradients overflow; torch's
    "lr_scheduler.step() before optimizer.step()" warning then misled users."""
    import warnings

    model = torch.nn.Linear(3, 1)
    calls = {"n": 0}

    def step_fn(net, inp):
        calls["n"] += 1
        loss = net(inp["x"]).pow(2).mean()
        return (loss.float() * 1e34 if calls["n"] == 1 else loss), {}, None  # overflows scaled
    cfg = C.resolve("pretrain", {"epochs": 1, "steps": 3, "progress": False, "amp": "fp16"})
    job = Job("pretrain", model, {"task": "toy"}, ToyLoader(3), lambda b, d: b, step_fn,
              lambda m: {"score": 0.0}, [("all", list(model.parameters()), 0.1)], 4, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run_training(cfg, job, tmp_path)
    assert not [x for x in w if "lr_scheduler.step()" in str(x.message)]
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["scaler"]["scale"] < 65536.0  # the first step was indeed skipped


def test_fused_adamw_resumes_bitwise(tiny_data, tmp_path, capsys):
    """AdamW runs torch's fused kernel now (6x the per-tensor loop on the CPU): its state
    (steps as tensors) saves and resumes as the loop's did, bit for bit."""
    from med3d_ext.train.cli import main
    from med3d_ext.train.loops import build_optimizer, optimizer_impl

    p = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    opt = build_optimizer([("all", p, 0.1)], {"optimizer": "adamw", "weight_decay": 0.0})
    assert opt.defaults.get("fused") is True and optimizer_impl(p) == {"fused": True}
    assert optimizer_impl([torch.zeros(2, dtype=torch.int64)]) == {}
    args = ["--optimizer", "adamw", "--schedule", "constant", "--steps", 2, "--num-workers", 0,
            "--cache", tiny_data["cache"], "--from-scratch"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    data = tiny_data["transfer"]
    assert main(["transfer", *tiny_args(data, full, *args, "--epochs", 2)]) == 0
    assert main(["transfer", *tiny_args(data, cut, *args, "--epochs", 1)]) == 0
    assert main(["transfer", "--resume", cut, "--epochs", 2, "--no-progress"]) == 0
    _same_last_checkpoints(full, cut, 4, ("exp_avg", "exp_avg_sq", "step"))


def _same_last_checkpoints(full, cut, step, optimizer_keys):
    """The two runs' last.pt: at ``step``, with bitwise equal weights and optimizer state."""
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == step
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs after resume"
    for i, s in a["optimizer"]["state"].items():
        for key in optimizer_keys:
            assert torch.equal(s[key], b["optimizer"]["state"][i][key]), (i, key)
    return a, b
