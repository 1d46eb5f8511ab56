"""Cross-layer equalization (CLE): the same fp32 function, with weights int8 can represent better.

Why. Per-tensor weight quantization gives a whole weight tensor one scale, set by its widest
output channel; a channel whose weights span a tenth of that range keeps only a tenth of the 256
codes. Depthwise convolutions are the worst case: each output channel is its own 3x3 filter,
and after batch norm is folded in their ranges differ by orders of magnitude.

The fix (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
2019) uses an identity of ReLU networks: for s > 0, relu(y / s) = relu(y) / s. So in

    conv1 -> BN -> ReLU (or nothing) -> conv2

dividing output channel i of conv1+BN by s_i and multiplying input channel i of conv2 by s_i
leaves the function unchanged. Choosing s_i = sqrt(r1_i / r2_i), with r1_i the range of conv1's
(BN-folded) output channel i and r2_i the range of conv2's input channel i, makes both ranges
sqrt(r1_i * r2_i): equal across the pair, and closer to each other across channels.
torch.ao.quantization._equalize implements this for pairs of bare conv/linear modules; its
`channel_range` measures the ranges here and its formula is the one used, but our models keep
their BN modules (eager's fuse_model folds them later) and have grouped convolutions, so the
scale goes into BN's gamma and beta (which scales the BN output exactly) and into conv2's input
channels wherever its groups put them.

Only ReLU and identity between the two are exact. ReLU6 and hardswish clamp at a fixed value
(relu6(y / s) * s clamps at 6 s, not 6): those pairs are skipped and counted in the record.
Neither is a residual branch's output equalized: the addition would mix scaled and unscaled
channels. Like pruning (quantbench.prune), the result is verified: the model's outputs on random
and real inputs must agree with the original's, else the original weights come back with a
one-line warning.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.quantization._equalize import channel_range

from .errors import QuantbenchError, cause

# between conv1 (+BN) and conv2: positively homogeneous, so scaling passes through exactly
_EXACT = (nn.ReLU, nn.Identity)
_EXACT_FUNCTIONS = (torch.relu, torch.nn.functional.relu)
# common activations that are not: the pair is skipped, with this reason
_CLAMPS = {nn.ReLU6: "ReLU6 clamps at 6", nn.Hardtanh: "hardtanh clamps", nn.Hardswish: "hardswish is not "
           "positively homogeneous", nn.SiLU: "SiLU is not positively homogeneous",
           nn.Hardsigmoid: "hardsigmoid is not positively homogeneous", nn.GELU: "GELU is not positively homogeneous"}
ITERATIONS = 20      # rounds over all pairs (a conv between two pairs is rescaled by both)
TOLERANCE = 1e-4     # |logit difference| allowed, relative to the largest |logit|
CHECK_BATCH = 8


@dataclass
class Pair:
    """conv1 (with bn, or None) feeding conv2 through an exact activation."""
    conv1: str
    bn: str | None
    conv2: str


@dataclass
class EqualizeReport:
    pairs: list[Pair] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> pairs
    iterations: int = 0
    # mean over the equalized layers of (mean channel range / max channel range): 1 when every
    # output channel spans the same range, what per-tensor quantization wants
    range_evenness_before: float = math.nan
    range_evenness_after: float = math.nan
    max_abs_diff: float = 0.0

    def to_dict(self, applied: bool) -> dict:
        return {"applied": applied, "pairs": len(self.pairs),
                "layers": sorted({p.conv1 for p in self.pairs} | {p.conv2 for p in self.pairs}),
                "skipped": dict(self.skipped), "iterations": self.iterations,
                "range_evenness_before": round(self.range_evenness_before, 4),
                "range_evenness_after": round(self.range_evenness_after, 4),
                "max_abs_diff": self.max_abs_diff}


# ---------------------------------------------------------------- 1. find the pairs
def find_pairs(model: nn.Module) -> tuple[list[Pair], dict[str, int]]:
    """conv -> [BN] -> [ReLU] -> conv chains in the FX graph of the float model, each value used
    only by the next op (a second user would see the scaled channels). Also the skipped ones."""
    from torch.fx import symbolic_trace
    try:
        graph = symbolic_trace(model).graph
    except Exception as e:  # data-dependent control flow, unsupported Python
        raise QuantbenchError(f"--equalize finds its layer pairs in an FX trace of the model, which failed: "
                              f"{cause(e)}; quantize without --equalize") from e
    modules = dict(model.named_modules())
    pairs, skipped = [], {}

    def module(node):
        return modules.get(node.target) if node.op == "call_module" else None

    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    for node in graph.nodes:
        conv1 = module(node)
        if not isinstance(conv1, (nn.Conv2d, nn.Linear)):
            continue
        nxt, bn = only_user(node), None
        if nxt is not None and isinstance(module(nxt), nn.BatchNorm2d):
            bn, nxt = nxt.target, only_user(nxt)
        while nxt is not None and (isinstance(module(nxt), _EXACT) or nxt.target in _EXACT_FUNCTIONS):
            nxt = only_user(nxt)
        if nxt is None:
            continue  # several users (a residual branch, a concat) or the model's output
        m = module(nxt)
        reason = next((why for cls, why in _CLAMPS.items() if isinstance(m, cls)), None)
        if reason is not None and only_user(nxt) is not None and isinstance(module(only_user(nxt)), type(conv1)):
            skipped[reason] = skipped.get(reason, 0) + 1
        elif type(m) is type(conv1) and nxt.target != node.target and _channels_out(conv1) == _channels_in(m):
            pairs.append(Pair(node.target, bn, nxt.target))
    return pairs, skipped


def _channels_out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _channels_in(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


# ---------------------------------------------------------------- 2. ranges and scales
def _folded_weight(conv: nn.Module, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """conv1's weight as int8 will see it after BN is folded in (each output channel times
    gamma / sqrt(var + eps))."""
    w = conv.weight.detach()
    if bn is None:
        return w
    gain = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return w * gain.reshape(-1, *([1] * (w.dim() - 1)))


def _by_input_channel(conv: nn.Module) -> torch.Tensor:
    """conv2's weight as rows, one per input channel (groups put input channel c of group g
    in weight[g's output channels, c % (in / groups)]; depthwise: row c is filter c)."""
    w = conv.weight.detach()
    g = getattr(conv, "groups", 1)
    out, in_g = w.shape[:2]
    return w.reshape(g, out // g, in_g, -1).permute(0, 2, 1, 3).reshape(g * in_g, -1)


def _scale_input_channels(conv: nn.Module, s: torch.Tensor) -> None:
    w = conv.weight.data
    g = getattr(conv, "groups", 1)
    out, in_g = w.shape[:2]
    w.copy_((w.reshape(g, out // g, in_g, -1) * s.reshape(g, 1, in_g, 1)).reshape(w.shape))


def _scale_output_channels(conv: nn.Module, bn: nn.BatchNorm2d | None, inv: torch.Tensor) -> None:
    """Divide conv1+BN's output channels by s: BN's gamma and beta when there is a BN (its
    output is gamma (x - mean) / std + beta), else conv1's weight and bias."""
    target = bn if bn is not None else conv
    if bn is None:
        target.weight.data.mul_(inv.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    else:
        target.weight.data.mul_(inv)
    if target.bias is not None:
        target.bias.data.mul_(inv)


def _equalize_pair(model: nn.Module, pair: Pair) -> float:
    """One pair, in place; returns how far the scales were from 1 (to stop iterating)."""
    conv1, conv2 = model.get_submodule(pair.conv1), model.get_submodule(pair.conv2)
    bn = model.get_submodule(pair.bn) if pair.bn else None
    r1 = channel_range(_folded_weight(conv1, bn).flatten(1), 0)
    r2 = channel_range(_by_input_channel(conv2), 0)
    s = torch.sqrt(r1 / r2)
    # a dead channel (zero range on either side) keeps its scale
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    _scale_output_channels(conv1, bn, 1.0 / s)
    _scale_input_channels(conv2, s)
    return float((s - 1).abs().max())


def range_evenness(model: nn.Module, pairs: list[Pair]) -> float:
    """Mean over the pairs' layers of mean/max of the (BN-folded) output channels' ranges."""
    bns = {p.conv1: p.bn for p in pairs}
    values = []
    for name in sorted({p.conv1 for p in pairs} | {p.conv2 for p in pairs}):
        bn = model.get_submodule(bns[name]) if bns.get(name) else None
        r = channel_range(_folded_weight(model.get_submodule(name), bn).flatten(1), 0)
        values.append(float(r.mean() / r.max()) if r.max() > 0 else 1.0)
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------- 3. apply, verify
def equalize(model: nn.Module, input_shape: tuple[int, ...], inputs: torch.Tensor | None = None,
             seed: int = 0, tolerance: float = TOLERANCE) -> dict:
    """Cross-layer equalization of an fp32 model in place (its structure unchanged); returns the
    sidecar's "equalization" record. Verified on random inputs and `inputs` (real, normalized
    images) against the original: a difference above `tolerance` x the largest |logit| restores
    the original weights with a one-line warning."""
    model.eval()
    pairs, skipped = find_pairs(model)
    report = EqualizeReport(pairs=pairs, skipped=skipped)
    if not pairs:
        return {**report.to_dict(applied=False), "why": "no conv -> [BN] -> [ReLU] -> conv pair"}
    original = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(CHECK_BATCH, *input_shape, generator=gen)
    if inputs is not None:
        x = torch.cat([x, inputs[:CHECK_BATCH]])
    with torch.no_grad():
        before = model(x)
        report.range_evenness_before = range_evenness(model, pairs)
        for report.iterations in range(1, ITERATIONS + 1):
            if max(_equalize_pair(model, p) for p in pairs) < 1e-3:  # the scales have settled
                break
        report.range_evenness_after = range_evenness(model, pairs)
        after = model(x)
    report.max_abs_diff = float((after - before).abs().max())
    scale = float(before.abs().max()) or 1.0
    if not report.max_abs_diff <= tolerance * scale:
        model.load_state_dict(original)
        why = (f"cross-layer equalization changed the model's output by {report.max_abs_diff:.3g} "
               f"(> {tolerance:g} x the largest logit {scale:.3g}); the original weights are restored")
        print(f"WARNING: {why}", file=sys.stderr, flush=True)
        return {**report.to_dict(applied=False), "why": why}
    return {**report.to_dict(applied=True), "verified_on": f"{CHECK_BATCH} random inputs"
            + (f" and {min(len(inputs), CHECK_BATCH)} real images" if inputs is not None else "")}


def equalize_for_quantize(model: nn.Module, shape: tuple[int, ...], enabled: bool, data=None, seed: int = 0) -> dict:
    """quantize()'s one call: equalize (when asked) the fp32 model about to be prepared, checked
    on a few real training images too when `data` (normalized for this model) is given."""
    if not enabled:
        return {"applied": False, "why": "not asked for (--equalize)"}
    real = None
    if data is not None and data.train is not None and len(data.train):
        from .data import Batches
        real, _ = next(iter(Batches(data.train, CHECK_BATCH, data.mean, data.std, shuffle=True, seed=seed,
                                    limit=CHECK_BATCH)))
    return equalize(model, tuple(shape), inputs=real, seed=seed)
