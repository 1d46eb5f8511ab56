"""Paired accuracy: the interval of a delta, agreement with fp32, what results.json keeps of it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from quantbench.results import (BenchResults, LatencyStats, ModelResult, OpCounts, QuantStatus, ResultsFormatError,
                                bootstrap_interval, correct_bits, decode_correct, derive, mcnemar_interval,
                                paired_delta, paired_interval, recommend)


def test_interval_of_a_known_paired_sample():
    """1000 images: 10 only the int8 model gets right, 30 only fp32 does: delta -2.0 points.
    Its standard error is 100 * sqrt((b + c) / n - (b - c)^2 / n^2) / sqrt(n) = 0.629 points, so
    the bootstrap's interval is about -2.0 -+ 1.23: [-3.23, -0.77]; the exact one, Clopper-Pearson
    on 10 of 40 (scipy.stats.beta: [0.1269, 0.4083]) times 40 / 1000: [-2.985, -0.704]."""
    assert mcnemar_interval(1000, 10, 30) == pytest.approx((-2.9847, -0.7043), abs=1e-3)
    blo, bhi = bootstrap_interval(1000, 10, 30)
    assert -3.45 < blo < -3.0 and -1.0 < bhi < -0.6
    lo, hi = paired_interval(1000, 10, 30)
    assert -3.5 < lo < -2.95 and -1.05 < hi < -0.55
    assert lo < -2.0 < hi and hi < 0  # the drop is real on these images
    # the other way round is the same interval, mirrored
    lo2, hi2 = paired_interval(1000, 30, 10)
    assert lo2 == pytest.approx(-hi, abs=0.15) and hi2 == pytest.approx(-lo, abs=0.15)
    # deterministic: a fixed seed
    assert paired_interval(1000, 10, 30) == (lo, hi)


def test_few_discordant_pairs_all_one_way_are_not_called_a_difference():
    """4 images lost, none gained: a split that chance makes 1 time in 8 (two-sided exact McNemar
    p = 0.125). The bootstrap alone cannot include 0 here; the interval does."""
    assert bootstrap_interval(1000, 0, 4)[1] < 0
    lo, hi = paired_interval(1000, 0, 4)
    assert lo < -0.4 and hi > 0
    assert paired_interval(1000, 0, 0) == (0.0, 0.0)


def test_the_bootstrap_over_counts_is_the_bootstrap_over_images():
    """Resampling the images themselves gives the same interval as the multinomial draw of counts."""
    n, a_only, b_only = 1000, 10, 30
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:a_only] = True            # only A right
    b[a_only:a_only + b_only] = True  # only B right
    a[100:800] = b[100:800] = True    # both right
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(4000):
        i = rng.integers(0, n, n)
        diffs.append(100.0 * (a[i].sum() - b[i].sum()) / n)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    mlo, mhi = bootstrap_interval(n, a_only, b_only)
    assert mlo == pytest.approx(lo, abs=0.15) and mhi == pytest.approx(hi, abs=0.15)


def _row(label, dtype, correct, preds=None, runtime="torchscript", ms=1.0):
    correct = np.asarray(correct, bool)
    return ModelResult(label=label, file=f"{label}.pt", method="origin" if dtype == "fp32" else "static",
                       flow="fx", runtime=runtime, dtype=dtype, file_bytes=100,
                       accuracy=100.0 * correct.mean(), accuracy_n=len(correct), correct=correct_bits(correct),
                       latency={1: LatencyStats.of([ms] * 5)},
                       ops=OpCounts(int8_conv=1) if dtype == "int8" else OpCounts(float_conv=1),
                       status=OpCounts(int8_conv=1).status(dtype))


def test_an_identical_model_has_delta_zero_with_a_zero_width_interval_and_full_agreement():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 10, 500).tolist()
    labels = rng.integers(0, 10, 500).tolist()
    correct = [p == y for p, y in zip(preds, labels)]
    rows = derive([_row("fp32", "fp32", correct), _row("same", "int8", correct)],
                  predictions={"fp32": preds, "same": list(preds)})
    same = rows[1]
    assert same.accuracy_delta == 0 and same.accuracy_delta_ci == [0.0, 0.0]
    assert same.agreement == 100.0 and same.paired_n == 500


def test_derive_pairs_deltas_and_agreement_with_the_same_runtimes_fp32():
    n = 1000
    fp = np.zeros(n, bool)
    fp[:800] = True
    q = fp.copy()
    q[:30] = False     # 30 only fp32 gets right
    q[900:910] = True  # 10 only int8 gets right
    preds_fp = list(range(n))
    preds_q = [p + 1 if i < 30 or 900 <= i < 910 or i == 950 else p for i, p in enumerate(preds_fp)]
    rows = derive([_row("fp32", "fp32", fp), _row("int8", "int8", q)], predictions={"fp32": preds_fp, "int8": preds_q})
    r = rows[1]
    assert r.accuracy_delta == pytest.approx(-2.0)
    assert r.accuracy_delta_ci == list(paired_interval(n, 10, 30))
    assert r.agreement == pytest.approx(100.0 * (n - 41) / n)
    # results.json keeps what pairs them again: the report can pair any two rows
    back = BenchResults.from_dict(BenchResults(machine={}, config={}, created="", models=rows).to_dict())
    assert back.models[1].accuracy_delta_ci == r.accuracy_delta_ci and back.models[1].agreement == r.agreement
    assert paired_delta(back.models[1], back.models[0]).delta == pytest.approx(-2.0)
    assert (decode_correct(back.models[1].correct, n) == q).all()


def test_rows_on_different_images_are_not_paired():
    a, b = _row("fp32", "fp32", [True] * 20), _row("int8", "int8", [True] * 19 + [False] * 2)
    derive([a, b])
    assert b.accuracy_delta is not None and b.accuracy_delta_ci is None and b.paired_n is None


OLD_ROW = {"label": "ptq-s", "file": "m.pt", "method": "static", "flow": "eager", "runtime": "torchscript",
           "dtype": "int8", "file_bytes": 10, "accuracy": 80.0, "accuracy_n": 100, "accuracy_delta": -0.5,
           "latency": {}, "status": "int8"}


def test_old_results_json_without_the_new_fields_still_loads():
    res = BenchResults.from_dict({"machine": {}, "config": {}, "created": "", "models": [OLD_ROW]})
    m = res.models[0]
    assert m.accuracy_delta == -0.5 and m.accuracy_delta_ci is None and m.agreement is None and m.correct is None
    assert res.ship is None


@pytest.mark.parametrize("field,value,says", [
    ("accuracy_delta_ci", [-1.0], "accuracy_delta_ci"),
    ("accuracy_delta_ci", [-1.0, "x"], "accuracy_delta_ci[1]"),
    ("agreement", 101.0, "agreement"),
    ("correct", "not base64!", "correct"),
    ("correct", correct_bits([True] * 8), "correct"),  # 8 images' results, accuracy_n is 100
])
def test_bad_new_fields_are_named(field, value, says):
    with pytest.raises(ResultsFormatError, match=says.replace("[", r"\[").replace("]", r"\]")):
        BenchResults.from_dict({"models": [{**OLD_ROW, field: value}]})


def _ship(rows, max_drop=0.3):
    return recommend(BenchResults(machine={}, config={"max_drop": max_drop}, created="", models=derive(rows)),
                     max_drop=max_drop)


def test_ship_this_says_when_the_pick_is_a_tie_with_fp32_and_with_the_next_candidate():
    n = 2000
    fp = np.zeros(n, bool)
    fp[:1800] = True
    fast = fp.copy()
    fast[:3] = False       # 3 lost, 1 gained: -0.10 points, inside its interval
    fast[1900] = True
    slow = fp.copy()
    slow[1950] = True      # +0.05
    rec = _ship([_row("fp32", "fp32", fp, ms=10.0), _row("fast", "int8", fast, ms=1.0),
                 _row("slow", "int8", slow, ms=2.0)])
    assert rec.label == "fast" and rec.accuracy_n == n
    assert rec.accuracy_delta == pytest.approx(-0.1) and rec.fp32_tie is True
    lo, hi = rec.accuracy_delta_ci
    assert lo < -0.1 < hi
    assert rec.runner_up == "slow" and rec.runner_up_diff == pytest.approx(0.15) and rec.runner_up_tie is True


def test_ship_this_says_when_the_threshold_is_inside_the_interval_and_a_real_difference_is_not_a_tie():
    n = 1000
    fp = np.zeros(n, bool)
    fp[:900] = True
    fast = fp.copy()
    fast[:2] = False   # -0.2: within --max-drop 0.3, but the interval reaches below -0.3
    slow = fp.copy()
    slow[950:990] = True  # +4 points: far more accurate than the pick
    faster_bad = fp.copy()
    faster_bad[:4] = False  # -0.4: left out, yet its interval reaches -0.3
    rec = _ship([_row("fp32", "fp32", fp, ms=10.0), _row("fast", "int8", fast, ms=1.0),
                 _row("slow", "int8", slow, ms=2.0), _row("faster-bad", "int8", faster_bad, ms=0.5)])
    assert rec.label == "fast" and rec.threshold_inside is True
    assert rec.runner_up_tie is False and rec.runner_up_diff == pytest.approx(4.2)
    assert rec.borderline == ["faster-bad"]


def test_a_bf16_row_is_a_candidate_judged_against_its_own_runtimes_fp32():
    """bf16 rows need no calibration: "ship this" weighs them beside the int8 rows, and their
    delta is against the fp32 row of their own runtime."""
    n = 1000
    fp = np.zeros(n, bool)
    fp[:900] = True
    bf16 = fp.copy()
    bf16[0] = False          # -0.1 point
    bad_int8 = fp.copy()
    bad_int8[:30] = False    # -3 points: beyond --max-drop, however fast
    ok_int8 = fp.copy()
    ok_int8[:2] = False      # -0.2 point, slower than the bf16 row
    rows = [_row("ts-fp32", "fp32", fp, ms=10.0), _row("openvino-fp32", "fp32", fp, runtime="openvino", ms=8.0),
            _row("ptq-s", "int8", bad_int8, ms=1.0), _row("openvino-bf16", "bf16", bf16, runtime="openvino", ms=4.0),
            _row("ptq-s-fx", "int8", ok_int8, ms=5.0)]
    rec = _ship(rows)
    assert rec is not None and rec.label == "openvino-bf16" and rec.runtime == "openvino"
    assert rec.accuracy_delta == pytest.approx(-0.1) and rec.accuracy_n == n
    assert rec.runner_up == "ptq-s-fx"
    row = rows[3]
    assert row.baseline == "openvino-fp32" and row.speedup == pytest.approx(2.0)
    assert row.accuracy_delta_ci is not None and row.paired_n == n


def test_a_bf16_row_is_not_called_not_quantized():
    """A bf16 model runs no int8 operator, as it should: its status says bf16, not "not
    quantized" (nor fp32), and results.json keeps it."""
    ops = OpCounts(float_conv=12, float_linear=1)
    assert ops.status("bf16") is QuantStatus.BF16
    assert ops.status("int8") is QuantStatus.NOT_QUANTIZED and ops.status("fp32") is QuantStatus.FLOAT
    row = _row("openvino-bf16", "bf16", [True, False] * 10, runtime="openvino")
    assert row.status is QuantStatus.BF16
    back = BenchResults.from_dict(BenchResults(machine={}, config={}, created="", models=[row]).to_dict())
    assert back.models[0].status is QuantStatus.BF16 and back.models[0].dtype == "bf16"


