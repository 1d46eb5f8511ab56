"""Stage 3: training (fp32, and the QAT fine-tune, which is the same loop on a prepared model).

A flat loop in the spirit of torchvision's references/classification/train.py:
recipe -> optimizer + scheduler -> epochs of (train, evaluate, checkpoint, log).

Every epoch writes `last.pth` (everything needed to resume) and, when test accuracy improves,
`best.pth` (weights + meta), both atomically; a line in `metrics.jsonl`; TensorBoard scalars.
The batch order and augmentation are a function of (seed, epoch), so `resume=True` continues
exactly where an interrupted run stopped.

Distributed: under `torchrun`, each process trains on its shard (DistributedSampler) inside
DistributedDataParallel; rank 0 evaluates and writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .data import Batches, Dataset
from .errors import QuantbenchError
from .evaluate import accuracy
from .fileio import save_torch, write_text
from .models import build, save_checkpoint, unwrap


@dataclass
class Recipe:
    name: str
    epochs: int
    batch_size: int
    optimizer: str = "sgd"             # "sgd" | "adam"
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "onecycle"         # "onecycle" | "step" | "cosine" | "constant"
    step_size: int = 20                # epochs, for "step"
    gamma: float = 0.1
    pct_start: float = 0.25            # warm-up share, for "onecycle"
    label_smoothing: float = 0.0
    augment: str = "crop-flip"         # see data.AUGMENTATIONS
    ema_epoch: int | None = None       # 1-based epoch from which an EMA of the weights is kept
    ema_decay: float = 0.9998
    channels_last: bool = True         # ~25 % faster convolutions on x86 CPUs
    train_limit: int | None = None     # images per epoch (None: all)
    extra: dict = field(default_factory=dict)

    def replace(self, **kw) -> "Recipe":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


PRESETS: dict[str, Recipe] = {
    # The original's recipe (RECIPE.md): hours on 2 CPU cores.
    "seed": Recipe("seed", epochs=50, batch_size=100, optimizer="adam", lr=1e-3, betas=(0.9, 0.95),
                   schedule="step", step_size=20, gamma=0.1, augment="seed", ema_epoch=40),
    # Ours for 2 CPU cores: SGD + OneCycle + label smoothing, light batched augmentation,
    # channels_last, batch 256 (the CPU's best throughput per image).
    "fast": Recipe("fast", epochs=15, batch_size=256, optimizer="sgd", lr=0.4, momentum=0.9,
                   nesterov=True, weight_decay=5e-4, schedule="onecycle", pct_start=0.25,
                   label_smoothing=0.1, augment="crop-flip"),
    # Seconds, for tests and for checking an installation.
    "smoke": Recipe("smoke", epochs=2, batch_size=32, optimizer="sgd", lr=0.02, momentum=0.9,
                    schedule="constant", augment="crop-flip", channels_last=False, train_limit=512),
}


def get_recipe(preset: str, **overrides) -> Recipe:
    if preset not in PRESETS:
        raise QuantbenchError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset].replace(**overrides)


def make_optimizer(params, r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)
    return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                           weight_decay=r.weight_decay)


def make_scheduler(opt, r: Recipe, steps_per_epoch: int):
    """Stepped once per batch, so every schedule is smooth in steps."""
    S = torch.optim.lr_scheduler
    total = r.epochs * steps_per_epoch
    if r.schedule == "onecycle":
        return S.OneCycleLR(opt, max_lr=r.lr, total_steps=total, pct_start=r.pct_start)
    if r.schedule == "step":
        return S.StepLR(opt, step_size=r.step_size * steps_per_epoch, gamma=r.gamma)
    if r.schedule == "cosine":
        return S.CosineAnnealingLR(opt, T_max=total)
    return S.ConstantLR(opt, factor=1.0, total_iters=0)


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world


@dataclass
class TrainResult:
    model: nn.Module          # the evaluated model of the last epoch (EMA if active)
    best_acc: float
    history: list[dict]
    output: Path


def train(data: Dataset, recipe: Recipe, output: str | os.PathLike, arch: str = "resnet18",
          model: nn.Module | None = None, resume: bool = False, device: str = "cpu", seed: int = 0,
          epoch_hook: Callable[[int, nn.Module], None] | None = None, meta: dict | None = None,
          set_mode: Callable[[nn.Module, bool], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train `model` (default: a fresh `arch`) on `data` with `recipe`; see the module doc.

    `epoch_hook(epoch, model)` runs before each epoch (1-based): QAT uses it to freeze
    batch-norm statistics and observers on schedule. `set_mode(model, training)` replaces
    `model.train()` / `model.eval()` for models that lack them (torch.export graphs).
    """
    if data.train is None:
        raise QuantbenchError("training needs the train split")
    output = Path(output)
    rank, world = _dist_info()
    is_main = rank == 0
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantbenchError("--device cuda: no CUDA GPU is available here")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if world > 1 else device
    torch.manual_seed(seed)

    model = model if model is not None else build(arch, data.num_classes)
    mf = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=mf)
    batches = Batches(data.train, recipe.batch_size // world, data.mean, data.std,
                      augment=recipe.augment, shuffle=True, seed=seed, rank=rank, world_size=world,
                      limit=recipe.train_limit and recipe.train_limit // world, min_batch=2)
    opt = make_optimizer(model.parameters(), recipe)
    sched = make_scheduler(opt, recipe, len(batches))
    ema: AveragedModel | None = None
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    meta = {"arch": arch, "num_classes": data.num_classes, "classes": data.classes,
            "normalize_mean": list(data.mean), "normalize_std": list(data.std),
            "dataset": data.source, "recipe": dataclasses.asdict(recipe), "seed": seed, **(meta or {})}

    start_epoch, best_acc, history, elapsed0 = 1, -1.0, [], 0.0
    last_path = output / "last.pth"
    if resume and last_path.is_file():
        try:
            state = torch.load(last_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise QuantbenchError(f"cannot resume: {last_path} is unreadable ({type(e).__name__})") from None
        if state["meta"]["recipe"] != meta["recipe"]:
            raise QuantbenchError(f"cannot resume: {last_path} was written by another recipe "
                                  f"({state['meta']['recipe']['name']}, {state['meta']['recipe']['epochs']} epochs)")
        for key in ("arch", "classes", "seed"):  # else a traceback (arch) or a silently different run
            if state["meta"].get(key) != meta.get(key):
                raise QuantbenchError(f"cannot resume: {last_path} was written with {key} "
                                      f"{state['meta'].get(key)!r}, not {meta.get(key)!r}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("ema") is not None:
            ema = _make_ema(model, recipe)
            ema.load_state_dict(state["ema"])
        start_epoch, best_acc, history = state["epoch"] + 1, state["best_acc"], state["history"]
        elapsed0 = history[-1]["elapsed_s"] if history else 0.0
    elif resume and is_main:
        print(f"no {last_path} to resume from; starting from scratch")

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    writer = None
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(output / "metrics.jsonl", start_epoch - 1)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_epoch)

    t0 = time.perf_counter()
    eval_model: nn.Module = model
    for epoch in range(start_epoch, recipe.epochs + 1):
        if epoch_hook is not None:
            epoch_hook(epoch, model)
        if recipe.ema_epoch is not None and epoch >= recipe.ema_epoch and ema is None:
            ema = _make_ema(model, recipe)
        batches.set_epoch(epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout etc.: a function of the epoch
        if set_mode is None:
            net.train()
        else:
            set_mode(model, True)
        t_epoch = time.perf_counter()
        loss_sum = correct = seen = 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", leave=False,
                   disable=not (progress and is_main))
        for x, y in bar:
            x, y = x.to(device, memory_format=mf), y.to(device)
            logits = net(x)
            loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        if not math.isfinite(loss_sum):
            raise QuantbenchError(f"training diverged at epoch {epoch} (loss is not finite); lower the learning rate")

        eval_model = ema.module if ema is not None else model
        if is_main:
            if set_mode is not None:
                set_mode(eval_model, False)
            test_acc = accuracy(eval_model, data, channels_last=recipe.channels_last, progress=progress,
                                desc=f"eval {epoch}", set_eval=set_mode is None)
            row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                   "test_acc": test_acc, "lr": opt.param_groups[0]["lr"],
                   "epoch_s": time.perf_counter() - t_epoch,
                   "elapsed_s": elapsed0 + time.perf_counter() - t0, "ema": ema is not None}
            history.append(row)
            if test_acc > best_acc:
                best_acc = test_acc
                save_checkpoint(output / "best.pth", eval_model,
                                {**meta, "epochs": epoch, "test_acc": test_acc, "log": history})
            save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "epoch": epoch, "best_acc": best_acc, "history": history, "meta": meta}, last_path)
            # The metrics line comes after the checkpoint: a resumed run rewrites any line past it.
            with open(output / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            for k in ("train_loss", "train_acc", "test_acc", "lr"):
                writer.add_scalar(k, row[k], epoch)
            writer.flush()
            print(f"epoch {epoch}/{recipe.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%  "
                  f"test {test_acc:.2f}%  ({row['epoch_s']:.0f} s)", flush=True)
        if world > 1:
            dist.barrier()
    if writer is not None:
        writer.close()
    eval_model = unwrap(eval_model)
    if set_mode is None:
        eval_model.eval()
    else:
        set_mode(eval_model, False)
    return TrainResult(eval_model, best_acc, history, output)


def _make_ema(model: nn.Module, r: Recipe) -> AveragedModel:
    # use_buffers=True averages batch-norm running statistics too, so the EMA model is usable as is.
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(r.ema_decay), use_buffers=True)


def _truncate_metrics(path: Path, keep_epochs: int) -> None:
    """Drop metrics lines past the checkpoint we resume from (written after it, then interrupted)."""
    if not path.is_file():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    kept = [l for l in lines if json.loads(l)["epoch"] <= keep_epochs]
    if len(kept) != len(lines):
        write_text(path, "".join(l + "\n" for l in kept))
