"""conv_bn_relu_maxpool3d (the stem: conv3d + BatchNorm + ReLU + max-pool in one op) against
med3d_ext.reference (F.conv3d, F.batch_norm, F.relu, F.max_pool3d): forward, every gradient,
running stats, layouts, odd sizes, pool geometries, ties and NaN, low precision, gradcheck,
opcheck, compile, errors."""

from __future__ import annotations

import pytest
import torch

import med3d_ext as m3d
from med3d_ext import _extension, reference
from python_tests.conftest import DEVICES, assert_low_precision_close, tol
from python_tests.ops.test_conv_bn_relu import _assert_low_precision_grads, _assert_matches

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")

# (Cin, Cout, k, stride, padding, spatial, pool kernel, pool stride, pool padding)
CONFIGS = [
    (1, 6, 7, 2, 3, (9, 12, 11), 3, 2, 1),               # MedicalNet's stem, odd sizes
    (3, 5, 3, 1, 1, (6, 7, 5), 3, 2, 1),
    (2, 4, 3, 1, 1, (7, 6, 8), 2, 2, 0),
    (1, 8, 3, 2, 1, (10, 9, 12), 3, 1, 1),               # overlapping stride-1 windows
    (2, 3, 3, 1, 1, (8, 5, 7), (3, 1, 2), (2, 1, 2), (1, 0, 1)),  # anisotropic pool
    (2, 4, 3, 1, 1, (5, 6, 4), 2, 1, 1),                 # pooled output larger than y
]


def _inputs(device, dtype, cfg, n=2, cl=False):
    cin, cout, k, s, p, sp, *_ = cfg
    x = torch.randn(n, cin, *sp, device=device, dtype=dtype)
    w = torch.randn(cout, cin, k, k, k, device=device, dtype=dtype) / (cin * k**3) ** 0.5
    if cl:
        x = x.to(memory_format=torch.channels_last_3d)
        w = w.to(memory_format=torch.channels_last_3d)
    bw = torch.rand(cout, device=device, dtype=dtype) + 0.5
    bb = torch.randn(cout, device=device, dtype=dtype)
    rm = torch.randn(cout, device=device, dtype=dtype) * 0.1
    rv = torch.rand(cout, device=device, dtype=dtype) + 0.5
    return x, w, bw, bb, rm, rv


def _kw(cfg):
    return dict(stride=cfg[3], padding=cfg[4], pool_kernel=cfg[6], pool_stride=cfg[7],
                pool_padding=cfg[8])


def _run(fn, x, w, bw, bb, rm, rv, kw, training, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bw, bb)]
    rm, rv = rm.clone(), rv.clone()
    out = fn(*leaves, rm, rv, training=training, **kw)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    return out, torch.autograd.grad(out, leaves, grad_out), rm, rv, grad_out


def _check(device, cfg, training, cl, dtype=torch.float32, n=2):
    args = _inputs(device, dtype, cfg, n=n, cl=cl)
    kw = _kw(cfg)
    out, grads, rm, rv, go = _run(m3d.ops.conv_bn_relu_maxpool3d, *args, kw, training)
    ref, rgrads, rrm, rrv, _ = _run(reference.conv_bn_relu_maxpool3d, *args, kw, training, go)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if cl and cfg[0] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    _assert_matches(out, grads, rm, rv, ref, rgrads, rrm, rrv, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["ncdhw", "cl3d"])
