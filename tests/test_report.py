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
