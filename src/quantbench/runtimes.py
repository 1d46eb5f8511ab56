"""Loading deployment files back, by kind (file suffix). Each loader turns a file into a
callable: float tensor (N,3,H,W), normalized -> logits tensor (N,classes). `eval`, `bench` and
the latency workers use only this, so a new runtime is one module plus one entry below."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

import torch

from .errors import QuantbenchError

Model = Callable[[torch.Tensor], torch.Tensor]


def load_torchscript(path: Path, threads: int | None = None) -> Model:
    """TorchScript (.pt): what the eager and FX flows deploy. torch threads are set per process."""
    try:
        m = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise QuantbenchError(f"cannot load TorchScript model {path}: {type(e).__name__}") from None
    return m.eval()


def torchscript_op_counts(model) -> dict:
    """Count int8 vs float compute ops in a (frozen) TorchScript graph."""
    counts = {"int8_conv": 0, "float_conv": 0, "int8_linear": 0, "float_linear": 0}

    def walk(graph):
        for node in graph.nodes():
            k = node.kind()
            if k.startswith("quantized::conv"):
                counts["int8_conv"] += 1
            elif k in ("aten::conv2d", "aten::_convolution", "aten::convolution", "aten::mkldnn_convolution"):
                counts["float_conv"] += 1
            elif k.startswith("quantized::linear"):
                counts["int8_linear"] += 1
            elif k in ("aten::linear", "aten::addmm", "aten::matmul"):
                counts["float_linear"] += 1
            for block in node.blocks():
                walk(block)

    walk(model.graph)
    for _, sub in model.named_modules():  # unfrozen files keep submodules
        if sub is not model and hasattr(sub, "graph"):
            walk(sub.graph)
    return counts


# suffix -> "module:function" (imported lazily: optional runtimes need optional packages)
RUNTIMES: dict[str, str] = {
    ".pt": "quantbench.runtimes:load_torchscript",
    ".onnx": "quantbench.onnxrt:load",
    ".xml": "quantbench.openvino_rt:load",
    ".pt2": "quantbench.inductor_rt:load",
}

# suffix -> runtime name shown in tables
RUNTIME_NAMES: dict[str, str] = {".pt": "torchscript", ".onnx": "onnxruntime", ".xml": "openvino",
                                 ".pt2": "inductor"}


# suffix -> "module:function" counting int8 and float ops: (path, loaded model) -> dict with
# keys int8_conv, float_conv, int8_linear, float_linear
OP_COUNTERS: dict[str, str] = {
    ".pt": "quantbench.runtimes:_torchscript_ops",
    ".pt2": "quantbench.inductor_rt:op_counts",
    ".onnx": "quantbench.onnxrt:op_counts",
    ".xml": "quantbench.openvino_rt:op_counts",
}


# Plug-ins without editing this file (measuring subprocesses read it too):
# QUANTBENCH_RUNTIMES=".ext=package.module:load,.other=..."
for _entry in filter(None, os.environ.get("QUANTBENCH_RUNTIMES", "").split(",")):
    _suffix, _, _target = _entry.partition("=")
    RUNTIMES[_suffix.strip()] = _target.strip()


def _torchscript_ops(path: Path, model) -> dict:
    return torchscript_op_counts(model)


def op_counts(path: str | os.PathLike, model=None) -> dict:
    path = Path(path)
    target = OP_COUNTERS.get(path.suffix)
    if target is None:
        return {}
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)(path, model if model is not None else load_deployed(path))


# Optional runtimes that make their own fp32 + int8 files from an fp32 model, for comparison
# rows: name -> "module:function(model, out_dir, calib_batches, meta) -> list[Path]".
EXPORTERS: dict[str, str] = {
    "onnxrt": "quantbench.onnxrt:export",
    "openvino": "quantbench.openvino_rt:export",
}


def for_file(path: Path, registry: dict[str, str], what: str) -> Callable:
    """The function a suffix registry names for this file (imported on demand)."""
    if not path.is_file():
        raise QuantbenchError(f"model file not found: {path}")
    target = registry.get(path.suffix)
    if target is None:
        raise QuantbenchError(f"don't know how to {what} {path.name}; known kinds: {', '.join(registry)}")
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def load_deployed(path: str | os.PathLike, threads: int | None = None) -> Model:
    path = Path(path)
    return for_file(path, RUNTIMES, "run")(path, threads)
