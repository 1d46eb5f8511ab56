"""ExecuTorch with the XNNPACK backend as a comparison row: PyTorch's own path to phones and edge
boards. The fp32 model goes through torch.export, is lowered to XNNPACK and saved as a .pte
program; the int8 one is quantized first with PT2E and XNNPACK's own quantizer.

    export(model, out_dir, calib_batches, base, scheme=None, options=None) -> [FileRecord]
        -> [executorch-fp32.pte, executorch-int8.pte] (+ FILE.json sidecars)
    load(path, threads)  -> callable: float tensor (N,3,H,W) -> logits

Needs the optional extra (`pip install -e '.[edge]'`); executorch is imported only when used, so
the registry, `for_path` and the other runtimes work without it.
XNNPACK's kernels are tuned for ARM first: on x86 this row shows what a phone build does to
accuracy, not what the phone's latency will be.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import QuantbenchError, cause
from ..export import calibration_arrays
from ..record import FileRecord, as_record, read_record
from ..fileio import write_bytes
from ..results import OpCounts
from ..warn import stderr_silenced

NAME = "executorch"
SUFFIXES = (".pte",)

FP32_FILE = "executorch-fp32.pte"
INT8_FILE = "executorch-int8.pte"
FILES = (FP32_FILE, INT8_FILE)  # what export() writes (replicate --resume reuses them)
INSTALL = "pip install -e '.[edge]'"
# A .pte plans all its memory ahead for the largest batch it accepts. The wrapper from load()
# splits bigger batches (the accuracy pass) into pieces of at most the file's verified batch
# (its sidecar's max_batch, see _verified_batch), never more than this.
MAX_BATCH = 32
MAX_CALIB_SAMPLES = 2000  # calibration batches are read one at a time (export.CalibrationArrays)


def files(path: Path) -> list[Path]:
    return [Path(path)]


def how_to_load(name: str) -> str:
    return f'executorch.runtime.Runtime.get().load_program("{name}").load_method("forward")'


@contextlib.contextmanager
def _experimental_ok():
    """The Python runtime bindings warn on import and on some calls that they are experimental;
    a benchmark row is the intended use, so that is not news to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This API is experimental")
        yield


def _require(what: str):
    """Import executorch, or fail with the one line that says how to get it."""
    try:
        with _experimental_ok():
            import executorch  # first: the submodules below may already be loaded
            import executorch.runtime  # noqa: F401
            from executorch.extension.pybindings import portable_lib  # noqa: F401
    except ImportError as e:
        raise QuantbenchError(f"{what} needs ExecuTorch: {INSTALL} ({e})") from e
    return executorch


# ---------------------------------------------------------------- 1. the int8 recipe
def int8_settings(scheme=None) -> dict:
    """What XNNPACK's quantizer is given, for a quantbench Scheme (None: its defaults):
    get_symmetric_quantization_config's keyword arguments, plus the activation observer.
    XNNPACK's int8 kernels fix most choices: int8 activations, per-tensor affine [-128, 127];
    int8 symmetric weights [-127, 127]. A Scheme may choose per-channel or per-tensor weights,
    and how activation ranges are observed: histogram (the quantizer's own), minmax or
    moving-average (the same observer, swapped into its activation specs). Anything else is an
    error rather than a silently different row."""
    from ..qconfigs import Scheme
    s = Scheme.of(scheme) if scheme is not None else Scheme()
    unsupported = [f"qconfig {s.qconfig!r}" if s.qconfig != "default" else "",
                   f"observer {s.observer!r}" if s.observer not in (None, *ACT_OBSERVERS) else "",
                   f"activation scheme {s.act_scheme!r}" if s.act_scheme not in (None, "affine") else ""]
    unsupported = [u for u in unsupported if u]
    if unsupported:
        raise QuantbenchError(f"XNNPACK's quantizer cannot do {', '.join(unsupported)}: it takes the 'default' "
                              f"qconfig with affine activations observed by {', '.join(ACT_OBSERVERS)}; "
                              "--weight-scheme applies too")
    return {"is_per_channel": (s.weight_scheme or "per-channel") == "per-channel",
            "observer": s.observer or "histogram"}


