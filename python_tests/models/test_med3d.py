"""Med3DNet: routing equals running each head separately; keys; dataset_id handling."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from med3d_ext.models import (
    HeadOutput,
    Med3DNet,
    build_model,
    load_medicalnet_weights,
    resnet3d,
    save_encoder_medicalnet,
)
from python_tests.conftest import assert_close

DATA = Path(__file__).resolve().parents[1] / "data"
HEADS = {"liver": 3, "heart": 2, "brats-t1": 4}


def released_keys(depth):
    ref = json.loads((DATA / f"resnet{depth}.json").read_text())
    return [e["key"] for e in ref["state_dict"] if e["in_released_file"]]


def test_keys_are_medicalnet_encoder_plus_conv_seg_heads():
    with torch.device("meta"):
        med = Med3DNet(18, HEADS)
        seg = {n: resnet3d(18, num_seg_classes=c) for n, c in HEADS.items()}
    assert list(med.encoder.state_dict()) == released_keys(18)
    sd = med.state_dict()
    enc = [k for k in sd if k.startswith("encoder.")]
    assert enc == ["encoder." + k for k in released_keys(18)]
    for name, net in seg.items():
        want = {k.replace("conv_seg.", f"heads.{name}.", 1): tuple(v.shape)
                for k, v in net.state_dict().items() if k.startswith("conv_seg.")}
        got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(f"heads.{name}.")}
        assert got == want
    assert len(sd) == len(enc) + sum(14 for _ in HEADS)
    assert med.head_names == list(HEADS) and med.head_classes == list(HEADS.values())


def _run_separately(model, x, ids):
    """Encoder once on the whole batch, then each head on its own samples, by hand."""
    feats = model.encoder(x)
    out = []
    for h, name in enumerate(model.head_names):
        idx = torch.nonzero(ids == h).flatten()
        if idx.numel():
            out.append((h, idx, model.heads[name](feats[idx])))
    return out


def _compare(got, want):
    assert [o.head for o in got] == [w[0] for w in want]
    for o, (h, idx, logits) in zip(got, want):
        assert isinstance(o, HeadOutput)
        assert o.index.dtype == torch.long
        assert_close(o.index, idx)
        assert_close(o.logits, logits)


def test_routing_eval_equals_each_head_alone():
    med = Med3DNet(10, HEADS).double().eval()
    for m in med.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 1, 9, 10, 11, dtype=torch.float64)
    ids = torch.tensor([2, 0, 2, 2, 0])  # head 1 has no sample: left out
    got = med(x, ids)
    assert [o.head for o in got] == [0, 2]
    # in eval mode each sample is independent: running the encoder per head is the same
    want = []
    for h in (0, 2):
        idx = torch.nonzero(ids == h).flatten()
        want.append((h, idx, med.heads[med.head_names[h]](med.encoder(x[idx]))))
    _compare(got, want)
    assert got[1].logits.shape == (3, 4, 4, 4, 4)


def test_routing_train_mode_outputs_grads_and_bn_stats():
    med = Med3DNet(10, HEADS)
    ref = copy.deepcopy(med)
    x = torch.randn(6, 1, 9, 10, 11)
    ids = torch.tensor([1, 0, 1, 2, 0, 2])
    got = med(x, ids)
    want = _run_separately(ref, x, ids)
    _compare(got, want)
    sum(o.logits.square().mean() for o in got).backward()
    sum(w[2].square().mean() for w in want).backward()
    for (k, p), (_, q) in zip(med.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad, msg=k)
    for (k, b), (_, c) in zip(med.named_buffers(), ref.named_buffers()):
        assert_close(b, c, msg=k)


def test_encoder_runs_once():
    med = Med3DNet(10, HEADS).eval()
    calls = []
    med.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    med(torch.randn(4, 1, 8, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert calls == [4]


def test_dataset_id_forms_and_errors():
    med = Med3DNet(10, HEADS).eval()
    x = torch.randn(3, 1, 8, 9, 7)
    whole = med(x, 1)
    assert [o.head for o in whole] == [1] and whole[0].index.tolist() == [0, 1, 2]
    assert_close(whole[0].logits, med.forward_head(x, "heart"))
    assert_close(whole[0].logits, med.forward_head(x, 1))
    from_list = med(x, [2, 2, 0])
    from_int32 = med(x, torch.tensor([2, 2, 0], dtype=torch.int32))
    for a, b in zip(from_list, from_int32):
        assert a.head == b.head and torch.equal(a.index, b.index)
        assert_close(a.logits, b.logits)
    with pytest.raises(ValueError, match=r"dataset_id 3 out of range.*3 heads"):
        med(x, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"dataset_id -1 out of range"):
        med(x, -1)
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape \(2,\)"):
        med(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="torch.float32"):
        med(x, torch.zeros(3))
    assert med(x[:0], torch.zeros(0, dtype=torch.long)) == []


def test_dataset_id_from_numpy_and_lists_of_non_integers():
    """numpy ids (what a numpy-based loader yields) were refused; a list of floats was
    truncated to integers silently ([0.5, 2] routed sample 0 to head 0). From the API audit."""
    import numpy as np

    med = Med3DNet(10, HEADS).eval()
    x = torch.randn(3, 1, 8, 9, 7)
    want = med(x, torch.tensor([2, 0, 2]))
    for ids in (np.array([2, 0, 2]), np.array([2, 0, 2], dtype=np.uint8), [np.int64(2), 0, 2]):
        got = med(x, ids)
        assert [(o.head, o.index.tolist()) for o in got] == [(o.head, o.index.tolist()) for o in want]
        for a, b in zip(got, want):
            assert_close(a.logits, b.logits)
    whole = med(x, np.int64(1))
    assert [o.head for o in whole] == [1] and whole[0].index.tolist() == [0, 1, 2]
    for bad in ([0.5, 2, 0], [True, False, True], np.array([0.0, 1.0, 2.0]), [0, "a", 1],
                np.bool_(True)):
        with pytest.raises(ValueError, match=r"dataset_id must be an int or 3 integers"):
            med(x, bad)


def test_bad_heads():
    with pytest.raises(ValueError, match="non-empty dict"):
        Med3DNet(10, {})
    with pytest.raises(ValueError, match=r"'a\.b'"):
        Med3DNet(10, {"a.b": 2})
    with pytest.raises(ValueError, match="positive int"):
        Med3DNet(10, {"a": 0})


def test_bad_head_selection_and_inputs_are_named():
    # forward_head(x, 5) / forward_head(x, "lung") gave a bare IndexError / KeyError; a complex
    # dataset_id passed the integer check; None as image gave an AttributeError
    import numpy as np

    med = Med3DNet(10, {"liver": np.int64(3), "heart": 2}).eval()
    assert med.head_classes == [3, 2] and type(med.head_classes[0]) is int
    x = torch.randn(2, 1, 8, 8, 8)
    for bad in (5, -3, "lung", 1.0, True):
        with pytest.raises(ValueError, match=r"is not one of this Med3DNet's heads: indices "
                                             r"0..1 or names \['liver', 'heart'\]"):
            med.forward_head(x, bad)
    assert_close(med.forward_head(x, -1), med.forward_head(x, "heart"))
    with pytest.raises(ValueError, match="torch.complex64"):
        med(x, torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"argument 'image' must be a tensor, got NoneType"):
        med(None, 0)


def test_encoder_export_and_rebuild(tmp_path):
    med = Med3DNet(10, HEADS)
    p = save_encoder_medicalnet(med, tmp_path / "enc.pth")
    seg = resnet3d(10, num_seg_classes=5)
    report = load_medicalnet_weights(seg, p)
    assert report.loaded == sorted(released_keys(10))
    for k, v in med.encoder.state_dict().items():
        assert_close(seg.state_dict()[k], v)
    # arch rebuilds the same structure; the encoder alone round-trips through load_state_dict
    again = build_model(med.arch)
    assert list(again.state_dict()) == list(med.state_dict())
    again.encoder.load_state_dict(med.encoder.state_dict())
    assert med.arch["heads"] == HEADS and med.arch["task"] == "pretrain"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ids", [[1, 0, 1, 2, 0, 2], [0, 0, 1, 2, 2, 2], [2, 2, 2, 2, 2, 2]])
def test_routing_gathers_once_and_keeps_the_layout(channels_last, ids):
    """The batch is sorted by head with one gather (none when it is in head order already) and
    each head reads a view of it: a gather per head cost a launch forward and two backward per
    head and step. The heads get the encoder's layout (index_select gave channels_last_3d
    features back as NCDHW: each head's first conv converted them again). Outputs and every
    gradient equal the heads run one by one."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    med = Med3DNet(10, HEADS)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    med = med.to(memory_format=fmt)
    ref = copy.deepcopy(med)
    x = torch.randn(6, 1, 9, 10, 11).contiguous(memory_format=fmt)
    ids = torch.tensor(ids)
    seen = []
    for name in HEADS:
        med.heads[name].register_forward_pre_hook(
            lambda m, a: seen.append(a[0].is_contiguous(memory_format=fmt)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = med(x, ids)
        sum(o.logits.square().mean() for o in got).backward()
    names = [e.name for e in prof.events()]
    gathers = 0 if bool((ids[1:] >= ids[:-1]).all()) else 1
    assert names.count("aten::index_select") == gathers, names.count("aten::index_select")
    assert all(seen) and len(seen) == len(set(ids.tolist()))
    want = _run_separately(ref, x, ids)
    _compare(got, want)
    sum(w[2].square().mean() for w in want).backward()
    for (k, p), (_, q) in zip(med.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), k
        else:
            assert_close(p.grad, q.grad, msg=k)


def test_rows_by_head_equals_indexing_each_head():
    from med3d_ext.models.med3d import rows_by_head

    med = Med3DNet(10, HEADS).eval()
    n = int(torch.randint(2, 9, ()))
    ids = torch.randint(0, 3, (n,))
    labels = torch.randint(0, 200, (n, 3, 4, 5), dtype=torch.uint8)
    with torch.no_grad():
        outs = med(torch.randn(n, 1, 8, 8, 8), ids)
    got = rows_by_head(labels, outs)
    assert len(got) == len(outs)
    for g, o in zip(got, outs):
        assert torch.equal(g, labels[o.index]) and g.dtype == torch.uint8
    assert rows_by_head(labels, []) == []


def test_rows_by_head_of_one_head_with_the_whole_batch_is_the_batch():
    from med3d_ext.models.med3d import rows_by_head

    med = Med3DNet(10, HEADS).eval()
    labels = torch.randint(0, 3, (3, 4, 4, 4))
    with torch.no_grad():
        outs = med(torch.randn(3, 1, 8, 8, 8), 1)
    assert len(outs) == 1 and rows_by_head(labels, outs)[0] is labels  # no copy
