"""The environment a benchmark run records: device, driver, torch, CUDA, cuDNN, peer libraries,
med3d_ext's build and the commit (``collect_env``)."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import torch



def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None


def collect_env(device: str) -> dict:
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
        if shutil.which("nvidia-smi"):
            env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        env["cpu"] = platform.processor() or _cpu_model()
    try:
        from med3d_ext import info as m3d_info

        env["med3d_ext"] = m3d_info.collect()
    except Exception as exc:
        env["med3d_ext"] = {"error": repr(exc)}
    for mod in ("monai", "torchio", "numpy", "triton"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "yes")
        except Exception:
            env[mod] = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # GIT_COMMIT, when given (gpu_check.sh passes it: the tree copied to a GPU machine may have
    # no .git, or a stale one: a run once recorded a commit other than the code's), wins over
    # git's own view, which says "-dirty" for uncommitted changes
    env["git_commit"] = os.environ.get("GIT_COMMIT") or _run(
        ["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=7"]) or None
    env["source_hash"] = source_hash(root)
    try:  # "fp32" convolutions and matmuls on a GPU are TF32 when these are on
        env["tf32"] = {"cudnn_conv": bool(torch.backends.cudnn.allow_tf32),
                       "cuda_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    except Exception:  # noqa: BLE001 - extra information only
        pass
    return env


# the files that go into the compiled module (benchmarks/gpu_prebuild.sh --hash lists the same)
_SOURCE_PATHS = ("csrc", "CMakeLists.txt", "pyproject.toml", "med3d_ext/_build_config.py.in")


def source_hash(root: str) -> str | None:
    """The hash of the extension's sources, as ``benchmarks/gpu_prebuild.sh --hash`` prints it
    (sha256sum of each file in C-locale path order, then of that listing; 16 hex digits): it
    names the sources of the extension that was measured, whatever git says."""
    import hashlib

    files = []
    for rel in _SOURCE_PATHS:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            files.append(rel)
        for d, _, names in os.walk(path):
            files += [os.path.relpath(os.path.join(d, n), root) for n in names
                      if not n.endswith(".pyc")]
    if not files:
        return None
    listing = b""
    for rel in sorted(files, key=lambda f: f.encode()):
        with open(os.path.join(root, rel), "rb") as f:
            listing += f"{hashlib.sha256(f.read()).hexdigest()}  {rel}\n".encode()
    return hashlib.sha256(listing).hexdigest()[:16]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
