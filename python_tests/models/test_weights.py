"""load_medicalnet_weights / infer_medicalnet_depth / encoder export: every format, with and
without ``module.``, into every model type, and every error path."""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from med3d_ext.models import (
    ClassificationNet,
    Med3DNet,
    MedicalNetWeightsError,
    atomic_save,
    encoder_state_dict,
    infer_medicalnet_depth,
    load_medicalnet_weights,
    resnet3d,
    save_encoder_medicalnet,
    save_encoder_safetensors,
)
from python_tests.conftest import assert_close

DATA = Path(__file__).resolve().parents[1] / "data"
ALL_DEPTHS = [10, 18, 34, 50, 101, 152, 200]


def released_keys(depth):
    ref = json.loads((DATA / f"resnet{depth}.json").read_text())
    return [e["key"] for e in ref["state_dict"] if e["in_released_file"]]


def _randomise(net):
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v))
            else:
                v.fill_(int(torch.randint(1, 100, ())))
    return net


@pytest.fixture(scope="module")
def src10():
    return _randomise(resnet3d(10))


@pytest.fixture(scope="module")
def src18():
    return _randomise(resnet3d(18))


def released_file(model, path, legacy=False, prefix="module."):
    """A file in MedicalNet's released layout, written the way MedicalNet's code did."""
    sd = {prefix + k: v for k, v in model.state_dict().items() if not k.startswith("conv_seg.")}
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=not legacy)
    return path


def assert_encoder_equal(model, src):
    got, want = encoder_state_dict(model), encoder_state_dict(src)
    assert list(got) == list(want)
    for k in want:
        assert_close(got[k], want[k])


# -------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("depth", ALL_DEPTHS)
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_infer_depth_all_depths(depth, shortcut):
    with torch.device("meta"):
        net = resnet3d(depth, shortcut_type=shortcut)
        med = Med3DNet(depth, {"x": 2}, shortcut_type=shortcut)
    sd = net.state_dict()
    assert infer_medicalnet_depth(sd) == (depth, shortcut)
    assert infer_medicalnet_depth({"module." + k: v for k, v in sd.items()}) == (depth, shortcut)
    assert infer_medicalnet_depth({"state_dict": {"module." + k: v for k, v in sd.items()
                                                  if not k.startswith("conv_seg")}}) \
        == (depth, shortcut)
    assert infer_medicalnet_depth(med.state_dict()) == (depth, shortcut)  # encoder.* prefix
    assert infer_medicalnet_depth(net) == (depth, shortcut)


def test_infer_depth_from_files(tmp_path, src18):
    p = released_file(src18, tmp_path / "resnet_18.pth")
    assert infer_medicalnet_depth(p) == (18, "A")
    assert infer_medicalnet_depth(str(p)) == (18, "A")
    with pytest.raises(MedicalNetWeightsError, match="match no MedicalNet depth"):
        sd = {k: v for k, v in src18.state_dict().items() if not k.startswith("layer4.1.")}
        infer_medicalnet_depth(sd)
    with pytest.raises(MedicalNetWeightsError, match="no MedicalNet encoder"):
        infer_medicalnet_depth({"fc.weight": torch.zeros(2)})


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_released_layout(tmp_path, src10, legacy, prefix):
    p = released_file(src10, tmp_path / "resnet_10.pth", legacy, prefix)
    model = resnet3d(10, num_seg_classes=3)
    report = load_medicalnet_weights(model, p)
    assert_encoder_equal(model, src10)
    assert report.source_format == "medicalnet"
    assert (report.depth, report.shortcut_type) == (10, "B")
    assert report.loaded == sorted(released_keys(10))
    assert report.missing == sorted(k for k in model.state_dict() if k.startswith("conv_seg."))
    assert report.unexpected == [] and report.skipped == []
    text = str(report)
    # 12 head weights listed, the head BatchNorm's counter (and the encoder's) counted apart
    assert str(p) in text and "missing (12)" in text and "conv_seg" in text


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_bare_full_state_dict(tmp_path, src10, prefix):
    p = tmp_path / "full.pth"
    torch.save({prefix + k: v for k, v in src10.state_dict().items()}, p)
    model = resnet3d(10)
    report = load_medicalnet_weights(model, p)
    assert report.source_format == "state_dict"
    assert report.missing == [] and report.unexpected == []
    for k, v in src10.state_dict().items():
        assert_close(model.state_dict()[k], v)
    # in-memory dicts work as well
    model2 = resnet3d(10)
    assert load_medicalnet_weights(model2, src10.state_dict()).missing == []
    assert_encoder_equal(model2, src10)


