"""A shared tune search (`tune --storage`) with 1 and with 2 workers: wall time, and a projection
for N workers from the measured trial times (a benchmark, not a unit test).

    python benchmarks/tune_workers.py [--workers 1,2] [--train-per-class 120] [--val-samples 240]
                                      [--out runs/bench-tune-workers]

The search is fixed: a resnet10 (untrained: accuracy does not matter here, the work does) on a
synthetic 3-class 32x32 ImageFolder, flows fx and pt2e, no other runtime, an impossible budget
(--max-drop -50, so every calibration choice runs) and no fp32 fallback: 13 candidates = 2
defaults + the fp32 reference (stage 1) + 5 calibration choices x 2 flows (two chains). Every
worker runs with one thread; each count of workers gets a fresh SQLite study and artifact folder.

The projection: stage 1 runs in parallel; each flow's calibration chain is sequential (a choice
is tried only when the one before missed), chains run in parallel. With the per-trial seconds of
the 1-worker run and the measured start-up of a worker (data, model, imports), list-schedule
the candidates on N workers in the search's order.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEARCH = ["--runtimes", "none", "--max-drop", "-50", "--max-fallback", "0",
          "--calib-samples", "64", "--no-progress", "--threads", "1"]


def make_inputs(root: Path, per_class: int) -> tuple[Path, Path]:
    from PIL import Image

    from quantbench import models
    data = root / "data"
    if not (data / "test").is_dir():
        rng = np.random.default_rng(0)
        colours = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}
        for split, n in (("train", per_class), ("test", 10)):
            for c, rgb in colours.items():
                d = data / split / c
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    px = np.clip(np.array(rgb) + rng.integers(-60, 61, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(px, "RGB").save(d / f"{i:04d}.png")
    ckpt = root / "resnet10.pth"
    if not ckpt.is_file():
        import torch
        torch.manual_seed(0)
        model = models.build("resnet10", 3).eval()
        meta = {"arch": "resnet10", "num_classes": 3, "classes": ["blue", "green", "red"],
                "normalize_mean": [0.49, 0.48, 0.45], "normalize_std": [0.25, 0.24, 0.26], "seed": 0}
        models.save_checkpoint(ckpt, model, meta=meta)
    return data, ckpt


def run(n: int, data: Path, ckpt: Path, root: Path, val: int, flows: str = "fx,pt2e") -> dict:
    work = root / f"workers-{n}"
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    url = f"sqlite:///{work / 'study.db'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "quantbench", "tune", str(ckpt), "--data-dir", str(data), "--output", str(work),
           "--storage", url, "--val-samples", str(val), "--flows", flows, *SEARCH]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=open(work / f"worker{i}.log", "w"), stderr=subprocess.STDOUT)
             for i in range(n)]
    rcs = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(rcs):
        raise SystemExit(f"a worker failed: see {work}/worker*.log")
    from quantbench.tune.shared import load_study
    study, _ = load_study(url, "quantbench-tune")
    trials = [t for t in study.get_trials(deepcopy=False) if "result" in t.user_attrs]
    first_start = min(t.datetime_start.timestamp() for t in trials)
    started = study.user_attrs["started_at"]
    rows = [{"key": t.user_attrs["key"], "index": t.user_attrs["index"], "seconds": t.user_attrs["result"]["seconds"],
             "pid": t.user_attrs["result"]["worker"]["pid"]} for t in trials]
    return {"workers": n, "wall_s": round(wall, 1), "candidates": len(rows),
            "first_trial_after_study_s": round(first_start - started, 1),
            "trial_s": round(sum(r["seconds"] for r in rows), 1), "trials": sorted(rows, key=lambda r: r["index"])}


def project(trials: list[dict], startup: float, n: int) -> float:
    """List-schedule the search on n workers: stage 1 (no calibration choice) at once; each
    flow's calibration choices one after another, after stage 1."""
    stage1 = [t for t in trials if len(t["key"].split()) == 2]
    chains: dict[str, list[float]] = {}
    for t in trials:
        if len(t["key"].split()) > 2:
            chains.setdefault(t["key"].split()[0], []).append(t["seconds"])
    free = [startup] * n
    stage1_end = startup
    for t in stage1:
        i = min(range(n), key=free.__getitem__)
        free[i] += t["seconds"]
        stage1_end = max(stage1_end, free[i])
    ready = {m: stage1_end for m in chains}
    todo = {m: list(v) for m, v in chains.items()}
    while any(todo.values()):
        i = min(range(n), key=free.__getitem__)
        m = min((m for m in todo if todo[m]), key=lambda m: ready[m])
        start = max(free[i], ready[m])
        end = start + todo[m].pop(0)
        free[i], ready[m] = end, end
    return max(free)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--train-per-class", type=int, default=120)
    ap.add_argument("--val-samples", type=int, default=240)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-tune-workers"))
    ap.add_argument("--flows", default="fx,pt2e",
                    help="the flows searched: their calibration chains are what workers share (default: fx,pt2e)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data, ckpt = make_inputs(args.out, args.train_per_class)
    results = [run(int(n), data, ckpt, args.out, args.val_samples, args.flows) for n in args.workers.split(",")]
    base = results[0]
    startup = base["wall_s"] - base["trial_s"]  # one worker: everything but the trials is its start and bookkeeping
    from quantbench.cpu import machine_record
    report = {"machine": machine_record(threads=1), "results": results,
              "ratio": {r["workers"]: round(r["wall_s"] / base["wall_s"], 3) for r in results},
              "projection_s": {n: round(project(base["trials"], startup, n), 1) for n in (1, 2, 3, 4, 8, 16)},
              "serial_s": round(startup, 1)}
    (args.out / "tune_workers.json").write_text(json.dumps(report, indent=1))
    for r in results:
        print(f"{r['workers']} worker(s): {r['candidates']} candidates in {r['wall_s']:.1f} s wall "
              f"({r['trial_s']:.1f} s of trials; {r['wall_s'] / base['wall_s']:.2f}x the 1-worker time)")
    print("per trial (1 worker): " + ", ".join(f"{t['key']}: {t['seconds']} s" for t in base["trials"]))
    print("projection (start-up + list schedule of the measured trials): " +
          ", ".join(f"{n}: {s} s" for n, s in report["projection_s"].items()))


if __name__ == "__main__":
    main()
