"""`quantbench` command line: a table from subcommand to (arguments, handler), each handler a
thin call into the Python API (quantbench/__init__.py lists it). All argparse lives here."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import QuantbenchError
from .fileio import check_writable, run_lock
from .warn import quiet_cpp_warnings

quiet_cpp_warnings()  # before anything imports torch

EPILOG = "Data: --data-dir DIR takes an ImageFolder tree (DIR/train/<class>/*.jpg, DIR/test/...); " \
         "without it CIFAR-10 is downloaded under --data-root. --debug shows the full traceback of an error."


# ------------------------------------------------------------------ shared options
def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, help="ImageFolder tree with train/ and test/ (or val/)")
    g.add_argument("--data-root", type=Path, default=Path("data"),
                   help="where torchvision's CIFAR-10 is downloaded when --data-dir is not given (default: ./data)")
    g.add_argument("--image-size", type=int,
                   help="resize images to N x N (default: the images' own size when they all agree; for a "
                        "trained model, the size it was trained at)")


def _common(p: argparse.ArgumentParser, threads: bool = True) -> None:
    if threads:
        p.add_argument("--threads", type=int, help="torch intra-op threads for the work (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the default when not on a terminal)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    """How int8 models are made: shared by `quantize` and `replicate`, with one meaning each."""
    from .flows.qconfigs import QCONFIGS
    from .quantize import QAT_SCHEDULES
    g = p.add_argument_group("quantization")
    g.add_argument("--qconfig", default="default",
                   help=f"one of {', '.join(QCONFIGS)}: default = best practice for this CPU, "
                        "seed = the original's 7-bit ranges (default: default)")
    g.add_argument("--calib-samples", type=int, default=10_000, help="training images for calibration (default: 10000)")
    g.add_argument("--calib-batch-size", type=int, default=100, help="(default: 100)")
    g.add_argument("--qat-preset", default="fast",
                   help=f"QAT fine-tune schedule: {', '.join(QAT_SCHEDULES)} (default: fast)")
    _calibration_args(g)
    _fp32_layers_arg(g)
    g.add_argument("--no-prune", action="store_true",
                   help="keep convolution taps that only ever see zero padding (default: drop them; exact, "
                        "verified on every file, recorded in its sidecar)")
    g.add_argument("--engine", help="quantized engine of TorchScript int8 files: x86, fbgemm, onednn, qnnpack "
                                    "(default: the fastest measured for this CPU; recorded in the sidecar, set "
                                    "when the file is loaded)")
    g.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization of the fp32 weights before quantizing (conv -> BN -> ReLU -> "
                        "conv pairs; exact, verified, recorded in the sidecar): helps per-tensor weights")


def _timing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("timing")
    g.add_argument("--bench-threads", default="1", help="threads for timing: N or 'all' (default: 1)")
    g.add_argument("--batch-sizes", default="1", help="comma list (default: 1); >1 adds throughput")
    g.add_argument("--min-runs", type=int, default=200, help="timed calls per model at least (default: 200)")
    g.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timing per model and batch size at most (default: 60)")
    g.add_argument("--processes", type=int, default=3,
                   help="fresh measuring processes per model; the median of their medians is reported "
                        "(default: 3)")


def parse_threads(s: str) -> int:
    if str(s) == "all":
        return os.cpu_count() or 1
    try:
        n = int(s)
    except ValueError as e:
        raise QuantbenchError(f"--bench-threads must be a number or 'all', not {s!r}") from e
    if n < 1:
        raise QuantbenchError("--bench-threads must be at least 1")
    return n


def parse_batch_sizes(s: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in str(s).split(",") if x.strip())
    except ValueError as e:
        raise QuantbenchError(f"--batch-sizes takes a comma list of numbers, not {s!r}") from e
    if not sizes or min(sizes) < 1:
        raise QuantbenchError("--batch-sizes must list numbers >= 1")
    return sizes


def _model_args(p: argparse.ArgumentParser, arch: bool = True) -> None:
    if arch:
        p.add_argument("--arch", help="architecture: any torchvision classifier (resnet18, mobilenet_v2, "
                                      "efficientnet_b0, ...), resnet10 or vit_tiny (default: resnet18)")
    p.add_argument("--model", metavar="SPEC",
                   help="your own model instead: FILE.py:FUNCTION or package.module:FUNCTION, a function "
                        "called as FUNCTION(num_classes=N), by keyword, returning an nn.Module; checked before "
                        "any data is read (its code runs only because you name it)")


def _list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _data_source(args):
    from .data import DataSource
    return DataSource(args.data_dir, args.data_root, getattr(args, "image_size", None))


def _bench_config(args):
    from .bench import BenchConfig
    return BenchConfig(threads=parse_threads(args.bench_threads), batch_sizes=parse_batch_sizes(args.batch_sizes),
                       min_runs=args.min_runs, budget_s=args.budget, processes=args.processes,
                       accuracy=not getattr(args, "no_accuracy", False), progress=not args.no_progress,
                       data=_data_source(args))


def _quantize_config(args, method: str = "static", flow: str = "eager", **extra):
    from .quantize import QuantizeConfig
    return QuantizeConfig(method=method, flow=flow, qconfig=args.qconfig, calib_samples=args.calib_samples,
                          calib_batch_size=args.calib_batch_size, qat_schedule=args.qat_preset,
                          prune=not args.no_prune, engine=args.engine, **_calibration_options(args), **extra)


# ------------------------------------------------------------------ train
def train_args(p: argparse.ArgumentParser) -> None:
    from .train import PRESETS
    _data_args(p)
    p.add_argument("--preset", default="fast", help=f"fp32 training recipe: {', '.join(PRESETS)} (default: fast)")
    _model_args(p)
    p.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    p.add_argument("--batch-size", type=int, help="override the recipe's global batch size")
    p.add_argument("--lr", type=float, help="override the recipe's (peak) learning rate")
    p.add_argument("--output", type=Path, default=Path("runs/train"), help="run directory (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the training run already in OUTPUT (default: refuse; --resume continues it)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0)
    _common(p)


def _arch(args) -> str | None:
    if args.arch and args.model:
        raise QuantbenchError("give an architecture (--arch) or your own model (--model), not both")
    return None if args.model else (args.arch or "resnet18")


def train_cmd(args) -> int:
    from .train import check_device, check_image_size, check_output, get_recipe, train
    recipe = get_recipe(args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 writes (and holds the lock)
    check_device(args.device)  # every option checked before any data is read
    if args.image_size is not None:
        if args.image_size < 1:
            raise QuantbenchError(f"--image-size must be at least 1, not {args.image_size}")
        check_image_size(args.image_size, args.image_size, recipe)
    if main_rank:
        check_output(args.output, resume=args.resume, overwrite=args.overwrite)
    data = _data_source(args).load(train=True, progress=not args.no_progress)
    with run_lock(args.output) if main_rank else contextlib.nullcontext():  # before any training
        result = train(data, recipe, args.output, arch=_arch(args), model_spec=args.model, resume=args.resume,
                       device=args.device, seed=args.seed, progress=not args.no_progress)
    if result.history and main_rank:
        print(f"best test accuracy {result.best_acc:.2f}% -> {args.output / 'best.pth'}")
    return 0


# ------------------------------------------------------------------ eval
def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="fp32 checkpoint (.pth) or deployment file (.pt, .pt2, .onnx, .xml)")
    _data_args(p)
    _model_args(p, arch=False)
    p.add_argument("--batch-size", type=int, default=500)
    _common(p)


def eval_cmd(args) -> int:
    from .evaluate import evaluate_file
    if args.batch_size < 1:
        raise QuantbenchError("--batch-size must be at least 1")
    acc = evaluate_file(args.file, _data_source(args), batch_size=args.batch_size, progress=not args.no_progress,
                        model_spec=args.model)
    print(f"{args.file}: top-1 {acc:.2f}%")
    return 0


# ------------------------------------------------------------------ quantize
def quantize_args(p: argparse.ArgumentParser) -> None:
    from .flows import FLOWS, METHODS
    p.add_argument("checkpoint", type=Path, help="fp32 checkpoint (.pth)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--flow", default="eager", help=f"one of: {', '.join(FLOWS)} (default: eager)")
    p.add_argument("--output", type=Path, required=True, help="deployment file to write")
    _quantize_args(p)
    p.add_argument("--epochs", type=int, help="override the QAT schedule's epochs")
    p.add_argument("--work-dir", type=Path, help="QAT checkpoints (default: OUTPUT's folder/qat-work)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted QAT run")
    _model_args(p, arch=False)
    _data_args(p)
    _common(p)


def quantize_cmd(args) -> int:
    from .quantize import check_output, quantize_to_file
    cfg = _quantize_config(args, method=args.method, flow=args.flow, qat_epochs=args.epochs, resume=args.resume,
                           work_dir=args.work_dir or args.output.parent / "qat-work", model=args.model)
    from .models import read_checkpoint
    check_output(args.output, cfg.flow)  # fail on bad options before loading any data
    check_writable(args.output)
    _, meta = read_checkpoint(args.checkpoint)
    data = None
    if cfg.method != "dynamic" or args.data_dir is not None:
        data = _data_source(args).load_for(meta, f"checkpoint {args.checkpoint}", train=cfg.method != "dynamic",
                                           progress=not args.no_progress)
    with run_lock(cfg.work_dir) if cfg.method == "qat" else contextlib.nullcontext():  # one QAT run per folder
        rec = quantize_to_file(args.checkpoint, args.output, cfg, data, progress=not args.no_progress)
    print(f"{rec['label']}: wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB) "
          f"in {rec['quantize_s']:.0f} s")
    return 0


# ------------------------------------------------------------------ bench
def bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", type=Path, nargs="+", help="deployment files (.pt TorchScript, .pt2, .onnx, .xml)")
    _data_args(p)
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--no-accuracy", action="store_true", help="latency, size and memory only (no test data needed)")
    _timing_args(p)
    _common(p)


def bench_cmd(args) -> int:
    from .bench import bench
    from .report import write_report
    for out in (args.json, args.markdown):  # before minutes of measuring, not after
        if out is not None:
            check_writable(out)
    results = bench(args.models, _bench_config(args))
    print(write_report(results, json_path=args.json, markdown_path=args.markdown))
    _print_verdict(results)
    return 0


def _print_verdict(results) -> None:
    """After the table: warnings recorded with the models, then which file to ship."""
    from .report import model_warnings, recommendation_lines
    for w in model_warnings(results):
        print(w.replace("**", ""), file=sys.stderr)
    if any(m.accuracy is not None for m in results.models):
        print("\nShip this (fastest int8 within 0.3 point of fp32 accuracy):")
        for line in recommendation_lines(results):
            print(line.replace("**", ""))


# ------------------------------------------------------------------ replicate
def replicate_args(p: argparse.ArgumentParser) -> None:
    from .flows import FLOWS, METHODS
    from .train import PRESETS
    _data_args(p)
    p.add_argument("--checkpoint", type=Path, help="start from this fp32 checkpoint instead of training")
    p.add_argument("--preset", default="fast", help=f"fp32 training recipe if no --checkpoint: {', '.join(PRESETS)} "
                                                    "(default: fast)")
    p.add_argument("--epochs", type=int, help="override the fp32 recipe's number of epochs")
    p.add_argument("--qat-epochs", type=int, help="override the QAT schedule's number of epochs")
    _model_args(p)
    p.add_argument("--flows", default="eager", help=f"comma list of {', '.join(FLOWS)} (default: eager)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    p.add_argument("--runtimes", default="auto",
                   help="comparison rows from other runtimes: comma list of onnxruntime, openvino, executorch; 'auto' (default) "
                        "adds those installed (pip install '.[runtimes]'), 'none' adds none")
    p.add_argument("--plain", default="", metavar="RUNTIMES",
                   help="also make these runtimes' int8 rows as the runtime alone would (no pruning, its default "
                        "calibration), labelled e.g. openvino-int8-plain: the baseline to measure quantbench against")
    _quantize_args(p)
    p.add_argument("--bias-correction", default="fast",
                   help="NNCF's bias correction in the OpenVINO row: fast, full or none (default: fast)")
    p.add_argument("--output", type=Path, default=Path("runs/replicate"), help="run directory")
    _timing_args(p)
    p.add_argument("--resume", action="store_true", help="reuse models already made in OUTPUT")
    _common(p)


def replicate_cmd(args) -> int:
    from .report import markdown_table
    from .replicate import ReplicateConfig, replicate
    runtimes = None if args.runtimes == "auto" else tuple(r for r in _list(args.runtimes) if r != "none")
    cfg = ReplicateConfig(output=args.output, data=_data_source(args), checkpoint=args.checkpoint,
                          preset=args.preset, epochs=args.epochs, flows=_list(args.flows),
                          methods=_list(args.methods), runtimes=runtimes, plain=_list(args.plain), arch=_arch(args),
                          quantize=_quantize_config(args, model=args.model, qat_epochs=args.qat_epochs),
                          resume=args.resume, bench=_bench_config(args))
    with run_lock(args.output):
        results = replicate(cfg, progress=not args.no_progress)
    print(markdown_table(results))
    _print_verdict(results)
    print(f"\nwrote {args.output / 'report.md'}, results.json, results.csv and models/ in {args.output}")
    return 0


# ------------------------------------------------------------------ profile
def profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="deployment file (.pt, .pt2, .onnx, .xml)")
    p.add_argument("--calls", type=int, default=200, help="profiled calls (default: 200)")
    p.add_argument("--bench-threads", default="1", help="threads: N or 'all' (default: 1)")
    p.add_argument("--top", type=int, default=15, help="operator rows to show (default: 15)")
    p.add_argument("--json", type=Path, help="write the whole profile here")
    _common(p, threads=False)


def profile_cmd(args) -> int:
    from .fileio import write_json
    from .profiling import profile_model, render_profile
    if args.json is not None:
        check_writable(args.json)
    prof = profile_model(args.model, calls=args.calls, threads=parse_threads(args.bench_threads))
    if args.json:
        write_json(args.json, prof)
    print(render_profile(prof, top=args.top))
    return 0


# ------------------------------------------------------------------ report
def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", help="run directories holding results.json")
    p.add_argument("--output", type=Path, help="where to write a comparison (default: the first run)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def report_cmd(args) -> int:
    from .report import report_runs
    check_writable(args.output or args.runs[0], is_dir=True)
    print(f"wrote {report_runs(args.runs, args.output)}")
    return 0


# ------------------------------------------------------------------ sensitivity
def _calibration_args(g) -> None:
    """Options choosing observers, calibration images and fp32 layers (QuantizeConfig's fields);
    `quantize` and `replicate` take the same ones, see calibration_options."""
    g.add_argument("--observer", help="activation observer: minmax, moving-average, histogram or percentile "
                                      "(default: the qconfig's: histogram for default, moving-average for seed)")
    g.add_argument("--percentile", type=float, default=99.99,
                   help="with --observer percentile: clip activations at this percentile of |x| (default: 99.99)")
    g.add_argument("--weight-scheme", help="per-channel or per-tensor (default: per-channel)")
    g.add_argument("--act-scheme", help="affine or symmetric activations (default: affine)")
    g.add_argument("--calib-transform", default="test",
                   help="test: calibrate on clean training images (default); train: through the original's "
                        "training augmentation, as the original did")


def _fp32_layers_arg(g) -> None:
    g.add_argument("--fp32-layers", default="",
                   help="comma list of conv/linear layers to keep fp32 (e.g. conv1,fc); "
                        "`quantbench sensitivity` ranks the candidates")
    g.add_argument("--fallback", type=int, metavar="K",
                   help="with --sensitivity: also keep fp32 the K layers that buy the most accuracy back "
                        "(its gain column)")
    g.add_argument("--sensitivity", type=Path, metavar="FILE",
                   help="sensitivity.json written by `quantbench sensitivity` (for --fallback)")


def _calibration_options(args) -> dict:
    """QuantizeConfig keyword arguments from calibration_args' (and fp32_layers_arg's) options."""
    out = dict(observer=args.observer, percentile=args.percentile, weight_scheme=args.weight_scheme,
               act_scheme=args.act_scheme, calib_transform=args.calib_transform)
    if hasattr(args, "fp32_layers"):
        layers = tuple(x.strip() for x in args.fp32_layers.split(",") if x.strip())
        if (args.fallback is None) != (args.sensitivity is None):
            raise QuantbenchError("--fallback K and --sensitivity FILE go together")
        if args.fallback is not None:
            from .sensitivity import most_sensitive
            picked = most_sensitive(args.sensitivity, args.fallback)
            print(f"fp32 fallback from {args.sensitivity}: {', '.join(picked) or 'none'}", file=sys.stderr)
            layers = tuple(dict.fromkeys(layers + picked))  # merged, in order, once each
        out["fp32_layers"] = layers
    if hasattr(args, "equalize"):
        out["equalize"] = args.equalize
    if hasattr(args, "bias_correction"):
        out["bias_correction"] = args.bias_correction
    return out


def sensitivity_args(p) -> None:
    from .flows import FLOWS
    from .flows.qconfigs import QCONFIGS
    p.add_argument("checkpoint", type=Path, help="fp32 checkpoint (.pth)")
    p.add_argument("--flow", default="fx", help=f"one of: {', '.join(FLOWS)} (default: fx)")
    p.add_argument("--output", type=Path, default=Path("runs/sensitivity"),
                   help="folder for sensitivity.md, .json and .png (default: runs/sensitivity)")
    p.add_argument("--val-samples", type=int, default=1000,
                   help="validation images, held out of the training split (default: 1000)")
    p.add_argument("--layers", default="", help="comma list: analyse only these layers (default: every conv/linear)")
    p.add_argument("--top", type=int, help="rows to print (default: all; the files hold all)")
    p.add_argument("--seed", type=int, default=0, help="picks the validation and calibration images (default: 0)")
    g = p.add_argument_group("quantization")
    g.add_argument("--qconfig", default="default", help=f"one of {', '.join(QCONFIGS)} (default: default)")
    g.add_argument("--calib-samples", type=int, default=1000,
                   help="training images for calibration, apart from the validation ones (default: 1000)")
    g.add_argument("--calib-batch-size", type=int, default=100, help="(default: 100)")
    _calibration_args(g)
    _data_args(p)
    _common(p)


def sensitivity_cmd(args) -> int:
    from .flows.qconfigs import Scheme
    from .models import read_checkpoint
    from .quantize import QuantizeConfig
    from .sensitivity import render_sensitivity, sensitivity, write_sensitivity
    if args.top is not None and args.top < 1:
        raise QuantbenchError("--top must be at least 1")
    opts = _calibration_options(args)
    scheme = Scheme(args.qconfig, opts["observer"], opts["weight_scheme"], opts["act_scheme"], opts["percentile"])
    # every option checked before any data is read
    QuantizeConfig(method="static", flow=args.flow, calib_samples=args.calib_samples,
                   calib_batch_size=args.calib_batch_size, calib_transform=opts["calib_transform"])
    check_writable(args.output, is_dir=True)
    _, meta = read_checkpoint(args.checkpoint)
    data = _data_source(args).load_for(meta, f"checkpoint {args.checkpoint}", train=True,
                                       progress=not args.no_progress)
    layers = tuple(x.strip() for x in args.layers.split(",") if x.strip()) or None
    with run_lock(args.output):
        result = sensitivity(args.checkpoint, data, args.flow, scheme=scheme, val_samples=args.val_samples,
                             val_seed=args.seed, calib_samples=args.calib_samples,
                             calib_batch_size=args.calib_batch_size, calib_transform=opts["calib_transform"],
                             layers=layers, progress=not args.no_progress)
        paths = write_sensitivity(result, args.output)
    print(render_sensitivity(result, top=args.top))
    print(f"wrote {', '.join(str(p) for p in paths)} in {result.seconds:.0f} s")
    return 0


# ------------------------------------------------------------------ tune
def tune_args(p) -> None:
    from .flows import FLOWS
    from .flows.qconfigs import QCONFIGS
    p.add_argument("checkpoint", type=Path, help="fp32 checkpoint (.pth)")
    p.add_argument("--max-drop", type=float, default=0.3,
                   help="accuracy points below fp32 (on the validation images) that you accept (default: 0.3)")
    p.add_argument("--time-budget", default=None,
                   help="stop starting trials after this long, e.g. 30m, 1.5h, 900s (default: try them all)")
    p.add_argument("--objective", default="latency", help="latency (default) or size: what the pick minimizes")
    p.add_argument("--output", type=Path, default=Path("runs/tune"),
                   help="folder for tune.jsonl, tune.md, best.* and trials/ (default: runs/tune)")
    p.add_argument("--resume", action="store_true", help="continue the search in OUTPUT (trials done are kept)")
    p.add_argument("--flows", default=",".join(FLOWS), help=f"comma list of {', '.join(FLOWS)} (default: all)")
    p.add_argument("--runtimes", default="auto",
                   help="other runtimes to search: comma list of onnxruntime, openvino, executorch; 'auto' (default): "
                        "those installed; 'none'")
    _model_args(p, arch=False)
    p.add_argument("--val-samples", type=int, default=2000,
                   help="validation images held out of the training split; the budget is judged on them, "
                        "never on the test split (default: 2000)")
    p.add_argument("--sensitivity", type=Path,
                   help="a sensitivity.json (`quantbench sensitivity`) ranking the layers to keep fp32 "
                        "(default: rank them here by their int8 error, SQNR)")
    p.add_argument("--max-fallback", type=int, default=16, help="most layers kept fp32 in a trial (default: 16)")
    p.add_argument("--timing", type=float, default=4.0,
                   help="seconds of batch-1 timing per trial, against the fp32 reference (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="picks the validation and calibration images (default: 0)")
    g = p.add_argument_group("quantization (the starting point every trial varies)")
    g.add_argument("--qconfig", default="default", help=f"one of {', '.join(QCONFIGS)} (default: default)")
    g.add_argument("--calib-samples", type=int, default=1000,
                   help="training images for calibration, apart from the validation ones (default: 1000)")
    g.add_argument("--calib-transform", default="test", help="test (default) or train: see `quantize --help`")
    g.add_argument("--no-prune", action="store_true", help="keep convolution taps that only see zero padding")
    _data_args(p)
    _common(p)


def tune_cmd(args) -> int:
    from .quantize import QuantizeConfig
    from .tune import TuneConfig, parse_duration, tune
    runtimes = None if args.runtimes == "auto" else tuple(r for r in _list(args.runtimes) if r != "none")
    cfg = TuneConfig(
        checkpoint=args.checkpoint, data=_data_source(args), output=args.output, max_drop=args.max_drop,
        time_budget_s=parse_duration(args.time_budget) if args.time_budget else None, objective=args.objective,
        flows=_list(args.flows), runtimes=runtimes, val_samples=args.val_samples, timing_s=args.timing,
        sensitivity=args.sensitivity, max_fallback=args.max_fallback, resume=args.resume, seed=args.seed,
        quantize=QuantizeConfig(method="static", qconfig=args.qconfig, calib_samples=args.calib_samples,
                                calib_transform=args.calib_transform, prune=not args.no_prune, model=args.model,
                                seed=args.seed))
    if not args.checkpoint.is_file():
        raise QuantbenchError(f"no checkpoint {args.checkpoint}")
    summary = tune(cfg, progress=not args.no_progress)
    print((args.output / "tune.md").read_text())
    print(f"wrote {args.output / 'tune.md'}, tune.jsonl, tune.json and {summary.get('pick_file', 'no pick')}")
    return 0 if summary.get("within_budget") else 3


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Command:
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str = ""


COMMANDS: dict[str, Command] = {
    "train": Command(train_args, train_cmd, "train an fp32 model",
                     "Train an fp32 model. Writes last.pth (resumable), best.pth, metrics.jsonl and TensorBoard "
                     "logs in --output. Under torchrun it uses DistributedDataParallel."),
    "eval": Command(eval_args, eval_cmd, "top-1 accuracy of a checkpoint or deployment file"),
    "quantize": Command(quantize_args, quantize_cmd, "quantize an fp32 checkpoint to int8 and export it",
                        "Quantize an fp32 checkpoint and write a deployment file plus FILE.json, its sidecar "
                        "(how it was made: method, flow, the observers really used, calibration, input shape)."),
    "bench": Command(bench_args, bench_cmd, "accuracy, latency and size of deployment files, side by side",
                     "Measure deployment files, each in fresh processes with interleaved timing rounds."),
    "replicate": Command(replicate_args, replicate_cmd,
                         "the main job: train (or take a checkpoint), quantize every way, benchmark, report",
                         "Train fp32 (or take --checkpoint), make origin/ptq-d/ptq-s/qat for each flow plus "
                         "comparison rows from other runtimes, benchmark them, and write a run directory."),
    "profile": Command(profile_args, profile_cmd,
                       "where the time goes: one model's operators under its runtime's profiler",
                       "The table sums each operator type's time per call (batch 1). The gap between the wall "
                       "time and the operators' total is the runtime's own overhead."),
    "sensitivity": Command(sensitivity_args, sensitivity_cmd, "which layers int8 hurts: per-layer error and accuracy",
                           "For every conv/linear layer: the int8 error at its output (SQNR, PyTorch's numeric "
                           "tools), and the accuracy on a validation subset of the training split with only that "
                           "layer int8, and with only that layer fp32. Ranked table (.md, .json) and a chart."),
    "tune": Command(tune_args, tune_cmd, "the fastest int8 deployment within an accuracy budget (a search)",
                    "Search flows x runtimes x calibration choices x fp32 fallback for the fastest (or smallest) "
                    "deployment whose accuracy on validation images held out of the training split stays within "
                    "--max-drop of fp32. Every trial goes to tune.jsonl; the best so far is always saved as "
                    "best.<suffix>; --resume continues. Exit status 3 when no trial met the budget (best.* is "
                    "then the most accurate trial, fastest.* the fastest)."),
    "report": Command(report_args, report_cmd, "rebuild report.md and plots from run directories, or compare runs"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    ap = argparse.ArgumentParser(prog="quantbench", epilog=EPILOG,
                                 description="Train an image classifier (any torchvision model or your own), quantize it "
                                             "to int8 every way PyTorch offers, export it, and benchmark accuracy, "
                                             "latency and size side by side.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, cmd in COMMANDS.items():
        parsers[name] = p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help,
                                           epilog=EPILOG)
        cmd.add_args(p)
    return ap, parsers


def main(argv: list[str] | None = None) -> int:
    ap, parsers = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:  # the subcommand's own usage line, not the top-level one
        parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    from .warn import summarized_deprecations

    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True  # progress bars only on a terminal, not in logs

    try:
        with summarized_deprecations():
            if getattr(args, "threads", None) is not None:
                if args.threads < 1:
                    raise QuantbenchError("--threads must be at least 1")
                import torch
                torch.set_num_threads(args.threads)
            if isinstance(getattr(args, "model", None), str):  # --model SPEC (profile's `model` is a Path):
                # importable and callable, before any data is read
                from .models import load_builder
                load_builder(args.model)
            return COMMANDS[args.command].run(args) or 0
    except QuantbenchError as e:
        if args.debug:
            raise
        print("quantbench: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:
        if hasattr(args, "resume"):  # train, quantize, replicate, tune
            print("quantbench: interrupted (checkpoints written so far are intact; rerun with --resume)",
                  file=sys.stderr)
        else:
            print("quantbench: interrupted (files written so far are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
