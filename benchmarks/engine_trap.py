"""The quantized-engine trap of TorchScript int8 files, reproduced (a benchmark, not a test).

    quantbench quantize CHECKPOINT --method static --calib-samples 500 --output runs/trap/ptq-s.pt ...
    PYTHONPATH=src .venv/bin/python benchmarks/engine_trap.py runs/trap/ptq-s.pt --rounds 2 --cpu 1 --other onednn

Figures, with the machine: docs/torchscript-engine.md.

torch.jit.load packs a file's int8 weights for the quantized engine of the loading process, and
some int8 ops read that engine on every call. A file quantbench made for "fbgemm" and loaded with
plain `torch.jit.load` runs under torch's default engine ("x86") instead.

Every measurement is a fresh Python process pinned to one core (`taskset -c CPU`, one thread)
that loads the file by executing exactly the lines of a variant, then times batch 1 (warm-up,
then `--calls` calls; the process's median). Variants:

  plain         `import torch; m = torch.jit.load(FILE)`: torch's default engine
  sidecar       quantbench's `how_to_load(FILE, sidecar)`: the engine the sidecar records, set first
  plain+eval    plain, but first an accuracy-like pass: `--eval-images` random images at batch 250
  sidecar+eval  sidecar, after the same pass
  E, E+eval     with --other E: loaded under engine E instead (set before torch.jit.load)

Rounds visit the variants in turn (the order rotates and reverses every other round), so a
drifting machine spreads its drift over all of them. Printed: per variant the median of the
per-process medians, their range, and the ratio to `sidecar` (what quantbench's table measures).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
load_lines, calls, eval_images, shape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
scope = {}
exec(load_lines, scope)  # exactly the user's lines: they bind m
import torch
torch.set_num_threads(1)
m = scope["m"].eval()
gen = torch.Generator().manual_seed(0)
with torch.inference_mode():
    if eval_images:  # what an accuracy run does: the whole test split in large batches
        x = torch.randn(250, *shape, generator=gen)
        for _ in range(eval_images // 250):
            m(x)
    x = torch.randn(1, *shape, generator=gen)
    for _ in range(50):
        m(x)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t0)
    # which library runs the convolutions: oneDNN logs each one it executes (to stdout)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        m(x)
times.sort()
print(json.dumps({"engine": torch.backends.quantized.engine, "median_ms": times[len(times) // 2] * 1e3,
                  "p10_ms": times[len(times) // 10] * 1e3}), flush=True)
"""


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return (f"{name}, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{os.cpu_count()} cores visible")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path, help="a TorchScript int8 file made by quantbench (with its sidecar)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per variant")
    ap.add_argument("--calls", type=int, default=1000, help="timed batch-1 calls per process")
    ap.add_argument("--eval-images", type=int, default=10_000, help="images of the accuracy-like pass")
    ap.add_argument("--cpu", type=int, default=1, help="the core every process is pinned to")
    ap.add_argument("--other", nargs="+", choices=["x86", "fbgemm", "onednn", "qnnpack"],
                    help="also load under these engines (without VNNI, x86 runs fbgemm's convs: "
                         "--other onednn shows what it does on a VNNI CPU, where it sends convs to oneDNN)")
    ap.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()

    from quantbench.export import input_shape, read_sidecar
    from quantbench.runtimes import torchscript

    side = read_sidecar(args.file)
    shape = list(input_shape(side))
    name = str(args.file)
    plain = f"import torch; m = torch.jit.load({json.dumps(name)})"
    ours = torchscript.how_to_load(name, side)
    variants = {"plain": (plain, 0), "sidecar": (ours, 0),
                "plain+eval": (plain, args.eval_images), "sidecar+eval": (ours, args.eval_images)}
    for engine in args.other or []:  # loaded under another engine than the file's
        other = f'import torch; torch.backends.quantized.engine = "{engine}"; m = torch.jit.load({json.dumps(name)})'
        variants[engine], variants[f"{engine}+eval"] = (other, 0), (other, args.eval_images)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    print(f"machine: {machine()}; pinned to core {args.cpu}, 1 thread")
    print(f"sidecar engine: {side.get('engine')}; quantbench's load lines: {ours}")
    got: dict[str, list[dict]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order[::-1] if r % 2 else order:
            lines, n_eval = variants[v]
            out = subprocess.run(["taskset", "-c", str(args.cpu), sys.executable, "-c", CHILD, lines,
                                  str(args.calls), str(n_eval), json.dumps(shape)],
                                 capture_output=True, text=True, env=env, timeout=600)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            lines_out = out.stdout.strip().splitlines()
            rec = json.loads(lines_out[-1])
            rec["onednn_convs"] = sum(1 for x in lines_out if ",exec," in x and ",convolution," in x)
            got[v].append(rec)
            print(f"  round {r + 1} {v:<13} median {rec['median_ms']:.3f} ms, p10 {rec['p10_ms']:.3f} ms "
                  f"({rec['engine']}, oneDNN convs {rec['onednn_convs']})", flush=True)
    ref = statistics.median(g["median_ms"] for g in got["sidecar"])
    ref10 = statistics.median(g["p10_ms"] for g in got["sidecar"])
    print(f"\nbatch 1, {args.rounds} fresh pinned processes x {args.calls} calls: the median over processes of "
          "each one's median and 10th percentile (the p10 is less inflated by other work on a shared core); "
          "ratios to 'sidecar'")
    print(f"{'variant':<14}{'engine':<8}{'oneDNN':>7}{'median ms':>11}  {'range':<14}{'ratio':>6}{'p10 ms':>9}{'ratio':>7}")
    rows = []
    for v in names:
        ms = [g["median_ms"] for g in got[v]]
        p10 = statistics.median(g["p10_ms"] for g in got[v])
        med = statistics.median(ms)
        rows.append({"variant": v, "engine": got[v][0]["engine"], "onednn_convs": got[v][0]["onednn_convs"],
                     "load": variants[v][0], "eval_images": variants[v][1], "median_ms": med,
                     "process_medians_ms": ms, "p10_ms": p10})
        print(f"{v:<14}{got[v][0]['engine']:<8}{got[v][0]['onednn_convs']:>7}{med:11.3f}  "
              f"{min(ms):.3f}..{max(ms):.3f}  {med / ref:5.2f}x{p10:9.3f}{p10 / ref10:6.2f}x")
    if args.output:
        from quantbench.fileio import write_json
        write_json(args.output, {"file": name, "machine": machine(), "cpu": args.cpu, "calls": args.calls,
                                 "rounds": args.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
