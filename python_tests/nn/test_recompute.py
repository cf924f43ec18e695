"""RECOMPUTE_BLOCK_INPUTS: fused blocks keep a recipe instead of their inner activations and
rebuild them in backward; gradients and statistics equal the default fused path's, and less is
kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from med3d_ext.models import resnet3d
from med3d_ext.nn import fuse_modules
from python_tests.conftest import DEVICES

ext = pytest.importorskip("med3d_ext._extension")
pytestmark = pytest.mark.skipif(not ext.available(), reason="compiled extension not loaded")


def _step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, \
        {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth,dtype", [(10, torch.float64), (50, torch.float64),
                                         (18, torch.float32)])
def test_recompute_matches_keeping(device, depth, dtype, monkeypatch):
    import med3d_ext.nn.fused as fz

    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    base = resnet3d(depth, shortcut_type="B").to(device, dtype)
    x = torch.randn(2, 1, 12, 17, 14, device=device, dtype=dtype)
    results = []
    for on in (False, True):
        monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", on)
        results.append(_step(fuse_modules(copy.deepcopy(base)).train(), x))
    (o0, g0, b0), (o1, g1, b1) = results
    # the rebuilt activation is the same kernel on the same inputs: the forward and the
    # statistics are equal bit for bit
    assert torch.equal(o0, o1)
    for n in b0:
        assert torch.equal(b0[n], b1[n]), n
    for n in g0:
        if device == "cpu":  # the CPU kernels are deterministic: so are the gradients
            assert torch.equal(g0[n], g1[n]), n
        else:  # cuDNN's default backward algorithms are not (an H200 differed in the last bits)
            scale = max(1.0, g0[n].abs().max().item())
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(g1[n], g0[n], rtol=tol, atol=tol * scale,
                                       msg=lambda m, n=n: f"{n}: {m}")


def _saved_bytes(model, shape, monkeypatch):
    """Bytes of the distinct storages kept for backward by one forward on meta tensors: an
    outer hook counts what is saved outside the recompute contexts, and the recompute
    contexts' own pack hooks are wrapped to count what they keep (a recipe keeps nothing new).
    Returns (bytes, number of recompute contexts that were active)."""
    import med3d_ext.nn.fused as fz

    storages, contexts = {}, []

    def count(obj):
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            storages[st._cdata] = st.nbytes()
        return obj

    real = fz.recompute_input

    def counting(t, recipe):
        ctx = real(t, recipe)
        if isinstance(ctx, torch.autograd.graph.saved_tensors_hooks):
            contexts.append(1)
            pack = ctx.pack_hook
            ctx.pack_hook = lambda s: count(pack(s))
        return ctx
    monkeypatch.setattr(fz, "recompute_input", counting)
    # the recompute steps aside inside other saved-tensor hooks: not for the outer counter
    monkeypatch.setattr(fz, "can_recompute", lambda x: torch.is_grad_enabled())
    model = model.to(device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
    x = torch.empty(shape, device="meta", dtype=torch.bfloat16).to(
        memory_format=torch.channels_last_3d)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model.train()(x)
    return sum(storages.values()), len(contexts)


def test_recompute_keeps_less(monkeypatch):
    import med3d_ext.nn.fused as fz

    shape = (8, 1, 64, 128, 128)  # the perf-baselines shape: free on meta tensors
    keep, n0 = _saved_bytes(fuse_modules(resnet3d(50, shortcut_type="B")), shape, monkeypatch)
    monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", True)
    less, n1 = _saved_bytes(fuse_modules(resnet3d(50, shortcut_type="B")), shape, monkeypatch)
    assert n0 == 0 and n1 == 16 * 2  # each bottleneck: conv2's and conv3's inputs
    # the inner activations of 16 bottlenecks (conv1's and conv2's outputs) are gone: measured
    # 2.56 -> 2.22 GiB (bf16; weights included)
    assert less < 0.9 * keep, (less / 2**30, keep / 2**30)


def test_recompute_refuses_a_changed_parameter(monkeypatch):
    import med3d_ext.nn.fused as fz

    monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", True)
    m = fuse_modules(resnet3d(10)).train()
    out = m(torch.randn(2, 1, 8, 8, 8))
    with torch.no_grad():
        m.layer1[0].bn1.weight.mul_(2)  # an in-place step before backward
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_recompute_off_under_no_grad_and_other_hooks(monkeypatch):
    import med3d_ext.nn.fused as fz
    from med3d_ext.nn.recompute import can_recompute

    monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", True)
    x = torch.randn(1, 1, 4, 4, 4)
    assert can_recompute(x)
    with torch.no_grad():
        assert not can_recompute(x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not can_recompute(x)


def test_recompute_steps_aside_under_compile(monkeypatch):
    # torch.compile traces its own graph: the flag must not break fullgraph tracing, and the
    # compiled step must give the eager (recomputing) step's gradients
    import med3d_ext.nn.fused as fz

    monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", True)
    torch.manual_seed(0)
    m = fuse_modules(resnet3d(10)).train()
    x = torch.randn(2, 1, 8, 12, 10)

    def loss(x):
        return m(x).float().pow(2).sum()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    a = compiled(x)
    a.backward()
    g = m.conv1.weight.grad.clone()
    m.zero_grad(set_to_none=True)
    b = loss(x)
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(g, m.conv1.weight.grad)


def test_recompute_frees_the_inner_activations(monkeypatch):
    # what the recipe replaces must really be freed after the forward: the pack hook once
    # closed over the activation, and every tensor saved under the hooks kept the hooks, so
    # the "dropped" activations all stayed alive (no memory saved; CPU profile of ResNet-50)
    import gc
    import weakref

    import med3d_ext.nn.fused as fz

    monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", True)
    refs = []
    real = fz.recompute_input

    def tracking(t, recipe):
        refs.append(weakref.ref(t))
        return real(t, recipe)
    monkeypatch.setattr(fz, "recompute_input", tracking)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    m = fuse_modules(resnet3d(50, shortcut_type="B")).train()
    x = torch.randn(2, 1, 9, 13, 11)
    loss = m(x).float().square().sum()
    gc.collect()
    assert len(refs) == 16 * 2
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} inner activations are still alive"
    loss.backward()  # and the recipes rebuild them
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["space_to_depth_fold_w", "space_to_depth",
                                  "space_to_depth_fold_hw"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_recompute_rebuilds_the_stems_rewritten_input(device, algo, amp, monkeypatch,
                                                       recipe_builds):
    # the fused stem (conv + BN + ReLU + max-pool) through a space-to-depth rewrite keeps the
    # rewritten input for its weight gradient; the memory-saving mode rebuilds it from the
    # batch instead: the rewritten input is freed after the forward, and the gradients and
    # statistics equal keeping it (bit for bit on the CPU in fp32; under bf16 autocast oneDNN's
    # weight gradients differ in the last bits from one identical run to the next)
    import gc
    import weakref

    import med3d_ext.nn.fused as fz
    import med3d_ext.ops.conv_bn_relu as cbr

    monkeypatch.setattr(cbr, "STEM_CONV", algo)
    monkeypatch.setattr(fz, "FUSE_STEM_POOL", True)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    base = resnet3d(10).to(device)
    x = torch.randn(2, 1, 11, 16, 13, device=device)
    rebuilt, results = [], []
    real_keep = fz._keep_stem_input

    def keep(x_op, *rest):
        rebuilt.append(weakref.ref(x_op))
        return real_keep(x_op, *rest)
    monkeypatch.setattr(fz, "_keep_stem_input", keep)
    built = recipe_builds
    for on in (False, True):
        monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", on)
        m = fuse_modules(copy.deepcopy(base)).train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = m(x)
        gc.collect()
        if on:
            assert len(rebuilt) == 1 and rebuilt[0]() is None, "the rewritten input is kept"
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters()},
                        {n: b.clone() for n, b in m.named_buffers()}))
    # both of the stem's large tensors were kept as recipes and rebuilt: its input and y
    assert sorted(w for w in built if w.startswith("the stem's")) == [
        "the stem's input batch", "the stem's input batch or weight"]
    (o0, g0, b0), (o1, g1, b1) = results
    assert torch.equal(o0, o1)
    for n in b0:
        assert torch.equal(b0[n], b1[n]), n
    if device == "cpu" and amp:
        return  # torch's CPU bf16 conv3d weight gradient is unreliable (cli.CPU_BF16_WARNING)
    for n in g0:
        if device == "cpu" and not amp:
            assert torch.equal(g0[n], g1[n]), n
        else:
            scale = max(1.0, g0[n].abs().max().item())
            tol = 2e-2 if amp else 1e-4
            torch.testing.assert_close(g1[n], g0[n], rtol=tol, atol=tol * scale,
                                       msg=lambda m, n=n: f"{n}: {m}")
    if device == "cpu" and not amp:  # the stem's weight gradient itself, from the rebuilt input
        assert torch.equal(g0["conv1.weight"], g1["conv1.weight"])


def test_recompute_refuses_a_changed_stem_input(monkeypatch):
    import med3d_ext.nn.fused as fz
    import med3d_ext.ops.conv_bn_relu as cbr

    monkeypatch.setattr(cbr, "STEM_CONV", "space_to_depth_fold_w")
    monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", True)
    m = fuse_modules(resnet3d(10)).train()
    x = torch.randn(2, 1, 8, 8, 8)
    out = m(x)
    x.add_(1)  # the batch changed before backward: rebuilding would give another input
    with pytest.raises(RuntimeError, match="stem's input batch"):
        out.sum().backward()


def test_set_memory_saving_is_per_model(monkeypatch, recipe_builds):
    # set_memory_saving(model) switches one model's fused blocks and stem, not the process
    # (the training CLI's --memory-saving; two runs in one process must not share it)
    import med3d_ext.nn.fused as fz
    from med3d_ext.nn import set_memory_saving

    built = recipe_builds
    assert fz.RECOMPUTE_BLOCK_INPUTS is False
    x = torch.randn(2, 1, 8, 9, 10)
    on = set_memory_saving(fuse_modules(resnet3d(10)).train())
    off = fuse_modules(resnet3d(10)).train()
    off(x).sum().backward()
    assert built == []
    on(x).sum().backward()
    # ResNet-10: one inner activation per block, and the stem's input and output
    assert sorted(built) == ["a BatchNorm parameter or statistic"] * 4 + [
        "the stem's input batch", "the stem's input batch or weight"]
    built.clear()
    set_memory_saving(on, False)(x).sum().backward()
    assert built == []
    monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", True)  # the model's own "off" wins
    on(x).sum().backward()
    assert built == []
    off(x).sum().backward()  # no setting of its own: the process-wide flag
    assert len(built) == 6


@pytest.mark.parametrize("algo,amp", [("space_to_depth_fold_w", False), ("aten", True)])
def test_recompute_with_a_batch_made_in_inference_mode(algo, amp, monkeypatch):
    # an inference tensor has no version counter for a recipe to check: the memory-saving
    # mode keeps the stem's tensors then (it raised "Inference tensors do not track version
    # counter"), and the results equal the default mode's. (Where the op would keep the batch
    # itself -- fp32 and ATen's stem -- autograd refuses an inference tensor in either mode.)
    import med3d_ext.nn.fused as fz
    import med3d_ext.ops.conv_bn_relu as cbr

    monkeypatch.setattr(cbr, "STEM_CONV", algo)
    torch.manual_seed(0)
    base = resnet3d(10)
    with torch.inference_mode():
        x = torch.randn(2, 1, 8, 9, 10)
    results = []
    for on in (False, True):
        monkeypatch.setattr(fz, "RECOMPUTE_BLOCK_INPUTS", on)
        m = fuse_modules(copy.deepcopy(base)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(x)
        out.float().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    if not amp:  # (torch's CPU bf16 conv3d weight gradients vary from run to run)
        for n in results[0][1]:
            assert torch.equal(results[0][1][n], results[1][1][n]), n


def test_stem_recipe_never_takes_the_weight_for_y(monkeypatch, recipe_builds):
    # the stem's y is recognised by shape and dtype; a weight of the same shape as y
    # ((Cout, Cin, k, k, k) == (N, Cout, D', H', W')) must stay the weight
    import med3d_ext.nn.fused as fz
    import med3d_ext.ops.conv_bn_relu as cbr

    monkeypatch.setattr(cbr, "STEM_CONV", "aten")
    built = recipe_builds
    torch.manual_seed(3)
    x = torch.randn(4, 4, 6, 6, 6)
    w0 = torch.randn(4, 4, 3, 3, 3)  # y: (4, 4, 3, 3, 3) with stride 2, padding 1
    grads = []
    for keep in (None, fz._keep_stem_input):
        w = w0.clone().requires_grad_()
        bw, bb = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
        out = cbr._conv_bn_relu_maxpool3d(x, w, bw, bb, None, None, 2, 1, 1, True, 0.1, 1e-5,
                                          3, 2, 1, keep_input=keep)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((w.grad, bw.grad, bb.grad))
    stem = [b for b in built if b.startswith("the stem's")]
    assert stem == ["the stem's input batch", "the stem's input batch or weight"], built
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_memory_saving_lowers_the_cuda_peak():
    # What the CPU memory timeline predicts, on the GPU's allocator: a bf16 channels_last
    # ResNet-50 training step (half the perf-baselines batch) peaks lower in the memory-saving
    # mode (CPU timeline with the GPU's stem: 2.92 -> 2.40 GiB at batch 8, 1.14 -> 1.01 at
    # batch 2, SGD momentum included; a mode that frees nothing stays at ~1.0x), and the
    # default fused step no higher than the plain model's
    from med3d_ext.nn import set_memory_saving

    torch.manual_seed(0)
    base = resnet3d(50)
    x = torch.randn(4, 1, 64, 128, 128, device="cuda").to(memory_format=torch.channels_last_3d)
    peaks = {}
    for arm in ("plain", "fused", "memory-saving"):
        m = copy.deepcopy(base) if arm == "plain" else fuse_modules(copy.deepcopy(base))
        if arm == "memory-saving":
            set_memory_saving(m)
        m = m.cuda().to(memory_format=torch.channels_last_3d).train()
        for _ in range(2):  # the second step's peak: cuDNN's plans and workspaces settled
            m.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = m(x)
            out.float().square().mean().backward()
            torch.cuda.synchronize()
        peaks[arm] = torch.cuda.max_memory_allocated()
        del m, out
        torch.cuda.empty_cache()
    gib = {k: round(v / 2**30, 3) for k, v in peaks.items()}
    assert peaks["fused"] <= peaks["plain"], gib
    assert peaks["memory-saving"] < 0.92 * peaks["fused"], gib


def test_memory_saving_on_an_unfused_model_is_said():
    """set_memory_saving on a plain model did nothing, unsaid; the setting stays on the modules
    (it takes effect once the model is fused)."""
    import warnings

    import med3d_ext as m3d

    with pytest.warns(UserWarning, match="no fused modules yet; the mode takes effect once it "
                                         "is fused"):
        m = m3d.nn.set_memory_saving(resnet3d(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m3d.nn.set_memory_saving(fuse_modules(resnet3d(10)))  # fused: nothing to say
        m3d.nn.set_memory_saving(resnet3d(10), False)  # off: nothing to say
    fuse_modules(m)
    assert m.layer1[0].__dict__.get("_m3d_memory_saving") is True
