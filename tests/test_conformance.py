"""Every registered flow and runtime provides what its Protocol declares, with the declared
parameters. Adding a flow or runtime is one module plus one registry line; this test says what
the new module lacks."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from pathlib import Path

import pytest

from quantbench import deploy, flows, runtimes
from quantbench.flows import FLOWS, METHODS, Flow
from quantbench.runtimes import OPTIONAL, Runtime

SUPPORT = Path(__file__).parent / "support"
# test-only runtimes, registered the way a user plugs one in (QUANTBENCH_RUNTIMES)
PLUGINS = "sleepy=support.sleepy,fake=support.fakert"


def problems(module, protocol) -> list[str]:
    """What `module` lacks of `protocol`: missing members, and functions whose parameters differ."""
    out = []
    for name, declared in vars(protocol).items():
        if name.startswith("_"):
            continue
        if not hasattr(module, name):
            out.append(f"missing {name}")
        elif inspect.isfunction(declared):
            want = [p for p in inspect.signature(declared).parameters if p != "self"]
            got = list(inspect.signature(getattr(module, name)).parameters)
            if got[:len(want)] != want:
                out.append(f"{name}{tuple(got)} should take {tuple(want)}")
    for name in protocol.__annotations__:
        if not hasattr(module, name):
            out.append(f"missing {name}")
    return sorted(set(out))


@pytest.mark.parametrize("name", list(FLOWS))
def test_flow_conforms(name):
    mod = flows.get_flow(name)
    assert problems(mod, Flow) == []
    assert isinstance(mod, Flow)
    assert set(mod.METHODS) <= set(METHODS)
    assert mod.RUNTIME in runtimes.registry(), f"{name} deploys to an unregistered runtime {mod.RUNTIME!r}"
    assert deploy.suffix(name) in runtimes.get(mod.RUNTIME).SUFFIXES


def _all_runtimes(monkeypatch) -> list[str]:
    monkeypatch.syspath_prepend(str(SUPPORT.parent))
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", PLUGINS)
    return list(runtimes.registry())


@pytest.mark.parametrize("name", list(runtimes.RUNTIMES) + ["sleepy", "fake"])
def test_runtime_conforms(name, monkeypatch):
    assert name in _all_runtimes(monkeypatch)
    mod = runtimes.get(name)
    assert problems(mod, Runtime) == []
    assert isinstance(mod, Runtime)
    assert mod.NAME == name, "the registry key is the runtime's NAME"
    assert mod.SUFFIXES and all(s.startswith(".") for s in mod.SUFFIXES)
    if hasattr(mod, "export"):
        params = inspect.signature(mod.export).parameters
        assert list(params)[:4] == ["model", "out_dir", "calib_batches", "base"]
        # deploy passes the calibration choices and the runtime's options by keyword
        assert params["scheme"].default is None and params["options"].default is None
        assert mod.FILES, "an exporter declares the FILES it writes (replicate --resume reuses them)"
        assert callable(getattr(mod, "available", None)), "an exporter says whether its packages are installed"
    options = getattr(mod, "Options", None)
    if options is not None:  # the runtime's own options: a frozen dataclass, every field with a default and help
        assert dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen
        for f in dataclasses.fields(options):
            assert f.default is not dataclasses.MISSING and f.metadata.get("help"), f"{name}: option {f.name}"
        options()  # the defaults are valid
    if hasattr(mod, "profile_ops"):
        assert list(inspect.signature(mod.profile_ops).parameters) == ["path", "calls", "threads", "model",
                                                                       "input_shape"]
    assert set(OPTIONAL) >= {"export", "FILES", "profile_ops", "Options", "available"}


def test_suffixes_are_unambiguous(monkeypatch):
    seen: dict[str, str] = {}
    for name in _all_runtimes(monkeypatch):
        for s in runtimes.get(name).SUFFIXES:
            assert s not in seen, f"{s} is read by both {seen[s]} and {name}"
            seen[s] = name


def test_a_plugged_in_runtime_is_found_by_suffix(monkeypatch, tmp_path):
    _all_runtimes(monkeypatch)
    f = tmp_path / "m.sleep"
    f.write_text('{"ms": 0}')
    assert runtimes.for_path(f).NAME == "sleepy"
    assert "fake" in runtimes.exporters() and "onnxruntime" in runtimes.exporters()


def test_the_check_names_what_is_missing():
    """A runtime module without op_counts, and with load's parameters renamed, is reported."""
    broken = types.ModuleType("broken")
    broken.NAME, broken.SUFFIXES = "broken", (".b",)
    broken.files = lambda path: [path]
    broken.load = lambda file, n=None: None
    broken.how_to_load = lambda name: ""
    assert problems(broken, Runtime) == ["load('file', 'n') should take ('path', 'threads')", "missing op_counts"]
    assert not isinstance(broken, Runtime)


def test_flows_and_runtimes_do_not_import_each_other():
    """The shared vocabulary (qconfigs.Scheme) lives outside both packages."""
    import re
    src = Path(__file__).parents[1] / "src" / "quantbench"
    for pkg, other in (("flows", "runtimes"), ("runtimes", "flows")):
        for f in (src / pkg).glob("*.py"):
            assert not re.search(rf"^\s*(from \.\.{other}\b|from \.\. import {other}|from quantbench\.{other}\b)",
                                 f.read_text(), re.M), f"{f.name} imports {other}"


def test_every_registered_module_imports():
    for module in list(FLOWS.values()) + list(runtimes.RUNTIMES.values()):
        importlib.import_module(module)


def test_exporters_without_int8_are_left_out_of_int8_searches_and_skipped_files_stay_out_of_files_of(
        monkeypatch, tmp_path):
    """inductor's exporter makes fp32/bf16 rows only: listed among exporters (replicate makes
    them) but not among int8 ones (tune searches int8 files); and what a runtime skips on this
    machine is not among the files a target makes (replicate --resume would wait for it forever)."""
    from quantbench import cpu
    from quantbench.deploy import Target, files_of
    from quantbench.errors import QuantbenchError
    assert "inductor" in runtimes.exporters() and "inductor" not in runtimes.exporters(int8=True)
    assert "openvino" in runtimes.exporters(int8=True)
    with pytest.raises(QuantbenchError, match="makes no int8 file"):
        runtimes.check_exporters(("inductor",), int8=True)
    assert runtimes.check_exporters(("inductor",)) == ("inductor",)
    monkeypatch.setattr(cpu, "has_bf16", lambda: False)
    assert [p.name for p in files_of(Target("openvino"), tmp_path)] == ["openvino-fp32.xml", "openvino-int8.xml"]
    assert files_of(Target("inductor"), tmp_path) == []
    assert set(runtimes.skipped_files("openvino").values()) == {cpu.bf16_missing()}
    monkeypatch.setattr(cpu, "has_bf16", lambda: True)
    assert [p.name for p in files_of(Target("openvino"), tmp_path)] == [
        "openvino-fp32.xml", "openvino-int8.xml", "openvino-bf16.xml"]
    assert runtimes.skipped_files("openvino") == {} and runtimes.skipped_files("onnxruntime") == {}
