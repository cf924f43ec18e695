"""affine_resample / affine_resample_pair / resize against F.affine_grid + F.grid_sample and
F.interpolate; elastic and intensity against med3d_ext.reference; gradients, opcheck, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import med3d_ext as m3d
from med3d_ext import _extension, reference
from python_tests.conftest import DEVICES, assert_close, assert_low_precision_close

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")
PADDINGS = ["zeros", "border", "reflection"]


def random_theta(n, device="cpu", dtype=torch.float32, strength=1.0):
    """Rotations, anisotropic scales (some negative: flips), shears and translations."""
    mats = []
    for _ in range(n):
        a = torch.randn(3, 3, dtype=torch.float64) * strength
        q, _ = torch.linalg.qr(a)  # random rotation or reflection
        s = torch.diag((torch.rand(3, dtype=torch.float64) * 0.8 + 0.7)
                       * torch.where(torch.rand(3) < 0.2, -1.0, 1.0).double())
        shear = torch.eye(3, dtype=torch.float64) + 0.2 * strength * torch.randn(3, 3).double().triu(1)
        t = (torch.rand(3, 1, dtype=torch.float64) - 0.5) * 0.6
        mats.append(torch.cat([q @ s @ shear, t], dim=1))
    return torch.stack(mats).to(device=device, dtype=dtype)


def grid_sample_ref(image, theta, size, mode, padding_mode, align_corners):
    grid = F.affine_grid(theta, list(size), align_corners=align_corners)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)


def assert_nearest_close(ours, ref):
    """Nearest outputs agree except at rounding ties (<= 0.1% of voxels)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    bad = (ours != ref).sum().item()
    assert bad <= max(1, math.ceil(1e-3 * ref.numel())), f"{bad} of {ref.numel()} voxels differ"


