"""Shared test policy: tolerances per dtype, devices, markers, fresh randomness.

Tolerance policy (house style 8): float outputs are compared with the (rtol, atol) of their
dtype below; integer and label outputs are compared exactly. For bf16/fp16 kernels the error
against an fp32 reference must be at most 2x that of plain PyTorch in the same low precision:
use ``assert_low_precision_close``.
"""

from __future__ import annotations

import os

import pytest
import torch

TOL = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}

HAS_CUDA = torch.cuda.is_available()

if HAS_CUDA:
    # Tests compare float32 results with float32 tolerances: TF32 convolutions/matmuls (cuDNN's
    # default) would differ by ~1e-3 between two algorithms, and nondeterministic cuDNN weight
    # gradients would fail gradcheck's reentrancy check. Both are speed settings, not semantics.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, **kw):
    dtype = dtype or (expected.dtype if expected.is_floating_point() else None)
    if dtype is None:  # integers / labels: exact
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, **kw)
    else:
        torch.testing.assert_close(actual, expected.to(actual.dtype), **tol(dtype), **kw)


def assert_low_precision_close(ours, torch_lowp, reference_fp32, factor: float = 2.0, floor=1e-6):
    """Max error of ``ours`` vs the fp32 reference is <= factor x that of PyTorch in low precision."""
    ref = reference_fp32.double()
    err_ours = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    err_torch = (torch_lowp.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err_ours <= factor * err_torch + floor, (
        f"low-precision error {err_ours:.3g} exceeds {factor} x PyTorch's {err_torch:.3g}")


_OWN_CACHE = None


def pytest_configure(config):
    # Preprocessing caches of the tests' throwaway datasets went to the user's
    # ~/.cache/med3d_ext, one new folder per test dataset path and run, never removed: the
    # session gets a cache of its own (CLI subprocesses inherit it), removed at the end. A
    # MED3D_EXT_CACHE set by the caller is kept.
    global _OWN_CACHE
    if "MED3D_EXT_CACHE" not in os.environ:
        import tempfile

        _OWN_CACHE = tempfile.mkdtemp(prefix="m3d-test-cache-")
        os.environ["MED3D_EXT_CACHE"] = _OWN_CACHE


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
        os.environ.pop("MED3D_EXT_CACHE", None)


def pytest_sessionstart(session):
    # CI sets this so that a broken build fails loudly instead of testing the reference fallback.
    if os.environ.get("MED3D_EXT_REQUIRE_EXTENSION") == "1":
        from med3d_ext import _extension

        if not _extension.available():
            pytest.exit(f"MED3D_EXT_REQUIRE_EXTENSION=1 but the extension is not loaded: "
                        f"{_extension.LOAD_ERROR}", returncode=3)


def pytest_report_header(config):
    """Say at the top which ops the run tests: without the compiled extension every op runs
    med3d_ext.reference, and the tests of the compiled ops' own argument checks (dtypes,
    layouts, empty outputs) fail there (the reference does not repeat every C++ check)."""
    from med3d_ext import _extension

    if _extension.available():
        return "med3d_ext: compiled extension loaded"
    return ("med3d_ext: compiled extension NOT loaded, testing the reference fallback "
            f"({_extension.LOAD_ERROR.splitlines()[0]}); tests of the compiled ops' argument "
            "checks will fail: build it (README, Quick start)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs on every run, but printed so a failure can be replayed
    (MED3D_TEST_SEED=<seed> pytest ...)."""
    seed = int(os.environ.get("MED3D_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"\n[seed] MED3D_TEST_SEED={seed}")


@pytest.fixture(autouse=True)
def _keep_locale():
    """Every test leaves the process locale as it found it: SimpleITK's GDCM DICOM writer
    switches it to "C" (ASCII text encoding) and leaves it so, and every later test that wrote
    non-ASCII text then failed (a DICOM test in test_predict broke four benchmark tests)."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.when == "call" and rep.failed:
        for name, value in item.user_properties:
            if name == "seed":
                rep.sections.append(("seed", f"replay with MED3D_TEST_SEED={value}"))


def needs_extension():
    from med3d_ext import _extension

    return pytest.mark.skipif(not _extension.available(), reason="compiled extension not loaded")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small CPU ops gain nothing from a second OpenMP thread,
    and on a shared 2-core machine its barriers make them many times slower (no time is
    asserted where this is used)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def recipe_builds(monkeypatch):
    """The ``what`` of every memory-saving recipe rebuilt in backward (med3d_ext.nn.recompute),
    in order: which saved tensors the memory-saving mode really replaced."""
    from med3d_ext.nn import recompute

    built, real = [], recompute.Recipe.build

    def counting(self):
        built.append(self.what)
        return real(self)
    monkeypatch.setattr(recompute.Recipe, "build", counting)
    return built


def _cuda_switch(request, monkeypatch, variable: str, value: str) -> str:
    """A fixture's body for an opt-in CUDA kernel chosen by an environment variable the
    extension reads at every call: the default (the variable unset) or, for the param
    ``value``, the variable set to it. The CPU ops have one kernel each, so a CPU test runs the
    default only."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device", "cuda") if callspec else "cuda"
    if request.param == value:
        if device == "cpu":
            pytest.skip("the CPU op has one kernel")
        monkeypatch.setenv(variable, value)
    else:
        monkeypatch.delenv(variable, raising=False)
    return request.param


@pytest.fixture(params=["gather", "lines"])
def im2col_kernel(request, monkeypatch):
    """The CUDA im2col3d kernels (csrc/conv_bn_relu/im2col_cuda.cu): the per-element gather (the
    default) and the line-staged one (MED3D_EXT_IM2COL_KERNEL=lines). Both must give the same
    matrix bit for bit."""
    return _cuda_switch(request, monkeypatch, "MED3D_EXT_IM2COL_KERNEL", "lines")


@pytest.fixture(params=["elementwise", "tiles"])
def pool_tiles(request, monkeypatch):
    """The CUDA stem max-pool kernels (csrc/conv_bn_relu/bn_relu_pool_cuda.cu): the elementwise
    PoolForwardOp / PoolGatherOp (the default) and the tiled ones (MED3D_EXT_POOL_KERNEL=tiles,
    pool_tiles.cuh; channels_last_3d with 16-byte channel vectors only, else the default
    runs). Both must give the same outputs (the forward and the gathered gradient bit for bit)."""
    return _cuda_switch(request, monkeypatch, "MED3D_EXT_POOL_KERNEL", "tiles")
