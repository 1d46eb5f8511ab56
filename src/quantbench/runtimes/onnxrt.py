"""ONNX Runtime as a comparison row: the same fp32 model, exported to ONNX, run by ONNX Runtime in
fp32 and after ONNX Runtime's own static int8 quantization.

    export(model, out_dir, calib_batches, base, scheme=None, options=None) -> [FileRecord]
                                                -> [onnx-fp32.onnx, onnx-int8.onnx] (+ sidecars)
    load(path, threads)                         -> callable: float tensor (N,3,H,W) -> logits

Needs the optional packages (`pip install '.[runtimes]'`); they are imported only when used.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..cpu import has_vnni
from ..errors import QuantbenchError, cause
from ..export import calibration_arrays as _as_arrays
from ..record import FileRecord, as_record
from ..qconfigs import Scheme
from ..results import OpCounts
from ..warn import captured_root_log

NAME = "onnxruntime"
SUFFIXES = (".onnx",)

FP32_FILE = "onnx-fp32.onnx"
INT8_FILE = "onnx-int8.onnx"
FILES = (FP32_FILE, INT8_FILE)  # what export() writes (replicate --resume reuses them)
INPUT, OUTPUT = "input", "logits"
# 17 is what both the TorchScript exporter and ONNX Runtime's QDQ quantizer handle well
# (per-channel QuantizeLinear needs >= 13).
OPSET = 17


def files(path: Path) -> list[Path]:
    return [Path(path)]


def how_to_load(name: str) -> str:
    return f'onnxruntime.InferenceSession("{name}", providers=["CPUExecutionProvider"])'


def _require(what: str, quantization: bool = False):
    """Import the optional packages, or fail with the one line that says how to get them."""
    try:
        import onnx
        import onnxruntime
        if quantization:
            import onnxruntime.quantization  # noqa: F401
    except ImportError as e:
        raise QuantbenchError(f"{what} needs the optional runtimes: pip install '.[runtimes]' ({e})") from e
    return onnx, onnxruntime


# ---------------------------------------------------------------- 1. fp32: torch -> ONNX
def export_fp32(model: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """Trace the model to ONNX with a dynamic batch dimension.

    The TorchScript-based exporter (dynamo=False) is used: the dynamo one needs onnxscript and
    gains nothing for a plain CNN. In eval mode it folds batch norm into the convolutions."""
    torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET,
                      do_constant_folding=True, dynamo=False)


# ---------------------------------------------------------------- 2. int8: ONNX Runtime's quantizer
MAX_CALIB_SAMPLES = 2000  # read a batch at a time (export.CalibrationArrays); histograms merge per batch


@dataclass(frozen=True)
class Options:
    """ONNX Runtime's own option for its int8 row: how the int8 graph is written."""
    quant_format: str = field(default="qdq", metadata={
        "help": "qdq: QuantizeLinear/DequantizeLinear pairs around float ops, which ORT fuses into int8 "
                "kernels (its recommended format, the default); qoperator: int8 operators "
                "(QLinearConv...) written into the graph"})

    def __post_init__(self):
        if self.quant_format not in ("qdq", "qoperator"):
            raise QuantbenchError(f"unknown ONNX quant format {self.quant_format!r}; choose from qdq, qoperator")


