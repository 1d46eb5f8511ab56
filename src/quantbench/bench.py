"""Stage 6: the benchmark. Accuracy, latency, size and memory of deployment files, measured the
same way for every flow and runtime.

How latency is measured, and why:
- each model lives in its own subprocess (quantbench.worker), started fresh, so thread pools,
  allocator caches and JIT state of one model cannot favour another;
- `time.perf_counter` around each call, after a warm-up (first calls pay for lazy init);
- rounds are interleaved across models, in a rotating order, so a machine that drifts (thermal
  throttling, a noisy neighbour) spreads its drift over every model instead of the last one;
- rounds continue until each model has at least `min_runs` timings and its median moved by less
  than `rel_tol` in the last round, or its time `budget` is spent;
- all of that is repeated in `processes` fresh processes per model: one process can land on a
  slow state (memory layout, a busy neighbour core) for its whole life, so the reported median is
  the median of the per-process medians, and their spread is reported too;
- while timing we watch the machine's busy time (/proc/stat) minus our own: other work on the
  machine inflates every latency, so the report says how many cores of it there were;
- we report the median and p90/p99 (latency distributions are skewed: a mean chases outliers).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import QuantbenchError
from .export import read_sidecar


@dataclass
class BenchConfig:
    threads: int = 1                      # intra-op threads while timing (the original: 1)
    batch_sizes: tuple[int, ...] = (1,)
    min_runs: int = 200
    budget_s: float = 60.0                # timing seconds per model and batch size, at most
    processes: int = 3                    # fresh measuring processes per model (min_runs, budget split)
    warmup: int = 20
    round_s: float = 0.5                  # about this long per model per round
    rel_tol: float = 0.01                 # "stable": the median moved by < 1 % in the last round
    accuracy: bool = True
    accuracy_batch_size: int = 500
    data_dir: str | None = None
    data_root: str = "data"
    progress: bool = True


def parse_threads(s: str) -> int:
    if str(s) == "all":
        return os.cpu_count() or 1
    try:
        n = int(s)
    except ValueError:
        raise QuantbenchError(f"--bench-threads must be a number or 'all', not {s!r}") from None
    if n < 1:
        raise QuantbenchError("--bench-threads must be at least 1")
    return n


class BusyProbe:
    """How much CPU other processes used over an interval, in cores (Linux; None elsewhere)."""

    def __init__(self):
        self.start = self._busy_s()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.own_s = 0.0  # CPU seconds of our own measuring work, added by the caller

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def other_cores(self) -> float | None:
        end = self._busy_s()
        if self.start is None or end is None:
            return None
        own = self.own_s + time.process_time() - self.cpu0  # the parent's share: tiny, but ours
        wall = time.perf_counter() - self.t0
        return max(0.0, (end - self.start - own) / wall) if wall > 0 else None


def parse_batch_sizes(s: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in str(s).split(",") if x.strip())
    except ValueError:
        raise QuantbenchError(f"--batch-sizes takes a comma list of numbers, not {s!r}") from None
    if not sizes or min(sizes) < 1:
        raise QuantbenchError("--batch-sizes must list numbers >= 1")
    return sizes


def latency_stats(times_s: list[float], batch: int = 1) -> dict:
    """Summary of per-call times (seconds in, milliseconds out)."""
    ms = sorted(t * 1000 for t in times_s)
    n = len(ms)

    def pct(p: float) -> float:  # nearest-rank percentile on sorted data
        return ms[min(n - 1, max(0, round(p / 100 * (n - 1))))]

    med = statistics.median(ms)
    return {"n": n, "median_ms": med, "mean_ms": statistics.fmean(ms), "min_ms": ms[0],
            "p10_ms": pct(10), "p25_ms": pct(25), "p75_ms": pct(75), "p90_ms": pct(90), "p99_ms": pct(99),
            "std_ms": statistics.pstdev(ms), "iqr_rel": (pct(75) - pct(25)) / med if med else 0.0,
            "throughput_ips": batch * 1000 / med if med else 0.0}


class Worker:
    """Parent-side handle on one measuring subprocess."""

    def __init__(self, path: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONWARNINGS": "ignore"}
        self.path = path
        # stderr goes to a file: a chatty library must never block on a full pipe.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "quantbench.worker", str(path), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, bufsize=1)
        hello = self._read()
        self.load_s = hello.get("load_s")
        self.model_rss_mb = hello["load_rss_mb"] - hello["base_rss_mb"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self.stderr.seek(0)
            err = self.stderr.read().strip().splitlines()
            raise QuantbenchError(f"measuring {self.path.name} failed: {err[-1] if err else 'worker died'}")
        out = json.loads(line)
        if "error" in out:
            raise QuantbenchError(f"measuring {self.path.name} failed: {out['error']}")
        return out

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        try:
            out = self.ask(op="exit")
        finally:
            self.kill()
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            f.close()


def measure_latency(workers: dict[str, Worker], cfg: BenchConfig, batch: int, progress=None) -> dict[str, dict]:
    """Interleaved rounds over all workers (one process per model); returns label -> latency
    stats (+ raw samples, + how busy the rest of the machine was). `min_runs` and `budget_s`
    are per process here."""
    names = list(workers)
    times: dict[str, list[float]] = {n: [] for n in names}
    spent = {n: 0.0 for n in names}
    chunk = {}
    for n in names:  # warm-up, and a first estimate of how many calls fill a round
        t = workers[n].ask(op="time", batch=batch, n=5, warmup=cfg.warmup)["times"]
        chunk[n] = max(5, min(500, int(cfg.round_s / max(statistics.median(t), 1e-6))))
    probe = BusyProbe()
    done: set[str] = set()
    r = 0
    while len(done) < len(names):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate the order every round
        if r % 2:
            order.reverse()
        for n in order:
            if n in done:
                continue
            before = statistics.median(times[n]) if times[n] else None
            reply = workers[n].ask(op="time", batch=batch, n=chunk[n])
            t = reply["times"]
            probe.own_s += reply.get("cpu_s", sum(t))
            times[n] += t
            spent[n] += sum(t)
            after = statistics.median(times[n])
            stable = before is not None and abs(after - before) / after < cfg.rel_tol
            if (len(times[n]) >= cfg.min_runs and stable) or spent[n] >= cfg.budget_s:
                done.add(n)
            if progress is not None:
                progress.update(1)
        r += 1
    other = probe.other_cores()
    out = {}
    for n in names:
        s = latency_stats(times[n], batch)
        s.update(rounds=r, stable=spent[n] < cfg.budget_s, other_cores=other,
                 samples_ms=[round(t * 1000, 4) for t in times[n]])
        out[n] = s
    return out


def combine_processes(per_process: list[dict], batch: int) -> dict:
    """One model's latency over several fresh processes: the median of the per-process medians
    (robust to one process stuck in a slow state), percentiles over all calls pooled."""
    samples = [t for p in per_process for t in p["samples_ms"]]
    s = latency_stats([t / 1000 for t in samples], batch)
    medians = [p["median_ms"] for p in per_process]
    s["median_ms"] = statistics.median(medians)
    s["throughput_ips"] = batch * 1000 / s["median_ms"] if s["median_ms"] else 0.0
    others = [p["other_cores"] for p in per_process if p.get("other_cores") is not None]
    s.update(processes=len(per_process), process_medians_ms=medians,
             process_spread=(max(medians) - min(medians)) / s["median_ms"] if s["median_ms"] else 0.0,
             other_cores=statistics.fmean(others) if others else None, rounds=sum(p["rounds"] for p in per_process),
             stable=all(p["stable"] for p in per_process), samples_ms=samples)
    return s


def file_bytes(path: Path) -> int:
    """The deployment file plus its companions (OpenVINO keeps weights in FILE.bin)."""
    total = path.stat().st_size
    companion = path.with_suffix(".bin")
    if path.suffix == ".xml" and companion.is_file():
        total += companion.stat().st_size
    return total


def describe_model(path: Path) -> dict:
    side = read_sidecar(path)
    from .runtimes import RUNTIME_NAMES
    return {"label": side.get("label", path.stem), "file": str(path), "method": side.get("method", "unknown"),
            "flow": side.get("flow", "unknown"), "runtime": side.get("runtime", RUNTIME_NAMES.get(path.suffix, path.suffix)),
            "dtype": side.get("dtype", "unknown"), "file_bytes": file_bytes(path),
            "weight_bytes": side.get("weight_bytes"), "sidecar": side}


def quantized_check(row: dict) -> str:
    """Guard against silent no-ops: what the operator counts say about an 'int8' model."""
    ops = row.get("ops") or {}
    if row["dtype"] != "int8" or not ops:
        return "ok" if row["dtype"] != "int8" else "unchecked"
    int8 = ops.get("int8_conv", 0) + ops.get("int8_linear", 0)
    if int8 == 0:
        return "NOT QUANTIZED"
    if ops.get("int8_conv", 0) == 0 and ops.get("float_conv", 0) > 0:
        return "int8 linear only"
    return "ok"


def bench(models: list[str | os.PathLike], cfg: BenchConfig) -> dict:
    """Measure every model; returns the results dict that report.py renders."""
    from tqdm import tqdm

    from .cpu import machine_record

    paths = [Path(m) for m in models]
    for p in paths:
        if not p.is_file():
            raise QuantbenchError(f"model file not found: {p}")
    rows = [describe_model(p) for p in paths]
    seen = set()
    for row in rows:  # labels key the table: make them unique
        base, i = row["label"], 2
        while row["label"] in seen:
            row["label"], i = f"{base}#{i}", i + 1
        seen.add(row["label"])

    processes = max(1, cfg.processes)
    per_process = replace(cfg, min_runs=math.ceil(cfg.min_runs / processes), budget_s=cfg.budget_s / processes)
    timed: dict[str, dict[int, list[dict]]] = {r["label"]: {b: [] for b in cfg.batch_sizes} for r in rows}
    for k in range(processes):
        workers: dict[str, Worker] = {}
        try:
            for row, p in zip(rows, paths):
                workers[row["label"]] = w = Worker(p, cfg.threads)
                if k == 0:  # what does not depend on the process is measured once
                    row["load_s"] = w.load_s
                    row["ops"] = w.ask(op="ops")["ops"]
                    row["quantized_check"] = quantized_check(row)
            if k == 0 and cfg.accuracy:
                for row in tqdm(rows, desc="accuracy", unit="model", leave=False, disable=not cfg.progress):
                    a = workers[row["label"]].ask(op="accuracy", data_dir=cfg.data_dir, data_root=cfg.data_root,
                                                  batch_size=cfg.accuracy_batch_size)
                    row["accuracy"], row["accuracy_n"] = a["accuracy"], a["n"]
            for b in cfg.batch_sizes:
                with tqdm(desc=f"timing batch {b}, process {k + 1}/{processes}", unit="round", leave=False,
                          disable=not cfg.progress) as bar:
                    stats = measure_latency(workers, per_process, b, bar)
                for label, st in stats.items():
                    timed[label][b].append(st)
            for row in rows:
                mem = workers[row["label"]].close()
                if k == 0:
                    row["peak_rss_mb"] = mem["peak_rss_mb"]  # whole process, accuracy run included
                    row["model_rss_mb"] = workers[row["label"]].model_rss_mb
        finally:
            for w in workers.values():
                w.kill()
    for row in rows:
        row["latency"] = {str(b): combine_processes(timed[row["label"]][b], b) for b in cfg.batch_sizes}
    cfg_record = asdict(cfg)
    return {"machine": machine_record(cfg.threads), "config": cfg_record,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": derive(rows)}


def derive(rows: list[dict]) -> list[dict]:
    """Ratios against baselines: the fp32 row of the same runtime, and the fastest fp32 row."""
    fp32 = [r for r in rows if r["dtype"] == "fp32"]
    b1 = lambda r: (r.get("latency") or {}).get("1", {}).get("median_ms")  # noqa: E731
    fastest = min((r for r in fp32 if b1(r)), key=b1, default=None)
    for r in rows:
        base = next((f for f in fp32 if f["runtime"] == r["runtime"]), fp32[0] if fp32 else None)
        r["baseline"] = base["label"] if base else None
        r["fastest_fp32"] = fastest["label"] if fastest else None
        if base and b1(r) and b1(base):
            r["speedup"] = b1(base) / b1(r)
        if fastest and b1(r):
            r["speedup_vs_fastest_fp32"] = b1(fastest) / b1(r)
        if base:
            r["size_ratio"] = r["file_bytes"] / base["file_bytes"]
            if r.get("accuracy") is not None and base.get("accuracy") is not None:
                r["accuracy_delta"] = r["accuracy"] - base["accuracy"]
    return rows


def config_from_args(args) -> BenchConfig:
    """The timing options shared by `bench` and `replicate`, checked."""
    if args.processes < 1 or args.min_runs < 1 or args.budget <= 0:
        raise QuantbenchError("--processes and --min-runs must be at least 1, --budget above 0")
    return BenchConfig(threads=parse_threads(args.bench_threads), batch_sizes=parse_batch_sizes(args.batch_sizes),
                       min_runs=args.min_runs, budget_s=args.budget, processes=args.processes,
                       accuracy=not getattr(args, "no_accuracy", False), progress=not args.no_progress,
                       data_dir=str(args.data_dir) if args.data_dir else None, data_root=str(args.data_root))


def bench_cli(args) -> int:
    from .report import write_report

    results = bench(args.models, config_from_args(args))
    md = write_report(results, json_path=args.json, markdown_path=args.markdown)
    print(md)
    return 0