def test_head_with_other_class_count_is_skipped(src10):
    model = resnet3d(10, num_seg_classes=5)
    report = load_medicalnet_weights(model, src10.state_dict())
    assert [s.split(" ")[0] for s in report.skipped] == ["conv_seg.6.weight"]
    assert "(2, 32, 1, 1, 1)" in report.skipped[0] and "(5, 32, 1, 1, 1)" in report.skipped[0]
    assert_close(model.conv_seg[0].weight, src10.conv_seg[0].weight)
    assert "skipped (1)" in str(report)


def _our_checkpoint(model, path):
    atomic_save({"format": "med3d_ext", "version": 1, "arch": model.arch,
                 "state_dict": model.state_dict(), "optimizer": {"state": {}, "lr": [1e-3]},
                 "step": 7, "epoch": 1, "rng": {"cpu": torch.get_rng_state(), "python": [1, 2]},
                 "config": {"depth": 10, "lr": 1e-3}}, path)
    return path


def test_our_checkpoint_into_every_model(tmp_path):
    med = _randomise(Med3DNet(10, {"liver": 3, "heart": 2}))
    p = _our_checkpoint(med, tmp_path / "ckpt.pt")
    same = Med3DNet(10, {"liver": 3, "heart": 2})
    r = load_medicalnet_weights(same, p)
    assert r.source_format == "med3d_ext" and r.missing == [] and r.unexpected == []
    for k, v in med.state_dict().items():
        assert_close(same.state_dict()[k], v)
    cls = ClassificationNet(10, 4)
    r = load_medicalnet_weights(cls, p)
    assert_encoder_equal(cls, med.encoder)
    assert r.missing == ["head.fc.bias", "head.fc.weight"]
    assert r.unexpected and all(k.startswith("heads.") for k in r.unexpected)
    seg = resnet3d(10, num_seg_classes=2)
    r = load_medicalnet_weights(seg, p)
    assert_encoder_equal(seg, med.encoder)
    assert all(k.startswith("conv_seg.") for k in r.missing)
    # a classification checkpoint back into a classification model keeps its head
    cls2 = ClassificationNet(10, 4)
    load_medicalnet_weights(cls2, _our_checkpoint(cls, tmp_path / "cls.pt"))
    assert_close(cls2.head.fc.weight, cls.head.fc.weight)


def test_released_file_into_med3d_and_classification(tmp_path, src18):
    p = released_file(src18, tmp_path / "r18.pth")
    med = Med3DNet(18, {"a": 2, "b": 5})
    r = load_medicalnet_weights(med, p)
    assert_encoder_equal(med, src18)
    assert all(k.startswith("heads.") for k in r.missing) and r.unexpected == []
    cls = ClassificationNet(18, 2)
    load_medicalnet_weights(cls, p)
    assert_encoder_equal(cls, src18)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_safetensors_roundtrip(tmp_path, src10, suffix):
    from safetensors import safe_open

    p = save_encoder_safetensors(src10, tmp_path / f"enc{suffix}", metadata={"note": "x"})
    with safe_open(str(p), framework="pt") as f:
        assert sorted(f.keys()) == sorted(released_keys(10))
        meta = f.metadata()
    assert meta["depth"] == "10" and meta["shortcut_type"] == "B" and meta["note"] == "x"
    assert infer_medicalnet_depth(p) == (10, "B")
    model = ClassificationNet(10, 3)
    r = load_medicalnet_weights(model, p)  # recognised by content with a .bin suffix too
    assert r.source_format == "safetensors"
    assert_encoder_equal(model, src10)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_export_medicalnet_layout(tmp_path, src10):
    med = Med3DNet(10, {"a": 2})
    med.encoder.load_state_dict(encoder_state_dict(src10))
    p = save_encoder_medicalnet(med, tmp_path / "sub" / "resnet_10.pth")
    obj = torch.load(p, weights_only=True)
    assert list(obj) == ["state_dict"]
    assert list(obj["state_dict"]) == ["module." + k for k in released_keys(10)]
    model = resnet3d(10)
    load_medicalnet_weights(model, p)
    assert_encoder_equal(model, src10)
    assert sorted(os.listdir(p.parent)) == ["resnet_10.pth"]  # no temporary left behind


