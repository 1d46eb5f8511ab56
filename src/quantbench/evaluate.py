"""Top-1 accuracy on the test split, for any callable model (nn.Module, TorchScript, compiled).

A split read through a pretrained model's preprocessing (data.LazyImages) streams: each batch is
decoded in threads while the one before it runs through the model, so memory holds two batches,
whatever the number of images; the progress bar shows images/s and the time left."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from .data import Batches, Dataset, Split
from .errors import QuantbenchError

EVAL_SEED = 0  # the seed of --eval-samples' subset: every row, every run, the same images


def eval_subset(total: int, samples: int | None, seed: int = EVAL_SEED) -> list[int] | None:
    """The test images an accuracy figure rests on, in split order: None for all of them, else
    `samples` of the `total` drawn with `seed` (the same images for every model and run)."""
    if samples is not None and samples < 1:
        raise QuantbenchError(f"--eval-samples must be at least 1, not {samples}")
    if samples is None or samples >= total:
        return None
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=gen)[:samples].tolist())


@torch.inference_mode()
def predict(model: Callable[[torch.Tensor], torch.Tensor], data: Dataset, batch_size: int = 500,
            indices: list[int] | None = None, channels_last: bool = False, progress: bool = True,
            desc: str = "eval", limit: int | None = None, set_eval: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(each image's arg-max class, its label), int64, for the test images `indices` (all: None)."""
    if set_eval and isinstance(model, torch.nn.Module):
        model.eval()
    split = data.test if indices is None else Split(data.test.images[indices], data.test.labels[indices])
    preds, labels = [], []
    batches = Batches(split, batch_size, data.mean, data.std, limit=limit)
    n = min(len(split), limit) if limit else len(split)
    with tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress, smoothing=0.1) as bar:
        for x, y in batches:  # images/s and the time left on the bar
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            preds.append(model(x).argmax(1).to(torch.int64))
            labels.append(y)
            bar.update(len(y))
    if not preds:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], data: Dataset, batch_size: int = 500,
             channels_last: bool = False, progress: bool = True, desc: str = "eval",
             limit: int | None = None, set_eval: bool = True) -> float:
    """Percent of test images whose arg-max logit is the label. Batch size does not change it."""
    preds, labels = predict(model, data, batch_size, channels_last=channels_last, progress=progress, desc=desc,
                            limit=limit, set_eval=set_eval)
    return 100.0 * (preds == labels).sum().item() / max(len(labels), 1)


@dataclass
class Evaluation:
    accuracy: float   # top-1, percent
    n: int            # the images it rests on
    total: int        # the test split's images


def evaluate(path, source, batch_size: int = 500, progress: bool = True, model_spec: str | None = None,
             samples: int | None = None) -> Evaluation:
    """Accuracy of an fp32 checkpoint (.pth) or of a deployment file, on `source`'s test split
    (a quantbench.data.DataSource) loaded as the model expects it: its image size and
    normalization, checked against its classes; on a seeded subset of `samples` images if given."""
    from pathlib import Path

    from . import runtimes
    from .export import read_sidecar
    from .models import load_checkpoint, read_checkpoint

    path = Path(path)
    if runtimes.deployment_kind(path) is None:  # an fp32 checkpoint
        _, meta = read_checkpoint(path)
        data = source.load_for(meta, f"checkpoint {path}", train=False, progress=progress)
        model, _ = load_checkpoint(path, num_classes=data.num_classes, model=model_spec)
    else:
        model = runtimes.load(path)
        data = source.load_for(read_sidecar(path), str(path), train=False, progress=progress)
    idx = eval_subset(len(data.test), samples)
    preds, labels = predict(model, data, batch_size, indices=idx, progress=progress)
    return Evaluation(100.0 * (preds == labels).sum().item() / max(len(labels), 1), len(labels), len(data.test))


def evaluate_file(path, source, batch_size: int = 500, progress: bool = True, model_spec: str | None = None,
                  samples: int | None = None) -> float:
    """evaluate()'s accuracy alone (percent)."""
    return evaluate(path, source, batch_size, progress, model_spec, samples).accuracy
