"""Checkpoints: our format, weights_only loading, every RNG, atomic writes under a crash."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from med3d_ext.train import checkpoint as ck

from .conftest import cli_env


def _model():
    return torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.BatchNorm3d(3))


def _draws():
    return (torch.rand(5), torch.randn(3), np.random.rand(4), np.random.randn(2),
            random.random(), random.gauss(0, 1))


def test_rng_roundtrip_through_file(tmp_path):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    np.random.seed(int(torch.randint(0, 2**31, ())))
    random.seed(int(torch.randint(0, 2**31, ())))
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and one in python's
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 1, 5, 5, 5)).sum().backward()
    opt.step()
    path = ck.save_checkpoint(tmp_path / "a.pt", arch={"task": "x", "depth": 1}, model=m,
                              optimizer=opt, step=7, epoch=2, config={"lr": 0.1, "p": tmp_path})
    expected = _draws()
    _draws()  # move every RNG on
    obj = ck.load_checkpoint(path)
    torch.load(path, weights_only=True)  # plain weights_only load works too
    assert obj["format"] == "med3d_ext" and obj["version"] == ck.VERSION
    assert obj["step"] == 7 and obj["epoch"] == 2 and obj["config"]["p"] == str(tmp_path)
    for k in ("state_dict", "optimizer", "scheduler", "scaler", "rng", "arch"):
        assert k in obj
    ck.set_rng_state(obj["rng"])
    again = _draws()
    for a, b in zip(expected, again):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            np.testing.assert_array_equal(a, b)
    m2 = _model()
    m2.load_state_dict(obj["state_dict"])
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(ck.CheckpointError, match="not a med3d_ext checkpoint"):
        ck.load_checkpoint(p)
    # a text file (a run's config.yaml given for its checkpoint): torch.load said
    # "KeyError: 101", or "pop from empty list"
    p.write_bytes(b"amp: auto\nbatch_size: 2\n")
    with pytest.raises(ck.CheckpointError, match=r"x.pt' is not a checkpoint: it is a text file "
                                                 r"\(it starts with 'amp: auto'\)"):
        ck.load_checkpoint(p)
    p.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ck.CheckpointError, match=r"is not a PyTorch file .*starts with b'\\x00"):
        ck.load_checkpoint(p)
    p.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="is empty"):
        ck.load_checkpoint(p)
    torch.save({"format": ck.FORMAT, "w": torch.zeros(1000)}, p)
    p.write_bytes(p.read_bytes()[:2000])  # cut short: torch's first sentence, one line
    with pytest.raises(ck.CheckpointError, match=r"cannot read checkpoint .*\(a file cut short") as e:
        ck.load_checkpoint(p)
    assert "\n" not in str(e.value) and "high likelihood" not in str(e.value)
    import argparse

    torch.save({"format": ck.FORMAT, "args": argparse.Namespace(a=1)}, p)  # a pickled object
    with pytest.raises(ck.CheckpointError, match=r"it pickles 'argparse.Namespace', which "
                                                 r"weights_only loading refuses \(not a med3d_ext"):
        ck.load_checkpoint(p)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "none.pt")


def test_atomic_write_keeps_old_file_on_exception(tmp_path, monkeypatch):
    m = _model()
    path = ck.save_checkpoint(tmp_path / "last.pt", arch={"task": "x"}, model=m, step=1)
    before = path.read_bytes()
    real_save = torch.save

    def torn_save(obj, f, *a, **kw):  # half a file, then the "crash"
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(path, arch={"task": "x"}, model=m, step=2)
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_atomic_write_survives_process_death_mid_save(tmp_path):
    """A real crash: the process dies (os._exit) while the new checkpoint is half written."""
    code = textwrap.dedent(f"""
        import os, torch
        from med3d_ext.train import checkpoint as ck
        m = torch.nn.Linear(64, 64)
        ck.save_checkpoint({str(tmp_path / 'last.pt')!r}, arch={{"task": "x"}}, model=m, step=1)
        real = torch.save
        def dying(obj, f, *a, **kw):
            real(obj, f, *a, **kw)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            os._exit(17)
        torch.save = dying
        ck.save_checkpoint({str(tmp_path / 'last.pt')!r}, arch={{"task": "x"}}, model=m, step=2)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=120)
    assert r.returncode == 17
    obj = ck.load_checkpoint(tmp_path / "last.pt")
    assert obj["step"] == 1  # the previous complete checkpoint, intact
    # the torn temporary is visible as a dot-file and never under the real name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(n.startswith(".last.pt.") and n.endswith(".tmp") for n in leftovers)


def test_find_checkpoint(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.find_checkpoint(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        ck.find_checkpoint(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"")
    assert ck.find_checkpoint(tmp_path, "best").name == "last.pt"
    (tmp_path / "best.pt").write_bytes(b"")
    assert ck.find_checkpoint(tmp_path, "best").name == "best.pt"
    assert ck.find_checkpoint(tmp_path, "last").name == "last.pt"
