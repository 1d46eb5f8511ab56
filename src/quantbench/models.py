"""Stage 2: models and checkpoints.

Three ways to name a model:

* a torchvision classification architecture (`resnet50`, `mobilenet_v2`, `efficientnet_b0`,
  `convnext_tiny`, ...: every builder in `torchvision.models`), built untrained with our class
  count;
* two of our own: `resnet10` (ResNet-18 with one block per stage, a small model for tests) and
  `vit_tiny` (a small vision transformer for 32x32 images, see `vit_tiny`);
* the user's own code, `path/to/file.py:build` or `package.module:build` (`load_builder`).

Eager-mode static quantization and QAT need more than the float model: a "quantizable" twin with
the same parameter names (QuantStub/DeQuantStub, FloatFunctional for adds, a `fuse_model()`).
torchvision.models.quantization ships twins for the ResNet/ResNeXt family, MobileNetV2,
MobileNetV3-Large, ShuffleNetV2, GoogLeNet and Inception-v3; other models go through FX or PT2E,
which trace the plain float model instead.

A checkpoint file is `{"state_dict": ..., "meta": {...}}`; a bare state dict loads too. The meta
says how to rebuild the model: "arch" (or "model", the user's builder), "num_classes", and
"input_shape" ([C, H, W]) when the architecture depends on the image size (vision transformers).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import QuantbenchError, cause

# The data quantbench was written for (CIFAR-10). Architectures whose layers depend on the image
# size (vision transformers' position embeddings) are built for it unless told otherwise.
DEFAULT_INPUT_SHAPE = (3, 32, 32)


def _no_twin(name: str) -> QuantbenchError:
    from .errors import FlowUnsupported
    return FlowUnsupported(f"{name} has no quantizable twin and eager mode needs one; use --flow fx or "
                           "--flow pt2e (eager's dynamic method works on the float model)")


# ---------------------------------------------------------------- our own architectures
def _resnet10(num_classes: int, quantizable: bool = False) -> nn.Module:
    # resnet18's design with one BasicBlock per stage.
    if quantizable:
        from torchvision.models.quantization import resnet as QR
        return QR.QuantizableResNet(QR.QuantizableBasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    from torchvision.models import resnet as R
    return R.ResNet(R.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def vit_tiny(num_classes: int, image_size: int = 32) -> nn.Module:
    """A small ViT for 32x32 images: 4x4 patches (64 tokens + a class token), 6 encoder layers
    of width 192 (3 heads of 64), MLP width 768. Almost all its weights and multiply-adds are in
    Linear layers, so it is the model where dynamic quantization (int8 Linear) pays off, unlike
    the CNNs. Note: torchvision's blocks use nn.MultiheadAttention, whose projections are not
    nn.Linear modules (in_proj is a bare parameter, out_proj a NonDynamicallyQuantizableLinear):
    eager quantize_dynamic({nn.Linear}) converts the MLPs and the head, not the attention."""
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=image_size, patch_size=4, num_layers=6, num_heads=3,
                             hidden_dim=192, mlp_dim=768, num_classes=num_classes)


# ---------------------------------------------------------------- quantizable twins
# The ResNet family's twin is one class (QuantizableResNet), given the float model's block type,
# depth and width; torchvision only ships builders for some of these, so build them all alike.
_RESNETS: dict[str, tuple[str, list[int], dict]] = {
    "resnet18": ("basic", [2, 2, 2, 2], {}),
    "resnet34": ("basic", [3, 4, 6, 3], {}),
    "resnet50": ("bottleneck", [3, 4, 6, 3], {}),
    "resnet101": ("bottleneck", [3, 4, 23, 3], {}),
    "resnet152": ("bottleneck", [3, 8, 36, 3], {}),
    "resnext50_32x4d": ("bottleneck", [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": ("bottleneck", [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": ("bottleneck", [3, 4, 23, 3], {"groups": 64, "width_per_group": 4}),
    "wide_resnet50_2": ("bottleneck", [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": ("bottleneck", [3, 4, 23, 3], {"width_per_group": 128}),
}


def _resnet_twin(arch: str, num_classes: int) -> nn.Module:
    from torchvision.models.quantization import resnet as QR
    block, layers, kwargs = _RESNETS[arch]
    block_cls = QR.QuantizableBasicBlock if block == "basic" else QR.QuantizableBottleneck
    return QR.QuantizableResNet(block_cls, layers, num_classes=num_classes, **kwargs)


def _mobilenet_v2_twin(num_classes: int) -> nn.Module:
    """torchvision's builder of this twin swaps every ReLU6 for a ReLU (eager mode cannot fuse
    conv+bn+relu6), which changes the arithmetic of a model trained with ReLU6: activations
    above 6 are no longer clipped. So build the class itself, keeping ReLU6, with a fuse_model
    that keeps the clamp (see _fuse_keeping_relu6): the twin computes what the float model does."""
    from torchvision.models.quantization import mobilenetv2 as QM
    model = QM.QuantizableMobileNetV2(num_classes=num_classes, block=QM.QuantizableInvertedResidual)
    # Bound to the instance (not a closure) so that copy.deepcopy rebinds it to the copy.
    model.fuse_model = types.MethodType(_fuse_keeping_relu6, model)
    return model


def _fuse_keeping_relu6(self: nn.Module, is_qat: bool | None = None) -> None:
    """Fuse each conv+bn+relu6 as conv+bn+relu and keep the ReLU6 after it: relu6(relu(x)) is
    relu6(x), the conv+bn+relu still becomes one int8 kernel, and the int8 model clamps at 6."""
    from torch.ao.quantization import fuse_modules, fuse_modules_qat
    from torchvision.models.quantization.mobilenetv2 import QuantizableInvertedResidual
    from torchvision.ops.misc import Conv2dNormActivation

    fuse = fuse_modules_qat if (self.training if is_qat is None else is_qat) else fuse_modules
    for m in self.modules():
        if type(m) is Conv2dNormActivation and type(m[2]) is nn.ReLU6:
            mode = m[2].training  # fusion wants all three in the same train/eval mode
            m[2] = nn.ReLU().train(mode)
            fuse(m, ["0", "1", "2"], inplace=True)
            m[2] = nn.ReLU6().train(mode)  # fusion left Identity at 1 and 2: put the clamp back
        elif type(m) is QuantizableInvertedResidual:
            m.fuse_model(is_qat)  # its projection conv+bn, which has no activation


def _torchvision_twin(arch: str, num_classes: int, **kwargs) -> nn.Module:
    # torchvision's quantizable builders: no weights, and quantize=False keeps them float
    # (observers come later, from the eager flow).
    from torchvision.models import get_model
    return get_model(f"quantized_{arch}", weights=None, quantize=False, num_classes=num_classes, **kwargs)


# Without these, googlenet/inception_v3 would build their auxiliary classifiers (whose
# parameters a plain model does not have) and warn about their default initialization.
_EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                 "inception_v3": {"aux_logits": False, "init_weights": True}}

_TWINS: dict[str, Callable[[int], nn.Module]] = {
    **{a: functools.partial(_resnet_twin, a) for a in _RESNETS},
    "resnet10": functools.partial(_resnet10, quantizable=True),
    "mobilenet_v2": _mobilenet_v2_twin,
    "mobilenet_v3_large": functools.partial(_torchvision_twin, "mobilenet_v3_large"),
    **{a: functools.partial(_torchvision_twin, a)
       for a in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0")},
    **{a: functools.partial(_torchvision_twin, a, **_EXTRA_KWARGS[a]) for a in ("googlenet", "inception_v3")},
}


# ---------------------------------------------------------------- the registry
@functools.lru_cache(maxsize=None)
def _torchvision_archs() -> tuple[str, ...]:
    import torchvision.models
    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_archs() -> list[str]:
    """Every architecture name `build` accepts."""
    return sorted({*_torchvision_archs(), "resnet10", "vit_tiny"})


def has_quantizable_twin(arch: str) -> bool:
    """Whether eager-mode static quantization / QAT can take `arch`."""
    return arch in _TWINS


def _check_arch(arch: str) -> None:
    if arch in list_archs():
        return
    if arch.startswith("timm:"):
        from .weights import _timm
        _timm()  # installed, or one line saying how
        return
    close = difflib.get_close_matches(arch, list_archs(), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "choose a torchvision classifier such as resnet18"
    raise QuantbenchError(f"unknown architecture {arch!r}; {hint} ({len(list_archs())} known: "
                          "resnet10, vit_tiny and torchvision.models.list_models())")


def _check_input_shape(input_shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    if input_shape is None:
        return None
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise QuantbenchError(f"input_shape must be [C, H, W] (three positive integers), not {list(shape)}")
    return shape  # type: ignore[return-value]


def build(arch: str, num_classes: int, quantizable: bool = False, *,
          input_shape: Sequence[int] | None = None) -> nn.Module:
    """An untrained `arch` with `num_classes` outputs: the float model, or its quantizable twin.

    `input_shape` ([C, H, W], default 3x32x32) matters only to architectures built for one image
    size (vit_*, vit_tiny, maxvit_t); torchvision's models all take 3 channels.
    """
    _check_arch(arch)
    c, h, w = _check_input_shape(input_shape) or DEFAULT_INPUT_SHAPE
    if c != 3:
        raise QuantbenchError(f"{arch} takes 3-channel images, not {c}; use your own model (--model)")
    if arch.startswith("timm:"):  # the optional extra .[timm]: FX and PT2E take it, eager has no twin
        if quantizable:
            raise _no_twin(arch)
        from .weights import build_timm
        return build_timm(arch, num_classes)
    if quantizable:
        if arch not in _TWINS:
            raise _no_twin(arch)
        return _TWINS[arch](num_classes)
    if arch == "resnet10":
        return _resnet10(num_classes)
    kwargs = dict(_EXTRA_KWARGS.get(arch, {}))
    # Transformers' position embeddings / attention windows are sized for one image size.
    if arch.startswith("vit_"):
        if h != w:
            raise QuantbenchError(f"{arch} takes square images, not {h}x{w}")
        kwargs["image_size"] = h
    elif arch == "maxvit_t":
        kwargs["input_size"] = (h, w)
    try:
        if arch == "vit_tiny":
            return vit_tiny(num_classes, image_size=h)
        from torchvision.models import get_model
        return get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except (ValueError, AssertionError) as e:  # e.g. the patch size does not divide the image
        raise QuantbenchError(f"cannot build {arch} for {h}x{w} images: {_first_line(e)}") from e


# ---------------------------------------------------------------- the user's own model
def load_builder(spec: str) -> Callable[[int], nn.Module]:
    """The user's model builder named by `path/to/file.py:build` or `package.module:build`.

    This imports (runs) the user's code, so call it only with a spec the user gave. The result
    calls `build(num_classes=N)` (by keyword, so that builders such as torchvision's, whose first
    positional parameter is something else, get it right; a function whose one parameter has
    another name gets N positionally) and checks that it returns an nn.Module. Importing is the
    check a command makes before reading any data: the module imports, the function exists, is
    callable and can take num_classes."""
    where, sep, fn_name = spec.rpartition(":")
    if not sep or not where or not fn_name:
        raise QuantbenchError(f"--model wants FILE.py:FUNCTION or package.module:FUNCTION, not {spec!r}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _import_file(Path(where))
    else:
        try:
            with _no_exit(f"the module {where}", "it was imported"):
                module = importlib.import_module(where)
        except QuantbenchError:
            raise
        except Exception as e:
            raise QuantbenchError(f"cannot import {where}: {type(e).__name__}: {_first_line(e)}") from e
    if not hasattr(module, fn_name):
        raise QuantbenchError(f"{where} has no function {fn_name!r}")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise QuantbenchError(f"{spec} is a {type(fn).__name__}, not a function")
    by_keyword = _takes_num_classes_by_keyword(fn, spec)
    what = f"the model file {where}" if where.endswith(".py") or os.sep in where or "/" in where \
        else f"the module {where}"

    def build_user_model(num_classes: int) -> nn.Module:
        try:
            with _no_exit(what, f"{spec} built the model"):
                model = fn(num_classes=num_classes) if by_keyword else fn(num_classes)
        except QuantbenchError:
            raise
        except Exception as e:
            raise QuantbenchError(f"{spec}({num_classes}) failed: {type(e).__name__}: {_first_line(e)}") from e
        if not isinstance(model, nn.Module):
            raise QuantbenchError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    return build_user_model


def _takes_num_classes_by_keyword(fn: Callable, spec: str) -> bool:
    """Whether to call `fn(num_classes=N)` (True) or `fn(N)`: by keyword when it has a parameter
    named num_classes, or takes **kwargs and needs no positional argument (torchvision's
    builders: their first positional parameter is the legacy `pretrained`, so fn(N) would ask
    for downloaded weights); positionally for `def build(k)`. A function that can take
    neither is refused now, before any data is read."""
    import inspect
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: try the documented call
        return True
    params = sig.parameters.values()
    named = sig.parameters.get("num_classes")
    if named is not None and named.kind is not inspect.Parameter.POSITIONAL_ONLY:
        return True
    for by_keyword, args, kwargs in ((True, (), {"num_classes": 1}), (False, (1,), {})):
        try:
            sig.bind(*args, **kwargs)
        except TypeError:
            continue
        if by_keyword and any(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            continue  # **kwargs, but a positional parameter first (`def build(k, **kw)`): positional
        return by_keyword
    raise QuantbenchError(f"{spec} cannot be called with the class count: quantbench calls it as "
                          f"{spec.rpartition(':')[2]}(num_classes=N) (or with N as its one argument); "
                          f"its signature is {sig}")


@contextlib.contextmanager
def _no_exit(what: str, during: str):
    """A user's code that calls sys.exit (or exits through argparse) ends quantbench silently
    with its own status unless caught: say so in one line instead."""
    try:
        yield
    except SystemExit as e:
        status = e.code if e.code is None or isinstance(e.code, int) else repr(e.code)
        raise QuantbenchError(f"{what} exited (status {status}) while {during}: it must not call sys.exit "
                              "or parse the command line when imported or called") from e


def _import_file(path: Path):
    if not path.is_file():
        raise QuantbenchError(f"model file not found: {path}")
    # A private module name per file, so two users' model.py do not collide, and the file's
    # folder on sys.path (as `python file.py` would have it), so it can import its neighbours.
    name = "quantbench_user_model_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        with _no_exit(f"the model file {path}", "it was imported"):
            spec.loader.exec_module(module)
    except QuantbenchError:
        sys.modules.pop(name, None)
        raise
    except Exception as e:
        sys.modules.pop(name, None)
        raise QuantbenchError(f"cannot import {path}: {type(e).__name__}: {_first_line(e)}") from e
    return module


def build_model(arch: str | None = None, model: str | None = None, *, num_classes: int,
                quantizable: bool = False, input_shape: Sequence[int] | None = None) -> nn.Module:
    """`build(arch, ...)` or the user's `model` builder (load_builder), whichever is given."""
    if arch and model:
        raise QuantbenchError("give an architecture (--arch) or your own model (--model), not both")
    if model:
        if quantizable:
            raise _no_twin(model)
        return load_builder(model)(num_classes)
    if not arch:
        raise QuantbenchError("no model given: pass --arch NAME or --model FILE.py:FUNCTION")
    return build(arch, num_classes, quantizable, input_shape=input_shape)


