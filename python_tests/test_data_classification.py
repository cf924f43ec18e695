"""Classification folders (labels.csv) in the data layer: ClassificationSet gives what the
CLI's classification runs train and predict on, and `data preprocess` does not pretend to fill
a cache for them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from python_tests._datahelp import affine, blob_case, make_msd, rng, save  # noqa: E402


def make_cls(root, n=4, shape=(14, 12, 9), channels=1):
    """A classification folder of ``n`` CT images stored LPS/PIR (not RAS), anisotropic, with
    a zero border (which the segmentation recipe crops) and per-class sub-folders."""
    r = rng()
    rows = []
    for i in range(n):
        codes = ("LPS", "PIR")[i % 2]
        aff = affine(r.uniform(0.7, 2.5, 3), codes, shape)
        imgs = []
        for _ in range(channels):
            img, _ = blob_case(shape, r, 2, zero_border=2)
            imgs.append(np.where(img == 0, -1000, img) + r.normal(0, 30, shape))
        arr = imgs[0] if channels == 1 else np.stack(imgs, -1)
        sub = ("neg", "pos")[i % 2]
        save(root / sub / f"{i:03d}.nii.gz", arr.astype(np.float32), aff)
        rows.append(f"{sub}/{i:03d}.nii.gz,{i % 2}")
    (root / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    (root / "classes.json").write_text(json.dumps({"modality": "CT",
                                                   "classes": {"0": "no", "1": "yes"}}))
    return root


def test_classification_set_gives_the_cli_inputs(tmp_path):
    """ClassificationSet used the segmentation recipe (crop to the non-zero box, resample to
    the median spacing, CT window from the dataset's foreground) plus a resize: a loop built
    on it trained on other inputs than `transfer --task cls` and evaluate/predict read. Each
    item is now exactly load_cls_volume's tensor for its file, whatever the dataset is given
    as (the folder, its labels.csv, load_dataset's Dataset, or a preprocessed cache of it)."""
    from med3d_ext.data import ClassificationSet, load_dataset, preprocess
    from med3d_ext.train.classification import load_cls_volume, read_cls_csv

    root = make_cls(tmp_path / "cls")
    size = (10, 9, 7)
    paths, labels = read_cls_csv(root)
    want = {p.name: load_cls_volume(p, size) for p in paths}  # what the CLI trains on
    label = {p.name: int(y) for p, y in zip(paths, labels)}
    ds = load_dataset(root)
    file_of = {c.name: c.images[0].name for c in ds.cases}
    pre = preprocess(root, tmp_path / "cache", progress=False, workers=0)
    for given in (pre, root, str(root / "labels.csv"), ds):  # the cache: as documented before
        cs = ClassificationSet(given, size)
        assert len(cs) == len(paths)
        for k in range(len(cs)):
            item = cs[k]
            name = file_of[item["case"]]
            assert item["image"].shape == (1, *size) and item["image"].dtype == torch.float32
            assert torch.equal(item["image"], want[name]), (type(given).__name__, name)
            assert int(item["label"]) == label[name]
    # the channel: default 0, the dataset's channel name (its modality) is channel 0 too
    cs = ClassificationSet(root, 8, channel="CT", indices=[1])
    assert len(cs) == 1 and torch.equal(cs[0]["image"], load_cls_volume(paths[1], (8, 8, 8)))
    with pytest.raises(ValueError, match="no channel 'T2'"):
        ClassificationSet(root, 8, channel="T2")


def test_classification_set_channel_is_the_cli_channel(tmp_path):
    from med3d_ext.data import ClassificationSet
    from med3d_ext.data.preprocess import ChannelError
    from med3d_ext.train.classification import load_cls_volume, read_cls_csv
    from med3d_ext.train.config import ConfigError

    root = make_cls(tmp_path / "cls", n=2, channels=2)
    paths, _ = read_cls_csv(root)
    cs = ClassificationSet(root, 6, channel=1)
    for k, p in enumerate(paths):
        got = cs[k]["image"]
        assert torch.equal(got, load_cls_volume(p, (6, 6, 6), 1))
        assert not torch.equal(got, load_cls_volume(p, (6, 6, 6), 0))
    with pytest.raises(ChannelError, match=r"channel 2: .* has 2 channel\(s\)"):
        ClassificationSet(root, 6, channel=2)[0]
    # the CLI keeps its own wording and exit status for --channel (ConfigError, exit 2)
    with pytest.raises(ConfigError, match=r"^--channel 2: .* has 2 channel\(s\)$"):
        load_cls_volume(paths[0], (6, 6, 6), 2)


def test_preprocess_cli_refuses_a_classification_folder(tmp_path, capsys):
    """`data preprocess CLS_FOLDER` ran the segmentation recipe and printed "N cases cached",
    but classification runs never read that cache: it is now a usage error (exit 2) that
    names the folder and says why, before anything is written."""
    from med3d_ext.data.__main__ import main

    root = make_cls(tmp_path / "cls", n=2)
    cache = tmp_path / "cache"
    rc = main(["preprocess", str(root), "--out", str(cache), "--workers", "0", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "cached" not in out
    assert err.startswith(f"error: {root}: a classification folder (labels.csv)")
    assert "prepare each image on the fly" in err and "never read a preprocessing cache" in err
    assert f"transfer --task cls --data {root}" in err
    assert not cache.exists()
    # a folder of datasets that holds one: refused as a whole, the folder named
    both = tmp_path / "both"
    make_msd(both / "Seg", n=1)
    make_cls(both / "Cls", n=2)
    rc = main(["preprocess", str(both), "--out", str(cache), "--workers", "0", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith(f"error: {both}: holds 1 classification folder(s) "
                                      "(labels.csv): Cls;")
    assert not cache.exists()
    # segmentation datasets are preprocessed as before
    assert main(["preprocess", str(both / "Seg"), "--out", str(cache), "--workers", "0",
                 "--no-progress"]) == 0
    assert "1 cases cached" in capsys.readouterr().out
