"""PT2E quantization (torchao 0.18): PyTorch 2's export-based flow.

    torch.export  ->  prepare_pt2e(quantizer)  ->  calibrate / fine-tune  ->  convert_pt2e
         graph         observers where the            as in the other          a "QDQ" graph:
         of aten ops   backend's Quantizer wants      flows                    fp32 ops between
                       them (annotations)                                      quantize/dequantize

The converted graph still runs fp32 ops; it only marks where values are int8. The int8 kernels
come at deployment, when inductor (torch.compile with freezing) pattern-matches
dequantize -> conv -> quantize into oneDNN int8 convolutions. The Quantizer is therefore the
backend's: X86InductorQuantizer annotates exactly the patterns inductor's x86 lowering fuses.

Deployment: a torch.export program (.pt2) of the converted graph, loaded with torch.export.load
and lowered with torch.compile at load time (quantbench.runtimes.inductor).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.export import Dim
from torchao.quantization.pt2e import (FakeQuantize, FusedMovingAvgObsFakeQuantize, HistogramObserver,
                                       MinMaxObserver, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver,
                                       disable_observer, move_exported_model_to_eval,
                                       move_exported_model_to_train)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer, get_default_x86_inductor_quantization_config)

from ..cpu import reduce_range
from ..pt2_archive import save_program
from . import check_layers
from ..qconfigs import PercentileMixin, Scheme, SharedScaleMixin, graph_observers

RUNTIME = "inductor"
METHODS = ("dynamic", "static", "qat")


def from_float(model: nn.Module, meta: dict, method: str = "static") -> nn.Module:
    # The plain float model: torch.export traces it as it is (but see _one_partition_per_call).
    return model


# ---------------------------------------------------------------- capture
def _one_partition_per_call(gm: torch.fx.GraphModule) -> None:
    """Give each call of a module that runs more than once its own name in the graph's metadata.

    The quantizer finds its patterns (conv -> bn -> relu, conv -> bn -> add -> relu, ...) in
    "partitions": the ops that came from one module, grouped by the module's qualified name in
    each node's nn_module_stack. A module CALLED TWICE thus becomes one partition with two
    outputs, and X86InductorQuantizer gives up ("Input partition has more than one output
    node"). torchvision's ResNet blocks do this: BasicBlock calls its one nn.ReLU twice (after
    bn1 and after the residual add), Bottleneck three times; so can any model.

    torch.export already tells the calls apart in the stack's KEYS ("L__self__relu",
    "L__self__relu@1", ...), not in the names the quantizer groups by. So rename the second and
    later calls "relu@1", "relu@2", ...: each call is its own partition and is fused like any
    other. Only metadata changes, never the graph or the model, and it works whatever the module
    is (activation, a shared conv, a whole block called twice). A module-NAME quantizer filter
    for such a module would then see only its first call; we configure by type or globally."""
    calls: dict[str, list[str]] = {}  # module name -> keys of its calls, in order
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (name, cls) = list(stack.items())[-1]
        seen = calls.setdefault(name, [])
        if key not in seen:
            seen.append(key)
        i = seen.index(key)
        if i:
            # A copy: stacks may be shared between nodes.
            node.meta["nn_module_stack"] = {**stack, key: (f"{name}@{i}", cls)}


def _batch_dim() -> dict:
    return {0: Dim("batch")}


def _two(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes dimensions of size 1 (they cannot be told apart from broadcasts),
    # so the batch can only be traced as dynamic from an example with a batch of 2 or more.
    return example[:1].expand(2, *example.shape[1:]).contiguous()


def _capture(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """torch.export the float model with a dynamic batch dimension; .module() gives the graph
    (aten ops, weights as attributes) that prepare_pt2e annotates."""
    gm = torch.export.export(model, (_two(example),), dynamic_shapes=(_batch_dim(),)).module()
    _one_partition_per_call(gm)
    return gm


# ---------------------------------------------------------------- quantizer configuration
class PercentileObserver(PercentileMixin, HistogramObserver):
    """torchao's HistogramObserver, clipping at a percentile of |x| (see qconfigs.PercentileMixin)."""


