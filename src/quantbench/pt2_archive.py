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

Two more places run something from the file later, when the program is called:
- the input guards (`guards_code`) are Python source that `ExportedProgram.module()` exec()s;
  quantbench's programs have none, so any is refused;
- every graph node calls the operator its target names, and torch's verifier accepts any
  registered operator: `aten.from_file(PATH, shared=True)` followed by `aten.fill_` maps a file
  and overwrites it when the program runs. So the graph may call only what a quantized
  classifier needs (_operator_problem, checked on the file's text before loading and again on
  the loaded graph): operators of the aten, quantized_decomposed and torchao libraries whose
  schema works on tensors and numbers only, and the shape arithmetic torch.export records
  (operator.mul, torch.sym_max...). Refused: any other library or Python callable; a `str`
  argument, unless it is one of the named mode/message arguments of compute ops (gelu's
  approximate, div's rounding_mode, an assertion's message...: _SAFE_STR_ARGS), so file names
  never reach an operator; arguments or results that are storages, futures, dicts, RRefs or
  script objects; operators that return nothing and write into no tensor (printing, warnings,
  seeding, autograd: their only effect is outside the tensors), but for the assertions export
  emits; and by name, whatever else reaches files or global state (_DENIED_OPS). Higher-order
  operators other than the grad-mode/autocast wrappers (whose subgraphs are checked the same
  way) are refused too.
Symbolic expressions are also bounded (numbers, exponents and shifts, length): sympy expands
`3**2**28` exactly, which would hang the load.
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


# Bounds on what an expression may compute: sympy works with exact integers, so `3**2**28` or
# `LShift(1, 2**40)` would keep it busy for hours. Real shape expressions hold sizes and small
# exponents (x**2, sqrt).
_MAX_EXPR_CHARS = 2000
_MAX_NUMBER = 2**63
_MAX_EXPONENT = 64
# the callables whose second argument is an exponent or a shift count
_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"}


