"""Pretrained-style models at 224x224 through every flow and runtime: what each file costs here,
and whether "ship this" is at least as fast as OpenVINO's own int8 file of the same model (issue 19).

    python benchmarks/pretrained_224.py --data-dir FOLDER [--archs resnet18,resnet50,...] [--out DIR]

For each architecture: a weights file with random weights and as many classes as FOLDER has (no
weights can be downloaded here; the flows, runtimes and timings do not depend on the values, the
accuracy column does), then, in a fresh process under resource accounting,

    quantbench replicate --arch A --weights W --data-dir FOLDER --flows eager,fx,pt2e --methods static
                         --plain openvino --eval-samples N --calib-samples C --timing-seconds S
                         --processes P

(every installed runtime adds its rows; `--plain openvino` adds OpenVINO's int8 file without
quantbench's additions: no pruning, NNCF's default preset and range estimator, with the overflow fix
this CPU needs; see docs/imagenet.md). Prints one Markdown table per model (each row's accuracy,
batch-1 median, file size) and one summary line: the wall time and peak RSS of the run, the pick,
and the pick's time over openvino-int8-plain's, measured in the same interleaved rounds.
FOLDER: an ImageFolder of JPEGs of mixed sizes (benchmarks/imagenet_like.py makes one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ARCHS = "resnet18,resnet50,mobilenet_v3_large,timm:efficientnet_b0"
_WRAP = ("import resource, subprocess, sys\n"
         "rc = subprocess.run(sys.argv[1:]).returncode\n"
         "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
         "sys.exit(rc)")


def weights_file(arch: str, classes: int, out: Path) -> Path:
    """A state dict of `arch` with `classes` outputs and random weights (seed 0)."""
    import torch
    path = out / f"{arch.replace(':', '-')}-{classes}.pth"
    if path.is_file():
        return path
    torch.manual_seed(0)
    if arch.startswith("timm:"):
        import timm
        model = timm.create_model(arch[5:], pretrained=False, num_classes=classes)
    else:
        import torchvision
        model = torchvision.models.get_model(arch, num_classes=classes)
    torch.save(model.state_dict(), path)
    return path


def _ms(row: dict, threads, batch) -> float | None:
    """A row's median at one (threads, batch) setting from results.json."""
    if threads is None or threads == row.get("threads"):
        st = (row.get("latency") or {}).get(str(batch))
    else:
        st = ((row.get("latency_other_threads") or {}).get(str(threads)) or {}).get(str(batch))
    return st.get("median_ms") if st else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--out", type=Path, default=Path("runs/pretrained-224"))
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--timing-seconds", type=float, default=10)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--flows", default="eager,fx,pt2e")
    ap.add_argument("--calib-samples", type=int, default=300,
                    help="calibration images per file (quantbench's default is 1,000; at 224 each calibration "
                         "with histogram observers costs minutes here)")
    args = ap.parse_args()
    split = args.data_dir / "val" if (args.data_dir / "val").is_dir() else args.data_dir / "test"
    classes = sum(1 for d in split.iterdir() if d.is_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    summary = []
    for arch in args.archs.split(","):
        w = weights_file(arch, classes, args.out)
        run_dir = args.out / arch.replace(":", "-")
        cmd = [sys.executable, "-m", "quantbench", "replicate", "--arch", arch, "--weights", str(w),
               "--data-dir", str(args.data_dir), "--flows", args.flows, "--methods", "static",
               "--plain", "openvino", "--eval-samples", str(args.eval_samples),
               "--calib-samples", str(args.calib_samples),
               "--timing-seconds", str(args.timing_seconds), "--processes", str(args.processes),
               "--output", str(run_dir), "--resume", "--no-progress"]
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (args.out / f"{run_dir.name}.log").write_text(p.stdout + p.stderr)
        peak = next((int(x.split()[1]) for x in p.stderr.splitlines() if x.startswith("PEAK_RSS_KIB")), 0)
        if p.returncode != 0:
            last = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("PEAK_RSS")][-1:]
            summary.append(f"| {arch} | | failed: {' '.join(last)[:200]} | | | {wall:.0f} | {peak / 1024:.0f} |")
            continue
        res = json.loads((run_dir / "results.json").read_text())
        rows = {m["label"]: m for m in res["models"]}
        print(f"\n### {arch}\n\n| row | runtime | dtype | top-1 % | batch 1 ms | MiB |\n|---|---|---|---:|---:|---:|")
        for m in res["models"]:
            print(f"| {m['label']} | {m['runtime']} | {m['dtype']} | {m.get('accuracy') or 0:.2f} | "
                  f"{_ms(m, None, 1) or float('nan'):.2f} | {m['file_bytes'] / 2**20:.1f} |")
        plain = rows.get("openvino-int8-plain")
        for ship in res.get("ship") or []:  # one pick per (threads, batch) setting
            b, t, pick = ship.get("batch"), ship.get("threads"), ship.get("label")
            plain_ms = _ms(plain, t, b) if plain else None
            ratio = f"{ship['median_ms'] / plain_ms:.2f}" if pick and plain_ms else ""
            summary.append(f"| {arch} | batch {b}, {t or 1} thread(s) | {pick} ({ship.get('median_ms') or 0:.2f} ms) | "
                           f"{plain_ms if plain_ms else 'n/a'} | {ratio} | {wall:.0f} | {peak / 1024:.0f} |")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"data {args.data_dir}; {args.calib_samples} calibration and {args.eval_samples} accuracy images; "
          f"timing {args.timing_seconds} s per setting, {args.processes} process(es); the pick and ratio at batch 1, "
          f"1 thread\n")
    print("| model | setting | pick | openvino-int8-plain ms | pick / plain | run wall s | run peak RSS MiB |\n"
          "|---|---|---|---:|---:|---:|---:|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
