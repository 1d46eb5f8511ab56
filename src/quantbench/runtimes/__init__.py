"""Registry of runtimes: what runs a deployment file, by its suffix.

A runtime is one module in this package that declares (see `Runtime` below):

    NAME                        the name in tables, sidecars and `--runtimes` ("torchscript", ...)
    SUFFIXES                    the file suffixes it reads (".pt", ...)
    files(path)                 every file the model consists of (OpenVINO: FILE.xml + FILE.bin)
    load(path, threads)         -> callable: float tensor (N, C, H, W), normalized -> logits
    op_counts(path, model)      -> OpCounts: int8 vs float conv/linear in what really runs
    how_to_load(name)           -> the line of code that loads such a file without quantbench
and optionally
    profile_ops(path, calls, threads, model, input_shape) -> {operator: (seconds, count)}
    export(model, out_dir, calib_batches, base, scheme=None, options=None) -> [FileRecord]
                                comparison rows from an fp32 model: writes its FILES into out_dir
                                and returns their records, made from `base` (a record.FileRecord
                                saying where the model came from; quantbench.deploy writes the
                                sidecars). `scheme` (a qconfigs.Scheme) maps the torch flows'
                                observer / weight / activation choices onto the runtime's own
                                calibration (None: the runtime's defaults); `options` is an
                                instance of its Options (None: defaults)
    FILES                       the names export() writes (replicate --resume reuses them): the fp32
                                file first, then the int8 file, then any other rows (bf16)
    skipped_files()             -> {name in FILES: why}: files export() does not make on this
                                machine (bf16 rows on a CPU without bf16), with a one-line reason
                                that replicate prints once and reports
    MAKES_INT8                  False for an exporter whose rows hold no int8 file (tune, which
                                searches int8 files, leaves it out); True when absent
    MAX_CALIB_SAMPLES           the most calibration images its calibrators take (they keep them all)
    available()                 -> True when the packages it needs are installed (else its rows are
                                skipped by `--runtimes auto` and tune)
    Options                     a frozen dataclass: the runtime's own options. Each field has a
                                default and metadata {"help": ..., "alias": "--old-flag"}; it checks
                                itself in __post_init__. The CLI offers each field as
                                --NAME-FIELD on quantize, replicate and tune, the sidecar records
                                the values used (record.options), and `--resume` compares them.
    resolve_options(options, pruned) -> Options    fill defaults that depend on the model
    building(options)           a context manager the flows quantize and export under
    record_fields(options)      -> {record field: value} this runtime adds to its files' records

A flow names the runtime its files run on (flow.RUNTIME), so quantize, bench, profile and
replicate find everything here. Adding a runtime is one module plus one entry in RUNTIMES;
tests/test_conformance.py checks every entry against the `Runtime` protocol.
Outside the package: QUANTBENCH_RUNTIMES="name=package.module,other=..." (read on every lookup,
so the measuring subprocesses see the same plug-ins).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..errors import QuantbenchError

Model = Callable[[torch.Tensor], torch.Tensor]

# name -> module; the order is the order of comparison rows in a report.
RUNTIMES: dict[str, str] = {
    "torchscript": "quantbench.runtimes.torchscript",
    "inductor": "quantbench.runtimes.inductor",
    "onnxruntime": "quantbench.runtimes.onnxrt",
    "openvino": "quantbench.runtimes.openvino",
    "executorch": "quantbench.runtimes.executorch",
}
# Earlier spellings accepted by --runtimes.
ALIASES = {"onnxrt": "onnxruntime"}


@runtime_checkable
class Runtime(Protocol):
    """What every runtime module provides (modules satisfy it structurally)."""
    NAME: str
    SUFFIXES: Sequence[str]

    def files(self, path: Path) -> list[Path]: ...
    def load(self, path: Path, threads: int | None = None) -> Model: ...
    def op_counts(self, path: Path, model=None): ...
    def how_to_load(self, name: str) -> str: ...


OPTIONAL = ("export", "FILES", "profile_ops", "MAX_CALIB_SAMPLES", "available", "Options", "resolve_options",
            "building", "record_fields", "is_deployment", "skipped_files", "MAKES_INT8")  # attributes a runtime may add


def registry() -> dict[str, str]:
    """RUNTIMES plus the plug-ins named in QUANTBENCH_RUNTIMES."""
    reg = dict(RUNTIMES)
    for entry in filter(None, os.environ.get("QUANTBENCH_RUNTIMES", "").split(",")):
        name, _, module = entry.partition("=")
        reg[name.strip()] = module.strip()
    return reg


def get(name: str) -> ModuleType:
    reg = registry()
    name = ALIASES.get(name, name)
    if name not in reg:
        raise QuantbenchError(f"unknown runtime {name!r}; choose from {', '.join(reg)}")
    return importlib.import_module(reg[name])


def for_path(path: str | os.PathLike) -> ModuleType:
    """The runtime that reads this file (by suffix); the file must exist."""
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"model file not found: {path}")
    suffixes = {}
    for name in registry():
        mod = get(name)
        for s in mod.SUFFIXES:
            suffixes.setdefault(s, mod)
    if path.suffix not in suffixes:
        raise QuantbenchError(f"don't know how to run {path.name}; known kinds: {', '.join(suffixes)}")
    return suffixes[path.suffix]


def deployment_kind(path: str | os.PathLike) -> str | None:
    """The runtime NAME if `path` is a deployment file, else None: by content for runtimes that
    can tell (`is_deployment`, e.g. TorchScript, whose .pt other files share), by suffix otherwise."""
    path = Path(path)
    for name in registry():
        mod = get(name)
        sniff = getattr(mod, "is_deployment", None)
        if sniff(path) if sniff is not None else path.suffix in mod.SUFFIXES:
            return mod.NAME
    return None


def load(path: str | os.PathLike, threads: int | None = None) -> Model:
    """Load any deployment file into a callable, with the runtime its suffix names."""
    return for_path(path).load(Path(path), threads)


def exporters(int8: bool = False) -> list[str]:
    """Runtimes that can make their own files from an fp32 model (comparison rows); with `int8`,
    only those whose rows include an int8 file."""
    return [name for name in registry() if hasattr(get(name), "export")
            and (not int8 or getattr(get(name), "MAKES_INT8", True))]


def skipped_files(name: str) -> dict[str, str]:
    """{file name: why} for the FILES runtime `name` does not make on this machine."""
    hook = getattr(get(name), "skipped_files", None)
    return dict(hook()) if hook is not None else {}


def made_files(name: str) -> tuple[str, ...]:
    """The FILES runtime `name`'s exporter makes on this machine."""
    skip = skipped_files(name)
    return tuple(f for f in get(name).FILES if f not in skip)


