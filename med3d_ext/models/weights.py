"""Safe loading and export of MedicalNet encoder weights.

Reads, always with ``torch.load(weights_only=True, map_location="cpu")`` (MedicalNet's files hold
CUDA tensors; mapping to the CPU is what makes them load on any machine):

- MedicalNet's released layout ``{'state_dict': {'module.<key>': tensor}}`` (legacy or zip);
- bare state dicts, with or without the ``module.`` prefix of DataParallel;
- our checkpoints (``format="med3d_ext"``, ``version``, ``arch``, ``state_dict``, ...);
- ``.safetensors`` files (recognised by suffix or by content).

The encoder (``conv1``, ``bn1``, ``layer1..4``) loads strictly; everything else (``conv_seg``,
``heads.*``, ``head.*``) loads where key and shape agree and is reported otherwise, because
transfer changes heads on purpose.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .resnet import DEPTHS, ENCODER_ROOTS, ResNet3dEncoder

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LoadReport",
    "MedicalNetWeightsError",
    "atomic_save",
    "encoder_state_dict",
    "infer_medicalnet_depth",
    "load_medicalnet_weights",
    "read_state_dict",
    "save_encoder_medicalnet",
    "save_encoder_safetensors",
    "unwrap_model",
]

CHECKPOINT_FORMAT = "med3d_ext"
CHECKPOINT_VERSION = 1
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


class MedicalNetWeightsError(ValueError):
    """A weights file that cannot be loaded into the given model; the message names the file."""


@dataclass
class LoadReport:
    """What ``load_medicalnet_weights`` did. Keys are the model's own state-dict keys."""

    path: str
    source_format: str  # "medicalnet", "state_dict", "med3d_ext" or "safetensors"
    depth: int | None = None  # as inferred from the file
    shortcut_type: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the file did not fill
    unexpected: list[str] = field(default_factory=list)  # file keys not used
    skipped: list[str] = field(default_factory=list)  # head keys with another shape
    adapted: list[str] = field(default_factory=list)  # e.g. conv1 replicated to in_channels

    def __str__(self) -> str:
        arch = f"ResNet-{self.depth} (shortcut {self.shortcut_type})" if self.depth else "?"
        lines = [f"Loaded {len(self.loaded)} tensors from {self.path} "
                 f"[{self.source_format}, {arch}]"]

        def part(title, keys, why=""):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
                lines.append(f"  {title} ({len(keys)}){why}: {shown}")

        # BatchNorm's step counters (absent from MedicalNet's files, which predate them) are
        # no weights: listed first, they hid the keys that matter (a new head's)
        counters = [k for k in self.missing if k.endswith("num_batches_tracked")]
        part("missing", [k for k in self.missing if not k.endswith("num_batches_tracked")],
             " -- not in the file, left as initialised")
        if counters:
            lines.append(f"  and {len(counters)} BatchNorm step counters (num_batches_tracked) "
                         "not in the file, left at 0: not weights, harmless")
        # a pretraining checkpoint's per-dataset heads are in the file by design: said as such,
        # not as the same "unexpected" a real mismatch gets
        heads = [k for k in self.unexpected if k.startswith("heads.")]
        part("unexpected", [k for k in self.unexpected if not k.startswith("heads.")],
             " -- in the file, not used")
        if heads:
            names = sorted({k.split(".")[1] for k in heads if k.count(".") >= 2})
            lines.append(f"  and {len(heads)} tensors of the pretraining run's {len(names)} "
                         f"per-dataset heads (heads.*), not used by a transfer: as expected")
        part("skipped", self.skipped, " -- shape differs (a new head?)")
        part("adapted", self.adapted)
        return "\n".join(lines)


def _is_encoder_key(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] in ENCODER_ROOTS


