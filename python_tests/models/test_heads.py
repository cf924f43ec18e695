"""Transfer models (classification head, build helpers) and fine-tuning helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from med3d_ext.models import (
    ClassificationHead,
    ClassificationNet,
    Med3DNet,
    ResNet3d,
    build_model,
    build_transfer_model,
    encoder_parameters,
    freeze_encoder,
    head_parameters,
    param_groups,
    resnet3d,
    save_encoder_medicalnet,
    unfreeze_encoder,
)
from python_tests.conftest import assert_close

DATA = Path(__file__).resolve().parents[1] / "data"


def manifest(depth):
    return json.loads((DATA / f"resnet{depth}.json").read_text())


def test_classification_net_keys_and_forward():
    net = ClassificationNet(18, 3, dropout=0.3)
    released = [e["key"] for e in manifest(18)["state_dict"] if e["in_released_file"]]
    sd = net.state_dict()
    assert [k for k in sd if k.startswith("encoder.")] == ["encoder." + k for k in released]
    assert [k for k in sd if not k.startswith("encoder.")] == ["head.fc.weight", "head.fc.bias"]
    assert net.head.fc.in_features == 512
    net.eval()
    x = torch.randn(2, 1, 13, 9, 17)
    feats = net.encoder(x)
    want = feats.mean(dim=(2, 3, 4)) @ net.head.fc.weight.T + net.head.fc.bias
    assert_close(net(x), want)
    assert net(x).shape == (2, 3)


def test_classification_head_dropout_and_errors():
    head = ClassificationHead(16, 4, dropout=0.5)
    x = torch.randn(64, 16, 3, 2, 5)
    head.eval()
    assert_close(head(x), head(x))
    head.train()
    a, b = head(x), head(x)
    assert not torch.allclose(a, b)  # dropout active in training
    assert ClassificationHead(16, 4, dropout=0.0)(x).shape == (64, 4)
    with pytest.raises(ValueError, match="dropout"):
        ClassificationHead(16, 4, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationHead(16, 0)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationNet(10, 0)


def test_classification_bottleneck_width():
    with torch.device("meta"):
        net = ClassificationNet(50, 2)
    assert net.head.fc.weight.shape == (2, 2048)


def test_build_transfer_model(tmp_path):
    seg = build_transfer_model("segmentation", 10, 5)
    assert isinstance(seg, ResNet3d) and seg.conv_seg[6].out_channels == 5
    cls = build_transfer_model("classification", 10, 3, dropout=0.1)
    assert isinstance(cls, ClassificationNet) and cls.head.dropout.p == 0.1
    src = resnet3d(18)
    p = save_encoder_medicalnet(src, tmp_path / "resnet_18.pth")
    model, report = build_transfer_model("classification", None, 2, weights=p,
                                         return_report=True)
    assert (model.encoder.depth, model.encoder.shortcut_type) == (18, "A")
    assert report.missing == ["head.fc.bias", "head.fc.weight"]
    assert_close(model.encoder.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    seg = build_transfer_model("segmentation", None, 4, weights=p)
    assert seg.depth == 18 and seg.conv_seg[6].out_channels == 4
    assert_close(seg.conv1.weight, src.conv1.weight)
    with pytest.raises(ValueError, match="task must be one of"):
        build_transfer_model("detection", 10, 2)
    with pytest.raises(ValueError, match="needs weights"):
        build_transfer_model("segmentation", None, 2)


@pytest.mark.parametrize("arch_model", [
    lambda: resnet3d(10, num_seg_classes=3, shortcut_type="A"),
    lambda: ClassificationNet(18, 4, dropout=0.2, in_channels=2),
    lambda: Med3DNet(10, {"a": 2, "b": 3}),
], ids=["segmentation", "classification", "pretrain"])
def test_build_model_from_arch(arch_model):
    with torch.device("meta"):
        model = arch_model()
        again = build_model(model.arch)
    assert type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert again.arch == model.arch


def test_build_model_bad_task():
    with pytest.raises(ValueError, match="arch\\['task'\\]"):
        build_model({"task": "nope", "depth": 10})
    # a hand-edited arch without 'depth' gave a bare KeyError: 'depth'
    with pytest.raises(ValueError, match=r"arch for task 'classification' is missing "
                                         r"\['depth'\]"):
        build_model({"task": "classification", "num_classes": 2})
    with pytest.raises(ValueError, match=r"missing \['heads'\]"):
        build_model({"task": "pretrain", "depth": 10})
    with pytest.raises(TypeError, match=r"arch must be a dict, got NoneType"):
        build_model(None)
    import numpy as np

    net = ClassificationNet(10, np.int64(3))
    assert net.num_classes == 3 and type(net.arch["num_classes"]) is int


@pytest.mark.parametrize("make", [lambda: resnet3d(10, 3), lambda: ClassificationNet(10, 3),
                                  lambda: Med3DNet(10, {"a": 2, "b": 3})],
                         ids=["resnet3d", "classification", "med3d"])
def test_encoder_and_head_parameters_partition(make):
    model = make()
    enc, head = encoder_parameters(model), head_parameters(model)
    ids_all = [id(p) for p in model.parameters()]
    assert sorted(map(id, enc + head)) == sorted(ids_all)
    assert not set(map(id, enc)) & set(map(id, head))
    assert sum(p.numel() for p in enc) == manifest(10)["num_params_encoder"]


def _bn_stats(modules):
    return [b.clone() for m in modules for n, b in m.named_buffers() if "running" in n]


@pytest.mark.parametrize("kind", ["resnet3d", "classification"])
def test_freeze_and_unfreeze(kind):
    model = resnet3d(10, 3) if kind == "resnet3d" else ClassificationNet(10, 3)
    enc_mod = [getattr(model, n) for n in ("conv1", "bn1", "layer1", "layer2", "layer3",
                                           "layer4")] if kind == "resnet3d" else [model.encoder]
    head_mod = [model.conv_seg] if kind == "resnet3d" else []
    assert freeze_encoder(model) is model
    model.train()  # frozen BN stays in eval even after train()
    assert all(not p.requires_grad for p in encoder_parameters(model))
    assert all(p.requires_grad for p in head_parameters(model))
    enc_before, head_before = _bn_stats(enc_mod), _bn_stats(head_mod)
    x = torch.randn(2, 1, 9, 10, 11)
    out = model(x)
    out.square().mean().backward()
    assert all(p.grad is None for p in encoder_parameters(model))
    assert all(p.grad is not None for p in head_parameters(model))
    for a, b in zip(_bn_stats(enc_mod), enc_before):
        assert torch.equal(a, b)
    if head_mod:  # the head's BN keeps training
        assert any(not torch.equal(a, b) for a, b in zip(_bn_stats(head_mod), head_before))
    freeze_encoder(model)  # idempotent: no second hook
    unfreeze_encoder(model)
    assert all(p.requires_grad for p in model.parameters())
    model(x)
    assert any(not torch.equal(a, b) for a, b in zip(_bn_stats(enc_mod), enc_before))


def test_freeze_without_bn_eval_keeps_bn_training():
    model = ClassificationNet(10, 2)
    freeze_encoder(model, bn_eval=False)
    before = _bn_stats([model.encoder])
    model(torch.randn(2, 1, 8, 8, 8))
    assert any(not torch.equal(a, b) for a, b in zip(_bn_stats([model.encoder]), before))


def test_freeze_rejects_models_without_encoder():
    with pytest.raises(TypeError, match="no MedicalNet encoder"):
        freeze_encoder(torch.nn.Linear(2, 2))


def test_param_groups_lrs_and_optimizer_step():
    model = resnet3d(10, 3)
    groups = param_groups(model)
    assert [g["name"] for g in groups] == ["encoder", "head"]
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(0.1)  # MedicalNet
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in encoder_parameters(model)]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in head_parameters(model)]
    g2 = param_groups(model, lr=0.01, head_lr=0.05, weight_decay=1e-4)
    assert [g["lr"] for g in g2] == [0.01, 0.05] and all(g["weight_decay"] == 1e-4 for g in g2)
    assert [g["lr"] for g in param_groups(model, lr=0.02, head_lr_mult=10)] == \
        [0.02, pytest.approx(0.2)]
    opt = torch.optim.SGD(groups, momentum=0.9)
    before = model.conv_seg[6].weight.detach().clone()
    model(torch.randn(2, 1, 8, 8, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.conv_seg[6].weight)
    freeze_encoder(model)
    frozen = param_groups(model)
    assert [g["name"] for g in frozen] == ["head"]
