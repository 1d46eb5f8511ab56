"""Where the time goes: one deployment file, run N times at batch 1 under its runtime's own
profiler, summed by operator type.

Each runtime reports operator times its own way (torch.profiler for TorchScript and inductor,
ONNX Runtime's JSON trace, OpenVINO's per-layer performance counters), so each runtime module
brings its own `profile_ops` (quantbench.runtimes). Comparing the operators' sum with the
wall time of a call tells what no operator accounts for: the framework's own overhead
(interpreter, Python wrapper, guards, allocation), which dominates small models at batch 1.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import QuantbenchError


def profile_model(path: str | os.PathLike, calls: int = 200, threads: int = 1) -> dict:
    """Per-call milliseconds by operator, the operators' total, and the wall time per call."""
    from . import runtimes
    from .export import input_shape, read_sidecar
    from .timing import median_ms
    path = Path(path)
    runtime = runtimes.for_path(path)
    if not hasattr(runtime, "profile_ops"):
        raise QuantbenchError(f"the {runtime.NAME} runtime has no profiler")
    if calls < 1:
        raise QuantbenchError("--calls must be at least 1")
    shape = input_shape(read_sidecar(path))
    torch.set_num_threads(threads)
    model = runtime.load(path, threads)  # loaded (and for .pt2 compiled) once
    # the wall time without a profiler attached (profilers add their own cost per operator)
    wall = median_ms(model, torch.randn(1, *shape), calls)
    ops = runtime.profile_ops(path, calls, threads, model, shape)
    rows = sorted(({"op": name, "ms_per_call": total_s * 1000 / calls, "count_per_call": count / calls}
                   for name, (total_s, count) in ops.items()), key=lambda r: -r["ms_per_call"])
    in_ops = sum(r["ms_per_call"] for r in rows)
    return {"model": str(path), "runtime": runtime.NAME, "input_shape": list(shape), "calls": calls,
            "threads": threads, "wall_ms": wall, "ops_ms": in_ops, "ops": rows}


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
