"""One path from an fp32 model to a deployment file.

    source = Source.from_checkpoint(ckpt, data)     read the checkpoint once: the float model,
                                                    its meta, the images as it expects them
    make(source, Target("fx", "static", q), path)   -> [FileRecord]: the file(s), each with its sidecar

A Target is what to make: a flow's file (origin = the fp32 model in the flow's format, dynamic,
static, qat) or a runtime's own export (its fp32 and int8 files). `quantize`, `replicate` and
`tune` only choose targets and call make(), so a file made by any of them is the same file,
byte for byte, with the same record. Every step that shapes the file happens here, in order:

    copy of the float model -> the flow's form of it (eager: its quantizable twin)
    -> dead-tap pruning (quantbench.prune; verified once per source and kept)
    -> cross-layer equalization (quantbench.equalize)
    -> quantize: dynamic / calibrate / fine-tune (quantbench.quantize), under the runtime's options
    -> export -> FileRecord (quantbench.record) written beside the file
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import runtimes
from .data import Dataset, for_model
from .equalize import equalize_for_quantize
from .errors import QuantbenchError
from .export import example_input, input_shape, prune_for_export, weight_bytes
from .fileio import sha256
from .flows import FLOWS, LABELS, check_method, get_flow
from .quantize import QuantizeConfig, calibration_batches, quantize_model
from .record import FileRecord, write_record

ORIGIN = "origin"


def log(msg: str) -> None:
    print(f"[quantbench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the fp32 model, read once
@dataclass
class Source:
    """An fp32 model in hand: read once, never changed (every target works on a copy)."""
    model: nn.Module                  # eval mode
    meta: dict                        # the checkpoint's meta (arch or model spec, classes, shape...)
    name: str                         # the checkpoint's path, or "<Foo object>"
    sha256: str | None = None
    data: Dataset | None = None       # the images as this model expects them
    _pruned: dict = field(default_factory=dict, repr=False)   # (model type, prune, seed) -> (model, record)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, data: Dataset | None = None,
                        model_spec: str | None = None, quiet: bool = True) -> "Source":
        from .models import load_checkpoint
        model, meta = load_checkpoint(checkpoint, num_classes=data.num_classes if data else None, model=model_spec)
        if data is not None:  # calibrate and fine-tune on images normalized as in training
            data = for_model(data, meta, f"checkpoint {checkpoint}")
        if not quiet:
            log(f"loaded {checkpoint} ({meta.get('arch') or meta.get('model')}, {meta.get('num_classes')} classes)")
        return cls(model.eval(), meta, str(checkpoint), sha256(checkpoint), data)

    @classmethod
    def from_weights(cls, arch: str | None, weights: str, data: Dataset | None = None,
                     model_spec: str | None = None, quiet: bool = True) -> "Source":
        """Pretrained weights (torchvision's name, timm's, or a .pth/.safetensors file; see
        quantbench.weights) as a source: made into a cached checkpoint once, then read like one."""
        from .weights import resolve
        return cls.from_checkpoint(resolve(arch, weights, model_spec, progress=not quiet), data, model_spec, quiet)

    @classmethod
    def from_module(cls, module: nn.Module, data: Dataset | None = None) -> "Source":
        """A user's nn.Module (a notebook's model), with the meta a checkpoint would carry, from
        the data it will be calibrated on."""
        meta = {"model": f"{type(module).__module__}.{type(module).__name__} (an nn.Module passed to quantize)"}
        if data is not None:
            meta.update(num_classes=data.num_classes, classes=data.classes, input_shape=list(data.input_shape),
                        normalize_mean=list(data.mean), normalize_std=list(data.std))
        return cls(copy.deepcopy(module).eval(), meta, f"<{type(module).__name__} object>", None, data)

    @property
    def shape(self) -> tuple[int, ...]:
        """The images' shape where there are images (for_model checked it against the meta's)."""
        return tuple(self.data.input_shape) if self.data is not None else input_shape(self.meta)

    def float_for(self, flow, method: str, prune: bool, seed: int) -> tuple[nn.Module, dict]:
        """A fresh copy of the float model as `flow` takes it, dead-tap pruned (pruning and its
        check on real images run once per kind of model; later targets copy the result)."""
        model = copy.deepcopy(self.model) if flow is None else flow.from_float(copy.deepcopy(self.model),
                                                                                self.meta, method)
        key = (type(model).__qualname__, prune, seed)
        if key not in self._pruned:
            rec = prune_for_export(model, self.shape, prune, self.data, seed)
            self._pruned[key] = (model, rec)
        model, rec = self._pruned[key]
        return copy.deepcopy(model), copy.deepcopy(rec)

    def base_record(self) -> FileRecord:
        """What every file made from this model says about where it came from and what it takes."""
        m, d = self.meta, self.data
        return FileRecord(
            source_checkpoint=self.name, source_sha256=self.sha256, arch=m.get("arch"), model=m.get("model"),
            input_shape=list(self.shape), classes=m.get("classes") or (list(d.classes) if d else None),
            normalize_mean=m.get("normalize_mean") or (list(d.mean) if d else None),
            normalize_std=m.get("normalize_std") or (list(d.std) if d else None),
            image_size=m.get("image_size"), preprocess=m.get("preprocess") if not m.get("image_size") else None,
            warnings=list(m.get("warnings") or []))


# ---------------------------------------------------------------- what to make
def is_flow(maker: str) -> bool:
    return maker in FLOWS


def suffix(maker: str) -> str:
    """The deployment file suffix of a flow (its runtime's first) or of a runtime."""
    rt = get_flow(maker).RUNTIME if is_flow(maker) else maker
    return runtimes.get(rt).SUFFIXES[0]


def label(method: str, flow: str) -> str:
    """Row name: the original's names for eager mode, suffixed with the flow otherwise."""
    return LABELS[method] if flow == "eager" else f"{LABELS[method]}-{flow}"


@dataclass(frozen=True)
class Target:
    """One thing to make. `maker` is a flow (eager, fx, pt2e: one file, `method` origin, dynamic,
    static or qat) or a runtime with an exporter (its fp32 and int8 files; method static).
    `quantize` holds every other choice (observers, calibration images, pruning, equalization,
    fp32 layers, runtime options); its method and flow fields are ignored."""
    maker: str
    method: str = "static"
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(method="static"))
    plain: bool = False               # a runtime's int8 as it alone makes it: no pruning, its defaults

    def __post_init__(self):
        if is_flow(self.maker):
            if self.method != ORIGIN:
                check_method(self.maker, self.method)
        else:
            mod = runtimes.get(self.maker)
            if not hasattr(mod, "export"):
                raise QuantbenchError(f"runtime {self.maker!r} makes no files from an fp32 model; "
                                      f"choose from {', '.join(runtimes.exporters())}")

    @property
    def runtime(self) -> str:
        return get_flow(self.maker).RUNTIME if is_flow(self.maker) else self.maker

    @property
    def config(self) -> QuantizeConfig:
        """The QuantizeConfig this target is made with."""
        q = self.quantize
        if self.plain:
            q = q.replace(prune=False, observer=None, weight_scheme=None, act_scheme=None, equalize=False,
                          options={k: v for k, v in q.options.items() if k != self.runtime})
        if is_flow(self.maker) and self.method != ORIGIN:
            q = q.replace(method=self.method, flow=self.maker)
        return q

    @property
    def label(self) -> str:
        return label(self.method, self.maker) if is_flow(self.maker) else self.maker

    def identity(self) -> dict:
        """What decides the file(s), as recorded in every sidecar (`--resume` compares it)."""
        q = self.config
        opts = None if self.method == ORIGIN else q.runtime_options(self.runtime)
        d = {"maker": self.maker, "method": self.method, "prune": q.prune, "seed": q.seed,
             "options": dataclasses.asdict(opts) if opts is not None else {}}
        if self.method not in (ORIGIN, "dynamic"):
            d.update(scheme=q.scheme.overrides(), qconfig=q.qconfig, equalize=q.equalize,
                     calibration=calibration_identity(q, self.runtime))
        if is_flow(self.maker) and self.method != ORIGIN:
            d["fp32_layers"] = list(q.fp32_layers)
            if self.method == "qat":
                d["qat"] = {"schedule": q.qat_schedule, "epochs": q.qat_epochs}
        if self.plain:
            d["plain"] = True
        return d


