"""The benchmark suite itself: CPU quick runs of cheap areas, missing ops, wrong kernels, broken
areas, the comparison rules (direct, and error ratio vs a high-precision reference), and the
README publisher."""

from __future__ import annotations

import json
import os

import pytest
import torch

import med3d_ext as m3d
from benchmarks import __main__ as bench_main
from benchmarks import bm_pipeline, bm_train_step, common, convergence_study, publish


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
    real_attr = bm_pipeline.m3d_attr

    def no_transforms(path):
        if path.startswith("transforms"):
            raise common.Unavailable("med3d_ext has no transforms")
        return real_attr(path)

    monkeypatch.setattr(bm_pipeline, "m3d_attr", no_transforms)
    data = _run(tmp_path, "bn_stats", "pipeline")
    (ours,) = _rows(data, "bn_stats", "med3d_ext")
    assert ours["status"] == "unavailable"
    assert ours["reason"] == "med3d_ext.ops has no bn_stats"
    assert "median_ms" not in ours
    # the reference row was still timed, and an area missing a subpackage says why it did not run
    assert _rows(data, "bn_stats", "eager torch.var_mean")[0]["status"] == "ok"
    (pipe,) = _rows(data, "pipeline")
    assert pipe["status"] == "unavailable" and "transforms" in pipe["reason"]


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

    def stand_in(ctx):  # the real study trains networks for a minute
        ctx.record("convergence", "transfer vs scratch", "-", common.UNAVAILABLE, "stand-in")

    monkeypatch.setattr(bm_pipeline, "run", boom)
    monkeypatch.setattr(convergence_study, "run", stand_in)
    data = _run(tmp_path, "pipeline", "convergence")
    assert "area exploded" in data["areas"]["pipeline"]["error"]
    assert _rows(data, "pipeline")[0]["status"] == "error"
    assert _rows(data, "convergence")[0]["reason"] == "stand-in"


def test_pipeline_area_quick_cpu(tmp_path):
    data = _run(tmp_path, "pipeline")
    rows = _rows(data, "pipeline")
    assert not data["areas"]["pipeline"].get("error"), data["areas"]["pipeline"]
    thr = [r for r in rows if r["case"] == "augmented batch on device"]
    wait = [r for r in rows if r["case"] == "ResNet-10 step data wait"]
    assert len(thr) == 3 and len(wait) == 3
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["params"]["patch"]
    base = [r for r in thr if r["baseline"]]
    assert len(base) == 1 and "grid_sample" in base[0]["impl"]
    for r in thr:
        assert r["volumes_s"] == pytest.approx(r["params"]["batch"] / (r["median_ms"] * 1e-3))
        if not r["baseline"]:
            assert set(r["speedup"]) == {base[0]["impl"]}
    for r in wait:
        assert 0.0 <= r["data_wait"] < 1.0 and r["check"].startswith("loss finite only")
    # their outputs are not compared with a reference: published tables say so (also for the
    # committed results' older wording)
    from benchmarks import rows as R
    for r in rows:
        assert R.unchecked(r) == (not r["baseline"]), r
    assert R.unchecked({"status": "ok", "check": "loss finite"})
    assert not R.unchecked({"status": "ok", "check": "max abs err 1e-7 vs reference"})


def _curve(steps, dice):
    return {"steps": list(steps), "dice": list(dice)}


def test_convergence_summary_steps_to_target():
    st = convergence_study.steps_to_target
    assert st([10, 20, 30], [0.1, float("nan"), 0.5], 0.4) == 30
    assert st([10, 20, 30], [0.1, 0.45, 0.3], 0.4) == 20  # the first crossing, not the last
    assert st([10, 20], [0.1, 0.2], 0.4) is None
    steps = [10, 20, 30, 40, 50]
    S, P = convergence_study.SCRATCH, convergence_study.OURS
    curves = {S: {0: _curve(steps, [0.0, 0.1, 0.2, 0.3, 0.4]), 1: _curve(steps, [0.0, 0.1, 0.2, 0.4, 0.6])},
              P: {0: _curve(steps, [0.2, 0.45, 0.5, 0.6, 0.6]), 1: _curve(steps, [0.1, 0.3, 0.4, 0.6, 0.7])}}
    s = convergence_study.summarize(curves)
    assert s["target"] == pytest.approx(0.5)  # mean final Dice from scratch
    sc, pre = s["arms"][S], s["arms"][P]
    assert sc["mean"] == pytest.approx([0.0, 0.1, 0.2, 0.35, 0.5])
    assert pre["max"] == pytest.approx([0.2, 0.45, 0.5, 0.6, 0.7])
    assert sc["steps_to_target"] == 50 and pre["steps_to_target"] == 40  # mean 0.45, then 0.6
    assert pre["speedup_vs_scratch"] == pytest.approx(50 / 40)
    # per seed: against that seed's own from-scratch final Dice (0.4 and 0.6)
    assert pre["steps_to_target_per_seed"] == {"0": 20, "1": 40}
    assert pre["final_mean"] == pytest.approx(0.65) and pre["dice_gain_vs_scratch"] == pytest.approx(0.15)
    assert pre["final_std"] == pytest.approx(0.0707107, rel=1e-5)
    # seed by seed: finals 0.4 -> 0.6 and 0.6 -> 0.7; steps to each seed's own target 50 -> 20, 50 -> 40
    paired = convergence_study._paired(sc, pre)
    assert "higher in 2 of 2 seeds (mean difference +0.150, sd 0.071)" in paired, paired
    assert "fewer steps in 2 of 2 seeds (ratios 2.5x, 1.2x)" in paired, paired
    s["seeds"], s["device"], s["sizes"] = [0, 1], "cpu", {"every": 10}
    s["pretrain"] = {"steps": 100}
    assert paired in convergence_study.reading(s)
    worse = convergence_study.summarize({S: curves[S], P: {0: _curve(steps, [0.0, 0.0, 0.0, 0.1, 0.3]),
                                                            1: _curve(steps, [0.0, 0.1, 0.2, 0.6, 0.7])}})
    assert "higher in 1 of 2 seeds" in convergence_study._paired(worse["arms"][S], worse["arms"][P])
    assert "fewer steps in 1 of 2 seeds (ratios 1.2x)" in convergence_study._paired(worse["arms"][S], worse["arms"][P])
    one = convergence_study.summarize({S: {0: curves[S][0]}, P: {0: curves[P][0]}})
    assert convergence_study._paired(one["arms"][S], one["arms"][P]) == ""  # one seed: no pairs
    # an arm that never gets there has no speed-up; mismatched validation steps are an error
    slow = {S: curves[S], P: {0: _curve(steps, [0.0] * 5)}}
    assert convergence_study.summarize(slow)["arms"][P]["speedup_vs_scratch"] is None
    with pytest.raises(ValueError, match="other steps"):
        convergence_study.summarize({S: {0: _curve(steps, [0.1] * 5), 1: _curve([1, 2, 3, 4, 5], [0.1] * 5)}})
    with pytest.raises(ValueError, match="from scratch"):
        convergence_study.summarize({P: curves[P]})


