"""Tests call a runtime's exporter directly: this writes the sidecars of what it made (as
quantbench.deploy does) and returns the paths."""
from pathlib import Path

from quantbench.deploy import write_runtime_files


def export_paths(mod, model, out_dir, calib, base=None, **kw) -> list[Path]:
    return [Path(out_dir) / r.file for r in write_runtime_files(mod, model, Path(out_dir), calib, base, **kw)]
