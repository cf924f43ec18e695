"""Test images of a dataset (``load_dataset(split="test")``: MSD ``test`` list / ``imagesTs/``,
nnU-Net v2 ``imagesTs/``, MedicalNet ``test.txt``) and preprocessing them with a training set's
recipe (``preprocess(target_spacing=..., ct_clip=...)``, ``PreprocessedDataset.recipe``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from med3d_ext.data import DataError, load_dataset, preprocess  # noqa: E402
from python_tests._datahelp import affine, blob_case, make_msd, rng, save  # noqa: E402


def _ct_image(shape, r):
    """A CT-like volume (air around a body, an organ inside), never exactly 0: the crop keeps
    the whole volume, so the normalisation statistics are over every voxel."""
    img, lab = blob_case(shape, r, 2, zero_border=0)
    x = np.where(lab > 0, 150.0, -100.0) + r.normal(0, 15, shape)
    x[:1] = -1000.0 + r.normal(0, 5, x[:1].shape)  # an air slab: a long low tail
    x = np.rint(x)
    x[x == 0] = 1.0
    return x.astype(np.float32), lab


def _ct_dataset(root, r, n=3, shape=(11, 10, 8), spacing=(1.5, 1.5, 2.0)):
    """A CT MSD dataset whose cases all have ``spacing`` (so preprocessing resamples nothing);
    returns (root, training foreground intensities)."""
    fg, training = [], []
    for i in range(n):
        img, lab = _ct_image(shape, r)
        aff = affine(spacing, "RAS" if i % 2 == 0 else "LAS", shape)
        save(root / "imagesTr" / f"c{i}.nii.gz", img, aff)
        save(root / "labelsTr" / f"c{i}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
        fg.append(img[lab > 0])
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
        "training": training, "test": []}))
    return root, np.concatenate(fg)


def test_msd_test_list_and_imagesTs(tmp_path):
    r = rng()
    root = make_msd(tmp_path / "Task", n=2, modality="CT")
    shape = (9, 8, 7)
    for name in ("t1", "t0"):
        save(root / "imagesTs" / f"{name}.nii.gz", blob_case(shape, r, 2)[0], affine(shape=shape))
    (root / "imagesTs" / "._t0.nii.gz").write_bytes(b"macOS fork")  # ignored
    (root / "imagesTs" / "README.txt").write_text("not an image")  # ignored
    save(root / "labelsTs" / "t1.nii.gz", blob_case(shape, r, 2)[1], affine(shape=shape))
    # an empty "test" list (synth writes one): the imagesTs folder, sorted; labelsTs used
    ds = load_dataset(root, split="test")
    assert [c.name for c in ds.cases] == ["t0", "t1"]
    assert ds.cases[0].label is None and ds.cases[1].label.name == "t1.nii.gz"
    assert ds.channels == load_dataset(root).channels and ds.labels == load_dataset(root).labels
    assert ds.name == load_dataset(root).name
    # a non-empty "test" list wins: paths or {"image": ..., "label": ...} entries
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/t1.nii.gz", {"image": "./imagesTs/t0.nii.gz",
                                              "label": "./labelsTs/t1.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(root, split="test")
    assert [c.name for c in ds.cases] == ["t1", "t0"]
    assert ds.cases[0].label.name == "t1.nii.gz" and ds.cases[1].label.name == "t1.nii.gz"
    # the training split is unchanged
    assert [c.name for c in load_dataset(root).cases] == ["c0", "c1"]
    # a test entry naming a missing file: an error naming it (or skipped with skip_bad)
    meta["test"].append("./imagesTs/gone.nii.gz")
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="gone.nii.gz"):
        load_dataset(root, split="test")
    assert len(load_dataset(root, split="test", skip_bad=True)) == 2
    with pytest.raises(ValueError, match="split"):
        load_dataset(root, split="val")


def test_no_test_images_is_a_clear_error(tmp_path):
    root = make_msd(tmp_path / "Task", n=1)
    with pytest.raises(DataError, match=r"no test images.*no .*imagesTs folder"):
        load_dataset(root, split="test")
    (root / "imagesTs").mkdir()
    (root / "imagesTs" / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"imagesTs holds no images"):
        load_dataset(root, split="test")


def test_nnunet_and_medicalnet_test_images(tmp_path):
    r = rng()
    shape = (8, 7, 6)
    aff = affine(shape=shape)
    nn = tmp_path / "Dataset001_X"
    for sub, name in (("imagesTr", "a_0000"), ("imagesTr", "a_0001"), ("imagesTs", "z_0000"),
                      ("imagesTs", "z_0001"), ("imagesTs", "y_0000"), ("imagesTs", "y_0001")):
        save(nn / sub / f"{name}.nii.gz", blob_case(shape, r, 2)[0], aff)
    save(nn / "labelsTr" / "a.nii.gz", blob_case(shape, r, 2)[1], aff)
    save(nn / "labelsTs" / "z.nii.gz", blob_case(shape, r, 2)[1], aff)
    (nn / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz", "numTraining": 1}))
    ds = load_dataset(nn, split="test")
    assert [c.name for c in ds.cases] == ["y", "z"] and ds.channels == ["T2", "ADC"]
    assert [p.name for p in ds.cases[0].images] == ["y_0000.nii.gz", "y_0001.nii.gz"]
    assert ds.cases[0].label is None and ds.cases[1].label.name == "z.nii.gz"
    shutil.rmtree(nn / "imagesTs")
    with pytest.raises(DataError, match="imagesTs"):
        load_dataset(nn, split="test")
    (nn / "imagesTs").mkdir()
    with pytest.raises(DataError, match="no test images"):
        load_dataset(nn, split="test")
    # MedicalNet lists: test.txt beside train.txt, labels optional per line
    mn = tmp_path / "mn"
    for name in ("a", "t"):
        save(mn / "img" / f"{name}.nii.gz", blob_case(shape, r, 2)[0], aff)
    save(mn / "lab" / "a.nii.gz", blob_case(shape, r, 2)[1], aff)
    (mn / "train.txt").write_text("img/a.nii.gz lab/a.nii.gz\n")
    with pytest.raises(DataError, match="test.txt"):
        load_dataset(mn, split="test")
    (mn / "test.txt").write_text("img/t.nii.gz\n")
    ds = load_dataset(mn / "train.txt", split="test")
    assert [c.name for c in ds.cases] == ["t"] and ds.cases[0].label is None
    # classification folders have no test split
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "labels.csv").write_text("image,label\n")
    with pytest.raises(DataError, match="no test split"):
        load_dataset(tmp_path / "cls", split="test")


def test_test_images_take_the_training_recipe(tmp_path):
    """CT test images are clipped to the *training* foreground's 0.5-99.5 percentiles, then
    z-scored per volume, and resampled to the training spacing; compared with an explicit
    computation from the NIfTI files."""
    r = rng()
    root, fg = _ct_dataset(tmp_path / "Task", r)
    train = preprocess(root, tmp_path / "cache", workers=0, progress=False)
    rec = train.recipe()
    lo, hi = np.percentile(fg.astype(np.float64), [0.5, 99.5])
    assert rec["ct_clip"][0] == pytest.approx([lo, hi], rel=1e-6)
    assert rec["target_spacing"] == pytest.approx([1.5, 1.5, 2.0])
    assert rec["modality"] == "CT" and rec["channels"] == ["CT"]
    json.dumps(rec)  # stored in checkpoints and RUN/preprocessing.json
    # test images: one on the training grid (LPS: flips only), one at another spacing
    shape = (12, 9, 8)
    t0, _ = _ct_image(shape, r)
    save(root / "imagesTs" / "t0.nii.gz", t0, affine((1.5, 1.5, 2.0), "LPS", shape))
    t1, _ = _ct_image((10, 10, 6), r)
    save(root / "imagesTs" / "t1.nii.gz", t1, affine((1.0, 1.2, 3.0), "RAS", (10, 10, 6)))
    ds = load_dataset(root, split="test")
    test = preprocess(ds, tmp_path / "cache" / "imagesTs", workers=0, progress=False,
                      target_spacing=rec["target_spacing"], ct_clip=rec["ct_clip"])
    assert test.info["ct_clip_from"] == "given" and test.info["ct_clip"] == rec["ct_clip"]
    i0 = test.names.index("t0")
    x, lab, meta = test.load_case(i0)
    assert lab is None and meta["label"] is None
    src = nib.load(str(root / "imagesTs" / "t0.nii.gz"))
    ras = np.asarray(nib.as_closest_canonical(src).dataobj, np.float64)
    assert ras.shape == (12, 9, 8) and not np.array_equal(ras, np.asarray(src.dataobj))
    c = np.clip(ras, lo, hi)
    want = (c - c.mean()) / c.std()
    np.testing.assert_allclose(x[0], want, rtol=1e-4, atol=1e-4)
    # the test image's own percentiles (what a per-volume recipe would use) are far off
    plo, phi = np.percentile(ras, [0.5, 99.5])
    assert plo < lo - 100
    # the other image: resampled to the training spacing, not its own
    m1 = test.meta(test.names.index("t1"))
    assert m1["target_spacing"] == pytest.approx([1.5, 1.5, 2.0])
    assert m1["shape"] == [round(10 * 1.0 / 1.5), round(10 * 1.2 / 1.5), round(6 * 3.0 / 2.0)]
    raw = np.asarray(test.image(test.names.index("t1"))[0], np.float64)
    c = np.clip(raw, lo, hi)
    x1 = test.load_case(test.names.index("t1"))[0][0]
    np.testing.assert_allclose(x1, (c - c.mean()) / c.std(), rtol=1e-4, atol=1e-4)
    # the training cache is untouched (its own folder, its own numbers)
    assert preprocess(root, tmp_path / "cache", workers=0, progress=False).info["ct_clip"] \
        == rec["ct_clip"]
    # a training image preprocessed as a test image is its training-cache self
    shutil.copy(root / "imagesTr" / "c1.nii.gz", root / "imagesTs" / "c1.nii.gz")
    test = preprocess(load_dataset(root, split="test"), tmp_path / "cache" / "imagesTs",
                      workers=0, progress=False, target_spacing=rec["target_spacing"],
                      ct_clip=rec["ct_clip"])
    np.testing.assert_allclose(test.load_case(test.names.index("c1"))[0],
                               train.load_case(train.names.index("c1"))[0], rtol=1e-6, atol=1e-6)
    # ct_clip None: per-volume percentiles (what a training set without foreground had)
    per = preprocess(ds, tmp_path / "per", workers=0, progress=False, ct_clip=None,
                     target_spacing=rec["target_spacing"])
    n = per.meta(per.names.index("t0"))["norm"][0]
    assert n["per_volume"] and [n["lo"], n["hi"]] == pytest.approx([plo, phi], rel=1e-5)
    with pytest.raises(ValueError, match="one .lo, hi. per channel"):
        preprocess(ds, tmp_path / "bad", workers=0, progress=False, ct_clip=[[0, 1], [0, 1]])