def available() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def int8_settings(scheme: Scheme | None = None) -> dict:
    """How to quantize for *this* CPU, as quantize_static keyword arguments.

    Activations u8 (asymmetric, per tensor) x weights s8 (symmetric, per output channel) is what
    ONNX Runtime's x86 kernels are fastest at. Without VNNI they multiply those pairs with
    vpmaddubsw, which sums two u8 x s8 products into a saturating int16; full 8-bit weights
    overflow it and cost ~3.4 points on the reference ResNet-18 (82.86 -> 79.42). reduce_range
    stores the weights in 7 bits ([-64, 64]), so 2 x 255 x 64 fits in int16: measured 82.85, and
    the fastest variant here (u8 x u8 was as accurate but slower; s8 activations are converted to
    u8 internally on x86 and overflowed the same way). With VNNI (or AMX, or ARM dot products)
    products are summed in int32 and full-range weights are exact.

    `scheme`: the torch flows' choices, by the same names (None, or a Scheme whose fields are
    None, keeps the settings above exactly; the qconfig name's ranges are torch's, not used here):
      observer   minmax -> MinMax; moving-average -> MinMax averaged over calibration feeds;
                 histogram -> Entropy (ORT's histogram search: the clipping threshold whose
                 quantized histogram is closest in KL divergence; "Distribution" only records a
                 mean and deviation, for float8); percentile -> Percentile of |x|.
      weight_scheme per-tensor -> per_channel=False.   act_scheme symmetric -> ActivationSymmetric.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=not has_vnni(),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    if scheme is None:
        return settings
    extra: dict = {}
    if scheme.observer == "moving-average":
        extra["CalibMovingAverage"] = True
    elif scheme.observer == "histogram":
        settings["calibrate_method"] = CalibrationMethod.Entropy
    elif scheme.observer == "percentile":
        settings["calibrate_method"] = CalibrationMethod.Percentile
        extra["CalibPercentile"] = float(scheme.percentile)
    if settings["calibrate_method"] != CalibrationMethod.MinMax:
        # histogram methods keep every feed's outputs in memory until they make the histograms:
        # one feed (a batch of images) at a time, merged into the running histograms
        extra["CalibStridedMinMax"] = 1
    if scheme.weight_scheme == "per-tensor":
        settings["per_channel"] = False
    if scheme.act_scheme == "symmetric":
        extra["ActivationSymmetric"] = True
    if extra:
        settings["extra_options"] = extra
    return settings


_METHODS = {"MinMax": "min/max", "Entropy": "entropy (KL-divergence clipping over a histogram)",
            "Percentile": "percentile of |x|"}


def calibration_method(settings: dict) -> str:
    """The sidecar's short name of the calibration that really ran."""
    extra = settings.get("extra_options", {})
    name = settings["calibrate_method"].name
    if name == "MinMax":
        return "moving-average" if extra.get("CalibMovingAverage") else "minmax"
    return "percentile" if name == "Percentile" else name.lower()


def describe_int8(settings: dict, scheme: Scheme | None = None) -> dict:
    """The qconfig recorded in the sidecar: what quantize_static was really given."""
    rr = settings["reduce_range"]
    extra = settings.get("extra_options", {})
    method = settings["calibrate_method"].name
    how = _METHODS[method] + (", averaged over feeds" if extra.get("CalibMovingAverage") else "") + (
        f" at the {extra['CalibPercentile']:g}th percentile" if "CalibPercentile" in extra else "")
    per_channel = settings["per_channel"]
    symmetric = bool(extra.get("ActivationSymmetric"))
    return {"name": "onnxruntime-qdq", "format": "QDQ",
            "weights": f"{'per-channel' if per_channel else 'per-tensor'} symmetric int8 "
                       f"{'[-64, 64] (reduce_range)' if rr else '[-127, 127]'}",
            "activations": f"per-tensor {'symmetric' if symmetric else 'asymmetric'} uint8 [0, 255], "
                           f"{how} calibration",
            "calibrate_method": method, "per_channel": per_channel, "activation_symmetric": symmetric,
            "extra_options": dict(extra),
            "overrides": scheme.overrides() if scheme is not None else {},
            "reduce_range": rr,
            "why": "no VNNI on this CPU: u8 x s8 pairs saturate int16, so 7-bit weights" if rr
            else "VNNI/AMX/dot-product present: full range is exact"}


# ONNX Runtime calibrates by running a copy of the model that outputs each tensor's min and max;
# its session's memory grows with the images in one feed (a batch of 20 at 224x224 took it past
# a gigabyte). Min/max ranges merge exactly across feeds, so for min/max calibration each batch
# is fed in pieces of at most this many pixels (5 images at 224x224; 32x32 batches stay whole).
FEED_PIXELS = 2**18


def feed_images(calib, settings: dict) -> int | None:
    """Images per calibration feed: a piece of each batch where that changes nothing but memory
    (min/max: the range of the pieces' ranges is the batch's), else None: whole batches (a
    moving average or a histogram depends on how the images are grouped)."""
    from ..data import images_per_batch
    extra = settings.get("extra_options", {})
    if settings["calibrate_method"].name != "MinMax" or extra.get("CalibMovingAverage"):
        return None
    feed = images_per_batch(calib[0].shape[1:], max(calib.lengths), FEED_PIXELS)
    return feed if feed < max(calib.lengths) else None


