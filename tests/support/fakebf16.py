"""A fake comparison runtime with a bf16 row, as OpenVINO has: export() writes fp32, int8 and,
where the CPU has bf16 (quantbench.cpu.has_bf16, which tests monkeypatch), bf16 files; its
skipped_files() says which it leaves out and why. Counts its calls. Loading is sleepy's."""
import json

from quantbench import cpu
from quantbench.record import as_record

from .sleepy import files, how_to_load, load, op_counts  # noqa: F401

NAME = "fakebf16"
SUFFIXES = (".fake",)
FILES = ("fakebf16-fp32.fake", "fakebf16-int8.fake", "fakebf16-bf16.fake")
calls = []


def available() -> bool:
    return True


def skipped_files() -> dict:
    why = cpu.bf16_missing()
    return {FILES[2]: why} if why else {}


def export(model, out_dir, calib_batches, base, scheme=None, options=None):
    calls.append(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for name, dtype, method in zip(FILES, ("fp32", "int8", "bf16"), ("origin", "static", "bf16")):
        if name in skipped_files():
            continue
        (out_dir / name).write_text(json.dumps({"ms": 1}))
        made.append(as_record(base).replace(file=name, label=name.split(".")[0], method=method, flow=NAME,
                                            runtime=NAME, dtype=dtype))
    return made
