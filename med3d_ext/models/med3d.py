"""Med3D's multi-head network: one shared encoder, one segmentation head per dataset.

This is the paper's 3DSeg-8 co-training model. A batch mixes samples of several datasets
(``dataset_id`` per sample); the encoder runs once on the whole batch and each sample's
features go to its dataset's head. Only the encoder is transferred afterwards, so
``Med3DNet.encoder`` has exactly MedicalNet's encoder keys.
"""

from __future__ import annotations

import numbers

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .resnet import MedicalNetSegHead, ResNet3dEncoder, apply_fusion, check_flag

__all__ = ["HeadOutput", "Med3DNet", "rows_by_head", "take_rows"]

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(0, index)`` in ``t``'s own memory format. index_select returns a
    contiguous (NCDHW) tensor whatever its input, so a channels_last_3d model's heads got
    NCDHW features, and each of their first convolutions converted its input back first (one
    more copy per head and step); gathered through the NDHWC view the rows stay
    channels_last_3d."""
    if (t.dim() == 5 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last_3d)):
        return t.permute(0, 2, 3, 4, 1).index_select(0, index).permute(0, 4, 1, 2, 3)
    return t.index_select(0, index)


def rows_by_head(t: torch.Tensor, outs: Sequence["HeadOutput"]) -> list[torch.Tensor]:
    """``[t[o.index] for o in outs]`` (e.g. the labels of each head's samples) with one gather
    and views of it, not a gather per head: each is a launch on a GPU."""
    if not outs:
        return []
    if len(outs) == 1 and len(outs[0].index) == t.shape[0]:
        return [t]  # one head has the whole batch: its index is 0..n-1 (ascending)
    index = outs[0].index if len(outs) == 1 else torch.cat([o.index for o in outs])
    return list(take_rows(t, index).split([len(o.index) for o in outs]))


class HeadOutput(NamedTuple):
    """One head's share of a batch: ``logits`` (len(index), C_head, d, h, w) for the samples
    ``index`` (LongTensor into the batch, ascending) of dataset ``head``."""

    head: int
    index: torch.Tensor
    logits: torch.Tensor


class Med3DNet(nn.Module):
    """Shared MedicalNet encoder + one MedicalNet segmentation head per dataset.

    Args:
        depth: ResNet depth (10, 18, 34, 50, 101, 152, 200).
        heads: ordered ``{dataset name: number of classes}``; dataset id ``i`` is the i-th entry.
            Names are module names: letters, digits, ``_`` and ``-``.
        fused: use the fused conv+BN+ReLU forward (``med3d_ext.nn``).
        shortcut_type, in_channels: as ``resnet3d``.

    State dict: ``encoder.*`` (MedicalNet's encoder keys under ``encoder.``) and
    ``heads.<name>.{0..6}.*`` (MedicalNet's ``conv_seg`` layout per head).
    """

    def __init__(self, depth: int, heads: Mapping[str, int], fused: bool = False,
                 shortcut_type: str | None = None, in_channels: int = 1):
        super().__init__()
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError(f"heads must be a non-empty dict {{name: num_classes}}, got {heads!r}")
        for name, n in heads.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"head name {name!r} must match [A-Za-z0-9_-]+")
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"head {name!r}: number of classes must be a positive int, "
                                 f"got {n!r}")
        self.encoder = ResNet3dEncoder(depth, shortcut_type, in_channels)
        self.heads = nn.ModuleDict(
            {name: MedicalNetSegHead(self.encoder.out_channels, n) for name, n in heads.items()})
        self.head_names: list[str] = list(heads)
        self.head_classes: list[int] = [int(heads[n]) for n in self.head_names]
        if check_flag("Med3DNet", "fused", fused):
            apply_fusion(self)

    @property
    def arch(self) -> dict:
        return {"task": "pretrain", "depth": self.encoder.depth,
                "shortcut_type": self.encoder.shortcut_type,
                "in_channels": self.encoder.in_channels,
                "heads": dict(zip(self.head_names, self.head_classes))}

    def _dataset_ids(self, dataset_id, n: int) -> torch.Tensor:
        # numpy's integers and integer arrays count (what a numpy-based loader yields)
        if isinstance(dataset_id, numbers.Integral) and not isinstance(dataset_id, (bool, np.bool_)):
            dataset_id = torch.full((n,), int(dataset_id), dtype=torch.long)
        elif isinstance(dataset_id, np.ndarray) and dataset_id.dtype.kind in "iu":
            dataset_id = torch.from_numpy(dataset_id.astype(np.int64))
        elif isinstance(dataset_id, Sequence) and not isinstance(dataset_id, str):
            # no dtype=long here: it truncated [0.5, 1] to [0, 1] silently (the dtype check
            # below refuses floats and bools)
            ids = list(dataset_id)
            try:
                dataset_id = torch.as_tensor(ids) if ids else torch.zeros(0, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                dataset_id = ids  # named in the error below
        if not isinstance(dataset_id, torch.Tensor) or dataset_id.dtype.is_floating_point \
                or dataset_id.dtype.is_complex or dataset_id.dtype == torch.bool \
                or dataset_id.shape != (n,):
            got = (f"{dataset_id.dtype} tensor of shape {tuple(dataset_id.shape)}"
                   if isinstance(dataset_id, torch.Tensor) else repr(dataset_id))
            raise ValueError(f"dataset_id must be an int or {n} integers (a tensor, list or "
                             f"numpy array of shape ({n},)), got {got}")
        # one host sync for the whole routing (not one per head)
        ids = dataset_id.detach().to("cpu", torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.head_names)):
            bad = ids[(ids < 0) | (ids >= len(self.head_names))][0].item()
            raise ValueError(f"dataset_id {bad} out of range: this Med3DNet has "
                             f"{len(self.head_names)} heads {self.head_names}")
        return ids

    def forward(self, image: torch.Tensor, dataset_id) -> list[HeadOutput]:
        """image (N, in_channels, D, H, W); dataset_id int64 (N,) (or an int for the whole
        batch) -> ``[HeadOutput(head, index, logits)]`` in head order, heads without a sample
        left out. The encoder runs once on the whole batch."""
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"Med3DNet: argument 'image' must be a tensor, got "
                            f"{type(image).__name__}")
        ids = self._dataset_ids(dataset_id, image.shape[0])
        feats = self.encoder(image)
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=len(self.head_names)).tolist()
        # non_blocking: a blocking host-to-device copy would wait for the encoder's queued GPU
        # work (a host sync per step). From pinned memory: CUDA may synchronise the stream
        # before staging an asynchronous copy from pageable memory (its documented behaviour
        # for pageable transfers), which would be that same wait.
        if image.device.type == "cuda":
            order = order.pin_memory()
        order_dev = order.to(image.device, non_blocking=True)
        # the batch sorted by head once (one gather forward, one in backward), each head's
        # rows a view of it: a gather per head cost a launch forward and two backward per
        # head, plus adding the heads' gradients into the features', every step
        in_order = ids.numel() < 2 or bool((ids[1:] >= ids[:-1]).all())  # (host tensors)
        parts = (feats if in_order else take_rows(feats, order_dev)).split(counts)
        out, start = [], 0
        for h, c in enumerate(counts):
            if c == 0:
                continue
            index = order_dev[start:start + c]
            start += c
            head = self.heads[self.head_names[h]]
            out.append(HeadOutput(h, index, head(parts[h])))
        return out

    def forward_head(self, image: torch.Tensor, head: int | str) -> torch.Tensor:
        """All of ``image`` through one head (inference on a single dataset)."""
        names = self.head_names
        ok = head in names if isinstance(head, str) else (
            isinstance(head, numbers.Integral) and not isinstance(head, bool)
            and -len(names) <= head < len(names))
        if not ok:  # else a bare IndexError / KeyError from the list or the ModuleDict
            raise ValueError(f"head {head!r} is not one of this Med3DNet's heads: indices "
                             f"0..{len(names) - 1} or names {names}")
        name = head if isinstance(head, str) else names[head]
        return self.heads[name](self.encoder(image))
