"""Benchmark reporting: the README publisher (missing and unchecked baselines, rows without a
ratio), the CLI throughput study's arm names and its prefetch fallback, the convergence
study's target, and memory_peak's arms (what an earlier arm leaves). Tiny fake inputs only:
nothing here trains or times anything."""

from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch

from benchmarks import common, convergence_study, memory_peak, publish, train_throughput

ENV = {"device": "cpu", "cpu": "test cpu", "torch": "2.x", "med3d_ext": {"med3d_ext": "0",
       "extension_loaded": True}, "date_utc": "2026-11-27T00:00:00"}


def _row(impl, ms, baseline=False, speedup=None, **kw):
    r = {"area": "a", "case": "c", "impl": impl, "baseline": baseline, "status": "ok",
         "median_ms": ms, "params": {"x": [2, 3]}}
    if speedup is not None:
        r["speedup"] = speedup
    r.update(kw)
    return r


def _render(rows):
    return publish.render_run("run", {"env": ENV, "rows": rows})


def _line(text, start):
    """The first line of ``text`` that starts with ``start`` (a row: "| a | c | <impl>")."""
    start = start if start.startswith(("|", "Not")) else f"| a | c | {start}"
    found = [ln for ln in text.splitlines() if ln.startswith(start)]
    assert found, f"no line starting with {start!r} in:\n{text}"
    return found[0]


# ----------------------------------------------------------------------------- publish


def test_failed_or_unavailable_baseline_is_listed_as_not_measured():
    """1(a): a baseline that was unavailable used to vanish with its ratio."""
    text = _render([_row("eager", 4.0, baseline=True, reference=True),
                    _row("torch.compile", None, baseline=True, status="unavailable"),
                    _row("TorchIO", None, baseline=True, status="error"),
                    _row("ours", 2.0, speedup={"eager": 2.0})])
    assert "2.00x vs eager (4.000)" in _line(text, "ours")
    not_measured = _line(text, "Not measured")
    assert "(2)" in not_measured
    assert "a/c baseline torch.compile: unavailable" in not_measured
    assert "a/c baseline TorchIO: error" in not_measured


def test_ok_row_without_a_baseline_is_listed_not_dropped():
    """1(b): an ok med3d_ext row with no ok baseline used to be dropped silently."""
    text = _render([_row("eager", None, baseline=True, status="unavailable"),
                    _row("ours", 1.25, speedup={})])
    line = _line(text, "ours")
    assert "| 1.250 |" in line and "no baseline measured" in line
    # a row whose baselines were measured but has no ratio (e.g. the convergence area's):
    # the baselines' times, not "no baseline"
    text = _render([_row("from scratch", 3.0, baseline=True), _row("ours", 2.0)])
    line = _line(text, "ours")
    assert "no ratio recorded" in line and "from scratch 3.000 ms" in line


def test_baseline_without_a_time_never_prints_a_number():
    """1(c): a ratio against a baseline with no time in the results printed "(0.000)"."""
    text = _render([_row("eager", None, baseline=True),  # ok, but no median
                    _row("ours", 2.0, speedup={"eager": 1.5, "ghost": 3.0, "none": None})])
    line = _line(text, "ours")
    assert "0.000" not in line
    assert "1.50x vs eager (baseline time not recorded)" in line
    assert "3.00x vs ghost (baseline time not recorded)" in line
    assert "vs none" not in line
    assert "a/c baseline eager: ok without a median" in text


def test_ratio_against_an_unchecked_baseline_is_marked():
    """1(d): a ratio against a baseline whose output was not compared carries a caveat."""
    mark = "[baseline output not checked]"
    rows = [_row("eager", 2.0, baseline=True, reference=True),  # the reference: no max_abs_err
            _row("checked", 3.0, baseline=True, max_abs_err=1e-6),
            _row("MONAI", 60.0, baseline=True, check="not comparable (different algorithm), not checked"),
            _row("own", 5.0, baseline=True, note="own conventions, same work; not compared"),
            _row("flag", 7.0, baseline=True, check=False),
            _row("cpu loader", 9.0, baseline=True, check="loss finite"),
            _row("ours", 1.0, speedup={"eager": 2.0, "checked": 3.0, "MONAI": 60.0, "own": 5.0,
                                       "flag": 7.0, "cpu loader": 9.0})]
    line = _line(_render(rows), "ours")
    for name, ms in (("MONAI", 60.0), ("own", 5.0), ("flag", 7.0), ("cpu loader", 9.0)):
        assert f"{ms:.2f}x vs {name} ({ms:.3f}) {mark}" in line, (name, line)
    for name, ms in (("eager", 2.0), ("checked", 3.0)):
        assert f"{ms:.2f}x vs {name} ({ms:.3f})," in line and f"{name} ({ms:.3f}) {mark}" not in line
    assert line.count(mark) == 4
    assert publish.BASELINE_UNCHECKED == mark
    assert mark in publish.render([("run", {"env": ENV, "rows": rows})])  # the header explains it


