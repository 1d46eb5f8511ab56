"""Stage 5: deployment files and their sidecars.

Every deployment file FILE gets a sidecar FILE.json that says what it is (label, method, flow,
runtime, qconfig, calibration, source checkpoint, normalization, class names, weight bytes), so
`bench` and `report` never have to guess from a file name.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .fileio import save_torchscript
# The input shape of a model is data, recorded in checkpoint meta and every sidecar and read back
# with this (its default is for files made before that: the CIFAR-10 reference checkpoint).
from .models import input_shape_of as input_shape  # noqa: F401


def example_input(shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """A fixed random batch of the model's input shape, for tracing and exporting."""
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))


def export_torchscript(model: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> None:
    """trace -> freeze -> save. Freezing inlines weights and folds constants, so the file runs in
    any process with plain `torch.jit.load`, without quantbench or the model's Python class."""
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Quantized modules read their scale as a Python float while tracing; it is a constant
        # of the converted model, so the tracer's warning about it does not apply.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        frozen = torch.jit.freeze(traced)
    save_torchscript(frozen, path)  # via memory: a full disk is an error, not a C++ abort


PRUNE_CHECK_IMAGES = 256  # real images the pruned model is checked on (besides random ones)


def prune_for_export(model: nn.Module, shape: tuple[int, ...], enabled: bool = True, data=None,
                     seed: int = 0) -> dict:
    """Dead-tap pruning (quantbench.prune) of an fp32 model about to be quantized or exported, in
    place; returns the sidecar's "pruning" record. The pruned model must give the unpruned one's
    outputs on random inputs and, when `data` (a quantbench.data.Dataset, normalized for this
    model) is given, on real training (else test) images: a difference is a QuantbenchError and
    the model is left as it was. The file it makes is valid for inputs of `shape` only, which
    the sidecar's input_shape already pins."""
    if not enabled:
        return {"applied": False, "why": "turned off (--no-prune)"}
    from .data import Batches
    from .prune import prune_dead_taps, verify_batch
    read: list[int] = []  # how many real images the check ran on (read only if a layer was pruned)

    def real_images():
        split = data.train if data.train is not None and len(data.train) else data.test
        if not len(split):
            return None
        images = torch.cat([x for x, _ in Batches(split, verify_batch(shape), data.mean, data.std, shuffle=True,
                                                  seed=seed, limit=PRUNE_CHECK_IMAGES)])
        read.append(len(images))
        return images

    report = prune_dead_taps(model, tuple(shape), verify=True, inputs=real_images if data is not None else None,
                             seed=seed)
    # through JSON: lists where the report has tuples, so the record equals the sidecar read back
    record = {"applied": bool(report.layers), **json.loads(json.dumps(report.to_dict()))}
    if report.layers:
        record["verified_on"] = f"random inputs{f' and {read[0]} real images' if read else ''}"
    else:
        record["verified_on"] = "nothing pruned, nothing to verify"
        record["why"] = (f"nothing to prune: no convolution has taps that read only padding at "
                         f"{'x'.join(map(str, shape))} (large inputs, e.g. 224x224, have none)")
    return record


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model holds: int8 tensors count 1 byte per element, fp32 four.
    Quantized modules keep weights in packed params, which state_dict() unpacks for us."""
    total = 0

    def add(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            if v.is_quantized:
                total += v.numel() * v.element_size()
                if v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    total += v.q_per_channel_scales().numel() * 8 + v.q_per_channel_zero_points().numel() * 8
            else:
                total += v.numel() * v.element_size()
        elif isinstance(v, (tuple, list)):
            for x in v:
                add(x)

    for v in model.state_dict().values():
        add(v)
    return total


# Sidecars are written and read by quantbench.record; these two are its dict view, for scripts
# written against earlier versions.
def sidecar_path(path: str | os.PathLike) -> Path:
    from .record import sidecar_path as _sidecar_path
    return _sidecar_path(path)


def write_sidecar(path: str | os.PathLike, **info) -> dict:
    from .record import FileRecord, write_record
    return write_record(path, FileRecord.from_dict(info, "sidecar")).to_dict()


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar's fields as a dict; {} when the file has none."""
    from .record import read_record, sidecar_path as _sidecar_path
    return read_record(path).to_dict() if _sidecar_path(path).is_file() else {}


# Calibration images up to this many bytes stay in memory; more go to an unnamed temporary file
# and are read back a batch at a time (1,000 images at 224x224 are 600 MB of float32).
CALIB_IN_MEMORY_BYTES = 64 << 20


class CalibrationArrays:
    """The calibration batches as float32 numpy arrays, for other runtimes' calibrators: a
    sequence (len, [i], [a:b], iteration, as often as a calibrator wants) that holds at most one
    batch in memory once the images pass CALIB_IN_MEMORY_BYTES. Batches are decoded once, in
    order, and spilled to a temporary file that is unlinked from the start, so no run, however it
    ends, leaves it behind."""

    def __init__(self, calib_batches, in_memory_bytes: int = CALIB_IN_MEMORY_BYTES):
        import tempfile

        import numpy as np
        self._kept: list = []          # batches in memory (all of them, for small images)
        self._spans: list = []         # (offset, shape) of each batch in the file
        self._file = None
        size = 0
        for b in calib_batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            a = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().float().numpy())
            if self._file is None and size + a.nbytes > in_memory_bytes:
                self._file = tempfile.TemporaryFile(prefix="quantbench-calib-")
                for kept in self._kept:  # what was kept so far goes first, in order
                    self._spans.append((self._file.tell(), kept.shape))
                    self._file.write(kept.data)
                self._kept = []
            if self._file is not None:
                self._spans.append((self._file.tell(), a.shape))
                self._file.write(a.data)
            else:
                self._kept.append(a)
            size += a.nbytes
        if self._file is not None:
            self._file.flush()
        if not len(self):
            from .errors import QuantbenchError
            raise QuantbenchError("int8 export needs calibration images; got none")

    def __len__(self) -> int:
        return len(self._spans) if self._file is not None else len(self._kept)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._file is None:
            return self._kept[i]
        import numpy as np
        offset, shape = self._spans[i]
        buf = bytearray(4 * int(np.prod(shape)))
        if os.preadv(self._file.fileno(), [buf], offset) != len(buf):
            raise OSError("calibration images: short read from the temporary file")
        return np.frombuffer(buf, dtype=np.float32).reshape(shape)  # writable: it owns its bytearray

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        """Images in each batch."""
        return [span[1][0] for span in self._spans] if self._file is not None else [len(a) for a in self._kept]

    @property
    def samples(self) -> int:
        """Images in all batches."""
        return sum(self.lengths)

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def first(self, n: int):
        """The first n images (fewer if there are fewer) as one array, reading only the batches needed."""
        import numpy as np
        out, have = [], 0
        for a in self:
            out.append(a[: n - have])
            have += len(out[-1])
            if have >= n:
                break
        return np.concatenate(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def calibration_arrays(calib_batches) -> CalibrationArrays:
    """Float32 numpy batches for other runtimes' calibrators (see CalibrationArrays); (x, y)
    pairs, as quantbench.data.Batches yields them, are accepted."""
    return calib_batches if isinstance(calib_batches, CalibrationArrays) else CalibrationArrays(calib_batches)
