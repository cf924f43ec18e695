"""--profile START:STEPS: a real run writes its profile of the chosen steps, and bad specs are
refused with the option's name."""

from __future__ import annotations

import json

import pytest
import torch

from med3d_ext.train.cli import main
from med3d_ext.train.profiling import parse_spec

from .conftest import tiny_args

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


def test_profile_writes_the_chosen_steps(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    # 2 epochs x 2 steps: skip 1 step, profile 2 (the second crosses the epoch's validation)
    rc = main(["pretrain", *tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"],
                                      "--profile", "1:2")])
    assert rc == 0
    prof = out / "profile"
    summary = json.loads((prof / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["device"] == "cpu"
    assert summary["wall_ms_per_step"] > 0 and summary["host_op_ms_per_step"] > 0
    assert summary["kernel_ms_per_step"] is None  # no GPU here
    names = [op["name"] for op in summary["top_ops"]]
    # the steps' real work is in it: the fused loss op and a convolution at least
    assert any("multihead_seg_loss" in n for n in names) or any("conv" in n for n in names), names
    assert "Self CPU" in (prof / "ops.txt").read_text()
    trace = json.loads((prof / "trace.json").read_text())
    assert trace.get("traceEvents"), "empty trace"
    assert "profile: 2 steps" in capsys.readouterr().out


def test_profile_past_the_end_writes_nothing_and_says_so(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", *tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"],
                                      "--epochs", 1, "--profile", "5:1")])
    assert rc == 0
    assert not (out / "profile").exists()
    assert "steps 6..6 were not reached" in capsys.readouterr().out


