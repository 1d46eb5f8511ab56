"""quantbench.data: ImageFolder loading, the decoded cache, batches and augmentation."""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantbench import data
from quantbench.data import Batches, Split, load_dataset
from quantbench.errors import QuantbenchError

from conftest import TINY_CLASSES, TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS


def _no_decode(*_):
    raise AssertionError("decoded an image although the cache should have been used")


def _cache_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.pt")) if d.is_dir() else []


def test_load_image_folder(tiny_dataset, tiny_data_dir):
    ds = tiny_dataset
    assert ds.classes == sorted(TINY_CLASSES) and ds.num_classes == 3
    assert ds.source == str(tiny_data_dir.resolve())
    for split, per_class in ((ds.train, TINY_TRAIN_PER_CLASS), (ds.test, TINY_TEST_PER_CLASS)):
        n = 3 * per_class
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64 and len(split) == n
        assert split.labels.tolist() == [k for k in range(3) for _ in range(per_class)]
        # Each image's dominant channel is its class's colour: labels match folders, channels are RGB.
        dominant = split.images.float().mean((2, 3)).argmax(1)
        rgb_index = {"red": 0, "green": 1, "blue": 2}
        assert dominant.tolist() == [rgb_index[ds.classes[k]] for k in split.labels.tolist()]


def test_load_test_split_only(tiny_data_dir):
    ds = load_dataset(tiny_data_dir, train=False, progress=False)
    assert ds.train is None and len(ds.test) == 3 * TINY_TEST_PER_CLASS


def test_image_size_resizes(tiny_data_copy):
    ds = load_dataset(tiny_data_copy, train=False, image_size=16, progress=False)
    assert ds.test.images.shape[1:] == (3, 16, 16)


def test_cache_created_and_reused(tiny_data_copy, monkeypatch):
    first = load_dataset(tiny_data_copy, progress=False)
    cache = tiny_data_copy / ".quantbench-cache"
    names = _cache_files(cache)
    assert len(names) == 2 and names[0].startswith("test-") and names[1].startswith("train-")

    monkeypatch.setattr(data, "_decode", _no_decode)
    second = load_dataset(tiny_data_copy, progress=False)
    assert second.classes == first.classes
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.train.labels, first.train.labels)
    assert torch.equal(second.test.images, first.test.images)


def _counting_decode(monkeypatch) -> list:
    calls = []
    real = data._decode

    def decode(args):
        calls.append(args[0])
        return real(args)
    monkeypatch.setattr(data, "_decode", decode)
    return calls


def test_cache_invalidated_by_added_file(tiny_data_copy, monkeypatch):
    load_dataset(tiny_data_copy, progress=False)
    Image.new("RGB", (32, 32), (250, 0, 0)).save(tiny_data_copy / "train" / "red" / "zzz.jpg")
    calls = _counting_decode(monkeypatch)
    ds = load_dataset(tiny_data_copy, progress=False)
    assert len(ds.train) == 3 * TINY_TRAIN_PER_CLASS + 1
    assert ds.train.labels[-1].item() == ds.classes.index("red")
    # Only train/ changed: it is decoded again, test/ still comes from the cache.
    assert len(calls) == len(ds.train) and all(Path(p).relative_to(tiny_data_copy).parts[0] == "train" for p in calls)
    # The stale train cache was replaced, not kept beside the new one.
    assert [n.split("-")[0] for n in _cache_files(tiny_data_copy / ".quantbench-cache")] == ["test", "train"]


def test_caches_of_other_image_sizes_are_kept(tiny_data_copy, monkeypatch):
    """Writing the cache of one image size deleted those of the other sizes of the split (issue 18):
    switching between --image-size 16 and the native size decoded everything again each time."""
    load_dataset(tiny_data_copy, progress=False)
    load_dataset(tiny_data_copy, image_size=16, progress=False)
    assert len(_cache_files(tiny_data_copy / ".quantbench-cache")) == 4  # two splits x two sizes
    monkeypatch.setattr(data, "_decode", _no_decode)
    assert load_dataset(tiny_data_copy, progress=False).train.images.shape[2:] == (32, 32)
    assert load_dataset(tiny_data_copy, image_size=16, progress=False).train.images.shape[2:] == (16, 16)


