"""Mirroring test-time augmentation: sliding_window_probs(mirror_axes=...) against references
built independently here, its argument checks, and ``evaluate --tta`` end to end."""

from __future__ import annotations

import itertools
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from med3d_ext.train.inference import sliding_window_probs, window_starts


def _net(seed=0, k=3):
    """A small random conv network, logits at 1/4 of the input (as MedicalNet's): not
    symmetric under any flip, so a missing or wrong flip-back shows."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, k, 4, stride=4)).eval()


def _combos(axes):
    """Every subset of ``axes`` as tensor dims, by itertools (not the code under test's
    bit masks)."""
    return [tuple(a + 2 for a in c) for r in range(len(axes) + 1)
            for c in itertools.combinations(axes, r)]


def _flip(t, dims):
    return torch.flip(t, dims) if dims else t


def _mirror_averaged(net, window, axes, softmax, flip_back=True):
    """A predictor doing the flip-average itself, one forward per flip, for the non-TTA
    sliding window to stitch. With softmax it returns log(mean probability), which that
    softmax turns back into the mean (the probabilities sum to 1)."""
    def predict(x):
        acc = 0
        for d in _combos(axes):
            lg = F.interpolate(net(_flip(x, d)).float(), size=window, mode="trilinear",
                               align_corners=False)
            p = torch.softmax(lg, 1) if softmax else lg
            acc = acc + (_flip(p, d) if flip_back else p)
        m = acc / len(_combos(axes))
        return m.log() if softmax else m
    return predict


@pytest.mark.parametrize("shape,window,overlap", [
    ((1, 1, 19, 23, 13), (8, 12, 8), 0.5),
    ((2, 1, 7, 21, 17), (8, 8, 12), 0.3),   # N = 2, D smaller than the window (padded)
])
def test_default_is_bitwise_unchanged(shape, window, overlap):
    net = _net()
    vol = torch.randn(shape)
    for sm in (True, False):
        seen = []
        ref = sliding_window_probs(vol, net, window, overlap=overlap, sw_batch_size=3,
                                   softmax=sm, progress=lambda d, t: seen.append((d, t)))
        for off in (None, (), []):
            ticks = []
            out = sliding_window_probs(vol, net, window, overlap=overlap, sw_batch_size=3,
                                       softmax=sm, mirror_axes=off,
                                       progress=lambda d, t: ticks.append((d, t)))
            assert torch.equal(out, ref), off
            assert ticks == seen  # windows, one tick per forward, as before


@pytest.mark.parametrize("axes", [(0, 1, 2), (1,), (2, 0)])
@pytest.mark.parametrize("sw", [1, 3, 16])
@pytest.mark.parametrize("softmax", [True, False])
def test_mirror_matches_a_window_level_reference(axes, sw, softmax):
    # odd sizes: the last window is flush with the end, so the grid is not symmetric under a
    # flip of the volume; the reference averages the flips window by window instead
    net = _net(1)
    g = torch.Generator().manual_seed(2)
    vol = torch.randn(2, 1, 19, 23, 13, generator=g)
    window, kw = (8, 12, 8), dict(overlap=0.5, softmax=softmax)
    out = sliding_window_probs(vol, net, window, sw_batch_size=sw, mirror_axes=axes, **kw)
    ref = sliding_window_probs(vol, _mirror_averaged(net, window, axes, softmax), window,
                               sw_batch_size=2, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the check can fail: without the flip back, or without mirroring, it is far off
    wrong = sliding_window_probs(vol, _mirror_averaged(net, window, axes, softmax, False),
                                 window, **kw)
    plain = sliding_window_probs(vol, net, window, **kw)
    assert (out - wrong).abs().max() > 1e-3 and (out - plain).abs().max() > 1e-3
    if softmax:
        torch.testing.assert_close(out.sum(1), torch.ones(2, 19, 23, 13))


def test_mirror_matches_flipping_the_whole_volume_where_the_grid_is_symmetric():
    # sizes n = w + k * stride (stride int(w / 2)): the window grid maps onto itself under a
    # flip, so TTA equals the mean of plain predictions of the flipped volumes, flipped back
    shape, window = (21, 17, 13), (9, 9, 7)
    for n, w in zip(shape, window):
        st = window_starts(n, w, 0.5)
        assert sorted(n - w - s for s in st) == st  # the premise of this reference
    net = _net(3)
    vol = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(4))
    out = sliding_window_probs(vol, net, window, overlap=0.5, mirror_axes=(0, 1, 2))
    ref = torch.stack([_flip(sliding_window_probs(_flip(vol, d), net, window, overlap=0.5), d)
                       for d in _combos((0, 1, 2))]).mean(0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("predictor", [
    lambda p: torch.cat([p, p.square() - 1, -2 * p], 1),       # per voxel
    lambda p: torch.cat([F.avg_pool3d(p, 4), -F.avg_pool3d(p, 4)], 1),  # 1/4 grid, upsampled
])
def test_a_flip_equivariant_predictor_is_unchanged_by_mirroring(predictor):
    vol = torch.randn(1, 1, 17, 22, 13, generator=torch.Generator().manual_seed(5))
    window = (8, 12, 8)
    plain = sliding_window_probs(vol, predictor, window, overlap=0.4)
    for axes in ((0, 1, 2), (1,), (0, 2)):
        out = sliding_window_probs(vol, predictor, window, overlap=0.4, mirror_axes=axes)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sw,axes", [(1, (0, 1, 2)), (3, (0, 1, 2)), (16, (0, 1, 2)),
                                     (5, (1,)), (2, (0, 2))])
def test_flips_are_batched_within_sw_batch_size(sw, axes):
    """Each forward holds at most sw_batch_size window copies (flips stacked along the
    batch); progress counts window predictions (windows x flips), rising to the total."""
    vol, window = torch.randn(2, 1, 13, 11, 9), (8, 6, 6)
    calls, ticks = [], []

    def pred(x):
        calls.append(x.shape[0])
        return x.repeat(1, 2, 1, 1, 1)

    sliding_window_probs(vol, pred, window, sw_batch_size=sw, mirror_axes=axes,
                         progress=lambda d, t: ticks.append((d, t)))
    nw = math.prod(len(window_starts(s, w, 0.5)) for s, w in zip(vol.shape[2:], window))
    nf = 2 ** len(axes)
    assert max(calls) <= sw * 2  # N = 2 volumes: each window copy is 2 patches
    assert sum(calls) == nw * nf * 2
    if sw >= nf:  # whole windows' flips per forward: fewer calls than one per flip
        assert len(calls) == math.ceil(nw / (sw // nf))
    else:
        assert len(calls) == nw * math.ceil(nf / sw)
    assert len(ticks) == len(calls) and ticks[-1] == (nw * nf, nw * nf)
    assert [d for d, _ in ticks] == sorted({d for d, _ in ticks})


@pytest.mark.parametrize("axes,err,match", [
    ((3,), ValueError, r"mirror_axes must be spatial axes among 0, 1, 2 .* got \[3\]"),
    ((2, 3, 4), ValueError, r"not its tensor dims 2\.\.4\), got \[2, 3, 4\]"),
    ((-1,), ValueError, r"got \[-1\]"),
    ((0, 0), ValueError, r"mirror_axes has a duplicate axis: \[0, 0\]"),
    ((1, 2, 1), ValueError, "duplicate"),
    (True, TypeError, "mirror_axes must be .* got True"),
    ((0, True), TypeError, r"mirror_axes .* got \(0, True\)"),
    ("012", TypeError, "mirror_axes .* got '012'"),
    ((0.5,), TypeError, r"mirror_axes .* got \(0\.5,\)"),
    ({0, 1}, TypeError, "mirror_axes"),
])
def test_bad_mirror_axes_are_named(axes, err, match):
    vol = torch.randn(1, 1, 6, 7, 8)
    with pytest.raises(err, match=match):
        sliding_window_probs(vol, lambda x: torch.cat([x, -x], 1), 4, mirror_axes=axes)


def test_mirror_axes_accepts_an_int_arrays_and_any_order():
    net = _net(6)
    vol = torch.randn(1, 1, 11, 9, 10)
    ref = sliding_window_probs(vol, net, 8, mirror_axes=(0, 2))
    for same in ((2, 0), [0, 2], np.array([2, 0]), torch.tensor([0, 2])):
        assert torch.equal(sliding_window_probs(vol, net, 8, mirror_axes=same), ref)
    assert torch.equal(sliding_window_probs(vol, net, 8, mirror_axes=np.int64(1)),
                       sliding_window_probs(vol, net, 8, mirror_axes=(1,)))


def test_training_validation_does_not_mirror(monkeypatch):
    """Validation during training stays one forward per window (speed), whatever the
    configuration holds."""
    from med3d_ext.train import tasks

    seen = []
    real = tasks.sliding_window_probs

    def spy(*a, **kw):
        seen.append(kw.get("mirror_axes"))
        return real(*a, **kw)

    class Pre:  # one 12^3 case, what _validate_seg reads of a PreprocessedDataset
        name, channels = "toy", ["CT"]

        def __len__(self):
            return 1

        def channel_index(self, ch):
            return 0

        def background_value(self, i, ch):
            return 0.0

        def load_case(self, i, ch):
            x = np.random.default_rng(0).normal(size=(1, 12, 12, 12)).astype(np.float32)
            return x, (x[0] > 0).astype(np.uint8), {}

    monkeypatch.setattr(tasks, "sliding_window_probs", spy)
    net = _net(7, k=2)
    cfg = {"channel": None, "patch": [8, 8, 8], "overlap": 0.5, "sw_batch_size": 2,
           "tta": True, "tta_axes": [0, 1, 2]}
    out = tasks._validate_seg(net, [("toy", Pre())], cfg, lambda k: net)
    assert seen == [None] and 0.0 <= out["dice"] <= 1.0


# -- evaluate --tta, end to end on the tiny kidney run


def _spy_evaluate(monkeypatch):
    from med3d_ext.train import evaluate as ev

    calls = []
    real = ev.sliding_window_probs

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append((kw.get("mirror_axes"), out))
        return out

    monkeypatch.setattr(ev, "sliding_window_probs", spy)
    return calls


def _eval(tiny_data, run, out, *extra):
    from med3d_ext.train.cli import main

    return main(["evaluate", "--run", run, "--data", tiny_data["transfer"], "--device", "cpu",
                 "--cache", tiny_data["cache"], "--out", out, *extra])


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_tta_end_to_end(kidney_run, tiny_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("med3d_ext.data")
    calls = _spy_evaluate(monkeypatch)
    assert _eval(tiny_data, kidney_run, tmp_path / "plain", "--no-progress") == 0
    plain = [p for _, p in calls]
    assert {m for m, _ in calls} == {()}
    m = _metrics(tmp_path / "plain")
    assert m["tta"] is False and m["tta_axes"] == []
    calls.clear()
    capsys.readouterr()
    # a terminal: the bar is drawn (redirected output hides it, med3d_ext._args.bar_disable)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _eval(tiny_data, kidney_run, tmp_path / "tta", "--tta") == 0  # with the bar
    cap = capsys.readouterr()
    assert "TTA x8" in cap.err and "mirroring TTA: each window predicted 8 times" in cap.out
    assert {m for m, _ in calls} == {(0, 1, 2)} and len(calls) == len(plain)
    # the mirrored probabilities reached the predictions (a random-ish model is not symmetric)
    assert any(not torch.allclose(a, b) for (_, a), b in zip(calls, plain))
    m = _metrics(tmp_path / "tta")
    assert m["tta"] is True and m["tta_axes"] == [0, 1, 2]
    for row in m["cases"]:
        assert (tmp_path / "tta" / f"{row['case']}.nii.gz").is_file()
    assert len(m["cases"]) == len(_metrics(tmp_path / "plain")["cases"])


def test_evaluate_tta_from_set_and_yaml(kidney_run, tiny_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("med3d_ext.data")
    calls = _spy_evaluate(monkeypatch)
    assert _eval(tiny_data, kidney_run, tmp_path / "s", "--no-progress", "--set", "tta=true",
                 "--set", "tta_axes=2,0") == 0
    assert _metrics(tmp_path / "s")["tta_axes"] == [0, 2] and calls[-1][0] == (0, 2)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"tta": True, "tta_axes": [1]}))
    assert _eval(tiny_data, kidney_run, tmp_path / "y", "--no-progress", "--config", f) == 0
    m = _metrics(tmp_path / "y")
    assert m["tta"] is True and m["tta_axes"] == [1] and calls[-1][0] == (1,)
    # the command line over YAML: --no-tta switches it off
    assert _eval(tiny_data, kidney_run, tmp_path / "n", "--no-progress", "--config", f,
                 "--no-tta") == 0
    assert _metrics(tmp_path / "n")["tta"] is False and calls[-1][0] == ()
    capsys.readouterr()
    # axes without --tta do nothing: said
    assert _eval(tiny_data, kidney_run, tmp_path / "w", "--no-progress", "--tta-axes",
                 "0", "1") == 0
    assert "warning: --tta-axes 0 1 has no effect without --tta" in capsys.readouterr().err
    assert _metrics(tmp_path / "w")["tta"] is False


@pytest.mark.parametrize("extra,msg", [
    (["--set", "tta=mirror"], "tta: expected true/false, got 'mirror'"),
    (["--tta", "--tta-axes", "3"], "--tta-axes: expected 1 to 3 distinct axes among 0, 1, 2"),
    (["--tta", "--tta-axes", "0", "0"], "got [0, 0]"),
    (["--tta", "--tta-axes", "x"], "--tta-axes: expected axes among 0, 1, 2"),
    (["--tta", "--set", "tta_axes=[]"], "tta_axes: expected 1 to 3 distinct axes"),
    (["--tta", "--set", "tta_axes=true"], "tta_axes: expected axes among 0, 1, 2 (e.g. 0,1,2 "
                                          "or [0, 2]), got True"),
])
def test_evaluate_tta_bad_values(kidney_run, tiny_data, tmp_path, capsys, extra, msg):
    assert _eval(tiny_data, kidney_run, tmp_path / "p", "--no-progress", *extra) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