def test_matches_reference(device, cfg, training, cl, pool_tiles):
    _check(device, cfg, training, cl)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_batch_one_and_wide_channels(device):
    _check(device, CONFIGS[1], True, True, dtype=torch.float64, n=1)
    # 64 and 33 channels: the CUDA channels_last path with and without 16-byte channel vectors
    for cout in (64, 33):
        _check(device, (4, cout, 3, 2, 1, (8, 10, 9), 3, 2, 1), True, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(device, training):
    x, w, bw, bb, rm, rv = _inputs(device, torch.float64, (2, 3, 3, 1, 1, (5, 4, 6), 3, 2, 1))
    kw = dict(padding=1, pool_kernel=3, pool_stride=2, pool_padding=1)

    def f(x, w, bw, bb):
        return m3d.ops.conv_bn_relu_maxpool3d(x, w, bw, bb, rm.clone(), rv.clone(),
                                              training=training, **kw)

    torch.autograd.gradcheck(f, [t.requires_grad_() for t in (x, w, bw, bb)])


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_the_first_window_position(device):
    # A constant input and an all-ones kernel without padding give a constant conv output:
    # every window is a tie of equal maxima, which max_pool3d gives to its first position.
    x = torch.ones(2, 1, 7, 6, 9, device=device, dtype=torch.float64)
    w = torch.ones(3, 1, 2, 2, 2, device=device, dtype=torch.float64)
    bw = torch.tensor([1.0, 2.0, 0.5], device=device, dtype=torch.float64)
    bb = torch.tensor([0.5, 1.0, 2.0], device=device, dtype=torch.float64)
    rm, rv = torch.zeros(3, device=device, dtype=torch.float64), torch.ones(3, device=device, dtype=torch.float64)
    kw = dict(pool_kernel=3, pool_stride=2, pool_padding=1)
    for training in (True, False):
        ref, rgrads, _, _, go = _run(reference.conv_bn_relu_maxpool3d, x, w, bw, bb, rm, rv, kw,
                                     training)
        out, grads, *_ = _run(m3d.ops.conv_bn_relu_maxpool3d, x, w, bw, bb, rm, rv, kw, training,
                              go)
        torch.testing.assert_close(out, ref)
        for a, b in zip(grads, rgrads):
            torch.testing.assert_close(a, b)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates(device):
    x, w, bw, bb, rm, rv = _inputs(device, torch.float32, CONFIGS[1])
    x[0, 0, 2, 3, 1] = float("nan")
    out = m3d.ops.conv_bn_relu_maxpool3d(x, w, bw, bb, rm, rv, training=False, padding=1)
    ref = reference.conv_bn_relu_maxpool3d(x, w, bw, bb, rm, rv, training=False, padding=1)
    assert out.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), **tol(torch.float32))


def _flip_free_grad_out(args, kw, tau=0.1):
    """A random pooled grad_out that is 0 wherever a low-precision path could route it
    differently from the fp32 reference: windows whose two largest fp32 pre-activations are
    within ``tau`` (the argmax may flip after rounding) or whose maximum is within ``tau`` of 0
    (the ReLU may flip). A flip moves a whole voxel's gradient, so comparing such voxels would
    measure tie-breaking, not accuracy; every other window still tests the backward."""
    x, w, bw, bb, rm, rv = args
    with torch.no_grad():
        z = reference.conv_bn_relu3d(x.float(), w.float(), bw, bb, rm.clone(), rv.clone(),
                                     stride=kw["stride"], padding=kw["padding"], relu=False)
        k, s, p = kw["pool_kernel"], kw["pool_stride"], kw["pool_padding"]
        zp = torch.nn.functional.pad(z, [p] * 6, value=float("-inf"))
        win = zp.unfold(2, k, s).unfold(3, k, s).unfold(4, k, s).flatten(-3)
        top2 = win.topk(2, dim=-1).values
        safe = ((top2[..., 0] - top2[..., 1]) > tau) & (top2[..., 0].abs() > tau)
    return torch.randn(safe.shape, device=x.device) * safe


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cl", [False, True], ids=["ncdhw", "cl3d"])
def test_autocast_low_precision(device, cl, pool_tiles):
    dtype = torch.bfloat16
    cfg = (1, 16, 7, 2, 3, (12, 14, 13), 3, 2, 1)
    args = _inputs(device, torch.float32, cfg, cl=cl)
    kw = _kw(cfg)
    go = _flip_free_grad_out(args, kw)
    with torch.autocast(device, dtype=dtype):
        out, grads, *_ = _run(m3d.ops.conv_bn_relu_maxpool3d, *args, kw, True, go.to(dtype))
        low, lgrads, *_ = _run(reference.conv_bn_relu_maxpool3d, *args, kw, True, go.to(dtype))
    assert out.dtype == dtype
    ref, rgrads, *_ = _run(reference.conv_bn_relu_maxpool3d, *args, kw, True, go)
    assert_low_precision_close(out.float(), low.float(), ref, factor=2.0, floor=1e-2)
    _assert_low_precision_grads(grads, lgrads, rgrads)