def test_cache_invalidated_by_changed_file(tiny_data_copy, monkeypatch):
    before = load_dataset(tiny_data_copy, progress=False)
    path = tiny_data_copy / "test" / "blue" / "000.jpg"
    st = path.stat()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(path, quality=95)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a distinct mtime even on coarse clocks
    calls = _counting_decode(monkeypatch)
    after = load_dataset(tiny_data_copy, progress=False)
    assert len(calls) == len(after.test)
    assert before.test.images[0].float().mean() > 20 and after.test.images[0].max() <= 10
    assert torch.equal(after.test.images[1:], before.test.images[1:])


def test_read_only_data_caches_in_xdg_cache_home(tiny_data_copy, tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop writes: make _cache_dir's os.access check say no.
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    real_access = os.access
    monkeypatch.setattr(data.os, "access",
                        lambda p, mode, **kw: False if Path(p).is_relative_to(tiny_data_copy)
                        else real_access(p, mode, **kw))
    cache_dir = data._cache_dir(tiny_data_copy / "train")
    assert cache_dir.is_relative_to(xdg / "quantbench")

    first = load_dataset(tiny_data_copy, progress=False)
    assert _cache_files(tiny_data_copy / ".quantbench-cache") == []
    assert [n.split("-")[0] for n in _cache_files(cache_dir)] == ["test", "train"]
    monkeypatch.setattr(data, "_decode", _no_decode)
    second = load_dataset(tiny_data_copy, progress=False)
    assert torch.equal(first.train.images, second.train.images)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_read_only_data_really_read_only(tiny_data_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    dirs = [tiny_data_copy] + [p for p in tiny_data_copy.rglob("*") if p.is_dir()]
    for d in dirs:
        d.chmod(0o555)
    try:
        ds = load_dataset(tiny_data_copy, progress=False)
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert len(ds.train) == 3 * TINY_TRAIN_PER_CLASS
    assert len(list((tmp_path / "xdg" / "quantbench").rglob("*.pt"))) == 2


def test_val_folder_accepted(tiny_data_copy):
    (tiny_data_copy / "test").rename(tiny_data_copy / "val")
    ds = load_dataset(tiny_data_copy, progress=False)
    assert len(ds.test) == 3 * TINY_TEST_PER_CLASS and len(ds.train) == 3 * TINY_TRAIN_PER_CLASS


def test_missing_test_folder(tiny_data_copy):
    (tiny_data_copy / "test").rename(tiny_data_copy / "holdout")
    with pytest.raises(QuantbenchError, match="no test/"):
        load_dataset(tiny_data_copy, progress=False)


def test_class_folders_must_match(tiny_data_copy):
    (tiny_data_copy / "train" / "red").rename(tiny_data_copy / "train" / "yellow")
    with pytest.raises(QuantbenchError, match="different class folders") as e:
        load_dataset(tiny_data_copy, progress=False)
    assert str(e.value).endswith("test/ lacks class 'yellow'; train/ lacks class 'red'")


# ---------------------------------------------------------------- Batches
def _index_split(n: int) -> Split:
    """A split whose label is the sample's index, so batches reveal which samples they hold."""
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(n)), torch.arange(n))


