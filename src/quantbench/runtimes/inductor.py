"""torch.export programs (.pt2), what the PT2E flow deploys, run by inductor (torch.compile).

The file holds a "QDQ" graph: fp32 aten ops between quantize/dequantize ops, plus int8 weights.
Run as is, it computes in fp32 (a simulation of int8). torch.compile with inductor's `freezing`
turns it into int8 code: freezing treats the weights as constants, so the x86 passes can
pattern-match dequantize -> conv/linear -> quantize, pre-pack the int8 weights and call oneDNN
int8 kernels. That is PyTorch's recommended deployment of PT2E int8 models on CPU.

Two imports matter, neither of them quantbench:
- torch.export.load needs torch's quantize/dequantize op library registered (load_program);
- with torch 2.14 the weight-packing passes live in torchao (registered when its x86 quantizer
  module is imported). Without them inductor still compiles the graph, but SILENTLY in fp32
  (the accuracy looks right, the speed is not int8's), so `load` insists on them.

Its own rows, from an fp32 model (export), where the CPU has bf16 (AVX512-BF16, AMX):

    export(model, out_dir, calib_batches, base, ...) -> [inductor-fp32.pt2, inductor-bf16.pt2]

inductor-bf16.pt2 is the model with its weights and arithmetic in bf16; it takes and returns
float32 (the casts are inside the graph), so it runs anywhere the fp32 file runs. No calibration.
inductor-fp32.pt2 is the same model in fp32: the bf16 row's own baseline. Both are skipped
where the CPU has no bf16 (torch would emulate bf16 there, slower than fp32).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from .. import cpu
from ..errors import QuantbenchError
from ..record import FileRecord, as_record
from ..results import OpCounts
from .torchscript import profile_ops  # noqa: F401  (torch.profiler works for compiled graphs too)

NAME = "inductor"
SUFFIXES = (".pt2",)

FP32_FILE = "inductor-fp32.pt2"
BF16_FILE = "inductor-bf16.pt2"
FILES = (FP32_FILE, BF16_FILE)  # what export() writes (replicate --resume reuses them)
MAKES_INT8 = False  # its exporter's rows are fp32 and bf16 (the int8 .pt2 is the PT2E flow's)


def files(path: Path) -> list[Path]:
    return [Path(path)]


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torchao") is not None


def skipped_files() -> dict[str, str]:
    """FILES that export() does not make on this machine, with the reason: without bf16 in the
    CPU there is no bf16 row, and no use for its fp32 baseline."""
    why = cpu.bf16_missing()
    return {f: why for f in FILES} if why else {}


class BF16(torch.nn.Module):
    """A float model in bf16 that takes and returns float32: the input is cast to bf16 at the
    start and the logits back to float32 at the end, so callers see an fp32 model's interface."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


