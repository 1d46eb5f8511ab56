"""Stage 4: quantization, the same three steps for every flow (see quantbench.flows):

    dynamic:  load -> flow.quantize_dynamic                      (no data needed)
    static:   load -> flow.prepare -> calibrate on training images -> flow.convert
    qat:      load -> flow.prepare(qat) -> fine-tune with the trainer -> flow.convert

then flow.export writes the deployment file and a FILE.json sidecar records how it was made.
QuantizeConfig holds every choice: the flow, the observers (a qconfig name plus overrides, see
quantbench.flows.qconfigs.Scheme), the calibration images, and the layers kept fp32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from tqdm import tqdm

from .data import Batches, Dataset, for_model
from .equalize import equalize_for_quantize
from .errors import FlowUnsupported, QuantbenchError, cause
from .export import example_input, input_shape, prune_for_export, weight_bytes, write_sidecar
from .fileio import sha256
from .flows import LABELS, check_method, get_flow, suffix
from .flows.qconfigs import QCONFIGS, ActScheme, Observer, Scheme, WeightScheme, why
from .train import Recipe, train

Method = Literal["dynamic", "static", "qat"]
CalibTransform = Literal["test", "train"]


@dataclass(frozen=True)
class QATSchedule:
    """A QAT fine-tune: a trainer Recipe, and the (1-based) epochs from which batch-norm
    statistics and then the observers are frozen."""
    recipe: Recipe
    freeze_bn_epoch: int
    freeze_observer_epoch: int

    def __post_init__(self):
        if not 1 <= self.freeze_bn_epoch or not 1 <= self.freeze_observer_epoch:
            raise QuantbenchError("QAT freeze epochs are 1-based")


QAT_SCHEDULES: dict[str, QATSchedule] = {
    # The original: Adam 1e-4, StepLR 8/0.1, 16 epochs, batch 100; BN frozen after epoch 6,
    # observers after epoch 10.
    "seed": QATSchedule(Recipe("qat-seed", epochs=16, batch_size=100, optimizer="adam", lr=1e-4, betas=(0.9, 0.95),
                               schedule="step", step_size=8, gamma=0.1, augment="seed"), 7, 11),
    # Ours for 2 CPU cores: start from converged fp32 weights, so a small learning rate and a few
    # thousand steps suffice. BN statistics are frozen from the start (the fp32 ones are good and
    # the converted model folds them), observers for the last epoch.
    "fast": QATSchedule(Recipe("qat-fast", epochs=2, batch_size=128, optimizer="sgd", lr=2e-3, momentum=0.9,
                               weight_decay=5e-5, schedule="cosine", label_smoothing=0.1, augment="crop-flip",
                               train_limit=25_000, min_steps=200), 1, 2),
    "smoke": QATSchedule(Recipe("qat-smoke", epochs=1, batch_size=32, optimizer="sgd", lr=1e-3, momentum=0.9,
                                schedule="constant", augment="none", channels_last=False, train_limit=128), 1, 2),
}


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize; checked when made, so a bad option fails before any work."""
    method: Method
    flow: str = "eager"               # see quantbench.flows.FLOWS
    qconfig: str = "default"          # see quantbench.flows.qconfigs.QCONFIGS
    # Overrides of the qconfig's choices (None: the qconfig's own; see qconfigs.Scheme):
    observer: Observer | None = None              # activations: "histogram" for "default"
    weight_scheme: WeightScheme | None = None     # "per-channel" for both qconfigs
    act_scheme: ActScheme | None = None           # "affine" for both qconfigs
    percentile: float = 99.99                     # of |x|, for observer="percentile"
    calib_samples: int = 10_000       # training images used to calibrate static quantization
    calib_batch_size: int = 100
    # "test": calibrate on clean images, as the deployed model sees them; "train": with the
    # original's training augmentation (data.Batches(augment="seed")), as the original did
    calib_transform: CalibTransform = "test"
    fp32_layers: tuple[str, ...] = ()  # conv/linear module names kept fp32 (quantbench.flows.quantizable_layers)
    qat_schedule: str = "fast"        # see QAT_SCHEDULES
    qat_epochs: int | None = None     # override the schedule's epochs
    work_dir: Path | None = None      # QAT checkpoints (resumable)
    resume: bool = False
    seed: int = 0
    model: str | None = None          # the user's builder (FILE.py:FUNCTION) a checkpoint was made with
    prune: bool = True                # dead-tap pruning before quantizing (quantbench.prune)
    # quantized engine of the TorchScript flows (eager, fx); None: runtimes.torchscript.best_engine()
    # pt2e ignores it: inductor picks its own kernels (so one template serves every flow).
    engine: str | None = None
    # cross-layer equalization of the fp32 weights before prepare (quantbench.equalize)
    equalize: bool = False
    # NNCF's bias correction in the OpenVINO comparison row: "fast", "full" or "none"
    # (runtimes.openvino.BiasCorrection); the torch flows have none
    bias_correction: str = "fast"

    def __post_init__(self):
        if self.method not in get_args(Method):
            raise QuantbenchError(f"unknown method {self.method!r}; choose from {', '.join(get_args(Method))}")
        check_method(self.flow, self.method)
        if self.qconfig not in QCONFIGS:
            raise QuantbenchError(f"unknown qconfig {self.qconfig!r}; choose from {', '.join(QCONFIGS)}")
        _ = self.scheme  # making it checks observer, weight_scheme, act_scheme and percentile
        if self.calib_transform not in get_args(CalibTransform):
            raise QuantbenchError(f"unknown calibration transform {self.calib_transform!r}; "
                                  f"choose from {', '.join(get_args(CalibTransform))}")
        names = self.fp32_layers
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise QuantbenchError(f"fp32_layers must be a sequence of layer names, not {self.fp32_layers!r}")
        object.__setattr__(self, "fp32_layers", tuple(self.fp32_layers))  # hashable, whatever was given
        if self.method == "static" and self.calib_samples < 1:
            raise QuantbenchError("static quantization needs calibration images: --calib-samples must be > 0")
        if self.calib_batch_size < 1:
            raise QuantbenchError("--calib-batch-size must be at least 1")
        if self.qat_schedule not in QAT_SCHEDULES:
            raise QuantbenchError(f"unknown QAT schedule {self.qat_schedule!r}; "
                                  f"choose from {', '.join(QAT_SCHEDULES)}")
        if self.qat_epochs is not None and self.qat_epochs < 1:
            raise QuantbenchError("QAT --epochs must be at least 1")
        if self.engine is not None:
            from .runtimes import torchscript
            torchscript.check_engine(self.engine)
        if not isinstance(self.equalize, bool):
            raise QuantbenchError(f"equalize must be True or False, not {self.equalize!r}")
        from .runtimes.openvino import check_bias_correction
        check_bias_correction(self.bias_correction)

    def replace(self, **changes) -> "QuantizeConfig":
        return dataclasses.replace(self, **changes)

    def shaping(self) -> dict:
        """The choices that shape the deployment file (recorded in its sidecar; a resumed
        replicate remakes a file whose record differs)."""
        d = dataclasses.asdict(self)
        for k in ("work_dir", "resume", "bias_correction"):  # bias correction: the OpenVINO row's only
            d.pop(k)
        if not d["equalize"]:
            d.pop("equalize")  # so files made before the option existed still match
        return json.loads(json.dumps(d))  # as the sidecar will hold it (tuples become lists)

    @property
    def scheme(self) -> Scheme:
        """The observer choices every flow's prepare takes."""
        return Scheme(self.qconfig, self.observer, self.weight_scheme, self.act_scheme, self.percentile)