# ----------------------------------------------------------------------------------- reading


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:  # 8-byte little-endian header size, then a JSON header
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_file(path: Path) -> tuple[dict, str, dict]:
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {str(path)!r}")
    if not path.is_file():
        raise MedicalNetWeightsError(f"{str(path)!r} is not a file")
    if _looks_like_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise MedicalNetWeightsError(
                f"could not read safetensors file {str(path)!r}: truncated or corrupted "
                f"({type(e).__name__}: {e})") from e
        return sd, "safetensors", meta
    foreign = not_torch_save_file(path)
    if foreign:
        raise MedicalNetWeightsError(f"could not read {str(path)!r}: it {foreign}; give a "
                                     "MedicalNet .pth, one of our checkpoints or a .safetensors "
                                     "file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = pickled_global(e)
        if all(part.isidentifier() for part in name.split(".")) and name:
            maybe = "" if _global_exists(name) else " (or the file is truncated or corrupted)"
            raise MedicalNetWeightsError(
                f"refusing to load {str(path)!r}{maybe}: it contains a pickled {name!r}, not just "
                "tensors and plain containers (for example a whole nn.Module saved with "
                "torch.save(model), or training args), and unpickling it could run arbitrary "
                "code. We only read files with torch.load(weights_only=True). If you trust the "
                "file, convert it once: obj = torch.load(p, weights_only=False); "
                "torch.save({'state_dict': obj.state_dict()}, new_p) for a module, or keep only "
                "obj['state_dict'].") from e
        # a cut-off legacy file yields half a name ("torch._ut.") or a bare unpickling error;
        # torch's message is a paragraph: keep the one line that says what went wrong
        why = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        why = why.group(1) if why else (str(e).strip().splitlines() or [""])[0]
        raise MedicalNetWeightsError(
            f"could not read {str(path)!r}: truncated, corrupted or not a PyTorch weights file"
            + (f" (unpickling stopped at {name!r})" if name else f" ({why})")) from e
    except Exception as e:  # zip reader / EOF errors of a cut-off download
        raise MedicalNetWeightsError(
            f"could not read {str(path)!r}: truncated or not a PyTorch weights file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return _unwrap(obj, str(path))


def pickled_global(exc: BaseException) -> str:
    """The name torch.load(weights_only=True) refused to unpickle ("Unsupported global:
    GLOBAL argparse.Namespace"), or "" when the error is another."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return m.group(1) if m else ""


def not_torch_save_file(path) -> str | None:
    """Why ``path`` cannot be a torch.save file, judged by its first bytes (torch.save writes a
    zip archive; files of torch < 1.6 are a pickle), or None when it may be one. Turns
    torch.load's bare "KeyError: 101" (a text file) into a sentence naming what the file is."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return None
    if not head:
        return "is empty"
    text = head.decode("utf-8", "replace")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return (f"is a text file (it starts with {first!r}), not a PyTorch file (torch.save "
                "writes a zip archive)")
    return f"is not a PyTorch file (torch.save writes a zip archive; it starts with {head[:8]!r})"


def _global_exists(name: str) -> bool:
    # only looks at modules already imported: never imports what a file asks for
    mod, _, attr = name.rpartition(".")
    return bool(mod) and hasattr(sys.modules.get(mod), attr)


def _unwrap(obj, where: str) -> tuple[dict, str, dict]:
    if not isinstance(obj, Mapping):
        raise MedicalNetWeightsError(
            f"{where!r} holds a {type(obj).__name__}, expected a dict of tensors, a "
            "{'state_dict': ...} dict or a med3d_ext checkpoint")
    if obj.get("format") == CHECKPOINT_FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise MedicalNetWeightsError(
                f"{where!r} is a med3d_ext checkpoint of version {version!r}; this med3d_ext "
                f"reads versions <= {CHECKPOINT_VERSION} (upgrade med3d_ext)")
        if not isinstance(obj.get("state_dict"), Mapping):
            raise MedicalNetWeightsError(f"med3d_ext checkpoint {where!r} has no 'state_dict'")
        arch = obj.get("arch") if isinstance(obj.get("arch"), Mapping) else {}
        return dict(obj["state_dict"]), "med3d_ext", dict(arch)
    if isinstance(obj.get("state_dict"), Mapping):
        return dict(obj["state_dict"]), "medicalnet", {}
    return dict(obj), "state_dict", {}


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _normalise(sd: Mapping, where: str) -> dict[str, torch.Tensor]:
    out, original = {}, {}  # original: the file's key each stripped key came from
    for k, v in sd.items():
        if not isinstance(k, str):
            raise MedicalNetWeightsError(f"{where!r}: state-dict key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise MedicalNetWeightsError(
                f"{where!r}: entry {k!r} holds a {type(v).__name__}, not a tensor")
        # DataParallel's prefix (MedicalNet saved from nn.DataParallel) and torch.compile's
        # (a compiled model's state_dict), in either order
        key = k
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key in out:  # both 'module.x' and 'x': one would silently overwrite the other
            raise MedicalNetWeightsError(
                f"{where!r}: keys {original[key]!r} and {k!r} are both present (a state dict of "
                "a model and of its DataParallel / torch.compile wrapper merged?); keep one of "
                "them")
        out[key], original[key] = v, k
    return out


def read_state_dict(path_or_state_dict) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict without ``module.``, source format, metadata/arch) from a file or a dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        sd, fmt, meta = _read_file(path)
        return _normalise(sd, str(path)), fmt, meta
    if isinstance(path_or_state_dict, nn.Module):
        sd = unwrap_model(path_or_state_dict).state_dict()
        return _normalise(sd, "<module>"), "state_dict", {}
    if isinstance(path_or_state_dict, Mapping):
        sd, fmt, meta = _unwrap(path_or_state_dict, "<state_dict>")
        return _normalise(sd, "<state_dict>"), fmt, meta
    raise TypeError("expected a path, a state dict or a module, got "
                    f"{type(path_or_state_dict).__name__}")


def _encoder_prefix(sd: Mapping, where: str) -> str:
    for prefix in ("", "encoder."):
        if prefix + "conv1.weight" in sd:
            return prefix
    sample = ", ".join(list(sd)[:5]) or "<empty>"
    raise MedicalNetWeightsError(
        f"{where!r} holds no MedicalNet encoder: expected a key 'conv1.weight' (optionally "
        f"prefixed by 'module.' or 'encoder.'); first keys: {sample}")


def _infer(sd: Mapping, prefix: str, where: str) -> tuple[int, str]:
    counts = [0, 0, 0, 0]
    bottleneck = downsample = False
    for k in sd:
        if not k.startswith(prefix):
            continue
        m = _BLOCK_KEY.match(k[len(prefix):])
        if m:
            layer, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[layer] = max(counts[layer], idx + 1)
            rest = k[len(prefix) + m.end():]
            bottleneck |= rest.startswith("conv3.")
            downsample |= rest.startswith("downsample.")
    block = "Bottleneck" if bottleneck else "BasicBlock"
    for depth, (b, layers, _) in DEPTHS.items():
        if b == block and tuple(counts) == layers:
            return depth, "B" if downsample else "A"
    raise MedicalNetWeightsError(
        f"{where!r}: blocks per layer {counts} with {block} match no MedicalNet depth "
        f"({', '.join(f'{d}: {list(v[1])} {v[0]}' for d, v in DEPTHS.items())})")


def infer_medicalnet_depth(path_or_state_dict) -> tuple[int, str]:
    """(depth, shortcut_type) of the encoder in a weights file, state dict or module.

    Depth from the block counts of layer1..4 and the block type (``conv3`` keys only exist in
    Bottlenecks); shortcut "B" iff any ``downsample`` key exists (type A has no parameters).
    """
    where = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) \
        else "<state_dict>"
    sd, _, _ = read_state_dict(path_or_state_dict)
    return _infer(sd, _encoder_prefix(sd, where), where)


