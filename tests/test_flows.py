"""The FX and PT2E flows end to end on the tiny resnet10: every method quantizes, keeps the fp32
model's predictions, and writes a deployment file that plain torch runs (no quantbench) with the
in-process outputs; PT2E's compiled loader really runs int8 kernels; QAT controls of exported
graphs; clear errors for combinations that cannot work."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from quantbench import models, runtimes
from quantbench.data import Batches
from quantbench.errors import QuantbenchError
from quantbench.export import read_sidecar
from quantbench.deploy import suffix
from quantbench.flows import check_method, get_flow
from quantbench.quantize import QuantizeConfig, export_model, quantize, quantize_to_file
from quantbench.results import OpCounts
from quantbench.runtimes import load as load_deployed

# QAT fine-tunes (seconds each): slow, so the fast subset keeps dynamic and static of every flow
CASES = [pytest.param(flow, method, marks=pytest.mark.slow) if method == "qat" else (flow, method)
         for flow in ("eager", "fx", "pt2e") for method in ("dynamic", "static", "qat")]
ALL_CASES = [(flow, method) for flow in ("eager", "fx", "pt2e") for method in ("dynamic", "static", "qat")]
RESNET10_CONVS = 12  # stem + 4 blocks x 2 + 3 downsample convolutions


def _inputs(data) -> torch.Tensor:
    """The tiny test split, normalized as the models expect (24 images)."""
    return torch.cat([x for x, _ in Batches(data.test, 64, data.mean, data.std)])


class _Quantized(dict):
    """{(flow, method): (deployment file, in-process int8 model)}, each made when first asked for."""

    def __init__(self, checkpoint, data, out):
        super().__init__()
        self.checkpoint, self.data, self.out = checkpoint, data, out

    def __missing__(self, key):
        flow, method = key
        cfg = QuantizeConfig(method=method, flow=flow, calib_samples=48, calib_batch_size=16,
                             qat_schedule="smoke", work_dir=self.out / f"qat-{flow}")
        qmodel, record = quantize(self.checkpoint, cfg, self.data, progress=False)
        path = self.out / f"{method}-{flow}{suffix(flow)}"
        sidecar = export_model(qmodel, path, record, flow)
        want = {"dynamic": "ptq-d", "static": "ptq-s", "qat": "qat"}[method]
        assert sidecar["label"] == (want if flow == "eager" else f"{want}-{flow}")
        self[key] = path, qmodel
        return self[key]

    def every(self) -> dict:
        return {k: self[k] for k in ALL_CASES}


@pytest.fixture(scope="module")
def quantized(tiny_trained_checkpoint, tiny_dataset, tmp_path_factory):
    """Every flow x method, each made once, when a test first needs it."""
    return _Quantized(tiny_trained_checkpoint, tiny_dataset, tmp_path_factory.mktemp("flows"))


@pytest.fixture(scope="module")
def fp32_logits(tiny_trained_checkpoint, tiny_dataset):
    model, _ = models.load_checkpoint(tiny_trained_checkpoint)
    with torch.no_grad():
        return model(_inputs(tiny_dataset))


@pytest.mark.parametrize("flow,method", CASES)
def test_int8_agrees_with_fp32(quantized, fp32_logits, tiny_dataset, flow, method):
    _, qmodel = quantized[flow, method]
    with torch.no_grad():
        logits = qmodel(_inputs(tiny_dataset))
    agree = (logits.argmax(1) == fp32_logits.argmax(1)).float().mean().item()
    assert agree >= 0.8, f"{flow}/{method}: top-1 agrees with fp32 on only {agree:.0%} of inputs"


@pytest.mark.parametrize("flow,method", CASES)
def test_op_counts(quantized, flow, method):
    path, _ = quantized[flow, method]
    int8_convs = 0 if method == "dynamic" else RESNET10_CONVS
    assert runtimes.for_path(path).op_counts(path) == OpCounts(
        int8_conv=int8_convs, float_conv=RESNET10_CONVS - int8_convs, int8_linear=1, float_linear=0)


def _held_weights(qmodel) -> tuple[str, int, int]:
    """(per-channel | per-tensor, min, max) of the first int8 weight the converted model holds."""
    if isinstance(qmodel, torch.fx.GraphModule) and any(
            "dequantize_per" in str(n.target) for n in qmodel.graph.nodes):  # PT2E: QDQ graph
        for n in qmodel.graph.nodes:
            if "dequantize_per" in str(n.target) and n.args[0].op == "get_attr":
                w = getattr(qmodel, n.args[0].target)
                kind = "per-channel" if "per_channel" in str(n.target) else "per-tensor"
                return kind, int(w.min()), int(w.max())
    for m in qmodel.modules():
        w = getattr(m, "weight", None)
        w = w() if callable(w) else None
        if isinstance(w, torch.Tensor) and w.is_quantized:
            kind = "per-channel" if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) \
                else "per-tensor"
            return kind, int(w.int_repr().min()), int(w.int_repr().max())
    raise AssertionError("no int8 weight found")


@pytest.mark.parametrize("flow,method", CASES)
def test_sidecar_records_what_the_model_holds(quantized, flow, method):
    """The sidecar's qconfig is read back from the observers used, and agrees with the int8
    weights the converted model holds: dynamic quantization uses torch's per-tensor min/max
    (eager, FX) whatever --qconfig says, QAT moving-average min/max fake-quantize."""
    from quantbench.cpu import reduce_range
    path, qmodel = quantized[flow, method]
    q = read_sidecar(path)["qconfig"]
    kind, lo, hi = _held_weights(qmodel)
    assert q["weights"]["summary"].startswith(kind), (q["weights"], kind)
    wmin, wmax = q["weights"]["range"]
    assert wmin <= lo and hi <= wmax
    assert q["weights"]["dtype"] in ("qint8", "int8")
    act = q["activations"]
    if method == "dynamic":
        assert q["name"] == "dynamic" and act["dynamic"] is True
        if flow != "pt2e":
            assert q["weights"]["observer"] == "MinMaxObserver" and kind == "per-tensor"
    elif method == "static":
        assert act["observer"] == "HistogramObserver" and "fake_quant" not in act
        assert act["range"] == [0, 127 if reduce_range() else 255]
    else:
        assert act["observer"].startswith("MovingAverage") and "FakeQuantize" in act["fake_quant"]
        assert "FakeQuantize" in q["weights"]["fake_quant"]


# Loads every file with plain torch, in a process that never imports quantbench (nor torchao).
FRESH = r"""
import json, sys, torch
import torch.ao.quantization.fx._decomposed  # registers the quantize/dequantize ops of .pt2 graphs
x = torch.load(sys.argv[1])
outputs = {}
for path in sys.argv[3:]:
    # torch.jit.load packs int8 weights for the process's quantized engine: the sidecar's
    with open(path + ".json") as f:
        torch.backends.quantized.engine = json.load(f).get("engine") or torch.backends.quantized.engine
    model = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
    with torch.no_grad():
        outputs[path] = model(x)
