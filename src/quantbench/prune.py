"""Dead-tap pruning: an exact graph pass for convolutions that run on tiny feature maps.

A convolution with zero padding, fed a map smaller than its receptive field, has kernel taps that
only ever land on the padding: whatever the weights there, they multiply zeros. ResNet-18 with
its ImageNet stem, fed 32x32 images, runs layer4's 3x3 convolutions on 1x1 maps, where only the
centre tap ever sees a pixel. Cropping the kernel to the taps that can touch a pixel (and
shrinking the padding to match) gives a smaller nn.Conv2d with the same outputs, for that input
size only.

How a tap is judged, per spatial axis (input length L, kernel K, stride s, dilation d, padding
pl before and pr after the map): output o reads input i = o*s - pl + k*d with tap k, for
o = 0 .. O-1, O = (L + pl + pr - d*(K-1) - 1) // s + 1. Tap k is live if some o gives 0 <= i < L.
Cropping the kernel to [a, b] and taking pl' = pl - a*d, pr' = pr - (K-1-b)*d keeps every output
position and what it reads, so the outputs only change by float rounding (fewer zero products
in each sum). nn.Conv2d pads both sides alike, so where pl' != pr' the crop keeps some dead taps,
or pr' shrinks or grows within what the stride leaves unread, until the two agree.

The replacement is a plain nn.Conv2d under the same module name, so the eager flow's
fuse_model() (which fuses by names), FX symbolic tracing and torch.export all see an ordinary
convolution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import QuantbenchError

VERIFY_SAMPLES = 8  # random inputs per verification (plus any real `inputs`)
VERIFY_BATCH = 256  # inputs per forward pass while verifying, at most
# ... and at most this many pixels per pass: the activations of a pass grow with H x W, so at
# 224 x 224 a pass holds 20 images where at 32 x 32 it holds 256 (bounded memory, same checks)
VERIFY_PIXELS = 2 ** 20


def verify_batch(input_shape) -> int:
    """Inputs per verifying forward pass for this input shape (C, H, W)."""
    from .data import images_per_batch
    return images_per_batch(input_shape, VERIFY_BATCH, VERIFY_PIXELS)


@dataclass
class PrunedLayer:
    name: str
    input_hw: tuple[int, int]
    old_kernel: tuple[int, int]
    new_kernel: tuple[int, int]
    old_padding: tuple[int, int]
    new_padding: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    weights_before: int
    weights_after: int
    max_abs_diff: float | None = None  # this layer's own output, old vs new conv (when verified)


@dataclass
class PruneReport:
    layers: list[PrunedLayer]
    max_abs_diff: float | None  # the whole model's output, unpruned vs pruned (None: not verified)
    input_shape: tuple[int, int, int]
    convs_seen: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # conv name -> why it was not looked at

    @property
    def weights_before(self) -> int:
        return sum(layer.weights_before for layer in self.layers)

    @property
    def weights_after(self) -> int:
        return sum(layer.weights_after for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of what changed, for a deployment file's sidecar."""
        d = asdict(self)
        d["weights_before"], d["weights_after"] = self.weights_before, self.weights_after
        d["valid_for"] = f"inputs of shape (N, {', '.join(map(str, self.input_shape))}) only"
        return d


@dataclass(frozen=True)
class _AxisCrop:
    start: int  # first kept tap
    stop: int   # one past the last kept tap
    padding: int


