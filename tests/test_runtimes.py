"""ONNX Runtime and OpenVINO rows (quantbench.runtimes.onnxrt, .openvino) on a tiny model.

Needs the optional packages (pip install '.[runtimes]'); without them the runtime tests skip and
only the "missing package" errors are checked.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from quantbench import cpu, models, runtimes
from quantbench.errors import QuantbenchError
from quantbench.runtimes import load as load_deployed
from quantbench.runtimes import onnxrt
from quantbench.runtimes import openvino as openvino_rt
from support.exporting import export_paths

pytestmark = pytest.mark.slow  # every test here exports through a runtime or waits on subprocesses

NUM_CLASSES = 10
META = {"source_checkpoint": "random-resnet10", "arch": "resnet10", "num_classes": NUM_CLASSES}


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


RUNTIMES = [
    pytest.param(onnxrt, ("onnxrt-fp32", "onnxrt-int8"), ("onnx-fp32.onnx", "onnx-int8.onnx"),
                 marks=pytest.mark.skipif(not _installed("onnx", "onnxruntime"),
                                          reason="onnx/onnxruntime not installed: pip install '.[runtimes]'"),
                 id="onnxruntime"),
    pytest.param(openvino_rt, ("openvino-fp32", "openvino-int8"), ("openvino-fp32.xml", "openvino-int8.xml"),
                 marks=pytest.mark.skipif(not _installed("openvino", "nncf"),
                                          reason="openvino/nncf not installed: pip install '.[runtimes]'"),
                 id="openvino"),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("resnet10", NUM_CLASSES).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """Export once per runtime module (export is the slow part), shared by the tests below. As on
    a CPU without bf16 (its fp32 and int8 files only), whatever this one has."""
    mod = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "has_bf16", lambda: False)
        return export_paths(mod, _model(), tmp_path_factory.mktemp(mod.__name__.rsplit(".", 1)[-1]), _calib(), META)


@pytest.mark.parametrize("exported,labels,names", RUNTIMES, indirect=["exported"], scope="module")
def test_export_writes_files_and_sidecars(exported, labels, names):
    assert [p.name for p in exported] == list(names)
    for path, label, dtype in zip(exported, labels, ("fp32", "int8")):
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".xml":
            assert path.with_suffix(".bin").is_file()
        side = json.loads((path.parent / (path.name + ".json")).read_text())
        assert side["label"] == label and side["dtype"] == dtype
        assert side["method"] == ("origin" if dtype == "fp32" else "static")
        assert side["runtime"] == runtimes.for_path(path).NAME
        assert side["input_shape"] == [3, 32, 32]
        assert side["source_checkpoint"] == META["source_checkpoint"]  # meta is carried along
        assert side["weight_bytes"] > 0
        if dtype == "int8":
            assert side["calibration"]["samples"] == 64
            assert side["qconfig"]["why"]
    fp32, int8 = (json.loads((p.parent / (p.name + ".json")).read_text())["weight_bytes"] for p in exported)
    assert int8 < fp32 / 3  # the weights really are 8-bit


@pytest.mark.parametrize("exported,labels,names", RUNTIMES, indirect=["exported"], scope="module")
def test_load_runs_and_int8_tracks_fp32(exported, labels, names):
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _model()(x)
    fp32 = load_deployed(exported[0], threads=1)(x)
    int8 = load_deployed(exported[1], threads=1)(x)
    assert fp32.shape == int8.shape == (64, NUM_CLASSES)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, ref, rtol=1e-3, atol=1e-3)
    agree = (int8.argmax(1) == fp32.argmax(1)).float().mean().item()
    assert agree >= 0.75, f"int8 top-1 agrees with fp32 on only {agree:.0%} of inputs"
    mod = onnxrt if exported[0].suffix == ".onnx" else openvino_rt
    fp32_ops, int8_ops = (mod.op_counts(p) for p in exported)
    assert fp32_ops.int8_conv == 0 and fp32_ops.float_conv > 0
    assert int8_ops.float_conv == 0 and int8_ops.int8_conv == fp32_ops.float_conv
    # batch size is dynamic, threads=None is the runtime default
    assert load_deployed(exported[1])(x[:3]).shape == (3, NUM_CLASSES)


@pytest.mark.parametrize("exported,labels,names", RUNTIMES, indirect=["exported"], scope="module")
def test_profile_shows_the_int8_kernels(exported, labels, names):
    """`quantbench profile` on the int8 file: the runtime's own profiler names int8 kernels."""
    from quantbench.profiling import profile_model, render_profile
    prof = profile_model(exported[1], calls=5, threads=1)
    names_ = [r["op"] for r in prof["ops"]]
    int8 = [n for n in names_ if "QLinear" in n or "I8" in n]  # ORT's fused ops; OpenVINO's exec types
    assert int8, names_
    assert prof["wall_ms"] > 0 and prof["ops_ms"] > 0
    assert abs(sum(r["ms_per_call"] for r in prof["ops"]) - prof["ops_ms"]) < 1e-9
    assert "| Operator |" in render_profile(prof)


