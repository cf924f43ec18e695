"""Dice / HD95 against MONAI; sliding-window inference against MONAI and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from med3d_ext.train import metrics as M
from med3d_ext.train.inference import (gaussian_weight_map, sliding_window_predict,
                                       sliding_window_probs, window_starts)


def _blob(shape, g):
    """A random smooth blob (thresholded low-frequency noise)."""
    x = torch.randn((1, 1, *[max(s // 4, 2) for s in shape]), generator=g)
    x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0]
    return (x > 0.3).numpy()


def test_dice_against_monai():
    mm = pytest.importorskip("monai.metrics")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shape = (13, 17, 11)
    pred = torch.randint(0, 4, shape, generator=g)
    target = torch.randint(0, 4, shape, generator=g)
    target[target == 3] = 0  # class 3 absent from the target
    ours = M.dice_per_class(pred, target, 4)
    oh = lambda t: F.one_hot(t, 4).movedim(-1, 0)[None]  # noqa: E731
    ref = mm.compute_dice(oh(pred), oh(target), include_background=False,
                          ignore_empty=False)[0]
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert math.isnan(M.dice_per_class(torch.zeros(shape), torch.zeros(shape), 2)[0])
    with pytest.raises(ValueError, match="shape"):
        M.dice_per_class(pred, target[:-1], 4)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.9)])
def test_hd95_against_monai(spacing):
    mm = pytest.importorskip("monai.metrics")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shape = (21, 18, 15)
    a, b = _blob(shape, g), _blob(shape, g)
    if not a.any() or not b.any():
        a[5:9, 5:9, 5:9] = True
        b[7:12, 4:8, 6:10] = True
    ours = M.hd95(a, b, spacing)
    t = lambda x: torch.from_numpy(x)[None, None].float()  # noqa: E731
    ref = mm.compute_hausdorff_distance(t(a), t(b), include_background=True, percentile=95,
                                        spacing=list(spacing))
    assert ours == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


def test_hd95_fallback_without_scipy_matches(monkeypatch):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    a, b = _blob((16, 14, 12), g), _blob((16, 14, 12), g)
    a[2:6, 2:6, 2:6] = True
    b[8:12, 6:9, 5:9] = True
    sp = (0.7, 1.1, 2.5)
    with_scipy = M.hd95(a, b, sp)
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kw):
        if name.startswith("scipy"):
            raise ImportError("no scipy (simulated)")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert M.hd95(a, b, sp) == pytest.approx(with_scipy, rel=1e-9)


def test_hd95_edge_cases():
    z = np.zeros((6, 6, 6), bool)
    one = z.copy()
    one[2:4, 2:4, 2:4] = True
    assert math.isnan(M.hd95(z, one))
    assert math.isnan(M.hd95(z, z))
    assert M.hd95(one, one) == 0.0
    shifted = np.roll(one, 1, axis=2)
    assert M.hd95(one, shifted, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="3-D"):
        M.hd95(one[0], one[0])


def test_gaussian_map_and_starts():
    w = gaussian_weight_map((8, 12, 5))
    assert w.shape == (8, 12, 5) and float(w.max()) == pytest.approx(1.0) and float(w.min()) > 0
    torch.testing.assert_close(w, w.flip(0).flip(1).flip(2))  # symmetric about the centre
    for n, win, ov in [(37, 16, 0.5), (16, 16, 0.5), (17, 16, 0.25), (100, 24, 0.0)]:
        s = window_starts(n, win, ov)
        assert s[0] == 0 and s[-1] == n - win and s == sorted(set(s))
        covered = np.zeros(n, bool)
        for a in s:
            covered[a:a + win] = True
        assert covered.all()
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 1.0)


class _QuarterNet(torch.nn.Module):
    """Logits at 1/4 resolution, like MedicalNet's networks."""

    def __init__(self, k=3):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, k, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("shape", [(1, 1, 37, 29, 21), (2, 1, 9, 30, 16), (1, 1, 16, 16, 16)])
def test_sliding_window_against_monai(shape):
    inferers = pytest.importorskip("monai.inferers")
    net = _QuarterNet().eval()
    vol = torch.randn(shape)
    window = (16, 16, 8)
    wmap = gaussian_weight_map(window)

    def monai_predictor(x):  # what our window step does, for MONAI to stitch
        lg = F.interpolate(net(x), size=window, mode="trilinear", align_corners=False)
        return torch.softmax(lg, 1)

    with torch.no_grad():
        ours = sliding_window_probs(vol, net, window, overlap=0.5, sw_batch_size=3)
        ref = inferers.sliding_window_inference(vol, window, 3, monai_predictor, overlap=0.5,
                                                roi_weight_map=wmap, padding_mode="constant")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.shape == (shape[0], 3, *shape[2:])
    torch.testing.assert_close(ours.sum(1), torch.ones(shape[0], *shape[2:]))
    lab = sliding_window_predict(vol, net, window, overlap=0.5)
    assert lab.dtype == torch.int64 and torch.equal(lab, ref.argmax(1))


