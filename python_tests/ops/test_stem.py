"""The stem rewrite (stride-2 conv as a stride-1 conv on space-to-depth input) is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from med3d_ext.ops import stem
from med3d_ext.ops.stem import is_stem_like, stem_conv3d, stem_rewrite
from python_tests.conftest import DEVICES, assert_low_precision_close


# the fold variants of the rewrite (stem_rewrite's keywords), by test id
FOLDS = {"s2d": {}, "s2d_fold_w": {"fold_w": True}, "s2d_fold_hw": {"fold_hw": True}}


def _check_exact(device, shape, k, cout, channels_last, fold=None):
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(cout, shape[1], k, k, k, dtype=torch.float64, device=device, requires_grad=True)
    xin = x.to(memory_format=torch.channels_last_3d) if channels_last else x
    ours = stem_conv3d(xin, w, padding=k // 2, **(fold or {}))
    ref = F.conv3d(x, w, stride=2, padding=k // 2)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 1, 19, 24, 17), (1, 1, 7, 7, 7), (2, 3, 9, 10, 11), (1, 4, 8, 8, 8)])
@pytest.mark.parametrize("k", [7, 3, 4])
@pytest.mark.parametrize("fold", list(FOLDS))
def test_stem_rewrite_is_exact(device, shape, k, fold):
    _check_exact(device, shape, k, cout=int(torch.randint(1, 9, ()).item()),
                 channels_last=bool(torch.randint(2, ()).item()), fold=FOLDS[fold])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "cl3d"])
def test_stem_fold_w_shapes(device, channels_last):
    # the folded form is a (q_d, q_h, 1) convolution over 8 * Cin * q_w channels, in the layout
    # asked for, and equals the direct convolution on an anisotropic kernel with padding 0
    x = torch.randn(2, 2, 11, 9, 13, dtype=torch.float64, device=device)
    w = torch.randn(3, 2, 5, 3, 7, dtype=torch.float64, device=device)
    x2, w2 = stem_rewrite(x, w, padding=(2, 0, 1), channels_last=channels_last, fold_w=True)
    assert w2.shape == (3, 2 * 8 * 4, 3, 2, 1)
    assert x2.shape[1] == 64 and x2.is_contiguous(
        memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    torch.testing.assert_close(F.conv3d(x2, w2), F.conv3d(x, w, stride=2, padding=(2, 0, 1)),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "cl3d"])
def test_stem_fold_hw_shapes(device, channels_last):
    # H and W folded: a (q_d, 1, 1) convolution over 8 * Cin * q_h * q_w channels on the output's
    # own (H, W) grid, in the layout asked for; an anisotropic kernel (even and odd sizes) with
    # padding 0 on one axis
    x = torch.randn(2, 2, 11, 9, 13, dtype=torch.float64, device=device)
    w = torch.randn(3, 2, 5, 4, 7, dtype=torch.float64, device=device)
    ref = F.conv3d(x, w, stride=2, padding=(2, 0, 1))
    x2, w2 = stem_rewrite(x, w, padding=(2, 0, 1), channels_last=channels_last, fold_hw=True)
    assert w2.shape == (3, 2 * 8 * 2 * 4, 3, 1, 1)
    assert x2.shape[1] == 128 and tuple(x2.shape[3:]) == tuple(ref.shape[3:])
    assert x2.is_contiguous(
        memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    torch.testing.assert_close(F.conv3d(x2, w2), ref, rtol=1e-10, atol=1e-10)
    # fold_hw implies the W fold: both flags give the same tensors
    x3, w3 = stem_rewrite(x, w, padding=(2, 0, 1), channels_last=channels_last, fold_w=True,
                          fold_hw=True)
    assert torch.equal(x3, x2) and torch.equal(w3, w2)


@pytest.mark.parametrize("device", DEVICES)
def test_stem_low_precision(device):
    dtype = torch.bfloat16
    x = torch.randn(2, 1, 16, 18, 20, device=device)
    w = torch.randn(8, 1, 7, 7, 7, device=device) * 0.05
    ref = F.conv3d(x, w, stride=2, padding=3)
    fold = list(FOLDS.values())[int(torch.randint(len(FOLDS), ()).item())]
    ours = stem_conv3d(x.to(dtype), w.to(dtype), **fold)
    plain = F.conv3d(x.to(dtype), w.to(dtype), stride=2, padding=3)
    assert_low_precision_close(ours, plain, ref, factor=2.0, floor=1e-2)


def test_stem_like_and_errors():
    w = torch.empty(64, 1, 7, 7, 7)
    assert is_stem_like(w, 2, 3, 1) and not is_stem_like(w, 1, 3, 1)
    assert not is_stem_like(torch.empty(64, 64, 3, 3, 3), 2, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        stem_conv3d(torch.randn(1, 2, 8, 8, 8), w)
    with pytest.raises(ValueError, match="5-D"):
        stem_conv3d(torch.randn(8, 8, 8), w)


@pytest.mark.parametrize("device", DEVICES)
def test_stem_non_contiguous_bias_and_empty(device):
    # sliced x, transposed weight, a bias, and an empty batch: still the direct convolution
    x = torch.randn(2, 2, 19, 16, 22, dtype=torch.float64, device=device)[:, :, :, ::2, 1::2]
    w = torch.randn(2, 5, 7, 7, 7, dtype=torch.float64, device=device).transpose(0, 1)
    b = torch.randn(5, dtype=torch.float64, device=device)
    assert not x.is_contiguous() and not w.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    ours = stem_conv3d(*leaves)
    ref = F.conv3d(x, w, b, stride=2, padding=3)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    refs = [t.detach().requires_grad_() for t in (x, w, b)]
    expect = torch.autograd.grad(F.conv3d(*refs, stride=2, padding=3), refs, g)
    for a, e in zip(torch.autograd.grad(ours, leaves, g), expect):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    empty = stem_conv3d(x[:0], w, b)
    assert empty.shape == (0,) + ref.shape[1:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fold", ["s2d_fold_w", "s2d_fold_hw"])
def test_fold_input_in_one_pass_equals_the_aten_ops(device, dtype, fold, monkeypatch,
                                                    im2col_kernel):
    """Without autograd, the channels_last folded input (W, or H and W) is one im2col3d call
    where the padded sizes are even (stem._fold_by_im2col), and must be the ATen ops' tensor
    bit for bit: the
    same values, shape and strides. Odd padded sizes keep the ATen ops; a channels_last,
    a sliced and a contiguous input; an empty batch; and the convolution it feeds is still the
    direct one."""
    if stem.compiled("im2col3d") is None:
        pytest.skip("needs the compiled extension")
    taken = []
    real = stem._fold_by_im2col
    monkeypatch.setattr(stem, "_fold_by_im2col", lambda *a: taken.append(real(*a)) or taken[-1])
    kw = FOLDS[fold]
    cases = [((2, 1, 16, 18, 20), (4, 1, 7, 7, 7), 3, True),
             ((2, 2, 12, 10, 12), (3, 2, 5, 3, 7), (2, 0, 1), True),
             ((1, 3, 10, 12, 9), (2, 3, 7, 7, 7), 3, False),   # W + 6 odd: the ATen ops
             ((0, 1, 16, 16, 16), (2, 1, 7, 7, 7), 3, True)]
    for shape, wshape, padding, fast in cases:
        x = torch.randn(shape, device=device).to(dtype)
        w = torch.randn(wshape, device=device, dtype=torch.float64)
        for xin in (x.contiguous(memory_format=torch.channels_last_3d),
                    torch.randn(shape[:4] + (2 * shape[4],), device=device).to(dtype)[..., ::2],
                    x):
            taken.clear()
            ours = stem.stem_rewrite_input(xin, wshape[2:], padding, channels_last=True, **kw)
            assert (taken[0] is not None) == fast, (shape, padding)
            ref = stem.stem_rewrite_input(xin.detach().requires_grad_(), wshape[2:], padding,
                                          channels_last=True, **kw)
            assert ref.grad_fn is not None  # the ATen ops
            assert ours.shape == ref.shape and ours.stride() == ref.stride(), shape
            assert torch.equal(ours, ref.detach()), shape
        if dtype == torch.float64:
            x2, w2 = stem_rewrite(x, w, padding, channels_last=True, **kw)
            torch.testing.assert_close(F.conv3d(x2, w2), F.conv3d(x, w, stride=2, padding=padding),
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fold", ["s2d_fold_w", "s2d_fold_hw"])
def test_fold_stem_compiles_in_one_graph(device, fold):
    """torch.compile(fullgraph=True) over the fold_w stem: the one-pass input's checks broke the
    graph (Dynamo cannot trace functorch's wrapped-tensor check; found on an H200, where every
    compiled fused ResNet stem took this path and the compiled training step slowed 3x).
    Compiled, the input is the ATen ops, and the result is still the direct convolution."""
    x = torch.randn(2, 1, 12, 14, 16, device=device, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(3, 1, 7, 7, 7, device=device, dtype=torch.float64)
    torch._dynamo.reset()
    fn = torch.compile(lambda v: stem_conv3d(v, w, padding=3, **FOLDS[fold]), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x), F.conv3d(x, w, stride=2, padding=3), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("fold", ["s2d_fold_w", "s2d_fold_hw"])
def test_fold_input_keeps_every_derivative_and_dtype(fold, monkeypatch):
    """The one-pass input has no derivative: forward AD and torch.func's transforms take the
    ATen ops (im2col3d dropped the tangent: a zero jvp), as do dtypes im2col3d does not move
    (float8) and shapes with an empty grid (the ATen ops' own result)."""
    if stem.compiled("im2col3d") is None:
        pytest.skip("needs the compiled extension")
    x = torch.randn(1, 1, 10, 10, 10, dtype=torch.float64)
    w = torch.randn(2, 1, 7, 7, 7, dtype=torch.float64)
    t = torch.randn_like(x)
    kw = FOLDS[fold]
    _, ours = torch.func.jvp(lambda v: stem_conv3d(v, w, **kw), (x,), (t,))
    torch.testing.assert_close(ours, F.conv3d(t, w, stride=2, padding=3), rtol=1e-10,
                               atol=1e-10)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = stem_conv3d(fwAD.make_dual(x, t), w, **kw)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, ours, rtol=1e-12, atol=1e-12)
    taken = []
    real = stem._fold_by_im2col
    monkeypatch.setattr(stem, "_fold_by_im2col", lambda *a: taken.append(real(*a)) or taken[-1])
    if hasattr(torch, "float8_e4m3fn"):
        x8 = torch.randn(1, 1, 8, 8, 8).to(torch.float8_e4m3fn)
        got = stem.stem_rewrite_input(x8, (7, 7, 7), 3, channels_last=True, **kw)
        assert taken == [None]
        ref = stem.stem_rewrite_input(x8.float(), (7, 7, 7), 3, channels_last=True, **kw)
        assert torch.equal(got.float(), ref)
    taken.clear()
    empty = stem.stem_rewrite_input(torch.randn(1, 4, 1, 12, 12), (4, 7, 3), 0,
                                    channels_last=True, **kw)
    assert taken == [None] and empty.numel() == 0


def test_stem_conv3d_refuses_bad_padding_and_small_inputs():
    """A negative padding cropped the input silently (F.conv3d refuses it), two values were a
    bare IndexError, and a too-small input's error named the rewritten 4^3 kernel."""
    x, w = torch.randn(2, 1, 9, 8, 8), torch.randn(4, 1, 7, 7, 7)
    for bad in (-1, (1, 2), (1, 1, -1), 1.5):
        with pytest.raises(ValueError, match=r"stem_conv3d: padding must be an int >= 0"):
            stem_conv3d(x, w, padding=bad)
    with pytest.raises(ValueError, match=r"\(3, 8, 8\) padded by \(0, 0, 0\) is smaller than "
                                         r"the kernel \(7, 7, 7\)"):
        stem_conv3d(torch.randn(1, 1, 3, 8, 8), w, padding=0)
    torch.testing.assert_close(stem_conv3d(x, w, padding=(1, 2, 3)),
                               F.conv3d(x, w, stride=2, padding=(1, 2, 3)), rtol=1e-4, atol=1e-4)
