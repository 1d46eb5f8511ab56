"""`quantbench` command line: a table from subcommand to (arguments, handler), each handler a
thin call into the Python API (quantbench/__init__.py lists it). All argparse lives here."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import QuantbenchError
from .fileio import check_writable, run_lock
from .warn import quiet_cpp_warnings

quiet_cpp_warnings()  # before anything imports torch

EPILOG = "Data: --data-dir DIR takes an ImageFolder tree (DIR/train/<class>/*.jpg, DIR/test/...); " \
         "without it CIFAR-10 is downloaded under --data-root. --debug shows the full traceback of an error."


# ------------------------------------------------------------------ options from config dataclasses
# The configs (QuantizeConfig, BenchConfig, each runtime's Options) state every default and help
# once; the options below are made from their fields, so --help, the API and the docs agree.
_MISSING = dataclasses.MISSING


def _default(f):
    if f.default is not _MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not _MISSING else None


def _kind(hint):
    """(argparse type, choices, is_list, is_bool) of a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if hint is bool:
        return None, None, False, True
    if origin is typing.Literal:
        return str, list(typing.get_args(hint)), False, False
    if origin in (typing.Union, types.UnionType) and args:
        return _kind(args[0])
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        return (int if inner is int else str), None, True, False
    if hint in (int, float, str, Path):
        return hint, None, False, False
    return str, None, False, False


def config_args(g, cls, names, defaults: dict | None = None, flags: dict | None = None,
                aliases: dict | None = None, dest_prefix: str = "", types: dict | None = None) -> None:
    """Add one option per dataclass field in `names`: --field-name, typed, its default and help
    from the field (`defaults` overrides a default for this command; `flags` renames a flag;
    `aliases` adds an old flag name that still works, with a one-line notice)."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    defaults, flags, aliases = defaults or {}, flags or {}, aliases or {}
    for name in names:
        f = by_name[name]
        default = defaults.get(name, _default(f))
        typ, choices, is_list, is_bool = _kind(hints[name])
        flag = flags.get(name, "--" + name.replace("_", "-"))
        dest = dest_prefix + name
        helptext = f.metadata.get("help", "")
        old = [a for a in (aliases.get(name), f.metadata.get("alias")) if a]
        if is_bool:
            if default:
                flag = flags.get(name, "--no-" + name.replace("_", "-"))
                g.add_argument(flag, dest=dest, action="store_false", default=True, help="turn off " + helptext[:1].lower() + helptext[1:] + " (on by default)")
            else:
                g.add_argument(flag, dest=dest, action="store_true", default=False, help=helptext)
            for a in old:
                g.add_argument(a, dest=dest, nargs=0, action=_renamed(flag, not default), help=argparse.SUPPRESS)
            continue
        conv = (types or {}).get(name) or typ
        if is_list:  # parsed by config_values, so a bad item is one line like any other bad option
            _LISTS[dest] = (typ, flag)
            conv = str
        shown = ",".join(map(str, default)) if is_list and default is not None else default
        extra = "" if default is None or default == () else f" (default: {shown})"
        if choices:
            helptext = helptext or f"one of {', '.join(choices)}"
        g.add_argument(flag, dest=dest, type=conv, default=default, choices=None,
                       metavar=flag.lstrip("-").split("-")[-1].upper() if not choices else "{" + ",".join(choices) + "}",
                       help=helptext + extra)
        for a in old:
            g.add_argument(a, dest=dest, type=conv, action=_renamed(flag), help=argparse.SUPPRESS)


def config_values(args, cls, names, dest_prefix: str = "") -> dict:
    return {n: value(args, dest_prefix + n) for n in names if hasattr(args, dest_prefix + n)}


_LISTS: dict[str, tuple[type, str]] = {}  # dest -> (item type, flag) of comma-list options


def value(args, dest: str):
    """An option's value; comma lists parsed here, with a one-line error naming the option."""
    v = getattr(args, dest)
    if dest not in _LISTS or not isinstance(v, str):
        return v
    typ, flag = _LISTS[dest]
    try:
        return tuple(typ(x.strip()) for x in v.split(",") if x.strip())
    except ValueError as e:
        raise QuantbenchError(f"{flag} takes a comma list of {'numbers' if typ is int else 'names'}, "
                              f"not {v!r}") from e


_NOTICED: set[str] = set()


