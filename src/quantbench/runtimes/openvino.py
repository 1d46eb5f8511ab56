"""OpenVINO as a comparison row: the same fp32 model converted to OpenVINO IR, run by the
OpenVINO CPU plugin in fp32, after NNCF's post-training int8 quantization, and (where the CPU
has bf16: AVX512-BF16 or AMX) in bf16.

    export(model, out_dir, calib_batches, base, scheme=None, options=None) -> [FileRecord]
                                                -> [openvino-fp32.xml, openvino-int8.xml,
                                                    openvino-bf16.xml where the CPU has bf16]
                                                   (each with its .bin and a FILE.json sidecar)
    load(path, threads)                         -> callable: float tensor (N,3,H,W) -> logits

Needs the optional packages (`pip install '.[runtimes]'`); they are imported only when used.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, get_args

import numpy as np
import torch

from .. import cpu
from ..cpu import has_vnni
from ..errors import QuantbenchError, cause
from ..export import calibration_arrays as _as_arrays
from ..record import FileRecord, as_record
from ..qconfigs import Scheme
from ..results import OpCounts

NAME = "openvino"
SUFFIXES = (".xml",)

FP32_FILE = "openvino-fp32.xml"
INT8_FILE = "openvino-int8.xml"
# The bf16 row: the fp32 IR again, compiled with INFERENCE_PRECISION_HINT bf16 (its record's
# inference_precision says so; load reads it). No calibration: the plugin rounds weights and
# activations to bf16 itself. Made only where the CPU has bf16 (skipped_files).
BF16_FILE = "openvino-bf16.xml"
FILES = (FP32_FILE, INT8_FILE, BF16_FILE)  # what export() writes (replicate --resume reuses them)
INPUT, OUTPUT = "input", "logits"
# NNCF's bias correction after quantizing: "fast" (one shift per layer from its own output
# statistics: NNCF's default), "full" (layer by layer, each corrected on the already quantized
# model before it: slower), "none" (off)
BiasCorrection = Literal["fast", "full", "none"]
MAX_CALIB_SAMPLES = 2000  # NNCF reads them a batch at a time (export.CalibrationArrays)


def check_bias_correction(value: str) -> str:
    if value not in get_args(BiasCorrection):
        raise QuantbenchError(f"unknown bias correction {value!r}; choose from {', '.join(get_args(BiasCorrection))}")
    return value


@dataclass(frozen=True)
class Options:
    """OpenVINO's own option for its int8 row (NNCF's post-training quantization)."""
    bias_correction: BiasCorrection = field(default="fast", metadata={
        "help": "NNCF's bias correction after quantizing: fast (its default), full (layer by layer, slower) "
                "or none", "alias": "--bias-correction"})

    def __post_init__(self):
        check_bias_correction(self.bias_correction)


def available() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


def skipped_files() -> dict[str, str]:
    """FILES that export() does not make on this machine, with the reason: the bf16 row where
    the CPU has no bf16 (OpenVINO would run it in fp32 and call it bf16)."""
    why = cpu.bf16_missing()
    return {BF16_FILE: why} if why else {}


def files(path: Path) -> list[Path]:
    return [Path(path), Path(path).with_suffix(".bin")]


def how_to_load(name: str, sidecar: dict | None = None) -> str:
    # the precision hint as _compile sets it: without it, a CPU with bf16 runs the fp32 file and
    # the int8 file's float layers in bf16, not as they were measured
    precision = _precision(sidecar)
    return (f'openvino.Core().compile_model("{name}", "CPU", {{"PERFORMANCE_HINT": "LATENCY", '
            f'"INFERENCE_PRECISION_HINT": "{precision}"}})')


def _precision(record) -> str:
    """The INFERENCE_PRECISION_HINT a file is compiled with: bf16 where its record says so (the
    bf16 row), f32 otherwise."""
    value = (record or {}).get("inference_precision")
    return "bf16" if value == "bf16" else "f32"


def _require(what: str, nncf: bool = False):
    """Import the optional packages, or fail with the one line that says how to get them."""
    try:
        import openvino
        if nncf:
            import nncf as _nncf  # noqa: F401
    except ImportError as e:
        raise QuantbenchError(f"{what} needs the optional runtimes: pip install '.[runtimes]' ({e})") from e
    return openvino


# ---------------------------------------------------------------- 1. fp32: torch -> OpenVINO IR
def convert_fp32(model: torch.nn.Module, example: torch.Tensor):
    """Convert the torch model directly (no ONNX step), with a dynamic batch dimension and the
    same tensor names as the ONNX export."""
    import openvino as ov
    ov_model = ov.convert_model(model.eval(), example_input=example, input=[[-1, *example.shape[1:]]])
    ov_model.inputs[0].get_tensor().set_names({INPUT})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT})
    return ov_model


def _save(ov_model, path: Path) -> None:
    """save_model writes FILE.xml and FILE.bin. Build them in a scratch folder and move them in,
    .bin first, so an interrupted run never leaves an .xml without its weights.
    compress_to_fp16=False: the default would store fp32 weights as fp16, not the fp32 row."""
    import openvino as ov
    with tempfile.TemporaryDirectory(prefix=".openvino-", dir=path.parent) as tmp:
        tmp_xml = Path(tmp) / path.name
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp_xml, path)


# ---------------------------------------------------------------- 2. int8: NNCF post-training quantization
def int8_settings(scheme: Scheme | None = None, bias_correction: BiasCorrection = "fast") -> dict:
    """nncf.quantize keyword arguments for *this* CPU.

    The CPU plugin (oneDNN) multiplies u8 activations by s8 weights. Without VNNI that is
    vpmaddubsw, which sums two products into a saturating int16: with full 8-bit weights the
    reference ResNet-18 lost 4.8 points (82.86 -> 78.10, OverflowFix.DISABLE). NNCF's overflow
    fix stores weights in 7 bits so the pairs fit; its default applies it to the first layer
    only (82.66), ENABLE applies it to every layer (82.85), so that is what we use without VNNI.
    With VNNI/AMX products are summed in int32: full-range weights are exact (DISABLE).

    preset PERFORMANCE (symmetric activations, NNCF's CPU default): after ReLU the activations are
    non-negative, so asymmetric ones (MIXED) bought nothing measurable. batchwise_statistics: our
    calibration items are batches of images, and NNCF should take each image's range as one
    sample, as it would with a batch-1 loader (82.85 vs 82.72 with one range per batch).

    `scheme`: the torch flows' choices, by the same names (None, or a Scheme whose fields are
    None, keeps the settings above exactly; the qconfig name's ranges are torch's, not used here):
      act_scheme  affine -> preset MIXED (asymmetric activations), symmetric -> PERFORMANCE;
      observer    NNCF's range estimators: minmax -> MINMAX, moving-average -> MEAN_MINMAX (each
                  image's min/max, averaged: also NNCF's own default for activations),
                  histogram -> HISTOGRAM (NNCF's port of torch's HistogramObserver: the L2-best
                  clipping), percentile -> MEAN_QUANTILE at outlier probability 1 - p/100;
      weight_scheme per-tensor -> weights_quantization_params(per_channel=False).
    `bias_correction`: see BiasCorrection.
    """
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationParameters)
    check_bias_correction(bias_correction)
    fix = OverflowFix.DISABLE if has_vnni() else OverflowFix.ENABLE
    advanced: dict = dict(overflow_fix=fix, batchwise_statistics=True)
    preset = nncf.QuantizationPreset.PERFORMANCE
    if scheme is not None:
        if scheme.act_scheme == "affine":
            preset = nncf.QuantizationPreset.MIXED
        if scheme.observer is not None:
            advanced["activations_range_estimator_params"] = _range_estimator(scheme)[1]
        if scheme.weight_scheme == "per-tensor":
            advanced["weights_quantization_params"] = QuantizationParameters(per_channel=False)
    if bias_correction == "none":
        advanced["disable_bias_correction"] = True
    settings = dict(preset=preset, target_device=nncf.TargetDevice.CPU,
                    advanced_parameters=AdvancedQuantizationParameters(**advanced))
    if bias_correction == "full":
        settings["fast_bias_correction"] = False
    return settings


def _range_estimator(scheme: Scheme):
    """(name, nncf RangeEstimatorParameters) for the scheme's observer."""
    import dataclasses

    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as Sets
    if scheme.observer == "percentile":
        outlier = (100.0 - float(scheme.percentile)) / 100.0
        q = Sets.MEAN_QUANTILE
        params = dataclasses.replace(q, min=dataclasses.replace(q.min, quantile_outlier_prob=outlier),
                                     max=dataclasses.replace(q.max, quantile_outlier_prob=outlier))
        return f"MEAN_QUANTILE (outlier probability {outlier:g})", params
    name = {"minmax": "MINMAX", "moving-average": "MEAN_MINMAX", "histogram": "HISTOGRAM"}[scheme.observer]
    return name, getattr(Sets, name)