def model_meta(arch: str | None = None, model: str | None = None,
               input_shape: Sequence[int] | None = None) -> dict:
    """The checkpoint meta entries that say how to rebuild the model (see load_checkpoint)."""
    meta: dict = {"model": model} if model else {"arch": arch}
    shape = _check_input_shape(input_shape)
    if shape is not None:
        meta["input_shape"] = list(shape)
    return meta


def input_shape_of(meta: dict) -> tuple[int, int, int]:
    """The [C, H, W] a checkpoint's model takes (DEFAULT_INPUT_SHAPE if its meta does not say)."""
    return _check_input_shape(meta.get("input_shape")) or DEFAULT_INPUT_SHAPE


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


# ---------------------------------------------------------------- checkpoints
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
        state, meta = blob["state_dict"], blob.get("meta")
    elif isinstance(blob, dict) and "model" in blob and isinstance(blob["model"], dict):
        state, meta = blob["model"], blob.get("meta")  # a trainer's last.pth
    else:
        state, meta = blob, {}
    from .record import check_meta
    # what the meta says sizes memory and shapes models later: checked now, one line if bad
    meta = dict(check_meta(meta, f"checkpoint {path}"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QuantbenchError(f"{path} does not hold a state dict of tensors")
    if any(k.endswith(("scale", "zero_point", "_packed_params")) for k in state):
        raise QuantbenchError(f"{path} holds an already-quantized model; quantize the fp32 checkpoint")
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, meta


def _class_count_weights(builder: Callable[[int], nn.Module]) -> list[tuple[str, int]]:
    """(state-dict key, axis) of every tensor whose size follows num_classes: the classifier,
    whatever it is called (fc, classifier.1, heads.head, a 1x1 conv...). Found by building the
    model for two class counts and comparing shapes; on the meta device when the builder allows,
    which allocates nothing and initializes nothing."""
    shapes = []
    for k in (3, 5):
        try:
            with torch.device("meta"):
                m = builder(k)
        except Exception:  # a builder that needs real tensors (regnet computes its widths)
            m = builder(k)
        shapes.append({n: tuple(t.shape) for n, t in m.state_dict().items()})
    found = []
    for name, shape in shapes[0].items():
        other = shapes[1].get(name)
        if other and other != shape and len(other) == len(shape):
            found.append((name, next(i for i, (a, b) in enumerate(zip(shape, other)) if (a, b) == (3, 5))))
    return found


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
                    quantizable: bool = False, *, model: str | None = None) -> tuple[nn.Module, dict]:
    """Build the model a checkpoint describes and load its weights strictly (eval mode).

    The model is `arch`, else the meta's "arch", else resnet18 (the original's bare state dicts).
    A user model (meta "model") is rebuilt only from a `model` spec the caller passes: loading a
    checkpoint never imports code on its own. The class count is the meta's, else read off the
    classifier's weights; `num_classes` (the data's) must agree with it."""
    state, meta = read_checkpoint(path)
    saved_arch = str(meta.get("arch") or "")
    if not saved_arch.startswith("timm:"):  # timm names hold dots (efficientnet_b0.ra_in1k)
        saved_arch = saved_arch.rsplit(".", 1)[-1]
    saved_arch = saved_arch or None
    saved_model = meta.get("model")
    if model:
        if arch:
            raise QuantbenchError("give an architecture (--arch) or your own model (--model), not both")
        if saved_arch:
            raise QuantbenchError(f"{path} holds a {saved_arch}, not a user model; drop --model")
        if quantizable:  # said before importing anything
            raise _no_twin(model)
        name, builder = model, load_builder(model)
        float_builder = builder
    elif saved_model:
        raise QuantbenchError(f"{path} holds a user model built by {saved_model}; pass --model {saved_model} "
                              "to load it (quantbench runs no code a checkpoint names on its own)")
    else:
        if arch and saved_arch and arch != saved_arch:
            raise QuantbenchError(f"{path} holds a {saved_arch}, not a {arch}")
        name = arch = arch or saved_arch or "resnet18"
        _check_arch(arch)
        shape = _check_input_shape(meta.get("input_shape"))
        float_builder = functools.partial(build, arch, input_shape=shape)
        builder = functools.partial(build, arch, quantizable=quantizable, input_shape=shape)

    k = meta.get("num_classes")
    if not isinstance(k, int):
        heads = _class_count_weights(float_builder)
        if not heads:
            if num_classes is None:
                raise QuantbenchError(f"cannot tell how many classes {path} has: its meta does not say "
                                      f"and {name}'s weights do not depend on the class count")
            k = num_classes
        else:
            key, axis = heads[0]
            if key not in state:
                raise QuantbenchError(f"{path} is not a {name} checkpoint (it has no {key})")
            k = state[key].shape[axis]
    if num_classes is not None and k != num_classes:
        raise QuantbenchError(f"{path} has {k} output classes but the data has {num_classes}")
    net = builder(k)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: another width or depth
        raise QuantbenchError(f"{path} does not fit {name}: {str(e).splitlines()[-1].strip()}") from e
    # strict=False, then our own check: the same strictness with a one-line message.
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys + result.unexpected_keys)[:3]
        raise QuantbenchError(f"{path} does not fit {name}: mismatched weights such as {', '.join(bad)}")
    if model:
        meta["model"] = model
    else:
        meta["arch"] = arch
    meta["num_classes"] = k
    return net.eval(), meta