def test_unknown_area_names_the_closest(capsys):
    with pytest.raises(SystemExit):
        bench_main.parse_args(["los"])
    assert "did you mean loss" in capsys.readouterr().err


def test_unwritable_out_is_refused_before_measuring(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("")
    with pytest.raises(SystemExit):  # was: a NotADirectoryError traceback after the first case
        bench_main.parse_args(["bn_stats", "--out", str(f / "res")])
    err = capsys.readouterr().err
    assert "--out" in err and str(f / "res") in err and "Not a directory" in err


def test_quick_convergence_study_never_writes_into_dated_results(monkeypatch):
    """`convergence_study --quick` (a smoke test) wrote into benchmarks/results/<date>_cpu-
    convergence/, overwriting the committed study when run on its date."""
    from benchmarks import convergence_study

    seen = {}

    def fake(out, **kw):
        seen["out"] = out
        raise ValueError("stop here")  # reported as an error line; nothing trained
    monkeypatch.setattr(convergence_study, "run_study", fake)
    assert convergence_study.main(["--quick", "--device", "cpu"]) == 2
    parts = os.path.normpath(seen["out"]).split(os.sep)
    assert parts[-3:] == ["results", "latest", "convergence-quick"]
    assert convergence_study.main(["--device", "cpu"]) == 2  # a full study keeps its dated name
    assert os.path.basename(seen["out"]).endswith("_cpu-convergence")


def test_convergence_study_size_overrides(monkeypatch, capsys):
    """--cases / --pretrain-steps / --transfer-steps give a longer study; values that the
    recipe cannot run are refused before anything is generated or trained, naming the flag."""
    from benchmarks import convergence_study as cs

    base = cs.study_sizes(False, False)
    sz = cs.study_sizes(False, False, cases=12, pretrain_steps=4 * base["pre_steps"],
                        transfer_steps=3 * base["every"])
    assert (sz["cases"], sz["pre_epochs"], sz["evals"]) == (12, 4, 3)
    assert sz["pre_epochs"] * sz["pre_steps"] == 4 * base["pre_steps"]
    assert {k: v for k, v in sz.items() if k not in ("cases", "pre_epochs", "evals")} == \
        {k: v for k, v in base.items() if k not in ("cases", "pre_epochs", "evals")}
    for flags, needle in ((["--cases", "3"], "--cases must be at least 4"),
                          (["--cases", "0"], "--cases must be a positive integer"),
                          (["--pretrain-steps", str(base["pre_steps"] + 1)], "--pretrain-steps must be a multiple"),
                          (["--transfer-steps", str(base["every"] + 1)], "--transfer-steps must be a multiple"),
                          (["--transfer-steps", "-25"], "--transfer-steps must be a positive")):
        monkeypatch.setattr(cs, "write_outputs", lambda *a, **k: pytest.fail("wrote outputs"))
        assert cs.main(["--device", "cpu", "--out", "/nonexistent/never-made", *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err, (flags, err)


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


def test_error_ratio_rule():
    exact = [torch.tensor(2.0), torch.randn(50) * 3]
    ref_err = [1e-3, 1e-2]  # the reference implementation's own errors
    near = [exact[0] + 1.5e-3, exact[1] + 1.5e-2]  # 1.5x the reference's error: passes
    ok, err, ratio, _ = common.compare_ratio(near, exact, ref_err, 2.0, 0.0, 0.0)
    assert ok and err == pytest.approx(1.5e-2, rel=1e-3) and ratio == pytest.approx(1.5, rel=1e-3)
    far = [exact[0] + 1.5e-3, exact[1] + 3e-2]  # 3x on the second output: fails, and says which
    ok, _, ratio, msg = common.compare_ratio(far, exact, ref_err, 2.0, 0.0, 0.0)
    assert not ok and msg.startswith("output 1:") and ratio == pytest.approx(3.0, rel=1e-3)
    # the floor is per output: atol + rtol * max|precise|
    assert common.compare_ratio(far, exact, ref_err, 2.0, [0.0, 0.02 / exact[1].abs().max().item()], 0.0)[0]
    assert not common.compare_ratio(far, exact, ref_err, 2.0, [0.5, 0.0], 0.0)[0]
    assert common.compare_ratio(far, exact, ref_err, 2.0, 0.0, 0.011)[0]
    assert not common.compare_ratio([exact[0] + float("nan"), exact[1]], exact, ref_err, 2.0, 1.0, 1.0)[0]
    assert not common.compare_ratio(exact[:1], exact, ref_err, 2.0, 0.0, 0.0)[0]  # an output missing
    assert common.output_errors(near, exact) == pytest.approx([1.5e-3, 1.5e-2], rel=1e-3)
    with pytest.raises(ValueError, match="float outputs"):
        common.output_errors([torch.ones(2, dtype=torch.long)], [torch.ones(2, dtype=torch.long)])


def test_high_precision_context():
    with common.high_precision("cpu") as dt:
        assert dt == torch.float64
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:  # the flags exist without a GPU: the GPU branch is checkable here
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with pytest.raises(RuntimeError, match="inside"):
            with common.high_precision("cuda") as dt:
                assert dt == torch.float32
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _ratio_case(ctx, precise):
    """reference: error 1e-3 of the exact x; a row 1.5x as far (passes), one 3x (FAILS)."""
    x = torch.linspace(-1, 1, 64, dtype=torch.float64)
    case = ctx.case("unit", "ratio", rtol=0.0, atol=1e-6, precise=precise or (lambda: x.clone()))
    case.add("eager", lambda: lambda: x.float() + 1e-3, baseline=True, reference=True)
    case.add("close", lambda: lambda: x.float() - 1.5e-3)
    case.add("far", lambda: lambda: x.float() + 3e-3)
    return {r["impl"]: r for r in case.run()}


def test_error_ratio_case_rows():
    ctx = common.Context("cpu", quick=True, with_compile=False)
    ctx.warmup, ctx.repeats = 0, 1
    rows = _ratio_case(ctx, None)
    assert rows["eager"]["status"] == "ok" and rows["eager"]["max_abs_err"] == pytest.approx(1e-3, rel=1e-3)
    assert "yardstick" in rows["eager"]["check"]
    assert rows["close"]["status"] == "ok" and rows["close"]["err_ratio"] == pytest.approx(1.5, rel=1e-3)
    assert set(rows["close"]["speedup"]) == {"eager"}
    far = rows["far"]
    assert far["status"] == "FAILED" and "high-precision reference" in far["reason"]
    assert "median_ms" not in far and far["err_ratio"] == pytest.approx(3.0, rel=1e-3)
    assert "(1.5x ref)" in common.markdown({"env": {}, "args": {}, "total_s": 0, "rows": list(rows.values())})

    def broken():
        raise RuntimeError("no float64 here")

    rows = _ratio_case(ctx, broken)  # timed, and plainly marked as not checked
    for r in rows.values():
        assert r["status"] == "ok" and "no float64 here" in r["check"] and "not checked" in r["check"]


def test_units_per_call_are_divided_before_rows_are_printed_and_saved(monkeypatch, capsys):
    # the pipeline area times windows of w batches and divided the rows by w after they had
    # been printed and saved: a run cut short kept per-window values labelled ms per batch
    ctx = common.Context("cpu", quick=True, with_compile=False)
    ctx.warmup, ctx.repeats = 0, 3
    saved = []
    ctx.on_rows = lambda: saved.append([dict(r) for r in ctx.rows])
    monkeypatch.setattr(common, "time_fn", lambda *a, **k: [40.0, 44.0, 48.0])  # ms per call
    case = ctx.case("demo", "window", params={})
    case.units_per_call = 4
    case.add("w", lambda: (lambda: None), baseline=True, check=False)
    row = case.run()[0]
    assert row["status"] == "ok"
    assert row["median_ms"] == 11.0 and row["min_ms"] == 10.0
    assert saved and saved[0][0]["median_ms"] == 11.0  # saved already divided
    assert "11.000" in capsys.readouterr().out


def _train_step_rows(monkeypatch, perturb=None):
    """The CPU quick train_step area (ResNet-10 fp32), one timed repeat per row."""
    if perturb is not None:
        real = bm_train_step.fused_copy

        def perturbed(model, source):
            m = real(model, source)
            perturb(m)
            return m
        monkeypatch.setattr(bm_train_step, "fused_copy", perturbed)
    ctx = common.Context("cpu", quick=True, with_compile=False)
    ctx.warmup, ctx.repeats, ctx.budget_s = 0, 1, 0.0
    bm_train_step.run(ctx)
    return {r["impl"]: r for r in ctx.rows}


def test_train_step_check_passes_fused_and_fails_a_perturbed_model(monkeypatch, one_thread):
    rows = _train_step_rows(monkeypatch)
    eager, fused = rows["eager"], rows["med3d_ext fused"]
    assert eager["params"]["x"] == list(bm_train_step.CPU_SHAPES[True]) and eager["params"]["dtype"] == "fp32"
    # the high-precision reference is the same model on the same input: fp32 eager is close to it
    assert eager["status"] == "ok" and 0 < eager["max_abs_err"] < 1e-4
    assert fused["status"] == "ok" and fused["max_abs_err"] < 1e-3 and fused["median_ms"] > 0, fused
    assert fused["note"] == common.op_backend("conv_bn_relu3d", "cpu")

    def nudge(model):  # a kernel that is slightly wrong: one layer's weights off by 1% noise
        w = model.layer3[0].conv2.weight
        with torch.no_grad():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.01 * w.std())

    bad = _train_step_rows(monkeypatch, nudge)["med3d_ext fused"]
    assert bad["status"] == "FAILED" and "median_ms" not in bad, bad
    assert "output 0" in bad["reason"]  # the loss, whose floor is tight, catches it


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
    # a caveat added to a committed row after the fact is shown beside its name
    row = next(r for r in data["rows"] if not r.get("baseline") and r.get("speedup"))
    row["caveat"] = "measured before a fix"
    text = publish.render_run("r", data)
    assert f"{row['impl']} [measured before a fix] |" in text


def test_convergence_area_rows_from_the_study(tmp_path, monkeypatch):
    # the study itself trains for minutes (benchmarks/results holds a real run); here its
    # summary is a synthetic one and the area must turn it into one checked row per arm
    S, P = convergence_study.SCRATCH, convergence_study.OURS
    steps = [4, 8, 12]
    seen = {}

    def fake_study(out, *, seeds, device, quick, log, **kw):
        seen.update(seeds=seeds, device=device, quick=quick)
        s = convergence_study.summarize({S: {k: _curve(steps, [0.1, 0.2, 0.3]) for k in seeds},
                                         P: {k: _curve(steps, [0.3, 0.4, 0.4]) for k in seeds}})
        for a in s["arms"].values():
            a["ms_per_step"] = 12.5
        s.update(transfer_task="Task11_Kidney", sizes={"patch": [16, 16, 8], "batch": 2, "every": 4, "evals": 3},
                 pretrain={"steps": 12})
        return s

    monkeypatch.setattr(convergence_study, "run_study", fake_study)
    data = _run(tmp_path, "convergence")
    assert seen == {"seeds": (0, 1), "device": "cpu", "quick": True}
    rows = {r["impl"]: r for r in _rows(data, "convergence")}
    assert set(rows) == {S, P} and rows[S]["baseline"] and not rows[P]["baseline"]
    assert rows[P]["steps_to_target"] == 4 and rows[S]["steps_to_target"] == 12
    assert rows[P]["convergence_speedup"] == pytest.approx(3.0)
    assert rows[P]["final_dice"] == pytest.approx(0.4) and rows[P]["dice_gain"] == pytest.approx(0.1)
    assert rows[P]["params"]["target_dice"] == pytest.approx(0.3)
    assert "convergence" in (tmp_path / "results.md").read_text()


def test_profile_lists_each_rows_ops(tmp_path):
    """--profile: every timed row carries what one call ran (here the CPU ops): the fused loss
    is our op plus allocations, the eager loop is many ATen ops; the markdown shows both."""
    data = _run(tmp_path, "loss", "--profile")
    rows = [r for r in _rows(data, "loss") if r["status"] == "ok"]
    assert rows and all("kernels" in r for r in rows)
    eager = next(r for r in rows if r["impl"] == "eager per-head loop")["kernels"]
    assert "error" not in eager and eager["per_call_us"] > 0
    names = {t["name"] for t in eager["top"]}
    assert any(n.startswith("aten::") for n in names)
    if m3d.ops.multihead_seg_loss is not None and m3d._extension.available():
        ours = next(r for r in rows if r["impl"] == "med3d_ext validate=False")["kernels"]
        assert any(t["name"].startswith("med3d_ext::multihead_seg_loss") for t in ours["top"])
        assert sum(t["calls"] for t in ours["top"]) < sum(t["calls"] for t in eager["top"])
    md = (tmp_path / "results.md").read_text()
    assert "## Where the time goes" in md and "eager per-head loop" in md.split("## Where")[1]


def test_profile_kernels_counts_calls():
    calls = []

    def fn():
        calls.append(1)
        return torch.ones(3) + torch.ones(3)

    k = common.profile_kernels(fn, "cpu", calls=4)
    assert len(calls) == 4
    add = next(t for t in k["top"] if t["name"] == "aten::add")
    assert add["calls"] == 1  # per call, not per profile


def _avg(key, us, count, device="DeviceType.CUDA", annotation=False):
    from types import SimpleNamespace

    return SimpleNamespace(key=key, self_device_time_total=us, count=count, device_type=device,
                           is_user_annotation=annotation, self_cpu_time_total=0.0)


def test_gpu_rows_leave_out_user_annotations_and_group_every_kernel():
    # torch.profiler lists a record_function span (an optimizer's step) on the GPU timeline with
    # the device time of the kernels inside it; counted, it was a 0.6 ms "kernel" of a ResNet-50
    # step, on top of those kernels. No GPU here: key_averages()-like rows stand in.
    avgs = [
        _avg("sm90_xmma_fprop_implicit_gemm_bf16bf16", 1400.0, 27),
        _avg("sm90_xmma_dgrad_implicit_gemm_bf16", 1100.0, 9),
        _avg("sm90_xmma_wgrad_indexed_implicit_gemm", 900.0, 9),
        _avg("void med3d_ext::cbr::reduce_nhwc<float, 8, med3d_ext::cbr::StatsAcc<c10::BFloat16",
             920.0, 162),
        _avg("void med3d_ext::cbr::stats_finish<c10::BFloat16, float>", 200.0, 162),
        _avg("void med3d_ext::cbr::reduce_nhwc<float, 8, med3d_ext::cbr::BackwardAcc<c10::B",
             1000.0, 150),
        _avg("void med3d_ext::cbr::elementwise_nhwc<float, 8, med3d_ext::cbr::ForwardOp<c10",
             700.0, 150),
        _avg("void med3d_ext::cbr::elementwise_nhwc<float, 8, (anonymous namespace)::PoolGather"
             "Op<c10::BFloat16>", 500.0, 3),
        _avg("void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>, SGD", 300.0, 6),
        _avg("void at::native::vectorized_elementwise_kernel<4, bfloat16_copy_kernel_cuda", 150.0,
             300),
        _avg("Memset (Device)", 5.0, 3),
        _avg("some_unknown_kernel", 1.0, 3),
        _avg("Optimizer.step#SGD.step", 600.0, 3, annotation=True),
        _avg("aten::add", 0.0, 3, device="DeviceType.CPU"),
    ]
    rows = common.op_rows(avgs, gpu=True, calls=3)
    assert "Optimizer.step#SGD.step" not in {r["name"] for r in rows}
    assert rows[0]["us"] == pytest.approx(1400.0 / 3) and rows[0]["calls"] == 9
    assert sum(r["calls"] for r in rows) == pytest.approx(984 / 3)  # all but the annotation
    fam = {f["family"]: f for f in common.kernel_families(rows)}
    assert sum(f["us"] for f in fam.values()) == pytest.approx(sum(r["us"] for r in rows))
    want = {"cuDNN conv fprop": 1400, "cuDNN conv dgrad": 1100, "cuDNN conv wgrad": 900,
            "med3d_ext BN statistics": 1120, "med3d_ext BN backward reduce": 1000,
            "med3d_ext BN forward apply": 700, "med3d_ext stem pool": 500, "optimizer": 300,
            "ATen element-wise (casts, ReLU, adds)": 150, "memcpy / memset": 5, "other": 1}
    assert {k: round(v["us"] * 3) for k, v in fam.items()} == want
    assert list(fam)[0] == "cuDNN conv fprop"  # largest first
    # our own kernels are ours whatever else their names say; cuDNN's non-conv kernels apart
    assert common.kernel_family("void med3d_ext::(anonymous namespace)::implicit_gemm_fprop_"
                                "kernel<c10::BFloat16>") == "med3d_ext stem GEMM / im2col"
    assert common.kernel_family("void med3d_ext::implicit_gemm_wgrad_kernel<float>") == \
        "med3d_ext stem GEMM / im2col"
    assert common.kernel_family("void at::native::max_pool3d_with_indices_single_out_frame") \
        == "ATen pooling"
    assert common.kernel_family("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>") == \
        "cuDNN BatchNorm"
    assert common.kernel_family("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>") == \
        "cuDNN layout transforms"


def test_profile_kernels_launches_are_per_call(monkeypatch):
    # the rows' calls are per call already; the launch count divided them by the calls again
    import torch.profiler as tp

    class FakeProfile:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [_avg("k1", 300.0, 30), _avg("k2", 30.0, 3),
                    _avg("Optimizer.step#SGD.step", 330.0, 3, annotation=True)]

    monkeypatch.setattr(tp, "profile", FakeProfile)
    monkeypatch.setattr(common, "sync", lambda device: None)
    k = common.profile_kernels(lambda: None, "cuda", calls=3)
    assert k["launches"] == pytest.approx(11.0)  # 33 kernels over 3 calls, not the annotation
    assert k["per_call_us"] == pytest.approx(110.0)


def test_summarize_windows_skips_the_first():
    from benchmarks.train_throughput import summarize_windows

    rows = [{"step": 2, "samples_s": 1.0, "voxels_s": 10.0, "data_wait": 0.5},
            {"step": 4, "samples_s": 4.0, "voxels_s": 40.0, "data_wait": 0.1},
            {"step": 6, "samples_s": 6.0, "voxels_s": 60.0, "data_wait": 0.3}]
    s = summarize_windows(rows)
    assert s["samples_s"] == 5.0 and s["voxels_s"] == 50.0 and s["windows"] == 2
    assert abs(s["data_wait"] - 0.2) < 1e-12 and s["steps"] == 6
    assert s["window_samples_s"] == [1.0, 4.0, 6.0]  # every window, the first included
    assert summarize_windows(rows[:1])["samples_s"] == 1.0
    # 3 prefetched batches: the window of steps 3-4 still started inside them
    s = summarize_windows(rows, prefetched=3)
    assert s["samples_s"] == 6.0 and s["windows"] == 1
    assert summarize_windows(rows, prefetched=100)["windows"] == 2  # none left: all after the first
    with pytest.raises(ValueError, match="no training windows"):
        summarize_windows([])


@pytest.mark.slow
def test_train_throughput_quick_cpu(tmp_path, monkeypatch):
    """The CLI-path throughput study end to end on tiny CPU sizes: both arms run the real
    pretraining and report the loop's own numbers."""
    from benchmarks import train_throughput

    monkeypatch.setenv("MED3D_EXT_CACHE", str(tmp_path / "cache"))
    assert train_throughput.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "t"),
                                  "--profile", "--label-grids", "patch,logits"]) == 0
    r = json.loads((tmp_path / "t" / "throughput.json").read_text())
    base = {n for n, _ in train_throughput.ARMS}
    assert set(r["arms"]) == base | {f"{n} [--label-grid logits]" for n in base}
    assert set(r["fused_vs_plain_by_label_grid"]) == {"patch", "logits"}
    assert r["fused_vs_plain"] == r["fused_vs_plain_by_label_grid"]["patch"]
    for a in r["arms"].values():
        assert a["samples_s"] > 0 and a["voxels_s"] == pytest.approx(a["samples_s"] * 16 * 16 * 8)
        # the measured windows stop at the measured steps; the profiled ones come after
        assert 0 <= a["data_wait"] < 1 and a["steps"] == 6
        assert a["profile"]["steps"] == train_throughput.PROFILE_STEPS and a["profile"]["top_ops"]
    assert r["fused_vs_plain"] > 0
    md = (tmp_path / "t" / "throughput.md").read_text()
    assert "| med3d_ext fused |" in md and "costliest ops" in md
    assert (tmp_path / "t" / "profile" / "med3d_ext" / "ops.txt").is_file()
    assert (tmp_path / "t" / "profile" / "plain" / "summary.json").is_file()
    assert "with --label-grid logits" in md
    assert (tmp_path / "t" / "profile" / "plain-logits" / "summary.json").is_file()
    with pytest.raises(SystemExit):
        train_throughput.main(["--steps", "1"])
    with pytest.raises(SystemExit):
        train_throughput.main(["--label-grids", "patch,voxels"])