def live_taps(length: int, kernel: int, stride: int, pad_before: int, pad_after: int,
              dilation: int = 1) -> list[int]:
    """Taps of one spatial axis that read a real input element for at least one output position."""
    outputs = (length + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1
    return [k for k in range(kernel)
            if any(0 <= o * stride - pad_before + k * dilation < length for o in range(outputs))]


def _crop_axis(length: int, kernel: int, stride: int, pad_before: int, pad_after: int,
               dilation: int) -> _AxisCrop | str:
    """The smallest symmetric-padding crop of one axis with the same outputs, or why there is none."""
    live = live_taps(length, kernel, stride, pad_before, pad_after, dilation)
    if not live:
        return "no tap reads a pixel: its output is the bias alone"  # degenerate: left as it is
    extent = length + pad_before + pad_after - dilation * (kernel - 1) - 1
    # The output length is extent // s + 1, so the padding after the map may shrink by
    # extent mod s, or grow by s-1 - (extent mod s), without changing it: that padding is never
    # under the last output's window, and all other outputs read the same elements as before.
    shrink, grow = extent % stride, stride - 1 - extent % stride
    best = None
    # Dead taps may be kept (a lower, b higher) when that is what makes both sides pad alike.
    for a in range(live[0], -1, -1):
        for b in range(live[-1], kernel):
            pl = pad_before - a * dilation
            pr = pad_after - (kernel - 1 - b) * dilation
            if pl < 0 or not pr - shrink <= pl <= pr + grow:
                continue
            if best is None or b + 1 - a < best.stop - best.start:
                best = _AxisCrop(a, b + 1, pl)
    if best is None:  # e.g. padding="same" with an even kernel: one more row after than before
        return f"padding {pad_before} before / {pad_after} after has no symmetric equivalent"
    return best


def _paddings(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)); also resolves padding="same"/"valid"."""
    # nn.Conv2d keeps them as (left, right, top, bottom), the order F.pad takes.
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    return (top, bottom), (left, right)


def _plan(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[_AxisCrop, _AxisCrop] | str:
    """The crop of both axes for an input of size hw, or why the conv is left alone."""
    crops = [_crop_axis(hw[i], conv.kernel_size[i], conv.stride[i], *_paddings(conv)[i],
                        conv.dilation[i]) for i in range(2)]
    for axis, crop in zip("HW", crops):
        if isinstance(crop, str):
            return f"{axis}: {crop}"
    return crops[0], crops[1]  # type: ignore[return-value]


def _cropped_conv(conv: nn.Conv2d, plan: tuple[_AxisCrop, _AxisCrop]) -> nn.Conv2d:
    h, w = plan
    new = nn.Conv2d(conv.in_channels, conv.out_channels, (h.stop - h.start, w.stop - w.start),
                    stride=conv.stride, padding=(h.padding, w.padding), dilation=conv.dilation,
                    groups=conv.groups, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, :, h.start:h.stop, w.start:w.stop])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        new.bias.requires_grad_(conv.bias.requires_grad)
    new.train(conv.training)
    if hasattr(conv, "qconfig"):  # a per-module qconfig set before prepare must survive the swap
        new.qconfig = conv.qconfig
    return new


def _check_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError) as e:
        raise QuantbenchError(f"input_shape must be (C, H, W), got {input_shape!r}: {e}") from e
    if len(shape) != 3 or min(shape) < 1:
        raise QuantbenchError(f"input_shape must be three positive sizes (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _input_sizes(model: nn.Module, convs: dict[nn.Conv2d, list[str]], example: torch.Tensor
                 ) -> dict[nn.Conv2d, set[tuple[int, int]]]:
    """Run the model once and record the (H, W) each convolution is fed (a shared one: all)."""
    seen: dict[nn.Conv2d, set[tuple[int, int]]] = {c: set() for c in convs}

    def hook(module, args):
        seen[module].add(tuple(args[0].shape[-2:]))

    handles = [c.register_forward_pre_hook(hook) for c in convs]
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        raise QuantbenchError(f"the model does not run on an input of shape {tuple(example.shape)}: "
                              f"{type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    return seen


def _swap(model: nn.Module, names: list[str], module: nn.Module) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    """The tensors in a model's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _tensors(v)
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)


def _max_diff(a: Any, b: Any) -> float:
    pairs = list(zip(_tensors(a), _tensors(b), strict=True))
    return max(((x.float() - y.float()).abs().max().item() for x, y in pairs), default=0.0)


