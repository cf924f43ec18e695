"""Fused Conv3d + BatchNorm3d + ReLU modules, and in-place fusion of MedicalNet-style ResNets.

Fusion never renames anything: a fused block keeps its ``Conv3d`` and ``BatchNorm3d`` children
and calls :func:`med3d_ext.ops.conv_bn_relu3d` on their parameters and buffers, so fused and
plain models have the same ``state_dict`` and the same training semantics (running statistics,
``num_batches_tracked``, ``momentum=None``). Switching is done by giving the module a fused
subclass of its own class (created on the fly), which :func:`unfuse_modules` reverts.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional

import torch
from torch import nn

from ..ops._common import check_bool
from ..ops._running_stats import close_batch, count_batch, open_batch
from ..ops.conv_bn_relu import (_conv_bn_relu3d, _conv_bn_relu_maxpool3d, _triple,
                                conv_bias_relu3d, conv_bn_relu3d)
from .recompute import (Recipe, bn_act_recipe, can_recompute, recompute_input, recompute_stem,
                        usable)

__all__ = ["ConvBNReLU3d", "conv_bn_act", "fuse_modules", "unfuse_modules", "fold_bn",
           "set_memory_saving",
           "convert_sync_batchnorm"]


# Module hooks run only in the module's own forward, which the fused path never calls (pruning's
# weight mask is such a pre-hook: the fused forward read the stale unmasked weight).
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(m: nn.Module) -> bool:
    # asked several times per fused layer and forward: a module without hooks (nearly every
    # one) answers from four dict lookups, not a generator over them
    d = m.__dict__
    if not (d.get("_forward_hooks") or d.get("_forward_pre_hooks") or d.get("_backward_hooks")
            or d.get("_backward_pre_hooks")):
        return False
    # freeze_encoder's own pre-hook does not count: the fused paths read its mark (FROZEN_ATTR)
    # instead, and counting it turned fusion off in every frozen encoder layer. Its id is read
    # from the int freeze_encoder keeps beside the handle: Dynamo cannot represent the
    # RemovableHandle itself (a graph break at every fused layer of a compiled frozen encoder,
    # i.e. every step of --freeze-epochs with --compile)
    freeze = d.get("_m3d_freeze_hook_id")
    if freeze is None and "_m3d_freeze_hook" in d and not torch.compiler.is_compiling():
        freeze = d["_m3d_freeze_hook"].id  # frozen before the id was kept (an older pickle)
    return any(k != freeze for h in _HOOKS for k in (getattr(m, h, None) or ()))


def _plain_relu(m) -> bool:
    """An nn.ReLU whose class keeps ReLU's forward (a clamping subclass does not), without
    hooks: only then may a fused op apply it instead of the module."""
    return (isinstance(m, nn.ReLU) and _plain_class(m).forward is nn.ReLU.forward
            and not _hooked(m))


def _fusible_conv(conv, compiling=None) -> bool:
    """A Conv3d computing what nn.Conv3d does: its class does not override the convolution (a
    weight-standardised conv does) and it has no hooks; a parametrized weight is fine (the
    fused path reads ``conv.weight``, which applies it). ``compiling``:
    torch.compiler.is_compiling() when the caller has asked already."""
    return (_conv_class_ok(type(conv), compiling) and not _hooked(conv) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _plain_bn(bn, compiling=None) -> bool:
    """A BatchNorm3d whose class keeps BatchNorm's forward, without hooks."""
    return _bn_class_ok(type(bn), compiling) and not _hooked(bn)


def _conv_class_check(cls: type) -> bool:
    base = _plain_base(cls)
    return (issubclass(cls, nn.Conv3d) and base.forward is nn.Conv3d.forward
            and base._conv_forward is nn.Conv3d._conv_forward)


def _bn_class_check(cls: type) -> bool:
    return issubclass(cls, nn.BatchNorm3d) and _plain_base(cls).forward is nn.BatchNorm3d.forward


# Eager forwards ask once per class (these run in every fused layer's forward). Under
# torch.compile the plain check is traced instead: it runs once per compiled graph anyway, and
# Dynamo warns about every lru_cache-wrapped call it traces (the CLI's --compile printed one
# "silent incorrectness is a potential risk" warning per function).
_conv_class_cached = functools.lru_cache(maxsize=None)(_conv_class_check)
_bn_class_cached = functools.lru_cache(maxsize=None)(_bn_class_check)


