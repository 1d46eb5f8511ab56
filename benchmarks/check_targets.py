"""Check a replicate run against the project's targets (a benchmark, not a unit test).

    python benchmarks/check_targets.py runs/replicate/results.json [--other runs/replicate2/results.json]

Targets (issues 3-5, reference checkpoint, 1 thread, batch 1):
- static and qat int8 (TorchScript) >= 5x faster than fp32 TorchScript, files <= 0.26x its size;
- ptq-s (default qconfig) within 0.5 point of fp32; qat within 0.2 point of fp32 or above;
- every flow's static/qat int8 within 0.5 point of fp32 and faster than the same runtime's fp32;
- every int8 runtime row within 0.3 point of its fp32 row;
- with --other: medians of the two runs agree within 5 % for every model.
Exit code 1 if any target is missed.
"""
import argparse
import sys
from pathlib import Path

from quantbench.report import load_results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--other", help="a second run's results.json, for repeatability")
    args = ap.parse_args()
    rows = load_results(Path(args.results)).by_label()
    checks = []

    def check(name, ok, detail):
        checks.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    for label, r in rows.items():
        base = rows.get(r.baseline)
        if r.dtype != "int8" or base is None or r.method == "dynamic":
            continue
        delta = r.accuracy_delta
        limit = -0.3 if r.runtime in ("onnxruntime", "openvino") else (-0.2 if r.method == "qat" and r.flow == "eager" else -0.5)
        check(f"{label} accuracy", delta >= limit, f"{delta:+.2f} points vs {base.label} (limit {limit})")
        check(f"{label} faster than {base.label}", r.speedup > 1, f"{r.speedup:.2f}x")
        if r.runtime == "torchscript":
            check(f"{label} >= 5x faster", r.speedup >= 5, f"{r.speedup:.2f}x")
            check(f"{label} size <= 0.26x", r.size_ratio <= 0.26, f"{r.size_ratio:.3f}x")
    if args.other:
        other = load_results(Path(args.other)).by_label()
        for label, r in rows.items():
            if label in other:
                a, b = r.median_ms(), other[label].median_ms()
                check(f"{label} repeatable", abs(a - b) / min(a, b) <= 0.05, f"{a:.3f} vs {b:.3f} ms")
                if r.speedup and other[label].speedup:  # the ratio against the same run's fp32 row
                    sa, sb = r.speedup, other[label].speedup
                    check(f"{label} speed-up repeatable", abs(sa - sb) / min(sa, sb) <= 0.05,
                          f"{sa:.2f}x vs {sb:.2f}x")
    print(f"{sum(checks)}/{len(checks)} targets met")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
