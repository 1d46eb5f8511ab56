"""Memory and time of `quantbench eval` and `quantize` on an ImageNet-like folder (issue 19).

Generates FOLDER/val/<class>/*.jpg (and train/) of 200-500 px JPEGs with mixed aspect ratios,
saves a ResNet-18 state dict (random weights, torchvision resnet18 with --classes outputs), then
runs, each in a fresh process under resource accounting (peak RSS of the process and its children):

    quantbench eval     --arch resnet18 --weights W.pth --data-dir FOLDER
    quantbench quantize --arch resnet18 --weights W.pth --method static --flow fx --calib-samples N
                        --data-dir FOLDER (once per train split size: its time must not depend on it)

    python benchmarks/imagenet_like.py --out /tmp/inet --val 5000 --train 10000,20000 --classes 100

    # the issue's scale: 50,000 val, train/ of 10,000 and of 100,000, and a replicate run
    python benchmarks/imagenet_like.py --out /tmp/inet50k --val 50000 --train 10000,100000 --replicate

Targets (issue 19): peak RSS <= 2 GB for each; quantize's time the same within 10 % whatever the
train split's size. Prints one Markdown table (docs/imagenet.md holds the figures).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_image(rng, path: Path) -> None:
    from PIL import Image
    short = int(rng.integers(200, 501))
    ratio = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))
    w, h = (int(short * ratio), short) if rng.random() < 0.7 else (short, int(short * ratio))
    w, h = min(w, 500), min(h, 500)
    # smooth colour fields plus noise: JPEGs of realistic size, cheap to make
    small = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    px = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(path, quality=85)


def generate(root: Path, split: str, n: int, classes: int, seed: int) -> None:
    """root/split/cNNN/*.jpg, n images over `classes` classes (kept if already there)."""
    d = root / split
    done = d / ".complete"
    if done.is_file() and done.read_text() == f"{n} {classes} {seed}":
        return
    shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = d / f"c{i % classes:03d}"
        c.mkdir(parents=True, exist_ok=True)
        make_image(rng, c / f"{i:07d}.jpg")
    done.write_text(f"{n} {classes} {seed}")


_WRAP = ("import resource, subprocess, sys\n"
         "rc = subprocess.run(sys.argv[1:]).returncode\n"
         "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
         "sys.exit(rc)")


def run(cmd: list[str]) -> dict:
    """One command in a fresh process (under a fresh wrapper, so that the peak RSS is this
    command's alone: the largest of its processes, ru_maxrss of the wrapper's children) and its wall time."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    peak = int(next(line.split()[1] for line in p.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")))
    return {"cmd": " ".join(cmd), "s": round(wall, 1), "peak_rss_mib": round(peak / 1024),
            "stdout": p.stdout.strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantbench-imagenet-like"))
    ap.add_argument("--val", type=int, default=5000)
    ap.add_argument("--train", default="10000,20000", help="comma list of train split sizes (0: val only)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--calib-samples", type=int, default=1000)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--eval-samples", type=int, help="eval: a seeded subset of val/ (default: all of it)")
    ap.add_argument("--replicate", action="store_true",
                    help="also run replicate (ptq-d and ptq-s, eager, every installed runtime) on the first "
                         "train size, accuracy on --replicate-samples images")
    ap.add_argument("--replicate-samples", type=int, default=2000)
    args = ap.parse_args()

    import torch
    import torchvision
    qb = [sys.executable, "-m", "quantbench"]
    weights = args.out / "resnet18-random.pth"
    args.out.mkdir(parents=True, exist_ok=True)
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=args.classes).state_dict(), weights)
    t0 = time.perf_counter()
    generate(args.out / "common", "val", args.val, args.classes, seed=1)
    print(f"generated val ({args.val}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    rows = []
    sizes = [int(x) for x in args.train.split(",") if x.strip()]
    for n in sizes:
        root = args.out / f"train{n}"
        root.mkdir(exist_ok=True)
        if not (root / "val").exists():
            os.symlink(args.out / "common" / "val", root / "val")
        if n:
            t0 = time.perf_counter()
            generate(root, "train", n, args.classes, seed=2)
            print(f"generated train ({n}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        elif (root / "train").exists():
            shutil.rmtree(root / "train")
        out = args.out / f"q{n}.pt"
        r = run(qb + ["quantize", "--arch", "resnet18", "--weights", str(weights), "--method", "static",
                      "--flow", "fx", "--calib-samples", str(args.calib_samples), "--output", str(out),
                      "--data-dir", str(root), "--no-progress"])
        rows.append({"what": f"quantize, train/ of {n:,}" if n else "quantize, val/ only", **r})
        print(json.dumps(rows[-1]), file=sys.stderr)
    if not args.skip_eval:
        root = args.out / f"train{sizes[0]}"
        r = run(qb + ["eval", "--arch", "resnet18", "--weights", str(weights), "--data-dir", str(root),
                      "--batch-size", "100", "--no-progress"]
                + (["--eval-samples", str(args.eval_samples)] if args.eval_samples else []))
        n = f"{args.eval_samples:,} of {args.val:,}" if args.eval_samples else f"{args.val:,}"
        rows.append({"what": f"eval fp32, {n} val/ images", **r})
        print(json.dumps(rows[-1]), file=sys.stderr)
    if args.replicate:
        root = args.out / f"train{sizes[0]}"
        r = run(qb + ["replicate", "--arch", "resnet18", "--weights", str(weights), "--data-dir", str(root),
                      "--methods", "dynamic,static", "--calib-samples", str(args.calib_samples),
                      "--eval-samples", str(args.replicate_samples), "--timing-seconds", "10",
                      "--output", str(args.out / "replicate"), "--no-progress"])
        rows.append({"what": f"replicate (ptq-d, ptq-s, installed runtimes), train/ of {sizes[0]:,}, "
                             f"accuracy on {args.replicate_samples:,} val/ images", **r})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}\n")
    print("| run | wall s | peak RSS MiB |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['what']} | {r['s']} | {r['peak_rss_mib']} |")
    (args.out / "imagenet_like.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
