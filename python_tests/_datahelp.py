"""Small builders of NIfTI datasets for the data-layer tests (tiny volumes, fresh randomness
drawn from torch's seeded generator so MED3D_TEST_SEED replays a failure)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))


def affine(spacing=(1.0, 1.0, 1.0), codes="RAS", shape=(10, 10, 10), rot_deg=0.0,
           origin=(3.0, -5.0, 7.0)) -> np.ndarray:
    """An affine with the given voxel spacing, axis codes (e.g. "LPS", "PIR") and an optional
    rotation about the z axis (oblique)."""
    from nibabel import orientations as nio

    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    tr = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(codes)))
    # express the same RAS grid in the stored axis order: permute/flip columns
    ras_shape = np.asarray(shape)[tr[:, 0].astype(int)]
    a = a @ nio.inv_ornt_aff(tr, ras_shape)
    if rot_deg:
        t = np.deg2rad(rot_deg)
        r = np.eye(4)
        r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        a = r @ a
    return a


def blob_case(shape, r=None, n_labels=2, zero_border=2):
    """Image (float32, zero border) and label (uint8 in [0, n_labels)) with nested blobs."""
    r = r or rng()
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    c = r.uniform(-0.2, 0.2, 3)[:, None, None, None]
    d = np.sqrt(((grid - c) ** 2).sum(0))
    lab = np.zeros(shape, np.uint8)
    for k in range(1, n_labels):
        lab[d < 0.7 / k] = k
    img = (100 + 50 * lab + r.normal(0, 5, shape)).astype(np.float32)
    if zero_border:
        m = np.zeros(shape, bool)
        m[tuple(slice(zero_border, n - zero_border) for n in shape)] = True
        img[~m] = 0
        lab[~m] = 0
    return img, lab


def save(path, arr, aff, dtype=None):
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr if dtype is None else arr.astype(dtype), aff), str(path))
    return path


def make_msd(root, n=3, shape=(12, 11, 9), spacing=(1.0, 1.2, 2.0), codes="RAS",
             modality="MRI", labels=None, r=None, n_labels=3):
    """An MSD dataset of ``n`` blob cases; returns the root."""
    root = Path(root)
    r = r or rng()
    labels = labels or {str(i): f"c{i}" for i in range(n_labels)}
    training = []
    for i in range(n):
        sp = np.asarray(spacing) * r.uniform(0.9, 1.1, 3)
        aff = affine(sp, codes, shape)
        img, lab = blob_case(shape, r, n_labels)
        if modality == "CT":
            img = np.where(img == 0, -1000, img)
        save(root / "imagesTr" / f"c{i}.nii.gz", img, aff)
        save(root / "labelsTr" / f"c{i}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "modality": {"0": modality}, "labels": labels,
        "numTraining": n, "training": training}))
    return root