def _epoch(b: Batches, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    b.set_epoch(epoch)
    return list(b)


@pytest.mark.parametrize("augment", ["none", "crop-flip", "seed"])
def test_batches_deterministic_per_seed_and_epoch(augment):
    split = _index_split(20)
    mk = lambda seed: Batches(split, 8, data.CIFAR10_MEAN, data.CIFAR10_STD, augment=augment,
                              shuffle=True, seed=seed)
    a = _epoch(mk(0), 3)
    torch.manual_seed(12345)  # the global RNG must not matter
    b = _epoch(mk(0), 3)
    assert [len(y) for _, y in a] == [8, 8, 4]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    order = lambda batches: torch.cat([y for _, y in batches]).tolist()
    assert sorted(order(a)) == list(range(20))
    assert order(_epoch(mk(0), 4)) != order(a)  # another epoch: another order
    assert order(_epoch(mk(1), 3)) != order(a)  # another seed: another order


def test_batches_without_shuffle_keep_order_and_limit():
    split = _index_split(10)
    b = Batches(split, 4, data.CIFAR10_MEAN, data.CIFAR10_STD, limit=7)
    assert len(b) == 2
    assert torch.cat([y for _, y in b]).tolist() == list(range(7))


def test_batches_distributed_shards_cover_everything():
    n, world = 25, 2
    split = _index_split(n)
    shards = []
    for rank in range(world):
        b = Batches(split, 4, data.CIFAR10_MEAN, data.CIFAR10_STD, augment="crop-flip", shuffle=True,
                    seed=7, rank=rank, world_size=world)
        shards.append(torch.cat([y for _, y in _epoch(b, 2)]).tolist())
    assert [len(s) for s in shards] == [13, 13]  # DistributedSampler pads to equal shards
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == 1  # only the padding sample repeats


def test_unknown_augmentation():
    with pytest.raises(QuantbenchError, match="unknown augmentation"):
        Batches(_index_split(4), 2, data.CIFAR10_MEAN, data.CIFAR10_STD, augment="mixup")


def test_crop_flip_is_a_padded_crop_or_its_mirror():
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = data.augment_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    found = []
    for i in range(len(x)):
        hits = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)
                if torch.equal(out[i], padded[i, :, oy:oy + 32, ox:ox + 32].flip(2) if f
                               else padded[i, :, oy:oy + 32, ox:ox + 32])]
        assert len(hits) == 1, f"image {i} is not a crop of the padded input"
        found += hits
    assert 0 < sum(f for *_, f in found) < len(x)  # some but not all are mirrored
    assert len({(oy, ox) for oy, ox, _ in found}) > 5  # offsets vary


def test_normalize_matches_totensor_normalize():
    from torchvision import transforms as T
    px = np.zeros((32, 32, 3), dtype=np.uint8)
    px[5, 7] = (255, 0, 128)
    px[0, 0] = (17, 200, 93)
    reference = T.Compose([T.ToTensor(), T.Normalize(data.CIFAR10_MEAN, data.CIFAR10_STD)])(
        Image.fromarray(px, "RGB"))
    images = torch.from_numpy(px).permute(2, 0, 1)[None].contiguous()
    ours = data.normalize(images, data.CIFAR10_MEAN, data.CIFAR10_STD)
    assert torch.allclose(ours[0], reference, atol=1e-6)
    expected = [(255 / 255 - 0.4914) / 0.2023, (0 - 0.4822) / 0.1994, (128 / 255 - 0.4465) / 0.2010]
    assert torch.allclose(ours[0, :, 5, 7], torch.tensor(expected), atol=1e-6)
    # Batches without augmentation hand out exactly that.
    (x, _), = Batches(Split(images, torch.zeros(1, dtype=torch.int64)), 1, data.CIFAR10_MEAN,
                      data.CIFAR10_STD)
    assert torch.equal(x, ours)


# ---------------------------------------------------------------- torchvision CIFAR-10
def test_cifar10_offline_points_to_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(QuantbenchError, match="--data-dir") as e:
        load_dataset(None, data_root=tmp_path / "cifar")
    assert "URLError" in str(e.value) and str(tmp_path / "cifar") in str(e.value)


