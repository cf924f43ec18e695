"""``python -m med3d_ext.models {inspect,convert}``: look into and convert weights files.

    inspect FILE             format, depth, shortcut type, tensor and parameter counts, heads
    convert FILE OUT         the encoder of FILE (any readable format) to OUT: .safetensors if
                             OUT ends so, else MedicalNet's released .pth layout
"""

from __future__ import annotations

import argparse
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


def inspect(path) -> str:
    """A readable summary of a weights file."""
    sd, fmt, meta = read_state_dict(path)
    prefix = _encoder_prefix(sd, str(path))
    depth, shortcut = _infer(sd, prefix, str(path))
    enc = {k: v for k, v in sd.items() if _is_encoder_key(k, prefix)}
    other = sorted({k.rsplit(".", 2)[0] for k in sd if k not in enc})
    n_params = sum(v.numel() for k, v in enc.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    lines = [f"file:      {path}", f"format:    {fmt}",
             f"encoder:   ResNet-{depth}, shortcut {shortcut}, {len(enc)} tensors, "
             f"{n_params:,} parameters, in_channels {enc[prefix + 'conv1.weight'].shape[1]}",
             f"dtype:     {', '.join(sorted({str(v.dtype) for v in enc.values()}))}"]
    if other:
        lines.append(f"other:     {', '.join(other)}")
    if meta:
        lines.append(f"metadata:  {meta}")
    return "\n".join(lines)


def convert(path, out) -> str:
    """Load the encoder of ``path`` and write it to ``out`` (.safetensors or MedicalNet .pth)."""
    sd, _, _ = read_state_dict(path)
    depth, shortcut = _infer(sd, _encoder_prefix(sd, str(path)), str(path))
    in_ch = sd[_encoder_prefix(sd, str(path)) + "conv1.weight"].shape[1]
    enc = ResNet3dEncoder(depth, shortcut, in_ch)
    load_medicalnet_weights(enc, path)
    _write(save_encoder_safetensors if str(out).endswith(".safetensors")
           else save_encoder_medicalnet, enc, out)
    return f"wrote ResNet-{depth} (shortcut {shortcut}) encoder to {out}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m med3d_ext.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise a weights file")
    p.add_argument("file", help="a .pth / .pt / .safetensors weights file")
    p = sub.add_parser("convert", help="convert the encoder of a weights file")
    p.add_argument("file", help="a .pth / .pt / .safetensors weights file")
    p.add_argument("out", help="output: *.safetensors, else MedicalNet's .pth layout")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect(args.file))
        else:
            print(convert(args.file, args.out))
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
        # safetensors reports I/O failures as its own error type (a Rust error, not OSError)
        if type(e).__name__ != "SafetensorError":
            raise
        raise MedicalNetWeightsError(f"cannot write {str(out)!r} ({e})") from None


if __name__ == "__main__":
    sys.exit(main())
