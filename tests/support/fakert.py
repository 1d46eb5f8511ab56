"""A fake comparison runtime for replicate tests: export() writes two .sleep files with
sidecars and counts its calls; FILES names them, as real runtime modules do."""
import json

from quantbench.export import write_sidecar

FILES = ("fake-fp32.sleep", "fake-int8.sleep")
calls = []


def export(model, out_dir, calib_batches, meta):
    calls.append(out_dir)
    paths = []
    for name, dtype in zip(FILES, ("fp32", "int8")):
        path = out_dir / name
        path.write_text(json.dumps({"ms": 1}))
        write_sidecar(path, label=name.split(".")[0], method="origin" if dtype == "fp32" else "static",
                      flow="fake", runtime="fake", dtype=dtype)
        paths.append(path)
    return paths
