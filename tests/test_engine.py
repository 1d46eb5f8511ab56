"""The quantized engine of the TorchScript flows: chosen per CPU (or asked for), recorded in the
sidecar, set by the loader before torch.jit.load (which packs the int8 weights for the engine
current at load time), restored after quantizing, and a bad name is a one-line error."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench.errors import QuantbenchError
from quantbench.export import read_sidecar, write_sidecar
from quantbench.quantize import QuantizeConfig, quantize, quantize_to_file
from quantbench.runtimes import torchscript

RESNET10_CONVS = 12


def _make(path, checkpoint, data, **kw) -> dict:
    cfg = QuantizeConfig(method="static", calib_samples=32, calib_batch_size=16, **kw)
    return quantize_to_file(checkpoint, path, cfg, data, progress=False)


@pytest.mark.slow
def test_sidecar_records_the_engine(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    assert _make(tmp_path / "f.pt", tiny_trained_checkpoint, tiny_dataset, options={"torchscript": {"engine": "fbgemm"}})["engine"] == "fbgemm"
    assert read_sidecar(tmp_path / "f.pt")["engine"] == "fbgemm"
    # none asked for: the fastest for this CPU, which depends on whether pruning cropped convs
    for prune in (True, False):
        side = _make(tmp_path / f"{prune}.pt", tiny_trained_checkpoint, tiny_dataset, flow="fx", prune=prune)
        assert side["pruning"]["applied"] is prune
        assert side["engine"] == torchscript.best_engine(pruned=prune) and side["engine"] in torchscript.engines()
    # PT2E files run under inductor, which picks its kernels itself: no engine to record
    side = _make(tmp_path / "p.pt2", tiny_trained_checkpoint, tiny_dataset, flow="pt2e", options={"torchscript": {"engine": "fbgemm"}})
    assert side["engine"] is None


def test_quantize_restores_the_process_engine(tiny_trained_checkpoint, tiny_dataset):
    before = torch.backends.quantized.engine
    other = "fbgemm" if before != "fbgemm" else "x86"
    _, rec = quantize(tiny_trained_checkpoint, QuantizeConfig(method="dynamic", options={"torchscript": {"engine": other}}), tiny_dataset,
                      progress=False)
    assert rec["engine"] == other and torch.backends.quantized.engine == before


# A fresh process (torch's default engine) loads each file through quantbench's runtime and
# counts the convolutions oneDNN runs in one call (its verbose log goes to stdout).
FRESH = r"""
import sys, torch
from quantbench.runtimes import torchscript
print("DEFAULT", torch.backends.quantized.engine, flush=True)
for path in sys.argv[1:]:
    model = torchscript.load(path)
    print("ENGINE", torch.backends.quantized.engine, flush=True)
    with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        model(torch.randn(1, 3, 32, 32))
