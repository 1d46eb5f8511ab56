"""quantbench: train, quantize (eager, FX, PT2E) and benchmark int8 CNNs on the CPU.

The pipeline, one module per stage:
    data -> models -> train -> quantize (flows/) -> export -> bench (runtimes/) -> report
and `replicate` runs it end to end. The CLI (`quantbench ...`, quantbench.cli) is a thin table
over the names below, which a notebook can use directly:

    from quantbench import DataSource, QuantizeConfig, quantize_to_file, BenchConfig, run_bench
    data = DataSource("data/cifar10").load()
    quantize_to_file("best.pth", "ptq-s.pt", QuantizeConfig(method="static", flow="fx"), data)
    results = run_bench(["origin.pt", "ptq-s.pt"], BenchConfig(data=DataSource("data/cifar10")))

Names are imported on first use, so `import quantbench` stays cheap (and the CLI can quiet
torch's logging before torch is imported). The functions named like their stage module
(quantize, train, bench, replicate, sensitivity, tune) are exported as quantize_model, train_model,
run_bench, run_replicate, run_sensitivity and run_tune, since `quantbench.bench` is the module.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it ("module:name" where the names differ)
_API = {
    "DataSource": "data", "Dataset": "data", "load_dataset": "data",
    "build": "models", "load_checkpoint": "models", "save_checkpoint": "models",
    "Recipe": "train", "PRESETS": "train", "get_recipe": "train", "train_model": "train:train",
    "accuracy": "evaluate", "evaluate_file": "evaluate",
    "QuantizeConfig": "quantize", "QATSchedule": "quantize", "QAT_SCHEDULES": "quantize",
    "quantize_model": "quantize:quantize", "quantize_to_file": "quantize", "export_origin": "quantize",
    "BenchConfig": "bench", "run_bench": "bench:bench",
    "BenchResults": "results", "ModelResult": "results", "LatencyStats": "results", "OpCounts": "results",
    "QuantStatus": "results",
    "write_report": "report", "load_results": "report", "report_runs": "report",
    "profile_model": "profiling",
    "run_sensitivity": "sensitivity:sensitivity", "SensitivityResult": "sensitivity", "validation_split": "sensitivity",
    "Scheme": "qconfigs", "prune_dead_taps": "prune",
    "ReplicateConfig": "replicate", "run_replicate": "replicate:replicate",
    "TuneConfig": "tune", "run_tune": "tune:tune",
    "QuantbenchError": "errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'quantbench' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attr or name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