@pytest.mark.cuda
@pytest.mark.parametrize("algo", ["auto", "implicit_gemm", "im2col", "space_to_depth_fold_w",
                                  "space_to_depth_fold_hw"])
def test_stem_at_scale_bf16(algo, monkeypatch, pool_tiles):
    # MedicalNet's stem at a quarter of the benchmark's input (2 x 1 x 32 x 64 x 64, bf16
    # autocast, a channels_last_3d model as the fused ResNets are, so a channels_last_3d conv
    # output under every stem algorithm): the CUDA kernels' 16-byte channel vectors and
    # thousands of reduction splits, which small shapes never reach. (With a contiguous weight
    # the output is contiguous, as ATen's would be, except through the space-to-depth rewrite.)
    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", algo)
    device = "cuda"
    cfg = (1, 64, 7, 2, 3, (32, 64, 64), 3, 2, 1)
    args = _inputs(device, torch.float32, cfg, cl=True)
    kw = _kw(cfg)
    go = _flip_free_grad_out(args, kw)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, grads, *_ = _run(m3d.ops.conv_bn_relu_maxpool3d, *args, kw, True, go.bfloat16())
        low, lgrads, *_ = _run(reference.conv_bn_relu_maxpool3d, *args, kw, True, go.bfloat16())
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    ref, rgrads, *_ = _run(reference.conv_bn_relu_maxpool3d, *args, kw, True, go)
    assert_low_precision_close(out.float(), low.float(), ref, factor=2.0, floor=1e-2)
    _assert_low_precision_grads(grads, lgrads, rgrads)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    ((2, 64, 13, 18, 37), 3, 2, 1),        # the stem's pool, partial tiles on every axis
    ((1, 16, 9, 10, 20), 3, 1, 1),         # overlapping stride-1 windows (up to 27 per voxel)
    ((2, 8, 7, 9, 33), (2, 3, 5), (2, 1, 3), (0, 1, 2)),  # anisotropic, uncovered edge voxels
    ((1, 32, 4, 5, 6), 2, 1, 1),           # pooled output larger than y
    ((2, 24, 9, 11, 19), 3, 2, 1),         # 24 channels: no BatchNorm sums in the gather kernel
], ids=["stem", "stride1", "aniso", "larger-out", "c24"])
def test_cuda_tiled_gather_equals_the_default(dtype, case, monkeypatch):
    # MED3D_EXT_POOL_KERNEL=tiles (pool_tiles.cuh) against PoolGatherOp + the reduction
    # pass on the same inputs. The gather sums the same windows in the same order (the same g);
    # where C / V divides 32 the kernel also adds BatchNorm's backward sums, in another order
    # than the reduction pass (the results then agree to rounding), else the reduction pass
    # runs as before and every output is the same bit for bit
    shape, k, s, p = case
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    y = torch.randn(shape, device="cuda", generator=g).to(dtype)
    y = y.contiguous(memory_format=torch.channels_last_3d)
    c = shape[1]
    mean, invstd = torch.randn(c, device="cuda") * 0.1, torch.rand(c, device="cuda") + 0.5
    bw, bb = torch.randn(c, device="cuda"), torch.randn(c, device="cuda") * 0.1
    with torch.no_grad():
        z = (y.float() - mean.view(-1, 1, 1, 1)) * (bw * invstd).view(-1, 1, 1, 1) + bb.view(-1, 1, 1, 1)
        pooled, idx = torch.nn.functional.max_pool3d(z.relu(), k, s, p, return_indices=True)
    # the op's argmax: the window offset of each pooled voxel's maximum (a valid one is enough
    # here: both kernels read the same argmax)
    ks, ss, ps = ((v,) * 3 if isinstance(v, int) else v for v in (k, s, p))
    od, oh, ow = torch.meshgrid(*(torch.arange(n, device="cuda") for n in pooled.shape[2:]),
                                indexing="ij")
    d, rem = idx // (shape[3] * shape[4]), idx % (shape[3] * shape[4])
    h, w = rem // shape[4], rem % shape[4]
    arg = ((d - (od * ss[0] - ps[0])) * ks[1] + (h - (oh * ss[1] - ps[1]))) * ks[2] + (w - (ow * ss[2] - ps[2]))
    arg = arg.to(torch.uint8).contiguous(memory_format=torch.channels_last_3d)
    go = torch.randn(pooled.shape, device="cuda", generator=g).to(dtype)
    go = go.contiguous(memory_format=torch.channels_last_3d)
    op = torch.ops.med3d_ext.bn_relu_maxpool_backward
    args = (go, y, arg, mean, invstd, bw, bb, True, list(ks), list(ss), list(ps))
    monkeypatch.delenv("MED3D_EXT_POOL_KERNEL", raising=False)
    ref = op(*args)
    monkeypatch.setenv("MED3D_EXT_POOL_KERNEL", "tiles")
    ours = op(*args)
    assert ref[0].abs().sum() > 0  # the gradients reached y
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    if 32 % (c // vec):  # no sums in the kernel: the same passes after it
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
        return
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-4, atol=1e-4 * ref[1].abs().max().item())
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-4, atol=1e-4 * ref[2].abs().max().item())
    # grad_y: the apply pass's coefficients differ by the sums' rounding
    scale = ref[0].float().abs().max().item()
    torch.testing.assert_close(ours[0].float(), ref[0].float(), rtol=tol(dtype)["rtol"],
                               atol=tol(dtype)["atol"] * scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    (64, (13, 18, 37), 3, 2, 1),           # the stem's pool, partial tiles on every axis
    (16, (9, 10, 20), 3, 1, 1),            # overlapping stride-1 windows
    (8, (7, 9, 33), (2, 3, 5), (2, 1, 3), (0, 1, 2)),  # anisotropic
    (32, (4, 5, 6), 2, 1, 1),              # pooled output larger than the conv output
], ids=["stem", "stride1", "aniso", "larger-out"])
def test_cuda_tiled_forward_equals_the_default(dtype, case, monkeypatch):
    # MED3D_EXT_POOL_KERNEL=tiles: the pool forward runs pool_window_max on a shared-memory copy
    # of its region (pool_tiles.cuh): the same pooled output and argmax bit for bit as
    # PoolForwardOp, in training (batch statistics) and eval
    cout, sp, k, s, p = case
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(2, 1, *(2 * v for v in sp), device="cuda", generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(cout, 1, 3, 3, 3, device="cuda", generator=g) * 0.3).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last_3d)
    bw, bb = torch.randn(cout, device="cuda") + 1, torch.randn(cout, device="cuda") * 0.1
    rm, rv = torch.randn(cout, device="cuda") * 0.1, torch.rand(cout, device="cuda") + 0.5
    op = torch.ops.med3d_ext.conv_bn_relu_maxpool3d
    ks, ss, ps = ((v,) * 3 if isinstance(v, int) else v for v in (k, s, p))
    for training in (True, False):
        args = (x, w, bw, bb, rm.clone(), rv.clone(), [2, 2, 2], [1, 1, 1], [1, 1, 1], training,
                1e-5, list(ks), list(ss), list(ps))
        monkeypatch.delenv("MED3D_EXT_POOL_KERNEL", raising=False)
        ref = op(*args)
        monkeypatch.setenv("MED3D_EXT_POOL_KERNEL", "tiles")
        ours = op(*args)
        assert ref[0].is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[5], ref[5]), training
        assert ref[0].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_eval(device):
    x, w, bw, bb, rm, rv = _inputs(device, torch.float32, CONFIGS[0], n=0)
    kw = _kw(CONFIGS[0])
    out = m3d.ops.conv_bn_relu_maxpool3d(x, w, bw, bb, rm, rv, training=False, **kw)
    ref = reference.conv_bn_relu_maxpool3d(x, w, bw, bb, rm, rv, training=False, **kw)
    assert out.shape == ref.shape and out.shape[0] == 0
    # training on an empty batch: an empty output, running stats untouched (F.batch_norm),
    # zero gradients
    rm0, rv0 = rm.clone(), rv.clone()
    leaves = [t.clone().requires_grad_() for t in (x, w, bw, bb)]
    out = m3d.ops.conv_bn_relu_maxpool3d(*leaves, rm, rv, training=True, **kw)
    assert out.shape == ref.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    for g, t in zip(torch.autograd.grad(out.sum(), leaves, allow_unused=True), leaves):
        assert g is None or (g.shape == t.shape and not g.abs().sum())


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    x, w, bw, bb, rm, rv = _inputs(device, torch.float32, CONFIGS[1])
    f = m3d.ops.conv_bn_relu_maxpool3d
    with pytest.raises(RuntimeError, match=r"at most 255 voxels.*\[7, 7, 7\]"):
        f(x, w, bw, bb, rm, rv, padding=1, pool_kernel=7, pool_padding=3)
    with pytest.raises(RuntimeError, match=r"at most half the kernel"):
        f(x, w, bw, bb, rm, rv, padding=1, pool_kernel=3, pool_padding=2)
    with pytest.raises(RuntimeError, match=r"too small for the pool kernel"):
        f(x[:, :, :2, :2, :2], w, bw, bb, rm, rv, padding=1, pool_kernel=5, pool_padding=0)
    # floor division as max_pool3d ((2 - 3) // 2 + 1 = 0 outputs; truncation used to give 1)
    with pytest.raises(RuntimeError, match=r"too small for the pool kernel"):
        f(x[:, :, :2, :2, :2], w, bw, bb, rm, rv, padding=1, pool_kernel=3, pool_stride=2,
          pool_padding=0)
    with pytest.raises(RuntimeError, match=r"'weight'.*Cin = x.size\(1\) = 3"):
        f(x, w[:, :2], bw, bb, rm, rv, padding=1)
    with pytest.raises(RuntimeError, match=r"'bn_bias' must be 1-D of size Cout = 5"):
        f(x, w, bw, bb[:2], rm, rv, padding=1)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        f(x, w, bw, bb, None, None, training=False, padding=1)
    y = torch.randn(2, 5, 6, 7, 5, device=device)
    c = torch.rand(5, device=device) + 0.5
    g = torch.randn(2, 5, 3, 4, 3, device=device)
    arg = torch.zeros(2, 5, 3, 4, 3, dtype=torch.uint8, device=device)
    bwd = torch.ops.med3d_ext.bn_relu_maxpool_backward
    with pytest.raises(RuntimeError, match=r"'grad_out' must be of the pooled shape \[2, 5, 3, 4, 3\]"):
        bwd(g[:, :, :2], y, arg, c, c, c, c, True, [3, 3, 3], [2, 2, 2], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"'argmax' must be uint8"):
        bwd(g, y, arg.long(), c, c, c, c, True, [3, 3, 3], [2, 2, 2], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"too small for the pool kernel"):
        bwd(g, y[:, :, :2], arg, c, c, c, c, True, [3, 3, 3], [2, 2, 2], [0, 0, 0])


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for cl, training in ((False, True), (True, False), (True, True)):
        x, w, bw, bb, rm, rv = _inputs(device, torch.float32, CONFIGS[1], cl=cl)
        for t in (x, w, bw, bb):
            t.requires_grad_()
        torch.library.opcheck(torch.ops.med3d_ext.conv_bn_relu_maxpool3d.default,
                              (x, w, bw, bb, rm, rv, [1, 1, 1], [1, 1, 1], [1, 1, 1], training,
                               1e-5, [3, 3, 3], [2, 2, 2], [1, 1, 1]))
        y = torch.randn(2, 5, 6, 7, 5, device=device)
        if cl:
            y = y.to(memory_format=torch.channels_last_3d)
        c = torch.rand(5, device=device) + 0.5
        pk, ps, pp = [3, 3, 3], [2, 2, 2], [1, 1, 1]
        _, arg = torch.nn.functional.max_pool3d(y, 3, 2, 1, return_indices=True)
        arg = torch.randint(0, 27, arg.shape, device=device, dtype=torch.uint8)
        torch.library.opcheck(torch.ops.med3d_ext.bn_relu_maxpool_backward.default,
                              (torch.randn(2, 5, 3, 4, 3, device=device), y, arg, c, c, c, c,
                               training, pk, ps, pp))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_compile_parity(device):
    x, w, bw, bb, rm, rv = _inputs(device, torch.float32, CONFIGS[0])

    def step(x, w, bw, bb, rm, rv):
        out = m3d.ops.conv_bn_relu_maxpool3d(x, w, bw, bb, rm, rv, stride=2, padding=3)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for n, sp in ((2, (9, 12, 11)), (3, (11, 8, 10))):
        xi = torch.randn(n, 1, *sp, device=device)
        results = []
        for fn in (step, compiled):
            leaves = [t.detach().clone().requires_grad_() for t in (xi, w, bw, bb)]
            rm_i, rv_i = rm.clone(), rv.clone()
            loss = fn(*leaves, rm_i, rv_i)
            loss.backward()
            results.append([loss] + [t.grad for t in leaves] + [rm_i, rv_i])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_grad_out_gives_the_same_gradients(device, dtype):
    """channels_last_3d kernels move a 16-byte run of channels per load where every tensor
    they touch is 16-byte aligned (dispatch_shape); a gradient that starts one element into its
    storage must take the one-channel path and give the same gradients."""
    cfg = (2, 16, 3, 2, 1, (9, 10, 8), 3, 2, 1)
    args = _inputs(device, dtype, cfg, n=2, cl=True)
    kw = _kw(cfg)
    out, grads, *_ , go = _run(m3d.ops.conv_bn_relu_maxpool3d, *args, kw, True)
    # the same values in a channels_last_3d tensor whose data starts one element in
    n, c, d, h, w = go.shape
    flat = torch.zeros(go.numel() + 1, device=device, dtype=go.dtype)
    shifted = flat[1:].view(n, d, h, w, c).permute(0, 4, 1, 2, 3)
    shifted.copy_(go)
    assert shifted.is_contiguous(memory_format=torch.channels_last_3d)
    assert shifted.data_ptr() % 16 != 0
    _, grads2, *_ = _run(m3d.ops.conv_bn_relu_maxpool3d, *args, kw, True, shifted)
    # the two paths sum the BatchNorm reductions in different orders: equal to rounding
    t = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a.float(), b.float(), rtol=t, atol=t)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_argmax_gives_the_same_gradients(device):
    """The backward op called directly with an argmax that starts one byte into its storage
    (the forward's own is always aligned): the one-channel path, the same gradients."""
    cfg = (2, 16, 3, 2, 1, (9, 10, 8), 3, 2, 1)
    x, w, bw, bb, rm, rv = _inputs(device, torch.float32, cfg, n=2, cl=True)
    pk, ps, pp = [3] * 3, [2] * 3, [1] * 3
    out, y, mean, invstd, _var, arg = torch.ops.med3d_ext.conv_bn_relu_maxpool3d(
        x, w, bw, bb, rm, rv, [2] * 3, [1] * 3, [1] * 3, True, 1e-5, pk, ps, pp)
    go = torch.randn_like(out)
    n, c, d, h, wd = arg.shape
    flat = torch.zeros(arg.numel() + 1, device=device, dtype=torch.uint8)
    shifted = flat[1:].view(n, d, h, wd, c).permute(0, 4, 1, 2, 3)
    shifted.copy_(arg)
    assert shifted.stride() == arg.stride() and shifted.data_ptr() % 16 != 0
    bwd = torch.ops.med3d_ext.bn_relu_maxpool_backward
    a = bwd(go, y, arg, mean, invstd, bw, bb, True, pk, ps, pp)
    b = bwd(go, y, shifted, mean, invstd, bw, bb, True, pk, ps, pp)
    for u, v in zip(a, b):  # the paths sum BatchNorm's reductions in different orders
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
