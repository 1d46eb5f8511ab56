"""Pretrained weights in (quantbench.weights): torchvision's names, local files, timm; every
weights file here is made by the test (no network)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from quantbench import models, weights
from quantbench.cli import main
from quantbench.errors import QuantbenchError


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Converted weights and torch's hub cache in the test's own folders; no download reaches out."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))

    def offline(url, dst, *a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    yield


def _resnet18_state(num_classes: int = 100) -> dict:
    torch.manual_seed(0)
    return models.build("resnet18", num_classes).state_dict()


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "safetensors"])
def test_a_weights_file_loads_for_resnet18_with_its_class_count(tmp_path, layout):
    state = _resnet18_state(100)
    if layout == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(state if layout == "bare" else {layout: state}, path)
    ckpt = weights.resolve("resnet18", str(path))
    model, meta = models.load_checkpoint(ckpt)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 100
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    # a torchvision architecture's file gets its pretrained preprocessing
    assert meta["preprocess"] == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["input_shape"] == [3, 224, 224]
    assert meta["weights"]["file"] == str(path.resolve())
    assert weights.resolve("resnet18", str(path)) == ckpt  # made once, then reused


def test_named_weights_offline_is_one_line_naming_the_file_and_where(capsys):
    rc = main(["quantize", "--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--method", "dynamic",
               "--output", "x.pt", "--data-dir", "/nonexistent"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    hub = torch.hub.get_dir()
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err
    assert f"{hub}/checkpoints/resnet18-f37072fd.pth" in err and "offline" in err


def test_named_weights_from_the_hub_cache_record_transforms_and_categories():
    from torchvision.models import get_model_weights
    w = get_model_weights("squeezenet1_1").IMAGENET1K_V1
    dest = weights.hub_file(w.url)
    dest.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.build("squeezenet1_1", 1000).state_dict(), dest)
    ckpt = weights.resolve("squeezenet1_1", "DEFAULT")
    _, meta = models.load_checkpoint(ckpt)
    assert meta["num_classes"] == 1000 and len(meta["categories"]) == 1000 and "classes" not in meta
    t = w.transforms()
    assert meta["preprocess"]["crop"] == t.crop_size[0] and meta["preprocess"]["resize"] == t.resize_size[0]
    assert meta["weights"]["name"] == "SqueezeNet1_1_Weights.IMAGENET1K_V1"


@pytest.mark.parametrize("argv, match", [
    (["--arch", "resnet18", "--weights", "IMAGENET9K"], "resnet18 has no weights named 'IMAGENET9K'; choose from DEFAULT, IMAGENET1K_V1"),
    (["--arch", "resnet1", "--weights", "DEFAULT"], "unknown architecture 'resnet1'"),
    (["--arch", "resnet18", "--weights", "missing.pth"], "weights file not found: missing.pth"),
    (["--arch", "resnet10", "--weights", "DEFAULT"], "resnet10 has no pretrained weights in torchvision"),
])
def test_bad_names_and_missing_files_are_one_line_before_any_data(argv, match, capsys, tmp_path):
    for cmd in (["eval"], ["quantize", "--method", "static", "--output", str(tmp_path / "q.pt")],
                ["replicate", "--output", str(tmp_path / "run")], ["bench"],
                ["train", "--output", str(tmp_path / "train")], ["sensitivity", "--output", str(tmp_path / "s")],
                ["tune", "--output", str(tmp_path / "tune")]):
        rc = main(cmd + argv + ["--data-dir", str(tmp_path / "no-such-data")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, (cmd, err)
        assert match in err, (cmd, err)


def test_a_file_that_does_not_fit_is_one_line_and_not_kept(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(models.build("resnet10", 5).state_dict(), path)
    with pytest.raises(QuantbenchError, match="does not fit resnet18"):
        weights.resolve("resnet18", str(path))
    assert not list(weights.cache_dir().glob("*.pth"))


def test_weights_file_for_the_users_builder(tmp_path):
    (tmp_path / "mine.py").write_text("import torch\n"
                                      "def build(num_classes):\n"
                                      "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, num_classes))\n")
    spec = f"{tmp_path / 'mine.py'}:build"
    net = models.load_builder(spec)(4)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "w.pth")
    ckpt = weights.resolve(None, str(tmp_path / "w.pth"), model_spec=spec)
    model, meta = models.load_checkpoint(ckpt, model=spec)
    assert meta["model"] == spec and meta["num_classes"] == 4 and "preprocess" not in meta


def test_timm_without_timm_says_how_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(QuantbenchError, match=r"pip install 'quantbench\[timm\]'"):
        weights.resolve("timm:efficientnet_b0", "pretrained")


# ---------------------------------------------------------------- the model's own preprocessing
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from quantbench import data as qdata  # noqa: E402


def write_mixed_folder(root, splits=("train", "val"), per_class=6, classes=("a", "b", "c"), seed=0):
    """An ImageFolder of JPEGs of mixed sizes and aspect ratios (40 to 90 px)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = int(rng.integers(40, 91)), int(rng.integers(40, 91))
                px = np.clip(rng.normal(60 + 60 * k, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i:03d}.jpg", quality=90)
    return root


SMALL_PRE = qdata.Preprocess(crop=32, resize=36, interpolation="bilinear")


def test_an_image_of_300x200_becomes_224x224_as_torchvision_makes_it(tmp_path):
    from torchvision.models import ResNet18_Weights
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8))
    im.save(tmp_path / "x.png")
    pre = weights.preprocess_of(ResNet18_Weights.IMAGENET1K_V1.transforms)
    assert pre == qdata.Preprocess(crop=224, resize=256, interpolation="bilinear")
    ours = torch.from_numpy(qdata._decode_preprocessed(tmp_path / "x.png", pre))
    assert ours.shape == (3, 224, 224)
    from torchvision.transforms import v2
    ref = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224)])(im)
    assert (ours.int() - ref.int()).abs().float().mean() < 1.0  # Pillow's and torch's antialias agree


