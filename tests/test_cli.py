"""The `quantbench` command line, in-process: eval's output and one-line errors on bad input."""
from __future__ import annotations

import re
import shutil
import urllib.error

import pytest
import torch

from quantbench import models
from quantbench.cli import main
from quantbench.errors import QuantbenchError

from conftest import make_checkpoint


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("quantbench: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_eval_prints_top1(capsys, tiny_trained_checkpoint, tiny_data_dir, tiny_dataset):
    from quantbench.evaluate import accuracy
    rc, out, err = run_cli(capsys, "eval", tiny_trained_checkpoint, "--data-dir", tiny_data_dir,
                           "--no-progress", "--batch-size", "7")
    assert rc == 0, err
    m = re.fullmatch(rf"{re.escape(str(tiny_trained_checkpoint))}: top-1 (\d+\.\d\d)% on all 24 test images",
                     out.strip())
    assert m, out
    model, _ = models.load_checkpoint(tiny_trained_checkpoint)
    assert float(m.group(1)) == pytest.approx(accuracy(model, tiny_dataset, progress=False), abs=0.005)


def test_eval_untrained_checkpoint(capsys, tiny_checkpoint, tiny_data_dir):
    rc, out, _ = run_cli(capsys, "eval", tiny_checkpoint, "--data-dir", tiny_data_dir, "--no-progress")
    assert rc == 0 and re.search(r"top-1 \d+\.\d\d%", out)


# ---------------------------------------------------------------- bad input
def test_missing_data_dir(capsys, tiny_checkpoint, tmp_path):
    rc, _, err = run_cli(capsys, "eval", tiny_checkpoint, "--data-dir", tmp_path / "nowhere", "--no-progress")
    assert_one_line_error(rc, err, "data directory not found", str(tmp_path / "nowhere"))


def test_empty_class_folder(capsys, tiny_checkpoint, tiny_data_copy):
    empty = tiny_data_copy / "test" / "green"
    shutil.rmtree(empty)
    empty.mkdir()
    rc, _, err = run_cli(capsys, "eval", tiny_checkpoint, "--data-dir", tiny_data_copy, "--no-progress")
    assert_one_line_error(rc, err, "holds no images", str(empty))


def test_no_train_folder(capsys, tiny_data_copy, tmp_path):
    shutil.rmtree(tiny_data_copy / "train")
    rc, _, err = run_cli(capsys, "train", "--data-dir", tiny_data_copy, "--preset", "smoke", "--arch",
                         "resnet10", "--output", tmp_path / "run", "--no-progress")
    assert_one_line_error(rc, err, "no train/ folder")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("progress", [False, True])
def test_corrupt_image(capsys, tiny_checkpoint, tiny_data_copy, progress):
    bad = tiny_data_copy / "test" / "red" / "003.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # a JPEG header, then nothing
    rc, _, err = run_cli(capsys, "eval", tiny_checkpoint, "--data-dir", tiny_data_copy,
                         *([] if progress else ["--no-progress"]))
    if progress:  # progress bars share stderr: the error must still be a clean last line
        assert rc != 0 and "Traceback" not in err
        err = err.replace("\r", "\n").strip().splitlines()[-1]
    assert_one_line_error(rc, err, "cannot read image", str(bad))


def test_checkpoint_missing(capsys, tiny_data_dir, tmp_path):
    rc, _, err = run_cli(capsys, "eval", tmp_path / "none.pth", "--data-dir", tiny_data_dir, "--no-progress")
    assert_one_line_error(rc, err, "checkpoint not found")


def test_checkpoint_truncated(capsys, tiny_checkpoint, tiny_data_dir, tmp_path):
    half = tmp_path / "half.pth"
    raw = tiny_checkpoint.read_bytes()
    half.write_bytes(raw[: len(raw) // 2])
    rc, _, err = run_cli(capsys, "eval", half, "--data-dir", tiny_data_dir, "--no-progress")
    assert_one_line_error(rc, err, "truncated", str(half))


def test_checkpoint_of_another_architecture(capsys, tiny_checkpoint, tiny_data_dir, tmp_path):
    # A bare resnet10 state dict: without meta, eval assumes resnet18.
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(tiny_checkpoint, weights_only=True)["state_dict"], bare)
    rc, _, err = run_cli(capsys, "eval", bare, "--data-dir", tiny_data_dir, "--no-progress")
    assert_one_line_error(rc, err, "does not fit resnet18")
    # resnet18 weights labelled resnet10.
    mislabelled = make_checkpoint(tmp_path / "r18.pth", arch="resnet18")
    blob = torch.load(mislabelled, weights_only=True)
    blob["meta"]["arch"] = "resnet10"
    torch.save(blob, mislabelled)
    rc, _, err = run_cli(capsys, "eval", mislabelled, "--data-dir", tiny_data_dir, "--no-progress")
    assert_one_line_error(rc, err, "does not fit resnet10")


def test_checkpoint_class_count_mismatch(capsys, tiny_data_dir, tmp_path):
    five = make_checkpoint(tmp_path / "five.pth", num_classes=5)
    rc, _, err = run_cli(capsys, "eval", five, "--data-dir", tiny_data_dir, "--no-progress")
    assert_one_line_error(rc, err, "5 output classes but the data has 3")


def test_unknown_preset_and_arch(capsys, tiny_data_dir, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--data-dir", tiny_data_dir, "--preset", "turbo",
                         "--output", tmp_path / "a", "--no-progress")
    assert_one_line_error(rc, err, "unknown preset 'turbo'", "smoke")
    rc, _, err = run_cli(capsys, "train", "--data-dir", tiny_data_dir, "--preset", "smoke", "--arch", "vgg",
                         "--output", tmp_path / "b", "--no-progress")
    assert_one_line_error(rc, err, "unknown architecture 'vgg'", "resnet10")


def test_bad_timing_options(capsys, tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    rc, _, err = run_cli(capsys, "bench", model, "--processes", "0", "--no-progress")
    assert_one_line_error(rc, err, "--processes")
    rc, _, err = run_cli(capsys, "bench", model, "--batch-sizes", "1,x", "--no-progress")
    assert_one_line_error(rc, err, "--batch-sizes")
    rc, _, err = run_cli(capsys, "profile", tmp_path / "m.txt")
    assert_one_line_error(rc, err, "model file not found")
    (tmp_path / "m.txt").write_text("x")
    rc, _, err = run_cli(capsys, "profile", tmp_path / "m.txt")
    assert_one_line_error(rc, err, "don't know how to run m.txt", ".onnx")


def test_cifar10_offline(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    rc, _, err = run_cli(capsys, "eval", tiny_checkpoint, "--data-root", tmp_path, "--no-progress")
    assert_one_line_error(rc, err, "--data-dir", "could not download CIFAR-10")


def test_resume_from_unreadable_last(capsys, tiny_data_dir, tmp_path):
    (tmp_path / "last.pth").write_bytes(b"\0" * 100)
    rc, _, err = run_cli(capsys, "train", "--data-dir", tiny_data_dir, "--preset", "smoke", "--arch",
                         "resnet10", "--output", tmp_path, "--resume", "--no-progress")
    assert_one_line_error(rc, err, "cannot resume")


def test_resume_with_another_arch(capsys, tiny_data_dir, tiny_train_run, tmp_path):
    shutil.copy(tiny_train_run / "last.pth", tmp_path / "last.pth")
    rc, _, err = run_cli(capsys, "train", "--data-dir", tiny_data_dir, "--preset", "smoke", "--epochs", "2",
                         "--arch", "resnet18", "--output", tmp_path, "--resume", "--no-progress")
    assert_one_line_error(rc, err, "cannot resume", "another architecture: 'resnet10', not 'resnet18'")


def test_debug_raises(capsys, tiny_data_dir, tmp_path):
    with pytest.raises(QuantbenchError, match="checkpoint not found"):
        main(["eval", str(tmp_path / "none.pth"), "--data-dir", str(tiny_data_dir), "--no-progress", "--debug"])


def test_interrupt_is_reported(capsys, tiny_data_dir, tmp_path, monkeypatch):
    import quantbench.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(quantbench.train, "train", interrupted)
    rc, _, err = run_cli(capsys, "train", "--data-dir", tiny_data_dir, "--preset", "smoke",
                         "--output", tmp_path, "--no-progress")
    assert rc == 130 and "--resume" in err and "Traceback" not in err


def test_deprecations_are_summarized_in_one_line():
    import io
    import warnings

    from quantbench.warn import summarized_deprecations
    out = io.StringIO()
    with pytest.warns(UserWarning, match="unrelated"):  # other warnings still reach the user
        with summarized_deprecations(stream=out) as counts:
            for _ in range(50):
                warnings.warn_explicit("torch.ao.quantization is deprecated", DeprecationWarning,
                                       "/x/site-packages/torch/ao/quantization/quantize.py", 1)
            warnings.warn_explicit("The feature will be removed.", DeprecationWarning,
                                   "/x/site-packages/torch/onnx/utils.py", 2)
            warnings.warn("unrelated", UserWarning)
    assert sum(counts.values()) == 51
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1 and "hid 51 deprecation warnings" in lines[0]


def test_a_plugged_in_runtimes_option_reaches_every_command(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    """A runtime added as one module + one registry line (here QUANTBENCH_RUNTIMES) with an option
    of its own: quantize, replicate and tune all offer it, and pass it on in their configs."""
    from pathlib import Path

    from quantbench import cli, replicate, tune
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "sleepy=support.sleepy,fake=support.fakert")
    for command in ("quantize", "replicate", "tune"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "--fake-knob" in out and "how hard the fake runtime tries" in out, command
    seen = {}
    monkeypatch.setattr(replicate, "replicate", lambda cfg, progress=True: seen.setdefault("replicate", cfg) and 1 / 0)
    monkeypatch.setattr(tune, "tune", lambda cfg, progress=True: seen.setdefault("tune", cfg) and 1 / 0)
    ckpt = tiny_checkpoint
    for argv in (["replicate", "--checkpoint", str(ckpt), "--runtimes", "fake", "--fake-knob", "7",
                  "--output", str(tmp_path / "r")],
                 ["tune", str(ckpt), "--runtimes", "fake", "--fake-knob", "7", "--output", str(tmp_path / "t")]):
        with pytest.raises(ZeroDivisionError):
            cli.main(argv)
    assert seen["replicate"].quantize.options["fake"].knob == 7 and seen["replicate"].runtimes == ("fake",)
    assert seen["tune"].quantize.options["fake"].knob == 7
    assert cli.main(["replicate", "--checkpoint", str(ckpt), "--fake-knob", "0", "--output", str(tmp_path / "r")]) == 2
    assert "--fake-knob must be 1 to 9" in capsys.readouterr().err


def test_old_option_names_still_work_with_a_notice(capsys, tmp_path, monkeypatch):
    from quantbench import cli, tune
    seen = {}
    monkeypatch.setattr(tune, "tune", lambda cfg, progress=True: seen.setdefault("tune", cfg) and 1 / 0)
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"x")
    with pytest.raises(ZeroDivisionError):
        cli.main(["tune", str(ckpt), "--time-budget", "30m", "--timing", "2", "--output", str(tmp_path / "t")])
    assert seen["tune"].time_limit_s == 1800 and seen["tune"].timing_s == 2
    err = capsys.readouterr().err
    assert "--time-budget is now --time-limit" in err and "--timing is now --timing-seconds" in err


def test_interrupt_without_resume_does_not_suggest_it(capsys, tmp_path, monkeypatch):
    """bench, eval, sensitivity, profile and report have no --resume: the Ctrl-C line must not name it."""
    import quantbench.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(quantbench.report, "report_runs", interrupted)
    rc, _, err = run_cli(capsys, "report", tmp_path)
    assert rc == 130 and "interrupted" in err and "--resume" not in err and "Traceback" not in err


@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to read data fails the test: the checks under test must come first."""
    from quantbench.data import DataSource

    def read(*args, **kwargs):
        raise AssertionError("data was read before the options were checked")
    monkeypatch.setattr(DataSource, "load", read)
    monkeypatch.setattr(DataSource, "load_for", read)


@pytest.mark.parametrize("spec, message", [
    ("torchvision.models:no_such_builder", "torchvision.models has no function 'no_such_builder'"),
    ("no_such_package_qb:build", "cannot import no_such_package_qb"),
    ("os:getcwd", "os:getcwd cannot be called with the class count"),
])
def test_model_spec_checked_before_data(capsys, tiny_checkpoint, tiny_data_dir, tmp_path, no_data, spec, message):
    for argv in (["train", "--data-dir", tiny_data_dir, "--preset", "smoke", "--output", tmp_path / "t"],
                 ["eval", tiny_checkpoint, "--data-dir", tiny_data_dir],
                 ["quantize", tiny_checkpoint, "--method", "static", "--output", tmp_path / "q.pt",
                  "--data-dir", tiny_data_dir],
                 ["tune", tiny_checkpoint, "--data-dir", tiny_data_dir, "--output", tmp_path / "u"]):
        rc, _, err = run_cli(capsys, *argv, "--model", spec, "--no-progress")
        assert_one_line_error(rc, err, message)


@pytest.mark.slow
def test_torchvision_spec_trains_offline(capsys, tiny_data_dir, tmp_path, monkeypatch):
    """The first spec a user tries builds an untrained torchvision model, no download (issue 18)."""
    import torchvision.models._api

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    rc, out, err = run_cli(capsys, "train", "--data-dir", tiny_data_dir, "--preset", "smoke", "--epochs", "1",
                           "--model", "torchvision.models:resnet18", "--output", tmp_path, "--no-progress")
    assert rc == 0, err
    _, meta = models.read_checkpoint(tmp_path / "best.pth")
    assert meta["model"] == "torchvision.models:resnet18"


def test_model_file_that_exits_at_import(capsys, tiny_data_dir, tmp_path, no_data):
    f = tmp_path / "cli_model.py"
    # a script's own option parsing at import (given an option it does not know, whatever pytest's argv is)
    f.write_text("import argparse\nargparse.ArgumentParser().parse_args(['--not-mine'])\n"
                 "def build(num_classes):\n    pass\n")
    rc, _, err = run_cli(capsys, "train", "--data-dir", tiny_data_dir, "--model", f"{f}:build",
                         "--output", tmp_path / "out", "--no-progress")
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("quantbench: error: the model file ")
    assert "exited (status 2) while it was imported" in err


def test_bench_threads_takes_a_list_and_leaves_unset_timing_to_the_input_size(capsys, tmp_path):
    """--bench-threads 1,all reaches BenchConfig as two settings; without it (and without
    --batch-sizes) both stay unset, for bench.timing_defaults to choose by the files' input size."""
    from quantbench.cli import _bench_config, build_parser
    _, subs = build_parser()
    for cmd, extra in (("bench", ["m.pt"]), ("replicate", [])):
        cfg = _bench_config(subs[cmd].parse_args(extra + ["--bench-threads", "1,all", "--batch-sizes", "1,16"]))
        assert cfg.threads == (1, "all") and cfg.batch_sizes == (1, 16)
        cfg = _bench_config(subs[cmd].parse_args(extra + ["--bench-threads", "2"]))
        assert cfg.threads == 2 and cfg.batch_sizes is None
        cfg = _bench_config(subs[cmd].parse_args(extra))
        assert cfg.threads is None and cfg.batch_sizes is None
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    rc, _, err = run_cli(capsys, "bench", model, "--bench-threads", "1,0", "--no-progress")
    assert_one_line_error(rc, err, "--bench-threads")
    rc, _, err = run_cli(capsys, "bench", model, "--bench-threads", "one", "--no-progress")
    assert_one_line_error(rc, err, "--bench-threads", "'one'")


def test_the_verdict_names_what_ship_this_picks_from(capsys):
    """"Ship this" picks from the int8 and bf16 rows: the verdict printed after bench/replicate
    says so, not "fastest int8", when the pick is a bf16 row."""
    from quantbench.cli import _print_verdict
    from quantbench.results import BenchResults, LatencyStats, ModelResult, OpCounts, derive

    def row(label, dtype, acc, ms):
        return ModelResult(label=label, file=f"{label}.xml", method="origin" if dtype == "fp32" else dtype,
                           flow="openvino", runtime="openvino", dtype=dtype, file_bytes=100, accuracy=acc,
                           accuracy_n=100, threads=1, latency={1: LatencyStats.of([ms] * 5)},
                           ops=OpCounts(float_conv=1), status=OpCounts(float_conv=1).status(dtype))
    res = BenchResults(machine={}, config={"max_drop": 0.3}, created="",
                       models=derive([row("openvino-fp32", "fp32", 80.0, 10.0), row("openvino-bf16", "bf16", 80.0, 4.0)]))
    _print_verdict(res)
    out = capsys.readouterr().out
    assert "openvino-bf16" in out and "fastest int8 or bf16 " in out