def test_a_run_resumed_inside_the_window_profiles_the_rest(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"])
    assert main(["pretrain", *args, "--epochs", 1]) == 0  # 2 steps
    capsys.readouterr()
    rc = main(["pretrain", *args, "--epochs", 2, "--resume", out, "--profile", "1:3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "resumed at step 2, inside --profile 1:3; profiling steps 3..4" in text, text
    assert json.loads((out / "profile" / "summary.json").read_text())["steps"] == 2


def test_a_failing_profiler_does_not_replace_the_run(tiny_data, tmp_path, monkeypatch, capsys):
    from med3d_ext.train import profiling

    def broken(self, prof, wall):
        raise RuntimeError("disk full")
    monkeypatch.setattr(profiling.StepProfiler, "_write", broken)
    out = tmp_path / "run"
    rc = main(["pretrain", *tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"],
                                      "--profile", "0:1")])
    assert rc == 0
    assert "could not write" in capsys.readouterr().out and not (out / "profile" / "summary.json").exists()


@pytest.mark.parametrize("spec", ["5", "a:b", "-1:2", "3:0", "1:2:3", "1.5:2"])
def test_bad_profile_specs_are_refused(spec, tiny_data, tmp_path, capsys):
    with pytest.raises(ValueError, match="START:STEPS"):
        parse_spec(spec)
    rc = main(["pretrain", *tiny_args(tiny_data["pretrain"], tmp_path / "r", "--cache",
                                      tiny_data["cache"], f"--profile={spec}")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "profile" in err and spec in err and "quote it" in err, err


def test_parse_spec():
    assert parse_spec(None) is None and parse_spec("") is None
    assert parse_spec("0:1") == (0, 1) and parse_spec("20:5") == (20, 5)


def test_sync_recorder_counts_sync_warnings_by_site_and_shows_the_others(monkeypatch):
    import warnings

    import med3d_ext.train.profiling as P

    # the recorder as on a GPU, with torch's sync debug mode stubbed (no CUDA here): torch's
    # sync warnings are counted by site, not shown; every other warning goes through the
    # caller's filters and display as before (once per location, module filters, errors)
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: modes.append(m))
    shown = []

    def display(m, c, f, n, file=None, line=None):
        shown.append(str(m))
    monkeypatch.setattr(warnings, "showwarning", display)
    rec = P.SyncRecorder(cuda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # once per location
        warnings.filterwarnings("ignore", message="ignored by the caller")
        with rec:
            for _ in range(3):
                warnings.warn_explicit(P.SYNC_WARNING, UserWarning, "/x/med3d.py", 107)
                warnings.warn_explicit(P.SYNC_WARNING, UserWarning,
                                       "/py/torch/autograd/graph.py", 9)
                warnings.warn("other", UserWarning)  # one location, three times
                warnings.warn("ignored by the caller", UserWarning)
            assert warnings.showwarning is not display  # the recorder's, in the window
        assert warnings.showwarning is display  # restored on exit
    assert modes == ["warn", 0]
    assert shown == ["other"]  # once, as the caller's "default" filter says
    s = rec.summary(steps=2)
    assert s["host_syncs_per_step"] == 3.0
    assert s["host_sync_sites"] == [{"where": "/x/med3d.py:107", "per_step": 1.5},
                                    {"where": "<backward>", "per_step": 1.5}]
    # an "error" filter still raises at the warning, inside the window, as without it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (python -W error), then the profiled window
        r2 = P.SyncRecorder(cuda=True).__enter__()
        with pytest.raises(UserWarning, match="raised"):
            warnings.warn("raised", UserWarning)
        warnings.warn(P.SYNC_WARNING)  # counted, not raised
        r2.__exit__(None, None, None)
    assert sum(r2.sites.values()) == 1
    # on the CPU the recorder is inert: nothing to wait for, and no sync mode is touched
    modes.clear()
    with P.SyncRecorder(cuda=False) as cpu:
        pass
    assert modes == [] and cpu.summary(3) == {"host_syncs_per_step": None, "host_sync_sites": []}


def test_runtime_calls_keeps_the_cuda_api_rows_costliest_first():
    from types import SimpleNamespace

    from med3d_ext.train.profiling import runtime_calls

    rows = [SimpleNamespace(key=k, count=c, cpu_time_total=t) for k, c, t in (
        ("cudaLaunchKernel", 800, 4000.0), ("cudaStreamSynchronize", 4, 80000.0),
        ("aten::add", 100, 900.0), ("cudnnConvolutionForward", 8, 50.0),
        ("cutlass_80_tensorop_gemm", 9, 9e9), ("cuLaunchKernel", 40, 200.0))]
    out = runtime_calls(rows, steps=4)
    assert [r["name"] for r in out] == ["cudaStreamSynchronize", "cudaLaunchKernel",
                                        "cuLaunchKernel"]
    assert out[0] == {"name": "cudaStreamSynchronize", "calls_per_step": 1.0,
                      "host_ms_per_step": 20.0}


def test_gpu_kernels_leave_out_user_annotations():
    # an optimizer's record_function span lies on the GPU timeline too, with the time of the
    # kernels inside it; it was counted as one more kernel and launch per step
    from types import SimpleNamespace

    from med3d_ext.train.profiling import gpu_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    evs = [SimpleNamespace(name="k1", device_type=cuda, is_user_annotation=False),
           SimpleNamespace(name="Optimizer.step#AdamW.step", device_type=cuda,
                           is_user_annotation=True),
           SimpleNamespace(name="k2", device_type=cuda, is_user_annotation=False),
           SimpleNamespace(name="aten::add", device_type=cpu, is_user_annotation=False)]
    assert [e.name for e in gpu_kernels(evs)] == ["k1", "k2"]


def test_python_stacks_write_the_packages_sites(tiny_data, tmp_path, monkeypatch):
    # PYTHON_STACKS (MED3D_EXT_PROFILE_STACKS=1): the profiled steps record Python frames, and
    # python_sites.txt ranks the package's own functions by inclusive host time; the operator
    # totals still count operators only (Python frames are not callers)
    from med3d_ext.train import profiling

    monkeypatch.setattr(profiling, "PYTHON_STACKS", True)
    out = tmp_path / "run"
    rc = main(["pretrain", *tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"],
                                      "--profile", "1:1")])
    assert rc == 0
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["host_op_ms_per_step"] > 0
    sites = summary["python_sites"]
    assert sites and all(s["site"].startswith("med3d_ext/") for s in sites)
    assert all(s["calls_per_step"] > 0 and s["host_ms_per_step"] >= 0 for s in sites)
    # the model's forward is one of the step's own functions
    assert any("forward" in s["site"] for s in sites), sites
    text = (out / "profile" / "python_sites.txt").read_text()
    assert "host ms/step" in text and "med3d_ext/" in text
    # sorted costliest first
    ms = [s["host_ms_per_step"] for s in sites]
    assert ms == sorted(ms, reverse=True)


def test_top_level_ops_look_through_python_frames():
    from types import SimpleNamespace

    from med3d_ext.train.profiling import is_python_frame, top_level_ops

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, parent=None, dev=cpu):
        return SimpleNamespace(name=name, cpu_parent=parent, device_type=dev)
    frame = ev("/x/med3d_ext/models/med3d.py(150): forward")
    inner = ev("torch/nn/modules/module.py(1775): _call_impl", frame)
    add = ev("aten::add", inner)                  # under Python frames only: top level
    copy = ev("aten::copy_", add)                 # under an operator: not
    bare = ev("med3d_ext::conv_bn_relu3d")        # no parent at all: top level
    builtin = ev("<built-in method add of Tensor object at 0x1>", frame)
    kernel = ev("void k<float>()", None, cuda)    # a device event: never
    assert is_python_frame(frame.name) and is_python_frame(builtin.name)
    assert not is_python_frame("aten::add") and not is_python_frame("Optimizer.step#SGD.step")
    assert top_level_ops([frame, inner, add, copy, bare, builtin, kernel]) == [add, bare]
