"""quantbench.data on "your data": any number of classes, image modes and sizes, normalization
statistics, class checks, and Ctrl-C while a worker pool decodes."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import quantbench
from quantbench import data
from quantbench.data import Batches, Dataset, Split, check_classes, load_dataset
from quantbench.errors import QuantbenchError


def _folder(root: Path, classes, per_class=(2, 1), size=(8, 8), seed=0, ext=".png") -> Path:
    """root/{train,test}/<class>/*: random RGB images of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(px, "RGB").save(d / f"{i:03d}{ext}")
    return root


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def _no_decode(*_):
    raise AssertionError("decoded an image although nothing should have been decoded")


# ---------------------------------------------------------------- classes
@pytest.mark.parametrize("n_classes", [2, 100])
def test_any_number_of_classes(tmp_path, n_classes):
    names = [f"class{k}" for k in range(n_classes)]  # "class10" sorts before "class2": folder order rules
    root = _folder(tmp_path / "d", names, per_class=(2, 1))
    ds = load_dataset(root, progress=False)
    assert ds.classes == sorted(names) and ds.num_classes == n_classes
    assert len(ds.train) == 2 * n_classes and len(ds.test) == n_classes
    assert ds.train.labels.tolist() == [k for k in range(n_classes) for _ in range(2)]
    assert ds.test.labels.tolist() == list(range(n_classes))
    # Each label's images are that folder's images, pixel for pixel.
    k = n_classes - 1
    px = np.asarray(Image.open(root / "test" / ds.classes[k] / "000.png")).transpose(2, 0, 1)
    assert torch.equal(ds.test.images[k], torch.from_numpy(px.copy()))


def test_single_class_folder_refused(tmp_path):
    root = _folder(tmp_path / "d", ["only"])
    with pytest.raises(QuantbenchError, match="single class folder") as e:
        load_dataset(root, progress=False)
    assert "'only'" in _one_line(e)


def test_class_folder_difference_named_before_decoding(tiny_data_copy, monkeypatch):
    (tiny_data_copy / "train" / "red").rename(tiny_data_copy / "train" / "yellow")
    (tiny_data_copy / "test" / "green").rename(tiny_data_copy / "test" / "lime")
    monkeypatch.setattr(data, "_decode", _no_decode)
    with pytest.raises(QuantbenchError, match="different class folders") as e:
        load_dataset(tiny_data_copy, progress=False)
    assert _one_line(e).endswith("test/ lacks classes 'green', 'yellow'; train/ lacks classes 'lime', 'red'")


def _ds(classes) -> Dataset:
    return Dataset(classes=list(classes), test=Split(torch.zeros(0, 3, 8, 8, dtype=torch.uint8),
                                                     torch.zeros(0, dtype=torch.int64)), source="/data/x")


@pytest.mark.parametrize("expected, actual, fragment", [
    (["cat", "dog", "fox"], ["cat", "fox", "kitten"], "the data lacks class 'dog' (checkpoint m.pth's class 1)"),
    (["cat", "dog"], ["cat", "dog", "fox"], "the data has class 'fox' (its class 2), which checkpoint m.pth does not know"),
    (["cat", "dog", "fox"], ["cat", "dog"], "the data lacks class 'fox' (checkpoint m.pth's class 2)"),
    (["b", "a", "c"], ["a", "b", "c"], "the order differs: checkpoint m.pth's class 0 is 'b', the data's class 0 is 'a'"),
])
def test_check_classes_names_first_difference(expected, actual, fragment):
    with pytest.raises(QuantbenchError) as e:
        check_classes(expected, _ds(actual), "checkpoint m.pth")
    msg = _one_line(e)
    assert fragment in msg and "/data/x" in msg
    assert f"({len(expected)})" in msg and f"({len(actual)})" in msg


def test_check_classes_accepts_equal_lists():
    assert check_classes(("a", "b"), _ds(["a", "b"]), "m.pt") is None


def test_renamed_class_folder_caught_by_check_classes(tiny_data_copy, tiny_dataset):
    # The failure the check exists for: renaming a folder reorders the labels without any error.
    (tiny_data_copy / "test" / "blue").rename(tiny_data_copy / "test" / "navy")
    ds = load_dataset(tiny_data_copy, train=False, progress=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert ds.classes == ["green", "navy", "red"]
    with pytest.raises(QuantbenchError, match="lacks class 'blue'"):
        check_classes(tiny_dataset.classes, ds, "model.pt")


# ---------------------------------------------------------------- image modes
def _png16(path: Path, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG (Pillow cannot write 16-bit RGB): rows of big-endian samples, no filter."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _mode_images(d: Path) -> dict[str, tuple[int, int, int]]:
    """Write one 4x4 image per mode; return file name -> the RGB value every pixel must decode to."""
    d.mkdir(parents=True, exist_ok=True)
    want = {}
    Image.new("L", (4, 4), 100).save(d / "gray.png")
    want["gray.png"] = (100, 100, 100)
    Image.new("1", (4, 4), 1).save(d / "bilevel.png")
    want["bilevel.png"] = (255, 255, 255)
    Image.new("L", (4, 4), 60).save(d / "gray.jpg", quality=100)
    want["gray.jpg"] = (60, 60, 60)
    Image.new("RGBA", (4, 4), (200, 0, 0, 255)).save(d / "rgba_opaque.png")
    want["rgba_opaque.png"] = (200, 0, 0)
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(d / "rgba_clear.png")  # stored black, shown white
    want["rgba_clear.png"] = (255, 255, 255)
    Image.new("RGBA", (4, 4), (0, 0, 255, 51)).save(d / "rgba_part.png")  # 20 % blue over white
    want["rgba_part.png"] = (204, 204, 255)
    Image.new("LA", (4, 4), (0, 0)).save(d / "la_clear.png")
    want["la_clear.png"] = (255, 255, 255)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(d / "palette.png")
    want["palette.png"] = (10, 200, 30)
    pal.save(d / "palette_clear.gif", transparency=1)  # the only colour is the transparent one
    want["palette_clear.gif"] = (255, 255, 255)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(d / "cmyk.tif")
    want["cmyk.tif"] = (255, 0, 0)
    Image.fromarray(np.full((4, 4), 200 * 257, np.uint16)).save(d / "gray16.png")
    want["gray16.png"] = (200, 200, 200)
    Image.fromarray(np.full((4, 4), 50 * 257, np.uint16)).save(d / "gray16.tif")
    want["gray16.tif"] = (50, 50, 50)
    _png16(d / "rgb16.png", np.broadcast_to(np.array([65535, 32896, 2570], np.uint16), (4, 4, 3)), 2)
    want["rgb16.png"] = (255, 128, 10)
    _png16(d / "rgba16.png", np.broadcast_to(np.array([0, 0, 0, 0], np.uint16), (4, 4, 4)), 6)
    want["rgba16.png"] = (255, 255, 255)
    return want


def test_every_mode_decodes_to_rgb(tmp_path):
    want = _mode_images(tmp_path)
    for name, rgb in want.items():
        a = data._decode((tmp_path / name, None))
        assert a.shape == (3, 4, 4) and a.dtype == np.uint8, name
        got = a.reshape(3, -1)
        assert (got == got[:, :1]).all(), name  # uniform, as written
        assert np.abs(got[:, 0].astype(int) - rgb).max() <= 2, (name, got[:, 0].tolist(), rgb)


def test_mixed_modes_in_one_folder(tmp_path):
    want = _mode_images(tmp_path / "x")
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = tmp_path / "d" / split / c
            d.mkdir(parents=True)
            for name in want:
                (d / name).write_bytes((tmp_path / "x" / name).read_bytes())
    ds = load_dataset(tmp_path / "d", progress=False)
    files = sorted(want)  # the order the loader reads them in
    assert ds.test.images.shape == (2 * len(want), 3, 4, 4) and ds.input_shape == (3, 4, 4)
    got = ds.test.images[:len(want), :, 0, 0].int()
    assert (got - torch.tensor([want[f] for f in files])).abs().max() <= 2


def test_float_image_refused_naming_file(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(QuantbenchError, match="mode F") as e:
        data._decode((tmp_path / "f.tif", None))
    assert str(tmp_path / "f.tif") in _one_line(e)


@pytest.mark.parametrize("damage, pool", [("garbage", False), ("truncated", False), ("truncated", True)])
def test_corrupt_image_names_file(tiny_data_copy, monkeypatch, damage, pool):
    if pool:  # the error crosses from a worker process to this one
        monkeypatch.setattr(data, "POOL_MIN_IMAGES", 10)
        monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    path = tiny_data_copy / "test" / "green" / "003.jpg"
    raw = path.read_bytes()
    path.write_bytes(b"not an image at all" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(QuantbenchError, match="cannot read image") as e:
        load_dataset(tiny_data_copy, progress=False)
    assert str(path) in _one_line(e)


# ---------------------------------------------------------------- image size
def test_own_size_is_the_default(tmp_path):
    root = _folder(tmp_path / "d", ["a", "b"], size=(48, 48))
    ds = load_dataset(root, progress=False)
    assert ds.input_shape == (3, 48, 48)
    assert ds.train.images.shape == (4, 3, 48, 48) and ds.test.images.shape == (2, 3, 48, 48)


def test_non_square_keeps_height_and_width(tmp_path):
    root = _folder(tmp_path / "d", ["a", "b"], size=(40, 24))  # 40 wide, 24 high
    ds = load_dataset(root, progress=False)
    assert ds.input_shape == (3, 24, 40)
    px = np.asarray(Image.open(root / "train" / "b" / "001.png")).transpose(2, 0, 1)
    assert torch.equal(ds.train.images[3], torch.from_numpy(px.copy()))
    # The seed recipe's random resized crop keeps that shape too.
    x, _ = next(iter(Batches(ds.train, 4, ds.mean, ds.std, augment="seed", seed=1)))
    assert x.shape == (4, 3, 24, 40)


def test_mixed_sizes_in_a_split_need_image_size(tmp_path):
    root = _folder(tmp_path / "d", ["a", "b"], size=(32, 32))
    Image.new("RGB", (48, 40)).save(root / "test" / "b" / "odd.png")
    with pytest.raises(QuantbenchError, match="--image-size") as e:
        load_dataset(root, train=False, progress=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    msg = _one_line(e)
    assert "32x32" in msg and "48x40" in msg and str(Path("test/b/odd.png")) in msg

    ds = load_dataset(root, train=False, image_size=24, progress=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert ds.input_shape == (3, 24, 24) and len(ds.test) == 3


def test_splits_of_different_sizes_need_image_size(tmp_path):
    root = _folder(tmp_path / "d", ["a", "b"], size=(32, 32))
    _folder(tmp_path / "other", ["a", "b"], size=(16, 16))
    for c in ("a", "b"):
        for f in (tmp_path / "other" / "train" / c).iterdir():
            f.replace(root / "train" / c / f.name)  # train/ now 16x16, test/ 32x32
    with pytest.raises(QuantbenchError, match="images differ in size") as e:
        load_dataset(root, progress=False)
    msg = _one_line(e)
    assert "32x32" in msg and "16x16" in msg and "train" in msg and "test" in msg
    # The test split is cached by now: the error is the same from the cache.
    with pytest.raises(QuantbenchError, match="16x16"):
        load_dataset(root, progress=False)
    ds = load_dataset(root, image_size=20, progress=False)
    assert ds.input_shape == (3, 20, 20) and ds.train.images.shape[1:] == (3, 20, 20)


def test_cache_keyed_by_size(tiny_data_copy, monkeypatch):
    native = load_dataset(tiny_data_copy, train=False, progress=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    small = load_dataset(tiny_data_copy, train=False, image_size=16, progress=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert native.input_shape == (3, 32, 32) and small.input_shape == (3, 16, 16)
    monkeypatch.setattr(data, "_decode", _no_decode)
    again = load_dataset(tiny_data_copy, train=False, image_size=16, progress=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.equal(again.test.images, small.test.images)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_bad_image_size(tiny_data_dir, bad):
    with pytest.raises(QuantbenchError, match="image size"):
        load_dataset(tiny_data_dir, image_size=bad, progress=False)


# ---------------------------------------------------------------- normalization
def _numpy_stats(images: torch.Tensor):
    x = images.numpy().astype(np.float64) / 255
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def test_stats_from_train_split(tiny_dataset):
    ds = tiny_dataset
    mean, std = _numpy_stats(ds.train.images)
    assert ds.norm_source == "train split"
    assert np.allclose(ds.mean, mean, atol=1e-9) and np.allclose(ds.std, std, atol=1e-9)
    assert not np.allclose(ds.mean, data.CIFAR10_MEAN, atol=1e-2)  # really computed, not the default
    # The test split's own statistics are not what is used.
    assert not np.allclose(ds.mean, _numpy_stats(ds.test.images)[0], atol=1e-6)


def test_channel_stats_chunks_and_constant_channel():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 64, 64), dtype=torch.uint8, generator=g)
    images[:, 2] = 7  # a constant channel
    mean, std = data.channel_stats(images)  # 300 images > one chunk of about 4M values
    ref_mean, ref_std = _numpy_stats(images)
    assert np.allclose(mean, ref_mean, atol=1e-9) and np.allclose(std[:2], ref_std[:2], atol=1e-9)
    assert std[2] == pytest.approx(1 / 255)  # floored, so normalizing never divides by zero


def test_stats_cached_with_the_split(tiny_data_copy, monkeypatch):
    first = load_dataset(tiny_data_copy, progress=False)
    monkeypatch.setattr(data, "_decode", _no_decode)
    second = load_dataset(tiny_data_copy, progress=False)
    assert second.mean == first.mean and second.std == first.std and second.norm_source == "train split"
    # The test split alone takes the train split's statistics, from its cache.
    test_only = load_dataset(tiny_data_copy, train=False, progress=False)
    assert test_only.train is None
    assert test_only.mean == first.mean and test_only.norm_source == "train split"


def test_test_split_alone_decodes_train_for_stats(tiny_data_copy):
    test_only = load_dataset(tiny_data_copy, train=False, progress=False)
    both = load_dataset(tiny_data_copy, progress=False)
    assert test_only.train is None and test_only.norm_source == "train split"
    assert test_only.mean == both.mean and test_only.std == both.std


def test_test_split_alone_without_train_falls_back_to_cifar10(tiny_data_copy):
    import shutil
    shutil.rmtree(tiny_data_copy / "train")
    ds = load_dataset(tiny_data_copy, train=False, progress=False)
    assert ds.norm_source == "cifar10 default"
    assert ds.mean == data.CIFAR10_MEAN and ds.std == data.CIFAR10_STD
    assert "no train/" in ds.info["norm_note"]


@pytest.mark.parametrize("train", [True, False])
def test_given_stats_are_used(tiny_data_copy, monkeypatch, train):
    decoded = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda args: decoded.append(Path(args[0])) or real(args))
    ds = load_dataset(tiny_data_copy, train=train, progress=False, mean=[0.1, 0.2, 0.3], std=(0.4, 0.5, 0.6))
    assert ds.mean == (0.1, 0.2, 0.3) and ds.std == (0.4, 0.5, 0.6) and ds.norm_source == "given"
    splits = {p.relative_to(tiny_data_copy).parts[0] for p in decoded}
    assert splits == ({"train", "test"} if train else {"test"})  # no train decode just for statistics
    # And batches normalize with them.
    x, _ = next(iter(Batches(ds.test, 2, ds.mean, ds.std)))
    ref = (ds.test.images[:2].double() / 255 - torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(x.double(), ref, atol=1e-5)


@pytest.mark.parametrize("mean, std", [((0.5, 0.5), (0.2,) * 3), ((0.5,) * 3, None), (None, (0.2,) * 3),
                                       ((0.5,) * 3, (0.2, 0.0, 0.2)), ((0.5,) * 3, ("x", 1, 1))])
def test_bad_given_stats(tiny_data_dir, mean, std):
    with pytest.raises(QuantbenchError, match="normalization") as e:
        load_dataset(tiny_data_dir, progress=False, mean=mean, std=std)
    _one_line(e)


def test_cifar10_constants_resize_and_given(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:
        classes = ["a", "b"]

        def __init__(self, root, train, download):
            self.data = np.full((4, 32, 32, 3), 90, dtype=np.uint8)
            self.targets = [0, 1, 0, 1]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_dataset(None, data_root=tmp_path)
    assert ds.norm_source == "cifar10 default" and ds.mean == data.CIFAR10_MEAN and ds.input_shape == (3, 32, 32)
    ds = load_dataset(None, tmp_path, True, 16, mean=(0.1,) * 3, std=(0.2,) * 3)  # positional args still work
    assert ds.input_shape == (3, 16, 16) and ds.train.images.shape == (4, 3, 16, 16)
    assert (ds.test.images == 90).all()  # a flat image stays flat
    assert ds.norm_source == "given" and ds.mean == (0.1,) * 3


# ---------------------------------------------------------------- Ctrl-C during a pool decode
_INTERRUPT_SCRIPT = textwrap.dedent(r"""
    import os, signal, sys, time
    from quantbench import data

    # as in a terminal: a test runner started in the background (CI, `cmd &`) hands its children
    # SIGINT ignored, and this script plays the CLI the user runs in the foreground
    signal.signal(signal.SIGINT, signal.default_int_handler)

    real_decode = data._decode

    def slow_decode(args):  # runs in the pool's workers (forked after this patch)
        os.write(1, b"decoding\n")  # one write(2): lines of two workers do not interleave
        time.sleep(0.02)
        return real_decode(args)

    data._decode = slow_decode
    data.POOL_MIN_IMAGES = 50
    data.POOL_MAX_WORKERS = 2
    try:
        data.load_dataset(sys.argv[1], train=False, progress=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    except KeyboardInterrupt:  # what the CLI does: one line
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    print("finished", file=sys.stderr)
""")


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix" or (os.cpu_count() or 1) < 2, reason="needs POSIX process groups and a pool")
def test_ctrl_c_during_pool_decode_prints_no_worker_tracebacks(tmp_path):
    root = _folder(tmp_path / "d", ["a", "b"], per_class=(0, 200), size=(4, 4))
    (tmp_path / "run.py").write_text(_INTERRUPT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(quantbench.__file__).parents[1]))
    # A terminal's Ctrl-C signals the whole foreground process group: the parent and every worker.
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "decoding"  # a worker is decoding now
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == ["interrupted"] and proc.returncode == 130