# ---------------------------------------------------------------- without the optional packages
@pytest.mark.parametrize("mod,package,suffix", [(onnxrt, "onnxruntime", ".onnx"), (openvino_rt, "openvino", ".xml"),
                                                (openvino_rt, "nncf", None)])
def test_missing_package_is_a_one_line_error(mod, package, suffix, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(QuantbenchError, match=r"pip install '\.\[runtimes\]'") as e:
        export_paths(mod, torch.nn.Identity(), tmp_path, [torch.zeros(1, 3, 32, 32)], {})
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # failed before writing anything
    if suffix:  # loading needs only the runtime, not nncf
        f = tmp_path / f"model{suffix}"
        f.write_bytes(b"")
        with pytest.raises(QuantbenchError, match=r"pip install '\.\[runtimes\]'"):
            load_deployed(f)


def test_onnxruntime_row_of_a_vision_transformer(tmp_path, capfd):
    """ORT's symbolic shape inference cannot follow vit_tiny's reshapes (an AssertionError deep in
    onnxruntime): the pre-pass runs again with ONNX's own shape inference, the sidecar says so,
    and the int8 file runs. A model the ONNX exporter cannot translate is one QuantbenchError."""
    pytest.importorskip("onnxruntime")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = models.vit_tiny(3, image_size=8).eval()
    files = export_paths(onnxrt, model, tmp_path / "vit", [torch.randn(4, 3, 8, 8) for _ in range(2)], {})
    side = json.loads((tmp_path / "vit" / "onnx-int8.onnx.json").read_text())
    assert "symbolic shape inference failed" in side["quant_preprocess"]
    # ORT's quantizer logs a LayerNorm weight it cannot quantize per channel: into the sidecar,
    # not onto the terminal
    assert any("out-of-range for weight" in line for line in side["quantizer_log"])
    assert "WARNING:root" not in capfd.readouterr().err
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(onnxrt.load(files[0], 1)(x), model(x), rtol=1e-4, atol=1e-4)
    assert onnxrt.load(files[1], 1)(x).shape == (2, 3)
    # this small one takes torch's fused attention kernel, which has no ONNX translation
    small = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3).eval()
    with pytest.raises(QuantbenchError, match="ONNX export failed"):
        export_paths(onnxrt, small, tmp_path / "small", [torch.randn(4, 3, 8, 8)], {})


@pytest.mark.skipif(not _installed("openvino"), reason="openvino not installed: pip install '.[runtimes]'")
def test_openvino_load_errors_say_what_is_wrong_with_which_file(tmp_path):
    """OpenVINO's own message for all of these is "Exception from src/inference/src/cpp/core.cpp:132:"."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 3)).eval()
    xml = tmp_path / "m.xml"
    openvino_rt._save(openvino_rt.convert_fp32(model, torch.randn(1, 3, 8, 8)), xml)
    weights = xml.with_suffix(".bin").read_bytes()
    assert openvino_rt.load(xml, 1)(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    cases = [(weights[:100], f"{xml.with_suffix('.bin')} is truncated \\(100 bytes\\); "
                             f"the model needs {len(weights)} bytes"),
             (b"", "is empty; the model needs"),
             (None, "is missing \\(No such file or directory\\)")]
    for data, reason in cases:
        if data is None:
            xml.with_suffix(".bin").unlink()
        else:
            xml.with_suffix(".bin").write_bytes(data)
        with pytest.raises(QuantbenchError, match=f"^cannot load OpenVINO model {xml}: its weights file .*{reason}") as e:
            openvino_rt.load(xml, 1)
        assert "core.cpp" not in str(e.value)
    junk = tmp_path / "junk.xml"
    junk.write_text("garbage <not xml")
    with pytest.raises(QuantbenchError, match=f"^{junk} is not an OpenVINO model: its XML does not parse"):
        openvino_rt.load(junk, 1)


# ---------------------------------------------------------------- bf16 rows (forced: this CPU may have no bf16)
HAS_BF16 = cpu.has_bf16()  # the real CPU's, before any test pretends


def _check_bf16_row(paths, runtime: str, fp32_name: str, bf16_name: str):
    """The bf16 file's record says what it is; it takes and returns float32 and tracks fp32."""
    assert [p.name for p in paths][-1] == bf16_name and fp32_name in [p.name for p in paths]
    bf16_path, fp32_path = paths[-1], paths[[p.name for p in paths].index(fp32_name)]
    side = json.loads((bf16_path.parent / (bf16_path.name + ".json")).read_text())
    assert side["dtype"] == "bf16" and side["method"] == "bf16" and side["runtime"] == runtime
    assert side["label"] == bf16_path.name.split(".")[0]
    assert not side.get("calibration")  # nothing to calibrate
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fp32 = load_deployed(fp32_path, threads=1)(x)
    bf16 = load_deployed(bf16_path, threads=1)(x)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (16, NUM_CLASSES)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)  # bf16 keeps 8 bits of mantissa
    ops = runtimes.for_path(bf16_path).op_counts(bf16_path)
    assert ops.int8_conv == 0 and ops.float_conv > 0
    assert ops.status("bf16").value == "bf16"  # not "not quantized"
    return side


