"""Stage 1 of the pipeline: the dataset.

Images are decoded once into one uint8 tensor per split (N, 3, H, W) and cached, so that an
epoch on 2 CPU cores is spent in the model, not in JPEG decoding. Augmentation then runs on
whole batches of tensors.

Two sources:
- `data_dir`: an ImageFolder tree with `train/` and `test/` (or `val/`), e.g. the offline
  CIFAR-10 JPEG copy;
- otherwise `torchvision.datasets.CIFAR10(download=True)` under `data_root`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import QuantbenchError
from .fileio import save_torch

# The original's normalization (RECIPE.md); also used for ImageFolder data.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
CACHE_VERSION = "1"


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, 3, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    classes: list[str]
    test: Split
    train: Split | None = None
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset(data_dir: str | os.PathLike | None = None, data_root: str | os.PathLike = "./data",
                 train: bool = True, image_size: int = 32, progress: bool = True) -> Dataset:
    """Load the test split (and the train split if `train`) as uint8 tensors."""
    if data_dir is not None:
        return _load_image_folder(Path(data_dir), train, image_size, progress)
    return _load_cifar10(Path(data_root), train)


# ---------------------------------------------------------------- torchvision CIFAR-10
def _load_cifar10(root: Path, train: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    def split(is_train: bool) -> tuple[Split, list[str]]:
        try:
            ds = CIFAR10(root=str(root), train=is_train, download=True)
        except Exception as e:  # URLError, socket errors, corrupt archive...
            raise QuantbenchError(
                f"could not download CIFAR-10 into {root} ({type(e).__name__}: {e}); "
                "offline? pass --data-dir DIR with an ImageFolder tree (DIR/train, DIR/test)") from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return Split(images, torch.tensor(ds.targets, dtype=torch.int64)), list(ds.classes)

    test, classes = split(False)
    return Dataset(classes=classes, test=test, train=split(True)[0] if train else None,
                   source=f"torchvision CIFAR10 ({root})")


# ---------------------------------------------------------------- ImageFolder + cache
def _load_image_folder(root: Path, train: bool, image_size: int, progress: bool) -> Dataset:
    if not root.is_dir():
        raise QuantbenchError(f"data directory not found: {root}")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise QuantbenchError(f"{root} has no test/ (or val/) folder; expected an ImageFolder tree "
                              "with train/<class>/*.jpg and test/<class>/*.jpg")
    test, classes = _load_split(test_dir, image_size, progress)
    tr = None
    if train:
        if not (root / "train").is_dir():
            raise QuantbenchError(f"{root} has no train/ folder")
        tr, train_classes = _load_split(root / "train", image_size, progress)
        if train_classes != classes:
            raise QuantbenchError(f"train/ and {test_dir.name}/ of {root} have different class folders")
    return Dataset(classes=classes, test=test, train=tr, source=str(root.resolve()))


def _scan(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class folders in sorted order (ImageFolder's convention) and (file, label) pairs."""
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise QuantbenchError(f"{split_dir} has no class folders")
    samples = []
    for label, c in enumerate(classes):
        files = sorted(e.path for e in os.scandir(split_dir / c)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise QuantbenchError(f"class folder {split_dir / c} holds no images")
        samples += [(Path(f), label) for f in files]
    return classes, samples


def _cache_key(split_dir: Path, samples, image_size: int) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten."""
    h = hashlib.sha1(f"{CACHE_VERSION}:{image_size}".encode())
    for path, label in samples:
        st = path.stat()
        h.update(f"{path.relative_to(split_dir)}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cache_dir(split_dir: Path) -> Path:
    """Next to the data if we may write there, else in the user's cache directory."""
    local = split_dir.parent / ".quantbench-cache"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantbench"
    tag = hashlib.sha1(str(split_dir.parent.resolve()).encode()).hexdigest()[:12]
    return base / tag


def _decode(args) -> np.ndarray:
    path, size = args
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as e:
        raise QuantbenchError(f"cannot read image {path}: {e}") from e


def _load_split(split_dir: Path, image_size: int, progress: bool) -> tuple[Split, list[str]]:
    classes, samples = _scan(split_dir)
    key = _cache_key(split_dir, samples, image_size)
    cache = _cache_dir(split_dir) / f"{split_dir.name}-{key}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return Split(blob["images"], blob["labels"]), blob["classes"]
        except Exception:
            pass  # unreadable cache: decode again and overwrite it
    from tqdm import tqdm

    jobs = [(p, image_size) for p, _ in samples]
    workers = min(os.cpu_count() or 1, 8)
    with Pool(workers) if workers > 1 and len(jobs) > 2000 else _Serial() as pool:
        it = pool.imap(_decode, jobs, chunksize=256)
        arrays = list(tqdm(it, total=len(jobs), desc=f"decoding {split_dir.name}/", unit="img",
                           disable=not progress, leave=False))
    split = Split(torch.from_numpy(np.stack(arrays)), torch.tensor([l for _, l in samples]))
    for old in cache.parent.glob(f"{split_dir.name}-*.pt"):  # drop stale caches of this split
        old.unlink(missing_ok=True)
    save_torch({"images": split.images, "labels": split.labels, "classes": classes}, cache)
    return split, classes


class _Serial:
    """Stand-in for multiprocessing.Pool on small folders (no process start-up cost)."""
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def imap(self, fn, jobs, chunksize=1): return map(fn, jobs)


# ---------------------------------------------------------------- batches and augmentation
def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float, the same as ToTensor() + Normalize(mean, std)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float().div_(255) - m) / s


