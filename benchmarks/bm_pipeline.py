"""pipeline: loader + augmentation throughput, and the data-wait share of a training step.

Data: a small synthetic 3DSeg-8 domain (``med3d_ext.data.synthetic``, generated into a temporary
folder and preprocessed there), sampled by ``med3d_ext.data.make_loader`` /
``MultiDomainSampler``. Two ways to get an augmented batch of N patches onto the device:

* baseline: DataLoader workers augment each sample on the CPU with the plain PyTorch path
  (``F.affine_grid`` + ``F.grid_sample``, ``med3d_ext.train.backends.PlainAugment3D``), the
  collated batch is copied to the device;
* ours: the loader only crops; the batch is copied to the device (the training CLI's
  ``make_loader(..., device=...)``: on CUDA, on a side stream one batch ahead, overlapping the
  previous step) and augmented there in one batched ``med3d_ext.transforms.RandomAugment3D``
  call (the fused resample op).

Case 1 times windows of 2W batches (W loader workers; at least 4), after a warm-up window that
drains the batches the workers prefetched, and reports ms per batch (median over windows / 2W)
and volumes/s: with workers the batches arrive in bursts, so a single batch's time is no rate.
Case 2 runs a ResNet-10 segmentation training step (fwd + bwd + AdamW; the training CLI's
defaults on the device: on CUDA bf16 autocast, channels_last_3d and the fused ops) fed by each pipeline,
after warm-up steps that consume the prefetched batches, and records the mean step time and the
data-wait fraction: time blocked on the next batch (loader + host-to-device copy) over the
whole step time. The two pipelines draw different
random transforms, so their outputs are not compared (the resample op itself is checked
against the reference in the ``augment`` area); the rows check the batch shapes instead.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.nn.functional as F

from .common import (FAILED, OK, UNAVAILABLE, Unavailable, m3d_attr, median, op_backend, optional_import,
                     sync, sync_stream)

AREA = "pipeline"


class _NonFinite(Exception):
    """A training row whose loss came out non-finite."""


def sizes(ctx) -> dict:
    # GPU: the perf-baselines training shape, 8 x 1 x 64 x 128 x 128 voxels per batch (here
    # RAS x, y, z = 128, 128, 64; the synthetic CT is ~34 slices thick at 3 mm, so the loader
    # pads it to the patch - same bytes and augmentation work per batch)
    if ctx.gpu and not ctx.quick:
        return dict(cases=2, size=128, patch=[128, 128, 64], batch=8, workers=min(8, os.cpu_count() or 1),
                    steps=20)
    if ctx.gpu:
        return dict(cases=2, size=128, patch=[128, 128, 64], batch=8, workers=min(8, os.cpu_count() or 1),
                    steps=10)
    if ctx.quick:  # a smoke test: tiny patches, worker start-up dominates
        return dict(cases=1, size=24, patch=[16, 16, 8], batch=2, workers=2, steps=2)
    return dict(cases=2, size=48, patch=[48, 48, 24], batch=4, workers=2, steps=8)


class PerSampleAugmented(torch.utils.data.IterableDataset):
    """One augmented sample at a time from a batch-size-1 MultiDomainSampler; the DataLoader
    collates. Each worker strides the sampler's batches (MultiDomainSampler does that)."""

    def __init__(self, sampler, patch):
        from med3d_ext.train.backends import PlainAugment3D

        self.sampler, self.patch, self.aug = sampler, tuple(patch), PlainAugment3D()

    def __iter__(self):
        for b in self.sampler:
            img, lab = self.aug(b["image"].float(), b["label"].long(), self.patch)
            yield {"image": img[0], "label": lab[0].to(torch.uint8)}


def _endless(loader):
    while True:
        yield from loader


def _dataset(tmp, sz):
    from med3d_ext.data import open_dataset
    from med3d_ext.data.synthetic import TRANSFER, write_msd

    raw = write_msd(os.path.join(tmp, "raw"), TRANSFER, sz["cases"], sz["size"], seed=0)
    return open_dataset(raw, cache=os.path.join(tmp, "cache"), workers=0, progress=False)


