"""Attention, made quantizable by dynamic quantization.

nn.MultiheadAttention keeps its input projection as a bare parameter (in_proj_weight) and its
output projection as a NonDynamicallyQuantizableLinear, so quantizing "every nn.Linear" (eager's
quantize_dynamic, FX's object-type qconfig) leaves about a third of a transformer block's
multiply-adds in fp32. Rewriting the module with ordinary nn.Linear projections, computing the
same function, lets both flows convert them; the rewrite is checked on the model's output and
undone if anything differs.
"""
from __future__ import annotations

import torch
from torch import nn


class SplitAttention(nn.Module):
    """Self-attention computed as nn.MultiheadAttention computes it, with both projections held
    as nn.Linear modules. nn.MultiheadAttention keeps its input projection as a bare parameter and
    its output projection as a NonDynamicallyQuantizableLinear, so quantize_dynamic({nn.Linear})
    leaves a third of a transformer block's multiply-adds in fp32; here they are ordinary Linears.
    Only the case vision transformers use: batch_first, query = key = value, no masks."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.in_proj = nn.Linear(d, 3 * d)      # q, k and v projections stacked, as in_proj_weight is
        self.out_proj = nn.Linear(d, d)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or need_weights or is_causal:
            raise RuntimeError("SplitAttention supports unmasked self-attention without returned weights only")
        b, n, d = query.shape
        # (b, n, 3d) -> 3 x (b, heads, n, d / heads)
        qkv = self.in_proj(query).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def _splittable(m: nn.Module) -> bool:
    return (isinstance(m, nn.MultiheadAttention) and m.batch_first and m._qkv_same_embed_dim
            and m.in_proj_bias is not None and m.bias_k is None and not m.add_zero_attn)


@torch.no_grad()
def split_attention(model: nn.Module, example: torch.Tensor) -> int:
    """Replace every splittable nn.MultiheadAttention by a SplitAttention, in place, if the model's
    output on `example` stays the same (else everything is put back); returns how many."""
    found = [(name, m) for name, m in model.named_modules() if _splittable(m)]
    if not found:
        return 0
    before = model(example)
    for name, m in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, SplitAttention(m))
    try:
        same = torch.allclose(model(example), before, atol=1e-4, rtol=1e-4)
    except RuntimeError:  # called with masks or for its weights: not the case SplitAttention covers
        same = False
    if not same:
        for name, m in found:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, m)
        return 0
    return len(found)


def note(split: int) -> str:
    """The sidecar's line about the rewrite."""
    return (f"{split} nn.MultiheadAttention split into nn.Linear projections (in_proj, out_proj), "
            "so they are int8 too; outputs checked equal")
