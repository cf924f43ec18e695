"""head_tuning: cuDNN's autotuning of the pretraining heads' batch sizes, before the first step.
Run here on the CPU, where it must leave the model and every RNG as they were."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from med3d_ext.models import Med3DNet
from med3d_ext.train.head_tuning import encoder_output_size, head_batch_sizes, tune_head_shapes


def test_head_batch_sizes_cover_all_but_the_tails():
    # independent check: the sampler's per-sample dataset choice, simulated
    rng = np.random.default_rng(0)
    for batch, heads in ((8, 8), (2, 8), (16, 4), (1, 3), (64, 8), (64, 2)):
        sizes = head_batch_sizes(batch, heads)
        lo, hi = min(sizes), max(sizes)
        assert sizes == list(range(lo, hi + 1)) and 1 <= lo <= hi <= batch
        counts = np.stack([np.bincount(rng.integers(0, heads, batch), minlength=heads)
                           for _ in range(20000)])
        met = counts[counts > 0]
        # the sizes left to tune during the run are rare at both ends
        assert (met > hi).mean() < 2e-3 and (met < lo).mean() < 2e-3, (batch, heads, sizes)
        exact = lambda n: math.comb(batch, n) * heads ** -n * (1 - 1 / heads) ** (batch - n)  # noqa: E731
        # and each end is the outermost such size
        assert hi == batch or sum(exact(n) for n in range(hi + 1, batch + 1)) < 1e-3
        assert lo == 1 or sum(exact(n) for n in range(0, lo)) < 1e-3
    assert head_batch_sizes(8, 1) == [8]  # one head: always the whole batch
    assert head_batch_sizes(64, 2)[0] > 10  # two heads of 64: no tuning of 1..10
    assert head_batch_sizes(0, 8) == []


@pytest.mark.parametrize("patch", [(16, 17, 9), (33, 20, 11), (8, 8, 8)])
def test_encoder_output_size_is_the_encoders(patch):
    med = Med3DNet(10, {"a": 2}).eval()
    with torch.no_grad():
        assert list(med.encoder(torch.zeros(1, 1, *patch)).shape[2:]) == encoder_output_size(patch)


@pytest.mark.parametrize("fused", [False, True])
def test_tuning_leaves_the_model_and_the_rngs_alone(fused):
    med = Med3DNet(10, {"a": 2, "b": 3, "c": 2, "d": 4}, fused=fused).train()
    seen = []
    for name, head in med.heads.items():  # deepcopy keeps the hooks: the copies report too
        head.register_forward_pre_hook(
            lambda m, args, name=name: seen.append((name, args[0].shape[0], args[0].dtype,
                                                    args[0].requires_grad)))
    before = {k: v.clone() for k, v in med.state_dict().items()}
    rng = torch.get_rng_state()
    info = tune_head_shapes(med, (16, 16, 16), 8, None, channels_last=True)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in med.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert all(p.grad is None for p in med.parameters())
    sizes = head_batch_sizes(8, 4)
    assert info["sizes"] == sizes and info["class_counts"] == [2, 3, 4]
    # one head per class count, every size, with inputs that need a gradient (bwd-data tuned)
    assert sorted(seen) == sorted((h, n, torch.float32, True) for h in ("a", "b", "d")
                                  for n in sizes)
    assert med.training


def test_tuning_under_autocast_uses_its_dtype():
    med = Med3DNet(10, {"a": 2, "b": 3})
    dtypes = []
    med.heads["a"][0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    tune_head_shapes(med, (16, 16, 16), 2, torch.bfloat16, channels_last=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_the_cli_step_says_what_it_tuned():
    """The CLI calls this for pretraining on a GPU with cudnn.benchmark; its code path, run here
    on the CPU with the CLI's configuration keys."""
    from types import SimpleNamespace

    from med3d_ext.train.cli import _tune_heads

    job = SimpleNamespace(model=Med3DNet(10, {"a": 2, "b": 3, "c": 2}))
    ctx = SimpleNamespace(device=torch.device("cpu"), is_main=True)
    said = []
    info = _tune_heads(job, {"patch": [16, 16, 16], "batch_size": 4, "amp": "off"}, ctx, False,
                       said.append)
    assert info["sizes"] == head_batch_sizes(4, 3) and info["seconds"] >= 0
    sizes = head_batch_sizes(4, 3)
    assert len(said) == 1 and f"batch sizes {sizes[0]}..{sizes[-1]} (class counts [2, 3])" in said[0]


