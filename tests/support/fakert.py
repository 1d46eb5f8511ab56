"""A fake comparison runtime for replicate and tune tests: export() writes two .fake files and
returns their records, counting its calls; FILES names them, as real runtime modules do. It has
an option of its own (Options.knob), as a runtime plugged in by one module + one registry line
would. The files hold what the sleepy runtime reads, so loading and op counts come from there."""
import json
import os
import signal
from dataclasses import dataclass, field

from quantbench.errors import QuantbenchError
from quantbench.record import as_record

from .sleepy import files, how_to_load, load, op_counts  # noqa: F401

NAME = "fake"
SUFFIXES = (".fake",)
FILES = ("fake-fp32.fake", "fake-int8.fake")
calls = []


@dataclass(frozen=True)
class Options:
    knob: int = field(default=3, metadata={"help": "how hard the fake runtime tries"})

    def __post_init__(self):
        if not 1 <= self.knob <= 9:
            raise QuantbenchError(f"--fake-knob must be 1 to 9, not {self.knob}")


def available() -> bool:
    return True


def export(model, out_dir, calib_batches, base, scheme=None, options=None):
    if os.environ.get("QUANTBENCH_FAKE_CRASH"):  # a runtime's library that takes its process down
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = options or Options()
    base = as_record(base)
    made = []
    for name, dtype in zip(FILES, ("fp32", "int8")):
        path = out_dir / name
        path.write_text(json.dumps({"ms": 1}))
        made.append(base.replace(file=name, label=name.split(".")[0], method="origin" if dtype == "fp32" else "static",
                                 flow="fake", runtime="fake", dtype=dtype, extra={"knob": options.knob}))
    return made