def augment_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding + horizontal flip, for a whole float batch at once."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def _seed_transform():
    """The original's training transforms (RECIPE.md), on uint8 tensors, one image at a time."""
    from torchvision.transforms import v2
    return v2.Compose([v2.RandomResizedCrop(32, scale=(0.8, 1.0), antialias=True),
                       v2.RandomRotation(30), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(0.4, 0.2, 0.2, 0.2)])


AUGMENTATIONS = ("none", "crop-flip", "seed")


class Batches:
    """Yields (images, labels) float batches from a Split, one pass per call to iter().

    Order and augmentation are a function of (seed, epoch) only, so a resumed run sees exactly
    the batches an uninterrupted run would. With `rank`/`world_size` it reads its shard the way
    torch's DistributedSampler does (we use it for that).
    """

    def __init__(self, split: Split, batch_size: int, mean, std, augment: str = "none",
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 limit: int | None = None, min_batch: int = 1):
        if augment not in AUGMENTATIONS:
            raise QuantbenchError(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTATIONS)}")
        from torch.utils.data import DistributedSampler
        self.split, self.batch_size, self.mean, self.std = split, batch_size, mean, std
        self.augment, self.seed, self.limit, self.min_batch = augment, seed, limit, min_batch
        self.sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self.epoch = 0
        self._seed_tf = _seed_transform() if augment == "seed" else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def _indices(self) -> list[int]:
        idx = list(self.sampler)
        return idx[: self.limit] if self.limit else idx

    def __len__(self) -> int:
        return -(-len(self._indices()) // self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        idx = torch.tensor(self._indices(), dtype=torch.int64)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size]
            if len(b) < self.min_batch:
                break  # e.g. a last batch of 1 image: batch norm cannot train on it
            images, labels = self.split.images[b], self.split.labels[b]
            if self._seed_tf is not None:
                # torchvision's v2 transforms draw from torch's global RNG: seed it per batch.
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                images = torch.stack([self._seed_tf(im) for im in images])
            x = normalize(images, self.mean, self.std)
            if self.augment == "crop-flip":
                x = augment_crop_flip(x, gen)
            yield x, labels


# ---------------------------------------------------------------- where the data is
@dataclass(frozen=True)
class DataSource:
    """Where the images come from: an ImageFolder tree (`dir`), else torchvision's CIFAR-10
    downloaded under `root`. One value, passed down to every stage that reads images (training,
    calibration, and the measuring workers' accuracy runs), so they all see the same data."""
    dir: Path | None = None
    root: Path = Path("data")

    def __post_init__(self):
        object.__setattr__(self, "dir", Path(self.dir) if self.dir is not None else None)
        object.__setattr__(self, "root", Path(self.root))

    def load(self, train: bool = True, progress: bool = True) -> Dataset:
        return load_dataset(self.dir, self.root, train=train, progress=progress)