def test_every_committed_run_renders():
    """Every committed results.json renders: each run's heading, each timed med3d_ext row,
    each baseline that was not measured, and never a baseline time of 0.000."""
    names = publish.run_names(publish.RESULTS)
    assert names
    for name, data in publish.load_runs(publish.RESULTS, names, strict=True):
        text = publish.render_run(name, data)
        assert text.startswith(f"### {name}")
        rows = [r for r in data["rows"] if r.get("status") != "profiled" and r.get("impl") != "-"]
        for r in rows:
            if not r.get("baseline") and r.get("status") == "ok":
                assert f"| {r['area']} | {r['case']} | {r['impl']}" in text, (name, r["impl"])
            elif r.get("baseline") and r.get("status") != "ok":
                assert f"{r['area']}/{r['case']} baseline {r['impl']}: {r['status']}" in text \
                    or " ..." in text, (name, r["impl"])
        assert "(0.000)" not in text, name


def test_committed_h200_run_lists_its_unavailable_compile_baseline():
    name = "2026-11-27_h200-s18"
    if not os.path.isfile(os.path.join(publish.RESULTS, name, "results.json")):
        pytest.skip(f"{name} is not committed here")
    text = publish.render_run(name, publish.read_run(publish.RESULTS, name))
    assert "train_step/resnet50 bf16 autocast baseline torch.compile: unavailable" in text
    line = _line(text, "| augment | affine pair 8x128^3 |")
    assert "vs MONAI RandAffine per sample (64.620) [baseline output not checked]" in line


# ----------------------------------------------------------------------------- throughput


def _windows(steps, rate=2.0):
    return [{"step": s, "samples_s": rate * s, "voxels_s": 10.0 * s, "data_wait": 0.1} for s in steps]


def test_throughput_prefetch_fallback_is_recorded():
    """2: no window starting after the prefetched batches used to fall back silently."""
    s = train_throughput.summarize_windows(_windows([2, 4, 6]), prefetched=3)
    assert s["windows"] == 1 and s["prefetch_fallback"] is False
    s = train_throughput.summarize_windows(_windows([2, 4, 6]), prefetched=100)
    assert s["windows"] == 2 and s["prefetch_fallback"] is True and s["prefetched"] == 100
    assert train_throughput.summarize_windows(_windows([2]), prefetched=4)["prefetch_fallback"] is True
    assert train_throughput.summarize_windows(_windows([2, 4]))["prefetch_fallback"] is False


def _throughput_result(fallback: bool) -> dict:
    arm = train_throughput.summarize_windows(_windows([4, 8, 12]), prefetched=100 if fallback else 4)
    arm.update(wall_s=1.0)
    (fused, _), (plain, _) = train_throughput.ARMS
    return {"device": "cpu", "sizes": {"batch": 2, "patch": [16, 16, 8], "steps": 12, "workers": 2},
            "arms": {fused: dict(arm), plain: dict(arm)}, "label_grids": ["patch"],
            "fused_vs_plain": 1.0, "fused_vs_plain_by_label_grid": {"patch": 1.0},
            "compiled_vs_fused": {}}


def test_throughput_markdown_warns_of_the_fallback():
    md = train_throughput.markdown(_throughput_result(True))
    warn = "\n".join(ln for ln in md.splitlines() if "prefetched batches for" in ln)
    assert "Warning" in warn and "more --steps" in warn
    assert all(n in warn for n, _ in train_throughput.ARMS)
    assert "Warning" not in train_throughput.markdown(_throughput_result(False))


def test_throughput_arms_say_the_whole_stack_differs():
    """2: "fused / plain" compares the whole --fused / --no-fused stack (layers, loss, resize,
    augmentation), not the fused layers alone: the names and the text say so."""
    (fused, on), (plain, off) = train_throughput.ARMS
    assert on is True and off is False
    assert "--no-fused" in plain
    for part in ("layers", "loss", "resize", "augmentation"):
        assert part in plain, part
    # the profile folders keep their names (the first word of each arm)
    assert (fused.split()[0], plain.split()[0]) == ("med3d_ext", "plain")
    md = train_throughput.markdown(_throughput_result(False))
    assert "PlainAugment3D" in md and "RandomAugment3D" in md
    ratio = "\n".join(ln for ln in md.splitlines() if "samples/s: 1.00x" in ln)
    assert "whole-stack ratio" in ratio and "not the fused layers' speed-up alone" in ratio


# ----------------------------------------------------------------------------- convergence