# ---------------------------------------------------------------- several thread settings
def _stats(ms):
    return {"n": 5, "median_ms": ms, "mean_ms": ms, "min_ms": ms, "p10_ms": ms, "p25_ms": ms, "p75_ms": ms,
            "p90_ms": ms, "p99_ms": ms, "std_ms": 0.0, "iqr_rel": 0.0, "throughput_ips": 1000 / ms}


# results.json as the version before thread settings wrote it: one setting, its number in config
PREVIOUS_VERSION = {
    "machine": {"cpu": "test cpu", "threads": 1}, "created": "2026-11-30T10:00:00+0000",
    "config": {"threads": 1, "batch_sizes": [1, 32], "min_runs": 200, "max_drop": 0.3, "pinned_cpus": [1]},
    "models": [
        {"label": "origin", "file": "origin.pt", "method": "origin", "flow": "eager", "runtime": "torchscript",
         "dtype": "fp32", "file_bytes": 40, "accuracy": 80.0, "accuracy_n": 100, "status": "fp32",
         "latency": {"1": _stats(8.0), "32": _stats(100.0)}},
        {"label": "ptq-s", "file": "ptq-s.pt", "method": "static", "flow": "eager", "runtime": "torchscript",
         "dtype": "int8", "file_bytes": 10, "accuracy": 79.9, "accuracy_n": 100, "accuracy_delta": -0.1,
         "status": "int8", "latency": {"1": _stats(2.0), "32": _stats(30.0)}}],
    "ship": [{"batch": 1, "label": "ptq-s"}, {"batch": 32, "label": "ptq-s"}],
}


