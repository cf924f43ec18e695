"""Transfer models and fine-tuning helpers.

- Segmentation transfer is MedicalNet's own network, ``resnet3d(depth, num_classes)``: the
  encoder loads from a pretrained file and ``conv_seg`` starts fresh.
- Classification transfer is ``ClassificationNet``: the encoder, global average pooling,
  dropout and a linear layer.
- ``freeze_encoder`` / ``unfreeze_encoder`` and ``param_groups`` (separate encoder and head
  learning rates; MedicalNet fine-tunes with 1e-3 for the encoder and 100x for the new head).
"""

from __future__ import annotations


from collections.abc import Mapping

import torch
from torch import nn

from .._args import int_arg, real_arg
from .med3d import Med3DNet
from .resnet import ENCODER_ROOTS, ResNet3d, ResNet3dEncoder, apply_fusion, check_flag
from .weights import infer_medicalnet_depth, load_medicalnet_weights, unwrap_model

__all__ = [
    "ClassificationHead",
    "ClassificationNet",
    "build_model",
    "build_transfer_model",
    "encoder_parameters",
    "freeze_encoder",
    "head_parameters",
    "param_groups",
    "unfreeze_encoder",
]

TASKS = ("segmentation", "classification")


class ClassificationHead(nn.Module):
    """(N, C, d, h, w) -> global average pool -> dropout -> linear -> (N, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        num_classes = int_arg("ClassificationHead: num_classes must be a positive int",
                              num_classes, 1)
        dropout = real_arg("ClassificationHead: dropout must be a number in [0, 1)", dropout, 0.0)
        if dropout >= 1.0:
            raise ValueError(f"ClassificationHead: dropout must be a number in [0, 1), got "
                             f"{dropout!r}")
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


class ClassificationNet(nn.Module):
    """MedicalNet encoder + ``ClassificationHead``. Keys: ``encoder.*`` (MedicalNet's encoder
    keys) and ``head.fc.*``. forward(x: (N, in_channels, D, H, W)) -> logits (N, num_classes)."""

    def __init__(self, depth: int, num_classes: int, shortcut_type: str | None = None,
                 in_channels: int = 1, dropout: float = 0.5, fused: bool = False):
        super().__init__()
        self.encoder = ResNet3dEncoder(depth, shortcut_type, in_channels)
        self.head = ClassificationHead(self.encoder.out_channels, num_classes, dropout)
        self.num_classes = self.head.fc.out_features
        if check_flag("ClassificationNet", "fused", fused):
            apply_fusion(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    @property
    def arch(self) -> dict:
        return {"task": "classification", "depth": self.encoder.depth,
                "shortcut_type": self.encoder.shortcut_type,
                "in_channels": self.encoder.in_channels, "num_classes": self.num_classes,
                "dropout": self.head.dropout.p}


def build_model(arch: Mapping, fused: bool = False) -> nn.Module:
    """Rebuild a model from its ``arch`` dict (every model here has an ``arch`` property; our
    checkpoints store it)."""
    if not isinstance(arch, Mapping):
        raise TypeError(f"build_model: arch must be a dict, got {type(arch).__name__}")
    task = arch.get("task")
    need = {"pretrain": ("depth", "heads"), "classification": ("depth", "num_classes"),
            "segmentation": ("depth",), "encoder": ("depth",)}.get(task, ())
    missing = [k for k in need if k not in arch]
    if missing:  # else a bare KeyError: 'depth' (e.g. from a hand-edited checkpoint)
        raise ValueError(f"build_model: arch for task {task!r} is missing {missing}; got keys "
                         f"{sorted(arch)}")
    common = {"shortcut_type": arch.get("shortcut_type"), "in_channels": arch.get("in_channels", 1)}
    if task == "pretrain":
        return Med3DNet(arch["depth"], dict(arch["heads"]), fused=fused, **common)
    if task == "classification":
        return ClassificationNet(arch["depth"], arch["num_classes"],
                                 dropout=arch.get("dropout", 0.5), fused=fused, **common)
    if task == "segmentation":
        model = ResNet3d(arch["depth"], arch.get("num_classes", 2), **common)
    elif task == "encoder":
        model = ResNet3dEncoder(arch["depth"], **common)
    else:
        raise ValueError(f"arch['task'] must be one of pretrain, segmentation, classification, "
                         f"encoder; got {task!r}")
    return apply_fusion(model) if check_flag("build_model", "fused", fused) else model


def build_transfer_model(task: str, depth: int | None, num_classes: int, *,
                         weights=None, shortcut_type: str | None = None, in_channels: int = 1,
                         dropout: float = 0.5, fused: bool = False, return_report: bool = False):
    """A transfer model, optionally initialised from pretrained encoder weights.

    Args:
        task: "segmentation" (``resnet3d`` with a fresh ``conv_seg`` of ``num_classes``) or
            "classification" (``ClassificationNet``).
        depth: ResNet depth; None reads depth and shortcut type from ``weights``.
        weights: a MedicalNet ``.pth``, our checkpoint or ``.safetensors`` (see
            ``load_medicalnet_weights``), or None for random initialisation.
        return_report: also return the ``LoadReport`` (None without weights).
    Returns: the model, or ``(model, report)``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if depth is None:
        if weights is None:
            raise ValueError("depth=None needs weights to read the depth from")
        depth, inferred = infer_medicalnet_depth(weights)
        shortcut_type = shortcut_type or inferred
    if task == "segmentation":
        model = ResNet3d(depth, num_classes, shortcut_type, in_channels)
    else:
        model = ClassificationNet(depth, num_classes, shortcut_type, in_channels, dropout)
    report = load_medicalnet_weights(model, weights) if weights is not None else None
    if check_flag("build_transfer_model", "fused", fused):  # after loading: either order works
        model = apply_fusion(model)
    return (model, report) if return_report else model