def _small_number(node) -> bool:
    """A literal exponent or shift: a number (or Integer(n), Rational(p, q), -n) of at most _MAX_EXPONENT."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _small_number(node.operand)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Integer", "Rational", "Float"):
        return bool(node.args) and not node.keywords and all(_small_number(a) for a in node.args)
    return (isinstance(node, ast.Constant) and type(node.value) in (int, float)
            and abs(node.value) <= _MAX_EXPONENT)


def _safe_expr(text: str, calls: set[str]) -> bool:
    if len(text) > _MAX_EXPR_CHARS:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a number of > 4300 digits
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
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not (
                abs(node.value) <= _MAX_NUMBER):  # also refuses nan
            return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.LShift, ast.RShift)) and not (
                _small_number(node.right)):
            return False
        if isinstance(node, ast.Call) and node.func.id in _POWERS and not (
                len(node.args) == 2 and _small_number(node.args[1])):
            return False
    return True


# Input guards (`guards_code`): Python source that ExportedProgram.module() exec()s. Allowed:
# comparisons and arithmetic over input sizes, as torch prints them (L['x'].size()[0] >= 2).
_GUARD_NODES = _EXPR_NODES + (ast.Subscript, ast.Attribute)
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_MATH = {"floor", "ceil", "trunc", "sqrt", "isnan", "inf"}


def _safe_guard(text: str, calls: set[str]) -> bool:
    # it is pasted into generated source, once inside a "..." message: no quotes, escapes, lines
    if any(c in text for c in '"\\\n\r') or len(text) > _MAX_EXPR_CHARS:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            return False
        if isinstance(node, ast.Name) and not (node.id in ("L", "math") or node.id in calls):
            return False
        if isinstance(node, ast.Attribute) and not (
                node.attr in _GUARD_METHODS and not isinstance(node.value, ast.Name) or
                node.attr in _GUARD_MATH and isinstance(node.value, ast.Name) and node.value.id == "math"):
            return False
        if isinstance(node, ast.Call) and (node.keywords or not (
                isinstance(node.func, ast.Attribute) or isinstance(node.func, ast.Name) and node.func.id in calls)):
            return False
        if isinstance(node, ast.Constant) and not (
                isinstance(node.value, str) and node.value.isidentifier()
                or type(node.value) in (int, float, bool) and abs(node.value) <= _MAX_NUMBER):
            return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.LShift, ast.RShift)) and not (
                _small_number(node.right)):
            return False
    return True


# ---------------------------------------------------------------- which operators a graph may call
_NAMESPACES = ("aten", "quantized_decomposed", "torchao")
# wrappers export puts around a block under torch.no_grad()/autocast; their subgraphs are checked too
_HIGHER_ORDER = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}
# `str` arguments that select a mode of a compute op or carry an assertion's message: never a path
_SAFE_STR_ARGS = {"approximate", "rounding_mode", "reduce", "padding", "mode", "padding_mode", "pad_mode",
                  "padding_side", "side", "indexing", "interpolation", "equation", "norm", "UPLO", "driver", "ord",
                  "p", "assert_msg", "mapping_type"}
# reach files, the terminal, random or autograd state; also caught by the rules below, named here
# so that a schema change cannot let them through
_DENIED_OPS = {"from_file", "save", "_print", "warn", "manual_seed", "seed", "set_grad_enabled", "set", "set_",
               "backward", "_backward", "wait", "record_stream", "_unsafe_set_version_counter"}
# operators that return nothing but only check (export emits them for dynamic shapes)
_CHECKS = {"_assert_async", "_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range",
           "sym_constrain_range_for_size"}
_STR_TYPE = re.compile(r"\bstr\b")
# values that are not tensors, numbers or dtypes: storages (memory by address), futures, dicts,
# remote references, script objects, and generic `Any`/`t` values
_OPAQUE_TYPE = re.compile(r"\b(Storage|Future|Await|RRef|Dict|Any|AnyEnumType|Capsule|Object|t\d*)\b|__torch__")
_OP_TARGET = re.compile(r"torch\.ops\.(\w+)\.(\w+)\.(\w+)")
_HOP_TARGET = re.compile(r"torch\.ops\.higher_order\.(\w+)")


def _shape_ops() -> set:
    """The Python callables torch.export records for shape arithmetic (its serializer's list)."""
    import math
    import operator
    try:
        from torch._export.serde.serialize import _SYM_OPS
    except ImportError:  # pragma: no cover - a torch without it
        _SYM_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.truediv,
                    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.neg,
                    math.trunc, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not}
    return set(_SYM_OPS) | {operator.getitem}


