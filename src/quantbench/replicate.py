"""The main job, end to end: the original's whole table from one command.

    train fp32 (or take --checkpoint)  ->  origin + ptq-d + ptq-s + qat for each flow
    (+ ONNX Runtime / OpenVINO rows when installed)  ->  bench  ->  report

Everything lands in one run directory: models/ (deployment files + sidecars), train/ and
qat-work/ (resumable checkpoints), results.json, results.csv, results.md, report.md.
With resume=True, deployment files that already exist (with their sidecar) are kept.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import runtimes
from .bench import BenchConfig, bench
from .data import Batches, DataSource, for_model
from .errors import FlowUnsupported, QuantbenchError
from .export import read_sidecar, sidecar_path, write_sidecar
from .fileio import sha256
from .flows import METHODS, check_method, suffix
from .quantize import QuantizeConfig, export_origin, label, quantize_to_file
from .report import write_report
from .results import BenchResults


@dataclass(frozen=True)
class ReplicateConfig:
    """The whole main job. `quantize` is the template every int8 row is made from (its method
    and flow are set per row); `data` is the one data location that training, calibration and
    the benchmark's accuracy runs all read."""
    output: Path = Path("runs/replicate")
    data: DataSource = field(default_factory=DataSource)
    checkpoint: Path | None = None        # skip training, start from this fp32 checkpoint
    preset: str = "fast"                  # fp32 training recipe when there is no checkpoint
    epochs: int | None = None             # override the recipe's epochs
    arch: str | None = "resnet18"         # what to train (or quantize.model, the user's builder)
    flows: tuple[str, ...] = ("eager",)
    methods: tuple[str, ...] = METHODS
    runtimes: tuple[str, ...] | None = None   # comparison rows; None: every installed one
    # runtimes whose int8 row is also made as that runtime alone makes it (no pruning, its own
    # default calibration), labelled NAME-plain: the baseline quantbench's additions are measured against
    plain: tuple[str, ...] = ()
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(method="static"))
    resume: bool = False
    bench: BenchConfig = field(default_factory=BenchConfig)

    def __post_init__(self):
        object.__setattr__(self, "flows", tuple(self.flows))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.flows or not self.methods:
            raise QuantbenchError("replicate needs at least one flow and one method")
        for flow in self.flows:  # fail on bad options before hours of work
            for method in self.methods:
                check_method(flow, method)
                self.quantize.replace(method=method, flow=flow)  # validates the combination
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", runtimes.check_exporters(self.runtimes))
        object.__setattr__(self, "plain", runtimes.check_exporters(self.plain) if self.plain else ())
        if self.checkpoint is None:
            from .train import get_recipe
            get_recipe(self.preset, epochs=self.epochs)  # unknown preset, bad epochs: fail now
        # the benchmark measures accuracy on the very data the models were made from
        object.__setattr__(self, "bench", dataclasses.replace(self.bench, data=self.data))


def _log(msg: str) -> None:
    print(f"[replicate] {msg}", file=sys.stderr, flush=True)


def _reusable(path: Path, resume: bool, expect: dict, defaults: dict | None = None) -> bool:
    """With --resume, a file already made is measured again only if its sidecar says it was made
    the way this run would make it (same checkpoint by content, same configuration). `defaults`:
    what a sidecar written before a key existed was made with (older files stay reusable)."""
    if not (resume and path.is_file() and sidecar_path(path).is_file()):
        return False
    side = read_sidecar(path)
    defaults = defaults or {}
    differ = [k for k, v in expect.items()
              if side.get(k, defaults.get(k)) != json.loads(json.dumps(v, default=str))]
    if differ:
        _log(f"remaking {path.name}: it was made with another {' and '.join(differ)}")
    return not differ


