"""train_step: whole ResNet-10 / ResNet-50 SGD steps, as in perf-baselines.md.

GPU: batch 8 x 1 x 64 x 128 x 128, bf16 autocast, channels_last_3d, SGD with momentum,
cross-entropy on the 1/4-size logits. Four versions per depth: plain eager, plain
torch.compile (of forward + backward, the optimiser step stays eager), med3d_ext fused
(``med3d_ext.nn.fuse_modules``) and fused + compile; plus ResNet-50 in fp32 eager. Time and
peak memory per version. On a GPU also eager and fused with forward + backward captured as one
CUDA graph (no host work per op), which shows how much of a step is the host's, and the fused
model under torch.compile's reduce-overhead mode (the same graphs reached the way the CLI's
``--compile --compile-mode reduce-overhead`` does; with --with-compile). The plain model is
``med3d_ext.models.resnet3d(depth)``.

CPU: fp32, batch 2 x 1 x 24 x 48 x 48; --quick: ResNet-10 only, at 2 x 1 x 16 x 32 x 32.

--quick compiles ResNet-10 only (ResNet-50's compile takes minutes); --with-compile adds it.
Correctness: every version starts from the same weights and input, and its first step's loss
and the gradients of GRAD_PROBES (the stem's weight and BatchNorm, the first convolution of
each stage, a BatchNorm bias deep in the model and the head's last weight: a layer that drops
or corrupts its weight gradient does not show in the stem's, which depends only on the data
path back to it) are checked with the error-ratio rule (common.py): their error against
the plain model's step in high precision (float64 on the CPU, fp32 without TF32 on a GPU) must
be at most 2x the plain eager step's own error. A direct comparison with the eager step is
meaningless here: in bf16 through 10-50 layers both are far from the exact result, each in its
own way (the stem gradient of a bf16 step is off by tens of percent).

The floors (FLOORS, relative to the high-precision value's scale) matter in fp32 only, where
the eager error is tiny: a ReLU decided the other way at a value within round-off of zero, by
one implementation and not the other, moves every gradient upstream of it by up to ~2% of its
scale (seen on the CPU at these shapes for about one model/input seed in three, for eager and
fused alike; both are exact to 1e-13 in float64). The loss, a forward quantity, has no such
jumps and gets a tight floor; a wrong kernel moves it far more (python_tests/test_benchmarks.py
perturbs one layer's weights by 1% and the check fails).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F

from .common import (Unavailable, capture_cuda_graph, high_precision, m3d_attr, module_flag,
                     op_backend, with_module_flag)

AREA = "train_step"
GPU_SHAPE = (8, 1, 64, 128, 128)  # perf-baselines.md
GPU_DEPTHS = (10, 50)
# batch 2, so that layer4's BatchNorm normalises 64 (--quick) or 216 values per channel
CPU_SHAPES = {True: (2, 1, 16, 32, 32), False: (2, 1, 24, 48, 48)}
# error-ratio floors (rtol of the loss, rtol of each checked gradient), see the docstring
FLOORS = {"bf16": (1e-2, 1e-2), "fp32": (1e-5, 3e-2)}
# the parameters whose gradients the check compares (the model's last parameter, the head's
# final convolution, is added by grad_probes)
GRAD_PROBES = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight",
               "layer3.0.conv1.weight", "layer4.0.conv1.weight", "layer4.0.bn1.bias")


def grad_probes(model) -> list:
    """The parameters of GRAD_PROBES present in ``model`` and its last parameter, in one order
    for every version (fusion renames nothing)."""
    named = dict(model.named_parameters())
    names = [n for n in GRAD_PROBES if n in named]
    last = next(reversed(named))
    return [named[n] for n in names + ([last] if last not in names else [])]


def floors_for(floors, model) -> list:
    """One rtol per check output: the loss's, then the gradient floor for each probe."""
    return [floors[0]] + [floors[1]] * len(grad_probes(model))


def base_model(depth):
    """(model on CPU, where it came from)."""
    torch.manual_seed(0)
    return m3d_attr("models.resnet3d")(depth), "med3d_ext.models.resnet3d"


