"""RandomAugment3D: reproducibility, resume, geometry against explicit references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from med3d_ext import reference
from med3d_ext.transforms import RandomAugment3D
from python_tests.conftest import DEVICES, assert_close


def _batch(device, n=3, shape=(9, 10, 11)):
    image = torch.randn(n, 1, *shape, device=device)
    label = torch.randint(0, 5, (n, *shape), device=device, dtype=torch.uint8)
    return image, label


FULL = dict(rotate=(0.3, 0.2, 0.5), scale=(0.8, 1.2), isotropic=False, translate=0.1,
            flip=0.5, elastic=0.05, elastic_grid=4, gamma=(0.7, 1.5), contrast=(0.8, 1.2),
            brightness=(-0.1, 0.1), noise=(0.0, 0.1), clip=(-3.0, 3.0))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_reproducible_and_resumable(device):
    image, label = _batch(device)
    seed = int(torch.randint(0, 2**31, ()).item())
    a1, b1 = RandomAugment3D(seed=seed, **FULL)(image, label, (7, 8, 9), (4, 4, 4))
    aug = RandomAugment3D(seed=seed, **FULL)
    a2, b2 = aug(image, label, (7, 8, 9), (4, 4, 4))
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    torch.testing.assert_close(b1, b2, rtol=0, atol=0)
    assert a1.shape == (3, 1, 7, 8, 9) and b1.shape == (3, 4, 4, 4) and b1.dtype == torch.uint8
    state = aug.state_dict()
    nxt = aug(image, label, (7, 8, 9))
    other = RandomAugment3D(seed=seed + 1, **FULL)
    other.load_state_dict(state)
    resumed = other(image, label, (7, 8, 9))
    torch.testing.assert_close(resumed[0], nxt[0], rtol=0, atol=0)
    torch.testing.assert_close(resumed[1], nxt[1], rtol=0, atol=0)
    assert not torch.equal(nxt[0], a2[:, :, :7, :8, :9])  # the stream moved on


@pytest.mark.parametrize("device", DEVICES)
def test_identity_when_nothing_is_enabled(device):
    image, label = _batch(device)
    out, lab = RandomAugment3D(seed=1)(image, label, image.shape[2:])
    assert_close(out, image)
    assert torch.equal(lab, label)


@pytest.mark.parametrize("device", DEVICES)
def test_flip_only_equals_torch_flip(device):
    image, label = _batch(device)
    aug = RandomAugment3D(flip=(1.0, 0.0, 1.0), seed=3)
    out, lab = aug(image, label, image.shape[2:])
    assert_close(out, image.flip(-1, -3))
    assert torch.equal(lab, label.flip(-1, -3))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_pair_op_with_its_own_parameters(device):
    image, label = _batch(device)
    seed = int(torch.randint(0, 2**31, ()).item())
    aug = RandomAugment3D(seed=seed, **FULL)
    out, lab = aug(image, label, (6, 7, 8), (3, 3, 4))
    params = RandomAugment3D(seed=seed, **FULL).sample(3, image.shape[2:], (6, 7, 8), device)
    ref_img, ref_lab = reference.affine_resample_pair(
        image, label, params["theta"], (3, 1, 6, 7, 8), (3, 3, 4), elastic=params["elastic"],
        intensity=params["intensity"])
    torch.testing.assert_close(out, ref_img, rtol=1e-4, atol=1e-4)
    assert (lab != ref_lab).float().mean().item() <= 1e-3 + 1.0 / lab.numel()
    assert out.abs().max().item() <= 3.0  # clip


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_is_rigid_in_voxel_space(device):
    # A 90 degree rotation about z of an anisotropic volume maps voxel (x, y) -> (y, -x) exactly.
    image = torch.randn(1, 1, 3, 6, 6, device=device)
    aug = RandomAugment3D(rotate=(0.0, 0.0, math.pi / 2), p_affine=1.0, seed=0)
    params = aug.sample(1, image.shape[2:], image.shape[2:], device)
    ang = torch.atan2(params["theta"][0, 1, 0], params["theta"][0, 0, 0]).item()
    out, _ = RandomAugment3D(rotate=(0.0, 0.0, math.pi / 2), seed=0)(image, None, (3, 6, 6))
    ref = reference.affine_resample(image, params["theta"], (1, 1, 3, 6, 6))
    assert_close(out, ref)
    assert abs(ang) <= math.pi / 2 + 1e-6
    # rows of the linear part have unit norm (no scaling, cubic in-plane grid)
    torch.testing.assert_close(params["theta"][0, :, :3].norm(dim=1),
                               torch.ones(3, device=device), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'scale'"):
        RandomAugment3D(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="'flip'"):
        RandomAugment3D(flip=1.5)
    with pytest.raises(ValueError, match="'size'"):
        RandomAugment3D()(torch.randn(1, 1, 4, 4, 4), None, (4, 4))


def test_per_axis_scale_ranges():
    aug = RandomAugment3D(scale=((1.0, 1.0), (2.0, 2.0), (0.5, 0.5)), seed=0)
    theta = aug.sample(4, (8, 8, 8), (8, 8, 8), "cpu")["theta"]
    expected = torch.diag(torch.tensor([1.0, 0.5, 2.0])).expand(4, 3, 3)
    torch.testing.assert_close(theta[:, :, :3], expected)


# ------------------------------------------------------------------------------------ audit


@pytest.mark.parametrize("device", DEVICES)
def test_zero_probabilities_are_identity(device):
    # every transform configured, every probability 0: the batch comes back unchanged
    image, label = _batch(device)
    off = {k: v for k, v in FULL.items() if k != "clip"}
    off.update(p_affine=0.0, p_elastic=0.0, p_gamma=0.0, p_contrast=0.0, p_brightness=0.0,
               p_noise=0.0, flip=0.0)
    out, lab = RandomAugment3D(seed=int(torch.randint(0, 2**31, ()).item()), **off)(
        image, label, image.shape[2:])
    torch.testing.assert_close(out, image, rtol=1e-5, atol=1e-5)
    assert torch.equal(lab, label)


def test_probabilities_are_honoured():
    n = 1600
    aug = RandomAugment3D(rotate=0.5, p_affine=0.5, elastic=0.1, p_elastic=0.25, gamma=(0.5, 2.0),
                          p_gamma=0.75, noise=(0.1, 0.2), p_noise=0.5, flip=(0.5, 0.0, 1.0),
                          seed=int(torch.randint(0, 2**31, ()).item()))
    p = aug.sample(n, (8, 8, 8), (8, 8, 8), "cpu")
    lin = p["theta"][:, :, :3]
    flipped = torch.diagonal(lin, dim1=1, dim2=2) < 0
    rotated = ~torch.isclose(lin.abs(), torch.eye(3).expand(n, 3, 3), atol=1e-6).all(-1).all(-1)
    elastic_on = p["elastic"].flatten(1).abs().amax(1) > 0
    checks = [(rotated.float().mean(), 0.5), (elastic_on.float().mean(), 0.25),
              ((p["intensity"]["gamma"] != 1).float().mean(), 0.75),
              ((p["intensity"]["noise_std"] > 0).float().mean(), 0.5),
              (flipped[:, 1].float().mean(), 0.0)]
    for frac, expected in checks:  # binomial(n, p): within 5 sigma (a false alarm ~1e-6)
        sigma = (expected * (1 - expected) / n) ** 0.5
        assert abs(frac.item() - expected) <= 5 * sigma + 1e-6, (frac, expected, sigma)
    assert flipped[~rotated][:, 2].all()  # z flip with probability 1 (no rotation to blur it)
    g, s = p["intensity"]["gamma"], p["intensity"]["noise_std"]
    assert ((g >= 0.5 - 1e-6) & (g <= 2.0 + 1e-6)).all() and ((s == 0) | (s >= 0.1)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,label_dtype", [(torch.float16, torch.int16),
                                               (torch.bfloat16, torch.int64),
                                               (torch.float32, torch.uint8)])
def test_dtypes_and_non_contiguous_against_reference(device, dtype, label_dtype):
    n = 2
    image = torch.randn(n, 2, 12, 9, 10, device=device).to(dtype)[:, :, ::2]
    label = torch.randint(0, 6, (n, 9, 10, 6), device=device).to(label_dtype).permute(0, 3, 1, 2)
    assert not image.is_contiguous() and not label.is_contiguous()
    seed = int(torch.randint(0, 2**31, ()).item())
    out, lab = RandomAugment3D(seed=seed, **FULL)(image, label, (5, 7, 6), (3, 3, 3))
    assert out.dtype == dtype and lab.dtype == label_dtype
    params = RandomAugment3D(seed=seed, **FULL).sample(n, image.shape[2:], (5, 7, 6), device)
    ref_img, ref_lab = reference.affine_resample_pair(
        image.float(), label, params["theta"], (n, 2, 5, 7, 6), (3, 3, 3),
        elastic=params["elastic"], intensity=params["intensity"])
    torch.testing.assert_close(out.float(), ref_img, rtol=2e-2, atol=2e-2)
    assert (lab != ref_lab).float().mean().item() <= 1e-3 + 1.0 / lab.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_without_label_and_empty_batch(device):
    image, label = _batch(device)
    seed = int(torch.randint(0, 2**31, ()).item())
    out, none = RandomAugment3D(seed=seed, **FULL)(image, None, (7, 8, 9))
    with_label, _ = RandomAugment3D(seed=seed, **FULL)(image, label, (7, 8, 9))
    assert none is None
    torch.testing.assert_close(out, with_label, rtol=0, atol=0)
    out, lab = RandomAugment3D(seed=seed, **FULL)(image[:0], label[:0], (7, 8, 9), (2, 2, 2))
    assert out.shape == (0, 1, 7, 8, 9) and lab.shape == (0, 2, 2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_reseed_restarts_the_stream(device):
    image, label = _batch(device)
    aug = RandomAugment3D(seed=5, **FULL)
    first = aug(image, label, (7, 8, 9))
    aug(image, label, (7, 8, 9))
    aug.reseed(5)
    again = aug(image, label, (7, 8, 9))
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    aug.reseed(6)
    assert not torch.equal(aug(image, label, (7, 8, 9))[0], first[0])


def test_parameters_set_later_act_as_in_the_constructor():
    """A seed set later restarts the streams (they went on from the old seed while state_dict
    said the new one); one scale range after per-axis ones is isotropic again, as a new
    augmenter with it is; isotropic=True over per-axis ranges is refused (x's range was used
    for every axis silently)."""
    image, label = _batch("cpu")
    aug = RandomAugment3D(seed=1, **FULL)
    aug(image, label, (7, 8, 9))
    aug.seed = 2
    got = aug(image, label, (7, 8, 9))
    want = RandomAugment3D(seed=2, **FULL)(image, label, (7, 8, 9))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert aug.state_dict()["seed"] == 2

    a = RandomAugment3D(scale=((0.9, 1.1), (0.8, 1.2), (0.7, 1.3)))
    assert a.isotropic is False
    a.scale = (0.8, 1.2)
    assert a.isotropic is True
    b = RandomAugment3D(scale=(0.8, 1.2), isotropic=False)
    b.scale = ((0.9, 1.1),) * 2 + ((0.5, 1.5),)
    b.scale = (0.9, 1.1)
    assert b.isotropic is False  # asked for, so kept
    with pytest.raises(ValueError, match=r"'isotropic' True needs one scale range"):
        a.scale = ((0.5, 0.5), (2.0, 2.0), (1.0, 1.0))
        a.isotropic = True
    a.scale = ((0.9, 1.1),) * 3  # per-axis, but one range: isotropic is fine
    a.isotropic = True
    assert a.isotropic is True


def test_more_bad_arguments():
    bad = [dict(gamma=(0.0, 1.0)), dict(noise=(-0.1, 0.1)), dict(elastic=-1.0),
           dict(elastic_grid=1), dict(p_noise=1.5), dict(rotate=(0.1, 0.2)),
           dict(contrast=(1.2, 0.9)), dict(clip=(1.0, -1.0))]
    names = ["'gamma'", "'noise'", "'elastic'", "'elastic_grid'", "'p_noise'", "'rotate'",
             "'contrast'", "'clip'"]
    for kw, name in zip(bad, names):
        with pytest.raises(ValueError, match=name):
            RandomAugment3D(**kw)
    with pytest.raises(ValueError, match="'image'"):
        RandomAugment3D()(torch.randn(1, 4, 4, 4), None, (4, 4, 4))


def test_non_finite_parameters_and_bad_sizes_are_refused():
    # NaN/inf angles, shifts or scales made theta NaN: every sample silently came out as
    # padding; an inf brightness or noise gave non-finite images
    nan, inf = float("nan"), float("inf")
    bad = [("rotate", nan), ("rotate", (0.0, inf, 0.0)), ("translate", nan), ("scale", (1.0, inf)),
           ("elastic", nan), ("elastic", inf), ("brightness", (0.0, inf)), ("noise", (0.0, inf)),
           ("gamma", (1.0, inf)), ("elastic_grid", 2.7), ("padding_mode", "wrap")]
    for name, value in bad:
        with pytest.raises(ValueError, match=f"'{name}'"):
            RandomAugment3D(**{name: value})
    aug = RandomAugment3D(rotate=0.2)
    x = torch.randn(2, 1, 6, 6, 6)
    # a full size whose (N, C) differ from the image's was silently cut to its last 3 values
    with pytest.raises(ValueError, match=r"'size'.*\(N, C\) = \(2, 1\), got \[5, 9, 4, 4, 4\]"):
        aug(x, None, (5, 9, 4, 4, 4))
    for size in (None, "abc", (4, 4)):  # (an int is a cube: test_int_patch_as_in_the_readme)
        with pytest.raises(ValueError, match=r"'size' must be an int"):
            aug(x, None, size)
    # numpy numbers (e.g. read from a config) are numbers
    import numpy as np

    a = RandomAugment3D(rotate=np.float32(0.2), elastic=np.float64(0.05), elastic_grid=np.int64(4))
    img, _ = a(x, None, (2, 1, 4, 4, 4))
    assert img.shape == (2, 1, 4, 4, 4) and torch.isfinite(img).all()


def test_bad_seeds_and_state_are_named():
    # int(1.5) silently seeded 1; 2**70 failed at the first call inside manual_seed; a state
    # dict without 'seed' gave a bare KeyError
    for bad in (1.5, 2**70, "abc", None):
        with pytest.raises(ValueError, match=r"'seed' must be an integer"):
            RandomAugment3D(seed=bad)
        with pytest.raises(ValueError, match=r"'seed' must be an integer"):
            RandomAugment3D().reseed(bad)
    for bad in ({}, {"seed": 1}, None, {"seed": 1, "generators": [1]}):
        with pytest.raises(ValueError, match=r"load_state_dict: expected the dict of state_dict"):
            RandomAugment3D().load_state_dict(bad)
    a, b = RandomAugment3D(rotate=0.3, seed=2**64 - 1), RandomAugment3D(rotate=0.3, seed=-5)
    x = torch.randn(1, 1, 5, 5, 5)
    a(x, None, (4, 4, 4))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, None, (4, 4, 4))[0], b(x, None, (4, 4, 4))[0])


def test_int_patch_as_in_the_readme():
    """`aug(image, label, patch, label_size=patch // 4)` with an int patch (what `--patch 48`
    means) was a TypeError; an int is a cube, and a tensor of sizes is read as its values."""
    image, label = _batch("cpu")
    seed = int(torch.randint(0, 2**31, ()).item())
    patch = int(torch.randint(4, 9, ()).item())
    a, la = RandomAugment3D(seed=seed, **FULL)(image, label, patch, label_size=patch // 2)
    b, lb = RandomAugment3D(seed=seed, **FULL)(image, label, (patch,) * 3, (patch // 2,) * 3)
    assert a.shape[2:] == (patch,) * 3 and la.shape[1:] == (patch // 2,) * 3
    assert torch.equal(a, b) and torch.equal(la, lb)
    t = torch.tensor([patch, patch + 1, patch])
    c, lc = RandomAugment3D(seed=seed)(image, label, t, label_size=t // 2)
    assert c.shape[2:] == tuple(t.tolist()) and lc.shape[1:] == tuple((t // 2).tolist())
    with pytest.raises(ValueError, match="'label_size'"):
        RandomAugment3D()(image, label, patch, label_size="4")


def test_sizes_and_probabilities_are_not_truncated_or_cast():
    """int() truncated 4.5 to 4 and True to 1, float("0.5") let a string through and bool("no")
    is True: each is an error naming the argument now (TypeError, also a ValueError)."""
    aug = RandomAugment3D(seed=0)
    x = torch.randn(2, 1, 5, 5, 5)
    lab = torch.zeros(2, 5, 5, 5, dtype=torch.uint8)
    for size, label_size, name in (((4.5, 4, 4), None, "'size'"), ([True, 4, 4], None, "'size'"),
                                   ((4, 4, 4), [2.9] * 3, "'label_size'")):
        with pytest.raises(TypeError, match=f"{name} must be an int or 3 ints"):
            aug(x, lab, size, label_size=label_size)
    with pytest.raises(ValueError, match="'size'.* overflows the tensor size"):
        aug(x, lab, 2**40)
    for kw, name in ((dict(p_affine=None), "'p_affine'"), (dict(p_noise="0.5"), "'p_noise'"),
                     (dict(isotropic="no"), "'isotropic'"), (dict(rotate=None), "'rotate'")):
        with pytest.raises(TypeError, match=name):
            RandomAugment3D(**kw)
    with pytest.raises(ValueError, match=r"'elastic_grid' must be an int in \[2, 256\]"):
        RandomAugment3D(elastic=0.1, elastic_grid=10**6)
    assert aug(x, lab, (4, 3, 2))[0].shape == (2, 1, 4, 3, 2)


def test_bools_negatives_and_types_are_named():
    """flip=True read as probability 1, seed=True as 1, rotate=-0.5 acted as +0.5, and
    elastic=None / elastic_grid=3.0 raised a ValueError naming both arguments (data API audit).
    Wrong types are TypeErrors (also ValueErrors, as before)."""
    from med3d_ext._args import ArgumentTypeError

    for kw, name in ((dict(flip=True), "flip"), (dict(seed=True), "seed"),
                     (dict(rotate=(0.1, True, 0.1)), "rotate"), (dict(elastic=None), "elastic"),
                     (dict(elastic_grid=3.0), "elastic_grid"), (dict(translate="0.1"), "translate")):
        with pytest.raises(ArgumentTypeError, match=f"'{name}'"):
            RandomAugment3D(**kw)
    for kw, name in ((dict(rotate=-0.5), "rotate"), (dict(translate=(0.1, -0.1, 0.0)), "translate"),
                     (dict(elastic=-1.0), "elastic"), (dict(elastic_grid=1), "elastic_grid")):
        with pytest.raises(ValueError, match=f"'{name}'") as e:
            RandomAugment3D(**kw)
        assert not isinstance(e.value, TypeError)
    a = RandomAugment3D(rotate=np.float32(0.5), flip=(0, 0.5, 1), seed=np.int64(3),
                        elastic_grid=np.int64(4))
    assert a.rotate == (0.5, 0.5, 0.5) and a.seed == 3 and a.elastic_grid == 4
    assert RandomAugment3D(seed=torch.tensor(7)).seed == 7  # worked before, still does


def test_a_state_with_an_absent_device_leaves_the_augmenter_whole():
    """Loading a GPU run's state on a machine without CUDA cleared the generators and set the
    seed before failing in torch's terms (data API audit): the state is checked aside, the
    absent device's stream is skipped with a warning, the others are restored."""
    aug = RandomAugment3D(rotate=0.3, seed=5)
    x = torch.randn(2, 1, 6, 7, 5)
    aug(x, None, (6, 7, 5))
    state = aug.state_dict()
    # the realistic case: a GPU run's state on a machine without CUDA (and a device name that
    # does not parse at all)
    absent = "bogus:0" if torch.cuda.is_available() else "cuda:0"
    bad = {"seed": 9, "generators": dict(state["generators"], **{absent: torch.zeros(8)})}
    with pytest.warns(UserWarning, match=f"streams of {absent} are not restored"):
        aug.load_state_dict(bad)
    twin = RandomAugment3D(rotate=0.3, seed=9)
    twin.load_state_dict(state)
    torch.testing.assert_close(aug(x, None, (6, 7, 5))[0], twin(x, None, (6, 7, 5))[0],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed"):  # a bad state changes nothing
        aug.load_state_dict({"seed": -2**70, "generators": {}})
    assert aug.seed == 9


# ------------------------------------------------------------------ the batched parameter draw


def _rotation(axis: int, t: float) -> np.ndarray:
    c, s = math.cos(t), math.sin(t)
    return {0: np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            1: np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            2: np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _reference_sample(aug, n, in_spatial, out_spatial, device):
    """What RandomAugment3D.sample draws, one sample at a time in float64 with math.cos/sin and
    explicit rotation matrices, from the same generator stream: the (n, 22) uniforms (columns:
    affine coin, 3 angles, 3 zooms, 3 shifts, 3 flip coins, elastic coin, then gamma, contrast,
    brightness, noise each followed by its coin), the elastic field, the noise seeds."""
    g = torch.Generator(device=device)
    g.manual_seed(aug.seed)
    u = torch.rand((n, 22), generator=g, device=device, dtype=torch.float32).double().cpu()
    u = u.numpy()
    field = torch.randn((n, 3, aug.elastic_grid, aug.elastic_grid, aug.elastic_grid),
                        generator=g, device=device, dtype=torch.float32)
    seeds = torch.randint(0, 2**62, (n,), generator=g, device=device)
    off = 1 if aug.align_corners else 0
    k_in = [max(s - off, 1) for s in reversed(in_spatial)]
    k_out = [max(s - off, 1) for s in reversed(out_spatial)]
    theta = np.zeros((n, 3, 4))
    mag, inten = np.zeros(n), {k: np.zeros(n) for k in ("gamma", "scale", "shift", "noise_std")}
    for i, r in enumerate(u):
        on = r[0] < aug.p_affine
        ang = [(-a + 2 * a * r[1 + k]) if on else 0.0 for k, a in enumerate(aug.rotate)]
        zoom = [(lo + (hi - lo) * r[4 + k]) if on else 1.0 for k, (lo, hi) in enumerate(aug.scale)]
        if aug.isotropic:
            zoom = [zoom[0]] * 3
        shift = [(-t + 2 * t * r[7 + k]) if on else 0.0 for k, t in enumerate(aug.translate)]
        flip = [-1.0 if r[10 + k] < p else 1.0 for k, p in enumerate(aug.flip)]
        rot = _rotation(2, ang[2]) @ _rotation(1, ang[1]) @ _rotation(0, ang[0])
        for a in range(3):
            for b in range(3):
                theta[i, a, b] = rot[a, b] * flip[b] / zoom[b] * k_out[b] / k_in[a]
        theta[i, :, 3] = shift
        mag[i] = aug.elastic if r[13] < aug.p_elastic else 0.0
        (g0, g1), (c0, c1), (b0, b1), (n0, n1) = aug.gamma, aug.contrast, aug.brightness, aug.noise
        lg0, lg1 = math.log(g0), math.log(g1)
        inten["gamma"][i] = math.exp(lg0 + (lg1 - lg0) * r[14]) if r[15] < aug.p_gamma else 1.0
        inten["scale"][i] = c0 + (c1 - c0) * r[16] if r[17] < aug.p_contrast else 1.0
        inten["shift"][i] = b0 + (b1 - b0) * r[18] if r[19] < aug.p_brightness else 0.0
        inten["noise_std"][i] = n0 + (n1 - n0) * r[20] if r[21] < aug.p_noise else 0.0
    return theta, field * torch.from_numpy(mag).float().to(device).view(n, 1, 1, 1, 1), inten, seeds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["full", "isotropic, half the coins", "align_corners, flips"])
def test_sample_equals_a_per_sample_reference(device, kind):
    # The batched draw (one uniform tensor, a score of batched ops) against the same parameters
    # built one sample at a time with explicit rotation matrices (float64).
    kw = dict(FULL)
    if kind.startswith("isotropic"):
        kw.update(isotropic=True, p_affine=0.5, p_elastic=0.5, p_gamma=0.5, p_contrast=0.5,
                  p_brightness=0.5, p_noise=0.5)
    elif kind.startswith("align"):
        kw.update(align_corners=True, flip=(0.3, 0.9, 0.5), rotate=(1.0, 2.0, 3.0))
    seed = int(torch.randint(0, 2**31, ()).item())
    n = int(torch.randint(5, 40, ()).item())
    in_sp, out_sp = (9, 12, 7), (5, 6, 11)
    aug = RandomAugment3D(seed=seed, **kw)
    got = aug.sample(n, in_sp, out_sp, device)
    theta, field, inten, seeds = _reference_sample(aug, n, in_sp, out_sp, device)
    assert got["theta"].shape == (n, 3, 4) and got["theta"].dtype == torch.float32
    torch.testing.assert_close(got["theta"].double().cpu(), torch.from_numpy(theta),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["elastic"], field, rtol=1e-6, atol=0)
    for k, ref in inten.items():
        torch.testing.assert_close(got["intensity"][k].double().cpu(), torch.from_numpy(ref),
                                   rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(got["intensity"]["seed"], seeds)
    assert got["intensity"]["clip"] == (-3.0, 3.0)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_is_a_fixed_handful_of_ops(device):
    # On a GPU every op of the parameter draw is a kernel launch, once per training step; drawn
    # one parameter at a time it was 90 compute ops (14 separate random draws) at the FULL
    # settings; now one draw each of rand / randn / randint and ~16 batched ops, whatever the
    # settings (a fixed number of draws per call keeps a stream reproducible).
    from torch.profiler import ProfilerActivity, profile

    views = {"select", "slice", "unsqueeze", "view", "expand", "unbind", "to", "detach",
             "alias", "as_strided", "_unsafe_view", "empty", "reshape"}
    for kw in (FULL, {}, dict(FULL, isotropic=True, p_affine=0.0, elastic=0.0, clip=None)):
        aug = RandomAugment3D(seed=1, **kw)
        aug.sample(8, (20, 20, 20), (16, 16, 16), device)  # the tables go to the device once
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            aug.sample(8, (20, 20, 20), (16, 16, 16), device)
        top = [e.name[len("aten::"):] for e in prof.events() if e.name.startswith("aten::")
               and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
        compute = [op for op in top if op not in views]
        assert [op for op in compute if op.startswith("rand")] == ["rand", "randn", "randint"]
        assert len(compute) <= 20, compute


def test_the_draw_is_float32_whatever_the_default_dtype():
    """The rotation basis was made in the default dtype at import and the elastic field in the
    one of each call, so theta's dtype and the stream (the field is drawn before the seeds)
    depended on when torch.set_default_dtype(torch.float64) was called."""
    seed = int(torch.randint(0, 2**31, ()).item())
    want = RandomAugment3D(seed=seed, **FULL).sample(3, (9, 10, 11), (7, 8, 9), "cpu")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = RandomAugment3D(seed=seed, **FULL).sample(3, (9, 10, 11), (7, 8, 9), "cpu")
    finally:
        torch.set_default_dtype(old)
    assert got["theta"].dtype == torch.float32 and got["elastic"].dtype == torch.float32
    assert torch.equal(got["theta"], want["theta"]) and torch.equal(got["elastic"],
                                                                   want["elastic"])
    assert torch.equal(got["intensity"]["seed"], want["intensity"]["seed"])


def test_parameters_set_later_are_checked_and_normalised():
    """aug.scale = (0.85, 1.25) or aug.rotate = 0.5 (forms the constructor takes) failed at the
    next call; an out-of-range probability or a NaN angle set later passed silently (a NaN
    angle gave all-zero images)."""
    image, label = _batch("cpu")
    seed = int(torch.randint(0, 2**31, ()).item())
    later = RandomAugment3D(seed=seed)
    for name, value in FULL.items():
        setattr(later, name, value)
    want = RandomAugment3D(seed=seed, **FULL)(image, label, (7, 8, 9))
    got = later(image, label, (7, 8, 9))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    aug = RandomAugment3D(seed=0)
    aug.rotate, aug.translate, aug.flip = 0.5, 0.3, 1.0
    assert aug.rotate == (0.5,) * 3 and aug.translate == (0.3,) * 3 and aug.flip == (1.0,) * 3
    aug.scale = ((1.0, 1.0), (2.0, 2.0), (0.5, 0.5))  # per-axis ranges: not isotropic
    assert aug.isotropic is False and aug.scale[1] == (2.0, 2.0)
    aug.scale = (0.85, 1.25)
    assert aug.scale == ((0.85, 1.25),) * 3
    assert torch.isfinite(aug(image, label, (7, 8, 9))[0]).all()
    for name, bad, err in (("p_affine", 1.5, ValueError), ("rotate", (-1.0,) * 3, ValueError),
                           ("rotate", (float("nan"),) * 3, ValueError),
                           ("scale", (1.2, 0.8), ValueError), ("elastic_grid", 1, ValueError),
                           ("isotropic", "no", TypeError), ("padding_mode", "wrap", ValueError),
                           ("clip", (1.0, -1.0), ValueError), ("seed", 1.5, TypeError)):
        before = getattr(aug, name)
        with pytest.raises(err, match=f"'{name}'"):
            setattr(aug, name, bad)
        assert getattr(aug, name) == before  # unchanged
