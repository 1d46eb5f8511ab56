"""Stage 4: quantization, the same three steps for every flow (see quantbench.flows):

    dynamic:  flow.quantize_dynamic                                (no data needed)
    static:   flow.prepare -> calibrate on training images -> flow.convert
    qat:      flow.prepare(qat) -> fine-tune with the trainer -> flow.convert

QuantizeConfig holds every choice: the flow, the observers (a qconfig name plus overrides, see
quantbench.qconfigs.Scheme), the calibration images, the layers kept fp32, each runtime's
options. quantbench.deploy runs these steps between loading and exporting; the functions at the
end (quantize, quantize_to_file, export_origin) are the Python API's shortcuts to it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

import torch
from torch import nn
from tqdm import tqdm

from .data import Batches, Dataset
from .errors import FlowUnsupported, QuantbenchError, cause
from .flows import check_method
from .qconfigs import QCONFIGS, ActScheme, Observer, Scheme, WeightScheme, why
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
    """How to quantize; checked when made, so a bad option fails before any work. The help of
    each field is the CLI's (quantbench.cli derives the options from these fields)."""
    method: Method = field(metadata={"help": "dynamic, static or qat"})
    flow: str = field(default="eager", metadata={"help": "eager, fx or pt2e (quantbench.flows)"})
    qconfig: str = field(default="default", metadata={
        "help": "default: best practice for this CPU; seed: the original's 7-bit ranges"})
    # Overrides of the qconfig's choices (None: the qconfig's own; see qconfigs.Scheme):
    observer: Observer | None = field(default=None, metadata={
        "help": "activation observer: minmax, moving-average, histogram or percentile "
                "(default: the qconfig's: histogram for default, moving-average for seed)"})
    weight_scheme: WeightScheme | None = field(default=None, metadata={
        "help": "per-channel or per-tensor (default: the qconfig's, per-channel)"})
    act_scheme: ActScheme | None = field(default=None, metadata={
        "help": "affine or symmetric activations (default: the qconfig's, affine)"})
    percentile: float = field(default=99.99, metadata={
        "help": "with --observer percentile: clip activations at this percentile of |x|"})
    calib_samples: int = field(default=10_000, metadata={
        "help": "training images that calibrate static quantization (runtimes cap it at their MAX_CALIB_SAMPLES)"})
    calib_batch_size: int = field(default=100, metadata={"help": "images per calibration batch"})
    # "test": calibrate on clean images, as the deployed model sees them; "train": with the
    # original's training augmentation (data.Batches(augment="seed")), as the original did
    calib_transform: CalibTransform = field(default="test", metadata={
        "help": "test: calibrate on clean training images; train: through the original's training "
                "augmentation, as the original did"})
    fp32_layers: tuple[str, ...] = field(default=(), metadata={
        "help": "comma list of conv/linear layers kept fp32 (e.g. conv1,fc); `quantbench sensitivity` ranks them"})
    fp32_layers_from: str | None = None   # where fp32_layers came from (a sensitivity ranking), for the record
    qat_schedule: str = field(default="fast", metadata={"help": "QAT fine-tune schedule: seed, fast or smoke"})
    qat_epochs: int | None = field(default=None, metadata={"help": "override the QAT schedule's epochs"})
    work_dir: Path | None = field(default=None, metadata={
        "help": "QAT checkpoints, resumable (default: beside the output file, OUTPUT.qat-work)"})
    resume: bool = field(default=False, metadata={"help": "resume an interrupted QAT fine-tune"})
    seed: int = field(default=0, metadata={"help": "picks the calibration images (and QAT's order)"})
    model: str | None = None          # the user's builder (FILE.py:FUNCTION) a checkpoint was made with
    prune: bool = field(default=True, metadata={
        "help": "dead-tap pruning: drop convolution taps that only ever see zero padding (exact, verified "
                "on every file, recorded in its sidecar)"})
    equalize: bool = field(default=False, metadata={
        "help": "cross-layer equalization of the fp32 weights before quantizing (conv -> BN -> ReLU -> conv "
                "pairs; exact, verified): helps per-tensor weights"})
    # Each runtime's own options, by runtime name: {"torchscript": {"engine": "fbgemm"}, ...}; the
    # fields are the runtime module's Options dataclass (quantbench.runtimes.check_options)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from . import runtimes
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
            raise QuantbenchError("--qat-epochs must be at least 1")
        if not isinstance(self.equalize, bool):
            raise QuantbenchError(f"equalize must be True or False, not {self.equalize!r}")
        object.__setattr__(self, "options", runtimes.check_options(self.options))

    def replace(self, **changes) -> "QuantizeConfig":
        return dataclasses.replace(self, **changes)

    def runtime_options(self, runtime: str):
        """The Options of `runtime` this config asks for (its defaults where none were given;
        None for a runtime without options)."""
        from . import runtimes
        return runtimes.make_options(runtime, self.options.get(runtime))

    def shaping(self) -> dict:
        """The choices that shape a torch flow's file (recorded in its sidecar)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("work_dir", "resume", "options", "model")}
        d["options"] = {k: dataclasses.asdict(v) for k, v in self.options.items()}
        if not d["equalize"]:
            d.pop("equalize")  # so files made before the option existed still match
        return json.loads(json.dumps(d))  # as the sidecar will hold it (tuples become lists)

    @property
    def scheme(self) -> Scheme:
        """The observer choices every flow's prepare takes."""
        return Scheme(self.qconfig, self.observer, self.weight_scheme, self.act_scheme, self.percentile)


