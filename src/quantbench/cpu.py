"""What this CPU can do for int8 (and bf16) inference.

Whether int8 kernels are exact depends on the instruction set. Without VNNI (AVX-512 VNNI,
AVX-VNNI) or AMX, x86 int8 GEMMs multiply u8 activations by s8 weights with `vpmaddubsw`, which
adds pairs of products into a *saturating int16*: two products of 255 x 127 overflow it. Runtimes
then need 7-bit weights (or activations) to stay exact, so the quantizing code asks here first.
"""
from __future__ import annotations

import functools
import platform

# Flags (as /proc/cpuinfo spells them) that give int8 dot products accumulated in int32.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# Flags that give bf16 dot products in hardware (x86: AVX512-BF16's vdpbf16ps, AMX's tiles; arm64
# says "bf16"). Without them bf16 math is emulated: slower than fp32, so no bf16 rows are made.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def _read_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                # x86 says "flags", arm64 says "Features"
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo; empty where there is none
    (macOS, Windows): callers then take the safe, no-VNNI path."""
    return set(_read_flags())


def has_vnni() -> bool:
    """True where int8 x int8 products accumulate in int32 without an int16 step.
    ARM's dot-product instructions (asimddp) have none either, so they count as well."""
    flags = _read_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "asimddp" in flags
    return bool(flags & VNNI_FLAGS)


def has_bf16() -> bool:
    """True where the CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX on x86, the
    BF16 extension on arm64): where a bf16 model can be faster than fp32."""
    flags = _read_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & BF16_FLAGS)


def bf16_missing() -> str | None:
    """Why this machine gets no bf16 rows (one line), or None where it has bf16."""
    if has_bf16():
        return None
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16 rows skipped: this CPU has no BF16 extension"
    return "bf16 rows skipped: this CPU has no AVX512-BF16 or AMX"


def reduce_range() -> bool:
    """fbgemm's `reduce_range` (7-bit activations) is needed exactly where there is no VNNI."""
    return not has_vnni()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(threads: int | None = None) -> dict:
    """What every result carries, so figures from different machines are never mixed up."""
    import os

    import torch

    flags = _read_flags()
    versions = {"torch": torch.__version__}
    for name in ("torchvision", "torchao", "onnxruntime", "openvino", "nncf"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            pass
    try:
        import torch._inductor.config as ic
        freezing = bool(ic.freezing)
    except Exception:
        freezing = None
    return {
        "cpu": cpu_model(),
        "isa": {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vnni": has_vnni(),
        "bf16": has_bf16(),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "quantized_engine": torch.backends.quantized.engine,
        "inductor_freezing": freezing,
    }
