"""Keep the deprecation noise of torch.ao.quantization and torch.jit out of users' faces.

Both still work in torch 2.14 but warn on nearly every call (hundreds of lines per run).
We collect those warnings and print one summary line at the end instead. Warnings raised in
C++ (quantized tensor creation) bypass Python's warnings module: `quiet_cpp_warnings()` sets
c10's log level before torch is imported (TORCH_CPP_LOG_LEVEL; a user's own setting wins).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter

_PATTERNS = ("torch.ao.quantization", "torch.jit", "TorchScript", "deprecat", "quantize_dynamic",
             "prepare_fx", "convert_fx", "prepare_qat", "_check_is_valid_config_dict", "Please use",
             "torch.export", "TypedStorage")


def quiet_cpp_warnings() -> None:
    import logging
    import os
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # torch's own loggers: a pytree notice about torchao's enums, "No CUDA runtime is found"
    # from the CUDA build on a CPU-only machine. Neither is actionable for a user.
    for name in ("torch.utils._pytree", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def summarized_deprecations(stream=sys.stderr):
    counts: Counter[str] = Counter()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        from_torch = "/torch/" in str(filename).replace("\\", "/")
        if category.__name__ == "TracerWarning" or (issubclass(
                category, (DeprecationWarning, FutureWarning, UserWarning)) and any(p in text for p in _PATTERNS)) or (
                from_torch and issubclass(category, (DeprecationWarning, FutureWarning))):
            counts[category.__name__] += 1
            return
        original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        try:
            yield counts
        finally:
            warnings.showwarning = original
            if counts:
                print(f"note: hid {sum(counts.values())} deprecation warnings from torch (mostly "
                      "torch.ao.quantization / torch.jit, deprecated in torch 2.14; the PT2E flow, --flow pt2e, "
                      "is their successor)",
                      file=stream)



@contextlib.contextmanager
def stderr_silenced():
    """Keep what C++ and torch's loggers write to the process's stderr (profiler start/stop
    lines, graph dumps of a failed capture) off the terminal for the block."""
    import os
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def captured_root_log():
    """Collect what a library logs through the root logger (ONNX Runtime's quantizer calls
    `logging.warning` directly, which would print "WARNING:root:..." in the middle of a progress
    bar) as a list of lines for the file's sidecar, instead of the terminal."""
    import logging
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(f"{record.levelname.lower()}: {record.getMessage()}")

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [Collect(logging.WARNING)]
    try:
        yield lines
    finally:
        root.handlers = saved
