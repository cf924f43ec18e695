"""resnet3d against MedicalNet's manifests (keys, shapes, parameter counts, all seven depths)
and against an independent functional forward written from the architecture spec."""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from med3d_ext import models
from med3d_ext.models import DownsampleA, ResNet3dEncoder, resnet3d, resnet3d_encoder
from python_tests.conftest import assert_close

DATA = Path(__file__).resolve().parents[1] / "data"
ALL_DEPTHS = [10, 18, 34, 50, 101, 152, 200]


def manifest(depth):
    return json.loads((DATA / f"resnet{depth}.json").read_text())


def meta_model(depth, **kw):
    with torch.device("meta"):  # no memory, no init cost: fine for keys, shapes and counts
        return resnet3d(depth, **kw)


@pytest.mark.parametrize("depth", ALL_DEPTHS)
def test_state_dict_matches_medicalnet_manifest(depth):
    ref = manifest(depth)
    net = meta_model(depth)
    got = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    want = [(e["key"], e["shape"]) for e in ref["state_dict"]]
    assert got == want  # same keys, same order, same shapes
    assert net.shortcut_type == ref["shortcut_type_of_released_weights"]
    n_all = sum(p.numel() for p in net.parameters())
    n_enc = sum(p.numel() for k, p in net.named_parameters() if not k.startswith("conv_seg."))
    assert n_all == ref["num_params_full_model_with_2_class_head"]
    assert n_enc == ref["num_params_encoder"]
    # the encoder module alone has exactly the keys of MedicalNet's released files
    with torch.device("meta"):
        enc = resnet3d_encoder(depth)
    released = [e["key"] for e in ref["state_dict"] if e["in_released_file"]]
    assert list(enc.state_dict()) == released
    assert list(net.encoder_state_dict()) == released


@pytest.mark.parametrize("depth", ALL_DEPTHS)
def test_block_structure_follows_spec(depth):
    ref = manifest(depth)
    net = meta_model(depth)
    block_cls = models.BasicBlock if ref["block"] == "BasicBlock" else models.Bottleneck
    spec = {1: (1, 1), 2: (2, 1), 3: (1, 2), 4: (1, 4)}  # layer -> (stride, dilation)
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((7,) * 3, (2,) * 3,
                                                                           (3,) * 3)
    assert net.conv1.bias is None
    assert (net.maxpool.kernel_size, net.maxpool.stride, net.maxpool.padding) == (3, 2, 1)
    for i, n_blocks in enumerate(ref["layers"], 1):
        layer = getattr(net, f"layer{i}")
        assert len(layer) == n_blocks
        stride, dil = spec[i]
        for j, blk in enumerate(layer):
            assert type(blk) is block_cls
            conv3 = blk.conv1 if block_cls is models.BasicBlock else blk.conv2
            assert conv3.kernel_size == (3, 3, 3)
            assert conv3.stride == ((stride,) * 3 if j == 0 else (1, 1, 1))
            assert conv3.dilation == (dil,) * 3 and conv3.padding == (dil,) * 3
            assert all(m.bias is None for m in blk.modules() if isinstance(m, torch.nn.Conv3d))


@pytest.mark.parametrize("depth,shortcut", [(10, "A"), (18, "B"), (50, "A"), (34, "B")])
def test_non_default_shortcut(depth, shortcut):
    net = meta_model(depth, shortcut_type=shortcut)
    has_ds = any("downsample" in k for k in net.state_dict())
    assert has_ds == (shortcut == "B")
    assert models.infer_medicalnet_depth(net.state_dict()) == (depth, shortcut)


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be one of"):
        resnet3d(11)
    with pytest.raises(ValueError, match="shortcut_type"):
        resnet3d(10, shortcut_type="C")
    with pytest.raises(ValueError, match="in_channels"):
        resnet3d(10, in_channels=0)
    with pytest.raises(ValueError, match="num_seg_classes must be a positive int, got 0"):
        resnet3d(10, num_seg_classes=0)
    # a float is a TypeError naming the argument by its own name (was "num_classes", ValueError)
    with pytest.raises(TypeError, match="num_seg_classes must be a positive int, got 2.0"):
        resnet3d(10, num_seg_classes=2.0)
    with pytest.raises(TypeError, match="ClassificationHead: num_classes"):
        models.ClassificationHead(8, 2.0)
    from med3d_ext.ops.conv_bn_relu import im2col_chunk_bytes

    if im2col_chunk_bytes():  # 0 without the compiled extension: nothing to set
        with pytest.raises(TypeError, match="positive int of bytes, got 1.5"):
            im2col_chunk_bytes(1.5)
    net = resnet3d(10)
    with pytest.raises(ValueError, match=r"expected input \(N, 1, D, H, W\)"):
        net(torch.randn(1, 2, 8, 8, 8))


