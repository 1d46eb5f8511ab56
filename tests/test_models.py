"""quantbench.models: builders, checkpoint formats and the quantizable twins."""
from __future__ import annotations

import pytest
import torch

from quantbench import models
from quantbench.errors import QuantbenchError

from conftest import make_checkpoint


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The checkpoint's weights as saved, loaded by plain torch."""
    return torch.load(tiny_checkpoint, weights_only=True)


def _same_state(model: torch.nn.Module, state: dict) -> bool:
    ours = model.state_dict()
    return ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)


def test_build_known_and_unknown():
    m = models.build("resnet10", 7)
    assert m.fc.out_features == 7
    blocks = lambda m: sum(isinstance(b, torch.nn.Module) and type(b).__name__.endswith("BasicBlock")
                           for b in m.modules())
    assert blocks(m) == 4 and blocks(models.build("resnet18", 10)) == 8
    with pytest.raises(QuantbenchError, match="unknown architecture 'vgg'"):
        models.build("vgg", 10)


def test_checkpoint_round_trip(tiny_checkpoint, reference, x):
    model, meta = models.load_checkpoint(tiny_checkpoint)
    assert not model.training
    assert meta["arch"] == "resnet10" and meta["num_classes"] == 3 and meta["classes"] == ["blue", "green", "red"]
    assert _same_state(model, reference["state_dict"])  # buffers (BN statistics) included
    again, _ = models.load_checkpoint(tiny_checkpoint, arch="resnet10", num_classes=3)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_save_checkpoint_unwraps_and_copies(tmp_path, x):
    from torch.optim.swa_utils import AveragedModel
    model = models.build("resnet10", 3).eval()
    path = tmp_path / "ema.pth"
    models.save_checkpoint(path, AveragedModel(model), meta={"arch": "resnet10"})
    loaded, _ = models.load_checkpoint(path)
    assert _same_state(loaded, model.state_dict())  # no "module." / "n_averaged" keys


def test_bare_state_dict(tmp_path, reference):
    state = reference["state_dict"]
    path = tmp_path / "bare.pth"
    torch.save(state, path)
    model, meta = models.load_checkpoint(path, arch="resnet10")
    assert _same_state(model, state) and meta["arch"] == "resnet10" and meta["num_classes"] == 3
    # Without meta nor --arch, resnet18 is assumed: a resnet10's weights don't fit it.
    with pytest.raises(QuantbenchError, match="does not fit resnet18"):
        models.load_checkpoint(path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixes_stripped(tmp_path, reference, prefix):
    state = reference["state_dict"]
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}, "meta": {"arch": "resnet10"}}, path)
    model, _ = models.load_checkpoint(path)
    assert _same_state(model, state)


def test_trainer_last_pth_format(tmp_path, reference):
    path = tmp_path / "last.pth"
    torch.save({"model": reference["state_dict"], "optimizer": {}, "epoch": 1,
                "meta": {"arch": "resnet10"}}, path)
    model, _ = models.load_checkpoint(path)
    assert _same_state(model, reference["state_dict"])


def test_quantizable_twin_same_weights_and_outputs(tiny_checkpoint, reference, x):
    from torchvision.models.quantization.resnet import QuantizableResNet
    float_model, _ = models.load_checkpoint(tiny_checkpoint)
    qmodel, _ = models.load_checkpoint(tiny_checkpoint, quantizable=True)
    assert isinstance(qmodel, QuantizableResNet) and not qmodel.training
    assert _same_state(qmodel, reference["state_dict"])
    # The twin also takes the float model's state dict strictly (same parameter names).
    models.build("resnet10", 3, quantizable=True).load_state_dict(float_model.state_dict(), strict=True)
    with torch.no_grad():
        expected = float_model(x)
        assert torch.allclose(qmodel(x), expected, atol=1e-5)
        qmodel.fuse_model()  # conv+bn(+relu) folding, as eager static quantization does
        assert torch.allclose(qmodel(x), expected, atol=1e-4)


def test_arch_mismatch_by_name(tiny_checkpoint):
    with pytest.raises(QuantbenchError, match="holds a resnet10, not a resnet18"):
        models.load_checkpoint(tiny_checkpoint, arch="resnet18")


def test_meta_arch_wrong_for_weights(tmp_path):
    path = make_checkpoint(tmp_path / "r18.pth", arch="resnet18")
    blob = torch.load(path, weights_only=True)
    blob["meta"]["arch"] = "resnet10"
    torch.save(blob, path)
    with pytest.raises(QuantbenchError, match="does not fit resnet10"):
        models.load_checkpoint(path)