def _conv_class_ok(cls: type, compiling=None) -> bool:
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    return (_conv_class_check if compiling else _conv_class_cached)(cls)


def _bn_class_ok(cls: type, compiling=None) -> bool:
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    return (_bn_class_check if compiling else _bn_class_cached)(cls)


def _fusible(conv, bn) -> bool:
    """A bias-free Conv3d followed by a BatchNorm3d, or (after fold_bn) by an Identity."""
    compiling = torch.compiler.is_compiling()
    if not _fusible_conv(conv, compiling):
        return False
    if isinstance(bn, nn.BatchNorm3d):
        return conv.bias is None and _plain_bn(bn, compiling)
    return isinstance(bn, nn.Identity)


# A BatchNorm that med3d_ext.models.freeze_encoder froze carries this attribute (True): it
# normalises with its running statistics and never updates them, even in a model in training
# mode. Plain BatchNorm learns that from a forward pre-hook; the fused paths never call the
# BatchNorm's forward, so they read the mark.
FROZEN_ATTR = "_m3d_frozen"


def _bn_args(bn: nn.BatchNorm3d):
    """BatchNorm's own bookkeeping (torch.nn.modules.batchnorm._BatchNorm.forward): returns
    (running_mean, running_var, use_batch_stats, momentum factor)."""
    training = bn.training and not bn.__dict__.get(FROZEN_ATTR, False)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if bn.momentum is None:  # the cumulative average needs the count now
            bn.num_batches_tracked.add_(1)
            if torch.compiler.is_compiling():
                # a 0-d tensor (fp64, as float() gives it): float() of the count is an .item(),
                # which Dynamo cannot trace (a graph break in every layer, and the rest of the
                # fused forward, shared by all layers, recompiled per layer up to the limit)
                factor = 1.0 / bn.num_batches_tracked.double()
            else:
                factor = 1.0 / float(bn.num_batches_tracked)
        else:  # queued during a fused model's forward (ops/_running_stats.py)
            count_batch(bn.num_batches_tracked)
            factor = bn.momentum
    use_batch = training or (bn.running_mean is None and bn.running_var is None)
    keep = not training or bn.track_running_stats
    return (bn.running_mean if keep else None, bn.running_var if keep else None, use_batch,
            factor)