def test_missing_num_batches_tracked_is_tolerated(src10):
    sd = {k: v for k, v in src10.state_dict().items()
          if "num_batches_tracked" not in k and not k.startswith("conv_seg")}
    model = resnet3d(10, num_seg_classes=2)
    r = load_medicalnet_weights(model, sd)
    enc_missing = [k for k in r.missing if not k.startswith("conv_seg")]
    assert enc_missing and all(k.endswith("num_batches_tracked") for k in enc_missing)
    assert_close(model.conv1.weight, src10.conv1.weight)
    # the printed report lists the weights left as initialised (the head) and counts the
    # counters apart: listed first, they hid the head's keys (README audit)
    text = str(r)
    head = [k for k in r.missing if k.startswith("conv_seg") and "num_batches" not in k]
    assert f"missing ({len(head)}) -- not in the file" in text and "conv_seg.0.weight" in text
    n_counters = sum(k.endswith("num_batches_tracked") for k in r.missing)
    assert f"and {n_counters} BatchNorm step counters (num_batches_tracked)" in text
    assert "bn1.num_batches_tracked" not in text


def test_in_channels_adaptation(src10):
    model = resnet3d(10, in_channels=3)
    r = load_medicalnet_weights(model, released_file_dict(src10))
    assert r.adapted and "1 -> 3" in r.adapted[0] and "adapted" in str(r)
    assert_close(model.conv1.weight, src10.conv1.weight.repeat(1, 3, 1, 1, 1) / 3)
    # Three identical channels through the adapted kernel == one channel through the kernel
    # summed over channels (which the assert above pins to the released kernel up to the
    # float32 division). Compared in float64 with the summed kernel taken from the adapted
    # model itself, so the float32 rounding of "/ 3" (amplified by ten layers of random
    # weights) cannot make the check flaky.
    src, model = copy.deepcopy(src10).double().eval(), model.double().eval()
    with torch.no_grad():
        src.conv1.weight.copy_(model.conv1.weight.sum(1, keepdim=True))
    x = torch.randn(1, 1, 9, 10, 11, dtype=torch.float64)
    assert_close(model.features(x.expand(1, 3, -1, -1, -1)), src.features(x), dtype=torch.float64)
    # a file that is not one-channel cannot be adapted
    with pytest.raises(MedicalNetWeightsError, match=r"'conv1.weight'.*\(64, 3, 7, 7, 7\).*"
                                                       r"\(64, 2, 7, 7, 7\).*in_channels"):
        load_medicalnet_weights(resnet3d(10, in_channels=2), model.state_dict())


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_wrapped_models(src10, wrap):
    inner = ClassificationNet(10, 2)
    model = torch.nn.DataParallel(inner) if wrap == "DataParallel" else torch.compile(inner)
    assert list(model.state_dict())[0] != "encoder.conv1.weight"  # the wrapper adds a prefix
    load_medicalnet_weights(model, released_file_dict(src10))
    assert_encoder_equal(inner, src10)
    assert list(encoder_state_dict(model)) == released_keys(10)
    assert infer_medicalnet_depth(model) == (10, "B")


def released_file_dict(model):
    return {"state_dict": {"module." + k: v for k, v in encoder_state_dict(model).items()}}


# ----------------------------------------------------------------------------------- errors


