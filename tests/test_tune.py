"""quantbench tune: respects the budget on validation data (never the test split), writes every
trial as it finishes, survives kill -9 and resumes, and delivers the most accurate and the
fastest trial when the budget cannot be met."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_image_folder
from quantbench.cli import main
from quantbench.errors import QuantbenchError

# Only the FX flow and no other runtime: each trial is a few seconds on the tiny model.
FAST = ["--flows", "fx", "--runtimes", "none", "--val-samples", "30", "--calib-samples", "32",
        "--timing", "0.4", "--no-progress"]


@pytest.fixture(scope="module")
def tune_data(tmp_path_factory) -> Path:
    """A tiny ImageFolder with enough training images for a validation split and calibration."""
    return write_tiny_image_folder(tmp_path_factory.mktemp("tune") / "data", train_per_class=24, test_per_class=6)


def _trials(out: Path) -> list[dict]:
    lines = (out / "tune.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip() and json.loads(x).get("type") == "trial"]


def test_tune_picks_within_budget_judged_on_validation_images(tiny_trained_checkpoint, tune_data, tmp_path,
                                                              monkeypatch):
    import quantbench.evaluate as evaluate
    seen = []
    real = evaluate.accuracy

    def spy(model, data, *a, **k):
        seen.append(data.info.get("validation"))
        return real(model, data, *a, **k)

    monkeypatch.setattr(evaluate, "accuracy", spy)
    out = tmp_path / "tune"
    rc = main(["tune", str(tiny_trained_checkpoint), "--data-dir", str(tune_data), "--output", str(out),
               "--max-drop", "100", *FAST])
    assert rc == 0
    trials = _trials(out)
    keys = [t["key"] for t in trials]
    # the first int8 file is the latency anchor; the fp32 reference is measured on its scale
    assert keys[0] == "fx static" and trials[0]["anchor"] and trials[0]["ratio"] == 1.0
    assert "torchscript origin" in keys and not any(t["anchor"] for t in trials[1:])
    summary = json.loads((out / "tune.json").read_text())
    pick = summary["pick"]
    assert summary["within_budget"] and not pick["reference"] and pick["drop"] <= 100
    # the pick is the fastest int8 trial within the budget (by the ratio to the shared reference)
    within = [t for t in trials if t["within_budget"]]
    assert pick["ratio"] == min(t["ratio"] for t in within)
    assert (out / "best.pt").is_file() and (out / "best.pt.json").is_file()
    assert json.loads((out / "best.json").read_text())["key"] == pick["key"]
    # every trial was judged on validation images; only the final report touched the test split
    n_final = 2  # the pick and the fp32 reference, once each
    assert all(v is not None and v["from"] == "train" for v in seen[:-n_final])
    assert all(v is None for v in seen[-n_final:])
    assert "Picked fx static int8" in summary["sentence"] and "test split" in summary["sentence"]
    assert summary["sentence"] in (out / "tune.md").read_text()


def test_tune_survives_kill_9_resumes_and_delivers_when_the_budget_is_impossible(tiny_trained_checkpoint,
                                                                                 tune_data, tmp_path):
    out = tmp_path / "tune"
    # max-drop -50: no trial can be within budget, so the search runs every stage
    args = ["tune", str(tiny_trained_checkpoint), "--data-dir", str(tune_data), "--output", str(out),
            "--max-drop", "-50", "--max-fallback", "1", *FAST]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "quantbench", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "tune.jsonl").is_file() and len(_trials(out)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = _trials(out)
    assert len(before) >= 3
    # the best file so far is already there, complete and named by best.json
    best = json.loads((out / "best.json").read_text())
    assert (out / best["file"]).is_file() and best["within_budget"] is False

    rc = main([*args, "--resume"])
    assert rc == 3  # "budget not met" is the exit status, after delivering files
    after = _trials(out)
    keys = [t["key"] for t in after]
    assert len(keys) == len(set(keys)), "a trial was run twice"
    assert after[:len(before)] == before, "trials done before the kill were not kept as they were"
    # every stage ran: default, fp32 reference, 5 calibration choices (equalization included), 1 fallback set
    assert len(after) == 8 and any("fp32[1]=" in k for k in keys)
    assert any("observer=minmax" in k for k in keys) and any("equalize=True" in k for k in keys)
    summary = json.loads((out / "tune.json").read_text())
    assert summary["within_budget"] is False
    done = [t for t in after if t["error"] is None and not t["reference"]]
    assert summary["pick"]["val_acc"] == max(t["val_acc"] for t in done)       # best.* = most accurate
    assert summary["fastest"]["ratio"] == min(t["ratio"] for t in done)        # fastest.* = fastest
    assert (out / Path(summary["fastest_file"]).name).is_file()
    assert "No int8 trial stayed within -50.0 point" in (out / "tune.md").read_text()


def test_tune_options_fail_in_one_line(tiny_trained_checkpoint, tmp_path):
    from quantbench.tune import TuneConfig, parse_duration
    assert parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400 and parse_duration("90") == 90
    with pytest.raises(QuantbenchError, match="--time-budget"):
        parse_duration("soon")
    with pytest.raises(QuantbenchError, match="objective"):
        TuneConfig(checkpoint=tiny_trained_checkpoint, objective="speed")
    with pytest.raises(QuantbenchError, match="unknown flow"):
        TuneConfig(checkpoint=tiny_trained_checkpoint, flows=("fx", "tflite"))
    with pytest.raises(QuantbenchError, match="no sensitivity file"):
        TuneConfig(checkpoint=tiny_trained_checkpoint, sensitivity=tmp_path / "missing.json")


def test_report_includes_tune_and_sensitivity_when_present(tmp_path):
    """`report` on a run directory where tune and sensitivity wrote their files shows both."""
    from test_bench import _fake_results

    from quantbench.report import write_report
    (tmp_path / "tune.json").write_text(json.dumps({"sentence": "Picked fx static int8: the fastest of 2."}))
    (tmp_path / "sensitivity.json").write_text(json.dumps({
        "flow": "fx", "val_samples": 100, "fp32_acc": 90.0, "int8_acc": 88.0,
        "layers": [{"layer": "fc", "drop": 0.1, "gain": 0.2, "sqnr_db": 30.0},
                   {"layer": "conv1", "drop": 1.5, "gain": 1.0, "sqnr_db": 12.0}]}))
    write_report(_fake_results(), run_dir=tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Tune" in report and "Picked fx static int8: the fastest of 2." in report
    sens = report[report.index("## Layer sensitivity"):]
    assert sens.index("| conv1 |") < sens.index("| fc |")  # the layer that hurts most first