# activation observers XNNPACK's quantizer can be given (quantbench names -> torchao's observers)
ACT_OBSERVERS = ("histogram", "minmax", "moving-average")


def _quantizer(settings: dict):
    import dataclasses

    # executorch 1.5 keeps XNNPACK's PT2E quantizer beside its backend (torchao's copy is gone)
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e import MinMaxObserver, MovingAverageMinMaxObserver
    config = get_symmetric_quantization_config(is_per_channel=settings["is_per_channel"])
    observer = {"minmax": MinMaxObserver, "moving-average": MovingAverageMinMaxObserver}.get(settings["observer"])
    if observer is not None:  # the same spec (dtype, range, scheme), other ranges
        spec = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=spec, output_activation=spec)
    return XNNPACKQuantizer().set_global(config)


def describe_int8(settings: dict, applied: dict, scheme=None) -> dict:
    """The qconfig recorded in the sidecar: what was asked and the observers really inserted."""
    return {"name": "xnnpack-ptq", "quantizer": "executorch XNNPACKQuantizer",
            "overrides": scheme.overrides() if scheme is not None and hasattr(scheme, "overrides") else {},
            "weight_scheme": "per-channel" if settings["is_per_channel"] else "per-tensor",
            **applied,
            "why": "XNNPACK's int8 kernels take signed int8 activations and symmetric int8 weights"}


# ---------------------------------------------------------------- 2. torch -> .pte
def _capture(model: torch.nn.Module, example: torch.Tensor):
    """torch.export with a dynamic batch dimension up to MAX_BATCH. The example has MAX_BATCH
    images on purpose: after XNNPACK lowering, ExecuTorch sizes the planned input buffer from the
    example's batch (the hint), not from the Dim's upper bound."""
    from torch.export import Dim
    return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))


