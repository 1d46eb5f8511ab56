"""TorchScript (.pt): what the eager and FX flows deploy. A frozen TorchScript file runs in any
process with `torch.jit.load`, without quantbench or the model's Python class; at the speed
quantbench measured only with the sidecar's engine set first (`how_to_load` gives the lines;
docs/torchscript-engine.md).

The quantized engine (torch.backends.quantized.engine) chooses the int8 kernels: "fbgemm",
"onednn", "qnnpack", or "x86", which picks between fbgemm and oneDNN per layer. A file stores
its int8 weights unpacked; torch.jit.load packs them for the engine current AT LOAD TIME (the
engine at convert time does not survive the save). So the engine is a property of the loading
process: the flows record theirs in the sidecar ("engine") and `load` sets it from there.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import QuantbenchError, cause
from ..record import read_record
from ..results import OpCounts
from ..warn import stderr_silenced

NAME = "torchscript"
SUFFIXES = (".pt",)


@dataclass(frozen=True)
class Options:
    """TorchScript's own option: which int8 kernels the file's weights are packed for."""
    engine: str | None = field(default=None, metadata={
        "help": "quantized engine of TorchScript int8 files: x86, fbgemm, onednn, qnnpack (default: the "
                "fastest measured for this CPU; recorded in the sidecar and set when the file is loaded)",
        "alias": "--engine"})

    def __post_init__(self):
        if self.engine is not None:
            check_engine(self.engine)


def resolve_options(options: Options, pruned: bool) -> Options:
    """The engine to use when none was asked for depends on whether pruning cropped convolutions."""
    return options if options.engine else Options(engine=best_engine(pruned=pruned))


def building(options: Options):
    """Quantize, trace and freeze under the engine the weights are packed for."""
    return quantized_engine(options.engine)


def record_fields(options: Options) -> dict:
    return {"engine": options.engine}  # what load() sets before loading the file


def files(path: Path) -> list[Path]:
    return [Path(path)]


def how_to_load(name: str, sidecar: dict | None = None) -> str:
    """The lines that load the file without quantbench AND run it at the speed quantbench measured:
    the quantized engine the sidecar records is set before torch.jit.load, as `load` does. A plain
    torch.jit.load packs the int8 weights for torch's default engine instead ("x86": on a VNNI CPU
    it runs the pruned ResNet-18's convs on oneDNN, slower, and far slower after a large batch;
    docs/torchscript-engine.md).
    Without a recorded engine (fp32 files, files made elsewhere): plain torch.jit.load."""
    engine = (sidecar or {}).get("engine")
    lines = ["import torch"]
    if engine:
        lines.append(f'torch.backends.quantized.engine = "{engine}"')
    lines.append(f"m = torch.jit.load({json.dumps(name)})")  # a Python string literal for any name
    return "; ".join(lines)


def is_deployment(path: Path) -> bool:
    """.pt is also a common name for checkpoints: a TorchScript archive holds code/ and constants."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def engines() -> list[str]:
    """The quantized engines this torch build offers ("none" is not one)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_engine(name: str) -> str:
    if name not in engines():
        raise QuantbenchError(f"unknown quantized engine {name!r}; this torch offers {', '.join(engines())}")
    return name


def best_engine(pruned: bool = True) -> str:
    """The engine the eager and FX flows quantize for when none is asked for; `pruned`: whether
    dead-tap pruning cropped some convolutions of the model (quantbench.prune).

    Measured with benchmarks/engines.py (ResNet-18 at 32x32, batch 1, one thread, on an AVX-512
    VNNI CPU). There "x86" sends every conv with symmetric int8 weights to oneDNN, which was a
    little faster than fbgemm on the unpruned model but ran the cropped 1x1 layer4 convs hardly
    faster than the 3x3 ones they replace; fbgemm's time follows the kernel size, so with pruning
    it was clearly the fastest of all engines (qnnpack, ARM's, was far slower on x86). Without
    VNNI, "x86" runs fbgemm anyway. Where there is no fbgemm (ARM), torch's default stays.
    """
    if pruned and "fbgemm" in engines():
        return "fbgemm"
    return "x86" if "x86" in engines() else torch.backends.quantized.engine


@contextlib.contextmanager
def quantized_engine(name: str | None):
    """Run the block under quantized engine `name` (None: leave it), then restore the old one."""
    if name is None:
        yield
        return
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = check_engine(name)
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def load(path: Path, threads: int | None = None):
    """torch threads are set per process (torch.set_num_threads) by the caller.

    The quantized engine recorded in the sidecar is set first, and stays set: the int8 weights
    are packed for it while loading, and some int8 ops (quantized max_pool2d, for one) look at the
    process's engine on every call. Measuring workers run one model per process, so this is
    their engine."""
    engine = read_record(path).engine
    if engine is not None:
        try:
            check_engine(engine)
        except QuantbenchError as e:
            raise QuantbenchError(f"{path} was made for quantized engine {engine!r}, which this torch "
                                  f"lacks ({', '.join(engines())}); make the file again here") from e
        torch.backends.quantized.engine = engine
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
        with stderr_silenced():  # the profiler's C++ side logs start/stop lines (and GPU probes)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    model(x)
            table = prof.key_averages()
    return {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in table if e.self_cpu_time_total > 0}

