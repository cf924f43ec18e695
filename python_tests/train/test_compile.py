"""--compile: what the CLI compiles, and that a run compiles each graph once."""

from __future__ import annotations

import pytest
import torch

from .conftest import tiny_args


def test_compile_for_training_compiles_the_med3d_encoder_in_place():
    from med3d_ext.models import Med3DNet, resnet3d
    from med3d_ext.train.loops import compile_for_training

    model = Med3DNet(10, {"a": 2, "b": 3})
    keys = list(model.state_dict())
    net = compile_for_training(model, model, "default")
    # the routed model is called as it is; its encoder alone is compiled, in place, so the
    # state dict (checkpoints, MedicalNet export) keeps its keys
    assert net is model and model.encoder._compiled_call_impl is not None
    assert all(h._compiled_call_impl is None for h in model.heads.values())
    assert model._compiled_call_impl is None
    assert list(model.state_dict()) == keys
    plain = resnet3d(10)
    wrapped = compile_for_training(plain, plain, "default")
    assert wrapped is not plain and wrapped._orig_mod is plain  # a whole-model compile


@pytest.mark.slow
def test_pretrain_compile_compiles_each_graph_once(tiny_data, tmp_path, capsys):
    """A compiled Med3DNet forward broke its graph at the host-side routing and recompiled for
    every new mix of datasets in a batch (8 recompiles in 12 steps on the CPU, then eager);
    the fused ops' first compiled step was compiled twice, and tracing them printed Dynamo's
    lru_cache warnings."""
    from torch._dynamo.utils import counters

    from med3d_ext.train.cli import main

    torch._dynamo.reset()
    counters.clear()
    try:
        rc = main(["pretrain", *tiny_args(tiny_data["pretrain"], tmp_path / "run", "--batch-size",
                                          4, "--epochs", 1, "--steps", 10, "--log-every", 5,
                                          "--cache", tiny_data["cache"], "--compile", "--fused")])
        frames = dict(counters["frames"])
    finally:
        torch._dynamo.reset()
    err = capsys.readouterr().err
    assert rc == 0, err
    # one graph for the training steps, and the validation's: no_grad, then its batch size;
    # and something was compiled (0 frames would pass the bound with compiling dropped)
    assert 1 <= frames.get("ok", 0) and frames.get("total", 0) <= 3, frames
    assert "lru_cache" not in err and "recompile" not in err.lower(), err