# calib_transform -> the data.Batches augmentation it calibrates with
CALIB_AUGMENT = {"test": "none", "train": "seed"}


# Pixels per calibration batch at most: observers and the runtimes' calibrators (ONNX Runtime's,
# NNCF's) hold every activation of a batch at once, which at 224x224 and 100 images is gigabytes.
# The default 100 images stay 100 up to 102x102; at 224x224 a batch holds 20. The images and their
# order do not change.
CALIB_PIXELS = 2 ** 20


def calib_batch_size(cfg: QuantizeConfig, input_shape) -> int:
    """Images per calibration batch: --calib-batch-size, or fewer where images are large."""
    from .data import images_per_batch
    return images_per_batch(input_shape, cfg.calib_batch_size, CALIB_PIXELS)


def calibration_batches(data: Dataset, cfg: QuantizeConfig, limit: int | None = None) -> Batches:
    """The calibration images of every file, torch flow or runtime alike: `cfg.calib_samples`
    (at most `limit`) training images, drawn by `cfg.seed`, clean ("test") or through the
    original's training augmentation ("train"), in batches of calib_batch_size()."""
    samples = min(cfg.calib_samples, limit) if limit else cfg.calib_samples
    return Batches(data.train, calib_batch_size(cfg, data.input_shape), data.mean, data.std,
                   augment=CALIB_AUGMENT[cfg.calib_transform], shuffle=True, seed=cfg.seed, limit=samples)


@torch.no_grad()
def calibrate(model: nn.Module, data: Dataset, samples: int, batch_size: int, seed: int = 0,
              progress: bool = True, transform: CalibTransform = "test") -> None:
    """Run training images through the observers so they record activation ranges: clean ones
    by default ("test": the deployed model sees clean images), or as the original did, through
    its training augmentation ("train": crops, rotations and colour jitter widen the ranges)."""
    cfg = QuantizeConfig(method="static", calib_samples=samples, calib_batch_size=batch_size, seed=seed,
                         calib_transform=transform)
    for x, _ in tqdm(calibration_batches(data, cfg), desc="calibrating", unit="batch", leave=False,
                     disable=not progress):
        model(x)


