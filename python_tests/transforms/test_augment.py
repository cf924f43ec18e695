"""RandomAugment3D: reproducibility, resume, geometry against explicit references."""

from __future__ import annotations

import math

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