def conv_bn_act(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
                residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """``relu(bn(conv(x)) [+ residual])`` on the modules' own parameters, fused when possible
    (Conv3d without bias, groups 1, zero padding, followed by BatchNorm3d or, once folded, by
    Identity); otherwise the plain modules run."""
    if _fusible(conv, bn):
        return _fused_conv_bn_act(conv, bn, x, residual, relu)
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _fused_conv_bn_act(conv, bn, x, residual=None, relu=True):
    """conv_bn_act's fused call, for callers that have checked _fusible(conv, bn) already."""
    if isinstance(bn, nn.Identity):
        return conv_bias_relu3d(x, conv.weight, conv.bias, stride=conv.stride,
                                padding=conv.padding, dilation=conv.dilation,
                                residual=residual, relu=relu)
    rm, rv, use_batch, factor = _bn_args(bn)
    return conv_bn_relu3d(x, conv.weight, bn.weight, bn.bias, rm, rv, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, training=use_batch,
                          momentum=factor, eps=bn.eps, residual=residual, relu=relu)


class ConvBNReLU3d(nn.Module):
    """Conv3d(bias=False) + BatchNorm3d + optional ReLU, fused; ``forward(x, residual=None)``
    adds ``residual`` before the ReLU. State dict keys: ``conv.weight``, ``bn.*`` exactly as
    ``nn.Conv3d`` / ``nn.BatchNorm3d`` children named ``conv`` and ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, relu: bool = True, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              bias=False, **kw)
        self.bn = nn.BatchNorm3d(out_channels, eps, momentum, affine, track_running_stats, **kw)
        self.relu = relu

    @classmethod
    def from_modules(cls, conv: nn.Conv3d, bn: nn.BatchNorm3d, relu: bool = True):
        """Wrap existing modules (shared, not copied)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.conv, m.bn, m.relu = conv, bn, relu
        return m

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return conv_bn_act(self.conv, self.bn, x, residual, self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


# --------------------------------------------------------------------------- fused forwards


# The memory-saving mode: keep a recipe instead of each inner activation of a fused block
# (conv1's output, and conv2's in a bottleneck), and of the fused stem's space-to-depth input,
# and rebuild them in backward (med3d_ext/nn/recompute.py): one element-wise pass or one
# rearrangement each for, in a bf16 ResNet-50 step at the perf-baselines shape, 0.33 GiB less
# kept plus 72 MiB with the GPU's stem (CPU memory timeline, benchmarks.memory_peak). Off until
# its time is measured on a GPU. Process-wide; set_memory_saving(model) turns it on for one
# model instead (what the training CLI's --memory-saving does).
RECOMPUTE_BLOCK_INPUTS = False
_MEMORY_SAVING_ATTR = "_m3d_memory_saving"


def set_memory_saving(model: nn.Module, on: bool = True) -> nn.Module:
    """The memory-saving mode (see RECOMPUTE_BLOCK_INPUTS) for this model's fused blocks and
    stem only, whatever the process-wide flag says; a plain attribute of each module, so the
    state dict does not change and copies of the model keep it. Returns the model."""
    if not isinstance(model, nn.Module):  # (None gave AttributeError: no 'modules')
        raise TypeError(f"med3d_ext.nn.set_memory_saving: argument 'model' must be an "
                        f"nn.Module, got {type(model).__name__}")
    check_bool("set_memory_saving", "on", on)  # on="no" switched it on
    fused = False
    for m in model.modules():
        setattr(m, _MEMORY_SAVING_ATTR, bool(on))
        fused = fused or hasattr(type(m), "_m3d_fused")
    if on and not fused:  # it did nothing, unsaid
        warnings.warn("med3d_ext.nn.set_memory_saving: the model has no fused modules yet; the "
                      "mode takes effect once it is fused (med3d_ext.nn.fuse_modules, or "
                      "resnet3d(..., fused=True))", stacklevel=2)
    return model


def _memory_saving(module) -> bool:
    """The module's own setting (set_memory_saving, on or off) wins over the process-wide flag."""
    return module.__dict__.get(_MEMORY_SAVING_ATTR, RECOMPUTE_BLOCK_INPUTS)


def _block_forward(self, x):
    """MedicalNet BasicBlock / Bottleneck: conv-bn-relu (x2 or x3), residual before the last
    ReLU; ``downsample`` is None, a callable (type A) or Sequential(Conv3d, BN) (type B, itself
    fused as a Sequential)."""
    if not _plain_relu(_activation(self)):  # hooked since fuse_modules: it runs as it is
        return _plain_class(self).forward(self, x)
    residual = x if self.downsample is None else self.downsample(x)
    if _memory_saving(self) and can_recompute(x):
        return _block_forward_recompute(self, x, residual)
    out = conv_bn_act(self.conv1, self.bn1, x)
    if hasattr(self, "conv3"):
        out = conv_bn_act(self.conv2, self.bn2, out)
        return conv_bn_act(self.conv3, self.bn3, out, residual)
    return conv_bn_act(self.conv2, self.bn2, out, residual)


def _block_forward_recompute(self, x, residual):
    out, recipe = _conv_bn_act_recipe(self.conv1, self.bn1, x)
    if hasattr(self, "conv3"):
        with recompute_input(out, recipe):
            out, recipe = _conv_bn_act_recipe(self.conv2, self.bn2, out)
        with recompute_input(out, recipe):
            return conv_bn_act(self.conv3, self.bn3, out, residual)
    with recompute_input(out, recipe):
        return conv_bn_act(self.conv2, self.bn2, out, residual)


def _conv_bn_act_recipe(conv, bn, x):
    """conv_bn_act with a ReLU and no residual, plus how to rebuild its output (or None)."""
    if not (_fusible(conv, bn) and isinstance(bn, nn.BatchNorm3d)):
        return conv_bn_act(conv, bn, x), None
    rm, rv, use_batch, factor = _bn_args(bn)
    out, args = _conv_bn_relu3d(x, conv.weight, bn.weight, bn.bias, rm, rv, conv.stride,
                                conv.padding, conv.dilation, use_batch, factor, bn.eps, None, True)
    return out, bn_act_recipe(args)


def _sequential_forward(self, x):
    mods = list(self)
    i = 0
    while i < len(mods):
        if i + 1 < len(mods) and _fusible(mods[i], mods[i + 1]):
            relu = i + 2 < len(mods) and _plain_relu(mods[i + 2])
            x = _fused_conv_bn_act(mods[i], mods[i + 1], x, relu=relu)
            i += 3 if relu else 2
        else:
            x = mods[i](x)
            i += 1
    return x


def _stem_fused_now(conv) -> bool:
    """Whether a fused stem runs fused in this call: its conv, BatchNorm, ReLU (when fused)
    and max-pool (when fused) as fuse_modules found them, none hooked since (a hook asks for
    its module to run as it is: then conv1, bn1 and the pool each run their own computation,
    and every hook sees what it would in the plain model). conv1, bn1 and the pool each ask."""
    d = conv.__dict__
    if not _fusible(conv, d["_m3d_bn"]):
        return False
    act, pool = d.get("_m3d_act"), d.get("_m3d_pool")
    return not (d.get("_m3d_relu") and act is not None and _hooked(act)) and not (
        pool is not None and _hooked(pool))


def _stem_conv_forward(self, x):
    # conv1 computes relu(bn1(conv1(x))) when the stem's activation is a ReLU (else bn1(conv1(x)));
    # the model then calls bn1 (a pass-through while fused) and its activation (a ReLU is
    # idempotent on a non-negative input; any other activation gets its own input). Not fused
    # in this call: the conv alone (bn(conv(x)) here called this forward again, forever).
    if not _stem_fused_now(self):
        return _plain_class(self).forward(self, x)
    return conv_bn_act(self, self._m3d_bn, x, relu=self.__dict__.get("_m3d_relu", True))


def _stem_part_forward(self, x):
    # bn1 and the max-pool of a fused stem: conv1 applied them (a pass-through), unless the
    # stem runs unfused in this call, when each is its own module
    conv = self.__dict__.get("_m3d_stem_conv")
    if conv is None or _stem_fused_now(conv):
        return x
    return _plain_class(self).forward(self, x)


# Let fuse_modules run the stem's max-pool inside conv_bn_relu_maxpool3d. On by default since
# it measured both faster and smaller on an H200 (torch 2.11, bf16 channels_last_3d,
# 8 x 1 x 64 x 128 x 128, forward + backward, benchmarks/results/2026-11-26_h200-s9): 3.39 ms
# and 0.48 GiB against 3.48 ms and 0.66 GiB for conv_bn_relu3d + F.max_pool3d. (Its first
# version, gathering inside both BatchNorm backward passes, took 4.31 ms against 3.14 in
# 2026-11-26_h200-s3, and was off by default then.) Set False for the unfused max-pool.
FUSE_STEM_POOL = True


def _fusible_pool(pool) -> bool:
    """A max-pool conv_bn_relu_maxpool3d can absorb: MaxPool3d, dilation 1, floor mode, no
    indices, padding at most half the kernel, a window of at most 255 voxels."""
    if _plain_class(pool) is not nn.MaxPool3d or pool.ceil_mode or pool.return_indices:
        return False
    k, p, d = (_triple(v, name) for v, name in ((pool.kernel_size, "kernel_size"),
                                                 (pool.padding, "padding"),
                                                 (pool.dilation, "dilation")))
    return d == [1, 1, 1] and all(2 * pi <= ki for pi, ki in zip(p, k)) and k[0] * k[1] * k[2] <= 255


def _stem_pool_forward(self, x):
    # conv1 computes maxpool(relu(bn1(conv1(x)))) in one op; the model then calls bn1 and the
    # max-pool (pass-throughs while fused) and relu (idempotent on a non-negative input).
    if not _stem_fused_now(self):
        return _plain_class(self).forward(self, x)
    bn, pool = self._m3d_bn, self._m3d_pool  # fuse_modules checked both (BatchNorm3d, _fusible_pool)
    rm, rv, use_batch, factor = _bn_args(bn)
    keep = _keep_stem_input if _memory_saving(self) and can_recompute(x) else None
    return _conv_bn_relu_maxpool3d(x, self.weight, bn.weight, bn.bias, rm, rv, self.stride,
                                   self.padding, self.dilation, use_batch, factor, bn.eps,
                                   pool.kernel_size, pool.stride or pool.kernel_size,
                                   pool.padding, keep_input=keep)


def _keep_stem_input(x_op, y_shape, rebuild, conv, x, w_op):
    # the memory-saving mode's stem (ops.conv_bn_relu._conv_bn_relu_maxpool3d): the convolution
    # input (the space-to-depth rewrite: 72 MiB at the perf-baselines shape) and output y
    # (128 MiB) are rebuilt from the batch, which the caller holds anyway
    if not usable(x, w_op):  # a batch made under inference_mode: keep the tensors
        return contextlib.nullcontext()
    return recompute_stem(x_op, y_shape, w_op, Recipe(rebuild, (x,), "the stem's input batch"),
                          Recipe(conv, (x, w_op), "the stem's input batch or weight"))


# The fused forward of each kind of module fuse_modules switches (its "tag").
_FORWARDS = {"block": _block_forward, "sequential": _sequential_forward,
             "stem_conv": _stem_conv_forward, "stem_conv_pool": _stem_pool_forward,
             "stem_pool": _stem_part_forward, "stem_bn": _stem_part_forward}
_CLASS_CACHE: dict = {}


def _fused_class(base: type, tag: str) -> type:
    """``base`` with the fused forward of ``tag``: a subclass made on first use, once."""
    key = (base, tag)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Fused{base.__name__}", (base,),
                                 {"forward": _FORWARDS[tag], "_m3d_fused": tag,
                                  "__module__": base.__module__,
                                  "__reduce_ex__": _reduce_fused})
    return _CLASS_CACHE[key]


def _reduce_fused(self, protocol):
    # A class made at run time cannot be found by name, so pickle (torch.save(model),
    # multiprocessing) and copy record the plain class and the tag, and _new_fused makes the
    # fused class again where the module is loaded.
    cls = type(self)
    return _new_fused, (cls.__mro__[1], cls._m3d_fused), self.__dict__


def _new_fused(base: type, tag: str) -> nn.Module:
    return object.__new__(_fused_class(base, tag))


def _plain_class(module: nn.Module) -> type:
    """The module's own class: the base of the run-time classes (fused forward, stats root)
    when it has them."""
    return _plain_base(type(module))


def _plain_base(cls: type) -> type:
    for c in cls.__mro__:
        if "_m3d_fused" not in c.__dict__ and "_m3d_root" not in c.__dict__:
            return c
    return cls


def _swap(module: nn.Module, tag: str) -> None:
    """Give ``module`` the fused class of ``tag`` (re-tagging one fused with another tag, e.g.
    a stem fused before FUSE_STEM_POOL changed)."""
    if getattr(type(module), "_m3d_fused", None) != tag:
        module.__class__ = _fused_class(_plain_class(module), tag)


def _unswap(module: nn.Module, tag: str) -> None:
    """Give ``module`` its plain class back if it carries ``tag``."""
    if getattr(type(module), "_m3d_fused", None) == tag:
        module.__class__ = _plain_class(module)


def _activation(m: nn.Module):
    """The activation module of a block or stem (MedicalNet: ``relu``; MONAI: ``act``), or None."""
    for name in ("relu", "act", "activation"):
        a = getattr(m, name, None)
        if isinstance(a, nn.Module):
            return a
    return None


def _monai_forwards(*names) -> list:
    """The forwards of these classes of MONAI's resnet module, when the program has imported
    it (it is never imported here)."""
    import sys

    mon = sys.modules.get("monai.networks.nets.resnet")
    return [getattr(mon, n).forward for n in names if hasattr(mon, n)] if mon else []


def _trusted(base: type, trusted) -> bool:
    """A class the caller vouched for (fuse_modules' ``trusted``), its forward not overridden."""
    return any(issubclass(base, t) and base.forward is t.forward for t in trusted)


def _known_block(m: nn.Module, trusted=()) -> bool:
    """Whether ``m``'s forward is known to be the ResNet block the fused forward computes
    (relu(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut), and the Bottleneck's with conv3):
    med3d_ext's BasicBlock / Bottleneck, MONAI's ResNetBlock / ResNetBottleneck, or a class the
    caller trusts. Attribute names alone are not enough: a squeeze-and-excitation or
    pre-activation block has the same names and another forward, which fusing replaced."""
    from ..models.resnet import BasicBlock, Bottleneck

    base = _plain_class(m)
    return _trusted(base, trusted) or base.forward in (
        [BasicBlock.forward, Bottleneck.forward] + _monai_forwards("ResNetBlock",
                                                                    "ResNetBottleneck"))


def _known_stem(m: nn.Module, trusted=()) -> bool:
    """Whether ``m``'s forward is known to run act(bn1(conv1(x))) first (med3d_ext's ResNets,
    MONAI's ResNet and ResNetFeatures, or a trusted class)."""
    from ..models.resnet import ResNet3dEncoder

    base = _plain_class(m)
    if _trusted(base, trusted):
        return True
    if isinstance(m, ResNet3dEncoder):
        return base.stem is ResNet3dEncoder.stem
    return base.forward in _monai_forwards("ResNet", "ResNetFeatures")


def _is_block(m: nn.Module, trusted=()) -> bool:
    has_pairs = all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "downsample"))
    if not has_pairs or not _known_block(m, trusted):
        return False
    # the fused block forward applies ReLUs: a block whose activation is another (LeakyReLU,
    # ELU, ...) or cannot be seen keeps its own forward. (A pair that is not fusible, e.g. a
    # hooked conv, runs its own modules inside the fused forward: conv_bn_act.)
    return _plain_relu(_activation(m))


