"""Cross-layer equalization (quantbench.equalize) and the sensitivity-driven fp32 fallback
(sensitivity.most_sensitive, --fallback K --sensitivity FILE)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quantbench import models
from quantbench.equalize import _by_input_channel, _folded_weight, equalize, find_pairs, range_evenness
from quantbench.errors import QuantbenchError
from quantbench.sensitivity import most_sensitive
from torch.ao.quantization._equalize import channel_range


def _uneven(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN gains spread over two orders of magnitude: uneven per-channel ranges, as trained nets have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(10 ** (torch.rand(m.num_features, generator=g) * 2 - 1))
                m.bias.uniform_(-0.5, 0.5, generator=g)
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _chain() -> nn.Module:
    """conv -> ReLU -> depthwise conv -> BN -> ReLU -> conv: a pair without BN, and a pair whose
    second conv is depthwise (one input channel per filter)."""
    torch.manual_seed(0)
    return _uneven(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                 nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))


def _pair_ranges(model, pair):
    bn = model.get_submodule(pair.bn) if pair.bn else None
    return (channel_range(_folded_weight(model.get_submodule(pair.conv1), bn).flatten(1), 0),
            channel_range(_by_input_channel(model.get_submodule(pair.conv2)), 0))


@pytest.mark.parametrize("build", [_chain, lambda: _uneven(models.build("resnet10", 3))], ids=["chain", "resnet10"])
def test_equalization_is_exact_and_evens_the_ranges(build):
    model = build()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    pairs, _ = find_pairs(model)
    before = range_evenness(model, pairs)
    rec = equalize(model, (3, 32, 32))
    assert rec["applied"] and rec["pairs"] == len(pairs) > 0
    with torch.no_grad():  # inputs other than the ones it verified on
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert rec["range_evenness_after"] > rec["range_evenness_before"] == pytest.approx(before, abs=1e-4)
    for pair in pairs:  # the defining property: each channel spans the same range on both sides
        r1, r2 = _pair_ranges(model, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-6)


def test_pairs_in_a_resnet_stay_inside_blocks():
    """The residual sum mixes a block's output with its input: only conv1 -> bn1 -> relu -> conv2
    inside each block is a pair."""
    pairs, skipped = find_pairs(models.build("resnet10", 3).eval())
    assert [(p.conv1, p.bn, p.conv2) for p in pairs] == [
        (f"layer{i}.0.conv1", f"layer{i}.0.bn1", f"layer{i}.0.conv2") for i in range(1, 5)]
    assert skipped == {}


def test_relu6_pairs_are_skipped_and_counted():
    torch.manual_seed(0)
    model = _uneven(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rec = equalize(model, (3, 16, 16))
    assert not rec["applied"] and rec["skipped"] == {"ReLU6 clamps at 6": 1}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_failed_check_restores_the_weights(capsys):
    model = _chain()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rec = equalize(model, (3, 32, 32), tolerance=-1.0)  # no difference can pass
    assert not rec["applied"] and "restored" in rec["why"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("WARNING: cross-layer equalization changed")


def test_quantize_records_equalization_and_eager_still_fuses(tiny_checkpoint, tiny_dataset):
    from quantbench.quantize import QuantizeConfig, quantize
    cfg = QuantizeConfig(method="static", flow="eager", weight_scheme="per-tensor", calib_samples=16,
                         equalize=True)
    qmodel, record = quantize(tiny_checkpoint, cfg, tiny_dataset, progress=False)
    eq = record["equalization"]
    assert eq["applied"] and eq["pairs"] == 4 and "real images" in eq["verified_on"]
    assert record["config"]["equalize"] is True
    assert qmodel(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    off = QuantizeConfig(method="static", flow="fx", calib_samples=16)
    assert "equalize" not in off.shaping() and "bias_correction" not in off.shaping()  # old sidecars still match
    with pytest.raises(QuantbenchError, match="equalize must be True or False"):
        QuantizeConfig(method="static", equalize="yes")


# ---------------------------------------------------------------- --fallback K --sensitivity FILE
def _row(layer, gain, drop, sqnr):
    return {"layer": layer, "kind": "conv", "params": 1, "alone_acc": 0.0, "drop": drop, "fallback_acc": 0.0,
            "gain": gain, "sqnr_db": sqnr, "sqnr_in_int8_db": sqnr}


SENS = {"checkpoint": "x.pth", "flow": "fx", "layers": [
    _row("conv1", 0.5, 1.0, 20.0), _row("fc", 2.0, 0.0, 30.0), _row("layer1.0.conv1", 0.5, 1.0, 10.0),
    _row("layer1.0.conv2", 0.5, 2.0, 40.0), _row("layer2.0.conv1", -0.1, 3.0, 5.0)]}


def test_most_sensitive_ranks_by_gain_then_drop_then_sqnr(tmp_path):
    f = tmp_path / "sensitivity.json"
    f.write_text(json.dumps(SENS))
    order = ("fc", "layer1.0.conv2", "layer1.0.conv1", "conv1", "layer2.0.conv1")
    for k in range(len(order) + 1):
        assert most_sensitive(f, k) == order[:k]
    assert most_sensitive(tmp_path, 2) == order[:2] == most_sensitive(SENS, 2)  # a folder, a dict


@pytest.mark.parametrize("setup,k,message", [
    (lambda d: d / "missing.json", 1, "sensitivity file not found"),
    (lambda d: (d / "a.json").write_text("{}") and d / "a.json", 1, "is not a sensitivity file"),
    (lambda d: (d / "b.json").write_text("not json") and d / "b.json", 1, "is not a sensitivity file"),
    (lambda d: (d / "c.json").write_text(json.dumps(SENS)) and d / "c.json", 6, "ranks only 5 layers"),
    (lambda d: (d / "c.json").write_text(json.dumps(SENS)) and d / "c.json", -1, "must be 0 or more"),
])
def test_most_sensitive_errors_are_one_line(tmp_path, setup, k, message):
    with pytest.raises(QuantbenchError, match=message) as e:
        most_sensitive(setup(tmp_path), k)
    assert "\n" not in str(e.value)


def test_cli_fallback_merges_into_fp32_layers(tiny_checkpoint, tiny_data_dir, tmp_path, capsys):
    from quantbench.cli import main
    from quantbench.fileio import sha256
    f = tmp_path / "sensitivity.json"
    f.write_text(json.dumps({**SENS, "checkpoint_sha256": sha256(tiny_checkpoint)}))  # it ranks this checkpoint
    out = tmp_path / "m.pt"
    base = ["quantize", str(tiny_checkpoint), "--method", "static", "--flow", "fx", "--output", str(out),
            "--data-dir", str(tiny_data_dir), "--calib-samples", "16", "--no-progress"]
    assert main(base + ["--fp32-layers", "conv1,fc", "--fallback", "2", "--sensitivity", str(f)]) == 0
    side = json.loads((tmp_path / "m.pt.json").read_text())
    assert side["fp32_layers"] == ["conv1", "fc", "layer1.0.conv2"]  # merged, once each
    assert side["config"]["fp32_layers_from"].startswith(f"{f}: the 2 layer(s)")  # where the ranking came from
    assert main(base + ["--fallback", "2"]) == 2
    assert "--fallback K and --sensitivity FILE go together" in capsys.readouterr().err
    assert main(base + ["--fallback", "9", "--sensitivity", str(f)]) == 2


def test_an_untraceable_model_is_a_one_line_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: FX cannot trace it
                x = -x
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(QuantbenchError, match="FX trace of the model, which failed") as e:
        equalize(Branchy(), (3, 8, 8))
    assert "\n" not in str(e.value)