@pytest.mark.skipif(not _installed("openvino", "nncf"), reason="openvino/nncf not installed: pip install '.[runtimes]'")
def test_openvino_bf16_row_is_the_fp32_ir_compiled_in_bf16(tmp_path, monkeypatch):
    import openvino as ov
    monkeypatch.setattr(cpu, "has_bf16", lambda: True)
    paths = export_paths(openvino_rt, _model(), tmp_path, _calib(), META)
    assert [p.name for p in paths] == list(openvino_rt.FILES)
    side = _check_bf16_row(paths, "openvino", openvino_rt.FP32_FILE, openvino_rt.BF16_FILE)
    assert side["inference_precision"] == "bf16"
    assert paths[-1].with_suffix(".bin").read_bytes() == paths[0].with_suffix(".bin").read_bytes()
    # compiled with the hint bf16, which a CPU without bf16 ignores (f32); the fp32 file pins f32
    want = ov.Type.bf16 if HAS_BF16 else ov.Type.f32
    assert openvino_rt._compile(paths[-1], 1).get_property("INFERENCE_PRECISION_HINT") == want
    assert openvino_rt._compile(paths[0], 1).get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert '"INFERENCE_PRECISION_HINT": "bf16"' in openvino_rt.how_to_load("m.xml", side)
    assert '"INFERENCE_PRECISION_HINT": "f32"' in openvino_rt.how_to_load("m.xml", {})  # as measured


def test_openvino_load_lines_pin_the_precision_the_file_was_measured_with():
    """"Ship this" gives lines that load the file as it was measured. OpenVINO's own default
    hint is bf16 on CPUs with bf16 (the machines that have bf16 rows), so the fp32 and int8 files,
    measured pinned to f32, must be loaded pinned to f32 too; the bf16 row with bf16."""
    for sidecar in (None, {}, {"dtype": "fp32"}, {"dtype": "int8"}):
        assert openvino_rt.how_to_load("m.xml", sidecar) == \
            'openvino.Core().compile_model("m.xml", "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})'
    assert openvino_rt.how_to_load("m.xml", {"dtype": "bf16", "inference_precision": "bf16"}).endswith(
        '{"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"})')


def test_inductor_rows_are_the_model_in_fp32_and_in_bf16(tmp_path, monkeypatch):
    from quantbench.runtimes import inductor
    monkeypatch.setattr(cpu, "has_bf16", lambda: False)
    assert export_paths(inductor, _model(), tmp_path / "none", _calib(), META) == []  # no bf16: nothing
    assert not (tmp_path / "none").exists()
    monkeypatch.setattr(cpu, "has_bf16", lambda: True)
    paths = export_paths(inductor, _model(), tmp_path, _calib(), META)
    assert [p.name for p in paths] == list(inductor.FILES)
    side = _check_bf16_row(paths, "inductor", inductor.FP32_FILE, inductor.BF16_FILE)
    fp32_side = json.loads((tmp_path / (inductor.FP32_FILE + ".json")).read_text())
    assert side["weight_bytes"] < 0.51 * fp32_side["weight_bytes"]  # bf16 weights: half the bytes
