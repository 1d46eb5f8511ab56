"""Which quantized engine makes the fastest TorchScript int8 model on this CPU (a benchmark, not a test).

    PYTHONPATH=src .venv/bin/python benchmarks/engines.py \\
        --checkpoint /work/shared/checkpoints/resnet18-cifar10-fp32.pth --data-dir /work/data/cifar10

For each flow (eager, fx) and each choice of dead-tap pruning (off, on) the fp32 model is prepared
and calibrated once, exactly as quantbench's flows do it; each calibrated model is then converted
and exported to TorchScript under every quantized engine torch offers (x86, fbgemm, onednn,
qnnpack), and loaded back through quantbench's TorchScript runtime, which sets the engine the
sidecar names before torch.jit.load (the file holds unpacked int8 weights; loading packs them
for the process's engine). Each model is timed with a contiguous and with a channels-last input.

Printed per model: top-1 on the test split, file size, how many of its convolutions oneDNN ran
(oneDNN's verbose log over one call: "x86" sends some layers to oneDNN, fbgemm none), and the
batch-1 latency: the median over rounds of each round's median call time, and the per-round
ratio to the reference (eager, x86, unpruned, contiguous: torch's defaults) as median and
quartiles. All models are timed in ONE process, in short rounds that visit every model in turn
(reversed every other round), so that all of them see the same machine: on a shared CPU the
speed drifts by more than the differences we look for, and only per-round ratios compare.

With --files A.pt B.pt ... nothing is built: the given deployment files (made by `quantbench
quantize`, each loaded under the engine its sidecar names) are timed the same way, the first one
being the reference.

A cross check shows that the load-time engine, not the convert-time one, decides the kernels:
a file converted under engine A and loaded under engine B gives exactly the outputs of the file
converted under B, and oneDNN runs its convolutions exactly when B's do.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from quantbench.warn import quiet_cpp_warnings, summarized_deprecations

quiet_cpp_warnings()  # before torch is imported

import torch  # noqa: E402

from quantbench.data import Batches, for_model, load_dataset  # noqa: E402
from quantbench.export import example_input, prune_for_export, read_sidecar, write_sidecar  # noqa: E402
from quantbench.fileio import write_json  # noqa: E402
from quantbench.flows import get_flow  # noqa: E402
from quantbench.models import load_checkpoint  # noqa: E402
from quantbench.quantize import calibrate  # noqa: E402
from quantbench.runtimes import torchscript  # noqa: E402
from quantbench.timing import time_calls  # noqa: E402

REFERENCE = ("eager", "x86", "unpruned", "contiguous")


def images(split, mean, std, n: int) -> torch.Tensor:
    return torch.cat([x for x, _ in Batches(split, 500, mean, std, limit=n)])


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


@contextlib.contextmanager
def captured_stdout(path: Path):
    """The process's C-level stdout (where oneDNN's verbose log goes) into `path`."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def onednn_convs(model, x: torch.Tensor, tmp: Path) -> int:
    """Convolutions oneDNN executes in one call of `model` (0: another library ran them all)."""
    log = tmp / "onednn-verbose.txt"
    with torch.inference_mode(), captured_stdout(log), \
            torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        model(x)
    return sum(1 for line in log.read_text().splitlines() if ",exec," in line and ",convolution," in line)


@torch.no_grad()
def top1(model, x: torch.Tensor, labels: torch.Tensor) -> float:
    pred = torch.cat([model(b).argmax(1) for b in x.split(500)])
    return (pred == labels).float().mean().item() * 100