def test_wrong_depth(tmp_path, src18):
    p = released_file(src18, tmp_path / "resnet_18.pth")
    with pytest.raises(MedicalNetWeightsError) as e:
        load_medicalnet_weights(resnet3d(34), p)
    msg = str(e.value)
    assert str(p) in msg and "ResNet-18" in msg and "ResNet-34" in msg and "wrong depth" in msg
    assert "resnet3d(18, shortcut_type='A')" in msg and "e.g. layer1.2." in msg
    with pytest.raises(MedicalNetWeightsError, match="wrong depth"):
        load_medicalnet_weights(resnet3d(10, shortcut_type="A"), p)


def test_wrong_shortcut(tmp_path, src10):
    p = released_file(src10, tmp_path / "resnet_10.pth")
    with pytest.raises(MedicalNetWeightsError) as e:
        load_medicalnet_weights(resnet3d(10, shortcut_type="A"), p)
    msg = str(e.value)
    assert str(p) in msg and "wrong shortcut type" in msg and "downsample" in msg
    assert "not in the model" in msg and "resnet3d(10, shortcut_type='B')" in msg
    assert "shortcut B" in msg and "shortcut A" in msg


def test_shape_mismatch_names_key_and_shapes(tmp_path, src10):
    d = released_file_dict(src10)
    d["state_dict"]["module.layer2.0.bn1.weight"] = torch.ones(65)
    p = tmp_path / "bad.pth"
    torch.save(d, p)
    with pytest.raises(MedicalNetWeightsError) as e:
        load_medicalnet_weights(resnet3d(10), p)
    msg = str(e.value)
    for part in (str(p), "'layer2.0.bn1.weight'", "(65,)", "(128,)", "not the depth or shortcut",
                 "ResNet-10 with shortcut B"):
        assert part in msg
    # a shape mismatch from a real depth difference names the cause and the fix
    bottleneck_like = dict(src10.state_dict())
    bottleneck_like["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1, 1)
    with pytest.raises(MedicalNetWeightsError, match=r"'layer1.0.conv2.weight'.*\(64, 64, 1, 1, "
                                                     r"1\).*\(64, 64, 3, 3, 3\)"):
        load_medicalnet_weights(resnet3d(10), bottleneck_like)


def test_missing_file_and_directory(tmp_path):
    p = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_medicalnet_weights(resnet3d(10), p)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        infer_medicalnet_depth(p)
    with pytest.raises(MedicalNetWeightsError, match="is not a file"):
        load_medicalnet_weights(resnet3d(10), tmp_path)


@pytest.fixture(scope="module")
def full_files(tmp_path_factory, src10):
    d = tmp_path_factory.mktemp("full")
    return {"zip": released_file(src10, d / "full.pth"),
            "legacy": released_file(src10, d / "full_legacy.pth", legacy=True),
            "safetensors": save_encoder_safetensors(src10, d / "full.safetensors")}


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("frac", [0.5, 0.01, 0.999])
def test_truncated_file(tmp_path, full_files, kind, frac):
    full = full_files[kind]
    assert infer_medicalnet_depth(full) == (10, "B")  # the uncut file is fine
    data = full.read_bytes()
    p = tmp_path / ("cut" + full.suffix)
    p.write_bytes(data[: max(1, int(len(data) * frac))])
    with pytest.raises(MedicalNetWeightsError, match=r"truncated|corrupted") as e:
        load_medicalnet_weights(resnet3d(10), p)
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)  # one line for the CLI, not torch's paragraph