def replicate(cfg: ReplicateConfig, progress: bool = True) -> BenchResults:
    out = Path(cfg.output)
    models = out / "models"
    data = cfg.data.load(train=True, progress=progress)

    # 1. fp32 model
    ckpt = cfg.checkpoint
    if ckpt is None:
        from .train import get_recipe, train
        _log(f"training fp32 ({cfg.preset} preset) in {out / 'train'}")
        train(data, get_recipe(cfg.preset, epochs=cfg.epochs), out / "train", arch=cfg.arch,
              model_spec=cfg.quantize.model, resume=cfg.resume, progress=progress)
        ckpt = out / "train" / "best.pth"

    # 2. deployment files: one fp32 "origin" per runtime, then each flow x method
    source = {"source_sha256": sha256(ckpt)}
    files: list[Path] = []
    skipped: list[dict] = []
    for suf in dict.fromkeys(suffix(f) for f in cfg.flows):
        flow = next(f for f in cfg.flows if suffix(f) == suf)
        path = models / (label("origin", flow) + suf)
        if not _reusable(path, cfg.resume, {**source, "pruned": cfg.quantize.prune}):
            _log(f"exporting fp32 -> {path.name}")
            export_origin(ckpt, path, flow, data, model_spec=cfg.quantize.model, prune=cfg.quantize.prune)
        files.append(path)
    for flow in cfg.flows:
        for method in cfg.methods:
            path = models / (label(method, flow) + suffix(flow))
            qcfg = cfg.quantize.replace(method=method, flow=flow, work_dir=out / "qat-work" / flow,
                                        resume=cfg.resume)
            if not _reusable(path, cfg.resume, {**source, "config": qcfg.shaping()}):
                _log(f"{method} ({flow}) -> {path.name}")
                try:
                    quantize_to_file(ckpt, path, qcfg, data, progress=progress)
                except FlowUnsupported as e:  # this model, not this run: the other rows still mean something
                    _log(f"skipping {path.name}: {e}")
                    skipped.append({"row": label(method, flow), "flow": flow, "method": method, "why": str(e)})
                    continue
            files.append(path)

    # 3. other runtimes as comparison rows
    files += _runtime_rows(cfg, ckpt, data, models, source)

    # 4. measure and report
    _log(f"benchmarking {len(files)} models")
    results = bench(files, cfg.bench)
    q = cfg.quantize
    results.replicate = {"checkpoint": str(ckpt), "flows": list(cfg.flows), "methods": list(cfg.methods),
                         "qconfig": q.qconfig, "calib_samples": q.calib_samples, "qat_schedule": q.qat_schedule,
                         "data": str(cfg.data.dir or cfg.data.root), "skipped": skipped}
    write_report(results, run_dir=out)
    return results


# what runtime rows made before these keys existed were made with
_RUNTIME_DEFAULTS = {"calib_scheme": {}, "bias_correction": "fast"}


def _runtime_rows(cfg: ReplicateConfig, ckpt, data, models: Path, source: dict | None = None) -> list[Path]:
    wanted = cfg.runtimes if cfg.runtimes is not None else tuple(runtimes.exporters())
    source = source if source is not None else {"source_sha256": sha256(ckpt)}
    q = cfg.quantize
    files: list[Path] = []
    for name in wanted:
        try:
            files += _export_runtime(name, cfg, ckpt, data, models, source, q.prune, q.scheme, q.bias_correction)
        except (QuantbenchError, ImportError) as e:
            if cfg.runtimes is not None:
                raise QuantbenchError(f"runtime {name}: {e}") from e
            _log(f"skipping {name} rows: {e}")
    for name in cfg.plain:
        # the runtime's own int8 as a user without quantbench would make it: the unpruned fp32
        # graph and the runtime's default calibration
        try:
            made = _export_runtime(name, cfg, ckpt, data, models / "plain", source, False, None, "fast")
        except (QuantbenchError, ImportError) as e:
            raise QuantbenchError(f"runtime {name} (--plain): {e}") from e
        for path in made:
            side = read_sidecar(path)
            if side.get("dtype") == "int8":
                if not side.get("plain"):
                    write_sidecar(path, **{**side, "label": side.get("label", path.stem) + "-plain", "plain": True,
                                           "pruning": {"applied": False, "why": "plain row: the runtime alone"},
                                           "why": "the runtime alone: no pruning, its default calibration "
                                                  "algorithm, on the same calibration images as the other rows"})
                files.append(path)
    return files


def _export_runtime(name: str, cfg: ReplicateConfig, ckpt, data, out_dir: Path, source: dict,
                    prune: bool, scheme, bias_correction: str) -> list[Path]:
    """One runtime's fp32 and int8 files in `out_dir`, from the same fp32 graph as the torch
    rows (pruned or not) and the torch rows' calibration choices by the same names (recorded in
    the sidecars); files already made the same way are reused with --resume."""
    from .export import prune_for_export
    from .models import load_checkpoint
    mod = runtimes.get(name)
    made = [out_dir / f for f in getattr(mod, "FILES", ())]  # what the exporter writes
    calib_samples = min(cfg.quantize.calib_samples, 2000)
    expect = {**source, "calib_limit": calib_samples, "pruned": prune,
              "calib_scheme": scheme.overrides() if scheme is not None else {}, "bias_correction": bias_correction}
    if made and all(_reusable(p, cfg.resume, expect, _RUNTIME_DEFAULTS) for p in made):
        return made  # resumed: the very same files are measured again
    model, meta = load_checkpoint(ckpt, num_classes=data.num_classes, model=cfg.quantize.model)
    d = for_model(data, meta, f"checkpoint {ckpt}")
    pruning = prune_for_export(model, d.input_shape, prune, d, cfg.quantize.seed)
    calib = (x for x, _ in Batches(d.train, 100, d.mean, d.std, shuffle=True, limit=calib_samples))
    _log(f"{name}: exporting fp32 and int8" + ("" if prune else " (unpruned)") + f" to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return mod.export(model, out_dir, calib, {"source_checkpoint": str(ckpt), **expect, "classes": d.classes,
                                              "normalize_mean": list(d.mean), "normalize_std": list(d.std),
                                              "image_size": meta.get("image_size"), "pruning": pruning,
                                              "warnings": list(meta.get("warnings") or [])},
                      scheme=scheme, bias_correction=bias_correction)