def available(name: str) -> bool:
    """Whether runtime `name` can run here (its optional packages are installed)."""
    check = getattr(get(name), "available", None)
    return bool(check()) if check is not None else True


def options_class(name: str):
    """The runtime's Options dataclass, or None."""
    return getattr(get(name), "Options", None)


def make_options(name: str, values=None):
    """An instance of runtime `name`'s Options from a mapping (or an instance; None: defaults),
    checked; None for a runtime without options."""
    cls = options_class(name)
    if cls is None:
        if values:
            raise QuantbenchError(f"runtime {name!r} takes no options, got {', '.join(values)}")
        return None
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    bad = [k for k in values if k not in known]
    if bad:
        raise QuantbenchError(f"unknown option{'s' if len(bad) > 1 else ''} {', '.join(bad)} for runtime {name}; "
                              f"it takes {', '.join(sorted(known)) or 'none'}")
    return cls(**values)


def check_options(options) -> dict:
    """{runtime name: its Options instance} from {runtime name: mapping or instance}, checked."""
    if not isinstance(options, Mapping):
        raise QuantbenchError(f"runtime options must be a mapping of runtime name to options, not {options!r}")
    out = {}
    for name, values in options.items():
        name = ALIASES.get(name, name)
        opts = make_options(name, values)
        if opts is not None:
            out[name] = opts
    return out


def with_options() -> list[str]:
    """Runtimes that declare options of their own."""
    return [name for name in registry() if options_class(name) is not None]


def check_exporters(names, int8: bool = False) -> tuple[str, ...]:
    """Runtime names (aliases resolved) that each make files from an fp32 model (with `int8`: an
    int8 file among them); one line otherwise."""
    names = tuple(ALIASES.get(n, n) for n in names)
    for name in names:
        if not hasattr(get(name), "export"):
            raise QuantbenchError(f"runtime {name!r} makes no files from an fp32 model (no comparison rows); "
                                  f"choose from {', '.join(exporters())}")
        if int8 and not getattr(get(name), "MAKES_INT8", True):
            raise QuantbenchError(f"runtime {name!r} makes no int8 file; choose from {', '.join(exporters(int8=True))}")
    return names
