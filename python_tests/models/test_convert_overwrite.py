"""``python -m med3d_ext.models convert IN OUT`` and an existing OUT (user audit): any file
there was replaced without a word (a run's best.pt, its head and optimizer state gone). It is
refused unless --overwrite is given."""

from __future__ import annotations

import os

import pytest
import torch

from med3d_ext.models import load_medicalnet_weights, resnet3d
from med3d_ext.models.__main__ import main


def _random_file(path):
    """A MedicalNet-layout ResNet-10 file of fresh random weights; returns (path, model)."""
    net = resnet3d(10)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v))
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()
                               if not k.startswith("conv_seg.")}}, path)
    return path, net


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_convert_refuses_an_existing_out_unless_overwrite(tmp_path, capsys, suffix):
    src, net = _random_file(tmp_path / "in.pth")
    out = tmp_path / f"best{suffix}"
    mine = os.urandom(int(torch.randint(1, 4096, ()).item()))  # e.g. a run's checkpoint
    out.write_bytes(mine)
    assert main(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: OUT {str(out)!r} already exists; give another file name, or "
                   "--overwrite to replace it"), err
    assert out.read_bytes() == mine
    # a dangling link: refused too (writing would go through it to its target)
    link = tmp_path / f"link{suffix}"
    link.symlink_to(tmp_path / "nowhere" / "x")
    assert main(["convert", str(src), str(link)]) == 2
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    # --overwrite: replaced by the encoder, which loads back as the source's
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0
    assert f"to {out}" in capsys.readouterr().out
    back = resnet3d(10)
    load_medicalnet_weights(back, out)
    got, want = back.state_dict(), net.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got if not k.startswith("conv_seg."))
    # a new OUT needs no flag; the input itself stays refused, --overwrite or not
    assert main(["convert", str(src), str(tmp_path / f"new{suffix}")]) == 0
    before = src.read_bytes()
    assert main(["convert", str(src), str(src), "--overwrite"]) == 2
    assert "is the input file itself" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_convert_help_documents_overwrite(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in out and "replace OUT if it exists" in out