def test_results_of_the_previous_version_load_with_their_one_thread_setting():
    from quantbench.report import render, to_csv
    res = BenchResults.from_dict(json.loads(json.dumps(PREVIOUS_VERSION)))
    m = res.by_label()["ptq-s"]
    assert m.threads is None and m.latency_other_threads == {} and m.median_ms(32) == 30.0
    assert res.thread_counts() == [None] and res.settings() == [(None, 1), (None, 32)]
    assert recommend(res, batch=32).label == "ptq-s" and recommend(res, batch=32).threads is None
    assert res.to_dict()["models"][1]["latency"]["32"]["median_ms"] == 30.0
    text = render(res)
    assert "batch 1, 1 thread(s)" in text and "- batch 32: **ptq-s**" in text and "Latency by setting" not in text
    assert to_csv(res).splitlines()[0].endswith("b32_n")


def _threaded(label, dtype, acc, one, two, correct=None):
    return ModelResult(label=label, file=f"{label}.pt", method="origin" if dtype == "fp32" else "static",
                       flow="fx", runtime="torchscript", dtype=dtype, file_bytes=100, accuracy=acc, accuracy_n=100,
                       threads=1, latency={1: LatencyStats.of([one] * 5)},
                       latency_other_threads={4: {1: LatencyStats.of([two] * 5)}},
                       ops=OpCounts(int8_conv=1) if dtype == "int8" else OpCounts(float_conv=1),
                       status=OpCounts(int8_conv=1).status(dtype))


