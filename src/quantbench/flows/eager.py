"""Eager-mode quantization (torch.ao.quantization), the original's flow.

Eager mode cannot see the model's graph, so the model itself must say where tensors enter and
leave int8 (QuantStub / DeQuantStub), which modules to fuse, and route the residual add through
a FloatFunctional. torchvision ships such a twin of ResNet (torchvision.models.quantization),
with the same parameter names, so the fp32 checkpoint loads into it unchanged.

Deployment: TorchScript (trace + freeze), loadable with plain torch.jit.load.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.ao import quantization as tq

from ..export import export_torchscript
from ..models import load_checkpoint
from .qconfigs import applied_qconfig, applied_torch_ao, qconfig

RUNTIME = "torchscript"
METHODS = ("dynamic", "static", "qat")


def load(checkpoint, num_classes=None, model=None, method="static"):
    # The quantizable twin: QuantStub at the input, DeQuantStub at the output, fuse_model().
    # Dynamic quantization only swaps nn.Linear modules, so the plain float model does (and
    # models without a twin, a vision transformer say, get ptq-d too).
    return load_checkpoint(checkpoint, num_classes=num_classes, quantizable=method != "dynamic", model=model)


def quantize_dynamic(model: nn.Module, qconfig_name: str, example: torch.Tensor) -> tuple[nn.Module, dict]:
    """ptq-d: weights of nn.Linear become int8 ahead of time; activations are quantized on the
    fly, per batch. Only ResNet's final fc is a Linear, so almost nothing changes: dynamic
    quantization pays off for Linear/LSTM-heavy models (transformers, RNNs), not CNNs.
    torch's dynamic qconfig is used whatever `qconfig_name` says (per-tensor min/max int8
    weights): the static qconfigs' activation observers mean nothing without calibration."""
    qc = tq.default_dynamic_qconfig
    return tq.quantize_dynamic(model.eval(), {nn.Linear: qc}, dtype=torch.qint8), applied_qconfig(qc)


def prepare(model: nn.Module, qconfig_name: str, qat: bool, example: torch.Tensor) -> nn.Module:
    """Fuse conv+bn(+relu) so each becomes one int8 kernel, then insert observers (static) or
    fake-quantize modules (QAT) according to the qconfig."""
    if qat:
        model.train()
        model.fuse_model(is_qat=True)   # keeps BN as a separate, trainable part of ConvBn(ReLU)2d
        model.qconfig = qconfig(qconfig_name, qat=True)
        return tq.prepare_qat(model, inplace=True)
    model.eval()
    model.fuse_model()                  # folds BN into the conv weights
    model.qconfig = qconfig(qconfig_name, qat=False)
    return tq.prepare(model, inplace=True)


def applied(prepared: nn.Module) -> dict:
    return applied_torch_ao(prepared)


def convert(prepared: nn.Module) -> nn.Module:
    """Swap observed float modules for int8 ones, using the scales the observers collected.
    Conversion and int8 inference run on the CPU."""
    return tq.convert(prepared.cpu().eval(), inplace=True)


def set_mode(model: nn.Module, training: bool) -> None:
    model.train(training)


def freeze_bn(model: nn.Module) -> None:
    """QAT: stop updating batch-norm running statistics (they settle; the converted model folds
    them into the conv weights, so the fine-tune should see them fixed too)."""
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


def freeze_observers(model: nn.Module) -> None:
    """QAT: fix the quantization ranges; the weights then adapt to them."""
    model.apply(tq.disable_observer)


def export(model: nn.Module, path, example: torch.Tensor) -> None:
    export_torchscript(model, path, example)
