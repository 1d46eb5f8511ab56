"""OpenVINO as a comparison row: the same fp32 model converted to OpenVINO IR, run by the
OpenVINO CPU plugin in fp32 and after NNCF's post-training int8 quantization.

    export(model, out_dir, calib_batches, meta) -> [openvino-fp32.xml, openvino-int8.xml]
                                                   (each with its .bin and a FILE.json sidecar)
    load(path, threads)                         -> callable: float tensor (N,3,H,W) -> logits

Needs the optional packages (`pip install '.[runtimes]'`); they are imported only when used.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..cpu import has_vnni
from ..errors import QuantbenchError, cause
from ..export import calibration_arrays as _as_arrays, write_sidecar
from ..results import OpCounts

NAME = "openvino"
SUFFIXES = (".xml",)

FP32_FILE = "openvino-fp32.xml"
INT8_FILE = "openvino-int8.xml"
FILES = (FP32_FILE, INT8_FILE)  # what export() writes (replicate --resume reuses them)
INPUT, OUTPUT = "input", "logits"


def files(path: Path) -> list[Path]:
    return [Path(path), Path(path).with_suffix(".bin")]


def how_to_load(name: str) -> str:
    return f'openvino.Core().compile_model("{name}", "CPU", {{"PERFORMANCE_HINT": "LATENCY"}})'


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
def int8_settings() -> dict:
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
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    fix = OverflowFix.DISABLE if has_vnni() else OverflowFix.ENABLE
    return dict(preset=nncf.QuantizationPreset.PERFORMANCE, target_device=nncf.TargetDevice.CPU,
                advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix, batchwise_statistics=True))


def describe_int8(settings: dict) -> dict:
    """The qconfig recorded in the sidecar."""
    fix = settings["advanced_parameters"].overflow_fix.value
    return {"name": "nncf-ptq", "preset": settings["preset"].value,
            "target_device": settings["target_device"].value,
            "weights": "per-channel symmetric int8" + (", 7-bit (overflow fix)" if fix == "enable" else ""),
            "activations": "per-tensor symmetric int8/uint8, min/max calibration, fast bias correction",
            "overflow_fix": fix,
            "why": "no VNNI on this CPU: u8 x s8 pairs saturate int16, so 7-bit weights everywhere"
            if fix == "enable" else "VNNI/AMX present: full range is exact"}


def export(model: torch.nn.Module, out_dir: Path, calib_batches: Iterable[torch.Tensor],
           meta: dict) -> list[Path]:
    """Write openvino-fp32.xml/.bin and openvino-int8.xml/.bin (plus FILE.json sidecars).

    `meta` (source checkpoint, classes, normalization...) goes into both sidecars; the keys this
    function sets itself (label, method, dtype, ...) win over it."""
    ov = _require("OpenVINO export", nncf=True)
    import nncf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = _as_arrays(calib_batches)
    fp32_path, int8_path = out_dir / FP32_FILE, out_dir / INT8_FILE
    common = {"flow": NAME, "runtime": NAME, "openvino_version": ov.__version__,
              "input_shape": list(calib[0].shape[1:])}

    with torch.no_grad():
        ov_fp32 = convert_fp32(model, torch.from_numpy(calib[0][:1]))
    _save(ov_fp32, fp32_path)

    settings = int8_settings()
    # A list of model inputs is already what NNCF wants (one item = one inference); subset_size
    # counts items, so all of them are used.
    # NNCF draws its own progress bars on stdout for a few seconds of work: keep them out of logs
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        ov_int8 = nncf.quantize(ov.Core().read_model(str(fp32_path)), nncf.Dataset(calib),
                                subset_size=len(calib), **settings)
    _save(ov_int8, int8_path)

    write_sidecar(fp32_path, **{**meta, **common, "label": "openvino-fp32", "method": "origin",
                                "dtype": "fp32", "qconfig": None, "calibration": None,
                                "weight_bytes": fp32_path.with_suffix(".bin").stat().st_size})
    write_sidecar(int8_path, **{**meta, **common, "label": "openvino-int8", "method": "static",
                                "dtype": "int8", "qconfig": describe_int8(settings),
                                "calibration": {"samples": sum(len(x) for x in calib),
                                                "batches": len(calib), "method": "minmax"},
                                "weight_bytes": int8_path.with_suffix(".bin").stat().st_size})
    return [fp32_path, int8_path]


# ---------------------------------------------------------------- 3. run it
def load(path: Path, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model compiled for the CPU plugin, wrapped to take and return torch tensors.

    PERFORMANCE_HINT LATENCY: one inference stream using the cores for one request at a time,
    which is what a batch-1 latency row means (THROUGHPUT would split cores into streams).
    INFERENCE_PRECISION_HINT f32: on CPUs with bf16 (AVX512-BF16, AMX) OpenVINO would otherwise
    silently run the "fp32" row, and the int8 model's float layers, in bf16.
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


def _compile(path: Path, threads: int | None, perf_count: bool = False):
    ov = _require("running OpenVINO models")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if perf_count:
        config["PERF_COUNT"] = True
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as e:
        raise QuantbenchError(f"cannot load OpenVINO model {path}: {cause(e)}") from e


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
