"""torch.compile over the paths a GPU training run takes: fused ResNets under bf16 autocast and
channels_last_3d with the GPU's stem algorithm, over several steps with an optimiser (one graph,
compiled once), a frozen encoder (--freeze-epochs), BatchNorm's cumulative average
(momentum=None) and the pretraining model's compiled encoder (what the CLI's --compile does).

The CPU takes other branches than CUDA unless told: STEM_CONV is forced to the CUDA default
("space_to_depth_fold_w"), autocast runs on the CPU in bf16, and inputs and models are
channels_last_3d as the CLI makes them on a GPU. Graph breaks are caught with
``fullgraph=True`` and recompiles with ``error_on_recompile``; the aot_eager backend runs the
traced graph with the ops' real kernels (Inductor would add nothing that Dynamo decides)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from med3d_ext import _extension
from med3d_ext.models import Med3DNet, freeze_encoder, resnet3d, resnet3d_encoder
from med3d_ext.nn import fuse_modules
from python_tests.conftest import DEVICES

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")
pytestmark = pytest.mark.usefixtures("one_thread")

CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def _gpu_stem_and_fresh_dynamo(monkeypatch):
    # the stem algorithm STEM_CONV="auto" picks on CUDA, on every device (its one-pass input
    # and its functorch check broke compiled graphs on an H200 before)
    from med3d_ext.ops import conv_bn_relu as cbr

    monkeypatch.setattr(cbr, "STEM_CONV", "space_to_depth_fold_w")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(depth, shortcut, device, encoder=False):
    """A fused MedicalNet ResNet, channels_last_3d, with non-trivial BatchNorm affine
    parameters (MedicalNet's init makes them the identity)."""
    model = (resnet3d_encoder if encoder else resnet3d)(depth, shortcut_type=shortcut)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias, 0, 0.2)
    return model.to(device).to(memory_format=CL)


def _x(device, n=2):
    return torch.randn(n, 1, 16, 16, 16, device=device).contiguous(memory_format=CL)


def _bf16_step(fn, x, device):
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fn(x)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).mean().backward()
    return out.detach().float()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth,shortcut", [(10, "B"), (18, "A"), (50, "B"), (50, "A")])
def test_fused_resnet_training_compiles_once_under_autocast_channels_last(device, depth,
                                                                          shortcut):
    # the CLI's compiled step on a GPU: bf16 autocast, channels_last_3d, the GPU's stem, an
    # optimiser step between steps; one graph with no break, never compiled again (R10 "A"
    # alone, without channels_last_3d or several steps, is in test_fused_modules.py)
    model = fuse_modules(_model(depth, shortcut, device))
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _x(device)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out_c = _bf16_step(compiled, x, device)
        out_e = _bf16_step(ref, x, device)
        # the same bf16 computation, traced (gradients are not compared: bf16 BatchNorm over
        # 16 voxels per channel makes a ResNet-50's, plain PyTorch's too, noise)
        assert _rel(out_c, out_e) < 0.05, f"compiled vs eager output: {_rel(out_c, out_e):.3g}"
        for a, b in ((model.bn1, ref.bn1), (model.layer4[-1].bn2, ref.layer4[-1].bn2)):
            assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)
            assert _rel(a.running_mean, b.running_mean) < 0.05
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        for _ in range(2):
            opt.step()
            opt.zero_grad(set_to_none=True)
            _bf16_step(compiled, _x(device), device)
    assert int(model.bn1.num_batches_tracked) == 3


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_fused_resnet_eval_compiles_under_autocast_no_grad(device):
    # whole-volume validation of a compiled model: eval mode, no_grad, bf16 autocast
    model = fuse_modules(_model(10, "B", device)).eval()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad(), \
            torch.autocast(device, dtype=torch.bfloat16):
        for _ in range(2):
            x = _x(device)
            out_c, out_e = compiled(x), ref(x)
    assert out_c.dtype == torch.bfloat16
    assert _rel(out_c, out_e) < 0.05


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_fused_encoder_compiles_in_one_graph(device):
    # --freeze-epochs with --compile: the fused layers looked for hooks by reading the handle
    # of freeze_encoder's pre-hook, a RemovableHandle, which Dynamo cannot represent: a graph
    # break at every fused layer of the frozen encoder (13 in a ResNet-10) for every step of
    # the frozen epochs
    model = freeze_encoder(fuse_modules(_model(10, "B", device)))
    ref = copy.deepcopy(model)
    stats = {n: b.clone() for n, b in model.named_buffers() if not n.startswith("conv_seg.")}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            x = _x(device)
            out_c, out_e = _bf16_step(compiled, x, device), _bf16_step(ref, x, device)
    assert _rel(out_c, out_e) < 0.05
    # frozen: the encoder got no gradient and kept its statistics; the head trained
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("conv_seg."))
    for (n, p), (_, q) in zip(model.conv_seg.named_parameters(), ref.conv_seg.named_parameters()):
        assert _rel(p.grad, q.grad) < 0.05, f"head gradient {n}: {_rel(p.grad, q.grad):.3g}"
    for n, b in model.named_buffers():
        if n in stats:
            assert torch.equal(b, stats[n]), f"frozen buffer {n} changed"
    # the fused path still runs in the frozen layers (their freeze hook does not count)
    from med3d_ext.nn.fused import _hooked

    assert not _hooked(model.layer1[0].bn1) and not _hooked(model.bn1)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_fused_cumulative_average_bn_compiles_in_one_graph(device):
    # BatchNorm(momentum=None) (the cumulative average) read its factor as
    # 1 / float(num_batches_tracked), an .item() that Dynamo cannot trace: a graph break in
    # every fused layer, after which the rest of the fused forward, shared by all layers, was
    # recompiled per layer until Dynamo's recompile limit sent it to eager
    plain = _model(10, "B", device, encoder=True)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.momentum = None
    model = fuse_modules(copy.deepcopy(plain))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            x = _x(device)
            for m in (compiled, plain):
                m(x).square().mean().backward()
    # plain BatchNorm's statistics after 3 cumulative-average updates
    for (n, a), (_, b) in zip(model.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    assert int(model.bn1.num_batches_tracked) == 3


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_pretraining_encoder_compiles_once_for_any_mix_of_heads(device):
    # the CLI's --compile of a Med3DNet: the encoder alone, in place (train/loops.py,
    # compile_for_training), the eager root opening the running-statistics batch around it;
    # every mix of datasets in a batch, in bf16 and channels_last_3d, reuses one graph
    from med3d_ext.models.med3d import rows_by_head
    from med3d_ext.ops import multihead_seg_loss, resize

    model = Med3DNet(10, {"a": 2, "b": 3}, fused=True).to(device).to(memory_format=CL)
    model.encoder.compile(fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ids in ([0, 1], [1, 1], [1, 0], [0, 0]):
            x = _x(device)
            label = torch.randint(0, 2, (2, 16, 16, 16), dtype=torch.uint8, device=device)
            with torch.autocast(device, dtype=torch.bfloat16):
                outs = model(x, ids)
            targets = rows_by_head(label, outs)
            logits = [resize(o.logits, tuple(t.shape[1:])) for o, t in zip(outs, targets)]
            loss, _ = multihead_seg_loss(logits, targets, validate=False)
            loss.backward()
    assert int(model.encoder.bn1.num_batches_tracked) == 4
