"""Typed results: what `bench` measures, what `report`, the plots and benchmarks/ read.

results.json is the serialized form (`BenchResults.to_dict()` / `from_dict()`); JSON object keys
are strings, so batch sizes and thread counts become "1", "32" there and ints again here.

Latency is timed at one or more thread settings: a row's `latency` (batch -> stats) is at the
run's first thread setting (`threads`; what every reader before there were several reads), and
`latency_other_threads` (threads -> batch -> stats) holds the others. Files from before them load
as they are: no `threads` (the run's config and machine record say how many), no other settings.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import statistics
from dataclasses import dataclass, field
from typing import Any


class QuantStatus(str, enum.Enum):
    """What the operator counts say about a model, so a silent no-op is never reported as int8."""
    FLOAT = "fp32"                  # an fp32 row: nothing to check
    BF16 = "bf16"                   # a bf16 row: float arithmetic in bf16, no int8 operator expected
    INT8 = "int8"                   # int8 kernels where the model has convolutions / linears
    LINEAR_ONLY = "int8-linear-only"  # e.g. dynamic quantization of a CNN: only the fc layer
    NOT_QUANTIZED = "not-quantized"  # claims int8, runs no int8 operator
    UNCHECKED = "unchecked"         # the runtime could not count its operators


@dataclass
class OpCounts:
    """int8 vs float convolutions and linears in what a runtime really runs."""
    int8_conv: int = 0
    float_conv: int = 0
    int8_linear: int = 0
    float_linear: int = 0

    def add(self, kind: str, int8: bool) -> None:
        name = f"{'int8' if int8 else 'float'}_{kind}"
        setattr(self, name, getattr(self, name) + 1)

    def status(self, dtype: str) -> QuantStatus:
        if dtype == "bf16":  # all its convolutions are float, as they should be: not "not quantized"
            return QuantStatus.BF16
        if dtype != "int8":
            return QuantStatus.FLOAT
        if self.int8_conv + self.int8_linear == 0:
            return QuantStatus.NOT_QUANTIZED
        if self.int8_conv == 0 and self.float_conv > 0:
            return QuantStatus.LINEAR_ONLY
        return QuantStatus.INT8


@dataclass
class LatencyStats:
    """Per-call latency of one model at one batch size (milliseconds), over all its processes."""
    n: int
    median_ms: float
    mean_ms: float
    min_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    iqr_rel: float                   # (p75 - p25) / median
    throughput_ips: float            # images per second at the median
    rounds: int = 0
    stable: bool = True              # the median settled before its timing seconds ran out
    other_cores: float | None = None  # CPU used by other work on the machine while timing
    processes: int = 1
    process_medians_ms: list[float] = field(default_factory=list)
    process_spread: float = 0.0      # (max - min) / median of the per-process medians
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, times_ms: list[float], batch: int = 1, **extra) -> "LatencyStats":
        """Summary of per-call times in milliseconds (median, nearest-rank percentiles)."""
        ms = sorted(times_ms)
        n = len(ms)

        def pct(p: float) -> float:
            return ms[min(n - 1, max(0, round(p / 100 * (n - 1))))]

        med = statistics.median(ms)
        return cls(n=n, median_ms=med, mean_ms=statistics.fmean(ms), min_ms=ms[0], p10_ms=pct(10),
                   p25_ms=pct(25), p75_ms=pct(75), p90_ms=pct(90), p99_ms=pct(99),
                   std_ms=statistics.pstdev(ms), iqr_rel=(pct(75) - pct(25)) / med if med else 0.0,
                   throughput_ips=batch * 1000 / med if med else 0.0, **extra)


@dataclass
class ModelResult:
    """One row of the table: one deployment file, everything measured about it."""
    label: str
    file: str
    method: str                      # origin | dynamic | static | qat
    flow: str
    runtime: str
    dtype: str                       # fp32 | int8 | bf16, as the sidecar claims
    file_bytes: int                  # the deployment file and its companions
    weight_bytes: int | None = None  # the weights' own bytes (from the model before export)
    input_shape: list[int] | None = None
    sidecar: dict = field(default_factory=dict)
    accuracy: float | None = None
    accuracy_n: int | None = None    # how many test images the accuracy rests on (--eval-samples)
    # which of those images the model got right (top-1), in test-split order, as correct_bits()
    # packs them: what pairs two rows' accuracies on the same images (paired_delta)
    correct: str | None = None
    load_s: float | None = None      # loading, and compiling where the runtime compiles
    ops: OpCounts | None = None
    status: QuantStatus = QuantStatus.UNCHECKED
    latency: dict[int, LatencyStats] = field(default_factory=dict)  # at `threads`, the run's first setting
    threads: int | None = None       # the thread count `latency` was timed at
    # the run's other thread settings: threads -> batch -> stats (e.g. all cores beside 1 thread)
    latency_other_threads: dict[int, dict[int, LatencyStats]] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    model_rss_mb: float | None = None
    # derived: ratios against the fp32 row of the same runtime (None when there is none)
    baseline: str | None = None
    speedup: float | None = None
    size_ratio: float | None = None
    accuracy_delta: float | None = None
    accuracy_delta_ci: list[float] | None = None  # 95 % interval of accuracy_delta, from the paired images
    agreement: float | None = None   # % of those images whose top-1 class is the baseline's
    paired_n: int | None = None      # the images accuracy_delta, its interval and agreement rest on
    fastest_fp32: str | None = None
    speedup_vs_fastest_fp32: float | None = None

    def latency_at(self, threads: int | None = None) -> dict[int, LatencyStats]:
        """batch -> stats at `threads` (None: the first setting, `latency`); {} if not timed there."""
        if threads is None or threads == self.threads:
            return self.latency
        return self.latency_other_threads.get(threads, {})

    def median_ms(self, batch: int = 1, threads: int | None = None) -> float | None:
        lat = self.latency_at(threads).get(batch)
        return lat.median_ms if lat else None


@dataclass
class BenchResults:
    machine: dict
    config: dict
    created: str
    models: list[ModelResult]
    replicate: dict | None = None    # how a replicate run made the models
    # "ship this" as bench judged it, one per batch size (Recommendation's fields; {"batch": B,
    # "label": None} where nothing qualified): the pick, its interval, and the ties it has
    ship: list[dict] | None = None

    def by_label(self) -> dict[str, ModelResult]:
        return {m.label: m for m in self.models}

    def batch_sizes(self, threads: int | None = None) -> list[int]:
        """The batch sizes timed at `threads` (None: the first thread setting)."""
        return sorted({b for m in self.models for b in m.latency_at(threads)})

    def thread_counts(self) -> list[int | None]:
        """The thread settings timed, the first (each row's `latency`) first; [None] for rows
        that do not say (made in Python without it)."""
        first = next((m.threads for m in self.models if m.threads is not None), None)
        others = sorted({t for m in self.models for t in m.latency_other_threads} - {first})
        return [first] + others

    def settings(self) -> list[tuple[int | None, int]]:
        """Every (threads, batch size) timed: the first thread setting's batches, then the others'."""
        return [(t, b) for t in self.thread_counts() for b in self.batch_sizes(t)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for m, row in zip(self.models, d["models"]):
            row["status"] = m.status.value
            row["latency"] = {str(b): s for b, s in row["latency"].items()}
            row["latency_other_threads"] = {str(t): {str(b): s for b, s in by_batch.items()}
                                            for t, by_batch in row["latency_other_threads"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResults":
        """The results a results.json holds, every field checked (ResultsFormatError names the
        first bad one): a report must fail in one line before writing anything, not halfway."""
        _check(d, "the file", dict)
        _check(d.get("models"), "models", list)
        models = []
        for i, row in enumerate(d["models"]):
            models.append(_model_result(row, f"models[{i}]"))
        machine = _check(d.get("machine", {}), "machine", dict)
        config = _check(d.get("config", {}), "config", dict)
        for key in ("isa", "versions"):
            _check(machine.get(key), f"machine.{key}", dict, optional=True)
        replicate = _check(d.get("replicate"), "replicate", dict, optional=True)
        for j, s in enumerate(_check((replicate or {}).get("skipped"), "replicate.skipped", list, optional=True) or []):
            _check(s, f"replicate.skipped[{j}]", dict)
            for key in ("row", "why"):
                _check(s.get(key), f"replicate.skipped[{j}].{key}", str)
        ship = _check(d.get("ship"), "ship", list, optional=True)
        for j, s in enumerate(ship or []):
            _check(s, f"ship[{j}]", dict)
            _check(s.get("batch"), f"ship[{j}].batch", int, minimum=1)
            _check(s.get("threads"), f"ship[{j}].threads", int, optional=True, minimum=1)
            _check(s.get("label"), f"ship[{j}].label", str, optional=True)
        return cls(machine=machine, config=config,
                   created=_check(d.get("created", ""), "created", str), models=models, replicate=replicate,
                   ship=ship)


def threads_words(threads: int | None, all_count: int | None = None) -> str:
    """"1 thread", "4 threads", or "all 2 cores" where the count is what 'all' meant (all_count)."""
    if threads is None:
        return "the run's threads"
    if all_count is not None and threads == all_count:
        return f"all {threads} core{'s' if threads != 1 else ''}"
    return f"{threads} thread{'s' if threads != 1 else ''}"


class ResultsFormatError(ValueError):
    """A results.json field that is missing or of the wrong kind; the message names the field."""


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a whole number",
               float: "a number"}


def _check(value, field: str, kind: type, optional: bool = False, minimum: float | None = None,
           maximum: float | None = None):
    """`value` if it is a `kind` (float: any finite number; int: a whole number, not a bool)
    within [minimum, maximum], else ResultsFormatError naming `field`. None passes if optional."""
    if value is None and optional:
        return None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ResultsFormatError(f"{field} must be {_TYPE_NAMES[kind]}, not {_shown(value)}")
    if minimum is not None and value < minimum:
        raise ResultsFormatError(f"{field} must be at least {minimum:g}, not {value!r}")
    if maximum is not None and value > maximum:
        raise ResultsFormatError(f"{field} must be at most {maximum:g}, not {value!r}")
    return value


def _shown(value) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ModelResult's fields read from a file: (kind, optional, minimum, maximum)
_ROW_FIELDS = {
    "label": (str, False, None, None), "file": (str, False, None, None), "method": (str, False, None, None),
    "flow": (str, False, None, None), "runtime": (str, False, None, None), "dtype": (str, False, None, None),
    "file_bytes": (int, False, 0, None), "weight_bytes": (int, True, 0, None), "sidecar": (dict, True, None, None),
    "accuracy": (float, True, 0, 100), "accuracy_n": (int, True, 0, None), "load_s": (float, True, 0, None),
    "peak_rss_mb": (float, True, 0, None), "model_rss_mb": (float, True, 0, None), "baseline": (str, True, None, None),
    "speedup": (float, True, 0, None), "size_ratio": (float, True, 0, None), "accuracy_delta": (float, True, -100, 100),
    "fastest_fp32": (str, True, None, None), "speedup_vs_fastest_fp32": (float, True, 0, None),
    "input_shape": (list, True, None, None), "correct": (str, True, None, None),
    "accuracy_delta_ci": (list, True, None, None), "agreement": (float, True, 0, 100),
    "paired_n": (int, True, 0, None), "threads": (int, True, 1, None),
}
_LATENCY_INTS = ("n", "rounds", "processes")
_LATENCY_LISTS = ("process_medians_ms", "samples_ms")


def _model_result(row, where: str) -> ModelResult:
    _check(row, where, dict)
    row = dict(row)
    for name, (kind, optional, lo, hi) in _ROW_FIELDS.items():
        _check(row.get(name), f"{where}.{name}", kind, optional, lo, hi)
    for j, d in enumerate(row.get("input_shape") or []):
        _check(d, f"{where}.input_shape[{j}]", int, minimum=1)
    ci = row.get("accuracy_delta_ci")
    if ci is not None:
        if len(ci) != 2:
            raise ResultsFormatError(f"{where}.accuracy_delta_ci must be [low, high], not {_shown(ci)}")
        for j, x in enumerate(ci):
            _check(x, f"{where}.accuracy_delta_ci[{j}]", float, minimum=-100, maximum=100)
    if row.get("correct") is not None:
        try:
            decode_correct(row["correct"], row.get("accuracy_n"))
        except ValueError as e:
            raise ResultsFormatError(f"{where}.correct: {e}") from e
    sidecar = row.get("sidecar") or {}
    for j, w in enumerate(_check(sidecar.get("warnings"), f"{where}.sidecar.warnings", list, optional=True) or []):
        _check(w, f"{where}.sidecar.warnings[{j}]", str)
    _check(sidecar.get("engine"), f"{where}.sidecar.engine", str, optional=True)
    row["sidecar"] = sidecar
    row["latency"] = _latency(row.get("latency"), f"{where}.latency")
    other = {}
    for t, by_batch in (_check(row.get("latency_other_threads"), f"{where}.latency_other_threads", dict,
                               optional=True) or {}).items():
        if not str(t).isdigit() or int(t) < 1:
            raise ResultsFormatError(f"{where}.latency_other_threads has a thread count {t!r}; thread counts are "
                                     "whole numbers >= 1")
        other[int(t)] = _latency(_check(by_batch, f"{where}.latency_other_threads[{t!r}]", dict),
                                 f"{where}.latency_other_threads[{t!r}]")
    row["latency_other_threads"] = other
    ops = _check(row.get("ops"), f"{where}.ops", dict, optional=True)
    if ops:
        for f in dataclasses.fields(OpCounts):
            _check(ops.get(f.name, 0), f"{where}.ops.{f.name}", int, minimum=0)
    row["ops"] = OpCounts(**{f.name: ops.get(f.name, 0) for f in dataclasses.fields(OpCounts)}) if ops else None
    status = row.get("status", "unchecked")
    try:
        row["status"] = QuantStatus(status)
    except ValueError as e:
        raise ResultsFormatError(f"{where}.status must be one of {', '.join(s.value for s in QuantStatus)}, "
                                 f"not {_shown(status)}") from e
    return ModelResult(**{k: v for k, v in row.items() if k in _ROW_KNOWN})


def _latency(d, where: str) -> dict[int, LatencyStats]:
    """batch -> LatencyStats from a results.json object, every field checked."""
    latency = {}
    for b, st in (_check(d, where, dict, optional=True) or {}).items():
        at = f"{where}[{b!r}]"
        if not str(b).isdigit() or int(b) < 1:
            raise ResultsFormatError(f"{where} has a batch size {b!r}; batch sizes are whole numbers >= 1")
        _check(st, at, dict)
        for f in dataclasses.fields(LatencyStats):
            v = st.get(f.name)
            if f.name in _LATENCY_INTS:
                _check(v, f"{at}.{f.name}", int, optional=f.name != "n", minimum=0)
            elif f.name in _LATENCY_LISTS:
                for k, x in enumerate(_check(v, f"{at}.{f.name}", list, optional=True) or []):
                    _check(x, f"{at}.{f.name}[{k}]", float, minimum=0)
            elif f.name == "stable":
                _check(v, f"{at}.stable", bool, optional=True)
            else:  # times, ratios, throughput, cores: non-negative numbers
                _check(v, f"{at}.{f.name}", float, optional=f.default is not dataclasses.MISSING, minimum=0)
        try:
            latency[int(b)] = LatencyStats(**{k: v for k, v in st.items() if k in _LATENCY_FIELDS and v is not None})
        except TypeError as e:
            raise ResultsFormatError(f"{at}: {e}") from e
    return latency


_ROW_KNOWN = {f.name for f in dataclasses.fields(ModelResult)}
_LATENCY_FIELDS = {f.name for f in dataclasses.fields(LatencyStats)}


# ---------------------------------------------------------------- paired accuracy
# Two models evaluated on the same images differ only where one is right and the other wrong
# (the discordant pairs); images both get right, or both wrong, say nothing about the difference.
# The 95 % interval of a difference of accuracies is the union of two intervals, each good where
# the other fails:
# - a paired bootstrap over the images (resample the n images with replacement, 10,000 times,
#   fixed seed; the 2.5th and 97.5th percentiles). The difference depends only on how many
#   resampled images fall in each cell (A right B wrong, A wrong B right, the rest), so one
#   resample is one multinomial draw of those counts: exactly the image-level bootstrap, in
#   microseconds for any n. It is unconditional, so right when the models really differ; but
#   with few discordant pairs, all one way, it cannot include 0 (4 images lost, none gained:
#   [-0.8, -0.1] points on 1,000 images) although such a split happens by chance 1 time in 8;
# - the exact McNemar-style interval: Clopper-Pearson on the share of the discordant pairs that
#   favour A, times the discordant rate. Exact for few pairs (4 vs 0: [-0.40, +0.08]), but it
#   takes the number of discordant pairs as fixed, and so is too narrow when the accuracies
#   differ by much of the discordant rate (0.87x the width for 3 % vs 1 %).
# The union covers both cases; it needs only the three counts (which results.json keeps, so the
# report can pair any two rows again), is deterministic, and is [0, 0] for identical predictions.
BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def paired_interval(n: int, a_only: int, b_only: int, draws: int = BOOTSTRAP_DRAWS,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % interval, in accuracy points, of accuracy(A) - accuracy(B) on n images of which
    `a_only` only A and `b_only` only B got right (see above: bootstrap and exact, united)."""
    lo_b, hi_b = bootstrap_interval(n, a_only, b_only, draws, seed)
    lo_e, hi_e = mcnemar_interval(n, a_only, b_only)
    return min(lo_b, lo_e), max(hi_b, hi_e)


def bootstrap_interval(n: int, a_only: int, b_only: int, draws: int = BOOTSTRAP_DRAWS,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The paired bootstrap over images' percentile interval (points), as multinomial draws."""
    import numpy as np
    if n <= 0:
        raise ValueError("no paired images")
    if a_only + b_only == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    p = [a_only / n, b_only / n, max(0.0, 1.0 - (a_only + b_only) / n)]
    counts = rng.multinomial(n, p, size=draws)
    diff = (counts[:, 0] - counts[:, 1]) * (100.0 / n)
    tail = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(diff, [tail, 1 - tail])
    return round(float(lo), 4), round(float(hi), 4)


def mcnemar_interval(n: int, a_only: int, b_only: int) -> tuple[float, float]:
    """The exact interval (points) given the discordant pairs: Clopper-Pearson bounds of the
    share of them that favour A, mapped to a difference of accuracies."""
    import numpy as np
    if n <= 0:
        raise ValueError("no paired images")
    d = a_only + b_only
    if d == 0:
        return 0.0, 0.0
    k = np.arange(d + 1)
    # log of the binomial coefficients C(d, k), by their running ratio (no overflow for any d)
    log_c = np.concatenate([[0.0], np.cumsum(np.log(d - k[1:] + 1.0) - np.log(k[1:]))])

    def cdf(x: int, p: float) -> float:  # P(X <= x), X ~ Binomial(d, p)
        if x < 0:
            return 0.0
        if x >= d:
            return 1.0
        logs = log_c[:x + 1] + k[:x + 1] * np.log(p) + (d - k[:x + 1]) * np.log1p(-p)
        top = logs.max()
        return float(min(1.0, np.exp(top) * np.exp(logs - top).sum()))

    def solve(f) -> float:  # the p in (0, 1) where the decreasing f crosses 0
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        return (lo + hi) / 2

    tail = (1 - CONFIDENCE) / 2
    p_lo = 0.0 if a_only == 0 else solve(lambda p: tail - (1 - cdf(a_only - 1, p)))
    p_hi = 1.0 if a_only == d else solve(lambda p: cdf(a_only, p) - tail)
    scale = 100.0 * d / n
    return round(scale * (2 * p_lo - 1), 4), round(scale * (2 * p_hi - 1), 4)


def correct_bits(correct) -> str:
    """Per-image right/wrong (a sequence of bools, in test-split order) packed 8 to a byte, base64."""
    import base64

    import numpy as np
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def decode_correct(bits: str, n: int | None):
    """correct_bits() read back: a bool array of n images (ValueError if it does not hold n)."""
    import base64
    import binascii

    import numpy as np
    if n is None:
        raise ValueError("per-image results without accuracy_n")
    try:
        raw = base64.b64decode(bits.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError("not base64") from e
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"holds {len(raw) * 8} images' results, accuracy_n is {n}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n].astype(bool)


@dataclass
class PairedDelta:
    """accuracy(A) - accuracy(B) on the images both were measured on, with its 95 % interval."""
    delta: float
    low: float
    high: float
    n: int

    def includes(self, x: float) -> bool:
        return self.low <= x <= self.high


def paired_delta(a: ModelResult, b: ModelResult) -> PairedDelta | None:
    """A's accuracy minus B's, paired image by image; None unless both rows carry per-image
    results on the same number of images (the same seeded subset: bench measures every row on
    the same images)."""
    if a.correct is None or b.correct is None or a.accuracy_n != b.accuracy_n or not a.accuracy_n:
        return None
    ca, cb = decode_correct(a.correct, a.accuracy_n), decode_correct(b.correct, b.accuracy_n)
    n = a.accuracy_n
    a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
    lo, hi = paired_interval(n, a_only, b_only)
    return PairedDelta(delta=100.0 * (a_only - b_only) / n, low=lo, high=hi, n=n)


def derive(rows: list[ModelResult], predictions: dict | None = None) -> list[ModelResult]:
    """Ratios against baselines: the fp32 row of the same runtime (left empty when the run has
    none: a ratio against another runtime's fp32 would mix two effects), and the fastest fp32 row
    of any runtime. The accuracy delta against that fp32 row is paired on the same images where
    both rows carry per-image results: its 95 % interval (accuracy_delta_ci) and, with
    `predictions` (label -> each image's top-1 class, from bench), the agreement of top-1 classes."""
    fp32 = [r for r in rows if r.dtype == "fp32"]
    timed = [r for r in fp32 if r.median_ms()]
    fastest = min(timed, key=lambda r: r.median_ms(), default=None)
    predictions = predictions or {}
    for r in rows:
        base = next((f for f in fp32 if f.runtime == r.runtime), None)
        r.baseline = base.label if base else None
        r.fastest_fp32 = fastest.label if fastest else None
        if base and r.median_ms() and base.median_ms():
            r.speedup = base.median_ms() / r.median_ms()
        if fastest and r.median_ms():
            r.speedup_vs_fastest_fp32 = fastest.median_ms() / r.median_ms()
        if base:
            r.size_ratio = r.file_bytes / base.file_bytes
            if r.accuracy is not None and base.accuracy is not None:
                r.accuracy_delta = r.accuracy - base.accuracy
            pair = paired_delta(r, base) if r is not base else None  # the baseline itself: nothing to pair
            if pair is not None:
                r.accuracy_delta_ci, r.paired_n = [pair.low, pair.high], pair.n
                mine, theirs = predictions.get(r.label), predictions.get(base.label)
                if mine is not None and theirs is not None and len(mine) == len(theirs) == pair.n:
                    import numpy as np
                    r.agreement = 100.0 * float(np.mean(np.asarray(mine) == np.asarray(theirs)))
    return rows


# dtypes "ship this" picks from: int8 rows, and bf16 rows (no calibration, where the CPU has bf16)
CANDIDATE_DTYPES = ("int8", "bf16")


@dataclass
class Recommendation:
    """"Ship this": the fastest int8 or bf16 row at most `max_drop` accuracy points below fp32, at one batch
    size, and how sure the measurement is of that: its delta's 95 % interval, whether the interval
    includes 0 (not distinguishable from fp32) or -max_drop (whether it is within --max-drop is
    not settled), and the next candidate (the next fastest row that qualifies) paired against it."""
    label: str
    file: str
    runtime: str
    batch: int
    median_ms: float
    accuracy_delta: float          # against the fp32 model's accuracy
    max_drop: float
    speedup_vs_fastest_fp32: float | None
    fastest_fp32: str | None
    accuracy_delta_ci: list[float] | None = None
    accuracy_n: int | None = None  # the images the delta and its interval rest on
    fp32_tie: bool | None = None   # the interval includes 0: not distinguishable from fp32
    threshold_inside: bool | None = None  # the interval includes -max_drop
    runner_up: str | None = None   # the next candidate
    runner_up_ms: float | None = None
    runner_up_diff: float | None = None  # its accuracy minus the pick's, points, paired
    runner_up_ci: list[float] | None = None
    runner_up_tie: bool | None = None  # the interval of runner_up_diff includes 0
    # faster int8 rows left out by their delta alone, whose interval reaches -max_drop: not
    # distinguishable from qualifying on these images
    borderline: list[str] = field(default_factory=list)
    threads: int | None = None     # the thread setting timed (None: a run that does not say)


def max_drop_of(results: BenchResults) -> float:
    """The accuracy points below fp32 that the run's "ship this" accepts (bench --max-drop)."""
    v = (results.config or {}).get("max_drop")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.3


def _vs_fp32(m: ModelResult, reference: ModelResult | None) -> tuple[float | None, PairedDelta | None]:
    """The row's delta against fp32 for "ship this": its own runtime's fp32 row (derive's
    accuracy_delta), else the reference fp32 row (the most accurate), paired where it can be."""
    if m.accuracy_delta is not None:
        ci = m.accuracy_delta_ci
        pair = PairedDelta(m.accuracy_delta, ci[0], ci[1], m.paired_n or m.accuracy_n or 0) if ci else None
        return m.accuracy_delta, pair
    if reference is None:
        return None, None
    pair = paired_delta(m, reference)
    return (pair.delta if pair else m.accuracy - reference.accuracy), pair


def recommend(results: BenchResults, max_drop: float | None = None, batch: int = 1,
              threads: int | None = None) -> Recommendation | None:
    """The fastest int8 or bf16 model at `batch` and `threads` (None: the run's first thread setting)
    whose top-1 is at most `max_drop` points (default: the
    run's --max-drop, 0.3 for runs made before it existed) below the fp32
    model's (its own runtime's fp32 row, else the most accurate fp32 row); None when no int8
    or bf16 row qualifies (or nothing was measured at that setting). A row qualifies by its measured
    delta; the intervals say how far the measurement settles it (see Recommendation)."""
    if max_drop is None:
        max_drop = max_drop_of(results)
    if threads is None:
        threads = results.thread_counts()[0]

    def ms_of(m: ModelResult) -> float | None:
        return m.median_ms(batch, threads)

    fp32 = [m for m in results.models if m.dtype == "fp32" and m.accuracy is not None]
    reference = max(fp32, key=lambda m: m.accuracy, default=None)
    timed_fp32 = [m for m in results.models if m.dtype == "fp32" and ms_of(m)]
    fastest = min(timed_fp32, key=ms_of, default=None)
    picks, left_out = [], []
    for m in results.models:
        if m.dtype not in CANDIDATE_DTYPES or m.status is QuantStatus.NOT_QUANTIZED or m.accuracy is None:
            continue
        if not ms_of(m):  # not timed at this batch size and thread setting
            continue
        delta, pair = _vs_fp32(m, reference)
        if delta is not None and delta >= -max_drop:
            picks.append((ms_of(m), m, delta, pair))
        elif pair is not None and pair.high >= -max_drop:
            left_out.append((ms_of(m), m))
    if not picks:
        return None
    picks.sort(key=lambda p: p[0])
    ms, m, delta, pair = picks[0]
    rec = Recommendation(label=m.label, file=m.file, runtime=m.runtime, batch=batch, median_ms=ms,
                         accuracy_delta=delta, max_drop=max_drop,
                         speedup_vs_fastest_fp32=ms_of(fastest) / ms if fastest else None,
                         fastest_fp32=fastest.label if fastest else None,
                         accuracy_n=pair.n if pair else m.accuracy_n,
                         borderline=[x.label for t, x in sorted(left_out, key=lambda p: p[0]) if t < ms],
                         threads=threads)
    if pair is not None:
        rec.accuracy_delta_ci = [pair.low, pair.high]
        rec.fp32_tie, rec.threshold_inside = pair.includes(0.0), pair.includes(-max_drop)
    if len(picks) > 1:
        r_ms, r = picks[1][0], picks[1][1]
        rec.runner_up, rec.runner_up_ms = r.label, r_ms
        vs = paired_delta(r, m)
        if vs is not None:
            rec.runner_up_diff, rec.runner_up_ci, rec.runner_up_tie = vs.delta, [vs.low, vs.high], vs.includes(0.0)
        elif r.accuracy is not None:
            rec.runner_up_diff = r.accuracy - m.accuracy
    return rec