"""


def _fresh_loads(*paths) -> tuple[str, list[tuple[str, int]]]:
    """(the default engine, [(engine after loading, convs oneDNN ran) per file])."""
    env = {**os.environ, "PYTHONPATH": str(Path(quantbench.__file__).parents[1])}  # this quantbench
    out = subprocess.run([sys.executable, "-c", FRESH, *map(str, paths)], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout.splitlines()
    default = next(line.split()[1] for line in out if line.startswith("DEFAULT"))
    return default, _engine_runs(out)


def _engine_runs(out: list[str]) -> list[tuple[str, int]]:
    """(engine, convolutions oneDNN ran) per file, from a child's ENGINE lines and oneDNN's verbose log."""
    runs = []
    for line in out:
        if line.startswith("ENGINE"):
            runs.append([line.split()[1], 0])
        elif runs and ",exec," in line and ",convolution," in line:
            runs[-1][1] += 1
    return [tuple(r) for r in runs]


@pytest.mark.slow
@pytest.mark.skipif(not {"fbgemm", "onednn"} <= set(torchscript.engines()), reason="needs fbgemm and onednn")
def test_loader_packs_for_the_sidecars_engine(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    """fbgemm runs no convolution through oneDNN, the onednn engine all of them: so the kernels
    that run show which engine packed the weights at load."""
    _make(tmp_path / "fbgemm.pt", tiny_trained_checkpoint, tiny_dataset, options={"torchscript": {"engine": "fbgemm"}})
    _make(tmp_path / "onednn.pt", tiny_trained_checkpoint, tiny_dataset, options={"torchscript": {"engine": "onednn"}})
    # the fbgemm file again, its sidecar without the engine: torch's default applies
    shutil.copy(tmp_path / "fbgemm.pt", tmp_path / "plain.pt")
    side = read_sidecar(tmp_path / "fbgemm.pt")
    del side["engine"]
    write_sidecar(tmp_path / "plain.pt", **side)
    default, runs = _fresh_loads(tmp_path / "plain.pt", tmp_path / "fbgemm.pt", tmp_path / "onednn.pt")
    assert default == "x86"
    assert runs[1] == ("fbgemm", 0) and runs[2] == ("onednn", RESNET10_CONVS)
    assert runs[0][0] == "x86"


def test_unknown_engine_is_one_line(tiny_trained_checkpoint, tmp_path):
    with pytest.raises(QuantbenchError, match=r"unknown quantized engine 'fbgemmm'; this torch offers .*x86") as e:
        QuantizeConfig(method="static", options={"torchscript": {"engine": "fbgemmm"}})
    assert "\n" not in str(e.value)
    # a file made for an engine this torch lacks
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    write_sidecar(path, engine="tpu9000")
    with pytest.raises(QuantbenchError, match="made for quantized engine 'tpu9000'") as e:
        torchscript.load(path)
    assert "\n" not in str(e.value)


def test_quantized_engine_context_restores_on_error():
    before = torch.backends.quantized.engine
    with pytest.raises(RuntimeError):
        with torchscript.quantized_engine("fbgemm"):
            assert torch.backends.quantized.engine == "fbgemm"
            raise RuntimeError("boom")
    assert torch.backends.quantized.engine == before
    with torchscript.quantized_engine(None):
        assert torch.backends.quantized.engine == before


# ---------------------------------------------------------------- the load lines users are given
def test_how_to_load_sets_the_sidecars_engine_first():
    lines = torchscript.how_to_load("ptq-s.pt", {"engine": "fbgemm"})
    assert lines == 'import torch; torch.backends.quantized.engine = "fbgemm"; m = torch.jit.load("ptq-s.pt")'
    # no engine recorded (an fp32 file, a file made elsewhere): plain loading, nothing invented
    assert torchscript.how_to_load("origin.pt", {"dtype": "fp32"}) == 'import torch; m = torch.jit.load("origin.pt")'
    assert "engine" not in torchscript.how_to_load("origin.pt")


# Executes each set of load lines, exactly as a user would paste them, in a fresh process with
# torch's default engine; reports the engine after loading and the convs oneDNN runs in one call.
USER_LINES = r"""
import sys
for lines in sys.argv[1:]:
    scope = {}
    exec(lines, scope)
    torch = scope["torch"]
    print("ENGINE", torch.backends.quantized.engine, flush=True)
    with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        scope["m"](torch.randn(1, 3, 32, 32))
