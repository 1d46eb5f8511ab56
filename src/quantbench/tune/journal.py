"""The search's memory on disk: nothing is lost when it stops.

    tune.jsonl   one JSON line per event, appended and fsynced as it happens: "start" (what the
                 search is: checkpoint, data and options), "fp32" (the reference accuracy),
                 "trial" (one candidate's results). --resume replays it.
    best.*       the best file so far, its companions and sidecar, copied atomically (main file
                 last), with best.json naming the trial; fastest.* when nothing met the budget.

Only files this search made are ever removed: a folder holding other files named like these
(a checkpoint called best.pth, say) is refused as an output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import runtimes
from ..errors import QuantbenchError
from ..fileio import atomic_path, write_json
from ..record import sidecar_path

JOURNAL = "tune.jsonl"
TUNE_FILES = (JOURNAL, "tune.json", "tune.md", "best.json")
PICKS = ("best", "fastest")


@dataclass
class Trial:
    """What one candidate measured (a "trial" line of tune.jsonl)."""
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
    transient: bool = False               # failed for a passing reason (disk full...): retried on resume

    @property
    def ok(self) -> bool:
        return self.error is None and self.val_acc is not None


_TRIAL_FIELDS = {f.name for f in dataclasses.fields(Trial)}


class Journal:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / JOURNAL

    def append(self, rec: dict) -> None:
        """One JSON line, flushed to disk: a kill loses at most the trial in progress."""
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay(self, start: dict) -> tuple[list[Trial], float | None]:
        """(trials recorded, fp32 accuracy or None) from tune.jsonl; `start` is what this search
        is, and must match what the journal's search was (checkpoint, data, options). A line cut
        short by a kill is ignored; a trial that failed for a passing reason is left out, so it
        runs again."""
        trials: list[Trial] = []
        fp32 = None
        if not self.path.is_file():
            return trials, fp32
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("type") == "start":
                differ = [k for k in ("checkpoint_sha256", "data", "config") if rec.get(k) != start.get(k)]
                if differ:
                    what = {"checkpoint_sha256": "checkpoint", "data": "data", "config": "options"}
                    raise QuantbenchError(f"{self.path} belongs to another search (another "
                                          f"{' and '.join(what[k] for k in differ)}); use another --output, "
                                          f"or drop --resume to start over")
            elif rec.get("type") == "fp32" and (self.out / str(rec.get("file"))).is_file():
                fp32 = rec["val_acc"]
            elif rec.get("type") == "trial":
                t = Trial(**{k: v for k, v in rec.items() if k in _TRIAL_FIELDS})
                if not t.transient:
                    trials.append(t)
        return trials, fp32


def clean_start(out: Path, inputs: list[Path]) -> None:
    """Before a fresh (not resumed) search into `out`: refuse a folder that holds an input of
    this search or files named like tune's that an earlier search did not make; then remove
    only an earlier search's own files."""
    out = Path(out)
    resolved = out.resolve()
    for p in inputs:
        if p is not None and Path(p).resolve().parent == resolved:
            raise QuantbenchError(f"--output {out} holds {Path(p).name}, an input of this search; tune writes "
                                  f"best.* and tune.* there: choose another --output")
    picks = [p for stem in PICKS for p in out.glob(f"{stem}.*")]
    made_by_tune = (out / JOURNAL).is_file()
    if picks and not made_by_tune:
        raise QuantbenchError(f"--output {out} holds {', '.join(sorted(p.name for p in picks)[:3])}, which no "
                              f"earlier tune made; choose another --output")
    if made_by_tune:
        for name in TUNE_FILES:
            (out / name).unlink(missing_ok=True)
        for p in picks:
            p.unlink(missing_ok=True)
        shutil.rmtree(out / "trials", ignore_errors=True)


def copy_deployment(src: Path, out_dir: Path, stem: str) -> Path:
    """Copy a deployment file, its companions (OpenVINO's FILE.bin, found by name beside FILE.xml)
    and its sidecar to out_dir/stem.<suffix>, each atomically, companions first and the main file
    last; then remove the stem's files of another suffix (an earlier pick of this search)."""
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


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def save_best(out: Path, best: Trial, met: bool, max_drop: float) -> None:
    """best.<suffix> and best.json for the pick so far. The file is copied again whenever
    best.json names another trial or the copy is missing, so after any kill and resume the
    best files agree with tune.jsonl."""
    suffix = Path(best.file).suffix
    current = read_json(out / "best.json")
    if current.get("key") != best.key or not (out / f"best{suffix}").is_file():
        copy_deployment(out / best.file, out, "best")
    write_json(out / "best.json", {"key": best.key, "within_budget": met, "max_drop": max_drop,
                                   "trial": dataclasses.asdict(best), "file": f"best{suffix}"})
