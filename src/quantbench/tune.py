"""quantbench tune: the fastest (or smallest) int8 deployment that stays within an accuracy budget.

    fp32 checkpoint  ->  validation split carved from the TRAINING data
                     ->  the fp32 model's validation accuracy (the budget's reference)
                     ->  trials, cheap and likely-good first:
                           1. each flow's and runtime's default int8 (+ dynamic where Linear dominates)
                              then the fp32 file of each runtime, for comparison (never picked)
                           2. other calibration choices, for the paths that missed the budget
                           3. fp32 fallback of the layers that hurt most, for the torch flows still missing it
                     ->  the pick, measured once on the test split  ->  tune.md

Each trial is a real deployment file made by the same code as `quantbench quantize` (or a
runtime's exporter), then
  accuracy  on the validation images (never the test split: choosing among many trials by test
            accuracy would tune on the test set and overstate what the pick delivers);
  latency   batch 1, one thread, timed in short interleaved rounds against one anchor process
            that lives through the whole search, pinned to the same core: on a noisy machine
            absolute times drift, the ratio to an anchor timed in the same rounds does not. The
            anchor is the first int8 file made, not the fp32 model: when other work shares the
            core, a 6 ms fp32 call is cut by the scheduler's time slices far more often than a
            0.3 ms int8 call, so int8-to-fp32 ratios swing with the load while int8-to-int8 ones
            hold. The fp32 files of every runtime are put on the same scale (never picked), so
            the pick can be compared with fp32 TorchScript and with the fastest fp32 deployment;
  size      the deployment files' bytes.

Nothing is lost when the search stops: every trial is appended to tune.jsonl as it finishes; the
best file so far is copied (atomically) to best.<suffix> with best.json beside it; `resume`
replays tune.jsonl and makes only what is missing. When no trial meets the budget the search says
so, and best.* holds the most accurate trial and fastest.* the fastest one.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, get_args

from torch import nn

from . import runtimes
from .data import Batches, Dataset, DataSource
from .errors import QuantbenchError, cause
from .export import prune_for_export, sidecar_path
from .fileio import atomic_path, write_json, write_text
from .flows import get_flow, quantizable_layers, suffix
from .flows.qconfigs import Scheme
from .quantize import QuantizeConfig, export_origin, quantize_to_file

Objective = Literal["latency", "size"]
TUNE_FILES = ("tune.jsonl", "tune.json", "tune.md", "best.json")

# Calibration choices tried after a path's default misses the budget, most often helpful first:
# clipping outliers (percentile), then plain ranges, then ranges averaged over batches.
CALIBRATION_VARIANTS: tuple[dict, ...] = (
    {"observer": "percentile"},
    {"observer": "minmax"},
    {"observer": "moving-average"},
    {"act_scheme": "symmetric"},
    {"equalize": True},   # cross-layer equalization (torch flows only: quantbench.equalize)
)
FALLBACK_SIZES = (1, 2, 4, 8, 16)  # layers kept fp32, tried in this order until the budget is met


@dataclass(frozen=True)
class TuneConfig:
    """One search; checked when made, so a bad option fails before any work."""
    checkpoint: Path
    data: DataSource = field(default_factory=DataSource)
    output: Path = Path("runs/tune")
    max_drop: float = 0.3                 # validation accuracy points below fp32 that are acceptable
    time_budget_s: float | None = None    # stop starting trials after this long (all sessions of a resumed run)
    objective: Objective = "latency"
    flows: tuple[str, ...] = ("eager", "fx", "pt2e")
    runtimes: tuple[str, ...] | None = None   # comparison runtimes with an exporter; None: every installed one
    # the template every torch trial is made from (qconfig, calibration images and transform,
    # pruning, engine, the user's model builder); method, flow, observer... are set per trial
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(method="static", calib_samples=1000))
    val_samples: int = 2000
    timing_s: float = 4.0                 # seconds of interleaved timing per trial (trial + reference)
    sensitivity: Path | None = None       # a sensitivity.json ranking the layers; None: ranked here by SQNR
    max_fallback: int = 16
    resume: bool = False
    seed: int = 0

    def __post_init__(self):
        from .flows import FLOWS
        object.__setattr__(self, "flows", tuple(self.flows))
        if self.objective not in get_args(Objective):
            raise QuantbenchError(f"unknown objective {self.objective!r}; choose from {', '.join(get_args(Objective))}")
        if not (isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop)):
            raise QuantbenchError(f"--max-drop must be a number of accuracy points, not {self.max_drop!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise QuantbenchError(f"--time-budget must be above 0, not {self.time_budget_s}")
        for f in self.flows:
            if f not in FLOWS:
                raise QuantbenchError(f"unknown flow {f!r}; choose from {', '.join(FLOWS)}")
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", runtimes.check_exporters(self.runtimes))
        if not self.flows and not self.runtimes and self.runtimes is not None:
            raise QuantbenchError("tune needs at least one flow or runtime to search")
        if self.val_samples < 20:
            raise QuantbenchError(f"--val-samples must be at least 20 (a budget of tenths of a point needs "
                                  f"hundreds of images to mean anything), not {self.val_samples}")
        if not self.timing_s > 0 or self.max_fallback < 0:
            raise QuantbenchError("timing_s must be above 0 and max_fallback at least 0")
        if self.sensitivity is not None and not Path(self.sensitivity).is_file():
            raise QuantbenchError(f"no sensitivity file {self.sensitivity}")


# ---------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Candidate:
    """One deployment to try: a torch flow's int8 file, or a runtime's fp32/int8 file."""
    path: str                             # "eager" | "fx" | "pt2e" | a runtime name ("openvino", ...)
    method: str = "static"                # "static", "dynamic", or "origin" (an fp32 reference)
    scheme: tuple[tuple[str, str], ...] = ()   # calibration overrides, e.g. (("observer", "minmax"),)
    fp32_layers: tuple[str, ...] = ()

    @property
    def is_runtime(self) -> bool:
        return self.path not in ("eager", "fx", "pt2e")

    @property
    def reference(self) -> bool:
        return self.method == "origin"

    @property
    def key(self) -> str:
        """Names the trial in tune.jsonl (and is how --resume recognises it)."""
        parts = [self.path, self.method] + [f"{k}={v}" for k, v in self.scheme]
        if self.fp32_layers:
            parts.append(f"fp32[{len(self.fp32_layers)}]=" + ",".join(self.fp32_layers))
        return " ".join(parts)

    def describe(self) -> str:
        what = {"origin": "fp32", "static": "static int8", "dynamic": "dynamic int8"}[self.method]
        opts = ", ".join("equalized" if k == "equalize" else f"{k} {v}" for k, v in self.scheme)
        fb = f", {len(self.fp32_layers)} layer(s) kept fp32" if self.fp32_layers else ""
        return f"{self.path} {what}" + (f" ({opts})" if opts else "") + fb


@dataclass
class Trial:
    """What one candidate measured (a line of tune.jsonl)."""
    index: int
    key: str
    candidate: dict
    file: str | None = None
    val_acc: float | None = None
    drop: float | None = None             # fp32 validation accuracy - val_acc (points)
    latency_ms: float | None = None       # batch 1, median
    anchor_latency_ms: float | None = None  # the anchor in the same rounds
    ratio: float | None = None            # latency_ms / anchor_latency_ms: what the objective compares
    anchor: bool = False                  # this trial's file is the anchor (its ratio is 1)
    file_bytes: int | None = None
    within_budget: bool = False
    reference: bool = False               # an fp32 file: measured for comparison, never picked
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.val_acc is not None


REFERENCE = Candidate("torchscript", "origin")  # fp32 TorchScript: the accuracy reference


def _candidate(d: dict) -> Candidate:
    """A Candidate from its tune.jsonl form (JSON turned its tuples into lists)."""
    return Candidate(d["path"], d["method"], tuple(tuple(kv) for kv in d["scheme"]), tuple(d["fp32_layers"]))


def _variant(c: Candidate, **scheme) -> Candidate:
    return dataclasses.replace(c, scheme=tuple(sorted(scheme.items())))


# ---------------------------------------------------------------- the search
class Search:
    """Holds what the search needs between trials (data, reference worker, results so far)."""

    def __init__(self, cfg: TuneConfig, progress: bool = True):
        from .models import read_checkpoint
        from .sensitivity import validation_split
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output)
        self.trials_dir = self.out / "trials"
        _, self.meta = read_checkpoint(cfg.checkpoint)
        # load_for checks the data against the checkpoint's classes and shape, and normalizes as it was trained
        self.data: Dataset = cfg.data.load_for(self.meta, f"checkpoint {cfg.checkpoint}", train=True,
                                               progress=progress)
        # calibration reads val.train; accuracy val.test: both from the training split, apart
        self.val = validation_split(self.data, cfg.val_samples, cfg.seed)
        self.trials: dict[str, Trial] = {}
        self.started = time.perf_counter()
        self.spent_before = 0.0           # seconds of earlier sessions of a resumed search
        self.fp32_acc: float | None = None
        self.ref_file = self.trials_dir / "ref-torchscript-fp32.pt"
        self.anchor: Trial | None = None
        self._anchor_worker = None
        self._ranking: list[str] | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def replay(self) -> None:
        """--resume: the trials tune.jsonl already holds (a line cut short by a kill is ignored)."""
        path = self.out / "tune.jsonl"
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "trial":
                t = Trial(**{k: v for k, v in rec.items() if k in {f.name for f in dataclasses.fields(Trial)}})
                self.trials[t.key] = t
                self.spent_before += t.seconds
                if t.anchor:
                    self.anchor = t
            elif rec.get("type") == "fp32" and (self.out / rec["file"]).is_file():
                self.fp32_acc = rec["val_acc"]
            elif rec.get("type") == "start":
                if rec.get("checkpoint_sha256") != _sha(self.cfg.checkpoint) or rec.get("config") != _shaping(self.cfg):
                    raise QuantbenchError(f"{path} belongs to another search (another checkpoint or other "
                                          f"options); use another --output, or drop --resume to start over")

    def _log_line(self, rec: dict) -> None:
        """Append one JSON line and flush it to disk: a kill loses at most the trial in progress."""
        path = self.out / "tune.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def reference_accuracy(self) -> float:
        """The fp32 model's validation accuracy, from its TorchScript file (made once)."""
        if self.fp32_acc is None:
            q = self.cfg.quantize
            export_origin(self.cfg.checkpoint, self.ref_file, "eager", self.val, model_spec=q.model, prune=q.prune)
            self.fp32_acc = round(self.accuracy(self.ref_file), 2)
            self._log_line({"type": "fp32", "file": str(self.ref_file.relative_to(self.out)),
                            "val_acc": self.fp32_acc})
            _log(f"fp32: val {self.fp32_acc:.2f} % on {self.cfg.val_samples} images held out of the training split")
        return self.fp32_acc

    def record(self, t: Trial) -> None:
        if self.anchor is None and t.ratio is not None:
            t.anchor, self.anchor = True, t
        self.trials[t.key] = t
        self._log_line({"type": "trial", **dataclasses.asdict(t)})
        self.save_best()

    # -- the candidates, in order ----------------------------------------------------------------
    def wanted_runtimes(self) -> tuple[str, ...]:
        if self.cfg.runtimes is not None:
            return self.cfg.runtimes
        return tuple(r for r in runtimes.exporters() if _installed(r))

    def candidates(self) -> Iterator[Candidate]:
        """Cheap, likely-good trials first; later stages look at the results of earlier ones, so
        this is a generator (a resumed search replays the same order from tune.jsonl)."""
        cfg = self.cfg
        model = self._float_model()
        linear_share = _linear_share(model)
        rts = self.wanted_runtimes()
        # 1. each path's default int8 (the first one made becomes the latency anchor)
        firsts = [Candidate(f) for f in cfg.flows] + [Candidate(rt) for rt in rts]
        if linear_share >= 0.25:  # dynamic int8 only speeds up Linear layers
            firsts = [Candidate(f, "dynamic") for f in cfg.flows if "dynamic" in get_flow(f).METHODS] + firsts
        yield from firsts
        # then the fp32 references on the same scale: TorchScript and each runtime's
        yield REFERENCE
        for rt in rts:
            yield Candidate(rt, "origin")
        # 2. calibration choices for the static paths that missed the budget, fastest first
        for base in self._missed([c for c in firsts if c.method == "static"]):
            if base.is_runtime and not _takes_scheme(base.path):
                continue
            for v in CALIBRATION_VARIANTS:
                if self._met(base.path):
                    break
                if base.is_runtime and "equalize" in v:
                    continue
                yield _variant(base, **v)
        # 3. fp32 fallback of the most sensitive layers, for the torch flows still missing it
        for base in self._missed([c for c in firsts if c.method == "static" and not c.is_runtime]):
            if self._met(base.path):
                continue
            best = self._best_of(base.path)  # fallback on top of that path's most accurate calibration
            start = _candidate(best.candidate) if best else base
            ranking = self.ranking()
            most = min(cfg.max_fallback, len(ranking))
            for k in sorted({min(k, most) for k in FALLBACK_SIZES}):  # capped, each size once
                if k < 1 or self._met(base.path):
                    break
                yield dataclasses.replace(start, fp32_layers=tuple(ranking[:k]))

    def _missed(self, cands: list[Candidate]) -> list[Candidate]:
        """Those whose trial ran but missed the budget, fastest first (their best case)."""
        missed = [c for c in cands if (t := self.trials.get(c.key)) is not None and t.ok and not t.within_budget]
        return sorted(missed, key=lambda c: self.trials[c.key].ratio or math.inf)

    def _met(self, path: str) -> bool:
        return any(t.within_budget and t.candidate["path"] == path for t in self.trials.values())

    def _best_of(self, path: str) -> Trial | None:
        ok = [t for t in self.trials.values() if t.ok and t.candidate["path"] == path
              and t.candidate["method"] == "static" and not t.candidate["fp32_layers"]]
        return max(ok, key=lambda t: t.val_acc, default=None)

    def ranking(self) -> list[str]:
        """Layers most worth keeping fp32 first: from a sensitivity.json when given, else by the
        int8 error at each layer's output in the fully int8 FX model (one calibration, PyTorch's
        numeric suite: lowest SQNR first)."""
        if self._ranking is None:
            if self.cfg.sensitivity is not None:
                from .fileio import read_json
                from .sensitivity import most_sensitive
                n = len(read_json(self.cfg.sensitivity).get("layers") or [])
                self._ranking = list(most_sensitive(self.cfg.sensitivity, n))
            else:
                try:
                    self._ranking = sqnr_ranking(self._float_model(), self.val, self.cfg.quantize, self.meta)
                except Exception as e:  # noqa: BLE001 - a model FX cannot trace: no fallback stage
                    _log(f"no fp32 fallback trials: the layers could not be ranked ({cause(e)}); "
                         f"pass --sensitivity from `quantbench sensitivity --flow pt2e`")
                    self._ranking = []
        return self._ranking

    def _float_model(self) -> nn.Module:
        from .models import load_checkpoint
        model, _ = load_checkpoint(self.cfg.checkpoint, num_classes=self.data.num_classes,
                                   model=self.cfg.quantize.model)
        return model.eval()

    # -- one trial -------------------------------------------------------------------------------
    def run(self, c: Candidate, index: int) -> Trial:
        t0 = time.perf_counter()
        trial = Trial(index=index, key=c.key, candidate=dataclasses.asdict(c), reference=c.reference)
        try:
            path = self.make(c, index)
            trial.file = str(path.relative_to(self.out))
            trial.file_bytes = sum(p.stat().st_size for p in runtimes.for_path(path).files(path) if p.is_file())
            trial.val_acc = round(self.accuracy(path), 2)
            trial.drop = round(self.fp32_acc - trial.val_acc, 2)
            trial.within_budget = not c.reference and trial.drop <= self.cfg.max_drop
            trial.latency_ms, trial.anchor_latency_ms = self.latency(path)
            trial.ratio = round(trial.latency_ms / trial.anchor_latency_ms, 4)
        except QuantbenchError as e:  # one trial's failure (a flow that cannot trace...) is a result
            trial.error = str(e)
        except Exception as e:  # noqa: BLE001 - a library's crash on one config must not end the search
            trial.error = f"{type(e).__name__}: {cause(e)}"
        trial.seconds = round(time.perf_counter() - t0, 1)
        return trial

    def make(self, c: Candidate, index: int) -> Path:
        """The deployment file of a candidate (made by quantize's or the runtime's own code)."""
        cfg, q = self.cfg, self.cfg.quantize
        self.trials_dir.mkdir(parents=True, exist_ok=True)
        slug = f"{index:03d}-" + "-".join([c.path, c.method] + [k if v is True else str(v) for k, v in c.scheme]
                                          + ([f"fp32x{len(c.fp32_layers)}"] if c.fp32_layers else []))
        if c == REFERENCE:  # made for the budget's reference accuracy already
            return self.ref_file
        if c.is_runtime:
            return self._runtime_file(c, slug)
        path = self.trials_dir / f"{slug}{suffix(c.path)}"
        qcfg = q.replace(method=c.method, flow=c.path, fp32_layers=tuple(q.fp32_layers) + c.fp32_layers,
                         seed=cfg.seed, **dict(c.scheme))
        quantize_to_file(cfg.checkpoint, path, qcfg, self.val, progress=False)
        return path

    def _runtime_file(self, c: Candidate, slug: str) -> Path:
        """A runtime's exporter writes its fp32 and int8 files together: the origin candidate and
        the default int8 one share a folder."""
        from .models import load_checkpoint
        q = self.cfg.quantize
        mod = runtimes.get(c.path)
        folder = self.trials_dir / (f"{c.path}-default" if not c.scheme else slug)
        fp32_file, int8_file = (folder / f for f in mod.FILES)
        want = fp32_file if c.reference else int8_file
        if not (want.is_file() and sidecar_path(want).is_file()):
            model, _ = load_checkpoint(self.cfg.checkpoint, num_classes=self.data.num_classes, model=q.model)
            pruning = prune_for_export(model, self.data.input_shape, q.prune, self.val, self.cfg.seed)
            d = self.val
            calib = (x for x, _ in Batches(d.train, 100, d.mean, d.std, shuffle=True, seed=self.cfg.seed,
                                           limit=q.calib_samples))
            meta = {"source_checkpoint": str(self.cfg.checkpoint), "classes": d.classes,
                    "normalize_mean": list(d.mean), "normalize_std": list(d.std),
                    "image_size": self.meta.get("image_size"), "pruning": pruning,
                    "warnings": list(self.meta.get("warnings") or [])}
            kwargs = {"scheme": Scheme(q.qconfig, **dict(c.scheme))} if c.scheme else {}
            mod.export(model.eval(), folder, calib, meta, **kwargs)
        return want

    def accuracy(self, path: Path) -> float:
        from .evaluate import accuracy
        model = runtimes.load(path)
        return accuracy(model, self.val, batch_size=250, progress=False, set_eval=False)

    def latency(self, path: Path) -> tuple[float, float]:
        """(median ms of the file, median ms of the anchor), batch 1, timed in the same interleaved
        rounds on the same pinned core. With no anchor yet, this file is timed alone and becomes it."""
        from .bench import BenchConfig, measure_latency, pinned_cpus
        from .worker import Worker
        shape, cpus = tuple(self.data.input_shape), pinned_cpus(1)
        bcfg = BenchConfig(budget_s=self.cfg.timing_s / 2, min_runs=30, round_s=0.1, warmup=10,
                           accuracy=False, progress=False)
        anchor_path = self.out / self.anchor.file if self.anchor is not None else path
        if self._anchor_worker is None or self._anchor_worker.path != anchor_path:
            self._close_anchor()
            self._anchor_worker = Worker(anchor_path, 1, shape, cpus)
        if anchor_path == path:
            ms = round(measure_latency({"anchor": self._anchor_worker}, bcfg, batch=1)["anchor"].median_ms, 4)
            return ms, ms
        trial = Worker(path, 1, shape, cpus)
        try:
            stats = measure_latency({"anchor": self._anchor_worker, "trial": trial}, bcfg, batch=1)
        finally:
            trial.kill()
        return round(stats["trial"].median_ms, 4), round(stats["anchor"].median_ms, 4)

    def _close_anchor(self) -> None:
        if self._anchor_worker is not None:
            self._anchor_worker.kill()
            self._anchor_worker = None

    def speedup(self, t: Trial, over: Trial | None = None) -> float | None:
        """How many times faster than `over` (default: fp32 TorchScript), both on the anchor's scale."""
        over = over or self.trials.get(REFERENCE.key)
        if over is None or over.ratio is None or t.ratio is None:
            return None
        return over.ratio / t.ratio

    # -- the pick --------------------------------------------------------------------------------
    def score(self, t: Trial) -> tuple:
        """Smaller is better: the objective, then the other one, then accuracy."""
        if self.cfg.objective == "size":
            return (t.file_bytes, t.ratio, -t.val_acc)
        return (t.ratio, t.file_bytes, -t.val_acc)

    def candidates_done(self) -> list[Trial]:
        return [t for t in self.trials.values() if t.ok and not t.reference]

    def best(self) -> tuple[Trial | None, bool]:
        """(the pick, whether it meets the budget): the best within budget by the objective, else
        the most accurate trial."""
        done = self.candidates_done()
        within = [t for t in done if t.within_budget and t.ratio is not None]
        if within:
            return min(within, key=self.score), True
        return max(done, key=lambda t: (t.val_acc, -(t.ratio or math.inf)), default=None), False

    def fastest(self) -> Trial | None:
        return min((t for t in self.candidates_done() if t.ratio is not None), key=lambda t: t.ratio, default=None)

    def save_best(self) -> None:
        best, met = self.best()
        if best is None:
            return
        current = _read_json(self.out / "best.json")
        if current.get("key") != best.key:
            copy_deployment(self.out / best.file, self.out, "best")
        write_json(self.out / "best.json", {"key": best.key, "within_budget": met, "max_drop": self.cfg.max_drop,
                                            "trial": dataclasses.asdict(best),
                                            "file": f"best{Path(best.file).suffix}"})