def _lower(program) -> bytes:
    """Lower everything XNNPACK supports to it; the rest runs on ExecuTorch's portable kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer


def export(model: torch.nn.Module, out_dir: Path, calib_batches: Iterable[torch.Tensor],
           base: FileRecord | dict, scheme=None, options=None) -> list[FileRecord]:
    """Write executorch-fp32.pte and executorch-int8.pte into out_dir; returns their records,
    made from `base` (where the model came from). `scheme` (a quantbench.qconfigs.Scheme or
    None) picks per-channel or per-tensor weights and the observer; XNNPACK's PT2E path has no
    bias correction and ExecuTorch no options here."""
    base = as_record(base)
    et = _require("ExecuTorch export")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from ..qconfigs import graph_observers as applied_observers

    settings = int8_settings(scheme)  # a bad scheme fails before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = calibration_arrays(calib_batches)  # a batch in memory at a time, whatever their number
    example = torch.from_numpy(calib[0][:1]).expand(MAX_BATCH, *calib[0].shape[1:]).contiguous()
    fp32_path, int8_path = out_dir / FP32_FILE, out_dir / INT8_FILE
    common = base.replace(flow=NAME, runtime=NAME, input_shape=list(calib[0].shape[1:]),
                          extra={**base.extra, "backend": "XNNPACK",
                                 "executorch_version": getattr(et, "__version__", None) or _version()})

    model = model.eval()
    try:
        with torch.no_grad():
            fp32 = _lower(_capture(model, example))
            # eval capture: prepare_pt2e folds batch norm into the conv weights before observing
            prepared = prepare_pt2e(_capture(model, example).module(), _quantizer(settings))
            applied = applied_observers(prepared)
            for x in calib:
                prepared(torch.from_numpy(x))
            int8 = _lower(_capture(convert_pt2e(prepared), example))
    except QuantbenchError:
        raise
    except Exception as e:
        raise QuantbenchError(f"ExecuTorch export failed: {cause(e)}") from e
    # each image's output must not depend on its batch-mates: find the largest batch for which
    # that holds (XNNPACK's int8 path has broken it for some models, see _verified_batch)
    try:
        images = torch.from_numpy(calib.first(MAX_BATCH))
        fp32_batch = _verified_batch(fp32, images, "fp32")
        int8_batch = _verified_batch(int8, images, "int8")
    except Exception as e:
        raise QuantbenchError(f"ExecuTorch export failed while checking batches: {cause(e)}") from e
    write_bytes(fp32_path, fp32)
    write_bytes(int8_path, int8)

    # weight_bytes: the whole program; its graph and plan are small beside the weights
    return [common.replace(file=FP32_FILE, label="executorch-fp32", method="origin", dtype="fp32",
                           weight_bytes=len(fp32), extra={**common.extra, **fp32_batch}),
            common.replace(file=INT8_FILE, label="executorch-int8", method="static", dtype="int8",
                           qconfig=describe_int8(settings, applied, scheme),
                           calibration={"samples": calib.samples, "batches": len(calib),
                                        "method": settings["observer"]},
                           weight_bytes=len(int8), extra={**common.extra, **int8_batch})]


def _verified_batch(program: bytes, images: torch.Tensor, what: str) -> dict:
    """The largest batch (MAX_BATCH, halved down to 1) whose outputs equal the same images run
    one at a time, twice in a row; the sidecar's max_batch, which load() splits batches by.

    Why: with executorch 1.5.1, XNNPACK's int8 MobileNetV3-Large gave the right logits at batch
    1-8 and wrong, run-to-run different ones at 16 and 32 (ResNet-18 and MobileNetV2 were right
    at every size). Latency at batch 1 is unaffected; the accuracy pass, which runs batches,
    was not. A batch that fails here is never sent to the program."""
    from executorch.runtime import Runtime
    images = images[:MAX_BATCH].contiguous()  # the first calibration images
    with stderr_silenced(), _experimental_ok():
        method = Runtime.get().load_program(program).load_method("forward")

    def run(x: torch.Tensor) -> torch.Tensor:
        return method.execute([x.contiguous()])[0].clone()

    one = torch.cat([run(x) for x in images.split(1)])
    tol = 1e-3 * float(one.abs().max()) + 1e-5
    failed = {}  # batch -> why it was not kept

    def agrees(batch: int) -> bool:
        try:
            with stderr_silenced():  # a refusal is also logged natively, line by line
                out = torch.cat([run(x) for x in images.split(batch)])
            if float((out - one).abs().max()) <= tol:
                return True
            failed[batch] = "gave outputs that differed from the same images run one at a time"
        except RuntimeError:  # a program exported for smaller batches refuses the input
            failed[batch] = "refused the input"
        return False

    batch = MAX_BATCH
    while batch > len(images):  # only as large a batch as there are images to check it with
        batch //= 2
    while batch > 1 and not (agrees(batch) and agrees(batch)):
        batch //= 2
    record = {"max_batch": batch, "batch_checked": True}
    if batch < MAX_BATCH:
        why = (f"at batch {batch * 2} the {what} program {failed[batch * 2]}" if batch * 2 in failed else
               f"only {len(images)} calibration images to check larger batches with")
        record["max_batch_why"] = f"{why}; larger batches are split into pieces of {batch}"
    return record


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("executorch")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- 3. run it
def _identifier() -> bytes:
    """The flatbuffer file identifier of the programs this ExecuTorch reads (its schema's)."""
    import executorch
    for folder in executorch.__path__:
        with contextlib.suppress(OSError):
            found = re.search(rb'file_identifier\s+"([^"]{4})"', (Path(folder) / "schema" / "program.fbs").read_bytes())
            if found:
                return found[1]
    return b"ET12"


def _check_header(path: Path) -> None:
    """Refuse what is not an ExecuTorch program before its native loader sees it: given other
    bytes, that loader logs them in a message Python cannot decode and the process aborts
    (exit 134, no output). A program is a flatbuffer whose bytes 4-8 are the file identifier."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise QuantbenchError(f"cannot read ExecuTorch program {path}: {e.strerror or e}") from e
    want = _identifier()
    if len(head) < 8 or head[4:8] != want:
        raise QuantbenchError(f"{path} is not an ExecuTorch program (.pte): it does not start with the "
                              f"{want.decode()} flatbuffer header (a damaged or different file?)")


def load(path: Path, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The program's forward method, wrapped to take and return torch tensors.

    `threads` sizes ExecuTorch's thread pool, which XNNPACK runs on. The pool is one per process
    (the bindings' `_unsafe_reset_threadpool`), so the last load's setting holds for every
    ExecuTorch model in the process; the measuring workers load one model each. None keeps
    ExecuTorch's default (one thread per core)."""
    _require("running ExecuTorch models")
    _check_header(Path(path))
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime
    try:
        # the native side logs its CPU probing and pool resets on stderr: not for users
        with stderr_silenced(), _experimental_ok():
            if threads is not None:
                portable_lib._unsafe_reset_threadpool(int(threads))
            method = Runtime.get().load_program(Path(path)).load_method("forward")
    except Exception as e:
        raise QuantbenchError(f"cannot load ExecuTorch program {path}: {cause(e)}") from e
    if method is None:
        raise QuantbenchError(f"{path} has no forward method")

    # the largest batch the program was checked on when it was made; files made before that check
    # (no batch_checked in the sidecar) run one image at a time, the one size known to be right
    rec = read_record(path)
    limit = min(MAX_BATCH, int(rec.get("max_batch") or 1)) if rec.get("batch_checked") else 1

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous()
        outs = [method.execute([piece.contiguous()])[0].clone() for piece in x.split(limit)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    return run


# ---------------------------------------------------------------- 4. what runs where
_FLOAT_KERNELS = {"aten::convolution": "conv", "aten::linear": "linear", "aten::addmm": "linear",
                  "aten::mm": "linear"}
_XNN_NODES = {"XNNConv2d": "conv", "XNNDepthwiseConv2d": "conv", "XNNFullyConnected": "linear"}


def op_counts(path: Path, model=None) -> OpCounts:
    """Convolutions and linears in the program: inside each XNNPACK delegate (int8 when the
    layer's input is a quantized tensor), and as ExecuTorch's portable kernels outside any
    delegate (always float). ExecuTorch has no public reader for delegate payloads, so this uses
    its serializer's readers and the flatc it ships; if they change, the counts are left empty
    (with a warning) rather than failing the benchmark."""
    _require("counting ExecuTorch operators")
    try:
        return _count(Path(path).read_bytes())
    except Exception as e:
        warnings.warn(f"cannot count the operators of {path} ({cause(e)}); leaving them empty")
        return OpCounts()


def _count(data: bytes) -> OpCounts:
    from executorch.exir._serialize._program import deserialize_pte_binary
    program = deserialize_pte_binary(data).program
    counts = OpCounts()
    for plan in program.execution_plan:
        names = [op.name for op in plan.operators]
        for chain in plan.chains:
            for ins in chain.instructions:
                op_index = getattr(ins.instr_args, "op_index", None)  # a KernelCall
                kind = _FLOAT_KERNELS.get(names[op_index]) if op_index is not None else None
                if kind:
                    counts.add(kind, int8=False)
        for delegate in plan.delegates:
            if "xnnpack" not in delegate.id.lower():
                continue
            graph = _xnn_graph(program.backend_delegate_data[delegate.processed.index].data)
            values = graph["xvalues"]
            for node in graph["xnodes"]:
                kind = _XNN_NODES.get(node["xnode_union_type"])
                if kind:
                    src = values[node["xnode_union"]["input1_id"]]
                    counts.add(kind, int8=src["xvalue_union_type"] == "XNNQuantizedTensorValue")
    return counts


def _xnn_graph(blob: bytes) -> dict:
    """An XNNPACK delegate payload (header + flatbuffer + constants) -> its graph as a dict."""
    import executorch.backends.xnnpack.serialization as ser
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _get_flatc_path
    header = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
    flatbuffer = blob[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    schema = Path(list(ser.__path__)[0]) / "schema.fbs"
    with tempfile.TemporaryDirectory(prefix="quantbench-xnn-") as tmp:
        (Path(tmp) / "graph.bin").write_bytes(flatbuffer)  # scratch for flatc, not an output
        subprocess.run([_get_flatc_path(), "--json", "--strict-json", "--defaults-json", "--raw-binary",
                        "-o", tmp, str(schema), "--", os.path.join(tmp, "graph.bin")], check=True, capture_output=True)
        text = (Path(tmp) / "graph.json").read_text()
    # flatc writes clamp bounds as bare inf/nan, which JSON does not have
    return json.loads(re.sub(r"(:\s*)(-?)inf\b", r"\1\2Infinity", text).replace(": nan", ": NaN"))


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("executorch") is not None