def _is_stem(m: nn.Module, trusted=()) -> bool:
    return (all(hasattr(m, a) for a in ("conv1", "bn1", "maxpool", "layer1"))
            and not _is_block(m, trusted) and _known_stem(m, trusted))


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and _plain_class(m).forward is nn.Sequential.forward


def _pool_follows_stem(m: nn.Module) -> bool:
    """Whether ``m``'s forward is known to run maxpool(act(bn1(conv1(x)))) with nothing else
    reading the activation before the pool: only then may conv1 return the pooled tensor.
    Having a ``maxpool`` attribute is not enough: MONAI's ResNet keeps one that
    ``no_max_pool=True`` never calls, and its ResNetFeatures returns the pre-pool activation."""
    from ..models.resnet import ResNet3dEncoder

    cls = type(m)
    if isinstance(m, ResNet3dEncoder):
        return cls.stem is ResNet3dEncoder.stem and cls.features is ResNet3dEncoder.features
    if not cls.__module__.startswith("monai."):  # (MONAI is imported only for its own models)
        return False
    try:
        from monai.networks.nets.resnet import ResNet as MonaiResNet
    except ImportError:
        return False
    return cls.forward is MonaiResNet.forward and not getattr(m, "no_max_pool", False)


def _stats_root_forward(self, *args, **kwargs):
    # the forward of the root of a fused model: its layers' BatchNorm bookkeeping is queued and
    # applied at the end (ops/_running_stats.py); finally, so that also a forward interrupted
    # by any exception (KeyboardInterrupt included) leaves nothing queued
    open_batch()
    try:
        return type(self)._m3d_inner_forward(self, *args, **kwargs)
    finally:
        close_batch()


