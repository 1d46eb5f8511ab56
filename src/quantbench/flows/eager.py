"""Eager-mode quantization (torch.ao.quantization), the original's flow.

Eager mode cannot see the model's graph, so the model itself must say where tensors enter and
leave int8 (QuantStub / DeQuantStub), which modules to fuse, and route the residual add through
a FloatFunctional. torchvision ships such a twin of ResNet (torchvision.models.quantization),
with the same parameter names, so the fp32 checkpoint loads into it unchanged.

fp32 layers (mixed precision): a module left without a qconfig stays float, but in eager mode
nothing converts the int8 tensor its quantized neighbour hands it: it would fail at run time. So
each fp32 layer is wrapped in an island, DeQuantStub -> layer -> QuantStub, the stubs becoming
dequantize / quantize ops (with their own observed scale) at convert. Wrapping happens after
fuse_model, so the island holds the fused conv+bn(+relu) under the conv's name. At the model's
edges a stub would only add a round trip, so a float stem conv takes the float input (the
model's QuantStub is switched off) and a float last linear gives float logits. What eager mode
cannot do: keep the activations between float layers float, since the residual adds
(FloatFunctional) stay int8 whatever the layers are; FX and PT2E place quantize ops by the graph.

Deployment: TorchScript (trace + freeze), loadable with plain torch.jit.load.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.ao import quantization as tq

from ..export import export_torchscript
from ..models import _no_twin, build
from . import attention, check_layers
from ..qconfigs import Scheme, applied_qconfig, applied_torch_ao, qconfig

RUNTIME = "torchscript"
METHODS = ("dynamic", "static", "qat")


def from_float(model: nn.Module, meta: dict, method: str = "static") -> nn.Module:
    """The model this flow quantizes, from the fp32 model (a copy the caller owns).
    Static and QAT need the quantizable twin: QuantStub at the input, DeQuantStub at the output,
    fuse_model(); it has the float model's parameter names, so its weights load unchanged.
    Dynamic quantization only swaps nn.Linear modules, so the plain float model does (and
    models without a twin, a vision transformer say, get ptq-d too)."""
    if method == "dynamic" or hasattr(model, "fuse_model"):
        return model
    if not meta.get("arch"):  # a user's builder: nothing to twin it with
        raise _no_twin(meta.get("model") or type(model).__name__)
    twin = build(str(meta["arch"]).rsplit(".", 1)[-1], int(meta["num_classes"]), quantizable=True,
                 input_shape=meta.get("input_shape"))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def quantize_dynamic(model: nn.Module, scheme: Scheme | str, example: torch.Tensor,
                     fp32_layers: Sequence[str] = ()) -> tuple[nn.Module, dict]:
    """ptq-d: weights of nn.Linear become int8 ahead of time; activations are quantized on the
    fly, per batch. Only ResNet's final fc is a Linear, so almost nothing changes: dynamic
    quantization pays off for Linear/LSTM-heavy models (transformers, RNNs), not CNNs. Attention
    layers are first rewritten with nn.Linear projections (split_attention), so they count too.
    torch's dynamic qconfig is used whatever `scheme` says (per-tensor min/max int8 weights):
    the static qconfigs' activation observers mean nothing without calibration. A dynamic layer
    takes and returns float tensors, so fp32 layers need no stubs: a name maps to no qconfig
    (names win over types in torch.ao's qconfig dict)."""
    qc = tq.default_dynamic_qconfig
    split = attention.split_attention(model.eval(), example)  # before the names are checked: in_proj is new
    spec = {nn.Linear: qc, **{name: None for name in check_layers(model, fp32_layers)}}
    applied = applied_qconfig(qc)
    if split:
        applied["attention"] = attention.note(split)
    return tq.quantize_dynamic(model, spec, dtype=torch.qint8), applied


def prepare(model: nn.Module, scheme: Scheme | str, qat: bool, example: torch.Tensor,
            fp32_layers: Sequence[str] = ()) -> nn.Module:
    """Fuse conv+bn(+relu) so each becomes one int8 kernel, then insert observers (static) or
    fake-quantize modules (QAT) according to the qconfig; `fp32_layers` become float islands."""
    fp32_layers = check_layers(model, fp32_layers)
    qc = qconfig(scheme, qat=qat)       # a bad scheme fails before the model changes
    if qat:
        model.train()
        model.fuse_model(is_qat=True)   # keeps BN as a separate, trainable part of ConvBn(ReLU)2d
    else:
        model.eval()
        model.fuse_model()              # folds BN into the conv weights
    _float_islands(model, fp32_layers)
    model.qconfig = qc
    return tq.prepare_qat(model, inplace=True) if qat else tq.prepare(model, inplace=True)


class FloatIsland(nn.Module):
    """A float layer inside an int8 eager model: dequantize its input, run it in fp32, quantize
    its output again (a stub is nn.Identity where the island sits at the model's edge)."""

    def __init__(self, module: nn.Module, dequant: nn.Module, quant: nn.Module):
        super().__init__()
        module.qconfig = None           # prepare and convert leave it, and what it holds, alone
        self.dequant, self.module, self.quant = dequant, module, quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.module(self.dequant(x)))


def _float_islands(model: nn.Module, names: Sequence[str]) -> None:
    first, last = _edges(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        dequant, quant = tq.DeQuantStub(), tq.QuantStub()
        if name == first:               # it reads the model's float input: nothing to quantize
            model.quant, dequant = nn.Identity(), nn.Identity()
        if name == last:                # its output is the model's: float logits
            model.dequant, quant = nn.Identity(), nn.Identity()
        setattr(owner, attr, FloatIsland(getattr(owner, attr), dequant, quant))


def _edges(model: nn.Module) -> tuple[str | None, str | None]:
    """The layers fed by the model's QuantStub and feeding its DeQuantStub directly, where the
    architecture is known to have them (torchvision's quantizable ResNets: conv1 and fc)."""
    from torchvision.models.quantization.resnet import QuantizableResNet
    return ("conv1", "fc") if isinstance(model, QuantizableResNet) else (None, None)


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
