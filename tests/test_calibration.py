"""Calibration and scheme choices: every observer / weight / activation option reaches the
observers each flow really inserts (what the sidecar records), percentile clipping and shared
per-tensor scales compute what they claim, reduce_range is kept, augmented calibration is really
augmented, and bad options fail in one line."""
from __future__ import annotations

import pytest
import torch

from quantbench import models
from quantbench.errors import QuantbenchError
from quantbench.flows import get_flow
from quantbench import qconfigs
from quantbench.qconfigs import PercentileObserver, Scheme, percentile_range
from quantbench.quantize import QuantizeConfig, quantize

FLOWS = ("eager", "fx", "pt2e")


def _applied(flow: str, qat: bool = False, **options) -> dict:
    """What quantize() records for these options: flow.applied of the prepared model."""
    scheme = QuantizeConfig(method="static", flow=flow, **options).scheme
    model = models.build("resnet10", 3, quantizable=flow == "eager")
    return get_flow(flow).applied(get_flow(flow).prepare(model, scheme, qat, torch.randn(1, 3, 32, 32)))


@pytest.mark.slow
@pytest.mark.parametrize("flow", FLOWS)
def test_each_option_changes_the_recorded_observer(flow):
    base = _applied(flow)
    act, wt = base["activations"], base["weights"]
    assert act["observer"] == "HistogramObserver" and wt["qscheme"] == "per_channel_symmetric"

    for observer, cls in (("minmax", "MinMaxObserver"), ("moving-average", "MovingAverageMinMaxObserver"),
                          ("percentile", "PercentileObserver")):
        got = _applied(flow, observer=observer, percentile=99.9)["activations"]
        assert got["observer"] == cls != act["observer"]
        assert got["range"] == act["range"] and got["qscheme"] == act["qscheme"]  # only the observer changed
    assert _applied(flow, observer="percentile", percentile=99.9)["activations"]["percentile"] == 99.9

    sym = _applied(flow, act_scheme="symmetric")["activations"]
    assert (act["qscheme"], sym["qscheme"]) == ("per_tensor_affine", "per_tensor_symmetric")

    per_tensor = _applied(flow, weight_scheme="per-tensor")["weights"]
    assert per_tensor["summary"].startswith("per-tensor") and not wt["summary"].startswith("per-tensor")
    if flow == "pt2e":  # per-channel layout, one shared scale: what inductor's int8 convs take
        assert per_tensor["shared_scale"] and per_tensor["observer"] == "SharedScalePerChannelObserver"
    else:
        assert per_tensor["qscheme"] == "per_tensor_symmetric" and per_tensor["observer"] == "MinMaxObserver"

    # the qconfig name sets the ranges; an override keeps them
    seed = _applied(flow, qconfig="seed", observer="histogram")
    assert seed["activations"]["observer"] == "HistogramObserver" and seed["activations"]["range"] == [0, 127]
    assert seed["weights"]["range"] == [-64, 63] and wt["range"] == [-128, 127]


@pytest.mark.slow
@pytest.mark.parametrize("flow", FLOWS)
def test_qat_wraps_the_chosen_observers_in_fake_quantize(flow):
    got = _applied(flow, qat=True, observer="minmax", weight_scheme="per-tensor")
    assert got["activations"]["observer"] == "MinMaxObserver" and got["activations"]["fake_quant"] == "FakeQuantize"
    assert got["weights"]["summary"].startswith("per-tensor") and "FakeQuantize" in got["weights"]["fake_quant"]
    default = _applied(flow, qat=True)  # unchanged: fused moving-average fake-quantize
    assert default["activations"]["fake_quant"] == "FusedMovingAvgObsFakeQuantize"


def test_percentile_observer_clips_outliers():
    torch.manual_seed(0)
    x = torch.rand(100_000)  # uniform in [0, 1)
    x[0] = 1000.0            # one outlier
    pct = PercentileObserver(percentile=99.9, dtype=torch.quint8, quant_min=0, quant_max=255)
    mm = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    pct(x)
    mm(x)
    scale_mm, scale_pct = mm.calculate_qparams()[0].item(), pct.calculate_qparams()[0].item()
    assert scale_mm == pytest.approx(1000 / 255, rel=1e-3)
    # 99.9 % of |x| is below ~1: clipped there (one histogram bin of 1000/2048 wide at most)
    assert 0.99 / 255 <= scale_pct <= 1.5 / 255