def test_reading_names_every_extra_arm():
    S, P, R = convergence_study.SCRATCH, convergence_study.OURS, convergence_study.WITH_REAL
    steps = [4, 8, 12, 16]
    s = convergence_study.summarize({S: {0: _curve(steps, [0.1, 0.1, 0.2, 0.3])},
                                     P: {0: _curve(steps, [0.2, 0.3, 0.3, 0.3])},
                                     R: {0: _curve(steps, [0.0, 0.1, 0.1, 0.2])}})
    s.update(device="cpu", seeds=[0], sizes={"every": 4}, pretrain={"steps": 12})
    text = convergence_study.reading(s)
    assert ("at step 8 (the validation nearest half the 16-step budget) the mean validation Dice "
            "is 0.300 pretrained against 0.100") in text
    assert f"'{R}' arm: final Dice 0.200" in text and "-0.100 vs scratch" in text
    assert "target not reached" in text


@pytest.mark.slow
def test_study_with_real_volumes_quick(tmp_path, monkeypatch):
    """--with-real adds an arm pretrained on the synthetic domains + nilearn's MNI152 task."""
    pytest.importorskip("nilearn")
    monkeypatch.setenv("MED3D_EXT_CACHE", str(tmp_path / "cache"))
    s = convergence_study.run_study(tmp_path / "out", seeds=(0,), device="cpu", quick=True,
                                    with_real=True, log=lambda *a: None)
    assert set(s["arms"]) == {convergence_study.SCRATCH, convergence_study.OURS,
                              convergence_study.WITH_REAL}
    assert s["pretrain_real"]["steps"] == s["pretrain"]["steps"]
    assert len(s["arms"][convergence_study.WITH_REAL]["steps"]) == 3
    assert convergence_study.WITH_REAL in (tmp_path / "out" / "convergence.md").read_text()