def calibration_identity(q: QuantizeConfig, runtime: str) -> dict:
    return {"samples": calib_limit(q, runtime), "batch_size": q.calib_batch_size, "transform": q.calib_transform}


def calib_limit(q: QuantizeConfig, runtime: str) -> int:
    """Calibration images for a target: the config's, capped where a runtime's calibrators keep
    every batch in memory (its MAX_CALIB_SAMPLES)."""
    cap = getattr(runtimes.get(runtime), "MAX_CALIB_SAMPLES", None)
    return min(q.calib_samples, cap) if cap else q.calib_samples


# ---------------------------------------------------------------- making it
def make(source: Source, target: Target, dest: str | os.PathLike, progress: bool = True) -> list[FileRecord]:
    """Make `target` from `source`: a flow's file at `dest` (a file path with the flow's
    suffix), or a runtime's FILES in the folder `dest`. Returns the records written beside them."""
    dest = Path(dest)
    if is_flow(target.maker):
        return [_make_flow_file(source, target, dest, progress)]
    return _make_runtime_files(source, target, dest)


def build(source: Source, target: Target, progress: bool = True,
          work_dir: Path | None = None) -> tuple[nn.Module, FileRecord]:
    """A flow target's model in memory (int8, or fp32 for origin) and its record; make() exports it."""
    flow = get_flow(target.maker)
    q = target.config
    if target.method in ("static", "qat") and (source.data is None or source.data.train is None):
        raise QuantbenchError(f"{target.method} quantization needs training data (--data-dir)")
    rt = runtimes.get(flow.RUNTIME)
    t0 = time.perf_counter()
    # the fp32 "origin" file is the plain float model, in this flow's format
    model, pruning = source.float_for(None if target.method == ORIGIN else flow, target.method, q.prune, q.seed)
    # the runtime's options shape int8 files (an fp32 file has no int8 kernels to choose)
    opts = None if target.method == ORIGIN else _resolve_options(rt, q.runtime_options(flow.RUNTIME), pruning)
    rec = source.base_record().replace(
        label=target.label, method=target.method, flow=target.maker, runtime=flow.RUNTIME,
        dtype="fp32" if target.method == ORIGIN else "int8", target=target.identity(), pruning=pruning,
        options=dataclasses.asdict(opts) if opts is not None else {},
        **(rt.record_fields(opts) if opts is not None and hasattr(rt, "record_fields") else {}))
    if target.method == ORIGIN:
        return model, rec
    with _building(rt, opts):
        # on the float weights, before any observer sees them (quantbench.equalize)
        equalization = equalize_for_quantize(model, source.shape, q.equalize, source.data, q.seed)
        model, made = quantize_model(flow, model, q, source, example_input(source.shape), progress, work_dir)
    warnings = made.pop("warnings", [])
    where = source.data.info.get("calibration_images") if source.data is not None else None
    if where and isinstance(made.get("calibration"), dict):  # e.g. a held-out part of val/
        made["calibration"] = {**made["calibration"], "images_from": where}
    return model, rec.replace(config=q.shaping(), fp32_layers=list(q.fp32_layers), equalization=equalization,
                              warnings=rec.warnings + warnings, quantize_s=round(time.perf_counter() - t0, 2),
                              **made)


