"""ConvBNReLU3d, fuse_modules / unfuse_modules / fold_bn on a MedicalNet-structured ResNet:
fused == plain (outputs, gradients, running stats) in train and eval, same state dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import med3d_ext as m3d
from med3d_ext import _extension
from med3d_ext.nn import ConvBNReLU3d, fold_bn, fuse_modules, unfuse_modules
from python_tests.conftest import DEVICES
from python_tests.nn._tiny_resnet import resnet

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")


def _close(a, b, what, rtol=1e-4, atol=1e-4):
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _close_grads(model_a, model_b, what, rel=1e-3):
    """L2 agreement of every parameter gradient. Elementwise checks are too strict here: a ReLU
    mask flip at a value within round-off of 0 (both computations valid) moves single elements.
    The floor is relative to the model's largest gradient, because some gradients are sums that
    cancel to ~0 (e.g. a conv bias followed by a training-mode BatchNorm)."""
    pairs = [(n, p.grad.double(), q.grad.double())
             for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters())]
    scale = max(b.abs().max().item() for _, _, b in pairs)
    for name, a, b in pairs:
        err = (a - b).norm().item()
        bound = rel * b.norm().item() + 1e-4 * scale * a.numel() ** 0.5
        assert err <= bound, f"{what} grad {name}: L2 error {err:.3g} > {bound:.3g}"


def _train_step(model, x):
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum()
    loss.backward()
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_conv_bn_relu_module_matches_plain(device, momentum):
    m = ConvBNReLU3d(3, 6, 3, stride=2, padding=1, momentum=momentum).to(device)
    nn.init.uniform_(m.bn.weight, 0.5, 1.5)
    plain = nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn), nn.ReLU())
    keys = set(m.state_dict())
    assert keys == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                    "bn.num_batches_tracked"}
    # loads a plain Conv3d + BatchNorm3d state dict with the same names
    m.load_state_dict({"conv." + k: v for k, v in plain[0].state_dict().items()}
                      | {"bn." + k: v for k, v in plain[1].state_dict().items()})
    for step in range(3):
        x = torch.randn(2, 3, 7, 6, 5, device=device)
        r = torch.randn(2, 6, 4, 3, 3, device=device)
        out = m(x, r)
        ref = torch.relu(plain[1](plain[0](x)) + r)
        _close(out, ref, f"train step {step}")
    for (k, a), (_, b) in zip(m.state_dict().items(), plain[:2].state_dict().items()):
        _close(a.float(), b.float(), k)
    m.eval(), plain.eval()
    x = torch.randn(1, 3, 5, 5, 5, device=device)
    _close(m(x), plain(x), "eval")


def _compare_models(device, depth, shortcut, train, cl=False, steps=2):
    torch.manual_seed(torch.randint(2**31, ()).item())
    plain = resnet(depth, shortcut).to(device)
    fused = fuse_modules(copy.deepcopy(plain))
    if cl:
        plain = plain.to(memory_format=torch.channels_last_3d)
        fused = fused.to(memory_format=torch.channels_last_3d)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in plain.named_modules()]
    plain.train(train), fused.train(train)
    for step in range(steps):
        x = torch.randn(2, 1, 16, 16, 16, device=device)
        if cl:
            x = x.to(memory_format=torch.channels_last_3d)
        plain.zero_grad(), fused.zero_grad()
        out_p, out_f = _train_step(plain, x), _train_step(fused, x)
        _close(out_f, out_p, f"output step {step}", 1e-3, 1e-3)
        _close_grads(fused, plain, f"step {step}")
    for (name, a), (_, b) in zip(plain.state_dict().items(), fused.state_dict().items()):
        _close(b.float(), a.float(), f"state {name}", 1e-3, 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth,shortcut", [(10, "A"), (10, "B"), (18, "A"), (26, "B")])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_resnet_matches_plain(device, depth, shortcut, train):
    _compare_models(device, depth, shortcut, train)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_resnet_channels_last(device):
    _compare_models(device, 18, "A", True, cl=True, steps=1)


def test_fuse_swaps_forward_only_and_unfuse_restores():
    model = resnet(10, "B")
    classes = {n: type(m) for n, m in model.named_modules()}
    fuse_modules(model)
    fuse_modules(model)  # idempotent
    fused_names = {n for n, m in model.named_modules() if getattr(type(m), "_m3d_fused", None)}
    assert {"layer1.0", "layer4.0", "layer2.0.downsample", "conv_seg", "conv1", "bn1"} <= fused_names
    assert isinstance(model.layer1[0], classes["layer1.0"])  # still a BasicBlock
    unfuse_modules(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert "_m3d_bn" not in model.conv1.__dict__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth,shortcut", [(10, "B"), (26, "A")])
def test_fold_bn_matches_plain_eval(device, depth, shortcut):
    plain = resnet(depth, shortcut).to(device)
    with torch.no_grad():  # populate running stats
        plain.train()
        for _ in range(2):
            plain(torch.randn(2, 1, 16, 16, 16, device=device))
    plain.eval()
    folded = fold_bn(copy.deepcopy(plain))
    x = torch.randn(2, 1, 16, 16, 16, device=device)
    with torch.no_grad():
        ref = plain(x)
        _close(folded(x), ref, "folded", 1e-3, 1e-3)
        _close(unfuse_modules(folded)(x), ref, "folded, unfused", 1e-3, 1e-3)
    keys = set(folded.state_dict())
    assert "conv1.bias" in keys and not any(k.startswith("bn1.") for k in keys)
    assert "conv_seg.1.weight" in keys  # the BN after the ConvTranspose3d is not folded


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_fused_resnet_compiles(device):
    model = fuse_modules(resnet(10, "A").to(device))
    ref_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 1, 16, 16, 16, device=device)
    out_c, out_e = _train_step(compiled, x), _train_step(ref_model, x)
    _close(out_c, out_e, "compiled output")
    _close_grads(model, ref_model, "compiled")
    assert torch.equal(model.bn1.num_batches_tracked, ref_model.bn1.num_batches_tracked)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_fused_resnet(device):
    dtype = torch.bfloat16
    plain = resnet(10, "B").to(device)
    fused = fuse_modules(copy.deepcopy(plain))
    x = torch.randn(2, 1, 16, 16, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        out_f = fused(x)
        out_p = plain(x)
    ref = copy.deepcopy(plain)(x)
    assert out_f.dtype == dtype
    err_f = (out_f.float() - ref).norm() / ref.norm()
    err_p = (out_p.float() - ref).norm() / ref.norm()
    assert err_f <= 2 * err_p + 1e-2, (err_f, err_p)


@pytest.mark.parametrize("device", DEVICES)
def test_fold_conv_bn_relu_module(device):
    m = ConvBNReLU3d(1, 6, 7, stride=2, padding=3).to(device)  # a stem: space-to-depth path
    with torch.no_grad():
        nn.init.uniform_(m.bn.weight, 0.5, 1.5)
        m(torch.randn(2, 1, 9, 10, 11, device=device))  # running stats
    m.eval()
    x = torch.randn(1, 1, 9, 10, 11, device=device)
    r = torch.randn(1, 6, 5, 5, 6, device=device)
    with torch.no_grad():
        ref = m(x, r)
        folded = fold_bn(copy.deepcopy(m))
        _close(folded(x, r), ref, "folded ConvBNReLU3d")
    assert isinstance(folded.bn, nn.Identity) and folded.conv.bias is not None
    assert set(folded.state_dict()) == {"conv.weight", "conv.bias"}