def _renamed(new: str, const=None):
    """An old option name that still works for a release: it sets the new one's value and says so."""
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string not in _NOTICED:
                _NOTICED.add(option_string)
                print(f"quantbench: note: {option_string} is now {new}; the old name will be removed in the "
                      f"next release", file=sys.stderr)
            setattr(namespace, self.dest, const if self.nargs == 0 else values)
    return Renamed


# Runtime options: each runtime's Options fields, as --RUNTIME-FIELD (with the field's alias).
def runtime_option_args(p) -> None:
    from . import runtimes
    for name in runtimes.with_options():
        cls = runtimes.options_class(name)
        fields = [f.name for f in dataclasses.fields(cls)]
        g = p.add_argument_group(f"{name} options (its own; recorded in the sidecar)")
        config_args(g, cls, fields, flags={f: f"--{name}-{f.replace('_', '-')}" for f in fields},
                    dest_prefix=f"rt__{name}__")


def runtime_option_values(args) -> dict:
    """{runtime: {field: value}} for the options set away from their defaults."""
    from . import runtimes
    out: dict = {}
    for name in runtimes.with_options():
        cls = runtimes.options_class(name)
        for f in dataclasses.fields(cls):
            v = getattr(args, f"rt__{name}__{f.name}", _default(f))
            if v != _default(f):
                out.setdefault(name, {})[f.name] = v
    return out


# ------------------------------------------------------------------ shared options
def _data_args(p: argparse.ArgumentParser) -> None:
    from .data import IMAGE_CACHE_GB
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, help="ImageFolder tree with train/ and test/ (or val/)")
    g.add_argument("--data-root", type=Path, default=Path("data"),
                   help="where torchvision's CIFAR-10 is downloaded when --data-dir is not given (default: ./data)")
    g.add_argument("--image-size", type=int,
                   help="resize images to N x N (default: the images' own size when they all agree; for a "
                        "trained model, the size it was trained at)")
    g.add_argument("--image-cache", metavar="DIR|off",
                   help="where images read through a pretrained model's preprocessing (resize + crop) are kept "
                        "decoded, at its input size, for every later row and run: about 147 KiB per image at "
                        "224x224 (7 GiB for ImageNet's 50,000 val images); 'off' decodes every time (default: "
                        "$QUANTBENCH_IMAGE_CACHE, else ~/.cache/quantbench/images). Each file's predictions are "
                        "kept there too, so a file measured before is not evaluated again")
    g.add_argument("--image-cache-gb", type=float, default=IMAGE_CACHE_GB, metavar="GB",
                   help=f"cap on the image cache's size: past it the least recently used shards are deleted "
                        f"(default: {IMAGE_CACHE_GB:g})")


