"""A fused model with the rest of PyTorch: a frozen encoder, SyncBatchNorm conversion,
torch.save / pickle and deepcopy. Each once went wrong only for the fused model (the plain one
was right), and silently: a frozen encoder's BatchNorm kept training, the stem was normalised
twice, saving failed."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from med3d_ext.models import build_transfer_model, freeze_encoder, resnet3d, unfreeze_encoder
from med3d_ext.nn import ConvBNReLU3d, convert_sync_batchnorm, fuse_modules, unfuse_modules


def _random_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
    return model


def _bn_state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("depth", [10, 18])
def test_frozen_encoder_of_a_fused_model_keeps_its_statistics(depth):
    plain = _random_stats(build_transfer_model("segmentation", depth, 3)).double()
    fused = fuse_modules(copy.deepcopy(plain))
    x = torch.randn(2, 1, 15, 14, 13, dtype=torch.float64)
    outs = []
    for model in (plain, fused):
        freeze_encoder(model)
        model.train()  # the transfer loop's frozen epochs: train mode, encoder BN frozen
        before = _bn_state(model)
        out = model(x)
        out.square().mean().backward()
        after = _bn_state(model)
        enc = [k for k in before if not k.startswith("conv_seg")]
        assert enc and all(torch.equal(before[k], after[k]) for k in enc), \
            [k for k in enc if not torch.equal(before[k], after[k])][:3]
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    # unfrozen, the fused encoder's BatchNorm trains again, as the plain one does
    for model in (plain, fused):
        unfreeze_encoder(model)
        model.train()
        before = _bn_state(model)["layer1.0.bn1.num_batches_tracked"].item()
        model(x)
        assert _bn_state(model)["layer1.0.bn1.num_batches_tracked"].item() == before + 1


def test_frozen_conv_bn_relu_module():
    m = _random_stats(ConvBNReLU3d(2, 3, 3, padding=1).double())

    class Net(nn.Module):  # freeze_encoder finds an ``encoder`` attribute
        def __init__(self):
            super().__init__()
            self.encoder = m

    net = freeze_encoder(Net()).train()
    before = _bn_state(net)
    x = torch.randn(2, 2, 5, 6, 7, dtype=torch.float64)
    y = net.encoder(x)
    assert all(torch.equal(v, _bn_state(net)[k]) for k, v in before.items())
    # normalised with the running statistics, as a frozen plain Conv3d + BatchNorm3d is
    ref = torch.relu(nn.functional.batch_norm(m.conv(x), m.bn.running_mean, m.bn.running_var,
                                              m.bn.weight, m.bn.bias, False, 0.0, m.bn.eps))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth", [10, 50])
def test_sync_batchnorm_conversion_of_a_fused_model(depth):
    plain = _random_stats(resnet3d(depth, 2)).eval()
    fused = fuse_modules(copy.deepcopy(plain))
    x = torch.randn(1, 1, 16, 16, 16)
    synced = convert_sync_batchnorm(copy.deepcopy(fused)).eval()
    assert isinstance(synced.bn1, nn.SyncBatchNorm)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in synced.modules())
    with torch.no_grad():
        torch.testing.assert_close(synced(x), plain(x), rtol=1e-4, atol=1e-4)
    # a plain model converts as with torch's own function
    with torch.no_grad():
        torch.testing.assert_close(convert_sync_batchnorm(copy.deepcopy(plain)).eval()(x),
                                   plain(x), rtol=0, atol=0)


def test_fused_model_pickles_and_copies():
    plain = _random_stats(resnet3d(10, 2)).eval()
    fused = fuse_modules(copy.deepcopy(plain))
    x = torch.randn(1, 1, 16, 16, 16)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    again = pickle.loads(pickle.dumps(fused))
    twin = copy.deepcopy(fused)
    for m in (back, again, twin):
        assert type(m.conv1).__name__ == "FusedConv3d" and m.conv1._m3d_bn is m.bn1
        assert type(m.layer1[0]) is type(fused.layer1[0])
        with torch.no_grad():
            torch.testing.assert_close(m(x), fused(x), rtol=0, atol=0)
    # and unfuses back to the plain classes
    unfuse_modules(back)
    assert type(back.conv1) is nn.Conv3d and type(back.bn1) is nn.BatchNorm3d
    with torch.no_grad():
        torch.testing.assert_close(back(x), plain(x), rtol=1e-4, atol=1e-4)