# ----------------------------------------------------------------------------------- loading


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DataParallel / DistributedDataParallel / torch.compile wrappers, whose
    state-dict keys carry ``module.`` / ``_orig_mod.`` prefixes."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _target_prefix(model: nn.Module) -> str:
    if isinstance(model, ResNet3dEncoder):
        return ""
    if isinstance(getattr(model, "encoder", None), nn.Module):
        return "encoder."
    if "conv1.weight" in model.state_dict():
        return ""
    raise TypeError(f"{type(model).__name__} has neither MedicalNet's encoder keys "
                    "(conv1, bn1, layer1..4) nor an `encoder` submodule")


def _arch(sd: Mapping, prefix: str) -> tuple[int, str] | None:
    try:
        return _infer(sd, prefix, "")
    except MedicalNetWeightsError:
        return None


def _describe(arch: tuple[int, str] | None) -> str:
    return f"ResNet-{arch[0]} with shortcut {arch[1]}" if arch else "an encoder of unknown depth"


def _mismatch_cause(have, want) -> str:
    """Why the file does not fit: the likely cause, and how to build a matching model."""
    if have is None or want is None:
        return "not a MedicalNet ResNet: wrong depth, or a modified network"
    if have == want:  # keys agree, so the usual causes are ruled out
        return (f"not the depth or shortcut type (both are {_describe(have)} by their keys): "
                "a modified network or a corrupted file")
    fix = f"build the model as resnet3d({have[0]}, shortcut_type={have[1]!r})"
    if have[0] != want[0]:
        return f"wrong depth; {fix}"
    return f"wrong shortcut type; {fix}"


