"""Does the 95 % interval of an int8 file's accuracy delta, measured on a seeded subset of the test
images (bench --eval-samples), cover the delta measured on all of them? (A check of the paired
interval in quantbench.results, not a test: it evaluates two models on every test image.)

    python benchmarks/paired_ci.py CHECKPOINT INT8_FILE --data-dir DIR [--subset 2000] [--seeds 1,2]

Both models are evaluated once, in this process, on the whole test split (each image's top-1
class); the delta on all images is the truth the subsets are checked against. For each seed, the
subset is the one `--eval-samples N` draws with that seed (quantbench.evaluate.eval_subset), and
its interval is the one bench reports (quantbench.results.paired_interval: the paired bootstrap
over images united with the exact McNemar-style interval; both parts are printed too).
The issue's target is 10,000 of 50,000 ImageNet images; on CIFAR-10 (10,000 test images) the
same fifth is 2,000.
"""
import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="fp32 checkpoint (.pth)")
    ap.add_argument("int8", type=Path, help="int8 deployment file made from it (e.g. quantbench quantize ...)")
    ap.add_argument("--data-dir", type=Path, required=True, help="ImageFolder tree with test/")
    ap.add_argument("--subset", type=int, default=2000, help="images per subset (default: 2000)")
    ap.add_argument("--seeds", default="1,2", help="comma list of subset seeds (default: 1,2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from quantbench import runtimes
    from quantbench.data import DataSource
    from quantbench.evaluate import eval_subset, predict
    from quantbench.export import read_sidecar
    from quantbench.models import load_checkpoint, read_checkpoint
    from quantbench.results import bootstrap_interval, mcnemar_interval, paired_interval

    source = DataSource(args.data_dir)
    _, meta = read_checkpoint(args.checkpoint)
    runs = {}
    for name, path in (("fp32", args.checkpoint), ("int8", args.int8)):
        t0 = time.perf_counter()
        if name == "fp32":
            data = source.load_for(meta, str(path), train=False, progress=False)
            model, _ = load_checkpoint(path, num_classes=data.num_classes)
        else:
            data = source.load_for(read_sidecar(path), str(path), train=False, progress=False)
            model = runtimes.load(path, args.threads)
        preds, labels = predict(model, data, args.batch_size, progress=False)
        runs[name] = (preds.numpy(), labels.numpy())
        print(f"{name}: {path.name}: top-1 {100 * (preds == labels).float().mean().item():.2f}% on all "
              f"{len(labels)} test images ({time.perf_counter() - t0:.0f} s)")
    (fp, labels), (q, labels_q) = runs["fp32"], runs["int8"]
    assert (labels == labels_q).all(), "the two models saw the images in different orders"
    right_fp, right_q = fp == labels, q == labels
    n = len(labels)

    def pair(idx):
        a_only = int((right_q[idx] & ~right_fp[idx]).sum())
        b_only = int((~right_q[idx] & right_fp[idx]).sum())
        m = len(idx)
        return m, a_only, b_only, 100.0 * (a_only - b_only) / m

    m, a_only, b_only, full = pair(np.arange(n))
    lo, hi = paired_interval(m, a_only, b_only)
    print(f"all {n} images: delta {full:+.2f} [{lo:+.2f}, {hi:+.2f}] points (int8 - fp32; {a_only} images only "
          f"int8 gets right, {b_only} only fp32), agreement {100 * (fp == q).mean():.2f}%")
    covered = []
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        idx = np.asarray(eval_subset(n, args.subset, seed))
        m, a_only, b_only, delta = pair(idx)
        lo, hi = paired_interval(m, a_only, b_only)
        blo, bhi = bootstrap_interval(m, a_only, b_only)
        elo, ehi = mcnemar_interval(m, a_only, b_only)
        ok = lo <= full <= hi
        covered.append(ok)
        print(f"seed {seed}: {m} of {n} images: delta {delta:+.2f} [{lo:+.2f}, {hi:+.2f}] "
              f"(bootstrap [{blo:+.2f}, {bhi:+.2f}], exact [{elo:+.2f}, {ehi:+.2f}]; {a_only} vs {b_only} "
              f"discordant), agreement {100 * (fp[idx] == q[idx]).mean():.2f}%: "
              f"{'covers' if ok else 'does NOT cover'} the delta on all images ({full:+.2f})")
    print(f"{sum(covered)} of {len(covered)} intervals cover the delta on all {n} images")
    return 0 if all(covered) else 1


if __name__ == "__main__":
    sys.exit(main())
