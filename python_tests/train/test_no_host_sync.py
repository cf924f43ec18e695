"""A GPU training step queues its work without waiting for the GPU (CUDA only).

A host sync inside the step (a .item(), a blocking host-to-device copy such as
torch.tensor(..., device="cuda"), a D2H copy of routing ids) makes the host wait for the
queued kernels before it can queue the next ones; on a GPU whose step is as short as its host
work that idles the GPU for much of every step. torch.cuda.set_sync_debug_mode("error") turns
every such sync into an exception, so this test fails on the first one that creeps back.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda


def _step_parts(fused, dev="cuda"):
    from med3d_ext.models import Med3DNet
    from med3d_ext.train.backends import augmenter, seg_loss_fn
    from med3d_ext.train.tasks import _fit, _prep_seg

    dev = torch.device(dev)
    torch.manual_seed(0)
    model = Med3DNet(10, {"a": 2, "b": 3}, fused=fused).to(dev)
    model = model.to(memory_format=torch.channels_last_3d).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    patch = (16, 16, 16)
    prepare = _prep_seg({"label_grid": "logits"}, patch, augmenter(True, True, seed=1), True)
    loss_fn = seg_loss_fn(True)
    pin = (lambda t: t.pin_memory()) if dev.type == "cuda" else (lambda t: t)
    batch = {"image": pin(torch.randn(4, 1, *patch)),
             "label": pin(torch.randint(0, 2, (4, *patch), dtype=torch.uint8)),
             "dataset_id": torch.tensor([0, 1, 1, 0])}

    def step():
        inp = prepare(batch, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            outs = model(inp["image"], inp["dataset_id"])
            targets = [inp["label"].index_select(0, o.index) for o in outs]
            logits = [_fit(o.logits, t) for o, t in zip(outs, targets)]
            loss, per = loss_fn(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_training_step_has_no_host_sync(fused):
    step = _step_parts(fused)
    first = step()  # warm-up: cuDNN plans, lazy init, the label check of the loss's first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v) for v in [first, *losses])