class SharedScalePerChannelObserver(SharedScaleMixin, PerChannelMinMaxObserver):
    """Per-tensor weights in a per-channel layout, static (see qconfigs.SharedScaleMixin)."""


class SharedScaleMovingAveragePerChannelObserver(SharedScaleMixin, MovingAveragePerChannelMinMaxObserver):
    """Per-tensor weights in a per-channel layout, QAT."""


_ACT_OBSERVERS = {"minmax": MinMaxObserver, "moving-average": MovingAverageMinMaxObserver,
                  "histogram": HistogramObserver, "percentile": PercentileObserver}


def _quantizer_config(scheme: Scheme | str, qat: bool = False, dynamic: bool = False) -> QuantizationConfig:
    """Our Schemes (quantbench.qconfigs) expressed as PT2E QuantizationConfigs.

    "default" with no overrides is X86InductorQuantizer's own recipe (per-channel symmetric int8
    weights, uint8 per-tensor activations from a histogram observer) with reduce_range() from
    quantbench.cpu. That argument matters: without VNNI, oneDNN's int8 convolutions multiply
    u8 x s8 pairs into a SATURATING int16 (vpmaddubsw); with full-range activations (0..255)
    two products overflow and the deployed model silently loses accuracy (about 3.6 points
    top-1 on our ResNet-18), although the QDQ graph, which computes in fp32, looks fine.
    Activations in [0, 127] keep every pair below 2^15. On VNNI/AMX CPUs reduce_range() is
    False and the full range is used.

    Per-tensor weights: inductor's x86 lowering matches per-channel weight dequantization only
    (a per-tensor one would silently stay an fp32 convolution), so they are per-channel weights
    sharing one scale (SharedScaleMixin): the same arithmetic, a layout inductor runs in int8.
    """
    scheme = Scheme.of(scheme)  # unknown names fail here
    if dynamic:
        # Dynamic quantization has no observers to configure: every scheme means the same.
        return get_default_x86_inductor_quantization_config(
            is_qat=qat, is_dynamic=True, reduce_range=reduce_range())
    r = scheme.resolve(qat)
    # X86InductorQuantizer's own recipe keeps scales above 2^-12; the original's did not
    extra = {"eps": 2 ** -12} if r.qconfig == "default" else {}
    act_kw = {**extra, **({"percentile": r.percentile} if r.observer == "percentile" else {})}
    per_channel = r.weight_scheme == "per-channel"
    if qat:
        wt_obs = MovingAveragePerChannelMinMaxObserver if per_channel else SharedScaleMovingAveragePerChannelObserver
    else:
        wt_obs = PerChannelMinMaxObserver if per_channel else SharedScalePerChannelObserver
    if r.fused_fake_quant:  # torch's fused observe+fake-quantize kernel: moving-average min/max only
        act_ctr = FusedMovingAvgObsFakeQuantize.with_args(**act_kw)
    elif qat:
        act_ctr = FakeQuantize.with_args(observer=_ACT_OBSERVERS[r.observer], **act_kw)
    else:
        act_ctr = _ACT_OBSERVERS[r.observer].with_args(**act_kw)
    if qat and per_channel and r.qconfig == "default":
        wt_ctr = FusedMovingAvgObsFakeQuantize.with_args(observer=wt_obs, **extra)
    elif qat:  # the fused kernel computes its own per-channel scales: shared ones need FakeQuantize
        wt_ctr = FakeQuantize.with_args(observer=wt_obs, **extra)
    else:
        wt_ctr = wt_obs.with_args(**extra)
    act = QuantizationSpec(dtype=torch.uint8, quant_min=r.act_range[0], quant_max=r.act_range[1],
                           qscheme=r.act_qscheme, observer_or_fake_quant_ctr=act_ctr)
    wt = QuantizationSpec(dtype=torch.int8, quant_min=r.weight_range[0], quant_max=r.weight_range[1],
                          qscheme=torch.per_channel_symmetric, ch_axis=0, observer_or_fake_quant_ctr=wt_ctr)
    return QuantizationConfig(act, act, wt, None, is_qat=qat)


