""".pt2 files: loading one never runs code from it, and saving one is byte-reproducible.

The attacks are real ones: each test first shows that plain torch.export.load of the crafted
archive runs its payload (which only creates a marker file in tmp_path), then that
load_program refuses the same archive and the marker never appears."""
from __future__ import annotations

import contextlib
import io
import json
import zipfile

import pytest
import torch
from torch import nn
from torch.export import Dim

from quantbench.errors import QuantbenchError
from quantbench.pt2_archive import load_program, save_program


def quantized_program() -> torch.export.ExportedProgram:
    """A tiny PT2E int8 program built as quantbench's pt2e flow builds one (dynamic batch)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (quantized_decomposed ops)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    batch = ({0: Dim("batch")},)
    graph = torch.export.export(model, (x,), dynamic_shapes=batch).module()
    prepared = prepare_pt2e(graph, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    prepared(x)
    return torch.export.export(convert_pt2e(prepared), (x,), dynamic_shapes=batch)


@pytest.fixture(scope="module")
def program():
    return quantized_program()


@pytest.fixture
def saved(program, tmp_path):
    path = tmp_path / "model.pt2"
    save_program(program, path)
    return path


def rewrite(src, dst, change) -> None:
    """Copy the zip `src` to `dst`, with change(entry, data) -> new data (None drops the entry)
    for every entry (named without the archive's root folder), and change.extra added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0] + "/"
        for name in zin.namelist():
            data = change(name[len(root):], zin.read(name))
            if data is not None:
                zout.writestr(name, data)
        for entry, data in getattr(change, "extra", {}).items():
            zout.writestr(root + entry, data)


class Payload:
    """Unpickles by evaluating `code` after creating the marker file."""

    def __init__(self, marker, code):
        self.marker, self.code = marker, code

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close() or {self.code}",)


def pickled(marker, code) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(marker, code), buf)
    return buf.getvalue()


def pickled_weight(saved, tmp_path, marker):
    """An archive whose first float weight is a pickle (use_pickle) that returns the right tensor."""
    def change(entry, data):
        if entry == "data/weights/model_weights_config.json":
            config = json.loads(data)
            name, meta = next((k, v) for k, v in config["config"].items() if v["tensor_meta"]["dtype"] == 7)
            shape = [s["as_int"] for s in meta["tensor_meta"]["sizes"]]
            meta.update(use_pickle=True, path_name="weight_99")
            change.extra["data/weights/weight_99"] = pickled(marker, f"__import__('torch').zeros({shape})")
            return json.dumps(config)
        return data
    change.extra = {}
    evil = tmp_path / "evil.pt2"
    rewrite(saved, evil, change)
    return evil


def pickled_inputs(saved, tmp_path, marker):
    """An archive whose example inputs are a pickle that weights-only loading refuses."""
    code = "((__import__('torch').zeros(2, 3, 8, 8),), {})"
    evil = tmp_path / "evil.pt2"
    rewrite(saved, evil, lambda entry, data: pickled(marker, code) if entry == "data/sample_inputs/model.pt" else data)
    return evil


def shape_expression(saved, tmp_path, marker):
    """An archive whose symbolic batch size is a Python expression with a side effect."""
    def walk(tree):
        if isinstance(tree, dict):
            return {k: (f"open({str(marker)!r}, 'w').close() or {v}" if k == "expr_str" else walk(v))
                    for k, v in tree.items()}
        return [walk(v) for v in tree] if isinstance(tree, list) else tree

    def change(entry, data):
        if entry == "models/model.json":
            assert b'"expr_str"' in data  # the dynamic batch size
            return json.dumps(walk(json.loads(data)))
        return data
    evil = tmp_path / "evil.pt2"
    rewrite(saved, evil, change)
    return evil


ATTACKS = {"pickled weight": (pickled_weight, "stored as a pickled object"),
           "pickled example inputs": (pickled_inputs, "example inputs .* weights-only loading rejects"),
           "shape expression": (shape_expression, "shape expression .* which sympy evaluates as Python")}


@pytest.mark.parametrize("attack", ATTACKS)
def test_plain_torch_export_load_runs_the_payload(attack, saved, tmp_path):
    """The crafted archives are real attacks: torch.export.load runs them."""
    marker = tmp_path / "ran"
    evil = ATTACKS[attack][0](saved, tmp_path, marker)
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    with contextlib.suppress(Exception):  # whether the load then succeeds does not matter
        torch.export.load(evil)
    assert marker.exists()


@pytest.mark.parametrize("attack", ATTACKS)
def test_load_program_refuses_before_anything_runs(attack, saved, tmp_path):
    marker = tmp_path / "ran"
    make, reason = ATTACKS[attack]
    evil = make(saved, tmp_path, marker)
    with pytest.raises(QuantbenchError, match=f"refusing to load {evil}: .*{reason}.*would run it as code"):
        load_program(evil)
    assert not marker.exists()


@pytest.mark.parametrize("extra", ["data/aotinductor/model/model.so", "data/weights/model.pt",
                                   "data/constants/opaque_obj_0", "archive/models/model.json"])
