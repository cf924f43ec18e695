"""im2col3d (the stem convolution's input windows as a matrix) against med3d_ext.reference, and the
fused ops with conv_algo=1 (im2col + GEMM) against the plain PyTorch composition."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import med3d_ext as m3d
from med3d_ext import _extension, reference
from python_tests.conftest import DEVICES, tol

pytestmark = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")

# (N, Cin, spatial, kernel, stride, padding, dilation)
GEOMETRIES = [
    (2, 1, (9, 12, 11), (7, 7, 7), (2, 2, 2), (3, 3, 3), (1, 1, 1)),   # the stem, odd sizes
    (1, 3, (6, 7, 8), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    (3, 2, (8, 5, 9), (5, 3, 4), (2, 1, 3), (2, 1, 0), (1, 2, 1)),
    (2, 4, (7, 8, 7), (7, 7, 7), (2, 2, 2), (0, 0, 0), (1, 1, 1)),     # no padding
    (1, 5, (4, 4, 4), (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1)),     # 1x1x1: columns = x
    (2, 2, (3, 9, 4), (3, 5, 2), (1, 3, 1), (4, 0, 2), (2, 1, 3)),     # padding > kernel/2
    # W kernels of whole 16-byte runs (the lines kernel's vector stores, im2col.h): the fold_hw
    # stem input's window; W dilation 2; 16 W taps at W stride 3; 4 W taps (runs in 4- and
    # 8-byte dtypes only)
    (2, 1, (16, 18, 20), (2, 8, 8), (2, 2, 2), (3, 3, 3), (1, 1, 1)),
    (1, 2, (6, 9, 30), (2, 2, 8), (2, 2, 2), (1, 1, 3), (1, 1, 2)),
    (1, 1, (5, 5, 40), (1, 1, 16), (1, 1, 3), (0, 0, 5), (1, 1, 1)),
    (2, 3, (5, 6, 7), (1, 2, 4), (1, 1, 1), (0, 1, 2), (1, 1, 1)),
]


def _cols(x, g, align=8):
    _, _, _, k, s, p, d = g
    return torch.ops.med3d_ext.im2col3d(x, list(k), list(s), list(p), list(d), align)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_reference(device, g, dtype, im2col_kernel):
    n, c, sp, k, s, p, d = g
    x = torch.randn(n, c, *sp, device=device).to(dtype)
    cols = _cols(x, g)
    ref = reference.im2col3d(x, k, s, p, d)
    assert cols.shape == ref.shape and cols.dtype == dtype and cols.is_contiguous()
    assert cols.shape[1] % 8 == 0
    assert torch.equal(cols, ref)  # a pure gather: bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last_3d", "sliced", "expanded"])
@pytest.mark.parametrize("gi", [2, 7], ids=["g2", "runs"])
def test_any_strides(device, layout, gi, im2col_kernel):
    g = GEOMETRIES[gi]
    n, c, sp, k, s, p, d = g
    if layout == "channels_last_3d":
        x = torch.randn(n, c, *sp, device=device).to(memory_format=torch.channels_last_3d)
    elif layout == "sliced":  # every stride odd, the storage offset non-zero
        big = torch.randn(n + 1, 2 * c + 1, *(2 * v + 1 for v in sp), device=device)
        x = big[1:, 1::2, 1::2, 1::2, 1::2]
    else:  # a zero stride (one channel broadcast)
        x = torch.randn(n, 1, *sp, device=device).expand(n, c, *sp)
    assert not x.is_contiguous()
    torch.testing.assert_close(_cols(x, g), reference.im2col3d(x, k, s, p, d), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("align", [1, 3, 8, 64])
def test_align(device, align, im2col_kernel):
    g = GEOMETRIES[1]
    x = torch.randn(1, 3, 6, 7, 8, device=device)
    cols = _cols(x, g, align)
    assert cols.shape[1] == -(-81 // align) * align
    assert torch.equal(cols[:, :81], reference.im2col3d(x, *g[3:], align=1))
    assert not cols[:, 81:].any()
    # a W kernel of whole runs: padding columns that break the runs (align 3) or add whole ones
    g = GEOMETRIES[6]
    x = torch.randn(2, 1, 16, 18, 20, device=device).bfloat16()
    cols = _cols(x, g, align)
    assert cols.shape[1] == -(-128 // align) * align
    assert torch.equal(cols[:, :128], reference.im2col3d(x, *g[3:], align=1))
    assert not cols[:, 128:].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gi", [2, 6], ids=["g2", "runs"])
def test_row_ranges(device, gi, im2col_kernel):
    # rows [start, start + rows) of the matrix, as the chunked convolution asks for them: a
    # range may start and end inside a line (the lines walk's unit, im2col.h)
    g = GEOMETRIES[gi]
    n, c, sp = g[:3]
    x = torch.randn(n, c, *sp, device=device)
    full = _cols(x, g)
    assert torch.equal(full, reference.im2col3d(x, *g[3:]))
    op = torch.ops.med3d_ext.im2col3d
    m = full.shape[0]
    for start, rows in ((0, 1), (5, 64), (m - 67, 67), (17, -1), (m, 0), (0, m), (3, 7)):
        part = op(x, *(list(v) for v in g[3:]), 8, start, rows)
        assert torch.equal(part, full[start:start + rows] if rows >= 0 else full[start:])
    for start, rows in ((-1, 2), (m - 1, 2), (m + 1, -1)):
        with pytest.raises(RuntimeError, match=rf"rows \[{start}, .* outside the matrix's {m} rows"):
            op(x, *(list(v) for v in g[3:]), 8, start, rows)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_as_gemm(device):
    # the identity the stem relies on: conv3d(x, w) == cols @ w.reshape(Cout, -1).T
    g = GEOMETRIES[2]
    n, c, sp, k, s, p, d = g
    x = torch.randn(n, c, *sp, device=device, dtype=torch.float64)
    w = torch.randn(5, c, *k, device=device, dtype=torch.float64)
    cols = _cols(x, g)
    wm = F.pad(w.reshape(5, -1), (0, cols.shape[1] - w[0].numel()))
    ref = F.conv3d(x, w, None, s, p, d)
    y = (cols @ wm.T).view(n, *ref.shape[2:], 5).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device, im2col_kernel):
    g = GEOMETRIES[0]
    x = torch.randn(0, 1, 9, 12, 11, device=device)
    assert _cols(x, g).shape == (0, 344)
    x = torch.randn(2, 0, 9, 12, 11, device=device)  # no channels: no columns
    assert _cols(x, g).shape == (2 * 5 * 6 * 6, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    op = torch.ops.med3d_ext.im2col3d
    x = torch.randn(1, 1, 5, 6, 7, device=device)
    with pytest.raises(RuntimeError, match=r"argument 'x' must be 5-D.*shape \[1, 5, 6, 7\]"):
        op(x[0], [3, 3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"'x' is too small: spatial size \[5, 6, 7\]"):
        op(x, [7, 7, 7], [1, 1, 1], [0, 0, 0], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"padding non-negative, got .*padding=\[0, -1, 0\]"):
        op(x, [3, 3, 3], [1, 1, 1], [0, -1, 0], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"stride and dilation must be positive.*stride=\[1, 0"):
        op(x, [3, 3, 3], [1, 0, 1], [0, 0, 0], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"'align' must be in \[1, 4096\], got 0"):
        op(x, [3, 3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1], 0)
    with pytest.raises(RuntimeError, match=r"'rows' must be >= 0, or -1 .* got -2"):
        op(x, [3, 3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1], 8, 0, -2)
    # huge kernels / paddings pass every per-axis check, and the products wrapped: K = 2^64
    # became 0 (an empty matrix instead of an error)
    one = torch.zeros(1, 1, 1, 1, 1, device=device)
    with pytest.raises(RuntimeError, match=r"Cin \* kD \* kH \* kW overflows int64"):
        op(one, [2**22, 2**21, 2**21], [1, 1, 1], [2**21, 2**20, 2**20], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"number of output voxels overflows int64"):
        op(one, [1, 1, 1], [1, 1, 1], [2**26] * 3, [1, 1, 1])
    # an element mover for 2/4/8-byte floats: a 1-byte or complex tensor is refused, not
    # read with the wrong element size
    for dtype in (torch.uint8, torch.bool, torch.int8, torch.complex128, torch.int64):
        with pytest.raises(RuntimeError, match=r"argument 'x' must be floating point"):
            op(x.to(dtype), [3, 3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 2, 5, 6, 7, device=device)
    torch.library.opcheck(torch.ops.med3d_ext.im2col3d.default,
                          (x, [3, 3, 3], [2, 1, 2], [1, 1, 0], [1, 2, 1], 8))
    torch.library.opcheck(torch.ops.med3d_ext.im2col3d.default,
                          (x, [3, 3, 3], [2, 1, 2], [1, 1, 0], [1, 2, 1], 8, 7, 20))


# --------------------------------------------------------------------------- the fused ops


def _stem_inputs(device, dtype=torch.float64, cin=1, n=2, sp=(9, 12, 11)):
    x = torch.randn(n, cin, *sp, device=device, dtype=dtype)
    w = torch.randn(6, cin, 7, 7, 7, device=device, dtype=dtype) / (cin * 343) ** 0.5
    bw = torch.rand(6, device=device, dtype=dtype) + 0.5
    bb = torch.randn(6, device=device, dtype=dtype)
    return x, w, bw, bb


def _grads(out, leaves, go):
    return torch.autograd.grad(out, leaves, go)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bias_relu_im2col(device, monkeypatch):
    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", "im2col")
    x, w, _, b = _stem_inputs(device, cin=2)
    r = torch.randn(2, 6, 5, 6, 6, device=device, dtype=x.dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    kw = dict(stride=2, padding=3)
    out = m3d.ops.conv_bias_relu3d(*leaves[:3], residual=leaves[3], **kw)
    ref = reference.conv_bias_relu3d(*leaves[:3], residual=leaves[3], **kw)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    for a, e in zip(_grads(out, leaves, go), _grads(ref, leaves, go)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stem_pool_im2col(device, training, monkeypatch):
    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", "im2col")
    x, w, bw, bb = _stem_inputs(device)
    leaves = [t.clone().requires_grad_() for t in (w, bw, bb)]  # x is data, as in the model
    stats = [torch.randn(6, device=device, dtype=x.dtype) * 0.1,
             torch.rand(6, device=device, dtype=x.dtype) + 0.5]
    kw = dict(stride=2, padding=3, training=training)
    rs = [[s.clone() for s in stats] for _ in range(2)]
    out = m3d.ops.conv_bn_relu_maxpool3d(x, *leaves, *rs[0], **kw)
    ref = reference.conv_bn_relu_maxpool3d(x, *leaves, *rs[1], **kw)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    for a, e in zip(_grads(out, leaves, go), _grads(ref, leaves, go)):
        torch.testing.assert_close(a, e)
    for a, e in zip(*rs):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_close_to_fp32(device, monkeypatch):
    # bf16 columns, fp32 accumulation in the GEMM: the conv output within bf16's rounding of the
    # fp32 reference, like ATen's bf16 convolution
    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", "im2col")
    x, w, bw, bb = _stem_inputs(device, torch.float32)
    out = m3d.ops.conv_bias_relu3d(x.bfloat16(), w.bfloat16(), None, stride=2, padding=3,
                                   relu=False)
    ref = F.conv3d(x.bfloat16().float(), w.bfloat16().float(), None, 2, 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, **tol(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["aten", "im2col"])
@pytest.mark.parametrize("cl", [False, True], ids=["ncdhw", "cl3d"])
def test_one_channel_output_layout(device, algo, cl, monkeypatch):
    # a one-channel image is in both layouts at once; as in F.conv3d, its channel stride says
    # which was asked for (x.to(channels_last_3d) in a channels_last model), and the stem's output
    # takes that layout instead of an extra copy into NCDHW
    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", algo)
    x, w, bw, bb = _stem_inputs(device, torch.float32)
    if cl:
        x = x.to(memory_format=torch.channels_last_3d)
        w = w.to(memory_format=torch.channels_last_3d)
    out = m3d.ops.conv_bn_relu3d(x, w, bw, bb, None, None, stride=2, padding=3)
    assert out.stride() == F.conv3d(x, w, None, 2, 3).stride()
    assert out.is_contiguous(memory_format=torch.channels_last_3d if cl else
                             torch.contiguous_format)
    for t in (w, bw, bb):
        t.requires_grad_()
    s, p, d = [2, 2, 2], [3, 3, 3], [1, 1, 1]
    torch.library.opcheck(torch.ops.med3d_ext.conv_bn_relu3d.default,  # fake strides agree
                          (x, w, bw, bb, None, None, None, s, p, d, True, 1e-5, True,
                           mod._CONV_ALGO[algo]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_conv_algo(device):
    x, w, bw, bb = _stem_inputs(device, torch.float32)
    for t in (w, bw, bb):
        t.requires_grad_()
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    s, p, d = [2, 2, 2], [3, 3, 3], [1, 1, 1]
    torch.library.opcheck(torch.ops.med3d_ext.conv_bn_relu3d.default,
                          (x, w, bw, bb, rm, rv, None, s, p, d, True, 1e-5, True, 1))
    torch.library.opcheck(torch.ops.med3d_ext.conv_bias_relu3d.default,
                          (x, w, bb, None, s, p, d, True, 1))
    torch.library.opcheck(torch.ops.med3d_ext.conv_bn_relu_maxpool3d.default,
                          (x, w, bw, bb, rm, rv, s, p, d, True, 1e-5, [3, 3, 3], [2, 2, 2],
                           [1, 1, 1], 1))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device, monkeypatch):
    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", "im2col")
    x, w, bw, bb = _stem_inputs(device, torch.float32)
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)

    def step(w, bw, bb, rm, rv):
        return m3d.ops.conv_bn_relu3d(x, w, bw, bb, rm, rv, stride=2, padding=3).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (w, bw, bb)]
        stats = [rm.clone(), rv.clone()]
        loss = fn(*leaves, *stats)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves] + stats)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


_CHUNKED = """
import torch, med3d_ext as m3d
from med3d_ext import reference
from med3d_ext.ops import conv_bn_relu as mod
mod.STEM_CONV = "im2col"
dev = "{device}"
torch.manual_seed(0)
x = torch.randn(3, 2, 9, 12, 11, device=dev, dtype=torch.float64)
w = (torch.randn(6, 2, 7, 7, 7, device=dev, dtype=torch.float64) / 26).requires_grad_()
b = torch.randn(6, device=dev, dtype=torch.float64).requires_grad_()
from torch.profiler import profile
with profile() as prof:
    out = m3d.ops.conv_bias_relu3d(x, w, b, stride=2, padding=3)
    ref = reference.conv_bias_relu3d(x, w, b, stride=2, padding=3)
    go = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [w, b], go)
