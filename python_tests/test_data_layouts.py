"""med3d_ext.data.layouts (MSD, nnU-Net v2, MedicalNet lists) and every bad-data case."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from med3d_ext.data import DataError, detect_layout, load_dataset, preprocess  # noqa: E402
from med3d_ext.data.__main__ import main  # noqa: E402
from python_tests._datahelp import affine, blob_case, make_msd, rng, save  # noqa: E402


def test_msd_layout(tmp_path):
    root = make_msd(tmp_path / "Task09_X", n=3, modality="CT",
                    labels={"0": "background", "1": "spleen", "2": "lesion"})
    assert detect_layout(root) == "msd"
    ds = load_dataset(root)
    assert ds.layout == "msd" and len(ds) == 3 and ds.modality == "CT" and ds.is_ct
    assert ds.class_names == ["background", "spleen", "lesion"] and ds.num_classes == 3
    assert [c.name for c in ds.cases] == ["c0", "c1", "c2"]
    assert all(c.images[0].exists() and c.label.exists() for c in ds.cases)
    assert "3 cases" in ds.summary()


def test_msd_multisequence_channel(tmp_path):
    r = rng()
    shape = (8, 7, 6)
    aff = affine((1, 1, 1), "RAS", shape)
    img, lab = blob_case(shape, r, 2)
    root = tmp_path / "brain"
    save(root / "imagesTr" / "b.nii.gz", np.stack([img, 2 * img, 3 * img, 4 * img], -1), aff)
    save(root / "labelsTr" / "b.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "bg", "1": "tumour"},
        "training": [{"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}]}))
    ds = load_dataset(root)
    assert ds.channels == ["FLAIR", "T1w", "t1gd", "T2w"] and ds.modality == "MR"
    assert ds.channel_index("t2w") == 3 and ds.channel_index(1) == 1
    with pytest.raises(ValueError, match="no channel named 'ADC'"):
        ds.channel_index("ADC")
    pre = preprocess(root, tmp_path / "c", progress=False, workers=0)
    x, y, _ = pre.load_case(0, channel="T2w")
    assert x.shape[0] == 1 and y.shape == x.shape[1:]
    raw = np.asarray(pre.image(0))
    assert raw.shape[0] == 4
    np.testing.assert_allclose(raw[3], 4 * raw[0], rtol=1e-5, atol=1e-4)


def test_nnunet_layout(tmp_path):
    r = rng()
    root = tmp_path / "Dataset001_X"
    names = ["a", "b"]
    for n in names:
        shape = (9, 8, 7)
        aff = affine((1, 1, 2), "LPS", shape)
        img, lab = blob_case(shape, r, 3)
        save(root / "imagesTr" / f"{n}_0000.nii.gz", img, aff)
        save(root / "imagesTr" / f"{n}_0001.nii.gz", img + 1, aff)
        save(root / "labelsTr" / f"{n}.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "liver": 1,
                                                            "tumour": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    assert detect_layout(root) == "nnunet"
    # macOS AppleDouble files (as in the MSD tarballs) are not cases
    (root / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    ds = load_dataset(root)
    assert ds.layout == "nnunet" and [c.name for c in ds.cases] == names
    assert ds.channels == ["CT", "PET"] and ds.is_ct
    assert ds.class_names == ["background", "liver", "tumour"]
    assert [p.name for p in ds.cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    pre = preprocess(root, tmp_path / "c", progress=False, workers=0)
    assert len(pre) == 2 and np.asarray(pre.image(0)).shape[0] == 2
    # a missing channel file of a case is named
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"b_0001\.nii\.gz: file named by the dataset does not"):
        load_dataset(root)
    # region-based labels are refused clearly
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["whole"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="region"):
        load_dataset(root)


def test_case_paths_absolute_for_relative_roots(tmp_path, monkeypatch):
    """A dataset opened by a relative path records absolute file paths in its cases (and so in
    the cache's metadata, where evaluate reads the labels from any working directory); the
    nnU-Net layout once kept them relative to the cwd of the first preprocessing."""
    root = make_msd(tmp_path / "msd", n=1)
    nn = tmp_path / "Dataset002_Y"
    for sub, f in (("imagesTr", "c0_0000.nii.gz"), ("labelsTr", "c0.nii.gz")):
        (nn / sub).mkdir(parents=True)
        shutil.copy(root / sub / "c0.nii.gz", nn / sub / f)
    (nn / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "c1": 1, "c2": 2},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    monkeypatch.chdir(tmp_path)
    for name in ("msd", "Dataset002_Y"):
        (case,) = load_dataset(name).cases
        assert all(Path(p).is_absolute() for p in [*case.images, case.label]), case
        pre = preprocess(name, tmp_path / f"c_{name}", progress=False, workers=0)
        assert Path(pre.meta(0)["label"]).is_absolute()


@pytest.mark.parametrize("field,value,want", [
    ("labels", {"background": 0, "spleen": 1}, r"'labels' key 'background' is not an integer"),
    ("labels", ["background", "spleen"], r"'labels' must be a mapping.*got list"),
    ("modality", {"a": "CT"}, r"'modality' key 'a' is not an integer"),
    ("training", "imagesTr", r"'training' must be a list"),
    # raw TypeErrors from `in` / pathlib before the audit:
    ("training", [1, 2], r"training entry without 'image': 1"),
    ("training", [{"image": None}], r"training entry's 'image' must be a file path, got None"),
    ("training", [{"image": ["a", "b"]}], r"'image' must be a file path, got \['a', 'b'\]"),
    ("training", [{"image": "imagesTr/c0.nii.gz", "label": 7}],
     r"training entry's 'label' must be a file path, got 7"),
    ("test", [{"image": 5}], r"test entry's 'image' must be a file path, got 5"),
    ("channel_names", {"0": "CT"}, r"labels: '0': 'c0' maps a value to a name \(MSD style\)"),
])
def test_malformed_dataset_json(tmp_path, field, value, want):
    """Hand-written dataset.json mistakes (nnU-Net label direction in an MSD file and back, a
    list for a mapping, a string for the training list) name dataset.json and the field; they
    were ValueError/AttributeError tracebacks or 'file i does not exist'."""
    root = make_msd(tmp_path / "ds", n=1)
    meta = json.loads((root / "dataset.json").read_text())
    meta[field] = value
    if field == "channel_names":  # an nnU-Net v2 file written with MSD's labels
        meta["file_ending"] = ".nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=want) as e:
        load_dataset(root, split="test" if field == "test" else "train")
    assert "dataset.json" in str(e.value)


@pytest.mark.parametrize("typo,key,said", [
    ("modalty", "modality", "normalised as MR, not CT"),
    ("label", "labels", "taken from the label files' values"),
    ("trainig", "training", "no training case was found"),
    ("nmae", "name", "the folder's name named the dataset"),
])
def test_misspelt_dataset_json_keys_are_refused(tmp_path, typo, key, said):
    """A misspelt key was ignored and its default used: "modalty" normalised a CT dataset as
    MR without a word, "label" took the classes from the voxel values, "trainig" ended in
    "empty dataset" (black-box audit of the CLI)."""
    root = make_msd(tmp_path / "ds", n=1, modality="CT")
    meta = json.loads((root / "dataset.json").read_text())
    meta[typo] = meta.pop(key)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"key '{typo}' is not one med3d_ext reads; did you "
                                        rf"mean '{key}'\?") as e:
        load_dataset(root)
    assert "dataset.json" in str(e.value) and said in str(e.value)


def test_dataset_json_keys_that_are_not_typos_are_accepted(tmp_path):
    # other MSD / nnU-Net keys, a custom key close to one that is present, and nnU-Net's
    # channel_names standing for MSD's modality
    root = make_msd(tmp_path / "ds", n=1, modality="CT")
    meta = json.loads((root / "dataset.json").read_text())
    meta.update({"description": "x", "tensorImageSize": "3D", "numTest": 0, "label": "extra",
                 "licence": "CC"})
    (root / "dataset.json").write_text(json.dumps(meta))
    assert load_dataset(root).modality == "CT"


@pytest.mark.parametrize("text,got", [("null", "NoneType"), ("[1, 2]", "list"), ('"x"', "str")])
def test_dataset_json_that_is_not_an_object(tmp_path, text, got):
    # null gave "argument of type 'NoneType' is not iterable"
    root = make_msd(tmp_path / "ds", n=1)
    (root / "dataset.json").write_text(text)
    with pytest.raises(DataError, match=rf"dataset.json: must hold a JSON object.*got {got}"):
        load_dataset(root)


def test_medicalnet_list(tmp_path):
    r = rng()
    root = tmp_path / "mn"
    lines = []
    for i in range(3):
        shape = (8, 8, 6)
        aff = affine((1, 1, 1.5), "RAS", shape)
        img, lab = blob_case(shape, r, 2)
        save(root / "MRBrainS18" / "images" / f"{i:03d}.nii.gz", img, aff)
        save(root / "MRBrainS18" / "label" / f"{i:03d}.nii.gz", lab, aff)
        lines.append(f"MRBrainS18/images/{i:03d}.nii.gz MRBrainS18/label/{i:03d}.nii.gz")
    (root / "train.txt").write_text("\n".join(lines) + "\n\n")
    assert detect_layout(root) == "medicalnet"
    ds = load_dataset(root)
    assert ds.layout == "medicalnet" and len(ds) == 3 and ds.labels is None
    pre = preprocess(root, tmp_path / "c", progress=False, workers=0)
    assert pre.num_classes == 2  # inferred from the labels found
    # the list file itself works too, and a labels.json sidecar declares classes/modality
    (root / "labels.json").write_text(json.dumps({"modality": "CT",
                                                  "labels": {"0": "bg", "1": "brain"}}))
    ds2 = load_dataset(root / "train.txt")
    assert ds2.class_names == ["bg", "brain"] and ds2.modality == "CT"
    (root / "bad.txt").write_text("a b c\n")
    with pytest.raises(DataError, match=r"bad\.txt: line 1"):
        load_dataset(root / "bad.txt")


def test_unknown_layout(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no dataset.json"):
        load_dataset(tmp_path / "x")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "x" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        load_dataset(tmp_path / "x")


# ------------------------------------------------------------------------------------------
# bad data: each a clear DataError naming the file; skip_bad continues with a warning list


def _corrupt(root, kind):
    """Break case c1 of an MSD dataset in one way; return the file that should be named."""
    img_p, lab_p = root / "imagesTr" / "c1.nii.gz", root / "labelsTr" / "c1.nii.gz"
    img = nib.load(str(img_p))
    data, aff = np.asarray(img.dataobj), img.affine
    if kind == "truncated":
        raw = img_p.read_bytes()
        img_p.write_bytes(raw[: len(raw) * 2 // 3])
        return img_p, "corrupt or truncated"
    if kind == "non_image":
        img_p.write_bytes(b"this is a text file, not NIfTI\n" * 10)
        return img_p, "not a readable image"
    if kind == "shape":
        save(lab_p, np.zeros(tuple(s + 1 for s in data.shape), np.uint8), aff)
        return lab_p, "label shape"
    if kind == "affine":
        a2 = aff.copy()
        a2[0, 3] += 2.0  # 2 mm shift
        save(lab_p, np.asarray(nib.load(str(lab_p)).dataobj), a2)
        return lab_p, "label affine differs"
    if kind == "nan":
        d = data.astype(np.float32)
        d[1, 1, 1] = np.nan
        d[2, 2, 2] = -np.inf
        save(img_p, d, aff)
        return img_p, "2 NaN/Inf voxels"
    if kind == "undeclared":
        lab = np.asarray(nib.load(str(lab_p)).dataobj).copy()
        lab[0, 0, 0] = 7
        save(lab_p, lab, aff)
        return lab_p, r"label values \[7\] not declared"
    if kind == "missing":
        img_p.unlink()
        return img_p, "does not exist"
    if kind == "complex":  # the imaginary part was silently dropped
        save(img_p, data.astype(np.complex64) * (1 + 1j), aff)
        return img_p, "voxel type complex64 is not real-valued"
    if kind == "float32_overflow":  # finite int16 * scl_slope beyond float32: cached as inf
        im = nib.Nifti1Image(np.ones(data.shape, np.int16), aff)
        im.header["scl_slope"], im.header["scl_inter"] = np.float32(1e38), np.float32(3e38)
        nib.save(im, str(img_p))
        return img_p, r"\d+ voxels overflow float32"
    raise ValueError(kind)


BAD = ["truncated", "non_image", "shape", "affine", "nan", "undeclared", "missing", "complex",
       "float32_overflow"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_data(tmp_path, kind):
    root = make_msd(tmp_path / "ds", n=3)
    bad_file, problem = _corrupt(root, kind)
    with pytest.raises(DataError, match=problem) as exc:
        preprocess(root, tmp_path / "cache", progress=False, workers=0)
    assert exc.value.path.endswith(bad_file.name), exc.value.path
    assert bad_file.name in str(exc.value)
    with pytest.warns(UserWarning, match=rf"(?s)skipped 1 bad case.*{bad_file.name}"):
        pre = preprocess(root, tmp_path / "cache", progress=False, workers=0, skip_bad=True)
    assert pre.names == ["c0", "c2"]
    assert len(pre.info["problems"]) == 1 and bad_file.name in pre.info["problems"][0]


def test_affine_within_tolerance_passes(tmp_path):
    root = make_msd(tmp_path / "ds", n=1)
    lab_p = root / "labelsTr" / "c0.nii.gz"
    lab = nib.load(str(lab_p))
    a2 = lab.affine.copy()
    a2[:3, 3] += 1e-4  # float32 header rounding scale: not a mismatch
    save(lab_p, np.asarray(lab.dataobj), a2)
    assert len(preprocess(root, tmp_path / "c", progress=False, workers=0)) == 1


def test_empty_dataset(tmp_path):
    root = make_msd(tmp_path / "ds", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="empty dataset"):
        load_dataset(root)
    with pytest.raises(DataError, match="empty dataset"):
        preprocess(root, tmp_path / "c", progress=False, workers=0, skip_bad=True)
    # all cases bad + skip_bad: still an error, listing the problems
    root2 = make_msd(tmp_path / "ds2", n=1)
    _corrupt_all = root2 / "imagesTr" / "c0.nii.gz"
    _corrupt_all.write_bytes(b"junk")
    with pytest.raises(DataError, match="empty dataset"):
        preprocess(root2, tmp_path / "c2", progress=False, workers=0, skip_bad=True)


def test_cli_preprocess_skip_bad(tmp_path, capsys):
    root = make_msd(tmp_path / "ds", n=3)
    _corrupt(root, "nan")
    # bad data: exit 1, as in the training CLI (2 is for the command line's errors)
    assert main(["preprocess", str(root), "--out", str(tmp_path / "c"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "c1.nii.gz" in err and "NaN/Inf" in err
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["preprocess", str(root), "--out", str(tmp_path / "c"), "--no-progress",
                   "--skip-bad", "--workers", "0"])
    assert rc == 0
    out = capsys.readouterr()
    assert "2 cases cached" in out.out and "skipped:" in out.err and "c1.nii.gz" in out.err
    # the list is printed once: the CLI does not also show preprocess()'s warning of it
    # (shown by Python with a source line, it repeated every skipped case)
    assert not [w for w in caught if "bad case" in str(w.message)]
    assert out.err.count("c1.nii.gz") == 1
    shutil.rmtree(tmp_path / "c")
    # the call's throughput (cases per second) into a fresh cache; a rerun reuses every case
    args = ["preprocess", str(root), "--out", str(tmp_path / "fresh"), "--no-progress",
            "--skip-bad", "--workers", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
        first = capsys.readouterr().out
        assert main(args) == 0
        second = capsys.readouterr().out
    assert re.search(r"preprocessed 2 case\(s\) in [\d.]+ s: [\d.]+ cases/s", first), first
    assert "all 2 case(s) reused from the cache" in second, second


def test_medicalnet_pooled_folders_same_names(tmp_path):
    """MedicalNet lists pool datasets whose files share names: cases stay distinct."""
    import torch

    r = rng()
    root = tmp_path / "mn"
    lines = []
    for sub in ("dsA", "dsB"):
        shape = (7, 6, 5)
        aff = affine((1, 1, 1), "RAS", shape)
        img, lab = blob_case(shape, r, 2)
        save(root / sub / "img" / "001.nii.gz", img, aff)
        save(root / sub / "lab" / "001.nii.gz", lab, aff)
        lines.append(f"{sub}/img/001.nii.gz {sub}/lab/001.nii.gz")
    (root / "train.txt").write_text("\n".join(lines))
    ds = load_dataset(root)
    assert [c.name for c in ds.cases] == ["dsA_img_001", "dsB_img_001"]
    threads = torch.get_num_threads()
    pre = preprocess(ds, tmp_path / "c", progress=False, workers=0)
    assert torch.get_num_threads() == threads  # in-process work leaves the caller's threads
    assert len(pre) == 2
    assert pre.meta(0)["axcodes"] == "RAS"
    np.testing.assert_allclose(pre.meta(0)["out_spacing"], pre.meta(0)["target_spacing"],
                               rtol=0.2)


def test_bad_classification_files_and_cache_index(tmp_path):
    # a negative class was accepted (CE failed on it only in training); an empty image cell
    # named the root folder as the image; a classes.json whose "classes" is not a mapping
    # gave an AttributeError; a cut-off cache.json a JSONDecodeError/KeyError
    from med3d_ext.data import PreprocessedDataset

    root = tmp_path / "cls"
    root.mkdir()
    for text, want in (("image,label\na.nii.gz,-1\n", r"line 2: label -1 is negative"),
                       ("image,label\n,1\n", r"line 2: no image path"),
                       ("image,label\na.nii.gz\n", r"line 2: label None is not an integer")):
        (root / "labels.csv").write_text(text)
        with pytest.raises(DataError, match=want):
            load_dataset(root)
    (root / "labels.csv").write_text("image,label\na.nii.gz,1\n")
    for classes, want in ((["no", "yes"], r"'classes' must be a mapping"),
                          ({"no": 0}, r"'classes' key 'no' is not an integer")):
        (root / "classes.json").write_text(json.dumps({"classes": classes}))
        with pytest.raises(DataError, match=rf"classes.json: {want}"):
            load_dataset(root)
    pre = preprocess(make_msd(tmp_path / "ds", n=1), tmp_path / "cache", progress=False,
                     workers=0)
    index = pre.dir / "cache.json"
    good = index.read_text()
    for text in (good[: len(good) // 2], json.dumps({"cases": []}), "null"):
        index.write_text(text)
        with pytest.raises(DataError, match=r"cache.json: corrupt cache index"):
            PreprocessedDataset(pre.dir)


def test_none_paths_are_named():
    # pathlib's "expected str, bytes or os.PathLike object, not NoneType" named no argument
    from med3d_ext.data import find_datasets, read_volume

    for fn in (load_dataset, detect_layout, find_datasets, read_volume):
        with pytest.raises(TypeError, match=r"argument 'path' must be a file or folder path, "
                                            r"got NoneType"):
            fn(None)


def test_a_missing_modality_is_said():
    """An MSD dataset.json without 'modality' read every channel as 'unknown' and normalised a
    CT scan as MR (no HU clip), unsaid (a misspelt key was already refused)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = make_msd(Path(tmp) / "ds", n=1)
        meta = json.loads((root / "dataset.json").read_text())
        del meta["modality"]
        (root / "dataset.json").write_text(json.dumps(meta))
        with pytest.warns(UserWarning, match=r"no 'modality' key: the channel is read as "
                                             r"'unknown' and normalised as MR"):
            ds = load_dataset(root)
        assert ds.channels == ["unknown"]