# calib_transform -> the data.Batches augmentation it calibrates with
CALIB_AUGMENT = {"test": "none", "train": "seed"}


@torch.no_grad()
def calibrate(model: nn.Module, data: Dataset, samples: int, batch_size: int, seed: int = 0,
              progress: bool = True, transform: CalibTransform = "test") -> None:
    """Run training images through the observers so they record activation ranges: clean ones
    by default ("test": the deployed model sees clean images), or as the original did, through
    its training augmentation ("train": crops, rotations and colour jitter widen the ranges)."""
    batches = Batches(data.train, batch_size, data.mean, data.std, augment=CALIB_AUGMENT[transform],
                      shuffle=True, seed=seed, limit=samples)
    for x, _ in tqdm(batches, desc="calibrating", unit="batch", leave=False, disable=not progress):
        model(x)


def quantize(checkpoint: str | os.PathLike | nn.Module, cfg: QuantizeConfig, data: Dataset | None = None,
             progress: bool = True) -> tuple[nn.Module, dict]:
    """Quantize an fp32 checkpoint file, or an nn.Module in hand (a notebook's model: it is
    copied, not changed); returns (int8 model, record of how it was made)."""
    from .runtimes import torchscript
    flow = get_flow(cfg.flow)
    if cfg.method in ("static", "qat") and (data is None or data.train is None):
        raise QuantbenchError(f"{cfg.method} quantization needs training data (--data-dir)")
    if isinstance(checkpoint, nn.Module):
        model, meta = _from_module(checkpoint, cfg, data)
        source_sha, checkpoint = None, f"<{type(checkpoint).__name__} object>"
    else:
        model, meta = flow.load(checkpoint, num_classes=data.num_classes if data else None, model=cfg.model,
                                method=cfg.method)
        source_sha = sha256(checkpoint)
    if data is not None:  # calibrate and fine-tune on images normalized as in training
        data = for_model(data, meta, f"checkpoint {checkpoint}")
    # The images' shape where there are images (for_model checked it against the checkpoint's).
    shape = tuple(data.input_shape) if data is not None else input_shape(meta)
    example = example_input(shape)
    record: dict = {"method": cfg.method, "flow": cfg.flow, "label": label(cfg.method, cfg.flow),
                    "dtype": "int8", "source_checkpoint": str(checkpoint), "source_sha256": source_sha,
                    "config": cfg.shaping(), "input_shape": list(shape), "fp32_layers": list(cfg.fp32_layers)}
    t0 = time.perf_counter()
    # Before any observer or fusion: the flows then see ordinary (smaller) convolutions.
    record["pruning"] = prune_for_export(model, shape, cfg.prune, data, cfg.seed)
    # Then on the float weights, before any observer sees them (quantbench.equalize).
    record["equalization"] = equalize_for_quantize(model, shape, cfg.equalize, data, cfg.seed)
    # The TorchScript flows' int8 weights are packed for a quantized engine (the fastest one
    # depends on whether pruning cropped convolutions); other runtimes choose their own kernels.
    engine = None
    if flow.RUNTIME == torchscript.NAME:
        record["engine"] = engine = cfg.engine or torchscript.best_engine(pruned=record["pruning"]["applied"])
    with torchscript.quantized_engine(engine):
        qmodel = _quantize(flow, model, cfg, data, meta, checkpoint, example, record, progress)
    record["quantize_s"] = round(time.perf_counter() - t0, 2)
    record.update(classes=meta.get("classes") or (data.classes if data else None),
                  normalize_mean=meta.get("normalize_mean") or (list(data.mean) if data else None),
                  normalize_std=meta.get("normalize_std") or (list(data.std) if data else None),
                  image_size=meta.get("image_size"), arch=meta.get("arch"), model=meta.get("model"))
    # the fp32 model's own warnings (diverged, near chance) travel with everything made from it
    record["warnings"] = list(meta.get("warnings") or []) + record.get("warnings", [])
    return qmodel, record