def test_publish_never_writes_fewer_tables_than_asked(tmp_path, capsys):
    """A mistyped --results, or a named run that cannot be read, left the README with "No
    committed benchmark results yet." and exit 0."""
    results = tmp_path / "results"
    _run(results / "2026-11-26_h200", "bn_stats")
    readme = tmp_path / "README.md"
    body = f"intro\n{publish.BEGIN}\nold table\n{publish.END}\n"
    readme.write_text(body)
    assert publish.main(["--write", "--results", str(tmp_path / "typo"), "--readme", str(readme)]) == 2
    assert "no such folder" in capsys.readouterr().err and readme.read_text() == body
    broken = results / "2026-11-27_cpu"
    broken.mkdir()
    (broken / "results.json").write_bytes(b'{"rows": [\xff')  # neither JSON nor UTF-8
    assert publish.main(["--write", "--results", str(results), "--readme", str(readme)]) == 2
    assert "2026-11-27_cpu/results.json" in capsys.readouterr().err and readme.read_text() == body
    # --print skips it with a message and shows the rest
    assert publish.main(["--print", "--results", str(results)]) == 0
    out = capsys.readouterr()
    assert "skipping" in out.err and "2026-11-26_h200" in out.out
    with pytest.raises(SystemExit):
        publish.main(["--print", "--results", str(results), "--max-runs", "0"])


