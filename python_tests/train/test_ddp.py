"""torchrun: a 2-process gloo (CPU) DDP pretraining run; rank 0 alone writes the run folder."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from med3d_ext.train.runlog import read_metrics

from .conftest import cli_env, default_sigint, tiny_args, wait_for_train_step

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


def test_two_process_gloo_pretrain(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "med3d_ext.train", "pretrain",
           *map(str, tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"]))]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "world size 2" in r.stdout
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] == 4
    rows = read_metrics(out / "metrics.jsonl")
    steps = [x["step"] for x in rows if x["kind"] == "train"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # logged once (rank 0), not per rank
    # throughput counts both processes' samples
    assert all(x["samples_s"] > 0 for x in rows if x["kind"] == "train")
    assert not list(out.glob(".*.tmp"))


def test_refusal_on_rank_0_stops_every_rank_without_torchrun(tiny_data, tmp_path):
    # Launched as srun/mpirun would (env:// variables, no torchrun agent to kill the others):
    # --out already holds a checkpoint, which rank 0 checks. Every rank must stop with that
    # error; rank 1 used to wait at the next barrier until the process-group timeout.
    import socket

    out = tmp_path / "taken"
    out.mkdir()
    torch.save({"step": 1}, out / "last.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(cli_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank))
        cmd = [sys.executable, "-m", "med3d_ext.train", "pretrain",
               *map(str, tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"]))]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode != 0, f"rank {rank}: {text[-2000:]}"
        assert "already holds a checkpoint" in text, f"rank {rank}: {text[-2000:]}"


def test_ctrl_c_under_torchrun_saves_and_resumes(tiny_data, tmp_path):
    """torchrun forwards a terminal's Ctrl-C to every rank (they run in their own sessions):
    the ranks agree on a step to stop at, rank 0 saves it, and a resume under torchrun
    finishes the run with every step logged once."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
              "2", "-m", "med3d_ext.train", "pretrain"]
    args = tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"], "--epochs", 1,
                     "--steps", 10, "--log-every", 3, "--no-export")
    p = subprocess.Popen(launch + [str(a) for a in args] + ["--step-sleep", "0.5"],
                         env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         preexec_fn=default_sigint)
    try:
        wait_for_train_step(p, out / "metrics.jsonl", 3)
        p.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun, not the ranks
        stdout, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            import os

            os.killpg(p.pid, signal.SIGKILL)
    err = stdout + err
    assert err.count("interrupted after step") == 1, err[-4000:]  # rank 0's message only
    assert "KeyboardInterrupt" not in err and "--resume" in err, err[-4000:]
    stopped = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped < 10
    steps = [x["step"] for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "train"]
    assert steps[-1] == stopped  # the steps since the last row were logged

    r = subprocess.run(launch + ["--resume", str(out), "--no-progress"], env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 10
    steps = [x["step"] for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "train"]
    assert steps == sorted(set(steps)) and set(steps) == {3, 6, 9, 10} | {stopped}, steps
    assert not list(out.glob(".*.tmp"))


_DUMP_WRAPPER = '''
import os, sys, torch
import med3d_ext.train.loops as L
import med3d_ext.train.cli as cli
orig = L.run_training
def patched(cfg, job, run_dir, ctx=None, **kw):
    out = orig(cfg, job, run_dir, ctx, **kw)
    torch.save({"loader": job.loader.state_dict(),
                "params": {k: v.detach().clone() for k, v in job.model.named_parameters()}},
               os.path.join(os.environ["DUMP"], f"rank{os.environ.get('RANK', '0')}.pt"))
    return out
L.run_training = patched
sys.exit(cli.main(sys.argv[1:]))
'''


def test_resume_under_torchrun_keeps_each_ranks_stream_and_syncs_a_thawed_encoder(tiny_data,
                                                                                  tmp_path):
    """Rank 0 alone saves checkpoints: on resume every rank loaded rank 0's sampler seed (all
    ranks trained on the same patches), and an encoder frozen before the DDP wrap never had its
    gradients averaged once it thawed (the ranks' encoders drifted apart)."""
    from med3d_ext.models import resnet3d, save_encoder_medicalnet

    enc = save_encoder_medicalnet(resnet3d(10), tmp_path / "enc.pth")
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(_DUMP_WRAPPER)
    run, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(wrapper), "transfer"]
    first = tiny_args(tiny_data["transfer"], run, "--cache", tiny_data["cache"], "--pretrained",
                      enc, "--freeze-epochs", 2, "--epochs", 1)
    env = dict(cli_env(), DUMP=str(dump))
    r = subprocess.run(base + list(map(str, first)), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    r = subprocess.run(base + ["--resume", str(run), "--epochs", "3", "--no-progress"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = (torch.load(dump / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert a["loader"]["position"] == b["loader"]["position"] == 6
    assert a["loader"]["seed"] != b["loader"]["seed"]  # each rank its own patches
    diff = [k for k in a["params"] if not torch.equal(a["params"][k], b["params"][k])]
    assert not diff, diff[:5]  # DDP kept every parameter in sync, the thawed encoder's too