def _quantize(flow, model, cfg, data, meta, checkpoint, example, record, progress) -> nn.Module:
    if cfg.method == "dynamic":
        with _tracing(cfg.flow):
            qmodel, applied = flow.quantize_dynamic(model, cfg.scheme, example, fp32_layers=cfg.fp32_layers)
        # the static qconfig names do not apply: record torch's dynamic one, which was used
        record["qconfig"] = {"name": "dynamic", **applied}
    elif cfg.method == "static":
        with _tracing(cfg.flow):
            prepared = flow.prepare(model, cfg.scheme, qat=False, example=example, fp32_layers=cfg.fp32_layers)
        record["qconfig"] = _qconfig_record(cfg, flow.applied(prepared))
        calibrate(prepared, data, cfg.calib_samples, cfg.calib_batch_size, cfg.seed, progress, cfg.calib_transform)
        record["calibration"] = {"samples": min(cfg.calib_samples, len(data.train)),
                                 "batch_size": cfg.calib_batch_size, "transform": cfg.calib_transform,
                                 "augmentation": CALIB_AUGMENT[cfg.calib_transform]}
        qmodel = flow.convert(prepared)
    else:
        sched = QAT_SCHEDULES[cfg.qat_schedule]
        recipe = qat_recipe(cfg)
        with _tracing(cfg.flow):
            prepared = flow.prepare(model, cfg.scheme, qat=True, example=example, fp32_layers=cfg.fp32_layers)
        record["qconfig"] = _qconfig_record(cfg, flow.applied(prepared))

        def hook(epoch: int, m: nn.Module) -> None:
            if epoch >= sched.freeze_bn_epoch:
                flow.freeze_bn(m)
            if epoch >= sched.freeze_observer_epoch:
                flow.freeze_observers(m)

        work = cfg.work_dir or Path("runs") / "qat-work"
        result = train(data, recipe, work, model=prepared, resume=cfg.resume, seed=cfg.seed,
                       epoch_hook=hook, set_mode=flow.set_mode, progress=progress,
                       meta={"arch": meta.get("arch"), "model": meta.get("model"), "input_shape": record["input_shape"],
                             "qat_of": str(checkpoint), "source_sha256": record["source_sha256"],
                             "flow": cfg.flow, "qconfig": record["qconfig"]})
        prepared = result.model.to(memory_format=torch.contiguous_format)
        record["warnings"] = result.warnings
        record["qat"] = {"schedule": cfg.qat_schedule, "recipe": dataclasses.asdict(recipe.fit(len(data.train))),
                         "freeze_bn_epoch": sched.freeze_bn_epoch,
                         "freeze_observer_epoch": sched.freeze_observer_epoch, "work_dir": str(work),
                         "fake_quant_test_acc": [h["test_acc"] for h in result.history]}
        qmodel = flow.convert(prepared)
    return qmodel


