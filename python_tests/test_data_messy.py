"""Messy real-world datasets: a cache folder that is not a cache, two list files in one folder,
channel counts that disagree with dataset.json, 5-D and degenerate NIfTI headers, sidecar and
label-value mistakes, encodings. Each once deleted files, crashed far from the cause or passed
silently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from med3d_ext.data import DataError, load_dataset, preprocess  # noqa: E402
from med3d_ext.data.__main__ import main  # noqa: E402
from med3d_ext.data.io import read_header, read_volume, save_nifti  # noqa: E402
from med3d_ext.data.layouts import find_datasets  # noqa: E402
from python_tests._datahelp import affine, blob_case, make_msd, rng, save  # noqa: E402


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


# --------------------------------------------------------------------------- the cache folder


def test_out_that_is_not_a_cache_is_refused_and_left_alone(tmp_path, monkeypatch, capsys):
    root = make_msd(tmp_path / "Task01", n=2)
    (root / "notes.json").write_text('{"mine": 1}')
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "c0.json").write_text("{}")  # named like a case: once deleted as a stale entry
    before = {"ds": _files(root), "project": _files(project)}
    # the dataset's own folder, a folder of the user's files, and an empty --out (the cwd)
    with pytest.raises(DataError, match="holds the dataset itself"):
        preprocess(root, root, progress=False, workers=0)
    with pytest.raises(DataError, match=r"is not empty \(c0.json, config.json\)"):
        preprocess(root, project, progress=False, workers=0)
    monkeypatch.chdir(project)
    assert main(["preprocess", str(root), "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert main(["preprocess", str(root), "--out", "."]) == 2
    assert "not a med3d_ext preprocessing cache" in capsys.readouterr().err
    assert {"ds": _files(root), "project": _files(project)} == before
    # a folder with someone else's cache.json is not ours either
    other = tmp_path / "other"
    other.mkdir()
    (other / "cache.json").write_text('{"theirs": true}')
    with pytest.raises(DataError, match="not a med3d_ext preprocessing index"):
        preprocess(root, other, progress=False, workers=0)
    assert (other / "cache.json").read_text() == '{"theirs": true}'


def test_case_named_cache_and_an_interrupted_first_run(tmp_path):
    root = make_msd(tmp_path / "ds", n=2)
    # rename case c1 to "cache": its metadata once overwrote the cache index
    for sub in ("imagesTr", "labelsTr"):
        (root / sub / "c1.nii.gz").rename(root / sub / "cache.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1] = {"image": "./imagesTr/cache.nii.gz", "label": "./labelsTr/cache.nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "cache"
    (out / "cases").mkdir(parents=True)  # what a first run cut off before its index leaves
    pre = preprocess(root, out, progress=False, workers=0)
    assert pre.names == ["c0", "cache"] and pre.image(1).shape[0] == 1
    again = preprocess(root, out, progress=False, workers=0)
    assert again.stats["processed"] == 0 and again.stats["reused"] == 2
    np.testing.assert_array_equal(again.label(1), pre.label(1))


def test_version_1_cache_is_migrated_without_touching_other_files(tmp_path):
    root = make_msd(tmp_path / "ds", n=2)
    out = tmp_path / "cache"
    preprocess(root, out, progress=False, workers=0)
    # rebuild the old layout: entries beside cache.json, an index without cache_version
    for p in (out / "cases").iterdir():
        p.rename(out / p.name)
    (out / "cases").rmdir()
    info = json.loads((out / "cache.json").read_text())
    del info["cache_version"]
    (out / "cache.json").write_text(json.dumps(info))
    (out / "README.txt").write_text("kept")
    from med3d_ext.data import PreprocessedDataset

    with pytest.raises(DataError, match="another med3d_ext version"):
        PreprocessedDataset(out)
    pre = preprocess(root, out, progress=False, workers=0)
    assert pre.stats["processed"] == 2 and len(pre) == 2
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "cache.json", "cases"]


def test_two_list_files_in_one_folder_have_caches_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("MED3D_EXT_CACHE", str(tmp_path / "home_cache"))
    from med3d_ext.data import open_dataset

    folder = tmp_path / "mn"
    aff = affine((1.0, 1.0, 1.0), shape=(10, 9, 8))
    for n in "abcd":
        img, lab = blob_case((10, 9, 8))
        save(folder / "img" / f"{n}.nii.gz", img, aff)
        save(folder / "lab" / f"{n}.nii.gz", lab, aff)
    (folder / "train.txt").write_text("img/a.nii.gz lab/a.nii.gz\nimg/b.nii.gz lab/b.nii.gz\n")
    (folder / "val.txt").write_text("img/c.nii.gz lab/c.nii.gz\nimg/d.nii.gz lab/d.nii.gz\n")
    train = open_dataset(folder / "train.txt", progress=False, workers=0)
    val = open_dataset(folder / "val.txt", progress=False, workers=0)
    assert train.dir != val.dir
    assert train.names == ["a", "b"] and val.names == ["c", "d"]
    assert train.image(0).shape[0] == 1  # the first list's entries survived the second
    assert open_dataset(folder / "train.txt", progress=False, workers=0).stats["reused"] == 2


# --------------------------------------------------------------------------- channels, headers


def _write_msd(root: Path, images: list, modality: dict) -> Path:
    aff = affine((1.0, 1.0, 1.0), shape=images[0].shape[:3])
    training = []
    for i, img in enumerate(images):
        lab = (np.abs(img if img.ndim == 3 else img[..., 0]) > 1).astype(np.uint8)
        save(root / "imagesTr" / f"c{i}.nii.gz", img.astype(np.float32), aff)
        save(root / "labelsTr" / f"c{i}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "modality": modality, "labels": {"0": "bg", "1": "fg"},
        "training": training}))
    return root


@pytest.mark.parametrize("declared,images,bad", [
    ({"0": "T1", "1": "T2"}, ["3d", "3d"], "c0"),   # declares 2, every case has 1
    ({"0": "T1"}, ["4d2", "4d2"], "c0"),            # declares 1, every case has 2
    ({"0": "T1", "1": "T2"}, ["4d2", "3d"], "c1"),  # one case lacks a channel
])
def test_channel_count_must_match_dataset_json(tmp_path, declared, images, bad):
    r = rng()
    vols = [r.normal(0, 3, (9, 8, 7)) if k == "3d" else r.normal(0, 3, (9, 8, 7, 2))
            for k in images]
    root = _write_msd(tmp_path / "ds", vols, declared)
    with pytest.raises(DataError, match=rf"{bad}\.nii\.gz: has \d channel\(s\), but "
                                        r"dataset.json 'modality' declares"):
        preprocess(root, tmp_path / "cache", progress=False, workers=0)
    # with --skip-bad the odd case is dropped and named, the others kept
    if images[0] != images[1]:
        with pytest.warns(UserWarning, match="c1.nii.gz: has 1 channel"):
            pre = preprocess(root, tmp_path / "cache2", progress=False, workers=0,
                             skip_bad=True)
        assert pre.names == ["c0"] and pre.image(0).shape[0] == 2


def test_five_d_vector_nifti_is_read_and_preprocessed(tmp_path):
    r = rng()
    data = r.normal(0, 3, (9, 8, 7, 1, 2)).astype(np.float32)
    path = save(tmp_path / "v.nii.gz", data, affine(shape=(9, 8, 7)))
    vol = read_volume(path)
    spacing, shape, channels = read_header(path)
    assert vol.data.shape == (2, 9, 8, 7) and channels == 2 and list(shape) == [9, 8, 7]
    np.testing.assert_array_equal(vol.data[1], data[..., 0, 1])
    root = _write_msd(tmp_path / "ds", [data[..., 0, :]], {"0": "T1", "1": "T2"})
    save(root / "imagesTr" / "c0.nii.gz", data, affine(shape=(9, 8, 7)))  # the 5-D file
    pre = preprocess(root, tmp_path / "cache", progress=False, workers=0)
    assert pre.image(0).shape[0] == 2


def _msd_with_degenerate_case(tmp_path):
    """Two cases; c1's image and label have a degenerate (zero-scaled) affine."""
    root = make_msd(tmp_path / "ds", n=2)
    for sub in ("imagesTr", "labelsTr"):
        f = root / sub / "c1.nii.gz"
        im = nib.load(str(f))
        hdr = im.header.copy()
        hdr.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
        hdr.set_qform(None, code=0)
        nib.save(nib.Nifti1Image(np.asarray(im.dataobj), None, hdr), str(f))
    return root


