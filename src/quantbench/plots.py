"""Report figures (matplotlib, PNG, written atomically):

- accuracy_vs_latency.png: each model as a point, the Pareto front (no other model is both
  faster and more accurate) as a line: the configurations worth shipping; error bars: the 95 %
  interval of a row's accuracy delta against its fp32 row, paired on the same images;
- size.png: deployment file size per model;
- latency_distribution.png: per-call latency (box = quartiles, whiskers = p10/p90): the
  spread a median hides.
"""
from __future__ import annotations

from pathlib import Path

from .fileio import atomic_path
from .results import BenchResults, threads_words

MiB = 2 ** 20


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)


def _text(label: str) -> str:
    """A label read from a file, shown as it is: matplotlib would read $...$ as math (and fail
    on what is not), so dollars are escaped; line breaks become spaces."""
    return " ".join(str(label).split()).replace("$", r"\$")


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """(latency, accuracy, label) points no other point beats on both: lower latency, higher accuracy."""
    front, best = [], float("-inf")
    for lat, acc, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc, name))
            best = acc
    return front


def label_offsets(points: list[tuple[float, float]], min_gap: float = 12.0) -> list[float]:
    """Vertical label offsets (points) so labels of nearby points do not overlap: points are
    taken left to right, and a label that would sit within `min_gap` points of an earlier
    label in the same horizontal neighbourhood is pushed below or above it."""
    placed: list[tuple[float, float]] = []  # (x in axes fraction, label y in points)
    offsets = []
    for x, y in points:
        near = [ly for lx, ly in placed if abs(lx - x) < 0.12]
        off = 4.0
        for candidate in (4.0, -12.0, 16.0, -24.0, 28.0, -36.0, 40.0):
            if all(abs(y + candidate - ly) >= min_gap for ly in near):
                off = candidate
                break
        placed.append((x, y + off))
        offsets.append(off)
    return offsets


def plot_all(results: BenchResults, out_dir: str | Path) -> list[Path]:
    plt = _plt()
    out_dir = Path(out_dir)
    rows = results.models
    written = []
    # the figures show batch 1 at the first thread setting (each row's `latency`); named where the
    # run timed several
    counts = results.thread_counts()
    at = f"batch 1, {threads_words(counts[0], (results.config or {}).get('all_threads'))}" if len(counts) > 1 \
        else "batch 1"

    pts = sorted((r.median_ms(), r.accuracy, r.label) for r in rows if r.median_ms() and r.accuracy is not None)
    if pts:
        import math

        from matplotlib.ticker import FormatStrFormatter
        fig, ax = plt.subplots(figsize=(7, 4.5))
        by_label = {r.label: r for r in rows}
        for lat, acc, name in pts:
            ax.scatter(lat, acc, s=30)
            r = by_label[name]
            if r.accuracy_delta_ci and r.accuracy_delta is not None:  # the paired 95 % interval of its delta
                lo, hi = r.accuracy_delta_ci
                ax.errorbar(lat, acc, yerr=[[max(0.0, r.accuracy_delta - lo)], [max(0.0, hi - r.accuracy_delta)]],
                            fmt="none", ecolor="grey", elinewidth=1, capsize=2)
        ax.set_xscale("log")
        fig.canvas.draw()  # fixes the limits, so positions can be turned into points
        lo, hi = (math.log(v) for v in ax.get_xlim())
        ylo, yhi = ax.get_ylim()
        height_pt = ax.get_window_extent().height * 72 / fig.dpi
        where = [((math.log(lat) - lo) / (hi - lo), (acc - ylo) / (yhi - ylo) * height_pt) for lat, acc, _ in pts]
        for (lat, acc, name), off in zip(pts, label_offsets(where)):
            ax.annotate(_text(name), (lat, acc), textcoords="offset points", xytext=(4, off), fontsize=8)
        front = pareto_front(pts)
        ax.step([p[0] for p in front], [p[1] for p in front], "--", where="post", color="grey", label="Pareto front")
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))
        ax.set_xlabel(f"latency, {at} (ms, median, log scale)")
        ax.set_ylabel("top-1 accuracy (%)")
        bars = any(by_label[name].accuracy_delta_ci for _, _, name in pts)
        ax.set_title("Accuracy vs latency" + (" (bars: 95 % interval of the delta vs fp32, paired)" if bars else ""))
        ax.legend(loc="lower right")
        ax.grid(True, alpha=0.3)
        _save(fig, out_dir / "accuracy_vs_latency.png")
        written.append(out_dir / "accuracy_vs_latency.png")

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    labels = [_text(r.label) for r in rows]
    ax.barh(labels, [r.file_bytes / MiB for r in rows], color=["tab:blue" if r.dtype == "fp32" else "tab:orange"
                                                             for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("deployment file size (MiB)")
    ax.set_title("Size (blue: fp32, orange: int8)")
    _save(fig, out_dir / "size.png")
    written.append(out_dir / "size.png")

    lat_rows = [r for r in rows if 1 in r.latency and r.latency[1].samples_ms]
    if lat_rows:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(lat_rows) + 1.2))
        ax.boxplot([r.latency[1].samples_ms for r in lat_rows], orientation="horizontal", whis=(10, 90),
                   showfliers=False, tick_labels=[_text(r.label) for r in lat_rows])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(f"latency per call, {at} (ms, log scale; box: quartiles, whiskers: p10-p90)")
        ax.set_title("Latency distribution")
        _save(fig, out_dir / "latency_distribution.png")
        written.append(out_dir / "latency_distribution.png")
    return written
