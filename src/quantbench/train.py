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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .data import Batches, Dataset
from .errors import QuantbenchError, cause
from .evaluate import accuracy
from .fileio import save_torch, write_text
from .models import build_model, model_meta, save_checkpoint, unwrap


Optimizer = Literal["sgd", "adam"]
Schedule = Literal["onecycle", "step", "cosine", "constant"]


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int
    optimizer: Optimizer = "sgd"
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Schedule = "onecycle"
    step_size: int = 20                # epochs, for "step"
    gamma: float = 0.1
    pct_start: float = 0.25            # warm-up share, for "onecycle"
    label_smoothing: float = 0.0
    augment: str = "crop-flip"         # see data.AUGMENTATIONS
    ema_epoch: int | None = None       # 1-based epoch from which an EMA of the weights is kept
    ema_decay: float = 0.9998
    channels_last: bool = True         # ~25 % faster convolutions on x86 CPUs
    train_limit: int | None = None     # images per epoch (None: all)
    min_steps: int | None = None       # scale to the data, to at least this many optimizer steps (fit)
    fixed: tuple[str, ...] = ()        # the fields a user set, which fit() leaves alone

    def __post_init__(self):
        from .data import AUGMENTATIONS
        if self.epochs < 1:
            raise QuantbenchError(f"epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 2:  # batch norm cannot train on single images
            raise QuantbenchError(f"batch size must be at least 2 for training, not {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise QuantbenchError(f"learning rate must be a positive number, not {self.lr}")
        for name, allowed in (("optimizer", get_args(Optimizer)), ("schedule", get_args(Schedule)),
                              ("augment", AUGMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise QuantbenchError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        if self.train_limit is not None and self.train_limit < 1:
            raise QuantbenchError("train_limit must be at least 1")

    def replace(self, **kw) -> "Recipe":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def fit(self, n_images: int) -> "Recipe":
        """This recipe for a training split of `n_images`. Presets are tuned for CIFAR-10's
        50,000 images; on a few hundred, batch 256 makes 2 steps an epoch at a learning rate
        that then diverges. So, for recipes with `min_steps`: the batch halves until an epoch has
        at least 16 steps, the learning rate follows the batch linearly (the linear scaling
        rule), and the epochs grow until the run makes `min_steps` optimizer steps. Warm-up is a
        share of the run (OneCycle's pct_start), so it scales too. On CIFAR-10 nothing changes."""
        if self.min_steps is None:
            return self
        n = min(n_images, self.train_limit or n_images)
        bs = self.batch_size
        if "batch_size" not in self.fixed:
            while bs > 16 and n // bs < 16:
                bs //= 2
        lr = self.lr if "lr" in self.fixed else self.lr * bs / self.batch_size
        epochs = self.epochs
        if "epochs" not in self.fixed:
            epochs = max(epochs, math.ceil(self.min_steps / max(1, n // bs)))
        return dataclasses.replace(self, batch_size=bs, lr=lr, epochs=epochs)


PRESETS: dict[str, Recipe] = {
    # The original's recipe (RECIPE.md): hours on 2 CPU cores.
    "seed": Recipe("seed", epochs=50, batch_size=100, optimizer="adam", lr=1e-3, betas=(0.9, 0.95),
                   schedule="step", step_size=20, gamma=0.1, augment="seed", ema_epoch=40),
    # Ours for 2 CPU cores: SGD + OneCycle + label smoothing, light batched augmentation,
    # channels_last, batch 256 (the CPU's best throughput per image).
    # On smaller datasets it scales (Recipe.fit): smaller batches, learning rate and more epochs.
    "fast": Recipe("fast", epochs=15, batch_size=256, optimizer="sgd", lr=0.4, momentum=0.9,
                   nesterov=True, weight_decay=5e-4, schedule="onecycle", pct_start=0.25,
                   label_smoothing=0.1, augment="crop-flip", min_steps=1000),
    # Seconds, for tests and for checking an installation.
    "smoke": Recipe("smoke", epochs=2, batch_size=32, optimizer="sgd", lr=0.02, momentum=0.9,
                    schedule="constant", augment="crop-flip", channels_last=False, train_limit=512),
}


def get_recipe(preset: str, **overrides) -> Recipe:
    """A preset with the user's overrides (None: not set), which Recipe.fit then leaves alone."""
    if preset not in PRESETS:
        raise QuantbenchError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    fixed = tuple(k for k, v in overrides.items() if v is not None)
    return PRESETS[preset].replace(**overrides, fixed=fixed or None)


RUN_FILES = ("best.pth", "last.pth", "metrics.jsonl")  # what a training run leaves in its folder


def check_output(output: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any work, to start a fresh run in a folder that holds another run's files:
    a second run would replace its best.pth (perhaps with a worse model), last.pth and metrics."""
    output = Path(output)
    found = [name for name in RUN_FILES if (output / name).exists()]
    if found and not resume and not overwrite:
        raise QuantbenchError(f"{output} already holds a training run ({', '.join(found)}); use --resume to "
                              "continue it, another --output, or --overwrite to replace it")


def check_device(device: str) -> str:
    """`device` if training can run there (cpu, cuda, cuda:N), else a one-line error."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise QuantbenchError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if kind not in ("cpu", "cuda"):
        raise QuantbenchError(f"device {device!r} is not supported for training; use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise QuantbenchError(f"--device {device}: no CUDA GPU is available here")
    return device


CROP_PAD = 4  # crop-flip's reflect padding (data.augment_crop_flip): images must be larger than it


def check_image_size(height: int, width: int, recipe: Recipe) -> None:
    """Images too small for the recipe's augmentation fail here in one line, not in F.pad."""
    if recipe.augment == "crop-flip" and min(height, width) <= CROP_PAD:
        raise QuantbenchError(f"images of {width}x{height} are too small to train with the {recipe.name} recipe "
                              f"(its crop-flip augmentation pads by {CROP_PAD} pixels): use --image-size "
                              f"{CROP_PAD + 1} or more")


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
    warnings: list[str] = field(default_factory=list)  # diverging, or ended near chance level


def health_warnings(history: list[dict], num_classes: int) -> list[str]:
    """What a user must hear about a run before trusting its model: a training loss that grew
    (diverging: the learning rate is too high for this data), or a test accuracy that stayed
    near chance (1 / classes), which makes every int8 row built on it meaningless."""
    out = []
    losses = [h["train_loss"] for h in history]
    if len(losses) >= 2 and losses[-1] > 1.5 * min(losses) and losses[-1] > math.log(max(num_classes, 2)):
        out.append(f"training loss grew from {min(losses):.3g} to {losses[-1]:.3g}: the run is diverging; "
                   "lower the learning rate (--lr)")
    chance = 100.0 / max(num_classes, 1)
    best = max((h["test_acc"] for h in history), default=None)
    if best is not None and best < chance + 0.3 * (100 - chance):
        out.append(f"best test accuracy {best:.1f}% is near chance level ({chance:.1f}% for {num_classes} "
                   "classes): this model has not learned its task")
    return out


@dataclass
class _State:
    """What a run carries from epoch to epoch (and what last.pth saves)."""
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: AveragedModel | None = None
    start_epoch: int = 1
    best_acc: float = -1.0
    history: list[dict] = field(default_factory=list)
    elapsed0: float = 0.0


def train(data: Dataset, recipe: Recipe, output: str | os.PathLike, arch: str | None = "resnet18",
          model: nn.Module | None = None, resume: bool = False, device: str = "cpu", seed: int = 0,
          epoch_hook: Callable[[int, nn.Module], None] | None = None, meta: dict | None = None,
          set_mode: Callable[[nn.Module, bool], None] | None = None,
          progress: bool = True, model_spec: str | None = None) -> TrainResult:
    """Train `model` (default: a fresh `arch`, or the user's builder `model_spec`, FILE.py:FUNCTION)
    on `data` with `recipe`; see the module doc.

    `epoch_hook(epoch, model)` runs before each epoch (1-based): QAT uses it to freeze
    batch-norm statistics and observers on schedule. `set_mode(model, training)` replaces
    `model.train()` / `model.eval()` for models that lack them (torch.export graphs).
    """
    if data.train is None:
        raise QuantbenchError("training needs the train split")
    output = Path(output)
    recipe = recipe.fit(len(data.train))
    check_image_size(*data.input_shape[1:], recipe)
    rank, world, device = _distributed(check_device(device))
    is_main = rank == 0
    torch.manual_seed(seed)

    if model_spec:
        arch = None
    if model is None:
        model = build_model(arch=arch, model=model_spec, num_classes=data.num_classes, input_shape=data.input_shape)
    mf = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=mf)
    batches = Batches(data.train, recipe.batch_size // world, data.mean, data.std,
                      augment=recipe.augment, shuffle=True, seed=seed, rank=rank, world_size=world,
                      limit=recipe.train_limit and recipe.train_limit // world, min_batch=2)
    if len(batches) == 0:
        raise QuantbenchError(f"the training split has {len(data.train)} images: too few for one batch")
    opt = make_optimizer(model.parameters(), recipe)
    st = _State(model, opt, make_scheduler(opt, recipe, len(batches)))
    meta = {**model_meta(arch, model_spec, data.input_shape), "num_classes": data.num_classes, "classes": data.classes,
            "normalize_mean": list(data.mean), "normalize_std": list(data.std), "norm_source": data.norm_source,
            "input_shape": list(data.input_shape), "image_size": data.info.get("image_size"),
            "dataset": data.source, "recipe": dataclasses.asdict(recipe), "seed": seed, **(meta or {})}
    last_path = output / "last.pth"
    if resume and last_path.is_file():
        _resume(st, last_path, meta, recipe)
    elif resume and is_main:
        print(f"no {last_path} to resume from; starting from scratch")

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    writer = None
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        _write_metrics(output / "metrics.jsonl", st.history)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(output / "tensorboard"), purge_step=st.start_epoch)

    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    t0 = time.perf_counter()
    eval_model: nn.Module = model
    for epoch in range(st.start_epoch, recipe.epochs + 1):
        if epoch_hook is not None:
            epoch_hook(epoch, model)
        if recipe.ema_epoch is not None and epoch >= recipe.ema_epoch and st.ema is None:
            st.ema = _make_ema(model, recipe)
        t_epoch = time.perf_counter()
        train_row = _train_epoch(st, net, batches, criterion, epoch, recipe, seed, device, mf, set_mode,
                                 progress and is_main)
        eval_model = st.ema.module if st.ema is not None else model
        if is_main:
            epoch_s = time.perf_counter() - t_epoch
            # training images per second (this process), the figure a faster recipe must move
            train_row.update(epoch_s=epoch_s, images_per_s=round(train_row["images"] / epoch_s, 1))
            _end_epoch(st, eval_model, train_row, data, recipe, output, meta, set_mode, writer,
                       elapsed=st.elapsed0 + time.perf_counter() - t0, progress=progress)
        if world > 1:
            dist.barrier()
    if writer is not None:
        writer.close()
    warnings = health_warnings(st.history, data.num_classes) if is_main else []
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    if warnings and (output / "best.pth").is_file():  # the checkpoint carries them to quantize/replicate
        blob = torch.load(output / "best.pth", map_location="cpu", weights_only=True)
        blob["meta"]["warnings"] = warnings
        save_torch(blob, output / "best.pth")
    eval_model = unwrap(eval_model)
    if set_mode is None:
        eval_model.eval()
    else:
        set_mode(eval_model, False)
    return TrainResult(eval_model, st.best_acc, st.history, output, warnings)


def _distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) under torchrun; (0, 1, device) otherwise."""
    rank, world = _dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if world > 1 else device
    return rank, world, device


def _resume(st: _State, last_path: Path, meta: dict, recipe: Recipe) -> None:
    """Continue from last.pth, refusing one written by another run."""
    try:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QuantbenchError(f"cannot resume: {last_path} is unreadable ({cause(e)})") from e
    if state["meta"]["recipe"] != meta["recipe"]:
        raise QuantbenchError(f"cannot resume: {last_path} was written by another recipe "
                              f"({state['meta']['recipe']['name']}, {state['meta']['recipe']['epochs']} epochs)")
    # else a traceback, or a run that silently continues another one
    for key, what in (("arch", "architecture"), ("model", "model"), ("classes", "classes"), ("seed", "seed"),
                      ("source_sha256", "source checkpoint (by content)"), ("flow", "flow"),
                      ("qconfig", "quantization configuration")):
        if state["meta"].get(key) != meta.get(key):
            was, now = state["meta"].get(key), meta.get(key)
            if key == "source_sha256":
                was, now = f"{state['meta'].get('qat_of')} ({str(was)[:12]})", f"{meta.get('qat_of')} ({str(now)[:12]})"
            elif key == "qconfig":
                was, now = (was or {}).get("name"), (now or {}).get("name")
            raise QuantbenchError(f"cannot resume: {last_path} was written with another {what}: {was!r}, "
                                  f"not {now!r}; use another output folder or drop --resume")
    st.model.load_state_dict(state["model"])
    st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    if state.get("ema") is not None:
        st.ema = _make_ema(st.model, recipe)
        st.ema.load_state_dict(state["ema"])
    st.start_epoch, st.best_acc, st.history = state["epoch"] + 1, state["best_acc"], state["history"]
    st.elapsed0 = st.history[-1]["elapsed_s"] if st.history else 0.0


def _train_epoch(st: _State, net: nn.Module, batches: Batches, criterion, epoch: int, recipe: Recipe, seed: int,
                 device: str, mf, set_mode, progress: bool) -> dict:
    """One pass over the training batches; returns the epoch's loss and accuracy."""
    batches.set_epoch(epoch)
    torch.manual_seed(seed * 1_000_003 + epoch)  # dropout etc.: a function of the epoch
    if set_mode is None:
        net.train()
    else:
        set_mode(st.model, True)
    loss_sum = correct = seen = 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", leave=False, disable=not progress)
    for x, y in bar:
        x, y = x.to(device, memory_format=mf), y.to(device)
        logits = net(x)
        loss = criterion(logits, y)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        st.sched.step()
        if st.ema is not None:
            st.ema.update_parameters(st.model)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
    if not math.isfinite(loss_sum):
        raise QuantbenchError(f"training diverged at epoch {epoch} (loss is not finite); lower the learning rate")
    return {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
            "lr": st.opt.param_groups[0]["lr"], "images": seen}


def _end_epoch(st: _State, eval_model: nn.Module, row: dict, data: Dataset, recipe: Recipe, output: Path,
               meta: dict, set_mode, writer, elapsed: float, progress: bool) -> None:
    """Evaluate, then write best.pth, last.pth, the metrics line and TensorBoard scalars."""
    epoch = row["epoch"]
    if set_mode is not None:
        set_mode(eval_model, False)
    test_acc = accuracy(eval_model, data, channels_last=recipe.channels_last, progress=progress,
                        desc=f"eval {epoch}", set_eval=set_mode is None)
    row.update(test_acc=test_acc, elapsed_s=elapsed, ema=st.ema is not None)
    improved = test_acc > st.best_acc
    if improved:
        st.best_acc = test_acc
    # time to accuracy: the best so far, and the training time it took to get there
    best_at = elapsed if improved else next((h["elapsed_s"] for h in st.history if h["test_acc"] == st.best_acc),
                                           elapsed)
    row.update(best_test_acc=st.best_acc, best_at_s=round(best_at, 1))
    st.history.append(row)
    if improved:
        save_checkpoint(output / "best.pth", eval_model,
                        {**meta, "epochs": epoch, "test_acc": test_acc, "log": st.history})
    save_torch({"model": st.model.state_dict(), "optimizer": st.opt.state_dict(),
                "scheduler": st.sched.state_dict(), "ema": st.ema.state_dict() if st.ema is not None else None,
                "epoch": epoch, "best_acc": st.best_acc, "history": st.history, "meta": meta}, output / "last.pth")
    # The metrics line comes after the checkpoint: a resumed run rewrites any line past it.
    with open(output / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    for k in ("train_loss", "train_acc", "test_acc", "lr"):
        writer.add_scalar(k, row[k], epoch)
    writer.flush()
    print(f"epoch {epoch}/{recipe.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%  "
          f"test {test_acc:.2f}%  ({row['epoch_s']:.0f} s)", flush=True)


def _make_ema(model: nn.Module, r: Recipe) -> AveragedModel:
    # use_buffers=True averages batch-norm running statistics too, so the EMA model is usable as is.
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(r.ema_decay), use_buffers=True)


def _write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl as the checkpoint we continue from knows it: its history holds every epoch,
    whereas the file may lack the last one (killed between the checkpoint and the append) or
    end in a half-written line. A fresh run starts it empty."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in history))