def quantize_model(flow, model: nn.Module, cfg: QuantizeConfig, source, example: torch.Tensor,
                   progress: bool = True, work_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """The three methods, the same for every flow; returns (int8 model, the record fields they
    decide: qconfig, calibration, qat, warnings). `model` is the flow's float model (a copy)."""
    data = source.data
    made: dict = {}
    if cfg.method == "dynamic":
        with _tracing(cfg.flow):
            qmodel, applied = flow.quantize_dynamic(model, cfg.scheme, example, fp32_layers=cfg.fp32_layers)
        # the static qconfig names do not apply: record torch's dynamic one, which was used
        made["qconfig"] = {"name": "dynamic", **applied}
        return qmodel, made
    with _tracing(cfg.flow):
        prepared = flow.prepare(model, cfg.scheme, qat=cfg.method == "qat", example=example,
                                fp32_layers=cfg.fp32_layers)
    made["qconfig"] = _qconfig_record(cfg, flow.applied(prepared))
    if cfg.method == "static":
        calibrate(prepared, data, cfg.calib_samples, cfg.calib_batch_size, cfg.seed, progress, cfg.calib_transform)
        made["calibration"] = {"samples": min(cfg.calib_samples, len(data.train)),
                               "batch_size": calib_batch_size(cfg, data.input_shape), "transform": cfg.calib_transform,
                               "augmentation": CALIB_AUGMENT[cfg.calib_transform], "seed": cfg.seed}
        return flow.convert(prepared), made
    # qat: fine-tune with the trainer, freezing BN statistics, then the observers, on schedule
    sched = QAT_SCHEDULES[cfg.qat_schedule]
    recipe = qat_recipe(cfg)

    def hook(epoch: int, m: nn.Module) -> None:
        if epoch >= sched.freeze_bn_epoch:
            flow.freeze_bn(m)
        if epoch >= sched.freeze_observer_epoch:
            flow.freeze_observers(m)

    from .fileio import run_lock
    work = Path(cfg.work_dir or work_dir or tempfile.mkdtemp(prefix="quantbench-qat-"))
    with run_lock(work):  # one fine-tune per folder
        result = train(data, recipe, work, model=prepared, resume=cfg.resume, seed=cfg.seed,
                       epoch_hook=hook, set_mode=flow.set_mode, progress=progress,
                       meta={"arch": source.meta.get("arch"), "model": source.meta.get("model"),
                             "input_shape": list(example.shape[1:]), "qat_of": source.name,
                             "source_sha256": source.sha256, "flow": cfg.flow, "qconfig": made["qconfig"]})
    prepared = result.model.to(memory_format=torch.contiguous_format)
    made["warnings"] = list(result.warnings)
    made["qat"] = {"schedule": cfg.qat_schedule, "recipe": dataclasses.asdict(recipe.fit(len(data.train))),
                   "freeze_bn_epoch": sched.freeze_bn_epoch, "freeze_observer_epoch": sched.freeze_observer_epoch,
                   "work_dir": str(work), "fake_quant_test_acc": [h["test_acc"] for h in result.history]}
    return flow.convert(prepared), made


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


def _qconfig_record(cfg: QuantizeConfig, applied: dict) -> dict:
    """The qconfig name, the overrides asked for, and the observers really used."""
    return {"name": cfg.qconfig, "overrides": cfg.scheme.overrides(), **applied, "why": why(cfg.qconfig)}


# ---------------------------------------------------------------- the Python API's conveniences
# Each is deploy.make with one target; quantbench.deploy is where files are made.
def quantize(checkpoint: str | os.PathLike | nn.Module, cfg: QuantizeConfig, data: Dataset | None = None,
             progress: bool = True):
    """Quantize an fp32 checkpoint file, or an nn.Module in hand (a notebook's model: it is
    copied, not changed), without writing a file; returns (int8 model, its FileRecord)."""
    from .deploy import Target, build
    return build(_source(checkpoint, cfg, data), Target(cfg.flow, cfg.method, cfg), progress)


def _source(checkpoint, cfg: QuantizeConfig, data):
    from .deploy import Source
    if isinstance(checkpoint, nn.Module):
        src = Source.from_module(checkpoint, data)
        if cfg.flow == "eager" and cfg.method != "dynamic" and not hasattr(src.model, "fuse_model"):
            raise FlowUnsupported(f"eager mode needs a model written for it (QuantStub/DeQuantStub, fuse_model()); "
                                  f"{type(checkpoint).__name__} is not: use flow='fx' or flow='pt2e'")
        return src
    return Source.from_checkpoint(checkpoint, data, model_spec=cfg.model)


def export_model(model: nn.Module, path, record, flow: str | None = None):
    """Write a model from quantize() as its flow's deployment file, with its sidecar."""
    from .deploy import export
    return export(model, record if flow is None else record.replace(flow=flow), Path(path))


def quantize_to_file(checkpoint, output, cfg: QuantizeConfig, data: Dataset | None = None, progress: bool = True):
    """Quantize a checkpoint (or an nn.Module) and write `output` with its sidecar; returns its FileRecord."""
    from .deploy import Target, make
    return make(_source(checkpoint, cfg, data), Target(cfg.flow, cfg.method, cfg), output, progress)[0]


def export_origin(checkpoint, path, flow: str = "eager", data: Dataset | None = None,
                  model_spec: str | None = None, prune: bool = True, seed: int = 0):
    """The fp32 model, exported the way the int8 ones are (the table's "origin" row), pruned as
    they are, so that the row measures int8 against the same graph."""
    from .deploy import Source, Target, make
    q = QuantizeConfig(method="static", flow=flow, prune=prune, seed=seed)
    return make(Source.from_checkpoint(checkpoint, data, model_spec), Target(flow, "origin", q), path)[0]


def check_output(path, flow: str) -> Path:
    """The output file name must have the flow's suffix (deploy.check_output)."""
    from .deploy import check_output as _check_output
    return _check_output(path, flow)


def label(method: str, flow: str) -> str:
    from .deploy import label as _label
    return _label(method, flow)