def _qualified(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', fn)}"


def _operator_problem(op) -> str | None:
    """Why the graph may not call `op` (a torch OpOverload), or None when it may."""
    schema = op._schema
    ns, _, name = schema.name.partition("::")
    if ns not in _NAMESPACES:
        return f"belongs to the {ns} library (allowed: {', '.join(_NAMESPACES)})"
    if name in _DENIED_OPS:
        return "reaches outside the program's tensors (files, printing, random or autograd state)"
    for arg in schema.arguments:
        kind = str(arg.type)
        if _STR_TYPE.search(kind) and arg.name not in _SAFE_STR_ARGS:
            return f"takes a string argument ({arg.name}), such as a file name"
        if _OPAQUE_TYPE.search(kind):
            return f"takes a {kind} argument ({arg.name}), not tensors and numbers"
    for ret in schema.returns:
        if _STR_TYPE.search(str(ret.type)) or _OPAQUE_TYPE.search(str(ret.type)):
            return f"returns a {ret.type}, not tensors and numbers"
    writes = any(arg.alias_info is not None and arg.alias_info.is_write for arg in schema.arguments)
    if not schema.returns and not writes and name not in _CHECKS:
        return "returns nothing and writes into no tensor: its only effects are outside the program's tensors"
    return None


def _target_problem(target: str, shape_ops: set[str]) -> str | None:
    """_operator_problem for a node's target as the file names it (before torch resolves it)."""
    if target in shape_ops:
        return None
    if m := _HOP_TARGET.fullmatch(target):
        return None if m[1] in _HIGHER_ORDER else "is a higher-order operator quantbench's programs never use"
    if not (m := _OP_TARGET.fullmatch(target)):
        return "is not an operator of a tensor library (a Python callable)"
    if m[1] not in _NAMESPACES:
        return f"belongs to the {m[1]} library (allowed: {', '.join(_NAMESPACES)})"
    try:
        op = getattr(getattr(getattr(torch.ops, m[1]), m[2]), m[3])
    except (AttributeError, RuntimeError):
        return None  # an operator this torch lacks: torch.export.load fails and says which
    return _operator_problem(op) if isinstance(op, torch._ops.OpOverload) else "is not an operator overload"


def _node_targets(tree) -> Iterator[str]:
    """The target of every graph node in a serialized program, subgraphs included."""
    if isinstance(tree, dict):
        if isinstance(tree.get("target"), str) and "inputs" in tree:
            yield tree["target"]
        for v in tree.values():
            yield from _node_targets(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _node_targets(v)


def _refuse_operator(path, name: str, why: str):
    raise QuantbenchError(f"refusing to load {path}: its graph calls {name}, which {why}; a .pt2 may call only "
                          "the tensor operators a quantized classifier needs")


def check_graph(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """Raise QuantbenchError unless every node of the loaded program (subgraphs included) calls an
    allowed operator (see the module docstring): what will run, checked on the objects themselves."""
    shape_ops = _shape_ops()
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op != "call_function":
                _refuse_operator(path, f"a {node.op} node ({target})", "is not an operator call")
            if isinstance(target, torch._ops.OpOverload):
                why = _operator_problem(target)
            elif isinstance(target, torch._ops.HigherOrderOperator):
                why = None if target.name() in _HIGHER_ORDER else "is a higher-order operator quantbench's programs never use"
            else:
                why = None if target in shape_ops else "is not an operator of a tensor library (a Python callable)"
            if why:
                _refuse_operator(path, str(target) if isinstance(target, torch._ops.OperatorBase) else _qualified(target), why)


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


class _OperatorRefused(Exception):
    """(operator, why), raised inside the entry checks and reported by check_archive."""


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
    except _OperatorRefused as e:
        _refuse_operator(path, *e.args)
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
            model = json.loads(zf.read(root + entry))
            for expr in _expressions(model):
                if not _safe_expr(expr, calls):
                    refuse(f"its graph has the shape expression {expr[:80]!r}, which sympy evaluates as Python "
                           f"(only sympy arithmetic on numbers up to 2**63 and exponents up to {_MAX_EXPONENT})")
            guards = model.get("guards_code") if isinstance(model, dict) else None
            for guard in guards or []:
                if not (isinstance(guard, str) and _safe_guard(guard, calls)):
                    refuse(f"its input guards hold {str(guard)[:80]!r}, Python source that "
                           "ExportedProgram.module() executes")
            shape_ops = {_qualified(fn) for fn in _shape_ops()}
            for target in _node_targets(model):
                if why := _target_problem(target, shape_ops):
                    raise _OperatorRefused(target.removeprefix("torch.ops."), why)


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
    """torch.export.load, for files that pass check_archive and whose loaded graph passes
    check_graph; any failure is one QuantbenchError."""
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
            program = torch.export.load(io.BytesIO(data))
        except Exception as e:
            # torch.export.load logs the first failure and then raises a generic one.
            cause = next((r.exc_info[1] for r in records if r.exc_info and r.exc_info[1]), e)
            reason = (str(cause).strip().splitlines() or [""])[0]
            reason = reason if len(reason) <= 300 else reason[:300] + "..."
            raise QuantbenchError(f"cannot load torch.export program {path}: "
                                  f"{type(cause).__name__}: {reason}") from e
    check_graph(program, path)
    return program


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