def _root_class(base: type) -> type:
    """``base`` (a plain or fused class) with its forward wrapped by _stats_root_forward; made
    once per base. It keeps ``base``'s name, so the model prints as before."""
    key = (base, "stats_root")
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(base.__name__, (base,),
                                 {"forward": _stats_root_forward, "_m3d_root": True,
                                  "_m3d_inner_forward": base.forward,
                                  "__module__": base.__module__,
                                  "__reduce_ex__": _reduce_root})
    return _CLASS_CACHE[key]


def _reduce_root(self, protocol):
    inner = type(self).__mro__[1]
    tag = inner.__dict__.get("_m3d_fused")
    return _new_root, (_plain_class(self), tag), self.__dict__


def _new_root(base: type, tag) -> nn.Module:
    return object.__new__(_root_class(_fused_class(base, tag) if tag else base))


def _install_stats_batch(model: nn.Module) -> None:
    """Make ``model`` (the root ``fuse_modules`` was given) the scope of its layers' BatchNorm
    bookkeeping: num_batches_tracked and the running statistics are applied in a few foreach
    launches at the end of each forward, not in two launches per layer (ops/_running_stats.py).
    A class swap, not forward hooks: hooks would not run after a KeyboardInterrupt, and
    torch.cuda.make_graphed_callables refuses modules that have them."""
    if type(model).__dict__.get("_m3d_root"):
        return
    if any(getattr(type(m), "_m3d_fused", None) for m in model.modules()):
        model.__class__ = _root_class(type(model))