_ESTIMATORS = {"default": "NNCF's default range (each image's min/max, averaged)",
               "MINMAX": "min/max over all images", "MEAN_MINMAX": "each image's min/max, averaged",
               "HISTOGRAM": "histogram, L2-best clipping"}


def _estimator_name(scheme: Scheme | None) -> str:
    return _range_estimator(scheme)[0] if scheme is not None and scheme.observer is not None else "default"


def _calibration_method(scheme: Scheme | None) -> str:
    """The sidecar's short name of the range estimator that really ran (NNCF's, lower case)."""
    name = _estimator_name(scheme)
    return "mean_minmax" if name == "default" else name.split(" ")[0].lower()


def describe_int8(settings: dict, scheme: Scheme | None = None) -> dict:
    """The qconfig recorded in the sidecar: what nncf.quantize was really given (`settings`,
    from int8_settings(scheme, ...))."""
    adv = settings["advanced_parameters"]
    fix = adv.overflow_fix.value
    wq = adv.weights_quantization_params
    per_channel = wq is None or wq.per_channel is not False
    preset = settings["preset"].value
    estimator = _estimator_name(scheme)
    bias = ("none" if adv.disable_bias_correction else
            "fast" if settings.get("fast_bias_correction", True) else "full")
    return {"name": "nncf-ptq", "preset": preset,
            "target_device": settings["target_device"].value,
            "weights": ("per-channel" if per_channel else "per-tensor") + " symmetric int8"
                       + (", 7-bit (overflow fix)" if fix == "enable" else ""),
            "activations": f"per-tensor {'asymmetric' if preset == 'mixed' else 'symmetric'} int8/uint8, "
                           f"{_ESTIMATORS.get(estimator, estimator)}, "
                           + {"fast": "fast bias correction", "full": "full bias correction",
                              "none": "no bias correction"}[bias],
            "range_estimator": estimator, "per_channel": per_channel, "bias_correction": bias,
            "overrides": scheme.overrides() if scheme is not None else {},
            "overflow_fix": fix,
            "why": "no VNNI on this CPU: u8 x s8 pairs saturate int16, so 7-bit weights everywhere"
            if fix == "enable" else "VNNI/AMX present: full range is exact"}