def _sha(path) -> str:
    from .fileio import sha256
    return sha256(path)


def _shaping(cfg: TuneConfig) -> dict:
    """The options that decide what the trials are (a resumed search must have the same)."""
    d = {"max_drop": cfg.max_drop, "objective": cfg.objective, "flows": list(cfg.flows),
         "runtimes": list(cfg.runtimes) if cfg.runtimes is not None else None,
         "quantize": cfg.quantize.shaping(), "val_samples": cfg.val_samples, "seed": cfg.seed,
         "sensitivity": str(cfg.sensitivity) if cfg.sensitivity else None, "max_fallback": cfg.max_fallback}
    return json.loads(json.dumps(d))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _installed(runtime: str) -> bool:
    import importlib.util
    needs = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "nncf"),
             "executorch": ("executorch",)}.get(runtime, ())
    return all(importlib.util.find_spec(m) is not None for m in needs)


def _takes_scheme(runtime: str) -> bool:
    return "scheme" in inspect.signature(runtimes.get(runtime).export).parameters


def _linear_share(model: nn.Module) -> float:
    """The share of conv/linear weights held by Linear layers."""
    sizes = {n: model.get_submodule(n).weight.numel() for n in quantizable_layers(model)}
    total = sum(sizes.values()) or 1
    return sum(v for n, v in sizes.items() if isinstance(model.get_submodule(n), nn.Linear)) / total


