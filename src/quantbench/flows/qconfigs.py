"""QConfigs for the torch.ao.quantization flows (eager and FX share them).

"default": today's best practice for x86 (fbgemm / "x86" engine):
  weights  per-channel symmetric int8, full range [-128, 127] (per-channel keeps each filter's
           own scale: the biggest single accuracy win over per-tensor for convolutions);
  activations per-tensor affine uint8 from a HistogramObserver (picks a clipping range that
           minimizes quantization error, instead of raw min/max, which outliers stretch),
           with reduce_range (7 bits) only where the CPU needs it, see quantbench.cpu.
"seed": the original's choice: 7-bit weights [-64, 63] and 7-bit activations [0, 127] from
  min/max observers, applied whatever the CPU.
"""
from __future__ import annotations

import torch
from torch.ao.quantization import (FakeQuantize, FusedMovingAvgObsFakeQuantize, HistogramObserver,
                                   MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                   PerChannelMinMaxObserver, QConfig)

from ..cpu import reduce_range
from ..errors import QuantbenchError

QCONFIGS = ("default", "seed")


def qconfig(name: str, qat: bool = False) -> QConfig:
    if name == "default":
        r = reduce_range()
        act_max = 127 if r else 255
        if qat:
            return QConfig(
                activation=FusedMovingAvgObsFakeQuantize.with_args(
                    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=act_max, dtype=torch.quint8),
                weight=FusedMovingAvgObsFakeQuantize.with_args(
                    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
        return QConfig(
            activation=HistogramObserver.with_args(quant_min=0, quant_max=act_max, dtype=torch.quint8),
            weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    if name == "seed":
        act = MovingAverageMinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=127,
                                                    qscheme=torch.per_tensor_affine)
        wt = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, quant_min=-64, quant_max=63,
                                                qscheme=torch.per_channel_symmetric)
        if qat:
            return QConfig(activation=FakeQuantize.with_args(observer=act),
                           weight=FakeQuantize.with_args(observer=wt))
        return QConfig(activation=act, weight=wt)
    raise QuantbenchError(f"unknown qconfig {name!r}; choose from {', '.join(QCONFIGS)}")


def describe(name: str) -> dict:
    """What a qconfig means, for sidecars and reports."""
    if name == "seed":
        return {"name": "seed", "weights": "per-channel symmetric int8 [-64, 63]",
                "activations": "per-tensor affine uint8 [0, 127], moving-average min/max"}
    r = reduce_range()
    return {"name": name, "weights": "per-channel symmetric int8 [-128, 127]",
            "activations": f"per-tensor affine uint8 [0, {127 if r else 255}], histogram",
            "reduce_range": r, "why": "no VNNI on this CPU: 8-bit x 8-bit pairs saturate int16" if r
            else "VNNI/AMX present: full range is safe"}
