"""quantbench.report and results.json: what comes from a file is shown as text, never as Markdown;
`report RUN` never rewrites results.json and fails in one line, before writing, on a bad one."""
from __future__ import annotations

import json
import re

import pytest

from quantbench.cli import main
from quantbench.report import detail_table, markdown_table, recommendation_lines, render, write_report
from quantbench.results import BenchResults, LatencyStats, derive

from test_bench import _cells, _fake_results

DERIVED = ("results.csv", "results.md", "report.md", "accuracy_vs_latency.png", "size.png",
           "latency_distribution.png")


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_labels_cannot_forge_rows_or_verdicts(tmp_path):
    """A label with `|` and a line break (from a sidecar or a results.json) added a row (issue 21)."""
    res = _fake_results()
    forged = "ptq-s | fp32 | 99.99% | 0.01 ms |\n| **ship-me** | int8"
    res.models[1].label = forged
    res.models[1].sidecar = {"warnings": ["bad\n- batch 1: **evil** ships"], "engine": "x86|y"}
    for table in (markdown_table(res), detail_table(res)):
        rows = _table_rows(table)
        assert len(rows) == 2 + 2  # header, rule, two models
        cells = [len(re.split(r"(?<!\\)\|", row)) for row in rows]  # split on pipes not escaped
        assert len(set(cells)) == 1, rows
    lines = recommendation_lines(res)
    assert len(lines) == 1 and "\n" not in lines[0] and "**ship-me**" not in lines[0]
    text = render(res)
    assert "\n- batch 1: **evil**" not in text and "\n| **ship-me**" not in text
    write_report(res, run_dir=tmp_path)
    assert "\n| **ship-me**" not in (tmp_path / "report.md").read_text()


def test_no_fp32_row_does_not_say_ship_the_fp32_model():
    res = _fake_results()
    res.models = derive([m for m in res.models if m.dtype != "fp32"])
    [line] = recommendation_lines(res)
    assert "ship the fp32 model" not in line and "no fp32" in line
    res = _fake_results()
    res.models[1].accuracy = 50.0  # an fp32 row, and no int8 row within budget: ship that one, by name
    res.models = derive(res.models)
    [line] = recommendation_lines(res)
    assert "ship the fp32 model (**origin**, `origin.pt`)" in line


def test_iqr_is_relative_to_the_p50_shown():
    res = _fake_results()
    lat = LatencyStats.of([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])  # pooled median 5, IQR 7 - 3 = 4
    lat.median_ms = 8.0  # the median of the per-process medians, as bench records it
    res.models[0].latency = {1: lat}
    _, rows = _cells(detail_table(res))
    assert rows[0][3] == "8.000" and rows[0][6] == "50.0%"  # 4 / 8, not 4 / 5


def test_report_keeps_results_json_as_it_is(tmp_path, capsys):
    write_report(_fake_results(), run_dir=tmp_path)
    raw = json.loads((tmp_path / "results.json").read_text())
    raw["notes"] = {"who": "me", "why": "baseline before the BIOS update"}
    raw["models"][0]["my_comment"] = "kept"
    text = json.dumps(raw, indent=1)
    (tmp_path / "results.json").write_text(text)
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").read_text() == text
    assert (tmp_path / "report.md").is_file()
    # into another folder: a copy of the file as it is
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "results.json").read_text() == text and (tmp_path / "copy" / "report.md").is_file()


@pytest.mark.parametrize("change, field", [
    (lambda d: d["models"][1]["latency"]["1"].update(median_ms=-2.0), "models[1].latency['1'].median_ms"),
    (lambda d: d["models"][0].update(accuracy="80.0"), "models[0].accuracy"),
    (lambda d: d.update(machine=None), "machine"),
    (lambda d: d["models"][1].update(label=["a"]), "models[1].label"),
    (lambda d: d["models"][1].update(status="int9"), "models[1].status"),
    (lambda d: d["models"][0]["sidecar"].update(warnings=[{"a": 1}]), "models[0].sidecar.warnings[0]"),
    (lambda d: d["models"][0].update(latency={"x": {}}), "models[0].latency"),
])
def test_bad_results_json_is_one_line_and_nothing_is_written(tmp_path, capsys, change, field):
    write_report(_fake_results(), run_dir=tmp_path)
    raw = json.loads((tmp_path / "results.json").read_text())
    change(raw)
    (tmp_path / "results.json").write_text(json.dumps(raw))
    for name in DERIVED:
        (tmp_path / name).write_text("before")
    rc = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert str(tmp_path / "results.json") in line and field in line
    assert all((tmp_path / name).read_text() == "before" for name in DERIVED)