def test_not_a_weights_file_is_one_line(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_bytes(b"not a torch file at all, just some bytes")
    with pytest.raises(MedicalNetWeightsError, match=r"notes.pth.*is a text file \(it starts with "
                                                     r"'not a torch file at all.*not a PyTorch file") as e:
        load_medicalnet_weights(resnet3d(10), p)
    assert "\n" not in str(e.value)


def test_pickled_code_is_refused(tmp_path, src10):
    d = released_file_dict(src10)
    d["args"] = argparse.Namespace(depth=10)  # a common extra in training checkpoints
    p = tmp_path / "with_args.pth"
    torch.save(d, p)
    with pytest.raises(MedicalNetWeightsError) as e:
        load_medicalnet_weights(resnet3d(10), p)
    msg = str(e.value)
    assert str(p) in msg and "argparse.Namespace" in msg and "weights_only=True" in msg
    assert "truncated" not in msg
    whole = tmp_path / "whole_module.pth"
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(MedicalNetWeightsError, match=r"refusing to load .*whole_module.pth.*"
                                                     r"torch\.nn"):
        load_medicalnet_weights(resnet3d(10), whole)


@pytest.mark.parametrize("value", ["a string", [1, 2], 3.0], ids=["str", "list", "float"])
def test_non_tensor_entry(tmp_path, src10, value):
    d = released_file_dict(src10)
    d["state_dict"]["module.bn1.bias"] = value
    p = tmp_path / "odd.pth"
    torch.save(d, p)
    with pytest.raises(MedicalNetWeightsError, match=r"odd.pth.*'module.bn1.bias'.*not a tensor"):
        load_medicalnet_weights(resnet3d(10), p)


def test_other_bad_contents(tmp_path, src10):
    p = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), p)
    with pytest.raises(MedicalNetWeightsError, match=r"tensor.pth.*holds a Tensor"):
        load_medicalnet_weights(resnet3d(10), p)
    p = tmp_path / "noenc.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, p)
    with pytest.raises(MedicalNetWeightsError, match=r"noenc.pth.*no MedicalNet encoder"):
        load_medicalnet_weights(resnet3d(10), p)
    p = tmp_path / "future.pt"
    torch.save({"format": "med3d_ext", "version": 99, "state_dict": {}}, p)
    with pytest.raises(MedicalNetWeightsError, match=r"future.pt.*version 99"):
        load_medicalnet_weights(resnet3d(10), p)
    with pytest.raises(TypeError, match="no MedicalNet encoder|neither"):
        load_medicalnet_weights(torch.nn.Linear(2, 2), src10.state_dict())
    with pytest.raises(TypeError, match="expected a path"):
        load_medicalnet_weights(resnet3d(10), 42)


def test_corrupted_values_and_merged_prefixes_are_refused(tmp_path, src10):
    # load_state_dict used to cast integer/bool tensors into float parameters (complex: the
    # imaginary part dropped), copy NaN/Inf as they are, and let 'module.x' overwrite 'x'
    sd = src10.state_dict()
    key = "layer1.0.conv1.weight"
    w = sd[key]
    bad = {"holds torch.int64 values, the model's is torch.float32": w.long(),
           "holds torch.bool values": w > 0, "holds torch.complex64 values": w.to(torch.complex64),
           "is a meta tensor": w.to("meta")}
    nan = w.clone()
    nan.view(-1)[torch.randint(0, nan.numel(), (3,))] = float("nan")
    bad[r"holds [1-3] NaN/Inf value\(s\)"] = nan
    for msg, v in bad.items():
        with pytest.raises(MedicalNetWeightsError, match=rf"encoder key '{key}' {msg}"):
            load_medicalnet_weights(resnet3d(10), {**sd, key: v})
    with pytest.raises(MedicalNetWeightsError, match=r"'bn1.num_batches_tracked' holds "
                                                     r"torch.float32 values"):
        load_medicalnet_weights(resnet3d(10), {**sd, "bn1.num_batches_tracked": torch.tensor(3.7)})
    # a negative running variance loaded and gave NaN in eval mode (API audit)
    var = sd["layer1.0.bn2.running_var"].clone()
    var[torch.randint(0, var.numel(), (1,))] = -0.5
    with pytest.raises(MedicalNetWeightsError, match=r"'layer1.0.bn2.running_var' holds 1 "
                                                     r"negative variance\(s\) of 64"):
        load_medicalnet_weights(resnet3d(10), {**sd, "layer1.0.bn2.running_var": var})
    merged = {**sd, **{"module." + k: torch.zeros_like(v) for k, v in sd.items()}}
    p = tmp_path / "merged.pth"
    torch.save({"state_dict": merged}, p)
    with pytest.raises(MedicalNetWeightsError, match=r"merged.pth.*keys 'conv1.weight' and "
                                                     r"'module.conv1.weight' are both present"):
        load_medicalnet_weights(resnet3d(10), p)
    # the wrapped key first: the message named the stripped key twice (README audit)
    w = sd["conv1.weight"]
    with pytest.raises(MedicalNetWeightsError, match=r"keys 'module.conv1.weight' and "
                                                     r"'conv1.weight' are both present"):
        load_medicalnet_weights(resnet3d(10), {"module.conv1.weight": w, "conv1.weight": w})
    with pytest.raises(TypeError, match=r"argument 'model' must be an nn.Module, got NoneType"):
        load_medicalnet_weights(None, sd)
    # a torch.compile'd model's state dict (keys '_orig_mod.<key>', also under 'module.')
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        m = resnet3d(10)
        load_medicalnet_weights(m, {prefix + k: v for k, v in sd.items()})
        torch.testing.assert_close(m.conv1.weight, sd["conv1.weight"])
        assert infer_medicalnet_depth({prefix + k: v for k, v in sd.items()}) == (10, "B")
    # a float16 file still loads into a float32 model (a cast within floating point)
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    model = resnet3d(10)
    load_medicalnet_weights(model, half)
    assert_close(model.conv1.weight, sd["conv1.weight"].half().float())


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(2)}, p)
    before = p.read_bytes()

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.zeros(2)}, p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.cuda
def test_cuda_saved_file_loads_on_cpu(tmp_path, src10):
    # MedicalNet's released tensors are CUDA tensors; we always map to the CPU first
    d = {"state_dict": {k: v.cuda() for k, v in released_file_dict(src10)["state_dict"].items()}}
    p = tmp_path / "cuda.pth"
    torch.save(d, p, _use_new_zipfile_serialization=False)
    model = resnet3d(10)
    load_medicalnet_weights(model, p)
    assert_encoder_equal(model, src10)
    model_cuda = resnet3d(10).cuda()
    load_medicalnet_weights(model_cuda, p)
    assert model_cuda.conv1.weight.is_cuda
    assert_close(model_cuda.conv1.weight.cpu(), src10.conv1.weight)