def test_convergence_target_does_not_depend_on_the_seed_order():
    """3: the target summed the seeds in the given order, the mean curve in sorted order; with
    --seeds 2 0 1 these finals differ in the last bit and scratch missed its own target."""
    S, P = convergence_study.SCRATCH, convergence_study.OURS
    finals = {2: 0.87, 0: 0.43, 1: 0.06}  # the order --seeds 2 0 1 gives
    assert (0.87 + 0.43 + 0.06) / 3 != (0.43 + 0.06 + 0.87) / 3  # the one-bit difference
    curves = {S: {k: {"steps": [4, 8], "dice": [0.0, f]} for k, f in finals.items()},
              P: {k: {"steps": [4, 8], "dice": [f, f]} for k, f in finals.items()}}
    s = convergence_study.summarize(curves)
    assert s["target"] == s["arms"][S]["mean"][-1] == s["arms"][S]["final_mean"]
    assert s["arms"][S]["steps_to_target"] == 8
    assert s["arms"][P]["steps_to_target"] == 4
    assert s["arms"][P]["speedup_vs_scratch"] == pytest.approx(2.0)
    in_order = convergence_study.summarize({a: dict(sorted(c.items())) for a, c in curves.items()})
    assert in_order["target"] == s["target"]


# ----------------------------------------------------------------------------- memory_peak


def _tiny_step():
    """A step shaped like bm_train_step.Step.make's (closing over its optimizer), wrapped as
    the memory-saving arm's is."""
    m = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 8)

    def step():
        opt.zero_grad(set_to_none=True)
        m(x).sum().backward()
        opt.step()
    # (the flag keeps its value: only the wrapper matters here)
    return common.with_module_flag(step, "benchmarks.common", "OK", common.OK)


def test_memory_peak_state_bytes_finds_the_arms_optimizer():
    step = _tiny_step()
    params = (8 * 4 + 4) * 4
    assert memory_peak.state_bytes(step) == params  # before a step: no grads, no momentum
    step()
    assert memory_peak.state_bytes(step) == 3 * params  # parameters, grads, momentum
    assert memory_peak.state_bytes(lambda: None) is None


def _fake_result(arm, baseline, state, before_arm=None):
    return {"arm": arm, "depth": 10, "batch": 1, "baseline_bytes": baseline, "step_peak_bytes": 1,
            "peak_bytes": baseline + 1, "groups": [], "other_groups": 0, "other_bytes": 0,
            "max_allocated_bytes": None, "state_bytes": state, "allocated_before_arm_bytes": before_arm}


def test_memory_peak_says_when_before_the_step_is_well_above_the_arms_own_state():
    gib = 2 ** 30
    ok = _fake_result("eager", int(1.1 * gib), gib)
    bad = _fake_result("fused", 3 * gib, gib, before_arm=2 * gib)
    assert memory_peak.leftover(ok) is None and memory_peak.leftover(bad) == 2 * gib
    md = memory_peak.markdown([ok, bad], {"cpu": "test"}, "cpu")
    eager, fused = md.split("## ResNet-10 fused")
    assert "Warning" not in eager and "own parameters, gradients and optimizer state 1.000" in eager
    assert "**Warning**" in fused and "2.000 GiB above its own parameters" in fused
    assert "2.000 GiB was still allocated when the arm started" in fused


def test_memory_peak_collects_garbage_between_arms(tmp_path, monkeypatch, capsys):
    """4: what an arm leaves in a reference cycle is freed before the next arm starts (on a GPU
    it would otherwise count in that arm's "before the step"); a leftover is reported."""
    seen = {}

    class Leftover:
        pass

    def fake_measure(name, depth, batch=None):
        if name == "eager":  # an arm leaving a cycle behind: only the collector frees it
            a, b = Leftover(), Leftover()
            a.other, b.other = b, a
            seen["ref"] = weakref.ref(a)
            return _fake_result(name, 100, 100)
        seen["freed"] = seen["ref"]() is None
        return _fake_result(name, 3 * 2 ** 30, 2 ** 30)

    monkeypatch.setattr(memory_peak, "measure_cpu", fake_measure)
    monkeypatch.setattr(common, "collect_env", lambda device: {"cpu": "test", "torch": "x"})
    was = gc.isenabled()
    gc.disable()  # only memory_peak's own collection may free the cycle
    try:
        rc = memory_peak.main(["--device", "cpu", "--arms", "eager,fused", "--out", str(tmp_path)])
    finally:
        if was:
            gc.enable()
    assert rc == 0 and seen["freed"] is True
    out = json.loads((tmp_path / "peak.json").read_text())
    assert [r["arm"] for r in out["results"]] == ["eager", "fused"]
    assert "fused: the memory before the step is 2.000 GiB above" in capsys.readouterr().err
    assert "**Warning**" in (tmp_path / "peak.md").read_text()