def test_degenerate_affine_is_a_data_error_that_skip_bad_skips(tmp_path):
    root = _msd_with_degenerate_case(tmp_path)
    bad = root / "imagesTr" / "c1.nii.gz"
    for reader in (read_header, read_volume):
        with pytest.raises(DataError, match="c1.nii.gz: degenerate affine"):
            reader(bad)
    with pytest.warns(UserWarning, match="degenerate affine"):
        pre = preprocess(root, tmp_path / "cache", progress=False, workers=0, skip_bad=True)
    assert pre.names == ["c0"]


def test_pet_ct_channel_gets_the_ct_recipe(tmp_path):
    root = make_msd(tmp_path / "ds", n=2, modality="PET/CT")
    pre = preprocess(root, tmp_path / "cache", progress=False, workers=0)
    assert pre.modality == "CT" and pre.info["ct_clip"] is not None
    assert not any(n["per_volume"] for i in range(2) for n in pre.meta(i)["norm"])


# --------------------------------------------------------------------------- layouts


def test_folder_of_datasets_reports_a_broken_one(tmp_path, capsys):
    for n in ("A", "B"):
        make_msd(tmp_path / "pre" / n, n=1)
    js = tmp_path / "pre" / "B" / "dataset.json"
    js.write_text(js.read_text()[:-5])  # truncated
    (tmp_path / "pre" / "notes").mkdir()  # not a dataset: still skipped
    assert [p.name for p in find_datasets(tmp_path / "pre")] == ["A", "B"]
    # a malformed dataset.json is bad data: exit 1, as in the training CLI
    assert main(["preprocess", str(tmp_path / "pre"), "--out", str(tmp_path / "c")]) == 1
    assert "B/dataset.json: invalid JSON" in capsys.readouterr().err


