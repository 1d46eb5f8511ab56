"""Where the time goes: one deployment file, run N times at batch 1 under its runtime's own
profiler, summed by operator type.

Each runtime reports operator times its own way (torch.profiler for TorchScript and inductor,
ONNX Runtime's JSON trace, OpenVINO's per-layer performance counters), so the profilers are
registered by file suffix like the loaders in runtimes.py. Comparing the operators' sum with the
wall time of a call tells what no operator accounts for: the framework's own overhead
(interpreter, Python wrapper, guards, allocation), which dominates small models at batch 1.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
from pathlib import Path

import torch

from .errors import QuantbenchError

# suffix -> "module:function(path, calls, threads, model) -> {op name: (total seconds, count)}";
# `model` is the file already loaded by runtimes.load_deployed (a profiler may build its own session)
PROFILERS: dict[str, str] = {
    ".pt": "quantbench.profiling:torch_ops",
    ".pt2": "quantbench.profiling:torch_ops",
    ".onnx": "quantbench.onnxrt:profile_ops",
    ".xml": "quantbench.openvino_rt:profile_ops",
}


def torch_ops(path: Path, calls: int, threads: int, model) -> dict[str, tuple[float, int]]:
    """torch.profiler over `calls` calls; self CPU time per operator (self: a parent op's time
    without its children, so the rows add up to the time spent inside operators)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 3, 32, 32)
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


def wall_ms(model, calls: int) -> float:
    """Median wall time of one call without a profiler attached (profilers add their own cost)."""
    from .worker import time_calls
    x = torch.randn(1, 3, 32, 32)
    time_calls(model, x, 20)  # warm-up
    return statistics.median(time_calls(model, x, calls)) * 1000


def profile_model(path: str | os.PathLike, calls: int = 200, threads: int = 1) -> dict:
    """Per-call milliseconds by operator, the operators' total, and the wall time per call."""
    from .runtimes import for_file, load_deployed
    path = Path(path)
    profiler = for_file(path, PROFILERS, "profile")
    if calls < 1:
        raise QuantbenchError("--calls must be at least 1")
    torch.set_num_threads(threads)
    model = load_deployed(path, threads)  # loaded (and for .pt2 compiled) once
    wall = wall_ms(model, calls)
    ops = profiler(path, calls, threads, model)
    rows = sorted(({"op": name, "ms_per_call": total_s * 1000 / calls, "count_per_call": count / calls}
                   for name, (total_s, count) in ops.items()), key=lambda r: -r["ms_per_call"])
    in_ops = sum(r["ms_per_call"] for r in rows)
    return {"model": str(path), "calls": calls, "threads": threads, "wall_ms": wall,
            "ops_ms": in_ops, "ops": rows}


def render_profile(p: dict, top: int = 15) -> str:
    total = sum(r["ms_per_call"] for r in p["ops"]) or 1.0
    lines = [f"{Path(p['model']).name}: {p['wall_ms']:.3f} ms per call (median, no profiler), "
             f"{p['threads']} thread(s), batch 1; operators under the profiler: {p['ops_ms']:.3f} ms per call",
             "", "| Operator | ms per call | share | calls per inference |", "|---|---:|---:|---:|"]
    for r in p["ops"][:top]:
        lines.append(f"| {r['op']} | {r['ms_per_call']:.3f} | {r['ms_per_call'] / total:.1%} | "
                     f"{r['count_per_call']:g} |")
    rest = p["ops"][top:]
    if rest:
        lines.append(f"| ({len(rest)} more) | {sum(r['ms_per_call'] for r in rest):.3f} | "
                     f"{sum(r['ms_per_call'] for r in rest) / total:.1%} | |")
    if any(r["op"].startswith("## Call CompiledFxGraph") for r in p["ops"]):
        lines += ["", "Inductor's C++ wrapper runs the compiled kernels inside 'Call CompiledFxGraph', out of the "
                      "profiler's sight; ONEDNN_VERBOSE=1 lists each oneDNN kernel with its time."]
    return "\n".join(lines)