def test_entries_torch_would_execute_or_that_are_unknown_are_refused(extra, saved, tmp_path):
    evil = tmp_path / "evil.pt2"

    def keep(entry, data):
        return data
    keep.extra = {extra: b"\x7fELF"}
    rewrite(saved, evil, keep)
    with pytest.raises(QuantbenchError, match=f"refusing to load .*it carries {extra} "):
        load_program(evil)


def test_duplicate_entries_are_refused(saved, tmp_path):
    # torch's reader finds names ignoring case and may not pick the copy zipfile reads.
    evil = tmp_path / "evil.pt2"

    def keep(entry, data):
        return data
    keep.extra = {"data/weights/MODEL_weights_config.json": b'{"config": {}}'}
    rewrite(saved, evil, keep)
    with pytest.raises(QuantbenchError, match="two entries of the same name"):
        load_program(evil)


def test_a_saved_program_loads_and_runs(program, saved):
    loaded = load_program(saved)
    x = torch.randn(5, 3, 8, 8)  # another batch size: the batch stayed dynamic
    assert torch.equal(loaded.module()(x), program.module()(x))


def test_not_an_archive_is_one_line_and_torch_stays_quiet(tmp_path, capfd):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(QuantbenchError) as e:
        load_program(junk)
    assert str(e.value) == f"{junk} is not a torch.export program (.pt2): File is not a zip file"
    script = tmp_path / "script.pt2"  # a TorchScript file under the wrong suffix
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(script))
    with pytest.raises(QuantbenchError, match=f"^{script} is not a torch.export program .*TorchScript"):
        load_program(script)
    with pytest.raises(QuantbenchError, match="cannot read .*missing.pt2: No such file"):
        load_program(tmp_path / "missing.pt2")
    assert capfd.readouterr().err == ""


def test_torch_failures_are_one_line_with_the_reason(saved, tmp_path, capfd):
    # An operator this torch does not have: torch.export.load logs ~20 lines and then raises a
    # generic error; load_program keeps the log out and reports the first failure instead.
    bad = tmp_path / "bad.pt2"
    rewrite(saved, bad, lambda entry, data: data.replace(b"aten.relu.default", b"aten.nosuchop.default")
            if entry == "models/model.json" else data)
    with pytest.raises(QuantbenchError) as e:
        load_program(bad)
    msg = str(e.value)
    assert msg.startswith(f"cannot load torch.export program {bad}: ") and "\n" not in msg
    assert "nosuchop" in msg
    assert "Traceback" not in capfd.readouterr().err


def test_saves_are_byte_reproducible(tmp_path):
    # Two separately built programs (different graph objects, so different id()s in the
    # provenance metadata) saved under different names give the same bytes.
    a, b = tmp_path / "a.pt2", tmp_path / "b.pt2"
    first = quantized_program()
    save_program(first, a)
    save_program(quantized_program(), b)
    assert a.read_bytes() == b.read_bytes()
    assert any("from_node" in n.meta for n in first.graph.nodes)  # the caller's program is unchanged


def test_shape_expressions_of_real_models_pass_and_calls_outside_sympy_do_not():
    """vit_tiny's exported graph has `Mul(Integer(576), Symbol('s77', ...))` (batch x 576 in a
    reshape): sympy arithmetic is allowed; anything that would call or import something else is not."""
    from quantbench.pt2_archive import _safe_expr, _sympy_calls
    calls = _sympy_calls()
    assert _safe_expr("Mul(Integer(576), Symbol('s77', positive=True, integer=True))", calls)
    assert _safe_expr("Add(Pow(Symbol('s0', integer=True), Integer(2)), Integer(1))", calls)
    for bad in ("Mul(__import__('os').system('x'))", "Mul(Integer(1)).__class__", "eval('1')",
                "Symbol('a b')"):
        assert not _safe_expr(bad, calls), bad


def from_file_program(victim) -> torch.export.ExportedProgram:
    """A real program whose graph also maps `victim` (aten.from_file, shared) and fills its first
    16 bytes with 'A' (aten.fill_) when it runs, beside a normal Linear's output."""
    program = torch.export.export(nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    graph = program.graph
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        mapped = graph.call_function(torch.ops.aten.from_file.default, (str(victim), True, 16), {"dtype": torch.uint8})
        filled = graph.call_function(torch.ops.aten.fill_.Scalar, (mapped, 65))
    fake = next(n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)).fake_mode
    with fake:
        mapped.meta["val"] = filled.meta["val"] = torch.empty(16, dtype=torch.uint8)
    program.graph_module.recompile()
    return program


def test_an_operator_that_writes_files_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("0123456789abcdef-rest")
    evil = tmp_path / "evil.pt2"
    buf = io.BytesIO()
    torch.export.save(from_file_program(victim), buf)
    evil.write_bytes(buf.getvalue())
    # a real attack: plain torch loads it and running the program overwrites the file
    torch.export.load(evil).module()(torch.randn(2, 4))
    assert victim.read_text() == "A" * 16 + "-rest"
    victim.write_text("0123456789abcdef-rest")
    with pytest.raises(QuantbenchError) as e:
        load_program(evil)
    msg = str(e.value)
    assert msg.startswith(f"refusing to load {evil}: its graph calls aten.from_file.default, ") and "\n" not in msg
    assert victim.read_text() == "0123456789abcdef-rest"