def _small_checkpoint(tmp_path, pre=SMALL_PRE):
    torch.manual_seed(0)
    path = tmp_path / "w.pth"
    models.save_checkpoint(path, models.build("resnet10", 3).eval(),
                           {"arch": "resnet10", "num_classes": 3, "preprocess": pre.to_dict(),
                            "input_shape": list(pre.input_shape)})
    return path


def test_preprocess_recorded_in_meta_and_sidecar_and_used(tmp_path):
    from quantbench.export import read_sidecar
    from quantbench.record import read_record
    root = write_mixed_folder(tmp_path / "data")
    ckpt = weights.resolve("resnet10", str(_small_checkpoint(tmp_path)))
    _, meta = models.read_checkpoint(ckpt)
    assert meta["preprocess"] == SMALL_PRE.to_dict()
    out = tmp_path / "q.pt"
    assert main(["quantize", "--arch", "resnet10", "--weights", str(tmp_path / "w.pth"), "--method", "static",
                 "--flow", "fx", "--calib-samples", "4", "--output", str(out), "--data-dir", str(root),
                 "--no-progress"]) == 0
    rec = read_record(out)
    assert rec.preprocess == SMALL_PRE.to_dict() and rec.input_shape == [3, 32, 32]
    assert rec.normalize_mean == list(SMALL_PRE.mean)
    data = qdata.DataSource(root).load_for(read_sidecar(out), str(out), train=False)
    assert isinstance(data.test.images, qdata.LazyImages) and data.input_shape == (3, 32, 32)
    assert main(["eval", str(out), "--data-dir", str(root), "--no-progress"]) == 0


@pytest.mark.parametrize("bad, match", [
    ({"crop": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}, "preprocess.crop"),
    ({"crop": 224, "resize": 10**6, "mean": [0, 0, 0], "std": [1, 1, 1]}, "preprocess.resize"),
    ({"crop": 224, "interpolation": "magic", "mean": [0, 0, 0], "std": [1, 1, 1]}, "preprocess.interpolation"),
    ({"crop": 224, "mean": [0, 0], "std": [1, 1, 1]}, "preprocess.mean"),
    ({"crop": 224, "mean": [0, 0, 0], "std": [1, 0, 1]}, "positive stds"),
])
def test_bad_preprocess_in_a_sidecar_is_one_line(bad, match):
    from quantbench.record import FileRecord
    with pytest.raises(QuantbenchError, match=match):
        FileRecord.from_dict({"preprocess": bad}, "x.pt.json")


