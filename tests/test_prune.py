"""Dead-tap pruning (quantbench.prune): exact on every conv geometry, crops the layers it should and
only those, keeps the model usable by the eager (fuse_model), FX and PT2E flows, and undoes itself
when verification fails."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from quantbench import models, prune
from quantbench.errors import QuantbenchError
from quantbench.prune import live_taps, prune_dead_taps


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics, so a wrong conv is not hidden by a near-constant output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _resnet18(quantizable: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(models.build("resnet18", 10, quantizable=quantizable))


def _out(model, x):
    with torch.no_grad():
        return model(x)


class Tiny(nn.Module):
    """A 5x5 stride-2 conv, a depthwise 3x3 conv and a pointwise head, for non-square inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 5, stride=2, padding=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.down(torch.relu(self.stem(x)))))))


def test_live_taps_by_hand():
    assert live_taps(1, 3, 1, 1, 1) == [1]         # 3x3 on a 1x1 map: the centre only
    assert live_taps(2, 3, 2, 1, 1) == [1, 2]      # stride 2 on 2 pixels: the first tap reads padding
    assert live_taps(32, 3, 1, 1, 1) == [0, 1, 2]  # a big map: every tap is live
    assert live_taps(1, 5, 3, 4, 4) == [1, 4]      # stride > map: live taps need not be contiguous


def test_any_geometry_is_exact():
    """Single random convs (kernel, stride, padding incl. "same", dilation, groups, H != W): the
    pruned conv gives the same outputs, and it is never bigger than the original."""
    rng = random.Random(0)
    pruned, skipped = 0, set()
    for case in range(300):
        k = (rng.randint(1, 7), rng.randint(1, 7))
        d = (rng.randint(1, 3), rng.randint(1, 2))
        if case % 10 == 0:
            s, p = (1, 1), "same"  # asymmetric padding for even kernels
        else:
            s = (rng.randint(1, 4), rng.randint(1, 4))
            p = (rng.randint(0, d[0] * (k[0] - 1)), rng.randint(0, d[1] * (k[1] - 1)))
        groups = rng.choice([1, 2])
        hw = (rng.randint(1, 6), rng.randint(1, 6))
        if p != "same" and any(hw[i] + 2 * p[i] < d[i] * (k[i] - 1) + 1 for i in range(2)):
            continue  # no output position at all
        torch.manual_seed(case)
        conv = nn.Conv2d(2, 4, k, stride=s, padding=p, dilation=d, groups=groups).eval()
        model = nn.Sequential(conv)
        x = torch.randn(3, 2, *hw)
        before = _out(model, x)
        report = prune_dead_taps(model, (2, *hw), verify=False)
        after = _out(model, x)
        assert after.shape == before.shape, (case, k, s, p, d, hw)
        assert torch.allclose(after, before, atol=1e-5), (case, k, s, p, d, hw)
        new = model[0]
        assert type(new) is nn.Conv2d and all(new.kernel_size[i] <= k[i] for i in range(2))
        if report.layers:
            pruned += 1
            assert new is not conv and report.layers[0].new_kernel == new.kernel_size
            assert report.layers[0].weights_after < report.layers[0].weights_before
        else:
            assert new is conv
            skipped.update(report.skipped.values())
    assert pruned > 50  # the random cases do exercise cropping
    assert any("no symmetric equivalent" in why for why in skipped)  # "same" with an even kernel


def test_tiny_model_depthwise_5x5_stride2_non_square():
    torch.manual_seed(0)
    model = Tiny().eval()
    keep_stem, keep_head = model.stem, model.head
    dw_weight, down_weight, down_bias = model.dw.weight.clone(), model.down.weight.clone(), model.down.bias.clone()
    x = torch.randn(4, 3, 6, 2)
    before = _out(model, x)
    report = prune_dead_taps(model, (3, 6, 2))
    assert torch.allclose(_out(model, x), before, atol=1e-4)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    got = {layer.name: (layer.input_hw, layer.new_kernel, layer.new_padding) for layer in report.layers}
    # down: 5x5, stride 2, padding 2 on 6x2 -> rows: every tap is live; cols (2 px -> 1 output):
    # taps 2, 3 live, padding (0 before, 1 after) -> symmetric as a 2-wide kernel with padding 0.
    # dw: 3x3 on the 3x1 result -> the middle column only.
    assert got == {"down": ((6, 2), (5, 2), (2, 0)), "dw": ((3, 1), (3, 1), (1, 0))}
    assert model.stem is keep_stem and model.head is keep_head  # nothing to gain: left alone
    assert model.dw.groups == 8 and model.dw.bias is None
    assert torch.equal(model.dw.weight, dw_weight[:, :, :, 1:2])
    assert torch.equal(model.down.weight, down_weight[:, :, :, 2:4]) and torch.equal(model.down.bias, down_bias)