def _calibration_reader(batches, input_name: str, feed: int | None = None):
    """quantize_static pulls calibration inputs from a CalibrationDataReader, one feed at a time
    (`batches`: a sequence, e.g. export.CalibrationArrays, read a batch at a time; `feed`: images
    per feed, None for whole batches)."""
    from onnxruntime.quantization import CalibrationDataReader
    lengths = [len(b) for b in batches] if not hasattr(batches, "lengths") else batches.lengths
    # (batch, first image) of each feed, in order
    feeds = [(i, s) for i, n in enumerate(lengths) for s in (range(0, n, feed) if feed else (0,))]

    # the batches and feeds are the instance's, not the class's closure: a class is a reference
    # cycle, which would keep the images (and their temporary file) until a full collection
    class Reader(CalibrationDataReader):
        def __init__(self, batches, feeds):
            self._batches, self._feeds = batches, feeds
            self._held = (None, None)  # the batch its feeds are cut from, read once
            self.set_range(0, len(feeds))

        def get_next(self):
            i, start = next(self._it, (None, None))
            if i is None:
                return None
            if self._held[0] != i:
                self._held = (i, self._batches[i])
            x = self._held[1]
            return {input_name: x if not feed else np.ascontiguousarray(x[start:start + feed])}

        def rewind(self):
            self.set_range(0, len(self._feeds))

        # CalibStridedMinMax feeds the calibrator a slice at a time
        def __len__(self):
            return len(self._feeds)

        def set_range(self, start_index: int, end_index: int):
            self._it = iter(self._feeds[start_index:end_index])

    return Reader(batches, feeds)


def initializer_bytes(path: Path) -> int:
    """Bytes of the model's stored tensors (weights, biases, scales, zero points)."""
    import onnx
    from onnx import helper
    model = onnx.load(str(path), load_external_data=False)
    return sum(helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
               for t in model.graph.initializer)


def export(model: torch.nn.Module, out_dir: Path, calib_batches: Iterable[torch.Tensor],
           base: FileRecord | dict, scheme: Scheme | None = None, options: Options | None = None) -> list[FileRecord]:
    """Write onnx-fp32.onnx and onnx-int8.onnx into out_dir; returns their records, made from
    `base` (where the model came from). `scheme` picks the calibration (see int8_settings),
    the options the graph's format."""
    options = options or Options()
    base = as_record(base)
    _require("ONNX export", quantization=True)
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = _as_arrays(calib_batches)
    example = torch.from_numpy(calib[0][:1])
    fp32_path, int8_path = out_dir / FP32_FILE, out_dir / INT8_FILE
    settings = int8_settings(scheme)
    feed = feed_images(calib, settings)
    if options.quant_format == "qoperator":
        from onnxruntime.quantization import QuantFormat
        settings["quant_format"] = QuantFormat.QOperator
    common = base.replace(flow=NAME, runtime=NAME, input_shape=list(calib[0].shape[1:]),
                          extra={**base.extra, "opset": OPSET})

    # Build both in a scratch folder beside the outputs, then move them in: an interrupted run
    # leaves no half-written model under the final names.
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=out_dir) as tmp:
        tmp_fp32, tmp_int8 = Path(tmp) / FP32_FILE, Path(tmp) / INT8_FILE
        try:
            with torch.no_grad():
                export_fp32(model, tmp_fp32, example)
        except Exception as e:  # an operator the ONNX exporter has no translation for, ...
            raise QuantbenchError(f"ONNX export failed: {cause(e)}") from e
        # ORT's recommended pre-pass (shape inference, graph clean-up) before choosing where the
        # QuantizeLinear/DequantizeLinear pairs go; it only feeds the quantizer.
        tmp_pre = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(tmp_fp32), str(tmp_pre))
            preprocess = "symbolic and ONNX shape inference, graph optimization"
        except Exception as e:
            # ORT's symbolic shape inference cannot follow every graph (a vision transformer's
            # reshapes of computed shapes, for one); ONNX's own shape inference is enough for
            # placing the quantize/dequantize pairs, so the pass runs again without it.
            preprocess = f"ONNX shape inference and graph optimization (ORT's symbolic shape inference failed: {cause(e)})"
            try:
                quant_pre_process(str(tmp_fp32), str(tmp_pre), skip_symbolic_shape=True)
            except Exception as e2:
                raise QuantbenchError(f"ONNX Runtime's quantization pre-pass failed on this model: {cause(e2)}") from e2
        try:
            # the histogram calibrators print their progress on stdout: keep it out of logs
            # and what it logs (e.g. a 1-D weight it quantizes per tensor) goes to the sidecar
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), captured_root_log() as log:
                quantize_static(str(tmp_pre), str(tmp_int8), _calibration_reader(calib, INPUT, feed), **settings)
        except Exception as e:
            raise QuantbenchError(f"ONNX Runtime's quantize_static failed on this model: {cause(e)}") from e
        os.replace(tmp_fp32, fp32_path)
        os.replace(tmp_int8, int8_path)

    return [common.replace(file=FP32_FILE, label="onnxrt-fp32", method="origin", dtype="fp32",
                           weight_bytes=initializer_bytes(fp32_path)),
            common.replace(file=INT8_FILE, label="onnxrt-int8", method="static", dtype="int8",
                           qconfig=describe_int8(settings, scheme),
                           calibration={"samples": calib.samples, "batches": len(calib),
                                        "method": calibration_method(settings),
                                        **({"feed_images": feed} if feed else {})},
                           weight_bytes=initializer_bytes(int8_path),
                           extra={**common.extra, "quant_preprocess": preprocess, "quantizer_log": log})]