def _encoder_modules(model: nn.Module) -> list[nn.Module]:
    model = unwrap_model(model)
    if isinstance(model, ResNet3dEncoder):
        return [getattr(model, n) for n in ENCODER_ROOTS]
    enc = getattr(model, "encoder", None)
    if isinstance(enc, nn.Module):
        return [enc]
    raise TypeError(f"{type(model).__name__} has no MedicalNet encoder (neither a resnet3d nor "
                    "a module with an `encoder`)")


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters (conv1, bn1, layer1..4), in module order."""
    return [p for m in _encoder_modules(model) for p in m.parameters()]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not the encoder's (conv_seg, heads, head)."""
    enc = {id(p) for p in encoder_parameters(model)}
    return [p for p in model.parameters() if id(p) not in enc]


def _keep_eval(module: nn.Module, args):  # forward pre-hook: frozen BN keeps its statistics
    module.training = False


def freeze_encoder(model: nn.Module, bn_eval: bool = True) -> nn.Module:
    """Stop training the encoder: ``requires_grad=False`` on its parameters, and with
    ``bn_eval`` its BatchNorm layers stay in eval mode (running statistics neither used from
    the batch nor updated) even after ``model.train()``. Returns ``model``."""
    for p in encoder_parameters(model):
        p.requires_grad_(False)
    if check_flag("freeze_encoder", "bn_eval", bn_eval):
        for m in _encoder_modules(model):
            for bn in m.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm) \
                        and not hasattr(bn, "_m3d_freeze_hook"):
                    bn.eval()
                    bn._m3d_freeze_hook = bn.register_forward_pre_hook(_keep_eval)
                    # its id, which med3d_ext.nn's fused paths skip when they look for hooks,
                    # as a plain int: torch.compile cannot trace a read of the handle
                    bn._m3d_freeze_hook_id = bn._m3d_freeze_hook.id
                    # the fused forward (med3d_ext.nn) never calls bn's forward, so never runs
                    # the hook: it reads this mark instead (med3d_ext.nn.fused.FROZEN_ATTR)
                    bn._m3d_frozen = True
    return model


def unfreeze_encoder(model: nn.Module) -> nn.Module:
    """Undo ``freeze_encoder``: parameters trainable, BatchNorm following ``model.training``."""
    for p in encoder_parameters(model):
        p.requires_grad_(True)
    for m in _encoder_modules(model):
        for bn in m.modules():
            hook = bn.__dict__.pop("_m3d_freeze_hook", None)
            bn.__dict__.pop("_m3d_freeze_hook_id", None)
            bn.__dict__.pop("_m3d_frozen", None)
            if hook is not None:
                hook.remove()
                bn.train(model.training)
    return model


def _rate(name: str, v) -> float:
    f = real_arg(f"param_groups: {name} must be a finite number > 0", v, 0.0)
    if f <= 0:
        raise ValueError(f"param_groups: {name} must be a finite number > 0, got {v!r}")
    return f


def param_groups(model: nn.Module, lr: float = 1e-3, head_lr: float | None = None,
                 head_lr_mult: float = 100.0, weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups ``[{"name": "encoder", ...}, {"name": "head", ...}]``.

    The encoder gets ``lr``, the head ``head_lr`` (default ``lr * head_lr_mult``; MedicalNet:
    1e-3 and 100x). Frozen parameters (``requires_grad=False``) and empty groups are left out.
    Pass the result to any ``torch.optim`` optimizer.
    """
    # finite and positive, or an error naming the argument (a str failed as "can't multiply
    # sequence", and a negative rate went to the optimizer)
    lr = _rate("lr", lr)
    head_lr = lr * _rate("head_lr_mult", head_lr_mult) if head_lr is None \
        else _rate("head_lr", head_lr)
    if weight_decay is not None:
        weight_decay = real_arg("param_groups: weight_decay must be a finite number >= 0",
                                weight_decay, 0.0)
    groups = []
    for name, params, group_lr in (("encoder", encoder_parameters(model), lr),
                                   ("head", head_parameters(model), head_lr)):
        params = [p for p in params if p.requires_grad]
        if params:
            g = {"name": name, "params": params, "lr": group_lr}
            if weight_decay is not None:
                g["weight_decay"] = weight_decay
            groups.append(g)
    return groups