def test_percentile_range_is_the_percentile_of_abs():
    hist = torch.ones(200)  # values spread evenly over [-100, 100]
    lo, hi = percentile_range(hist, torch.tensor(-100.0), torch.tensor(100.0), 90.0)
    assert lo.item() == pytest.approx(-90, abs=1) and hi.item() == pytest.approx(90, abs=1)
    lo, hi = percentile_range(hist, torch.tensor(0.0), torch.tensor(100.0), 50.0)
    assert lo.item() == 0 and hi.item() == pytest.approx(50, abs=1)


def test_shared_scale_observer_is_per_tensor():
    from quantbench.flows.pt2e import SharedScalePerChannelObserver
    w = torch.randn(8, 4, 3, 3) * torch.arange(1, 9).view(8, 1, 1, 1)  # channels of different ranges
    shared = SharedScalePerChannelObserver(dtype=torch.int8, quant_min=-128, quant_max=127,
                                           qscheme=torch.per_channel_symmetric, ch_axis=0)
    shared(w)
    scales, zero_points = shared.calculate_qparams()
    assert scales.shape == (8,) and torch.all(scales == scales[0]) and torch.all(zero_points == 0)
    assert scales[0].item() == pytest.approx(w.abs().max().item() / 127.5, rel=1e-5)


@pytest.mark.parametrize("vnni", [True, False])
def test_reduce_range_is_kept_for_every_option(monkeypatch, vnni):
    """7-bit activations exactly where the CPU lacks VNNI, whatever the observer; "seed" always."""
    monkeypatch.setattr(qconfigs, "reduce_range", lambda: not vnni)
    want = 255 if vnni else 127
    for observer in (None, "minmax", "moving-average", "histogram", "percentile"):
        assert Scheme(observer=observer).resolve().act_range == (0, want)
        assert qconfigs.qconfig(Scheme(observer=observer)).activation().quant_max == want
    assert Scheme("seed", observer="histogram").resolve().act_range == (0, 127)
    from quantbench.flows.pt2e import _quantizer_config
    assert _quantizer_config(Scheme(observer="percentile")).input_activation.quant_max == want


def test_train_transform_calibrates_on_augmented_images(tiny_trained_checkpoint, tiny_dataset):
    """calib_transform="train" goes through the original's augmentation: other activation
    ranges, so other int8 outputs; the sidecar record says which, and what was overridden."""
    x = torch.randn(6, 3, 32, 32)
    outputs, records = {}, {}
    for transform in ("test", "train"):
        cfg = QuantizeConfig(method="static", flow="fx", calib_samples=32, calib_batch_size=16,
                             calib_transform=transform, observer="minmax")
        qmodel, records[transform] = quantize(tiny_trained_checkpoint, cfg, tiny_dataset, progress=False)
        with torch.no_grad():
            outputs[transform] = qmodel(x)
    assert records["test"]["calibration"]["augmentation"] == "none"
    assert records["train"]["calibration"]["augmentation"] == "seed"
    assert records["train"]["calibration"]["transform"] == "train"
    assert records["train"]["qconfig"]["overrides"] == {"observer": "minmax"}
    assert records["train"]["qconfig"]["activations"]["observer"] == "MinMaxObserver"
    assert records["train"]["fp32_layers"] == []
    assert not torch.equal(outputs["test"], outputs["train"])


@pytest.mark.parametrize("options, expect", [
    ({"observer": "p99"}, "unknown observer 'p99'"),
    ({"weight_scheme": "per-row"}, "unknown weight scheme 'per-row'"),
    ({"act_scheme": "asymmetric"}, "unknown activation scheme"),
    ({"calib_transform": "augmented"}, "unknown calibration transform"),
    ({"observer": "percentile", "percentile": 0}, "percentile must be in"),
    ({"fp32_layers": "fc"}, "sequence of layer names"),
])
def test_bad_options_fail_in_one_line(options, expect):
    with pytest.raises(QuantbenchError, match=expect) as e:
        QuantizeConfig(method="static", **options)
    assert "\n" not in str(e.value)


def test_options_are_checked_when_flows_are_called_directly():
    with pytest.raises(QuantbenchError, match="unknown observer"):
        get_flow("fx").prepare(models.build("resnet10", 3), Scheme(observer="max"), False, torch.randn(1, 3, 32, 32))
