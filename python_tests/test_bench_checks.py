"""The benchmark suite's honesty checks, on the CPU at tiny sizes: speed-ups only between like
rows (``compare_to``: dtype, device), per-row tolerances, the noisy intensity rows checked as
they are timed, no vacuous comparison, and ``--append`` refusing another machine or code."""

from __future__ import annotations

import json

import pytest
import torch

import med3d_ext.ops
from benchmarks import __main__ as bench_main
from benchmarks import bm_augment, bm_stem, common


def _ctx():
    return common.Context("cpu", quick=True, with_compile=False)


def _rows(ctx, case=None):
    return {r["impl"]: r for r in ctx.rows if case is None or r["case"] == case}


# ----------------------------------------------------------------------------- 1. like with like


def test_compare_to_limits_a_rows_ratios_to_like_baselines():
    ctx = _ctx()
    case = ctx.case("t", "c", targets={"B": 0.0})
    x = torch.ones(8)
    case.add("A", lambda: (lambda: x * 1), baseline=True, reference=True)
    case.add("B", lambda: (lambda: x * 1), baseline=True)
    case.add("only A", lambda: (lambda: x * 1), compare_to=["A"])
    case.add("all", lambda: (lambda: x * 1))
    rows = {r["impl"]: r for r in case.run()}
    assert set(rows["only A"]["speedup"]) == {"A"}
    assert set(rows["all"]["speedup"]) == {"A", "B"}
    # a target against a baseline the row is not compared with is not judged
    assert rows["only A"]["targets"]["B"]["met"] is None and rows["all"]["targets"]["B"]["met"]
    bad = ctx.case("t", "typo")
    bad.add("A", lambda: (lambda: x), baseline=True, reference=True)
    bad.add("ours", lambda: (lambda: x), compare_to=["a"])
    with pytest.raises(ValueError, match="compare_to names no baseline"):
        bad.run()


def test_a_rows_own_tolerance_overrides_the_cases():
    ctx = _ctx()
    case = ctx.case("t", "tol", rtol=1e-1, atol=0.0)
    x = torch.ones(8)
    case.add("ref", lambda: (lambda: x), baseline=True, reference=True)
    case.add("loose", lambda: (lambda: x * 1.01))
    case.add("tight", lambda: (lambda: x * 1.01), rtol=1e-3, atol=0.0)
    rows = {r["impl"]: r for r in case.run()}
    assert rows["loose"]["status"] == common.OK
    assert rows["tight"]["status"] == common.FAILED and "max abs err" in rows["tight"]["reason"]


class _Stop(Exception):
    pass


def test_stem_conv_alone_rows_compare_like_dtypes(monkeypatch):
    """The GPU branch (ctx.gpu forced, tiny input, nothing run): bf16 channels_last rows are
    compared with the bf16 baseline only, fp32 rows with the fp32 one, each with its dtype's
    tolerance."""
    seen = []

    def capture(self):
        seen.append(self)
        raise _Stop

    monkeypatch.setattr(common.Case, "run", capture)
    monkeypatch.setattr(bm_stem, "GPU_INPUT", (1, (8, 8, 8)))
    ctx = _ctx()
    ctx.gpu = True
    with pytest.raises(_Stop):
        bm_stem.run(ctx)
    case = seen[0]
    assert case.name == "conv alone"
    impls = {i.name: i for i in case.impls}
    assert {n for n, i in impls.items() if i.baseline} == {"eager conv3d fp32", "eager conv3d bf16 CL"}
    ours = [i for i in case.impls if not i.baseline]
    assert sum("bf16" in i.name for i in ours) >= 3 and sum("fp32" in i.name for i in ours) >= 2
    for i in ours:
        if "bf16" in i.name:
            assert i.compare_to == ["eager conv3d bf16 CL"], i.name
            assert i.rtol is None  # the case's (bf16) tolerance
        else:
            assert "fp32" in i.name and i.compare_to == ["eager conv3d fp32"], i.name
            assert i.rtol is not None and i.rtol < case.rtol / 5, i.name


def test_stem_conv_alone_on_the_cpu_checks_fp32_rows_at_fp32_tolerance(monkeypatch):
    """The CPU case, run for real at a tiny size: the fp32 rows pass the fp32 tolerance they
    now get (1e-4 of max|ref|, not the bf16 rows' 3e-2), compared with the fp32 baseline."""
    real = common.Case.run
    cases = []

    def first_only(self):
        cases.append(self)
        real(self)
        raise _Stop

    monkeypatch.setattr(common.Case, "run", first_only)
    ctx = _ctx()
    with pytest.raises(_Stop):
        bm_stem.run(ctx)
    rows = _rows(ctx, "conv alone")
    ours = [r for r in rows.values() if not r["baseline"]]
    assert ours and all(r["status"] == common.OK for r in ours), ours
    for r in ours:
        assert set(r["speedup"]) == {"eager conv3d fp32"}
    assert all(i.rtol == 1e-4 for i in cases[0].impls if not i.baseline)


