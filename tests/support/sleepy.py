"""A fake runtime for benchmark tests, registered like any runtime (one module + one registry
entry): a `.sleep` file holds {"ms": M, "classes": K}; the "model" sleeps M milliseconds per call
and returns zero logits. Known times, no torch work."""
import json
import time
from pathlib import Path

import torch

from quantbench.results import OpCounts

NAME = "sleepy"
SUFFIXES = (".sleep",)


def files(path):
    return [Path(path)]


def how_to_load(name):
    return f"json.load(open({name!r}))"


def load(path, threads=None):
    spec = json.loads(open(path).read())

    def model(x):
        time.sleep(spec["ms"] / 1000)
        return torch.zeros(x.shape[0], spec.get("classes", 3))

    return model


def op_counts(path, model=None):
    return OpCounts(**json.loads(open(path).read()).get("ops", {}))
