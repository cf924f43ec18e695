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
    # the tree copied to a GPU machine has no .git: gpu_check.sh passes GIT_COMMIT along
    env["git_commit"] = _run(["git", "-C", root, "rev-parse", "--short", "HEAD"]) or os.environ.get("GIT_COMMIT") or None
    return env


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
