"""A fused model queues its BatchNorm bookkeeping (num_batches_tracked, running statistics)
during its forward and applies it in a few foreach launches at the end (ops/_running_stats.py):
the same state as the plain model, in fewer launches, also when a layer runs twice or the
forward raises."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from med3d_ext import _extension
from med3d_ext.models import resnet3d
from med3d_ext.nn import ConvBNReLU3d, fuse_modules, unfuse_modules
from med3d_ext.ops import _running_stats
from python_tests.conftest import DEVICES

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


def _assert_same_state(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}: {k}"


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_one_forward_updates_like_the_plain_model_in_few_launches(device):
    plain = resnet3d(10, shortcut_type="B").to(device)
    fused = fuse_modules(copy.deepcopy(plain))
    x = torch.randn(2, 1, 16, 16, 16, device=device)
    plain(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fused(x)
    _assert_same_state(_bn_state(fused), _bn_state(plain), "after one forward")
    ops = [e.name for e in prof.events()]
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in plain.modules())
    # every layer's count and statistics in one foreach call each (one momentum, one dtype)
    assert ops.count("aten::_foreach_add_") == 1 and ops.count("aten::_foreach_lerp_") == 1, (
        ops.count("aten::_foreach_add_"), ops.count("aten::_foreach_lerp_"), n_bn)
    assert _running_stats._active() is None  # closed


@requires_ext
def test_a_layer_run_twice_updates_twice_in_order():
    torch.manual_seed(0)
    layer = ConvBNReLU3d(3, 3, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(self.layer(x) * 2.0)

    plain_layer = nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn), nn.ReLU())
    fused = fuse_modules(Twice())
    x = torch.randn(2, 3, 5, 6, 4)
    fused(x)
    plain_layer(plain_layer(x) * 2.0)
    assert layer.bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(layer.bn.running_mean, plain_layer[1].running_mean)
    torch.testing.assert_close(layer.bn.running_var, plain_layer[1].running_var)


@requires_ext
def test_a_forward_that_raises_keeps_the_updates_made_before():
    model = fuse_modules(nn.Sequential(nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d(4),
                                       nn.ReLU(), nn.Conv3d(4, 4, 3, bias=False)))
    bn = model[1]
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 2, 4, 4, 4))  # the last conv's 2^3 input is smaller than its kernel
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    assert _running_stats._active() is None  # the batch was closed: later forwards work
    model[3] = nn.Conv3d(4, 4, 1, bias=False)
    model(torch.randn(2, 2, 4, 4, 4))
    assert bn.num_batches_tracked.item() == 2


@requires_ext
def test_nested_fused_models_share_one_batch_and_unfuse_restores_the_classes():
    inner = fuse_modules(nn.Sequential(nn.Conv3d(1, 2, 3, bias=False), nn.BatchNorm3d(2), nn.ReLU()))
    outer = fuse_modules(nn.Sequential(inner, nn.Conv3d(2, 2, 1, bias=False), nn.BatchNorm3d(2)))
    fuse_modules(outer)  # re-fusing wraps nothing twice
    assert type(outer).__mro__[2] is nn.Sequential  # root wrapper -> fused Sequential -> plain
    assert not outer._forward_pre_hooks and not outer._forward_hooks  # no hooks
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        outer(torch.randn(2, 1, 5, 5, 5))
    assert [e.name for e in prof.events()].count("aten::_foreach_lerp_") == 1
    unfuse_modules(outer)
    assert type(outer) is nn.Sequential and type(inner) is nn.Sequential


@requires_ext
def test_a_keyboard_interrupt_inside_the_forward_leaves_nothing_queued():
    """A KeyboardInterrupt is not an Exception: forward hooks with always_call=True would not
    run for it, and every later forward would have queued into a batch never applied."""
    model = fuse_modules(nn.Sequential(nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
                                       nn.Conv3d(4, 4, 1, bias=False)))
    plain = unfuse_modules(copy.deepcopy(model))
    x = torch.randn(2, 2, 5, 5, 5)

    def interrupt(module, args):
        raise KeyboardInterrupt

    h = model[3].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    h.remove()
    plain[:3](x)  # what the interrupted forward did before the interrupt
    assert _running_stats._active() is None
    _assert_same_state(_bn_state(model), _bn_state(plain), "after the interrupt")
    model(x)
    plain(x)
    _assert_same_state(_bn_state(model), _bn_state(plain), "after one more forward")


@requires_ext
def test_the_root_wrapper_pickles_and_has_no_hooks():
    """No module hooks (torch.cuda.make_graphed_callables refuses modules with hooks), and
    the wrapped root survives deepcopy and torch.save / torch.load with its batching."""
    import io

    model = fuse_modules(resnet3d(10, shortcut_type="A"))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for clone in (copy.deepcopy(model), _save_load(model, io)):
        assert type(clone).__name__ == type(model).__name__ == "ResNet3d"
        assert type(clone).__dict__.get("_m3d_root")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            clone(torch.randn(2, 1, 16, 16, 16))
        assert [e.name for e in prof.events()].count("aten::_foreach_add_") == 1
        assert type(unfuse_modules(clone)).__name__ == "ResNet3d"


def _save_load(model, io):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@requires_ext
def test_outside_a_fused_model_the_op_updates_at_once():
    m = ConvBNReLU3d(2, 3, 3)
    m(torch.randn(2, 2, 4, 4, 4))  # a module not fused by fuse_modules: no batch
    assert m.bn.num_batches_tracked.item() == 1 and m.bn.running_mean.abs().sum() > 0
