"""Stage 1 of the pipeline: the dataset.

Images are decoded once into one uint8 tensor per split (N, 3, H, W) and cached, so that an
epoch on 2 CPU cores is spent in the model, not in JPEG decoding. Augmentation then runs on
whole batches of tensors.

Two sources:
- `data_dir`: an ImageFolder tree with `train/` and `test/` (or `val/`): one folder per class,
  any number of classes, class index = position in the sorted folder names (torchvision's
  convention). Any image Pillow reads (JPEG, PNG, BMP, WebP, TIFF, GIF, PPM/PGM) in any mode
  (grayscale, palette, RGBA, CMYK, 16-bit) becomes 3-channel 8-bit RGB, see `_to_rgb`;
- otherwise `torchvision.datasets.CIFAR10(download=True)` under `data_root`.

Image size: by default the data's own size, which all images of both splits must share
(non-square (H, W) is kept as it is); `image_size=N` resizes every image to N x N instead.

Normalization: a model is trained on `(pixel/255 - mean) / std`, so whoever evaluates or
quantizes it later must use the same mean and std. `load_dataset` computes them from the
training split (or takes them from the caller: a checkpoint's recorded values) and says where
they came from in `Dataset.norm_source`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import numbers
import os
import re
import signal
import stat
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import QuantbenchError
from .fileio import atomic_path, save_torch

# The original's normalization (RECIPE.md): used for torchvision's CIFAR-10, and for an
# ImageFolder's test split when no train/ split exists to compute statistics from.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff", ".gif")
# Transparent pixels are composited onto this colour. White, because transparent images (icons,
# product photos, scans) are made to be seen on a white page; see _to_rgb.
ALPHA_BACKGROUND = (255, 255, 255)
CACHE_VERSION = "2"  # 2: native image size, statistics in the cache, alpha composited
POOL_MIN_IMAGES = 2000  # fewer images decode faster in this process than a pool starts
POOL_MAX_WORKERS = 8

# Where Dataset.mean/std came from.
NORM_TRAIN, NORM_GIVEN, NORM_CIFAR10 = "train split", "given", "cifar10 default"
NORM_WEIGHTS = "the weights' preprocessing"
# A folder with only val/ (ImageNet's usual download): calibration images are this many (at most
# a fifth) of val, drawn by VAL_HOLDOUT_SEED and kept apart from the images accuracy is measured on.
VAL_CALIB_IMAGES = 1000
VAL_HOLDOUT_SEED = 0


@dataclass(frozen=True)
class Preprocess:
    """A pretrained model's own preprocessing (torchvision's ImageClassification transforms,
    timm's data config): resize the shorter side to `resize` (None: no resize), center-crop
    `crop` x `crop`, then (pixel/255 - mean) / std. Images of any size and aspect ratio become
    the model's input this way. Recorded as a dict in checkpoint meta and sidecars."""
    crop: int
    resize: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        from .record import check_preprocess
        check_preprocess(self.to_dict(), "preprocessing")

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d, where: str = "preprocessing") -> "Preprocess":
        from .record import check_preprocess
        d = check_preprocess(d, where)
        return cls(crop=d["crop"], resize=d.get("resize"), interpolation=d.get("interpolation", "bilinear"),
                   mean=tuple(d["mean"]), std=tuple(d["std"]))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def key(self) -> str:
        """A short name of what the pixels go through (cache names)."""
        return f"r{self.resize or 0}c{self.crop}{self.interpolation[:3]}"

    def apply(self, im: Image.Image) -> Image.Image:
        """Resize the shorter side (keeping the aspect ratio), then center-crop, as torchvision's
        Resize(int) + CenterCrop do (sizes truncated, crop offsets rounded; an image smaller than
        the crop is padded with black)."""
        resample = getattr(Image.Resampling, self.interpolation.upper())
        w, h = im.size
        if self.resize is not None and min(w, h) != self.resize:
            if w <= h:
                nw, nh = self.resize, int(self.resize * h / w)
            else:
                nw, nh = int(self.resize * w / h), self.resize
            im = im.resize((nw, nh), resample)
        w, h = im.size
        c = self.crop
        if w < c or h < c:
            canvas = Image.new("RGB", (max(w, c), max(h, c)))
            canvas.paste(im, ((max(w, c) - w) // 2, (max(h, c) - h) // 2))
            im, (w, h) = canvas, canvas.size
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        return im.crop((left, top, left + c, top + c))


@dataclass
class Split:
    images: torch.Tensor | LazyImages  # uint8, (N, 3, H, W); LazyImages: decoded per batch
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


DECODE_THREADS = 8   # Pillow decodes and resizes with the GIL released: threads decode in parallel


def _decode_preprocessed(path: Path, pre: "Preprocess") -> np.ndarray:
    """One image file -> uint8 (3, crop, crop) through the model's own preprocessing."""
    try:
        with Image.open(path) as im:
            return np.asarray(pre.apply(_to_rgb(im)), dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as e:
        raise QuantbenchError(f"cannot read image {path}: {e}") from e


# The decoded-image cache: images read through a model's preprocessing (LazyImages), stored at
# the model's input size as uint8 [n, 3, crop, crop] shards of SHARD_IMAGES consecutive images of
# the split being read (.npy, read back memory-mapped), so that every later reader of the same
# images (the other rows' measuring workers, the next run) copies them instead of decoding.
SHARD_IMAGES = 512          # 512 x 147 KiB = 74 MiB per shard at 224 x 224
SHARD_FORMAT = "1"          # in every shard's key: bump when decoding changes what a shard holds
PENDING_SHARDS = 2          # shards being filled in memory at once, per split read
IMAGE_CACHE_ENV = "QUANTBENCH_IMAGE_CACHE"   # a folder, or "off"; --image-cache overrides it
IMAGE_CACHE_GB = 10.0       # the default cap: ImageNet's val split at 224 x 224 is 7.0 GiB
_CACHE_OFF = ("off", "none", "no", "0")


def default_image_cache() -> Path | None:
    """$QUANTBENCH_IMAGE_CACHE ("off": no cache), else ~/.cache/quantbench/images
    ($XDG_CACHE_HOME/quantbench/images)."""
    v = os.environ.get(IMAGE_CACHE_ENV)
    if v is not None and v.strip():
        return None if v.strip().lower() in _CACHE_OFF else Path(v).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantbench" / "images"


class ImageCache:
    """A folder of decoded-image shards `KEY.npy`, at most `max_bytes` in all: after each write the
    least recently used shards (oldest modification time; a read touches its shard) are deleted
    until the rest fit. A shard is written whole (temp file + fsync + rename, fileio), so
    concurrent readers and writers (two measuring workers) never see half a shard; two writers of
    the same shard write the same bytes, the last rename wins. A shard that does not read back
    with the shape it should have (truncated, corrupt) is deleted and made again. A folder that
    cannot be written (or a full disk) turns the cache off for this process, with one warning."""

    def __init__(self, root: str | os.PathLike, max_gb: float = IMAGE_CACHE_GB):
        self.root, self.max_bytes = Path(root), int(max_gb * 2**30)
        self.broken = False

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def read(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The shard memory-mapped (read-only), or None when absent or unusable (then removed)."""
        path = self.path(key)
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except OSError:  # absent, or the folder is unusable (write() says so)
            return None
        except (ValueError, EOFError):  # truncated (shorter than its header says), not .npy
            self._drop(path)
            return None
        if a.shape != tuple(shape) or a.dtype != np.uint8:
            del a
            self._drop(path)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return a

    @staticmethod
    def _drop(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass

    def write(self, key: str, images: np.ndarray) -> None:
        if self.broken:
            return
        path = self.path(key)
        try:
            with atomic_path(path, nbytes=images.nbytes) as tmp, open(tmp, "wb") as f:
                np.save(f, images, allow_pickle=False)
            self.evict(keep=path)
        except (QuantbenchError, OSError) as e:
            self.broken = True
            warnings.warn(f"decoded-image cache {self.root} turned off for this run: {e}", stacklevel=2)

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._shards())

    def _shards(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every shard, and of the predictions kept beside them
        (evaluate.PredictionMemo, in predictions/): the cap covers both."""
        out = []
        for folder, suffix in ((self.root, ".npy"), (self.root / "predictions", ".json")):
            try:
                with os.scandir(folder) as entries:
                    for e in entries:
                        if e.name.endswith(suffix) and not e.name.startswith("."):  # .NAME.tmp: being written
                            try:
                                st = e.stat()
                            except OSError:
                                continue
                            out.append((st.st_mtime, st.st_size, Path(e.path)))
            except OSError:
                continue
        return out

    def evict(self, keep: Path) -> None:
        """Delete the least recently used files until the rest fit the cap (never `keep`)."""
        shards = self._shards()
        total = sum(size for _, size, _ in shards)
        for _, size, p in sorted(shards):
            if total <= self.max_bytes:
                break
            if p != keep:
                self._drop(p)  # a reader that has it mapped keeps its pages
                total -= size


class LazyImages:
    """uint8 images (N, 3, crop, crop) of a split, decoded from their files when a batch asks
    for them (through the model's own preprocessing), never all at once: memory does not grow
    with the split. With an ImageCache, images come from its shards where it has them, and
    every shard of this view whose images have all been decoded is written there (a streaming
    read holds at most PENDING_SHARDS shards in memory meanwhile: 147 MiB at 224 x 224). Indexing with one number gives that image; with indices, slices or a mask,
    a view of those images (still undecoded); `take(indices)` decodes a batch, in threads."""

    def __init__(self, paths: Sequence[Path], preprocess: "Preprocess", index: np.ndarray | None = None,
                 cache: ImageCache | None = None):
        self.paths, self.preprocess, self.cache = paths, preprocess, cache
        self.index = np.arange(len(paths)) if index is None else np.asarray(index, dtype=np.int64)
        self._keys: dict[int, str] = {}
        self._pending: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.index), *self.preprocess.input_shape)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, numbers.Integral):
            return self.take([int(i)])[0]
        if isinstance(i, torch.Tensor):
            i = i.numpy()
        return LazyImages(self.paths, self.preprocess, self.index[i], self.cache)

    def files(self, idx) -> list[Path]:
        return [self.paths[j] for j in self.index[np.asarray(idx, dtype=np.int64)]]

    def take(self, idx) -> torch.Tensor:
        """The images at `idx` (positions in this view) as one uint8 tensor: copied from the
        decoded-image cache where it holds their shard, else decoded now, in threads."""
        idx = np.asarray(idx.numpy() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.preprocess.input_shape), dtype=np.uint8)
        if self.cache is None or self.cache.broken:
            self._decode_into(out, idx)
            return torch.from_numpy(out)
        with self._lock:
            shards = idx // SHARD_IMAGES
            missing = []
            for s in np.unique(shards):
                at = np.nonzero(shards == s)[0]
                shard = self.cache.read(self._key(int(s)), self._shard_shape(int(s)))
                if shard is None:
                    missing.append(at)
                    continue
                out[at] = shard[idx[at] - s * SHARD_IMAGES]
                del shard  # unmapped: what was read leaves this process's memory
            if missing:
                at = np.concatenate(missing)
                self._decode_into(out, idx[at], at)
                self._keep(idx[at], out[at])
        return torch.from_numpy(out)

    def _decode_into(self, out: np.ndarray, idx: np.ndarray, at: np.ndarray | None = None) -> None:
        """Decode the images at view positions `idx` into out[at] (at: 0..len(idx)-1)."""
        files = self.files(idx)
        at = np.arange(len(idx)) if at is None else at

        def one(k: int) -> None:
            out[at[k]] = _decode_preprocessed(files[k], self.preprocess)
        if len(files) > 1:
            list(_decode_pool().map(one, range(len(files))))
        else:
            for k in range(len(files)):
                one(k)

    def _shard_shape(self, s: int) -> tuple[int, ...]:
        n = min(SHARD_IMAGES, len(self.index) - s * SHARD_IMAGES)
        return (n, *self.preprocess.input_shape)

    def _key(self, s: int) -> str:
        """Shard `s` of this view: its files (path, size, modification time, in order) and what
        decoding does to them (preprocessing, decoder version, and Pillow's, whose resizing and JPEG
        decoding make the pixels). Any other view of the same files in the same order (another
        process, another run) finds it."""
        if s not in self._keys:
            import PIL
            pre = self.preprocess
            h = hashlib.sha256(f"{SHARD_FORMAT}:{CACHE_VERSION}:{PIL.__version__}:{pre.resize}:{pre.crop}:"
                               f"{pre.interpolation}".encode())
            for j in self.index[s * SHARD_IMAGES:(s + 1) * SHARD_IMAGES]:
                p = self.paths[j]
                try:
                    st = os.stat(p)
                    h.update(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
                except OSError:  # decoding will say what is wrong with it
                    h.update(f"{os.path.abspath(p)}:missing\n".encode())
            self._keys[s] = f"{pre.key()}-{h.hexdigest()[:24]}"
        return self._keys[s]

    def _keep(self, idx: np.ndarray, images: np.ndarray) -> None:
        """Remember decoded images by shard; a shard whose images have all been decoded is
        written to the cache. At most PENDING_SHARDS are held (a streaming read completes them in
        turn; a shuffled one rarely does, and its oldest are dropped)."""
        shards = idx // SHARD_IMAGES
        for s in np.unique(shards):
            s = int(s)
            at = np.nonzero(shards == s)[0]
            if s not in self._pending:
                shape = self._shard_shape(s)
                self._pending[s] = (np.empty(shape, dtype=np.uint8), np.zeros(shape[0], dtype=bool))
            buf, done = self._pending[s]
            rows = idx[at] - s * SHARD_IMAGES
            buf[rows], done[rows] = images[at], True
            self._pending.move_to_end(s)
            if done.all():
                del self._pending[s]
                self.cache.write(self._key(s), buf)
        while len(self._pending) > PENDING_SHARDS:
            self._pending.popitem(last=False)


_POOL = None


def _decode_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(min(os.cpu_count() or 1, DECODE_THREADS), thread_name_prefix="quantbench-decode")
    return _POOL


def images_per_batch(input_shape, most: int, pixels: int) -> int:
    """`most` images a batch, or fewer where they are large: at most `pixels` pixels (H x W) a
    batch, at least one image. What a pass holds at once (activations, a calibrator's outputs)
    grows with H x W: the bound keeps it the same at 224x224 as at 32x32."""
    h, w = int(input_shape[-2]), int(input_shape[-1])
    return max(1, min(int(most), pixels // max(1, h * w)))


def take(images, idx) -> torch.Tensor:
    """images[idx] as a uint8 tensor, from a tensor or from LazyImages (decoded now)."""
    return images.take(idx) if isinstance(images, LazyImages) else images[idx]


@dataclass
class Dataset:
    classes: list[str]
    test: Split
    train: Split | None = None
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    source: str = ""
    info: dict = field(default_factory=dict)
    norm_source: str = NORM_CIFAR10  # NORM_TRAIN, NORM_GIVEN or NORM_CIFAR10

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of every image of both splits: what the model's input must be."""
        return tuple(int(d) for d in self.test.images.shape[1:])


def load_dataset(data_dir: str | os.PathLike | None = None, data_root: str | os.PathLike = "./data",
                 train: bool = True, image_size: int | None = None, progress: bool = True, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 preprocess: Preprocess | None = None, image_cache: ImageCache | None = None) -> Dataset:
    """Load the test split (and the train split if `train`) as uint8 tensors.

    `image_size`: None keeps the images' own size (they must all agree); N resizes to N x N.
    `mean`/`std`: the normalization to use, e.g. a checkpoint's recorded `normalize_mean/std`
    (evaluating, calibrating or fine-tuning a model must use the values it was trained with).
    Without them: statistics of the train split (decoded for this if only the test split is
    asked for and train/ exists), else CIFAR-10's constants (`norm_source` says which).
    `preprocess`: a pretrained model's own (resize shorter side, center crop, its mean and std):
    the splits are then LazyImages, decoded a batch at a time (see _load_lazy_folder), through
    `image_cache` if given (decoded once, read back by every later reader: ImageCache).
    """
    if preprocess is not None and image_size is None:
        if data_dir is None:
            raise QuantbenchError("pretrained weights' preprocessing (resize + crop) needs an ImageFolder "
                                  "(--data-dir), or pass --image-size N to resize CIFAR-10 to N x N")
        ds = _load_lazy_folder(Path(data_dir), train, preprocess, image_cache)
        if mean is not None or std is not None:
            given = _check_norm(mean, std)
            ds.mean, ds.std = given
        ds.info["image_size"] = None
        return ds
    given = _check_norm(mean, std)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
            raise QuantbenchError(f"image size must be a positive whole number of pixels, got {image_size!r}")
        image_size = int(image_size)
    if data_dir is not None:
        ds = _load_image_folder(Path(data_dir), train, image_size, progress, need_stats=given is None)
    else:
        ds = _load_cifar10(Path(data_root), train, image_size)
    if given is not None:
        ds.mean, ds.std, ds.norm_source = given[0], given[1], NORM_GIVEN
    ds.info["image_size"] = image_size  # None: the images' own size
    return ds


def _check_norm(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if mean is None and std is None:
        return None
    try:
        m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError) as e:
        raise QuantbenchError(f"normalization needs both mean and std, 3 numbers each "
                              f"(got mean={mean!r}, std={std!r}: {e})") from e
    if len(m) != 3 or len(s) != 3 or not all(math.isfinite(v) for v in m + s) or min(s) <= 0:
        raise QuantbenchError(f"normalization needs 3 finite means and 3 positive standard deviations "
                              f"(one per RGB channel), got mean={list(m)}, std={list(s)}")
    return m, s


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images (N, C, H, W) / 255.

    Sums of pixel values and of their squares are exact integers (int64), taken a bounded chunk
    of images at a time, so memory stays small and the result does not depend on the chunking.
    """
    n, c = images.shape[:2]
    per_image = max(1, images[0].numel()) if n else 1
    step = max(1, (1 << 22) // per_image)  # about 4M values (32 MiB as int64) per chunk
    total = torch.zeros(c, dtype=torch.int64)
    squares = torch.zeros(c, dtype=torch.int64)
    for i in range(0, n, step):
        x = images[i:i + step].to(torch.int64)
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    count = n * images.shape[2] * images.shape[3] if n else 0
    if count == 0:
        raise QuantbenchError("cannot compute normalization statistics of an empty split")
    mean = [t / (255 * count) for t in total.tolist()]
    var = [q / (255 * 255 * count) - m * m for q, m in zip(squares.tolist(), mean)]
    # A channel that never varies (say, always-black blue) would divide by zero: floor its std
    # at one grey level.
    std = [max(math.sqrt(max(v, 0.0)), 1 / 255) for v in var]
    return tuple(mean), tuple(std)


def check_classes(expected: Sequence[str], data: Dataset, what: str) -> None:
    """Raise a one-line QuantbenchError unless `data.classes` equals `expected`, order included.

    A model's output k means its class k: if a class folder was renamed, added or removed, the
    sorted folder names shift and accuracy is silently scored against the wrong labels. `what`
    names where `expected` came from, e.g. "checkpoint best.pth" (its recorded class names).
    """
    expected, actual = list(expected), list(data.classes)
    if expected == actual:
        return
    exp_set, act_set = set(expected), set(actual)
    i = next(i for i in range(max(len(expected), len(actual)))
             if i >= len(expected) or i >= len(actual) or expected[i] != actual[i])
    e = expected[i] if i < len(expected) else None
    a = actual[i] if i < len(actual) else None
    if e is not None and e not in act_set:
        diff = f"the data lacks class {e!r} ({what}'s class {i})"
    elif a is not None and a not in exp_set:
        diff = f"the data has class {a!r} (its class {i}), which {what} does not know"
    else:
        diff = f"the order differs: {what}'s class {i} is {e!r}, the data's class {i} is {a!r}"
    where = f" {data.source}" if data.source else ""
    raise QuantbenchError(f"classes of {what} ({len(expected)}) and of the data{where} ({len(actual)}) "
                          f"differ: {diff}; rename the class folders back, or use the data the model "
                          "was trained on")


# ---------------------------------------------------------------- torchvision CIFAR-10
def _load_cifar10(root: Path, train: bool, image_size: int | None) -> Dataset:
    from torchvision.datasets import CIFAR10

    def split(is_train: bool) -> tuple[Split, list[str]]:
        try:
            ds = CIFAR10(root=str(root), train=is_train, download=True)
        except Exception as e:  # URLError, socket errors, corrupt archive...
            raise QuantbenchError(
                f"could not download CIFAR-10 into {root} ({type(e).__name__}: {e}); "
                "offline? pass --data-dir DIR with an ImageFolder tree (DIR/train, DIR/test)") from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        if image_size is not None and images.shape[2:] != (image_size, image_size):
            images = _resize(images, image_size)
        return Split(images, torch.tensor(ds.targets, dtype=torch.int64)), list(ds.classes)

    test, classes = split(False)
    # The seed recipe normalizes with the original's constants: keep them for its data.
    return Dataset(classes=classes, test=test, train=split(True)[0] if train else None,
                   source=f"torchvision CIFAR10 ({root})", norm_source=NORM_CIFAR10)


def _resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear (antialiased, like Pillow's) resize of uint8 images, a chunk at a time."""
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ---------------------------------------------------------------- ImageFolder + cache
def _load_image_folder(root: Path, train: bool, image_size: int | None, progress: bool,
                       need_stats: bool) -> Dataset:
    if not root.is_dir():
        raise QuantbenchError(f"data directory not found: {root}")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise QuantbenchError(f"{root} has no test/ (or val/) folder; expected an ImageFolder tree "
                              "with train/<class>/*.jpg and test/<class>/*.jpg")
    train_dir = root / "train"
    if train and not train_dir.is_dir():
        raise QuantbenchError(f"{root} has no train/ folder")
    # The train split is read for training, or for the statistics to normalize a test split
    # that was asked for alone without mean/std.
    use_train = train_dir.is_dir() and (train or need_stats)
    # Both splits' folders are compared before anything is decoded.
    classes, test_samples = _scan(test_dir)
    if use_train:
        train_classes, train_samples = _scan(train_dir)
        if train_classes != classes:
            raise QuantbenchError(f"train/ and {test_dir.name}/ of {root} have different class folders: "
                                  + _class_difference(f"{test_dir.name}/", classes, "train/", train_classes))
    test, _ = _load_split(test_dir, test_samples, image_size, progress)
    ds = Dataset(classes=classes, test=test, source=str(root.resolve()))
    if use_train:
        # Without image_size, train/ images must have the test images' size: it is the model's input.
        ref = None if image_size else (test_samples[0][0], tuple(test.images.shape[2:]))
        # Statistics only: the cached tensor is memory-mapped, not read.
        tr, stats = _load_split(train_dir, train_samples, image_size, progress, ref=ref, mmap=not train)
        ds.train = tr if train else None
        if need_stats:
            ds.mean, ds.std, ds.norm_source = stats[0], stats[1], NORM_TRAIN
    elif need_stats:
        ds.info["norm_note"] = f"{root} has no train/ split to compute statistics from"
    return ds


def _load_lazy_folder(root: Path, train: bool, pre: Preprocess, cache: ImageCache | None = None) -> Dataset:
    """An ImageFolder read through a pretrained model's preprocessing: only the file list is read
    now; images are decoded (resize + crop) when a batch of them is used. With train/ the
    calibration and fine-tuning images come from there; with only val/ (or test/), a seeded
    part of it (VAL_CALIB_IMAGES, at most a fifth) is held out for calibration and accuracy is
    measured on the rest, in every command alike (Dataset.info["calibration_images"] says so)."""
    if not root.is_dir():
        raise QuantbenchError(f"data directory not found: {root}")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise QuantbenchError(f"{root} has no val/ (or test/) folder; expected an ImageFolder tree "
                              "with val/<class>/*.jpg (and optionally train/<class>/*.jpg)")
    classes, test_samples = _scan(test_dir)
    split = lambda samples, idx=None: Split(  # noqa: E731
        LazyImages([p for p, _ in samples], pre, idx, cache),
        torch.tensor([l for _, l in samples], dtype=torch.int64)[torch.from_numpy(idx) if idx is not None else slice(None)])
    ds = Dataset(classes=classes, test=split(test_samples), source=str(root.resolve()), mean=pre.mean,
                 std=pre.std, norm_source=NORM_WEIGHTS)
    ds.info["preprocess"] = pre.to_dict()
    train_dir = root / "train"
    if train_dir.is_dir():
        if train:
            train_classes, train_samples = _scan(train_dir)
            if train_classes != classes:
                raise QuantbenchError(f"train/ and {test_dir.name}/ of {root} have different class folders: "
                                      + _class_difference(f"{test_dir.name}/", classes, "train/", train_classes))
            ds.train = split(train_samples)
            ds.info["calibration_images"] = f"train/ ({len(train_samples)} images)"
        return ds
    n = len(test_samples)
    held = min(VAL_CALIB_IMAGES, n // 5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_HOLDOUT_SEED)).numpy()
    calib, rest = np.sort(perm[:held]), np.sort(perm[held:])
    ds.test = split(test_samples, rest)
    if train:
        ds.train = split(test_samples, calib)
    ds.info["calibration_images"] = (f"{held} images of {test_dir.name}/ held out (seed {VAL_HOLDOUT_SEED}) for "
                                     f"calibration; accuracy on the other {len(rest)}")
    ds.info["holdout"] = {"split": test_dir.name, "calibration": held, "accuracy": len(rest),
                          "seed": VAL_HOLDOUT_SEED}
    return ds


def _class_difference(a_name: str, a: list[str], b_name: str, b: list[str]) -> str:
    """E.g. "test/ lacks class 'cat'; train/ lacks class 'kitten'"."""
    parts = []
    for name, mine, other in ((a_name, a, b), (b_name, b, a)):
        missing = [c for c in other if c not in set(mine)]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            parts.append(f"{name} lacks class{'es' if len(missing) > 1 else ''} {shown}{more}")
    return "; ".join(parts)


def _scan(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class folders in sorted order (ImageFolder's convention) and (file, label) pairs."""
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise QuantbenchError(f"{split_dir} has no class folders")
    if len(classes) == 1:
        raise QuantbenchError(f"{split_dir} has a single class folder ({classes[0]!r}); "
                              "a classifier needs at least 2")
    samples = []
    for label, c in enumerate(classes):
        files = sorted(e.path for e in os.scandir(split_dir / c)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise QuantbenchError(f"class folder {split_dir / c} holds no images")
        samples += [(Path(f), label) for f in files]
    return classes, samples


def _cache_key(split_dir: Path, samples, image_size: int | None) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten, or the size asked for."""
    h = hashlib.sha1(f"{CACHE_VERSION}:{image_size or 'native'}".encode())
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


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB.

    - 16-bit grayscale ("I;16*", and "I", which is how Pillow opens PGMs deeper than 8 bits):
      scaled from 0..65535 to 0..255; Pillow's own convert would clip them to white.
    - Alpha (RGBA, LA, PA, palette or RGB/L with a transparent colour): composited onto
      ALPHA_BACKGROUND, so transparent areas are white, not whatever colour the file stored there.
    - Grayscale, 1-bit, palette, CMYK, YCbCr: Pillow's conversion. (16-bit RGB(A) PNGs are
      already opened as 8-bit by Pillow.)
    - 32-bit float ("F"): refused, its range (0..1? 0..255?) is not knowable from the file.
    """
    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no agreed range; save the image as 8- or 16-bit")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _decode(args) -> np.ndarray:
    """(path, size) -> uint8 (3, H, W); size None keeps the image's own size."""
    path, size = args
    try:
        with Image.open(path) as im:
            im = _to_rgb(im)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as e:
        raise QuantbenchError(f"cannot read image {path}: {e}") from e


def _ignore_sigint() -> None:
    """Pool initializer. Ctrl-C reaches every process of the terminal's foreground group: the
    workers ignore it, so only the parent reacts (KeyboardInterrupt, then the pool is terminated)
    instead of every worker printing its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _size_error(root: Path, first: tuple[Path, tuple], other: tuple[Path, tuple]) -> QuantbenchError:
    (p, (h, w)), (q, (h2, w2)) = first, other
    rel = lambda x: x.relative_to(root) if x.is_relative_to(root) else x
    return QuantbenchError(f"images differ in size: {rel(p)} is {w}x{h} but {rel(q)} is {w2}x{h2} "
                           "(width x height); pass --image-size N to resize every image to N x N")


def _load_split(split_dir: Path, samples: list[tuple[Path, int]], image_size: int | None, progress: bool,
                ref: tuple[Path, tuple] | None = None, mmap: bool = False
                ) -> tuple[Split, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Decode (or read from the cache) one split and its normalization statistics.

    `ref`: (an image, its (H, W)) that every image must match when `image_size` is None.
    """
    key = _cache_key(split_dir, samples, image_size)
    size_tag = str(image_size) if image_size else "native"
    cache = _cache_dir(split_dir) / f"{split_dir.name}-{size_tag}-{key}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True, mmap=mmap)
            split = Split(blob["images"], blob["labels"])
            stats = (tuple(blob["mean"]), tuple(blob["std"]))
        except Exception:
            split = None  # unreadable cache: decode again and overwrite it
        if split is not None:
            hw = tuple(split.images.shape[2:])
            if ref is not None and hw != ref[1]:
                raise _size_error(split_dir.parent, ref, (samples[0][0], hw))
            return split, stats
    from tqdm import tqdm

    jobs = [(p, image_size) for p, _ in samples]
    workers = min(os.cpu_count() or 1, POOL_MAX_WORKERS)
    use_pool = workers > 1 and len(jobs) > POOL_MIN_IMAGES
    arrays = []
    # Leaving the with block on an error or Ctrl-C terminates the pool's workers.
    with (Pool(workers, initializer=_ignore_sigint) if use_pool else _Serial()) as pool, \
            tqdm(total=len(jobs), desc=f"decoding {split_dir.name}/", unit="img",
                 disable=not progress, leave=False) as bar:
        chunksize = max(1, min(256, len(jobs) // (4 * workers)))
        for (path, _), a in zip(samples, pool.imap(_decode, jobs, chunksize=chunksize)):
            if image_size is None:  # the size comes with the decoded image: no separate scan
                if ref is None:
                    ref = (path, a.shape[1:])
                elif a.shape[1:] != ref[1]:
                    raise _size_error(split_dir.parent, ref, (path, a.shape[1:]))
            arrays.append(a)
            bar.update()
    split = Split(torch.from_numpy(np.stack(arrays)), torch.tensor([l for _, l in samples]))
    stats = channel_stats(split.images)
    # Drop the stale caches of this split at this size (the files changed), and those named the
    # way earlier versions did (no size in the name, unreachable now); other sizes' caches stay.
    stale = re.compile(rf"{re.escape(split_dir.name)}-(?:{size_tag}-)?[0-9a-f]{{16}}\.pt")
    for old in cache.parent.glob(f"{glob.escape(split_dir.name)}-*.pt"):
        if old != cache and stale.fullmatch(old.name):
            old.unlink(missing_ok=True)
    save_torch({"images": split.images, "labels": split.labels, "classes": sorted({p.parent.name for p, _ in samples}),
                "mean": list(stats[0]), "std": list(stats[1])}, cache)
    return split, stats


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


def _seed_transform(size: tuple[int, int] = (32, 32)):
    """The original's training transforms (RECIPE.md), on uint8 tensors, one image at a time.

    The crop is resized back to the images' own (H, W), 32x32 for CIFAR-10."""
    from torchvision.transforms import v2
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True),
                       v2.RandomRotation(30), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(0.4, 0.2, 0.2, 0.2)])


AUGMENTATIONS = ("none", "crop-flip", "seed")


_PREFETCH = None


def _prefetch_pool():
    global _PREFETCH
    if _PREFETCH is None:
        from concurrent.futures import ThreadPoolExecutor
        _PREFETCH = ThreadPoolExecutor(1, thread_name_prefix="quantbench-prefetch")
    return _PREFETCH


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
        self._seed_tf = _seed_transform(tuple(split.images.shape[2:])) if augment == "seed" else None

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
        starts = [s for s in range(0, len(idx), self.batch_size)
                  if len(idx[s:s + self.batch_size]) >= self.min_batch]  # e.g. not a last batch of 1 for BN
        lazy = isinstance(self.split.images, LazyImages)
        ahead = None
        for k, start in enumerate(starts):
            b = idx[start:start + self.batch_size]
            if lazy:  # the next batch decodes while this one runs through the model: two in memory at most
                images = ahead.result() if ahead is not None else take(self.split.images, b)
                ahead = (_prefetch_pool().submit(take, self.split.images, idx[starts[k + 1]:starts[k + 1] + self.batch_size])
                         if k + 1 < len(starts) else None)
            else:
                images = self.split.images[b]
            labels = self.split.labels[b]
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
    downloaded under `root`; `image_size` resizes (None: the images' own size). One value, passed
    down to every stage that reads images (training, calibration, and the measuring workers'
    accuracy runs), so they all see the same data.

    `image_cache`: the folder of decoded images (ImageCache) for data read through a model's
    preprocessing, None for none; "auto": $QUANTBENCH_IMAGE_CACHE, else ~/.cache/quantbench/images.
    `image_cache_gb`: its cap. Neither changes which data this is (identity)."""
    dir: Path | None = None
    root: Path = Path("data")
    image_size: int | None = None
    preprocess: Preprocess | None = None  # a pretrained model's own (load() reads through it)
    image_cache: Path | None = "auto"
    image_cache_gb: float = IMAGE_CACHE_GB

    def __post_init__(self):
        object.__setattr__(self, "dir", Path(self.dir) if self.dir is not None else None)
        object.__setattr__(self, "root", Path(self.root))
        cache = self.image_cache
        if isinstance(cache, str) and cache.strip().lower() == "auto":
            cache = default_image_cache()
        elif isinstance(cache, str) and cache.strip().lower() in _CACHE_OFF:
            cache = None
        object.__setattr__(self, "image_cache", Path(cache).expanduser() if cache is not None else None)
        gb = self.image_cache_gb
        if isinstance(gb, bool) or not isinstance(gb, numbers.Real) or not math.isfinite(gb) or gb <= 0:
            raise QuantbenchError(f"--image-cache-gb must be a number of GiB above 0, not {gb!r} "
                                  "(--image-cache off turns the cache off)")
        if isinstance(self.preprocess, dict):
            object.__setattr__(self, "preprocess", Preprocess.from_dict(self.preprocess))

    def identity(self) -> dict:
        """Which data this is, for records that must not be mixed with other data's (a resumed
        run's): the folder (or CIFAR-10 root) and the image size asked for."""
        where = self.dir if self.dir is not None else self.root
        ident = {"path": str(Path(where).resolve()), "kind": "folder" if self.dir is not None else "cifar10",
                 "image_size": self.image_size}
        if self.preprocess is not None:
            ident["preprocess"] = self.preprocess.to_dict()
        return ident

    def cache(self) -> ImageCache | None:
        """The decoded-image cache to read through (None: off)."""
        return ImageCache(self.image_cache, self.image_cache_gb) if self.image_cache is not None else None

    def fingerprint(self) -> str:
        """What the test images are now: the identity, plus every file of the test (or val)
        split's name, size and modification time, and whether train/ exists (without it, val/
        is split into calibration and accuracy images). Changes when any of them does."""
        h = hashlib.sha256(repr(sorted(self.identity().items())).encode())
        if self.dir is None:
            where = Path(self.root) / "cifar-10-batches-py"
            files = [where / "test_batch"]
        else:
            where = next((self.dir / n for n in ("test", "val") if (self.dir / n).is_dir()), self.dir)
            h.update(f"train:{(self.dir / 'train').is_dir()}:{where.name}".encode())
            files = sorted(p for p in where.rglob("*") if ".quantbench-cache" not in p.parts)
        for p in files:
            try:
                st = p.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                h.update(f"{p.relative_to(where) if p.is_relative_to(where) else p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def load(self, train: bool = True, progress: bool = True) -> Dataset:
        """The data as it is (normalization statistics of the train split, see load_dataset)."""
        return load_dataset(self.dir, self.root, train=train, image_size=self.image_size, progress=progress,
                            preprocess=self.preprocess, image_cache=self.cache())

    def load_for(self, meta: dict, what: str, train: bool = False, progress: bool = True) -> Dataset:
        """The data as the model that `meta` (checkpoint meta or sidecar) describes expects it:
        its image size and normalization, checked against its classes and input shape."""
        size = self.image_size or meta.get("image_size")
        mean, std = meta.get("normalize_mean"), meta.get("normalize_std")
        pre = Preprocess.from_dict(meta["preprocess"], what) if meta.get("preprocess") else None
        if pre is not None and size is None:
            mean, std = mean or list(pre.mean), std or list(pre.std)
        data = load_dataset(self.dir, self.root, train=train, image_size=size, progress=progress,
                            mean=mean if mean and std else None, std=std if mean and std else None,
                            preprocess=pre, image_cache=self.cache())
        return for_model(data, meta, what)


def for_model(data: Dataset, meta: dict, what: str) -> Dataset:
    """The same images, normalized the way the model described by `meta` was trained; fails in
    one line when the data's classes or image shape are not the model's."""
    if meta.get("num_classes") is not None and int(meta["num_classes"]) != data.num_classes:
        raise QuantbenchError(f"{what} has {meta['num_classes']} output classes but the data has {data.num_classes}")
    if meta.get("classes"):
        check_classes(meta["classes"], data, what)
    shape = meta.get("input_shape")
    if shape and tuple(shape) != tuple(data.input_shape):
        raise QuantbenchError(f"{what} takes inputs of shape {tuple(shape)}, the data's images are "
                              f"{tuple(data.input_shape)}; pass --image-size {shape[-1]}")
    mean, std = meta.get("normalize_mean"), meta.get("normalize_std")
    if mean and std and (tuple(mean), tuple(std)) != (tuple(data.mean), tuple(data.std)):
        data = dataclasses.replace(data, mean=tuple(mean), std=tuple(std), norm_source=NORM_GIVEN)
    return data