def export(model: nn.Module, rec: FileRecord, path: Path) -> FileRecord:
    """Write a flow's model (from build) as its deployment file, then the sidecar beside it."""
    flow = get_flow(rec.flow)
    rt = runtimes.get(flow.RUNTIME)
    t0 = time.perf_counter()
    wb = weight_bytes(model)
    with _building(rt, runtimes.make_options(flow.RUNTIME, rec.options or None)):  # e.g. trace under its engine
        flow.export(model, path, example_input(rec.shape))
    return write_record(path, rec.replace(weight_bytes=wb, export_s=round(time.perf_counter() - t0, 2)))


def check_output(path: str | os.PathLike, flow: str) -> Path:
    """The output file name must have the flow's suffix."""
    path, want = Path(path), suffix(flow)
    if path.suffix != want:
        raise QuantbenchError(f"the {flow} flow writes {want} files; name the output *{want}")
    return path


def _make_flow_file(source: Source, target: Target, path: Path, progress: bool) -> FileRecord:
    check_output(path, target.maker)
    # QAT's resumable checkpoints: beside the file, never a folder other runs share
    model, rec = build(source, target, progress, work_dir=path.with_name(path.name + ".qat-work"))
    return export(model, rec, path)


def _building(rt, opts):
    """The runtime's context for making its files (TorchScript: the quantized engine)."""
    return rt.building(opts) if opts is not None and hasattr(rt, "building") else contextlib.nullcontext()