def test_sliding_window_constant_predictor_and_errors():
    k = 4
    logits = torch.randn(k)

    def const(x):
        return logits.view(1, k, 1, 1, 1).expand(x.shape[0], k, 2, 3, 2)

    out = sliding_window_probs(torch.randn(1, 1, 11, 7, 23), const, (8, 12, 8), overlap=0.3)
    expect = torch.softmax(logits, 0).view(1, k, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expect)
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        sliding_window_probs(torch.randn(1, 8, 8, 8), const, (8, 8, 8))


def test_sliding_window_reports_progress_per_forward():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shape = [int(v) for v in torch.randint(9, 20, (3,), generator=g)]
    vol = torch.randn(1, 1, *shape, generator=g)
    window, sw = (8, 6, 7), int(torch.randint(1, 5, (), generator=g))
    seen = []
    ref = sliding_window_probs(vol, lambda p: p.repeat(1, 2, 1, 1, 1), window, sw_batch_size=sw)
    out = sliding_window_probs(vol, lambda p: p.repeat(1, 2, 1, 1, 1), window, sw_batch_size=sw,
                               progress=lambda d, t: seen.append((d, t)))
    n = math.prod(len(window_starts(s, w, 0.5)) for s, w in zip(shape, window))
    assert seen[-1] == (n, n) and len(seen) == math.ceil(n / sw)
    assert [d for d, _ in seen] == sorted({d for d, _ in seen})  # one call per forward, rising
    assert torch.equal(out, ref)  # the callback changes nothing


def test_evaluate_shows_a_window_progress_bar(tiny_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("med3d_ext.data")
    import sys

    from med3d_ext.train.cli import main

    # a terminal: the bar is drawn (redirected output hides it, med3d_ext._args.bar_disable)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    from .conftest import tiny_args

    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(tiny_data["transfer"], run, "--from-scratch", "--epochs",
                                        1, "--steps", 1, "--cache", tiny_data["cache"])]) == 0
    capsys.readouterr()
    base = ["evaluate", "--run", run, "--data", tiny_data["transfer"], "--device", "cpu",
            "--cache", tiny_data["cache"], "--patch", 8]
    assert main(base + ["--out", tmp_path / "p1"]) == 0  # --progress is the default
    err = capsys.readouterr().err
    assert "window" in err and "evaluate " in err  # was: silent until each case finished
    assert main(base + ["--out", tmp_path / "p2", "--no-progress"]) == 0
    assert "window" not in capsys.readouterr().err


@pytest.mark.parametrize("spacing", [(-1.0, 2.0, 0.5), (0.0, 1.0, 1.0), (math.nan, 1.0, 1.0),
                                     (1.0, 2.0), "abc"])
def test_hd95_refuses_bad_spacing(spacing):
    a = np.zeros((6, 6, 6), bool)
    a[2:4, 2:4, 2:4] = True
    with pytest.raises(ValueError, match="hd95: spacing must be 3 positive voxel sizes"):
        M.hd95(a, a, spacing)
    assert M.hd95(a, np.roll(a, 1, 0), 2.0) == pytest.approx(M.hd95(a, np.roll(a, 1, 0),
                                                                     (2.0, 2.0, 2.0)))


@pytest.mark.parametrize("kw,err,match", [
    (dict(window=(4.7, 4, 4)), TypeError, "window must be an int or 3 ints"),
    (dict(window=(4, 4)), ValueError, r"window must be 3 positive ints .* got \[4, 4\]"),
    (dict(window=(0, 4, 4)), ValueError, "window must be 3 positive ints"),
    (dict(window=(4, 4, 4), sw_batch_size=0), ValueError, "sw_batch_size must be a positive"),
    (dict(window=(4, 4, 4), sw_batch_size=-1), ValueError, "sw_batch_size must be a positive"),
    (dict(window=(4, 4, 4), weight_map=torch.zeros(4, 4, 4)), ValueError,
     "weight_map must be positive and finite"),
    (dict(window=(4, 4, 4), weight_map=torch.ones(4, 4, 3)), ValueError,
     r"of the window's shape \[4, 4, 4\]"),
])
def test_sliding_window_arguments_are_checked(kw, err, match):
    vol = torch.randn(1, 1, 6, 7, 8)
    pred = lambda x: torch.cat([x, -x], 1)  # noqa: E731
    window = kw.pop("window")
    with pytest.raises(err, match=match):
        sliding_window_predict(vol, pred, window, **kw)
    with pytest.raises((TypeError, ValueError), match="size must be"):
        gaussian_weight_map((0, 3, 3))
    # an int window is a cube
    assert sliding_window_predict(vol, pred, 4).shape == (1, 6, 7, 8)
