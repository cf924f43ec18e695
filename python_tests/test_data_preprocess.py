"""med3d_ext.data.preprocess: resampling, crop round trip, normalisation, cache invalidation."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

nib = pytest.importorskip("nibabel")

from med3d_ext.data import (PreprocessedDataset, load_dataset, preprocess,  # noqa: E402
                            to_source_space, write_prediction)
from med3d_ext.data.preprocess import (crop_affine, nonzero_bbox, process_case,  # noqa: E402
                                       resize, resize_affine, target_shape)
from python_tests._datahelp import affine, blob_case, make_msd, rng, save  # noqa: E402


def test_resize_matches_interpolate():
    x = torch.randn(2, 3, 5, 7, 4)
    for mode in ("trilinear", "nearest"):
        kw = {"align_corners": False} if mode == "trilinear" else {}
        torch.testing.assert_close(resize(x, (9, 4, 6), mode),
                                   F.interpolate(x, size=(9, 4, 6), mode=mode, **kw))


def test_resampled_affine_against_scipy():
    """Our trilinear resample on the affine we report == scipy sampling the source at the
    world positions of the new grid (independent reference), away from the clamped border."""
    ndi = pytest.importorskip("scipy.ndimage")
    r = rng()
    shape = tuple(int(v) for v in r.integers(9, 14, 3))
    spacing = r.uniform(0.6, 3.0, 3)
    aff = affine(spacing, "RAS", shape)
    img = ndi.gaussian_filter(r.normal(size=shape), 1.5).astype(np.float32)
    target = r.uniform(0.6, 3.0, 3)
    new_shape = target_shape(shape, spacing, target)
    out = resize(torch.from_numpy(img)[None, None], new_shape, "trilinear")[0, 0].numpy()
    new_aff = resize_affine(aff, shape, new_shape)
    # spacing of the result ~ target (exact up to the rounding of the shape)
    got_sp = np.linalg.norm(new_aff[:3, :3], axis=0)
    np.testing.assert_allclose(got_sp, spacing * np.asarray(shape) / np.asarray(new_shape))
    assert np.all(np.abs(got_sp - target) <= target / np.asarray(new_shape) * 0.51 + 1e-9)
    # both grids cover the same physical box: the outer voxel faces coincide
    for a, n in ((aff, shape), (new_aff, new_shape)):
        lo = nib.affines.apply_affine(a, [-0.5] * 3)
        hi = nib.affines.apply_affine(a, np.asarray(n) - 0.5)
        if a is aff:
            ref_lo, ref_hi = lo, hi
    np.testing.assert_allclose(lo, ref_lo, atol=1e-6)
    np.testing.assert_allclose(hi, ref_hi, atol=1e-6)
    idx = np.argwhere(np.ones(new_shape, bool))
    src = nib.affines.apply_affine(np.linalg.inv(aff) @ new_aff, idx)
    ref = ndi.map_coordinates(img, src.T, order=1, mode="nearest").reshape(new_shape)
    inner = np.all((src >= 0) & (src <= np.asarray(shape) - 1), axis=1).reshape(new_shape)
    np.testing.assert_allclose(out[inner], ref[inner], rtol=1e-4, atol=1e-5)


def test_nearest_labels_keep_label_set():
    r = rng()
    lab = np.zeros((12, 10, 8), np.uint8)
    for k in range(1, 5):  # blocks large enough to survive 2x downsampling
        c = r.integers(0, 4, 3) * 2
        lab[c[0]:c[0] + 4, c[1]:c[1] + 4, c[2]:c[2] + 4] = k
    for size, mode in [((24, 20, 16), "nearest"), ((7, 9, 5), "nearest-exact"),
                       ((12, 10, 8), "nearest-exact"), ((5, 13, 3), "nearest")]:
        t = torch.from_numpy(lab.astype(np.float32))[None, None]
        out = resize(t, size, mode)[0, 0].numpy()
        assert set(np.unique(out)) <= set(np.unique(lab))
        assert np.array_equal(out, np.rint(out))
    up = resize(torch.from_numpy(lab.astype(np.float32))[None, None], (24, 20, 16),
                "nearest-exact")[0, 0].numpy()
    assert set(np.unique(up)) == set(np.unique(lab))


def test_nonzero_bbox_and_crop_affine():
    img = np.zeros((1, 9, 8, 7), np.float32)
    img[0, 2:5, 3:8, 1] = 1
    lab = np.zeros((9, 8, 7), np.uint8)
    lab[6, 4, 4] = 1  # label outside the image support still kept
    assert nonzero_bbox(img) == [[2, 5], [3, 8], [1, 2]]
    assert nonzero_bbox(img, lab) == [[2, 7], [3, 8], [1, 5]]
    assert nonzero_bbox(np.zeros((1, 3, 4, 5))) == [[0, 3], [0, 4], [0, 5]]
    a = affine((1, 2, 3), "LPS", (9, 8, 7))
    ca = crop_affine(a, [2, 3, 1])
    np.testing.assert_allclose(nib.affines.apply_affine(ca, [0, 0, 0]),
                               nib.affines.apply_affine(a, [2, 3, 1]))


@pytest.mark.parametrize("codes,rot", [("LPS", 0), ("PIR", 0), ("RAS", 20)])
def test_crop_round_trip_exact(tmp_path, codes, rot):
    """No resampling (single case => median spacing is its own): the cached label written
    back with write_prediction equals the source label voxel for voxel, same header."""
    r = rng()
    shape = tuple(int(v) for v in r.integers(10, 16, 3))
    aff = affine(r.uniform(0.7, 2.5, 3), codes, shape, rot_deg=rot)
    img, lab = blob_case(shape, r, 3, zero_border=int(r.integers(1, 4)))
    root = tmp_path / "ds"
    save(root / "imagesTr" / "a.nii.gz", img, aff)
    save(root / "labelsTr" / "a.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "x", "2": "y"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    pre = preprocess(root, tmp_path / "cache", progress=False, workers=0)
    meta = pre.meta(0)
    assert np.prod(meta["shape"]) < np.prod(shape)  # the zero border was cropped
    out = write_prediction(np.asarray(pre.label(0)), meta, tmp_path / "pred.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert back.shape == shape
    np.testing.assert_array_equal(np.asarray(back.dataobj), lab)
    # float maps (C, D, H, W) go back too, channels last
    prob = np.stack([pre.label(0) == k for k in range(3)]).astype(np.float32)
    src = to_source_space(prob, meta)
    assert src.shape == shape + (3,)
    np.testing.assert_array_equal(src.argmax(-1), lab)


def test_resampled_round_trip(tmp_path):
    """With resampling the prediction maps back onto the original grid: same shape/affine,
    and the label lines up with the source (high overlap; boundaries may move a voxel)."""
    root = make_msd(tmp_path / "ds", n=3, shape=(16, 14, 10), spacing=(0.8, 1.0, 2.5),
                    codes="LAS", n_labels=2)
    pre = preprocess(root, tmp_path / "cache", progress=False, workers=0,
                     target_spacing=(1.1, 1.1, 1.3))
    for i in range(len(pre)):
        meta = pre.meta(i)
        src = nib.load(meta["label"])
        assert meta["shape"] != [b - a for a, b in meta["crop_box"]]
        back = to_source_space(np.asarray(pre.label(i)), meta)
        truth = np.asarray(src.dataobj)
        assert back.shape == truth.shape
        inter = ((back == 1) & (truth == 1)).sum()
        dice = 2 * inter / ((back == 1).sum() + (truth == 1).sum())
        assert dice > 0.9, dice
        # the cached grid's affine: world position of the label's centre of mass agrees
        com_c = np.argwhere(np.asarray(pre.label(i)) == 1).mean(0)
        com_s = np.argwhere(truth == 1).mean(0)
        w_c = nib.affines.apply_affine(np.asarray(meta["affine"]), com_c)
        w_s = nib.affines.apply_affine(src.affine, com_s)
        assert np.abs(w_c - w_s).max() < 1.0  # mm, under one voxel
    with pytest.raises(ValueError, match="expected"):
        to_source_space(np.zeros((3, 3, 3), np.uint8), pre.meta(0))


def test_normalisation_mr_and_ct(tmp_path):
    mr = preprocess(make_msd(tmp_path / "mr", n=2), tmp_path / "c_mr", progress=False,
                    workers=0)
    for i in range(len(mr)):
        x, _, meta = mr.load_case(i)
        raw = np.asarray(mr.image(i))[0]
        lo, hi = np.percentile(raw, [0.5, 99.5])
        ref = (np.clip(raw, lo, hi) - np.clip(raw, lo, hi).mean()) / np.clip(raw, lo, hi).std()
        np.testing.assert_allclose(x[0], ref, rtol=1e-4, atol=1e-4)
    ct = preprocess(make_msd(tmp_path / "ct", n=3, modality="CT"), tmp_path / "c_ct",
                    progress=False, workers=0)
    assert ct.modality == "CT"
    # CT clip bounds: percentiles over all cases' foreground voxels (sampled)
    fg = np.concatenate([np.asarray(ct.image(i))[0][np.asarray(ct.label(i)) > 0]
                         for i in range(len(ct))])
    lo, hi = np.percentile(fg, [0.5, 99.5])
    np.testing.assert_allclose(ct.info["ct_clip"][0], [lo, hi], rtol=1e-3, atol=0.5)
    for i in range(len(ct)):
        n = ct.meta(i)["norm"][0]
        assert [n["lo"], n["hi"]] == ct.info["ct_clip"][0]
        x, _, _ = ct.load_case(i)
        assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_cache_skip_and_invalidate(tmp_path):
    root = make_msd(tmp_path / "ds", n=3)
    cache = tmp_path / "cache"
    preprocess(root, cache, progress=False, workers=0)
    stamp = {p.name: p.stat().st_mtime_ns for p in (cache / "cases").glob("*.image.npy")}
    assert sorted(stamp) == ["c0.image.npy", "c1.image.npy", "c2.image.npy"]
    time.sleep(0.01)
    preprocess(root, cache, progress=False, workers=0)  # nothing changed: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "cases").glob("*.image.npy")} == stamp
    # change one source file: only its entry is rebuilt
    img = nib.load(str(root / "imagesTr" / "c1.nii.gz"))
    new = np.asarray(img.dataobj) * 2
    save(root / "imagesTr" / "c1.nii.gz", new, img.affine)
    st = os.stat(root / "imagesTr" / "c1.nii.gz")
    os.utime(root / "imagesTr" / "c1.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    pre = preprocess(root, cache, progress=False, workers=0)
    after = {p.name: p.stat().st_mtime_ns for p in (cache / "cases").glob("*.image.npy")}
    assert after["c0.image.npy"] == stamp["c0.image.npy"]
    assert after["c2.image.npy"] == stamp["c2.image.npy"]
    assert after["c1.image.npy"] != stamp["c1.image.npy"]
    i = pre.names.index("c1")
    # the cache holds the new intensities (raw, resampled): twice the old ones' scale
    assert float(np.abs(pre.image(i)).max()) > 1.5 * 150
    # removing a case from dataset.json drops it from the cache
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]
    (root / "dataset.json").write_text(json.dumps(meta))
    pre = preprocess(root, cache, progress=False, workers=0)
    assert pre.names == ["c0", "c1"] and not (cache / "cases" / "c2.image.npy").exists()
    # reopening without preprocessing
    again = PreprocessedDataset(cache)
    assert again.names == pre.names and again.num_classes == 3


def test_a_spacing_given_to_a_cache_is_kept_by_later_calls(tmp_path):
    """`data preprocess DS --spacing S --out CACHE`, then training with --cache CACHE (which
    gives no spacing): the cache's S is used and no case is redone (every case was redone at
    the median spacing and the cache overwritten, silently). A cache made at the median stays
    at the median."""
    root = make_msd(tmp_path / "ds", n=2, spacing=(1.0, 1.2, 2.0))
    cache = tmp_path / "cache"
    pre = preprocess(root, cache, progress=False, workers=0, target_spacing=(2.5, 2.5, 3.0))
    assert pre.info["target_spacing"] == [2.5, 2.5, 3.0]
    again = preprocess(root, cache, progress=False, workers=0)
    assert again.info["target_spacing"] == [2.5, 2.5, 3.0]
    assert again.info["target_spacing_from"] == "given"
    assert again.stats["processed"] == 0 and again.stats["reused"] == 2
    # another spacing given explicitly replaces it
    other = preprocess(root, cache, progress=False, workers=0, target_spacing=2.0)
    assert other.info["target_spacing"] == [2.0, 2.0, 2.0] and other.stats["processed"] == 2
    med = tmp_path / "median"
    m = preprocess(root, med, progress=False, workers=0)
    assert m.info["target_spacing_from"] == "median"
    assert preprocess(root, med, progress=False, workers=0).info["target_spacing"] == \
        m.info["target_spacing"]


def test_parallel_workers_match_serial(tmp_path):
    """Spawned workers give the same cache as in-process, and report bad cases the same."""
    root = make_msd(tmp_path / "ds", n=4)
    lab_p = root / "labelsTr" / "c3.nii.gz"
    lab = nib.load(str(lab_p))
    bad = np.asarray(lab.dataobj).copy()
    bad[0, 0, 0] = 9
    save(lab_p, bad, lab.affine)
    with pytest.warns(UserWarning, match="c3.nii.gz"):
        a = preprocess(root, tmp_path / "a", progress=False, workers=0, skip_bad=True)
    with pytest.warns(UserWarning, match="c3.nii.gz"):
        b = preprocess(root, tmp_path / "b", progress=True, workers=2, skip_bad=True)
    assert a.names == b.names == ["c0", "c1", "c2"]
    assert a.info["problems"] == b.info["problems"]
    assert "c3.nii.gz: label values [9] not declared" in b.info["problems"][0]
    for i in range(3):
        np.testing.assert_array_equal(a.image(i), b.image(i))
        np.testing.assert_array_equal(a.label(i), b.label(i))
        assert a.meta(i)["norm"] == b.meta(i)["norm"]


def test_process_case_multichannel_nnunet(tmp_path):
    r = rng()
    shape = (8, 9, 7)
    aff = affine((1, 1, 2), "LPS", shape)
    img, lab = blob_case(shape, r, 2)
    root = tmp_path / "nn"
    save(root / "imagesTr" / "x_0000.nii.gz", img, aff)
    save(root / "imagesTr" / "x_0001.nii.gz", img * 3, aff)
    save(root / "labelsTr" / "x.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    ds = load_dataset(root)
    out = process_case(ds.cases[0], (1, 1, 2), ds.labels)
    assert out["image"].shape[0] == 2
    np.testing.assert_allclose(out["image"][1], 3 * out["image"][0], rtol=1e-6)


def test_uses_ops_resize_when_present(tmp_path, monkeypatch):
    """The images go through med3d_ext.ops.resize once the kernel exists; labels stay on the
    centre-aligned nearest path (which ops.resize's "nearest" would shift)."""
    import med3d_ext.ops as ops

    calls = []

    def fake_resize(x, size, mode):
        calls.append(mode)
        return F.interpolate(x, size=size, mode=mode,
                             align_corners=False if mode == "trilinear" else None)

    monkeypatch.setattr(ops, "resize", fake_resize, raising=False)
    root = make_msd(tmp_path / "ds", n=2)
    preprocess(root, tmp_path / "c", progress=False, workers=0, target_spacing=(0.7, 0.9, 1.3))
    assert calls and set(calls) == {"trilinear"}


def test_cli_preprocesses_a_folder_of_datasets_into_the_training_cache(tmp_path, capsys):
    """`data preprocess DIR/pretrain` (the folder that `pretrain --data` takes) preprocesses
    each dataset (it used to stop with "no dataset.json"); with --out CACHE each lands where
    `pretrain --cache CACHE` looks, so training reuses it instead of preprocessing again."""
    from med3d_ext.data.__main__ import main
    from med3d_ext.data.synthetic import synth

    root = tmp_path / "synth"
    dirs = synth(root, cases=1, size=16, seed=int(rng().integers(0, 1000)))["pretrain"]
    cache = tmp_path / "cache"
    assert main(["preprocess", str(root / "pretrain"), "--out", str(cache), "--workers", "0",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{len(dirs)} datasets" in out
    made = sorted(p for p in cache.iterdir() if (p / "cache.json").is_file())
    assert len(made) == len(dirs) == 8
    train = pytest.importorskip("med3d_ext.train.tasks")
    for d in dirs:  # what training opens with --cache CACHE is the folder filled above
        pre = train.open_preprocessed(d, {"cache": str(cache), "progress": False})
        assert pre.dir in made and pre.stats["processed"] == 0 and pre.stats["reused"] == 1
    # one dataset keeps the documented meaning of --out: the cache folder itself
    one = tmp_path / "one"
    assert main(["preprocess", str(dirs[0]), "--out", str(one), "--workers", "0",
                 "--no-progress"]) == 0
    assert (one / "cache.json").is_file()


def test_bad_spacing_and_workers_are_refused_up_front(tmp_path, capsys):
    """--spacing -1 1 1 used to be accepted (an axis collapsed to one voxel, silently), 0 crashed
    every case with an OverflowError; --workers -1 was printed as "-1 workers"."""
    from med3d_ext.data.__main__ import main

    root = make_msd(tmp_path / "ds", n=1)
    for spacing in ([-1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [float("nan"), 1.0, 1.0]):
        with pytest.raises(ValueError, match="positive"):
            preprocess(root, tmp_path / "c", target_spacing=spacing, workers=0, progress=False)
    with pytest.raises(ValueError, match="workers"):
        preprocess(root, tmp_path / "c", workers=-1, progress=False)
    assert not (tmp_path / "c").exists()
    assert main(["preprocess", str(root), "--out", str(tmp_path / "c"), "--spacing", "-1", "1",
                 "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--spacing" in err and "Traceback" not in err
    # one value (isotropic) or three, as the message says (argparse took exactly three)
    assert main(["preprocess", str(root), "--out", str(tmp_path / "c"), "--spacing", "1", "2",
                 "--no-progress"]) == 2
    assert "expected one or 3 positive mm values" in capsys.readouterr().err
    assert main(["preprocess", str(root), "--out", str(tmp_path / "c"), "--spacing", "2",
                 "--workers", "0", "--no-progress"]) == 0
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["target_spacing"] == [2, 2, 2]


def test_normalize_in_place_matches_the_formula(tmp_path):
    """normalize() runs clip, subtract and divide in place: bitwise the float32 result of
    (np.clip(x, lo, hi) - mean) / std, for fresh random volumes, float32 and float64 input."""
    ds = preprocess(make_msd(tmp_path / "n", n=1, shape=(9, 8, 7)), tmp_path / "c", progress=False,
                    workers=0)
    n = ds.meta(0)["norm"][0]
    r = rng()
    for dt in (np.float32, np.float64):
        x = (r.normal(0, 3, (1, 5, 6, 7)) * n["std"] + n["mean"]).astype(dt)
        want = ((np.clip(x[0], n["lo"], n["hi"]) - n["mean"]) / n["std"]).astype(np.float32)
        got = ds.normalize(x, 0)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got[0], want)


def test_label_storage_dtype_never_wraps(tmp_path):
    """Label maps go to the narrowest integer type that holds them: predictions with labels
    >= 256 or >= 32768 written back (write_prediction) and evaluate's argmax over more than 256
    classes keep their values (they were cast to uint8 / int16 and wrapped)."""
    from med3d_ext.data.preprocess import label_storage_dtype
    from med3d_ext.train.evaluate import _to_source

    assert [label_storage_dtype(m) for m in (0, 255, 256, 32767, 32768, 2**31 - 1, 2**31)] == \
        [np.uint8, np.uint8, np.int16, np.int16, np.int32, np.int32, np.int64]
    assert label_storage_dtype(3, -1) == np.int16 and label_storage_dtype(3, -40000) == np.int32
    ds = preprocess(make_msd(tmp_path / "p", n=1, shape=(9, 8, 7)), tmp_path / "c", progress=False,
                    workers=0)
    meta = ds.meta(0)
    grid = tuple(meta["shape"])
    r = rng()
    for top in (300, 40000):
        pred = r.integers(0, 3, grid)
        pred[pred == 2] = top
        back = nib.load(str(write_prediction(pred, meta, tmp_path / f"p{top}.nii.gz")))
        vals = np.unique(np.asarray(back.dataobj))
        assert top in vals and set(vals.tolist()) <= {0, 1, top}
    # 300 classes: the argmax index 299 survives the conversion to the source grid
    probs = torch.zeros((300, *grid))
    probs[299] = 1.0
    probs[0, 0, 0, 0], probs[299, 0, 0, 0] = 2.0, 0.0
    lab = _to_source(probs, meta)
    assert lab.dtype == np.int16 and lab.max() == 299


def test_the_worker_count_used_is_reported(tmp_path, capsys):
    """The CLI printed "(default workers)" instead of how many it used (README audit)."""
    import os

    from med3d_ext.data.__main__ import main as data_main
    from med3d_ext.data.preprocess import worker_count

    assert worker_count(None, 3) == 0 and worker_count(None, 100) == min(os.cpu_count() or 1, 8)
    assert worker_count(5, 2) == 2 and worker_count(0, 9) == 0
    root = make_msd(tmp_path / "ds", n=2)
    assert preprocess(root, tmp_path / "c0", progress=False, workers=2).stats["workers"] == 2
    assert preprocess(root, tmp_path / "c1", progress=False).stats["workers"] == 0
    assert data_main(["preprocess", str(root), "--out", str(tmp_path / "c2"), "--workers", "2",
                      "--no-progress"]) in (0, None)
    assert "(2 worker processes)" in capsys.readouterr().out


def test_preprocess_arguments_are_checked_before_any_case(tmp_path):
    """A reversed or NaN ct_clip made every voxel 0 or NaN; a bad seed failed in every case job
    and was blamed on the image files; workers="2" and a 2-value spacing failed deep inside
    (data API audit). TypeError for a wrong type, ValueError for a bad value."""
    root = make_msd(tmp_path / "ds", n=1, modality="CT")
    bad = [(dict(ct_clip=[[100, -100]]), ValueError, "finite lo <= hi"),
           (dict(ct_clip=[[float("nan"), 5]]), ValueError, "finite lo <= hi"),
           (dict(ct_clip="bogus"), ValueError, "ct_clip: expected \"dataset\""),
           (dict(seed=-1), ValueError, "seed: expected an int >= 0, got -1"),
           (dict(seed=1.5), TypeError, "seed: expected an int >= 0, got 1.5"),
           (dict(workers="2"), TypeError, "workers"), (dict(workers=1.5), TypeError, "workers"),
           (dict(target_spacing=(1, 1)), ValueError, "one or 3 positive mm values"),
           (dict(target_spacing="1"), TypeError, "one or 3 mm values")]
    for kw, err, match in bad:
        with pytest.raises(err, match=match):
            preprocess(root, tmp_path / "c", progress=False, **kw)
    assert not (tmp_path / "c").exists()
    # a given range per channel (a training set's clip for its test images) still works
    pre = preprocess(root, tmp_path / "c", progress=False, workers=0, ct_clip=[[-100.0, 200.0]])
    assert pre.info["ct_clip"] == [[-100.0, 200.0]]
    # and a one-value range, which a CT foreground of one intensity makes (a test split
    # replays its training set's recipe)
    pre = preprocess(root, tmp_path / "c1", progress=False, workers=0, ct_clip=[[50.0, 50.0]])
    assert pre.info["ct_clip"] == [[50.0, 50.0]]


def test_labels_beyond_float32_integers_survive_resampling(tmp_path):
    """Nearest resampling went through float32: a label 2^24 + 1 came back as 2^24, a class the
    dataset does not have (data API audit); to_source_space did the same to predictions."""
    import nibabel as nib

    from med3d_ext.data.preprocess import exact_float, to_source_space

    big = 2**24 + 1
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, sp in enumerate((1.0, 2.0, 3.0)):  # cases 0 and 2 are resampled to the median 2 mm
        x = np.random.default_rng(i).uniform(1, 2, (10, 11, 9)).astype(np.float32)
        y = np.zeros((10, 11, 9), np.int32)
        y[3:7, 3:8, 2:6] = big
        for folder, a in (("imagesTr", x), ("labelsTr", y)):
            nib.save(nib.Nifti1Image(a, np.diag([sp] * 3 + [1])), str(root / folder / f"c{i}.nii.gz"))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "big", "modality": {"0": "MRI"},
                                                   "labels": {"0": "bg", str(big): "big"},
                                                   "training": training}))
    pre = preprocess(root, tmp_path / "c", progress=False, workers=0)
    for i in range(len(pre)):
        assert set(np.unique(pre.label(i)).tolist()) == {0, big}, pre.names[i]
    back = to_source_space(np.asarray(pre.label(0)), pre.meta(0))
    assert set(np.unique(back).tolist()) == {0, big}
    assert exact_float(np.array([0, 2**24])) == np.float32
    assert exact_float(np.array([0, -(2**24) - 1])) == np.float64
    with pytest.raises(ValueError, match="beyond 2\\^53"):
        exact_float(np.array([2**60]))
