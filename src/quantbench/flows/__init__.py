"""Registry of quantization flows.

A flow is one module in this package that turns an fp32 model into an int8 one, declaring
(see `Flow` below):

    RUNTIME                                 the runtime its files run on (quantbench.runtimes)
    METHODS                                 the methods it supports, a subset of METHODS below
    from_float(model, meta, method)         -> the float model this flow quantizes (eager: its
                                               quantizable twin; fx, pt2e: the model itself)
    quantize_dynamic(model, scheme, example, fp32_layers) -> (int8 model, applied)  [dynamic]
    prepare(model, scheme, qat, example, fp32_layers)     -> model with observers/fake-quant
                                                                                 [static, qat]
    applied(prepared)                       -> what the observers really are   [static, qat]
    convert(prepared)                       -> int8 model                      [static, qat]
    set_mode(model, training)               train()/eval() for this flow's models
    freeze_bn(model), freeze_observers(model)                                  [qat]
    export(model, path, example)            write the deployment file

`scheme` is a quantbench.qconfigs.Scheme (a qconfig name plus observer / weight / activation
choices) or just a qconfig name. `fp32_layers` names conv/linear modules of the float model (as
`quantizable_layers` lists them) that stay fp32 while the rest is quantized: each flow maps that
to its own "no qconfig here" (see check_layers for the names).
"applied" is read back from the observer objects the model holds (quantbench.qconfigs
.describe_observer), so a sidecar records what was used, not what was asked for.
quantbench.deploy drives every flow the same way (calibrate, fine-tune, export), so adding a
flow is one module plus one entry in FLOWS; tests/test_conformance.py checks it against `Flow`.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..errors import QuantbenchError
from ..qconfigs import Scheme

METHODS = ("dynamic", "static", "qat")

# flow name -> module; the original's eager mode first.
FLOWS: dict[str, str] = {
    "eager": "quantbench.flows.eager",
    "fx": "quantbench.flows.fx",
    "pt2e": "quantbench.flows.pt2e",
}

# Row names of the original's table, per method.
LABELS = {"origin": "origin", "dynamic": "ptq-d", "static": "ptq-s", "qat": "qat"}


@runtime_checkable
class Flow(Protocol):
    """What every flow module provides (modules satisfy it structurally)."""
    RUNTIME: str
    METHODS: Sequence[str]

    def from_float(self, model: nn.Module, meta: dict, method: str = "static") -> nn.Module: ...
    def quantize_dynamic(self, model: nn.Module, scheme: Scheme | str, example: torch.Tensor,
                         fp32_layers: Sequence[str] = ()) -> tuple[nn.Module, dict]: ...
    def prepare(self, model: nn.Module, scheme: Scheme | str, qat: bool, example: torch.Tensor,
                fp32_layers: Sequence[str] = ()) -> nn.Module: ...
    def applied(self, prepared: nn.Module) -> dict: ...
    def convert(self, prepared: nn.Module) -> nn.Module: ...
    def set_mode(self, model: nn.Module, training: bool) -> None: ...
    def freeze_bn(self, model: nn.Module) -> None: ...
    def freeze_observers(self, model: nn.Module) -> None: ...
    def export(self, model: nn.Module, path, example: torch.Tensor) -> None: ...


def get_flow(name: str) -> ModuleType:
    if name not in FLOWS:
        raise QuantbenchError(f"unknown flow {name!r}; choose from {', '.join(FLOWS)}")
    return importlib.import_module(FLOWS[name])


def check_method(flow: str, method: str) -> ModuleType:
    if method not in METHODS:
        raise QuantbenchError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    mod = get_flow(flow)
    if method not in mod.METHODS:
        raise QuantbenchError(f"the {flow} flow does not support {method}; it supports {', '.join(mod.METHODS)}")
    return mod


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear modules of a float model, in definition order: the layers
    int8 quantization changes, and the names `fp32_layers` takes (the same in every flow, since
    every flow starts from a model with torchvision's parameter names)."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def check_layers(model: nn.Module, names: Sequence[str], what: str = "--fp32-layers") -> tuple[str, ...]:
    """`names` as a tuple, or a one-line error naming the unknown ones and a few valid ones."""
    valid = quantizable_layers(model)
    bad = [n for n in names if n not in valid]
    if bad:
        shown = valid if len(valid) <= 6 else valid[:3] + ["..."] + valid[-2:]
        raise QuantbenchError(f"unknown layer{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} for "
                              f"{what}; the model's conv/linear layers are {', '.join(shown)} "
                              f"({len(valid)} in all)")
    return tuple(names)