def _check_values(where: str, key: str, v: torch.Tensor, want: torch.Tensor,
                  what: str = "encoder key") -> None:
    """A corrupted or mislabelled file, caught at load rather than as NaN losses later:
    load_state_dict would silently cast integer/bool tensors into float parameters (and
    complex ones by dropping the imaginary part), and copies NaN/Inf as they are."""
    if v.device.type == "meta":
        raise MedicalNetWeightsError(f"{where!r}: {what} {key!r} is a meta tensor (no data)")
    if v.is_complex() or v.is_floating_point() != want.is_floating_point():
        raise MedicalNetWeightsError(
            f"{where!r}: {what} {key!r} holds {v.dtype} values, the model's is {want.dtype}: "
            "not a weights file of this network, or a corrupted one")
    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).sum())
        raise MedicalNetWeightsError(
            f"{where!r}: {what} {key!r} holds {bad} NaN/Inf value(s) of {v.numel()}: a "
            "corrupted file, or weights saved after training diverged")
    if key.endswith("running_var") and v.is_floating_point() and bool((v < 0).any()):
        # a variance is never negative: BatchNorm in eval mode would give NaN from the sqrt
        raise MedicalNetWeightsError(
            f"{where!r}: {what} {key!r} holds {int((v < 0).sum())} negative variance(s) of "
            f"{v.numel()} (min {float(v.min()):.4g}): a corrupted file, or not BatchNorm "
            "running variances")


def _check_not_folded(model: nn.Module, tp: str, extra: list, where: str) -> None:
    """The file's BatchNorm keys have no place in a model that med3d_ext.nn.fold_bn prepared
    (its BatchNorms are nn.Identity, its convs have a bias): said so, rather than as keys
    missing for "a modified network or a corrupted file"."""
    mods = dict(model.named_modules())
    folded = [k for k in extra if k.endswith(".running_mean")
              and isinstance(mods.get(tp + k[:-len(".running_mean")]), nn.Identity)]
    if folded:
        raise MedicalNetWeightsError(
            f"{where!r} cannot be loaded into this model: its BatchNorm layers were folded into "
            f"the convolutions by med3d_ext.nn.fold_bn ({len(folded)} of them are nn.Identity, "
            f"e.g. {tp}{folded[0][:-len('.running_mean')]}). Load the weights into the model "
            "before fold_bn, then fold it.")


def load_medicalnet_weights(model: nn.Module, path) -> LoadReport:
    """Load MedicalNet (or our) encoder weights into ``model``; return a ``LoadReport``.

    ``model`` is a ``resnet3d``/encoder (keys at the root) or any module with an ``encoder``
    submodule (``Med3DNet``, ``ClassificationNet``). ``path`` is a file (any format in the
    module docstring) or an in-memory state dict.

    The encoder must match exactly: a missing or unexpected encoder key or a shape mismatch
    raises ``MedicalNetWeightsError`` naming the file, the key, both shapes and the likely
    cause (wrong depth or shortcut type). The one tolerated difference: a one-channel ``conv1``
    loads into a model with ``in_channels = C > 1`` by replicating the kernel over the channels
    and scaling by 1/C (the response to C identical channels is unchanged). Head keys load
    where key and shape agree and are reported otherwise; the ``conv_seg`` missing from
    released files is expected.
    """
    where = str(path) if isinstance(path, (str, os.PathLike)) else "<state_dict>"
    if not isinstance(model, nn.Module):
        raise TypeError("load_medicalnet_weights: argument 'model' must be an nn.Module, got "
                        f"{type(model).__name__}")
    model = unwrap_model(model)
    src, fmt, _ = read_state_dict(path)
    sp = _encoder_prefix(src, where)
    tp = _target_prefix(model)
    target = model.state_dict()
    report = LoadReport(path=where, source_format=fmt)
    have, want = _arch(src, sp), _arch(target, tp)
    if have:
        report.depth, report.shortcut_type = have

    src_enc = {k[len(sp):]: v for k, v in src.items() if _is_encoder_key(k, sp)}
    tgt_enc = {k[len(tp):] for k in target if _is_encoder_key(k, tp)}
    # num_batches_tracked is absent from files written by old PyTorch: tolerated, reported
    missing = sorted(k for k in tgt_enc - src_enc.keys() if not k.endswith("num_batches_tracked"))
    extra = sorted(src_enc.keys() - tgt_enc)
    if missing or extra:
        _check_not_folded(model, tp, extra, where)
        parts = [f"{len(ks)} encoder keys {what} (e.g. {', '.join(ks[:3])})"
                 for ks, what in ((missing, "missing from the file"), (extra, "not in the model"))
                 if ks]
        raise MedicalNetWeightsError(
            f"{where!r} holds {_describe(have)}, but the model is {_describe(want)}: "
            f"{'; '.join(parts)}. Likely cause: {_mismatch_cause(have, want)} (or use "
            "infer_medicalnet_depth(path)).")

    to_load: dict[str, torch.Tensor] = {}
    for k, v in src_enc.items():
        want_t = target[tp + k]
        if k == "conv1.weight" and v.shape != want_t.shape and v.dim() == 5 and v.shape[1] == 1 \
                and v.shape[0] == want_t.shape[0] and v.shape[2:] == want_t.shape[2:]:
            c = want_t.shape[1]
            v = v.repeat(1, c, 1, 1, 1) / c
            report.adapted.append(
                f"{tp}conv1.weight: 1 -> {c} input channels (replicated, x 1/{c})")
        if v.shape != want_t.shape:
            raise MedicalNetWeightsError(
                f"{where!r}: shape mismatch for encoder key {k!r}: file has {tuple(v.shape)}, "
                f"model expects {tuple(want_t.shape)}. The file holds {_describe(have)}, the "
                f"model is {_describe(want)}. Likely cause: {_mismatch_cause(have, want)}"
                + ("; or a different in_channels" if k == "conv1.weight" else "") + ".")
        _check_values(where, k, v, want_t)
        to_load[tp + k] = v

    for k, v in src.items():  # heads: same prefix convention only, same shape only
        if _is_encoder_key(k, sp):
            continue
        tk = k if sp == tp else None
        if tk is None or tk not in target or _is_encoder_key(tk, tp):
            report.unexpected.append(k)
        elif v.shape != target[tk].shape:
            report.skipped.append(f"{tk} (file {tuple(v.shape)}, model {tuple(target[tk].shape)})")
        else:
            _check_values(where, k, v, target[tk], "head key")  # checked as the encoder's
            to_load[tk] = v

    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # we only pass target keys
    report.loaded = sorted(to_load)
    skipped = {s.split(" ")[0] for s in report.skipped}
    report.missing = sorted(k for k in target if k not in to_load and k not in skipped)
    return report


