"""Pretrained weights in (quantbench.weights): torchvision's names, local files, timm; every
weights file here is made by the test (no network)."""
from __future__ import annotations

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
                ["replicate", "--output", str(tmp_path / "run")]):
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
