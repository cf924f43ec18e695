"""med3d_ext.data.synthetic / real: determinism, header sanity, label sanity, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from med3d_ext.data import load_dataset, preprocess  # noqa: E402
from med3d_ext.data.__main__ import main  # noqa: E402
from med3d_ext.data.synthetic import DOMAINS, TRANSFER  # noqa: E402


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(
        np.asarray(nib.load(str(p)).dataobj).tobytes() + nib.load(str(p)).affine.tobytes()
    ).hexdigest() for p in sorted(root.rglob("*.nii.gz"))}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--cases", "2", "--size", "24",
                 "--seed", "5"]) == 0
    return out


def test_synth_layout_and_headers(synth_dir):
    from med3d_ext.data import DataError, find_datasets

    pre = find_datasets(synth_dir / "pretrain")
    assert [p.name for p in pre] == sorted(d[0] for d in DOMAINS)
    assert find_datasets(pre[0]) == [pre[0]]
    with pytest.raises(DataError, match="nor a folder of datasets"):
        find_datasets(synth_dir / "transfer_cls" / "images")
    codes = set()
    for spec in DOMAINS + [TRANSFER]:
        name, channels, labels, spacing, _ = spec
        root = synth_dir / ("transfer" if spec is TRANSFER else "pretrain") / name
        ds = load_dataset(root)
        assert ds.channels == channels and ds.layout == "msd"
        assert ds.modality == ("CT" if channels == ["CT"] else "MR")
        assert ds.class_names == [labels[k] for k in sorted(labels)]
        assert len(ds) == (4 if spec is TRANSFER else 2)
        for c in ds.cases:
            img, lab = nib.load(str(c.images[0])), nib.load(str(c.label))
            assert img.shape[:3] == lab.shape
            assert len(img.shape) == (4 if len(channels) > 1 else 3)
            if len(channels) > 1:
                assert img.shape[3] == len(channels)
            np.testing.assert_allclose(img.affine, lab.affine)
            assert img.header["sform_code"] > 0 and img.header["qform_code"] > 0
            zooms = np.sort(np.linalg.norm(img.affine[:3, :3], axis=0))
            np.testing.assert_allclose(zooms, np.sort(spacing), rtol=0.12)
            codes.add("".join(nib.aff2axcodes(img.affine)))
            data = np.asarray(img.dataobj)
            y = np.asarray(lab.dataobj)
            assert set(np.unique(y)) <= set(labels) and (y > 0).any()
            if channels == ["CT"]:
                assert data.dtype == np.int16 and data.min() >= -1024 and data.max() <= 3071
                assert data.min() <= -900  # air
                # organ voxels in soft-tissue HU
                assert 0 < np.median(data[y == 1]) < 300
            else:
                assert np.isfinite(data).all() and data.min() >= 0
    assert len(codes) >= 3  # mixed stored orientations


def test_synth_lesions_inside_organs(synth_dir):
    from scipy import ndimage as ndi

    seen = 0
    for kind in ("Task03_Liver", "Task07_Pancreas"):
        for p in (synth_dir / "pretrain" / kind / "labelsTr").glob("*.nii.gz"):
            y = np.asarray(nib.load(str(p)).dataobj)
            comps, n = ndi.label(y == 2)
            for k in range(1, n + 1):  # every tumour touches its organ
                ring = ndi.binary_dilation(comps == k) & (y != 2)
                assert (y[ring] == 1).any()
                seen += 1
    assert seen > 0


def test_synth_deterministic(tmp_path, synth_dir):
    a = tmp_path / "a"
    assert main(["synth", "--out", str(a), "--cases", "2", "--size", "24", "--seed", "5"]) == 0
    assert _digest(a) == _digest(synth_dir)
    b = tmp_path / "b"
    assert main(["synth", "--out", str(b), "--cases", "2", "--size", "24", "--seed", "6"]) == 0
    da, db = _digest(a), _digest(b)
    assert da.keys() == db.keys() and all(da[k] != db[k] for k in da)


def test_transfer_cls(synth_dir):
    root = synth_dir / "transfer_cls"
    rows = list(csv.DictReader(open(root / "labels.csv")))
    assert len(rows) == 8 and set(r["label"] for r in rows) == {"0", "1"}
    for r in rows:
        img = nib.load(str(root / r["image"]))
        assert img.get_data_dtype() == np.int16 and len(img.shape) == 3


def test_synth_preprocesses_and_samples(synth_dir, tmp_path):
    from med3d_ext.data import make_loader

    roots = sorted((synth_dir / "pretrain").iterdir())
    pre = [preprocess(r, tmp_path / r.name, progress=False, workers=0) for r in roots]
    chans = ["FLAIR" if p.name.endswith("BrainTumour") else None for p in pre]
    batch = next(iter(make_loader(pre, 16, 8, channels=chans, seed=0, steps=1)))
    assert batch["image"].shape == (8, 1, 16, 16, 16)
    assert np.isfinite(batch["image"].numpy()).all()
    # brain MR is skull-stripped (zero outside): the crop must shrink it
    brain = pre[[p.name for p in pre].index("Task01_BrainTumour")]
    m = brain.meta(0)
    assert np.prod([b - a for a, b in m["crop_box"]]) < np.prod(m["ras_shape"])


def test_synth_bad_args(tmp_path):
    from med3d_ext.data.synthetic import synth

    with pytest.raises(ValueError, match="cases must be an int >= 1, got 0"):
        synth(tmp_path, cases=0)
    with pytest.raises(ValueError, match=r"size must be an int in \[8, 512\], got 100000"):
        synth(tmp_path, cases=1, size=100000)
    # the Python call now refuses what the CLI does (data API audit): size 8.5 was truncated,
    # cases=True taken as 1, seed=-1 failed inside numpy
    for kw, what in ((dict(size=8.5), TypeError), (dict(cases=True), TypeError),
                     (dict(seed=-1), ValueError), (dict(transfer_cases=0), ValueError)):
        with pytest.raises(what, match=f"synth: {next(iter(kw))} must be"):
            synth(tmp_path / "y", **{"cases": 1, "size": 8, **kw})
    assert not (tmp_path / "y").exists()
    from med3d_ext.data.__main__ import main

    assert main(["synth", "--out", str(tmp_path / "x"), "--size", "5"]) == 2  # message, no trace
    assert not (tmp_path / "x").exists()


def test_data_cli_user_errors(synth_dir, tmp_path, capsys):
    """--out a file, real --cases 0, a dataset.json given for its folder: one error line each
    (they were tracebacks or 'no dataset.json found' for a dataset.json)."""
    from med3d_ext.data.__main__ import main

    (tmp_path / "afile").write_text("")
    js = next((synth_dir / "pretrain").iterdir()) / "dataset.json"
    for argv, want in [(["synth", "--out", tmp_path / "afile"], "is a file"),
                       (["real", "--out", tmp_path / "afile"], "is a file"),
                       (["real", "--out", tmp_path / "r", "--cases", "0"], "cases >= 1"),
                       (["real", "--out", synth_dir], "is not empty"),
                       (["preprocess", js, "--out", tmp_path / "c"], "name the dataset folder")]:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_package_functions_not_shadowed_by_submodules():
    # importing every submodule must leave med3d_ext.data.synth / .real the documented
    # functions (a submodule of the same name would replace them on import)
    import importlib
    import inspect

    import med3d_ext.data as data

    for mod in ("io", "layouts", "preprocess", "sampling", "synthetic", "real_volumes"):
        importlib.import_module(f"med3d_ext.data.{mod}")
    assert inspect.isfunction(data.synth) and inspect.isfunction(data.real)
    with pytest.raises(ValueError, match="cases must be an int >= 1"):
        data.synth("unused-out-dir", cases=0)


def test_real_mni(tmp_path):
    pytest.importorskip("nilearn")
    from med3d_ext.data.real_volumes import build_mni_tissue

    root = build_mni_tissue(tmp_path, cases=2, crop=(24, 28, 24), spacing=(4, 4, 4))
    ds = load_dataset(root)
    assert ds.class_names == ["background", "grey matter", "white matter"]
    meta = json.loads((root / "dataset.json").read_text())
    assert "licence" in meta and "reference" in meta
    for c in ds.cases:
        img, lab = nib.load(str(c.images[0])), nib.load(str(c.label))
        y = np.asarray(lab.dataobj)
        assert img.shape == (24, 28, 24) and set(np.unique(y)) == {0, 1, 2}
        x = np.asarray(img.dataobj)
        # real anatomy: white matter is brighter than grey matter on T1
        assert x[y == 2].mean() > x[y == 1].mean()
        np.testing.assert_allclose(np.sort(np.linalg.norm(img.affine[:3, :3], axis=0)),
                                   4.0, rtol=0.2)


def test_real_colin_optional(tmp_path):
    """Colin27 is built only when the mricron templates exist: use a fake templates folder
    (a sphere 'brain' in a bigger 'head', stored LAS) and an empty one."""
    from med3d_ext.data.real_volumes import build_colin_brain

    assert build_colin_brain(tmp_path / "o", templates=tmp_path / "none") is None
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 30)] * 3, indexing="ij"))
    d = np.sqrt((g ** 2).sum(0))
    head = np.where(d < 0.9, 60.0, 0.0) + np.where(d < 0.6, 40.0, 0.0)
    aff = np.diag([-2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(head.astype(np.float32), aff), str(tpl / "ch2.nii.gz"))
    nib.save(nib.Nifti1Image(np.where(d < 0.6, head, 0).astype(np.float32), aff),
             str(tpl / "ch2bet.nii.gz"))
    root = build_colin_brain(tmp_path / "o", cases=2, crop=(16, 16, 16), spacing=(3, 3, 3),
                             templates=tpl)
    ds = load_dataset(root)
    assert ds.class_names == ["background", "brain"] and len(ds) == 2
    for c in ds.cases:
        x = np.asarray(nib.load(str(c.images[0])).dataobj)
        y = np.asarray(nib.load(str(c.label)).dataobj)
        assert (y == 1).any() and x[y == 1].mean() > x[y == 0].mean()


def test_classification_layout(synth_dir, tmp_path):
    import torch

    from med3d_ext.data import ClassificationSet, DataError

    root = synth_dir / "transfer_cls"
    ds = load_dataset(root)
    assert ds.layout == "classification" and ds.modality == "CT" and ds.labels is None
    assert ds.classes == {0: "no tumour", 1: "tumour"} and len(ds.targets) == len(ds) == 8
    pre = preprocess(root, tmp_path / "cls", progress=False, workers=0)
    assert pre.targets == [ds.targets[n] for n in pre.names]
    cs = ClassificationSet(pre, (16, 16, 8))
    batch = next(iter(torch.utils.data.DataLoader(cs, batch_size=3)))
    assert batch["image"].shape == (3, 1, 16, 16, 8) and batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == pre.targets[:3]
    # bad csv rows are named
    bad = tmp_path / "badcls"
    bad.mkdir()
    (bad / "labels.csv").write_text("image,label\nimages/x.nii.gz,maybe\n")
    with pytest.raises(DataError, match=r"labels\.csv: line 2: label 'maybe'"):
        load_dataset(bad)
    (bad / "labels.csv").write_text("file,y\n")
    with pytest.raises(DataError, match="expected columns"):
        load_dataset(bad)
    # per-class folders whose files share base names stay distinct cases (were refused)
    import shutil

    imgs = sorted((root / "images").glob("*.nii.gz"))
    for k, cls in enumerate(("neg", "pos")):
        (bad / cls).mkdir()
        shutil.copy(imgs[k], bad / cls / "001.nii.gz")
    (bad / "labels.csv").write_text("image,label\nneg/001.nii.gz,0\n./pos/001.nii.gz,1\n")
    ds2 = load_dataset(bad)
    assert [c.name for c in ds2.cases] == ["neg_001", "pos_001"]
    assert ds2.targets == {"neg_001": 0, "pos_001": 1}
    (bad / "labels.csv").write_text("image,label\nneg/001.nii.gz,0\nneg/001.nii.gz,1\n")
    with pytest.raises(DataError, match="line 3: case 'neg_001' listed twice"):
        load_dataset(bad)
    seg = preprocess(synth_dir / "transfer" / "Task11_Kidney", tmp_path / "k", progress=False,
                     workers=0)
    with pytest.raises(ValueError, match="not a classification dataset"):
        ClassificationSet(seg, 8)
