"""``python -m med3d_ext.info``: what is installed, how it was built, and which kernels exist."""

from __future__ import annotations

import sys

import torch


def collect() -> dict:
    import med3d_ext
    from med3d_ext import _extension
    from med3d_ext.ops._common import dispatch_keys, op_names

    build = _extension.build_info()
    cfg = _extension.BUILD_CONFIG  # the generated _build_config.py: known even when _C failed
    built_against = build.get("torch_version") or getattr(cfg, "TORCH_VERSION", None)
    return {
        "med3d_ext": med3d_ext.__version__,
        "python": sys.version.split()[0],
        "torch_running": torch.__version__,
        "torch_built_against": built_against,
        "extension_loaded": build["loaded"],
        "extension_error": build.get("error"),
        "with_cuda": build.get("with_cuda", False),
        "cuda_version": build.get("cuda_version") or None,
        "cuda_archs": build.get("cuda_archs") or None,
        "openmp": build.get("openmp"),
        # the compiled ops (none when _C is not loaded: every op then runs med3d_ext.reference)
        "ops": {name: dispatch_keys(name) for name in op_names()},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m med3d_ext.info",
        description="What is installed, how the extension was built, and which ops have CPU "
                    "and CUDA kernels (paste it into bug reports).")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"med3d_ext {info['med3d_ext']} (python {info['python']})")
    print(f"torch running:        {info['torch_running']}")
    if info["extension_loaded"]:
        print(f"torch built against:  {info['torch_built_against']}")
        cuda = f"CUDA {info['cuda_version']}, archs {info['cuda_archs']}" if info["with_cuda"] else "no"
        print(f"CUDA kernels:         {cuda}")
        print(f"OpenMP (CPU kernels): {'yes' if info['openmp'] else 'no'}")
        print("ops (dispatch keys):")
        width = max((len(n) for n in info["ops"]), default=0) + 1
        for name, keys in info["ops"].items():
            print(f"  {name:<{width}} {', '.join(keys)}")
    else:
        print(f"compiled extension:   NOT LOADED, using med3d_ext.reference\n  reason: {info['extension_error']}")
    gpu = info["gpu"] or "none usable"
    print(f"GPU now:              {gpu}" + (f" (cuDNN {info['cudnn']})" if info["gpu"] else ""))
    return 0


def _main_to_a_pipe() -> int:
    """main(), quiet when the reader closes the pipe early (`... --json | head`): Python's
    recipe, stdout pointed at devnull so that the flush at exit does not raise again."""
    import os
    import sys

    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(_main_to_a_pipe())