def test_cifar10_source(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:
        classes = ["a", "b"]

        def __init__(self, root, train, download):
            n = 6 if train else 4
            self.data = np.full((n, 32, 32, 3), 7 if train else 9, dtype=np.uint8)
            self.data[:, 0, 0] = (1, 2, 3)
            self.targets = [i % 2 for i in range(n)]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_dataset(None, data_root=tmp_path)
    assert ds.classes == ["a", "b"] and len(ds.train) == 6 and len(ds.test) == 4
    assert ds.test.images.shape == (4, 3, 32, 32) and ds.test.images.dtype == torch.uint8
    assert ds.test.images[0, :, 0, 0].tolist() == [1, 2, 3]  # HWC -> CHW
    assert ds.train.labels.dtype == torch.int64 and ds.train.labels.tolist() == [0, 1] * 3


# ---------------------------------------------------------------- the decoded-image cache
PRE = data.Preprocess(crop=16, resize=20)


def _lazy(folder: Path, cache_dir: Path | None, **kw):
    src = data.DataSource(folder, preprocess=PRE, image_cache=cache_dir if cache_dir is not None else "off", **kw)
    return src.load(train=False, progress=False).test.images


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.npy"))


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(data, "SHARD_IMAGES", 5)  # 24 test images: shards of 5,5,5,5,4


def test_a_streamed_split_is_decoded_once_then_read_from_shards(tiny_data_dir, tmp_path, small_shards, monkeypatch):
    plain = _lazy(tiny_data_dir, None)
    expected = plain.take(np.arange(len(plain)))
    images = _lazy(tiny_data_dir, tmp_path / "c")
    for start in range(0, len(images), 7):  # batches that straddle shards, as eval's do
        got = images.take(np.arange(start, min(start + 7, len(images))))
        assert torch.equal(got, expected[start:start + 7])
    shards = _shards(tmp_path / "c")
    assert sorted(np.load(p).shape for p in shards) == [(4, 3, 16, 16)] + [(5, 3, 16, 16)] * 4
    # another reader (another worker, the next run) decodes nothing, in any order, any view
    monkeypatch.setattr(data, "_decode_preprocessed", _no_decode)
    again = _lazy(tiny_data_dir, tmp_path / "c")
    assert torch.equal(again.take(np.arange(len(again))), expected)
    assert torch.equal(again.take([23, 0, 11]), expected[[23, 0, 11]])
    assert torch.equal(again[3], expected[3])


def test_a_truncated_or_foreign_shard_is_made_again(tiny_data_dir, tmp_path, small_shards):
    images = _lazy(tiny_data_dir, tmp_path / "c")
    expected = images.take(np.arange(len(images)))
    shards = _shards(tmp_path / "c")
    shards[0].write_bytes(shards[0].read_bytes()[:300])     # truncated: a writer killed mid-copy
    np.save(shards[1], np.zeros((2, 3, 16, 16), np.uint8))  # the wrong shape
    shards[2].write_bytes(b"not a numpy file")
    again = _lazy(tiny_data_dir, tmp_path / "c")
    assert torch.equal(again.take(np.arange(len(again))), expected)
    assert sorted(np.load(p).shape[0] for p in _shards(tmp_path / "c")) == [4, 5, 5, 5, 5]


def test_a_changed_file_or_preprocessing_misses_the_cache(tiny_data_copy, tmp_path, small_shards):
    images = _lazy(tiny_data_copy, tmp_path / "c")
    images.take(np.arange(len(images)))
    first = set(_shards(tmp_path / "c"))
    victim = sorted((tiny_data_copy / "test" / "red").iterdir())[0]  # image 16: shard 3
    Image.new("RGB", (32, 32), (0, 0, 0)).save(victim)
    again = _lazy(tiny_data_copy, tmp_path / "c")
    got = again.take(np.arange(len(again)))
    assert got[16].max() == 0  # the new image, not the cached one
    assert len(set(_shards(tmp_path / "c")) - first) == 1
    other = data.DataSource(tiny_data_copy, preprocess=data.Preprocess(crop=12, resize=20),
                            image_cache=tmp_path / "c").load(train=False, progress=False).test.images
    assert other.take(np.arange(len(other))).shape == (24, 3, 12, 12)


def test_another_pillow_misses_the_cache(tiny_data_dir, tmp_path, small_shards, monkeypatch):
    # Pillow decodes the JPEGs and resizes them: another version may make other pixels
    import PIL
    images = _lazy(tiny_data_dir, tmp_path / "c")
    images.take(np.arange(len(images)))
    first = set(_shards(tmp_path / "c"))
    monkeypatch.setattr(PIL, "__version__", PIL.__version__ + ".post1")
    again = _lazy(tiny_data_dir, tmp_path / "c")
    again.take(np.arange(len(again)))
    assert len(set(_shards(tmp_path / "c")) - first) == len(first)


def test_the_cache_keeps_to_its_cap_dropping_the_least_recently_used(tiny_data_dir, tmp_path, small_shards):
    shard_bytes = 5 * 3 * 16 * 16 + 128
    images = _lazy(tiny_data_dir, tmp_path / "c", image_cache_gb=2.5 * shard_bytes / 2**30)
    images.take(np.arange(len(images)))
    left = _shards(tmp_path / "c")
    assert len(left) == 2 and sum(p.stat().st_size for p in left) <= 2.5 * shard_bytes
    assert data.ImageCache(tmp_path / "c").size_bytes() == sum(p.stat().st_size for p in left)


def test_image_cache_options_are_checked_and_off_means_off(tiny_data_dir, tmp_path, monkeypatch):
    with pytest.raises(QuantbenchError, match="--image-cache-gb"):
        data.DataSource(tiny_data_dir, image_cache_gb=0)
    assert data.DataSource(image_cache="off").cache() is None
    monkeypatch.setenv(data.IMAGE_CACHE_ENV, str(tmp_path / "env"))
    assert data.DataSource().image_cache == tmp_path / "env"
    monkeypatch.setenv(data.IMAGE_CACHE_ENV, "off")
    assert data.DataSource().image_cache is None
    assert data.DataSource(image_cache=tmp_path).identity() == data.DataSource(image_cache=None).identity()


def test_an_unwritable_cache_turns_itself_off_and_the_images_still_come(tiny_data_dir, tmp_path, small_shards):
    (tmp_path / "file").write_text("in the way")
    images = _lazy(tiny_data_dir, tmp_path / "file" / "c")
    with pytest.warns(UserWarning, match="turned off"):
        got = images.take(np.arange(len(images)))
    assert got.shape == (24, 3, 16, 16)


def test_reading_a_cached_split_does_not_grow_memory_with_its_size(tiny_data_dir, tmp_path, monkeypatch):
    """Shards are memory-mapped per batch and unmapped after: a reader's resident memory holds
    a batch, not the split (the split here is repeated to 24,000 images of 3x64x64, 295 MB)."""
    monkeypatch.setattr(data, "SHARD_IMAGES", 1000)
    files = sorted((tiny_data_dir / "test").rglob("*.*"))
    paths = [files[i % len(files)] for i in range(24_000)]
    pre = data.Preprocess(crop=64, resize=64)
    cache = data.ImageCache(tmp_path / "c")
    one = data.LazyImages(paths[:1000], pre, cache=cache)
    block = one.take(np.arange(1000)).numpy()
    # the 24 shards, written directly (decoding 24,000 images would be slow)
    whole = data.LazyImages(paths, pre, cache=cache)
    for s in range(24):
        cache.write(whole._key(s), block)
    from quantbench.worker import _current_rss_mb
    monkeypatch.setattr(data, "_decode_preprocessed", _no_decode)
    before = _current_rss_mb()
    peak = before
    for start in range(0, 24_000, 500):
        x = whole.take(np.arange(start, start + 500))
        peak = max(peak, _current_rss_mb())
    assert torch.equal(x, torch.from_numpy(block[500:]))
    assert peak - before < 60, f"resident memory grew by {peak - before:.0f} MB reading 295 MB of shards"


def test_image_cache_options_reach_the_data_source_of_every_command(tmp_path):
    from quantbench.cli import _data_source, build_parser
    _, subs = build_parser()
    for cmd, extra in (("eval", ["m.pth"]), ("quantize", ["m.pth", "--method", "static", "--output", "x.pt"]),
                       ("bench", ["m.pt"]), ("replicate", []), ("tune", ["m.pth"]), ("sensitivity", ["m.pth"])):
        args = subs[cmd].parse_args(extra + ["--image-cache", str(tmp_path), "--image-cache-gb", "2"])
        src = _data_source(args)
        assert (src.image_cache, src.image_cache_gb) == (tmp_path, 2.0), cmd
        assert _data_source(subs[cmd].parse_args(extra + ["--image-cache", "off"])).image_cache is None
    with pytest.raises(QuantbenchError, match="--image-cache-gb"):
        _data_source(subs["eval"].parse_args(["m.pth", "--image-cache-gb", "-1"]))