def test_augment_gpu_row_is_not_compared_with_the_cpu_torchio_row(monkeypatch):
    monkeypatch.setattr(bm_augment, "_torchio", lambda img, lab: (lambda: None))
    monkeypatch.setattr(bm_augment, "_monai", lambda img, lab: (lambda: None))
    monkeypatch.setattr(bm_augment, "_intensity_case", lambda *a, **k: None)
    ctx = _ctx()
    bm_augment._gpu(ctx, b=1, s=8)
    rows = _rows(ctx)
    torchio = rows["TorchIO RandomAffine per sample (CPU)"]
    assert torchio["status"] == common.OK and torchio["baseline"]  # still measured
    ours = rows["med3d_ext affine_resample_pair"]
    assert ours["status"] == common.OK
    assert set(ours["speedup"]) == {"eager affine_grid+grid_sample x2", "MONAI RandAffine per sample"}


# ----------------------------------------------------------------------------- 3. noise checked


def _intensity_rows(b=2, s=12):
    ctx = _ctx()
    size = (b, 1, s, s, s)
    img = torch.randn(size, generator=torch.Generator().manual_seed(0))
    lab = torch.randint(0, 8, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    theta = bm_augment.random_theta(b, "cpu")
    bm_augment._intensity_case(ctx, img, lab, theta, size, {}, 1, None)
    return _rows(ctx)


def test_intensity_rows_are_checked_with_the_noise_they_are_timed_with(monkeypatch):
    ours = _intensity_rows()["med3d_ext affine_resample_pair"]
    assert ours["status"] == common.OK and ours["max_abs_err"] < 1e-4
    real = med3d_ext.ops.affine_resample_pair

    def no_noise(*args, intensity=None, **kw):  # an epilogue that forgot the noise
        if intensity is not None:
            intensity = dict(intensity, noise_std=torch.zeros_like(intensity["noise_std"]))
        return real(*args, intensity=intensity, **kw)

    monkeypatch.setattr(med3d_ext.ops, "affine_resample_pair", no_noise)
    bad = _intensity_rows()["med3d_ext affine_resample_pair"]
    assert bad["status"] == common.FAILED and "median_ms" not in bad, bad


# ----------------------------------------------------------------------------- 4. no vacuous pass


def test_an_empty_comparison_fails():
    assert not common.compare(1.0, 2.0, 1e-4, 1e-5)[0]
    assert not common.compare(1.0, 1.0, 1e-4, 1e-5)[0]  # nothing was compared, equal or not
    assert not common.compare((), (), 1e-4, 1e-5)[0]
    assert not common.compare(torch.empty(0), torch.empty(0), 1e-4, 1e-5)[0]
    assert not common.compare_ratio(1.0, 2.0, [], 2.0, 1e-4, 1e-5)[0]
    with pytest.raises(ValueError, match="nothing to check"):
        common.output_errors(1.0, 2.0)
    assert common.compare(torch.ones(3), torch.ones(3), 0, 0)[0]


def test_a_row_returning_python_numbers_is_not_passed():
    ctx = _ctx()
    case = ctx.case("t", "numbers")
    case.add("ref", lambda: (lambda: 1.0), baseline=True, reference=True)
    case.add("ours", lambda: (lambda: 2.0))
    rows = {r["impl"]: r for r in case.run()}
    assert rows["ours"]["status"] == common.FAILED and "nothing compared" in rows["ours"]["reason"]


# ----------------------------------------------------------------------------- 5. --append


def _results(tmp_path, env):
    (tmp_path / "results.json").write_text(json.dumps({
        "env": env, "args": {"areas": ["loss", "stem"], "quick": True, "device": "cpu", "with_compile": False},
        "rows": [{"area": "loss"}, {"area": "stem"}], "areas": {"loss": {}, "stem": {}}}))


def test_append_refuses_another_machine_or_version_of_the_code(tmp_path):
    env = common.collect_env("cpu")
    _results(tmp_path, env)
    # the same machine and code (gpu_check.sh's stages): appended, collecting this run's env
    prior = common.load_prior(str(tmp_path), "cpu", True, ["loss"])
    assert [r["area"] for r in prior["rows"]] == ["stem"]
    for field, other in (("cpu", "another CPU"), ("gpu", "NVIDIA H100 80GB HBM3"), ("torch", "2.0.0"),
                         ("cuda", "11.8"), ("cudnn", 8000), ("git_commit", "abc1234"),
                         ("source_hash", "0" * 16)):
        _results(tmp_path, dict(env, **{field: other}))
        with pytest.raises(ValueError, match=f"--append: .*another environment .*{field}="):
            common.load_prior(str(tmp_path), "cpu", True, ["loss"], env=env)


def test_append_of_another_commit_is_refused_before_measuring(tmp_path, capsys):
    env = dict(common.collect_env("cpu"), git_commit="0000000", torch="1.0.0")
    _results(tmp_path, env)
    before = (tmp_path / "results.json").read_text()
    rc = bench_main.main(["loss", "--append", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "git_commit='0000000'" in err and "torch='1.0.0'" in err
    assert (tmp_path / "results.json").read_text() == before