def export(model: torch.nn.Module, out_dir: Path, calib_batches: Iterable[torch.Tensor],
           base: FileRecord | dict, scheme: Scheme | None = None, options: Options | None = None) -> list[FileRecord]:
    """Write openvino-fp32.xml/.bin and openvino-int8.xml/.bin into out_dir, and openvino-bf16.xml/.bin
    (the fp32 IR, compiled in bf16) where the CPU has bf16; returns their records, made from
    `base` (where the model came from). `scheme` and the options' bias correction choose the
    calibration (see int8_settings)."""
    options = options or Options()
    base = as_record(base)
    ov = _require("OpenVINO export", nncf=True)
    import nncf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = _as_arrays(calib_batches)
    fp32_path, int8_path = out_dir / FP32_FILE, out_dir / INT8_FILE
    common = base.replace(flow=NAME, runtime=NAME, input_shape=list(calib[0].shape[1:]),
                          extra={**base.extra, "openvino_version": ov.__version__})

    with torch.no_grad():
        ov_fp32 = convert_fp32(model, torch.from_numpy(calib[0][:1]))
    _save(ov_fp32, fp32_path)

    settings = int8_settings(scheme, options.bias_correction)
    # A sequence of model inputs is already what NNCF wants (one item = one inference, read from
    # disk as NNCF asks for it); subset_size counts items, so all of them are used.
    # NNCF draws its own progress bars on stdout for a few seconds of work: keep them out of logs
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        ov_int8 = nncf.quantize(ov.Core().read_model(str(fp32_path)), nncf.Dataset(calib),
                                subset_size=len(calib), **settings)
    _save(ov_int8, int8_path)

    made = [common.replace(file=FP32_FILE, label="openvino-fp32", method="origin", dtype="fp32",
                           weight_bytes=fp32_path.with_suffix(".bin").stat().st_size),
            common.replace(file=INT8_FILE, label="openvino-int8", method="static", dtype="int8",
                           qconfig=describe_int8(settings, scheme),
                           calibration={"samples": calib.samples, "batches": len(calib),
                                        "method": _calibration_method(scheme)},
                           weight_bytes=int8_path.with_suffix(".bin").stat().st_size)]
    if BF16_FILE not in skipped_files():
        bf16_path = out_dir / BF16_FILE
        _save(ov_fp32, bf16_path)  # the same IR; the precision is the record's, read by load
        made.append(common.replace(
            file=BF16_FILE, label="openvino-bf16", method="bf16", dtype="bf16",
            # the plugin holds the weights in bf16: half the fp32 file's
            weight_bytes=bf16_path.with_suffix(".bin").stat().st_size // 2,
            extra={**common.extra, "inference_precision": "bf16"}))
    return made