# ---------------------------------------------------------------- memory that does not grow
@pytest.fixture
def decodes(monkeypatch):
    """Every image decoded through a model's preprocessing, by file."""
    seen = []
    real = qdata._decode_preprocessed

    def counting(path, pre):
        seen.append(path)
        return real(path, pre)
    monkeypatch.setattr(qdata, "_decode_preprocessed", counting)
    return seen


def test_calibration_decodes_only_the_images_it_uses(tmp_path, decodes):
    from quantbench.quantize import QuantizeConfig, calibration_batches
    root = write_mixed_folder(tmp_path / "data", per_class=10)
    data = qdata.load_dataset(root, preprocess=SMALL_PRE)
    assert not decodes  # reading the folder decodes nothing
    q = QuantizeConfig(method="static", calib_samples=5, calib_batch_size=2)
    batches = list(calibration_batches(data, q))
    assert sum(len(x) for x, _ in batches) == 5
    assert len(decodes) == 5 and len(set(decodes)) == 5
    assert all("/train/" in str(p) for p in decodes)


def test_eval_streams_a_folder_of_mixed_sizes(tmp_path, decodes, monkeypatch):
    from quantbench.evaluate import accuracy
    root = write_mixed_folder(tmp_path / "data", splits=("val",), per_class=12)
    data = qdata.load_dataset(root, train=False, preprocess=SMALL_PRE)
    held = []
    real_take = qdata.LazyImages.take

    def take(self, idx):
        held.append(len(idx))
        return real_take(self, idx)
    monkeypatch.setattr(qdata.LazyImages, "take", take)
    model = models.build("resnet10", 3).eval()
    accuracy(model, data, batch_size=5, progress=False)
    assert sum(held) == len(data.test) == len(decodes)  # every accuracy image decoded once
    assert max(held) <= 5  # a batch at a time, never the split


def test_val_only_folder_calibrates_on_a_held_out_part_and_says_so(tmp_path):
    from quantbench.deploy import Source, Target, make
    from quantbench.quantize import QuantizeConfig
    from quantbench.record import read_record
    root = write_mixed_folder(tmp_path / "data", splits=("val",), per_class=10)
    data = qdata.load_dataset(root, train=True, preprocess=SMALL_PRE)
    calib = set(data.train.images.files(range(len(data.train))))
    measured = set(data.test.images.files(range(len(data.test))))
    assert calib and measured and not calib & measured and len(calib | measured) == 30
    again = qdata.load_dataset(root, train=False, preprocess=SMALL_PRE)  # eval: the same accuracy images
    assert set(again.test.images.files(range(len(again.test)))) == measured
    assert "held out" in data.info["calibration_images"]
    source = Source.from_checkpoint(_small_checkpoint(tmp_path), data)
    q = QuantizeConfig(method="static", calib_samples=4, prune=False)
    rec, = make(source, Target("fx", "static", q), tmp_path / "q.pt", progress=False)
    assert "held out" in read_record(tmp_path / "q.pt").calibration["images_from"]