def _pipelines(pre, sz, device, workers):
    """name -> (make() -> iterator of augmented device batches, baseline?)."""
    from med3d_ext.data import MultiDomainSampler, make_loader

    patch, n = sz["patch"], sz["batch"]
    pin = device == "cuda"

    def cpu_workers():
        ds = PerSampleAugmented(MultiDomainSampler([pre], patch, 1, seed=1, steps=None), patch)
        dl = torch.utils.data.DataLoader(ds, batch_size=n, num_workers=workers, pin_memory=pin,
                                         persistent_workers=workers > 0)
        for b in _endless(dl):
            yield b["image"].to(device, non_blocking=pin), b["label"].to(device, non_blocking=pin), 0.0

    def batched(w):
        def gen():
            aug = m3d_attr("transforms.RandomAugment3D")(
                rotate=0.26, scale=(0.85, 1.15), flip=0.5, contrast=(0.9, 1.1),
                brightness=(-0.1, 0.1), noise=(0.0, 0.05), seed=1)
            # the training CLI's loader: on CUDA it copies each batch to the device on a side
            # stream one batch ahead, overlapping the copy with the previous step
            loader = make_loader([pre], patch, n, num_workers=w, pin_memory=pin, seed=1, steps=None,
                                 device=device)
            for b in _endless(loader):
                img = b["image"].to(device, non_blocking=pin)  # already there on CUDA
                lab = b["label"].to(device, non_blocking=pin)
                # the copy is part of getting the data, as for the baseline (whose wait ends
                # after its copy): wait for this batch's copy before the device work's clock
                # starts (the current stream only: the next batch's copy runs beside it)
                sync_stream(device)
                t = time.perf_counter()
                img, lab = aug(img, lab, patch)
                yield img, lab, t  # t: when the device work started (the wait ends there)
        return gen

    out = {f"CPU per-sample affine_grid/grid_sample, {workers} workers": (cpu_workers, True)}
    out[f"RandomAugment3D batched on {device}, loader {workers} workers"] = (batched(workers), False)
    out[f"RandomAugment3D batched on {device}, in-process loader"] = (batched(0), False)
    return out


def _check_batch(img, lab, sz):
    want = (sz["batch"], 1, *sz["patch"])
    if tuple(img.shape) != want or tuple(lab.shape) != (want[0], *want[2:]):
        raise AssertionError(f"batch shapes image {tuple(img.shape)} label {tuple(lab.shape)}, want {want}")
    if not torch.isfinite(img).all():
        raise AssertionError("non-finite augmented image")


def _prefetched(sz) -> int:
    """Batches the DataLoader workers hold ready (prefetch_factor 2 per worker): until they
    are consumed a pipeline looks as fast as a queue pop, whatever its real rate."""
    return 2 * sz["workers"]


def _window(sz) -> int:
    """Batches per timed call: with W workers the batches arrive in bursts (several workers
    finish at once, then none for a while), so one batch's wait says nothing about the rate;
    the mean over a window longer than the prefetch depth does."""
    return max(4, _prefetched(sz))


def _throughput(ctx, pre, sz, pipes):
    w = _window(sz)
    params = {"patch": sz["patch"], "batch": sz["batch"], "workers": sz["workers"],
              "volume": f"synthetic CT, {sz['size']} px in-plane", "device": ctx.device,
              "main_threads": torch.get_num_threads(), "batches_per_call": w}
    case = ctx.case(AREA, "augmented batch on device", params=params)
    case.units_per_call = w  # a call is a window of w batches: rows say ms per batch
    for name, (make, base) in pipes.items():
        def mk(make=make):
            it = make()
            img, lab, _ = next(it)  # starts the workers (not timed beyond warm-up)
            _check_batch(img, lab, sz)

            def fn():  # one window of w batches (the warm-up call drains the prefetched ones)
                for _ in range(w):
                    a, b, _ = next(it)
                sync(ctx.device)
                return a, b
            return fn
        note = f"ms per batch: median over calls of {w} batches each, / {w}"
        if not base:
            note += "; " + op_backend("affine_resample_pair", ctx.device)
        case.add(name, mk, baseline=base, check=False, note=note, warmup=1)
    rows = case.run()
    for r in rows:
        if r["status"] == OK:
            r["volumes_s"] = sz["batch"] / (r["median_ms"] * 1e-3)
            r["check"] = "different random transforms: shapes and finiteness checked, values not compared"


