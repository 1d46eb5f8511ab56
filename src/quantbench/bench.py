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

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .data import DataSource
from .evaluate import EVAL_SEED, PredictionMemo
from .errors import QuantbenchError
from .record import read_record, sidecar_path
from .results import (BenchResults, LatencyStats, ModelResult, OpCounts, correct_bits, derive, recommend,
                      threads_words)
from .worker import Worker


@dataclass
class BenchConfig:
    """How deployment files are measured; the CLI's timing options are these fields."""
    # None: chosen by the files' input size (timing_defaults): 1 thread and batch 1 for small
    # images, 1 thread and all cores at batch 1 and 16 from 112x112 up
    threads: int | str | tuple[int | str, ...] | None = field(default=None, metadata={
        "help": "intra-op threads while timing: N, 'all' (the cores this process may use), or a comma list "
                "(1,all), each timed in its own processes (default: 1; 1,all for inputs of 112x112 and more)"})
    batch_sizes: tuple[int, ...] | None = field(default=None, metadata={
        "help": "comma list of batch sizes to time; more than 1 adds throughput (default: 1; 1,16 for inputs "
                "of 112x112 and more)"})
    min_runs: int = field(default=200, metadata={"help": "timed calls per model, at least"})
    timing_s: float = field(default=60.0, metadata={
        "help": "timing seconds per model and (threads, batch size) setting, at most", "alias": "--budget"})
    processes: int = field(default=3, metadata={
        "help": "fresh measuring processes per model; the median of their medians is reported"})
    # "ship this": the fastest int8 file whose accuracy is at most this many points below fp32
    max_drop: float = field(default=0.3, metadata={
        "help": "accuracy points below fp32 that 'ship this' accepts"})
    eval_samples: int | None = field(default=None, metadata={
        "help": "measure accuracy on this many test images, a seeded subset, the same for every model "
                "(default: all)"})
    warmup: int = 20
    round_s: float = 0.5                  # about this long per model per round
    rel_tol: float = 0.01                 # "stable": the median moved by < 1 % in the last round
    accuracy: bool = True
    accuracy_batch_size: int = 500
    data: DataSource = field(default_factory=DataSource)  # test images for the accuracy column
    progress: bool = True
    pin: bool = True                      # run every measuring process on the same core(s)

    def __post_init__(self):
        if self.batch_sizes is not None:
            self.batch_sizes = tuple(self.batch_sizes)
            if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                           for b in self.batch_sizes):
                raise QuantbenchError("batch sizes must be numbers >= 1")
        if self.threads is not None:
            self.thread_settings()  # checks them
        # named as the CLI options that set them
        for name, option in (("min_runs", "--min-runs"),
                             ("processes", "--processes"), ("accuracy_batch_size", "the accuracy batch size")):
            if getattr(self, name) < 1:
                raise QuantbenchError(f"{option} must be at least 1, not {getattr(self, name)}")
        n = self.eval_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise QuantbenchError(f"--eval-samples must be a whole number of at least 1, not {self.eval_samples!r}")
        if not self.timing_s > 0:
            raise QuantbenchError(f"--timing-seconds must be above 0 seconds, not {self.timing_s}")
        if not (isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise QuantbenchError(f"--max-drop must be 0 or more accuracy points, not {self.max_drop!r}")
        if not self.round_s > 0 or self.warmup < 0 or not 0 < self.rel_tol < 1:
            raise QuantbenchError("round_s must be above 0, warmup at least 0, rel_tol between 0 and 1")

    def thread_settings(self) -> tuple[int | str, ...]:
        """The thread settings as given, a tuple (a single N or 'all' is one setting): 1 when not
        chosen (timing_defaults chooses for the files' input size)."""
        given = (1,) if self.threads is None else self.threads
        settings = tuple(given) if isinstance(given, (tuple, list)) else (given,)
        if not settings:
            raise QuantbenchError("--bench-threads needs at least one setting: N or 'all'")
        for t in settings:
            if t != "all" and (isinstance(t, bool) or not isinstance(t, int)):
                raise QuantbenchError(f"--bench-threads takes numbers or 'all', not {t!r}")
            if t != "all" and t < 1:
                raise QuantbenchError(f"--bench-threads must be at least 1, not {t}")
        return settings

    def thread_counts(self) -> list[int]:
        """The thread counts to time at, in the order given, 'all' resolved (all_threads()) and
        repeats dropped (1,all on a one-core machine is one setting)."""
        return list(dict.fromkeys(all_threads() if t == "all" else t for t in self.thread_settings()))


# Inputs of at least this many pixels (H x W) are "large": ImageNet-sized models are deployed at
# batch 1 and at a throughput batch, on one core and on all of them, and these are timed unless
# the user chose. Smaller inputs (CIFAR's 32x32) keep batch 1 at 1 thread, so their figures and the
# tests' speed do not change.
LARGE_INPUT_PIXELS = 112 * 112
LARGE_INPUT_TIMING = {"threads": (1, "all"), "batch_sizes": (1, 16)}
SMALL_INPUT_TIMING = {"threads": 1, "batch_sizes": (1,)}


def timing_defaults(cfg: BenchConfig, shapes) -> tuple[BenchConfig, dict | None]:
    """`cfg` with the timing options the user left unset (None) chosen for the files' input
    `shapes` ([C, H, W] each; the largest decides), and a record of that choice for results.json
    (None when the user chose both)."""
    unset = [name for name in ("threads", "batch_sizes") if getattr(cfg, name) is None]
    if not unset:
        return cfg, None
    pixels = max((s[-2] * s[-1] for s in shapes if s and len(s) >= 2), default=0)
    large = pixels >= LARGE_INPUT_PIXELS
    chosen = LARGE_INPUT_TIMING if large else SMALL_INPUT_TIMING
    hw = next(([s[-2], s[-1]] for s in shapes if s and len(s) >= 2 and s[-2] * s[-1] == pixels), None)
    record = {"input_hw": hw, "large": large, "rule": f"inputs of {math.isqrt(LARGE_INPUT_PIXELS)}x"
              f"{math.isqrt(LARGE_INPUT_PIXELS)} pixels and more: threads 1,all and batch sizes 1,16; smaller: "
              "1 thread, batch 1", **{name: chosen[name] for name in unset}}
    return replace(cfg, **{name: chosen[name] for name in unset}), record


def timing_note(record: dict | None, cfg: BenchConfig) -> str | None:
    """The one line saying which timing defaults large inputs got (None for small inputs, whose
    defaults are today's)."""
    if not record or not record.get("large"):
        return None
    h, w = record["input_hw"]
    what = []
    if "batch_sizes" in record:
        what.append("batch " + " and ".join(map(str, cfg.batch_sizes)))
    if "threads" in record:
        every = all_threads()
        what.append(" and ".join(threads_words(every, every) if t == "all" else threads_words(t)
                                 for t in cfg.thread_settings()))
    flags = " / ".join(f for f, name in (("--batch-sizes", "batch_sizes"), ("--bench-threads", "threads"))
                       if name in record)
    return f"inputs of {h}x{w}: timing {' at '.join(what)} (choose with {flags})"


def all_threads() -> int:
    """What --bench-threads all means: the cores this process may use (its affinity), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


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


WARMUP_S = 5.0       # warm-up calls of a model at one batch size: `warmup` of them, about this long at most
SLOW_CALLS_S = 10.0  # rounds of a model whose 5 calls take longer than this are one call each


def measure_latency(workers: dict[str, Worker], cfg: BenchConfig, batch: int, progress=None) -> dict[str, LatencyStats]:
    """Interleaved rounds over all workers (one process per model); returns label -> latency
    stats (+ raw samples, + how busy the rest of the machine was). `min_runs` and `timing_s`
    are per process here."""
    names = list(workers)
    times: dict[str, list[float]] = {n: [] for n in names}
    spent = {n: 0.0 for n in names}
    chunk = {}
    for n in names:  # warm-up, and a first estimate of how many calls fill a round
        warm = cfg.warmup
        if warm:
            # one call first: at 224x224 and batch 16 an fp32 call takes seconds, and `warmup` of them
            # would outlast the worker's deadline; warm up for about WARMUP_S at most
            # (the first call at a batch size may compile for it, as inductor's .pt2 do: as long as loading may take)
            slow = getattr(workers[n], "load_timeout_s", None)
            first = workers[n].ask(op="time", batch=batch, n=1, **({"timeout_s": slow} if slow else {}))["times"][0]
            warm = max(0, min(warm - 1, int(WARMUP_S / max(first, 1e-6))))
        t = workers[n].ask(op="time", batch=batch, n=5, warmup=warm)["times"]
        med = max(statistics.median(t), 1e-6)
        # calls per round: about round_s of them, at least 5 where 5 take under SLOW_CALLS_S
        chunk[n] = min(500, max(int(cfg.round_s / med), 5 if 5 * med < SLOW_CALLS_S else 1))
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
            if (len(times[n]) >= cfg.min_runs and stable) or spent[n] >= cfg.timing_s:
                done.add(n)
            if progress is not None:
                progress.update(1)
        r += 1
    other = probe.other_cores()
    return {n: LatencyStats.of([t * 1000 for t in times[n]], batch, rounds=r, stable=spent[n] < cfg.timing_s,
                               other_cores=other, samples_ms=[round(t * 1000, 4) for t in times[n]])
            for n in names}


def combine_processes(per_process: list[LatencyStats], batch: int) -> LatencyStats:
    """One model's latency over several fresh processes: the median of the per-process medians
    (robust to one process stuck in a slow state), percentiles over all calls pooled."""
    samples = [t for p in per_process for t in p.samples_ms]
    medians = [p.median_ms for p in per_process]
    med = statistics.median(medians)
    others = [p.other_cores for p in per_process if p.other_cores is not None]
    s = LatencyStats.of(samples, batch, processes=len(per_process), process_medians_ms=medians,
                        process_spread=(max(medians) - min(medians)) / med if med else 0.0,
                        other_cores=statistics.fmean(others) if others else None,
                        rounds=sum(p.rounds for p in per_process), stable=all(p.stable for p in per_process),
                        samples_ms=samples)
    s.median_ms = med
    s.throughput_ips = batch * 1000 / med if med else 0.0
    return s


def describe_model(path: Path) -> ModelResult:
    """What the sidecar says a file is (label, method, dtype...); nothing measured yet. Its size
    is the deployment file's plus its companions' (OpenVINO keeps the weights in FILE.bin)."""
    from . import runtimes
    runtime = runtimes.for_path(path)
    rec = read_record(path)
    return ModelResult(label=rec.label or path.stem, file=str(path), method=rec.method, flow=rec.flow or "unknown",
                       runtime=runtime.NAME, dtype=rec.dtype,
                       file_bytes=sum(p.stat().st_size for p in runtime.files(path) if p.is_file()),
                       weight_bytes=rec.weight_bytes, input_shape=list(rec.shape),
                       sidecar=rec.to_dict() if sidecar_path(path).is_file() else {})


def bench(models: list[str | os.PathLike], cfg: BenchConfig) -> BenchResults:
    """Measure every model; the results that report.py renders (and results.json serializes).
    Every file is timed at every (threads, batch size) setting: per thread count, `processes`
    fresh processes per model pinned to that many cores, the thread counts taken in a rotating
    order from one process round to the next (drift spreads over them as over the models).
    Accuracy is measured once per model (the thread count does not change it)."""
    from tqdm import tqdm

    from .cpu import machine_record

    paths = [Path(m) for m in models]
    rows = [describe_model(p) for p in paths]  # checks every file exists and has a runtime
    seen = set()
    for row in rows:  # labels key the table: make them unique
        base, i = row.label, 2
        while row.label in seen:
            row.label, i = f"{base}#{i}", i + 1
        seen.add(row.label)
    cfg, chosen = timing_defaults(cfg, [r.input_shape for r in rows])
    note = timing_note(chosen, cfg)
    if note:
        print(f"[bench] {note}", file=sys.stderr, flush=True)

    processes = cfg.processes
    counts = cfg.thread_counts()
    cpus = {t: pinned_cpus(t) if cfg.pin else None for t in counts}
    accuracy_at = max(counts)  # the one accuracy pass runs where it is fastest: the same answer
    timeouts = worker_timeouts(cfg)
    per_process = replace(cfg, min_runs=math.ceil(cfg.min_runs / processes), timing_s=cfg.timing_s / processes)
    timed: dict[str, dict[tuple[int, int], list[LatencyStats]]] = {
        r.label: {(t, b): [] for t in counts for b in cfg.batch_sizes} for r in rows}
    evaluated: dict[str, dict] = {}  # label -> the worker's accuracy answer (each model's one pass)
    reused: dict[str, str] = {}  # label -> where its predictions were kept (evaluate.PredictionMemo)
    for k in range(processes):
        for t in counts[k % len(counts):] + counts[:k % len(counts)]:
            first = k == 0 and t == counts[0]
            words = f", {threads_words(t, all_threads() if 'all' in cfg.thread_settings() else None)}" \
                if len(counts) > 1 else ""
            workers: dict[str, Worker] = {}
            try:
                for row, p in zip(rows, paths):
                    workers[row.label] = w = Worker(p, t, tuple(row.input_shape), cpus[t],
                                                    timeout_s=timeouts["call"], load_timeout_s=timeouts["load"])
                    if first:  # what does not depend on the process is measured once
                        row.load_s = w.load_s
                        row.ops = OpCounts(**w.ask(op="ops")["ops"])
                        row.status = row.ops.status(row.dtype)
                # Timing first, smallest batch first: each figure is then what a process that ran only
                # the file's load lines gives (a pass at a big batch, as accuracy makes, before can
                # leave batch 1 slower, far slower on oneDNN kernels: docs/torchscript-engine.md).
                for b in sorted(cfg.batch_sizes):
                    with tqdm(desc=f"timing batch {b}{words}, process {k + 1}/{processes}", unit="round",
                              leave=False, disable=not cfg.progress) as bar:
                        stats = measure_latency(workers, per_process, b, bar)
                    for label, st in stats.items():
                        timed[label][(t, b)].append(st)
                measured = k == 0 and t == accuracy_at and cfg.accuracy
                if measured:
                    for row, p in tqdm(list(zip(rows, paths)), desc="accuracy", unit="model", leave=False,
                                       disable=not cfg.progress):
                        question = dict(batch_size=cfg.accuracy_batch_size, samples=cfg.eval_samples,
                                        seed=EVAL_SEED)
                        memo = PredictionMemo(p, cfg.data, question)  # this file measured on these images before?
                        a = memo.get()
                        if a is not None:
                            reused[row.label] = str(memo.file)
                        else:
                            a = workers[row.label].ask(timeout_s=timeouts["accuracy"], op="accuracy",
                                                       data_dir=_str(cfg.data.dir), data_root=_str(cfg.data.root),
                                                       image_size=cfg.data.image_size,
                                                       image_cache=_str(cfg.data.image_cache),
                                                       image_cache_gb=cfg.data.image_cache_gb, **question)
                            memo.put(a)
                        row.accuracy, row.accuracy_n = a["accuracy"], a["n"]
                        evaluated[row.label] = a
                for row in rows:
                    mem = workers[row.label].close()
                    if (measured if cfg.accuracy else first):  # whole process, accuracy run included
                        row.peak_rss_mb = mem["peak_rss_mb"]
                        row.model_rss_mb = workers[row.label].model_rss_mb
            finally:
                for w in workers.values():
                    w.kill()
    for row in rows:
        row.threads = counts[0]
        row.latency = {b: combine_processes(timed[row.label][(counts[0], b)], b) for b in cfg.batch_sizes}
        row.latency_other_threads = {t: {b: combine_processes(timed[row.label][(t, b)], b) for b in cfg.batch_sizes}
                                     for t in counts[1:]}
    predictions, test_images = pair_rows(rows, evaluated)
    config = asdict(cfg)
    config["thread_counts"] = counts
    if "all" in cfg.thread_settings():
        config["all_threads"] = all_threads()
    config["pinned_cpus"] = sorted(cpus[counts[0]]) if cpus[counts[0]] else None
    if len(counts) > 1:
        config["pinned_cpus_by_threads"] = {str(t): sorted(c) if c else None for t, c in cpus.items()}
    config["timing_defaults"] = chosen
    config["eval_seed"] = EVAL_SEED
    config["test_images"] = test_images
    # rows whose accuracy was not measured again: the same file measured on the same images before
    config["accuracy_reused"] = reused
    results = BenchResults(machine=machine_record(counts[0]), config=config,
                           created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), models=derive(rows, predictions))
    results.ship = ship_record(results)
    return results


def pair_rows(rows: list[ModelResult], evaluated: dict[str, dict]) -> tuple[dict[str, list[int]], int | None]:
    """Each row's per-image right/wrong (row.correct) from its accuracy pass, where every row was
    measured on the same images, so that derive() and "ship this" can pair them; returns (label ->
    each image's top-1 class, for the agreement with fp32; the test split's size). A row measured
    on other images (it cannot happen within one bench run; a worker of an older protocol sends
    none) is left unpaired rather than paired wrongly."""
    predictions: dict[str, list[int]] = {}
    images, total = None, None
    for row in rows:
        a = evaluated.get(row.label) or {}
        total = a.get("total", total)
        preds, labels, idx = a.get("predictions"), a.get("labels"), a.get("indices")
        if preds is None or labels is None or idx is None:
            continue
        if not len(preds) == len(labels) == len(idx) == row.accuracy_n:
            continue
        if images is None:
            images = idx
        if idx != images:
            continue
        row.correct = correct_bits([p == y for p, y in zip(preds, labels)])
        predictions[row.label] = preds
    return predictions, total


def ship_record(results: BenchResults) -> list[dict]:
    """"Ship this" at each (threads, batch size) setting as judged now, for results.json
    (report.py words it)."""
    out = []
    for t, b in results.settings():
        rec = recommend(results, batch=b, threads=t)
        out.append(asdict(rec) if rec is not None else {"batch": b, "threads": t, "label": None})
    return out


def worker_timeouts(cfg: BenchConfig) -> dict[str, float]:
    """How long a measuring worker may take to answer, in seconds: one timing call or op count
    well past the whole timing budget (10x, at least a minute) means the model hangs (an ONNX
    Loop of 2**40 iterations) or is hopeless; loading also compiles (at least 5 minutes); the
    accuracy pass runs the whole test set (at least an hour). Past it the worker is killed and
    bench stops with one line naming the file."""
    call = max(60.0, 10 * cfg.timing_s)
    return {"call": call, "load": max(300.0, call), "accuracy": max(3600.0, call)}


def pinned_cpus(threads: int) -> set[int] | None:
    """The cores every measuring process is pinned to: the last `threads` of those this process
    may use (the first core is where the system's own interrupts tend to land). None where the
    OS cannot pin, or when fewer cores are allowed than threads asked for."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return set(allowed[-threads:]) if len(allowed) >= threads else None


def _str(p) -> str | None:
    return None if p is None else str(p)


class AnchoredTiming:
    """Files timed one after another against one anchor file whose measuring process lives
    across calls, in the same interleaved rounds on the same pinned core: on a noisy machine
    absolute times drift, the ratio to an anchor timed alongside does not (tune's latency).
    The anchor should be an int8 file: when other work shares the core, a 6 ms fp32 call is cut
    by the scheduler's time slices far more often than a 0.3 ms int8 call, so ratios to fp32
    swing with the load while ratios between int8 files hold."""

    def __init__(self, shape: tuple[int, ...], seconds: float):
        self.shape, self.cpus = tuple(shape), pinned_cpus(1)
        self.cfg = BenchConfig(timing_s=seconds / 2, min_runs=30, round_s=0.1, warmup=10, accuracy=False,
                               progress=False)
        self._anchor: Worker | None = None

    def time(self, path: Path, anchor: Path | None) -> tuple[float, float]:
        """(median ms of `path`, median ms of the anchor in the same rounds), batch 1. With no
        anchor (None, or `path` itself), the file is timed alone and becomes the anchor."""
        anchor = Path(anchor) if anchor is not None else Path(path)
        if self._anchor is None or self._anchor.path != anchor:
            self.close()
            self._anchor = Worker(anchor, 1, self.shape, self.cpus)
        if anchor == Path(path):
            ms = round(measure_latency({"anchor": self._anchor}, self.cfg, batch=1)["anchor"].median_ms, 4)
            return ms, ms
        trial = Worker(path, 1, self.shape, self.cpus)
        try:
            stats = measure_latency({"anchor": self._anchor, "trial": trial}, self.cfg, batch=1)
        finally:
            trial.kill()
        return round(stats["trial"].median_ms, 4), round(stats["anchor"].median_ms, 4)

    def close(self) -> None:
        if self._anchor is not None:
            self._anchor.kill()
            self._anchor = None
