"""Build plumbing: graceful fallback, torch-mismatch message, and `python -m med3d_ext.info`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from med3d_ext import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=120)


def test_fallback_without_extension_still_computes():
    code = (
        "import torch, med3d_ext\n"
        "from med3d_ext import _extension\n"
        "assert not _extension.available()\n"
        "x = torch.randn(2, 3, 4, 5, 6)\n"
        "m, v = med3d_ext.ops.bn_stats(x)\n"
        "vr, mr = torch.var_mean(x, dim=[0, 2, 3, 4], correction=0)\n"
        "torch.testing.assert_close(m, mr); torch.testing.assert_close(v, vr)\n"
        "from med3d_ext import info; info.main()\n"
    )
    r = _run(code, MED3D_EXT_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert "NOT LOADED" in r.stdout and "MED3D_EXT_DISABLE_EXTENSION" in r.stdout


def test_torch_mismatch_is_reported_not_crashed():
    # Pretend the extension was built against another torch: the import must warn with both
    # versions and the rebuild command, then fall back instead of loading _C.
    code = (
        "import sys, types, warnings\n"
        "cfg = types.ModuleType('med3d_ext._build_config')\n"
        "cfg.TORCH_VERSION = '1.0.0+fake'; cfg.WITH_CUDA = False; cfg.CUDA_VERSION = ''; cfg.CUDA_ARCHS = ''\n"
        "sys.modules['med3d_ext._build_config'] = cfg\n"
        "warnings.simplefilter('always')\n"
        "import med3d_ext\n"
        "from med3d_ext import _extension\n"
        "assert not _extension.available()\n"
        "print(med3d_ext.ops.bn_stats(__import__('torch').ones(2, 2, 2))[0].tolist())\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "built against torch 1.0.0+fake" in r.stderr
    assert torch.__version__ in r.stderr
    assert "pip install --no-build-isolation" in r.stderr
    assert r.stdout.strip() == "[1.0, 1.0]"


@pytest.mark.skipif(not _extension.available(), reason="extension not loaded")
def test_info_lists_ops_with_their_kernels():
    r = subprocess.run([sys.executable, "-m", "med3d_ext.info"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "med3d_ext::bn_stats" in l)
    assert "CPU" in line and "Autograd" in line and "Fake" in line
    if torch.cuda.is_available() and _extension.build_info().get("with_cuda"):
        assert "CUDA" in line
    assert f"torch built against:  {torch.__version__}" in r.stdout


def test_info_help_and_json():
    # --help used to print the report (arguments were ignored); --json is for bug reports
    import json

    run = lambda *a: subprocess.run([sys.executable, "-m", "med3d_ext.info", *a],
                                    capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = run("--help")
    assert r.returncode == 0 and "usage: python -m med3d_ext.info" in r.stdout
    assert "torch running" not in r.stdout
    r = run("--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["torch_running"] == torch.__version__
    assert info["extension_loaded"] == _extension.available()
    if _extension.available():
        assert "CPU" in info["ops"]["med3d_ext::bn_stats"]
    r = run("--frobnicate")
    assert r.returncode == 2 and "unrecognized arguments: --frobnicate" in r.stderr
    # a reader that stops early (`--json | head -1`) gave a BrokenPipeError traceback
    p = subprocess.Popen([sys.executable, "-m", "med3d_ext.info", "--json"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # closed before it writes: its first print meets a broken pipe
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]


@pytest.mark.skipif(not _extension.available(), reason="extension not loaded")
def test_build_info_matches_running_torch():
    info = _extension.build_info()
    assert info["loaded"] and info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)


def test_a_truncated_library_is_refused_before_dlopen(tmp_path):
    """dlopen of a shared library cut short (an interrupted copy or install, a full disk) died
    of SIGBUS inside `import med3d_ext`, with no exception to turn into the fallback."""
    from med3d_ext import _extension

    if not _extension.available():
        pytest.skip("needs the built library to cut short")
    so = _extension._C.__file__
    assert _extension._damaged_elf(so) is None
    data = open(so, "rb").read()
    for n in (1000, 65536, len(data) // 2):
        cut = tmp_path / f"cut{n}.so"
        cut.write_bytes(data[:n])
        assert "shorter than its headers say" in _extension._damaged_elf(str(cut)) or \
            "a loadable segment ends at byte" in _extension._damaged_elf(str(cut))
    not_elf = tmp_path / "text.so"
    not_elf.write_text("not a library")
    assert _extension._damaged_elf(str(not_elf)) is None  # the importer says what it is


def test_reference_fallback_of_the_fused_ops(monkeypatch):
    """Without the compiled op (the reference route): a fused ResNet trains (the stem's output
    was saved by its ReLU and then modified by the model's in-place ReLU), a wider residual
    does not promote the output, and numpy's bool is a flag."""
    import numpy as np

    from med3d_ext.models import resnet3d
    from med3d_ext.nn import fuse_modules
    from med3d_ext.ops import conv_bn_relu as cbr

    monkeypatch.setattr(cbr, "compiled", lambda name: None)
    m = fuse_modules(resnet3d(10)).train()
    m(torch.randn(2, 1, 16, 16, 16)).mean().backward()
    assert m.conv1.weight.grad is not None
    x, w = torch.randn(2, 2, 5, 5, 5), torch.randn(3, 2, 3, 3, 3)
    r = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64)
    assert cbr.conv_bn_relu3d(x, w, None, None, None, None, residual=r).dtype == torch.float32
    assert cbr.conv_bias_relu3d(x, w, None, residual=r).dtype == torch.float32
    cbr.conv_bn_relu3d(x, w, None, None, torch.zeros(3), torch.ones(3), training=np.bool_(True))