def test_results_round_trip_still_loads():
    res = _fake_results()
    again = BenchResults.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again.to_dict() == res.to_dict()


def test_figures_show_labels_as_text(tmp_path):
    """matplotlib reads $...$ as math: a label from a file must not break (or format) the figures."""
    res = _fake_results()
    res.models[1].label = r"int8 $\frac{bad$ label"
    write_report(res, run_dir=tmp_path)
    assert (tmp_path / "size.png").read_bytes()[:4] == b"\x89PNG"


def _paired_results(n=2000, lost=3, gained=1, eval_samples=2000, test_images=10000):
    """fp32 and one int8 row on the same n images: `lost` only fp32 gets right, `gained` only int8."""
    from quantbench.results import correct_bits
    fp = [i < int(0.9 * n) for i in range(n)]
    q = list(fp)
    for i in range(lost):
        q[i] = False
    for i in range(gained):
        q[n - 1 - i] = True
    res = _fake_results()
    for m, c in zip(res.models, (fp, q)):
        m.accuracy, m.accuracy_n, m.correct = 100.0 * sum(c) / n, n, correct_bits(c)
    res.models = derive(res.models, predictions={"origin": [0] * n, "ptq-s": [0] * (n - 5) + [1] * 5})
    res.config.update(eval_samples=eval_samples, test_images=test_images, eval_seed=0, max_drop=0.3)
    return res


def test_the_report_shows_each_delta_with_its_interval_agreement_and_images():
    res = _paired_results()
    q = res.models[1]
    lo, hi = q.accuracy_delta_ci
    assert lo < q.accuracy_delta < hi and q.accuracy_delta == pytest.approx(-0.1)
    assert q.agreement == pytest.approx(99.75)
    text = render(res)
    assert "top-1 on 2000 of the 10000 test images, a seeded subset (--eval-samples 2000, seed 0)" in text
    assert "95 % interval" in text
    head, rows = _cells(detail_table(res))
    row = dict(zip(head, rows[1]))
    assert row["Acc. delta [95 % interval]"] == f"-0.10 [{lo:+.2f}, {hi:+.2f}]"
    assert row["Agreement"] == "99.75%" and row["Images"] == "2000"
    [line] = recommendation_lines(res)
    assert f"-0.10 [{lo:+.2f}, {hi:+.2f}] point vs fp32 on 2000 images" in line
    assert "not distinguishable from fp32" in line
    from quantbench.report import to_csv
    csv_head, _, csv_row = (x.split(",") for x in to_csv(res).splitlines())
    row = dict(zip(csv_head, csv_row))
    assert float(row["accuracy_delta_low"]) == lo and row["accuracy_n"] == "2000" and row["paired_n"] == "2000"


def test_rows_whose_predictions_were_kept_from_before_are_named():
    res = _paired_results()
    assert "kept from an earlier measurement" not in render(res)
    res.config["accuracy_reused"] = {res.models[0].label: "/cache/predictions/x.json"}
    assert f"Predictions of {res.models[0].label} were kept from an earlier measurement" in render(res)


def test_a_real_drop_is_not_called_a_tie_and_all_images_are_said():
    res = _paired_results(lost=60, gained=0, eval_samples=None, test_images=2000)
    text = render(res)
    assert "top-1 on all 2000 test images" in text
    assert "ship the fp32 model" in text  # -3 points: nothing qualifies
    res = _paired_results(lost=2, gained=0, eval_samples=None, test_images=2000)  # 2 lost: chance, 1 time in 4
    [line] = recommendation_lines(res)
    assert "not distinguishable from fp32" in line


