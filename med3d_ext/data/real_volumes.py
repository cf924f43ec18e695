"""MSD-format datasets built from real volumes that install with packages (no downloads).

* ``Real01_MNI152Tissue`` (nilearn): the MNI ICBM152 2009 T1 template and its grey/white
  matter probability maps; label = argmax over {background, GM, WM}, with background where
  neither map reaches ``threshold``.
* ``Real02_Colin27Brain`` (Debian ``mricron-data``, only when installed): Colin27 T1 (ch2)
  with the brain mask of its brain-extracted copy (ch2bet > 0).

Each template is one volume, so cases are random crops plus augmentations: resampling to a
random spacing, intensity scale/gamma, a smooth bias field, noise and random axis flips
(stored as a different orientation with a matching affine, so headers are exercised too).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import read_volume, save_nifti
from .preprocess import resize_affine
from .synthetic import _smooth

MRICRON_DIR = Path("/usr/share/mricron/templates")


def nilearn_mni_files() -> dict:
    """Paths of nilearn's bundled MNI152 T1/GM/WM files; ImportError names the package."""
    try:
        import nilearn.datasets
    except ImportError:
        raise ImportError("the real MNI152 dataset needs nilearn: pip install nilearn "
                          "(or pip install 'med3d_ext[real]')") from None
    d = Path(nilearn.datasets.__file__).parent / "data"
    files = {k: d / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz"
             for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"this nilearn install lacks the bundled MNI152 files: "
                                f"{missing}")
    return files


def _resample(arrs, affine, spacing, new_spacing):
    """Resample float arrays (on one grid) to ``new_spacing``; returns arrays, affine."""
    shape = arrs[0].shape
    new = tuple(max(8, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))
    x = torch.from_numpy(np.stack(arrs).astype(np.float32))[None]
    y = F.interpolate(x, size=new, mode="trilinear", align_corners=False)[0].numpy()
    return list(y), resize_affine(affine, shape, new)


def _augment_and_crop(arrs, affine, crop, rng):
    shape = np.asarray(arrs[0].shape)
    crop = np.minimum(crop, shape)
    start = [int(rng.integers(0, n - c + 1)) for n, c in zip(shape, crop)]
    sl = tuple(slice(s, s + c) for s, c in zip(start, crop))
    out = [a[sl] for a in arrs]
    m = np.eye(4)
    m[:3, 3] = start
    aff = affine @ m
    for ax in range(3):  # flip stored axes; the affine flips with them (same anatomy)
        if rng.random() < 0.5:
            out = [np.flip(a, ax) for a in out]
            f = np.eye(4)
            f[ax, ax], f[ax, 3] = -1, out[0].shape[ax] - 1
            aff = aff @ f
    return [np.ascontiguousarray(a) for a in out], aff


def _mr_intensity(t1, rng):
    x = np.clip(t1, 0, None) / max(float(t1.max()), 1e-6)
    x = x ** rng.uniform(0.8, 1.25)
    x = x * np.exp(_smooth(rng, x.shape, grid=3, amp=0.15))
    x = x + rng.normal(0, 0.01, x.shape) * (x > 0)
    return (np.clip(x, 0, None) * rng.uniform(200, 2000)).astype(np.float32)


def _write(root: Path, name, desc, channels, labels, cases, licence, reference):
    training = []
    for case, (img, lab, aff) in cases.items():
        save_nifti(img, aff, root / "imagesTr" / f"{case}.nii.gz")
        save_nifti(lab.astype(np.uint8), aff, root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz",
                         "label": f"./labelsTr/{case}.nii.gz"})
    meta = {"name": name, "description": desc, "reference": reference, "licence": licence,
            "tensorImageSize": "3D", "modality": {str(i): c for i, c in enumerate(channels)},
            "labels": {str(k): v for k, v in labels.items()}, "numTraining": len(training),
            "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def build_mni_tissue(out, *, cases: int = 6, crop=(64, 76, 64), spacing=(2.0, 2.0, 2.0),
                     threshold: float = 0.5, seed: int = 0) -> Path:
    """Real01_MNI152Tissue: T1 -> {0 background, 1 grey matter, 2 white matter}."""
    files = nilearn_mni_files()
    vols = {k: read_volume(p) for k, p in files.items()}
    base = vols["t1"]
    arrs = [vols[k].data[0].astype(np.float32) for k in ("t1", "gm", "wm")]
    root = Path(out) / "Real01_MNI152Tissue"
    out_cases = {}
    for i in range(cases):
        rng = np.random.default_rng([seed, 152, i])
        sp = np.asarray(spacing) * rng.uniform(0.9, 1.15, 3)
        res, aff = _resample(arrs, base.affine, base.spacing, sp)
        (t1, gm, wm), aff = _augment_and_crop(res, aff, np.asarray(crop), rng)
        prob = np.stack([np.zeros_like(gm), gm, wm])
        lab = np.where(np.maximum(gm, wm) >= threshold, prob.argmax(0), 0).astype(np.uint8)
        out_cases[f"mni152_{i:03d}"] = (_mr_intensity(t1, rng), lab, aff)
    return _write(root, "Real01_MNI152Tissue",
                  "MNI ICBM152 2009c T1 with GM/WM tissue labels (argmax, threshold "
                  f"{threshold}); crops and augmentations",
                  ["T1"], {0: "background", 1: "grey matter", 2: "white matter"}, out_cases,
                  "ICBM 2009 template licence (free use with copyright notice and "
                  "attribution, see nilearn)",
                  "Fonov et al., NeuroImage 2011 / 2009; McGill University, via nilearn")


def build_colin_brain(out, *, cases: int = 4, crop=(72, 88, 72), spacing=(2.0, 2.0, 2.0),
                      seed: int = 0, templates=MRICRON_DIR) -> Path | None:
    """Real02_Colin27Brain: Colin27 T1 -> brain mask; None when mricron-data is absent."""
    templates = Path(templates)
    t1p, betp = templates / "ch2.nii.gz", templates / "ch2bet.nii.gz"
    if not (t1p.exists() and betp.exists()):
        return None
    t1, bet = read_volume(t1p), read_volume(betp)
    arrs = [t1.data[0].astype(np.float32), (bet.data[0] > 0).astype(np.float32)]
    root = Path(out) / "Real02_Colin27Brain"
    out_cases = {}
    for i in range(cases):
        rng = np.random.default_rng([seed, 27, i])
        sp = np.asarray(spacing) * rng.uniform(0.9, 1.15, 3)
        res, aff = _resample(arrs, t1.affine, t1.spacing, sp)
        (img, mask), aff = _augment_and_crop(res, aff, np.asarray(crop), rng)
        out_cases[f"colin27_{i:03d}"] = (_mr_intensity(img, rng), (mask >= 0.5), aff)
    return _write(root, "Real02_Colin27Brain", "Colin27 (ch2) T1 with brain mask (ch2bet > 0); "
                  "crops and augmentations", ["T1"], {0: "background", 1: "brain"}, out_cases,
                  "Colin27: free for research with attribution (Holmes et al. 1998); "
                  "packaged by Debian mricron-data",
                  "Holmes et al., J Comput Assist Tomogr 1998; MRIcron templates")


def real(out, *, cases: int = 6, seed: int = 0, templates=MRICRON_DIR) -> list:
    """Build every real dataset whose source is installed; returns their folders."""
    if int(cases) < 1:
        raise ValueError(f"real needs cases >= 1, got cases={cases}")
    built = [build_mni_tissue(out, cases=cases, seed=seed)]
    colin = build_colin_brain(out, cases=cases, seed=seed, templates=templates)
    if colin is not None:
        built.append(colin)
    return built