def test_the_loaded_graph_is_checked_too(tmp_path):
    """check_graph looks at the operator objects torch resolved, whatever the file's text said."""
    from quantbench.pt2_archive import check_graph
    with pytest.raises(QuantbenchError, match="its graph calls aten.from_file.default, which reaches outside"):
        check_graph(from_file_program(tmp_path / "v"), "x.pt2")


@pytest.mark.parametrize("target,why", [
    ("torch.os.system", "not an operator of a tensor library"),  # a Python callable torch would call
    ("torch.ops.aten._print.default", "reaches outside"),
    ("torch.ops.aten.save.default", "reaches outside"),
    ("torch.ops.aten.warn.default", "reaches outside"),
    ("torch.ops.prims.add.default", "belongs to the prims library"),
    ("torch.ops.higher_order.while_loop", "higher-order operator"),
    ("torch.ops.aten.add.str", "takes a string argument"),
])
def test_operators_outside_the_allow_list_are_refused_before_loading(saved, tmp_path, target, why):
    evil = tmp_path / "evil.pt2"
    rewrite(saved, evil, lambda entry, data: data.replace(b'"torch.ops.aten.relu.default"', f'"{target}"'.encode())
            if entry == "models/model.json" else data)
    with pytest.raises(QuantbenchError, match=f"refusing to load .*its graph calls {target.removeprefix('torch.ops.')}, "
                                              f"which .*{why}"):
        load_program(evil)


def test_what_the_operator_check_allows():
    from quantbench.pt2_archive import _operator_problem
    aten, qd = torch.ops.aten, torch.ops.quantized_decomposed
    for op in (aten.conv2d.default, aten.gelu.default, aten.div.Tensor_mode, aten.scaled_dot_product_attention.default,
               aten.add_.Tensor, aten._assert_scalar.default, aten.sym_size.int, qd.quantize_per_tensor.default,
               qd.dequantize_per_channel.default, qd.choose_qparams.tensor):
        assert _operator_problem(op) is None, op
    for op in (aten.from_file.default, aten.set_.source_Storage, aten.manual_seed.default, aten._print.default,
               aten.split.str):
        assert _operator_problem(op), op


def guards_code(saved, tmp_path, marker):
    """An archive whose input guards are Python source with a side effect."""
    def change(entry, data):
        if entry == "models/model.json":
            model = json.loads(data)
            model["guards_code"] = [f"open({str(marker)!r}, 'w').close() or True"]
            return json.dumps(model)
        return data
    evil = tmp_path / "evil.pt2"
    rewrite(saved, evil, change)
    return evil


def test_input_guards_with_code_are_refused(saved, tmp_path):
    marker = tmp_path / "ran"
    evil = guards_code(saved, tmp_path, marker)
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    torch.export.load(evil).module()(torch.randn(2, 3, 8, 8))  # plain torch: the module runs the guard source
    assert marker.exists()
    marker.unlink()
    with pytest.raises(QuantbenchError, match="refusing to load .*its input guards hold .*executes"):
        load_program(evil)
    assert not marker.exists()
    from quantbench.pt2_archive import _safe_guard, _sympy_calls
    assert _safe_guard("L['x'].size()[0] >= 2", _sympy_calls())
    assert _safe_guard("(L['x'].size()[0]) % 576 == 0 and L['x'].size()[1] <= 2**10", _sympy_calls())
    for bad in ("L['x'].__class__", "L['x'].size()[0] == 2\" + str(1) + \"", "L['x'].size()[0] >= 3**2**28"):
        assert not _safe_guard(bad, _sympy_calls()), bad


def test_shape_expressions_are_bounded():
    """`3**2**28` is an exact integer of 400 million bits: sympy would hang loading it."""
    from quantbench.pt2_archive import _safe_expr, _sympy_calls
    calls = _sympy_calls()
    for bomb in ("s0 + 0*3**2**28", "Add(Symbol('s0'), Mul(Integer(0), Pow(Integer(3), Pow(Integer(2), Integer(28)))))",
                 "LShift(Integer(1), Integer(1099511627776))", "s0 + " + "9" * 30, "s0 + 1" * 1000):
        assert not _safe_expr(bomb, calls), bomb[:60]
    assert _safe_expr("Pow(Symbol('s0', integer=True), Rational(1, 2)) + 2**10 - s0**-1", calls)


def test_an_expression_bomb_is_refused_at_once(saved, tmp_path):
    evil = tmp_path / "evil.pt2"

    def walk(tree):
        if isinstance(tree, dict):
            return {k: (f"{v} + 0*3**2**28" if k == "expr_str" else walk(v)) for k, v in tree.items()}
        return [walk(v) for v in tree] if isinstance(tree, list) else tree
    rewrite(saved, evil, lambda entry, data: json.dumps(walk(json.loads(data))) if entry == "models/model.json" else data)
    with pytest.raises(QuantbenchError, match=r"refusing to load .*shape expression .*3\*\*2\*\*28"):
        load_program(evil)
