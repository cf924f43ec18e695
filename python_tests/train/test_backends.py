"""The plain-PyTorch pieces the CLI falls back to (--no-fused): loss against MONAI, label
downsampling and the affine augmentation against independent expectations."""

from __future__ import annotations

import pytest
import torch

from med3d_ext.train import backends as B


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 4, 8, 3, 9)])
def test_plain_loss_against_monai(shape):
    losses = pytest.importorskip("monai.losses")
    heads = [torch.randn(shape), torch.randn(shape[0] + 1, 2, *shape[2:])]
    targets = [torch.randint(0, h.shape[1], (h.shape[0], *h.shape[2:])) for h in heads]
    total, per = B.plain_multihead_seg_loss(heads, targets, head_weights=[0.5, 2.0])
    ref = losses.DiceCELoss(softmax=True, to_onehot_y=True, smooth_nr=1e-5, smooth_dr=1e-5)
    want = torch.stack([ref(h, t[:, None]) for h, t in zip(heads, targets)])
    torch.testing.assert_close(per, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, 0.5 * want[0] + 2.0 * want[1], rtol=1e-5, atol=1e-6)


def test_no_fused_selects_plain_pytorch():
    from med3d_ext import reference

    fn = B.seg_loss_fn(use_ops=False)
    assert fn in (getattr(reference, "multihead_seg_loss", None), B.plain_multihead_seg_loss)
    assert isinstance(B.augmenter(True, use_ops=False), B.PlainAugment3D)
    assert B.augmenter(False) is None


def test_downsample_labels_samples_voxel_centres():
    lab = torch.randint(0, 5, (2, 16, 12, 8), dtype=torch.uint8)
    out = B.downsample_labels(lab, (4, 3, 2))
    # the centre of low-res voxel i sits at high-res coordinate 4i + 1.5: nearest -> 4i + 2
    assert out.dtype == torch.int64
    assert torch.equal(out, lab[:, 2::4, 2::4, 2::4].long())
    assert torch.equal(B.downsample_labels(lab, (16, 12, 8)), lab.long())


def test_plain_augment_identity_and_label_values():
    img = torch.randn(3, 1, 8, 12, 10)
    lab = torch.randint(0, 3, (3, 8, 12, 10))
    aug = B.PlainAugment3D(p=0.0)  # no spatial change; intensity changes only
    torch.manual_seed(0)
    out, out_lab = aug(img, lab, (8, 12, 10))
    assert torch.equal(out_lab, lab)
    # intensity: per-sample affine map plus small noise -> strongly correlated with the input
    for n in range(3):
        c = torch.corrcoef(torch.stack([out[n].flatten(), img[n].flatten()]))[0, 1]
        assert c > 0.9
    aug = B.PlainAugment3D(p=1.0)
    out, out_lab = aug(img, lab, (8, 12, 10), label_size=(2, 3, 2))
    assert out.shape == (3, 1, 8, 12, 10) and out_lab.shape == (3, 2, 3, 2)
    assert set(out_lab.unique().tolist()) <= {0, 1, 2}  # nearest: no new label values


def test_random_theta_is_rotation_scale_flip():
    th = B.random_theta(5, rotate_deg=20, scale=(0.9, 1.1))
    a = th[:, :, :3]
    s = torch.linalg.svdvals(a)  # rotation x isotropic scale x flips: equal singular values
    torch.testing.assert_close(s.max(1).values, s.min(1).values, rtol=1e-5, atol=1e-6)
    assert ((s[:, 0] >= 0.9 - 1e-6) & (s[:, 0] <= 1.1 + 1e-6)).all()
    assert torch.equal(th[:, :, 3], torch.zeros(5, 3))


def test_seg_loss_fn_checks_labels_on_the_first_call_and_every_nth(monkeypatch):
    from med3d_ext.ops import SegLabelError

    monkeypatch.setattr(B, "LABEL_CHECK_EVERY", 3)
    fn = B.seg_loss_fn(use_ops=True)
    logits = [torch.randn(1, 2, 3, 4, 5)]
    good = [torch.randint(0, 2, (1, 3, 4, 5))]
    bad = [good[0].clone()]
    bad[0][0, 1, 2, 3] = 7
    with pytest.raises(SegLabelError, match="head 0"):
        fn(logits, bad)  # call 0: checked
    fn(logits, bad)      # calls 1 and 2: not checked (the bad voxel is ignored, never read OOB)
    total, per = fn(logits, bad)
    assert torch.isfinite(total) and per.shape == (1,)
    with pytest.raises(SegLabelError):
        fn(logits, bad)  # call 3: checked again
    assert fn(logits, bad, validate=False)[0].isfinite()  # an explicit choice wins


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_fn_equals_f_interpolate_with_gradients(dtype):
    """--label-grid patch upsamples the logits onto the patch: the ops' resize (fused runs) and
    F.interpolate (--no-fused) give the same values and gradients; the ops' backward sums in
    fp32 and rounds once, so for bf16 logits it is at least as close to the float64 gradient."""
    import torch.nn.functional as F

    x = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    g = torch.randn(2, 3, 16, 20, 12, dtype=torch.float64)
    size = (16, 20, 12)
    x64 = x.clone().requires_grad_()
    F.interpolate(x64, size=size, mode="trilinear", align_corners=False).backward(g)
    results = {}
    for use_ops in (True, False):
        xi = x.to(dtype).requires_grad_()
        y = B.resize_fn(use_ops)(xi, size)
        y.backward(g.to(dtype))
        assert y.shape == (2, 3, *size) and y.dtype == dtype
        results[use_ops] = (y.double(), xi.grad.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[True][0], results[False][0], **tol)
    err_ops = (results[True][1] - x64.grad).abs().max()
    err_plain = (results[False][1] - x64.grad).abs().max()
    assert err_ops <= err_plain * 1.01 + 1e-6, (err_ops, err_plain)
    # each input's gradient sums up to (2 * 4)^3 = 512 terms of g rounded to the dtype: its
    # error is bounded by the unit roundoff times the sum of the terms' magnitudes (the backward
    # of |g|), plus one rounding of the result -- for bf16, whose sums run in fp32; for fp32 the
    # fp32 summation adds its own roundoffs: the worst case is ~512 of them, the worst seen in
    # 300 seeds 1.8, and 16 leaves a 9x margin (a fixed atol failed where the terms cancelled,
    # ~1 run in 50)
    x_abs = x.clone().requires_grad_()
    F.interpolate(x_abs, size=size, mode="trilinear", align_corners=False).backward(g.abs())
    gabs = x_abs.grad
    u, k = (2.0 ** -24, 16) if dtype == torch.float32 else (2.0 ** -8, 2)
    bound = k * u * (gabs + x64.grad.abs()) + 1e-12
    excess = (results[True][1] - x64.grad).abs() - bound
    assert excess.max() <= 0, (excess.max().item(), bound.flatten()[excess.argmax()].item())