def fuse_modules(model: nn.Module, trusted=()) -> nn.Module:
    """Switch a MedicalNet-style ResNet (or any model using the same patterns) to the fused
    forward path, in place; returns ``model``.

    Patterns, each only where the module's forward is known to compute it (a module is never
    switched for its attribute names alone: a squeeze-and-excitation or pre-activation block
    has the same names and another forward):
    - blocks: med3d_ext's ``BasicBlock`` / ``Bottleneck`` and MONAI's ``ResNetBlock`` /
      ``ResNetBottleneck`` (conv1/bn1/conv2/bn2[/conv3/bn3] and ``downsample``), whose
      activation (``relu`` or ``act``) is an ``nn.ReLU``;
    - the stem (conv1, bn1, maxpool and layer1) of med3d_ext's ResNets and of MONAI's
      ``ResNet`` / ``ResNetFeatures``, whose forward runs conv1 -> bn1 -> its activation: the
      ReLU is fused only when it is one; the max-pool too, with FUSE_STEM_POOL, in the stems
      whose forward pools right after (med3d_ext's, and MONAI's ResNet without
      ``no_max_pool``);
    - ``nn.Sequential`` runs (its own forward) of Conv3d -> BatchNorm3d [-> ReLU] (type-B
      shortcuts, the segmentation head).
    A conv or BatchNorm whose class overrides its computation (a weight-standardised conv), or
    that has hooks (pruning's mask is one), is left to run as it is.
    ``trusted``: your own block or model classes whose forward follows one of these patterns
    (same attribute names, same computation), to be fused like med3d_ext's; remembered by the
    model for later calls (fold_bn, convert_sync_batchnorm).

    Module names, parameters and the state dict are unchanged; outputs and gradients equal the
    plain model's within tolerance. A fused module holds its BatchNorm (and the stem its
    max-pool): after replacing one of those modules, call ``fuse_modules`` again (or
    ``unfuse_modules``).
    """
    _check_module("fuse_modules", model)
    trusted = _trusted_of(model, _check_trusted("fuse_modules", trusted))
    for m in list(model.modules()):
        if _is_block(m, trusted):
            _swap(m, "block")
        elif _plain_sequential(m) and any(
                _fusible(a, b) for a, b in zip(list(m)[:-1], list(m)[1:])):
            _swap(m, "sequential")
        if _is_stem(m, trusted) and _fusible(m.conv1, m.bn1):
            object.__setattr__(m.conv1, "_m3d_bn", m.bn1)
            # the ReLU joins the op only when it is the stem's activation (MONAI's ResNet takes
            # act=..., e.g. a LeakyReLU, which a fused ReLU would silently replace)
            relu = _plain_relu(_activation(m))
            object.__setattr__(m.conv1, "_m3d_relu", relu)
            object.__setattr__(m.conv1, "_m3d_act", _activation(m))
            # (object.__setattr__: a reference, not a submodule; the state dict is unchanged)
            object.__setattr__(m.bn1, "_m3d_stem_conv", m.conv1)
            if (FUSE_STEM_POOL and relu and isinstance(m.bn1, nn.BatchNorm3d)
                    and _fusible_pool(m.maxpool) and _pool_follows_stem(m)):
                # the stem's max-pool joins the op: its full-resolution input is never written
                object.__setattr__(m.conv1, "_m3d_pool", m.maxpool)
                object.__setattr__(m.maxpool, "_m3d_stem_conv", m.conv1)
                _swap(m.conv1, "stem_conv_pool")
                _swap(m.maxpool, "stem_pool")
            else:
                # (re-fusing: a pool fused before, e.g. since replaced, is let go)
                pool = m.conv1.__dict__.pop("_m3d_pool", None)
                for p in (pool, m.maxpool):
                    if isinstance(p, nn.Module):
                        _unswap(p, "stem_pool")
                        p.__dict__.pop("_m3d_stem_conv", None)
                _swap(m.conv1, "stem_conv")
            if isinstance(m.bn1, nn.BatchNorm3d):
                _swap(m.bn1, "stem_bn")
    _install_stats_batch(model)
    return model


