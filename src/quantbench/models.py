"""Stage 2: models and checkpoints.

Each architecture has a float builder and a "quantizable" twin with the same parameter names
(torchvision.models.quantization: QuantStub/DeQuantStub, FloatFunctional for the residual add
and a `fuse_model()`), which eager-mode static quantization and QAT need. FX and PT2E trace the
plain float model instead.

A checkpoint file is `{"state_dict": ..., "meta": {...}}`; a bare state dict loads too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import QuantbenchError, cause


@dataclass(frozen=True)
class Arch:
    float: Callable[[int], nn.Module]
    quantizable: Callable[[int], nn.Module]


def _resnet(layers: list[int]) -> Arch:
    from torchvision.models import resnet as R
    from torchvision.models.quantization import resnet as QR

    return Arch(
        float=lambda k: R.ResNet(R.BasicBlock, layers, num_classes=k),
        quantizable=lambda k: QR.QuantizableResNet(QR.QuantizableBasicBlock, layers, num_classes=k),
    )


# resnet18 is the original's model (torchvision.models.resnet18, ImageNet stem, fed 32x32 images).
# resnet10 is the same design with one block per stage: a small model for tests.
ARCHS: dict[str, Arch] = {
    "resnet18": _resnet([2, 2, 2, 2]),
    "resnet10": _resnet([1, 1, 1, 1]),
}


def build(arch: str, num_classes: int, quantizable: bool = False) -> nn.Module:
    if arch not in ARCHS:
        raise QuantbenchError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    return (ARCHS[arch].quantizable if quantizable else ARCHS[arch].float)(num_classes)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    from .fileio import save_torch
    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    save_torch({"state_dict": state, "meta": meta}, path)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / AveragedModel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state_dict, meta) from a quantbench checkpoint or a bare state dict, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"checkpoint not found: {path}")
    from . import runtimes
    kind = runtimes.deployment_kind(path)
    if kind is not None:
        raise QuantbenchError(f"{path} is an exported model ({kind}), not an fp32 checkpoint; "
                              "quantize the .pth checkpoint it was made from")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QuantbenchError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint "
                              f"({cause(e)})") from e
    if isinstance(blob, dict) and "state_dict" in blob:
        state, meta = blob["state_dict"], dict(blob.get("meta") or {})
    elif isinstance(blob, dict) and "model" in blob and isinstance(blob["model"], dict):
        state, meta = blob["model"], dict(blob.get("meta") or {})  # a trainer's last.pth
    else:
        state, meta = blob, {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QuantbenchError(f"{path} does not hold a state dict of tensors")
    if any(k.endswith(("scale", "zero_point", "_packed_params")) for k in state):
        raise QuantbenchError(f"{path} holds an already-quantized model; quantize the fp32 checkpoint")
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, meta


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
                    quantizable: bool = False) -> tuple[nn.Module, dict]:
    """Build the model a checkpoint describes and load its weights (eval mode)."""
    state, meta = read_checkpoint(path)
    saved_arch = str(meta.get("arch", "")).rsplit(".", 1)[-1] or None
    if arch and saved_arch and arch != saved_arch:
        raise QuantbenchError(f"{path} holds a {saved_arch}, not a {arch}")
    arch = arch or saved_arch or "resnet18"
    if "fc.weight" not in state:
        raise QuantbenchError(f"{path} is not a {arch} checkpoint (it has no fc.weight)")
    k = state["fc.weight"].shape[0]
    if num_classes is not None and k != num_classes:
        raise QuantbenchError(f"{path} has {k} output classes but the data has {num_classes}")
    model = build(arch, k, quantizable=quantizable)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: another width or depth
        raise QuantbenchError(f"{path} does not fit {arch}: {str(e).splitlines()[-1].strip()}") from e
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys + result.unexpected_keys)[:3]
        raise QuantbenchError(f"{path} does not fit {arch}: mismatched weights such as {', '.join(bad)}")
    meta.setdefault("arch", arch)
    meta["arch"] = arch
    meta.setdefault("num_classes", k)
    return model.eval(), meta