# ------------------------------------------------------------------------------ affine_resample


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_matches_grid_sample(device, mode, padding_mode, align_corners):
    n, c = 3, 2
    x = torch.randn(n, c, 7, 10, 9, device=device)
    theta = random_theta(n, device)
    size = (n, c, 6, 11, 5)
    out = m3d.ops.affine_resample(x, theta, size, mode=mode, padding_mode=padding_mode,
                                  align_corners=align_corners)
    ref = grid_sample_ref(x, theta, size, mode, padding_mode, align_corners)
    if mode == "bilinear":
        assert_close(out, ref)
    else:
        assert_nearest_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_affine_integer_labels_nearest(device, dtype, padding_mode):
    n = 2
    hi = {torch.uint8: 255, torch.int16: 30000, torch.int64: 2**40}[dtype]
    lab = torch.randint(0, hi, (n, 1, 9, 8, 7), device=device, dtype=dtype)
    if dtype == torch.int64:
        lab += 2**41  # beyond float32's 24-bit mantissa: proves there is no float round trip
    theta = random_theta(n, device)
    out = m3d.ops.affine_resample(lab, theta, (n, 1, 10, 5, 9), mode="nearest",
                                  padding_mode=padding_mode)
    assert out.dtype == dtype
    ref = reference.affine_resample(lab, theta, (n, 1, 10, 5, 9), "nearest", padding_mode)
    assert_nearest_close(out, ref)
    if padding_mode == "zeros":
        assert set(out.unique().tolist()) <= set(lab.unique().tolist()) | {0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_affine_low_precision(device, dtype):
    x = torch.randn(2, 3, 8, 9, 10, device=device)
    theta = random_theta(2, device)
    size = (2, 3, 9, 7, 8)
    ours = m3d.ops.affine_resample(x.to(dtype), theta, size)
    assert ours.dtype == dtype
    ref32 = grid_sample_ref(x.to(dtype).float(), theta, size, "bilinear", "zeros", False)
    lowp = grid_sample_ref(x.to(dtype), theta.to(dtype), size, "bilinear", "zeros", False)
    assert_low_precision_close(ours, lowp, ref32)


@pytest.mark.parametrize("device", DEVICES)
def test_affine_non_contiguous_and_empty(device):
    x = torch.randn(3, 4, 10, 12, 14, device=device)[:, ::2, 1:, ::2, 3:]
    theta = random_theta(3, device).transpose(1, 2).contiguous().transpose(1, 2)
    size = (3, 2, 5, 6, 7)
    assert_close(m3d.ops.affine_resample(x, theta, size),
                 grid_sample_ref(x, theta, size, "bilinear", "zeros", False))
    x_cl = torch.randn(2, 3, 5, 6, 7, device=device).to(memory_format=torch.channels_last_3d)
    th = random_theta(2, device)
    assert_close(m3d.ops.affine_resample(x_cl, th, (2, 3, 4, 4, 4)),
                 grid_sample_ref(x_cl, th, (2, 3, 4, 4, 4), "bilinear", "zeros", False))
    for size in [(2, 3, 0, 4, 4), (2, 0, 3, 3, 3)]:
        xx = torch.randn(2, size[1], 4, 4, 4, device=device)
        assert m3d.ops.affine_resample(xx, th, size).shape == size
    empty = m3d.ops.affine_resample(torch.randn(0, 1, 4, 4, 4, device=device),
                                    torch.randn(0, 3, 4, device=device), (0, 1, 3, 3, 3))
    assert empty.shape == (0, 1, 3, 3, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_affine_gradient_matches_reference(device, mode):
    x = torch.randn(2, 2, 6, 7, 5, device=device, requires_grad=True)
    theta = random_theta(2, device)
    size = (2, 2, 5, 6, 4)
    g = torch.randn(size, device=device)
    (gx,) = torch.autograd.grad((m3d.ops.affine_resample(x, theta, size, mode=mode,
                                                         padding_mode="border") * g).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad((grid_sample_ref(x2, theta, size, mode, "border", False)
                                 * g).sum(), x2)
    assert_close(gx, gr)


def test_affine_gradcheck_float64():
    x = torch.randn(2, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    theta = random_theta(2, dtype=torch.float64)
    for pad in PADDINGS:
        assert torch.autograd.gradcheck(
            lambda t: m3d.ops.affine_resample(t, theta, (2, 2, 3, 3, 4), padding_mode=pad), (x,))


@requires_ext
def test_affine_theta_gradient_is_refused():
    x = torch.randn(1, 1, 4, 4, 4)
    theta = random_theta(1).requires_grad_()
    with pytest.raises(NotImplementedError, match="theta"):
        m3d.ops.affine_resample(x, theta, (1, 1, 3, 3, 3)).sum().backward()


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 5, 6, 4, device=device, requires_grad=True)
    theta = random_theta(2, device)
    lab = torch.randint(0, 4, (2, 1, 5, 6, 4), device=device, dtype=torch.uint8)
    ops = torch.ops.med3d_ext
    torch.library.opcheck(ops.affine_resample, (x, theta, [2, 3, 4, 5, 6], 0, 1, False))
    torch.library.opcheck(ops.affine_resample, (lab, theta, [2, 1, 4, 5, 6], 1, 0, True))
    params, seed = m3d.ops.pack_intensity({"noise_std": 0.1, "seed": 3}, 2, device)
    torch.library.opcheck(ops.affine_resample_pair,
                          (x.detach(), lab, theta, [2, 3, 4, 5, 6], [2, 3, 2],
                           torch.randn(2, 3, 3, 3, 3, device=device) * 0.05, params, seed, 0,
                           False))
    torch.library.opcheck(ops.resize, (x, [7, 3, 5], 0))
    torch.library.opcheck(ops.resize, (lab, [7, 3, 5], 1))
    torch.library.opcheck(ops.resize_backward, (torch.randn(2, 3, 7, 3, 5, device=device),
                                                [2, 3, 5, 6, 4]))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_parity(device):
    x = torch.randn(2, 1, 6, 5, 7, device=device)
    lab = torch.randint(0, 3, (2, 6, 5, 7), device=device)
    theta = random_theta(2, device)

    def f(x, lab, theta):
        a = m3d.ops.affine_resample(x, theta, (2, 1, 4, 5, 6), padding_mode="reflection")
        b, c = m3d.ops.affine_resample_pair(x, lab, theta, (2, 1, 4, 5, 6), (2, 3, 3),
                                            intensity={"noise_std": 0.1, "seed": 3})
        return a, b, c, m3d.ops.resize(x, (3, 8, 4))

    eager = f(x, lab, theta)
    compiled = torch.compile(f, fullgraph=True)(x, lab, theta)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    x = torch.randn(2, 1, 4, 4, 4, device=device)
    theta = random_theta(2, device)
    with pytest.raises(ValueError, match="'theta'"):
        m3d.ops.affine_resample(x, theta[:, :2], (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="'theta'"):
        m3d.ops.affine_resample(x, theta[:1], (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="'size'"):
        m3d.ops.affine_resample(x, theta, (2, 1, 3, 3))
    with pytest.raises(ValueError, match="'size'"):
        m3d.ops.affine_resample(x, theta, (2, 5, 3, 3, 3))
    with pytest.raises(TypeError, match="'image'"):
        m3d.ops.affine_resample(x.to(torch.uint8), theta, (2, 1, 3, 3, 3))
    with pytest.raises(TypeError, match="'theta'"):
        m3d.ops.affine_resample(x, theta.long(), (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="'padding_mode'"):
        m3d.ops.affine_resample(x, theta, (2, 1, 3, 3, 3), padding_mode="wrap")
    with pytest.raises(ValueError, match="'label'"):
        m3d.ops.affine_resample_pair(x, torch.zeros(2, 2, 4, 4, 4, device=device), theta,
                                     (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="'elastic'"):
        m3d.ops.affine_resample_pair(x, torch.zeros(2, 4, 4, 4, device=device), theta,
                                     (2, 1, 3, 3, 3), elastic=torch.zeros(2, 2, 3, 3, 3,
                                                                          device=device))
    with pytest.raises(ValueError, match="intensity"):
        m3d.ops.affine_resample_pair(x, torch.zeros(2, 4, 4, 4, device=device), theta,
                                     (2, 1, 3, 3, 3), intensity={"contrast": 1.0})
    with pytest.raises(TypeError, match="'image'"):
        m3d.ops.resize(x.to(torch.int16), (3, 3, 3))
    other = "cpu" if device != "cpu" else ("meta")
    with pytest.raises(ValueError, match="'theta'"):
        m3d.ops.affine_resample(x, theta.to(other), (2, 1, 3, 3, 3))


def test_wrong_types_and_overflowing_sizes_are_named():
    # a wrong type is a TypeError (and still a ValueError) naming the argument; a size whose
    # output would overflow was PyTorch's "Storage size calculation overflowed", naming none
    x = torch.randn(2, 1, 4, 4, 4)
    theta = random_theta(2)
    lab = torch.zeros(2, 4, 4, 4, dtype=torch.uint8)
    for bad in (None, 4, "12345"):
        with pytest.raises(TypeError, match="'size' must be 5 ints"):
            m3d.ops.affine_resample(x, theta, bad)
        with pytest.raises(TypeError, match="'size' must be 3 ints"):
            m3d.ops.resize(x, bad)
    with pytest.raises(TypeError, match="'image' must be a 5-D"):
        m3d.ops.affine_resample([x], theta, (2, 1, 3, 3, 3))
    with pytest.raises(TypeError, match="torch.from_numpy"):
        m3d.ops.resample_to_spacing(x[0].numpy(), (1, 1, 1), (2, 2, 2))
    with pytest.raises(TypeError, match="'intensity' must be a dict"):
        m3d.ops.affine_resample_pair(x, lab, theta, (2, 1, 3, 3, 3), intensity=[1.0])
    huge = (2**40, 2**40, 4)
    with pytest.raises(ValueError, match="'size' .* too large"):
        m3d.ops.affine_resample(x, theta, (2, 1, *huge))
    with pytest.raises(ValueError, match="'size' .* too large"):
        m3d.ops.affine_resample_pair(x, lab, theta, (2, 1, *huge))
    with pytest.raises(ValueError, match="'label_size' .* too large"):
        m3d.ops.affine_resample_pair(x, lab, theta, (2, 1, 3, 3, 3), label_size=huge)
    for size in (huge, (2**63 - 1, 1, 1), (2**31, 2**31, 1)):
        with pytest.raises(ValueError, match="'size' .* too large"):
            m3d.ops.resize(x, size)
    # a size just within reach is not refused by the check (the op runs on an empty batch)
    assert m3d.ops.resize(x[:0], (2**20, 2**20, 1)).shape == (0, 1, 2**20, 2**20, 1)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_resize_does_not_recompile_per_batch_size(device):
    # a compiled pretraining step resizes each head's logits, whose batch size changes from
    # step to step: resize_backward took int[] sizes, so every new batch size was a recompile
    torch._dynamo.reset()

    def f(x):
        return (m3d.ops.resize(x, (5, 6, 7)) * torch.linspace(-1, 1, 7, device=device)).sum()

    cf = torch.compile(f, backend="aot_eager", dynamic=True)
    for n in (2, 3, 4, 5):
        x = torch.randn(n, 3, 4, 5, 6, device=device, requires_grad=True)
        with torch._dynamo.config.patch(error_on_recompile=n > 2):
            cf(x).backward()
        xe = x.detach().clone().requires_grad_(True)
        f(xe).backward()
        torch.testing.assert_close(x.grad, xe.grad)


@requires_ext
def test_compiled_op_checks_name_the_argument():
    x = torch.randn(2, 1, 4, 4, 4)
    ops = torch.ops.med3d_ext
    with pytest.raises(RuntimeError, match="'theta'"):
        ops.affine_resample(x, torch.randn(2, 3, 3), [2, 1, 3, 3, 3], 0, 0, False)
    with pytest.raises(RuntimeError, match="'size'"):
        ops.affine_resample(x, random_theta(2), [2, 1, 3, 3], 0, 0, False)
    with pytest.raises(RuntimeError, match="'image'"):
        ops.affine_resample(x.int(), random_theta(2), [2, 1, 3, 3, 3], 0, 0, False)
    with pytest.raises(RuntimeError, match="'intensity'"):
        ops.affine_resample_pair(x, x.byte(), random_theta(2), [2, 1, 3, 3, 3], [3, 3, 3], None,
                                 torch.ones(2, 5), None, 0, False)


# ------------------------------------------------------------------------- affine_resample_pair


def _intensity(n, device, noise=True):
    return {"scale": torch.rand(n, device=device) + 0.5,
            "shift": torch.randn(n, device=device) * 0.2,
            "gamma": torch.where(torch.rand(n, device=device) < 0.5, 1.0,
                                 torch.rand(n, device=device) + 0.5),
            "noise_std": (torch.rand(n, device=device) * 0.2) if noise else 0.0,
            "clip": (-1.5, 2.0),
            "seed": torch.randint(-2**62, 2**62, (n,), device=device)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_size", [None, (3, 2, 4)])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_pair_matches_reference(device, label_size, padding_mode):
    n = 3
    x = torch.randn(n, 2, 9, 8, 11, device=device)
    lab = torch.randint(0, 7, (n, 9, 8, 11), device=device, dtype=torch.uint8)
    theta = random_theta(n, device, strength=0.5)
    elastic = torch.randn(n, 3, 4, 3, 5, device=device) * 0.1
    inten = _intensity(n, device)
    size = (n, 2, 7, 10, 9)
    img, out_lab = m3d.ops.affine_resample_pair(x, lab, theta, size, label_size, elastic=elastic,
                                                intensity=inten, padding_mode=padding_mode)
    ref_img, ref_lab = reference.affine_resample_pair(x, lab, theta, size, label_size,
                                                      elastic=elastic, intensity=inten,
                                                      padding_mode=padding_mode)
    assert out_lab.shape == (n, *(label_size or size[2:])) and out_lab.dtype == torch.uint8
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    assert_nearest_close(out_lab, ref_lab)


@pytest.fixture(params=["tiles", "runs", "pairs"])
def plain_layout(request, monkeypatch):
    """The CUDA kPlain kernel's layouts of image items (csrc/resample/resample_cuda.cu): warp
    tiles of 32 voxels x 8 rows (the default), runs of 8 voxels per thread
    (MED3D_EXT_PLAIN_RESAMPLE_LAYOUT=runs) and the tiles' rows two at a time (=pairs); read at
    every launch. All must give the same."""
    if request.param != "tiles":
        monkeypatch.setenv("MED3D_EXT_PLAIN_RESAMPLE_LAYOUT", request.param)
    else:
        monkeypatch.delenv("MED3D_EXT_PLAIN_RESAMPLE_LAYOUT", raising=False)
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("width", [128, 111], ids=["packed", "partial-runs"])
def test_pair_at_benchmark_scale(width, plain_layout):
    # Near the benchmark's 8 x 128^3 pair: one image channel and a same-grid uint8 label, so
    # the CUDA kernel takes its fused-label path with packed 4-voxel stores (W % 4 == 0) or its
    # plain stores with a partial last run (odd W) over millions of work items.
    device = "cuda"
    n, size = 4, (4, 1, 96, 112, width)
    x = torch.randn(n, 1, 100, 120, width, device=device)
    lab = torch.randint(0, 8, (n, 1, 100, 120, width), device=device, dtype=torch.uint8)
    theta = random_theta(n, device)
    img, out_lab = m3d.ops.affine_resample_pair(x, lab, theta, size)
    # at this size a coordinate's fp32 rounding moves values by ~1e-4, in grid_sample too:
    # against float64, our error must stay within 2x fp32 grid_sample's (plus a floor)
    ref64 = grid_sample_ref(x.double(), theta.double(), size, "bilinear", "zeros", False)
    eager32 = grid_sample_ref(x, theta, size, "bilinear", "zeros", False)
    assert_low_precision_close(img, eager32, ref64, factor=2.0, floor=1e-5)
    assert out_lab.shape == size and out_lab.dtype == torch.uint8
    ref = grid_sample_ref(lab.double(), theta.double(), size, "nearest", "zeros", False)
    assert_nearest_close(out_lab, ref.to(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_pair_without_extras_equals_two_grid_samples(device):
    n = 2
    x = torch.randn(n, 1, 10, 9, 8, device=device)
    lab = torch.randint(0, 5, (n, 1, 10, 9, 8), device=device, dtype=torch.int64)
    theta = random_theta(n, device)
    img, out_lab = m3d.ops.affine_resample_pair(x, lab, theta, (n, 1, 8, 8, 8), (4, 4, 4),
                                                align_corners=True)
    assert out_lab.shape == (n, 1, 4, 4, 4) and out_lab.dtype == torch.int64
    assert_close(img, grid_sample_ref(x, theta, (n, 1, 8, 8, 8), "bilinear", "zeros", True))
    ref = grid_sample_ref(lab.double(), theta.double(), (n, 1, 4, 4, 4), "nearest", "zeros", True)
    assert_nearest_close(out_lab, ref.long())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_pair_dtypes_non_contiguous_and_empty(device, dtype):
    n = 2
    x = torch.randn(n, 4, 9, 8, 12, device=device)[:, 1::2, :, :, ::2]
    lab = torch.randint(0, 9, (n, 12, 9, 8), device=device, dtype=torch.int32).permute(0, 2, 3, 1)
    assert not x.is_contiguous() and not lab.is_contiguous()
    theta = random_theta(n, device)
    inten = _intensity(n, device, noise=False)
    img, out_lab = m3d.ops.affine_resample_pair(x.to(dtype), lab, theta, (n, 2, 5, 7, 6),
                                                (3, 4, 3), intensity=inten)
    assert img.dtype == dtype and out_lab.dtype == torch.int32
    ref32, ref_lab = reference.affine_resample_pair(x.to(dtype).float(), lab, theta,
                                                    (n, 2, 5, 7, 6), (3, 4, 3), intensity=inten)
    torch.testing.assert_close(img.float(), ref32, rtol=2e-2, atol=2e-2)
    assert_nearest_close(out_lab, ref_lab)
    e_img, e_lab = m3d.ops.affine_resample_pair(
        torch.randn(0, 1, 4, 4, 4, device=device, dtype=dtype),
        torch.zeros(0, 4, 4, 4, device=device, dtype=torch.uint8),
        torch.zeros(0, 3, 4, device=device), (0, 1, 3, 3, 3), (2, 2, 2))
    assert e_img.shape == (0, 1, 3, 3, 3) and e_lab.shape == (0, 2, 2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_elastic_equals_affine(device):
    n = 2
    x = torch.randn(n, 3, 7, 8, 9, device=device)
    lab = torch.randint(0, 4, (n, 7, 8, 9), device=device, dtype=torch.int16)
    theta = random_theta(n, device)
    a = m3d.ops.affine_resample_pair(x, lab, theta, (n, 3, 6, 6, 6),
                                     elastic=torch.zeros(n, 3, 5, 5, 5, device=device))
    b = m3d.ops.affine_resample_pair(x, lab, theta, (n, 3, 6, 6, 6))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_seeded_and_standard_normal(device):
    n = 2
    x = torch.zeros(n, 2, 16, 16, 16, device=device)
    lab = torch.zeros(n, 16, 16, 16, device=device, dtype=torch.uint8)
    theta = torch.eye(3, 4, device=device).expand(n, 3, 4)
    seed = torch.randint(0, 2**62, (n,), device=device)
    run = lambda s: m3d.ops.affine_resample_pair(  # noqa: E731
        x, lab, theta, x.shape, intensity={"noise_std": 1.0, "seed": s})[0]
    a, b = run(seed), run(seed)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, run(seed + 1))
    assert not torch.equal(a[0], a[1])  # samples differ even under one seed
    assert abs(a.mean().item()) < 0.03 and abs(a.std().item() - 1.0) < 0.03
    # the same numbers as the pure-PyTorch hash
    key = reference.noise_key(seed.cpu(), torch.arange(n)).view(n, 1, 1, 1, 1)
    z = reference.noise_normal(key, torch.arange(a[0].numel()).view(1, *a.shape[1:]))
    torch.testing.assert_close(a.cpu(), z, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_noise_cpu_equals_cuda():
    n = 2
    x = torch.randn(n, 1, 9, 10, 11)
    lab = torch.randint(0, 3, (n, 9, 10, 11), dtype=torch.uint8)
    theta = random_theta(n)
    inten = _intensity(n, "cpu")
    cpu = m3d.ops.affine_resample_pair(x, lab, theta, x.shape, intensity=inten)
    gpu = m3d.ops.affine_resample_pair(
        x.cuda(), lab.cuda(), theta.cuda(), x.shape,
        intensity={k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inten.items()})
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-4, atol=1e-4)
    assert_nearest_close(gpu[1].cpu(), cpu[1])


# ------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
@pytest.mark.parametrize("size", [(11, 4, 6), (3, 17, 9), (7, 9, 5)])
def test_resize_matches_interpolate(device, mode, size):
    x = torch.randn(2, 3, 7, 9, 5, device=device)
    kw = {"align_corners": False} if mode == "trilinear" else {}
    assert_close(m3d.ops.resize(x, size, mode), F.interpolate(x, size=size, mode=mode, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_resize_integer_nearest_keeps_dtype(device, dtype):
    lab = torch.randint(0, 200, (1, 1, 6, 7, 9), device=device, dtype=dtype)
    out = m3d.ops.resize(lab, (13, 3, 10), "nearest")
    assert out.dtype == dtype
    ref = F.interpolate(lab.double(), size=(13, 3, 10), mode="nearest").to(dtype)
    assert_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_resize_gradient_and_low_precision(device):
    x = torch.randn(2, 2, 5, 6, 7, device=device, requires_grad=True)
    g = torch.randn(2, 2, 9, 4, 8, device=device)
    (ga,) = torch.autograd.grad((m3d.ops.resize(x, (9, 4, 8)) * g).sum(), x)
    (gb,) = torch.autograd.grad((F.interpolate(x, size=(9, 4, 8), mode="trilinear") * g).sum(), x)
    assert_close(ga, gb)
    xb = x.detach().bfloat16()
    assert_low_precision_close(m3d.ops.resize(xb, (9, 4, 8)),
                               F.interpolate(xb, size=(9, 4, 8), mode="trilinear"),
                               F.interpolate(xb.float(), size=(9, 4, 8), mode="trilinear"))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_resize_backward_gathers_what_upsample_backward_scatters(device):
    """resize's backward is a gather (csrc/resample/resample.h, resize_grad_at): against ATen's
    scattering upsample_trilinear3d_backward in float64, for up- and downsampling, odd and
    non-integer factors, size-1 axes, a large factor and an unchanged size; fp32 and bf16
    accumulate in fp32 and round once; and it is bitwise reproducible."""
    cases = [((2, 3, 4, 5, 3), (16, 20, 12)), ((1, 2, 7, 9, 5), (3, 4, 2)),
             ((1, 1, 1, 6, 1), (5, 6, 3)), ((2, 2, 5, 5, 5), (5, 5, 5)),
             ((1, 2, 3, 7, 11), (10, 13, 4)), ((1, 1, 2, 2, 2), (100, 3, 9)),
             ((1, 1, 9, 2, 3), (1, 1, 1))]
    op = torch.ops.med3d_ext.resize_backward
    for shape, size in cases:
        g = torch.randn(shape[0], shape[1], *size, dtype=torch.float64, device=device)
        ref = torch.ops.aten.upsample_trilinear3d_backward(g.cpu(), list(size), list(shape), False)
        torch.testing.assert_close(op(g, list(shape)).cpu(), ref, rtol=1e-12, atol=1e-12)
        g32 = g.float()
        out = op(g32, list(shape))
        assert out.dtype == torch.float32 and torch.equal(out, op(g32, list(shape)))
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
        gb = g.bfloat16()
        ref_b = torch.ops.aten.upsample_trilinear3d_backward(gb.cpu().double(), list(size),
                                                             list(shape), False)
        torch.testing.assert_close(op(gb, list(shape)).cpu().double(), ref_b, rtol=1e-2, atol=1e-2)
    # empty gradients and inputs
    assert torch.equal(op(torch.zeros(2, 3, 0, 4, 4, device=device), [2, 3, 5, 6, 4]),
                       torch.zeros(2, 3, 5, 6, 4, device=device))
    assert op(torch.zeros(0, 3, 4, 4, 4, device=device), [0, 3, 5, 6, 4]).shape == (0, 3, 5, 6, 4)
    # bad input names the argument
    with pytest.raises(RuntimeError, match="input_size"):
        op(torch.randn(2, 3, 4, 4, 4, device=device), [2, 4, 5, 6, 4])
    with pytest.raises(RuntimeError, match="grad"):
        op(torch.randn(2, 3, 4, 4, device=device), [2, 3, 5, 6, 4])
    with pytest.raises(RuntimeError, match="floating"):
        op(torch.ones(2, 3, 4, 4, 4, device=device, dtype=torch.int64), [2, 3, 5, 6, 4])


@pytest.mark.cuda
def test_resize_backward_is_deterministic_on_cuda():
    """The gradient of resize on CUDA equals the CPU's and is the same bits every run, also
    under torch.use_deterministic_algorithms (F.interpolate's backward is refused there)."""
    x = torch.randn(2, 4, 8, 8, 4, device="cuda", requires_grad=True)
    g = torch.randn(2, 4, 32, 32, 16, device="cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [torch.autograd.grad(m3d.ops.resize(x, (32, 32, 16)), x, g)[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(grads[0], t) for t in grads[1:])
    xc = x.detach().cpu().requires_grad_()
    (gc,) = torch.autograd.grad(m3d.ops.resize(xc, (32, 32, 16)), xc, g.cpu())
    torch.testing.assert_close(grads[0].cpu(), gc, rtol=1e-5, atol=1e-5)


def test_resize_gradcheck_float64():
    x = torch.randn(1, 2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m3d.ops.resize(t, (4, 3, 5)), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_resample_to_spacing(device):
    x = torch.randn(1, 20, 31, 17, device=device)
    out = m3d.ops.resample_to_spacing(x, (2.0, 1.0, 1.5), (1.5, 1.5, 1.5))
    assert out.shape == (1, 27, 21, 17)
    assert_close(out, F.interpolate(x[None], size=(27, 21, 17), mode="trilinear")[0])
    lab = torch.randint(0, 3, (2, 1, 8, 8, 8), device=device, dtype=torch.uint8)
    out = m3d.ops.resample_to_spacing(lab, (1, 1, 1), (2, 0.5, 1), mode="nearest")
    assert out.shape == (2, 1, 4, 16, 8) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="'new_spacing'"):
        m3d.ops.resample_to_spacing(x, (1, 1, 1), (1, 0, 1))


def test_reference_fallback_matches_kernels(monkeypatch):
    """Without the extension the wrappers route to med3d_ext.reference with the same contract."""
    import med3d_ext.ops.resample as rs

    n = 2
    x = torch.randn(n, 2, 6, 7, 8)
    lab = torch.randint(0, 4, (n, 6, 7, 8), dtype=torch.uint8)
    theta = random_theta(n)
    inten = _intensity(n, "cpu")
    elastic = torch.randn(n, 3, 3, 3, 3) * 0.05
    calls = lambda: (  # noqa: E731
        rs.affine_resample(x, theta, (n, 2, 5, 5, 5), padding_mode="reflection"),
        rs.affine_resample(lab.unsqueeze(1), theta, (n, 1, 5, 5, 5), mode="nearest"),
        *rs.affine_resample_pair(x, lab, theta, (n, 2, 5, 6, 7), (3, 3, 3), elastic=elastic,
                                 intensity=inten),
        rs.resize(x, (9, 4, 5)))
    ours = calls()
    monkeypatch.setattr(rs, "compiled", lambda name: None)
    ref = calls()
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert_nearest_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_label_on_quarter_grid_picks_a_tie_neighbour(device):
    """Identity theta, label grid 4x smaller: every sample is exactly halfway between source
    voxels 4i+1 and 4i+2 (align_corners=False), and must pick one of them."""
    s = 24
    ramp = torch.arange(s, device=device)
    lab = (ramp.view(s, 1, 1) * 10000 + ramp.view(1, s, 1) * 100 + ramp.view(1, 1, s))[None]
    x = torch.randn(1, 1, s, s, s, device=device)
    theta = torch.eye(3, 4, device=device)[None]
    _, out = m3d.ops.affine_resample_pair(x, lab, theta, (1, 1, s, s, s), (s // 4,) * 3)
    q = s // 4
    for axis, mult in enumerate((10000, 100, 1)):
        coord = (out[0] // mult) % 100
        idx = torch.arange(q, device=device).view([q if k == axis else 1 for k in range(3)])
        assert ((coord == 4 * idx + 1) | (coord == 4 * idx + 2)).all()


# ------------------------------------------------------- block / row boundaries of the kernels
# The CPU kernel works on blocks of 64 voxels of a row and the CUDA kernel on runs of 4; taps
# outside the volume get weight 0 without per-voxel branches. These cases put row ends, block
# ends, volume edges and exactly-integral coordinates where those mechanisms meet.


def assert_close_long_rows(out, ref, extent):
    """Along rows of `extent` voxels a source coordinate reaches ~extent, so its float32 rounding
    (ours vs affine_grid's matmul: ~extent * 1e-7) times the image's slope (randn: up to ~4)."""
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=max(1e-4, 1e-6 * extent))


def near_tie(theta, size, in_size, align_corners, eps=1e-3):
    """Voxels whose reference source coordinate is within eps of a rounding tie on some axis."""
    grid = F.affine_grid(theta.double().cpu(), list(size), align_corners=align_corners)
    n_in = torch.tensor(in_size[::-1], dtype=torch.float64)  # grid order: x, y, z
    c = ((grid + 1) / 2) * (n_in - 1) if align_corners else ((grid + 1) * n_in - 1) / 2
    return ((c - c.floor() - 0.5).abs() < eps).any(-1)


def _affine(a, t=(0.0, 0.0, 0.0), device="cpu"):
    th = torch.zeros(1, 3, 4, dtype=torch.float64)
    th[0, :, :3] = torch.as_tensor(a, dtype=torch.float64)
    th[0, :, 3] = torch.as_tensor(t, dtype=torch.float64)
    return th.float().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_identity_and_flips_are_exact(device, padding_mode):
    """align_corners=True puts every sample on a voxel up to coordinate rounding (the last one
    included, whose upper neighbour is outside with weight 0): identity and flips reproduce the
    input, labels exactly."""
    x = torch.randn(1, 2, 5, 7, 67, device=device)  # W: one full block of 64 + a tail of 3
    lab = torch.randint(0, 9, (1, 5, 7, 67), device=device, dtype=torch.uint8)
    for diag, dims in [((1, 1, 1), []), ((-1, 1, 1), [4]), ((1, -1, -1), [2, 3])]:
        th = _affine(torch.diag(torch.tensor(diag, dtype=torch.float64)), device=device)
        out = m3d.ops.affine_resample(x, th, x.shape, padding_mode=padding_mode,
                                      align_corners=True)
        assert_close(out, grid_sample_ref(x, th, x.shape, "bilinear", padding_mode, True))
        torch.testing.assert_close(out, x.flip(dims), rtol=0, atol=1e-4)
        img, olab = m3d.ops.affine_resample_pair(x, lab, th, x.shape, padding_mode=padding_mode,
                                                 align_corners=True)
        torch.testing.assert_close(img, out, rtol=0, atol=0)
        assert torch.equal(olab, lab.flip([d - 1 for d in dims]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_rows_partly_inside(device, padding_mode, align_corners):
    """Shifts by whole and half voxels and zoom-outs: rows leave the volume at both ends, at
    exactly integral coordinates (a tap exactly on the edge) and in between; W = 131 spans two
    full CPU blocks and a tail, and is not a multiple of the CUDA run length."""
    n, c = 1, 3
    x = torch.randn(n, c, 6, 5, 131, device=device)
    cases = [(torch.eye(3), (2 * 7 / 131, 0.0, 0.0)),        # 7 voxels along x (align=False)
             (torch.eye(3), (-2 * 9 / 131, 2 / 5, 0.0)),      # whole voxels (align=False)
             (torch.eye(3) * 1.7, (0.1, 0.0, -0.2)),          # zoom out: both ends outside
             (torch.diag(torch.tensor([-1.3, 1.0, 0.8])), (0.05, 0.0, 0.0))]
    for a, t in cases:
        th = _affine(a, t, device)
        size = (n, c, 6, 5, 131)
        out = m3d.ops.affine_resample(x, th, size, padding_mode=padding_mode,
                                      align_corners=align_corners)
        assert_close_long_rows(out, grid_sample_ref(x, th, size, "bilinear", padding_mode,
                                                    align_corners), 131)
        lab = torch.randint(0, 200, (n, 1, 6, 5, 131), device=device, dtype=torch.uint8)
        near = m3d.ops.affine_resample(lab, th, size[:1] + (1,) + size[2:], mode="nearest",
                                       padding_mode=padding_mode, align_corners=align_corners)
        ref = grid_sample_ref(lab.float(), th, size[:1] + (1,) + size[2:], "nearest",
                              padding_mode, align_corners).to(torch.uint8)
        keep = ~near_tie(th, size, x.shape[2:], align_corners).to(device)[:, None]
        assert keep.float().mean() > 0.5
        assert torch.equal(near[keep], ref[keep])


@pytest.mark.parametrize("device", DEVICES)
def test_pair_channels_share_taps(device):
    """Several image channels and a fused label from the same points, rows longer than a block,
    against two independent grid_sample calls; a 2-byte and an 8-byte label too."""
    n, c = 2, 3
    x = torch.randn(n, c, 9, 11, 70, device=device)
    theta = random_theta(n, device, strength=0.3)
    size = (n, c, 8, 10, 73)
    ref_img = grid_sample_ref(x, theta, size, "bilinear", "zeros", False)
    for dtype in (torch.uint8, torch.int16, torch.int64):
        lab = torch.randint(0, 100, (n, 9, 11, 70), device=device, dtype=dtype)
        img, out_lab = m3d.ops.affine_resample_pair(x, lab, theta, size, size[2:])
        assert_close_long_rows(img, ref_img, 73)
        ref = grid_sample_ref(lab[:, None].double(), theta.double(), (n, 1) + size[2:], "nearest",
                              "zeros", False)[:, 0]
        assert_nearest_close(out_lab, ref.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_long_rows_and_many_rows(device):
    """A 1 x 1 x 40 x 40 x 300 volume: rows of several CPU blocks, many rows per thread chunk."""
    x = torch.randn(1, 1, 40, 40, 300, device=device)
    theta = random_theta(1, device, strength=0.4)
    size = (1, 1, 37, 41, 299)
    for mode in ("bilinear", "nearest"):
        out = m3d.ops.affine_resample(x, theta, size, mode=mode)
        ref = grid_sample_ref(x, theta, size, mode, "zeros", False)
        if mode == "bilinear":
            assert_close_long_rows(out, ref, 300)
        else:
            assert_nearest_close(out, ref)


@pytest.mark.cuda
def test_cuda_equals_cpu_on_row_boundaries():
    """The CPU block kernel and the CUDA run kernel share the per-voxel math: same values to
    float rounding, the same labels except at rounding ties; unaligned and aligned rows."""
    n = 2
    for w in (64, 67):
        x = torch.randn(n, 2, 10, 9, w)
        lab = torch.randint(0, 50, (n, 10, 9, w), dtype=torch.uint8)
        theta = random_theta(n, strength=0.5)
        size = (n, 2, 11, 8, w)
        for label_size in (None, (5, 4, 16)):
            cpu = m3d.ops.affine_resample_pair(x, lab, theta, size, label_size)
            gpu = m3d.ops.affine_resample_pair(x.cuda(), lab.cuda(), theta.cuda(), size,
                                               label_size)
            assert_close_long_rows(gpu[0].cpu(), cpu[0], w)  # FMA contraction on the GPU
            assert_nearest_close(gpu[1].cpu(), cpu[1])


@pytest.mark.cuda
@pytest.mark.parametrize("align_corners", [False, True])
def test_cuda_nearest_ties_go_the_cpus_way(align_corners):
    """An identity theta onto a 2x or 4x smaller label grid puts every sample exactly halfway
    between two voxels (align_corners=False). nvcc contracted the coordinate math into FMAs,
    whose single rounding broke those ties differently from the CPU for about a quarter of the
    voxels; the coordinates are now multiplied without contraction on both devices, so the
    labels are equal exactly (as augmenting on either device with one seed should give)."""
    n = 3
    lab = torch.randint(0, 200, (n, 32, 64, 128), dtype=torch.uint8)
    theta = torch.eye(3, 4).expand(n, 3, 4).contiguous()
    x = torch.randn(n, 1, 32, 64, 128)
    for f in (2, 4):
        label_size = (32 // f, 64 // f, 128 // f)
        cpu = m3d.ops.affine_resample_pair(x, lab, theta, (n, 1, 32, 64, 128), label_size,
                                           align_corners=align_corners)
        gpu = m3d.ops.affine_resample_pair(x.cuda(), lab.cuda(), theta.cuda(),
                                           (n, 1, 32, 64, 128), label_size,
                                           align_corners=align_corners)
        assert torch.equal(gpu[1].cpu(), cpu[1]), f


@pytest.mark.cuda
def test_cuda_plain_pair_ties_go_the_cpus_way(plain_layout):
    """The same ties through the kPlain kernel (label and image on one grid): its interior path
    rounds the label's point with one conversion per axis (half to even), its border path with
    the general helpers; both must pick the CPU's voxel. A 2x and a 4x smaller output grid, an
    identity theta (every point a tie) and a shifted one (points at the border too)."""
    n = 2
    lab = torch.randint(0, 200, (n, 1, 32, 64, 128), dtype=torch.uint8)
    x = torch.randn(n, 1, 32, 64, 128)
    shift = torch.eye(3, 4).expand(n, 3, 4).clone()
    shift[:, :, 3] = 0.25  # a quarter of the extent: the high end falls outside
    for theta in (torch.eye(3, 4).expand(n, 3, 4).contiguous(), shift):
        for f in (2, 4):
            size = (n, 1, 32 // f, 64 // f, 128 // f)
            cpu = m3d.ops.affine_resample_pair(x, lab, theta, size)
            gpu = m3d.ops.affine_resample_pair(x.cuda(), lab.cuda(), theta.cuda(), size)
            assert torch.equal(gpu[1].cpu(), cpu[1]), f
            torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("with_intensity", [False, True], ids=["plain", "intensity"])
@pytest.mark.parametrize("own_label_grid", [False, True], ids=["label-on-image-grid", "own-grid"])
def test_cuda_plain_pair_equals_the_general_kernel_and_the_cpu(dtype, label_dtype, align_corners,
                                                               with_intensity, own_label_grid,
                                                               plain_layout):
    """The augmentation's usual call (one image and one label channel, zeros padding, no
    elastic field) runs a compile-time specialisation of the pair kernel (resample_cuda.cu,
    kPlain; with an intensity epilogue, as the training CLI's augmentation draws it, its
    kPlainIntensity variant; with the label on its own grid, as the CLI's default --label-grid
    logits puts it (a 4x smaller grid), its kPlainOwnLabel variant). It must give what the
    general kernel gives for the same points, which a two-channel image (the channel twice)
    forces: its channel 0 has the same points and noise indices (to an ulp: see below), and
    what the CPU gives; aligned runs
    (W % 8 == 0 for kPlain's 8 voxels, W % 4 == 0 for the general kernel's 4), W = 68 (aligned
    for 4, not 8), partial runs and a row shorter than a run. align_corners=True, and an output
    grid whose D + H + W exceeds the kPlain kernel's table of base coordinates (4096), take the
    general kernel: the same results."""
    n = 3
    # (tiles: 9 and 7 rows end a plane in a partial tile, 67 and 68 voxels a row in one, 5 and
    # 33 voxels leave lanes idle, 17 rows x 40 voxels take 3 x 2 tiles per plane)
    for (d, h, w) in ((11, 9, 64), (11, 9, 67), (5, 7, 68), (3, 2, 5), (2, 17, 40), (1, 8, 33),
                      (2, 3, 4099)):
        x = torch.randn(n, 1, d + 1, h + 1, w).to(dtype)
        lab = torch.randint(0, 120, (n, 1, d + 1, h + 1, w)).to(label_dtype)
        theta = random_theta(n, strength=0.7)
        size = (n, 1, d, h, w)
        inten = _intensity(n, "cpu") if with_intensity else None
        kw = dict(align_corners=align_corners)
        if own_label_grid:  # the label grid's own runs of 4, partial ones included
            kw["label_size"] = (max(1, d // 4), max(1, h // 4), max(1, (w + 3) // 4))
        cuda_kw = dict(kw, intensity=None if inten is None else
                       {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inten.items()})
        plain = m3d.ops.affine_resample_pair(x.cuda(), lab.cuda(), theta.cuda(), size, **cuda_kw)
        general = m3d.ops.affine_resample_pair(torch.cat([x, x], 1).cuda(), lab.cuda(),
                                               theta.cuda(), (n, 2, d, h, w), **cuda_kw)
        # the same arithmetic, but two kernels: nvcc may contract a multiply-add into an FMA in
        # one and not the other, which moves a value by an ulp and can flip a nearest-label tie
        assert_nearest_close(plain[1].cpu(), general[1].cpu())
        torch.testing.assert_close(plain[0], general[0][:, :1], rtol=torch.finfo(dtype).eps,
                                   atol=1e-6)
        cpu = m3d.ops.affine_resample_pair(x, lab, theta, size, intensity=inten, **kw)
        if dtype == torch.float32:
            assert_close_long_rows(plain[0].cpu(), cpu[0], w)
        else:  # both compute in fp32 and round once
            torch.testing.assert_close(plain[0].cpu().float(), cpu[0].float(), rtol=1e-2,
                                       atol=1e-2)
        assert_nearest_close(plain[1].cpu(), cpu[1])


# ------------------------------------------------- host-side fast paths (call_without_grad, pack)


def test_call_without_grad_skips_the_autograd_layer_only_when_no_gradient_is_needed():
    """The resample wrappers call their op below the autograd layer (its Python formula costs
    more host time than a small augmentation kernel) exactly when nothing needs a gradient:
    the probe reports whether the autograd key was excluded when the op ran."""
    from med3d_ext.ops._common import call_without_grad

    def probe(*_):
        return torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality)

    x = torch.randn(3)
    xg = torch.randn(3, requires_grad=True)
    assert call_without_grad(probe, (x, None)) is True
    assert call_without_grad(probe, (x, xg)) is False       # a gradient is needed
    with torch.no_grad():
        assert call_without_grad(probe, (xg,)) is True      # grad mode off: none is
    # under a functorch transform the wrapped tensors must meet the autograd layer
    seen = []
    torch.func.grad(lambda t: (seen.append(call_without_grad(probe, (x,))), t.sum())[1])(xg.detach())
    assert seen == [False]
    # the fast path leaves autograd as it was once the call returns
    assert torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality) is False


@requires_ext
def test_pair_fast_path_keeps_results_and_the_backward_error():
    img = torch.randn(2, 1, 5, 6, 7)
    lab = torch.randint(0, 4, (2, 5, 6, 7), dtype=torch.uint8)
    theta = random_theta(2)
    size = (2, 1, 4, 5, 6)
    out, lout = m3d.ops.affine_resample_pair(img, lab, theta, size)
    ref = reference.affine_resample_pair(img, lab, theta, list(size))
    assert_close(out, ref[0])
    assert torch.equal(lout, ref[1])
    assert not out.requires_grad
    # an image that requires grad still takes the autograd layer, whose backward refuses
    out_g, _ = m3d.ops.affine_resample_pair(img.clone().requires_grad_(), lab, theta, size)
    assert torch.equal(out_g.detach(), out)
    with pytest.raises(NotImplementedError, match="not differentiable"):
        out_g.sum().backward()
    # affine_resample: a gradient for the image through the autograd layer, as before
    x = img.clone().requires_grad_()
    m3d.ops.affine_resample(x, theta, size).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pack_intensity_reuses_constant_columns_without_sharing_results():
    """The unclipped bounds are cached columns; a caller writing into one packed result must
    not change the next (the cached columns are only ever stacked into new tensors)."""
    p1, _ = reference.pack_intensity({"scale": 2.0}, 3, "cpu")
    assert torch.equal(p1[:, 4], torch.full((3,), -math.inf))
    assert torch.equal(p1[:, 5], torch.full((3,), math.inf))
    p1.fill_(0.0)
    p2, _ = reference.pack_intensity({"scale": 2.0, "shift": torch.tensor([1.0, 2.0, 3.0])}, 3, "cpu")
    assert torch.equal(p2, torch.tensor([[2.0, 1.0, 1.0, 0.0, -math.inf, math.inf],
                                         [2.0, 2.0, 1.0, 0.0, -math.inf, math.inf],
                                         [2.0, 3.0, 1.0, 0.0, -math.inf, math.inf]]))
    # another batch size gets its own columns
    p3, _ = reference.pack_intensity({}, 5, "cpu")
    assert p3.shape == (5, 6) and torch.equal(p3[:, 0], torch.ones(5))