def _medicalnet(folder: Path, text: str, encoding="utf-8", sidecar=None) -> Path:
    aff = affine(shape=(9, 8, 7))
    img, lab = blob_case((9, 8, 7))
    save(folder / "img" / "a.nii.gz", img, aff)
    save(folder / "lab" / "a.nii.gz", lab, aff)
    (folder / "train.txt").write_bytes(text.encode(encoding))
    if sidecar is not None:
        (folder / "labels.json").write_text(json.dumps(sidecar))
    return folder


def test_medicalnet_list_encodings_and_sidecars(tmp_path):
    line = "img/a.nii.gz lab/a.nii.gz\n"
    ds = load_dataset(_medicalnet(tmp_path / "bom", line, "utf-8-sig"))
    assert [c.name for c in ds.cases] == ["a"] and ds.cases[0].images[0].exists()
    with pytest.raises(DataError, match=r"latin/train.txt: is not UTF-8 text"):
        load_dataset(_medicalnet(tmp_path / "latin", "# caf\u00e9\n" + line, "latin-1"))
    with pytest.raises(DataError, match=r"labels.json: 'labels' must be a mapping"):
        load_dataset(_medicalnet(tmp_path / "lst", line, sidecar={"labels": ["bg", "fg"]}))
    with pytest.raises(DataError, match=r"labels.json: 'labels' key 'background' is not an int"):
        load_dataset(_medicalnet(tmp_path / "nn", line, sidecar={"background": 0, "fg": 1}))
    with pytest.raises(DataError, match=r"labels.json: 'modality' must be a name"):
        load_dataset(_medicalnet(tmp_path / "mod", line, sidecar={"modality": 3}))
    ok = load_dataset(_medicalnet(tmp_path / "ok", line,
                                  sidecar={"modality": "CT", "labels": {"0": "bg", "1": "x"}}))
    assert ok.labels == {0: "bg", 1: "x"} and ok.modality == "CT"