def _train_rows(ctx, pre, sz, pipes):
    """A ResNet-10 step fed by each pipeline: mean step time and data-wait fraction, after
    warm-up steps that consume what the workers prefetched (steady state)."""
    try:
        build = m3d_attr("models.build_transfer_model")
        from med3d_ext.train.backends import fusion_available
        from med3d_ext.train.loops import autocast_dtype
    except (Unavailable, ImportError) as exc:
        ctx.record(AREA, "ResNet-10 step data wait", "-", UNAVAILABLE, str(exc))
        return
    # The step the training CLI runs by default on this device (med3d_ext/train/cli.py _setup):
    # on CUDA bf16 autocast, channels_last_3d and the fused ops. A slower step (fp32, plain)
    # would hide data waits behind compute and understate the fraction.
    dev = torch.device(ctx.device)
    fused = dev.type == "cuda" and fusion_available()
    channels_last = dev.type == "cuda"
    amp = autocast_dtype("auto", dev)
    # warm-up: worker start, allocator, cuDNN autotuning, then the prefetched batches
    warm = (1 if ctx.quick else 2) + _prefetched(sz)
    params = {"patch": sz["patch"], "batch": sz["batch"], "workers": sz["workers"],
              "steps": sz["steps"], "warmup_steps": warm, "model": "ResNet-10 seg, AdamW",
              "step": ", ".join([f"{amp} autocast".replace("torch.", "") if amp else "fp32",
                                 "channels_last_3d" if channels_last else "contiguous",
                                 "fused" if fused else "plain"]),
              "device": ctx.device, "main_threads": torch.get_num_threads()}
    rows = []
    for name, (make, base) in pipes.items():
        row = {"area": AREA, "case": "ResNet-10 step data wait", "impl": name, "baseline": base,
               "reference": False, "params": params, "status": OK,
               "note": "ms = mean step time (the throughput; waits come in bursts, so not the median)"}
        try:
            torch.manual_seed(0)
            model = build("segmentation", 10, int(pre.num_classes), fused=fused).to(ctx.device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            it = make()
            steps, waits = [], []
            for k in range(warm + sz["steps"]):
                t0 = time.perf_counter()
                img, lab, t_dev = next(it)
                sync_stream(ctx.device)
                # the device augmentation is compute of the step, not waiting for data
                t1 = t_dev if t_dev else time.perf_counter()
                if channels_last:
                    img = img.contiguous(memory_format=torch.channels_last_3d)
                with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logits = model(img)
                lab_s = F.interpolate(lab[:, None].float(), size=logits.shape[2:], mode="nearest")
                loss = F.cross_entropy(logits.float(), lab_s[:, 0].long())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync_stream(ctx.device)
                if k >= warm:
                    steps.append(time.perf_counter() - t0)
                    waits.append(t1 - t0)
            del it
            if not torch.isfinite(loss).item():
                # a diverged step or a wrong kernel: its time is not a result (it was "ok" with
                # the check's text saying so, and published as a speed-up)
                raise _NonFinite(f"non-finite training loss ({loss.item()}) after {len(steps)} "
                                 "timed steps: not a result")
            row.update(median_ms=sum(steps) / len(steps) * 1e3, min_ms=min(steps) * 1e3, repeats=len(steps),
                       step_median_ms=median(steps) * 1e3,
                       data_wait=sum(waits) / sum(steps), wait_ms=median(waits) * 1e3,
                       check="loss finite only, outputs not compared")
        except _NonFinite as exc:
            row.update(status=FAILED, reason=str(exc))
        except Unavailable as exc:
            row.update(status=UNAVAILABLE, reason=str(exc))
        except torch.OutOfMemoryError as exc:
            row.update(status=UNAVAILABLE, reason=f"out of memory: {str(exc).splitlines()[0][:200]}")
        except Exception as exc:  # one broken pipeline must not stop the others
            row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
    base = {r["impl"]: r["median_ms"] for r in rows if r["baseline"] and r["status"] == OK}
    for r in rows:  # step-time ratios, as Case rows get them
        if r["status"] == OK and not r["baseline"]:
            r["speedup"] = {b: ms / r["median_ms"] for b, ms in base.items()}
    ctx.add_rows(rows)


def run(ctx):
    try:
        m3d_attr("data.make_loader")
        m3d_attr("transforms")
        m3d_attr("train")
        optional_import("nibabel")  # the synthetic volumes are written as NIfTI
    except Unavailable as exc:
        ctx.record(AREA, "loader + augmentation", "med3d_ext", UNAVAILABLE, str(exc))
        return
    sz = sizes(ctx)
    threads = torch.get_num_threads()
    if not ctx.gpu:
        # the workers need cores too; an oversubscribed OpenMP pool spins (5-10x slower steps)
        sz["threads"] = max(1, len(os.sched_getaffinity(0)) - sz["workers"])
        torch.set_num_threads(sz["threads"])
    try:
        with tempfile.TemporaryDirectory(prefix="m3d-pipeline-") as tmp:
            pre = _dataset(tmp, sz)
            pipes = _pipelines(pre, sz, ctx.device, sz["workers"])
            _throughput(ctx, pre, sz, pipes)
            _train_rows(ctx, pre, sz, pipes)
    finally:
        torch.set_num_threads(threads)
