"""The measuring subprocess: one per model, so that one model's caches, thread pools and
allocator state cannot favour another. It loads one deployment file and answers commands from
the parent (quantbench.bench), one JSON object per line on stdin/stdout:

    {"op": "accuracy", ...}     -> {"accuracy": percent, "n": images}
    {"op": "time", "batch": B, "n": K, "warmup": W}  -> {"times": [seconds] * K, "cpu_s": ...}
    {"op": "ops"}               -> operator counts (quantized vs float)
    {"op": "exit"}              -> {"peak_rss_mb": ..., "base_rss_mb": ...}
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time


def _rss_mb() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    """Resident memory now (the peak can come from a transient during `import torch`)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


def main() -> int:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    path, threads = sys.argv[1], int(sys.argv[2])
    from .warn import quiet_cpp_warnings
    quiet_cpp_warnings()
    import warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    from .runtimes import load_deployed

    base = _current_rss_mb()
    t0 = time.perf_counter()
    try:
        model = load_deployed(path, threads)
        example = torch.randn(1, 3, 32, 32)
        with torch.inference_mode():
            model(example)  # first call: lazy init, compilation
    except Exception as e:
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    # Memory right after loading and one call: the model's own footprint over the torch
    # baseline (accuracy runs later hold a batch of test images, which is not the model's cost).
    proto.write(json.dumps({"ready": True, "load_s": time.perf_counter() - t0,
                            "base_rss_mb": base, "load_rss_mb": _current_rss_mb()}) + "\n")
    gen = torch.Generator().manual_seed(0)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            proto.write(json.dumps({"peak_rss_mb": _rss_mb(), "base_rss_mb": base}) + "\n")
            return 0
        try:
            out = _run(op, cmd, model, path, gen)
        except Exception as e:  # report, keep serving
            out = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(out) + "\n")
    return 0


def time_calls(model, x, n: int) -> list[float]:
    """Seconds per call of model(x), n calls, each timed on its own with perf_counter."""
    import torch
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return times


def _run(op: str, cmd: dict, model, path: str, gen) -> dict:
    import torch
    if op == "time":
        x = torch.randn(cmd["batch"], 3, 32, 32, generator=gen)
        time_calls(model, x, cmd.get("warmup", 0))
        cpu = time.process_time()
        times = time_calls(model, x, cmd["n"])
        # CPU seconds this process used: the parent subtracts them from the machine's busy time
        # to see how much OTHER work ran while we timed.
        return {"times": times, "cpu_s": time.process_time() - cpu}
    if op == "accuracy":
        from .data import load_dataset
        from .evaluate import accuracy
        data = load_dataset(cmd.get("data_dir"), cmd.get("data_root", "data"), train=False, progress=False)
        with torch.inference_mode():
            acc = accuracy(model, data, cmd.get("batch_size", 500), progress=False, set_eval=False)
        return {"accuracy": acc, "n": len(data.test)}
    if op == "ops":
        from .runtimes import op_counts
        return {"ops": op_counts(path, model)}
    return {"error": f"unknown op {op}"}


if __name__ == "__main__":
    sys.exit(main())
