"""fp32 fallback (mixed precision) and per-layer sensitivity: named layers really stay fp32 in
every flow's deployment file; the validation subset comes from the training split, never the
test split; a deliberately broken layer ranks first; bad names fail in one line."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from quantbench import models, runtimes
from quantbench.errors import QuantbenchError
from quantbench.export import read_sidecar
from quantbench.deploy import suffix
from quantbench.flows import get_flow, quantizable_layers
from quantbench.quantize import QuantizeConfig, export_model, quantize, quantize_to_file
from quantbench.results import OpCounts
from quantbench.cli import sensitivity_args, sensitivity_cmd
from quantbench.sensitivity import render_sensitivity, sensitivity, validation_split

RESNET10_CONVS = 12
FALLBACK = ("conv1", "layer2.0.conv2", "layer3.0.downsample.0", "fc")  # the stem, a residual conv, a shortcut, the head


# ---------------------------------------------------------------- fp32 fallback
@pytest.mark.slow
@pytest.mark.parametrize("flow", ["eager", "fx", "pt2e"])
def test_fallback_keeps_the_named_layers_fp32(flow, tiny_trained_checkpoint, tiny_dataset, tmp_path):
    path = tmp_path / f"mixed{suffix(flow)}"
    cfg = QuantizeConfig(method="static", flow=flow, calib_samples=32, calib_batch_size=16, fp32_layers=FALLBACK)
    qmodel, record = quantize(tiny_trained_checkpoint, cfg, tiny_dataset, progress=False)
    export_model(qmodel, path, record, flow)
    assert runtimes.for_path(path).op_counts(path) == OpCounts(
        int8_conv=RESNET10_CONVS - 3, float_conv=3, int8_linear=0, float_linear=1)
    assert read_sidecar(path)["fp32_layers"] == list(FALLBACK)
    fp32, _ = models.load_checkpoint(tiny_trained_checkpoint)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():  # still the same model
        assert (qmodel(x).argmax(1) == fp32(x).argmax(1)).float().mean() >= 0.75


@pytest.mark.parametrize("flow", ["eager", "fx", "pt2e"])
def test_fallback_of_dynamic_linear(flow, tiny_trained_checkpoint, tmp_path):
    path = tmp_path / f"d{suffix(flow)}"
    quantize_to_file(tiny_trained_checkpoint, path, QuantizeConfig(method="dynamic", flow=flow, fp32_layers=("fc",)),
                     progress=False)
    assert runtimes.for_path(path).op_counts(path).int8_linear == 0


@pytest.mark.slow
def test_pt2e_qat_fallback():
    """torchao's QAT conv+bn rewrite needs every annotated conv to carry specs: the fp32 layers'
    "no config" marks are taken off (flows.pt2e._Quantizer), and the layer gets no fake-quantize.
    (Checked on the prepared graph: converting QAT graphs costs half a minute whatever the model.)"""
    from torch import nn
    pt2e = get_flow("pt2e")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 3))
    prepared = pt2e.prepare(net, "default", qat=True, example=torch.randn(1, 3, 16, 16), fp32_layers=("3",))
    prepared(torch.randn(4, 3, 16, 16))

    def fake_quantized(arg) -> bool:
        return arg.op == "call_module" and "FakeQuant" in type(prepared.get_submodule(arg.target)).__name__

    convs = [n for n in prepared.graph.nodes if str(n.target).startswith("aten.conv2d")]
    owners = [list(n.meta["nn_module_stack"].values())[-1][0] for n in convs]
    assert owners == ["0", "3", "6"]
    assert [fake_quantized(n.args[1]) for n in convs] == [True, False, True]  # weights


@pytest.mark.parametrize("flow", ["eager", "fx", "pt2e"])
def test_unknown_layer_names(flow, tiny_checkpoint, tiny_dataset):
    cfg = QuantizeConfig(method="static", flow=flow, calib_samples=8, fp32_layers=("layer1.0.conv9", "conv1"))
    with pytest.raises(QuantbenchError) as e:
        quantize(tiny_checkpoint, cfg, tiny_dataset, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "'layer1.0.conv9'" in msg and "conv1" in msg and "fc" in msg and "(13 in all)" in msg


# ---------------------------------------------------------------- the validation subset
def test_validation_split_is_held_out_of_training_and_deterministic(tiny_dataset):
    val = validation_split(tiny_dataset, 12, seed=3)
    again = validation_split(tiny_dataset, 12, seed=3)
    other = validation_split(tiny_dataset, 12, seed=4)
    assert len(val.test) == 12 and len(val.train) == len(tiny_dataset.train) - 12
    assert torch.equal(val.test.images, again.test.images) and torch.equal(val.test.labels, again.test.labels)
    assert not torch.equal(val.test.images, other.test.images)

    def rows(images):
        return {bytes(im.flatten().tolist()) for im in images}

    held, rest, test = rows(val.test.images), rows(val.train.images), rows(tiny_dataset.test.images)
    assert held <= rows(tiny_dataset.train.images)       # from the training split,
    assert not held & test and not held & rest           # never the test split, and apart from calibration
    assert len(tiny_dataset.test) == 24 and len(tiny_dataset.train) == 48  # the data given is not changed
    assert val.info["validation"] == {"from": "train", "samples": 12, "seed": 3}


@pytest.mark.parametrize("n", [0, 48])
def test_validation_split_sizes(tiny_dataset, n):
    with pytest.raises(QuantbenchError, match="--val-samples must be between 1 and 47"):
        validation_split(tiny_dataset, n)


def test_validation_split_needs_the_training_split(tiny_dataset):
    import dataclasses
    with pytest.raises(QuantbenchError, match="training split"):
        validation_split(dataclasses.replace(tiny_dataset, train=None), 4)


# ---------------------------------------------------------------- sensitivity
@pytest.fixture(scope="module")
def broken_checkpoint(tiny_trained_checkpoint, tmp_path_factory):
    """The trained resnet10 with one layer made hopeless for int8, fp32 outputs (nearly) kept:
    stem channel 0 is switched off (BN bias far below zero, so ReLU outputs 0), and every filter
    of layer1.0.conv1 gets a huge weight on that dead channel. fp32 multiplies it by 0; int8's
    per-channel weight scale grows with it, and the filters' real weights all round to 0."""
    model, meta = models.load_checkpoint(tiny_trained_checkpoint)
    with torch.no_grad():
        model.bn1.bias[0] = -1e3
        model.layer1[0].conv1.weight[:, 0, 1, 1] = 1e3
    path = tmp_path_factory.mktemp("broken") / "broken.pth"
    models.save_checkpoint(path, model, meta)
    return path


LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sensitivity_args(p)
    return p


@pytest.mark.slow
def test_broken_layer_ranks_first_fx_cli(broken_checkpoint, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "sens"
    args = _parser().parse_args([str(broken_checkpoint), "--flow", "fx", "--data-dir", str(tiny_data_dir),
                                 "--val-samples", "12", "--calib-samples", "16", "--calib-batch-size", "8",
                                 "--layers", ",".join(LAYERS), "--output", str(out), "--no-progress"])
    assert sensitivity_cmd(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sensitivity.json").read_text())
    rows = result["layers"]
    assert [r["layer"] for r in rows][0] == "layer1.0.conv1" and sorted(r["layer"] for r in rows) == sorted(LAYERS)
    broken = rows[0]
    assert broken["sqnr_db"] == min(r["sqnr_db"] for r in rows) and broken["sqnr_db"] < 10
    assert all(r["sqnr_db"] > 20 for r in rows[1:])
    assert broken["drop"] >= max(r["drop"] for r in rows[1:])
    assert broken["fallback_acc"] >= result["int8_acc"]  # keeping it fp32 does not hurt
    assert "numeric_suite_fx" in result["sqnr_tool"] and result["val_samples"] == 12
    assert (out / "sensitivity.png").stat().st_size > 1000
    md = (out / "sensitivity.md").read_text()
    assert "| 1 | layer1.0.conv1 |" in md and "| 1 | layer1.0.conv1 |" in printed


@pytest.mark.slow
@pytest.mark.parametrize("flow, tool", [("pt2e", "numeric debugger"), ("eager", "FX flow's graph")])
def test_broken_layer_ranks_first(flow, tool, broken_checkpoint, tiny_dataset):
    result = sensitivity(broken_checkpoint, tiny_dataset, flow, val_samples=12, calib_samples=16,
                         calib_batch_size=8, layers=["layer1.0.conv1", "layer1.0.conv2"], progress=False)
    first, second = result.layers
    assert first.layer == "layer1.0.conv1" and first.sqnr_db < second.sqnr_db - 20
    assert tool in result.sqnr_tool
    assert result.fp32_acc >= result.int8_acc and first.fallback_acc >= result.int8_acc
    assert "| 1 | layer1.0.conv1 |" in render_sensitivity(result)


def test_sensitivity_bad_layer_and_options(tiny_checkpoint, tiny_dataset, tiny_data_dir, tmp_path):
    with pytest.raises(QuantbenchError, match="unknown layer 'nope'") as e:
        sensitivity(tiny_checkpoint, tiny_dataset, "fx", val_samples=4, calib_samples=8, layers=["nope"],
                    progress=False)
    assert "\n" not in str(e.value)
    for bad, expect in ((["--observer", "max"], "unknown observer"), (["--flow", "tflite"], "unknown flow"),
                        (["--calib-transform", "aug"], "unknown calibration transform"),
                        (["--qconfig", "int4"], "unknown qconfig")):
        args = _parser().parse_args([str(tiny_checkpoint), "--data-dir", str(tiny_data_dir),
                                     "--output", str(tmp_path / "x"), *bad])
        with pytest.raises(QuantbenchError, match=expect):
            sensitivity_cmd(args)
    assert not (tmp_path / "x").exists()  # checked before anything was written


def test_quantizable_layers_names(tiny_checkpoint):
    model, _ = models.load_checkpoint(tiny_checkpoint)
    names = quantizable_layers(model)
    assert len(names) == RESNET10_CONVS + 1 and names[0] == "conv1" and names[-1] == "fc"
    twin, _ = models.load_checkpoint(tiny_checkpoint, quantizable=True)
    assert quantizable_layers(twin) == names  # eager's twin: the same names
