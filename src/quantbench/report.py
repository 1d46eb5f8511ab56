"""Stage 7: the report. Renders bench results (quantbench.results.BenchResults; results.json is
their serialized form) as Markdown tables in the original's format, plus CSV and figures. Every
other file of a run directory is derived from results.json, which is written first; every file
is written atomically."""
from __future__ import annotations

import csv
import inspect
import io
import re
import sys
from pathlib import Path

from . import runtimes
from .errors import QuantbenchError, cause
from .fileio import read_json, sha256, write_bytes, write_json, write_text
from .results import (BenchResults, ModelResult, QuantStatus, ResultsFormatError, max_drop_of, recommend,
                      threads_words)

MiB = 2 ** 20

_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|~])")


def md(value) -> str:
    """A value read from a file (a label, a sidecar's warning, a machine's name) as Markdown
    text that stays one inline run: line breaks become spaces and the characters that make
    tables, bold, links, code or HTML are escaped, so a label with `|` and a newline cannot
    add a row to a table or a line to "Ship this". (Underscores are left alone: names and paths
    are full of them, and inside a word they emphasize nothing.)"""
    text = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", text)


def code(value) -> str:
    """A value read from a file as an inline code span (a file name, a load line): one line, and
    a fence longer than any run of backticks inside it."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fmt(x, spec: str, suffix: str = "", missing: str = "n/a") -> str:
    return missing if x is None else f"{x:{spec}}{suffix}"


def dtype_cell(row: ModelResult) -> str:
    if row.status is QuantStatus.NOT_QUANTIZED:
        return "**fp32 (NOT QUANTIZED)**"  # a silent no-op is never reported as int8
    if row.status is QuantStatus.LINEAR_ONLY:  # convolutions all fp32: a CNN's fc, or a transformer's Linears
        ops = row.ops
        if ops is not None and ops.int8_linear + ops.float_linear > 1:
            return f"int8 (linear only: {ops.int8_linear} of {ops.int8_linear + ops.float_linear})"
        return "int8 (fc only)"
    return md(row.dtype)


def markdown_table(results: BenchResults, seed_format: bool = False) -> str:
    """The original's columns, then speed-up and size ratio against the same runtime's fp32 row.
    seed_format keeps the original's name "Parameter Size" for what is the file's size."""
    size = "Parameter Size¹" if seed_format else "File Size"
    lines = [f"| Model | Dtype | Model Accuracy | Inference Time | {size} | Speed-up | Size ratio |",
             "|-------|-------|---------------:|---------------:|---------------:|---------:|-----------:|"]
    for r in results.models:
        lines.append(
            f"| {md(r.label)} | {dtype_cell(r)} | {_fmt(r.accuracy, '.2f', '%')} | "
            f"{_fmt(r.median_ms(), '.2f', ' ms')} | {r.file_bytes / MiB:.1f} MiB | "
            f"{_fmt(r.speedup, '.2f', 'x', '')} | {_fmt(r.size_ratio, '.2f', 'x', '')} |")
    if seed_format:
        lines += ["", "¹ The deployment file's size, under the original's column name."]
    if any(r.baseline is None for r in results.models):
        lines += ["", "Speed-up and size ratio are empty where the run has no fp32 row of the same runtime."]
    return "\n".join(lines)


def detail_table(results: BenchResults) -> str:
    lines = ["| Model | Runtime | Acc. delta [95 % interval] | p50 | p90 | p99 | IQR/p50 | Process spread | "
             "vs fastest fp32 | Weights | Model RSS | Load (compile) | int8 / float ops | Agreement | Images |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results.models:
        lat, ops = r.latency.get(1), r.ops
        op_cell = (f"{ops.int8_conv}+{ops.int8_linear} / {ops.float_conv}+{ops.float_linear}") if ops else "n/a"
        wb = r.weight_bytes
        runtime = md(r.runtime) + (f" ({md(r.sidecar['engine'])})" if r.sidecar.get("engine") else "")
        # the spread relative to the p50 shown beside it (the median of the per-process medians),
        # not to the pooled median that bench's iqr_rel divides by
        iqr = (lat.p75_ms - lat.p25_ms) / lat.median_ms if lat and lat.median_ms else None
        lines.append(
            f"| {md(r.label)} | {runtime} | {delta_cell(r.accuracy_delta, r.accuracy_delta_ci)} | "
            f"{_fmt(lat and lat.median_ms, '.3f')} | {_fmt(lat and lat.p90_ms, '.3f')} | "
            f"{_fmt(lat and lat.p99_ms, '.3f')} | {_fmt(iqr, '.1%')} | "
            f"{_fmt(lat and lat.process_spread, '.1%')} | {_fmt(r.speedup_vs_fastest_fp32, '.2f', 'x')} | "
            f"{_fmt(wb and wb / MiB, '.1f', ' MiB')} | {_fmt(r.model_rss_mb, '.0f', ' MB')} | "
            f"{_fmt(r.load_s, '.1f', ' s')} | {op_cell} | {_fmt(r.agreement, '.2f', '%', '')} | "
            f"{_fmt(r.paired_n or r.accuracy_n, 'd', '', '')} |")
    return "\n".join(lines)


def delta_cell(delta: float | None, ci) -> str:
    """An accuracy delta in points with its 95 % interval: "-0.12 [-0.40, +0.15]"."""
    if delta is None:
        return ""
    return f"{delta:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def accuracy_basis(results: BenchResults) -> str:
    """What the accuracy figures rest on: how many test images (all, or --eval-samples' seeded
    subset), and how deltas are compared."""
    cfg = results.config or {}
    ns = sorted({r.accuracy_n for r in results.models if r.accuracy is not None and r.accuracy_n})
    total, samples = cfg.get("test_images"), cfg.get("eval_samples")
    if not ns:
        return "Accuracy: top-1 on the test split."
    if len(ns) > 1:
        text = "Accuracy: top-1 on the test images in the Images column of the details."
    elif total and ns[0] < total:
        text = (f"Accuracy: top-1 on {ns[0]} of the {total} test images, a seeded subset (--eval-samples "
                f"{md(samples)}, seed {md(cfg.get('eval_seed', 0))}), the same images for every model.")
    else:
        text = f"Accuracy: top-1 on all {ns[0]} test images."
    if any(r.accuracy_delta_ci for r in results.models):
        text += (" Accuracy deltas are paired, image by image, on those images: each with its 95 % interval (the "
                 "paired bootstrap over the images united with the exact McNemar-style interval: docs/measuring.md) "
                 "and the agreement of its top-1 classes with the fp32 row's.")
    reused = cfg.get("accuracy_reused") or {}
    if isinstance(reused, dict) and reused:
        text += (f" Predictions of {', '.join(md(k) for k in reused)} were kept from an earlier measurement of the "
                 "same file on the same images (--image-cache), not measured again.")
    return text


def several_threads(results: BenchResults) -> bool:
    return len(results.thread_counts()) > 1


def setting_words(results: BenchResults, threads: int | None, batch: int) -> str:
    """A timing setting as the report names it: "batch 16" when the run timed one thread
    setting, else "batch 16, 1 thread" / "batch 16, all 2 cores"."""
    if not several_threads(results):
        return f"batch {batch}"
    return f"batch {batch}, {threads_words(threads, (results.config or {}).get('all_threads'))}"


def _setting_table(results: BenchResults, settings, unit: str, cell) -> str:
    lines = ["| Model | " + " | ".join(f"{md(setting_words(results, t, b))} ({unit})" for t, b in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    for r in results.models:
        lines.append(f"| {md(r.label)} | " + " | ".join(cell(r.latency_at(t).get(b)) for t, b in settings) + " |")
    return "\n".join(lines)


def throughput_table(results: BenchResults) -> str:
    """Images per second at each setting: every batch size (of one thread setting, or of each
    when there are several); empty when only batch 1 at one thread setting was timed."""
    settings = results.settings()
    if not several_threads(results) and [b for _, b in settings] in ([1], []):
        return ""
    return _setting_table(results, settings, "img/s", lambda lat: _fmt(lat and lat.throughput_ips, ".0f"))


def latency_table(results: BenchResults) -> str:
    """Median milliseconds per call at each (threads, batch) setting, when several thread
    settings were timed (the main table shows the first one's batch 1 only)."""
    if not several_threads(results):
        return ""
    return _setting_table(results, results.settings(), "ms", lambda lat: _fmt(lat and lat.median_ms, ".3f"))


BUSY_WARN_CORES = 0.2  # other work above this while timing makes the report say so


def busy_cores(results: BenchResults) -> float | None:
    """The most CPU that other processes used while any batch size was timed (in cores)."""
    seen = [lat.other_cores for r in results.models for t in results.thread_counts()
            for lat in r.latency_at(t).values() if lat.other_cores is not None]
    return max(seen) if seen else None


def machine_line(m: dict) -> str:
    isa = ", ".join(md(k) for k, v in (m.get("isa") or {}).items() if v) or "none detected"
    v = m.get("versions") or {}
    return (f"{md(m.get('cpu'))} ({md(m.get('cores'))} cores; ISA: {isa}; VNNI: {'yes' if m.get('vnni') else 'no'}), "
            f"{md(m.get('threads'))} thread(s), {md(m.get('os'))}, Python {md(m.get('python'))}, "
            + ", ".join(f"{md(k)} {md(x)}" for k, x in v.items())
            + f", default quantized engine {md(m.get('quantized_engine'))} (a TorchScript file's own: see Runtime)")


def load_lines(runtime, name: str, sidecar: dict | None) -> str:
    """The runtime's lines that load `name` at the measured speed; a runtime whose how_to_load
    takes the sidecar gets it (TorchScript sets the quantized engine recorded there first)."""
    if "sidecar" in inspect.signature(runtime.how_to_load).parameters:
        return runtime.how_to_load(name, sidecar=sidecar)
    return runtime.how_to_load(name)


def recommendation_lines(results: BenchResults, max_drop: float | None = None) -> list[str]:
    """"Ship this", for batch 1 and for every throughput batch size measured, at each thread
    setting timed."""
    lines = []
    max_drop = max_drop_of(results) if max_drop is None else max_drop
    fp32 = [m for m in results.models if m.dtype == "fp32" and m.accuracy is not None]
    for t, b in results.settings():
        rec = recommend(results, max_drop, b, threads=t)
        at = setting_words(results, t, b)
        if rec is None and not fp32:  # nothing to judge the int8 rows against, nothing to ship
            lines.append(f"- {at}: no fp32 model's accuracy was measured in this run, so no int8 model can be "
                         f"judged against it; measure the fp32 file alongside the int8 ones.")
            continue
        if rec is None:
            best = max(fp32, key=lambda m: m.accuracy)
            lines.append(f"- {at}: no int8 or bf16 model is within {max_drop} point of fp32 accuracy; ship the fp32 model "
                         f"(**{md(best.label)}**, {code(Path(best.file).name)}).")
            continue
        vs = (f", {rec.speedup_vs_fastest_fp32:.2f}x the speed of the fastest fp32 model ({md(rec.fastest_fp32)})"
              if rec.speedup_vs_fastest_fp32 else "")
        # the runtimes' own int8 rows (replicate --plain): what quantbench adds over each runtime alone
        vs += "".join(f", {m.median_ms(b, t) / rec.median_ms:.2f}x the speed of {md(m.label)}"
                      for m in results.models if m.sidecar.get("plain") and m.median_ms(b, t) and m.label != rec.label)
        sidecar = next((m.sidecar for m in results.models if m.label == rec.label), None)
        try:
            hint = load_lines(runtimes.get(rec.runtime), Path(rec.file).name, sidecar)
        except (QuantbenchError, AttributeError, ImportError):  # a runtime not installed here
            hint = None
        lines.append(f"- {at}: **{md(rec.label)}** ({md(rec.runtime)}, {code(Path(rec.file).name)}): "
                     f"{rec.median_ms:.2f} ms per batch{vs}; "
                     f"accuracy {delta_cell(rec.accuracy_delta, rec.accuracy_delta_ci)} point vs fp32" + (f" on {rec.accuracy_n} images" if rec.accuracy_n else "")
                     + "".join(f"; {t}" for t in ties(rec, subset=_subset(results, rec.accuracy_n)))
                     + (f". Load it with {code(hint)}" if hint else "") + ".")
    return lines


def _subset(results: BenchResults, n: int | None) -> bool:
    total = (results.config or {}).get("test_images")
    return isinstance(total, int) and n is not None and n < total


def ties(rec, subset: bool = False) -> list[str]:
    """What the intervals say of "ship this": differences inside their interval, said in words
    (`subset`: the images are --eval-samples' subset, and more of them would narrow it)."""
    out = []
    if rec.fp32_tie:
        out.append("not distinguishable from fp32 on these images (its interval includes 0: a tie)")
    if rec.threshold_inside:
        out.append(f"its interval reaches below -{rec.max_drop}: whether it is within --max-drop is not settled "
                   "by these images" + (" (more with --eval-samples)" if subset else ""))
    if rec.runner_up is not None and rec.runner_up_diff is not None:
        slower = f", {rec.runner_up_ms / rec.median_ms:.2f}x its time" if rec.runner_up_ms and rec.median_ms else ""
        diff = delta_cell(rec.runner_up_diff, rec.runner_up_ci)
        if rec.runner_up_tie:
            out.append(f"the next candidate, {md(rec.runner_up)}{slower}, is {diff} point against it: a tie in "
                       "accuracy, not distinguishable on these images")
        elif rec.runner_up_ci:
            better = "more" if rec.runner_up_diff > 0 else "less"
            out.append(f"the next candidate, {md(rec.runner_up)}{slower}, is {better} accurate, {diff} point against "
                       "it, beyond the interval")
        else:
            out.append(f"the next candidate, {md(rec.runner_up)}{slower}, is {diff} point against it (not paired: "
                       "no per-image results)")
    if rec.borderline:
        out.append("faster, left out by their measured delta though their interval reaches -"
                   f"{rec.max_drop} (not distinguishable from qualifying): " + ", ".join(md(x) for x in rec.borderline))
    return out


def model_warnings(results: BenchResults) -> list[str]:
    """Warnings recorded with the models (an fp32 model that diverged or stayed near chance, a
    QAT fine-tune that did), once each, with the rows they concern."""
    seen: dict[str, list[str]] = {}
    for r in results.models:
        for w in r.sidecar.get("warnings") or []:
            seen.setdefault(w, []).append(r.label)
    return [f"**Warning:** {md(w)} ({', '.join(md(x) for x in labels)})" for w, labels in seen.items()]


def analysis_sections(run_dir: Path | None) -> list[str]:
    """What `quantbench sensitivity` and `quantbench tune` left in the run directory, if anything:
    the layers that hurt most, and the tuner's pick in its own sentence."""
    if run_dir is None:
        return []
    run_dir, parts = Path(run_dir), []
    sens = run_dir / "sensitivity.json"
    if sens.is_file():
        try:
            d = read_json(sens)
            rows = sorted(d.get("layers") or [], key=lambda r: (-r["drop"], r["sqnr_db"]))[:5]
            table = [f"| {md(r['layer'])} | {r['drop']:+.2f} | {r['gain']:+.2f} | {md(r['sqnr_db'])} |" for r in rows]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise QuantbenchError(f"{sens} is not a sensitivity.json this version reads ({cause(e)})") from e
        parts += ["## Layer sensitivity", "",
                  f"`quantbench sensitivity` ({md(d.get('flow'))} flow, {md(d.get('val_samples'))} validation "
                  f"images): fp32 {md(d.get('fp32_acc'))} %, all int8 {md(d.get('int8_acc'))} %; the layers int8 "
                  "hurts most (full table: [sensitivity.md](sensitivity.md)):", "",
                  "| layer | drop alone | gain if fp32 | SQNR dB |", "|---|---|---|---|"] + table + [""]
    tune = run_dir / "tune.json"
    if tune.is_file():
        try:
            sentence = read_json(tune).get("sentence", "")
        except (OSError, ValueError, AttributeError) as e:
            raise QuantbenchError(f"{tune} is not a tune.json this version reads ({cause(e)})") from e
        parts += ["## Tune", "", md(sentence), "", "All trials: [tune.md](tune.md).", ""]
    return parts


def timing_words(results: BenchResults) -> str:
    """What the main table's and the details' latency is: "batch 1, 1 thread(s)" as the run's
    config says, and with several thread settings, which one they show and what else was timed."""
    cfg = results.config or {}
    if not several_threads(results):
        t = results.thread_counts()[0]
        if t is None:  # a run from before rows said: its config's number
            return f"batch 1, {md(cfg.get('threads'))} thread(s)"
        return f"batch 1, {threads_words(t, cfg.get('all_threads'))}"
    first = results.thread_counts()[0]
    return (f"{setting_words(results, first, 1)} in the main table and the details (every setting timed: "
            + "; ".join(setting_words(results, t, b) for t, b in results.settings()) + ")")


def render(results: BenchResults, figures: list[Path] = (), run_dir: Path | None = None) -> str:
    cfg = results.config
    fastest = next((r.fastest_fp32 for r in results.models if r.fastest_fp32), None)
    parts = ["# quantbench report", "",
             f"Machine: {machine_line(results.machine)}.", "",
             f"Latency: >= {md(cfg.get('min_runs'))} timed calls per model after warm-up, {timing_words(results)}, "
             "rounds interleaved across models, in "
             f"{md(cfg.get('processes', 1))} fresh process(es) per model; the median of the per-process medians "
             "(process spread: (max - min) / median of those). "
             + accuracy_basis(results) + " File size: the deployment file and its companions. "
             "Speed-up, size ratio and accuracy delta: against the fp32 row of the same runtime"
             + (f"; \"vs fastest fp32\": against {md(fastest)}" if fastest else "") + ".", ""]
    warned = model_warnings(results)
    if warned:  # before the table: its figures describe a model that did not learn
        parts += warned + ["", "The table below measures these models as they are; their int8 rows say little "
                                "about quantization until the fp32 model trains properly.", ""]
    parts += [markdown_table(results), ""]
    skipped = (results.replicate or {}).get("skipped") or []
    if skipped:  # rows this model cannot have in that flow, said instead of silently missing
        parts += ["Rows not made: " + "; ".join(f"{md(s['row'])}: {md(s['why'])}" for s in skipped) + ".", ""]
    parts += ["## Ship this", "",
             f"The fastest int8 or bf16 model whose top-1 is within {max_drop_of(results)} point of the fp32 model's "
             "(--max-drop), measured in this run "
             "(ties within the process spread are ties; accuracy differences inside their 95 % interval are ties, "
             "and said so):", ""] + recommendation_lines(results) + [
             "", "## Details", "", detail_table(results), ""]
    lt = latency_table(results)
    if lt:
        parts += ["## Latency by setting", "", "Median milliseconds per call; each thread setting in its own pinned "
                  "processes.", "", lt, ""]
    tp = throughput_table(results)
    if tp:
        parts += ["## Throughput", "", tp, ""]
    parts += analysis_sections(run_dir)
    if figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
    busy = busy_cores(results)
    if busy is not None and busy >= BUSY_WARN_CORES:
        parts += [f"**Warning:** other work used {busy:.2f} of the machine's cores on average while timing: "
                  "latencies are inflated and will not repeat. Re-run on a quiet machine.", ""]
    flagged = [md(r.label) for r in results.models if r.status is QuantStatus.NOT_QUANTIZED]
    if flagged:
        parts += [f"**Warning:** {', '.join(flagged)} claim int8 but run no int8 operator.", ""]
    return "\n".join(parts)


LATENCY_COLUMNS = ("median_ms", "p90_ms", "p99_ms", "iqr_rel", "process_spread", "other_cores",
                   "throughput_ips", "n")
ROW_COLUMNS = ("label", "runtime", "flow", "method", "dtype", "accuracy", "accuracy_n", "accuracy_delta",
               "accuracy_delta_low", "accuracy_delta_high", "agreement", "paired_n", "file_bytes",
               "weight_bytes", "baseline", "speedup", "speedup_vs_fastest_fp32", "size_ratio", "peak_rss_mb",
               "model_rss_mb", "load_s", "status")


def to_csv(results: BenchResults) -> str:
    """One line per model; latency columns b{batch}_{figure} at the first thread setting (as
    before there were several), t{threads}_b{batch}_{figure} at each other one."""
    buf = io.StringIO()
    w = csv.writer(buf)
    first, *others = results.thread_counts()
    settings = [(first, b, f"b{b}") for b in results.batch_sizes(first)]
    settings += [(t, b, f"t{t}_b{b}") for t in others for b in results.batch_sizes(t)]
    w.writerow(list(ROW_COLUMNS) + [f"{name}_{k}" for _, _, name in settings for k in LATENCY_COLUMNS])
    for r in results.models:
        ci = r.accuracy_delta_ci or [None, None]
        cells = {"status": r.status.value, "accuracy_delta_low": ci[0], "accuracy_delta_high": ci[1]}
        row = [cells[c] if c in cells else getattr(r, c) for c in ROW_COLUMNS]
        w.writerow(row + [getattr(r.latency_at(t)[b], k) if b in r.latency_at(t) else None
                          for t, b, _ in settings for k in LATENCY_COLUMNS])
    return buf.getvalue()


def write_report(results: BenchResults, json_path=None, markdown_path=None, run_dir=None) -> str:
    """Write whichever outputs are asked for; returns the main table. With run_dir: results.json
    first (the source of truth), then results.csv, the figures and report.md derived from it."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        json_path = json_path or run_dir / "results.json"
    if json_path:
        write_json(json_path, results.to_dict())
    if run_dir is not None:
        write_derived(results, run_dir, json_path)
    if markdown_path:
        write_text(markdown_path, markdown_table(results, seed_format=True) + "\n")
    return markdown_table(results)


def write_derived(results: BenchResults, run_dir: Path, source: Path) -> None:
    """results.csv, results.md, the figures and report.md of `run_dir`, made from `results` as
    read from (or written to) `source`, a results.json, which this never writes. The texts are
    made before the first write, so a failure leaves the run directory as it was."""
    from .plots import plot_all
    csv_text, table = to_csv(results), markdown_table(results, seed_format=True) + "\n"
    render(results, [], run_dir)  # fails here, before any file is written, if anything cannot be shown
    figures = plot_all(results, run_dir)
    # report.md names the results.json it was made from, so a stale one can be told apart
    report = render(results, figures, run_dir) + f"\n{_STAMP}{sha256(source)} -->\n"
    write_text(run_dir / "results.csv", csv_text)
    write_text(run_dir / "results.md", table)
    write_text(run_dir / "report.md", report)


def load_results(run: Path) -> BenchResults:
    path = run / "results.json" if run.is_dir() else run
    if not path.is_file():
        raise QuantbenchError(f"no results.json in {run}")
    try:
        raw = read_json(path)
    except ValueError as e:
        raise QuantbenchError(f"{path} is not valid JSON ({cause(e)})") from e
    try:
        return BenchResults.from_dict(raw)
    except ResultsFormatError as e:
        raise QuantbenchError(f"{path} is not a quantbench results file: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise QuantbenchError(f"{path} is not a quantbench results file ({cause(e)})") from e


def compare_table(runs: list[BenchResults], names: list[str]) -> str:
    """Batch-1 median latency and accuracy of every model across runs; change vs the first run."""
    labels = list(dict.fromkeys(r.label for res in runs for r in res.models))
    rows = [res.by_label() for res in runs]
    later = range(1, len(runs))  # runs compared with run 1

    def change(values: list) -> list:
        return [None if v is None or values[0] is None else v / values[0] - 1 for v in values[1:]]

    head = (["Model"] + [f"run {i + 1} (ms)" for i in range(len(runs))] + [f"run {i + 1} vs 1" for i in later]
            + [f"speed-up run {i + 1}" for i in range(len(runs))] + [f"speed-up run {i + 1} vs 1" for i in later]
            + [f"acc. run {i + 1}" for i in range(len(runs))])
    lines = ["Runs: " + "; ".join(f"{i + 1} = {md(name)}" for i, name in enumerate(names)), "",
             "Speed-up: against the fp32 row of the same runtime in the same run (the ratio that can repeat on a "
             "machine whose speed drifts; absolute times need not).", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    worst = []
    for label in labels:
        med = [r[label].median_ms() if label in r else None for r in rows]
        up = [r[label].speedup if label in r else None for r in rows]
        acc = [r[label].accuracy if label in r else None for r in rows]
        worst += [abs(c) for c in change(up) if c is not None and rows[0][label].dtype != "fp32"]
        lines.append("| " + " | ".join([md(label)] + [_fmt(m, ".3f") for m in med] + [_fmt(c, "+.1%") for c in change(med)]
                                       + [_fmt(u, ".2f", "x") for u in up] + [_fmt(c, "+.1%") for c in change(up)]
                                       + [_fmt(a, ".2f", "%") for a in acc]) + " |")
    if worst:
        lines += ["", f"Largest change of a speed-up against run 1: {max(worst):.1%} "
                      f"({sum(w <= 0.05 for w in worst)} of {len(worst)} within 5 %)."]
    return "\n".join(lines)


_STAMP = "<!-- made from results.json sha256 "


def stale_report(run_dir: Path) -> bool:
    """True when report.md is missing or was made from another results.json than the one there
    (e.g. a run killed between writing the two)."""
    report = Path(run_dir) / "report.md"
    if not report.is_file():
        return True
    stamp = [line for line in report.read_text().splitlines() if line.startswith(_STAMP)]
    return not stamp or stamp[-1][len(_STAMP):].split()[0] != sha256(Path(run_dir) / "results.json")


def report_runs(runs: list[Path], output: Path | None = None) -> Path:
    """One run: rebuild its report from results.json. Several: medians side by side (with the
    change against the first run), then each run's table, in compare.md. Returns the file."""
    results = [load_results(r) for r in runs]
    if len(results) == 1:
        run = Path(runs[0])
        source = run / "results.json" if run.is_dir() else run
        out = Path(output or (run if run.is_dir() else run.parent))
        if out.resolve() == source.parent.resolve():
            if (out / "report.md").is_file() and stale_report(out):
                print(f"{out / 'report.md'} did not match {source}: rebuilt", file=sys.stderr)
        else:  # another folder: a copy of the file as it is (keys this version does not know included)
            write_bytes(out / "results.json", source.read_bytes())
            source = out / "results.json"
        write_derived(results[0], out, source)  # results.json itself is never rewritten
        return out / "report.md"
    out = Path(output or runs[0])
    parts = ["# quantbench: runs compared", "", compare_table(results, [str(r) for r in runs]), ""]
    for path, res in zip(runs, results):
        parts += [f"## {md(path)}", "", f"Machine: {machine_line(res.machine)}.", "", markdown_table(res), ""]
    write_text(out / "compare.md", "\n".join(parts))
    return out / "compare.md"
