"""The measuring subprocess and its parent-side handle, both halves of one protocol.

One fresh process per model, so that one model's caches, thread pools and allocator state cannot
favour another. The child loads one deployment file and answers the parent's commands, one JSON
object per line on stdin/stdout:

    (on start)                  -> {"ready": true, "load_s": ..., "base_rss_mb": ..., "load_rss_mb": ...}
    {"op": "time", "batch": B, "n": K, "warmup": W}  -> {"times": [seconds] * K, "cpu_s": ...}
    {"op": "accuracy", "data_dir": ..., "data_root": ..., "image_size": ..., "batch_size": ...,
     "samples": N or null, "seed": S, "image_cache": folder or null, "image_cache_gb": G}
                                -> {"accuracy": %, "n": images, "total": test images, "indices": [i] * n,
                                    "predictions": [top-1 class] * n, "labels": [label] * n}
                                   (normalized as the sidecar says; `samples`: a seeded subset,
                                   evaluate.eval_subset; `image_cache`: the decoded-image
                                   cache, data.ImageCache, shared by every worker)
    {"op": "ops"}               -> {"ops": {int8_conv: ..., ...}} (quantized vs float operators)
    {"op": "exit"}              -> {"peak_rss_mb": ..., "base_rss_mb": ...}
    any failure                 -> {"error": "..."}
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import QuantbenchError, cause


# ---------------------------------------------------------------- parent side
# How long one answer may take when the caller gives no deadline: a model that hangs (an ONNX
# Loop of 2**40 iterations) must not hang bench or tune with it.
CALL_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 600.0   # loading includes compilation (inductor) and the first call


class Worker:
    """Parent-side handle on one measuring subprocess. Every answer has a deadline: past it the
    worker is killed and reaped and the call raises a one-line QuantbenchError naming the file.
    The worker dies with this process (see _die_with_parent)."""

    def __init__(self, path: Path, threads: int, input_shape: tuple[int, ...], cpus: set[int] | None = None,
                 timeout_s: float = CALL_TIMEOUT_S, load_timeout_s: float = LOAD_TIMEOUT_S):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONWARNINGS": "ignore", _PARENT: str(os.getpid())}
        # Pinned to `cpus`: every model's process runs on the same core(s), so all contenders see
        # that core's speed changes alike and their ratios hold (set before the child starts).
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus and hasattr(os, "sched_setaffinity") else None
        self.path = path
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s  # also the first call at a new batch size (a compiler may compile again)
        self._buf = b""
        # stderr goes to a file: a chatty library must never block on a full pipe.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "quantbench.worker", str(path), str(threads), ",".join(map(str, input_shape))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env, bufsize=0,
                preexec_fn=pin)
        except BaseException:
            self.stderr.close()
            raise
        try:
            hello = self._read("load", load_timeout_s)
        except BaseException:  # a file that fails to load leaves no pipes and no unreaped child
            self.kill()
            raise
        self.load_s = hello.get("load_s")
        self.model_rss_mb = hello["load_rss_mb"] - hello["base_rss_mb"]

    def _line(self, deadline: float) -> bytes | None:
        """One line from the worker, None at end of output; TimeoutError past `deadline`."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _read(self, op: str, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            line = self._line(time.monotonic() + timeout_s)
        except TimeoutError:
            self.kill(now=True)
            raise QuantbenchError(f"measuring {self.path.name} failed: no answer to {op!r} within {timeout_s:.0f} s "
                                  "(the model hangs, or is far slower than the time budget allows); "
                                  "its worker was stopped") from None
        if line is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.stderr.seek(0)
            err = self.stderr.read().strip().splitlines()
            code = self.proc.returncode
            self.kill(now=True)
            died = f"worker died (exit status {code})" if code is not None else "worker died"
            raise QuantbenchError(f"measuring {self.path.name} failed: {err[-1] if err else died}")
        out = json.loads(line)
        if "error" in out:
            raise QuantbenchError(f"measuring {self.path.name} failed: {out['error']}")
        return out

    def ask(self, timeout_s: float | None = None, **cmd) -> dict:
        """Send one command; its answer (within `timeout_s`, default the worker's)."""
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):  # the worker is gone: say why below
            pass
        return self._read(cmd.get("op", "?"), timeout_s)

    def close(self) -> dict:
        try:
            out = self.ask(op="exit")
        finally:
            self.kill()
        return out

    def kill(self, now: bool = False) -> None:
        """Stop the worker (at once with `now`, else after it has had 10 s to exit on its own),
        reap it and close every pipe and file of it. Safe to call again."""
        if self.proc.poll() is None:
            if not now:
                with contextlib.suppress(OSError, ValueError):
                    self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            with contextlib.suppress(OSError, ValueError):
                f.close()