def _common(p: argparse.ArgumentParser, threads: bool = True) -> None:
    if threads:
        p.add_argument("--threads", type=int, help="torch intra-op threads for the work (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the default when not on a terminal)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


# QuantizeConfig fields each command offers (their defaults and help are the dataclass's)
CALIBRATION = ("qconfig", "observer", "percentile", "weight_scheme", "act_scheme", "calib_samples",
               "calib_batch_size", "calib_transform")
MAKING = CALIBRATION + ("qat_schedule", "prune", "equalize", "seed")


def _quantize_args(p: argparse.ArgumentParser, qat_epochs_alias: str | None = None) -> None:
    """How int8 models are made: shared by `quantize`, `replicate` and `tune`, one meaning each."""
    from .quantize import QuantizeConfig
    g = p.add_argument_group("quantization")
    config_args(g, QuantizeConfig, MAKING + ("qat_epochs",),
                aliases={"qat_schedule": "--qat-preset", **({"qat_epochs": qat_epochs_alias} if qat_epochs_alias else {})})
    _fp32_layers_arg(g)
    runtime_option_args(p)


def _timing_args(p: argparse.ArgumentParser) -> None:
    from .bench import BenchConfig
    g = p.add_argument_group("timing")
    config_args(g, BenchConfig, ("threads",), flags={"threads": "--bench-threads"}, types={"threads": str},
                dest_prefix="bench_")
    config_args(g, BenchConfig, ("batch_sizes", "min_runs", "timing_s", "processes", "max_drop"),
                flags={"timing_s": "--timing-seconds"})


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


def parse_thread_settings(s: str | None) -> int | str | tuple[int | str, ...] | None:
    """--bench-threads for bench and replicate: N, 'all' or a comma list of them (1,all); None
    (not given) leaves the choice to the files' input size (bench.timing_defaults)."""
    if s is None:
        return None
    items = [x.strip() for x in str(s).split(",") if x.strip()]
    if not items:
        raise QuantbenchError(f"--bench-threads takes N, 'all' or a comma list of them, not {s!r}")
    out = []
    for x in items:
        if x == "all":
            out.append("all")
            continue
        try:
            n = int(x)
        except ValueError as e:
            raise QuantbenchError(f"--bench-threads takes N, 'all' or a comma list of them (1,all), not {s!r}") from e
        if n < 1:
            raise QuantbenchError(f"--bench-threads must be at least 1, not {n}")
        out.append(n)
    return out[0] if len(out) == 1 else tuple(out)


def parse_batch_sizes(s: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in str(s).split(",") if x.strip())
    except ValueError as e:
        raise QuantbenchError(f"--batch-sizes takes a comma list of numbers, not {s!r}") from e
    if not sizes or min(sizes) < 1:
        raise QuantbenchError("--batch-sizes must list numbers >= 1")
    return sizes


def _model_args(p: argparse.ArgumentParser, arch: bool = True, weights: bool = True) -> None:
    if arch:
        p.add_argument("--arch", help="architecture: any torchvision classifier (resnet18, mobilenet_v2, "
                                      "efficientnet_b0, ...), resnet10, vit_tiny, or timm:NAME (pip install "
                                      "'quantbench[timm]') (default: resnet18)")
    if weights:
        p.add_argument("--weights", metavar="NAME|FILE",
                       help="pretrained weights for --arch (or --model) instead of a checkpoint: torchvision's "
                            "names (IMAGENET1K_V1, DEFAULT, ...), 'pretrained' for timm:NAME, or a file (.pth, "
                            ".safetensors; a bare state dict or one under 'state_dict'/'model'); their own "
                            "preprocessing (resize, crop, mean, std) comes with them")
    p.add_argument("--model", metavar="SPEC",
                   help="your own model instead: FILE.py:FUNCTION or package.module:FUNCTION, a function "
                        "called as FUNCTION(num_classes=N), by keyword, returning an nn.Module; checked before "
                        "any data is read (its code runs only because you name it)")


def _checkpoint(args, dest: str = "checkpoint", required: bool = True) -> Path | None:
    """The fp32 checkpoint a command works on: the one named, or --weights made into one (in the
    cache, see quantbench.weights), before any data is read."""
    ckpt, weights = getattr(args, dest, None), getattr(args, "weights", None)
    if weights is None:
        if ckpt is None and required:
            raise QuantbenchError("give an fp32 checkpoint (.pth), or pretrained weights: --arch NAME --weights "
                                  "NAME|FILE")
        if ckpt is not None and required and getattr(args, "arch", None):
            raise QuantbenchError("--arch goes with --weights: a checkpoint names its own architecture")
        return ckpt
    if ckpt is not None:
        raise QuantbenchError(f"give a checkpoint ({ckpt}) or --weights {weights}, not both")
    from .weights import resolve
    path = resolve(getattr(args, "arch", None), weights, getattr(args, "model", None),
                   progress=not getattr(args, "no_progress", False))
    print(f"[quantbench] weights {weights} -> {path}", file=sys.stderr)
    setattr(args, dest, path)
    return path


def _list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _data_source(args):
    from .data import DataSource
    return DataSource(args.data_dir, args.data_root, getattr(args, "image_size", None),
                      image_cache=args.image_cache if args.image_cache is not None else "auto",
                      image_cache_gb=args.image_cache_gb)


def _bench_config(args):
    from .bench import BenchConfig
    return BenchConfig(threads=parse_thread_settings(args.bench_threads), batch_sizes=value(args, "batch_sizes"), min_runs=args.min_runs,
                       timing_s=args.timing_s, processes=args.processes, max_drop=args.max_drop,
                       accuracy=not getattr(args, "no_accuracy", False), eval_samples=args.eval_samples,
                       progress=not args.no_progress,
                       data=_data_source(args))


def _quantize_config(args, method: str = "static", flow: str = "eager", **extra):
    """A QuantizeConfig from the options _quantize_args added (and the runtimes' options)."""
    from .quantize import QuantizeConfig
    values = config_values(args, QuantizeConfig, MAKING + ("qat_epochs",))
    values.update(_fp32_layers(args))
    return QuantizeConfig(method=method, flow=flow, options=runtime_option_values(args), **{**values, **extra})


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
    model = extra_meta = None
    source = _data_source(args)
    if args.weights is not None:  # fine-tune from pretrained weights, with their preprocessing
        from .models import load_checkpoint, read_checkpoint
        ckpt = _checkpoint(args, "weights_checkpoint")
        _, meta = read_checkpoint(ckpt)
        data = source.load_for({k: v for k, v in meta.items() if k not in ("num_classes", "classes")},
                               f"weights {args.weights}", train=True, progress=not args.no_progress)
        model, meta = load_checkpoint(ckpt, model=args.model)
        if meta["num_classes"] != data.num_classes:
            raise QuantbenchError(f"weights {args.weights} have {meta['num_classes']} output classes but the data has "
                                  f"{data.num_classes}; fine-tuning to other classes is not supported yet")
        extra_meta = {k: meta[k] for k in ("preprocess", "weights", "categories") if k in meta}
    else:
        data = source.load(train=True, progress=not args.no_progress)
    with run_lock(args.output) if main_rank else contextlib.nullcontext():  # before any training
        result = train(data, recipe, args.output, arch=_arch(args), model=model, meta=extra_meta,
                       model_spec=args.model, resume=args.resume,
                       device=args.device, seed=args.seed, progress=not args.no_progress)
    if result.history and main_rank:
        print(f"best test accuracy {result.best_acc:.2f}% -> {args.output / 'best.pth'}")
    return 0


# ------------------------------------------------------------------ eval
def eval_args(p: argparse.ArgumentParser) -> None:
    from .bench import BenchConfig
    p.add_argument("file", type=Path, nargs="?",
                   help="fp32 checkpoint (.pth) or deployment file (.pt, .pt2, .onnx, .xml); or --arch/--weights")
    _data_args(p)
    config_args(p, BenchConfig, ("eval_samples",))
    _model_args(p)
    p.add_argument("--batch-size", type=int, default=500,
                   help="images per batch (default: 500, fewer for large images: at most 2**21 pixels, "
                        "41 images at 224x224)")
    _common(p)


def eval_cmd(args) -> int:
    from .bench import BenchConfig
    from .evaluate import evaluate
    if args.batch_size < 1:
        raise QuantbenchError("--batch-size must be at least 1")
    BenchConfig(eval_samples=args.eval_samples)  # checks it, before any data is read
    shown = args.file if args.file is not None else f"{args.arch or args.model} --weights {args.weights}"
    _checkpoint(args, "file")
    ev = evaluate(args.file, _data_source(args), batch_size=args.batch_size, progress=not args.no_progress,
                  model_spec=args.model, samples=args.eval_samples)
    of = f"all {ev.n}" if ev.n == ev.total else f"{ev.n} of {ev.total} (a seeded subset)"
    print(f"{shown}: top-1 {ev.accuracy:.2f}% on {of} test images")
    return 0


# ------------------------------------------------------------------ quantize
def quantize_args(p: argparse.ArgumentParser) -> None:
    from .flows import FLOWS, METHODS
    p.add_argument("checkpoint", type=Path, nargs="?", help="fp32 checkpoint (.pth); or --arch/--weights")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--flow", default="eager", help=f"one of: {', '.join(FLOWS)} (default: eager)")
    p.add_argument("--output", type=Path, required=True, help="deployment file to write")
    _quantize_args(p, qat_epochs_alias="--epochs")
    from .quantize import QuantizeConfig
    config_args(p, QuantizeConfig, ("work_dir", "resume"))
    _model_args(p)
    _data_args(p)
    _common(p)


def quantize_cmd(args) -> int:
    from .deploy import Source, Target, make
    from .quantize import check_output
    cfg = _quantize_config(args, method=args.method, flow=args.flow, resume=args.resume, work_dir=args.work_dir,
                           model=args.model)
    check_output(args.output, cfg.flow)  # fail on bad options before loading any data
    check_writable(args.output)
    _checkpoint(args)
    source = Source.from_checkpoint(args.checkpoint, model_spec=args.model)  # read once, before any image
    if cfg.method != "dynamic" or args.data_dir is not None:
        source.data = _data_source(args).load_for(source.meta, f"checkpoint {args.checkpoint}",
                                                  train=cfg.method != "dynamic", progress=not args.no_progress)
    (rec,) = make(source, Target(cfg.flow, cfg.method, cfg), args.output, progress=not args.no_progress)
    print(f"{rec.label}: wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB) "
          f"in {rec.quantize_s or 0:.0f} s")
    return 0


# ------------------------------------------------------------------ bench
def bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", type=Path, nargs="*", help="deployment files (.pt TorchScript, .pt2, .onnx, .xml)")
    _data_args(p)
    g = p.add_argument_group("the fp32 row of pretrained weights (made once, then reused)")
    _model_args(g)
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--no-accuracy", action="store_true", help="latency, size and memory only (no test data needed)")
    from .bench import BenchConfig
    config_args(p.add_argument_group("accuracy"), BenchConfig, ("eval_samples",))
    _timing_args(p)
    _common(p)


def bench_cmd(args) -> int:
    from .bench import bench
    from .report import write_report
    for out in (args.json, args.markdown):  # before minutes of measuring, not after
        if out is not None:
            check_writable(out)
    cfg = _bench_config(args)
    if args.weights is None and (args.arch or args.model):
        raise QuantbenchError("in bench, --arch and --model go with --weights (the fp32 row of those weights)")
    models = ([_fp32_row(args)] if args.weights is not None else []) + list(args.models)
    if not models:
        raise QuantbenchError("give the deployment files to measure, and/or --arch NAME --weights NAME|FILE "
                              "for the fp32 model's row")
    results = bench(models, cfg)
    print(write_report(results, json_path=args.json, markdown_path=args.markdown))
    _print_verdict(results)
    return 0


def _fp32_row(args) -> Path:
    """--weights in bench: the fp32 model of those weights as a deployment file (TorchScript,
    pruned like the int8 files made from it), beside the weights' checkpoint in the cache, made
    the first time and reused after; its row is the reference the int8 rows are compared with."""
    from .quantize import export_origin
    from .record import sidecar_path
    ckpt = _checkpoint(args, "fp32_checkpoint")
    path = ckpt.with_name(ckpt.stem + ".fp32.pt")
    if not (path.is_file() and sidecar_path(path).is_file()):
        print(f"[quantbench] exporting the fp32 row of {args.weights} -> {path}", file=sys.stderr)
        export_origin(ckpt, path, model_spec=args.model)
    return path


def _print_verdict(results) -> None:
    """After the table: warnings recorded with the models, then which file to ship."""
    from .report import model_warnings, recommendation_lines
    for w in model_warnings(results):
        print(w.replace("**", ""), file=sys.stderr)
    if any(m.accuracy is not None for m in results.models):
        print(f"\nShip this (fastest int8 or bf16 within {results.config.get('max_drop', 0.3)} point of fp32 accuracy):")
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
    p.add_argument("--output", type=Path, default=Path("runs/replicate"), help="run directory")
    from .bench import BenchConfig
    config_args(p.add_argument_group("accuracy"), BenchConfig, ("eval_samples",))
    _timing_args(p)
    p.add_argument("--resume", action="store_true", help="reuse models already made in OUTPUT")
    _common(p)


def replicate_cmd(args) -> int:
    from .report import markdown_table
    from .replicate import ReplicateConfig, replicate
    runtimes = None if args.runtimes == "auto" else tuple(r for r in _list(args.runtimes) if r != "none")
    ckpt = _checkpoint(args, "checkpoint", required=False)  # --weights: quantize and measure, no training
    source = _data_source(args)
    if ckpt is not None:  # a pretrained model's images go through its own preprocessing
        from .models import read_checkpoint
        pre = read_checkpoint(ckpt)[1].get("preprocess")
        if pre and args.image_size is None:
            source = dataclasses.replace(source, preprocess=pre)
    cfg = ReplicateConfig(output=args.output, data=source, checkpoint=args.checkpoint,
                          preset=args.preset, epochs=args.epochs, flows=_list(args.flows),
                          methods=_list(args.methods), runtimes=runtimes, plain=_list(args.plain), arch=_arch(args),
                          quantize=_quantize_config(args, model=args.model),
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
def _calibration_args(g, defaults: dict | None = None) -> None:
    """Options choosing observers and calibration images (QuantizeConfig's fields)."""
    from .quantize import QuantizeConfig
    config_args(g, QuantizeConfig, CALIBRATION, defaults=defaults)


def _fp32_layers_arg(g) -> None:
    from .quantize import QuantizeConfig
    config_args(g, QuantizeConfig, ("fp32_layers",))
    g.add_argument("--fallback", type=int, metavar="K",
                   help="with --sensitivity: also keep fp32 the K layers that buy the most accuracy back "
                        "(its gain column)")
    g.add_argument("--sensitivity", type=Path, metavar="FILE",
                   help="sensitivity.json written by `quantbench sensitivity` for this checkpoint (for --fallback)")


def _fp32_layers(args) -> dict:
    """fp32_layers (and where they came from) from --fp32-layers, --fallback and --sensitivity."""
    layers = tuple(value(args, "fp32_layers") or ()) if hasattr(args, "fp32_layers") else ()
    if (args.fallback is None) != (args.sensitivity is None):
        raise QuantbenchError("--fallback K and --sensitivity FILE go together")
    out = {"fp32_layers": layers}
    if args.fallback is not None:
        from .sensitivity import most_sensitive
        picked = most_sensitive(args.sensitivity, args.fallback, checkpoint=getattr(args, "checkpoint", None))
        print(f"fp32 fallback from {args.sensitivity}: {', '.join(picked) or 'none'}", file=sys.stderr)
        out["fp32_layers"] = tuple(dict.fromkeys(layers + picked))  # merged, in order, once each
        out["fp32_layers_from"] = f"{args.sensitivity}: the {args.fallback} layer(s) with the largest gain"
    return out


def sensitivity_args(p) -> None:
    from .flows import FLOWS
    p.add_argument("checkpoint", type=Path, nargs="?", help="fp32 checkpoint (.pth); or --arch/--weights")
    _model_args(p)
    p.add_argument("--flow", default="fx", help=f"one of: {', '.join(FLOWS)} (default: fx)")
    p.add_argument("--output", type=Path, default=Path("runs/sensitivity"),
                   help="folder for sensitivity.md, .json and .png (default: runs/sensitivity)")
    p.add_argument("--val-samples", type=int, default=1000,
                   help="validation images, held out of the training split (default: 1000)")
    p.add_argument("--layers", default="", help="comma list: analyse only these layers (default: every conv/linear)")
    p.add_argument("--top", type=int, help="rows to print (default: all; the files hold all)")
    p.add_argument("--seed", type=int, default=0, help="picks the validation and calibration images (default: 0)")
    g = p.add_argument_group("quantization")
    _calibration_args(g, defaults={"calib_samples": 1000})
    _data_args(p)
    _common(p)


def sensitivity_cmd(args) -> int:
    from .models import read_checkpoint
    from .quantize import QuantizeConfig
    from .sensitivity import render_sensitivity, sensitivity, write_sensitivity
    if args.top is not None and args.top < 1:
        raise QuantbenchError("--top must be at least 1")
    # every option checked before any data is read
    q = QuantizeConfig(method="static", flow=args.flow, **config_values(args, QuantizeConfig, CALIBRATION))
    scheme = q.scheme
    check_writable(args.output, is_dir=True)
    _checkpoint(args)
    _, meta = read_checkpoint(args.checkpoint)
    data = _data_source(args).load_for(meta, f"checkpoint {args.checkpoint}", train=True,
                                       progress=not args.no_progress)
    layers = tuple(x.strip() for x in args.layers.split(",") if x.strip()) or None
    with run_lock(args.output):
        result = sensitivity(args.checkpoint, data, args.flow, scheme=scheme, val_samples=args.val_samples,
                             val_seed=args.seed, calib_samples=args.calib_samples,
                             calib_batch_size=args.calib_batch_size, calib_transform=q.calib_transform,
                             layers=layers, progress=not args.no_progress)
        paths = write_sensitivity(result, args.output)
    print(render_sensitivity(result, top=args.top))
    print(f"wrote {', '.join(str(p) for p in paths)} in {result.seconds:.0f} s")
    return 0


# ------------------------------------------------------------------ tune
def tune_args(p) -> None:
    from .flows import FLOWS
    from .tune import TuneConfig
    p.add_argument("checkpoint", type=Path, nargs="?",
                   help="fp32 checkpoint (.pth), or --arch/--weights; not needed by --pick and --status")
    config_args(p, TuneConfig, ("max_drop", "time_limit_s", "objective", "output", "resume"),
                flags={"time_limit_s": "--time-limit"}, aliases={"time_limit_s": "--time-budget"},
                types={"time_limit_s": str})
    g = p.add_argument_group("many processes or machines (Optuna's storage; docs/tune-many-machines.md)")
    config_args(g, TuneConfig, ("storage", "study", "artifacts", "heartbeat_s", "grace_s"),
                flags={"heartbeat_s": "--heartbeat-seconds", "grace_s": "--grace-seconds"})
    g.add_argument("--pick", action="store_true",
                   help="with --storage, on the deployment machine: time the accuracy-qualified files here, write "
                        "best.<suffix> in --output and explain the pick")
    g.add_argument("--status", action="store_true",
                   help="with --storage: trials done, running (on which machine), failed, the best so far, the time")
    p.add_argument("--flows", default=",".join(FLOWS), help=f"comma list of {', '.join(FLOWS)} (default: all)")
    p.add_argument("--runtimes", default="auto",
                   help="other runtimes to search: a comma list of runtimes with an exporter; 'auto' (default): "
                        "those installed; 'none'")
    _model_args(p)
    config_args(p, TuneConfig, ("val_samples", "sensitivity", "max_fallback", "timing_s", "seed"),
                flags={"timing_s": "--timing-seconds"}, aliases={"timing_s": "--timing"})
    from .quantize import QuantizeConfig
    g = p.add_argument_group("quantization (the starting point every trial varies)")
    config_args(g, QuantizeConfig, ("qconfig", "calib_samples", "calib_batch_size", "calib_transform", "prune"),
                defaults={"calib_samples": 1000})
    runtime_option_args(p)
    _data_args(p)
    _common(p)


def tune_cmd(args) -> int:
    from .quantize import QuantizeConfig
    from .tune import TuneConfig, tune
    if args.pick or args.status:
        if args.storage is None:
            raise QuantbenchError(f"--{'pick' if args.pick else 'status'} needs --storage URL (the shared search's)")
        from .tune import shared
        if args.status:
            print(shared.status(args.storage, args.study, text=True))
            return 0
        summary = shared.pick(args.storage, args.study, args.output, args.artifacts, args.timing_s,
                              progress=not args.no_progress)
        print((args.output / "pick.md").read_text())
        print(f"wrote {summary['pick_file']}, best.json, pick.json and pick.md in {args.output}")
        return 0 if summary["within_budget"] else 3
    runtimes = None if args.runtimes == "auto" else tuple(r for r in _list(args.runtimes) if r != "none")
    _checkpoint(args)  # the one named, or --weights made into one; one line if neither
    q = QuantizeConfig(method="static", model=args.model, seed=args.seed, options=runtime_option_values(args),
                       **config_values(args, QuantizeConfig, ("qconfig", "calib_samples", "calib_batch_size",
                                                              "calib_transform", "prune")))
    cfg = TuneConfig(
        checkpoint=args.checkpoint, data=_data_source(args), flows=_list(args.flows), runtimes=runtimes, quantize=q,
        **config_values(args, TuneConfig, ("max_drop", "time_limit_s", "objective", "output", "resume", "val_samples",
                                           "sensitivity", "max_fallback", "timing_s", "seed", "storage", "study",
                                           "artifacts", "heartbeat_s", "grace_s")))
    summary = tune(cfg, progress=not args.no_progress)
    if cfg.storage is not None:  # a worker of a shared search: the pick is --pick's, on the deployment machine
        from .tune.shared import render_status
        print(render_status(summary["status"]))
        print(f"this worker made {len(summary['made'])} trial(s); pick with: quantbench tune --storage URL "
              f"--study {cfg.study} --pick (on the deployment machine)")
        return 0
    print((cfg.output / "tune.md").read_text())
    print(f"wrote {cfg.output / 'tune.md'}, tune.jsonl, tune.json and {summary.get('pick_file', 'no pick')}")
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
    "tune": Command(tune_args, tune_cmd, "the fastest int8 deployment within --max-drop of fp32 accuracy (a search)",
                    "Search flows x runtimes x calibration choices x fp32 fallback for the fastest (or smallest) "
                    "deployment whose accuracy on validation images held out of the training split stays within "
                    "--max-drop of fp32. Every trial goes to tune.jsonl; the best so far is always saved as "
                    "best.<suffix>; --resume continues. Exit status 3 when no trial met --max-drop (best.* is "
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