def copy_deployment(src: Path, out_dir: Path, stem: str) -> Path:
    """Copy a deployment file, its companions (OpenVINO's FILE.bin, found by name beside FILE.xml)
    and its sidecar to out_dir/stem.<suffix>, each atomically, companions first and the main file
    last; then remove the stem's files of another suffix (an earlier pick)."""
    src = Path(src)
    dst = out_dir / f"{stem}{src.suffix}"
    parts = [p for p in runtimes.for_path(src).files(src) if p != src and p.is_file()]
    pairs = [(p, dst.with_suffix(p.suffix)) for p in parts] + [(sidecar_path(src), sidecar_path(dst)), (src, dst)]
    for p, target in pairs:
        if p.is_file():
            with atomic_path(target) as tmp:
                shutil.copyfile(p, tmp)
    keep = {t.name for _, t in pairs} | {f"{stem}.json"}  # best.json is tune's own record
    for other in out_dir.glob(f"{stem}.*"):
        if other.name not in keep:
            other.unlink(missing_ok=True)
    return dst


def sqnr_ranking(model: nn.Module, val: Dataset, q: QuantizeConfig, meta: dict) -> list[str]:
    """Conv/linear layers, lowest int8 SQNR at their output in the fully int8 FX model first."""
    from .export import example_input, input_shape
    from .quantize import CALIB_AUGMENT
    from .sensitivity import _Runner, fx_layer_sqnr
    layers = quantizable_layers(model)
    if not layers:
        return []
    calib = [x for x, _ in Batches(val.train, 100, val.mean, val.std, augment=CALIB_AUGMENT[q.calib_transform],
                                   shuffle=True, seed=q.seed, limit=min(q.calib_samples, 500))]
    runner = _Runner("fx", model, q.scheme, example_input(input_shape(meta)), calib)
    prepared, converted = runner.run(())
    sqnr = fx_layer_sqnr(prepared, converted, calib[0], layers)
    return sorted(layers, key=lambda n: sqnr.get(n, math.inf))