# ---------------------------------------------------------------------------------- the CLI


def test_cli_inspect_and_convert(tmp_path, src18, capsys):
    from med3d_ext.models.__main__ import main

    p = released_file(src18, tmp_path / "resnet_18.pth")
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "ResNet-18, shortcut A" in out and "medicalnet" in out
    assert f"{manifest_params(18):,} parameters" in out
    st = tmp_path / "r18.safetensors"
    assert main(["convert", str(p), str(st)]) == 0
    assert infer_medicalnet_depth(st) == (18, "A")
    back = tmp_path / "back.pth"
    assert main(["convert", str(st), str(back)]) == 0
    model = resnet3d(18)
    load_medicalnet_weights(model, back)
    assert_encoder_equal(model, src18)
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    # inspect says whether the encoder loads: a corrupted file's summary looked like any other
    # (data API audit); the summary is still printed, and the exit code is 1
    assert "check:     ok" in out
    sd = {k: v.clone() for k, v in src18.state_dict().items()}
    sd["layer2.0.bn1.running_var"][3] = -1.0
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    assert main(["inspect", str(tmp_path / "bad.pth")]) == 1
    out = capsys.readouterr().out
    assert "ResNet-18, shortcut A" in out and "check:     FAILED" in out
    assert "'layer2.0.bn1.running_var' holds 1 negative variance" in out


def manifest_params(depth):
    return json.loads((DATA / f"resnet{depth}.json").read_text())["num_params_encoder"]


# ------------------------------------------------------------------------------ hunt findings


