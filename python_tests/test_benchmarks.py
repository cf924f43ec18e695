"""The benchmark suite itself: CPU quick runs of cheap areas, missing ops, wrong kernels, broken
areas, the comparison rule, and the README publisher."""

from __future__ import annotations

import json

import pytest
import torch

import med3d_ext as m3d
from benchmarks import __main__ as bench_main
from benchmarks import bm_pipeline, common, publish


def _run(tmp_path, *argv):
    rc = bench_main.main([*argv, "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# med3d_ext benchmarks")
    return data


def _rows(data, area, impl=None):
    return [r for r in data["rows"] if r["area"] == area and (impl is None or r["impl"] == impl)]


def test_quick_cpu_areas_write_rows_with_env(tmp_path):
    data = _run(tmp_path, "bn_stats", "loss")
    env = data["env"]
    for key in ("torch", "python", "device", "cudnn", "med3d_ext", "date_utc", "cpu_count"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert "extension_loaded" in env["med3d_ext"]
    assert set(data["areas"]) == {"bn_stats", "loss"}
    for area in ("bn_stats", "loss"):
        rows = _rows(data, area)
        assert rows, area
        for r in rows:
            assert r["status"] in ("ok", "unavailable"), r  # nothing FAILED or crashed on the CPU
            assert r["params"], r
        refs = [r for r in rows if r["reference"]]
        assert refs and all(r["status"] == "ok" and r["median_ms"] > 0 for r in refs)
    # bn_stats exists in this package: a real, checked row with a ratio against the reference
    (ours,) = _rows(data, "bn_stats", "med3d_ext")
    assert ours["status"] == "ok" and ours["max_abs_err"] < 1e-3
    assert set(ours["speedup"]) == {"eager torch.var_mean"} and ours["speedup"]["eager torch.var_mean"] > 0
    # the loss op either ran and matched the reference, or is recorded as unavailable
    for r in _rows(data, "loss"):
        if r["impl"].startswith("med3d_ext") and r["status"] == "unavailable":
            assert "multihead_seg_loss" in r["reason"]


def test_missing_op_is_unavailable_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.delattr(m3d.ops, "bn_stats")
    data = _run(tmp_path, "bn_stats", "pipeline")
    (ours,) = _rows(data, "bn_stats", "med3d_ext")
    assert ours["status"] == "unavailable"
    assert ours["reason"] == "med3d_ext.ops has no bn_stats"
    assert "median_ms" not in ours
    # the reference row was still timed, and the placeholder area says why it did not run
    assert _rows(data, "bn_stats", "eager torch.var_mean")[0]["status"] == "ok"
    assert _rows(data, "pipeline")[0]["status"] == "unavailable"


def test_wrong_kernel_is_failed_and_not_timed(tmp_path, monkeypatch):
    real = m3d.ops.bn_stats

    def wrong(x, **kw):
        mean, var = real(x, **kw)
        return mean + 0.5, var

    monkeypatch.setattr(m3d.ops, "bn_stats", wrong)
    data = _run(tmp_path, "bn_stats")
    (ours,) = _rows(data, "bn_stats", "med3d_ext")
    assert ours["status"] == "FAILED"
    assert ours["max_abs_err"] == pytest.approx(0.5, rel=1e-3)
    assert "median_ms" not in ours and "speedup" not in ours


def test_broken_area_does_not_stop_the_suite(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("area exploded")

    monkeypatch.setattr(bm_pipeline, "run", boom)
    data = _run(tmp_path, "pipeline", "convergence")
    assert "area exploded" in data["areas"]["pipeline"]["error"]
    assert _rows(data, "pipeline")[0]["status"] == "error"
    assert _rows(data, "convergence")[0]["status"] == "unavailable"


def test_unknown_area_names_the_closest(capsys):
    with pytest.raises(SystemExit):
        bench_main.parse_args(["los"])
    assert "did you mean loss" in capsys.readouterr().err


def test_compare_rule():
    e = torch.randn(100) * 10
    ok, err, _ = common.compare(e + 1e-4, e, rtol=1e-4, atol=1e-5)
    assert ok and err == pytest.approx(1e-4, rel=1e-2)
    ok, _, msg = common.compare(e + 1.0, e, rtol=1e-4, atol=1e-5)
    assert not ok and "max abs err" in msg
    lab = torch.randint(0, 5, (1000,))
    flipped = lab.clone()
    flipped[0] = (lab[0] + 1) % 5
    assert common.compare(flipped, lab, 0, 0, label_mismatch=1e-2)[0]  # one tie broken differently
    assert not common.compare((lab + 1) % 5, lab, 0, 0)[0]
    assert not common.compare(torch.zeros(3, 4), torch.zeros(4, 4), 0, 0)[0]
    assert common.compare(torch.zeros(1, 64), torch.zeros(64), 0, 0)[0]  # same values, squeezed shape


def test_publish_renders_ratios_and_replaces_only_the_block(tmp_path):
    run = tmp_path / "results" / "2026-11-26_h200"
    data = _run(run, "bn_stats")
    section = publish.render(publish.load_runs(str(tmp_path / "results")))
    assert "2026-11-26_h200" in section and f"torch {data['env']['torch']}" in section
    assert "x vs eager torch.var_mean" in section and "shape 2x16x16x16x16" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{publish.BEGIN}\nold table\n{publish.END}\noutro\n")
    rc = publish.main(["--write", "--results", str(tmp_path / "results"), "--readme", str(readme)])
    text = readme.read_text()
    assert rc == 0 and "old table" not in text and "x vs eager torch.var_mean" in text
    assert text.startswith("intro\n") and text.endswith(f"{publish.END}\noutro\n")
    readme.write_text("no markers\n")
    assert publish.main(["--write", "--results", str(tmp_path / "results"), "--readme", str(readme)]) == 1