def tune(cfg: TuneConfig, progress: bool = True) -> dict:
    """Run (or resume) a search; returns the summary written to tune.json."""
    from tqdm import tqdm

    from .fileio import check_writable, run_lock
    out = check_writable(cfg.output, is_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        if not cfg.resume:
            for name in TUNE_FILES:
                (out / name).unlink(missing_ok=True)
            for old in [*out.glob("best.*"), *out.glob("fastest.*")]:
                old.unlink(missing_ok=True)
            shutil.rmtree(out / "trials", ignore_errors=True)
        s = Search(cfg, progress)
        if cfg.resume:
            s.replay()
        if not (out / "tune.jsonl").is_file() or not cfg.resume:
            s._log_line({"type": "start", "checkpoint": str(cfg.checkpoint),
                         "checkpoint_sha256": _sha(cfg.checkpoint), "config": _shaping(cfg)})
        s.reference_accuracy()
        stopped = None
        bar = tqdm(desc="tune", unit="trial", disable=not progress, dynamic_ncols=True)
        try:
            for i, c in enumerate(s.candidates()):
                if c.key in s.trials:
                    continue
                if cfg.time_budget_s is not None and s.elapsed() >= cfg.time_budget_s:
                    stopped = f"time budget of {_hms(cfg.time_budget_s)} spent"
                    break
                bar.set_postfix_str(c.describe()[:60])
                t = s.run(c, i)
                s.record(t)
                bar.update(1)
                _log(_trial_line(s, t))
        finally:
            bar.close()
            s._close_anchor()
        return finish(s, stopped)


def finish(s: Search, stopped: str | None) -> dict:
    """The pick, measured once on the test split; fastest.* when nothing met the budget;
    tune.json and tune.md."""
    from .evaluate import accuracy
    cfg, out = s.cfg, s.out
    best, met = s.best()
    fastest = s.fastest()
    summary: dict = {"checkpoint": str(cfg.checkpoint), "max_drop": cfg.max_drop, "objective": cfg.objective,
                     "val_samples": cfg.val_samples, "fp32_val_acc": s.fp32_acc, "within_budget": met,
                     "trials": len(s.trials), "stopped": stopped, "seconds": round(s.elapsed(), 1)}
    if best is not None:
        test = dataclasses.replace(s.data, train=None)
        summary["pick"] = dataclasses.asdict(best)
        summary["pick_file"] = str(out / f"best{Path(best.file).suffix}")
        summary["pick_test_acc"] = round(accuracy(runtimes.load(out / best.file), test, 500, progress=False,
                                                  set_eval=False), 2)
        summary["fp32_test_acc"] = round(accuracy(runtimes.load(s.ref_file), test, 500, progress=False,
                                                  set_eval=False), 2)
    if not met and fastest is not None:
        summary["fastest"] = dataclasses.asdict(fastest)
        summary["fastest_file"] = str(copy_deployment(out / fastest.file, out, "fastest"))
    summary["sentence"] = explain(s, summary)
    write_json(out / "tune.json", summary)
    write_text(out / "tune.md", render(s, summary))
    return summary


def explain(s: Search, summary: dict) -> str:
    """The choice in one sentence."""
    cfg = s.cfg
    best = s.best()[0]
    refs = [t for t in s.trials.values() if t.reference and t.ok]
    fastest_fp32 = min(refs, key=lambda t: t.ratio, default=None)
    if best is None:
        return "No trial produced a deployment file (see the errors in tune.md)."
    pick = _candidate(best.candidate).describe()
    x = s.speedup(best)
    speed = f"{x:.1f}x the speed of fp32 TorchScript" if x else "not timed against fp32 TorchScript"
    if fastest_fp32 is not None and fastest_fp32.candidate["path"] != "torchscript" and best.ratio:
        speed += f" and {s.speedup(best, fastest_fp32):.2f}x that of the fastest fp32 ({fastest_fp32.candidate['path']})"
    if summary["within_budget"]:
        n_within = sum(t.within_budget for t in s.trials.values())
        goal = "fastest" if cfg.objective == "latency" else "smallest"
        return (f"Picked {pick}: the {goal} of the {n_within} trial(s) within {cfg.max_drop} point of fp32 on "
                f"{cfg.val_samples} validation images ({_drop(best.drop)}), {speed}, "
                f"{best.file_bytes / 2**20:.1f} MiB; on the test split it scores "
                f"{summary.get('pick_test_acc')} % (fp32: {summary.get('fp32_test_acc')} %).")
    fast = _candidate(summary["fastest"]["candidate"]).describe() if "fastest" in summary else "none"
    return (f"No int8 trial stayed within {cfg.max_drop} point of fp32 on the validation images; "
            f"best.* is the most accurate one, {pick} ({_drop(best.drop)}, {speed}), and fastest.* the "
            f"fastest one, {fast}.")


def _drop(d: float) -> str:
    return f"{d:.2f} point below fp32" if d > 0 else f"{-d:.2f} point above fp32" if d < 0 else "as accurate as fp32"


def render(s: Search, summary: dict) -> str:
    cfg = s.cfg
    lines = ["# quantbench tune", "", summary["sentence"], ""]
    if summary.get("stopped"):
        lines += [f"Stopped early: {summary['stopped']}; `--resume` continues the search.", ""]
    lines += [f"Checkpoint `{cfg.checkpoint}`; budget {cfg.max_drop} point on {cfg.val_samples} validation images "
              f"held out of the training split (fp32 there: {s.fp32_acc} %); objective: {cfg.objective}; "
              f"{len(s.trials)} trials in {_hms(summary['seconds'])}. Latency: batch 1, one thread, each file timed "
              f"against one anchor process (the first int8 file) in the same interleaved rounds: `vs anchor` is "
              f"that time ratio, `x fp32` the speed-up over fp32 TorchScript on the same scale, `ms` the "
              f"file's own median (absolute times drift with the machine's load; the ratios are what the "
              f"search compares).", "",
              "| # | trial | val acc | drop | vs anchor | x fp32 | ms | MiB | within |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(s.trials.values(), key=lambda t: t.index):
        desc = _candidate(t.candidate).describe()
        if t.error:
            lines.append(f"| {t.index} | {desc} | failed: {t.error[:120]} | | | | | | |")
            continue
        within = "reference" if t.reference else ("yes" if t.within_budget else "no")
        x = s.speedup(t)
        lines.append(f"| {t.index} | {desc}{' (anchor)' if t.anchor else ''} | {t.val_acc:.2f} | {t.drop:+.2f} | "
                     f"{t.ratio:.3f} | {f'{x:.1f}' if x else ''} | {t.latency_ms:.3f} | "
                     f"{t.file_bytes / 2**20:.1f} | {within} |")
    return "\n".join(lines) + "\n"


def _trial_line(s: Search, t: Trial) -> str:
    desc = _candidate(t.candidate).describe()
    if t.error:
        return f"{desc}: failed: {t.error}"
    verdict = "reference" if t.reference else ("within budget" if t.within_budget else "misses the budget")
    speed = "the latency anchor" if t.anchor else f"{t.ratio:.3f}x the anchor's time"
    return f"{desc}: val {t.val_acc:.2f} % ({-t.drop:+.2f}), {speed}, {t.file_bytes / 2**20:.1f} MiB: {verdict}"


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _log(msg: str) -> None:
    print(f"[tune] {msg}", file=sys.stderr, flush=True)


def parse_duration(s: str) -> float:
    """'90s', '30m', '1.5h' or a number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if s and s[-1].lower() in units:
            return float(s[:-1]) * units[s[-1].lower()]
        return float(s)
    except ValueError:
        raise QuantbenchError(f"--time-budget takes a duration like 90s, 30m or 1.5h, not {s!r}") from None