def fused_copy(model, source):
    fuse = m3d_attr("nn.fuse_modules")
    m = copy.deepcopy(model)
    out = fuse(m)
    return out if out is not None else m


def memory_saving(st, model, source):
    """The fused model with the memory-saving switches of med3d_ext.nn.fused on: the stem's
    max-pool fused (FUSE_STEM_POOL, read when fusing) and the blocks' inner activations
    recomputed in backward (RECOMPUTE_BLOCK_INPUTS, read in every forward)."""
    fused = "med3d_ext.nn.fused"
    with module_flag(fused, "FUSE_STEM_POOL", True):
        m = fused_copy(model, source)
    step, check = st.make(m, False)
    return tuple(with_module_flag(f, fused, "RECOMPUTE_BLOCK_INPUTS", True) for f in (step, check))


class Step:
    def __init__(self, ctx, shape, amp, cl):
        self.ctx, self.amp = ctx, amp
        self.mf = torch.channels_last_3d if cl else torch.contiguous_format
        dev = ctx.device
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(shape, generator=g).to(dev).to(memory_format=self.mf)
        self.y = torch.randint(0, 2, (shape[0],) + tuple(s // 4 for s in shape[2:]), generator=g).to(dev)

    def make(self, model, compiled, graphed=False, mode=None):
        """(step, check). ``mode``: torch.compile's mode; "reduce-overhead" replays the compiled
        forward and backward as CUDA graphs (what the CLI's --compile-mode reduce-overhead
        does), each step marked as a new iteration."""
        dev = self.ctx.device
        if mode == "reduce-overhead" and dev != "cuda":
            raise Unavailable("compile mode reduce-overhead replays CUDA graphs: CUDA only")
        m = model.to(dev).to(memory_format=self.mf).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        x, y = self.x, self.y

        def fwd_bwd():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(m(x).float(), y)
            loss.backward()
            return loss.detach()

        f = torch.compile(fwd_bwd, mode=mode) if compiled else fwd_bwd
        if graphed:
            if dev != "cuda":
                raise Unavailable("CUDA graphs need a CUDA device")
            return _graphed(m, opt, f)
        graph_steps = mode == "reduce-overhead"

        def step():
            if graph_steps:  # the last replay's outputs may be overwritten from here on
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            f()
            opt.step()

        def check():  # one fwd+bwd without the optimiser step: the loss and the probes' grads
            if graph_steps:
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            loss = f()
            # copies: a replayed graph's outputs are overwritten by the next replay
            return (loss.float().clone(), *(p.grad.float().clone() for p in grad_probes(m)))
        return step, check

    def precise(self, model):
        """The plain model's check outputs in high precision, from the same weights and input."""
        with high_precision(self.ctx.device) as dt:
            m = copy.deepcopy(model).to(self.ctx.device, dt).train()
            loss = F.cross_entropy(m(self.x.to(dt)), self.y)
            loss.backward()
            return (loss.detach(), *(p.grad.clone() for p in grad_probes(m)))


def run(ctx):
    if ctx.gpu:
        shape = GPU_SHAPE
        depths = list(GPU_DEPTHS)
    else:
        shape = CPU_SHAPES[ctx.quick]
        depths = [10] if ctx.quick else [10, 50]
    # MED3D_BENCH_TRAIN_DEPTHS="50" keeps only those depths (gpu_check's compile stage: the
    # ResNet-50 compile rows without compiling ResNet-10 again)
    only = os.environ.get("MED3D_BENCH_TRAIN_DEPTHS", "").replace(",", " ").split()
    if only:
        try:
            keep = {int(d) for d in only}
        except ValueError:
            raise ValueError("MED3D_BENCH_TRAIN_DEPTHS: expected depths such as '10 50', got "
                             f"{os.environ['MED3D_BENCH_TRAIN_DEPTHS']!r}") from None
        depths = [d for d in depths if d in keep]
    can, why = ctx.can_compile()
    for depth in depths:
        model, source = base_model(depth)
        # compile on the CPU needs a C++ toolchain and minutes: only when asked
        compile_ok = can and (ctx.with_compile or (ctx.gpu and (depth == 10 or not ctx.quick)))
        no_compile = why or ("left out: ResNet-50 compile needs --with-compile or no --quick" if ctx.gpu
                             else "left out on the CPU unless --with-compile")
        # (autocast, channels_last_3d, name, all four versions): the CPU runs fp32 (its
        # autocast is another code path than the GPU's, and slow)
        variants = [(ctx.gpu, ctx.gpu, "bf16 autocast" if ctx.gpu else "fp32", True)]
        if ctx.gpu and depth == 50:
            variants.append((False, False, "fp32", False))  # eager only: the fp32 anchor
        for amp, cl, dname, versions in variants:
            st = Step(ctx, shape, amp, cl)
            params = {"model": f"resnet{depth}", "model_source": source, "x": list(shape), "dtype": dname,
                      "layout": "channels_last_3d" if cl else "contiguous", "optimizer": "SGD momentum 0.9"}
            floors = FLOORS["bf16" if amp else "fp32"]
            case = ctx.case(AREA, f"resnet{depth} {dname}", params=params,
                            rtol=floors_for(floors, model) if versions else 1e-2, atol=0.0,
                            precise=(lambda: st.precise(model)) if versions else None)
            case.add("eager", lambda: st.make(copy.deepcopy(model), False), baseline=True, reference=True)
            if versions:
                fnote = op_backend("conv_bn_relu3d", ctx.device)
                if compile_ok:
                    case.add("torch.compile", lambda: st.make(copy.deepcopy(model), True), baseline=True)
                else:
                    ctx_note = no_compile
                    case.add("torch.compile", lambda n=ctx_note: _skip(n), baseline=True)
                case.add("med3d_ext fused", lambda: st.make(fused_copy(model, source), False), note=fnote)
                if ctx.gpu and depth == 50:  # the 2.5 GiB target: what the memory switches give
                    case.add("med3d_ext fused, memory-saving",
                             lambda: memory_saving(st, model, source), note=fnote)
                if ctx.gpu:  # the host's share: both models with forward + backward as one graph
                    case.add("eager + CUDA graph", lambda: st.make(copy.deepcopy(model), False, True),
                             baseline=True)
                    case.add("med3d_ext fused + CUDA graph",
                             lambda: st.make(fused_copy(model, source), False, True), note=fnote)
                if compile_ok:
                    case.add("med3d_ext fused + compile", lambda: st.make(fused_copy(model, source), True), note=fnote)
                else:
                    case.add("med3d_ext fused + compile", lambda n=no_compile: _skip(n), note=fnote)
                if ctx.gpu and ctx.with_compile:  # the CLI's --compile --compile-mode
                    # reduce-overhead: the hand-captured row's graphs, reached through
                    # torch.compile (--with-compile only: one more compile of the model)
                    case.add("med3d_ext fused + compile reduce-overhead",
                             (lambda: st.make(fused_copy(model, source), True, mode="reduce-overhead"))
                             if compile_ok else (lambda n=no_compile: _skip(n)), note=fnote)
            case.run()
            del st
        del model


def _skip(reason):
    raise Unavailable(reason)


def _graphed(m, opt, fwd_bwd):
    """(step, check) with forward + backward replayed from one captured CUDA graph and the
    optimiser step eager: what the step costs the GPU once the host's per-op work (Python,
    dispatch, ~900 launches for ResNet-50) is gone. PyTorch's whole-network capture recipe:
    warm-up on a side stream (cuDNN autotuning, lazy init), then capture
    with the gradients unset, so the graph writes them into its own static tensors, which each
    replay overwrites (so no zero_grad between replays)."""
    def fresh_fwd_bwd():  # gradients unset: the capture allocates them as static tensors
        opt.zero_grad(set_to_none=True)
        return fwd_bwd()
    graph, loss = capture_cuda_graph(fresh_fwd_bwd)

    def step():
        graph.replay()
        opt.step()

    def check():  # the graph's first replay: the same weights as every other version's check
        graph.replay()  # copies: the graph's static outputs change with every replay
        return (loss.float().clone(), *(p.grad.float().clone() for p in grad_probes(m)))
    return step, check