class _Quantizer(X86InductorQuantizer):
    """X86InductorQuantizer, whose "no config" marks on fp32 layers' ops are taken off once
    annotation is done. The mark stops later (global) configs from annotating those ops, but
    torchao's QAT conv+bn rewrite (prepare_qat_pt2e) reads an input and a weight spec off every
    annotated conv and fails on a marked one. Unannotated is "leave float" too, and survives it."""

    def __init__(self, fp32_layers: Sequence[str] = ()):
        super().__init__()
        self.fp32_layers = frozenset(fp32_layers)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = super().annotate(model)
        for node in model.graph.nodes:
            mark = node.meta.get("quantization_annotation")
            stack = node.meta.get("nn_module_stack") or {}
            owner = list(stack.values())[-1][0] if stack else None
            if mark is not None and owner in self.fp32_layers and not mark.input_qspec_map \
                    and mark.output_qspec is None:
                del node.meta["quantization_annotation"]
        return model


def _quantizer(config: QuantizationConfig, fp32_layers: Sequence[str], linear_only: bool = False):
    """X86InductorQuantizer with `config` everywhere (or on nn.Linear only), except the
    fp32_layers: module names are annotated first, and None there means "leave it float"."""
    quantizer = _Quantizer(fp32_layers)
    if linear_only:
        quantizer.set_module_type_qconfig(nn.Linear, config)
    else:
        quantizer.set_global(config)
    for name in fp32_layers:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


# ---------------------------------------------------------------- the flow
def quantize_dynamic(model: nn.Module, scheme: Scheme | str, example: torch.Tensor,
                     fp32_layers: Sequence[str] = ()) -> tuple[nn.Module, dict]:
    """ptq-d: only nn.Linear (ResNet's fc) gets the quantizer's dynamic config: int8 weights,
    activations quantized per batch at run time (choose_qparams in the graph). Convolutions stay
    fp32, as in the other flows. Activations need no calibration data, but the weights' observer
    is a node of the graph like any other: it sees the weight only when the graph runs, so one
    forward pass (any input) must precede convert, else the int8 weights get garbage scales."""
    model.eval()
    fp32_layers = check_layers(model, fp32_layers)
    quantizer = _quantizer(_quantizer_config(scheme, dynamic=True), fp32_layers, linear_only=True)
    gm = _capture(model, example)
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        prepared(_two(example))
    used = applied(prepared)  # before convert, which replaces the observers
    return convert(prepared), used


def prepare(model: nn.Module, scheme: Scheme | str, qat: bool, example: torch.Tensor,
            fp32_layers: Sequence[str] = ()) -> nn.Module:
    """Capture, annotate with one global config (none on the fp32_layers), insert observers
    (static) or fake-quantize modules (QAT)."""
    fp32_layers = check_layers(model, fp32_layers)
    quantizer = _quantizer(_quantizer_config(scheme, qat=qat), fp32_layers)
    if qat:
        # Captured in train mode, batch norm stays a (training) batch_norm op after the conv;
        # prepare_qat_pt2e rewrites each conv+bn so the conv sees BN-scaled, fake-quantized weights,
        # as eager's ConvBn2d does, and convert_pt2e folds BN into the int8 weights.
        return prepare_qat_pt2e(_capture(model.train(), example), quantizer)
    # eval capture: prepare_pt2e folds BN into the conv weights before observing them.
    gm = _capture(model.eval(), example)
    return prepare_pt2e(gm, quantizer)


