"""Benchmark: latency statistics, interleaving, the no-op guard, report files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from quantbench import bench as B
from quantbench.cli import parse_batch_sizes, parse_threads
from quantbench.errors import QuantbenchError
from quantbench.export import write_sidecar
from quantbench.report import markdown_table, render, to_csv, write_report
from quantbench.results import BenchResults, LatencyStats, ModelResult, OpCounts, QuantStatus, derive

TESTS = Path(__file__).parent


def test_latency_stats_known_values():
    s = LatencyStats.of([1.0 * i for i in range(1, 101)], batch=4)  # 1..100 ms
    assert s.n == 100
    assert s.median_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90, abs=1)
    assert s.p99_ms == pytest.approx(99, abs=1)
    assert s.min_ms == pytest.approx(1)
    assert s.throughput_ips == pytest.approx(4 * 1000 / 50.5)


def test_parse_options():
    assert parse_threads("all") == (os.cpu_count() or 1)
    assert parse_batch_sizes("1,32,256") == (1, 32, 256)
    with pytest.raises(QuantbenchError):
        parse_threads("zero")
    with pytest.raises(QuantbenchError):
        parse_batch_sizes("1,x")


@pytest.mark.parametrize("bad", [dict(threads=0), dict(processes=0), dict(min_runs=0), dict(timing_s=0),
                                 dict(batch_sizes=()), dict(batch_sizes=(1, 0)), dict(accuracy_batch_size=0)])
def test_bench_config_validates_itself(bad):
    with pytest.raises(QuantbenchError):
        B.BenchConfig(**bad)


class FakeWorker:
    """Stands in for a measuring subprocess: fixed times, and records the order it was asked."""

    def __init__(self, name, ms, log):
        self.name, self.ms, self.log = name, ms, log

    def ask(self, op, batch, n, warmup=0):
        self.log.append(self.name)
        return {"times": [self.ms / 1000] * n}


def test_rounds_are_interleaved_in_rotating_order():
    log: list[str] = []
    workers = {n: FakeWorker(n, ms, log) for n, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0))}
    cfg = B.BenchConfig(min_runs=10_000, timing_s=0.05, round_s=0.01, warmup=0)
    stats = B.measure_latency(workers, cfg, batch=1)
    assert stats["a"].median_ms == pytest.approx(1.0)
    assert stats["c"].median_ms == pytest.approx(3.0)
    rounds = log[3:]  # after one warm-up call each
    firsts = {rounds[i] for i in range(0, 9, 3)}
    assert len(firsts) > 1, "the same model led every round"
    assert set(rounds[:3]) == {"a", "b", "c"}  # every model once per round


def test_slow_calls_warm_up_briefly_and_rounds_shrink_to_fit_the_deadlines():
    # ExecuTorch fp32 at 224x224, batch 16: seconds a call; 20 warm-up calls outlasted the
    # worker's 60 s deadline and stopped a whole replicate run
    asked = []

    class Slow:
        load_timeout_s = 300.0  # the first call at a batch size may compile: it gets loading's deadline

        def ask(self, op, batch, n, warmup=0, timeout_s=None):
            asked.append((n, warmup))
            deadlines.append(timeout_s)
            return {"times": [2.0] * n}

    deadlines = []

    cfg = B.BenchConfig(min_runs=3, timing_s=20.0, round_s=0.5, warmup=20)
    stats = B.measure_latency({"slow": Slow()}, cfg, batch=16)
    assert asked[0] == (1, 0) and deadlines[0] == 300.0  # one call: how long one takes
    assert set(deadlines[1:]) == {None}  # then the usual call deadline
    assert asked[1][1] <= B.WARMUP_S / 2.0  # then a warm-up of about WARMUP_S, not 20 calls
    assert {n for n, _ in asked[2:]} == {1}  # rounds of one call: 5 would take 10 s
    assert sum(n * 2.0 for n, w in asked) + sum(w * 2.0 for n, w in asked) < 60
    assert stats["slow"].median_ms == pytest.approx(2000.0)


SLEEPY = "sleepy=support.sleepy"


def _sleep_model(tmp_path, name, ms, dtype="fp32"):
    path = tmp_path / f"{name}.sleep"
    path.write_text(json.dumps({"ms": ms, "ops": {"int8_conv": 1} if dtype == "int8" else {"float_conv": 1}}))
    write_sidecar(path, label=name, method="origin" if dtype == "fp32" else "static", flow="test",
                  runtime="sleepy", dtype=dtype)
    return path


@pytest.mark.slow
def test_bench_measures_known_sleep_times_in_subprocesses(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # Sleeps of tens of ms: wake-up delays on a busy machine add well under that.
    fast, slow = _sleep_model(tmp_path, "fast", 20, "int8"), _sleep_model(tmp_path, "slow", 60)
    cfg = B.BenchConfig(min_runs=20, timing_s=3.0, round_s=0.1, warmup=2, processes=2, accuracy=False,
                        progress=False)
    res = B.bench([slow, fast], cfg)
    rows = res.by_label()
    assert 20 <= rows["fast"].median_ms() < 30
    assert 60 <= rows["slow"].median_ms() < 72
    medians = rows["fast"].latency[1].process_medians_ms  # one per fresh process
    assert len(medians) == 2 and all(20 <= m < 30 for m in medians)
    assert rows["fast"].speedup == pytest.approx(3, rel=0.2)  # against the fp32 row of its runtime
    assert rows["fast"].baseline == "slow" and rows["fast"].runtime == "sleepy"
    assert rows["fast"].status is QuantStatus.INT8 and rows["slow"].status is QuantStatus.FLOAT
    assert rows["fast"].latency[1].n >= 20
    assert rows["fast"].peak_rss_mb > 0
    assert res.machine["threads"] == 1 and "cpu" in res.machine
    # results.json is the serialized form: it reads back to the same typed results
    again = BenchResults.from_dict(json.loads(json.dumps(res.to_dict(), default=str)))
    assert again.by_label()["fast"].latency[1].median_ms == rows["fast"].median_ms()
    assert again.by_label()["fast"].status is QuantStatus.INT8


def test_median_over_processes_resists_one_slow_process():
    per = [LatencyStats.of([ms] * 50, rounds=3, other_cores=busy, samples_ms=[ms] * 50)
           for ms, busy in ((1.0, 0.0), (1.1, 0.0), (5.0, 0.3))]  # the third process was stuck slow
    s = B.combine_processes(per, batch=1)
    assert s.median_ms == pytest.approx(1.1)
    assert s.process_spread == pytest.approx(4.0 / 1.1)
    assert s.n == 150 and s.processes == 3 and s.other_cores == pytest.approx(0.1)


def test_busy_probe_sees_other_work():
    """A process spinning on a core while we 'time' must show up as other work."""
    import subprocess
    import sys
    import time
    if B.BusyProbe._busy_s() is None:
        pytest.skip("no /proc/stat on this system")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)  # let it start
        probe = B.BusyProbe()
        time.sleep(1.0)
        busy = probe.other_cores()
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and busy > 0.3


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(QuantbenchError, match="not found"):
        B.bench([tmp_path / "nope.pt"], B.BenchConfig(progress=False))


def test_noop_guard_flags_int8_model_without_int8_ops():
    ops = OpCounts(int8_conv=0, float_conv=20, int8_linear=0, float_linear=1)
    assert ops.status("int8") is QuantStatus.NOT_QUANTIZED
    assert ops.status("fp32") is QuantStatus.FLOAT
    ops.int8_linear = 1
    assert ops.status("int8") is QuantStatus.LINEAR_ONLY
    ops.int8_conv = 20
    assert ops.status("int8") is QuantStatus.INT8


def test_noop_guard_on_a_real_model_with_nothing_to_quantize(tmp_path):
    """Dynamic quantization of a conv-only model changes nothing: the guard must say so."""
    from quantbench.export import example_input, export_torchscript
    from quantbench.runtimes import torchscript
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    export_torchscript(q, tmp_path / "noop.pt", example_input((3, 32, 32)))
    ops = torchscript.op_counts(tmp_path / "noop.pt")
    assert ops.float_conv == 1
    assert ops.status("int8") is QuantStatus.NOT_QUANTIZED


def _row(label, runtime, dtype, mib, acc, ms, ops):
    return ModelResult(label=label, file=f"{label}.pt", method="origin" if dtype == "fp32" else "static",
                       flow="eager", runtime=runtime, dtype=dtype, file_bytes=int(mib * 2**20), accuracy=acc,
                       latency={1: LatencyStats.of([ms] * 5, samples_ms=[ms] * 5)}, ops=ops,
                       status=ops.status(dtype))


def _fake_results():
    rows = [_row("origin", "torchscript", "fp32", 4, 80.0, 8.0, OpCounts(0, 20, 0, 1)),
            _row("ptq-s", "torchscript", "int8", 1, 79.5, 2.0, OpCounts(20, 0, 1, 0))]
    return BenchResults(machine={"cpu": "test cpu", "threads": 1}, config={"min_runs": 5, "threads": 1},
                        created="now", models=derive(rows))


def _cells(md):
    lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]


def test_markdown_table_parses_and_has_ratios():
    header, rows = _cells(markdown_table(_fake_results()))
    assert header[:5] == ["Model", "Dtype", "Model Accuracy", "Inference Time", "File Size"]
    assert len(rows) == 2 and all(len(r) == len(header) for r in rows)
    assert rows[1][0] == "ptq-s" and rows[1][3] == "2.00 ms" and rows[1][5] == "4.00x" and rows[1][6] == "0.25x"
    # the original's format keeps its column name, and says what it measures
    seed = markdown_table(_fake_results(), seed_format=True)
    assert _cells(seed)[0][4] == "Parameter Size¹" and "¹ The deployment file's size" in seed


def test_no_same_runtime_fp32_row_leaves_the_ratio_empty():
    """A speed-up against another runtime's fp32 row would mix two effects: leave it empty."""
    rows = derive([_row("origin", "torchscript", "fp32", 4, 80.0, 8.0, OpCounts(0, 20, 0, 1)),
                   _row("ov-int8", "openvino", "int8", 1, 79.5, 1.0, OpCounts(20, 0, 1, 0))])
    assert rows[1].baseline is None and rows[1].speedup is None and rows[1].accuracy_delta is None
    assert rows[1].speedup_vs_fastest_fp32 == pytest.approx(8.0)  # that column names its reference
    res = BenchResults(machine={}, config={}, created="now", models=rows)
    header, cells = _cells(markdown_table(res))
    assert cells[1][5] == "" and "no fp32 row of the same runtime" in markdown_table(res)
    assert "against origin" in render(res)


