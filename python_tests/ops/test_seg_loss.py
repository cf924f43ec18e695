"""multihead_seg_loss against MONAI DiceCELoss and med3d_ext.reference, on both devices:
every dtype, odd shapes, ignore_index, class weights, gradients, gradcheck, determinism, bad
input, empty heads, non-contiguous logits, opcheck and torch.compile."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import med3d_ext as m3d
from med3d_ext import _extension, reference
from med3d_ext.ops import SegLabelError
from python_tests.conftest import DEVICES, TOL, assert_low_precision_close, tol

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")
LOW = [torch.bfloat16, torch.float16]


def _rand_heads(device, dtype=torch.float32, heads=None, max_c=14, target_dtype=None,
                spatial_dims=3, max_n=3, min_n=1, max_sp=11):
    """Random heads of 2..max_c classes, odd spatial sizes, uint8 or int64 targets."""
    heads = heads or int(torch.randint(1, 5, ()).item())
    logits, targets = [], []
    for _ in range(heads):
        n = int(torch.randint(min_n, max_n + 1, ()).item())
        c = int(torch.randint(2, max_c + 1, ()).item())
        sp = [int(v) for v in torch.randint(1, max_sp + 1, (spatial_dims,))]
        x = (torch.randn(n, c, *sp, device=device) * 3).to(dtype)
        td = target_dtype or (torch.uint8 if torch.rand(()) < 0.5 else torch.int64)
        logits.append(x)
        targets.append(torch.randint(0, c, (n, *sp), device=device).to(td))
    return logits, targets


def _plain_lowp(x, t, smooth):
    """DiceCELoss math in plain PyTorch in x's own low precision (the error yardstick)."""
    ce = F.cross_entropy(x, t.long())
    p = torch.softmax(x, 1)
    oh = F.one_hot(t.long(), x.shape[1]).movedim(-1, 1).to(x.dtype)
    dims = list(range(2, x.dim()))
    inter, ps, ts = (p * oh).sum(dims), p.sum(dims), oh.sum(dims)
    return ce + (1 - (2 * inter + smooth) / (ps + ts + smooth)).mean()


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_monai(device, dtype):
    monai_losses = pytest.importorskip("monai.losses")
    logits, targets = _rand_heads(device, dtype)
    ce_w, dice_w, smooth = float(torch.rand(()) * 2), float(torch.rand(()) * 2), 1e-5
    hw = torch.rand(len(logits)).tolist()
    total, per_head = m3d.ops.multihead_seg_loss(logits, targets, head_weights=hw,
                                                  ce_weight=ce_w, dice_weight=dice_w, smooth=smooth)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert total.dtype == acc and per_head.dtype == acc and per_head.shape == (len(logits),)
    loss_fn = monai_losses.DiceCELoss(softmax=True, to_onehot_y=True, smooth_nr=smooth,
                                      smooth_dr=smooth, lambda_ce=ce_w, lambda_dice=dice_w)
    expect = torch.stack([loss_fn(x.double(), t.long().unsqueeze(1))
                          for x, t in zip(logits, targets)])
    rtol, atol = TOL[acc]
    # the inputs are exactly the low-precision values, so only fp32 accumulation error remains
    torch.testing.assert_close(per_head.double(), expect, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(total.double(), (torch.tensor(hw, dtype=torch.float64,
                                                             device=device) * expect).sum(),
                               rtol=rtol, atol=atol * 10)
    if dtype in LOW:  # house policy: error <= 2x plain PyTorch's in the same precision
        _, unit = m3d.ops.multihead_seg_loss(logits, targets, smooth=smooth)
        lowp = torch.stack([_plain_lowp(x, t, smooth) for x, t in zip(logits, targets)])
        unit_loss = monai_losses.DiceCELoss(softmax=True, to_onehot_y=True, smooth_nr=smooth,
                                            smooth_dr=smooth)
        ref = torch.stack([unit_loss(x.float(), t.long().unsqueeze(1))
                           for x, t in zip(logits, targets)])
        assert_low_precision_close(unit, lowp, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ignore_index_and_class_weights(device, dtype):
    logits, targets = _rand_heads(device, dtype, target_dtype=torch.int64)
    ignore = 255 if torch.rand(()) < 0.5 else -100
    for t in targets:
        t[torch.rand(t.shape, device=device) < 0.3] = ignore
    if ignore == 255:  # uint8 targets carry 255 too
        targets[0] = targets[0].to(torch.uint8)
    cw = [torch.rand(x.shape[1], device=device) + 0.1 if h % 2 == 0 else None
          for h, x in enumerate(logits)]
    kw = dict(ce_weight=0.7, dice_weight=1.3, smooth=1e-3, ignore_index=ignore)
    total, per_head = m3d.ops.multihead_seg_loss(logits, targets, class_weights=cw, **kw)
    et, ep = reference.multihead_seg_loss(logits, targets, None, class_weights=cw, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol = TOL[acc]
    torch.testing.assert_close(per_head, ep, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(total, et, rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("device", DEVICES)
def test_class_weights_match_cross_entropy(device):
    # CE-only loss with class weights is exactly F.cross_entropy(weight=..., ignore_index=...)
    x = torch.randn(2, 4, 5, 3, 7, device=device)
    t = torch.randint(0, 4, (2, 5, 3, 7), device=device)
    t[0, 0] = -100
    w = torch.rand(4, device=device) + 0.2
    _, ph = m3d.ops.multihead_seg_loss([x], [t], class_weights=[w], dice_weight=0.0)
    torch.testing.assert_close(ph[0], F.cross_entropy(x, t, weight=w), **_tol32())


@pytest.mark.parametrize("device", DEVICES)
def test_spatial_ranks(device):
    # (n, C) with no spatial dim, 1-D and 2-D spatial: the op is rank-agnostic
    for dims in (0, 1, 2):
        logits, targets = _rand_heads(device, spatial_dims=dims, heads=2, max_c=5)
        got = m3d.ops.multihead_seg_loss(logits, targets)
        exp = reference.multihead_seg_loss(logits, targets)
        torch.testing.assert_close(got[1], exp[1], **_tol32())


def test_many_classes_and_large_tiles():
    # several tiles per sample (> 2048 voxels) and a wide head
    logits = [torch.randn(2, 20, 13, 17, 11), torch.randn(1, 3, 50, 40, 3)]
    targets = [torch.randint(0, 20, (2, 13, 17, 11)), torch.randint(0, 3, (1, 50, 40, 3))]
    got = m3d.ops.multihead_seg_loss(logits, targets)
    exp = reference.multihead_seg_loss(logits, targets)
    torch.testing.assert_close(got[1], exp[1], **_tol32())


@pytest.mark.cuda
def test_cuda_large_tiles():
    logits = [torch.randn(2, 31, 13, 17, 11, device="cuda"), torch.randn(1, 3, 50, 40, 3, device="cuda")]
    targets = [torch.randint(0, 31, (2, 13, 17, 11), device="cuda"),
               torch.randint(0, 3, (1, 50, 40, 3), device="cuda")]
    got = m3d.ops.multihead_seg_loss(logits, targets)
    exp = reference.multihead_seg_loss(logits, targets)
    torch.testing.assert_close(got[1], exp[1], **_tol32())
    # beyond the kernel's 32 classes: the op refuses, the wrapper takes the reference path
    wide = [torch.randn(2, 40, 3, 5, device="cuda", requires_grad=True)]
    wide_t = [torch.randint(0, 40, (2, 3, 5), device="cuda")]
    with pytest.raises(RuntimeError, match="at most 32 classes"):
        torch.ops.med3d_ext.multihead_seg_loss(wide, wide_t, None, None, 1.0, 1.0, 1e-5, -100)
    got = m3d.ops.multihead_seg_loss(wide, wide_t)
    torch.testing.assert_close(got[1], reference.multihead_seg_loss(wide, wide_t)[1], **_tol32())
    assert torch.autograd.grad(got[0], wide)[0].shape == wide[0].shape
    wide_t[0][0, 0, 0] = 40
    with pytest.raises(SegLabelError, match="head 0"):
        m3d.ops.multihead_seg_loss(wide, wide_t)


def _tol32():
    rtol, atol = TOL[torch.float32]
    return {"rtol": rtol, "atol": atol * 10}


@pytest.mark.cuda
@pytest.mark.parametrize("max_c", [3, 4, 7, 12, 20])  # every class bound K = 4, 8, 16, 32
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_full_tiles_match_the_cpu(max_c, dtype):
    """The CUDA kernels walk full tiles of 2048 voxels in stages of several voxels whose loads
    are issued together (partial_stage / backward_stage); small test shapes never fill a tile.
    Here every head has full tiles and a partial one, with ignored and bad labels inside the
    full tiles, uint8 and int64 targets and a head of 2 classes beside the widest: the loss,
    the per-head losses, the bad-label report and the gradients match the CPU kernels."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    cls = [max_c, 2, max(2, max_c - 1)]
    shapes = [(2, 17, 16, 9), (1, 40, 13, 9), (3, 9, 31, 8)]  # 2448, 4680, 2232 voxels
    logits = [torch.randn(n, c, *sp, generator=g).to(dtype) for c, (n, *sp) in zip(cls, shapes)]
    targets = [torch.randint(0, c, (n, *sp), generator=g) for c, (n, *sp) in zip(cls, shapes)]
    targets[1] = targets[1].to(torch.uint8)
    targets[0].view(-1)[100:140] = -100        # ignored, inside the first full tile
    targets[2].view(-1)[1000:1003] = max_c + 5  # bad, inside the first full tile
    hw = torch.rand(3, generator=g) + 0.5
    out = {}
    for dev in ("cpu", "cuda"):
        xs = [x.to(dev).requires_grad_() for x in logits]
        ts = [t.to(dev) for t in targets]
        total, ph = m3d.ops.multihead_seg_loss(xs, ts, head_weights=hw.to(dev), validate=False)
        grads = torch.autograd.grad(total + ph.sum(), xs)
        out[dev] = (total, ph, grads)
        with pytest.raises(SegLabelError, match="head 2: 3 voxel"):
            m3d.ops.multihead_seg_loss(xs, ts, validate=True)
    (ct, cp, cg), (gt, gp, gg) = out["cpu"], out["cuda"]
    torch.testing.assert_close(gt.cpu(), ct, **_tol32())
    torch.testing.assert_close(gp.cpu(), cp, **_tol32())
    for a, b in zip(gg, cg):
        if dtype == torch.float64:  # (its full tiles walk one voxel per stage)
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-14)
        elif dtype == torch.float32:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-7)
        else:  # both compute in fp32 and round once: at most one bf16 ulp apart
            torch.testing.assert_close(a.cpu().float(), b.float(), rtol=TOL[dtype][0], atol=1e-5)


@pytest.mark.cuda
def test_cuda_more_heads_than_finish_warps():
    """The finishing kernel's 32 warps take the heads as work items strided by the warp count:
    heads 32..47 (up to 48 per call on CUDA) go round a second time. Every other test has at
    most 8 heads; here 41 of 2-6 classes, with a bad label in head 37 and heads of no sample."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    H = 41
    cls = [int(c) for c in torch.randint(2, 7, (H,), generator=g)]
    ns = [int(n) for n in torch.randint(0, 3, (H,), generator=g)]
    ns[3] = ns[37] = 2  # heads 3 and 37 have samples
    logits = [torch.randn(n, c, 5, 7, 6, generator=g) for n, c in zip(ns, cls)]
    targets = [torch.randint(0, c, (n, 5, 7, 6), generator=g) for n, c in zip(ns, cls)]
    targets[37].view(-1)[11] = cls[37]
    hw = torch.rand(H, generator=g) + 0.5
    out = {}
    for dev in ("cpu", "cuda"):
        xs = [x.to(dev).requires_grad_() for x in logits]
        ts = [t.to(dev) for t in targets]
        total, ph = m3d.ops.multihead_seg_loss(xs, ts, head_weights=hw.to(dev), validate=False)
        grads = torch.autograd.grad(total + 0.5 * ph.sum(), xs)
        out[dev] = (total, ph, grads)
        with pytest.raises(SegLabelError, match=f"head 37: 1 voxel.*C_h = {cls[37]}"):
            m3d.ops.multihead_seg_loss(xs, ts, validate=True)
    (ct, cp, cg), (gt, gp, gg) = out["cpu"], out["cuda"]
    torch.testing.assert_close(gt.cpu(), ct, **_tol32())
    torch.testing.assert_close(gp.cpu(), cp, **_tol32())
    assert all(cp[h] == 0 for h in range(H) if ns[h] == 0)  # no sample: contributes 0
    for a, b in zip(gg, cg):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_vs_reference(device, dtype):
    logits, targets = _rand_heads(device, dtype, max_c=9)
    targets[0] = targets[0].long()
    targets[0][..., :1] = 7 if logits[0].shape[1] <= 7 else -100  # bad / ignored voxels
    logits = [x.requires_grad_() for x in logits]
    H = len(logits)
    hw = (torch.rand(H, device=device) + 0.5).requires_grad_()
    cw = [torch.rand(x.shape[1], device=device) + 0.1 for x in logits]
    g_tot, g_ph = torch.randn((), device=device), torch.randn(H, device=device)
    kw = dict(ce_weight=0.8, dice_weight=1.2, ignore_index=-100, class_weights=cw)
    total, ph = m3d.ops.multihead_seg_loss(logits, targets, head_weights=hw, validate=False, **kw)
    ours = torch.autograd.grad(total * g_tot + (ph * g_ph).sum(), logits + [hw])
    ref_logits = [x.detach().float().requires_grad_() for x in logits]
    et, ep = reference.multihead_seg_loss(ref_logits, targets, hw, **kw)
    refs = torch.autograd.grad(et * g_tot + (ep * g_ph).sum(), ref_logits + [hw])
    for h, (a, b) in enumerate(zip(ours, refs)):
        assert a.shape == b.shape and a.dtype == (dtype if h < H else torch.float32)
        if a.dtype in LOW:
            # the kernel computes in fp32 and rounds once: at most one low-precision ulp off
            torch.testing.assert_close(a.float(), b, rtol=TOL[dtype][0], atol=1e-4)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    logits, targets = _rand_heads(device, torch.float64, heads=3, max_c=4, max_n=2, max_sp=3)
    targets[1] = targets[1].long()
    targets[1].view(-1)[0] = -100
    cw = [None, torch.rand(logits[1].shape[1], device=device, dtype=torch.float64) + 0.1, None]
    hw = torch.rand(3, device=device, dtype=torch.float64, requires_grad=True)
    xs = [x.requires_grad_() for x in logits]

    def fn(a, b, c, w):
        total, ph = m3d.ops.multihead_seg_loss([a, b, c], targets, head_weights=w,
                                               class_weights=cw, smooth=1e-2)
        return total, ph

    assert torch.autograd.gradcheck(fn, (*xs, hw))


# ---------------------------------------------------------------------------- properties


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    logits, targets = _rand_heads(device, torch.bfloat16, heads=4, max_c=6)
    logits = [torch.randn(x.shape[0], x.shape[1], 20, 21, 22, device=device).to(torch.bfloat16)
              for x in logits]
    targets = [torch.randint(0, x.shape[1], (x.shape[0], 20, 21, 22), device=device) for x in logits]
    runs = []
    for _ in range(2):
        xs = [x.clone().requires_grad_() for x in logits]
        total, ph = m3d.ops.multihead_seg_loss(xs, targets)
        grads = torch.autograd.grad(total, xs)
        runs.append((total, ph, grads))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_logits(device):
    base = torch.randn(3, 10, 9, 8, 7, device=device)
    x0 = base[:, ::2, 1:, :, ::2]  # strided view
    x1 = torch.randn(2, 4, 5, 6, 7, device=device).to(memory_format=torch.channels_last_3d)
    t0 = torch.randint(0, 5, (3, 8, 8, 4), device=device)
    t1 = torch.randint(0, 4, (2, 5, 6, 7), device=device).to(torch.uint8)[..., :]
    assert not x0.is_contiguous() and not x1.is_contiguous()
    xs = [x0.detach().requires_grad_(), x1.detach().requires_grad_()]
    total, ph = m3d.ops.multihead_seg_loss(xs, [t0, t1])
    et, ep = reference.multihead_seg_loss([x0, x1], [t0, t1])
    torch.testing.assert_close(ph, ep, **_tol32())
    g = torch.autograd.grad(total, xs)
    rx = [x.detach().contiguous().requires_grad_() for x in xs]
    rg = torch.autograd.grad(reference.multihead_seg_loss(rx, [t0, t1])[0], rx)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_heads(device):
    # A head with no sample (n_h = 0) contributes 0 and gets an empty gradient; a head of
    # empty volumes (no voxel) also contributes 0: CE over no voxel is 0, every Dice term is 0.
    x_full = torch.randn(2, 3, 4, 5, 6, device=device, requires_grad=True)
    t_full = torch.randint(0, 3, (2, 4, 5, 6), device=device)
    x_none = torch.randn(0, 5, 4, 5, 6, device=device, requires_grad=True)
    t_none = torch.zeros(0, 4, 5, 6, dtype=torch.uint8, device=device)
    x_void = torch.randn(2, 3, 0, 5, 6, device=device, requires_grad=True)
    t_void = torch.zeros(2, 0, 5, 6, dtype=torch.int64, device=device)
    total, ph = m3d.ops.multihead_seg_loss([x_none, x_full, x_void], [t_none, t_full, t_void])
    assert ph[0].item() == 0.0 and ph[2].item() == 0.0
    _, ep = reference.multihead_seg_loss([x_full], [t_full])
    torch.testing.assert_close(ph[1], ep[0], **_tol32())
    torch.testing.assert_close(total, ep[0], **_tol32())
    g = torch.autograd.grad(total, [x_none, x_full, x_void])
    assert g[0].shape == x_none.shape and g[2].shape == x_void.shape
    # all heads empty: a zero loss, not an error
    total, ph = m3d.ops.multihead_seg_loss([x_none], [t_none])
    assert total.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_all_voxels_ignored(device):
    x = torch.randn(2, 3, 4, 4, 4, device=device, requires_grad=True)
    t = torch.full((2, 4, 4, 4), 255, dtype=torch.uint8, device=device)
    total, ph = m3d.ops.multihead_seg_loss([x], [t], ignore_index=255)
    assert total.item() == 0.0  # CE over nothing is 0; every Dice term is 1 - s/s = 0
    (g,) = torch.autograd.grad(total, [x])
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logits_flag_their_head(device):
    logits, targets = _rand_heads(device, heads=3, max_c=4)
    logits[1].view(-1)[0] = float("nan")
    total, ph = m3d.ops.multihead_seg_loss(logits, targets)
    assert torch.isnan(total)
    assert torch.isnan(ph).tolist() == [False, True, False]


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_fp32(device):
    logits, targets = _rand_heads(device, heads=2, max_c=4)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        total, ph = m3d.ops.multihead_seg_loss(logits, targets)
    assert total.dtype == torch.float32 and ph.dtype == torch.float32
    torch.testing.assert_close(ph, reference.multihead_seg_loss(logits, targets)[1], **_tol32())


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("device", DEVICES)
def test_bad_labels_raise_and_are_ignored(device):
    # >= 4 samples per head: voxel 3 and the last one are two distinct voxels (a random head
    # of 3 voxels made this test fail: MED3D_TEST_SEED=848701598)
    logits, targets = _rand_heads(device, heads=3, max_c=6, target_dtype=torch.int64,
                                  min_n=4, max_n=5)
    C1 = logits[1].shape[1]
    targets[1].view(-1)[3] = C1 + 4
    targets[1].view(-1)[-1] = -7
    with pytest.raises(SegLabelError, match=rf"head 1: 2 voxel\(s\) with labels in \[-7, {C1 + 4}\]"
                                            rf".*C_h = {C1}"):
        m3d.ops.multihead_seg_loss(logits, targets)
    # validate=False: no error, and the bad voxels count as ignored
    total, ph = m3d.ops.multihead_seg_loss(logits, targets, validate=False)
    fixed = [t.clone() for t in targets]
    fixed[1][(fixed[1] < 0) | (fixed[1] >= C1)] = -100
    et, ep = reference.multihead_seg_loss(logits, fixed)
    torch.testing.assert_close(ph, ep, **_tol32())
    # uint8 labels too
    t8 = torch.full((1, 3, 3, 3), 9, dtype=torch.uint8, device=device)
    with pytest.raises(SegLabelError, match=r"head 0: 27 voxel\(s\).*\[9, 9\].*C_h = 3"):
        m3d.ops.multihead_seg_loss([torch.randn(1, 3, 3, 3, 3, device=device)], [t8])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_shapes_and_arguments(device):
    x = torch.randn(2, 3, 4, 5, 6, device=device)
    t = torch.randint(0, 3, (2, 4, 5, 6), device=device)
    err = (RuntimeError, ValueError)
    with pytest.raises(err, match="no heads"):
        m3d.ops.multihead_seg_loss([], [])
    with pytest.raises(err, match=r"head 1: targets shape \[?\(?2, 4, 5, 7"):
        m3d.ops.multihead_seg_loss([x, x], [t, t[..., :1].expand(2, 4, 5, 7)])
    with pytest.raises(err, match="targets"):
        m3d.ops.multihead_seg_loss([x], [t, t])
    with pytest.raises(err, match=r"logits\[1\]"):
        m3d.ops.multihead_seg_loss([x, x.double()], [t, t])
    with pytest.raises(err, match=r"targets\[0\]"):
        m3d.ops.multihead_seg_loss([x], [t.float()])
    with pytest.raises(err, match="at least 2 classes"):
        m3d.ops.multihead_seg_loss([x[:, :1]], [t])
    with pytest.raises(err, match="head_weights"):
        m3d.ops.multihead_seg_loss([x], [t], head_weights=[1.0, 2.0])
    with pytest.raises(err, match="class_weights"):
        m3d.ops.multihead_seg_loss([x], [t], class_weights=[torch.ones(4, device=device)])


@pytest.mark.parametrize("device", DEVICES)
def test_per_head_class_weights_of_the_wrong_size_are_refused(device):
    # (2,) for a 3-class head and (3,) for a 2-class head concatenate to the right total (5)
    # and were silently split as (3,) + (2,)
    x3 = torch.randn(2, 3, 4, 5, 6, device=device)
    x2 = torch.randn(1, 2, 3, 3, 3, device=device)
    t3 = torch.randint(0, 3, (2, 4, 5, 6), device=device)
    t2 = torch.randint(0, 2, (1, 3, 3, 3), device=device)
    w2, w3 = torch.ones(2, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match=r"'class_weights\[0\]' must be a 1-D real tensor of "
                                         r"C_h = 3 class weights, got shape \(2,\)"):
        m3d.ops.multihead_seg_loss([x3, x2], [t3, t2], class_weights=[w2, w3])
    with pytest.raises(ValueError, match=r"'class_weights\[0\]'.*got shape \(3, 1\)"):
        m3d.ops.multihead_seg_loss([x3], [t3], class_weights=[w3[:, None]])
    # the right sizes, given as a list of numbers, still work and match the reference
    cw = [[1.0, 2.0, 0.5], None]
    got = m3d.ops.multihead_seg_loss([x3, x2], [t3, t2], class_weights=cw)[1]
    ref = reference.multihead_seg_loss([x3, x2], [t3, t2], None, 1.0, 1.0, 1e-5, -100,
                                       [torch.tensor(cw[0], device=device), None])[1]
    torch.testing.assert_close(got, ref, **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_list_arguments_and_ignore_index_type_errors(device):
    x = torch.randn(2, 3, 4, 5, 6, device=device)
    t = torch.randint(0, 3, (2, 4, 5, 6), device=device)
    f = m3d.ops.multihead_seg_loss
    # a bare tensor used to be iterated over its batch dimension as if it were a list of heads
    with pytest.raises(TypeError, match=r"'logits' must be a list of tensors.*\(2, 3, 4, 5, 6\)"):
        f(x, [t])
    with pytest.raises(TypeError, match=r"'targets' must be a list of tensors, one per head, "
                                        r"got NoneType"):
        f([x], None)
    with pytest.raises(TypeError, match=r"'logits\[1\]' must be a tensor, got NoneType"):
        f([x, None], [t, t])
    # int(1.5) silently ignored label 1
    for bad in (1.5, None, 2**63):
        with pytest.raises(TypeError, match=r"'ignore_index' must be an int64 integer"):
            f([x], [t], ignore_index=bad)
    a = f([x], [t], ignore_index=torch.tensor(1))[0]
    b = f([x], [t], ignore_index=1)[0]
    torch.testing.assert_close(a, b)


@requires_ext
@pytest.mark.cuda
def test_cuda_work_per_call():
    # What the GPU runs for forward + backward of the 8-head case: the two forward kernels and
    # the one backward kernel, no fill, cast or copy; validate=True adds one device-to-host copy.
    from torch.profiler import ProfilerActivity, profile

    heads = [2, 3, 2, 4, 2, 3, 2, 5]
    xs = [torch.randn(1, k, 8, 16, 16, device="cuda", requires_grad=True) for k in heads]
    ts = [torch.randint(0, k, (1, 8, 16, 16), device="cuda") for k in heads]
    seed = torch.ones((), device="cuda")

    def gpu_work(validate):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            total, _ = m3d.ops.multihead_seg_loss(xs, ts, validate=validate)
            torch.autograd.grad(total, xs, grad_outputs=seed)
            torch.cuda.synchronize()
        return [e.name for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA]

    gpu_work(False)
    work = gpu_work(False)
    if not work:
        pytest.skip("the profiler records no CUDA activity here (no CUPTI)")
    assert len(work) == 3, work
    assert sum("partial_kernel" in n for n in work) == 1, work
    assert sum("finish_kernel" in n for n in work) == 1, work
    assert sum("backward_kernel" in n for n in work) == 1, work
    extra = Counter(gpu_work(True)) - Counter(work)
    assert sum(extra.values()) <= 1 and all("Memcpy" in n for n in extra), extra


# ---------------------------------------------------------------------------- compile


def _op_args(device, dtype=torch.float32):
    logits, targets = _rand_heads(device, dtype, heads=3, max_c=5, max_n=2, max_sp=4)
    logits = [x.requires_grad_() for x in logits]
    hw = torch.rand(3, device=device, dtype=dtype if dtype == torch.float64 else torch.float32)
    cw = torch.rand(sum(x.shape[1] for x in logits), device=device)
    return logits, targets, hw, cw


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, targets, hw, cw = _op_args(device)
    op = torch.ops.med3d_ext.multihead_seg_loss.default
    torch.library.opcheck(op, (logits, targets, hw, cw, 1.0, 0.5, 1e-5, -100))
    torch.library.opcheck(op, (logits, targets, None, None, 1.0, 1.0, 1e-5, 2))
    xs = [x.detach() for x in logits]
    _, ph, _, saved = op(xs, targets, hw, cw, 1.0, 0.5, 1e-5, -100)
    torch.library.opcheck(torch.ops.med3d_ext.multihead_seg_loss_backward.default,
                          (xs, targets, saved, torch.ones((), device=device), torch.rand_like(ph),
                           hw, cw, -100))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_op_autograd_matches_reference(device):
    # the op's own (C++) autograd, called through the raw schema: logits and head_weights grads
    logits, targets, hw, cw = _op_args(device)
    hw.requires_grad_()
    g = torch.randn(len(logits), device=device)
    total, ph, bad, saved = torch.ops.med3d_ext.multihead_seg_loss(logits, targets, hw, cw, 0.5,
                                                                   2.0, 1e-4, -100)
    assert not bad.requires_grad and not saved.requires_grad
    a = torch.autograd.grad(total + (ph * g).sum(), logits + [hw])
    rx = [x.detach().requires_grad_() for x in logits]
    per_cw = list(cw.split([x.shape[1] for x in logits]))
    et, ep = reference.multihead_seg_loss(rx, targets, hw, 0.5, 2.0, 1e-4, -100, per_cw)
    b = torch.autograd.grad(et + (ep * g).sum(), rx + [hw])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    # head_weights alone: d total / d hw = per_head, without running the logits' backward
    xs = [x.detach() for x in logits]
    total, ph, _, _ = torch.ops.med3d_ext.multihead_seg_loss(xs, targets, hw, cw, 0.5, 2.0, 1e-4,
                                                             -100)
    (g_hw,) = torch.autograd.grad(total * 3, [hw])
    torch.testing.assert_close(g_hw, 3 * ph.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_unused_outputs_and_expanded_grads(device):
    # Only per_head used (no gradient for total), only total used (none for per_head), and the
    # stride-0 gradient that autograd hands in for ph.sum(): no zero tensors are made for the
    # missing ones, so these paths must read "absent" as zero and honour strides.
    logits, targets = _rand_heads(device, heads=3, max_c=5)
    xs = [x.requires_grad_() for x in logits]
    hw = torch.rand(3, device=device) + 0.5
    rx = [x.detach().clone().requires_grad_() for x in logits]
    total, ph = m3d.ops.multihead_seg_loss(xs, targets, head_weights=hw)
    et, ep = reference.multihead_seg_loss(rx, targets, hw)
    for ours, ref in ((ph.sum(), ep.sum()), (ph[1] * 3, ep[1] * 3), (total, et)):
        a = torch.autograd.grad(ours, xs, retain_graph=True)
        b = torch.autograd.grad(ref, rx, retain_graph=True)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_grad_paths_agree(device):
    # calls that need no gradient skip the autograd node; the values are the same bits
    logits, targets = _rand_heads(device, heads=3, max_c=5)
    hw = torch.rand(3, device=device) + 0.5
    plain = m3d.ops.multihead_seg_loss(logits, targets, head_weights=hw)
    with torch.no_grad():
        xs = [x.detach().requires_grad_() for x in logits]
        nograd = m3d.ops.multihead_seg_loss(xs, targets, head_weights=hw)
    graded = m3d.ops.multihead_seg_loss(xs, targets, head_weights=hw)
    assert not any(t.requires_grad for t in plain + nograd)
    assert all(t.requires_grad for t in graded)
    for a, b, c in zip(plain, nograd, graded):
        assert torch.equal(a, b) and torch.equal(a, c.detach())


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_optional_grads(device):
    logits, targets, hw, cw = _op_args(device)
    xs = [x.detach() for x in logits]
    op = torch.ops.med3d_ext.multihead_seg_loss_backward.default
    _, ph, _, saved = torch.ops.med3d_ext.multihead_seg_loss(xs, targets, hw, cw, 1.0, 1.0,
                                                             1e-5, -100)
    gp = torch.rand(2 * len(xs), device=device)[::2]  # strided
    gt = torch.rand((), device=device)
    full = op(xs, targets, saved, gt, gp, hw, cw, -100)
    no_ph = op(xs, targets, saved, gt, None, hw, cw, -100)
    no_tot = op(xs, targets, saved, None, gp, hw, cw, -100)
    zero_ph = op(xs, targets, saved, gt, torch.zeros_like(gp), hw, cw, -100)
    zero_tot = op(xs, targets, saved, torch.zeros_like(gt), gp, hw, cw, -100)
    for f, a, b, za, zb in zip(full, no_ph, no_tot, zero_ph, zero_tot):
        assert torch.equal(a, za) and torch.equal(b, zb)
        torch.testing.assert_close(f, a + b, rtol=1e-5, atol=1e-7)
    torch.library.opcheck(op, (xs, targets, saved, None, gp, hw, cw, -100))
    with pytest.raises(RuntimeError, match="saved"):
        op(xs, targets, saved[:-1], gt, gp, hw, cw, -100)
    with pytest.raises(RuntimeError, match="grad_per_head"):
        op(xs, targets, saved, gt, gp[:-1], hw, cw, -100)


# ---------------------------------------------------------------------------- host overhead


def _profiled_ops(fn) -> list[str]:
    """Names of every ATen / med3d_ext op that ``fn`` dispatches, nested ones included (the
    allocations inside our kernels too): on a GPU each is a launch, an allocation or a sync."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith(("aten::", "med3d_ext::"))]


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_dispatched_ops_per_call_bounded(device):
    # The perf-baselines case (8 heads of 2-5 classes; small volumes here, the count does not
    # depend on them), forward + backward with validate=False. The op is launch-bound, so every
    # ATen op around our kernels is cost. Counted with the profiler, nested ops included:
    #   before (Python autograd.Function + Python registered autograd, zero-filled unused
    #   gradients, dtype copies and per-head .item() in the CPU backward): 54 ATen ops;
    #   now: the 4 forward outputs and the 8 gradients, all aten::empty, and nothing else.
    heads = [2, 3, 2, 4, 2, 3, 2, 5]
    xs = [torch.randn(1, k, 3, 4, 5, device=device, requires_grad=True) for k in heads]
    ts = [torch.randint(0, k, (1, 3, 4, 5), device=device) for k in heads]
    seed = torch.ones((), device=device)  # made outside: autograd's own ones_like is not ours

    def step(validate):
        total, _ = m3d.ops.multihead_seg_loss(xs, ts, validate=validate)
        return torch.autograd.grad(total, xs, grad_outputs=seed)

    step(False)
    names = _profiled_ops(lambda: step(False))
    ours = [n for n in names if n.startswith("med3d_ext::")]
    aten = [n for n in names if n.startswith("aten::")]
    assert ours == ["med3d_ext::multihead_seg_loss", "med3d_ext::multihead_seg_loss_backward"]
    scratch = 1 if device == "cuda" else 0  # the CUDA forward's one buffer of tile partials
    assert len(aten) <= 4 + scratch + len(heads), aten
    assert set(aten) <= {"aten::empty"}, aten  # no copies, fills, casts or syncs
    # validate=True adds only reading the (H, 3) summary once (one device-to-host copy on GPU)
    added = Counter(_profiled_ops(lambda: step(True))) - Counter(names)
    assert set(added) <= {"aten::resolve_conj", "aten::resolve_neg", "aten::to",
                          "aten::_to_copy", "aten::empty_strided", "aten::copy_"}, added
    assert added["aten::copy_"] <= 1, added


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    logits, targets, hw, _ = _op_args(device)

    def fn(xs, ts, w, validate):
        total, ph = m3d.ops.multihead_seg_loss(xs, ts, head_weights=w, validate=validate)
        return total * 2, ph

    for validate in (False, True):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = compiled(logits, targets, hw, validate)
        exp = fn(logits, targets, hw, validate)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b)
        g1 = torch.autograd.grad(got[0], logits)
        g2 = torch.autograd.grad(exp[0], logits)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    # the label check survives compilation
    bad = [t.clone() for t in targets]
    bad[2].view(-1)[0] = 99
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(SegLabelError, match="head 2"):
        compiled(logits, bad, hw, True)


@requires_ext
def test_label_check_is_left_out_of_cuda_graphs():
    # the compiled label check syncs with the host (bad.tolist()), which a CUDA graph capture
    # refuses: the op carries the tag that keeps torch.compile's CUDA graphs away from it
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert torch.Tag.cudagraph_unsafe in torch.ops.med3d_ext.seg_loss_check_labels.default.tags


@requires_ext
@pytest.mark.cuda
def test_compile_reduce_overhead_with_validation():
    # mode="reduce-overhead" (CUDA graphs) with validate=True: replays stay right, and a bad
    # label still raises after the graphs were recorded
    logits, targets, hw, _ = _op_args("cuda")

    def fn(xs, ts, w):
        total, ph = m3d.ops.multihead_seg_loss(xs, ts, head_weights=w, validate=True)
        return total * 2, ph

    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead")
    exp = fn(logits, targets, hw)
    for _ in range(3):
        got = compiled(logits, targets, hw)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b)
    bad = [t.clone() for t in targets]
    bad[2].view(-1)[0] = 99
    with pytest.raises(SegLabelError, match="head 2"):
        compiled(logits, bad, hw)


# ---------------------------------------------------------------------------- audit


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_targets_and_weights(device):
    # transposed int64 targets, strided uint8 targets, stride-0 (expanded) targets and logits,
    # strided head and class weights: values and gradients equal the reference on copies
    x0 = torch.randn(2, 4, 5, 6, 7, device=device)
    x1 = torch.randn(1, 3, 4, 5, 6, device=device).expand(3, 3, 4, 5, 6)
    x2 = torch.randn(2, 5, 3, 4, 5, device=device)
    t0 = torch.randint(0, 4, (2, 7, 6, 5), device=device).transpose(1, 3)
    t1 = torch.randint(0, 3, (1, 4, 5, 6), device=device).expand(3, 4, 5, 6)
    t2 = torch.randint(0, 5, (2, 3, 4, 10), device=device, dtype=torch.uint8)[..., ::2]
    hw = (torch.rand(6, device=device) + 0.5)[::2]
    cw_base = torch.rand(10, device=device) + 0.1
    cw = [cw_base[::2][:4], None, cw_base[1::2]]
    targets = [t0, t1, t2]
    assert not any(t.is_contiguous() for t in targets + [x1, hw, cw[0], cw[2]])
    xs = [x.detach().requires_grad_() for x in (x0, x1, x2)]
    total, ph = m3d.ops.multihead_seg_loss(xs, targets, head_weights=hw, class_weights=cw)
    rx = [x.detach().contiguous().requires_grad_() for x in (x0, x1, x2)]
    et, ep = reference.multihead_seg_loss(rx, [t.contiguous() for t in targets],
                                          hw.contiguous(), class_weights=[
                                              None if w is None else w.contiguous() for w in cw])
    torch.testing.assert_close(ph, ep, **_tol32())
    torch.testing.assert_close(total, et, **_tol32())
    g = torch.autograd.grad(total, xs)
    rg = torch.autograd.grad(et, rx)
    for a, b in zip(g, rg):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_can_be_a_class(device):
    # ignore_index = 0 (background) is a valid label value that counts in neither term
    logits, targets = _rand_heads(device, heads=2, max_c=5)
    for ignore in (0, 1):
        total, ph = m3d.ops.multihead_seg_loss(logits, targets, ignore_index=ignore)
        et, ep = reference.multihead_seg_loss(logits, targets, ignore_index=ignore)
        torch.testing.assert_close(ph, ep, **_tol32())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_logits_flag_their_head(device, dtype):
    # NaN in one head and +inf in another: those heads (only) are NaN, as in the reference
    logits, targets = _rand_heads(device, dtype, heads=4, max_c=4)
    logits[2].view(-1)[-1] = float("nan")
    logits[0].view(-1)[0] = float("inf")
    _, ph = m3d.ops.multihead_seg_loss(logits, targets)
    _, ep = reference.multihead_seg_loss([x.float() for x in logits], targets)
    assert torch.isnan(ph).tolist() == torch.isnan(ep).tolist() == [True, False, True, False]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_labels_in_several_heads_and_at_the_boundary(device):
    x = [torch.randn(2, 3, 4, 5, 6, device=device), torch.randn(1, 5, 3, 3, 3, device=device),
         torch.randn(1, 2, 3, 3, 3, device=device)]
    t = [torch.randint(0, 3, (2, 4, 5, 6), device=device),
         torch.randint(0, 5, (1, 3, 3, 3), device=device, dtype=torch.uint8),
         torch.randint(0, 2, (1, 3, 3, 3), device=device)]
    t[0].view(-1)[7] = 3      # == C_h: out of range
    t[2].view(-1)[0] = -1     # < 0 and not ignore_index
    t[2].view(-1)[1] = -100   # ignore_index: fine
    with pytest.raises(SegLabelError) as info:
        m3d.ops.multihead_seg_loss(x, t)
    msg = str(info.value)
    assert "head 0: 1 voxel(s) with labels in [3, 3]" in msg and "C_h = 3" in msg
    assert "head 2: 1 voxel(s) with labels in [-1, -1]" in msg and "C_h = 2" in msg
    assert "head 1" not in msg


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_rank_errors_name_the_argument(device):
    x = torch.randn(2, 3, 4, 5, 6, device=device)
    t = torch.randint(0, 3, (2, 4, 5, 6), device=device)
    err = (RuntimeError, ValueError)
    f = m3d.ops.multihead_seg_loss
    for dt, name in ((torch.int16, "Short"), (torch.int32, "Int")):  # uint8 or int64 only
        with pytest.raises(err, match=rf"'targets\[1\]' must be uint8 or int64.*{name}"):
            f([x, x], [t, t.to(dt)])
    with pytest.raises(err, match=r"'logits\[0\]'.*Long"):
        f([x.long()], [t])
    with pytest.raises(err, match=r"'logits\[0\]'.*\[4\]"):
        f([torch.randn(4, device=device)], [torch.zeros(4, dtype=torch.long, device=device)])
    with pytest.raises(err, match=r"'head_weights'.*\[2, 1\]"):
        f([x, x], [t, t], head_weights=torch.ones(2, 1, device=device))
    with pytest.raises(err, match=r"'head_weights'.*Long"):
        f([x, x], [t, t], head_weights=torch.ones(2, dtype=torch.long, device=device))
    with pytest.raises(err, match=r"'class_weights\[0\]'.*C_h = 3.*\(2,\)"):
        f([x], [t], class_weights=[torch.ones(2, device=device)])
    with pytest.raises(err, match=r"head 0: targets shape.*2, 4, 5\W.*logits shape.*2, 3, 4, 5, 6"):
        f([x], [t[..., 0]])


@pytest.mark.cuda
def test_cuda_device_mix_names_the_argument():
    x = torch.randn(2, 3, 4, 5, 6, device="cuda")
    t = torch.randint(0, 3, (2, 4, 5, 6), device="cuda")
    with pytest.raises((RuntimeError, ValueError), match=r"'targets\[1\]'.*cpu"):
        m3d.ops.multihead_seg_loss([x, x], [t, t.cpu()])
    with pytest.raises((RuntimeError, ValueError), match=r"'logits\[1\]'"):
        m3d.ops.multihead_seg_loss([x, x.cpu()], [t, t])


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_sums_beyond_fp16_range(device):
    # one sample of 68880 voxels, nearly all class 0 with probability ~1: the Dice sums P, T and
    # I of class 0 exceed fp16's 65504, so fp16 accumulation would overflow to inf
    x = torch.randn(1, 2, 40, 42, 41, device=device)
    x[:, 0] += 6.0
    t = (torch.rand(1, 40, 42, 41, device=device) < 0.02).to(torch.uint8)
    xh = x.half().requires_grad_()
    total, ph = m3d.ops.multihead_seg_loss([xh], [t])
    rx = xh.detach().float().requires_grad_()
    et, ep = reference.multihead_seg_loss([rx], [t])
    assert torch.isfinite(total)
    torch.testing.assert_close(ph, ep, **_tol32())
    (g,) = torch.autograd.grad(total, [xh])
    (rg,) = torch.autograd.grad(et, [rx])
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), rg, rtol=TOL[torch.float16][0], atol=1e-6)


# ---------------------------------------------------------------------------- hunt findings


@pytest.mark.parametrize("device", DEVICES)
def test_label_check_survives_compile_when_only_per_head_is_used(device):
    """The check op passed only ``total`` through: a compiled graph that used per_head alone
    dropped it (a side-effect-free op whose output is unused) and trained on bad labels."""
    logits, targets, hw, _ = _op_args(device)
    bad = [t.clone() for t in targets]
    bad[1].view(-1)[0] = 99

    def per_head_only(xs, ts):
        return m3d.ops.multihead_seg_loss(xs, ts, validate=True)[1].sum()

    compiled = torch.compile(per_head_only, fullgraph=True, backend="aot_eager")
    with pytest.raises(SegLabelError, match="head 1"):
        compiled(logits, bad)
    torch.testing.assert_close(compiled(logits, targets), per_head_only(logits, targets))


@pytest.mark.parametrize("device", DEVICES)
def test_head_weights_as_a_list_of_tensors_get_gradients(device):
    logits, targets = _rand_heads(device, heads=3)
    w = [torch.tensor(v, device=device, requires_grad=True) for v in (0.5, 1.0, 2.0)]
    total, per_head = m3d.ops.multihead_seg_loss(logits, targets, head_weights=w)
    total.backward()
    for h in range(3):
        torch.testing.assert_close(w[h].grad, per_head[h].detach().to(w[h].dtype))
    ref_total, _ = reference.multihead_seg_loss(logits, targets, torch.stack(w).detach())
    torch.testing.assert_close(total.detach(), ref_total)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_class_weights_match_cross_entropy(device):
    """F.cross_entropy takes the weighted mean whatever the sign of the weights' sum; the op
    returned 0 for a sum <= 0."""
    x = torch.randn(2, 3, 4, 5, 3, device=device, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 4, 5, 3), device=device)
    t[0, 0, 0, 0] = 1
    cw = torch.tensor([-1.0, 0.5, 1.0], device=device, dtype=torch.float64)
    _, ph = m3d.ops.multihead_seg_loss([x], [t], class_weights=[cw], dice_weight=0.0)
    torch.testing.assert_close(ph[0], F.cross_entropy(x, t, weight=cw))
    _, ref = reference.multihead_seg_loss([x], [t], None, 1.0, 0.0, 1e-5, -100, [cw])
    torch.testing.assert_close(ref[0], F.cross_entropy(x, t, weight=cw))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused(device):
    logits, targets = _rand_heads(device, heads=2)
    logits = [x.double().requires_grad_(True) for x in logits]
    total, _ = m3d.ops.multihead_seg_loss(logits, targets)
    if not _extension.available():
        pytest.skip("the reference path is plain autograd (double backward works there)")
    with pytest.raises(RuntimeError, match="double backward .create_graph=True. is not supported"):
        torch.autograd.grad(total, logits, create_graph=True)