def applied(prepared: nn.Module) -> dict:
    """The observers prepare_pt2e inserted, read back from the graph (qconfigs.graph_observers)."""
    return graph_observers(prepared)


def convert(prepared: nn.Module) -> nn.Module:
    """Observers/fake-quants become quantize/dequantize ops with the scales they found; weights
    are quantized ahead of time (stored as int8 tensors)."""
    prepared = prepared.cpu()
    if _has_batch_norm(prepared):  # QAT graphs (PTQ folded BN away): running statistics again
        move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    _drop_unused_weights(converted)
    return converted


def _drop_unused_weights(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e folds quantize(weight) into new int8 constants but leaves the fp32 weights
    behind as (now unread) parameters; re-exported, they would make the file 5x bigger and
    weight_bytes wrong. Delete every parameter/buffer that no get_attr node reads."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in read:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)


# ---------------------------------------------------------------- QAT controls
_BN_OPS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
           torch.ops.aten.cudnn_batch_norm.default)
_FROZEN_BN = "_quantbench_bn_frozen"


_DROPOUT_OPS = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)


def set_mode(model: nn.Module, training: bool) -> None:
    """An exported graph has train/eval behaviour baked into its ops (batch_norm's `training`
    argument), so .train()/.eval() change nothing: torchao rewrites the batch-norm (and dropout)
    ops instead. Frozen batch norm stays frozen (move_exported_model_to_train would unfreeze it).

    torchao's rewrite also replaces every dropout's probability with 0.5 (its pattern's literal):
    a ViT's p=0.0 dropouts would train at 0.5 and QAT would ruin the model. The probabilities
    are read before and put back after, in graph order."""
    rates = [node.args[1] for node in _dropouts(model)]
    if training:
        move_exported_model_to_train(model)
        if getattr(model, _FROZEN_BN, False):
            _set_bn_training(model, False)
    else:
        move_exported_model_to_eval(model)
    after = _dropouts(model)
    if len(after) != len(rates):
        raise RuntimeError(f"switching the exported model's mode changed its dropout ops ({len(rates)} -> "
                           f"{len(after)}); their probabilities cannot be restored")
    for node, p in zip(after, rates):
        node.args = (node.args[0], p, *node.args[2:])
    model.recompile()


def _dropouts(model: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in model.graph.nodes if node.op == "call_function" and node.target in _DROPOUT_OPS]


def _has_batch_norm(model: torch.fx.GraphModule) -> bool:
    return any(node.op == "call_function" and node.target in _BN_OPS for node in model.graph.nodes)


def _set_bn_training(model: torch.fx.GraphModule, training: bool) -> None:
    # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target in _BN_OPS:
            node.update_arg(5, training)
    model.recompile()


def freeze_bn(model: nn.Module) -> None:
    """QAT: batch norm uses (and stops updating) its running statistics, as eager's
    freeze_bn_stats does. The QAT conv+bn pattern already scales the weights by the RUNNING
    std; with frozen statistics its output equals the BN-folded conv that convert produces,
    so the fine-tune optimizes the very model that gets deployed."""
    setattr(model, _FROZEN_BN, True)
    _set_bn_training(model, False)


def freeze_observers(model: nn.Module) -> None:
    """QAT: fix the quantization ranges (torchao's own fake-quantize classes, so torchao's
    disable_observer)."""
    model.apply(disable_observer)


# ---------------------------------------------------------------- deployment
def export(model: nn.Module, path, example: torch.Tensor) -> None:
    """Re-export the converted QDQ graph (dynamic batch again) and save the ExportedProgram.
    The file holds the int8 weights and the graph; torch.export.load needs no quantbench."""
    with torch.no_grad():
        program = torch.export.export(model, (_two(example),), dynamic_shapes=(_batch_dim(),))
    save_program(program, path)  # atomic, and the same bytes for the same program
