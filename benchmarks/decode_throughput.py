"""Is decoding the bottleneck of eval at 224x224? (issue 19: eval of ResNet-18 int8 at 224 on
all cores at >= 90 % of the model's own throughput on pre-decoded tensors.)

On a generated ImageNet-like val/ folder (benchmarks/imagenet_like.py's JPEGs of 200-500 px,
mixed aspect ratios), ResNet-18 (random weights, --classes outputs) read through torchvision's
preprocessing (resize 256, center crop 224), quantized to int8 TorchScript by quantbench (FX,
static, --calib images; --fp32 measures the fp32 model instead), with --threads torch threads.
Images/s of evaluate.predict, the path `eval` and the measuring workers take, in three ways:

  (a) pre-decoded  the images decoded beforehand into one uint8 tensor: the model's own
                   throughput (normalization included, as in every eval);
  (b) streaming    data.LazyImages without a cache: each batch decoded in threads while the
                   model runs the one before (what every row paid before the cache);
  (c) cache, warm  the same, reading the decoded-image cache's shards (data.ImageCache) that a
                   first pass (timed too: "cache, cold", decoding and writing shards) made.

The three are interleaved over --reps rounds; the table gives each one's median and its ratio
to (a). Prints a Markdown table (figures: docs/imagenet.md).

    python benchmarks/decode_throughput.py --out /tmp/qb-decode --images 1000
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from imagenet_like import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantbench-decode"))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--calib", type=int, default=64, help="calibration images for the int8 model")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="measure the fp32 model, not int8")
    args = ap.parse_args()

    import numpy as np
    import torch
    import torchvision

    from quantbench import data as qdata
    from quantbench import runtimes
    from quantbench.evaluate import predict
    from quantbench.models import read_checkpoint
    from quantbench.quantize import QuantizeConfig, quantize_to_file
    from quantbench.weights import resolve

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    generate(args.out, "val", args.images, args.classes, seed=1)
    print(f"val/ of {args.images} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    w = args.out / "resnet18-random.pth"
    if not w.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=args.classes).state_dict(), w)
    ckpt = resolve("resnet18", str(w))
    meta = read_checkpoint(ckpt)[1]
    pre = qdata.Preprocess.from_dict(meta["preprocess"])

    def source(cache) -> qdata.DataSource:
        return qdata.DataSource(args.out, preprocess=pre, image_cache=cache if cache else "off")

    if args.fp32:
        from quantbench.models import load_checkpoint
        model = load_checkpoint(ckpt)[0].eval()
        what = "fp32 (eager)"
    else:
        qfile = args.out / "resnet18-int8.pt"
        if not qfile.is_file():
            t0 = time.perf_counter()
            calib = source(None).load_for(meta, "weights", train=True, progress=False)
            quantize_to_file(ckpt, qfile, QuantizeConfig(method="static", flow="fx", calib_samples=args.calib),
                             data=calib, progress=False)
            print(f"int8 file made in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        model = runtimes.load(qfile, args.threads)
        what = "int8 (FX static, TorchScript)"

    # val/ only: predict on the images accuracy is measured on (the held-out calibration images apart)
    lazy = source(None).load_for(meta, "weights", train=False, progress=False)
    t0 = time.perf_counter()
    decoded = lazy.test.images.take(np.arange(len(lazy.test)))
    print(f"pre-decoded {len(decoded)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    tensors = qdata.Dataset(classes=lazy.classes, test=qdata.Split(decoded, lazy.test.labels), mean=lazy.mean,
                            std=lazy.std)
    cache_dir = Path(tempfile.mkdtemp(prefix="qb-image-cache-", dir=args.out))

    def rate(ds) -> float:
        t = time.perf_counter()
        preds, _ = predict(model, ds, args.batch_size, progress=False, set_eval=False)
        return len(preds) / (time.perf_counter() - t)

    cached = lambda: source(cache_dir).load_for(meta, "weights", train=False, progress=False)  # noqa: E731
    rates: dict[str, list[float]] = {"(a) pre-decoded tensors": [], "(b) streaming, no cache": [],
                                     "(c) cache, warm": []}
    # warm-up: TorchScript optimizes its graph over the first calls
    predict(model, tensors, args.batch_size, progress=False, set_eval=False, limit=3 * args.batch_size)
    cold = rate(cached())  # fills the cache
    for _ in range(args.reps):
        rates["(a) pre-decoded tensors"].append(rate(tensors))
        rates["(b) streaming, no cache"].append(rate(source(None).load_for(meta, "weights", train=False,
                                                                            progress=False)))
        rates["(c) cache, warm"].append(rate(cached()))
    shard_mb = sum(p.stat().st_size for p in cache_dir.glob("*.npy")) / 2**20
    shutil.rmtree(cache_dir)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nResNet-18 {what}, {args.classes} classes, 224x224, batch {args.batch_size}, {args.threads} threads, "
          f"{len(decoded)} images, median of {args.reps}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load:.1f} at the end; torch {torch.__version__}; "
          f"cache: {shard_mb:.0f} MiB of shards\n")
    base = statistics.median(rates["(a) pre-decoded tensors"])
    print("| eval | images/s | vs pre-decoded |\n| --- | ---: | ---: |")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"| {name} | {m:.1f} | {m / base:.2f} |")
    print(f"| (c') cache, cold (decodes, writes shards) | {cold:.1f} | {cold / base:.2f} |")


if __name__ == "__main__":
    main()
