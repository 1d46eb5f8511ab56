"""Stage 7: the report. Renders bench results (a dict, saved as results.json) as Markdown
tables in the original's format, plus CSV; every file is written atomically."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .errors import QuantbenchError
from .fileio import read_json, write_json, write_text

MiB = 2 ** 20


def _lat(row: dict, batch: str = "1") -> dict:
    return (row.get("latency") or {}).get(batch) or {}


def _fmt(x, spec: str, suffix: str = "", missing: str = "n/a") -> str:
    return missing if x is None else f"{x:{spec}}{suffix}"


def dtype_cell(row: dict) -> str:
    check = row.get("quantized_check", "ok")
    if check == "NOT QUANTIZED":
        return "**fp32 (NOT QUANTIZED)**"  # a silent no-op is never reported as int8
    if check == "int8 linear only":
        return "int8 (fc only)"
    return row["dtype"]


def markdown_table(results: dict) -> str:
    """The original's columns, then speed-up and size ratio against the same runtime's fp32 row."""
    lines = ["| Model | Dtype | Model Accuracy | Inference Time | Parameter Size | Speed-up | Size ratio |",
             "|-------|-------|---------------:|---------------:|---------------:|---------:|-----------:|"]
    for r in results["models"]:
        lat = _lat(r)
        lines.append(
            f"| {r['label']} | {dtype_cell(r)} | {_fmt(r.get('accuracy'), '.2f', '%')} | "
            f"{_fmt(lat.get('median_ms'), '.2f', ' ms')} | {r['file_bytes'] / MiB:.1f} MiB | "
            f"{_fmt(r.get('speedup'), '.2f', 'x')} | {_fmt(r.get('size_ratio'), '.2f', 'x')} |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    lines = ["| Model | Runtime | Acc. delta | p50 | p90 | p99 | IQR/p50 | Process spread | vs fastest fp32 | "
             "Weights | Model RSS | Load (compile) | int8 / float ops |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["models"]:
        lat, ops = _lat(r), r.get("ops") or {}
        op_cell = (f"{ops.get('int8_conv', 0)}+{ops.get('int8_linear', 0)} / "
                   f"{ops.get('float_conv', 0)}+{ops.get('float_linear', 0)}") if ops else "n/a"
        wb = r.get("weight_bytes")
        lines.append(
            f"| {r['label']} | {r['runtime']} | {_fmt(r.get('accuracy_delta'), '+.2f')} | "
            f"{_fmt(lat.get('median_ms'), '.3f')} | {_fmt(lat.get('p90_ms'), '.3f')} | {_fmt(lat.get('p99_ms'), '.3f')} | "
            f"{_fmt(lat.get('iqr_rel'), '.1%')} | {_fmt(lat.get('process_spread'), '.1%')} | "
            f"{_fmt(r.get('speedup_vs_fastest_fp32'), '.2f', 'x')} | "
            f"{_fmt(wb and wb / MiB, '.1f', ' MiB')} | {_fmt(r.get('model_rss_mb'), '.0f', ' MB')} | "
            f"{_fmt(r.get('load_s'), '.1f', ' s')} | {op_cell} |")
    return "\n".join(lines)


def throughput_table(results: dict) -> str:
    batches = sorted({b for r in results["models"] for b in (r.get("latency") or {})}, key=int)
    if batches == ["1"] or not batches:
        return ""
    lines = ["| Model | " + " | ".join(f"batch {b} (img/s)" for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    for r in results["models"]:
        lines.append(f"| {r['label']} | " + " | ".join(
            _fmt(_lat(r, b).get("throughput_ips"), ".0f") for b in batches) + " |")
    return "\n".join(lines)


BUSY_WARN_CORES = 0.2  # other work above this while timing makes the report say so


def busy_cores(results: dict) -> float | None:
    """The most CPU that other processes used while any batch size was timed (in cores)."""
    seen = [lat["other_cores"] for r in results["models"] for lat in (r.get("latency") or {}).values()
            if lat.get("other_cores") is not None]
    return max(seen) if seen else None


def machine_line(m: dict) -> str:
    isa = ", ".join(k for k, v in (m.get("isa") or {}).items() if v) or "none detected"
    v = m.get("versions", {})
    return (f"{m.get('cpu')} ({m.get('cores')} cores; ISA: {isa}; VNNI: {'yes' if m.get('vnni') else 'no'}), "
            f"{m.get('threads')} thread(s), {m.get('os')}, Python {m.get('python')}, "
            + ", ".join(f"{k} {x}" for k, x in v.items())
            + f", quantized engine {m.get('quantized_engine')}")


def render(results: dict, figures: list[Path] = ()) -> str:
    cfg = results.get("config", {})
    parts = ["# quantbench report", "",
             f"Machine: {machine_line(results.get('machine', {}))}.", "",
             f"Latency: >= {cfg.get('min_runs')} timed calls per model after warm-up, batch 1, "
             f"{cfg.get('threads')} thread(s), rounds interleaved across models, in "
             f"{cfg.get('processes', 1)} fresh process(es) per model; the median of the per-process medians "
             "(process spread: (max - min) / median of those). "
             "Accuracy: top-1 on the whole test split. Size: the deployment file. "
             "Speed-up and size ratio: against the fp32 row of the same runtime.", "",
             markdown_table(results), "", "## Details", "", detail_table(results), ""]
    tp = throughput_table(results)
    if tp:
        parts += ["## Throughput", "", tp, ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
    busy = busy_cores(results)
    if busy is not None and busy >= BUSY_WARN_CORES:
        parts += [f"**Warning:** other work used {busy:.2f} of the machine's cores on average while timing: "
                  "latencies are inflated and will not repeat. Re-run on a quiet machine.", ""]
    flagged = [r["label"] for r in results["models"] if r.get("quantized_check") == "NOT QUANTIZED"]
    if flagged:
        parts += [f"**Warning:** {', '.join(flagged)} claim int8 but run no int8 operator.", ""]
    return "\n".join(parts)


LATENCY_COLUMNS = ("median_ms", "p90_ms", "p99_ms", "iqr_rel", "process_spread", "other_cores",
                   "throughput_ips", "n")


def to_csv(results: dict) -> str:
    cols = ["label", "runtime", "flow", "method", "dtype", "accuracy", "accuracy_delta", "file_bytes",
            "weight_bytes", "speedup", "speedup_vs_fastest_fp32", "size_ratio", "peak_rss_mb", "model_rss_mb",
            "load_s", "quantized_check"]
    buf = io.StringIO()
    w = csv.writer(buf)
    batches = sorted({b for r in results["models"] for b in (r.get("latency") or {})}, key=int)
    stat_cols = [f"b{b}_{k}" for b in batches for k in LATENCY_COLUMNS]
    w.writerow(cols + stat_cols)
    for r in results["models"]:
        w.writerow([r.get(c) for c in cols] +
                   [_lat(r, b).get(k) for b in batches for k in LATENCY_COLUMNS])
    return buf.getvalue()


def write_report(results: dict, json_path=None, markdown_path=None, run_dir=None) -> str:
    """Write whichever outputs are asked for; returns the main table. With run_dir: results.json,
    results.csv and report.md in it."""
    if run_dir is not None:
        from .plots import plot_all
        run_dir = Path(run_dir)
        json_path = json_path or run_dir / "results.json"
        write_text(run_dir / "results.csv", to_csv(results))
        figures = plot_all(results, run_dir)
        write_text(run_dir / "report.md", render(results, figures))
    if json_path:
        write_json(json_path, results)
    if markdown_path:
        write_text(markdown_path, markdown_table(results) + "\n")
    return markdown_table(results)


def load_results(run: Path) -> dict:
    path = run / "results.json" if run.is_dir() else run
    if not path.is_file():
        raise QuantbenchError(f"no results.json in {run}")
    try:
        return read_json(path)
    except ValueError:
        raise QuantbenchError(f"{path} is not valid JSON") from None


def compare_table(runs: list[dict], names: list[str]) -> str:
    """Batch-1 median latency and accuracy of every model across runs; change vs the first run."""
    labels = list(dict.fromkeys(r["label"] for res in runs for r in res["models"]))
    rows = [{r["label"]: r for r in res["models"]} for res in runs]
    head = ["Model"] + [f"run {i + 1} (ms)" for i in range(len(runs))] + \
           [f"run {i + 1} vs 1" for i in range(1, len(runs))] + [f"acc. run {i + 1}" for i in range(len(runs))]
    lines = ["Runs: " + "; ".join(f"{i + 1} = {n}" for i, n in enumerate(names)), "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label in labels:
        med = [_lat(r.get(label, {})).get("median_ms") for r in rows]
        change = [None if m is None or med[0] is None else m / med[0] - 1 for m in med[1:]]
        acc = [r.get(label, {}).get("accuracy") for r in rows]
        lines.append("| " + " | ".join([label] + [_fmt(m, ".3f") for m in med] + [_fmt(c, "+.1%") for c in change]
                                       + [_fmt(a, ".2f", "%") for a in acc]) + " |")
    return "\n".join(lines)


def report_cli(args) -> int:
    runs = [load_results(r) for r in args.runs]
    if len(runs) == 1:
        out = args.output or args.runs[0]
        write_report(runs[0], run_dir=out)
        print(f"wrote {Path(out) / 'report.md'}")
        return 0
    # Several runs: medians side by side (with the change against the first run), then each table.
    out = Path(args.output or args.runs[0])
    parts = ["# quantbench: runs compared", "", compare_table(runs, [str(r) for r in args.runs]), ""]
    for path, res in zip(args.runs, runs):
        parts += [f"## {path}", "", f"Machine: {machine_line(res.get('machine', {}))}.", "", markdown_table(res), ""]
    write_text(out / "compare.md", "\n".join(parts))
    print(f"wrote {out / 'compare.md'}")
    return 0
