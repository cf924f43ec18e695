"""affine_resample / affine_resample_pair / resize / resample_to_spacing: edge cases for every
argument (non-contiguous, empty, low precision, both align_corners), determinism, intensity
against an explicit formula, elastic against an exact translation, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import med3d_ext as m3d
from med3d_ext import _extension, reference
from python_tests.conftest import DEVICES, assert_close, assert_low_precision_close
from python_tests.ops.test_resample import (PADDINGS, _intensity, assert_nearest_close,
                                            grid_sample_ref, random_theta, requires_ext)

# ------------------------------------------------------------- audit: edge cases, every argument


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_low_precision_both_modes(device, dtype, align_corners):
    x = torch.randn(2, 2, 7, 6, 9, device=device).to(dtype)
    theta = random_theta(2, device)
    size = (2, 2, 5, 8, 7)
    out = m3d.ops.affine_resample(x, theta, size, padding_mode="border",
                                  align_corners=align_corners)
    ref32 = grid_sample_ref(x.float(), theta, size, "bilinear", "border", align_corners)
    lowp = grid_sample_ref(x, theta.to(dtype), size, "bilinear", "border", align_corners)
    assert out.dtype == dtype
    assert_low_precision_close(out, lowp, ref32)
    # nearest copies low-precision values unchanged
    near = m3d.ops.affine_resample(x, theta, size, mode="nearest", align_corners=align_corners)
    assert_nearest_close(near, grid_sample_ref(x.float(), theta, size, "nearest", "zeros",
                                               align_corners).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_calls_are_bitwise_equal(device):
    n = 2
    x = torch.randn(n, 3, 9, 8, 11, device=device)
    lab = torch.randint(0, 9, (n, 9, 8, 11), device=device, dtype=torch.uint8)
    theta = random_theta(n, device)
    elastic = torch.randn(n, 3, 3, 4, 3, device=device) * 0.1
    inten = _intensity(n, device)
    calls = lambda: (  # noqa: E731
        m3d.ops.affine_resample(x, theta, (n, 3, 7, 6, 9), padding_mode="reflection"),
        m3d.ops.affine_resample(lab[:, None], theta, (n, 1, 7, 6, 9), mode="nearest"),
        *m3d.ops.affine_resample_pair(x, lab, theta, (n, 3, 7, 6, 9), (3, 2, 4),
                                      elastic=elastic, intensity=inten),
        m3d.ops.resize(x, (5, 13, 4)))
    for a, b in zip(calls(), calls()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_pair_align_corners_elastic_coarse_label(device, padding_mode):
    # align_corners=True with every option on: elastic field, intensity and a coarser label grid
    n = 2
    x = torch.randn(n, 2, 8, 9, 7, device=device)
    lab = torch.randint(0, 6, (n, 1, 8, 9, 7), device=device, dtype=torch.int64)
    theta = random_theta(n, device, strength=0.5)
    elastic = torch.randn(n, 3, 3, 5, 4, device=device) * 0.1
    inten = _intensity(n, device)
    size, label_size = (n, 2, 9, 6, 11), (3, 2, 5)
    kw = dict(elastic=elastic, intensity=inten, padding_mode=padding_mode, align_corners=True)
    img, out_lab = m3d.ops.affine_resample_pair(x, lab, theta, size, label_size, **kw)
    ref_img, ref_lab = reference.affine_resample_pair(x, lab, theta, size, label_size, **kw)
    assert out_lab.shape == (n, 1, *label_size) and out_lab.dtype == torch.int64
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    assert_nearest_close(out_lab, ref_lab)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_constant_elastic_equals_translation(device, align_corners):
    # independent of the reference's elastic construction: a constant displacement d (in
    # normalised units) is the affine map with d added to the translation column
    n = 2
    x = torch.randn(n, 1, 7, 8, 9, device=device)
    lab = torch.randint(0, 5, (n, 7, 8, 9), device=device, dtype=torch.uint8)
    theta = random_theta(n, device, strength=0.5)
    d = (torch.rand(n, 3, device=device) - 0.5) * 0.4
    elastic = d.view(n, 3, 1, 1, 1).expand(n, 3, 4, 3, 5)  # stride-0: non-contiguous too
    shifted = theta.clone()
    shifted[:, :, 3] += d
    size = (n, 1, 6, 9, 8)
    img, out_lab = m3d.ops.affine_resample_pair(x, lab, theta, size, (3, 4, 4), elastic=elastic,
                                                align_corners=align_corners)
    exp_img = grid_sample_ref(x, shifted, size, "bilinear", "zeros", align_corners)
    exp_lab = grid_sample_ref(lab[:, None].double(), shifted.double(), (n, 1, 3, 4, 4),
                              "nearest", "zeros", align_corners)[:, 0].to(torch.uint8)
    torch.testing.assert_close(img, exp_img, rtol=1e-4, atol=1e-4)
    assert_nearest_close(out_lab, exp_lab)


@pytest.mark.parametrize("device", DEVICES)
def test_intensity_against_explicit_formula(device):
    # identity resampling (align_corners=True, same grid) isolates the epilogue, which is then
    # written out here independently of reference.intensity_epilogue: gamma on |v| with the
    # sign kept, scale, shift, noise from the documented hash, per-sample clip
    n = 3
    x = torch.randn(n, 2, 5, 6, 7, device=device) * 2
    lab = torch.zeros(n, 5, 6, 7, device=device, dtype=torch.uint8)
    theta = torch.eye(3, 4, device=device).expand(n, 3, 4)
    gamma = torch.tensor([1.0, 0.6, 1.7], device=device)
    scale, shift = torch.rand(n, device=device) + 0.5, torch.randn(n, device=device)
    std = torch.tensor([0.0, 0.3, 0.1], device=device)
    clip = torch.stack([-torch.rand(n, device=device) - 1, torch.rand(n, device=device) + 1], 1)
    seed = torch.randint(0, 2**62, (n,), device=device)
    inten = {"gamma": gamma, "scale": scale, "shift": shift, "noise_std": std, "clip": clip,
             "seed": seed}
    img, _ = m3d.ops.affine_resample_pair(x, lab, theta, x.shape, intensity=inten,
                                          align_corners=True)
    b = lambda t: t.view(n, 1, 1, 1, 1)  # noqa: E731
    v = x.double()
    v = torch.sign(v) * v.abs() ** b(gamma).double()
    v = v * b(scale).double() + b(shift).double()
    key = reference.noise_key(seed, torch.arange(n, device=device)).view(n, 1, 1, 1, 1)
    z = reference.noise_normal(key, torch.arange(x[0].numel(), device=device).view(1, *x.shape[1:]))
    v = v + b(std).double() * z.double()
    v = torch.minimum(torch.maximum(v, b(clip[:, 0]).double()), b(clip[:, 1]).double())
    torch.testing.assert_close(img.double(), v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_pair_every_argument_non_contiguous(device):
    n = 2
    x = torch.randn(n, 3, 8, 7, 12, device=device)[:, ::2, :, :, ::2]
    lab = torch.randint(0, 7, (n, 6, 8, 7), device=device, dtype=torch.int16).permute(0, 2, 3, 1)
    theta = random_theta(n, device).transpose(1, 2).contiguous().transpose(1, 2)
    elastic = (torch.randn(n, 3, 4, 3, 6, device=device) * 0.1)[..., ::2]
    base = _intensity(n, device)
    inten = {k: (torch.stack([v, v], 1)[:, 0] if torch.is_tensor(v) else v)
             for k, v in base.items()}
    assert not any(t.is_contiguous() for t in (x, lab, theta, elastic, inten["scale"],
                                               inten["seed"]))
    size = (n, 2, 5, 6, 7)
    got = m3d.ops.affine_resample_pair(x, lab, theta, size, (3, 3, 2), elastic=elastic,
                                       intensity=inten)
    exp = reference.affine_resample_pair(x.contiguous(), lab.contiguous(), theta.contiguous(),
                                         size, (3, 3, 2), elastic=elastic.contiguous(),
                                         intensity=base)
    torch.testing.assert_close(got[0], exp[0], rtol=1e-4, atol=1e-4)
    assert_nearest_close(got[1], exp[1])


@pytest.mark.parametrize("device", DEVICES)
def test_pair_empty_channel_label_grid_and_batch(device):
    n = 2
    lab = torch.randint(0, 3, (n, 5, 6, 7), device=device, dtype=torch.uint8)
    theta = random_theta(n, device)
    img, out_lab = m3d.ops.affine_resample_pair(torch.randn(n, 0, 5, 6, 7, device=device), lab,
                                                theta, (n, 0, 4, 4, 4))
    assert img.shape == (n, 0, 4, 4, 4)
    assert_nearest_close(out_lab, reference.affine_resample_pair(
        torch.randn(n, 1, 5, 6, 7, device=device), lab, theta, (n, 1, 4, 4, 4))[1])
    img, out_lab = m3d.ops.affine_resample_pair(torch.randn(n, 2, 5, 6, 7, device=device), lab,
                                                theta, (n, 2, 4, 3, 5), (0, 2, 2))
    assert img.shape == (n, 2, 4, 3, 5) and out_lab.shape == (n, 0, 2, 2)
    img, out_lab = m3d.ops.affine_resample_pair(
        torch.randn(0, 2, 5, 6, 7, device=device), lab[:0], theta[:0], (0, 2, 4, 3, 5), (2, 2, 2),
        elastic=torch.zeros(0, 3, 3, 3, 3, device=device),
        intensity={"noise_std": 0.1, "seed": torch.zeros(0, dtype=torch.int64, device=device)})
    assert img.shape == (0, 2, 4, 3, 5) and out_lab.shape == (0, 2, 2, 2)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_pair_backward_raises(device):
    # not differentiable: asking for a gradient is an error, not a silent None
    x = torch.randn(1, 1, 4, 4, 4, device=device, requires_grad=True)
    lab = torch.zeros(1, 4, 4, 4, device=device, dtype=torch.uint8)
    img, _ = m3d.ops.affine_resample_pair(x, lab, random_theta(1, device), (1, 1, 3, 3, 3))
    with pytest.raises(NotImplementedError, match="affine_resample_pair is not differentiable"):
        img.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_more_errors_name_the_argument(device):
    x = torch.randn(2, 1, 4, 4, 4, device=device)
    lab = torch.zeros(2, 4, 4, 4, device=device, dtype=torch.uint8)
    theta = random_theta(2, device)
    other = "cpu" if device != "cpu" else "meta"
    pair = m3d.ops.affine_resample_pair
    with pytest.raises(ValueError, match=r"'image' must be 5-D.*\(1, 4, 4, 4\)"):
        m3d.ops.affine_resample(x[0], theta, (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"'mode' must be one of.*'bicubic'"):
        m3d.ops.affine_resample(x, theta, (2, 1, 3, 3, 3), mode="bicubic")
    with pytest.raises(ValueError, match=r"'size' must be non-negative.*-1"):
        m3d.ops.affine_resample(x, theta, (2, 1, -1, 3, 3))
    with pytest.raises(RuntimeError, match=r"'image' must be non-empty along its spatial axes"):
        m3d.ops.affine_resample(x[:, :, :0], theta, (2, 1, 3, 3, 3))
    with pytest.raises(TypeError, match=r"'image' must be floating point.*torch.int64"):
        pair(x.long(), lab, theta, (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"'size' must be 5 ints"):
        pair(x, lab, theta, (1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"'label_size' must be 3 ints.*\(2, 2\)"):
        pair(x, lab, theta, (2, 1, 3, 3, 3), (2, 2))
    with pytest.raises(ValueError, match=r"'theta' must be \(N, 3, 4\).*\(2, 3, 3\)"):
        pair(x, lab, theta[..., :3], (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"'label' must be.*N = 2.*\(1, 4, 4, 4\)"):
        pair(x, lab[:1], theta, (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"'label' is on"):
        pair(x, lab.to(other), theta, (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"'elastic' is on"):
        pair(x, lab, theta, (2, 1, 3, 3, 3), elastic=torch.zeros(2, 3, 3, 3, 3, device=other))
    with pytest.raises(ValueError, match=r"'theta' is on"):
        pair(x, lab, theta.to(other), (2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"intensity\['scale'\] must be a scalar or \(2,\)"):
        pair(x, lab, theta, (2, 1, 3, 3, 3), intensity={"scale": torch.ones(3, device=device)})
    # the intensity dict's values (a black-box audit: a float seed was truncated, NaN factors
    # turned the output into NaN, and the rest failed with messages naming nothing)
    for bad, err, want in (
            ({"seed": 1.5}, TypeError, r"intensity\['seed'\] must be an int.*1.5"),
            ({"seed": 2**70}, ValueError, r"intensity\['seed'\] must fit in int64"),
            ({"seed": torch.ones(2, device=device)}, TypeError, r"intensity\['seed'\] must be an int"),
            ({"gamma": float("nan")}, ValueError, r"intensity\['gamma'\] must be finite, got nan"),
            ({"scale": float("inf")}, ValueError, r"intensity\['scale'\] must be finite"),
            ({"scale": "2"}, TypeError, r"intensity\['scale'\] must be a number.*'2'"),
            ({"clip": 1.0}, ValueError, r"intensity\['clip'\] must be \(min, max\).*1.0"),
            ({"clip": (0, 1, 2)}, ValueError, r"intensity\['clip'\] must be \(min, max\)")):
        with pytest.raises(err, match=want):
            pair(x, lab, theta, (2, 1, 3, 3, 3), intensity=bad)
    # an infinite clip bound is no bound
    out = pair(x, lab, theta, (2, 1, 3, 3, 3), intensity={"clip": (-math.inf, math.inf)})
    torch.testing.assert_close(out[0], pair(x, lab, theta, (2, 1, 3, 3, 3))[0])
    if _extension.available():
        with pytest.raises(RuntimeError, match=r"'elastic' must be floating point.*Long"):
            pair(x, lab, theta, (2, 1, 3, 3, 3),
                 elastic=torch.zeros(2, 3, 3, 3, 3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"'size' must be 3 ints.*\(4, 5\)"):
        m3d.ops.resize(x, (4, 5))
    with pytest.raises(ValueError, match=r"'mode' must be one of.*'bilinear'"):
        m3d.ops.resize(x, (4, 5, 5), "bilinear")
    with pytest.raises(ValueError, match=r"'image' must be 5-D"):
        m3d.ops.resize(x[0], (4, 5, 5))
    with pytest.raises(ValueError, match=r"'spacing' must be 3 positive floats.*nan"):
        m3d.ops.resample_to_spacing(x, (1, float("nan"), 1), (2, 2, 2))
    with pytest.raises(ValueError, match=r"'image' must be \(C, D, H, W\)"):
        m3d.ops.resample_to_spacing(x[0, 0], (1, 1, 1), (2, 2, 2))


# --------------------------------------------------------------------------- resize: audit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
def test_resize_non_contiguous_and_empty(device, mode):
    kw = {"align_corners": False} if mode == "trilinear" else {}
    x = torch.randn(2, 3, 9, 6, 5, device=device)
    for v in (x.transpose(2, 4), x[:, ::2, 1:, :, ::2], x.to(memory_format=torch.channels_last_3d)):
        assert_close(m3d.ops.resize(v, (4, 11, 7), mode),
                     F.interpolate(v, size=(4, 11, 7), mode=mode, **kw))
    assert m3d.ops.resize(x[:0], (4, 11, 7), mode).shape == (0, 3, 4, 11, 7)
    # F.interpolate refuses an empty channel axis; the op returns the empty result
    assert m3d.ops.resize(x[:, :0], (4, 11, 7), mode).shape == (2, 0, 4, 11, 7)
    if _extension.available():
        with pytest.raises(RuntimeError, match=r"'image' must be non-empty along every spatial"):
            m3d.ops.resize(x[:, :, :0], (4, 11, 7), mode)


@pytest.mark.parametrize("device", DEVICES)
def test_resize_int16_nearest_and_fp16(device):
    lab = torch.randint(-3000, 3000, (2, 1, 5, 7, 6), device=device, dtype=torch.int16)
    out = m3d.ops.resize(lab, (9, 4, 11), "nearest")
    assert out.dtype == torch.int16
    assert_close(out, F.interpolate(lab.float(), size=(9, 4, 11), mode="nearest").to(torch.int16))
    x = torch.randn(2, 2, 5, 6, 7, device=device).half()
    assert_low_precision_close(m3d.ops.resize(x, (9, 4, 8)),
                               F.interpolate(x, size=(9, 4, 8), mode="trilinear"),
                               F.interpolate(x.float(), size=(9, 4, 8), mode="trilinear"))


@pytest.mark.parametrize("device", DEVICES)
def test_resize_and_affine_gradcheck_on_device(device):
    x = torch.randn(1, 2, 3, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m3d.ops.resize(t, (4, 3, 5)), (x,))
    theta = random_theta(1, device, dtype=torch.float64)
    for ac in (False, True):
        assert torch.autograd.gradcheck(
            lambda t: m3d.ops.affine_resample(t, theta, (1, 2, 3, 3, 4), padding_mode="reflection",
                                              align_corners=ac), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_resample_to_spacing_batched_equals_per_sample(device):
    x = torch.randn(3, 2, 9, 7, 8, device=device).transpose(3, 4)  # non-contiguous
    sp, nsp = (1.0, 2.0, 0.7), (1.5, 1.2, 1.0)
    batched = m3d.ops.resample_to_spacing(x, sp, nsp)
    for i in range(3):
        assert_close(batched[i], m3d.ops.resample_to_spacing(x[i], sp, nsp))
    size = [max(1, math.floor(s * a / b + 0.5)) for s, a, b in zip(x.shape[2:], sp, nsp)]
    assert_close(batched, F.interpolate(x, size=size, mode="trilinear"))


@pytest.mark.parametrize("device", DEVICES)
def test_labels_of_any_dtype_and_theta_of_another_dtype(device):
    # "any dtype" labels (bool, negative int8, float32 and bfloat16 values) are copied bit for
    # bit by nearest; a float64 / float16 theta with a float32 image is accepted (coordinates
    # in float32) and equals grid_sample with that theta in float32
    n = 2
    x = torch.randn(n, 1, 7, 8, 9, device=device)
    theta = random_theta(n, device, strength=0.5)
    labels = [torch.rand(n, 7, 8, 9, device=device) > 0.5,
              torch.randint(-100, 100, (n, 7, 8, 9), device=device, dtype=torch.int8),
              torch.randn(n, 7, 8, 9, device=device),
              torch.randn(n, 7, 8, 9, device=device).bfloat16()]
    for lab in labels:
        out = m3d.ops.affine_resample_pair(x, lab, theta, (n, 1, 5, 6, 7), (3, 3, 4))[1]
        ref = reference.affine_resample_pair(x, lab, theta, (n, 1, 5, 6, 7), (3, 3, 4))[1]
        assert out.dtype == lab.dtype
        assert_nearest_close(out, ref)
        single = m3d.ops.affine_resample(lab[:, None], theta, (n, 1, 5, 6, 7), mode="nearest")
        assert_nearest_close(single, reference.affine_resample(lab[:, None], theta,
                                                               (n, 1, 5, 6, 7), "nearest"))
    for th in (theta.double(), theta.half()):
        assert_close(m3d.ops.affine_resample(x, th, (n, 1, 5, 6, 7)),
                     grid_sample_ref(x, th.float(), (n, 1, 5, 6, 7), "bilinear", "zeros", False))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_of_empty_outputs(device):
    # the forward allows empty batches, channels and output sizes; so must the backward (it
    # used to fail in F.affine_grid / upsample's backward): zero gradients of the input's shape
    theta = random_theta(2, device)
    cases = [(torch.randn(0, 2, 4, 4, 4, device=device), theta[:0], (0, 2, 3, 3, 3)),
             (torch.randn(2, 0, 4, 4, 4, device=device), theta, (2, 0, 3, 3, 3)),
             (torch.randn(2, 2, 4, 4, 4, device=device), theta, (2, 2, 0, 3, 3))]
    for x, th, size in cases:
        for mode in ("bilinear", "nearest"):
            xg = x.clone().requires_grad_()
            out = m3d.ops.affine_resample(xg, th, size, mode=mode)
            assert out.shape == size
            (g,) = torch.autograd.grad(out.sum(), xg)
            assert g.shape == x.shape and not g.abs().sum()
    for x, size in ((torch.randn(0, 2, 4, 4, 4, device=device), (3, 5, 2)),
                    (torch.randn(2, 0, 4, 4, 4, device=device), (3, 5, 2)),
                    (torch.randn(2, 2, 4, 4, 4, device=device), (0, 5, 2))):
        xg = x.clone().requires_grad_()
        out = m3d.ops.resize(xg, size)
        assert out.shape == x.shape[:2] + size
        (g,) = torch.autograd.grad(out.sum(), xg)
        assert g.shape == x.shape and not g.abs().sum()


@pytest.mark.parametrize("device", DEVICES)
def test_non_integer_sizes_and_bad_spacings_are_refused(device):
    # int() used to truncate a size of 4.5 to 4 silently; None / text spacings gave raw
    # TypeErrors from float()
    x = torch.randn(2, 3, 5, 6, 7, device=device)
    theta = random_theta(2, device)
    with pytest.raises(TypeError, match=r"'size' must be 5 ints, got \(2, 3, 4.5, 5, 6\)"):
        m3d.ops.affine_resample(x, theta, (2, 3, 4.5, 5, 6))
    with pytest.raises(TypeError, match=r"'size' must be 3 ints, got \(3.0, 4, 5\)"):
        m3d.ops.resize(x, (3.0, 4, 5))
    with pytest.raises(TypeError, match=r"'label_size' must be 3 ints"):
        m3d.ops.affine_resample_pair(x, torch.zeros(2, 5, 6, 7, device=device), theta,
                                     (2, 3, 4, 5, 6), (1.5, 2, 2))
    for bad in (None, "abc", 1.0):
        with pytest.raises(TypeError, match=r"'spacing' must be 3 positive floats"):
            m3d.ops.resample_to_spacing(x, bad, (2, 2, 2))
    # a units mix-up (1 mm -> 1e-30) failed in the op's argument parser on an int64 overflow,
    # naming neither spacing
    with pytest.raises(ValueError, match=r"resample_to_spacing: spacing \[1.0, 1.0, 1.0\] -> "
                                         r"new_spacing \[1e-30, 1.0, 1.0\].*same unit"):
        m3d.ops.resample_to_spacing(x, (1, 1, 1), (1e-30, 1, 1))
    # integer-like sizes (numpy ints, 0-d int tensors) and array spacings still work
    import numpy as np

    out = m3d.ops.resize(x, (np.int64(3), torch.tensor(4), 5))
    torch.testing.assert_close(out, m3d.ops.resize(x, (3, 4, 5)))
    out = m3d.ops.resample_to_spacing(x, torch.tensor([1.0, 1.0, 1.0]), np.array([2.0, 2, 2]))
    assert out.shape == (2, 3, 3, 3, 4)


# ------------------------------------------------------------- NaN: kept where the reference keeps it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("intensity", [None, {"scale": 2.0}, {"clip": (-1.0, 1.0)},
                                       {"gamma": 0.5, "shift": 1.0}])
def test_nan_voxels_stay_nan_through_the_intensity_pass(device, intensity):
    """fmaxf/fminf drop NaN: a corrupt voxel became the clip minimum (-inf without a clip)."""
    img = torch.randn(2, 1, 3, 4, 5, device=device)
    img[0, 0, 1, 2, 3] = float("nan")
    img[1, 0, 0, 0, 0] = float("nan")
    lab = torch.zeros(2, 3, 4, 5, dtype=torch.uint8, device=device)
    theta = torch.eye(3, 4, device=device).expand(2, 3, 4)  # identity: voxels map to themselves
    out, _ = m3d.ops.affine_resample_pair(img, lab, theta, (2, 1, 3, 4, 5), intensity=intensity,
                                          align_corners=True)
    ref, _ = reference.affine_resample_pair(img, lab, theta, (2, 1, 3, 4, 5),
                                            intensity=intensity, align_corners=True)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() >= 2
    assert_close(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_nan_theta_samples_as_grid_sample_does(device, padding_mode, align_corners):
    """ATen clamps a NaN coordinate to the last voxel (std::min/std::max order); ours went to
    the first. Meaningless values either way, but the op promises grid_sample's."""
    img = torch.randn(1, 2, 3, 4, 5, device=device)
    theta = torch.eye(3, 4, device=device).unsqueeze(0).clone()
    theta[0, 0, 0] = float("nan")
    size = (1, 2, 2, 3, 4)
    out = m3d.ops.affine_resample(img, theta, size, padding_mode=padding_mode,
                                  align_corners=align_corners)
    ref = grid_sample_ref(img, theta, size, "bilinear", padding_mode, align_corners)
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close(out.nan_to_num(), ref.nan_to_num())