def test_head_values_are_checked_as_the_encoders(tmp_path, src10):
    """Head tensors with NaN or integer values were loaded (and cast) without a word."""
    for key, bad, msg in (("conv_seg.6.weight", float("nan"), r"NaN/Inf value"),
                          ("conv_seg.3.weight", None, r"torch.int32 values")):
        sd = {k: v.clone() for k, v in src10.state_dict().items()}
        if bad is None:
            sd[key] = sd[key].to(torch.int32)
        else:
            sd[key].view(-1)[0] = bad
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "f.pth")
        with pytest.raises(MedicalNetWeightsError, match=rf"head key '{key}' holds .*{msg}"):
            load_medicalnet_weights(resnet3d(10), tmp_path / "f.pth")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_cli_convert_keeps_the_files_dtype(tmp_path, src10, dtype, capsys):
    from med3d_ext.models.__main__ import main
    from med3d_ext.models.weights import read_state_dict

    src = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in src10.state_dict().items()
           if not k.startswith("conv_seg.")}
    torch.save({"state_dict": {"module." + k: v for k, v in src.items()}}, tmp_path / "in.pth")
    for out in ("out.safetensors", "out.pth"):
        assert main(["convert", str(tmp_path / "in.pth"), str(tmp_path / out)]) == 0
        assert str(dtype).replace("torch.", "") in capsys.readouterr().out
        got, _, _ = read_state_dict(tmp_path / out)
        got = {k.removeprefix("module."): v for k, v in got.items()}
        assert set(got) == set(src) and all(torch.equal(got[k], src[k]) for k in src)
    # the suffix in any case (OUT.SAFETENSORS was written as a torch zip file; data API audit)
    assert main(["convert", str(tmp_path / "in.pth"), str(tmp_path / "up.SAFETENSORS")]) == 0
    assert (tmp_path / "up.SAFETENSORS").read_bytes()[:2] != b"PK"  # not a zip
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "up.SAFETENSORS"))) == set(src)


def test_cli_convert_refuses_folders_and_odd_files(tmp_path, src10, capsys):
    from med3d_ext.models.__main__ import main

    p = released_file(src10, tmp_path / "r10.pth")
    for out in ("", str(tmp_path / "newdir") + "/", str(tmp_path)):
        assert main(["convert", str(p), out]) == 2
        assert "is not a file name" in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists()
    # OUT = FILE wrote the encoder over the input (a trained head in it was gone), exit 0
    before = p.read_bytes()
    for out in (str(p), str(tmp_path / "." / "r10.pth")):
        assert main(["convert", str(p), out]) == 2
        assert "is the input file itself" in capsys.readouterr().err
    assert p.read_bytes() == before
    sd = dict(src10.state_dict(), **{"conv1.weight": torch.zeros(64)})
    torch.save(sd, tmp_path / "flat.pth")
    assert main(["inspect", str(tmp_path / "flat.pth")]) == 2
    assert "conv1.weight has shape (64,)" in capsys.readouterr().err


def test_a_folded_model_is_not_exported(tmp_path):
    from med3d_ext.nn import fold_bn

    net = fold_bn(resnet3d(10))
    for save in (save_encoder_medicalnet, save_encoder_safetensors):
        with pytest.raises(MedicalNetWeightsError, match="folded into its convolutions"):
            save(net, tmp_path / "x.pth")
    assert list(tmp_path.iterdir()) == []


def test_loading_into_a_folded_model_says_to_load_before_fold_bn(src10):
    """fold_bn replaces the BatchNorms by nn.Identity: loading a file then blamed "a modified
    network or a corrupted file" (API audit)."""
    import med3d_ext as m3d
    from med3d_ext.models import Med3DNet

    sd = src10.state_dict()
    folded = m3d.nn.fold_bn(resnet3d(10).eval())
    with pytest.raises(MedicalNetWeightsError, match=r"folded into the convolutions by "
                                                     r"med3d_ext.nn.fold_bn.*e.g. bn1\)\. Load"):
        load_medicalnet_weights(folded, sd)
    med = m3d.nn.fold_bn(Med3DNet(10, {"a": 2}).eval())
    with pytest.raises(MedicalNetWeightsError, match=r"e.g. encoder.bn1\)"):
        load_medicalnet_weights(med, sd)
    # the order the message gives works, and the folded model computes the loaded network
    plain = resnet3d(10).eval()
    load_medicalnet_weights(plain, sd)
    x = torch.randn(1, 1, 16, 16, 16)
    got, want = m3d.nn.fold_bn(copy.deepcopy(plain))(x), plain(x)
    # random weights: activations reach ~1e13, so the error is measured relative to the output
    assert float((got - want).norm() / want.norm()) < 1e-5