# ----------------------------------------------------------------------------------- export


def atomic_save(obj, path) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder and
    ``os.replace``, so a crash never leaves a half-written file under ``path``."""
    return _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder (os.replace is atomic only within a filesystem); a unique name so that
    # concurrent writers never share a temporary; created with the default permissions
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
    try:
        write(tmp)
        # some writers (safetensors) create 0600 files: give the result the permissions a
        # plain open() would (0666 minus the umask), so colleagues can read exported weights
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors under MedicalNet's keys (conv1, bn1, layer1..4), detached, on the
    CPU and contiguous, from a resnet3d, an encoder or a model with an ``encoder``."""
    model = unwrap_model(model)
    tp = _target_prefix(model)
    sd = {k[len(tp):]: v.detach().cpu().contiguous()
          for k, v in model.state_dict().items() if _is_encoder_key(k, tp)}
    if "bn1.weight" not in sd and "bn1.running_mean" not in sd:
        # fold_bn replaced the BatchNorms by conv biases: no MedicalNet-layout encoder (it
        # exported 24 keys under a MedicalNet label, which no loader could read back)
        raise MedicalNetWeightsError("the model's BatchNorm is folded into its convolutions "
                                     "(med3d_ext.nn.fold_bn): export the model before folding "
                                     "(fold a copy for inference)")
    return sd


def _encoder_tensors(model) -> dict[str, torch.Tensor]:
    """``encoder_state_dict(model)``, or ``model`` itself when it already is such a mapping
    (``python -m med3d_ext.models convert`` writes a file's own tensors, dtypes unchanged)."""
    if isinstance(model, Mapping):
        return {k: v.detach().cpu().contiguous() for k, v in model.items()}
    return encoder_state_dict(model)


def save_encoder_medicalnet(model, path) -> Path:
    """Write the encoder in MedicalNet's released layout ``{'state_dict': {'module.<key>':
    tensor}}``, readable by MedicalNet's own code and by ``load_medicalnet_weights``.
    ``model``: a model, or a mapping of encoder keys (conv1.weight, ...) to tensors."""
    sd = {"module." + k: v for k, v in _encoder_tensors(model).items()}
    return atomic_save({"state_dict": sd}, path)


def save_encoder_safetensors(model, path, metadata: Mapping[str, str] | None = None
                             ) -> Path:
    """Write the encoder as ``.safetensors`` (MedicalNet keys, no ``module.``), with the depth
    and shortcut type in the metadata. ``model`` as in :func:`save_encoder_medicalnet`."""
    from safetensors.torch import save_file

    sd = _encoder_tensors(model)
    depth, shortcut = _infer(sd, "", "<model>")
    meta = {"format": CHECKPOINT_FORMAT, "layout": "medicalnet_encoder", "depth": str(depth),
            "shortcut_type": shortcut, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return _atomic_write(Path(path), lambda tmp: save_file(sd, tmp, metadata=meta))
