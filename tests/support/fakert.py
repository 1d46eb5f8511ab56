"""A fake comparison runtime for replicate tests: export() writes two .fake files with
sidecars and counts its calls; FILES names them, as real runtime modules do. The files hold what
the sleepy runtime reads, so loading and op counts come from there."""
import json

from quantbench.export import write_sidecar

from .sleepy import files, how_to_load, load, op_counts  # noqa: F401

NAME = "fake"
SUFFIXES = (".fake",)
FILES = ("fake-fp32.fake", "fake-int8.fake")
calls = []


def export(model, out_dir, calib_batches, meta, scheme=None, bias_correction="fast"):
    calls.append(out_dir)
    paths = []
    for name, dtype in zip(FILES, ("fp32", "int8")):
        path = out_dir / name
        path.write_text(json.dumps({"ms": 1}))
        write_sidecar(path, **meta, label=name.split(".")[0], method="origin" if dtype == "fp32" else "static",
                      flow="fake", runtime="fake", dtype=dtype)
        paths.append(path)
    return paths