"""


@pytest.mark.slow
@pytest.mark.skipif(not {"fbgemm", "onednn"} <= set(torchscript.engines()), reason="needs fbgemm and onednn")
def test_the_load_lines_run_the_file_under_its_engine(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    """What "ship this" tells a user to paste, run without quantbench: the process's engine is the
    sidecar's, and the kernels are that engine's (fbgemm runs no conv through oneDNN, onednn all)."""
    lines = []
    for engine in ("fbgemm", "onednn"):
        path = tmp_path / f"{engine}.pt"
        _make(path, tiny_trained_checkpoint, tiny_dataset, options={"torchscript": {"engine": engine}})
        lines.append(torchscript.how_to_load(str(path), read_sidecar(path)))
    out = subprocess.run([sys.executable, "-c", USER_LINES, *lines], capture_output=True, text=True, check=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ""}).stdout.splitlines()  # no quantbench
    assert _engine_runs(out) == [("fbgemm", 0), ("onednn", RESNET10_CONVS)]


def _results_with(engine: str | None):
    from quantbench.results import BenchResults, LatencyStats, ModelResult, OpCounts, derive

    def row(label, dtype, acc, ms, ops, **side):
        return ModelResult(label=label, file=f"runs/x/{label}.pt", method="static", flow="eager",
                           runtime="torchscript", dtype=dtype, file_bytes=2**20, accuracy=acc,
                           latency={1: LatencyStats.of([ms] * 5, samples_ms=[ms] * 5)}, ops=ops,
                           status=ops.status(dtype), sidecar={"label": label, "dtype": dtype, **side})
    side = {"engine": engine} if engine else {}
    rows = [row("origin", "fp32", 80.0, 8.0, OpCounts(0, 20, 0, 1)),
            row("ptq-s", "int8", 79.9, 2.0, OpCounts(20, 0, 1, 0), **side)]
    return BenchResults(machine={"cpu": "test cpu", "threads": 1}, config={"threads": 1}, created="now",
                        models=derive(rows))


def test_ship_this_gives_the_load_lines_with_the_engine():
    from quantbench.report import recommendation_lines, render
    want = 'import torch; torch.backends.quantized.engine = "fbgemm"; m = torch.jit.load("ptq-s.pt")'
    [line] = recommendation_lines(_results_with("fbgemm"))
    assert f"Load it with `{want}`" in line
    assert f"`{want}`" in render(_results_with("fbgemm"))
    [line] = recommendation_lines(_results_with(None))  # nothing recorded: plain loading
    assert 'Load it with `import torch; m = torch.jit.load("ptq-s.pt")`' in line


# ---------------------------------------------------------------- the table's figure is the lines'
class _LoggingWorker:
    """Stands in for bench's measuring subprocess: answers at once and logs what it is asked."""
    log: list = []

    def __init__(self, path, threads, input_shape, cpus=None, **kw):
        self.name, self.load_s, self.model_rss_mb = Path(path).stem, 0.1, 1.0
        type(self).log.append((self.name, "start"))

    def ask(self, op, timeout_s=None, **cmd):
        type(self).log.append((self.name, op, cmd.get("batch")))
        return {"ops": {"ops": {"int8_conv": 1}}, "accuracy": {"accuracy": 50.0, "n": 10},
                "time": {"times": [0.001] * cmd.get("n", 1), "cpu_s": 0.0}}[op]

    def close(self):
        type(self).log.append((self.name, "exit"))
        return {"peak_rss_mb": 2.0}

    def kill(self):
        pass


def test_bench_times_before_any_large_batch_or_accuracy_pass(tmp_path, monkeypatch):
    """Each timed process has run nothing but loading and calls at the timed batch size or smaller:
    what a process that pasted the load lines and serves gives. (After an accuracy pass, batch 1
    ran slower, 2.8x on oneDNN's kernels: docs/torchscript-engine.md.)"""
    from quantbench import bench as B
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "sleepy=support.sleepy")
    monkeypatch.setattr(B, "Worker", _LoggingWorker)
    _LoggingWorker.log = []
    path = tmp_path / "m.sleep"
    path.write_text('{"ms": 0}')
    write_sidecar(path, label="m", method="static", flow="test", runtime="sleepy", dtype="int8")
    cfg = B.BenchConfig(batch_sizes=(8, 1), processes=2, min_runs=2, round_s=0.01, warmup=0, pin=False,
                        progress=False)
    res = B.bench([path], cfg)
    assert res.models[0].accuracy == 50.0
    processes, ops = [], []
    for entry in _LoggingWorker.log:
        if entry[1] == "start":
            processes.append(ops := [])
        elif entry[1] in ("time", "accuracy"):
            ops.append(entry[1] if entry[1] == "accuracy" else entry[2])
    assert len(processes) == 2
    first, second = processes
    assert "accuracy" not in second and first[-1] == "accuracy" and first.count("accuracy") == 1
    for p in processes:
        batches = [b for b in p if b != "accuracy"]
        assert batches == sorted(batches) and set(batches) == {1, 8}