def _save(model: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """torch.export with a dynamic batch (traced from a batch of 2: a batch of 1 would be
    specialized), saved atomically and reproducibly."""
    from torch.export import Dim

    from ..pt2_archive import save_program
    two = example[:1].expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        program = torch.export.export(model.eval(), (two,), dynamic_shapes=({0: Dim("batch")},))
    save_program(program, path)


def export(model: torch.nn.Module, out_dir: Path, calib_batches, base: FileRecord | dict,
           scheme=None, options=None) -> list[FileRecord]:
    """Write inductor-fp32.pt2 and inductor-bf16.pt2 into out_dir where the CPU has bf16 (else
    nothing: skipped_files says why); returns their records, made from `base`. Neither file is
    calibrated, so `calib_batches` gives only the input shape, and `scheme` does not apply."""
    import copy
    base = as_record(base)
    skip = skipped_files()
    if all(f in skip for f in FILES):
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = next(iter(calib_batches))[:1].float()
    common = base.replace(flow=NAME, runtime=NAME, input_shape=list(example.shape[1:]))
    from ..export import weight_bytes
    made = []
    for name, label, dtype, method, m in (
            (FP32_FILE, "inductor-fp32", "fp32", "origin", copy.deepcopy(model).eval()),
            (BF16_FILE, "inductor-bf16", "bf16", "bf16", BF16(copy.deepcopy(model).eval()))):
        if name in skip:
            continue
        _save(m, out_dir / name, example)
        made.append(common.replace(file=name, label=label, dtype=dtype, method=method, weight_bytes=weight_bytes(m)))
    return made


def how_to_load(name: str) -> str:
    # what load() below does, for a user without quantbench (torchao registers the int8 passes)
    return (f'import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer; '
            f'torch._inductor.config.freezing = True; '
            f'torch.compile(torch.export.load("{name}").module())')


def load_program(path: Path):
    """The ExportedProgram in a .pt2 file, refused if it carries anything that could run code
    when loaded (pickled payloads, shared libraries, shape expressions beyond arithmetic):
    quantbench.pt2_archive says why. torch.export.load needs the quantize/dequantize ops of
    torch's "quantized_decomposed" library, which plain `import torch` does not register."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    from ..pt2_archive import load_program as safe_load
    return safe_load(path)


class Compiled:
    """The compiled model as a callable. Compilation is lazy (the first call, and a recompile the
    first time the batch size changes); `compile_s` records the first call's time."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        # Dynamo re-checks guards on every call, among them one per module attribute (weights,
        # int8 scales and zero points: hundreds for a quantized ResNet-18), which measured about
        # 0.25 ms per batch-1 call here. The module is frozen and owned by this object, so its
        # attributes never change and those guards can be skipped.
        self.compiled = torch.compile(module, backend="inductor",
                                      options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.compile_s: float | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad: inductor freezes (and so lowers to int8) only inference graphs.
        with torch.no_grad():
            if self.compile_s is None:
                t0 = time.perf_counter()
                y = self.compiled(x)
                self.compile_s = time.perf_counter() - t0
                return y
            return self.compiled(x)


def register_int8_passes() -> None:
    """Register the x86 int8 passes (weight pre-packing, quantize lift-up) with inductor."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError as e:
        raise QuantbenchError("running .pt2 int8 models needs torchao (its inductor passes make "
                              f"the int8 kernels); pip install torchao ({e})") from e


def load(path: Path, threads: int | None = None) -> Compiled:
    """torch.export.load + torch.compile (inductor, freezing). Threads are set per process
    (torch.set_num_threads) before this: inductor's kernels use the count current at compile."""
    register_int8_passes()
    # Process-wide, as PyTorch's PT2E guide does: compiles happen lazily (first call, and again
    # when the batch size changes), so the setting must outlive this function. It changes only
    # inference (no-grad) compiles, and the measuring workers run one model per process.
    # (torch.compile(options={"freezing": True}) fails here: onednn.qconv_prepack on fake tensors.)
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    # C++ wrapper: the compiled graph calls its kernels from generated C++ instead of generated
    # Python. At batch 1 a ResNet-18 call is dozens of small kernels, and the Python wrapper's
    # per-kernel cost was measured here at about 1 ms of a 4 ms call (int8: 4.26 -> 3.31 ms,
    # fp32: 3.88 -> 3.34 ms, 1 thread). It costs a longer first compile (C++ build).
    inductor_config.cpp_wrapper = True
    # inductor's int8 weight lowering builds a tensor in a way torch itself warns about
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
    module = load_program(path).module()
    for p in module.parameters():
        p.requires_grad_(False)
    return Compiled(module)


_DEQUANTIZE = ("quantized_decomposed.dequantize_per_tensor", "quantized_decomposed.dequantize_per_channel")
_CONV = ("aten.conv2d", "aten.convolution", "aten._convolution", "aten.conv1d", "aten.conv3d")
_LINEAR = ("aten.linear", "aten.addmm", "aten.mm", "aten.matmul")


def op_counts(path: Path, model=None) -> OpCounts:
    """int8 vs float conv/linear in the saved QDQ graph. A conv/linear counts as int8 when both
    its activation and its weight arrive through dequantize ops: that is the pattern inductor
    fuses into one int8 kernel (the counts describe the graph, not inductor's final code)."""
    graph = load_program(Path(path)).graph
    counts = OpCounts()

    def op(node) -> str:
        return str(node.target).rsplit(".", 1)[0] if node.op == "call_function" else ""

    for node in graph.nodes:
        kind = "conv" if op(node) in _CONV else "linear" if op(node) in _LINEAR else None
        if kind is None:
            continue
        # aten.addmm(bias, input, weight^T) has its operands after the bias
        operands = node.args[1:3] if op(node) == "aten.addmm" else node.args[:2]
        quantized = all(_through_dequantize(a) for a in operands)
        counts.add(kind, int8=quantized)
    return counts


def _through_dequantize(arg) -> bool:
    # Skip layout-only ops (a linear's weight may pass through aten.t / permute after dequantize).
    while isinstance(arg, torch.fx.Node) and arg.op == "call_function":
        name = str(arg.target).rsplit(".", 1)[0]
        if name in _DEQUANTIZE:
            return True
        if name not in ("aten.t", "aten.permute", "aten.view", "aten.reshape", "aten.contiguous"):
            return False
        arg = arg.args[0]
    return False