def _check_trusted(fn: str, trusted) -> tuple:
    if isinstance(trusted, type):
        trusted = (trusted,)
    try:
        trusted = tuple(trusted)
    except TypeError:
        trusted = (trusted,)
    bad = [t for t in trusted if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise TypeError(f"med3d_ext.nn.{fn}: 'trusted' must be nn.Module classes, got {bad[0]!r}")
    return trusted


def _trusted_of(model: nn.Module, trusted: tuple) -> tuple:
    """``trusted`` plus the classes an earlier call trusted for this model (kept on it)."""
    allt = tuple(dict.fromkeys(model.__dict__.get("_m3d_trusted", ()) + trusted))
    if allt:
        object.__setattr__(model, "_m3d_trusted", allt)
    return allt


def unfuse_modules(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_modules` in place (plain PyTorch forward again); returns ``model``."""
    _check_module("unfuse_modules", model)
    for m in model.modules():
        m.__class__ = _plain_class(m)
        m.__dict__.pop("_m3d_bn", None)
        m.__dict__.pop("_m3d_relu", None)
        m.__dict__.pop("_m3d_pool", None)
        m.__dict__.pop("_m3d_act", None)
        m.__dict__.pop("_m3d_stem_conv", None)
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for a model that may be fused; returns
    the converted model (converted in place unless ``model`` is itself a BatchNorm).

    A fused stem's conv holds its BatchNorm and runs it inside the op, leaving the module a
    pass-through: converting such a model directly swapped the pass-through for a real
    SyncBatchNorm and normalised the stem twice. This unfuses, converts and fuses again; the
    conv + SyncBatchNorm pairs then run the plain modules (statistics synchronised across
    processes), the rest stays fused."""
    _check_module("convert_sync_batchnorm", model)
    fused = any(getattr(type(m), "_m3d_fused", None) for m in model.modules())
    if fused:
        unfuse_modules(model)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return fuse_modules(model) if fused else model


def _check_module(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"med3d_ext.nn.{fn}: argument 'model' must be an nn.Module, got "
                        f"{type(model).__name__}")


@torch.no_grad()
def _fold_pair(conv: nn.Conv3d, bn: nn.BatchNorm3d, names=("", "")) -> None:
    w = conv.weight
    if bn.num_features != w.shape[0]:  # else a raw broadcasting error from the products below
        raise ValueError(f"med3d_ext.nn.fold_bn: Conv3d '{names[0]}' has {w.shape[0]} output "
                         f"channels but BatchNorm3d '{names[1]}' after it has {bn.num_features} "
                         "features")
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    conv.weight.copy_((w.double() * scale.view(-1, 1, 1, 1, 1)).to(w.dtype))
    conv.bias = nn.Parameter(shift.to(w.dtype))


def fold_bn(model: nn.Module, trusted=()) -> nn.Module:
    """Prepare a model for inference, in place: every fusible Conv3d + BatchNorm3d pair (blocks,
    stem, Sequential runs, ConvBNReLU3d) gets the BatchNorm folded into the conv's weight and a
    new conv bias, the BatchNorm3d is replaced by ``nn.Identity``, and the forward path becomes
    conv + fused bias/residual/ReLU epilogue (:func:`med3d_ext.ops.conv_bias_relu3d`).

    The model is put in eval mode. The state dict changes (``*.bias`` added to folded convs,
    ``bn*`` keys removed), so save the unfolded model, not this one. A folded model also
    computes correctly with :func:`unfuse_modules` applied (conv with bias, Identity, ReLU).
    """
    _check_module("fold_bn", model)
    trusted = _trusted_of(model, _check_trusted("fold_bn", trusted))
    model.eval()
    unfuse_modules(model)
    paths = {id(m): n for n, m in model.named_modules()}
    for parent in list(model.modules()):
        pairs = []
        if isinstance(parent, ConvBNReLU3d):
            pairs.append(("conv", "bn"))
        if _is_block(parent, trusted) or _is_stem(parent, trusted):
            pairs += [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(parent, f"conv{i}")
                      and hasattr(parent, f"bn{i}")]
        if _plain_sequential(parent):
            names = [n for n, _ in parent.named_children()]
            pairs += list(zip(names[:-1], names[1:]))
        for c, b in pairs:
            conv, bn = getattr(parent, c), getattr(parent, b)
            if (_fusible_conv(conv) and _plain_bn(bn) and bn.track_running_stats
                    and bn.running_mean is not None):
                prefix = f"{paths[id(parent)]}." if paths.get(id(parent)) else ""
                _fold_pair(conv, bn, (prefix + c, prefix + b))
                setattr(parent, b, nn.Identity())
    return fuse_modules(model)
