"""How int8 values are made: one `Scheme` for every flow, turned into torch.ao QConfigs here
(eager and FX share them) and into PT2E QuantizationSpecs in quantbench.flows.pt2e.

A qconfig name sets the defaults:
"default": today's best practice for x86 (fbgemm / "x86" engine):
  weights  per-channel symmetric int8, full range [-128, 127] (per-channel keeps each filter's
           own scale: the biggest single accuracy win over per-tensor for convolutions);
  activations per-tensor affine uint8 from a HistogramObserver (picks a clipping range that
           minimizes quantization error, instead of raw min/max, which outliers stretch),
           with reduce_range (7 bits) only where the CPU needs it, see quantbench.cpu.
"seed": the original's choice: 7-bit weights [-64, 63] and 7-bit activations [0, 127] from
  min/max observers, applied whatever the CPU.
and the Scheme's other fields override them, one choice each:
  observer       how activation ranges are found: "minmax" (all values seen), "moving-average"
                 (min/max averaged over batches), "histogram" (L2-best clipping), "percentile"
                 (clip at a percentile of |x|, see PercentileObserver);
  weight_scheme  "per-channel" or "per-tensor" (one scale for the whole weight tensor);
  act_scheme     "affine" (zero point anywhere: post-ReLU values use the whole range) or
                 "symmetric" (zero point in the middle: half the codes of a ReLU output unused).
The ranges (bits) stay the qconfig's. QAT wraps the same observers in fake-quantize modules.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch
from torch.ao.quantization import (FakeQuantize, FusedMovingAvgObsFakeQuantize, HistogramObserver,
                                   MinMaxObserver, MovingAverageMinMaxObserver,
                                   MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver, QConfig)

from .cpu import reduce_range
from .errors import QuantbenchError

QCONFIGS = ("default", "seed")
Observer = Literal["minmax", "moving-average", "histogram", "percentile"]
WeightScheme = Literal["per-channel", "per-tensor"]
ActScheme = Literal["affine", "symmetric"]

# What each qconfig name chooses when the Scheme does not say.
_DEFAULTS = {
    # QAT: moving averages, since the ranges must follow weights that change as they train
    "default": {"observer": "histogram", "qat_observer": "moving-average",
                "weight_scheme": "per-channel", "act_scheme": "affine"},
    "seed": {"observer": "moving-average", "qat_observer": "moving-average",
             "weight_scheme": "per-channel", "act_scheme": "affine"},
}


def _check(value, allowed: type, what: str) -> None:
    if value is not None and value not in get_args(allowed):
        raise QuantbenchError(f"unknown {what} {value!r}; choose from {', '.join(get_args(allowed))}")


@dataclass(frozen=True)
class Scheme:
    """A qconfig name plus overrides (None: the qconfig's own choice); checked when made."""
    qconfig: str = "default"
    observer: Observer | None = None
    weight_scheme: WeightScheme | None = None
    act_scheme: ActScheme | None = None
    percentile: float = 99.99       # used by observer="percentile" only

    def __post_init__(self):
        if self.qconfig not in QCONFIGS:
            raise QuantbenchError(f"unknown qconfig {self.qconfig!r}; choose from {', '.join(QCONFIGS)}")
        _check(self.observer, Observer, "observer")
        _check(self.weight_scheme, WeightScheme, "weight scheme")
        _check(self.act_scheme, ActScheme, "activation scheme")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise QuantbenchError(f"the percentile must be in (50, 100], not {self.percentile}")

    @classmethod
    def of(cls, scheme: "Scheme | str") -> "Scheme":
        """A Scheme, or a qconfig name meaning that qconfig with no overrides."""
        return scheme if isinstance(scheme, Scheme) else cls(qconfig=scheme)

    def overrides(self) -> dict:
        """The fields set away from the qconfig's defaults, for records."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("qconfig", "percentile") and getattr(self, f.name) is not None}
        if self.observer == "percentile":
            out["percentile"] = self.percentile
        return out

    def resolve(self, qat: bool = False) -> "Resolved":
        d = _DEFAULTS[self.qconfig]
        seven = self.qconfig == "seed" or reduce_range()
        return Resolved(
            qconfig=self.qconfig, qat=qat,
            observer=self.observer or d["qat_observer" if qat else "observer"],
            weight_scheme=self.weight_scheme or d["weight_scheme"],
            act_scheme=self.act_scheme or d["act_scheme"],
            act_range=(0, 127 if seven else 255),
            weight_range=(-64, 63) if self.qconfig == "seed" else (-128, 127),
            percentile=float(self.percentile))


@dataclass(frozen=True)
class Resolved:
    """A Scheme with every choice made: what the flows build their observers from."""
    qconfig: str
    qat: bool
    observer: str
    weight_scheme: str
    act_scheme: str
    act_range: tuple[int, int]
    weight_range: tuple[int, int]
    percentile: float

    @property
    def act_qscheme(self) -> torch.qscheme:
        return torch.per_tensor_symmetric if self.act_scheme == "symmetric" else torch.per_tensor_affine

    @property
    def weight_qscheme(self) -> torch.qscheme:
        return torch.per_channel_symmetric if self.weight_scheme == "per-channel" else torch.per_tensor_symmetric

    @property
    def fused_fake_quant(self) -> bool:
        """QAT with "default": torch's fused observe+fake-quantize kernel, which exists for
        moving-average min/max observers only; anything else goes through plain FakeQuantize."""
        return self.qat and self.qconfig == "default" and self.observer == "moving-average"


# ---------------------------------------------------------------- custom observers
def percentile_range(histogram: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] clipped to +-t, t the `percentile` of |x| read off a histogram of x over
    [lo, hi] (each bin counted at its edge farthest from 0, so t errs on the wide side)."""
    bins = histogram.numel()
    edges = torch.linspace(float(lo), float(hi), bins + 1, dtype=torch.float64)
    far = torch.maximum(edges[:-1].abs(), edges[1:].abs())
    order = far.argsort()
    cum = histogram.double()[order].cumsum(0)
    if cum[-1] <= 0:
        return lo, hi
    k = int(torch.searchsorted(cum, cum[-1] * percentile / 100.0).clamp(max=bins - 1))
    t = far[order][k].to(lo.dtype)
    return torch.maximum(lo, -t), torch.minimum(hi, t)


class PercentileMixin:
    """Activation ranges clipped at a percentile of |x| (e.g. 99.99: the largest 0.01 % of
    values saturate). Histogram observers already keep the histogram of everything they saw;
    only the choice of range changes, from their L2-error search to the percentile.
    torch.ao has no such observer; quantbench.flows.pt2e mixes this into torchao's too."""

    def __init__(self, *args, percentile: float = 99.99, **kwargs):
        super().__init__(*args, **kwargs)
        self.percentile = float(percentile)

    def _non_linear_param_search(self):
        return percentile_range(self.histogram, self.min_val, self.max_val, self.percentile)


class PercentileObserver(PercentileMixin, HistogramObserver):
    """torch.ao's HistogramObserver, clipping at a percentile (eager, FX)."""


class SharedScaleMixin:
    """Per-tensor weights dressed as per-channel: every channel gets the scale of the whole
    tensor. The arithmetic is per-tensor quantization; the graph keeps the per-channel
    dequantize that inductor's x86 int8 convolutions match (they take no per-tensor weights)."""
    shared_scale = True

    def calculate_qparams(self):
        lo = torch.minimum(self.min_val.min(), torch.zeros((), device=self.min_val.device))
        hi = torch.maximum(self.max_val.max(), torch.zeros((), device=self.max_val.device))
        return self._calculate_qparams(lo.expand_as(self.min_val).clone(), hi.expand_as(self.max_val).clone())


# ---------------------------------------------------------------- torch.ao QConfigs
_TORCH_AO_ACT = {"minmax": MinMaxObserver, "moving-average": MovingAverageMinMaxObserver,
                 "histogram": HistogramObserver, "percentile": PercentileObserver}


def qconfig(scheme: Scheme | str, qat: bool = False) -> QConfig:
    """The torch.ao QConfig (eager, FX) of a Scheme or qconfig name."""
    r = Scheme.of(scheme).resolve(qat)
    act_kw = dict(dtype=torch.quint8, quant_min=r.act_range[0], quant_max=r.act_range[1], qscheme=r.act_qscheme)
    if r.observer == "percentile":
        act_kw["percentile"] = r.percentile
    wt_kw = dict(dtype=torch.qint8, quant_min=r.weight_range[0], quant_max=r.weight_range[1],
                 qscheme=r.weight_qscheme)
    per_channel = r.weight_scheme == "per-channel"
    if r.fused_fake_quant:
        return QConfig(
            activation=FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, **act_kw),
            weight=FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver,
                **wt_kw))
    act = _TORCH_AO_ACT[r.observer].with_args(**act_kw)
    if r.weight_range == (-128, 127):   # qint8's own range: left implicit, as torch's x86 qconfig does
        del wt_kw["quant_min"], wt_kw["quant_max"]
    # "seed" observes weights by plain min/max in QAT too (the original's qconfig)
    wt = (PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(**wt_kw)
    if qat:
        return QConfig(activation=FakeQuantize.with_args(observer=act), weight=FakeQuantize.with_args(observer=wt))
    return QConfig(activation=act, weight=wt)


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
    shared = bool(getattr(observer, "shared_scale", False))
    if shared:
        d["shared_scale"] = True  # per-tensor arithmetic in a per-channel layout (SharedScaleMixin)
    if hasattr(observer, "percentile"):
        d["percentile"] = observer.percentile
    scheme = ("per-tensor (one scale in a per-channel layout) " if shared else
              "per-channel " if "per_channel" in qscheme else "per-tensor ") + \
             ("symmetric" if "symmetric" in qscheme else "affine")
    d["summary"] = (f"{scheme} {dtype}" + (f" [{qmin}, {qmax}]" if qmin is not None else "")
                    + f", {type(observer).__name__}" + (f" in {type(obs).__name__}" if observer is not obs else "")
                    + (f" clipping at the {observer.percentile:g}th percentile of |x|" if "percentile" in d else "")
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


_WEIGHT_USERS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear", "aten.convolution")


def graph_observers(prepared) -> dict:
    """The observers a PT2E prepare inserted (quantbench's pt2e flow, or ExecuTorch's XNNPACK
    quantizer), read back from the graph: an observer whose output is the weight argument
    (position 1) of a convolution or linear observes weights."""
    weight = act = None
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        obs = prepared.get_submodule(node.target)
        if not hasattr(obs, "quant_min"):
            continue
        is_weight = any(str(u.target).rsplit(".", 1)[0] in _WEIGHT_USERS and len(u.args) > 1 and u.args[1] is node
                        for u in node.users)
        if is_weight and weight is None:
            weight = obs
        elif not is_weight and act is None:
            act = obs
    return {"weights": describe_observer(weight), "activations": describe_observer(act)}