def _nnunet(root: Path, labels: dict, ending=".nii.gz", files=("a_0000.nii.gz",)) -> Path:
    aff = affine(shape=(9, 8, 7))
    img, lab = blob_case((9, 8, 7))
    for f in files:
        save(root / "imagesTr" / f, img, aff)
    save(root / "labelsTr" / "a.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "file_ending": ending,
        "numTraining": 1}))
    return root


@pytest.mark.parametrize("value", ["1", 1.0, True, -1])
def test_nnunet_label_values_must_be_integers(tmp_path, value):
    root = _nnunet(tmp_path / "ds", {"background": 0, "fg": value})
    with pytest.raises(DataError, match=rf"label 'fg' has value {value!r}; nnU-Net v2 label "
                                        "values are non-negative JSON integers"):
        load_dataset(root)


@pytest.mark.parametrize("ending", ["nii.gz", ".nii", ".NII.GZ"])
def test_nnunet_file_ending_mismatch_names_it(tmp_path, ending):
    root = _nnunet(tmp_path / "ds", {"background": 0, "fg": 1}, ending=ending)
    with pytest.raises(DataError, match=rf"imagesTr: holds no training images named "
                                        rf"<case>_<channel:4 digits>.*'file_ending' is "
                                        rf"'{ending}'\); found: a_0000.nii.gz"):
        load_dataset(root)


# --------------------------------------------------------------------------- outputs


def test_nifti_output_path_must_have_a_nifti_suffix(tmp_path):
    with pytest.raises(DataError, match=r"pred.npy: a NIfTI output path must end in"):
        save_nifti(np.zeros((3, 3, 3), np.uint8), np.eye(4), tmp_path / "pred.npy")
    assert list(tmp_path.iterdir()) == []


def test_synth_refuses_an_empty_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", "", "--cases", "1", "--size", "16"]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_integer_label_values_are_shown(tmp_path):
    root = make_msd(tmp_path / "ds", n=1)
    f = root / "labelsTr" / "c0.nii.gz"
    im = nib.load(str(f))
    lab = np.asarray(im.dataobj).astype(np.float32)
    lab[lab == 1] = 0.9999  # what a label map resampled with interpolation looks like
    save(f, lab, im.affine)
    with pytest.raises(DataError, match=r"c0.nii.gz: label has \d+ non-integer values, e.g. "
                                        r"\[0.999"):
        preprocess(root, tmp_path / "cache", progress=False, workers=0)


def test_no_command_names_the_commands(capsys):
    # argparse named its internal dest ("required: cmd"); the user needs the choices
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "required: {synth,real,preprocess}" in err and "cmd" not in err


def test_preprocess_skip_bad_says_a_header_then_each_case(tmp_path, capsys):
    # the CLI printed bare "skipped: ..." lines; training's warning has a header with the count
    root = _msd_with_degenerate_case(tmp_path)
    assert main(["preprocess", str(root), "--out", str(tmp_path / "c"), "--skip-bad",
                 "--workers", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    head = next(i for i, line in enumerate(err) if "skipped 1 bad case(s)" in line)
    assert err[head].startswith("warning: ") and "--skip-bad" in err[head]
    assert err[head + 1].startswith("skipped: ") and "degenerate affine" in err[head + 1]
