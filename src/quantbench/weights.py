"""Pretrained weights in: `--arch NAME --weights NAME|DEFAULT|FILE` (and `--arch timm:NAME
--weights pretrained|FILE`) become a quantbench checkpoint, so that every command that takes a
checkpoint takes them the same way.

    resolve(arch, weights, model_spec) -> Path     a checkpoint {"state_dict", "meta"} in the cache

Three kinds of weights:
- torchvision's named weights (`IMAGENET1K_V1`, `DEFAULT`, or `ResNet18_Weights.IMAGENET1K_V2`):
  the file is read from torch's hub cache (downloaded there when online); the meta records the
  weights' transforms (data.Preprocess: resize, crop, interpolation, mean, std), category names
  and class count;
- timm (`--arch timm:efficientnet_b0 --weights pretrained`): the optional extra `.[timm]`; the
  meta records timm's data config as a Preprocess;
- a local file, .pth/.pt (a bare state dict, or one under "state_dict" or "model") or
  .safetensors, for any builder including `--model`: loaded with weights_only=True / safetensors.
  A torchvision architecture gets its default weights' preprocessing unless the file's meta says
  otherwise (fine-tuned weights keep their parent's preprocessing).

Everything is checked before any data is read: bad names and missing files are one line each,
and an offline download names the file to fetch and where to put it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import QuantbenchError, cause

TIMM_PREFIX = "timm:"
FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def cache_dir() -> Path:
    """Where converted weights are kept: $XDG_CACHE_HOME/quantbench/weights (~/.cache/...)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quantbench" / "weights"


def is_timm(arch: str | None) -> bool:
    return bool(arch) and arch.startswith(TIMM_PREFIX)


def looks_like_file(weights: str) -> bool:
    return (weights.lower().endswith(FILE_SUFFIXES) or "/" in weights or os.sep in weights
            or Path(weights).exists())


# ---------------------------------------------------------------- the entry point
def resolve(arch: str | None, weights: str, model_spec: str | None = None, progress: bool = True) -> Path:
    """A quantbench checkpoint holding `weights` for `arch` (or the user's `model_spec`),
    made once and kept in cache_dir(); checked to fit the model (one line if not)."""
    if not weights or not isinstance(weights, str):
        raise QuantbenchError("--weights needs a name (IMAGENET1K_V1, DEFAULT, pretrained) or a file")
    if arch and model_spec:
        raise QuantbenchError("give an architecture (--arch) or your own model (--model), not both")
    if not arch and not model_spec:
        arch = "resnet18"
    if looks_like_file(weights):
        state, meta, tag = _from_file(Path(weights), arch, model_spec)
    elif model_spec:
        raise QuantbenchError(f"--weights {weights!r} with --model: your own model takes a weights file "
                              "(.pth or .safetensors), not a name")
    elif is_timm(arch):
        state, meta, tag = _from_timm(arch, weights)
    else:
        state, meta, tag = _from_torchvision(arch, weights, progress)
    return _write_checked(state, meta, tag, model_spec)


def _write_checked(state: dict, meta: dict, tag: str, model_spec: str | None) -> Path:
    from .fileio import save_torch
    from .models import load_checkpoint
    path = cache_dir() / f"{tag}.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torch({"state_dict": state, "meta": meta}, path)
        try:  # the weights must fit the model: one line now, not a traceback later
            _, loaded = load_checkpoint(path, model=model_spec)
        except QuantbenchError:
            path.unlink(missing_ok=True)  # we made it
            raise
        if meta.get("num_classes") is None:
            meta["num_classes"] = loaded["num_classes"]
            save_torch({"state_dict": state, "meta": meta}, path)
    return path


