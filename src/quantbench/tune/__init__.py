"""quantbench tune: the fastest (or smallest) int8 deployment within --max-drop points of fp32 accuracy.

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

The package, by job:  space.py (what to try, in which order), trials.py (making and measuring a
trial, the pick), journal.py (tune.jsonl, best.*, resume), render.py (tune.md, the sentence),
shared.py (the same search shared by many processes or machines through Optuna's storage:
--storage, --pick on the deployment machine, --status).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from .. import runtimes
from ..data import DataSource
from ..errors import QuantbenchError
from ..fileio import sha256, write_json, write_text
from ..quantize import QuantizeConfig
from .journal import TUNE_FILES, Journal, Trial, clean_start, copy_deployment  # noqa: F401
from .render import explain, hms, render, trial_line
from .space import CALIBRATION_VARIANTS, FALLBACK_SIZES, REFERENCE, Candidate, candidates  # noqa: F401
from .trials import Search, sqnr_ranking  # noqa: F401  (the package's API)

Objective = Literal["latency", "size"]


@dataclass(frozen=True)
class TuneConfig:
    """One search; checked when made, so a bad option fails before any work."""
    checkpoint: Path
    data: DataSource = field(default_factory=DataSource)
    output: Path = field(default=Path("runs/tune"), metadata={
        "help": "folder for tune.jsonl, tune.md, best.* and trials/"})
    max_drop: float = field(default=0.3, metadata={
        "help": "accuracy points below fp32 (on the validation images) that you accept"})
    time_limit_s: float | None = field(default=None, metadata={
        "help": "stop starting trials after this long (resumed sessions included), e.g. 30m, 1.5h, 900s "
                "(default: try them all)"})
    objective: Objective = field(default="latency", metadata={"help": "what the pick minimizes: latency or size"})
    flows: tuple[str, ...] = ("eager", "fx", "pt2e")
    runtimes: tuple[str, ...] | None = None   # comparison runtimes with an exporter; None: every installed one
    # the template every torch trial is made from (qconfig, calibration images and transform,
    # pruning, engine, the user's model builder); method, flow, observer... are set per trial
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(method="static", calib_samples=1000))
    val_samples: int = field(default=2000, metadata={
        "help": "validation images held out of the training split; --max-drop is judged on them, never on "
                "the test split"})
    timing_s: float = field(default=4.0, metadata={
        "help": "timing seconds per trial, batch 1, interleaved with the anchor (the first int8 file made)"})
    sensitivity: Path | None = field(default=None, metadata={
        "help": "a sensitivity.json (`quantbench sensitivity` of this checkpoint) ranking the layers to keep fp32 "
                "(default: rank them here by their int8 error, SQNR)"})
    max_fallback: int = field(default=16, metadata={"help": "most layers kept fp32 in a trial"})
    resume: bool = field(default=False, metadata={"help": "continue the search in OUTPUT (trials done are kept)"})
    seed: int = field(default=0, metadata={"help": "picks the validation and calibration images"})
    # the search shared by several processes or machines (tune/shared.py)
    storage: str | None = field(default=None, metadata={
        "help": "share the search through Optuna's storage: sqlite:///FILE.db (one machine), "
                "postgresql://USER:PASSWORD@HOST/DB (many), or journal:///PATH/FILE.log (a journal file on a "
                "shared filesystem); every `tune` given the same storage and --study takes the next candidate"})
    study: str = field(default="quantbench-tune", metadata={"help": "the study's name in --storage"})
    artifacts: Path | None = field(default=None, metadata={
        "help": "with --storage: the shared folder the trials' files go to (default: --output); every worker "
                "and --pick must see it"})
    heartbeat_s: int = field(default=20, metadata={
        "help": "with --storage: seconds between a worker's heartbeats for its running trial"})
    grace_s: int = field(default=120, metadata={
        "help": "with --storage: a running trial without a heartbeat for this long is its dead worker's, "
                "and is made again by another worker"})

    def __post_init__(self):
        from ..flows import FLOWS
        object.__setattr__(self, "flows", tuple(self.flows))
        object.__setattr__(self, "output", Path(self.output))
        if isinstance(self.time_limit_s, str):  # "30m", "1.5h", "900s" from the command line
            object.__setattr__(self, "time_limit_s", parse_duration(self.time_limit_s))
        if self.objective not in get_args(Objective):
            raise QuantbenchError(f"unknown objective {self.objective!r}; choose from {', '.join(get_args(Objective))}")
        if not (isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop)):
            raise QuantbenchError(f"--max-drop must be a number of accuracy points, not {self.max_drop!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise QuantbenchError(f"--time-limit must be above 0, not {self.time_limit_s}")
        for f in self.flows:
            if f not in FLOWS:
                raise QuantbenchError(f"unknown flow {f!r}; choose from {', '.join(FLOWS)}")
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", runtimes.check_exporters(self.runtimes, int8=True))
        if not self.flows and not self.runtimes and self.runtimes is not None:
            raise QuantbenchError("tune needs at least one flow or runtime to search")
        if self.val_samples < 20:
            raise QuantbenchError(f"--val-samples must be at least 20 (a budget of tenths of a point needs "
                                  f"hundreds of images to mean anything), not {self.val_samples}")
        if not self.timing_s > 0 or self.max_fallback < 0:
            raise QuantbenchError("timing_s must be above 0 and max_fallback at least 0")
        if self.sensitivity is not None and not Path(self.sensitivity).is_file():
            raise QuantbenchError(f"no sensitivity file {self.sensitivity}")
        if self.artifacts is not None:
            object.__setattr__(self, "artifacts", Path(self.artifacts))
        if self.storage is not None:
            from .shared import check_storage_url
            check_storage_url(self.storage)
            if self.resume:
                raise QuantbenchError("--resume is for a search without --storage: a shared study always continues "
                                      "where it is")
            if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
                raise QuantbenchError(f"--heartbeat-seconds must be at least 1 and --grace-seconds above it, not "
                                      f"{self.heartbeat_s} and {self.grace_s}")


def _start(cfg: TuneConfig) -> dict:
    """What this search is: a resumed one must be the same (checkpoint by content, data, options)."""
    d = {"max_drop": cfg.max_drop, "objective": cfg.objective, "flows": list(cfg.flows),
         "runtimes": list(cfg.runtimes) if cfg.runtimes is not None else None,
         "quantize": cfg.quantize.shaping(), "val_samples": cfg.val_samples, "seed": cfg.seed,
         "sensitivity": str(cfg.sensitivity) if cfg.sensitivity else None, "max_fallback": cfg.max_fallback}
    import json
    return {"type": "start", "checkpoint": str(cfg.checkpoint), "checkpoint_sha256": sha256(cfg.checkpoint),
            "data": cfg.data.identity(), "config": json.loads(json.dumps(d))}


def tune(cfg: TuneConfig, progress: bool = True) -> dict:
    """Run (or resume) a search; returns the summary written to tune.json."""
    from tqdm import tqdm

    from ..fileio import check_writable, run_lock
    if not Path(cfg.checkpoint).is_file():
        raise QuantbenchError(f"no checkpoint {cfg.checkpoint}")
    if cfg.storage is not None:  # one worker of a search shared through Optuna's storage
        from .shared import work
        return work(cfg, progress)
    out = check_writable(cfg.output, is_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        if not cfg.resume:
            clean_start(out, [Path(cfg.checkpoint), cfg.sensitivity])
        start = _start(cfg)
        s = Search(cfg, progress)
        if cfg.resume:
            s.replay(start)
        if not s.journal.path.is_file() or not cfg.resume:
            s.journal.append(start)
        s.reference_accuracy()
        stopped = None
        bar = tqdm(desc="tune", unit="trial", disable=not progress, dynamic_ncols=True)
        try:
            for i, c in enumerate(candidates(s)):
                if c.key in s.trials:
                    continue
                if cfg.time_limit_s is not None and s.elapsed() >= cfg.time_limit_s:
                    stopped = f"time limit of {hms(cfg.time_limit_s)} spent"
                    break
                bar.set_postfix_str(c.describe()[:60])
                t = s.run(c, i)
                s.record(t)
                bar.update(1)
                _log(trial_line(s, t))
        finally:
            bar.close()
            s.close()
        return finish(s, stopped)


def finish(s: Search, stopped: str | None) -> dict:
    """The pick, measured once on the test split; fastest.* when nothing met the budget;
    tune.json and tune.md."""
    from ..evaluate import accuracy
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
        raise QuantbenchError(f"--time-limit takes a duration like 90s, 30m or 1.5h, not {s!r}") from None