def test_class_count_mismatch(tmp_path):
    path = make_checkpoint(tmp_path / "five.pth", num_classes=5)
    with pytest.raises(QuantbenchError, match="has 5 output classes but the data has 3"):
        models.load_checkpoint(path, num_classes=3)


def test_unusable_files_rejected(tmp_path, tiny_checkpoint):
    with pytest.raises(QuantbenchError, match="checkpoint not found"):
        models.load_checkpoint(tmp_path / "nope.pth")

    half = tmp_path / "half.pth"
    raw = tiny_checkpoint.read_bytes()
    half.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(QuantbenchError, match="truncated"):
        models.load_checkpoint(half)

    scripted = tmp_path / "scripted.pth"  # an export under a .pth name
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(QuantbenchError, match="exported model"):
        models.load_checkpoint(scripted)

    junk = tmp_path / "junk.pth"
    torch.save({"state_dict": {"fc.weight": [1, 2]}}, junk)
    with pytest.raises(QuantbenchError, match="state dict of tensors"):
        models.load_checkpoint(junk)

    quantized = tmp_path / "int8.pth"
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.scale": torch.tensor(0.1),
                "fc.zero_point": torch.tensor(0)}, quantized)
    with pytest.raises(QuantbenchError, match="already-quantized"):
        models.load_checkpoint(quantized)

    no_fc = tmp_path / "no_fc.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, no_fc)
    with pytest.raises(QuantbenchError, match="no fc.weight"):
        models.load_checkpoint(no_fc, arch="resnet10")


def test_failed_save_keeps_previous_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    """A disk that fills up while a checkpoint is written: one line, the old file intact, no temp."""
    import errno
    import os
    path = tmp_path / "model.pth"
    path.write_bytes(tiny_checkpoint.read_bytes())

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(QuantbenchError, match="cannot write .*model.pth: No space left on device"):
        models.save_checkpoint(path, models.build("resnet10", 3), meta={"arch": "resnet10"})
    assert path.read_bytes() == tiny_checkpoint.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]  # no temporary file left behind


# ---------------------------------------------------------------- the user's builder (--model)
def test_torchvision_builder_by_keyword_builds_offline(monkeypatch):
    """`--model torchvision.models:resnet18`, the first spec a user tries: resnet18(3) would read 3
    as the legacy `pretrained` argument and download ImageNet weights (issue 18)."""
    import torchvision.models._api

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    model = models.load_builder("torchvision.models:resnet18")(3)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 3


def test_builder_call_styles(tmp_path):
    f = tmp_path / "styles.py"
    f.write_text("import torch\n"
                 "def kw(*, num_classes, pretrained=False):\n    return torch.nn.Linear(2, num_classes)\n"
                 "def pos(k):\n    return torch.nn.Linear(2, k)\n"
                 "def none():\n    return torch.nn.Linear(2, 2)\n")
    assert models.load_builder(f"{f}:kw")(5).out_features == 5
    assert models.load_builder(f"{f}:pos")(4).out_features == 4
    with pytest.raises(QuantbenchError, match=r"styles.py:none cannot be called with the class count"):
        models.load_builder(f"{f}:none")


@pytest.mark.parametrize("code, when", [
    ("import sys\nsys.exit(3)\n", "imported"),
    ("import argparse\nargparse.ArgumentParser().parse_args(['--bogus'])\n", "imported"),
    ("import sys\ndef build(num_classes):\n    sys.exit(4)\n", "built"),
])
def test_model_file_that_exits_is_one_line(tmp_path, code, when):
    f = tmp_path / "exits.py"
    f.write_text(code + ("def build(num_classes):\n    pass\n" if "def build" not in code else ""))
    with pytest.raises(QuantbenchError, match=rf"the model file .*exits.py exited \(status \d\) while .*{when}"):
        models.load_builder(f"{f}:build")(3)


@pytest.mark.parametrize("meta, match", [
    ({"num_classes": "ten"}, "num_classes"), ({"image_size": 20000}, "image_size"),
    ({"input_shape": [3, 1, 99999]}, "input_shape"), (["arch"], "meta must be a mapping"),
    ({"normalize_std": ["a"]}, "normalize_std"), ({"classes": 5}, "classes"),
])
def test_checkpoint_meta_is_checked_when_read(meta, match, tmp_path):
    """Issue 21 items 6 and 16: what a checkpoint's meta says sizes memory later; one line if bad."""
    from quantbench.errors import QuantbenchError
    from quantbench.models import read_checkpoint
    path = tmp_path / "c.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": meta}, path)
    with pytest.raises(QuantbenchError, match=match) as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