def qat_recipe(cfg: QuantizeConfig):
    """The QAT fine-tune's recipe: the schedule's, with the user's epochs if given. Epochs the
    user set are kept as they are when Recipe.fit scales the recipe to the data (without the
    mark, fit would raise `--qat-epochs 1` to the schedule's minimum number of steps)."""
    recipe = QAT_SCHEDULES[cfg.qat_schedule].recipe
    if cfg.qat_epochs is None:
        return recipe
    return recipe.replace(epochs=cfg.qat_epochs, fixed=tuple(dict.fromkeys((*recipe.fixed, "epochs"))))


# What to try when a flow cannot capture a model.
_OTHER_FLOWS = {"fx": "--flow pt2e (torch.export follows more of Python)",
                "pt2e": "--flow fx, or eager mode with a model written for it",
                "eager": "--flow fx or --flow pt2e"}
_USER_CODE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


@contextlib.contextmanager
def _tracing(flow: str):
    """A model the flow cannot trace (data-dependent control flow, unsupported Python): one line
    naming where in the user's code it failed, and the flow to try instead."""
    from .warn import stderr_silenced
    try:
        with stderr_silenced():  # torch's graph dumps of a failed capture are not for users
            yield
    except QuantbenchError:
        raise
    except Exception as e:
        import traceback
        where = None
        found = _USER_CODE.findall(str(e))  # torch.export quotes the user's code in its message
        if found:
            where = "{}:{} (in {})".format(*found[-1])
        else:  # torch.fx raises from within the user's forward: the last frame outside torch
            for frame in traceback.extract_tb(e.__traceback__):
                if "site-packages" not in frame.filename and "/quantbench/" not in frame.filename:
                    where = f"{frame.filename}:{frame.lineno} (in {frame.name})"
        raise FlowUnsupported(f"the {flow} flow cannot trace this model" + (f" at {where}" if where else "")
                              + f": {cause(e)}; try {_OTHER_FLOWS.get(flow, 'another flow')}") from e


