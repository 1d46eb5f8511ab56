"""Nothing lost, nothing executed, nothing mislabelled: one test per finding of the fault-injection
sweep (the issue's numbering in the test names). Files, locks and archives have their own tests in
test_fileio.py and test_safety.py; these go through the commands a user runs."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from quantbench.cli import main
from quantbench.errors import QuantbenchError


def one_line_error(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("quantbench: error: "), err
    return lines[0]


# ---------------------------------------------------------------- wrong results without a word
@pytest.mark.slow
def test_02_qat_resume_refuses_another_checkpoint_or_flow(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    from conftest import make_checkpoint

    from quantbench.quantize import QuantizeConfig, quantize
    work = tmp_path / "qat-work"
    cfg = QuantizeConfig(method="qat", qat_schedule="smoke", work_dir=work, resume=True)
    quantize(tiny_trained_checkpoint, cfg, tiny_dataset, progress=False)
    other = make_checkpoint(tmp_path / "other.pth", seed=1)
    with pytest.raises(QuantbenchError, match="another source checkpoint") as e:
        quantize(other, cfg, tiny_dataset, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(QuantbenchError, match="another flow: 'eager', not 'fx'"):
        quantize(tiny_trained_checkpoint, cfg.replace(flow="fx"), tiny_dataset, progress=False)
    with pytest.raises(QuantbenchError, match="another quantization configuration"):
        quantize(tiny_trained_checkpoint, cfg.replace(qconfig="seed"), tiny_dataset, progress=False)


def test_03_replicate_resume_remakes_files_made_otherwise(tmp_path):
    from quantbench.deploy import Target
    from quantbench.export import write_sidecar
    from quantbench.quantize import QuantizeConfig
    from quantbench.replicate import _reusable
    f = tmp_path / "ptq-s.pt"
    f.write_bytes(b"x")
    t = Target("eager", "static", QuantizeConfig(method="static", calib_samples=100))
    write_sidecar(f, source_sha256="a" * 64, target=t.identity())
    assert _reusable(t, f, True, "a" * 64)
    assert not _reusable(t, f, False, "a" * 64)  # without --resume nothing is reused
    assert not _reusable(t, f, True, "b" * 64)  # another checkpoint
    other = Target("eager", "static", QuantizeConfig(method="static", calib_samples=200))
    assert not _reusable(other, f, True, "a" * 64)  # another configuration
    write_sidecar(f, source_sha256="a" * 64)  # made before records named their target
    assert not _reusable(t, f, True, "a" * 64)


def test_04_renamed_class_folder_is_refused(tiny_trained_checkpoint, tiny_data_copy, capsys):
    (tiny_data_copy / "test" / "green").rename(tiny_data_copy / "test" / "teal")
    msg = one_line_error(capsys, "eval", tiny_trained_checkpoint, "--data-dir", tiny_data_copy, "--no-progress")
    assert "lacks class 'green'" in msg


def test_05_stale_report_is_detected_and_rebuilt(tmp_path, capsys):
    from test_bench import _fake_results

    from quantbench.report import load_results, stale_report, write_report
    write_report(_fake_results(), run_dir=tmp_path)
    assert not stale_report(tmp_path)
    # killed after results.json was rewritten, before report.md was
    raw = json.loads((tmp_path / "results.json").read_text())
    raw["models"][1]["latency"]["1"]["median_ms"] = 3.25
    (tmp_path / "results.json").write_text(json.dumps(raw))
    assert stale_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert "rebuilt" in capsys.readouterr().err
    assert not stale_report(tmp_path) and "3.25 ms" in (tmp_path / "report.md").read_text()
    assert load_results(tmp_path).by_label()["ptq-s"].median_ms() == 3.25


# ---------------------------------------------------------------- lost work
def test_06_metrics_rewritten_from_the_checkpoint_on_resume(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data-dir", str(tiny_data_dir), "--preset", "smoke", "--arch", "resnet10", "--epochs", "2",
            "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # killed between last.pth and the metrics append, and a torn last line
    (out / "metrics.jsonl").write_text(lines[0] + "\n" + '{"epoch": 2, "train_lo')
    assert main(argv + ["--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_09_unwritable_output_fails_before_measuring(tmp_path, capsys):
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    (tmp_path / "adir").mkdir()
    t = time.perf_counter()
    msg = one_line_error(capsys, "bench", model, "--json", tmp_path / "adir", "--no-progress")
    assert "is a folder" in msg and time.perf_counter() - t < 10
    (tmp_path / "afile").write_text("")
    msg = one_line_error(capsys, "bench", model, "--json", tmp_path / "afile" / "r.json", "--no-progress")
    assert "is a file, not a folder" in msg


def test_10_second_run_into_the_same_folder_is_refused(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom quantbench.fileio import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = one_line_error(capsys, "train", "--data-dir", tiny_data_dir, "--preset", "smoke", "--arch", "resnet10",
                             "--output", out, "--no-progress")
        assert f"pid {holder.pid}" in msg and "in use" in msg
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "last.pth").exists()


# ---------------------------------------------------------------- one line, not a traceback
@pytest.mark.parametrize("extra, expect", [
    (["--batch-size", "0"], "batch size must be at least 2"),
    (["--batch-size", "1"], "batch size must be at least 2"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--preset", "fast", "--epochs", "0"], "epochs must be at least 1"),
    (["--threads", "-1"], "--threads must be at least 1"),
    (["--lr", "nan"], "learning rate"),
])
def test_11_bad_training_options(extra, expect, tiny_data_dir, tmp_path, capsys):
    argv = ["train", "--data-dir", tiny_data_dir, "--preset", "smoke", "--arch", "resnet10", "--output",
            tmp_path / "run", "--no-progress"]
    assert expect in one_line_error(capsys, *argv, *extra)


def test_11_report_on_a_foreign_results_file(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"runs": []}')
    assert "not a quantbench results file" in one_line_error(capsys, "report", tmp_path)


def test_11_not_an_archive_pt2_is_one_quiet_line(tmp_path, tiny_data_dir, capsys):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a zip at all")
    msg = one_line_error(capsys, "eval", bad, "--data-dir", tiny_data_dir, "--no-progress")
    assert "model.pt2" in msg


@pytest.mark.parametrize("extra, expect", [
    (["--runtimes", "bogus"], "unknown runtime 'bogus'"),
    (["--qconfig", "bogus"], "unknown qconfig"),
    (["--qat-schedule", "bogus"], "unknown QAT schedule"),
    (["--calib-samples", "0"], "--calib-samples"),
    (["--flows", "eager,nope"], "unknown flow"),
])
def test_12_replicate_validates_every_option_before_work(extra, expect, tmp_path, capsys):
    # the data folder does not exist: an option error must come first, before any data is read
    msg = one_line_error(capsys, "replicate", "--data-dir", tmp_path / "no-data", "--output", tmp_path / "run",
                         "--no-progress", *extra)
    assert expect in msg
    assert not (tmp_path / "run").exists()

