"""`quantbench` command line: a thin layer over the Python API (quantbench.api)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import QuantbenchError
from .warn import quiet_cpp_warnings

quiet_cpp_warnings()  # before anything imports torch

EPILOG = "Data: --data-dir DIR takes an ImageFolder tree (DIR/train/<class>/*.jpg, DIR/test/...); " \
         "without it CIFAR-10 is downloaded under --data-root."


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, help="ImageFolder tree with train/ and test/ (or val/)")
    g.add_argument("--data-root", type=Path, default=Path("data"),
                   help="where torchvision's CIFAR-10 is downloaded when --data-dir is not given (default: ./data)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    from .flows import FLOWS, METHODS
    from .train import PRESETS

    ap = argparse.ArgumentParser(prog="quantbench", epilog=EPILOG,
                                 description="Train a CNN, quantize it to int8 every way PyTorch offers, "
                                             "export it, and benchmark accuracy, latency and size side by side.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an fp32 model", epilog=EPILOG,
                       description="Train an fp32 model. Writes last.pth (resumable), best.pth, metrics.jsonl "
                                   "and TensorBoard logs in --output. Under torchrun it uses DDP.")
    _data_args(p)
    p.add_argument("--preset", default="fast", help=f"training recipe: {', '.join(PRESETS)} (default: fast)")
    p.add_argument("--arch", default="resnet18", help="model architecture (default: resnet18)")
    p.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    p.add_argument("--batch-size", type=int, help="override the preset's global batch size")
    p.add_argument("--lr", type=float, help="override the preset's (peak) learning rate")
    p.add_argument("--output", type=Path, default=Path("runs/train"), help="run directory (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0)
    _common(p)

    p = sub.add_parser("eval", help="top-1 accuracy of a checkpoint or exported model", epilog=EPILOG)
    p.add_argument("model", type=Path, help="fp32 checkpoint (.pth) or deployment file (.pt, .pt2, ...)")
    _data_args(p)
    p.add_argument("--batch-size", type=int, default=500)
    _common(p)

    p = sub.add_parser("quantize", help="quantize an fp32 checkpoint to int8 and export it",
                       description="Quantize an fp32 checkpoint and write a deployment file plus FILE.json.",
                       epilog=EPILOG)
    p.add_argument("checkpoint", type=Path, help="fp32 checkpoint (.pth)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--flow", default="eager", help=f"one of: {', '.join(FLOWS)} (default: eager)")
    p.add_argument("--output", type=Path, required=True, help="deployment file to write")
    p.add_argument("--qconfig", default="default",
                   help="default: best practice for this CPU; seed: the original's 7-bit ranges")
    p.add_argument("--calib-samples", type=int, default=10_000, help="training images for calibration")
    p.add_argument("--calib-batch-size", type=int, default=100)
    p.add_argument("--preset", default="fast", help="QAT schedule: seed or fast (default: fast)")
    p.add_argument("--epochs", type=int, help="override the QAT preset's epochs")
    p.add_argument("--work-dir", type=Path, help="QAT checkpoints (default: OUTPUT's folder/qat-work)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted QAT run")
    _data_args(p)
    _common(p)

    p = sub.add_parser("bench", help="accuracy, latency and size of deployment files, side by side",
                       epilog=EPILOG)
    p.add_argument("models", type=Path, nargs="+", help="deployment files (.pt TorchScript, .pt2, .onnx, ...)")
    _data_args(p)
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--no-accuracy", action="store_true", help="latency, size and memory only (no test data needed)")
    _timing_args(p)
    _common(p)

    p = sub.add_parser("replicate", help="the main job: train (or take a checkpoint), quantize every way, "
                                         "benchmark, report", epilog=EPILOG)
    _data_args(p)
    p.add_argument("--checkpoint", type=Path, help="start from this fp32 checkpoint instead of training")
    p.add_argument("--preset", default="fast", help="fp32 training preset if no --checkpoint (default: fast)")
    p.add_argument("--qat-preset", default="fast", help="QAT preset (default: fast)")
    p.add_argument("--flows", default="eager", help=f"comma list of {', '.join(FLOWS)} (default: eager)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    p.add_argument("--runtimes", default="auto",
                   help="comparison rows from other runtimes: comma list of onnxrt, openvino; 'auto' (default) "
                        "adds those installed (pip install '.[runtimes]'), 'none' adds none")
    p.add_argument("--qconfig", default="default", help="default (best practice for this CPU) or seed")
    p.add_argument("--calib-samples", type=int, default=10_000, help="calibration images (default: 10000)")
    p.add_argument("--output", type=Path, default=Path("runs/replicate"), help="run directory")
    _timing_args(p)
    p.add_argument("--resume", action="store_true", help="reuse models already made in OUTPUT")
    _common(p)

    p = sub.add_parser("profile", help="where the time goes: one model's operators under its runtime's profiler",
                       epilog="The table sums each operator type's time per call (batch 1). The gap between "
                              "the wall time and the operators' total is the runtime's own overhead.")
    p.add_argument("model", type=Path, help="deployment file (.pt, .pt2, .onnx, .xml)")
    p.add_argument("--calls", type=int, default=200, help="profiled calls (default: 200)")
    p.add_argument("--bench-threads", default="1", help="threads: N or 'all' (default: 1)")
    p.add_argument("--top", type=int, default=15, help="operator rows to show (default: 15)")
    p.add_argument("--json", type=Path, help="write the whole profile here")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    p = sub.add_parser("report", help="rebuild report.md and plots from run directories")
    p.add_argument("runs", type=Path, nargs="+", help="run directories holding results.json")
    p.add_argument("--output", type=Path, help="where to write a comparison (default: the first run)")
    p.add_argument("--debug", action="store_true")
    return ap


def _timing_args(p) -> None:
    g = p.add_argument_group("timing")
    g.add_argument("--bench-threads", default="1", help="threads for timing: N or 'all' (default: 1)")
    g.add_argument("--batch-sizes", default="1", help="comma list (default: 1); >1 adds throughput")
    g.add_argument("--min-runs", type=int, default=200, help="timed calls per model at least (default: 200)")
    g.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timing per model and batch size at most (default: 60)")
    g.add_argument("--processes", type=int, default=3,
                   help="fresh measuring processes per model; the median of their medians is reported "
                        "(default: 3)")


# ------------------------------------------------------------------ command handlers
def _data(args, train: bool):
    from .data import load_dataset
    return load_dataset(args.data_dir, args.data_root, train=train, progress=not args.no_progress)


def cmd_train(args) -> int:
    from .train import get_recipe, train
    recipe = get_recipe(args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    result = train(_data(args, train=True), recipe, args.output, arch=args.arch, resume=args.resume,
                   device=args.device, seed=args.seed, progress=not args.no_progress)
    if result.history and os.environ.get("RANK", "0") == "0":
        print(f"best test accuracy {result.best_acc:.2f}% -> {args.output / 'best.pth'}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_file
    acc = evaluate_file(args.model, _data(args, train=False), batch_size=args.batch_size,
                        progress=not args.no_progress)
    print(f"{args.model}: top-1 {acc:.2f}%")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import quantize_cli
    return quantize_cli(args)


def cmd_bench(args) -> int:
    from .bench import bench_cli
    return bench_cli(args)


def cmd_replicate(args) -> int:
    from .replicate import replicate_cli
    return replicate_cli(args)


def cmd_profile(args) -> int:
    from .bench import parse_threads
    from .fileio import write_json
    from .profiling import profile_model, render_profile
    prof = profile_model(args.model, calls=args.calls, threads=parse_threads(args.bench_threads))
    if args.json:
        write_json(args.json, prof)
    print(render_profile(prof, top=args.top))
    return 0


def cmd_report(args) -> int:
    from .report import report_cli
    return report_cli(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .warn import summarized_deprecations

    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True  # progress bars only on a terminal, not in logs

    try:
        with summarized_deprecations():
            if getattr(args, "threads", None):
                import torch
                torch.set_num_threads(args.threads)
            return globals()[f"cmd_{args.command}"](args) or 0
    except QuantbenchError as e:
        if args.debug:
            raise
        print(f"quantbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantbench: interrupted (checkpoints written so far are intact; rerun with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