@pytest.mark.parametrize("content", ['[]', '{"env": null, "args": null, "rows": []}',
                                     '{"env": {"date_utc": null}, "rows": [{"status": "FAILED"}]}',
                                     '{"rows": [{"area": "a", "case": "c", "impl": "i", '
                                     '"status": "ok", "speedup": {"eager": 2.0}}]}'])
def test_publish_renders_partial_results_without_a_traceback(tmp_path, content, capsys):
    run = tmp_path / "results" / "2026-11-26_x"
    run.mkdir(parents=True)
    (run / "results.json").write_text(content)
    rc = publish.main(["--print", "--results", str(tmp_path / "results")])
    assert ("skipping" in capsys.readouterr().err) == (content == "[]")
    # a list is no results file (skipped with a message); the partial ones render
    assert rc == 0


def test_bench_refused_arguments_leave_no_folder_and_areas_run_once(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        bench_main.parse_args(["resampel", "--out", str(out)])
    assert not out.exists() and "did you mean resample" in capsys.readouterr().err
    assert bench_main.parse_args(["resample", "resample", "--out", str(out)]).areas == ["resample"]
    (out / "results.json").write_text('{"args": null, "rows": []}')
    with pytest.raises(ValueError, match="--append: cannot read .*'args' must be an object"):
        common.load_prior(str(out), "cpu", True, ["loss"])


def test_append_refuses_a_run_of_another_kind(tmp_path):
    """One results.json holds one kind of run, which its args say: --append with another device,
    --quick or --with-compile is refused (the compiled rows of one call and not of another would
    otherwise sit under one with_compile flag)."""
    (tmp_path / "results.json").write_text(json.dumps({
        "args": {"areas": ["loss", "stem"], "quick": True, "device": "cpu", "with_compile": False},
        "rows": [{"area": "loss"}, {"area": "stem"}], "areas": {"loss": {}, "stem": {}}}))
    prior = common.load_prior(str(tmp_path), "cpu", True, ["loss"], with_compile=False)
    assert [r["area"] for r in prior["rows"]] == ["stem"] and list(prior["areas"]) == ["stem"]
    for kw, what in ((dict(with_compile=True), "with_compile=False"),
                     (dict(quick=False), "quick=True"), (dict(device="cuda"), "device=cpu")):
        call = dict(device="cpu", quick=True, with_compile=False) | kw
        with pytest.raises(ValueError, match=f"--append: .*holds a run with .*{what}"):
            common.load_prior(str(tmp_path), call["device"], call["quick"], ["loss"],
                              call["with_compile"])


def test_info_names_composite_kernels():
    from med3d_ext.ops._common import dispatch_keys

    if not m3d._extension.available():
        pytest.skip("needs the compiled extension")
    keys = dispatch_keys("med3d_ext::seg_loss_check_labels")
    assert keys[0].startswith("CompositeExplicitAutograd")


def test_convergence_study_checks_arguments_before_any_work(tmp_path, capsys):
    """A bad --seeds, --head-lr or --medicalnet file was found after the pretraining (and two
    transfer arms); --device/--out/--render mistakes ended in tracebacks."""
    nan = tmp_path / "nan.pth"
    sd = {k: v.clone() for k, v in m3d.models.resnet3d(10).state_dict().items()
          if not k.startswith("conv_seg.")}
    sd["layer1.0.bn1.running_var"][0] = float("nan")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, nan)
    out = tmp_path / "out"
    cases = [(["--seeds", "0", "0"], "distinct non-negative"), (["--seeds", "-1"], "distinct"),
             (["--head-lr", "nan"], "--head-lr: a positive"), (["--medicalnet", str(tmp_path)],
                                                                "is a folder"),
             (["--medicalnet", str(nan)], "NaN/Inf value"), (["--device", "bogus"], "bogus"),
             (["--render", str(tmp_path / "none.json")], "--render")]
    for args, msg in cases:
        assert convergence_study.main(["--quick", "--out", str(out), *args]) == 2, args
        assert msg in capsys.readouterr().err, args
    assert not out.exists()


