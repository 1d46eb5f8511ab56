"""The record that travels with every deployment file: FILE.json, its sidecar.

One dataclass, written and read here only. Every choice that shaped the file is a field (how
it was quantized, calibrated, pruned, for which runtime options), so `bench`, `report` and
`tune` read fields, never guess from a file name. Fields a single runtime adds (ONNX's opset,
ExecuTorch's verified batch...) live in `extra` and are written beside the others, flat, as
sidecars always were; sidecars written before SCHEMA_VERSION existed read as version 1.

Everything read from a file is checked here before anything sizes memory with it (an image
size of 20000 would allocate gigabytes): a bad sidecar is one line naming the file and field.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QuantbenchError, cause

SCHEMA_VERSION = 2
MAX_IMAGE_SIDE = 4096        # pixels: larger inputs are not classifiers we can time on a CPU
MAX_CHANNELS = 16
MAX_CLASSES = 1_000_000
MAX_BATCH = 4096
METHODS = ("origin", "dynamic", "static", "qat", "bf16")


@dataclass
class FileRecord:
    """What one deployment file is and how it was made."""
    file: str = ""                         # the deployment file's name (the sidecar sits beside it)
    label: str = ""                        # its row name: ptq-s, ptq-s-fx, openvino-int8, ...
    method: str = "unknown"                # origin (fp32) | dynamic | static | qat
    dtype: str = "unknown"                 # fp32 | int8
    runtime: str = "unknown"               # the runtime that runs it (quantbench.runtimes)
    flow: str | None = None                # the flow (or runtime exporter) that made it
    # what it was made from
    source_checkpoint: str | None = None
    source_sha256: str | None = None
    arch: str | None = None
    model: str | None = None               # the user's builder spec, if any
    # what it takes: the model carries its own preprocessing
    input_shape: list[int] | None = None
    classes: list[str] | None = None
    normalize_mean: list[float] | None = None
    normalize_std: list[float] | None = None
    image_size: int | None = None
    preprocess: dict | None = None         # a pretrained model's own: resize, crop, interpolation, mean, std
    # how it was made
    target: dict | None = None             # deploy.Target.identity(): what --resume compares
    config: dict | None = None             # the QuantizeConfig's shaping fields (torch flows)
    options: dict = field(default_factory=dict)   # the runtime's own options, resolved
    engine: str | None = None              # TorchScript int8: the quantized engine to load it with
    qconfig: dict | None = None            # the observers really used, read back from the model
    calibration: dict | None = None
    pruning: dict | None = None
    equalization: dict | None = None
    fp32_layers: list[str] = field(default_factory=list)
    qat: dict | None = None
    plain: bool = False                    # made as the runtime alone would (replicate --plain)
    why: str | None = None
    warnings: list[str] = field(default_factory=list)
    weight_bytes: int | None = None
    quantize_s: float | None = None
    export_s: float | None = None
    # provenance
    created: str | None = None
    quantbench_version: str | None = None
    torch_version: str | None = None
    python: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)  # a runtime's own fields (opset, max_batch, ...)

    def replace(self, **changes) -> "FileRecord":
        return dataclasses.replace(self, **changes)

    def get(self, key: str, default=None):
        """A field, or an entry of `extra` (a runtime's own field), by name."""
        if key in _FIELDS and key != "extra":
            return getattr(self, key)
        return self.extra.get(key, default)

    def __getitem__(self, key: str):
        """record["label"]: the dict view scripts written against earlier versions use."""
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in _FIELDS if f != "extra"}
        # extra entries never shadow a field
        return json.loads(json.dumps({**{k: v for k, v in self.extra.items() if k not in _FIELDS}, **d},
                                     default=str))

    @classmethod
    def from_dict(cls, d: Any, where: str = "sidecar") -> "FileRecord":
        """A record from its JSON form, checked; unknown keys go to `extra`."""
        if not isinstance(d, dict):
            raise QuantbenchError(f"{where} must hold a JSON object, not {type(d).__name__}")
        d = dict(d)
        if isinstance(d.get("preprocess"), str):  # ONNX Runtime's pre-pass, as sidecars before version 2 named it
            d["quant_preprocess"] = d.pop("preprocess")
        known = {k: v for k, v in d.items() if k in _FIELDS and k != "extra"}
        extra = {k: v for k, v in d.items() if k not in _FIELDS}
        known.setdefault("schema_version", 1)  # written before the schema had a version
        for k in ("options", "extra"):
            if known.get(k) is None:
                known.pop(k, None)
        for k in ("warnings", "fp32_layers"):
            if known.get(k) is None:
                known.pop(k, None)
        rec = cls(**known, extra=extra)
        _check_record(rec, where)
        return rec

    # the shape of the input this file takes, [C, H, W]
    @property
    def shape(self) -> tuple[int, ...]:
        from .models import DEFAULT_INPUT_SHAPE
        return tuple(self.input_shape) if self.input_shape else DEFAULT_INPUT_SHAPE