torch.testing.assert_close(out, ref)
for a, e in zip(grads, torch.autograd.grad(ref, [w, b], go)):
    torch.testing.assert_close(a, e)
chunks = sum(e.count for e in prof.key_averages() if e.key == "med3d_ext::im2col3d")
print("ok", out.shape[0] * out.shape[2] * out.shape[3] * out.shape[4], chunks)
"""


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_setting(device, monkeypatch):
    # the chunk size set at run time: the same results, one im2col3d call per chunk
    from torch.profiler import profile

    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", "im2col")
    old = mod.im2col_chunk_bytes()
    assert old > 0
    x, w, _, b = _stem_inputs(device, cin=2)  # 360 rows of 688 fp64 columns (5504 bytes)
    leaves = [t.clone().requires_grad_() for t in (w, b)]
    ref = reference.conv_bias_relu3d(x, *leaves, stride=2, padding=3)
    go = torch.randn_like(ref)
    rgrads = torch.autograd.grad(ref, leaves, go)
    try:
        for chunk, calls in ((5504 * 7, 2 * 52), (1 << 30, 2)):  # 360 rows: 52 chunks of 7
            assert mod.im2col_chunk_bytes(chunk) == chunk
            with profile() as prof:
                out = m3d.ops.conv_bias_relu3d(x, *leaves, stride=2, padding=3)
                grads = torch.autograd.grad(out, leaves, go)
            torch.testing.assert_close(out, ref)
            for a, e in zip(grads, rgrads):
                torch.testing.assert_close(a, e)
            n = sum(e.count for e in prof.key_averages() if e.key == "med3d_ext::im2col3d")
            assert n == calls
    finally:
        mod.im2col_chunk_bytes(old)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int of bytes"):
            mod.im2col_chunk_bytes(bad)
    assert mod.im2col_chunk_bytes() == old


def test_stem_conv_environment_override():
    # MED3D_EXT_STEM_CONV sets STEM_CONV's initial value (e.g. one algorithm for a whole benchmark run)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MED3D_EXT_STEM_CONV="im2col")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    code = "from med3d_ext.ops import conv_bn_relu as m; print(m.STEM_CONV)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["im2col"], r.stderr[-2000:]
    # a bad value is said at import, naming the variable (it failed at the first stem
    # convolution, with a traceback naming the Python attribute)
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, MED3D_EXT_STEM_CONV="bogus"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["auto"], r.stderr[-2000:]
    assert "MED3D_EXT_STEM_CONV='bogus' is not one of" in r.stderr


def test_chunk_bytes_environment_is_parsed_strictly():
    """MED3D_EXT_IM2COL_CHUNK_BYTES went through atoll(): "32MB" (the README's unit) became 32
    bytes and "abc" the default, both silently (README audit). Units are binary; a bad value
    warns, naming the variable."""
    from med3d_ext.ops.conv_bn_relu import parse_bytes

    assert [parse_bytes(v) for v in ("33554432", "32MB", "32 MiB", "32m", "1GiB", "4k")] == \
        [2**25, 2**25, 2**25, 2**25, 2**30, 4096]
    assert [parse_bytes(v) for v in ("abc", "0", "-5", "1.5GB", "32 TB", "")] == [None] * 6
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    code = "from med3d_ext.ops import conv_bn_relu as m; print(m.im2col_chunk_bytes())"
    for value, want, warns in (("32MB", 2**25, False), ("abc", 2**30, True), ("0", 2**30, True)):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(env, MED3D_EXT_IM2COL_CHUNK_BYTES=value), timeout=120)
        assert r.returncode == 0 and r.stdout.split() == [str(want)], (value, r.stderr[-2000:])
        assert ("MED3D_EXT_IM2COL_CHUNK_BYTES=" in r.stderr) == warns, r.stderr[-2000:]


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward(device, monkeypatch):
    # conv_bias_relu3d supports create_graph; im2col3d has no derivative, so a double backward
    # takes ATen's differentiable weight gradient (the second derivative must match F.conv3d's)
    from med3d_ext.ops import conv_bn_relu as mod

    monkeypatch.setattr(mod, "STEM_CONV", "im2col")
    x = torch.randn(1, 1, 8, 8, 8, device=device, dtype=torch.float64)
    w = torch.randn(2, 1, 3, 3, 3, device=device, dtype=torch.float64)
    results = []
    for fn in (lambda a, b: m3d.ops.conv_bias_relu3d(a, b, None, stride=2, padding=1, relu=False),
               lambda a, b: F.conv3d(a, b, None, 2, 1)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(fn(xi, wi).square().sum(), [wi], create_graph=True)
        results.append(torch.autograd.grad(gw.square().sum(), [xi])[0])
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_convolution(device):
    # the initial chunk size from MED3D_EXT_IM2COL_CHUNK_BYTES (read once per process, hence
    # the subprocess): a convolution whose columns exceed it runs chunk by chunk, forward rows
    # written in place, weight-gradient chunks summed in fp32/fp64. 30000-byte chunks = 5 rows
    # of 688 fp64 columns: 540 rows in 108 chunks
    env = dict(os.environ, MED3D_EXT_IM2COL_CHUNK_BYTES="30000", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHUNKED.format(device=device))],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "540", "216"]  # 108 chunks forward, 108 backward


@pytest.mark.cuda
def test_cuda_weight_grad_precision():
    # the bf16 weight gradient at the benchmark's size (a 1,048,576-long reduction per weight)
    # is as accurate as cuDNN's bf16 convolution's, measured against float64 (error-ratio
    # rule), in one chunk (the default) and in 8 (fp32 sums of the chunks' products)
    from med3d_ext.ops import conv_bn_relu as mod

    x = torch.randn(8, 1, 64, 128, 128, device="cuda").bfloat16()
    w = torch.randn(64, 1, 7, 7, 7, device="cuda") / 18.5
    gy = torch.randn(8, 64, 32, 64, 64, device="cuda").bfloat16()
    gy = gy.to(memory_format=torch.channels_last_3d)

    def wgrad(fn, dtype):
        wi = w.to(dtype).requires_grad_()
        y = fn(x.to(dtype), wi)
        return torch.autograd.grad(y, [wi], gy.to(dtype))[0].double()

    ref = wgrad(lambda a, b: F.conv3d(a, b, None, 2, 3), torch.float64)
    aten = wgrad(lambda a, b: F.conv3d(a, b, None, 2, 3), torch.bfloat16)
    mod_algo, chunk = mod.STEM_CONV, mod.im2col_chunk_bytes()
    mod.STEM_CONV = "im2col"
    ours = []
    try:
        for c in (chunk, 100 << 20):  # 721 MB of columns: one chunk, then 8
            mod.im2col_chunk_bytes(c)
            ours.append(wgrad(lambda a, b: m3d.ops.conv_bias_relu3d(
                a, b, None, stride=2, padding=3, relu=False), torch.bfloat16))
    finally:
        mod.STEM_CONV = mod_algo
        mod.im2col_chunk_bytes(chunk)
    err = lambda t: ((t - ref).norm() / ref.norm()).item()  # noqa: E731
    for o in ours:
        assert err(o) <= 2 * err(aten) + 1e-3, (err(o), err(aten))


@pytest.mark.cuda
def test_cuda_benchmark_shape_matches_cpu(im2col_kernel):
    # the benchmark's stem at full size (8 x 1 x 64 x 128 x 128, bf16): the CUDA kernel's columns
    # equal the CPU kernel's bit for bit (many row blocks, 64-row tails, a 2-tile column case)
    x = torch.randn(8, 1, 64, 128, 128, dtype=torch.bfloat16)
    g = (8, 1, (64, 128, 128), (7, 7, 7), (2, 2, 2), (3, 3, 3), (1, 1, 1))
    cols, cpu = _cols(x.cuda(), g), _cols(x, g)
    assert cols.shape == (8 * 32 * 64 * 64, 344)
    assert torch.equal(cols.cpu(), cpu)
    x = torch.randn(1, 4, 9, 10, 11)  # 4 x 7^3 = 1372 columns: two 1024-column tiles
    g = (1, 4, (9, 10, 11), (7, 7, 7), (2, 2, 2), (3, 3, 3), (1, 1, 1))
    assert torch.equal(_cols(x.cuda(), g).cpu(), _cols(x, g))
    # the fold_w and fold_hw stem inputs' windows at the benchmark's size (runs of 8 bf16)
    x = torch.randn(8, 1, 64, 128, 128, dtype=torch.bfloat16)
    for k in ((2, 2, 8), (2, 8, 8)):
        g = (8, 1, (64, 128, 128), k, (2, 2, 2), (3, 3, 3), (1, 1, 1))
        assert torch.equal(_cols(x.cuda(), g).cpu(), _cols(x, g)), k


# --------------------------------------------------------------------------- implicit GEMM
# implicit_gemm_conv3d (csrc/conv_bn_relu/stem_gemm.h): on CUDA in bf16/fp16 with Cout a multiple
# of 64, tensor-core kernels that gather the columns in shared memory; elsewhere im2col's GEMMs.

# (N, Cin, spatial, Cout, kernel, stride, padding, dilation)
GEMM_CASES = [
    (2, 1, (9, 12, 11), 64, (7, 7, 7), (2, 2, 2), (3, 3, 3), (1, 1, 1)),   # the stem, odd sizes
    (1, 3, (6, 7, 8), 128, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),    # 2 channel tiles
    (3, 4, (9, 10, 11), 64, (7, 7, 7), (2, 2, 2), (3, 3, 3), (1, 1, 1)),   # 1372 columns
    (2, 2, (8, 5, 9), 64, (5, 3, 4), (2, 1, 3), (2, 1, 0), (1, 2, 1)),
    (1, 1, (5, 6, 7), 32, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),    # Cout 32: fallback
]


def _gemm_inputs(device, dtype, case, cl=False):
    n, cin, sp, cout, k, s, p, d = case
    x = torch.randn(n, cin, *sp, device=device)
    w = torch.randn(cout, cin, *k, device=device) / (cin * k[0] * k[1] * k[2]) ** 0.5
    if cl:
        x = x.to(memory_format=torch.channels_last_3d)
    return x.to(dtype), w.to(dtype), list(s), list(p), list(d)


def _ref_rows_and_wgrad(x, w, s, p, d, g_rows):
    """F.conv3d's output as (n, d, h, w) rows and its weight gradient for those rows'
    gradient, in float64."""
    wi = w.double().requires_grad_()
    y = F.conv3d(x.double(), wi, None, s, p, d)
    rows = y.permute(0, 2, 3, 4, 1).reshape(-1, w.shape[0])
    (gw,) = torch.autograd.grad(rows, [wi], g_rows.double())
    return rows.detach(), gw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_implicit_gemm_ops(device, case, dtype):
    # the op pair in full precision (im2col's GEMMs: the CPU, and CUDA outside the kernels'
    # dtypes) against F.conv3d and its weight gradient
    x, w, s, p, d = _gemm_inputs(device, dtype, case, cl=case[1] > 1)
    rows = torch.ops.med3d_ext.implicit_gemm_conv3d(x, w, s, p, d)
    g = torch.randn_like(rows)
    gw = torch.ops.med3d_ext.implicit_gemm_conv3d_weight_grad(g, x, list(w.shape), s, p, d)
    ref_rows, ref_gw = _ref_rows_and_wgrad(x, w, s, p, d, g)
    assert rows.shape == ref_rows.shape and rows.dtype == dtype and gw.shape == w.shape
    t = tol(dtype)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=t["rtol"], atol=t["atol"] * 10)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=t["rtol"] * 10,
                               atol=t["atol"] * 10 * max(1.0, ref_gw.abs().max().item()))


@pytest.mark.cuda
@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True], ids=["ncdhw", "cl3d"])
def test_cuda_implicit_gemm_kernels(case, dtype, cl):
    # the tensor-core kernels against float64, as accurate as cuDNN's own low-precision
    # convolution (error-ratio rule): forward rows and weight gradient; M is not a multiple of
    # the 128-row tile, and the cases cover several column and channel tiles
    x, w, s, p, d = _gemm_inputs("cuda", dtype, case, cl=cl)
    rows = torch.ops.med3d_ext.implicit_gemm_conv3d(x, w, s, p, d)
    g = torch.randn_like(rows)
    gw = torch.ops.med3d_ext.implicit_gemm_conv3d_weight_grad(g, x, list(w.shape), s, p, d)
    ref_rows, ref_gw = _ref_rows_and_wgrad(x, w, s, p, d, g)
    aten_rows, aten_gw = (t.double() for t in _aten_low_precision(x, w, s, p, d, g))
    err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert err(rows, ref_rows) <= 2 * err(aten_rows, ref_rows) + 2e-3
    assert err(gw, ref_gw) <= 2 * err(aten_gw, ref_gw) + 2e-3
    assert rows.dtype == dtype and gw.dtype == dtype


def _aten_low_precision(x, w, s, p, d, g_rows):
    wi = w.clone().requires_grad_()
    y = F.conv3d(x, wi, None, s, p, d)
    rows = y.permute(0, 2, 3, 4, 1).reshape(-1, w.shape[0])
    (gw,) = torch.autograd.grad(rows, [wi], g_rows)
    return rows.detach(), gw


@pytest.mark.cuda
def test_cuda_implicit_gemm_benchmark_shape():
    # the benchmark's stem (8 x 1 x 64 x 128 x 128, bf16, channels_last): the implicit GEMM
    # agrees with im2col + cuBLAS (the same sums in another order) and both with float64
    x = torch.randn(8, 1, 64, 128, 128, device="cuda").bfloat16()
    x = x.to(memory_format=torch.channels_last_3d)
    w = (torch.randn(64, 1, 7, 7, 7, device="cuda") / 18.5).bfloat16()
    s, p, d = [2, 2, 2], [3, 3, 3], [1, 1, 1]
    rows = torch.ops.med3d_ext.implicit_gemm_conv3d(x, w, s, p, d)
    g = torch.randn_like(rows)
    gw = torch.ops.med3d_ext.implicit_gemm_conv3d_weight_grad(g, x, list(w.shape), s, p, d)
    cols = torch.ops.med3d_ext.im2col3d(x, [7, 7, 7], s, p, d)
    wm = F.pad(w.reshape(64, -1), (0, cols.shape[1] - 343))
    mm_rows, mm_gw = cols @ wm.T, (g.T @ cols)[:, :343].reshape(w.shape)
    ref_rows, ref_gw = _ref_rows_and_wgrad(x, w, s, p, d, g)
    err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert err(rows, ref_rows) <= 2 * err(mm_rows, ref_rows) + 1e-3
    assert err(gw, ref_gw) <= 2 * err(mm_gw, ref_gw) + 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_implicit_gemm_bad_input_and_empty(device):
    x, w, s, p, d = _gemm_inputs(device, torch.float32, GEMM_CASES[0])
    op, wg = torch.ops.med3d_ext.implicit_gemm_conv3d, torch.ops.med3d_ext.implicit_gemm_conv3d_weight_grad
    with pytest.raises(RuntimeError, match=r"implicit_gemm_conv3d: argument 'weight' must be .*Cin = x.size\(1\) = 1"):
        op(x, w[:, :0], s, p, d)
    with pytest.raises(RuntimeError, match=r"argument 'weight' must be of x's dtype"):
        op(x, w.double(), s, p, d)
    with pytest.raises(RuntimeError, match=r"implicit_gemm_conv3d: argument 'x' is too small"):
        op(x[:, :, :2, :2, :2], w, s, [0, 0, 0], d)
    rows = op(x, w, s, p, d)
    with pytest.raises(RuntimeError, match=r"'grad_rows' must be \(N\*D'\*H'\*W', Cout\) = \(360, 64\)"):
        wg(rows[1:], x, list(w.shape), s, p, d)
    with pytest.raises(RuntimeError, match=r"'weight_size' must be \(Cout, Cin, kD, kH, kW\)"):
        wg(rows, x, [64, 2, 7, 7, 7], s, p, d)
    with pytest.raises(RuntimeError, match=r"argument 'grad_rows' must be of x's dtype"):
        wg(rows.double(), x, list(w.shape), s, p, d)
    assert op(x[:0], w, s, p, d).shape == (0, 64)
    gw = wg(rows[:0], x[:0], list(w.shape), s, p, d)
    assert gw.shape == w.shape and not gw.any()


@pytest.mark.parametrize("device", DEVICES)
def test_implicit_gemm_opcheck(device):
    x, w, s, p, d = _gemm_inputs(device, torch.float32, GEMM_CASES[3])
    rows = torch.ops.med3d_ext.implicit_gemm_conv3d(x, w, s, p, d)
    torch.library.opcheck(torch.ops.med3d_ext.implicit_gemm_conv3d.default, (x, w, s, p, d))
    torch.library.opcheck(torch.ops.med3d_ext.implicit_gemm_conv3d_weight_grad.default,
                          (torch.randn_like(rows), x, list(w.shape), s, p, d))