def test_memory_peak_breakdown_replays_the_allocator_trace():
    """benchmarks.memory_peak: the peak is found by replaying alloc / free_requested, and the
    blocks live at it are grouped by the innermost model-code frame (autograd-engine blocks as
    'backward'); blocks freed before the peak do not count."""
    from benchmarks.memory_peak import peak_breakdown

    fwd = [{"filename": "/x/site-packages/torch/autograd/graph.py", "line": 1, "name": "apply"},
           {"filename": "/work/main/med3d_ext/nn/fused.py", "line": 77, "name": "conv_bn_act"}]
    bwd = [{"filename": "/x/site-packages/torch/autograd/__init__.py", "line": 9, "name": "backward"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": fwd},
        {"action": "alloc", "addr": 2, "size": 50, "frames": fwd},
        {"action": "alloc", "addr": 3, "size": 200, "frames": bwd},   # transient, freed below
        {"action": "free_requested", "addr": 3, "size": 200},
        {"action": "alloc", "addr": 4, "size": 300, "frames": bwd},   # peak: 100 + 50 + 300
        {"action": "free_completed", "addr": 3, "size": 200},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 5, "size": 10, "frames": []},
    ]
    r = peak_breakdown(trace, baseline=1000)
    assert r["step_peak_bytes"] == 450 and r["peak_bytes"] == 1450
    by = {g["where"]: (g["bytes"], g["blocks"]) for g in r["groups"]}
    # the 200-byte block was freed before the peak; the groups are largest first
    assert by == {"backward (autograd engine)": (300, 1), "med3d_ext/nn/fused.py:77 conv_bn_act": (150, 2)}
    assert r["groups"][0]["where"] == "backward (autograd engine)"
    # a block allocated before the trace (in the baseline: last step's gradients) and freed in
    # it (zero_grad(set_to_none=True)) lowers the current count: the new gradients replace
    # the old ones, not add to them (the benchmark review: counted twice before)
    trace = [{"action": "free_requested", "addr": 99, "size": 400},
             {"action": "alloc", "addr": 1, "size": 400, "frames": bwd}]
    r = peak_breakdown(trace, baseline=1000)
    assert r["step_peak_bytes"] == 0 and r["peak_bytes"] == 1000