# ---------------------------------------------------------------- 3. run it
def load(path: Path, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model compiled for the CPU plugin, wrapped to take and return torch tensors.

    PERFORMANCE_HINT LATENCY: one inference stream using the cores for one request at a time,
    which is what a batch-1 latency row means (THROUGHPUT would split cores into streams).
    INFERENCE_PRECISION_HINT f32: on CPUs with bf16 (AVX512-BF16, AMX) OpenVINO would otherwise
    silently run the "fp32" row, and the int8 model's float layers, in bf16. The bf16 row's
    record says inference_precision bf16: that file is compiled with the hint bf16 (a CPU without
    bf16 ignores the hint and runs f32).
    `threads` sets INFERENCE_NUM_THREADS; None keeps OpenVINO's default (all cores)."""
    compiled = _compile(path, threads)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        request.infer({0: a})
        # the output tensor is the request's own buffer, reused by the next call: copy it out
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    run.compiled = compiled  # for op_counts: what the plugin actually runs
    return run


def _check_files(path: Path) -> None:
    """Say what is wrong with an IR before OpenVINO reads it: its own error for a missing, empty
    or short .bin or an .xml that does not parse is "Exception from src/inference/src/cpp/core.cpp:132:"
    and nothing else. The .xml must parse as IR, and the .bin must hold every weight it names."""
    import xml.etree.ElementTree as ET
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except OSError as e:
        raise QuantbenchError(f"cannot read OpenVINO model {path}: {e.strerror or e}") from e
    except ET.ParseError as e:
        raise QuantbenchError(f"{path} is not an OpenVINO model: its XML does not parse ({e})") from e
    if root.tag != "net":
        raise QuantbenchError(f"{path} is not an OpenVINO model: its XML is a <{root.tag}>, not an IR <net>")
    need = 0
    for data in root.iter("data"):
        offset, size = data.get("offset"), data.get("size")
        if offset is not None and size is not None:
            try:
                need = max(need, int(offset) + int(size))
            except ValueError as e:
                raise QuantbenchError(f"{path} is a damaged OpenVINO model: a weight's offset/size is "
                                      f"{offset!r}/{size!r}") from e
    if not need:
        return
    weights = path.with_suffix(".bin")
    try:
        have = weights.stat().st_size
    except OSError as e:
        raise QuantbenchError(f"cannot load OpenVINO model {path}: its weights file {weights} is missing "
                              f"({e.strerror or e})") from e
    if have < need:
        state = "empty" if have == 0 else f"truncated ({have} bytes)"
        raise QuantbenchError(f"cannot load OpenVINO model {path}: its weights file {weights} is {state}; "
                              f"the model needs {need} bytes")


def _reason(e: Exception) -> str:
    """OpenVINO's message without its "Exception from src/...cpp:N:" location lines."""
    lines = [line.strip() for line in str(e).splitlines()]
    useful = [line for line in lines if line and not re.fullmatch(r"Exception from \S+:\d+:?", line)]
    return " ".join(useful)[:300] if useful else cause(e)


def _compile(path: Path, threads: int | None, perf_count: bool = False):
    from ..record import read_record
    ov = _require("running OpenVINO models")
    _check_files(path)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _precision(read_record(path))}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if perf_count:
        config["PERF_COUNT"] = True
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as e:
        raise QuantbenchError(f"cannot load OpenVINO model {path}: {_reason(e)}") from e


def profile_ops(path: Path, calls: int, threads: int, model, input_shape) -> dict[str, tuple[float, int]]:
    """OpenVINO's per-layer performance counters (PERF_COUNT), summed by layer type and the
    kernel that ran it (exec_type, e.g. jit_avx2_I8: int8 on AVX2)."""
    request = _compile(path, threads, perf_count=True).create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, *input_shape), np.float32)
    for _ in range(20):
        request.infer({0: x})
    ops: dict[str, list] = {}
    for _ in range(calls):
        request.infer({0: x})
        for info in request.get_profiling_info():  # the last inference's counters
            if info.real_time.total_seconds() > 0:
                acc = ops.setdefault(f"{info.node_type} ({info.exec_type})", [0.0, 0])
                acc[0] += info.real_time.total_seconds()
                acc[1] += 1
    return {k: (v[0], v[1]) for k, v in ops.items()}


def op_counts(path: Path, model=None) -> OpCounts:
    """int8 vs float convolutions and fully connected layers as the CPU plugin compiled them
    (its runtime graph gives each layer's execution precision), not as the IR asks for them."""
    compiled = getattr(model, "compiled", None)
    if compiled is None:
        compiled = _compile(path, None)
    counts = OpCounts()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = {"Convolution": "conv", "FullyConnected": "linear", "MatMul": "linear"}.get(
            info["layerType"].astype(str))
        if kind is not None:
            int8 = info["runtimePrecision"].astype(str) in ("u8", "i8")
            counts.add(kind, int8=int8)
    return counts