def _from_module(module: nn.Module, cfg: QuantizeConfig, data: Dataset | None) -> tuple[nn.Module, dict]:
    """A user's nn.Module, as a flow's load() would give it: a copy in eval mode, and the meta
    a checkpoint would carry (from the data it will be calibrated on)."""
    import copy
    model = copy.deepcopy(module).eval()
    if cfg.flow == "eager" and cfg.method != "dynamic" and not hasattr(model, "fuse_model"):
        raise FlowUnsupported(f"eager mode needs a model written for it (QuantStub/DeQuantStub, fuse_model()); "
                              f"{type(module).__name__} is not: use flow='fx' or flow='pt2e'")
    meta = {"model": f"{type(module).__module__}.{type(module).__name__} (an nn.Module passed to quantize)"}
    if data is not None:
        meta.update(num_classes=data.num_classes, classes=data.classes, input_shape=list(data.input_shape),
                    normalize_mean=list(data.mean), normalize_std=list(data.std))
    return model, meta


def _qconfig_record(cfg: QuantizeConfig, applied: dict) -> dict:
    """The qconfig name, the overrides asked for, and the observers really used."""
    return {"name": cfg.qconfig, "overrides": cfg.scheme.overrides(), **applied, "why": why(cfg.qconfig)}


def label(method: str, flow: str) -> str:
    """Row name: the original's names for eager mode, suffixed with the flow otherwise."""
    return LABELS[method] if flow == "eager" else f"{LABELS[method]}-{flow}"


def export_model(model: nn.Module, path, record: dict, flow: str = "eager") -> dict:
    """Write the deployment file of `flow` and its sidecar."""
    path = Path(path)
    t0 = time.perf_counter()
    wb = weight_bytes(model)
    mod = get_flow(flow)
    from .runtimes.torchscript import quantized_engine
    with quantized_engine(record.get("engine")):  # trace and freeze with the weights' own engine
        mod.export(model, path, example_input(input_shape(record)))
    return write_sidecar(path, **record, runtime=mod.RUNTIME, weight_bytes=wb,
                         export_s=round(time.perf_counter() - t0, 2))


def export_origin(checkpoint, path, flow: str = "eager", data: Dataset | None = None,
                  model_spec: str | None = None, prune: bool = True) -> dict:
    """The fp32 model, exported the same way as the int8 ones (the table's "origin" row), pruned
    as they are, so that the row measures int8 against the same graph."""
    from .models import load_checkpoint
    model, meta = load_checkpoint(checkpoint, num_classes=data.num_classes if data else None, model=model_spec)
    if data is not None:
        data = for_model(data, meta, f"checkpoint {checkpoint}")
    shape = tuple(data.input_shape) if data is not None else input_shape(meta)
    record = {"method": "origin", "flow": flow, "label": label("origin", flow), "dtype": "fp32",
              "source_checkpoint": str(checkpoint), "source_sha256": sha256(checkpoint), "arch": meta.get("arch"),
              "input_shape": list(shape),
              "classes": meta.get("classes") or (data.classes if data else None),
              "normalize_mean": meta.get("normalize_mean"), "normalize_std": meta.get("normalize_std"),
              "image_size": meta.get("image_size"), "model": meta.get("model"),
              "warnings": list(meta.get("warnings") or []), "pruned": prune}
    record["pruning"] = prune_for_export(model, shape, prune, data)
    return export_model(model, path, record, flow)


def check_output(path, flow: str) -> Path:
    """The output file name must have the flow's suffix."""
    path = Path(path)
    want = suffix(flow)
    if path.suffix != want:
        raise QuantbenchError(f"the {flow} flow writes {want} files; name the output *{want}")
    return path


def quantize_to_file(checkpoint, output, cfg: QuantizeConfig, data: Dataset | None = None,
                     progress: bool = True) -> dict:
    output = check_output(output, cfg.flow)
    qmodel, record = quantize(checkpoint, cfg, data, progress)
    return export_model(qmodel, output, record, cfg.flow)
