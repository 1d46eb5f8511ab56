"""quantbench.models beyond ResNet: every torchvision classifier, the quantizable twins, the
user's own model (--model FILE.py:FUNCTION), checkpoints of any of them, vit_tiny, and PT2E
capture of models that call one module more than once.

Kept fast: the full list is only constructed on the meta device (shapes, no memory, no
initialization); real forwards and quantization use the small members of each family."""
from __future__ import annotations

import copy

import textwrap

import pytest
import torch
from torch import nn

from quantbench import models
from quantbench.errors import QuantbenchError

# The smallest square input each family takes (the others take 32x32): alexnet's and
# inception_v3's stems shrink the image below their kernels, maxvit's attention windows need
# 224 (7x7 windows at 1/32 scale), vit_h_14's patches are 14 pixels.
MIN_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, "vit_h_14": 28}
# One (small) member per family: forwards on the meta device, shapes only.
FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "resnet18",
            "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11_bn",
            "vit_b_32", "vit_h_14", "wide_resnet50_2", "vit_tiny"]


def _x(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _shape_input(arch: str) -> tuple[int, int, int]:
    s = MIN_SIZE.get(arch, 32)
    return (3, s, s)


# ---------------------------------------------------------------- the registry
def test_list_archs_is_torchvision_plus_ours():
    import torchvision.models as M
    archs = models.list_archs()
    assert set(M.list_models(module=M)) | {"resnet10", "vit_tiny"} == set(archs)
    assert archs == sorted(archs) and len(archs) > 70


@pytest.mark.slow
def test_every_arch_constructs_with_our_class_count():
    # regnet computes its widths with tensor ops, which the meta device cannot read back:
    # its two smallest members are built for real below.
    for arch in models.list_archs():
        if arch.startswith("regnet"):
            continue
        with torch.device("meta"):
            m = models.build(arch, 7, input_shape=_shape_input(arch))
        outs = [t.shape for n, t in m.state_dict().items() if t.dim() >= 1 and t.shape[0] == 7]
        assert outs, f"{arch}: no tensor has 7 rows (num_classes ignored?)"


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_output_shape(arch):
    c, h, w = _shape_input(arch)
    with torch.device("meta"):
        y = models.build(arch, 7, input_shape=(c, h, w)).eval()(torch.empty(1, c, h, w))
    assert tuple(y.shape) == (1, 7)


@pytest.mark.parametrize("arch", ["resnet10", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
                                  "regnet_x_400mf", "regnet_y_400mf", "vit_tiny"])
def test_real_forward(arch):
    model = models.build(arch, 7).eval()
    with torch.no_grad():
        y = model(_x())
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_unknown_arch_suggests_close_names():
    with pytest.raises(QuantbenchError, match=r"unknown architecture 'mobilenetv2'; did you mean mobilenet_v2"):
        models.build("mobilenetv2", 10)
    with pytest.raises(QuantbenchError, match="unknown architecture 'zzz'; choose a torchvision"):
        models.build("zzz", 10)


def test_image_size_dependent_archs():
    with torch.device("meta"):
        vit = models.build("vit_b_16", 7, input_shape=(3, 64, 64))
    assert vit.image_size == 64
    with pytest.raises(QuantbenchError, match=r"cannot build vit_h_14 for 32x32 images: .*patch size"):
        models.build("vit_h_14", 7)
    with pytest.raises(QuantbenchError, match="3-channel images, not 1"):
        models.build("resnet18", 7, input_shape=(1, 28, 28))
    with pytest.raises(QuantbenchError, match=r"input_shape must be \[C, H, W\]"):
        models.build("resnet18", 7, input_shape=(32, 32))


# ---------------------------------------------------------------- quantizable twins
TWINS = ["resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "mobilenet_v2",
         "mobilenet_v3_large", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
         "shufflenet_v2_x2_0", "googlenet", "inception_v3"]


def test_twin_mapping():
    assert [a for a in models.list_archs() if models.has_quantizable_twin(a)] == sorted(TWINS)
    assert not models.has_quantizable_twin("efficientnet_b0")
    with pytest.raises(QuantbenchError, match=r"efficientnet_b0 has no quantizable twin .*"
                                              r"use --flow fx or --flow pt2e"):
        models.build("efficientnet_b0", 10, quantizable=True)


@pytest.mark.parametrize("arch", TWINS)
def test_twin_takes_the_float_state_dict(arch):
    """Same parameter names and shapes: an fp32 checkpoint loads into the twin strictly."""
    with torch.device("meta"):
        f, q = models.build(arch, 7), models.build(arch, 7, quantizable=True)
    assert hasattr(q, "fuse_model") and hasattr(q, "quant")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(f) == shapes(q)


def test_mobilenet_v2_twin_keeps_relu6():
    """torchvision's twin builder swaps ReLU6 for ReLU; ours computes what the float model does,
    fused too. A large batch-norm scale in the stem pushes activations past 6, where the two
    differ (only there: scaling every layer would make rounding differences explode)."""
    from torchvision.models import get_model
    torch.manual_seed(0)
    f = models.build("mobilenet_v2", 5).eval()
    with torch.no_grad():
        f.features[0][1].weight.mul_(20)
        nn.init.normal_(f.classifier[1].weight)
    q = models.build("mobilenet_v2", 5, quantizable=True).eval()
    q.load_state_dict(f.state_dict())
    torchvision_twin = get_model("quantized_mobilenet_v2", weights=None, quantize=False, num_classes=5).eval()
    torchvision_twin.load_state_dict(f.state_dict())
    x = _x()
    with torch.no_grad():
        expected = f(x)
        assert torch.allclose(q(x), expected)
        assert not torch.allclose(torchvision_twin(x), expected, rtol=1e-2)
        q.fuse_model()
        assert any(type(m).__name__ == "ConvReLU2d" for m in q.modules())
        assert torch.allclose(q(x), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


# ---------------------------------------------------------------- the user's own model
USER_MODULE = """
import pathlib
from torch import nn

# Counts imports, so a test can tell whether quantbench ran this file.
_marker = pathlib.Path(__file__).with_suffix(".imported")
_marker.write_text(_marker.read_text() + "x" if _marker.exists() else "x")

def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))

NOT_A_FUNCTION = 3

def wrong_type(num_classes):
    return "a model"

def broken(num_classes):
    raise ValueError("width must be even")
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    return path


def _imports(path) -> int:
    marker = path.with_suffix(".imported")
    return len(marker.read_text()) if marker.exists() else 0


def test_load_builder_from_file(user_file):
    build = models.load_builder(f"{user_file}:build")
    m = build(6)
    assert isinstance(m, nn.Module) and m(_x()).shape == (2, 6) and _imports(user_file) == 1


def test_load_builder_from_module(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert models.load_builder("mynet:build")(3)[-1].out_features == 3


@pytest.mark.parametrize("spec, message", [
    ("{dir}/nope.py:build", r"model file not found: .*nope.py"),
    ("{file}:missing", r"mynet.py has no function 'missing'"),
    ("{file}:NOT_A_FUNCTION", r"mynet.py:NOT_A_FUNCTION is a int, not a function"),
    ("{file}", r"--model wants FILE.py:FUNCTION"),
    ("no_such_package_qb.sub:build", r"cannot import no_such_package_qb.sub: ModuleNotFoundError"),
])
def test_load_builder_errors(user_file, spec, message):
    with pytest.raises(QuantbenchError, match=message):
        models.load_builder(spec.format(dir=user_file.parent, file=user_file))


def test_user_build_errors(user_file, tmp_path):
    with pytest.raises(QuantbenchError, match=r"mynet.py:wrong_type returned a str, not a torch.nn.Module"):
        models.load_builder(f"{user_file}:wrong_type")(3)
    with pytest.raises(QuantbenchError, match=r"mynet.py:broken\(3\) failed: ValueError: width must be even"):
        models.load_builder(f"{user_file}:broken")(3)
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nraise ImportError('needs timm')\n")
    with pytest.raises(QuantbenchError, match=r"cannot import .*bad.py: ImportError: needs timm"):
        models.load_builder(f"{bad}:build")
    bad.write_text("def build(:\n")
    with pytest.raises(QuantbenchError, match=r"cannot import .*bad.py: SyntaxError"):
        models.load_builder(f"{bad}:build")


def test_build_model_and_meta(user_file):
    spec = f"{user_file}:build"
    assert isinstance(models.build_model(model=spec, num_classes=4), nn.Sequential)
    assert models.build_model(arch="resnet10", num_classes=4).fc.out_features == 4
    with pytest.raises(QuantbenchError, match="not both"):
        models.build_model(arch="resnet10", model=spec, num_classes=4)
    with pytest.raises(QuantbenchError, match="has no quantizable twin"):
        models.build_model(model=spec, num_classes=4, quantizable=True)
    assert models.model_meta(model=spec, input_shape=(3, 32, 32)) == {"model": spec, "input_shape": [3, 32, 32]}
    assert models.model_meta(arch="vit_tiny") == {"arch": "vit_tiny"}
    assert models.input_shape_of({}) == (3, 32, 32)
    assert models.input_shape_of({"input_shape": [1, 28, 28]}) == (1, 28, 28)


# ---------------------------------------------------------------- checkpoints of any model
def _same_state(model: nn.Module, state: dict) -> bool:
    ours = model.state_dict()
    return ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)


def test_checkpoint_round_trip_non_resnet(tmp_path):
    # squeezenet's classifier is a 1x1 convolution: no fc, no 2-D weight.
    model = models.build("squeezenet1_1", 5).eval()
    path = tmp_path / "sq.pth"
    models.save_checkpoint(path, model, {**models.model_meta("squeezenet1_1"), "num_classes": 5})
    loaded, meta = models.load_checkpoint(path, num_classes=5)
    assert _same_state(loaded, model.state_dict()) and meta["arch"] == "squeezenet1_1"
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
    # A bare state dict: the class count is read off the classifier, wherever it is.
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    again, meta = models.load_checkpoint(bare, arch="squeezenet1_1")
    assert meta["num_classes"] == 5 and _same_state(again, model.state_dict())
    with pytest.raises(QuantbenchError, match="has 5 output classes but the data has 3"):
        models.load_checkpoint(bare, arch="squeezenet1_1", num_classes=3)
    with pytest.raises(QuantbenchError, match=r"not a mobilenet_v3_small checkpoint \(it has no classifier.3.weight\)"):
        models.load_checkpoint(bare, arch="mobilenet_v3_small")


def test_checkpoint_records_input_shape(tmp_path):
    """vit's position embeddings depend on the image size: the meta's input_shape rebuilds it."""
    model = models.build("vit_tiny", 4, input_shape=(3, 48, 48))
    path = tmp_path / "vit.pth"
    models.save_checkpoint(path, model, {**models.model_meta("vit_tiny", input_shape=(3, 48, 48)), "num_classes": 4})
    loaded, meta = models.load_checkpoint(path)
    assert loaded.image_size == 48 and meta["input_shape"] == [3, 48, 48]
    assert _same_state(loaded, model.state_dict())
    blob = torch.load(path, weights_only=True)
    del blob["meta"]["input_shape"]  # then it is built for 32x32, and does not fit
    torch.save(blob, path)
    with pytest.raises(QuantbenchError, match="does not fit vit_tiny"):
        models.load_checkpoint(path)


def test_user_model_checkpoint(user_file, tmp_path):
    spec = f"{user_file}:build"
    model = models.load_builder(spec)(4).eval()
    path = tmp_path / "mine.pth"
    models.save_checkpoint(path, model, {**models.model_meta(model=spec), "num_classes": 4})
    n = _imports(user_file)
    # Without the spec, loading refuses and runs none of the user's code.
    with pytest.raises(QuantbenchError, match=r"holds a user model built by .*mynet.py:build; pass --model"):
        models.load_checkpoint(path)
    with pytest.raises(QuantbenchError, match="pass --model"):
        models.load_checkpoint(path, arch="resnet18")
    with pytest.raises(QuantbenchError, match="has no quantizable twin"):
        models.load_checkpoint(path, model=spec, quantizable=True)
    assert _imports(user_file) == n
    loaded, meta = models.load_checkpoint(path, model=spec)
    assert _same_state(loaded, model.state_dict()) and meta["model"] == spec and "arch" not in meta
    # A bare state dict with the spec: the class count comes from the user's model too.
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    assert models.load_checkpoint(bare, model=spec)[1]["num_classes"] == 4
    # An architecture's checkpoint is not a user model.
    r10 = tmp_path / "r10.pth"
    models.save_checkpoint(r10, models.build("resnet10", 4), {"arch": "resnet10"})
    with pytest.raises(QuantbenchError, match="holds a resnet10, not a user model"):
        models.load_checkpoint(r10, model=spec)


# ---------------------------------------------------------------- vit_tiny and dynamic quantization
def _vit_with_head(k: int = 10) -> nn.Module:
    # torchvision zero-initializes the head, which would make every output 0.
    torch.manual_seed(0)
    model = models.build("vit_tiny", k).eval()
    nn.init.normal_(model.heads.head.weight, std=0.2)
    return model


def test_vit_tiny_eager_dynamic_quantization():
    from torch.ao.nn.quantized import dynamic as nnqd

    from quantbench.flows import eager
    model = _vit_with_head()
    assert model.image_size == 32 and model.patch_size == 4 and len(model.encoder.layers) == 6
    x = _x()
    with torch.no_grad():
        expected = model(x)
        plain = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        qmodel, applied = eager.quantize_dynamic(model, "default", x[:1])
        got = qmodel(x)
    # torch alone: two MLP Linears per layer and the head; nn.MultiheadAttention's projections
    # are not nn.Linear modules and stay fp32
    assert sum(isinstance(m, nnqd.Linear) for m in plain.modules()) == 6 * 2 + 1
    # the flow splits attention into Linear projections first: two more per layer
    assert sum(isinstance(m, nnqd.Linear) for m in qmodel.modules()) == 6 * 4 + 1
    assert "6 nn.MultiheadAttention split" in applied["attention"]
    assert got.shape == (2, 10)
    assert 0 < (got - expected).norm() / expected.norm() < 0.1


def test_vit_tiny_fx_dynamic_quantizes_attention_too():
    from torch.ao.nn.quantized import dynamic as nnqd

    from quantbench.flows import fx
    model = _vit_with_head()
    x = _x()
    with torch.no_grad():
        expected = model(x)
        qmodel, applied = fx.quantize_dynamic(model, "default", x[:1])
        got = qmodel(x)
    assert sum(isinstance(m, nnqd.Linear) for m in qmodel.modules()) == 6 * 4 + 1
    assert "6 nn.MultiheadAttention split" in applied["attention"]
    assert 0 < (got - expected).norm() / expected.norm() < 0.1


def test_split_attention_is_exact_and_refuses_what_it_does_not_cover():
    from quantbench.flows.attention import SplitAttention, split_attention
    model = _vit_with_head()
    x = _x()
    with torch.no_grad():
        expected = model(x)
        assert split_attention(model, x) == 6
        assert torch.allclose(model(x), expected, atol=1e-5)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    with pytest.raises(RuntimeError, match="unmasked self-attention"):
        SplitAttention(mha)(torch.zeros(1, 3, 8), None, None, need_weights=True)
    not_batch_first = nn.Sequential(nn.MultiheadAttention(8, 2))
    assert split_attention(not_batch_first, torch.zeros(3, 1, 8)) == 0


# ---------------------------------------------------------------- PT2E capture
class SharedCalls(nn.Module):
    """One Hardswish and one conv module, each called twice; one ReLU called three times."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Hardswish()
        self.relu = nn.ReLU()
        self.stem = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.relu(self.bn(self.conv(x)) + x)
        return self.relu(self.act(self.conv(self.act(y)))).mean((2, 3))


def _quantize_ops(gm) -> int:
    return sum("quantize_per_tensor" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_one_partition_per_call_names_each_call():
    from quantbench.flows import pt2e
    gm = torch.export.export(SharedCalls().eval(), (_x(8),)).module()
    pt2e._one_partition_per_call(gm)
    names = [list(n.meta["nn_module_stack"].values())[-1][0] for n in gm.graph.nodes
             if n.op == "call_function" and n.meta.get("nn_module_stack")]
    assert {"relu", "relu@1", "relu@2", "act", "act@1", "conv", "conv@1"} <= set(names)


@pytest.mark.parametrize("arch", ["shared", "resnet10", "bottleneck"])
def test_pt2e_static_with_modules_called_twice(arch, monkeypatch):
    from torchvision.models.resnet import Bottleneck, ResNet
    from quantbench.flows import pt2e
    build = {"shared": SharedCalls, "resnet10": lambda: models.build("resnet10", 10),
             # resnet50's block (one ReLU called three times), one block per stage
             "bottleneck": lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)}[arch]
    x = _x()
    prepared = pt2e.prepare(build(), "default", qat=False, example=x[:1])
    with torch.no_grad():
        prepared(x)
    converted = pt2e.convert(prepared)
    assert _quantize_ops(converted) > 0
    with torch.no_grad():
        assert torch.isfinite(converted(x)).all()
    # Without the pass, the quantizer refuses these models.
    monkeypatch.setattr(pt2e, "_one_partition_per_call", lambda gm: None)
    with pytest.raises(ValueError, match="more than one output node"):
        pt2e.prepare(build(), "default", qat=False, example=x[:1])


@pytest.mark.slow
def test_pt2e_vit_tiny_static_and_dynamic():
    from quantbench.flows import pt2e
    x = _x()
    prepared = pt2e.prepare(_vit_with_head(), "default", qat=False, example=x[:1])
    with torch.no_grad():
        prepared(x)
    assert _quantize_ops(pt2e.convert(prepared)) > 0
    model = _vit_with_head()
    with torch.no_grad():
        expected = model(x)
        dq, applied = pt2e.quantize_dynamic(model, "default", x[:1])
        got = dq(x)
    # Dynamic: the activations' scales are computed per batch in the graph.
    assert any("choose_qparams" in str(n.target) for n in dq.graph.nodes) and applied["activations"]["dynamic"]
    assert 0 < (got - expected).norm() / expected.norm() < 0.1


def test_fx_observes_relu6_outputs_on_their_own_range():
    """conv -> bn -> ReLU6 (MobileNetV2): FX gets conv -> bn -> ReLU -> ReLU6, which is the same
    function, and fuses conv+bn+relu into one int8 kernel observed on [0, max]."""
    import torch.ao.nn.intrinsic as nni

    from quantbench.flows import fx
    torch.manual_seed(0)
    model = models.build("mobilenet_v2", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert fx.relu_before_relu6(model) == 35  # every Conv2dNormActivation of MobileNetV2
        assert torch.equal(model(x), expected)
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()).eval()
    prepared = fx.prepare(small, "default", qat=False, example=x[:1])
    assert any(isinstance(m, nni.ConvReLU2d) for m in prepared.modules())