def test_the_throughput_table_says_how_long_the_tuning_took():
    from benchmarks.train_throughput import markdown

    arm = dict(samples_s=100.0, voxels_s=1e8, data_wait=0.05, wall_s=10.0, windows=2,
               window_samples_s=[50.0, 100.0, 100.0])
    r = {"device": "cuda:0", "sizes": {"batch": 8, "patch": [128, 128, 64], "steps": 48,
                                       "workers": 8},
         "arms": {"med3d_ext fused": dict(arm, head_tuning_s=2.5),
                  "plain PyTorch (--no-fused)": dict(arm, head_tuning_s=0.4)},
         "fused_vs_plain": 1.0}
    text = markdown(r)
    assert "med3d_ext fused 2.5 s; plain PyTorch (--no-fused) 0.4 s" in text
    assert "| 50, 100, 100 |" in text
    for a in r["arms"].values():
        del a["head_tuning_s"]
    assert "cuDNN tuned" not in markdown(r)


def test_a_failing_tuning_does_not_stop_the_run(monkeypatch):
    """An optimisation only: a failure (say, out of memory on a full GPU) is said and skipped."""
    from types import SimpleNamespace

    import med3d_ext.train.head_tuning as ht
    from med3d_ext.train.cli import _tune_heads

    def boom(*a, **k):
        raise RuntimeError("no room")

    monkeypatch.setattr(ht, "tune_head_shapes", boom)
    said = []
    ctx = SimpleNamespace(device=torch.device("cpu"), is_main=True)
    job = SimpleNamespace(model=Med3DNet(10, {"a": 2, "b": 3}))
    assert _tune_heads(job, {"patch": [16, 16, 16], "batch_size": 2, "amp": "off"}, ctx, False,
                       said.append) is None
    assert len(said) == 1 and said[0].startswith("warning: cuDNN tuning") and "no room" in said[0]


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_tuning_on_the_gpu_as_the_cli_runs_it(fused):
    """What the CLI runs before a GPU pretraining: bf16 autocast, channels_last_3d, cuDNN
    autotuning; the model, its BatchNorm statistics and the CUDA RNG are left as they were."""
    torch.backends.cudnn.benchmark, before_flag = True, torch.backends.cudnn.benchmark
    try:
        med = Med3DNet(10, {"a": 2, "b": 3, "c": 4, "d": 2}, fused=fused).cuda()
        med = med.to(memory_format=torch.channels_last_3d).train()
        state = {k: v.clone() for k, v in med.state_dict().items()}
        rng = torch.cuda.get_rng_state()
        info = tune_head_shapes(med, (32, 32, 16), 8, torch.bfloat16, channels_last=True)
        assert torch.equal(torch.cuda.get_rng_state(), rng)
        assert all(torch.equal(v, state[k]) for k, v in med.state_dict().items())
        assert info["sizes"] == head_batch_sizes(8, 4) and info["class_counts"] == [2, 3, 4]
        # and a training step of the model itself still works after it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = med(torch.randn(8, 1, 32, 32, 16, device="cuda").contiguous(
                memory_format=torch.channels_last_3d), torch.arange(8) % 4)
        sum(o.logits.float().sum() for o in outs).backward()
    finally:
        torch.backends.cudnn.benchmark = before_flag


@pytest.mark.parametrize("channels_last", [False, True])
def test_tuned_inputs_are_laid_out_as_the_models(channels_last):
    """cuDNN's cache is keyed by shapes and strides: the tuning must feed each head inputs
    with the layout and strides Med3DNet.forward gives it (a gathered view of the encoder's
    output; the layout changed when the gather started keeping channels_last_3d)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    med = Med3DNet(10, {"a": 2, "b": 3}).to(memory_format=fmt).train()
    seen = {"tuning": set(), "model": set()}
    phase = ["tuning"]
    for head in med.heads.values():
        head.register_forward_pre_hook(
            lambda m, args: seen[phase[0]].add((tuple(args[0].shape), args[0].stride())))
    tune_head_shapes(med, (16, 16, 16), 4, None, channels_last=channels_last)
    phase[0] = "model"
    for ids in ([0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]):
        x = torch.randn(4, 1, 16, 16, 16).contiguous(memory_format=fmt)
        med(x, torch.tensor(ids))
    assert seen["model"] and seen["model"] <= seen["tuning"], (seen["model"], seen["tuning"])
