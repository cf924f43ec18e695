"""``python -m med3d_ext.models {inspect,convert}``: look into and convert weights files.

    inspect FILE             format, depth, shortcut type, tensor and parameter counts, heads,
                             and whether the encoder loads (exit 1 when not)
    convert FILE OUT         the encoder of FILE (any readable format) to OUT: .safetensors if
                             OUT ends so, else MedicalNet's released .pth layout; an existing
                             OUT is refused unless --overwrite is given
"""

from __future__ import annotations

import argparse
import os
import sys

from .resnet import ResNet3dEncoder
from .weights import (
    MedicalNetWeightsError,
    _encoder_prefix,
    _infer,
    _is_encoder_key,
    load_medicalnet_weights,
    read_state_dict,
    save_encoder_medicalnet,
    save_encoder_safetensors,
)


def _in_channels(sd, prefix, path) -> int:
    w = sd[prefix + "conv1.weight"]
    if w.dim() != 5:  # (else an IndexError): a corrupted or foreign file
        raise MedicalNetWeightsError(f"{str(path)!r}: conv1.weight has shape {tuple(w.shape)}, "
                                     "expected (64, in_channels, 7, 7, 7)")
    return int(w.shape[1])


def inspect(path) -> str:
    """A readable summary of a weights file, with a last line that says whether its encoder
    loads (keys, shapes and values checked as ``convert`` and training check them)."""
    sd, fmt, meta = read_state_dict(path)
    prefix = _encoder_prefix(sd, str(path))
    depth, shortcut = _infer(sd, prefix, str(path))
    in_ch = _in_channels(sd, prefix, path)
    enc = {k: v for k, v in sd.items() if _is_encoder_key(k, prefix)}
    other = sorted({k.rsplit(".", 2)[0] for k in sd if k not in enc})
    n_params = sum(v.numel() for k, v in enc.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    lines = [f"file:      {path}", f"format:    {fmt}",
             f"encoder:   ResNet-{depth}, shortcut {shortcut}, {len(enc)} tensors, "
             f"{n_params:,} parameters, in_channels {in_ch}",
             f"dtype:     {', '.join(sorted({str(v.dtype) for v in enc.values()}))}"]
    if other:
        lines.append(f"other:     {', '.join(other)}")
    if meta:
        lines.append(f"metadata:  {meta}")
    try:  # a summary of a corrupted file looked like any other (NaN weights, bad variances)
        load_medicalnet_weights(ResNet3dEncoder(depth, shortcut, in_ch), path)
        lines.append("check:     ok (the encoder loads: keys, shapes, finite values)")
    except MedicalNetWeightsError as e:
        lines.append(f"check:     FAILED: {e}")
    return "\n".join(lines)


def convert(path, out, overwrite: bool = False) -> str:
    """Check the encoder of ``path`` (loaded into a model: keys, shapes, values) and write its
    tensors, dtypes unchanged, to ``out`` (.safetensors or MedicalNet .pth). An existing
    ``out`` is refused unless ``overwrite``."""
    out = str(out)
    if not out.strip() or out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise MedicalNetWeightsError(f"OUT {out!r} is not a file name; give one, e.g. "
                                     "encoder.safetensors or encoder.pth")
    if os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
        # it wrote the encoder over its own input: a trained head in the file was gone
        raise MedicalNetWeightsError(f"OUT {out!r} is the input file itself; write the encoder "
                                     "to another file")
    if os.path.lexists(out) and not overwrite:
        # it replaced any file there without a word (a run's best.pt: its head and optimizer
        # state were gone); lexists: a dangling link would be written through to its target
        raise MedicalNetWeightsError(f"OUT {out!r} already exists; give another file name, or "
                                     "--overwrite to replace it")
    sd, _, _ = read_state_dict(path)
    prefix = _encoder_prefix(sd, str(path))
    depth, shortcut = _infer(sd, prefix, str(path))
    enc = ResNet3dEncoder(depth, shortcut, _in_channels(sd, prefix, path))
    load_medicalnet_weights(enc, path)  # the checks; the model's float32 copy is not written
    tensors = {k[len(prefix):]: v for k, v in sd.items() if _is_encoder_key(k, prefix)}
    # the suffix in any case: OUT.SAFETENSORS was written as a torch zip file
    _write(save_encoder_safetensors if out.lower().endswith(".safetensors")
           else save_encoder_medicalnet, tensors, out)
    dtypes = ", ".join(sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()}))
    return f"wrote ResNet-{depth} (shortcut {shortcut}) encoder ({dtypes}) to {out}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m med3d_ext.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise a weights file")
    p.add_argument("file", help="a .pth / .pt / .safetensors weights file")
    p = sub.add_parser("convert", help="convert the encoder of a weights file")
    p.add_argument("file", help="a .pth / .pt / .safetensors weights file")
    p.add_argument("out", help="output: *.safetensors, else MedicalNet's .pth layout")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (default: an existing OUT is refused)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            text = inspect(args.file)
            print(text)
            if "\ncheck:     FAILED" in text:
                return 1
        else:
            print(convert(args.file, args.out, overwrite=args.overwrite))
    except (MedicalNetWeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _write(save, enc, out) -> None:
    """Write the encoder; an unwritable OUT is a one-line error naming it, not a traceback."""
    try:
        save(enc, out)
    except OSError as e:
        at = f": {e.filename!r}" if e.filename and str(e.filename) != str(out) else ""
        raise MedicalNetWeightsError(f"cannot write {str(out)!r} ({e.strerror or e}{at})"
                                     ) from None
    except Exception as e:
        # safetensors reports I/O failures as its own error type (a Rust error, not OSError),
        # torch.save as a RuntimeError from its zip writer ("enforce fail ... Permission denied")
        if type(e).__name__ != "SafetensorError" and not (
                isinstance(e, RuntimeError) and "inline_container" in str(e)):
            raise
        raise MedicalNetWeightsError(f"cannot write {str(out)!r} ({e})") from None


if __name__ == "__main__":
    sys.exit(main())