@pytest.mark.slow
@pytest.mark.parametrize("splits", [("val",), ("train", "val")])
def test_replicate_with_weights_quantizes_and_measures_without_training(tmp_path, splits):
    import json
    root = write_mixed_folder(tmp_path / "data", splits=splits, per_class=10)
    w = _small_checkpoint(tmp_path)
    out = tmp_path / "run"
    # a val-only folder also makes ONNX Runtime's rows (in a process of their own: quantbench.apart)
    ort = splits == ("val",) and all(importlib.util.find_spec(n) for n in ("onnx", "onnxruntime"))
    assert main(["replicate", "--arch", "resnet10", "--weights", str(w), "--data-dir", str(root), "--flows", "fx",
                 "--methods", "static", "--runtimes", "onnxruntime" if ort else "none", "--timing-seconds", "0.1",
                 "--min-runs", "2", "--processes", "1", "--output", str(out), "--no-progress"]) == 0
    assert not (out / "train").exists()
    results = json.loads((out / "results.json").read_text())
    assert {m["label"] for m in results["models"]} >= {"origin-fx", "ptq-s-fx"}
    from quantbench.record import read_record
    rec = read_record(out / "models" / "ptq-s-fx.pt")
    assert rec.preprocess == SMALL_PRE.to_dict()
    assert ("held out" in rec.calibration["images_from"]) == (splits == ("val",))
    if ort:  # the runtime's int8 row was calibrated on the same held-out images, and says so
        onnx = read_record(out / "models" / "onnx-int8.onnx")
        assert onnx.calibration["images_from"] == rec.calibration["images_from"]
        assert onnx.calibration["samples"] == rec.calibration["samples"]
        assert "onnxrt-int8" in {m["label"] for m in results["models"]}


@pytest.mark.slow
def test_train_starts_from_weights_and_keeps_their_preprocessing(tmp_path):
    root = write_mixed_folder(tmp_path / "data", per_class=8)
    w = _small_checkpoint(tmp_path)
    out = tmp_path / "train"
    assert main(["train", "--arch", "resnet10", "--weights", str(w), "--data-dir", str(root), "--preset", "smoke",
                 "--epochs", "1", "--output", str(out), "--no-progress"]) == 0
    _, meta = models.read_checkpoint(out / "best.pth")
    assert meta["preprocess"] == SMALL_PRE.to_dict() and meta["input_shape"] == [3, 32, 32]
    assert meta["weights"]["file"] == str(w.resolve())


@pytest.mark.slow
def test_bench_with_weights_measures_their_fp32_row_made_once(tmp_path, capsys):
    import json
    root = write_mixed_folder(tmp_path / "data", per_class=4)
    w = _small_checkpoint(tmp_path)
    argv = ["bench", "--arch", "resnet10", "--weights", str(w), "--data-dir", str(root), "--timing-seconds", "0.1",
            "--min-runs", "2", "--processes", "1", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert "exporting the fp32 row" in capsys.readouterr().err
    row, = json.loads((tmp_path / "r.json").read_text())["models"]
    assert row["dtype"] == "fp32" and row["accuracy"] is not None and row["input_shape"] == [3, 32, 32]
    made = list(weights.cache_dir().glob("*.fp32.pt"))
    assert len(made) == 1 and row["file"] == str(made[0])
    assert main(argv) == 0 and "exporting" not in capsys.readouterr().err  # the second run reuses it
    assert main(["bench", "--arch", "resnet10", "--no-progress"]) == 2
    assert "go with --weights" in capsys.readouterr().err


@pytest.mark.slow
def test_timm_weights_file_in_eval_quantize_and_sensitivity(tmp_path, capsys):
    # a timm architecture with a weights file the test makes: timm's data config is its preprocessing
    timm = pytest.importorskip("timm")
    from quantbench.record import read_record
    root = write_mixed_folder(tmp_path / "data", per_class=4)
    torch.manual_seed(0)
    w = tmp_path / "r10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=3).state_dict(), w)
    model = ["--arch", "timm:resnet10t", "--weights", str(w), "--data-dir", str(root), "--no-progress"]
    assert main(["eval", *model, "--eval-samples", "6"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["quantize", *model, "--method", "static", "--flow", "fx", "--calib-samples", "4",
                 "--output", str(tmp_path / "q.pt")]) == 0
    rec = read_record(tmp_path / "q.pt")
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("resnet10t", pretrained=False))
    assert rec.preprocess["crop"] == cfg["input_size"][-1] and list(rec.shape) == list(cfg["input_size"])
    assert rec.preprocess["mean"] == pytest.approx(list(cfg["mean"]))
    assert main(["sensitivity", *model, "--flow", "fx", "--calib-samples", "4", "--val-samples", "6",
                 "--output", str(tmp_path / "sens")]) == 0
    assert (tmp_path / "sens" / "sensitivity.json").is_file()
