"""med3d_ext.data.sampling: patches, padding, foreground ratio, domain mixing, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from med3d_ext.data import (BatchLoader, MultiDomainSampler, PatchSampler,  # noqa: E402
                            crop_patch, make_loader, preprocess)
from python_tests._datahelp import affine, make_msd, rng, save  # noqa: E402


def _crop_ref(arr, start, size, fill=0):
    """Reference: pad generously with numpy, then slice."""
    pad = max(size) + max(abs(s) for s in start) + 1
    big = np.pad(arr, [(0, 0)] * (arr.ndim - 3) + [(pad, pad)] * 3, constant_values=fill)
    sl = tuple(slice(s + pad, s + pad + n) for s, n in zip(start, size))
    return big[(Ellipsis, *sl)]


def test_crop_patch_against_pad_reference():
    r = rng()
    for _ in range(30):
        shape = tuple(int(v) for v in r.integers(1, 9, 3))
        arr = r.normal(size=(2, *shape)).astype(np.float32)
        size = tuple(int(v) for v in r.integers(1, 12, 3))
        start = tuple(int(v) for v in r.integers(-12, 12, 3))
        np.testing.assert_array_equal(crop_patch(arr, start, size, fill=-3.0),
                                      _crop_ref(arr, start, size, fill=-3.0))
        # into a given array (a batch row), whatever it held before
        buf = np.full((2, *size), np.nan, np.float32)
        assert crop_patch(arr, start, size, fill=-3.0, out=buf) is buf
        np.testing.assert_array_equal(buf, _crop_ref(arr, start, size, fill=-3.0))
    with pytest.raises(ValueError, match=r"out has shape \(2, 3, 3, 3\), expected \(2, 4, 4, 4\)"):
        crop_patch(arr, (0, 0, 0), (4, 4, 4), out=np.empty((2, 3, 3, 3), np.float32))
    # non-contiguous input
    arr = r.normal(size=(9, 8, 7))[::2, :, ::-1]
    np.testing.assert_array_equal(crop_patch(arr, (-1, 2, 3), (4, 4, 4)),
                                  _crop_ref(arr, (-1, 2, 3), (4, 4, 4)))


def _tiny_fg_dataset(root, n=3, shape=(24, 20, 16)):
    """Cases with a single small foreground cube, so random patches rarely hit it."""
    r = rng()
    training = []
    for i in range(n):
        aff = affine((1, 1, 1), "RAS", shape)
        img = r.normal(100, 5, shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        c = [int(r.integers(2, s - 4)) for s in shape]
        lab[c[0]:c[0] + 2, c[1]:c[1] + 2, c[2]:c[2] + 2] = 1
        save(root / "imagesTr" / f"t{i}.nii.gz", img, aff)
        save(root / "labelsTr" / f"t{i}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/t{i}.nii.gz", "label": f"./labelsTr/t{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "fg"},
        "training": training}))
    return root


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    base = tmp_path_factory.mktemp("sampling")
    dss = [_tiny_fg_dataset(base / "A"),
           make_msd(base / "B", n=2, shape=(10, 9, 8)),
           make_msd(base / "C", n=2, shape=(14, 12, 6), codes="LPS", modality="CT")]
    return [preprocess(d, base / f"cache_{d.name}", progress=False, workers=0) for d in dss]


@pytest.mark.parametrize("channel", [None, 0])  # all channels in one crop, or one channel's view
def test_patch_content_and_padding(three, channel):
    ds = three[1]  # volumes (about 10x9x8 after cropping) smaller than the patch
    s = PatchSampler(ds, (12, 16, 9), channel=channel)
    r = rng()
    for _ in range(6):
        # every other draw writes into a given (dirty) buffer, as the batch does
        buf = np.full((1, 12, 16, 9), np.nan, np.float32) if r.integers(2) else None
        x, y, case, start = s.sample(r, foreground=bool(r.integers(2)), out=buf)
        assert buf is None or (np.shares_memory(x, buf) and np.array_equal(x, buf))
        i = ds.names.index(case)
        full, lab, _ = ds.load_case(i)
        assert x.shape == (1, 12, 16, 9) and x.dtype == np.float32 and y.shape == (12, 16, 9)
        bg = ds.background_value(i, 0)
        np.testing.assert_allclose(x, _crop_ref(full, start, (12, 16, 9), fill=bg), rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_array_equal(y, _crop_ref(lab, start, (12, 16, 9)))


def test_foreground_ratio(three):
    ds = three[0]
    p = 8

    def frac_hit(fg_fraction, n=60):
        s = MultiDomainSampler([ds], p, 3, fg_fraction=fg_fraction, seed=int(rng().integers(1e6)))
        hits = [bool((lab > 0).any()) for b in range(n // 3) for lab in s.batch(b)["label"]]
        return np.mean(hits), s

    hit, s = frac_hit(1 / 3)
    # exactly one third of the samples are foreground-centred (running count, not coin flips)
    assert sum(s._is_fg(g) for g in range(300)) == 100
    assert sum(s._is_fg(g) for g in range(7)) == 2
    # every foreground-centred patch contains foreground
    assert hit >= 1 / 3
    hit0, _ = frac_hit(0.0)
    hit1, _ = frac_hit(1.0)
    assert hit1 == 1.0
    assert hit0 < hit  # a tiny cube: random patches mostly miss it


def test_domain_mixing_and_batch_format(three):
    s = MultiDomainSampler(three, (8, 8, 4), 6, seed=int(rng().integers(1e6)))
    ids, n = [], 0
    for b in range(100):
        batch = s.batch(b)
        assert batch["image"].shape == (6, 1, 8, 8, 4) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (6, 8, 8, 4) and batch["label"].dtype == torch.uint8
        assert batch["dataset_id"].dtype == torch.int64 and len(batch["case"]) == 6
        for d, case in zip(batch["dataset_id"].tolist(), batch["case"]):
            assert case in three[d].names  # the id names the dataset the patch came from
        ids += batch["dataset_id"].tolist()
        n += 6
    counts = np.bincount(ids, minlength=3) / n
    # 600 i.i.d. draws: sd 0.019, so 0.1 is a 5.2 sigma margin (240 draws gave 3.3 sigma, and
    # one CI-like run in a few hundred failed: 0.36/0.41/0.23)
    assert np.all(np.abs(counts - 1 / 3) < 0.1), counts
    s2 = MultiDomainSampler(three, 8, 4, weights=[1, 0, 3], seed=1,
                            label_dtype=torch.int64)
    ids = torch.cat([s2.batch(b)["dataset_id"] for b in range(50)]).numpy()
    assert (ids != 1).all()
    assert 0.6 < (ids == 2).mean() < 0.9
    assert s2.batch(0)["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="weights"):
        MultiDomainSampler(three, 8, 4, weights=[1, 1])
    with pytest.raises(ValueError, match="channels"):
        MultiDomainSampler(three, 8, 4, channels=["a"])
    with pytest.raises(ValueError, match="patch"):
        MultiDomainSampler(three, (8, 8), 4)


def test_bad_sampler_arguments_fail_at_construction(three):
    # NaN/inf weights failed only at the first batch inside numpy's choice(); a patch of 8.5
    # was truncated to 8; a float/None batch size, a negative steps or a non-dataset gave raw
    # errors or an empty loader
    nan, inf = float("nan"), float("inf")
    for w in ([nan, 1, 1], [inf, 1, 1], "abc"):
        with pytest.raises(ValueError, match=r"weights must be 3 finite non-negative numbers"):
            MultiDomainSampler(three, 8, 4, weights=w)
    for patch in ([8.5, 8, 8], 8.0, None):
        with pytest.raises(ValueError, match=r"patch must be an int or 3 positive ints"):
            MultiDomainSampler(three, patch, 4)
    for bs in (2.5, None, True):
        with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
            MultiDomainSampler(three, 8, bs)
    with pytest.raises(ValueError, match=r"steps must be None \(endless\) or an int >= 0"):
        MultiDomainSampler(three, 8, 4, steps=-1)
    with pytest.raises(TypeError, match=r"datasets\[1\] must be a PreprocessedDataset.*str"):
        MultiDomainSampler([three[0], "ds"], 8, 4)
    s = MultiDomainSampler(three, np.array([8, 6, 4]), np.int64(2), steps=np.int64(1))
    assert s.batch(0)["image"].shape == (2, 1, 8, 6, 4)


def test_determinism_and_resume(three):
    seed = int(rng().integers(1e6))
    a = MultiDomainSampler(three, 8, 2, seed=seed, steps=7)
    ref = list(a)
    assert a.state_dict() == {"seed": seed, "position": 7}
    again = list(MultiDomainSampler(three, 8, 2, seed=seed, steps=7))
    other = list(MultiDomainSampler(three, 8, 2, seed=seed + 1, steps=7))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(ref, again))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(ref, other))
    # in-process: stop after 3 batches, save, restore into a fresh sampler
    b = MultiDomainSampler(three, 8, 2, seed=seed, steps=7)
    it = iter(b)
    first = [next(it) for _ in range(3)]
    state = b.state_dict()
    assert state["position"] == 3
    c = MultiDomainSampler(three, 8, 2, seed=0, steps=7)
    c.load_state_dict(state)
    got = first + list(c)
    assert len(got) == 7
    for x, y in zip(got, ref):
        assert torch.equal(x["image"], y["image"]) and x["case"] == y["case"]
        assert torch.equal(x["label"], y["label"])


def test_dataloader_workers_resume(three):
    seed = int(rng().integers(1e6))
    ref = list(MultiDomainSampler(three, 8, 2, seed=seed, steps=9))
    loader = make_loader(three, 8, 2, seed=seed, steps=9, num_workers=2, pin_memory=False)
    it = iter(loader)
    first = [next(it) for _ in range(4)]
    state = loader.state_dict()
    del it
    assert state["position"] == 4
    resumed = BatchLoader(MultiDomainSampler(three, 8, 2, seed=0, steps=9), num_workers=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = first + rest
    assert len(got) == 9 and len(resumed) == 0
    for x, y in zip(got, ref):
        assert torch.equal(x["image"], y["image"]) and x["case"] == y["case"]


@pytest.mark.parametrize("device,workers", [("cpu", 0), pytest.param("cuda", 0, marks=pytest.mark.cuda),
                                            pytest.param("cuda", 2, marks=pytest.mark.cuda)])
def test_device_loader_prefetch_and_resume(three, device, workers):
    # device=cuda: image and label arrive on the GPU (copied one batch ahead on a side stream),
    # the other keys stay on the host, the batches equal the host sampler's, and the position
    # counts only the batches handed out although the next one is already being copied;
    # device=cpu is ignored (plain host batches)
    seed = int(rng().integers(1e6))
    ref = list(MultiDomainSampler(three, 8, 2, seed=seed, steps=7))
    loader = make_loader(three, 8, 2, seed=seed, steps=7, num_workers=workers,
                         pin_memory=device == "cuda", device=device)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    assert state["position"] == 3
    resumed = make_loader(three, 8, 2, seed=0, steps=7, num_workers=workers, device=device)
    resumed.load_state_dict(state)
    got = first + list(resumed)
    assert len(got) == 7
    for x, y in zip(got, ref):
        assert x["image"].device.type == device and x["label"].device.type == device
        assert x["dataset_id"].device.type == "cpu"
        assert torch.equal(x["image"].cpu(), y["image"]) and torch.equal(x["label"].cpu(), y["label"])
        assert x["case"] == y["case"]


def test_named_channel(tmp_path):
    r = rng()
    shape = (10, 9, 8)
    aff = affine((1, 1, 1), "RAS", shape)
    img = r.normal(100, 10, shape).astype(np.float32)
    lab = (img > 100).astype(np.uint8)
    root = tmp_path / "ms"
    save(root / "imagesTr" / "m.nii.gz", np.stack([img, -img + 500], -1), aff)
    save(root / "labelsTr" / "m.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T2w"}, "labels": {"0": "bg", "1": "x"},
        "training": [{"image": "./imagesTr/m.nii.gz", "label": "./labelsTr/m.nii.gz"}]}))
    pre = preprocess(root, tmp_path / "c", progress=False, workers=0)
    s = MultiDomainSampler([pre], shape, 1, channels=["T2w"], fg_fraction=0.0)
    x = s.batch(0)["image"][0].numpy()
    full, _, _ = pre.load_case(0, channel="T2w")
    np.testing.assert_allclose(x, full, rtol=1e-6)
    flair, _, _ = pre.load_case(0, channel="FLAIR")
    assert np.corrcoef(x.ravel(), flair.ravel())[0, 1] < -0.99  # really the other sequence


def _wide_label_dataset(root, top):
    """One case whose labels include ``top`` (>= 256): stored wider than uint8."""
    shape = (10, 9, 8)
    aff = affine((1, 1, 1), "RAS", shape)
    r = rng()
    img = r.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.int32)
    lab[2:5, 2:5, 2:5] = 1
    lab[6:9, 5:8, 4:7] = top
    save(root / "imagesTr" / "w.nii.gz", img, aff)
    save(root / "labelsTr" / "w.nii.gz", lab, aff, dtype=np.int32)
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "a", str(top): "b"},
        "training": [{"image": "./imagesTr/w.nii.gz", "label": "./labelsTr/w.nii.gz"}]}))
    return root


@pytest.mark.parametrize("top", [300, 40000])
def test_labels_of_256_and_more_are_not_wrapped(tmp_path, top):
    """Labels >= 256 were stored as int16 and then cast to the uint8 batch, silently wrapping
    (300 -> 44); >= 32768 wrapped in the int16 store itself. They are stored wide enough, the
    batches are int64 by default for such a dataset, and an explicit uint8 is refused."""
    pre = preprocess(_wide_label_dataset(tmp_path / "w", top), tmp_path / "c", progress=False,
                     workers=0)
    stored = pre.label(0)
    assert stored.dtype == (np.int16 if top < 32768 else np.int32) and stored.max() == top
    s = MultiDomainSampler([pre], (10, 9, 8), 2, fg_fraction=0.0)
    lab = s.batch(0)["label"]
    assert lab.dtype == torch.int64
    assert set(torch.unique(lab).tolist()) <= {0, 1, top} and int(lab.max()) == top
    np.testing.assert_array_equal(lab[0].numpy(), np.asarray(stored))  # the whole case, unpadded
    with pytest.raises(ValueError, match=r"label_dtype=torch.uint8 cannot hold the labels of w"):
        MultiDomainSampler([pre], (10, 9, 8), 2, label_dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"label_dtype must be None"):
        MultiDomainSampler([pre], (10, 9, 8), 2, label_dtype=torch.int32)


def test_label_batches_stay_uint8_without_conversion(three):
    """The usual dataset: uint8 patches, uint8 batches (no int64 round trip of the batch), equal
    to the int64 batches of the same draw; a value that uint8 cannot hold is an error."""
    from med3d_ext.data.sampling import _labels_as

    a = MultiDomainSampler(three, (8, 8, 6), 3, seed=5).batch(7)
    b = MultiDomainSampler(three, (8, 8, 6), 3, seed=5, label_dtype=torch.int64).batch(7)
    assert a["label"].dtype == torch.uint8 and b["label"].dtype == torch.int64
    assert torch.equal(a["label"].long(), b["label"])
    assert torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError, match=r"\[0, 256\].*cases \['x'\].*torch.int64"):
        _labels_as(np.array([[0, 256]], np.int16), torch.uint8, ["x"])
    with pytest.raises(ValueError, match=r"\[-1, 0\]"):
        _labels_as(np.array([-1, 0], np.int16), torch.uint8, ["x"])
    assert _labels_as(np.array([3, 255], np.int16), torch.uint8, ["x"]).tolist() == [3, 255]


def test_sampler_seed_and_argument_types(tmp_path):
    """A negative seed failed only at the first batch (inside numpy), 1.7 ran as 1, steps=True
    as 1 and fg_fraction="x" as a raw TypeError."""
    from med3d_ext.data import MultiDomainSampler, preprocess
    from python_tests._datahelp import make_msd

    pre = preprocess(make_msd(tmp_path / "ds", n=2), tmp_path / "c", progress=False, workers=0)
    for kw, what in ((dict(seed=-1), "seed"), (dict(seed=1.7), "seed"), (dict(seed="7"), "seed"),
                     (dict(steps=True), "steps"), (dict(fg_fraction="x"), "fg_fraction")):
        with pytest.raises(ValueError, match=f"{what} must be"):
            MultiDomainSampler([pre], [8, 8, 8], 2, **kw)
    s = MultiDomainSampler([pre], [8, 8, 8], 2, seed=3, steps=4)
    with pytest.raises(ValueError, match="expected the dict state_dict"):
        s.load_state_dict({"position": 1})


def test_wrong_types_are_type_errors_and_positions_are_checked(three):
    """The README's rule (a TypeError for a wrong type) with the ValueError older callers
    catch; channels=[0.0] crashed with an AttributeError, patch=True ran as 1, a negative or
    fractional loader position was taken (the loader grew, or 2.9 became 2), num_workers="2"
    failed at the first batch (data API audit)."""
    from med3d_ext._args import ArgumentTypeError
    from med3d_ext.data.sampling import BatchLoader

    for kw in (dict(batch_size=2.0), dict(fg_fraction=None), dict(seed=1.5), dict(patch=8.5),
               dict(patch=True), dict(channels=[0.0, None, None]), dict(steps=1.0)):
        args = {"patch": 8, "batch_size": 2, **kw}
        with pytest.raises(ArgumentTypeError) as e:
            MultiDomainSampler(three, args.pop("patch"), args.pop("batch_size"), **args)
        assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
        assert next(iter(kw)) in str(e.value)
    with pytest.raises(ValueError, match="fg_fraction"):
        MultiDomainSampler(three, 8, 2, fg_fraction=1.5)
    # integer tensors and arrays as sizes worked before and still do (the review of these checks)
    s0 = MultiDomainSampler(three, torch.tensor([8, 6, 4]), torch.tensor(2), seed=np.array(3))
    assert s0.patch == (8, 6, 4) and s0.batch_size == 2 and s0.seed == 3
    assert MultiDomainSampler(three, np.array(8), 2).patch == (8, 8, 8)
    with pytest.raises(TypeError, match="patch"):
        MultiDomainSampler(three, torch.tensor(True), 2)
    s = MultiDomainSampler(three, 8, 2, steps=3)
    for pos, err in ((-2, ValueError), (4, ValueError), (2.9, TypeError), ("1", TypeError)):
        with pytest.raises(err, match=r"'position' must be an int in \[0, 3\]"):
            s.load_state_dict({"seed": 0, "position": pos})
    assert s.position == 0 and len(s) == 3  # unchanged by the refused states
    s.load_state_dict({"seed": 0, "position": np.int64(3)})
    assert s.position == 3
    for nw in ("2", -1, 1.5):
        with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
            BatchLoader(s, num_workers=nw)
    with pytest.raises(ValueError, match="prefetch_factor"):
        BatchLoader(s, num_workers=1, prefetch_factor=0)
