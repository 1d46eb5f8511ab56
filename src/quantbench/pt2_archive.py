"""torch.export programs (.pt2) saved reproducibly and loaded without running code from the file.

torch.export.load trusts its file (its documentation says: never load one from an untrusted
source). In torch 2.14 a .pt2 can make it run code in five places:
- weights and constants marked `use_pickle` in data/*/MODEL_*_config.json (tensor subclasses,
  custom and opaque objects) are unpickled with weights_only=False, or with plain pickle.loads;
- the example inputs (data/sample_inputs/MODEL.pt) load weights-only, but when that fails torch
  retries with weights_only=False, so a pickle that weights-only refuses runs anyway;
- the legacy whole-state-dict files (data/weights/MODEL.pt, data/constants/MODEL.pt) go the same way;
- the symbolic shape expressions in the graph (`expr_str`, the dynamic batch size) are parsed
  with sympy.sympify, which is Python's eval;
- AOTInductor entries (data/aotinductor/) are shared libraries, which it loads.
What quantbench writes (a PT2E graph with plain tensors and a dynamic batch) needs none of them
but the symbolic expressions, so load_program reads the file once, checks the archive (every
entry, every payload, every expression), and only then hands those same bytes to torch.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from .errors import QuantbenchError
from .fileio import write_bytes

# Everything torch.export.save writes for a program; anything else is refused.
_ENTRIES = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                      r"|models/[^/]+\.json|data/sample_inputs/[^/]+\.pt|extra/.+"
                      r"|data/weights/(weight_\d+|[^/]+_weights_config\.json)"
                      r"|data/constants/(tensor_\d+|[^/]+_constants_config\.json)")
_PAYLOADS = re.compile(r"(weight|tensor)_\d+")  # raw tensor bytes (not custom_obj_, opaque_obj_)

# The functions a symbolic shape expression may call: sympy's and torch's own sympy functions.
# No attribute access, no other calls: sympify evaluates the text as Python.
_SYMPY_CALLS = {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Eq", "Ne", "Lt", "Le",
                "Gt", "Ge", "And", "Or", "Not", "Mod", "floor", "ceiling", "Abs", "Piecewise", "sqrt"}
_EXPR_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.Tuple,
               ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop,
               ast.cmpop, ast.boolop)
# Loggers torch.export.load reports its own failures on, each with a traceback.
_TORCH_LOGGERS = ("torch.export", "torch._export", "torch._export.serde.serialize")


def _sympy_calls() -> set[str]:
    import sympy
    import torch.utils._sympy.functions as functions
    return _SYMPY_CALLS | {name for name, v in vars(functions).items()
                           if isinstance(v, type) and issubclass(v, sympy.Basic)}


def _safe_expr(text: str, calls: set[str]) -> bool:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            return False
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in calls):
            return False
        if isinstance(node, ast.keyword) and node.arg is None:  # f(**x)
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.isidentifier():
            return False
    return True


def _expressions(tree) -> Iterator[str]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "expr_str" and isinstance(v, str):
                yield v
            else:
                yield from _expressions(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _expressions(v)


def check_archive(data: bytes, path: str | os.PathLike) -> None:
    """Raise QuantbenchError unless `data` is a torch.export archive that loads without running
    anything from it (see the module docstring)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise QuantbenchError(f"{path} is not a torch.export program (.pt2): {e}") from e
    root = names[0].split("/")[0] + "/" if names else ""
    entries = [n[len(root):] for n in names if n.startswith(root)]
    if len(entries) != len(names) or "archive_format" not in entries or zf.read(root + "archive_format") != b"pt2":
        raise QuantbenchError(f"{path} is not a torch.export program (.pt2): its archive has no "
                              "archive_format 'pt2' (a TorchScript or torch.save file?)")

    def refuse(what: str):
        raise QuantbenchError(f"refusing to load {path}: {what} (torch.export.load would run it as "
                              "code); only load .pt2 files from sources you trust")

    # torch's zip reader looks names up ignoring case and may pick another copy of a name than
    # Python's zipfile does: then what is checked here would not be what torch loads.
    if len({n.lower() for n in names}) != len(names):
        refuse("it holds two entries of the same name")
    for entry in entries:
        if not _ENTRIES.fullmatch(entry):
            refuse(f"it carries {entry} (not plain tensors: pickled objects or native code)")
    try:
        _check_entries(zf, root, entries, refuse)
    except (ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, OSError) as e:
        raise QuantbenchError(f"{path} is a damaged torch.export program (.pt2): {type(e).__name__}: {e}") from e