_FIELDS = tuple(f.name for f in dataclasses.fields(FileRecord))


# ---------------------------------------------------------------- checks of what files say
def _bad(where: str, name: str, value, want: str) -> QuantbenchError:
    return QuantbenchError(f"{where}: {name} must be {want}, not {json.dumps(value, default=str)[:60]}")


def check_int(value, where: str, name: str, lo: int, hi: int, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(where, name, value, f"a whole number from {lo} to {hi}")
    return value


def check_shape(value, where: str, name: str = "input_shape") -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _bad(where, name, value, "[channels, height, width]")
    check_int(value[0], where, f"{name}[0]", 1, MAX_CHANNELS, optional=False)
    for i in (1, 2):
        check_int(value[i], where, f"{name}[{i}]", 1, MAX_IMAGE_SIDE, optional=False)
    return list(value)


def check_norm(value, where: str, name: str) -> list[float] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_CHANNELS
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise _bad(where, name, value, "a list of numbers, one per channel")
    return list(value)


def check_classes(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value) \
            or len(value) > MAX_CLASSES:
        raise _bad(where, "classes", value, "a list of class names")
    return list(value)


def _check_record(r: FileRecord, where: str) -> None:
    for name in ("file", "label", "method", "dtype", "runtime"):
        if not isinstance(getattr(r, name), str):
            raise _bad(where, name, getattr(r, name), "a string")
    check_shape(r.input_shape, where)
    check_int(r.image_size, where, "image_size", 1, MAX_IMAGE_SIDE)
    check_classes(r.classes, where)
    check_norm(r.normalize_mean, where, "normalize_mean")
    check_norm(r.normalize_std, where, "normalize_std")
    if r.normalize_std and any(v <= 0 for v in r.normalize_std):
        raise _bad(where, "normalize_std", r.normalize_std, "positive numbers")
    check_preprocess(r.preprocess, where)
    check_int(r.weight_bytes, where, "weight_bytes", 0, 2**50)
    check_int(r.schema_version, where, "schema_version", 1, 10**6, optional=False)
    if r.schema_version > SCHEMA_VERSION:
        raise QuantbenchError(f"{where} was written by a newer quantbench (schema {r.schema_version}, this one "
                              f"reads up to {SCHEMA_VERSION}); upgrade quantbench")
    if r.engine is not None and not isinstance(r.engine, str):
        raise _bad(where, "engine", r.engine, "a quantized engine name")
    for name in ("options", "extra"):
        if not isinstance(getattr(r, name), dict):
            raise _bad(where, name, getattr(r, name), "a JSON object")
    for name in ("warnings", "fp32_layers"):
        v = getattr(r, name)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _bad(where, name, v, "a list of strings")
    for name in ("target", "config", "qconfig", "calibration", "pruning", "equalization", "qat"):
        v = getattr(r, name)
        if v is not None and not isinstance(v, dict):
            raise _bad(where, name, v, "a JSON object")
    if "max_batch" in r.extra:
        check_int(r.extra["max_batch"], where, "max_batch", 1, MAX_BATCH)


# ---------------------------------------------------------------- files
def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def write_record(path: str | os.PathLike, record: FileRecord) -> FileRecord:
    """Write FILE.json beside the deployment file `path` (atomically), stamped with when and by
    which versions it was made; returns the record as written."""
    import torch

    from . import __version__
    from .fileio import write_json
    rec = record.replace(file=Path(path).name, schema_version=SCHEMA_VERSION,
                         created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         quantbench_version=__version__, torch_version=torch.__version__,
                         python=platform.python_version())
    write_json(sidecar_path(path), rec.to_dict())
    return rec


def read_record(path: str | os.PathLike, required: bool = False) -> FileRecord:
    """The sidecar of deployment file `path`, checked; an empty record when there is none (a file
    made elsewhere: bench measures it by what the runtime can tell)."""
    from .fileio import read_json
    p = sidecar_path(path)
    if not p.is_file():
        if required:
            raise QuantbenchError(f"{path} has no sidecar {p.name}; it was not made by quantbench")
        return FileRecord(file=Path(path).name, label=Path(path).stem, schema_version=SCHEMA_VERSION)
    try:
        d = read_json(p)
    except (ValueError, OSError) as e:
        raise QuantbenchError(f"{p} is not valid JSON ({cause(e)}); delete it or make the model again") from e
    return FileRecord.from_dict(d, str(p))


def same_making(a: FileRecord, b: FileRecord) -> bool:
    """Whether two records describe files made the same way (what was asked and what was used),
    ignoring when, how long, and on which versions."""
    skip = {"created", "quantize_s", "export_s", "quantbench_version", "torch_version", "python", "file"}
    da, db = a.to_dict(), b.to_dict()
    return {k: v for k, v in da.items() if k not in skip} == {k: v for k, v in db.items() if k not in skip}


# ---------------------------------------------------------------- checkpoint meta
# A checkpoint is (state_dict, meta); train writes it with models.save_checkpoint. The meta
# says how to rebuild the model and what it takes; read back, it is checked here like a sidecar.
META_KEYS = ("arch", "model", "num_classes", "classes", "input_shape", "image_size", "normalize_mean",
             "normalize_std", "warnings", "preprocess", "categories", "weights")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def check_preprocess(value, where: str, name: str = "preprocess") -> dict | None:
    """A pretrained model's preprocessing (data.Preprocess as a dict), checked: crop and resize
    from 1 to MAX_IMAGE_SIDE pixels, a known interpolation, 3 finite means and 3 positive stds."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(where, name, value, "a JSON object (resize, crop, interpolation, mean, std)")
    unknown = set(value) - {"resize", "crop", "interpolation", "mean", "std"}
    if unknown:
        raise _bad(where, f"{name}.{sorted(unknown)[0]}", value[sorted(unknown)[0]], "absent (unknown key)")
    check_int(value.get("crop"), where, f"{name}.crop", 1, MAX_IMAGE_SIDE, optional=False)
    check_int(value.get("resize"), where, f"{name}.resize", 1, MAX_IMAGE_SIDE)
    interp = value.get("interpolation", "bilinear")
    if interp not in INTERPOLATIONS:
        raise _bad(where, f"{name}.interpolation", interp, f"one of {', '.join(INTERPOLATIONS)}")
    for k in ("mean", "std"):
        v = value.get(k)
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise _bad(where, f"{name}.{k}", v, "3 finite numbers (one per RGB channel)")
    if min(value["std"]) <= 0 or max(abs(x) for x in value["mean"]) > 1e3:
        raise _bad(where, name, value, "positive stds and means of pixels scaled to 0..1")
    return value


def check_meta(meta: Any, where: str) -> dict:
    """A checkpoint's meta, checked (a dict; unknown keys kept)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise QuantbenchError(f"{where}: its meta must be a mapping, not {type(meta).__name__}")
    check_int(meta.get("num_classes"), where, "num_classes", 1, MAX_CLASSES)
    check_int(meta.get("image_size"), where, "image_size", 1, MAX_IMAGE_SIDE)
    check_shape(meta.get("input_shape"), where)
    check_classes(meta.get("classes"), where)
    check_norm(meta.get("normalize_mean"), where, "normalize_mean")
    check_norm(meta.get("normalize_std"), where, "normalize_std")
    check_preprocess(meta.get("preprocess"), where)
    check_classes(meta.get("categories"), where)
    if meta.get("weights") is not None and not isinstance(meta["weights"], dict):
        raise _bad(where, "weights", meta["weights"], "a JSON object")
    for name in ("arch", "model"):
        if meta.get(name) is not None and not isinstance(meta[name], str):
            raise _bad(where, name, meta[name], "a string")
    w = meta.get("warnings")
    if w is not None and (not isinstance(w, list) or not all(isinstance(x, str) for x in w)):
        raise _bad(where, "warnings", w, "a list of strings")
    return meta


def as_record(base) -> FileRecord:
    """A FileRecord from a record or its dict form (an exporter's `base`)."""
    if isinstance(base, FileRecord):
        return base
    return FileRecord.from_dict(dict(base or {}), "record")