# ---------------------------------------------------------------- local files
def read_state_dict(path: Path) -> tuple[dict, dict]:
    """(state dict, meta) of a .pth/.pt (bare, or under "state_dict"/"model") or .safetensors file."""
    if not path.is_file():
        raise QuantbenchError(f"weights file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise QuantbenchError(f"reading {path} needs the safetensors package: pip install safetensors") from e
        try:
            return dict(load_file(str(path), device="cpu")), {}
        except Exception as e:
            raise QuantbenchError(f"cannot read {path}: not a safetensors file ({cause(e)})") from e
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QuantbenchError(f"cannot read weights {path}: truncated or not a PyTorch state dict ({cause(e)})") from e
    meta: dict = {}
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        state, meta = blob["state_dict"], blob.get("meta") or {}
    elif isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        state = blob["model"]
    else:
        state = blob
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QuantbenchError(f"{path} does not hold a state dict of tensors (bare, or under 'state_dict' or 'model')")
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    from .record import check_meta
    return state, dict(check_meta(meta if isinstance(meta, dict) else {}, f"weights {path}"))


def _from_file(path: Path, arch: str | None, model_spec: str | None) -> tuple[dict, dict, str]:
    if model_spec is None:
        check_arch(arch)
    state, meta = read_state_dict(path)
    from .fileio import sha256
    digest = sha256(path)
    saved = meta.get("arch")
    if model_spec is None and saved and saved != arch:
        raise QuantbenchError(f"{path} holds a {saved}, not a {arch}")
    meta.pop("model", None)
    meta["model" if model_spec else "arch"] = model_spec or arch
    if model_spec is None and "preprocess" not in meta and meta.get("image_size") is None:
        pre = timm_preprocess(build_timm(arch, 1)) if is_timm(arch) else default_preprocess(arch)  # the architecture's pretrained preprocessing, if it has one
        if pre is not None:
            meta.update(_preprocess_meta(pre))
    meta["weights"] = {"file": str(path.resolve()), "sha256": digest}
    who = _safe(model_spec or arch)
    return state, meta, f"{_safe(path.stem)}-{who}-{digest[:12]}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


# ---------------------------------------------------------------- torchvision
def check_arch(arch: str) -> None:
    if is_timm(arch):
        _timm()  # installed?
        return
    from .models import _check_arch
    _check_arch(arch)


def torchvision_weights(arch: str, name: str):
    """torchvision's weights enum member for `arch` named `name` (IMAGENET1K_V1, DEFAULT, or the
    full ResNet18_Weights.IMAGENET1K_V1), or a one-line error listing the names there are."""
    check_arch(arch)
    from torchvision.models import get_model_weights
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise QuantbenchError(f"{arch} has no pretrained weights in torchvision; pass --weights FILE") from e
    names = [n for n in enum.__members__ if n != "DEFAULT"]
    short = name.rsplit(".", 1)[-1] if name.startswith(enum.__name__ + ".") else name
    for n in enum.__members__:
        if n.lower() == short.lower():
            return enum[n]
    raise QuantbenchError(f"{arch} has no weights named {name!r}; choose from DEFAULT, {', '.join(names)} "
                          "(or pass a .pth / .safetensors file)")


def preprocess_of(transforms) -> "object":
    """data.Preprocess from torchvision's ImageClassification transforms (a preset instance)."""
    from .data import Preprocess
    t = transforms() if callable(transforms) and not hasattr(transforms, "crop_size") else transforms
    resize = t.resize_size[0] if getattr(t, "resize_size", None) else None
    interp = getattr(t.interpolation, "value", str(t.interpolation)).lower()
    return Preprocess(crop=int(t.crop_size[0]), resize=int(resize) if resize else None, interpolation=interp,
                      mean=tuple(t.mean), std=tuple(t.std))


def default_preprocess(arch: str):
    """The preprocessing of `arch`'s DEFAULT torchvision weights, or None (no pretrained weights)."""
    if is_timm(arch):
        return None
    try:
        from torchvision.models import get_model_weights
        return preprocess_of(get_model_weights(arch).DEFAULT.transforms)
    except Exception:  # resnet10, vit_tiny, or weights without classification transforms
        return None


def _preprocess_meta(pre) -> dict:
    return {"preprocess": pre.to_dict(), "input_shape": list(pre.input_shape),
            "normalize_mean": list(pre.mean), "normalize_std": list(pre.std)}


def hub_file(url: str) -> Path:
    """Where torch keeps a downloaded weights file: <torch hub dir>/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def fetch(url: str, progress: bool = True) -> Path:
    """The hub cache's copy of `url`, downloaded there when missing; offline: one line naming
    the file to fetch and where to put it."""
    dest = hub_file(url)
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = dest.name.rsplit("-", 1)[-1].split(".")[0] if "-" in dest.name else None
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=digest if digest and len(digest) >= 8 else None,
                                       progress=progress)
    except Exception as e:
        dest.unlink(missing_ok=True)
        raise QuantbenchError(f"cannot download {url} ({cause(e)}); offline? fetch it on a machine that is "
                              f"online and put it at {dest}") from e
    return dest


def _from_torchvision(arch: str, name: str, progress: bool) -> tuple[dict, dict, str]:
    w = torchvision_weights(arch, name)
    pre = preprocess_of(w.transforms)
    path = fetch(w.url, progress)
    state, _ = read_state_dict(path)
    categories = list(w.meta.get("categories") or [])
    meta = {"arch": arch, **_preprocess_meta(pre), "image_size": None,
            "weights": {"name": f"{type(w).__name__}.{w.name}", "url": w.url, "file": str(path)}}
    if categories:
        meta["categories"], meta["num_classes"] = categories, len(categories)
    meta.pop("image_size")
    return state, meta, f"{arch}-{w.name}"


# ---------------------------------------------------------------- timm
TIMM_PIN = "timm==1.0.31"


def _timm():
    try:
        import timm
    except ImportError as e:
        raise QuantbenchError(f"--arch timm:NAME needs timm: pip install 'quantbench[timm]' ({TIMM_PIN})") from e
    return timm


def timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX):]


def build_timm(arch: str, num_classes: int, pretrained: bool = False):
    """A timm model (untrained unless `pretrained`) with `num_classes` outputs."""
    timm = _timm()
    name = timm_name(arch)
    if not timm.list_models(name.split(".")[0]) and not timm.is_model(name):
        import difflib
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        raise QuantbenchError(f"timm has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)


def timm_preprocess(model):
    """data.Preprocess from timm's data config (resolve_data_config): the crop is the input
    size, the resize floor(crop / crop_pct), with timm's interpolation, mean and std."""
    from .data import Preprocess
    cfg = _timm().data.resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    pct = float(cfg.get("crop_pct") or 1.0)
    interp = str(cfg.get("interpolation") or "bilinear").lower()
    if interp not in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"):
        interp = "bicubic"
    return Preprocess(crop=crop, resize=int(math.floor(crop / pct)), interpolation=interp,
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def _from_timm(arch: str, weights: str) -> tuple[dict, dict, str]:
    if weights.lower() not in ("pretrained", "default"):
        raise QuantbenchError(f"--arch {arch} takes --weights pretrained or a weights file, not {weights!r}")
    timm = _timm()
    name = timm_name(arch)
    try:
        model = build_timm(arch, 1000, pretrained=True)
    except QuantbenchError:
        raise
    except Exception as e:
        where = "the Hugging Face hub cache"
        try:
            pcfg = timm.models.get_pretrained_cfg(name)
            hub = getattr(pcfg, "hf_hub_id", None) or name
            from huggingface_hub.constants import HF_HUB_CACHE
            where = f"{HF_HUB_CACHE} (repo {hub}, file model.safetensors)"
        except Exception:
            pass
        raise QuantbenchError(f"cannot get timm's pretrained {name} ({cause(e)}); offline? fetch it on a machine "
                              f"that is online into {where}, or pass --weights FILE") from e
    pre = timm_preprocess(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"arch": arch, **_preprocess_meta(pre), "num_classes": int(model.num_classes),
            "weights": {"name": f"timm:{name} pretrained"}}
    return state, meta, f"timm-{_safe(name)}-pretrained"