def build(args, data, tmp: Path) -> dict[tuple[str, str, str], Path]:
    """(flow, engine, pruned?) -> TorchScript file with a sidecar naming its engine."""
    shape = tuple(data.input_shape)
    example = example_input(shape)
    files = {}
    for flow_name in args.flows:
        flow = get_flow(flow_name)
        for variant in ("unpruned", "pruned"):
            fp32, meta = load_checkpoint(args.checkpoint, num_classes=data.num_classes)
            model = flow.from_float(fp32, meta, "static")
            pruning = prune_for_export(model, shape, variant == "pruned", data)
            t0 = time.perf_counter()
            prepared = flow.prepare(model, args.qconfig, qat=False, example=example)
            calibrate(prepared, data, args.calib, 100, progress=False)
            print(f"{flow_name} {variant}: {len(pruning.get('layers', []))} convs pruned, "
                  f"calibrated on {args.calib} images in {time.perf_counter() - t0:.0f} s", flush=True)
            for engine in args.engines:
                path = tmp / f"{flow_name}-{variant}-{engine}.pt"
                try:
                    with torchscript.quantized_engine(engine):
                        qmodel = flow.convert(copy.deepcopy(prepared))
                        flow.export(qmodel, path, example)
                        torch.jit.load(str(path))(example)
                except Exception as e:  # an engine that cannot run this model is a finding, not a crash
                    print(f"  {engine}: FAILED, {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                    continue
                write_sidecar(path, engine=engine, flow=flow_name, pruning=pruning)
                files[(flow_name, engine, variant)] = path
    return files


def cross_check(files: dict, engines: list[str], x: torch.Tensor, tmp: Path) -> list[dict]:
    """Convert under A, load under B: same outputs and kernels as converted under B?"""
    rows = []
    flow = next(iter(files))[0]
    for a in engines:
        for b in engines:
            if a == b or (flow, a, "unpruned") not in files or (flow, b, "unpruned") not in files:
                continue
            src = files[(flow, a, "unpruned")]
            torch.backends.quantized.engine = b
            crossed = torch.jit.load(str(src)).eval()
            native = torchscript.load(files[(flow, b, "unpruned")])  # sets engine b
            with torch.inference_mode():
                same = torch.equal(crossed(x), native(x))
            rows.append({"converted": a, "loaded": b, "same_outputs": same,
                         "onednn_convs": onednn_convs(crossed, x, tmp),
                         "native_onednn_convs": onednn_convs(native, x, tmp)})
    return rows


def interleaved(models: dict, inputs: dict, rounds: int, calls: int, warmup: int) -> dict:
    """Per-round median ms of each (model, layout), visiting all in turn, reversed every other round."""
    keys = list(inputs)
    for key in keys:
        torch.backends.quantized.engine = key[1]  # some int8 ops look at the engine per call
        time_calls(models[key[:3]], inputs[key], warmup)  # the TorchScript executor optimizes on its first calls
    per_round: dict = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            torch.backends.quantized.engine = key[1]
            per_round[key].append(statistics.median(time_calls(models[key[:3]], inputs[key], calls)) * 1e3)
    return per_round


def main() -> int:
    engines_here = torchscript.engines()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="fp32 checkpoint (.pth); not with --files")
    ap.add_argument("--data-dir", required=True, help="ImageFolder tree (train/, test/)")
    ap.add_argument("--flows", nargs="+", default=["eager", "fx"], choices=["eager", "fx"])
    ap.add_argument("--engines", nargs="+", default=engines_here, choices=engines_here)
    ap.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                    choices=["contiguous", "channels_last"], help="memory format of the timed input")
    ap.add_argument("--qconfig", default="default")
    ap.add_argument("--calib", type=int, default=2000, help="training images for calibration")
    ap.add_argument("--accuracy-images", type=int, default=10_000, help="test images for top-1 (0: skip)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=60, help="calls per model per round")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="threads while timing")
    ap.add_argument("--files", nargs="+", type=Path,
                    help="time these TorchScript files instead (the first is the reference)")
    ap.add_argument("--output", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if bool(args.files) == bool(args.checkpoint):
        ap.error("give either --checkpoint (build the models) or --files (time these)")
    if "contiguous" not in args.layouts or not args.files and ("x86" not in args.engines or "eager" not in args.flows):
        ap.error("the reference (eager, x86, unpruned, contiguous) must be among the models")

    # the images normalized as the model was trained (its checkpoint's or sidecar's mean and std)
    meta = read_sidecar(args.files[0]) if args.files else load_checkpoint(args.checkpoint)[1]
    data = for_model(load_dataset(args.data_dir, train=True, progress=False), meta, "the model")
    torch.set_num_threads(args.threads)
    shape = tuple(data.input_shape)
    result: dict = {"checkpoint": str(args.checkpoint), "input_shape": list(shape), "qconfig": args.qconfig,
                    "engines": args.engines, "threads": args.threads, "batch": 1}
    x1 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.files:
            files = {}
            for path in args.files:
                side = read_sidecar(path)
                pruned = "pruned" if (side.get("pruning") or {}).get("applied") else "unpruned"
                files[(path.name, side.get("engine") or torch.backends.quantized.engine, pruned)] = path
            reference = (*next(iter(files)), "contiguous")
        else:
            files = build(args, data, tmp)
            reference = REFERENCE
            result["cross_check"] = cross_check(files, args.engines, x1, tmp)
            print("convert under A, load under B (eager, unpruned):")
            for row in result["cross_check"]:
                print(f"  {row['converted']:>7} -> {row['loaded']:<7} outputs identical to converted-under-"
                      f"{row['loaded']}: {row['same_outputs']}; oneDNN convs {row['onednn_convs']} "
                      f"(native {row['native_onednn_convs']})")

        test_x = images(data.test, data.mean, data.std, args.accuracy_images) if args.accuracy_images else None
        models, info = {}, {}
        for key, path in files.items():
            models[key] = model = torchscript.load(path)  # sets the engine the sidecar names
            info[key] = {"file_bytes": path.stat().st_size, "onednn_convs": onednn_convs(model, x1, tmp),
                         "top1": top1(model, test_x, data.test.labels[:len(test_x)]) if test_x is not None else None}
    layouts = {"contiguous": x1, "channels_last": x1.contiguous(memory_format=torch.channels_last)}
    inputs = {(*key, layout): layouts[layout] for key in models for layout in args.layouts}
    t0 = time.perf_counter()
    per_round = interleaved(models, inputs, args.rounds, args.calls, args.warmup)
    ref = per_round[reference]
    rows = []
    for key, ms in per_round.items():
        ratios = [a / b for a, b in zip(ms, ref)]
        rows.append({"flow": key[0], "engine": key[1], "pruned": key[2] == "pruned", "layout": key[3],
                     **info[key[:3]], "median_ms": statistics.median(ms), "ms_range": [min(ms), max(ms)],
                     "ratio_vs_reference": spread(ratios), "per_round_ms": ms})
    result.update(rows=rows, reference="/".join(reference), rounds=args.rounds, calls_per_round=args.calls,
                  timing_wall_s=time.perf_counter() - t0)

    print(f"\nbatch 1, {args.threads} thread(s), {args.rounds} interleaved rounds x {args.calls} calls; "
          f"ratio: per-round median ms / reference ({'/'.join(reference)})")
    width = max(6, *(len(k[0]) + 2 for k in per_round))
    print(f"{'model':<{width}}{'engine':<9}{'pruned':<8}{'layout':<14}{'top-1 %':>8}{'bytes':>10}{'oneDNN':>7}"
          f"{'ms':>8}{'ratio':>7}  {'quartiles':<13}")
    for r in sorted(rows, key=lambda r: r["ratio_vs_reference"]["median"]):
        s = r["ratio_vs_reference"]
        acc = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        print(f"{r['flow']:<{width}}{r['engine']:<9}{'yes' if r['pruned'] else 'no':<8}{r['layout']:<14}{acc:>8}"
              f"{r['file_bytes']:>10}{r['onednn_convs']:>7}{r['median_ms']:>8.3f}{s['median']:>7.3f}  "
              f"{s['q1']:.3f}..{s['q3']:.3f}")
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    with summarized_deprecations():
        rc = main()
    sys.exit(rc)
