"""Top-1 accuracy on the test split, for any callable model (nn.Module, TorchScript, compiled).

A split read through a pretrained model's preprocessing (data.LazyImages) streams: each batch is
decoded in threads while the one before it runs through the model, so memory holds two batches,
whatever the number of images; the progress bar shows images/s and the time left."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
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


# Images per evaluation batch at most, in pixels: the activations of a batch grow with H x W, so
# the default 500 images at 32x32 become 41 at 224x224 (ResNet-18's first activation at batch 500
# and 224 is 1.6 GB: a measuring worker reached 3.8 GB). Predictions do not depend on it.
EVAL_PIXELS = 2 ** 21


def batch_for(input_shape, batch_size: int) -> int:
    """`batch_size`, or fewer images where they are large (EVAL_PIXELS)."""
    from .data import images_per_batch
    return images_per_batch(input_shape, batch_size, EVAL_PIXELS)


@torch.inference_mode()
def predict(model: Callable[[torch.Tensor], torch.Tensor], data: Dataset, batch_size: int = 500,
            indices: list[int] | None = None, channels_last: bool = False, progress: bool = True,
            desc: str = "eval", limit: int | None = None, set_eval: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(each image's arg-max class, its label), int64, for the test images `indices` (all: None),
    in batches of `batch_size` images, or fewer where they are large (batch_for)."""
    if set_eval and isinstance(model, torch.nn.Module):
        model.eval()
    split = data.test if indices is None else Split(data.test.images[indices], data.test.labels[indices])
    preds, labels = [], []
    batches = Batches(split, batch_for(data.input_shape, batch_size), data.mean, data.std, limit=limit)
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


# ---------------------------------------------------------------- predictions measured before
PREDICTIONS_FORMAT = "1"
# What in a sidecar decides which images a file sees and how, and which row it is (two rows of
# the same bytes, as in tests, are measured each), not when or how fast it was made.
_INPUT_FIELDS = ("normalize_mean", "normalize_std", "image_size", "preprocess", "classes", "num_classes",
                 "input_shape", "label", "dtype", "runtime")
# Sidecar fields that change each time a file is made, whatever it holds.
_VOLATILE = ("file", "source_checkpoint", "created", "export_s", "quantize_s")
_ANSWER = ("accuracy", "n", "total", "indices", "predictions", "labels")


def _versions() -> dict:
    """The packages a file's predictions could change with (those installed), and the CPU kind:
    its model and whether it has VNNI and bf16 (int8 kernels differ by instruction set, and a
    cache folder may be shared between machines)."""
    import platform
    from importlib import metadata

    from . import cpu
    out = {"machine": platform.machine(), "cpu": cpu.cpu_model(), "vnni": cpu.has_vnni(), "bf16": cpu.has_bf16()}
    for name in ("torch", "onnxruntime", "openvino", "executorch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class PredictionMemo:
    """One deployment file's per-image predictions on one question (the measuring worker's
    accuracy answer), kept on disk beside the decoded images (DataSource.image_cache/predictions/),
    keyed by the sha256 of the file's content (with its companions; for an fp32 file made from a
    checkpoint, what made it: see __init__), what its sidecar says about its input, the data's fingerprint (DataSource.fingerprint: identity, preprocessing, every test
    file's size and time), the question (subset size, seed, batch size) and the package versions.
    A file measured before (the fp32 model, every run on the same weights; each file of
    `replicate --resume`) is then not evaluated again: bench records where the figure came from.
    Off when the image cache is off."""

    def __init__(self, path, source, question: dict):
        self.file: Path | None = None
        self.cache = source.cache()
        if self.cache is None:
            return
        import json

        from . import runtimes
        from .export import read_sidecar
        from .fileio import sha256
        path = Path(path)
        h = hashlib.sha256(f"predictions:{PREDICTIONS_FORMAT}".encode())
        side = read_sidecar(path)
        if side.get("dtype") == "fp32" and side.get("source_sha256"):
            # An fp32 file is a function of what made it (the checkpoint's sha256, the target, the
            # runtime and its options, the pruning...): its bytes are not, TorchScript writes a new
            # serialization id each time, so the fp32 row of every run on the same weights has
            # other bytes and the same predictions.
            made = {k: v for k, v in side.items() if k not in _VOLATILE}
            h.update(("made:" + json.dumps(made, sort_keys=True, default=str)).encode())
        else:
            for f in sorted(runtimes.for_path(path).files(path)):
                if f.is_file():
                    h.update(f"{f.suffix}:{sha256(f)}\n".encode())
        h.update(json.dumps({k: side.get(k) for k in _INPUT_FIELDS}, sort_keys=True, default=str).encode())
        h.update(source.fingerprint().encode())
        h.update(json.dumps({**question, **_versions()}, sort_keys=True, default=str).encode())
        self.file = Path(source.image_cache) / "predictions" / f"{h.hexdigest()[:32]}.json"

    def get(self) -> dict | None:
        """The answer measured before, or None (none, or unreadable: then it is measured)."""
        if self.file is None:
            return None
        from .fileio import read_json
        try:
            a = read_json(self.file)
        except (OSError, ValueError):
            return None
        ok = (isinstance(a, dict) and all(k in a for k in _ANSWER) and isinstance(a["n"], int)
              and len(a["indices"]) == len(a["predictions"]) == len(a["labels"]) == a["n"])
        return {k: a[k] for k in _ANSWER} if ok else None

    def put(self, answer: dict) -> None:
        if self.file is None:
            return
        import json
        import warnings

        from .fileio import write_text
        try:
            write_text(self.file, json.dumps({k: answer[k] for k in _ANSWER}, separators=(",", ":")))
            if self.cache is not None:
                self.cache.evict(keep=self.file)  # the image cache's cap covers the predictions too
        except (QuantbenchError, OSError, KeyError) as e:
            warnings.warn(f"predictions not kept for reuse: {e}", stacklevel=2)
