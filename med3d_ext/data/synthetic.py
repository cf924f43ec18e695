"""Synthetic 3DSeg-8: eight MSD-format datasets echoing Med3D's pretraining domains, one
held-out segmentation task and one classification task, written as real NIfTI.

Anatomy is drawn in normalised field-of-view coordinates u in [-1, 1]^3, so every domain
shares the same shape statistics (smoothly deformed ellipsoid organs, lesions inside organs,
tubular vessels) whatever its spacing; CT domains share Hounsfield statistics. The transfer
task (CT kidney + tumour) is not among the eight but is built from the same parts, so
features learned in pretraining apply to it.

Each case gets a jittered anisotropic spacing and one of several stored orientations (RAS,
LAS, LPS, PIR-style permutations, or an oblique rotation), so readers must honour headers.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._args import int_arg
from .io import save_nifti

# name, channels, labels, base spacing (mm), kind
DOMAINS = [
    ("Task01_BrainTumour", ["FLAIR", "T1w", "t1gd", "T2w"],
     {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
     (1.0, 1.0, 1.0), "brain"),
    ("Task04_Hippocampus", ["MRI"], {0: "background", 1: "Anterior", 2: "Posterior"},
     (1.0, 1.0, 1.0), "hippocampus"),
    ("Task05_Prostate", ["T2", "ADC"], {0: "background", 1: "PZ", 2: "TZ"},
     (0.6, 0.6, 3.6), "prostate"),
    ("Task02_Heart", ["MRI"], {0: "background", 1: "left atrium"}, (1.25, 1.25, 1.37), "heart"),
    ("Task03_Liver", ["CT"], {0: "background", 1: "liver", 2: "cancer"}, (0.8, 0.8, 2.5),
     "liver"),
    ("Task07_Pancreas", ["CT"], {0: "background", 1: "pancreas", 2: "cancer"},
     (0.8, 0.8, 2.5), "pancreas"),
    ("Task08_HepaticVessel", ["CT"], {0: "background", 1: "Vessel", 2: "Tumour"},
     (0.8, 0.8, 5.0), "vessel"),
    ("Task09_Spleen", ["CT"], {0: "background", 1: "spleen"}, (0.8, 0.8, 5.0), "spleen"),
]
TRANSFER = ("Task11_Kidney", ["CT"], {0: "background", 1: "kidney", 2: "tumour"},
            (0.8, 0.8, 3.0), "kidney")

MAX_SIZE = 512  # in-plane voxels per side

# what synth writes in its folder: the CLI's --overwrite removes these, and only these
SYNTH_ENTRIES = ("pretrain", "transfer", "transfer_cls")
SYNTH_REFERENCE = "med3d_ext synthetic data"  # the "reference" of every dataset.json it writes

ORIENTATIONS = ["RAS", "LAS", "LPS", "RPI", "PIR", "oblique"]

# CT Hounsfield units of the synthetic tissues (roughly contrast-enhanced portal phase)
HU = {"air": -1000, "fat": -100, "muscle": 45, "bone": 700, "liver": 110, "spleen": 120,
      "pancreas": 90, "kidney": 160, "vessel": 220, "lesion_drop": -55}


def _smooth(rng, shape, grid=4, amp=1.0) -> np.ndarray:
    g = torch.from_numpy(rng.standard_normal((1, 1, grid, grid, grid)).astype(np.float32))
    return amp * F.interpolate(g, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


class _Canvas:
    """Normalised coordinates of one volume and shape primitives on them."""

    def __init__(self, shape, rng):
        self.shape, self.rng = shape, rng
        ax = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
        self.u = np.stack(np.meshgrid(*ax, indexing="ij"))  # (3, I, J, K)

    def blob(self, center, radii, deform=0.15, rot=True) -> np.ndarray:
        c = np.asarray(center, np.float32)[:, None, None, None]
        d = self.u - c
        if rot:  # random orientation: rotate the offset by a random rotation matrix
            q, _ = np.linalg.qr(self.rng.standard_normal((3, 3)))
            d = np.einsum("ij,jxyz->ixyz", q.astype(np.float32), d)
        r = np.sqrt(((d / np.asarray(radii, np.float32)[:, None, None, None]) ** 2).sum(0))
        m = r + _smooth(self.rng, self.shape, amp=deform) < 1.0
        # a thin organ on a coarse grid can vanish under the deformation: keep the ellipsoid
        return m if m.any() else r < 1.0

    def tube(self, start, end, radius, wiggle=0.15) -> np.ndarray:
        t = np.linspace(0, 1, 24, dtype=np.float32)[:, None]
        s, e = np.asarray(start, np.float32), np.asarray(end, np.float32)
        phase = self.rng.uniform(0, 2 * np.pi, 3)
        pts = s + t * (e - s) + wiggle * np.sin(np.pi * t * 2 + phase).astype(np.float32)
        flat = self.u.reshape(3, -1)
        d2 = np.full(flat.shape[1], np.inf, np.float32)
        for p in pts:  # distance to the sampled centre line
            d2 = np.minimum(d2, ((flat - p[:, None]) ** 2).sum(0))
        return (np.sqrt(d2) < radius).reshape(self.shape)

    def lesion_in(self, organ: np.ndarray, rmin=0.08, rmax=0.18) -> np.ndarray:
        idx = np.argwhere(organ)
        if len(idx) == 0:
            return np.zeros(self.shape, bool)
        c = self.u[(slice(None),) + tuple(idx[self.rng.integers(len(idx))])]
        r = self.rng.uniform(rmin, rmax)
        return self.blob(c, (r, r, r), deform=0.1) & organ


def _j(rng, v, s=0.08):
    return np.asarray(v, np.float32) + rng.uniform(-s, s, len(v)).astype(np.float32)


def _ct_body(cv: _Canvas):
    rng = cv.rng
    body = cv.blob(_j(rng, [0, 0, 0], 0.03), _j(rng, [0.95, 0.8, 1.6], 0.04), 0.05, rot=False)
    img = np.full(cv.shape, HU["air"], np.float32)
    img[body] = HU["fat"]
    muscle = cv.blob([0, 0, 0], [0.85, 0.7, 1.6], 0.08, rot=False) & body
    img[muscle] = HU["muscle"]
    spine = cv.tube([0, -0.55, -1.2], [0, -0.55, 1.2], 0.12, wiggle=0.02)
    img[spine & body] = HU["bone"]
    return img, body & ~spine


def _ct_case(cv: _Canvas, kind: str, lesion=True):
    rng = cv.rng
    img, inside = _ct_body(cv)
    lab = np.zeros(cv.shape, np.uint8)
    if kind == "liver":
        organ = cv.blob(_j(rng, [-0.3, 0.05, 0.1]), _j(rng, [0.45, 0.4, 0.6]), 0.2) & inside
        img[organ] = HU["liver"]
        lab[organ] = 1
    elif kind == "spleen":
        organ = cv.blob(_j(rng, [0.4, -0.1, 0.1]), _j(rng, [0.25, 0.3, 0.4]), 0.2) & inside
        img[organ] = HU["spleen"]
        lab[organ] = 1
        lesion = False
    elif kind == "pancreas":
        organ = cv.blob(_j(rng, [0.05, 0.1, 0]), _j(rng, [0.5, 0.2, 0.25]), 0.12) & inside
        img[organ] = HU["pancreas"]
        lab[organ] = 1
    elif kind == "vessel":
        liver = cv.blob(_j(rng, [-0.3, 0.05, 0.1]), _j(rng, [0.45, 0.4, 0.6]), 0.2) & inside
        img[liver] = HU["liver"]
        organ = np.zeros(cv.shape, bool)
        for _ in range(3):
            a = _j(rng, [-0.3, 0.05, -0.5], 0.2)
            b = _j(rng, [-0.3, 0.05, 0.7], 0.35)
            organ |= cv.tube(a, b, rng.uniform(0.04, 0.07)) & liver
        img[organ] = HU["vessel"]
        lab[organ] = 1
        organ = liver & ~organ  # tumours grow in the liver, labelled 2
    elif kind == "kidney":
        organ = np.zeros(cv.shape, bool)
        for side in (-1, 1):
            organ |= cv.blob(_j(rng, [0.45 * side, -0.3, 0]), _j(rng, [0.2, 0.2, 0.4]),
                             0.15) & inside
        img[organ] = HU["kidney"]
        lab[organ] = 1
    else:
        raise ValueError(kind)
    if lesion:
        les = np.zeros(cv.shape, bool)
        for _ in range(rng.integers(1, 3)):
            les |= cv.lesion_in(organ)
        img[les] = (HU[kind] if kind in HU else HU["liver"]) + HU["lesion_drop"]
        lab[les] = 2
    img += _smooth(rng, cv.shape, grid=3, amp=8)  # slow contrast variation
    img += rng.normal(0, 12, cv.shape).astype(np.float32)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), lab


def _mr_case(cv: _Canvas, kind: str, nchan: int):
    """MR: tissue classes -> per-channel contrast, multiplicative bias field, arbitrary
    scanner scale, Rician-like noise, zero background (so cropping has work to do)."""
    rng = cv.rng
    lab = np.zeros(cv.shape, np.uint8)
    tissue = np.zeros(cv.shape, np.uint8)  # 0 air, 1 body/skull, 2 soft, 3.. structures
    if kind in ("brain", "hippocampus"):
        head = cv.blob([0, 0, 0], _j(rng, [0.85, 0.95, 0.85], 0.04), 0.05)
        brain = cv.blob([0, 0, 0.02], _j(rng, [0.72, 0.82, 0.72], 0.04), 0.08) & head
        tissue[head], tissue[brain] = 1, 2
        if kind == "brain":
            c = _j(rng, [0, 0, 0], 0.35)
            ed = cv.blob(c, _j(rng, [0.3, 0.3, 0.3], 0.06), 0.2) & brain
            core = cv.blob(c, _j(rng, [0.17, 0.17, 0.17], 0.04), 0.2) & ed
            enh = core & ~cv.blob(c, [0.09, 0.09, 0.09], 0.1)
            lab[ed], lab[core], lab[enh] = 1, 2, 3
        else:
            # MSD hippocampus volumes are crops around the structure: make it large
            c = _j(rng, [0.0, 0, 0], 0.08)
            ant = cv.blob(c + [0, 0.25, 0], [0.3, 0.35, 0.3], 0.1) & brain
            post = cv.blob(c - [0, 0.25, 0], [0.22, 0.35, 0.22], 0.1) & brain & ~ant
            lab[ant], lab[post] = 1, 2
    elif kind == "prostate":
        body = cv.blob([0, 0, 0], _j(rng, [0.95, 0.8, 1.5], 0.03), 0.05, rot=False)
        tissue[body] = 2
        gland = cv.blob(_j(rng, [0, 0, 0], 0.1), _j(rng, [0.35, 0.3, 0.4], 0.05), 0.12) & body
        tz = cv.blob(_j(rng, [0, 0.05, 0], 0.05), _j(rng, [0.2, 0.16, 0.25], 0.03), 0.1) & gland
        lab[gland], lab[tz] = 1, 2
    elif kind == "heart":
        body = cv.blob([0, 0, 0], _j(rng, [0.95, 0.8, 1.5], 0.03), 0.05, rot=False)
        tissue[body] = 2
        heart = cv.blob(_j(rng, [0.1, 0.1, 0]), _j(rng, [0.45, 0.4, 0.45], 0.05), 0.1) & body
        tissue[heart] = 1
        la = cv.blob(_j(rng, [0.1, -0.15, 0.15], 0.06), _j(rng, [0.28, 0.24, 0.28], 0.03),
                     0.15) & heart
        lab[la] = 1
    else:
        raise ValueError(kind)
    nclass = int(lab.max(initial=0)) + 1
    chans = []
    for ch in range(nchan):
        # per-channel contrast for air, body, soft tissue and each labelled structure
        contrast = np.concatenate([[0.0], rng.uniform(0.2, 1.0, 2 + nclass)]).astype(np.float32)
        x = contrast[np.where(lab > 0, 2 + lab, tissue)]
        x *= np.exp(_smooth(rng, cv.shape, grid=3, amp=0.25))  # bias field
        x = np.hypot(x + rng.normal(0, 0.03, cv.shape), rng.normal(0, 0.03, cv.shape))
        if kind == "brain":  # BraTS/MSD images are skull-stripped: exact zeros outside
            x = np.where(tissue == 2, x, 0.0)
        chans.append(x * rng.uniform(100, 3000))  # arbitrary scanner scale
    return np.stack(chans, -1).astype(np.float32), lab


def _orient(data, lab, spacing, code, rng):
    """Store an RAS-generated case with orientation ``code``: returns (data, lab, affine)."""
    from nibabel import orientations as nio

    shape = lab.shape
    ras_aff = np.diag([*spacing, 1.0])
    ras_aff[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2 + rng.uniform(-20, 20, 3)
    if code == "oblique":
        a = np.deg2rad(rng.uniform(8, 20))
        rot = np.eye(4)
        rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        return data, lab, rot @ ras_aff
    tr = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(code)))
    lab2 = nio.apply_orientation(lab, tr)
    data2 = nio.apply_orientation(data, tr)  # a 4th (channel) axis is left alone
    return data2, lab2, ras_aff @ nio.inv_ornt_aff(tr, shape)


def _make_case(kind, channels, base_spacing, size, rng, lesion=True):
    spacing = np.asarray(base_spacing) * rng.uniform(0.9, 1.1, 3)
    spacing[1] = spacing[0]  # in-plane isotropic, like real scans
    fov = size * base_spacing[0]
    shape = tuple(int(max(8, round(fov / s))) for s in spacing)
    cv = _Canvas(shape, rng)
    if channels == ["CT"]:
        data, lab = _ct_case(cv, kind, lesion)
    else:
        data, lab = _mr_case(cv, kind, len(channels))
        if len(channels) == 1:
            data = data[..., 0]
    code = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
    return _orient(np.ascontiguousarray(data), lab, spacing, code, rng)


def write_msd(out, spec, n_cases: int, size: int, seed: int) -> Path:
    """One MSD-format dataset: dataset.json, imagesTr/, labelsTr/."""
    name, channels, labels, spacing, kind = spec
    root = Path(out) / name
    training = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, _stable(name), i])
        data, lab, aff = _make_case(kind, channels, spacing, size, rng)
        case = f"{kind}_{i:03d}"
        save_nifti(data, aff, root / "imagesTr" / f"{case}.nii.gz")
        save_nifti(lab.astype(np.uint8), aff, root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz",
                         "label": f"./labelsTr/{case}.nii.gz"})
    meta = {"name": name, "description": f"synthetic {kind} ({'/'.join(channels)}), "
                                         f"med3d_ext synth seed {seed}",
            "reference": SYNTH_REFERENCE, "licence": "CC0-1.0",
            "tensorImageSize": "4D" if len(channels) > 1 else "3D",
            "modality": {str(i): c for i, c in enumerate(channels)},
            "labels": {str(k): v for k, v in labels.items()},
            "numTraining": n_cases, "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def _stable(s: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(s))


def write_classification(out, n_cases: int, size: int, seed: int) -> Path:
    """CT kidney volumes with and without a tumour: images/ + labels.csv (image,label)."""
    name, channels, _, spacing, kind = TRANSFER
    root = Path(out)
    rows = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, _stable("cls"), i])
        has = i % 2  # balanced classes, in a seed-independent pattern
        data, _, aff = _make_case(kind, channels, spacing, size, rng, lesion=bool(has))
        fn = f"images/case_{i:03d}.nii.gz"
        save_nifti(data, aff, root / fn)
        rows.append((fn, has))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        w.writerows(rows)
    (root / "classes.json").write_text(json.dumps({"modality": "CT",
                                                   "classes": {"0": "no tumour",
                                                               "1": "tumour"}}))
    return root


def check_synth_args(*, cases: int = 4, size: int = 48, seed: int = 0, transfer_cases=None,
                     cls_cases=None) -> None:
    """synth's argument checks, alone: the CLI runs them before it clears an --overwrite
    folder (else a refused --size left the old dataset deleted and no new one)."""
    # the CLI's checks for the Python call too: size=8.5 was truncated, cases=True taken as 1
    # and seed=-1 failed inside numpy
    int_arg("synth: cases must be an int >= 1", cases, 1)
    # the upper bound keeps a typo from asking for petabytes: the generator holds a few
    # float32 copies of each volume (512^2 x ~140 slices is ~150 MB each)
    int_arg(f"synth: size must be an int in [8, {MAX_SIZE}]", size, 8, MAX_SIZE)
    int_arg("synth: seed must be an int >= 0", seed, 0)
    for name, v in (("transfer_cases", transfer_cases), ("cls_cases", cls_cases)):
        if v is not None:
            int_arg(f"synth: {name} must be None or an int >= 1", v, 1)


def not_synth_output(out) -> str | None:
    """Why the folder ``out`` is not what an earlier synth wrote (None when it is): only
    pretrain/, transfer/ and transfer_cls/, their datasets named as synth names them, each
    dataset.json there synth's (at least one), and in transfer_cls/ only images/, labels.csv and
    classes.json. A dataset folder without dataset.json (an interrupted synth) is accepted."""
    out = Path(out)
    other = sorted(p.name for p in out.iterdir() if p.name not in SYNTH_ENTRIES)
    if other:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        return f"it also holds {shown}, which synth does not write"
    for name in SYNTH_ENTRIES:
        if (out / name).is_symlink():  # its target is someone's: never cleared through it
            return f"its {name} is a symbolic link, which synth does not write"
        if (out / name).exists() and not (out / name).is_dir():
            return f"its {name} is a file, not a folder synth writes"
    found = False
    for sub, names in (("pretrain", {d[0] for d in DOMAINS}), ("transfer", {TRANSFER[0]})):
        d = out / sub
        if not d.exists():
            continue
        for p in sorted(d.iterdir()):
            if p.name not in names or not p.is_dir():
                return f"{str(p)!r} is not a dataset synth writes"
            js = p / "dataset.json"
            if not js.exists():
                continue
            try:
                meta = json.loads(js.read_text())
            except (OSError, ValueError):
                meta = None
            if not isinstance(meta, dict) or meta.get("reference") != SYNTH_REFERENCE:
                return f"{str(js)!r} is not a dataset.json that synth writes"
            found = True
    cls = out / "transfer_cls"
    if cls.exists():
        extra = sorted(p.name for p in cls.iterdir()
                       if p.name not in ("images", "labels.csv", "classes.json"))
        if extra:
            return f"{str(cls)!r} also holds {', '.join(extra[:5])}, which synth does not write"
    if not found:
        return "it holds no dataset.json that synth writes"
    return None


def synth(out, *, cases: int = 4, size: int = 48, seed: int = 0, transfer_cases=None,
          cls_cases=None) -> dict:
    """Write DIR/pretrain/<8 datasets>, DIR/transfer/<Task11_Kidney>, DIR/transfer_cls/.

    cases: cases per pretraining dataset; size: in-plane voxels per side (the slice count
    follows from the spacing); transfer gets 2x cases, classification 4x (at least 8).
    Returns {"pretrain": [dataset dirs], "transfer": dir, "transfer_cls": dir}.
    """
    check_synth_args(cases=cases, size=size, seed=seed, transfer_cases=transfer_cases,
                     cls_cases=cls_cases)
    out = Path(out)
    pre = [write_msd(out / "pretrain", spec, cases, size, seed) for spec in DOMAINS]
    tr = write_msd(out / "transfer", TRANSFER, transfer_cases or 2 * cases, size, seed)
    cl = write_classification(out / "transfer_cls", cls_cases or max(8, 4 * cases), size, seed)
    return {"pretrain": pre, "transfer": tr, "transfer_cls": cl}