torch.save(outputs, sys.argv[2])
assert not [m for m in sys.modules if m.split(".")[0] in ("quantbench", "torchao")]
"""


@pytest.mark.slow
def test_files_run_in_a_fresh_process(quantized, tiny_dataset, tmp_path):
    x = _inputs(tiny_dataset)
    torch.save(x, tmp_path / "x.pt")
    quantized = {k: v for k, v in quantized.every().items() if k[0] != "eager"}  # eager: see test_quantize.py
    paths = [str(path) for path, _ in quantized.values()]
    subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), *paths],
                   check=True, cwd=tmp_path, timeout=120)
    outputs = torch.load(tmp_path / "y.pt")
    for (flow, method), (path, qmodel) in quantized.items():
        with torch.no_grad():
            expected = qmodel(x)
        torch.testing.assert_close(outputs[str(path)], expected, rtol=0, atol=1e-5,
                                   msg=lambda m: f"{flow}/{method}: {m}")


@pytest.mark.slow
def test_pt2_loader_compiles_to_int8_kernels(quantized, tiny_dataset, capfd):
    """The .pt2 runtime (torch.compile, inductor, freezing) must lower the QDQ graph to oneDNN
    int8 kernels; without torchao's passes it silently compiles fp32 convolutions instead.
    oneDNN's verbose log shows which kernels really ran, with their data types (whether
    inductor compiled or hit its cache). The only compile in this file: it is slow."""
    import torch._inductor.config as inductor_config

    path, qmodel = quantized["pt2e", "static"]
    x = _inputs(tiny_dataset)
    # the loader sets these process-wide; restore them after
    with inductor_config.patch(freezing=False, cpp_wrapper=False):
        model = load_deployed(path)
        with torch.inference_mode():
            model(x)  # compiles
            capfd.readouterr()
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                y = model(x)
    ran = [line.split(",") for line in capfd.readouterr().out.splitlines() if ",exec,cpu," in line]
    convs = [r for r in ran if r[5] == "convolution"]
    assert len(convs) == RESNET10_CONVS
    assert all("src:u8" in ",".join(r) and "wei:s8" in ",".join(r) for r in convs)  # int8 in, int8 weights
    assert sum(r[5] in ("matmul", "inner_product") and "src:u8" in ",".join(r) for r in ran) == 1  # the fc
    assert model.compile_s is not None and model.compile_s > 0
    with torch.no_grad():
        qdq = qmodel(x)
    # int8 kernels round differently from the fp32 simulation, but predict the same
    assert (y.argmax(1) == qdq.argmax(1)).float().mean().item() >= 0.9


def test_profile_cli_on_torchscript_int8(quantized, capsys):
    """`quantbench profile` names the int8 operators that ran, in a Markdown table."""
    from quantbench.cli import main
    path, _ = quantized["fx", "static"]  # FX deploys TorchScript, as eager mode does
    assert main(["profile", str(path), "--calls", "3", "--top", "50"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:]
    assert any(r.startswith("quantized::conv2d") for r in rows), rows
    assert not any(r in ("aten::conv2d", "aten::_convolution") for r in rows)


@pytest.mark.slow
def test_pt2e_qat_train_eval_and_frozen_bn():
    """Exported graphs ignore .train()/.eval(): set_mode rewrites batch norm, and a frozen batch
    norm stays frozen (running statistics unchanged) through later set_mode(train) calls."""
    pt2e = get_flow("pt2e")
    torch.manual_seed(0)
    prepared = pt2e.prepare(models.build("resnet10", 3), "default", qat=True, example=torch.randn(1, 3, 32, 32))
    bn_nodes = [n for n in prepared.graph.nodes if n.target in pt2e._BN_OPS]
    assert len(bn_nodes) == RESNET10_CONVS

    def training_flags():
        return {n.args[5] for n in prepared.graph.nodes if n.target in pt2e._BN_OPS}

    def running_means():
        return [b.clone() for name, b in prepared.named_buffers() if name.endswith("running_mean")]

    pt2e.set_mode(prepared, False)
    assert training_flags() == {False}
    pt2e.set_mode(prepared, True)
    assert training_flags() == {True}
    before = running_means()
    prepared(torch.randn(4, 3, 32, 32))
    assert any(not torch.equal(a, b) for a, b in zip(before, running_means()))  # BN learns

    pt2e.freeze_bn(prepared)
    pt2e.set_mode(prepared, False)
    pt2e.set_mode(prepared, True)
    assert training_flags() == {False}
    before = running_means()
    prepared(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(before, running_means()))  # frozen

    pt2e.freeze_observers(prepared)
    fq = [m for m in prepared.modules() if hasattr(m, "observer_enabled")]
    assert fq and all(m.observer_enabled.item() == 0 for m in fq)


@pytest.mark.slow
def test_pt2e_qat_keeps_each_dropout_probability():
    """torchao's train/eval rewrite puts p=0.5 into every dropout; set_mode restores the model's
    own (a ViT's p=0.0 dropouts trained at 0.5 and PT2E QAT lost 14 points). With p=0 and no
    batch norm, train mode must compute exactly what eval mode does."""
    pt2e = get_flow("pt2e")
    torch.manual_seed(0)
    model = models.vit_tiny(3, image_size=8)
    model.heads = nn.Sequential(nn.Dropout(0.2), model.heads)  # and one that is not 0
    prepared = pt2e.prepare(model, "default", qat=True, example=torch.randn(2, 3, 8, 8))
    rates = [n.args[1] for n in pt2e._dropouts(prepared)]
    assert 0.2 in rates and 0.0 in rates and 0.5 not in rates
    x = torch.randn(4, 3, 8, 8)
    for training in (False, True, False, True):
        pt2e.set_mode(prepared, training)
        assert [n.args[1] for n in pt2e._dropouts(prepared)] == rates
        assert {n.args[2] for n in pt2e._dropouts(prepared)} == {training}
    pt2e.freeze_observers(prepared)
    for n in pt2e._dropouts(prepared):  # the head's 0.2 to 0 as well, so train mode has no randomness
        n.args = (n.args[0], 0.0, *n.args[2:])
    prepared.recompile()
    train_out = prepared(x)
    pt2e.set_mode(prepared, False)
    torch.testing.assert_close(train_out, prepared(x))


def test_unsupported_combinations(tiny_checkpoint, tiny_dataset, tmp_path):
    with pytest.raises(QuantbenchError, match="unknown method 'int4'"):
        check_method("pt2e", "int4")
    for flow, wrong in (("pt2e", "x.pt"), ("fx", "x.pt2")):
        with pytest.raises(QuantbenchError, match=rf"the {flow} flow writes \.pt2? files"):
            quantize_to_file(tiny_checkpoint, tmp_path / wrong, QuantizeConfig(method="dynamic", flow=flow))
    with pytest.raises(QuantbenchError, match="unknown qconfig 'int4'"):
        get_flow("pt2e").prepare(models.build("resnet10", 3), "int4", qat=False, example=torch.randn(1, 3, 32, 32))
