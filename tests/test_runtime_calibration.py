"""ONNX Runtime and OpenVINO/NNCF rows calibrated from the torch flows' names (Scheme) and NNCF's
bias correction: each option reaches the quantizer's arguments and the sidecar, no option means
today's settings exactly, and replicate --resume remakes the rows when an option changes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from quantbench import models
from quantbench.errors import QuantbenchError
from quantbench.qconfigs import Scheme
from quantbench.runtimes import onnxrt
from quantbench.runtimes import openvino as openvino_rt
from support.exporting import export_paths

pytestmark = pytest.mark.slow  # every test here exports through a runtime or waits on subprocesses

HAS_ORT = all(importlib.util.find_spec(n) for n in ("onnx", "onnxruntime"))
HAS_OV = all(importlib.util.find_spec(n) for n in ("openvino", "nncf"))
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed: pip install '.[runtimes]'")
needs_ov = pytest.mark.skipif(not HAS_OV, reason="openvino/nncf not installed: pip install '.[runtimes]'")

OPTIONS = [dict(observer="minmax"), dict(observer="moving-average"), dict(observer="histogram"),
           dict(observer="percentile", percentile=99.9), dict(weight_scheme="per-tensor"),
           dict(act_scheme="symmetric"), dict(act_scheme="affine")]


def _model():
    torch.manual_seed(0)
    return models.build("resnet10", 3).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]


def _side(path: Path) -> dict:
    return json.loads((path.parent / (path.name + ".json")).read_text())


# ---------------------------------------------------------------- ONNX Runtime
@needs_ort
def test_onnxrt_no_option_is_todays_settings():
    assert onnxrt.int8_settings(Scheme()) == onnxrt.int8_settings(None)
    assert "extra_options" not in onnxrt.int8_settings(None)  # quantize_static called exactly as before


@needs_ort
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_onnxrt_each_option_changes_the_recorded_qconfig(options):
    base = onnxrt.describe_int8(onnxrt.int8_settings(None))
    scheme = Scheme(**options)
    settings = onnxrt.int8_settings(scheme)
    got = onnxrt.describe_int8(settings, scheme)
    assert got["overrides"] == scheme.overrides()
    want = {"minmax": ("MinMax", {}), "moving-average": ("MinMax", {"CalibMovingAverage": True}),
            "histogram": ("Entropy", {"CalibStridedMinMax": 1}),
            "percentile": ("Percentile", {"CalibPercentile": 99.9, "CalibStridedMinMax": 1})}
    if "observer" in options:
        method, extra = want[options["observer"]]
        assert got["calibrate_method"] == method and got["extra_options"] == extra
        assert onnxrt.calibration_method(settings) == {"histogram": "entropy"}.get(options["observer"],
                                                                                   options["observer"])
        if options["observer"] != "minmax":
            assert got["activations"] != base["activations"]
    if options.get("weight_scheme") == "per-tensor":
        assert settings["per_channel"] is False and got["weights"].startswith("per-tensor")
        assert base["weights"].startswith("per-channel")
    if options.get("act_scheme") == "symmetric":
        assert got["extra_options"] == {"ActivationSymmetric": True} and got["activation_symmetric"]
    if options.get("act_scheme") == "affine":  # ORT's own choice already: nothing changes
        assert settings == onnxrt.int8_settings(None)


@needs_ort
def test_onnxrt_export_applies_the_scheme(tmp_path):
    """Per-tensor weights: one scale per weight in the int8 file; histogram: Entropy ran (and
    its progress lines stayed off stdout); the sidecar says both."""
    import onnx
    from onnx import numpy_helper
    scheme = Scheme(observer="histogram", weight_scheme="per-tensor")
    paths = {}
    for name, s in (("default", None), ("scheme", scheme)):
        paths[name] = export_paths(onnxrt, _model(), tmp_path / name, _calib(), {"note": 1}, scheme=s)[1]

    def weight_scale_sizes(path):
        g = onnx.load(str(path)).graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        sizes = set()
        for n in g.node:  # DequantizeLinear of an int8 initializer: a weight
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype.name == "int8":
                sizes.add(inits[n.input[1]].size)
        return sizes

    assert max(weight_scale_sizes(paths["default"])) > 1
    assert weight_scale_sizes(paths["scheme"]) == {1}
    side, before = _side(paths["scheme"]), _side(paths["default"])
    assert side["calibration"]["method"] == "entropy" and before["calibration"]["method"] == "minmax"
    assert side["qconfig"]["calibrate_method"] == "Entropy" and not side["qconfig"]["per_channel"]
    assert side["qconfig"]["overrides"] == {"observer": "histogram", "weight_scheme": "per-tensor"}


@needs_ort
def test_onnxrt_min_max_calibration_fed_in_pieces_is_the_same_file(tmp_path, monkeypatch):
    """Min/max calibration feeds each batch in pieces of at most FEED_PIXELS (the session's
    memory grows with a feed): the ranges, so the int8 file, are those of whole batches, and the
    sidecar says the feed size. A moving average depends on the grouping: it keeps whole batches."""
    import onnx
    from onnx import numpy_helper

    def int8_file(name):
        return export_paths(onnxrt, _model(), tmp_path / name, _calib(), {"note": 1})[1]

    whole = int8_file("whole")
    monkeypatch.setattr(onnxrt, "FEED_PIXELS", 3 * 32 * 32)  # 3 images of 32x32 a feed
    pieces = int8_file("pieces")

    def initializers(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    a, b = initializers(whole), initializers(pieces)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert _side(pieces)["calibration"]["feed_images"] == 3 and "feed_images" not in _side(whole)["calibration"]
    from quantbench.export import calibration_arrays
    calib = calibration_arrays(_calib())
    assert onnxrt.feed_images(calib, onnxrt.int8_settings(None)) == 3
    assert onnxrt.feed_images(calib, onnxrt.int8_settings(Scheme(observer="moving-average"))) is None
    assert onnxrt.feed_images(calib, onnxrt.int8_settings(Scheme(observer="histogram"))) is None
    reader = onnxrt._calibration_reader(calib, "input", 3)
    sizes = []
    while (feed := reader.get_next()) is not None:
        sizes.append(len(feed["input"]))
    assert sizes == [3, 3, 2] * 3 and len(reader) == 9  # 3 batches of 8, in order



@needs_ort
def test_onnxrt_reader_does_not_keep_the_calibration_images_alive():
    """The reader's class (a cycle, as every class) must not hold the calibration images: once
    quantize_static is done with the reader, the images, and their temporary file on disk, go
    at once, not at the next full garbage collection."""
    import gc
    import weakref

    from quantbench.export import CalibrationArrays
    calib = CalibrationArrays(_calib(), in_memory_bytes=1)  # on disk
    reader = onnxrt._calibration_reader(calib, "input", 3)
    assert reader.get_next()["input"].shape == (3, 3, 32, 32)
    gone = weakref.ref(calib)
    gc.disable()  # what refcounting frees, not the cycle collector
    try:
        del calib, reader
        assert gone() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------- OpenVINO / NNCF
@needs_ov
def test_nncf_no_option_is_todays_settings():
    a, b = openvino_rt.int8_settings(None), openvino_rt.int8_settings(Scheme(), "fast")
    assert a == b and set(a) == {"preset", "target_device", "advanced_parameters"}
    assert a["preset"].value == "performance"
    adv = a["advanced_parameters"]
    assert adv.activations_range_estimator_params == type(adv)().activations_range_estimator_params
    assert adv.weights_quantization_params is None and not adv.disable_bias_correction


@needs_ov
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_nncf_each_option_changes_the_recorded_qconfig(options):
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as Sets
    base = openvino_rt.describe_int8(openvino_rt.int8_settings(None))
    scheme = Scheme(**options)
    settings = openvino_rt.int8_settings(scheme)
    got = openvino_rt.describe_int8(settings, scheme)
    adv = settings["advanced_parameters"]
    assert got["overrides"] == scheme.overrides() and got != base
    observer = options.get("observer")
    if observer == "percentile":
        est = adv.activations_range_estimator_params
        assert est.max.statistics_type.value == "quantile"
        assert est.max.quantile_outlier_prob == pytest.approx(0.001)
        assert got["range_estimator"].startswith("MEAN_QUANTILE")
    elif observer:
        name = {"minmax": "MINMAX", "moving-average": "MEAN_MINMAX", "histogram": "HISTOGRAM"}[observer]
        assert adv.activations_range_estimator_params == getattr(Sets, name) and got["range_estimator"] == name
    if options.get("weight_scheme") == "per-tensor":
        assert adv.weights_quantization_params.per_channel is False and got["weights"].startswith("per-tensor")
    if "act_scheme" in options:
        assert got["preset"] == {"affine": "mixed", "symmetric": "performance"}[options["act_scheme"]]


@needs_ov
@pytest.mark.parametrize("bias", ["fast", "full", "none"])
def test_nncf_bias_correction(bias):
    settings = openvino_rt.int8_settings(None, bias)
    assert settings.get("fast_bias_correction", True) is (bias != "full")
    assert settings["advanced_parameters"].disable_bias_correction is (bias == "none")
    assert openvino_rt.describe_int8(settings)["bias_correction"] == bias


def test_bad_bias_correction_is_a_one_line_error(tmp_path):
    from quantbench.quantize import QuantizeConfig
    for call in (lambda: openvino_rt.Options(bias_correction="slow"),
                 lambda: QuantizeConfig(method="static", options={"openvino": {"bias_correction": "slow"}})):
        with pytest.raises(QuantbenchError, match="unknown bias correction 'slow'; choose from fast, full, none"):
            call()
    assert not list(tmp_path.iterdir())


@needs_ov
def test_nncf_export_applies_the_scheme(tmp_path):
    """Per-tensor weights really have one scale per convolution in the IR; MIXED, HISTOGRAM and
    no bias correction are what the sidecar records."""
    import numpy as np
    import openvino as ov
    scheme = Scheme(observer="histogram", weight_scheme="per-tensor", act_scheme="affine")
    path = export_paths(openvino_rt, _model(), tmp_path, _calib(), {}, scheme=scheme,
                        options=openvino_rt.Options(bias_correction="none"))[1]

    def scale_sizes(p):
        sizes = set()
        for op in ov.Core().read_model(str(p)).get_ordered_ops():
            if op.get_type_name() != "Convolution":
                continue
            w = op.input_value(1).get_node()  # weights: int8 constant -> Convert -> (Subtract) -> Multiply(scale)
            if w.get_type_name() == "Multiply":
                for i in range(2):
                    c = w.input_value(i).get_node()
                    if c.get_type_name() == "Constant":
                        sizes.add(int(np.prod(c.get_output_shape(0))))
        return sizes

    assert scale_sizes(path) == {1}
    side = _side(path)
    q = side["qconfig"]
    assert (q["preset"], q["range_estimator"], q["bias_correction"], q["per_channel"]) == (
        "mixed", "HISTOGRAM", "none", False)
    assert side["calibration"]["method"] == "histogram"


# ---------------------------------------------------------------- replicate --resume
def test_replicate_passes_the_scheme_and_remakes_rows_when_it_changes(tiny_checkpoint, tiny_dataset, tmp_path,
                                                                      monkeypatch):
    from quantbench import replicate as R
    from quantbench.quantize import QuantizeConfig
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from support import fakert
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "fake=support.fakert")
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    seen = []
    real_export = fakert.export
    monkeypatch.setattr(fakert, "export", lambda *a, **kw: seen.append(kw) or real_export(*a, **kw))

    def run(resume, **q):
        cfg = R.ReplicateConfig(output=tmp_path, checkpoint=tiny_checkpoint, runtimes=("fake",), resume=resume,
                                quantize=QuantizeConfig(method="static", calib_samples=16, **q))
        return R._runtime_rows(cfg, tiny_checkpoint, tiny_dataset, models_dir)

    run(False)
    assert seen[-1]["scheme"] == Scheme() and seen[-1]["options"].knob == 3  # the fake runtime's default
    # a sidecar from before records named their target is remade on --resume, with a line saying so
    side = models_dir / "fake-int8.fake.json"
    d = json.loads(side.read_text())
    del d["target"]
    side.write_text(json.dumps(d))
    n = len(seen)
    run(True)
    assert len(seen) == n + 1
    run(True)                                                                     # the same: reused
    assert len(seen) == n + 1
    run(True, observer="percentile", percentile=99.9, options={"fake": {"knob": 5}})   # changed: remade
    assert len(seen) == n + 2 and seen[-1]["scheme"].observer == "percentile"
    assert seen[-1]["options"].knob == 5
    target = json.loads(side.read_text())["target"]
    assert target["scheme"] == {"observer": "percentile", "percentile": 99.9} and target["options"] == {"knob": 5}
    run(True, observer="percentile", percentile=99.9, options={"fake": {"knob": 5}})   # same again: reused
    assert len(seen) == n + 2
    run(True)                                                                     # back to defaults: remade
    assert len(seen) == n + 3
