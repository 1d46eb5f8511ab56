"""Stage 4: quantization, the same three steps for every flow (see quantbench.flows):

    dynamic:  load -> flow.quantize_dynamic                      (no data needed)
    static:   load -> flow.prepare -> calibrate on training images -> flow.convert
    qat:      load -> flow.prepare(qat) -> fine-tune with the trainer -> flow.convert

then flow.export writes the deployment file and a FILE.json sidecar records how it was made.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .data import Batches, Dataset, load_dataset
from .errors import QuantbenchError
from .export import example_input, weight_bytes, write_sidecar
from .flows import LABELS, check_method
from .flows.qconfigs import QCONFIGS, describe
from .train import Recipe, train

# QAT fine-tune schedules. Each is a trainer Recipe plus when to freeze batch-norm statistics and
# observers (1-based epoch from which they are frozen).
QAT_PRESETS: dict[str, tuple[Recipe, int, int]] = {
    # The original: Adam 1e-4, StepLR 8/0.1, 16 epochs, batch 100; BN frozen after epoch 6,
    # observers after epoch 10.
    "seed": (Recipe("qat-seed", epochs=16, batch_size=100, optimizer="adam", lr=1e-4, betas=(0.9, 0.95),
                    schedule="step", step_size=8, gamma=0.1, augment="seed"), 7, 11),
    # Ours for 2 CPU cores: start from converged fp32 weights, so a small learning rate and a few
    # thousand steps suffice. BN statistics are frozen from the start (the fp32 ones are good and
    # the converted model folds them), observers for the last epoch.
    "fast": (Recipe("qat-fast", epochs=2, batch_size=128, optimizer="sgd", lr=2e-3, momentum=0.9,
                    weight_decay=5e-5, schedule="cosine", label_smoothing=0.1, augment="crop-flip",
                    train_limit=25_000), 1, 2),
    "smoke": (Recipe("qat-smoke", epochs=1, batch_size=32, optimizer="sgd", lr=1e-3, momentum=0.9,
                     schedule="constant", augment="none", channels_last=False, train_limit=128), 1, 2),
}


@dataclass
class QuantizeConfig:
    method: str                       # dynamic | static | qat
    flow: str = "eager"               # see quantbench.flows.FLOWS
    qconfig: str = "default"          # default | seed
    calib_samples: int = 10_000       # training images used to calibrate static quantization
    calib_batch_size: int = 100
    qat_preset: str = "fast"
    qat_epochs: int | None = None
    work_dir: Path | None = None      # QAT checkpoints (resumable)
    resume: bool = False
    seed: int = 0


def _check(cfg: QuantizeConfig):
    flow = check_method(cfg.flow, cfg.method)
    if cfg.qconfig not in QCONFIGS:
        raise QuantbenchError(f"unknown qconfig {cfg.qconfig!r}; choose from {', '.join(QCONFIGS)}")
    if cfg.method == "static" and cfg.calib_samples <= 0:
        raise QuantbenchError("static quantization needs calibration images: --calib-samples must be > 0")
    if cfg.method == "qat" and cfg.qat_preset not in QAT_PRESETS:
        raise QuantbenchError(f"unknown QAT preset {cfg.qat_preset!r}; choose from {', '.join(QAT_PRESETS)}")
    return flow


@torch.no_grad()
def calibrate(model: nn.Module, data: Dataset, samples: int, batch_size: int, seed: int = 0,
              progress: bool = True) -> None:
    """Run training images (no augmentation: the deployed model sees clean images) through the
    observers so they record activation ranges."""
    batches = Batches(data.train, batch_size, data.mean, data.std, shuffle=True, seed=seed, limit=samples)
    for x, _ in tqdm(batches, desc="calibrating", unit="batch", leave=False, disable=not progress):
        model(x)


def quantize(checkpoint, cfg: QuantizeConfig, data: Dataset | None = None,
             progress: bool = True) -> tuple[nn.Module, dict]:
    """Quantize an fp32 checkpoint; returns (int8 model, record of how it was made)."""
    flow = _check(cfg)
    needs_train = cfg.method in ("static", "qat")
    if needs_train and (data is None or data.train is None):
        raise QuantbenchError(f"{cfg.method} quantization needs training data (--data-dir)")
    model, meta = flow.load(checkpoint, num_classes=data.num_classes if data else None)
    example = example_input()
    record: dict = {"method": cfg.method, "flow": cfg.flow, "label": label(cfg.method, cfg.flow),
                    "dtype": "int8", "qconfig": describe(cfg.qconfig), "source_checkpoint": str(checkpoint)}
    t0 = time.perf_counter()
    if cfg.method == "dynamic":
        qmodel = flow.quantize_dynamic(model, cfg.qconfig)
    elif cfg.method == "static":
        prepared = flow.prepare(model, cfg.qconfig, qat=False, example=example)
        calibrate(prepared, data, cfg.calib_samples, cfg.calib_batch_size, cfg.seed, progress)
        record["calibration"] = {"samples": min(cfg.calib_samples, len(data.train)),
                                 "batch_size": cfg.calib_batch_size, "augmentation": "none"}
        qmodel = flow.convert(prepared)
    else:
        recipe, bn_epoch, obs_epoch = QAT_PRESETS[cfg.qat_preset]
        recipe = recipe.replace(epochs=cfg.qat_epochs)
        prepared = flow.prepare(model, cfg.qconfig, qat=True, example=example)

        def hook(epoch: int, m: nn.Module) -> None:
            if epoch >= bn_epoch:
                flow.freeze_bn(m)
            if epoch >= obs_epoch:
                flow.freeze_observers(m)

        work = cfg.work_dir or Path("runs") / "qat-work"
        result = train(data, recipe, work, model=prepared, resume=cfg.resume, seed=cfg.seed,
                       epoch_hook=hook, set_mode=flow.set_mode, progress=progress,
                       meta={"arch": meta.get("arch"), "qat_of": str(checkpoint)})
        prepared = result.model.to(memory_format=torch.contiguous_format)
        record["qat"] = {"recipe": dataclasses.asdict(recipe), "freeze_bn_epoch": bn_epoch,
                         "freeze_observer_epoch": obs_epoch, "work_dir": str(work),
                         "fake_quant_test_acc": [h["test_acc"] for h in result.history]}
        qmodel = flow.convert(prepared)
    record["quantize_s"] = round(time.perf_counter() - t0, 2)
    record.update(classes=meta.get("classes") or (data.classes if data else None),
                  normalize_mean=meta.get("normalize_mean") or (list(data.mean) if data else None),
                  normalize_std=meta.get("normalize_std") or (list(data.std) if data else None),
                  arch=meta.get("arch"))
    return qmodel, record


def label(method: str, flow: str) -> str:
    """Row name: the original's names for eager mode, suffixed with the flow otherwise."""
    return LABELS[method] if flow == "eager" else f"{LABELS[method]}-{flow}"


