"""Shared fixtures: a tiny 3-class ImageFolder and tiny resnet10 checkpoints.

Everything here is small enough for 2 CPU cores: 3 classes x (16 train + 8 test) 32x32 images,
and the resnet10 architecture (one BasicBlock per stage).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantbench import models

# The tests are small: more threads only fight over the 2 cores. Override with QUANTBENCH_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("QUANTBENCH_TEST_THREADS", "1")))

TINY_CLASSES = ("blue", "green", "red")  # already sorted, so label i <-> TINY_CLASSES[i]
TINY_TRAIN_PER_CLASS = 16
TINY_TEST_PER_CLASS = 8
_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def write_tiny_image_folder(root: Path, train_per_class: int = TINY_TRAIN_PER_CLASS,
                            test_per_class: int = TINY_TEST_PER_CLASS, seed: int = 0) -> Path:
    """Write root/{train,test}/<class>/*.jpg: noisy 32x32 images whose dominant colour is the class.

    The last test image of every class is a PNG, so both decoders are exercised.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in TINY_CLASSES:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array(_COLOURS[c], dtype=np.int16)
                px = np.clip(base + rng.integers(-40, 41, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                im = Image.fromarray(px, "RGB")
                if split == "test" and i == n - 1:
                    im.save(d / f"{i:03d}.png")
                else:
                    im.save(d / f"{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A session-wide tiny ImageFolder tree (train/ and test/, classes blue/green/red).

    Read-only by convention: tests that add, change or chmod files must use `tiny_data_copy`.
    Its decoded cache lands in <dir>/.quantbench-cache on first load.
    """
    return write_tiny_image_folder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def tiny_data_copy(tiny_data_dir, tmp_path) -> Path:
    """A private copy of `tiny_data_dir` (without its cache) that a test may modify."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_data_dir, dst, ignore=shutil.ignore_patterns(".quantbench-cache"))
    return dst


@pytest.fixture(scope="session")
def tiny_dataset(tiny_data_dir):
    """`quantbench.data.Dataset` of `tiny_data_dir` with both splits (uint8 tensors, 3 classes)."""
    from quantbench.data import load_dataset
    return load_dataset(tiny_data_dir, progress=False)


def tiny_meta(arch: str = "resnet10", num_classes: int = len(TINY_CLASSES)) -> dict:
    """The meta a checkpoint written by quantbench.train carries (the fields readers rely on)."""
    from quantbench.data import CIFAR10_MEAN, CIFAR10_STD
    return {"arch": arch, "num_classes": num_classes, "classes": list(TINY_CLASSES[:num_classes]),
            "normalize_mean": list(CIFAR10_MEAN), "normalize_std": list(CIFAR10_STD), "seed": 0}


def make_checkpoint(path: Path, arch: str = "resnet10", num_classes: int = len(TINY_CLASSES),
                    seed: int = 0) -> Path:
    """Save a freshly initialised model (non-trivial BN statistics) as a quantbench checkpoint."""
    torch.manual_seed(seed)
    model = models.build(arch, num_classes)
    # Give batch norm non-default running statistics, so a load that drops buffers shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    models.save_checkpoint(path, model.eval(), meta=tiny_meta(arch, num_classes))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained fp32 resnet10 checkpoint for the 3 tiny classes ({"state_dict", "meta"} format).

    Untrained, so accuracy is near chance: use `tiny_trained_checkpoint` when it matters.
    """
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet10.pth")


@pytest.fixture(scope="session")
def tiny_train_run(tiny_data_dir, tmp_path_factory) -> Path:
    """Output folder of `quantbench train --preset smoke --arch resnet10 --epochs 2` on the tiny data.

    Holds last.pth, best.pth, metrics.jsonl and tensorboard/; a few seconds to make, once per session.
    """
    from quantbench.cli import main
    out = tmp_path_factory.mktemp("train") / "run"
    rc = main(["train", "--data-dir", str(tiny_data_dir), "--preset", "smoke", "--arch", "resnet10",
               "--epochs", "2", "--output", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def tiny_trained_checkpoint(tiny_train_run) -> Path:
    """best.pth of `tiny_train_run`: a trained fp32 resnet10 checkpoint for the tiny data."""
    return tiny_train_run / "best.pth"


@pytest.fixture(autouse=True)
def _image_cache(tmp_path_factory, monkeypatch):
    """Decoded-image shards (data.ImageCache) and kept predictions (evaluate.PredictionMemo) go to
    a folder of each test's own, never to the user's ~/.cache nor to another test's (worker
    subprocesses inherit it)."""
    from quantbench.data import IMAGE_CACHE_ENV
    monkeypatch.setenv(IMAGE_CACHE_ENV, str(tmp_path_factory.mktemp("image-cache")))