def test_memory_peak_needs_a_gpu(capsys):
    import torch

    from benchmarks import memory_peak

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert memory_peak.main(["--out", "/nonexistent/never-written"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_memory_peak_timeline_replay():
    """--device cpu: torch.profiler's memory timeline is replayed the same way: the peak counts
    every live tensor, tensors that existed before the step are the baseline line, the others
    are grouped by category and maker; a new version replaces the old one's size."""
    from types import SimpleNamespace

    from benchmarks.memory_peak import timeline_breakdown

    A = {n: SimpleNamespace(name=n) for n in ("PREEXISTING", "CREATE", "INCREMENT_VERSION",
                                               "DESTROY")}
    tl = [(0, A["PREEXISTING"], ("param", 0), 1000),
          (1, A["CREATE"], ("act1", 0), 100),
          (2, A["CREATE"], ("tmp", 0), 150),                # freed before the peak
          (3, A["DESTROY"], ("tmp", 0), 150),
          (4, A["CREATE"], ("act2", 0), 200),
          (5, A["INCREMENT_VERSION"], ("act2", 0), 250),   # grows in place: 1000+100+250
          (6, A["CREATE"], ("grad", 0), 40),               # the peak: 1390
          (7, A["DESTROY"], ("act1", 0), 100),
          (8, A["CREATE"], ("late", 0), 80)]               # 1370 < 1390
    cats = {"act1": "activation", "act2": "activation", "grad": "gradient"}
    r = timeline_breakdown(tl, lambda k, v: cats.get(k, "unknown"), lambda k: f"op_{k}")
    assert r["peak_bytes"] == 1390 and r["baseline_bytes"] == 1000
    assert r["step_peak_bytes"] == 390
    by = {g["where"]: (g["bytes"], g["blocks"]) for g in r["groups"]}
    assert by == {"activation: op_act2": (250, 1), "activation: op_act1": (100, 1),
                  "gradient: op_grad": (40, 1)}
    assert [g["where"] for g in r["groups"]][0] == "activation: op_act2"


def test_memory_peak_timeline_replay_counts_anonymous_allocations_by_size():
    """Allocations without a tensor identity share one key per device in the profiler's
    timeline; they are a signed running sum (a dict keyed by them let overlapping ones
    overwrite each other and overstated the peak)."""
    from types import SimpleNamespace

    from benchmarks.memory_peak import timeline_breakdown

    A = {n: SimpleNamespace(name=n) for n in ("PREEXISTING", "CREATE", "DESTROY")}
    anon = ("cpu-anon", 0)
    tl = [(0, A["CREATE"], anon, 100), (1, A["CREATE"], anon, 50),   # 150 live: the peak
          (2, A["DESTROY"], anon, 100), (3, A["DESTROY"], anon, 50),
          (4, A["CREATE"], ("t", 0), 120), (5, A["DESTROY"], ("t", 0), 120)]
    r = timeline_breakdown(tl, lambda k, v: "activation", lambda k: "op",
                           anonymous=lambda k: k == "cpu-anon")
    assert r["peak_bytes"] == 150 and r["baseline_bytes"] == 0
    assert r["groups"] == [{"where": "allocations without a tensor (workspaces, ...)",
                            "bytes": 150, "blocks": 0}]
    # anonymous memory from before the step is baseline; a re-allocation without a recorded
    # free (INCREMENT_VERSION) is a new allocation
    A["INCREMENT_VERSION"] = SimpleNamespace(name="INCREMENT_VERSION")
    tl = [(0, A["PREEXISTING"], anon, 300), (1, A["CREATE"], anon, 40),
          (2, A["INCREMENT_VERSION"], anon, 60), (3, A["DESTROY"], anon, 60)]
    r = timeline_breakdown(tl, lambda k, v: "activation", lambda k: "op",
                           anonymous=lambda k: k == "cpu-anon")
    assert r["peak_bytes"] == 400 and r["baseline_bytes"] == 300 and r["step_peak_bytes"] == 100
    assert r["groups"][0]["bytes"] == 100


def test_memory_peak_on_the_cpu(tmp_path, capsys):
    """The CPU mode end to end on a ResNet-10 step of batch 1: the fused step's peak lies
    between what it holds before the step and a generous bound, the groups name our op, and
    the memory-saving arm (blocks' inner activations recomputed) peaks no higher."""
    import json

    from benchmarks import memory_peak

    pytest.importorskip("torch.profiler._memory_profiler")
    out = tmp_path / "mem"
    assert memory_peak.main(["--device", "cpu", "--depth", "10", "--batch", "1",
                             "--arms", "fused,memory-saving", "--out", str(out)]) == 0
    res = json.loads((out / "peak.json").read_text())["results"]
    fused, saving = res
    params = 14.4e6 * 4  # ResNet-10's parameters (fp32) and SGD's momentum, at least
    assert 2 * params < fused["peak_bytes"] < 2 * 2**30, fused["peak_bytes"]
    assert fused["baseline_bytes"] >= 2 * params
    assert any("med3d_ext::conv_bn_relu3d" in g["where"] for g in fused["groups"])
    assert saving["peak_bytes"] <= fused["peak_bytes"]
    assert "ResNet-10 fused: peak" in (out / "peak.md").read_text()


@pytest.mark.parametrize("args,msg", [(["--arms", "fused,nope"], "--arms"),
                                      (["--batch", "0"], "--batch")])
def test_memory_peak_refuses_bad_arguments(args, msg, capsys, tmp_path):
    from benchmarks import memory_peak

    with pytest.raises(SystemExit) as e:
        memory_peak.main(["--device", "cpu", "--out", str(tmp_path / "m"), *args])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_caveats_and_unchecked_rows_are_shown_beside_the_name():
    """A caveat added to committed rows, and a timed row whose output was not checked, were
    invisible in results.md, the summaries and the README (the benchmark review)."""
    from benchmarks.common import headline, markdown
    from benchmarks.rows import caveats, unchecked

    base = {"area": "a", "case": "c", "params": {}, "status": "ok", "median_ms": 1.0}
    rows = [dict(base, impl="eager", baseline=True, reference=True),
            dict(base, impl="ours", baseline=False, speedup={"eager": 2.0},
                 check="high-precision reference unavailable (out of memory), not checked"),
            dict(base, impl="ours2", baseline=False, speedup={"eager": 3.0}, caveat="pre-fix",
                 check="the yardstick")]
    assert not unchecked(rows[0]) and unchecked(rows[1]) and not unchecked(rows[2])
    assert caveats(rows[2]) == " [pre-fix]"
    data = {"env": {}, "args": {}, "total_s": 1, "rows": rows}
    md = markdown(data)
    assert "| ours [output not checked: high-precision reference unavailable" in md
    assert "| ours2 [pre-fix] |" in md
    lines = headline(rows)
    assert any("ours [output not checked" in x for x in lines)
    assert any("ours2 [pre-fix]: 1.000 ms" in x for x in lines)


def test_the_bn_stats_baseline_times_var_mean_on_the_input_as_it_is(monkeypatch):
    """Its timed call was var_mean(x.float()): a bf16 -> fp32 copy of the input inside the
    baseline's time (the published bf16 ratio was mostly that copy). The check still uses fp32."""
    import torch

    from benchmarks import bm_bn_stats

    added = {}

    class FakeCase:
        def add(self, name, make, **kw):
            added[name] = make
            return self

        def run(self):
            pass

    class Ctx:
        device, gpu, quick, with_compile = "cpu", False, True, False

        def case(self, *a, **k):
            return FakeCase()

    seen = []
    real = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self: (seen.append(self.dtype), real(self))[1])
    bm_bn_stats.run(Ctx())
    timed, check = added["eager torch.var_mean"]()
    seen.clear()
    timed()
    assert seen == []  # no conversion in the timed call
    check()
    assert seen  # the check computes in fp32


def test_results_name_the_measured_sources(monkeypatch):
    """A run recorded a commit other than the code's (the device copy's git was stale): an
    explicit GIT_COMMIT wins, git's own view says "-dirty", and the extension's source hash is
    recorded as benchmarks/gpu_prebuild.sh --hash prints it (benchmark review)."""
    import subprocess
    from pathlib import Path

    from benchmarks.environment import collect_env, source_hash

    root = Path(__file__).resolve().parents[1]
    want = subprocess.run(["bash", str(root / "benchmarks/gpu_prebuild.sh"), "--hash"],
                          capture_output=True, text=True, timeout=120).stdout.strip()
    assert source_hash(str(root)) == want and len(want) == 16
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    env = collect_env("cpu")
    assert env["git_commit"] == "abc1234" and env["source_hash"] == want
    assert set(env["tf32"]) == {"cudnn_conv", "cuda_matmul"}


def test_reduce_overhead_rows_are_cuda_only_and_keep_no_peak_memory():
    # compile's reduce-overhead mode replays CUDA graphs: on the CPU the row is unavailable (not
    # a plain compile timed under another name), and on a GPU its memory, like the
    # hand-captured graphs', is a private pool outside the timed window
    ctx = common.Context("cpu", quick=True, with_compile=False)
    st = bm_train_step.Step(ctx, bm_train_step.CPU_SHAPES[True], False, False)
    model, _ = bm_train_step.base_model(10)
    with pytest.raises(common.Unavailable, match="CUDA only"):
        st.make(model, True, mode="reduce-overhead")
    assert common.replays_graphs("med3d_ext fused + compile reduce-overhead")
    assert common.replays_graphs("eager + CUDA graph")
    assert not common.replays_graphs("med3d_ext fused + compile")


@pytest.mark.slow
def test_train_throughput_compile_arm_quick_cpu(tmp_path, monkeypatch):
    """--compile-arms: the fused model under the CLI's --compile beside the fused arm (on the
    CPU without the reduce-overhead arm, which replays CUDA graphs)."""
    from benchmarks import train_throughput

    monkeypatch.setenv("MED3D_EXT_CACHE", str(tmp_path / "cache"))
    assert train_throughput.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "t"),
                                  "--compile-arms"]) == 0
    r = json.loads((tmp_path / "t" / "throughput.json").read_text())
    assert r["compile_arms"] == ["med3d_ext fused + compile"]
    arm = r["arms"]["med3d_ext fused + compile"]
    assert arm["samples_s"] > 0 and arm["steps"] == 6
    fused = r["arms"]["med3d_ext fused"]["samples_s"]
    assert r["compiled_vs_fused"]["med3d_ext fused + compile"] == pytest.approx(arm["samples_s"] / fused)
    md = (tmp_path / "t" / "throughput.md").read_text()
    assert "| med3d_ext fused + compile |" in md
    assert "med3d_ext fused + compile / med3d_ext fused samples/s" in md