def _check_entries(zf: zipfile.ZipFile, root: str, entries: list[str], refuse) -> None:
    for entry in entries:
        if entry.endswith("_config.json"):
            for name, meta in json.loads(zf.read(root + entry))["config"].items():
                if meta.get("use_pickle") is not False or not _PAYLOADS.fullmatch(str(meta.get("path_name"))):
                    refuse(f"its {name!r} is stored as a pickled object")
        elif entry.startswith("data/sample_inputs/"):
            try:  # what torch tries first; when this fails, it unpickles without weights_only
                torch.load(io.BytesIO(zf.read(root + entry)), weights_only=True)
            except Exception:
                refuse(f"its example inputs {entry} are pickled objects that weights-only loading rejects")
        elif entry.startswith("models/"):
            calls = _sympy_calls()
            for expr in _expressions(json.loads(zf.read(root + entry))):
                if not _safe_expr(expr, calls):
                    refuse(f"its graph has the shape expression {expr[:80]!r}, which sympy evaluates as Python")


@contextlib.contextmanager
def _torch_logs_kept() -> Iterator[list[logging.LogRecord]]:
    """Keep torch.export's log records out of the terminal (a failed load logs a whole traceback
    before raising a generic error), but keep them: they hold the real reason for the failure."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    saved = []
    for name in _TORCH_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers, logger.propagate))
        logger.handlers, logger.propagate = [Keep(logging.WARNING)], False
    try:
        yield records
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """torch.export.load, for files that pass check_archive; any failure is one QuantbenchError."""
    # The quantize/dequantize ops live in torch's "quantized_decomposed" library, which plain
    # `import torch` does not register; torch.export.load needs them to rebuild the graph.
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    path = Path(path)
    try:
        data = path.read_bytes()  # once: the bytes checked are the bytes loaded
    except OSError as e:
        raise QuantbenchError(f"cannot read {path}: {e.strerror or e}") from e
    check_archive(data, path)
    with _torch_logs_kept() as records:
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception as e:
            # torch.export.load logs the first failure and then raises a generic one.
            cause = next((r.exc_info[1] for r in records if r.exc_info and r.exc_info[1]), e)
            reason = (str(cause).strip().splitlines() or [""])[0]
            reason = reason if len(reason) <= 300 else reason[:300] + "..."
            raise QuantbenchError(f"cannot load torch.export program {path}: "
                                  f"{type(cause).__name__}: {reason}") from e


@contextlib.contextmanager
def _without_provenance(program: torch.export.ExportedProgram) -> Iterator[None]:
    """Take node.meta["from_node"] out of the graph for the block. It records which graph each
    node came from by the graph's id(), a memory address, so it differs from run to run; it is
    debugging information that running the program never reads."""
    removed = []
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if "from_node" in node.meta:
                    removed.append((node, node.meta.pop("from_node")))
    try:
        yield
    finally:
        for node, value in removed:
            node.meta["from_node"] = value


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """torch.export.save, atomically and reproducibly: the same program gives the same bytes
    (in memory the archive's root folder is always "archive", not the file's name)."""
    buf = io.BytesIO()
    with _without_provenance(program):
        torch.export.save(program, buf)
    write_bytes(path, buf.getbuffer())
