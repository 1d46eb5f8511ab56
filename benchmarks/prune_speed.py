"""What dead-tap pruning (quantbench.prune) buys the eager static int8 ResNet-18 (a benchmark, not a test).

    PYTHONPATH=src .venv/bin/python benchmarks/prune_speed.py \\
        --checkpoint /work/shared/checkpoints/resnet18-cifar10-fp32.pth --data-dir /work/data/cifar10

1. exactness: max |fp32 logits unpruned - pruned| on real test images;
2. eager static int8 (fuse_model, the "default" qconfig, calibration on training images, convert),
   once without and once with pruning, from the same fp32 weights and calibration images, for
   each quantized engine asked for (--engines x86 fbgemm): top-1 on the full test split,
   TorchScript (trace + freeze) file size, and the batch-1, single-thread latency ratio
   pruned / unpruned (and, with several engines, each model against the first engine's unpruned).

The latency is measured in ONE process, in short rounds that alternate the two models (and which
goes first), so that both see the same machine: on shared or throttling CPUs the speed drifts by
more than the difference we look for, and only the per-round ratio is comparable. Each round's
ratio is the pruned model's median call time over the unpruned one's in that round.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from quantbench.warn import quiet_cpp_warnings, summarized_deprecations

quiet_cpp_warnings()  # before torch is imported

import torch  # noqa: E402
from torch.ao import quantization as tq  # noqa: E402

from quantbench.data import Batches, load_dataset  # noqa: E402
from quantbench.export import export_torchscript  # noqa: E402
from quantbench.fileio import write_json  # noqa: E402
from quantbench.flows.qconfigs import qconfig  # noqa: E402
from quantbench.models import load_checkpoint  # noqa: E402
from quantbench.prune import prune_dead_taps  # noqa: E402
from quantbench.worker import time_calls  # noqa: E402


def images(split, mean, std, n: int, seed: int = 0, shuffle: bool = False) -> torch.Tensor:
    return torch.cat([x for x, _ in Batches(split, 500, mean, std, shuffle=shuffle, seed=seed, limit=n)])


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(500)])


def observed(fp32: torch.nn.Module, calib: torch.Tensor, qconfig_name: str) -> torch.nn.Module:
    """Eager static int8 up to calibration, as quantbench's eager flow does it (fuse, observe)."""
    model = copy.deepcopy(fp32).eval()
    model.fuse_model()  # by module names: the pruned convs kept theirs
    model.qconfig = qconfig(qconfig_name)
    tq.prepare(model, inplace=True)
    with torch.no_grad():
        for b in calib.split(100):
            model(b)
    return model


def int8(prepared: torch.nn.Module, engine: str) -> torch.nn.Module:
    """Convert under `engine`: the int8 weights are packed for that engine's kernels."""
    torch.backends.quantized.engine = engine
    return tq.convert(copy.deepcopy(prepared), inplace=True)


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