def test_resnet18_at_32x32():
    model = _resnet18()
    untouched = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x = torch.randn(4, 3, 32, 32)
    before = _out(model, x)
    report = prune_dead_taps(model, (3, 32, 32))
    assert torch.allclose(_out(model, x), before, atol=1e-4)
    # layer4 runs on 2x2 (its strided first conv) and then 1x1 maps.
    assert {layer.name: layer.new_kernel for layer in report.layers} == {
        "layer4.0.conv1": (2, 2), "layer4.0.conv2": (1, 1), "layer4.1.conv1": (1, 1), "layer4.1.conv2": (1, 1)}
    assert model.layer4[1].conv1.padding == (0, 0) and model.layer4[0].conv1.stride == (2, 2)
    assert model.layer4[1].conv1.weight.shape == (512, 512, 1, 1)
    assert torch.equal(model.layer4[1].conv1.weight[..., 0, 0], untouched["layer4.1.conv1"].weight[..., 1, 1])
    # The 7x7 stem sees the 32x32 image, layer1-3 maps of 8x8 and more: all taps live.
    for name, conv in untouched.items():
        if name not in {layer.name for layer in report.layers}:
            assert model.get_submodule(name) is conv, name
    assert model.conv1 is untouched["conv1"] and model.layer4[0].downsample[0] is untouched["layer4.0.downsample.0"]
    assert report.convs_seen == 20 and report.skipped == {}
    assert report.weights_before == 9 * 512 * 512 * 3 + 9 * 256 * 512
    assert report.weights_after == 512 * 512 * 3 + 4 * 256 * 512
    d = json.loads(json.dumps(report.to_dict()))
    assert d["input_shape"] == [3, 32, 32] and len(d["layers"]) == 4 and d["weights_after"] == report.weights_after


def test_big_input_prunes_nothing():
    model = _resnet18()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = prune_dead_taps(model, (3, 224, 224))
    assert report.layers == [] and report.max_abs_diff == 0.0
    assert all(model.get_submodule(n) is m for n, m in convs.items())


def test_real_images_are_read_only_when_something_was_pruned():
    # At 224 nothing is pruned: the check's real images (256 of them, 150 MB at 224) are never read
    calls = []
    prune_dead_taps(_resnet18(), (3, 224, 224), inputs=lambda: calls.append(1) or torch.randn(2, 3, 224, 224))
    assert calls == []
    report = prune_dead_taps(_resnet18(), (3, 32, 32), inputs=lambda: calls.append(1) or torch.randn(2, 3, 32, 32))
    assert calls == [1] and report.layers
    with pytest.raises(QuantbenchError, match="verification inputs have shape"):
        prune_dead_taps(_resnet18(), (3, 32, 32), inputs=lambda: torch.randn(2, 3, 16, 16))


def test_verifying_passes_hold_a_bounded_number_of_pixels():
    assert prune.verify_batch((3, 32, 32)) == prune.VERIFY_BATCH
    assert prune.verify_batch((3, 224, 224)) * 224 * 224 <= prune.VERIFY_PIXELS
    assert prune.verify_batch((3, 224, 224)) >= 1 and prune.verify_batch((3, 4096, 4096)) == 1


def test_eager_fuse_and_static_int8_after_pruning():
    """The quantizable twin keeps its module names, so fuse_model() and eager static quantization
    work on the pruned model, and the int8 model follows the fp32 one."""
    from torch.ao import quantization as tq
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d as QConvReLU2d

    from quantbench.qconfigs import qconfig

    model = _resnet18(quantizable=True)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fp32 = _out(model, calib)
    prune_dead_taps(model, (3, 32, 32))
    model.fuse_model()
    assert model.layer4[1].conv1[0].kernel_size == (1, 1)  # conv+bn+relu fused into the cropped conv
    model.qconfig = qconfig("default")
    tq.prepare(model, inplace=True)
    _out(model, calib)
    tq.convert(model, inplace=True)
    q = model.layer4[1].conv1
    assert isinstance(q, QConvReLU2d) and q.kernel_size == (1, 1)
    int8 = _out(model, calib)
    assert int8.shape == fp32.shape and torch.isfinite(int8).all()
    err = (int8 - fp32).norm() / fp32.norm()
    assert err < 0.2, f"int8 logits differ from fp32 by {err:.2f} (relative)"


def test_fx_and_export_trace_pruned_model():
    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(2, 3, 6, 2)
    prune_dead_taps(model, (3, 6, 2))
    ref = _out(model, x)
    exported = torch.export.export(model, (x,)).module()
    assert torch.allclose(exported(x), ref, atol=1e-5)
    prepared = prepare_fx(model, QConfigMapping().set_global(get_default_qconfig("x86")), (x,))
    _out(prepared, x)
    converted = convert_fx(prepared)
    assert _out(converted, x).shape == ref.shape