def export_model(model: nn.Module, path, record: dict, flow: str = "eager") -> dict:
    """Write the deployment file of `flow` and its sidecar."""
    from .flows import get_flow
    path = Path(path)
    t0 = time.perf_counter()
    wb = weight_bytes(model)
    get_flow(flow).export(model, path, example_input())
    return write_sidecar(path, **record, runtime=_runtime_of(path), weight_bytes=wb,
                         export_s=round(time.perf_counter() - t0, 2))


def _runtime_of(path: Path) -> str:
    from .runtimes import RUNTIME_NAMES
    return RUNTIME_NAMES.get(path.suffix, path.suffix.lstrip("."))


def export_origin(checkpoint, path, flow: str = "eager", data: Dataset | None = None) -> dict:
    """The fp32 model, exported the same way as the int8 ones (the table's "origin" row)."""
    from .models import load_checkpoint
    model, meta = load_checkpoint(checkpoint, num_classes=data.num_classes if data else None)
    record = {"method": "origin", "flow": flow, "label": "origin" if flow == "eager" else f"origin-{flow}",
              "dtype": "fp32", "source_checkpoint": str(checkpoint), "arch": meta.get("arch"),
              "classes": meta.get("classes") or (data.classes if data else None),
              "normalize_mean": meta.get("normalize_mean"), "normalize_std": meta.get("normalize_std")}
    return export_model(model, path, record, flow)


def quantize_to_file(checkpoint, output, cfg: QuantizeConfig, data: Dataset | None = None,
                     progress: bool = True) -> dict:
    flow = _check(cfg)
    output = Path(output)
    if output.suffix != flow.SUFFIX:
        raise QuantbenchError(f"the {cfg.flow} flow writes {flow.SUFFIX} files; name the output *{flow.SUFFIX}")
    qmodel, record = quantize(checkpoint, cfg, data, progress)
    return export_model(qmodel, output, record, cfg.flow)


def quantize_cli(args) -> int:
    cfg = QuantizeConfig(method=args.method, flow=args.flow, qconfig=args.qconfig,
                         calib_samples=args.calib_samples, calib_batch_size=args.calib_batch_size,
                         qat_preset=args.preset, qat_epochs=args.epochs, resume=args.resume,
                         work_dir=args.work_dir or args.output.parent / "qat-work")
    _check(cfg)  # fail on bad options before loading any data
    data = None
    if cfg.method != "dynamic" or args.data_dir is not None:
        data = load_dataset(args.data_dir, args.data_root, train=cfg.method != "dynamic",
                            progress=not args.no_progress)
    rec = quantize_to_file(args.checkpoint, args.output, cfg, data, progress=not args.no_progress)
    print(f"{rec['label']}: wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB) "
          f"in {rec['quantize_s']:.0f} s")
    return 0