def interleaved(models: dict[str, torch.jit.ScriptModule], x: torch.Tensor, rounds: int, calls: int,
                warmup: int) -> dict:
    """Per-round median call time of each model, alternating models and their order each round."""
    names = list(models)
    for name in names:
        time_calls(models[name], x, warmup)  # the TorchScript executor optimizes on its first calls
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            per_round[name].append(statistics.median(time_calls(models[name], x, calls)) * 1e3)
    return per_round


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="fp32 resnet18 checkpoint (.pth)")
    ap.add_argument("--data-dir", required=True, help="CIFAR-10 ImageFolder tree (train/, test/)")
    ap.add_argument("--exact-images", type=int, default=1000, help="test images for the fp32 exactness check")
    ap.add_argument("--calib", type=int, default=2000, help="training images for calibration")
    ap.add_argument("--qconfig", default="default")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=100, help="calls per model per round")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="threads while timing")
    ap.add_argument("--engines", nargs="+", choices=torch.backends.quantized.supported_engines,
                    help="quantized engines to compare, e.g. x86 fbgemm (default: torch's own, x86)")
    ap.add_argument("--work-dir", help="where the TorchScript files go (default: a temporary folder)")
    ap.add_argument("--output", help="also write the figures to this JSON file")
    args = ap.parse_args()

    data = load_dataset(args.data_dir, train=True, progress=False)
    fp32, _ = load_checkpoint(args.checkpoint, num_classes=data.num_classes, quantizable=True)
    shape = tuple(data.test.images.shape[1:])
    result: dict = {"checkpoint": str(args.checkpoint), "input_shape": list(shape), "qconfig": args.qconfig}

    # 1. exactness of the fp32 pass on real images (prune_dead_taps also checks them itself).
    real = images(data.test, data.mean, data.std, args.exact_images)
    pruned_fp32 = copy.deepcopy(fp32)
    report = prune_dead_taps(pruned_fp32, shape, inputs=real)
    diff = (logits(fp32, real) - logits(pruned_fp32, real)).abs().max().item()
    result["prune"] = report.to_dict()
    result["fp32_max_abs_logit_diff"] = diff
    print(f"pruned {len(report.layers)} of {report.convs_seen} convs at {shape}: "
          f"{report.weights_before} -> {report.weights_after} weights")
    for layer in report.layers:
        print(f"  {layer.name}: {layer.input_hw} map, kernel {layer.old_kernel} -> {layer.new_kernel}, "
              f"padding {layer.old_padding} -> {layer.new_padding}")
    print(f"fp32 max |logit diff| on {len(real)} test images: {diff:.3g}")

    # 2. eager static int8, both ways, from the same weights and calibration images, under each
    # engine. Packed weights keep the engine they were packed for, so the models of several
    # engines can be timed side by side in this one process.
    calib = images(data.train, data.mean, data.std, args.calib, shuffle=True)
    prepared = {"unpruned": observed(fp32, calib, args.qconfig), "pruned": observed(pruned_fp32, calib, args.qconfig)}
    test = images(data.test, data.mean, data.std, len(data.test))  # in label order (no shuffle)
    engines = args.engines or [torch.backends.quantized.engine]
    loaded, preds, sizes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            for variant, model in prepared.items():
                name = f"{variant}@{engine}"
                qmodel = int8(model, engine)
                preds[name] = logits(qmodel, test).argmax(1)
                acc = (preds[name] == data.test.labels).float().mean().item() * 100
                path = Path(args.work_dir or tmp) / f"int8-{variant}-{engine}.pt"
                export_torchscript(qmodel, path, torch.randn(1, *shape))
                sizes[name] = path.stat().st_size
                loaded[name] = torch.jit.load(str(path))  # packs the weights for `engine` again
                result.setdefault("int8", {})[name] = {"top1": acc, "file_bytes": sizes[name]}
                print(f"int8 {name}: top-1 {acc:.2f} %, TorchScript {sizes[name]} bytes")
            same = (preds[f"pruned@{engine}"] == preds[f"unpruned@{engine}"]).float().mean().item() * 100
            result["int8"][f"pruned@{engine}"]["same_top1_as_unpruned_percent"] = same
            print(f"int8 pruned vs unpruned @{engine}: same top-1 on {same:.2f} % of test images, "
                  f"file size ratio {sizes[f'pruned@{engine}'] / sizes[f'unpruned@{engine}']:.3f}")

    torch.set_num_threads(args.threads)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    per_round = interleaved(loaded, x, args.rounds, args.calls, args.warmup)
    base = f"unpruned@{engines[0]}"
    ratios = {f"pruned/unpruned @{e}": [p / u for p, u in zip(per_round[f"pruned@{e}"], per_round[f"unpruned@{e}"])]
              for e in engines}
    ratios.update({f"{n} / {base}": [a / b for a, b in zip(v, per_round[base])]
                   for n, v in per_round.items() if not n.endswith(f"@{engines[0]}")})
    result["latency"] = {
        "threads": args.threads, "batch": 1, "rounds": args.rounds, "calls_per_round": args.calls,
        "median_ms": {n: statistics.median(v) for n, v in per_round.items()},
        "per_round_median_ms": per_round, "ratios": {n: spread(v) for n, v in ratios.items()},
        "wall_s": time.perf_counter() - t0}
    lat = result["latency"]
    print(f"batch 1, {args.threads} thread(s), {args.rounds} alternating rounds x {args.calls} calls:")
    for n, v in per_round.items():
        print(f"  latency {n}: median of round medians {lat['median_ms'][n]:.3f} ms "
              f"(rounds {min(v):.3f} .. {max(v):.3f})")
    for n, r in lat["ratios"].items():
        print(f"  ratio {n}: median {r['median']:.3f}, quartiles {r['q1']:.3f} .. {r['q3']:.3f}, "
              f"range {r['min']:.3f} .. {r['max']:.3f}")
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    with summarized_deprecations():
        rc = main()
    sys.exit(rc)
