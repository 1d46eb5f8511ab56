"""Top-1 accuracy on the test split, for any callable model (nn.Module, TorchScript, compiled).

A split read through a pretrained model's preprocessing (data.LazyImages) streams: each batch is
decoded in threads while the one before it runs through the model, so memory holds two batches,
whatever the number of images; the progress bar shows images/s and the time left."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from .data import Batches, Dataset


@torch.inference_mode()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], data: Dataset, batch_size: int = 500,
             channels_last: bool = False, progress: bool = True, desc: str = "eval",
             limit: int | None = None, set_eval: bool = True) -> float:
    """Percent of test images whose arg-max logit is the label. Batch size does not change it."""
    if set_eval and isinstance(model, torch.nn.Module):
        model.eval()
    correct = total = 0
    batches = Batches(data.test, batch_size, data.mean, data.std, limit=limit)
    n = min(len(data.test), limit) if limit else len(data.test)
    with tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress, smoothing=0.1) as bar:
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
            bar.update(len(y))
    return 100.0 * correct / max(total, 1)


def evaluate_file(path, source, batch_size: int = 500, progress: bool = True, model_spec: str | None = None) -> float:
    """Accuracy of an fp32 checkpoint (.pth) or of a deployment file, on `source`'s test split
    (a quantbench.data.DataSource) loaded as the model expects it: its image size and
    normalization, checked against its classes."""
    from pathlib import Path

    from . import runtimes
    from .export import read_sidecar
    from .models import load_checkpoint, read_checkpoint

    path = Path(path)
    if runtimes.deployment_kind(path) is None:  # an fp32 checkpoint
        _, meta = read_checkpoint(path)
        data = source.load_for(meta, f"checkpoint {path}", train=False, progress=progress)
        model, _ = load_checkpoint(path, num_classes=data.num_classes, model=model_spec)
        return accuracy(model, data, batch_size, progress=progress)
    model = runtimes.load(path)
    data = source.load_for(read_sidecar(path), str(path), train=False, progress=progress)
    return accuracy(model, data, batch_size, progress=progress)
