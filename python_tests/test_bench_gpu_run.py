"""What a GPU session relies on, checked on the CPU: the stages of benchmarks/gpu_check.sh
(--append into one results file, --profile-only, peak memory over the timed calls only), the
areas' GPU-only branches at small sizes, a missing nibabel, and the convergence study's
--medicalnet arm."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import __main__ as bench_main
from benchmarks import bm_pipeline, bm_train_step, common, convergence_study


def _run(tmp_path, *argv):
    rc = bench_main.main([*argv, "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    return json.loads((tmp_path / "results.json").read_text())


def _rows(data, area):
    return [r for r in data["rows"] if r["area"] == area]



def test_append_merges_areas_and_replaces_rerun_ones(tmp_path):
    """gpu_check.sh writes one results.json from several stages: --append keeps the other
    areas' rows, replaces those of an area run again, and refuses a run of another kind."""
    _run(tmp_path, "bn_stats")
    data = _run(tmp_path, "resample", "--append")
    assert set(data["areas"]) == {"bn_stats", "resample"} and data["args"]["areas"] == ["bn_stats", "resample"]
    n_bn = len(_rows(data, "bn_stats"))
    assert n_bn and _rows(data, "resample")
    data = _run(tmp_path, "bn_stats", "--append")
    assert len(_rows(data, "bn_stats")) == n_bn and _rows(data, "resample")
    assert [r["area"] for r in data["rows"]][-n_bn:] == ["bn_stats"] * n_bn
    # without --quick: another kind of run, not mixed into this file
    assert bench_main.main(["bn_stats", "--append", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == len(data["rows"])


def test_profile_only_rows_are_profiled_not_timed(tmp_path):
    data = _run(tmp_path, "bn_stats", "--profile-only")
    assert data["args"]["profile_only"] is True
    rows = _rows(data, "bn_stats")
    assert rows and all(r["status"] == common.PROFILED for r in rows)
    for r in rows:
        assert "median_ms" not in r and "speedup" not in r and r["kernels"]["per_call_us"] > 0
        assert "not timed" in r["reason"] and "not checked" in r["check"]
    assert "Where the time goes" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--profile-only", "--append"])


def test_time_fn_calls_after_warmup_once_between_warmup_and_timing():
    calls = []
    times = common.time_fn(lambda: calls.append("call"), "cpu", 2, 3, after_warmup=lambda: calls.append("reset"))
    assert calls[:3] == ["call", "call", "reset"] and "reset" not in calls[3:] and len(times) == len(calls) - 3


def test_gpu_branches_on_the_cpu(monkeypatch, one_thread):
    """The areas' GPU-only code (ctx.gpu: bf16 autocast, channels_last_3d, the pair/elastic
    augmentation cases, MONAI per sample, ResNet steps with the fp32 anchor, the stem at the
    model's layout) run on the CPU at small sizes: a GPU session must not be the first to run
    them. Every row must be ok or unavailable."""
    from benchmarks import bm_augment, bm_bn_stats, bm_loss, bm_stem

    ctx = common.Context("cpu", quick=True, with_compile=False)
    ctx.gpu = True
    monkeypatch.setattr(ctx, "can_compile", lambda: (False, "no compile in this test"))
    monkeypatch.setattr(bm_train_step, "GPU_SHAPE", (2, 1, 8, 16, 16))
    monkeypatch.setattr(bm_train_step, "GPU_DEPTHS", (10,))
    monkeypatch.setattr(bm_stem, "GPU_INPUT", (1, (8, 16, 16)))
    monkeypatch.setattr(bm_bn_stats, "GPU_CASES", [((2, 8, 4, 6, 6), torch.bfloat16, True)])
    gpu_aug = bm_augment._gpu
    monkeypatch.setattr(bm_augment, "_gpu", lambda c: gpu_aug(c, b=2, s=12))
    real_case = bm_loss._case

    def small(c, name, heads, batch, spatial, dtype, **kw):
        return real_case(c, name, heads, batch, tuple(max(2, s // 8) for s in spatial), dtype, **kw)
    monkeypatch.setattr(bm_loss, "_case", small)
    for mod in (bm_bn_stats, bm_stem, bm_augment, bm_loss, bm_train_step):
        mod.run(ctx)
    bad = [(r["area"], r["case"], r["impl"], r["status"], r.get("reason")) for r in ctx.rows
           if r["status"] not in ("ok", "unavailable")]
    assert not bad, bad
    names = {(r["area"], r["case"], r["impl"]) for r in ctx.rows if r["status"] == "ok"}
    for want in [("augment", "affine pair 2x12^3", "med3d_ext affine_resample_pair"),
                 ("augment", "affine+elastic+intensity pair 2x12^3", "med3d_ext affine_resample_pair"),
                 ("stem", "conv alone", "eager conv3d bf16 CL"),
                 ("train_step", "resnet10 bf16 autocast", "med3d_ext fused")]:
        assert want in names, want
    # the loss's CUDA-graph rows (ours and the loop's) are there, and say why not here
    graphed = [r for r in ctx.rows if r["area"] == "loss" and r["impl"].endswith("CUDA graph")]
    assert {r["impl"] for r in graphed} == {"eager per-head loop, CUDA graph",
                                            "med3d_ext validate=False, CUDA graph"}
    assert all(r["status"] == "unavailable" and "need a CUDA device" in r["reason"] for r in graphed)
    fused = next(r for r in ctx.rows if r["impl"] == "med3d_ext fused")
    assert fused["params"]["layout"] == "channels_last_3d" and fused["err_ratio"] is not None


def test_pipeline_without_nibabel_is_unavailable(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel -> ImportError
    ctx = common.Context("cpu", quick=True, with_compile=False)
    bm_pipeline.run(ctx)
    (row,) = ctx.rows
    assert row["status"] == "unavailable" and "nibabel" in row["reason"]


def _medicalnet_file(path, depth=10):
    """A MedicalNet-layout file (as released: {"state_dict": {"module.<encoder key>": ...}},
    no segmentation head) with random weights."""
    from med3d_ext.models import encoder_state_dict, resnet3d

    torch.manual_seed(5)
    net = resnet3d(depth)
    sd = {"module." + k: v for k, v in encoder_state_dict(net).items()}
    assert not any(k.startswith("module.conv_seg") for k in sd)
    torch.save({"state_dict": sd}, path)
    return path, sd


def test_study_medicalnet_arm_loads_the_users_weights(tmp_path, monkeypatch):
    """--medicalnet PATH: a third arm transfers from the user's MedicalNet-layout file (its
    encoder really loaded: every encoder tensor, nothing missing) with the same budget."""
    import med3d_ext.models as models

    path, sd = _medicalnet_file(tmp_path / "resnet_10.pth")
    tiny = dict(convergence_study.study_sizes(False, True), pre_epochs=1, pre_steps=2, every=2, evals=2)
    monkeypatch.setattr(convergence_study, "study_sizes", lambda gpu, quick, *sizes: dict(tiny))
    monkeypatch.setenv("MED3D_EXT_CACHE", str(tmp_path / "cache"))
    reports = []
    real_build = models.build_transfer_model

    def spy(*a, **kw):
        model, report = real_build(*a, **{**kw, "return_report": True})
        reports.append((kw.get("weights"), report))
        return (model, report) if kw.get("return_report") else model
    monkeypatch.setattr(models, "build_transfer_model", spy)
    s = convergence_study.run_study(tmp_path / "out", seeds=(0,), device="cpu", quick=True, medicalnet=path,
                                    threads=1, log=lambda *a: None)
    M = convergence_study.MEDICALNET
    assert set(s["arms"]) == {convergence_study.SCRATCH, convergence_study.OURS, M}
    assert s["medicalnet"] == str(path) and s["arms"][M]["steps"] == s["arms"][convergence_study.SCRATCH]["steps"]
    loaded = [r for w, r in reports if w == str(path)]
    assert loaded, [w for w, _ in reports]
    for r in loaded:
        assert r.source_format == "medicalnet" and r.depth == 10
        assert len(r.loaded) == len(sd) and not [k for k in r.missing if not k.startswith("conv_seg")]
    assert s["medicalnet_arch"]["depth"] == 10 and s["medicalnet_arch"]["shortcut"] in ("A", "B")
    assert "(ResNet-10, shortcut" in (tmp_path / "out" / "convergence.md").read_text()
    # a file that is no MedicalNet ResNet fails before any training
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(ValueError):
        convergence_study.run_study(tmp_path / "o3", seeds=(0,), device="cpu", quick=True, medicalnet=bad,
                                    log=lambda *a: None)
    assert not (tmp_path / "o3").exists()
    # the CLI checks the path before training anything
    assert convergence_study.main(["--quick", "--medicalnet", str(tmp_path / "nope.pth"),
                                   "--out", str(tmp_path / "o2")]) == 2



def test_study_stopped_mid_way_keeps_the_finished_seeds(tmp_path, monkeypatch):
    """The GPU run gives the study a time limit: its outputs are written after every seed, so a
    study stopped in seed 1 still leaves seed 0's summary, marked partial; the finished study
    overwrites it without the mark."""
    import med3d_ext.train.cli as cli

    tiny = dict(convergence_study.study_sizes(False, True), pre_epochs=1, pre_steps=2, every=2, evals=2)
    monkeypatch.setattr(convergence_study, "study_sizes", lambda gpu, quick, *sizes: dict(tiny))
    monkeypatch.setenv("MED3D_EXT_CACHE", str(tmp_path / "cache"))
    real = cli.run_transfer

    def stopped_in_seed_1(cfg, **kw):
        if cfg["seed"] == 1:
            raise KeyboardInterrupt  # what the time limit's signal becomes
        return real(cfg, **kw)
    monkeypatch.setattr(cli, "run_transfer", stopped_in_seed_1)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convergence_study.run_study(out, seeds=(0, 1), device="cpu", quick=True, threads=1,
                                    log=lambda *a: None)
    s = json.loads((out / "convergence.json").read_text())
    assert s["seeds"] == [0] and s["partial"] == "1 of 2 seeds ([0, 1]) finished"
    assert all(set(by) == {"0"} for by in s["curves"].values())
    assert "**Partial: 1 of 2 seeds" in (out / "convergence.md").read_text()
    monkeypatch.setattr(cli, "run_transfer", real)
    s = convergence_study.run_study(out, seeds=(0, 1), device="cpu", quick=True, threads=1,
                                    log=lambda *a: None)
    assert s["partial"] is None and s["seeds"] == [0, 1]
    assert "Partial" not in (out / "convergence.md").read_text()