def test_an_old_results_file_renders_without_intervals():
    res = _fake_results()  # no per-image results, as before this version
    text = render(res)
    _, rows = _cells(detail_table(res))
    assert rows[1][2] == "-0.50" and "not distinguishable" not in text


def test_more_images_are_suggested_only_for_a_subset_and_the_fp32_row_is_not_paired_with_itself():
    for total, suggested in ((1000, False), (10000, True)):
        res = _paired_results(n=1000, lost=2, gained=0, eval_samples=1000 if total > 1000 else None,
                              test_images=total)
        [line] = recommendation_lines(res)
        assert "whether it is within --max-drop is not settled" in line
        assert ("more with --eval-samples" in line) is suggested
    fp32 = res.models[0]
    assert fp32.accuracy_delta_ci is None and fp32.agreement is None
    _, rows = _cells(detail_table(res))
    assert rows[0][2] == "+0.00" and rows[0][-2:] == ["", "1000"]


def test_several_thread_settings_are_each_shown_compactly_and_the_figures_still_draw(tmp_path):
    """Timed at batch 1 and 16, 1 thread and all 2 cores: the latency and throughput tables have a
    column per setting, "ship this" a line per setting, the CSV columns per setting; the main table
    and the figures show batch 1 at the first setting."""
    from quantbench.results import ModelResult, OpCounts

    def row(label, dtype, acc, ms):  # ms: {(threads, batch): median}
        def lat(t):
            return {b: LatencyStats.of([m] * 5, batch=b, samples_ms=[m] * 5) for (tt, b), m in ms.items() if tt == t}
        return ModelResult(label=label, file=f"{label}.pt", method="origin" if dtype == "fp32" else "static",
                           flow="fx", runtime="torchscript", dtype=dtype, file_bytes=100, accuracy=acc, accuracy_n=50,
                           threads=1, latency=lat(1), latency_other_threads={2: lat(2)},
                           ops=OpCounts(int8_conv=1) if dtype == "int8" else OpCounts(float_conv=1),
                           status=OpCounts(int8_conv=1).status(dtype))
    res = BenchResults(machine={"cpu": "test", "threads": 1},
                       config={"threads": [1, "all"], "thread_counts": [1, 2], "all_threads": 2, "max_drop": 0.3},
                       created="now", models=derive([
                           row("fp32", "fp32", 80.0, {(1, 1): 36.6, (1, 16): 580.0, (2, 1): 19.0, (2, 16): 300.0}),
                           row("int8", "int8", 79.9, {(1, 1): 3.41, (1, 16): 50.0, (2, 1): 2.0, (2, 16): 26.0})]))
    write_report(res, run_dir=tmp_path)
    assert all((tmp_path / name).is_file() for name in DERIVED)
    text = (tmp_path / "report.md").read_text()
    for words in ("batch 1, 1 thread", "batch 16, 1 thread", "batch 1, all 2 cores", "batch 16, all 2 cores"):
        assert f"- {words}: **int8**" in text
    assert "batch 1, 1 thread in the main table" in text
    tables = text.split("## Latency by setting")[1]
    header, cells = _cells(tables.split("## Throughput")[0])
    assert header == ["Model", "batch 1, 1 thread (ms)", "batch 16, 1 thread (ms)", "batch 1, all 2 cores (ms)",
                      "batch 16, all 2 cores (ms)"]
    assert cells[1] == ["int8", "3.410", "50.000", "2.000", "26.000"]
    header, cells = _cells(tables.split("## Throughput")[1])
    assert header[-1] == "batch 16, all 2 cores (img/s)" and cells[1][-1] == f"{16000 / 26.0:.0f}"
    assert _cells(markdown_table(res))[1][1][3] == "3.41 ms"  # the main table: batch 1, first setting
    csv_head = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "b16_median_ms" in csv_head and "t2_b16_median_ms" in csv_head and "t1_b1_median_ms" not in csv_head
