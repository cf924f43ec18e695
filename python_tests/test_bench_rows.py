"""Benchmark checks that must be able to fail (benchmarks/bm_train_step.py, bm_pipeline.py)."""

from __future__ import annotations

import torch

from benchmarks import bm_pipeline, bm_train_step
from python_tests.test_benchmarks import _rows, _run, _train_step_rows


def test_train_step_check_catches_a_dropped_weight_gradient(monkeypatch, one_thread):
    """A fused layer that loses its weight gradient leaves the stem's gradient (the data path)
    and the loss untouched: the check compares one probe per stage too, and fails."""
    def drop(model):
        model.layer2[0].conv1.weight.register_hook(torch.zeros_like)

    bad = _train_step_rows(monkeypatch, drop)["med3d_ext fused"]
    assert bad["status"] == "FAILED" and "median_ms" not in bad, bad
    probes = [n for n in bm_train_step.GRAD_PROBES]
    # the loss is output 0, so layer2.0.conv1.weight is output 1 + its probe index
    assert f"output {1 + probes.index('layer2.0.conv1.weight')}" in bad["reason"], bad["reason"]


def test_grad_probes_cover_every_stage_and_the_head():
    from med3d_ext.models import resnet3d

    m = resnet3d(10)
    named = {id(p): n for n, p in m.named_parameters()}
    got = [named[id(p)] for p in bm_train_step.grad_probes(m)]
    assert got[:len(bm_train_step.GRAD_PROBES)] == list(bm_train_step.GRAD_PROBES)
    assert got[-1] == list(named.values())[-1] and got[-1].startswith("conv_seg")
    assert len(bm_train_step.floors_for(bm_train_step.FLOORS["fp32"], m)) == 1 + len(got)


def test_pipeline_row_with_a_non_finite_loss_is_failed_not_ok(tmp_path, monkeypatch):
    """Its rows check only that the training loss is finite; a NaN one was kept "ok" (the check's
    text said so) and its time published as a speed-up."""
    real_attr = bm_pipeline.m3d_attr

    def nan_model(path):
        fn = real_attr(path)
        if path != "models.build_transfer_model":
            return fn

        def build(*args, **kwargs):
            model = fn(*args, **kwargs)
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return model
        return build

    monkeypatch.setattr(bm_pipeline, "m3d_attr", nan_model)
    data = _run(tmp_path, "pipeline")
    wait = _rows(data, "pipeline")
    wait = [r for r in wait if r["case"] == "ResNet-10 step data wait"]
    assert wait, data["areas"]["pipeline"]
    for r in wait:
        assert r["status"] == "FAILED" and "non-finite training loss" in r["reason"], r
        assert "median_ms" not in r and not r.get("speedup"), r
