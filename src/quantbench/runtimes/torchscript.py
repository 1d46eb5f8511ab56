"""TorchScript (.pt): what the eager and FX flows deploy. A frozen TorchScript file runs in any
process with plain `torch.jit.load`, without quantbench or the model's Python class."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from ..errors import QuantbenchError, cause
from ..results import OpCounts

NAME = "torchscript"
SUFFIXES = (".pt",)


def files(path: Path) -> list[Path]:
    return [Path(path)]


def how_to_load(name: str) -> str:
    return f'torch.jit.load("{name}")'


def is_deployment(path: Path) -> bool:
    """.pt is also a common name for checkpoints: a TorchScript archive holds code/ and constants."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load(path: Path, threads: int | None = None):
    """torch threads are set per process (torch.set_num_threads) by the caller."""
    try:
        m = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise QuantbenchError(f"cannot load TorchScript model {path}: {cause(e)}") from e
    return m.eval()


def op_counts(path: Path, model=None) -> OpCounts:
    """int8 vs float compute ops in the (frozen) TorchScript graph."""
    model = model if model is not None else load(path)
    counts = OpCounts()

    def walk(graph):
        for node in graph.nodes():
            k = node.kind()
            if k.startswith("quantized::conv"):
                counts.add("conv", int8=True)
            elif k in ("aten::conv2d", "aten::_convolution", "aten::convolution", "aten::mkldnn_convolution"):
                counts.add("conv", int8=False)
            elif k.startswith("quantized::linear"):
                counts.add("linear", int8=True)
            elif k in ("aten::linear", "aten::addmm", "aten::matmul"):
                counts.add("linear", int8=False)
            for block in node.blocks():
                walk(block)

    walk(model.graph)
    for _, sub in model.named_modules():  # unfrozen files keep submodules
        if sub is not model and hasattr(sub, "graph"):
            walk(sub.graph)
    return counts


def profile_ops(path: Path, calls: int, threads: int, model, input_shape) -> dict[str, tuple[float, int]]:
    """torch.profiler over `calls` calls; self CPU time per operator (self: a parent op's time
    without its children, so the rows add up to the time spent inside operators). The inductor
    runtime uses it too."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, *input_shape)
    with torch.inference_mode():
        for _ in range(20):  # warm-up: lazy init and compilation are not what we profile
            model(x)
        with _stderr_silenced():  # the profiler's C++ side logs start/stop lines (and GPU probes)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    model(x)
            table = prof.key_averages()
    return {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in table if e.self_cpu_time_total > 0}


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