def test_numpy_integers_and_bad_input_types():
    # a numpy depth (e.g. from a config array) was refused as "got np.int64(10)"; an integer
    # or None input failed deep inside conv3d ("expected scalar type Long but found Float")
    import numpy as np

    net = resnet3d(np.int64(10), num_seg_classes=np.int32(3), in_channels=np.int64(2))
    assert net.depth == 10 and type(net.depth) is int and net.in_channels == 2
    assert net(torch.randn(2, 2, 8, 8, 8)).shape[1] == 3
    for bad in (True, 10.0, "10", None, torch.tensor(10.0)):
        # a wrong type is a TypeError, as the README says (also a ValueError, as it was)
        with pytest.raises(TypeError, match="depth must be one of"):
            resnet3d(bad)
    with pytest.raises(ValueError, match="depth must be one of"):
        resnet3d(11)
    # a 0-d integer tensor is an integer, as the README says (it was refused)
    assert resnet3d(torch.tensor(10)).depth == 10 and type(resnet3d(torch.tensor(10)).depth) is int
    with pytest.raises(TypeError, match=r"expected a floating-point input.*torch.int64"):
        net(torch.ones(2, 2, 8, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expected input \(N, 2, D, H, W\) tensor, got NoneType"):
        net(None)


# ------------------------------------------------------------- independent functional forward


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], training=False, eps=1e-5)


def _shortcut_a(x, planes, stride):  # MedicalNet's downsample_basic_block, literally
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    zeros = torch.zeros(out.shape[0], planes - out.shape[1], *out.shape[2:], dtype=x.dtype)
    return torch.cat([out, zeros], dim=1)


