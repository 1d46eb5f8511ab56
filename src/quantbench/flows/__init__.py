"""Registry of quantization flows.

A flow is one module in this package that turns an fp32 model into an int8 one, exposing:

    SUFFIX                                  deployment file suffix (".pt", ".pt2", ...)
    METHODS                                 the methods it supports, a subset of METHODS below
    load(checkpoint, num_classes)           -> (float model ready for this flow, meta)
    quantize_dynamic(model, qconfig)        -> int8 model                      [dynamic]
    prepare(model, qconfig, qat, example)   -> model with observers/fake-quant [static, qat]
    convert(prepared)                       -> int8 model                      [static, qat]
    set_mode(model, training)               train()/eval() for this flow's models
    freeze_bn(model), freeze_observers(model)                                  [qat]
    export(model, path, example)            write the deployment file

quantbench.quantize drives every flow the same way (calibrate, fine-tune, export), so adding a
flow is one module plus one entry in FLOWS; the CLI, `replicate` and `bench` pick it up.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import QuantbenchError

METHODS = ("dynamic", "static", "qat")

# flow name -> module; the original's eager mode first.
FLOWS: dict[str, str] = {
    "eager": "quantbench.flows.eager",
    "fx": "quantbench.flows.fx",
    "pt2e": "quantbench.flows.pt2e",
}

# Row names of the original's table, per method.
LABELS = {"origin": "origin", "dynamic": "ptq-d", "static": "ptq-s", "qat": "qat"}


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