def _resolve_options(rt, opts, pruning: dict):
    if opts is not None and hasattr(rt, "resolve_options"):
        return rt.resolve_options(opts, pruned=bool(pruning and pruning.get("applied")))
    return opts


def _make_runtime_files(source: Source, target: Target, out_dir: Path) -> list[FileRecord]:
    """A runtime's fp32 and int8 files from the same fp32 graph as the torch rows (pruned or
    not), calibrated on the same images, chosen the same seeded way."""
    rt = runtimes.get(target.maker)
    q = target.config
    if source.data is None or source.data.train is None:
        raise QuantbenchError(f"the {target.maker} rows need training images to calibrate on (--data-dir)")
    model, pruning = source.float_for(None, "static", q.prune, q.seed)
    opts = _resolve_options(rt, q.runtime_options(target.maker), pruning)
    if target.plain:
        pruning = {"applied": False, "why": "plain row: the runtime alone"}
    base = source.base_record().replace(target=target.identity(), pruning=pruning, flow=target.maker,
                                        runtime=target.maker,
                                        options=dataclasses.asdict(opts) if opts is not None else {})
    calib = (x for x, _ in calibration_batches(source.data, q, limit=calib_limit(q, target.maker)))
    scheme = None if target.plain else q.scheme
    return write_runtime_files(rt, model.eval(), out_dir, calib, base, scheme, opts, plain=target.plain,
                               images_from=source.data.info.get("calibration_images"))


def write_runtime_files(rt, model: nn.Module, out_dir: Path, calib, base: FileRecord | dict | None = None,
                        scheme=None, options=None, plain: bool = False,
                        images_from: str | None = None) -> list[FileRecord]:
    """A runtime's exporter, then the sidecars of what it wrote (records come back from the
    exporter; they are written here, after the files they describe). `images_from`: where the
    calibration images came from when that is worth saying (a held-out part of val/)."""
    from .record import as_record
    out_dir = Path(out_dir)  # the exporter makes it, once it knows it can export
    made = rt.export(model, out_dir, calib, as_record(base), scheme=scheme, options=options)
    out = []
    for rec in made:
        if images_from and isinstance(rec.calibration, dict) and rec.calibration:
            rec = rec.replace(calibration={**rec.calibration, "images_from": images_from})
        if plain and rec.dtype == "int8":
            rec = rec.replace(label=rec.label + "-plain", plain=True,
                              why="the runtime alone: no pruning, its default calibration algorithm, on the "
                                  "same calibration images as the other rows")
        out.append(write_record(out_dir / rec.file, rec))
    return out


def files_of(target: Target, dest: Path) -> list[Path]:
    """The paths make(target, dest) writes (a runtime's FILES, less those it skips on this machine)."""
    if is_flow(target.maker):
        return [dest]
    return [dest / f for f in runtimes.made_files(target.maker)]