def test_report_files_written_atomically_and_parse(tmp_path):
    res = _fake_results()
    write_report(res, run_dir=tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["models"][1]["label"] == "ptq-s"
    assert "ptq-s" in (tmp_path / "report.md").read_text()
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("label,") and len(csv_lines) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind
    assert "b1_median_ms" in to_csv(res) and "Details" in render(res)
    assert "other work" not in render(res)
    for png in ("accuracy_vs_latency.png", "size.png", "latency_distribution.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in (tmp_path / "report.md").read_text()


def test_report_warns_when_the_machine_was_busy():
    res = _fake_results()
    res.models[0].latency[1].other_cores = 0.9
    assert "other work used 0.90 of the machine's cores" in render(res)


def test_pareto_front():
    from quantbench.plots import pareto_front
    pts = [(8.0, 82.9, "fp32"), (2.0, 82.8, "int8"), (3.0, 82.0, "worse"), (1.5, 80.0, "fastest")]
    assert [p[2] for p in pareto_front(pts)] == ["fastest", "int8", "fp32"]


@pytest.mark.slow
def test_bench_cli_latency_only(tmp_path, monkeypatch, capsys):
    """`quantbench bench --no-accuracy` needs no test data and still writes every figure."""
    from quantbench.cli import main
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    model = _sleep_model(tmp_path, "m", 5)
    out = tmp_path / "r.json"
    rc = main(["bench", str(model), "--no-accuracy", "--processes", "1", "--min-runs", "5", "--timing-seconds", "1",
               "--json", str(out), "--no-progress"])
    assert rc == 0
    row = json.loads(out.read_text())["models"][0]
    assert row.get("accuracy") is None and row["latency"]["1"]["median_ms"] >= 5
    assert "| m |" in capsys.readouterr().out


def test_recommendation_is_the_fastest_int8_within_budget():
    from quantbench.results import recommend
    rows = derive([_row("origin", "torchscript", "fp32", 4, 80.0, 8.0, OpCounts(0, 20, 0, 1)),
                   _row("ptq-s", "torchscript", "int8", 1, 79.8, 2.0, OpCounts(20, 0, 1, 0)),
                   _row("fast-bad", "torchscript", "int8", 1, 79.0, 1.0, OpCounts(20, 0, 1, 0)),
                   _row("noop", "torchscript", "int8", 4, 80.0, 0.5, OpCounts(0, 20, 0, 1))])
    res = BenchResults(machine={}, config={}, created="now", models=rows)
    rec = recommend(res, max_drop=0.3)
    assert rec.label == "ptq-s" and rec.accuracy_delta == pytest.approx(-0.2)  # fast-bad loses 1 point
    assert rec.speedup_vs_fastest_fp32 == pytest.approx(4.0)                    # noop is NOT QUANTIZED
    assert recommend(res, max_drop=1.5).label == "fast-bad"
    assert recommend(res, max_drop=0.1) is None
    text = render(res)
    assert "## Ship this" in text and "**ptq-s**" in text and 'torch.jit.load("ptq-s.pt")' in text


@pytest.mark.slow
def test_measuring_processes_are_pinned_to_one_core(tmp_path, monkeypatch):
    from quantbench.worker import Worker
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this system")
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    core = B.pinned_cpus(1)
    assert core is not None and len(core) == 1
    w = Worker(_sleep_model(tmp_path, "m", 1), 1, (3, 32, 32), core)
    try:
        assert os.sched_getaffinity(w.proc.pid) == core
    finally:
        w.kill()


def test_dtype_cell_says_which_layers_are_int8():
    """Dynamic quantization of a CNN changes its fc only; of a transformer, every Linear: the
    table says which, from the counted operators."""
    from quantbench.report import dtype_cell
    from quantbench.results import ModelResult, OpCounts

    def row(ops):
        return ModelResult(label="ptq-d", file="x.pt", method="dynamic", flow="eager", runtime="torchscript",
                           dtype="int8", file_bytes=1, ops=ops, status=ops.status("int8"))
    assert dtype_cell(row(OpCounts(int8_linear=1, float_conv=20))) == "int8 (fc only)"
    assert dtype_cell(row(OpCounts(int8_linear=25, float_conv=1))) == "int8 (linear only: 25 of 25)"
    assert dtype_cell(row(OpCounts(int8_linear=13, float_linear=12, float_conv=1))) == "int8 (linear only: 13 of 25)"
    assert dtype_cell(row(OpCounts(int8_linear=1, float_linear=24, float_conv=1))) == "int8 (linear only: 1 of 25)"
    assert dtype_cell(row(OpCounts(int8_conv=20, int8_linear=1))) == "int8"
    assert dtype_cell(row(OpCounts(float_conv=20, float_linear=1))) == "**fp32 (NOT QUANTIZED)**"


class _ColourWorker:
    """Stands in for the measuring subprocess: timing answers at once, and the accuracy pass is the
    worker's own (worker._run), in this process, on a model that names the tiny images' dominant
    colour, pushed toward class 0 by the file's "bias". Logs each op and what the model saw."""
    log: list = []
    seen: dict = {}

    def __init__(self, path, threads, input_shape, cpus=None, **kw):
        self.path, self.load_s, self.model_rss_mb = Path(path), 0.1, 1.0
        bias = json.loads(self.path.read_text())["bias"]
        seen = type(self).seen.setdefault(self.path.stem, [])

        def model(x):
            seen.append(len(x))
            logits = x.mean((2, 3))[:, [2, 1, 0]].clone()  # TINY_CLASSES: blue, green, red
            logits[:, 0] += bias
            return logits
        self.model = model
        type(self).log.append((self.path.stem, "start", None))

    def ask(self, op, timeout_s=None, **cmd):
        from quantbench import worker
        if op == "time":
            return {"times": [0.001] * cmd["n"], "cpu_s": 0.0}
        if op == "ops":
            return {"ops": {"int8_conv": 1} if "int8" in self.path.stem else {"float_conv": 1}}
        out = worker._run(op, {"op": op, **cmd}, self.model, None, self.path, (3, 32, 32), None)
        type(self).log.append((self.path.stem, op, out.get("indices")))
        return out

    def close(self):
        return {"peak_rss_mb": 2.0}

    def kill(self):
        pass


def _colour_model(tmp_path, name, bias, dtype):
    from conftest import TINY_CLASSES
    path = tmp_path / f"{name}.sleep"
    path.write_text(json.dumps({"ms": 0, "bias": bias}))
    write_sidecar(path, label=name, method="origin" if dtype == "fp32" else "static", flow="test", runtime="sleepy",
                  dtype=dtype, classes=list(TINY_CLASSES), input_shape=[3, 32, 32])
    return path


def test_the_fp32_pass_runs_once_and_every_row_is_paired_on_the_same_eval_samples(tmp_path, monkeypatch,
                                                                                   tiny_data_dir):
    """--eval-samples 20 of the 24 tiny test images: each file is evaluated once (fp32 included,
    though 3 int8 rows are compared with it and there are 2 processes), on exactly those 20
    images, the same for every row; the deltas are paired, with intervals and agreement."""
    from quantbench.data import DataSource
    from quantbench.evaluate import eval_subset
    from quantbench.report import render
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    monkeypatch.setattr(B, "Worker", _ColourWorker)
    _ColourWorker.log, _ColourWorker.seen = [], {}
    files = [_colour_model(tmp_path, "fp32", 0.0, "fp32"), _colour_model(tmp_path, "int8-same", 0.0, "int8"),
             _colour_model(tmp_path, "int8-blue", 100.0, "int8"), _colour_model(tmp_path, "int8-b", 0.0, "int8")]
    cfg = B.BenchConfig(data=DataSource(tiny_data_dir), eval_samples=20, processes=2, min_runs=2, round_s=0.01,
                        warmup=0, pin=False, progress=False)
    res = B.bench(files, cfg)
    passes = [(name, idx) for name, op, idx in _ColourWorker.log if op == "accuracy"]
    assert sorted(name for name, _ in passes) == sorted(f.stem for f in files)  # once each: fp32 once
    assert all(sum(_ColourWorker.seen[f.stem]) == 20 for f in files)  # the model saw those 20 images, no more
    assert all(idx == eval_subset(24, 20) for _, idx in passes) and len(passes[0][1]) == 20
    rows = res.by_label()
    assert all(r.accuracy_n == 20 for r in rows.values())
    assert res.config["eval_samples"] == 20 and res.config["test_images"] == 24
    same, blue = rows["int8-same"], rows["int8-blue"]
    assert same.accuracy_delta == 0 and same.accuracy_delta_ci == [0.0, 0.0] and same.agreement == 100.0
    assert same.paired_n == 20
    # every image called blue: right on the blue ones only
    assert blue.agreement < 50 and blue.accuracy_delta_ci[0] <= blue.accuracy_delta <= blue.accuracy_delta_ci[1] < 0
    # results.json keeps it all, and the report says what each figure rests on
    again = BenchResults.from_dict(json.loads(json.dumps(res.to_dict(), default=str)))
    assert again.by_label()["int8-blue"].accuracy_delta_ci == blue.accuracy_delta_ci
    assert again.ship and again.ship[0]["label"] == "int8-same" and again.ship[0]["fp32_tie"] is True
    text = render(again)
    assert "20 of the 24 test images" in text and "+0.00 [+0.00, +0.00]" in text
    lo, hi = blue.accuracy_delta_ci
    assert f"{blue.accuracy_delta:+.2f} [{lo:+.2f}, {hi:+.2f}]" in text


def test_eval_samples_is_an_option_of_bench_replicate_and_eval(tmp_path, tiny_data_dir, tiny_checkpoint, capsys):
    from quantbench.cli import _bench_config, build_parser, main
    _, subs = build_parser()
    for cmd, extra in (("bench", ["m.pt"]), ("replicate", [])):
        args = subs[cmd].parse_args(extra + ["--eval-samples", "20"])
        args.bench_threads = getattr(args, "bench_threads", "1")
        assert _bench_config(args).eval_samples == 20
    with pytest.raises(QuantbenchError, match="--eval-samples"):
        B.BenchConfig(eval_samples=0)
    assert main(["eval", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), "--eval-samples", "20",
                 "--no-progress"]) == 0
    assert "on 20 of 24 (a seeded subset) test images" in capsys.readouterr().out


@pytest.mark.slow
def test_real_workers_pair_every_row_on_the_eval_samples(tiny_trained_checkpoint, tiny_data_dir, tmp_path):
    """Through the measuring subprocesses (replicate: fp32 and static int8 TorchScript files):
    --eval-samples 20 of the 24 images, every row paired with its fp32 row, all in results.json."""
    from quantbench.data import DataSource
    from quantbench.quantize import QuantizeConfig
    from quantbench.replicate import ReplicateConfig, replicate
    from quantbench.report import load_results
    cfg = ReplicateConfig(output=tmp_path / "run", data=DataSource(tiny_data_dir), checkpoint=tiny_trained_checkpoint,
                          methods=("static",), runtimes=(), quantize=QuantizeConfig(method="static", calib_samples=16),
                          bench=B.BenchConfig(min_runs=3, timing_s=0.3, processes=1, progress=False, eval_samples=20))
    replicate(cfg, progress=False)
    res = load_results(tmp_path / "run")
    fp32, int8 = res.models
    assert fp32.accuracy_n == int8.accuracy_n == int8.paired_n == 20
    lo, hi = int8.accuracy_delta_ci
    assert lo <= int8.accuracy_delta <= hi and 0 <= int8.agreement <= 100
    assert res.config["test_images"] == 24 and res.ship
    assert "20 of the 24 test images" in (tmp_path / "run" / "report.md").read_text()


# ---------------------------------------------------------------- several thread settings
def test_thread_settings_are_checked_and_all_is_resolved_once(monkeypatch):
    from quantbench.cli import parse_thread_settings
    assert parse_thread_settings("1,all") == (1, "all")
    assert parse_thread_settings("4") == 4 and parse_thread_settings("all") == "all"
    assert parse_thread_settings(None) is None  # not chosen: the input size chooses
    for bad in ("0", "x", ",", "1,two"):
        with pytest.raises(QuantbenchError, match="--bench-threads"):
            parse_thread_settings(bad)
    monkeypatch.setattr(B, "all_threads", lambda: 2)
    assert B.BenchConfig(threads=(1, "all")).thread_counts() == [1, 2]
    assert B.BenchConfig(threads="all").thread_counts() == [2]
    assert B.BenchConfig(threads=4).thread_counts() == [4]  # a single value stays valid
    monkeypatch.setattr(B, "all_threads", lambda: 1)
    assert B.BenchConfig(threads=(1, "all")).thread_counts() == [1]  # one core: one setting
    for bad in ((), ("x",), (1, 0), True, 0, "2"):
        with pytest.raises(QuantbenchError, match="--bench-threads"):
            B.BenchConfig(threads=bad)


def test_timing_defaults_follow_the_input_size():
    """224x224 inputs get batch 1 and 16 at 1 thread and all cores unless the user chose; CIFAR's
    32x32 keeps batch 1 at 1 thread (today's figures); what the user chose is kept."""
    cfg, rec = B.timing_defaults(B.BenchConfig(), [[3, 224, 224], [3, 224, 224]])
    assert cfg.thread_settings() == (1, "all") and cfg.batch_sizes == (1, 16)
    assert rec["large"] is True and rec["input_hw"] == [224, 224] and rec["batch_sizes"] == (1, 16)
    note = B.timing_note(rec, cfg)
    assert "224x224" in note and "batch 1 and 16" in note and "--bench-threads" in note
    cfg, rec = B.timing_defaults(B.BenchConfig(), [[3, 32, 32]])
    assert cfg.threads == 1 and cfg.batch_sizes == (1,) and rec["large"] is False
    assert B.timing_note(rec, cfg) is None  # small inputs: nothing new to say
    cfg, rec = B.timing_defaults(B.BenchConfig(threads=2), [[3, 112, 112]])
    assert cfg.threads == 2 and cfg.batch_sizes == (1, 16) and "threads" not in rec
    cfg, rec = B.timing_defaults(B.BenchConfig(threads=1, batch_sizes=(1,)), [[3, 224, 224]])
    assert rec is None and cfg.batch_sizes == (1,)


class _ThreadWorker(_ColourWorker):
    """A measuring process whose calls take the file's "ms" at 1 thread, divided by threads ** "scales"
    (how well it uses more cores): logs each start with its threads and cores."""
    starts: list = []

    def __init__(self, path, threads, input_shape, cpus=None, **kw):
        super().__init__(path, threads, input_shape, cpus, **kw)
        self.threads, spec = threads, json.loads(Path(path).read_text())
        self.ms = spec["ms"] / threads ** spec.get("scales", 0.0)
        type(self).starts.append((Path(path).stem, threads, None if cpus is None else sorted(cpus)))

    def ask(self, op, timeout_s=None, **cmd):
        if op == "time":
            return {"times": [self.ms / 1000] * cmd["n"], "cpu_s": 0.0}
        if op == "accuracy":
            type(self).log.append((self.path.stem, "accuracy-threads", self.threads))
        return super().ask(op, timeout_s, **cmd)


def _thread_model(tmp_path, name, dtype, ms, scales, shape=(3, 32, 32)):
    from conftest import TINY_CLASSES
    path = tmp_path / f"{name}.sleep"
    path.write_text(json.dumps({"ms": ms, "scales": scales, "bias": 0.0}))
    write_sidecar(path, label=name, method="origin" if dtype == "fp32" else "static", flow="test", runtime="sleepy",
                  dtype=dtype, classes=list(TINY_CLASSES), input_shape=list(shape))
    return path


def test_every_file_is_timed_at_every_thread_setting_with_a_pick_for_each(tmp_path, monkeypatch, tiny_data_dir):
    """--bench-threads 1,all --batch-sizes 1,4: each file in fresh processes per thread count,
    pinned to that many cores, the thread counts rotating from one process round to the next;
    accuracy once per file (at the most threads); one "ship this" per (threads, batch): int8-a is
    the faster on one core, int8-b (which scales) on all of them; results.json keeps it all."""
    from quantbench.data import DataSource
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    monkeypatch.setattr(B, "Worker", _ThreadWorker)
    monkeypatch.setattr(B, "all_threads", lambda: 2)
    monkeypatch.setattr(B, "pinned_cpus", lambda t: set(range(10 - t, 10)))
    _ThreadWorker.log, _ThreadWorker.seen, _ThreadWorker.starts = [], {}, []
    files = [_thread_model(tmp_path, "fp32", "fp32", 8.0, 1.0), _thread_model(tmp_path, "int8-a", "int8", 2.0, 0.0),
             _thread_model(tmp_path, "int8-b", "int8", 3.0, 1.0)]
    cfg = B.BenchConfig(threads=(1, "all"), batch_sizes=(1, 4), data=DataSource(tiny_data_dir), processes=2,
                        min_runs=2, round_s=0.01, warmup=0, progress=False)
    res = B.bench(files, cfg)
    starts = _ThreadWorker.starts
    assert len(starts) == 3 * 2 * 2  # files x processes x thread counts, each process fresh
    assert [t for _, t, _ in starts] == [1] * 3 + [2] * 3 + [2] * 3 + [1] * 3  # rotating order
    assert {t: c for _, t, c in starts} == {1: [9], 2: [8, 9]}  # pinned to that many cores
    accuracy = [(name, t) for name, op, t in _ThreadWorker.log if op == "accuracy-threads"]
    assert sorted(accuracy) == [("fp32", 2), ("int8-a", 2), ("int8-b", 2)]  # once each
    rows = res.by_label()
    b = rows["int8-b"]
    assert b.threads == 1 and set(b.latency) == {1, 4} and set(b.latency_other_threads) == {2}
    assert b.median_ms(1) == pytest.approx(3.0) and b.median_ms(4, threads=2) == pytest.approx(1.5)
    assert b.latency_other_threads[2][1].process_medians_ms == [pytest.approx(1.5)] * 2
    assert res.settings() == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert [(s["threads"], s["batch"], s["label"]) for s in res.ship] == [
        (1, 1, "int8-a"), (1, 4, "int8-a"), (2, 1, "int8-b"), (2, 4, "int8-b")]
    assert res.config["thread_counts"] == [1, 2] and res.config["all_threads"] == 2
    assert res.config["timing_defaults"] is None and res.machine["threads"] == 1
    again = BenchResults.from_dict(json.loads(json.dumps(res.to_dict(), default=str)))
    assert again.to_dict() == BenchResults.from_dict(json.loads(json.dumps(again.to_dict(), default=str))).to_dict()
    assert again.by_label()["int8-b"].median_ms(4, threads=2) == pytest.approx(1.5)
    assert again.ship == json.loads(json.dumps(res.ship))
    text = render(again)
    assert "- batch 1, 1 thread: **int8-a**" in text and "- batch 4, all 2 cores: **int8-b**" in text
    assert "## Latency by setting" in text and "batch 4, all 2 cores (img/s)" in text
    assert "t2_b4_median_ms" in to_csv(again).splitlines()[0]


def test_large_inputs_get_their_timing_defaults_said_once_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    monkeypatch.setattr(B, "Worker", _ThreadWorker)
    monkeypatch.setattr(B, "all_threads", lambda: 2)
    _ThreadWorker.starts = []
    cfg = B.BenchConfig(min_runs=2, round_s=0.01, warmup=0, processes=1, accuracy=False, pin=False, progress=False)
    big = [_thread_model(tmp_path, n, d, 2.0, 1.0, (3, 224, 224)) for n, d in (("fp32", "fp32"), ("int8", "int8"))]
    res = B.bench(big, cfg)
    err = capsys.readouterr().err
    assert err.count("inputs of 224x224: timing batch 1 and 16 at 1 thread and all 2 cores") == 1
    assert res.config["timing_defaults"]["large"] is True and res.config["threads"] == (1, "all")
    assert res.settings() == [(1, 1), (1, 16), (2, 1), (2, 16)] and len(res.ship) == 4
    small = [_thread_model(tmp_path, "small", "fp32", 2.0, 1.0)]
    res = B.bench(small, cfg)
    assert "timing" not in capsys.readouterr().err
    assert res.config["threads"] == 1 and res.config["batch_sizes"] == (1,) and res.settings() == [(1, 1)]
    assert res.config["timing_defaults"]["large"] is False
