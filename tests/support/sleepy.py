"""A fake runtime for benchmark tests: a `.sleep` file holds {"ms": M, "classes": K}; the
"model" sleeps M milliseconds per call and returns zero logits. Known times, no torch work."""
import json
import time

import torch


def load(path, threads=None):
    spec = json.loads(open(path).read())

    def model(x):
        time.sleep(spec["ms"] / 1000)
        return torch.zeros(x.shape[0], spec.get("classes", 3))

    return model
