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


def why(name: str) -> str:
    """The reason behind a qconfig's ranges, for sidecars and reports."""
    if name == "seed":
        return "the original's 7-bit ranges, whatever the CPU"
    return ("no VNNI on this CPU: 8-bit x 8-bit pairs saturate int16, so 7-bit activations" if reduce_range()
            else "VNNI/AMX present: the full 8-bit range is safe")


def _is_observer(m) -> bool:
    # torch.ao's and torchao's observer / fake-quantize classes share these attributes
    return hasattr(m, "dtype") and hasattr(m, "quant_min") and ("Observer" in type(m).__name__
                                                              or "FakeQuant" in type(m).__name__)


def describe_observer(obs) -> dict | None:
    """What an observer or fake-quantize module really does: class, dtype, scheme and range."""
    if obs is None:
        return None
    inner = getattr(obs, "activation_post_process", None)
    observer = inner if inner is not None and _is_observer(inner) else obs
    qscheme = str(getattr(obs, "qscheme", getattr(observer, "qscheme", ""))).replace("torch.", "")
    dtype = str(obs.dtype).replace("torch.", "")
    qmin, qmax = obs.quant_min, obs.quant_max
    dynamic = bool(getattr(observer, "is_dynamic", False))
    d = {"observer": type(observer).__name__, "dtype": dtype, "qscheme": qscheme,
         "range": [qmin, qmax] if qmin is not None else None, "dynamic": dynamic}
    if observer is not obs:
        d["fake_quant"] = type(obs).__name__
    scheme = ("per-channel " if "per_channel" in qscheme else "per-tensor ") + \
             ("symmetric" if "symmetric" in qscheme else "affine")
    d["summary"] = (f"{scheme} {dtype}" + (f" [{qmin}, {qmax}]" if qmin is not None else "")
                    + f", {type(observer).__name__}" + (f" in {type(obs).__name__}" if observer is not obs else "")
                    + (", quantized per batch at run time" if dynamic else ""))
    return d


def applied_torch_ao(prepared: torch.nn.Module) -> dict:
    """The weight and activation observers an eager or FX model really holds (or, for static
    weights, which are observed only at convert, the observer its qconfig makes)."""
    from torch import nn
    weight = act = None
    for name, m in prepared.named_modules():
        if weight is None and _is_observer(getattr(m, "weight_fake_quant", None)):
            weight = m.weight_fake_quant  # QAT: fake-quantized weights
        elif weight is None and isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "qconfig", None) is not None:
            weight = m.qconfig.weight()   # static: convert observes the weight with this
        parts = name.split(".")
        nested = len(parts) > 1 and (parts[-2] == "weight_fake_quant" or parts[-2].startswith("activation_post"))
        if act is None and parts[-1].startswith("activation_post_process") and not nested and _is_observer(m):
            act = m  # an activation's observer, not the one inside a fake-quantize module
    return {"weights": describe_observer(weight), "activations": describe_observer(act)}


def applied_qconfig(qc: QConfig) -> dict:
    """The observers a QConfig object makes (dynamic quantization keeps no observer to read)."""
    return {"weights": describe_observer(qc.weight()), "activations": describe_observer(qc.activation())}
