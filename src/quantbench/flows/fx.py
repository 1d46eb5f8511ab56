"""FX graph mode quantization (torch.ao.quantization.quantize_fx).

Eager mode needs a model written for quantization (QuantStub, FloatFunctional, fuse_model).
FX instead traces the model's forward into a graph (torch.fx symbolic tracing) and finds the
quantization points itself: it fuses conv+bn(+relu), quantizes the input and swaps the residual
`+` for a quantized add, all on the PLAIN torchvision ResNet. That is the point of this flow:
no model edits.

What to quantize, and how, comes from two tables:
  QConfigMapping   which observers to put where (the same QConfigs as eager, quantbench.qconfigs)
  BackendConfig    which patterns the int8 backend can run fused (x86 / fbgemm here)

fp32 layers: QConfigMapping.set_module_name(name, None) keeps a module (after fusion: the fused
conv+bn+relu, which takes the conv's name) float; FX then quantizes and dequantizes around it
where its neighbours are int8.

Deployment: TorchScript, exactly like eager (trace + freeze), loadable with plain torch.jit.load.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from ..export import export_torchscript
from . import attention, check_layers
from ..qconfigs import Scheme, applied_qconfig, applied_torch_ao, qconfig

RUNTIME = "torchscript"
METHODS = ("dynamic", "static", "qat")


def from_float(model: nn.Module, meta: dict, method: str = "static") -> nn.Module:
    # The plain float model: FX traces it as it is.
    return model


def _backend_config():
    # The "x86" engine (fbgemm for some shapes, oneDNN for others) is PyTorch's default on x86;
    # its BackendConfig lists the fusions it runs as one int8 kernel (conv+bn+relu, add+relu, ...).
    return get_x86_backend_config()


def quantize_dynamic(model: nn.Module, scheme: Scheme | str, example: torch.Tensor,
                     fp32_layers: Sequence[str] = ()) -> tuple[nn.Module, dict]:
    """ptq-d: only nn.Linear gets a qconfig, a dynamic one (int8 weights ahead of time,
    activations quantized per batch at run time), as in eager's quantize_dynamic, so the two
    flows differ only in how they find the layers. No calibration data is needed: the observers
    are placeholders that just record "quantize this dynamically"."""
    model.eval()
    split = attention.split_attention(model, example)  # attention projections as nn.Linear, see there
    qc = tq.default_dynamic_qconfig
    mapping = _fp32(QConfigMapping().set_object_type(nn.Linear, qc), check_layers(model, fp32_layers))
    prepared = prepare_fx(model, mapping, (example,), backend_config=_backend_config())
    applied = applied_qconfig(qc)
    if split:
        applied["attention"] = attention.note(split)
    return convert_fx(prepared, backend_config=_backend_config()), applied


def _fp32(mapping: QConfigMapping, names: Sequence[str]) -> QConfigMapping:
    # module names win over object types and the global qconfig in a QConfigMapping
    for name in names:
        mapping.set_module_name(name, None)
    return mapping


def prepare(model: nn.Module, scheme: Scheme | str, qat: bool, example: torch.Tensor,
            fp32_layers: Sequence[str] = ()) -> nn.Module:
    """Trace, fuse and insert observers (static) or fake-quantize modules (QAT) everywhere the
    backend can run int8: one global qconfig, the BackendConfig decides the patterns, except
    the `fp32_layers`, which get none."""
    mapping = _fp32(QConfigMapping().set_global(qconfig(scheme, qat=qat)), check_layers(model, fp32_layers))
    relu_before_relu6(model)
    if qat:
        # prepare_qat_fx fuses conv+bn into ConvBn(ReLU)2d QAT modules that keep BN trainable
        # (it is folded at convert), so it must see the model in train mode.
        return prepare_qat_fx(model.train(), mapping, (example,), backend_config=_backend_config())
    # eval mode: prepare_fx folds BN into the conv weights before observing.
    return prepare_fx(model.eval(), mapping, (example,), backend_config=_backend_config())


def relu_before_relu6(model: nn.Module) -> int:
    """conv -> bn -> ReLU6 becomes conv -> bn -> ReLU -> ReLU6, in place; returns how many.

    The x86 BackendConfig fuses conv+bn+relu into one int8 kernel but not conv+bn+relu6, and it
    gives ReLU6 its input's observer: the int8 conv output then spans the conv's whole range,
    negative half included, and the [0, 6] that ReLU6 keeps gets a fraction of the 256 codes
    (MobileNetV2 lost points to it). relu6(relu(x)) == relu6(x), so inserting the ReLU changes
    nothing in fp32, and the fused conv+bn+relu is observed on [0, max] as in eager mode."""
    n = 0
    for container in list(model.modules()):
        if not isinstance(container, nn.Sequential):
            continue
        for i in range(1, len(container)):
            if type(container[i]) is nn.ReLU6 and isinstance(container[i - 1], (nn.BatchNorm2d, nn.Conv2d)):
                container[i] = nn.Sequential(nn.ReLU(), nn.ReLU6())
                n += 1
    return n


def applied(prepared: nn.Module) -> dict:
    return applied_torch_ao(prepared)


def convert(prepared: nn.Module) -> nn.Module:
    """Replace observed patterns by int8 modules (quantized::conv2d_relu, add_relu, ...), with
    the scales the observers collected. Conversion and int8 inference run on the CPU."""
    return convert_fx(prepared.cpu().eval(), backend_config=_backend_config())


def set_mode(model: nn.Module, training: bool) -> None:
    # FX GraphModules are ordinary nn.Modules: train()/eval() reach BN and fake-quant modules.
    model.train(training)


def freeze_bn(model: nn.Module) -> None:
    """QAT: the fused ConvBn QAT modules are the same classes as eager's, so the same switch
    stops updating batch-norm statistics and makes the forward use the running ones (which
    convert folds into the conv weights)."""
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


def freeze_observers(model: nn.Module) -> None:
    """QAT: fix the quantization ranges; the weights then adapt to them."""
    model.apply(tq.disable_observer)


def export(model: nn.Module, path, example: torch.Tensor) -> None:
    # A converted FX GraphModule traces like any module: same TorchScript file as eager.
    export_torchscript(model, path, example)