# ---------------------------------------------------------------- child side
def _rss_mb() -> float:
    """Peak resident memory of this process so far: Linux's VmHWM, the high-water mark of this
    program's own memory. Not ru_maxrss: a child starts with its parent's ru_maxrss (fork), and
    exec keeps it, so every worker of a 2.5 GB replicate said 2.5 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    """Resident memory now (the peak can come from a transient during `import torch`)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


_PARENT = "QUANTBENCH_WORKER_PARENT"  # the parent's pid, for _die_with_parent


def _die_with_parent() -> None:
    """End this worker when its parent ends, even killed with SIGKILL while the model runs (an
    orphan would spin on a core for good): Linux's parent-death signal, and a watcher thread that
    polls for the parent (for the rest, and for a parent that died before the signal was set)."""
    parent = int(os.environ.get(_PARENT) or os.getppid())
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="quantbench-parent-watch", daemon=True).start()


def main() -> int:
    _die_with_parent()
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    path, threads = sys.argv[1], int(sys.argv[2])
    shape = tuple(int(s) for s in sys.argv[3].split(","))
    from .warn import quiet_cpp_warnings
    quiet_cpp_warnings()
    import warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    from . import runtimes

    base = _current_rss_mb()
    t0 = time.perf_counter()
    try:
        runtime = runtimes.for_path(path)
        model = runtime.load(Path(path), threads)
        with torch.inference_mode():
            model(torch.randn(1, *shape))  # first call: lazy init, compilation
    except Exception as e:
        proto.write(json.dumps({"error": cause(e)}) + "\n")
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
            out = _run(op, cmd, model, runtime, Path(path), shape, gen)
        except Exception as e:  # report, keep serving
            out = {"error": cause(e)}
        proto.write(json.dumps(out) + "\n")
    return 0


def _run(op: str, cmd: dict, model, runtime, path: Path, shape, gen) -> dict:
    import torch

    from .timing import time_calls
    if op == "time":
        x = torch.randn(cmd["batch"], *shape, generator=gen)
        time_calls(model, x, cmd.get("warmup", 0))
        cpu = time.process_time()
        times = time_calls(model, x, cmd["n"])
        # CPU seconds this process used: the parent subtracts them from the machine's busy time
        # to see how much OTHER work ran while we timed.
        return {"times": times, "cpu_s": time.process_time() - cpu}
    if op == "accuracy":
        from .data import IMAGE_CACHE_GB, DataSource
        from .evaluate import EVAL_SEED, eval_subset, predict
        from .export import read_sidecar
        source = DataSource(cmd.get("data_dir"), cmd.get("data_root", "data"), cmd.get("image_size"),
                            image_cache=cmd.get("image_cache", "auto"),
                            image_cache_gb=cmd.get("image_cache_gb", IMAGE_CACHE_GB))
        data = source.load_for(read_sidecar(path), path.name, train=False, progress=False)
        idx = eval_subset(len(data.test), cmd.get("samples"), cmd.get("seed", EVAL_SEED))
        preds, labels = predict(model, data, cmd.get("batch_size", 500), indices=idx, progress=False,
                                set_eval=False)
        n = len(labels)
        return {"accuracy": 100.0 * (preds == labels).sum().item() / max(n, 1), "n": n, "total": len(data.test),
                "indices": idx if idx is not None else list(range(n)),
                "predictions": preds.tolist(), "labels": labels.tolist()}
    if op == "ops":
        return {"ops": dataclasses.asdict(runtime.op_counts(path, model))}
    return {"error": f"unknown op {op}"}


if __name__ == "__main__":
    sys.exit(main())
