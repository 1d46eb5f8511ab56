"""Does a deployment file made for batch 1 exactly run faster at batch 1 than the dynamic-batch
file quantbench writes? (A benchmark, not a test; the README's "what is left to try" figures.)

    python benchmarks/static_batch.py RUN_DIR [--checkpoint CKPT --data-dir DIR] [--rounds 30]

RUN_DIR is a `quantbench replicate ... --plain openvino` run directory. Compared in interleaved
rounds (20 warm-up + 100 timed calls per file per round), pinned to the last core, 1 thread:
- OpenVINO int8, pruned and plain (models/plain/), each compiled with its dynamic batch and
  reshaped to a static [1, C, H, W] before compiling;
- ExecuTorch int8 (models/executorch-int8.pte) against the same pruned checkpoint exported by
  torch.export with a static batch of 1 (needs --checkpoint and --data-dir for calibration).
Each runtime is compared in a process of its own (--runtime; by default the script runs itself
once per runtime): with torch, OpenVINO and ExecuTorch loaded in one process, OpenVINO's calls
measured slower. Prints each variant's median and its speed-up against the first one.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def openvino_variants(models: Path, shape: list[int]) -> dict:
    import openvino as ov
    core = ov.Core()
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    out = {}
    for name, xml in (("openvino plain", models / "plain" / "openvino-int8.xml"),
                      ("openvino pruned", models / "openvino-int8.xml")):
        for static in (False, True):
            m = core.read_model(str(xml))
            if static:
                m.reshape([1, *shape])
            req = core.compile_model(m, "CPU", cfg).create_infer_request()
            out[f"{name}, {'static batch 1' if static else 'dynamic batch'}"] = \
                lambda x, req=req: req.infer({0: x.numpy()})
    return out


def executorch_variants(models: Path, checkpoint: str, data_dir: str) -> dict:
    import torch

    from quantbench.data import Batches, DataSource, for_model
    from quantbench.export import prune_for_export
    from quantbench.models import load_checkpoint
    from quantbench.runtimes import executorch as E
    data = DataSource(data_dir).load(train=True, progress=False)
    model, meta = load_checkpoint(checkpoint, num_classes=data.num_classes)
    d = for_model(data, meta, checkpoint)
    prune_for_export(model, d.input_shape, True, d, 0)
    out_dir = Path(tempfile.mkdtemp(prefix="static-batch-"))
    E._capture = lambda m, ex: torch.export.export(m, (ex[:1].contiguous(),))  # no dynamic batch
    # a batch-1 graph takes one image per call, calibration included
    calib = (x[i:i + 1] for x, _ in Batches(d.train, 100, d.mean, d.std, shuffle=True, limit=2000)
             for i in range(len(x)))
    E.export(model.eval(), out_dir, calib, {})
    return {"executorch, dynamic batch": E.load(models / "executorch-int8.pte", 1),
            "executorch, static batch 1": E.load(out_dir / "executorch-int8.pte", 1)}


def main() -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--checkpoint")
    p.add_argument("--data-dir")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--runtime", choices=("openvino", "executorch"))
    args = p.parse_args()
    if args.runtime is None:
        import subprocess
        wanted = ["openvino"] + (["executorch"] if args.checkpoint and args.data_dir else [])
        codes = [subprocess.call([sys.executable, *sys.argv, "--runtime", r]) for r in wanted]
        return next((1 for c in codes if c), 0)  # a child killed by a signal has a negative code
    # pinned before any runtime starts its threads, so that they inherit the one core
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    import torch

    from quantbench.export import input_shape, read_sidecar
    torch.set_num_threads(1)
    models = args.run / "models"
    shape = list(input_shape(read_sidecar(models / "openvino-int8.xml")))
    if args.runtime == "openvino":
        variants = openvino_variants(models, shape)
    else:
        variants = executorch_variants(models, args.checkpoint, args.data_dir)
    x = torch.randn(1, *shape)
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, f in variants.items():
            for _ in range(20):
                f(x)
            for _ in range(100):
                t = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t)
    ref = statistics.median(next(iter(times.values())))
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:36s} {med * 1e3:.3f} ms  {ref / med:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
