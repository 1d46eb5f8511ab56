"""The main job, end to end: the original's whole table from one command.

    train fp32 (or take --checkpoint)  ->  origin + ptq-d + ptq-s + qat for each flow
    (+ ONNX Runtime / OpenVINO rows when installed)  ->  bench  ->  report

Everything lands in one run directory: models/ (deployment files + sidecars), train/ and
qat-work/ (resumable checkpoints), results.json, results.csv, results.md, report.md.
With resume=True, deployment files that already exist (with their sidecar) are kept.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .bench import BenchConfig, bench, config_from_args
from .data import Batches, load_dataset
from .errors import QuantbenchError
from .export import sidecar_path
from .flows import METHODS, check_method, get_flow
from .quantize import QuantizeConfig, export_origin, label, quantize_to_file
from .report import write_report
from .runtimes import EXPORTERS


@dataclass
class ReplicateConfig:
    output: Path = Path("runs/replicate")
    checkpoint: Path | None = None        # skip training, start from this fp32 checkpoint
    preset: str = "fast"                  # fp32 training preset when no checkpoint
    qat_preset: str = "fast"
    flows: tuple[str, ...] = ("eager",)
    methods: tuple[str, ...] = METHODS
    runtimes: tuple[str, ...] | None = None   # None: every optional runtime that is installed
    qconfig: str = "default"
    calib_samples: int = 10_000
    resume: bool = False
    bench: BenchConfig = field(default_factory=BenchConfig)


def _log(msg: str) -> None:
    print(f"[replicate] {msg}", file=sys.stderr, flush=True)


def _done(path: Path, resume: bool) -> bool:
    return resume and path.is_file() and sidecar_path(path).is_file()


def replicate(cfg: ReplicateConfig, data_dir=None, data_root="data", progress: bool = True) -> dict:
    for flow in cfg.flows:
        for method in cfg.methods:
            check_method(flow, method)  # fail on bad options before hours of work
    out = Path(cfg.output)
    models = out / "models"
    data = load_dataset(data_dir, data_root, train=True, progress=progress)

    # 1. fp32 model
    ckpt = cfg.checkpoint
    if ckpt is None:
        from .train import get_recipe, train
        _log(f"training fp32 ({cfg.preset} preset) in {out / 'train'}")
        train(data, get_recipe(cfg.preset), out / "train", resume=cfg.resume, progress=progress)
        ckpt = out / "train" / "best.pth"

    # 2. deployment files: one fp32 "origin" per kind of file, then each flow x method
    files: list[Path] = []
    for suffix in dict.fromkeys(get_flow(f).SUFFIX for f in cfg.flows):
        flow = next(f for f in cfg.flows if get_flow(f).SUFFIX == suffix)
        path = models / (("origin" if flow == "eager" else f"origin-{flow}") + suffix)
        if not _done(path, cfg.resume):
            _log(f"exporting fp32 -> {path.name}")
            export_origin(ckpt, path, flow, data)
        files.append(path)
    for flow in cfg.flows:
        for method in cfg.methods:
            path = models / (label(method, flow) + get_flow(flow).SUFFIX)
            if not _done(path, cfg.resume):
                _log(f"{method} ({flow}) -> {path.name}")
                qcfg = QuantizeConfig(method=method, flow=flow, qconfig=cfg.qconfig, calib_samples=cfg.calib_samples,
                                      qat_preset=cfg.qat_preset, work_dir=out / "qat-work" / flow, resume=cfg.resume)
                quantize_to_file(ckpt, path, qcfg, data, progress=progress)
            files.append(path)

    # 3. other runtimes as comparison rows
    files += _runtime_rows(cfg, ckpt, data, models)

    # 4. measure and report
    _log(f"benchmarking {len(files)} models")
    results = bench(files, cfg.bench)
    results["replicate"] = {"checkpoint": str(ckpt), "flows": list(cfg.flows), "methods": list(cfg.methods),
                            "qconfig": cfg.qconfig, "calib_samples": cfg.calib_samples, "qat_preset": cfg.qat_preset}
    write_report(results, run_dir=out, markdown_path=out / "results.md")
    return results


def _runtime_rows(cfg: ReplicateConfig, ckpt, data, models: Path) -> list[Path]:
    from .models import load_checkpoint
    wanted = cfg.runtimes if cfg.runtimes is not None else tuple(EXPORTERS)
    files: list[Path] = []
    for name in wanted:
        if name not in EXPORTERS:
            raise QuantbenchError(f"unknown runtime {name!r}; choose from {', '.join(EXPORTERS) or 'none'}")
        module, fn = EXPORTERS[name].split(":")
        try:
            mod = importlib.import_module(module)
            made = [models / f for f in getattr(mod, "FILES", ())]  # what the exporter writes
            if made and all(_done(p, cfg.resume) for p in made):
                files += made  # resumed: the very same files are measured again
                continue
            exporter = getattr(mod, fn)
            model, meta = load_checkpoint(ckpt, num_classes=data.num_classes)
            calib = (x for x, _ in Batches(data.train, 100, data.mean, data.std, shuffle=True,
                                           limit=min(cfg.calib_samples, 2000)))
            _log(f"{name}: exporting fp32 and int8")
            files += exporter(model, models, calib, {"source_checkpoint": str(ckpt), "classes": data.classes,
                                                     "normalize_mean": list(data.mean), "normalize_std": list(data.std)})
        except (QuantbenchError, ImportError) as e:
            if cfg.runtimes is not None:
                raise QuantbenchError(f"runtime {name}: {e}") from None
            _log(f"skipping {name} rows: {e}")
    return files


def replicate_cli(args) -> int:
    flows = tuple(f.strip() for f in args.flows.split(",") if f.strip())
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    runtimes = None if args.runtimes == "auto" else tuple(r for r in args.runtimes.split(",") if r.strip() and r != "none")
    cfg = ReplicateConfig(
        output=args.output, checkpoint=args.checkpoint, preset=args.preset, qat_preset=args.qat_preset,
        flows=flows, methods=methods, runtimes=runtimes, qconfig=args.qconfig, calib_samples=args.calib_samples,
        resume=args.resume,
        bench=config_from_args(args))
    if args.checkpoint is None:
        from .train import get_recipe
        get_recipe(args.preset)  # unknown preset: fail now, not after loading data
    results = replicate(cfg, args.data_dir, args.data_root, progress=not args.no_progress)
    from .report import markdown_table
    print(markdown_table(results))
    print(f"\nwrote {args.output / 'report.md'}, results.json, results.csv and models/ in {args.output}")
    return 0