def test_error_ratio_rows_say_which_output_passed_on_the_floor():
    # a loss both implementations compute almost exactly: the ratio of two tiny errors is
    # large (137x was seen) while the row passes on the rtol floor; the row says so
    ctx = common.Context("cpu", quick=True, with_compile=False)
    ctx.warmup, ctx.repeats = 0, 1
    x = torch.linspace(1, 3, 64, dtype=torch.float64)  # a loss of 128: a floor of 1.28
    case = ctx.case("unit", "floor", rtol=1e-2, atol=0.0, precise=lambda: (x.clone(), x.sum()))
    case.add("eager", lambda: lambda: (x + 1e-3, x.sum() + 1e-9), baseline=True, reference=True)
    case.add("tiny loss off", lambda: lambda: (x + 1e-3, x.sum() + 1e-6))
    rows = {r["impl"]: r for r in case.run()}
    row = rows["tiny loss off"]
    assert row["status"] == "ok" and row["err_ratio"] > 100
    by = {d["output"]: d for d in row["errors_by_output"]}
    assert by[1]["set_by"] == "floor" and by[1]["err"] > 100 * by[1]["ref_err"]
    assert by[1]["floor_only"] and not by[0]["floor_only"]
    assert by[0]["err"] == pytest.approx(1e-3, rel=1e-3) and by[0]["err"] <= by[0]["bound"]
    md = common.markdown({"env": {}, "args": {}, "total_s": 0, "rows": list(rows.values())})
    assert "x ref, inside the floor)" in md


def test_an_exact_reference_is_said_not_shown_as_an_infinite_ratio():
    # on the CPU the reference implementation runs in float64, as the high-precision one does:
    # its error is 0, every ratio is infinite, and the table said "(infx ref, inside the floor)"
    ctx = common.Context("cpu", quick=True, with_compile=False)
    ctx.warmup, ctx.repeats = 0, 1
    x = torch.linspace(1, 3, 64, dtype=torch.float64)
    case = ctx.case("unit", "exact", rtol=1e-2, atol=0.0, precise=lambda: x.clone())
    case.add("eager", lambda: lambda: x.clone(), baseline=True, reference=True)
    case.add("ours", lambda: lambda: x + 1e-9)
    rows = case.run()
    md = common.markdown({"env": {}, "args": {}, "total_s": 0, "rows": rows})
    assert "infx" not in md
    ours = next(line for line in md.splitlines() if line.startswith("| unit | exact | ours |"))
    assert "(reference exact: checked against the floor)" in ours


def test_publish_named_runs_are_all_printed_and_a_missing_one_is_an_error(tmp_path, capsys):
    # --max-runs (default 3) cut an explicit --runs list silently, and a mistyped run name
    # printed an empty section with exit 0
    from benchmarks import publish

    res = tmp_path / "res"
    for k in range(4):
        d = res / f"2026-11-2{k}_cpu"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"env": {}, "args": {}, "rows": []}))
    names = [f"2026-11-2{k}_cpu" for k in range(4)]
    assert publish.main(["--print", "--results", str(res), "--runs", *names]) == 0
    out = capsys.readouterr().out
    assert all(f"### {n}" in out for n in names)
    assert f"from `{res}`" in out  # the folder it read, not always benchmarks/results/
    assert publish.main(["--print", "--results", str(res)]) == 0  # unnamed: the newest 3
    assert capsys.readouterr().out.count("### ") == 3
    assert publish.main(["--print", "--results", str(res), "--runs", "nonexist"]) == 2
    assert "nonexist" in capsys.readouterr().err