# ---------------------------------------------------------------- 3. run it
def load(path: Path, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime session on the CPU, wrapped to take and return torch tensors.

    `threads` sets the intra-op pool (inter-op 1, sequential execution: a CNN is a chain, so
    parallel branches only add threads that fight for the cores); None keeps ORT's defaults."""
    session = _session(path, threads)
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run([output_name], {input_name: a})[0])

    return run


def _session(path: Path, threads: int | None, profile_prefix: str | None = None):
    _, ort = _require("running ONNX models")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QuantbenchError(f"cannot load ONNX model {path}: {cause(e)}") from e


def profile_ops(path: Path, calls: int, threads: int, model, input_shape) -> dict[str, tuple[float, int]]:
    """ONNX Runtime's own profiler: a JSON trace with one event per node run; summed by op type
    (after graph optimization: QDQ groups show up as the fused QLinearConv etc. that really ran)."""
    import json
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(path, threads, profile_prefix=os.path.join(tmp, "ort"))
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, *input_shape), np.float32)}
        for _ in range(20):
            session.run(None, feed)
        # the trace covers the warm-up too: count only the last `calls` runs' events below
        for _ in range(calls):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            trace = json.load(f)
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-calls]["ts"] if len(runs) >= calls else 0
    ops: dict[str, list] = {}
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            acc = ops.setdefault(e["args"]["op_name"], [0.0, 0])
            acc[0] += e["dur"] / 1e6
            acc[1] += 1
    return {k: (v[0], v[1]) for k, v in ops.items()}


def op_counts(path: Path, model=None) -> OpCounts:
    """int8 vs float Conv/Gemm/MatMul, from the graph: in a QDQ model an op runs in int8 when both
    its input and its weight arrive through DequantizeLinear (ORT fuses that into QLinearConv)."""
    onnx, _ = _require("counting ONNX operators")
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    counts = OpCounts()
    for node in graph.node:
        kind = {"Conv": "conv", "QLinearConv": "conv", "ConvInteger": "conv", "Gemm": "linear",
                "MatMul": "linear", "QLinearMatMul": "linear", "MatMulInteger": "linear"}.get(node.op_type)
        if kind is None:
            continue
        quantized = node.op_type.startswith("QLinear") or node.op_type.endswith("Integer") or all(
            producer.get(i) == "DequantizeLinear" for i in node.input[:2])
        counts.add(kind, int8=quantized)
    return counts
