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

pytestmark = pytest.mark.slow  # every test here exports through a runtime or waits on subprocesses

# Only the FX flow and no other runtime: each trial is a few seconds on the tiny model.
FAST = ["--flows", "fx", "--runtimes", "none", "--val-samples", "30", "--calib-samples", "32",
        "--timing-seconds", "0.4", "--no-progress"]


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
    with pytest.raises(QuantbenchError, match="--time-limit"):
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


# ---------------------------------------------------------------- never lose or mix the user's files (issue 21)
def test_tune_never_deletes_its_input(tiny_trained_checkpoint, tune_data, tmp_path, capsys):
    """Item 2: `tune runs/x/best.pth --output runs/x` used to delete the checkpoint it was asked to tune."""
    import shutil
    run = tmp_path / "x"
    run.mkdir()
    ckpt = run / "best.pth"
    shutil.copy(tiny_trained_checkpoint, ckpt)
    (run / "best.json").write_text('{"mine": true}')
    before = ckpt.read_bytes()
    rc = main(["tune", str(ckpt), "--data-dir", str(tune_data), "--output", str(run), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "holds best.pth, an input of this search" in err
    assert ckpt.read_bytes() == before and json.loads((run / "best.json").read_text()) == {"mine": True}
    # a folder holding best.* files no tune made is refused too
    other = tmp_path / "y"
    other.mkdir()
    (other / "best.onnx").write_bytes(b"mine")
    rc = main(["tune", str(tiny_trained_checkpoint), "--data-dir", str(tune_data), "--output", str(other), *FAST])
    assert rc == 2 and "which no earlier tune made" in capsys.readouterr().err
    assert (other / "best.onnx").read_bytes() == b"mine"


def test_resume_refuses_other_data_and_retries_passing_failures(tiny_trained_checkpoint, tune_data, tmp_path,
                                                                monkeypatch, capsys):
    """Items 8, 9, 10: a trial that failed for a passing reason (disk full) is made again on
    --resume; --resume with another --data-dir is refused; best.* always agrees with tune.jsonl."""
    import errno

    from quantbench.tune import trials as T
    out = tmp_path / "tune"
    real_make = T.Search.make
    calls = {"n": 0}

    def full_disk_once(self, c, index):
        calls["n"] += 1
        if calls["n"] == 1:
            raise QuantbenchError("no space left") from OSError(errno.ENOSPC, "No space left on device")
        return real_make(self, c, index)

    monkeypatch.setattr(T.Search, "make", full_disk_once)
    args = ["tune", str(tiny_trained_checkpoint), "--data-dir", str(tune_data), "--output", str(out),
            "--max-drop", "100", *FAST]
    assert main(args) == 3  # its only int8 candidate failed: nothing to pick
    first = _trials(out)
    assert first[0]["error"] and first[0]["transient"]
    monkeypatch.setattr(T.Search, "make", real_make)
    assert main(args + ["--resume"]) == 0
    redone = [t for t in _trials(out) if t["key"] == first[0]["key"]]
    assert len(redone) == 2 and redone[-1]["error"] is None  # retried, and it worked this time
    # a kill between a trial's line and the copy of best.*: best.json names another trial, no best file
    (out / "best.json").write_text(json.dumps({"key": "nothing"}))
    for p in out.glob("best.pt*"):
        p.unlink()
    assert main(args + ["--resume"]) == 0
    best = json.loads((out / "best.json").read_text())
    assert (out / best["file"]).is_file() and best["key"] == json.loads((out / "tune.json").read_text())["pick"]["key"]
    # another folder of images: refused, nothing measured against the old fp32 accuracy
    other = write_tiny_image_folder(tmp_path / "other", train_per_class=24, test_per_class=6, seed=1)
    capsys.readouterr()
    rc = main(["tune", str(tiny_trained_checkpoint), "--data-dir", str(other), "--output", str(out),
               "--max-drop", "100", *FAST, "--resume"])
    assert rc == 2 and "belongs to another search (another data)" in capsys.readouterr().err


def test_fallback_refuses_a_ranking_of_another_checkpoint(tiny_trained_checkpoint, tiny_checkpoint, tmp_path):
    """Item 15: --fallback K --sensitivity FILE checks that FILE ranks this checkpoint."""
    from quantbench.fileio import sha256
    from quantbench.sensitivity import most_sensitive
    f = tmp_path / "sensitivity.json"
    rows = [{"layer": "conv1", "gain": 1.0, "drop": 1.0, "sqnr_db": 10.0}]
    f.write_text(json.dumps({"checkpoint": "a.pth", "checkpoint_sha256": sha256(tiny_checkpoint), "layers": rows}))
    assert most_sensitive(f, 1, checkpoint=tiny_checkpoint) == ("conv1",)
    with pytest.raises(QuantbenchError, match="ranks the layers of another checkpoint"):
        most_sensitive(f, 1, checkpoint=tiny_trained_checkpoint)
    f.write_text(json.dumps({"checkpoint": "a.pth", "layers": rows}))  # made before it said which
    with pytest.raises(QuantbenchError, match="does not say which checkpoint"):
        most_sensitive(f, 1, checkpoint=tiny_checkpoint)