def reference_forward(sd, layers, shortcut, x):
    """MedicalNet's forward written from the paper/code description over a bare state dict
    (eval-mode BN): nothing from med3d_ext.models is used."""
    x = F.relu(_bn(F.conv3d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool3d(x, 3, stride=2, padding=1)
    bottleneck = "layer1.0.conv3.weight" in sd
    for i, (stride, dil) in enumerate([(1, 1), (2, 1), (1, 2), (1, 4)], 1):
        for j in range(layers[i - 1]):
            p, s = f"layer{i}.{j}", stride if j == 0 else 1
            if bottleneck:
                out = F.relu(_bn(F.conv3d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
                out = F.relu(_bn(F.conv3d(out, sd[p + ".conv2.weight"], stride=s, padding=dil,
                                          dilation=dil), sd, p + ".bn2"))
                out = _bn(F.conv3d(out, sd[p + ".conv3.weight"]), sd, p + ".bn3")
            else:
                out = F.relu(_bn(F.conv3d(x, sd[p + ".conv1.weight"], stride=s, padding=dil,
                                          dilation=dil), sd, p + ".bn1"))
                out = _bn(F.conv3d(out, sd[p + ".conv2.weight"], padding=dil, dilation=dil), sd,
                          p + ".bn2")
            planes = out.shape[1]
            if p + ".downsample.0.weight" in sd:
                res = _bn(F.conv3d(x, sd[p + ".downsample.0.weight"], stride=s), sd,
                          p + ".downsample.1")
            elif shortcut == "A" and (s != 1 or x.shape[1] != planes):
                res = _shortcut_a(x, planes, s)
            else:
                res = x
            x = F.relu(out + res)
    feats = x
    y = F.conv_transpose3d(x, sd["conv_seg.0.weight"], sd["conv_seg.0.bias"], stride=2)
    y = F.relu(_bn(y, sd, "conv_seg.1"))
    y = F.relu(_bn(F.conv3d(y, sd["conv_seg.3.weight"], padding=1), sd, "conv_seg.4"))
    return feats, F.conv3d(y, sd["conv_seg.6.weight"])


def _randomise_bn(net):
    # fresh BN statistics and affine parameters, so eval-mode BN is not the identity
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


def _out(n):  # stem conv, max-pool and layer2 each map n -> ceil(n / 2)
    for _ in range(3):
        n = math.ceil(n / 2)
    return n


@pytest.mark.parametrize("depth,shortcut,size,classes", [
    (10, None, (19, 23, 27), 2),   # issue's odd size, shortcut B
    (18, None, (17, 9, 12), 3),    # shortcut A (parameter-free)
    (10, "A", (8, 13, 5), 4),
    (50, None, (9, 11, 7), 2),     # Bottleneck + shortcut B, tiny input keeps it fast
    (50, "A", (7, 6, 10), 1),
])
def test_forward_matches_independent_reference(depth, shortcut, size, classes):
    net = resnet3d(depth, num_seg_classes=classes, shortcut_type=shortcut).double()
    _randomise_bn(net)
    net.eval()
    n = 2 if depth < 50 else 1
    x = torch.randn(n, 1, *size, dtype=torch.float64)
    feats, logits = net.features(x), net(x)
    enc_shape = tuple(_out(s) for s in size)
    assert feats.shape == (n, net.out_channels, *enc_shape)
    assert logits.shape == (n, classes, *(2 * s for s in enc_shape))
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    ref_feats, ref_logits = reference_forward(sd, manifest(depth)["layers"], net.shortcut_type, x)
    assert_close(feats, ref_feats)
    assert_close(logits, ref_logits)


def test_forward_train_mode_backward_and_minimal_input():
    net = resnet3d(10)
    x = torch.randn(2, 1, 1, 1, 1)  # 1 voxel survives every stride (ceil)
    y = net(x)
    assert y.shape == (2, 2, 2, 2, 2)
    y.sum().backward()
    assert net.conv1.weight.grad is not None and net.conv_seg[6].weight.grad is not None


def test_non_contiguous_input():
    net = resnet3d(18).eval()
    x = torch.randn(1, 1, 12, 10, 14).transpose(2, 4)
    assert not x.is_contiguous()
    assert_close(net(x), net(x.contiguous()))


def test_empty_batch():
    net = resnet3d(10).eval()
    assert net(torch.randn(0, 1, 9, 9, 9)).shape == (0, 2, 4, 4, 4)


# ------------------------------------------------------------------------- type-A shortcut


@pytest.mark.parametrize("stride", [1, 2])
def test_shortcut_a_subsamples_and_zero_pads(stride):
    x = torch.randn(2, 5, 7, 6, 9)
    out = DownsampleA(12, stride)(x)
    assert out.shape == (2, 12, *(math.ceil(s / stride) for s in x.shape[2:]))
    assert_close(out[:, :5], x[:, :, ::stride, ::stride, ::stride])
    assert torch.count_nonzero(out[:, 5:]) == 0
    assert_close(out, _shortcut_a(x, 12, stride))  # MedicalNet's avg_pool3d(k=1) + cat
    assert list(DownsampleA(12, stride).state_dict()) == []
    with pytest.raises(ValueError, match="out_channels"):
        DownsampleA(3, stride)(x)


def test_shortcut_a_used_by_depth_18():
    net = meta_model(18)
    ds = net.layer2[0].downsample
    assert isinstance(ds, DownsampleA) and (ds.out_channels, ds.stride) == (128, 2)
    ds3 = net.layer3[0].downsample
    assert isinstance(ds3, DownsampleA) and (ds3.out_channels, ds3.stride) == (256, 1)
    assert net.layer1[0].downsample is None


def test_in_channels():
    net = resnet3d(10, in_channels=3)
    assert net.conv1.weight.shape == (64, 3, 7, 7, 7)
    assert net(torch.randn(2, 3, 8, 8, 8)).shape == (2, 2, 2, 2, 2)


# ---------------------------------------------------------------------------------- fusion


def test_fused_without_nn_package_raises_clearly(monkeypatch):
    # simulate the nn package being absent, whatever this branch has
    monkeypatch.setitem(sys.modules, "med3d_ext.nn", None)
    with pytest.raises(NotImplementedError, match=r"med3d_ext\.nn\.fuse_modules"):
        resnet3d(10, fused=True)
    with pytest.raises(NotImplementedError, match=r"med3d_ext\.nn\.fuse_modules"):
        models.Med3DNet(10, {"a": 2}, fused=True)
    with pytest.raises(NotImplementedError, match=r"med3d_ext\.nn\.fuse_modules"):
        models.ClassificationNet(10, 2, fused=True)


def test_fused_delegates_to_fuse_modules_and_keeps_keys(monkeypatch):
    calls = []

    def fuse_modules(model):  # stand-in: records the call, switches nothing
        calls.append(type(model).__name__)
        return model

    fake = types.ModuleType("med3d_ext.nn")
    fake.fuse_modules = fuse_modules
    monkeypatch.setitem(sys.modules, "med3d_ext.nn", fake)
    net = resnet3d(10, fused=True)
    assert calls == ["ResNet3d"]
    assert list(net.state_dict()) == list(resnet3d(10).state_dict())
    models.Med3DNet(10, {"a": 2}, fused=True)
    assert calls[-1] == "Med3DNet"


def test_fused_with_real_nn_package_if_present():
    try:
        importlib.import_module("med3d_ext.nn").fuse_modules  # noqa: B018
    except (ImportError, AttributeError):
        pytest.skip("med3d_ext.nn.fuse_modules not in this build")
    plain = resnet3d(10).double()
    _randomise_bn(plain)
    fused = resnet3d(10, fused=True).double()
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    plain.eval(), fused.eval()
    x = torch.randn(1, 1, 11, 9, 10, dtype=torch.float64)
    assert_close(fused(x), plain(x))
    assert isinstance(fused, ResNet3dEncoder)


def test_compiles_without_graph_breaks():
    # fullgraph=True fails on any graph break (e.g. in the type-A shortcut); the eager backend
    # keeps this a tracing check, fast on CPU
    net = resnet3d(18).eval()
    x = torch.randn(1, 1, 9, 10, 11)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    assert_close(compiled(x), net(x))