def test_failed_verification_restores_the_model(monkeypatch):
    model = _resnet18()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x = torch.randn(2, 3, 32, 32)
    before = _out(model, x)
    real = prune._cropped_conv

    def broken(conv, plan):  # a crop that is wrong for one layer only
        new = real(conv, plan)
        if conv is convs["layer4.1.conv1"]:
            with torch.no_grad():
                new.weight.mul_(1.5)
        return new

    monkeypatch.setattr(prune, "_cropped_conv", broken)
    with pytest.raises(QuantbenchError, match=r"worst layer layer4\.1\.conv1 .*restored"):
        prune_dead_taps(model, (3, 32, 32))
    assert all(model.get_submodule(n) is m for n, m in convs.items())
    assert torch.equal(_out(model, x), before)


def test_real_inputs_are_checked_too(monkeypatch):
    """`inputs` go through verification: here a wrong crop only shows on inputs far above zero,
    which the random normal inputs never reach (the ReLU(x - 10) in front zeroes them)."""
    class Gate(nn.Module):
        def forward(self, x):
            return torch.relu(x - 10)

    torch.manual_seed(0)
    model = nn.Sequential(Gate(), nn.Conv2d(3, 4, 3, padding=1)).eval()
    real = prune._cropped_conv

    def broken(conv, plan):
        new = real(conv, plan)
        with torch.no_grad():
            new.weight.mul_(2)
        return new

    monkeypatch.setattr(prune, "_cropped_conv", broken)
    report = prune_dead_taps(model, (3, 1, 1))  # random inputs alone: the broken crop passes
    assert report.layers[0].new_kernel == (1, 1) and report.max_abs_diff == 0.0

    model = nn.Sequential(Gate(), nn.Conv2d(3, 4, 3, padding=1)).eval()
    conv = model[1]
    with pytest.raises(QuantbenchError, match="worst layer 1 "):
        prune_dead_taps(model, (3, 1, 1), inputs=torch.full((5, 3, 1, 1), 20.0))
    assert model[1] is conv
    with pytest.raises(QuantbenchError, match="verification inputs have shape"):
        prune_dead_taps(model, (3, 1, 1), inputs=torch.randn(2, 3, 16, 16))


def test_shared_conv_and_bad_inputs():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv, nn.ReLU(), conv).eval()  # one conv, two names
    x = torch.randn(2, 4, 8, 8)
    before = _out(model, x)
    report = prune_dead_taps(model, (4, 8, 8))
    assert [layer.name for layer in report.layers] == ["1"]
    assert model[1] is model[3] and model[1].kernel_size == (1, 1)
    assert torch.allclose(_out(model, x), before, atol=1e-5)
    with pytest.raises(QuantbenchError, match="input_shape"):
        prune_dead_taps(model, (8, 8))
    with pytest.raises(QuantbenchError, match="does not run on an input of shape"):
        prune_dead_taps(model, (3, 8, 8))  # 3 channels for a 4-channel conv


@pytest.mark.parametrize("quantizable", [False, True])
def test_torchvision_resnet18_at_224_reports_nothing_to_prune(quantizable):
    """At 224x224 no convolution of ResNet-18 (or its quantizable twin, which the eager flow
    prunes) has a tap that sees only padding: the record says so, and nothing fails or changes."""
    from quantbench.export import prune_for_export
    model = models.build("resnet18", 100, quantizable=quantizable, input_shape=(3, 224, 224)).eval()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rec = prune_for_export(model, (3, 224, 224))
    assert rec["applied"] is False and rec["layers"] == [] and rec["convs_seen"] == 20
    assert rec["why"].startswith("nothing to prune") and "3x224x224" in rec["why"]
    assert all(model.get_submodule(n) is m for n, m in convs.items())


@pytest.mark.parametrize("inputs", ["unreadable", "wrong shape"])
def test_real_images_that_cannot_be_had_leave_the_model_as_it_was(inputs):
    """The real images are read after the crops are made (only when something was pruned): an
    image that cannot be read, or images of the wrong shape, must restore the original
    convolutions as a failed verification does, not leave the model cropped and unverified."""
    model = _resnet18()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def real_images():
        if inputs == "unreadable":
            raise QuantbenchError("cannot read image val/cat/1.jpg: truncated")
        return torch.randn(2, 3, 16, 16)
    with pytest.raises(QuantbenchError, match="cannot read image|verification inputs have shape"):
        prune_dead_taps(model, (3, 32, 32), inputs=real_images)
    assert all(model.get_submodule(n) is m for n, m in convs.items())