def test_ship_this_is_picked_per_thread_setting():
    res = BenchResults(machine={}, config={"max_drop": 0.3}, created="", models=derive([
        _threaded("fp32", "fp32", 80.0, 10.0, 3.0), _threaded("a", "int8", 80.0, 1.0, 0.9),
        _threaded("b", "int8", 80.0, 1.5, 0.4)]))
    assert res.thread_counts() == [1, 4] and res.settings() == [(1, 1), (4, 1)]
    one, four = recommend(res, threads=1), recommend(res, threads=4)
    assert (one.label, one.threads, one.median_ms) == ("a", 1, 1.0)
    assert (four.label, four.threads, four.median_ms) == ("b", 4, 0.4)
    assert four.speedup_vs_fastest_fp32 == pytest.approx(3.0 / 0.4)  # against fp32 at the same setting
    assert recommend(res).label == "a"  # no threads: the first setting, as before
    assert recommend(res, threads=8) is None  # not timed there
    back = BenchResults.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.by_label()["b"].latency_other_threads[4][1].median_ms == 0.4


@pytest.mark.parametrize("other,says", [
    ({"x": {}}, "thread count 'x'"),
    ({"0": {}}, "thread count '0'"),
    ({"2": []}, r"latency_other_threads\['2'\] must be an object"),
    ({"2": {"1": {**_stats(1.0), "median_ms": -1.0}}}, r"latency_other_threads\['2'\]\['1'\]\.median_ms"),
    ({"2": {"b": _stats(1.0)}}, "batch size 'b'"),
])
def test_bad_other_thread_settings_are_named(other, says):
    with pytest.raises(ResultsFormatError, match=says):
        BenchResults.from_dict({"models": [{**OLD_ROW, "latency_other_threads": other}]})
    with pytest.raises(ResultsFormatError, match="threads"):
        BenchResults.from_dict({"models": [{**OLD_ROW, "threads": 0}]})
    with pytest.raises(ResultsFormatError, match=r"ship\[0\]\.threads"):
        BenchResults.from_dict({"models": [OLD_ROW], "ship": [{"batch": 1, "threads": "all", "label": None}]})