def prune_dead_taps(model: nn.Module, input_shape: tuple[int, int, int], *, verify: bool = True,
                    atol: float = 1e-4, inputs: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                    seed: int = 0) -> PruneReport:
    """Crop the kernels of every nn.Conv2d whose taps partly read only zero padding at this input size.

    Modifies `model` in place and leaves it in eval mode; hooks registered on a replaced conv do
    not move to its replacement, so prune before attaching observers or hooks. The pruned model computes the same
    function for inputs of shape (N, *input_shape) only. With `verify`, the outputs of the
    unpruned and pruned model are compared on VERIFY_SAMPLES random inputs and on `inputs` (for
    example real, normalized images; or a function returning them, called only when some layer
    was pruned, so a model with nothing to prune reads no images); a difference above `atol`
    restores the original modules and raises QuantbenchError naming the layer that changed most.
    """
    shape = _check_shape(input_shape)
    if isinstance(inputs, torch.Tensor):
        _check_inputs(inputs, shape)
    model.eval()  # batch norm in train mode would both change the outputs and its statistics
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    convs: dict[nn.Conv2d, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        # Subclasses (QAT / intrinsic convs) have their own forward: only the plain module is safe.
        if type(m) is nn.Conv2d and name:
            convs.setdefault(m, []).append(name)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(1, *shape, generator=gen).to(device, dtype)
    sizes = _input_sizes(model, convs, example)

    report = PruneReport(layers=[], max_abs_diff=None, input_shape=shape, convs_seen=len(convs))
    swaps: list[tuple[list[str], nn.Conv2d, nn.Conv2d, PrunedLayer]] = []
    for conv, names in convs.items():
        name = names[0]
        if conv.padding_mode != "zeros":
            report.skipped[name] = f"padding_mode={conv.padding_mode!r}: its padding is not zeros"
            continue
        if not sizes[conv]:
            report.skipped[name] = "not called on this input"
            continue
        plans = {_plan(conv, hw) for hw in sizes[conv]}
        if len(plans) > 1:
            report.skipped[name] = f"called on several sizes {sorted(sizes[conv])} that need different crops"
            continue
        plan = plans.pop()
        if isinstance(plan, str):
            report.skipped[name] = plan
            continue
        h, w = plan
        new_kernel = (h.stop - h.start, w.stop - w.start)
        if new_kernel == tuple(conv.kernel_size):
            continue  # every tap is live: nothing to gain
        new = _cropped_conv(conv, plan)
        layer = PrunedLayer(
            name=name, input_hw=min(sizes[conv]), old_kernel=tuple(conv.kernel_size), new_kernel=new_kernel,
            old_padding=_old_padding(conv), new_padding=(h.padding, w.padding),
            stride=tuple(conv.stride), dilation=tuple(conv.dilation),
            weights_before=conv.weight.numel(), weights_after=new.weight.numel())
        swaps.append((names, conv, new, layer))

    for names, _, new, _ in swaps:
        _swap(model, names, new)
    report.layers = [layer for *_, layer in swaps]
    if not verify or not swaps:
        report.max_abs_diff = 0.0 if verify else None
        return report
    try:
        if callable(inputs):  # read now, with the crops made: a failure here restores them too
            inputs = inputs()
            if inputs is not None:
                _check_inputs(inputs, shape)
        report.max_abs_diff = _verify(model, swaps, shape, gen, inputs, device, dtype)
    except BaseException:
        for names, old, _, _ in swaps:
            _swap(model, names, old)
        raise
    if report.max_abs_diff > atol:
        worst = max(swaps, key=lambda s: s[3].max_abs_diff or 0.0)[3]
        for names, old, _, _ in swaps:
            _swap(model, names, old)
        raise QuantbenchError(
            f"dead-tap pruning changed the model's output by {report.max_abs_diff:.3g} > atol {atol:g}; "
            f"worst layer {worst.name} ({worst.old_kernel} -> {worst.new_kernel}, its own output changed by "
            f"{worst.max_abs_diff:.3g}); the original convolutions are restored")
    return report


def _check_inputs(inputs: torch.Tensor, shape: tuple[int, int, int]) -> None:
    if inputs.dim() != 4 or tuple(inputs.shape[1:]) != shape:
        raise QuantbenchError(f"verification inputs have shape {tuple(inputs.shape)}, "
                              f"expected (N, {', '.join(map(str, shape))})")


def _old_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Padding before the map per axis (H, W); with padding="same" and an even kernel, the after
    side is one more."""
    (top, _), (left, _) = _paddings(conv)
    return top, left


def _verify(model: nn.Module, swaps, shape: tuple[int, int, int], gen: torch.Generator,
            inputs: torch.Tensor | None, device, dtype) -> float:
    """Max |unpruned - pruned| over the model's outputs; fills each layer's own max_abs_diff.

    Each pruned layer is checked on exactly the inputs it is fed in the pruned model: a hook runs
    the original conv on the same input and compares, so no activations need to be stored.
    """
    batches = [torch.randn(VERIFY_SAMPLES, *shape, generator=gen)]
    if inputs is not None:
        batches += list(inputs.split(verify_batch(shape)))
    for *_, layer in swaps:
        layer.max_abs_diff = 0.0

    def layer_hook(old: nn.Conv2d, layer: PrunedLayer):
        def hook(module, args, output):
            layer.max_abs_diff = max(layer.max_abs_diff, _max_diff(old(args[0]), output))
        return hook

    worst = 0.0
    with torch.no_grad():
        for x in batches:
            x = x.to(device, dtype)
            for names, old, new, _ in swaps:  # the original modules, for the reference pass
                _swap(model, names, old)
            reference = model(x)
            for names, old, new, _ in swaps:
                _swap(model, names, new)
            handles = [new.register_forward_hook(layer_hook(old, layer)) for _, old, new, layer in swaps]
            try:
                worst = max(worst, _max_diff(reference, model(x)))
            finally:
                for h in handles:
                    h.remove()
    return worst
