"""The main job end to end on tiny data: every file of the run directory, and resume."""
from __future__ import annotations

import json

import pytest

from quantbench.cli import main


@pytest.mark.slow
def test_replicate_end_to_end_and_resume(tiny_trained_checkpoint, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["replicate", "--checkpoint", str(tiny_trained_checkpoint), "--data-dir", str(tiny_data_dir),
            "--output", str(out), "--qat-schedule", "smoke", "--calib-samples", "32", "--runtimes", "none",
            "--min-runs", "5", "--timing-seconds", "0.5", "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "Ship this" in table and "batch 1: " in table
    for name in ("origin", "ptq-d", "ptq-s", "qat"):
        assert f"| {name} |" in table
        assert (out / "models" / f"{name}.pt").is_file() and (out / "models" / f"{name}.pt.json").is_file()
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["models"]] == ["origin", "ptq-d", "ptq-s", "qat"]
    assert all(r["accuracy"] is not None and r["latency"]["1"]["n"] >= 5 for r in res["models"])
    assert {r["label"]: r["status"] for r in res["models"]} == {
        "origin": "fp32", "ptq-d": "int8-linear-only", "ptq-s": "int8", "qat": "int8"}
    for f in ("report.md", "results.csv", "results.md", "accuracy_vs_latency.png"):
        assert (out / f).is_file(), f

    # --resume keeps the models already made: their sidecars are not rewritten
    before = (out / "models" / "qat.pt.json").stat().st_mtime_ns
    assert main(argv + ["--resume"]) == 0
    assert (out / "models" / "qat.pt.json").stat().st_mtime_ns == before

    # `quantbench report` rebuilds the report; two runs compare side by side
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").is_file()
    assert main(["report", str(out), str(out), "--output", str(tmp_path)]) == 0
    compare = (tmp_path / "compare.md").read_text()
    assert compare.count("| ptq-s |") == 3  # the side-by-side table, then each run's table
    same_run = [line for line in compare.splitlines() if line.startswith("| ptq-s | ")][0].split("|")
    assert same_run[4].strip() == "+0.0%"  # a run compared with itself has not changed
    # speed-ups against the same run's fp32 row, and how much they moved between runs
    assert same_run[5].strip() == same_run[6].strip() != "n/a" and same_run[7].strip() == "+0.0%"
    assert "Largest change of a speed-up against run 1: 0.0% (3 of 3 within 5 %)" in compare
    assert f"Runs: 1 = {out}; 2 = {out}" in compare  # each run named by its directory


def test_runtime_rows_are_reused_on_resume(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    """replicate --resume measures the very same comparison files again instead of re-exporting."""
    from pathlib import Path

    from quantbench import replicate as R
    from quantbench.quantize import QuantizeConfig
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from support import fakert
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "fake=support.fakert")  # one module + one registry entry
    models = tmp_path / "models"
    models.mkdir()
    fakert.calls.clear()
    for resume in (False, True, True):
        cfg = R.ReplicateConfig(output=tmp_path, checkpoint=tiny_checkpoint, runtimes=("fake",),
                                quantize=QuantizeConfig(method="static", calib_samples=16), resume=resume)
        files = R._runtime_rows(cfg, tiny_checkpoint, tiny_dataset, models)
        assert [f.name for f in files] == list(fakert.FILES)
    assert len(fakert.calls) == 1  # exported once; both resumed runs reused the files


@pytest.mark.slow
def test_replicate_api_measures_accuracy_on_its_own_data(tiny_trained_checkpoint, tiny_data_dir, tmp_path):
    """One data location: from the Python API, the benchmark's accuracy runs read the data the
    models were made from, not BenchConfig's default (CIFAR-10 under ./data)."""
    from quantbench.bench import BenchConfig
    from quantbench.data import DataSource
    from quantbench.quantize import QuantizeConfig
    from quantbench.replicate import ReplicateConfig, replicate
    cfg = ReplicateConfig(output=tmp_path / "run", data=DataSource(tiny_data_dir), checkpoint=tiny_trained_checkpoint,
                          methods=("static",), runtimes=(),
                          quantize=QuantizeConfig(method="static", calib_samples=16),
                          bench=BenchConfig(min_runs=3, timing_s=0.3, processes=1, progress=False))
    assert cfg.bench.data == DataSource(tiny_data_dir)
    res = replicate(cfg, progress=False)
    # the tiny test split: 3 classes x 8 images
    assert [m.accuracy_n for m in res.models] == [24, 24]
    assert all(m.accuracy is not None for m in res.models)


@pytest.mark.parametrize("bad, match", [
    (dict(runtimes=("bogus",)), "unknown runtime"),
    (dict(quantize="qconfig"), "unknown qconfig"),
    (dict(quantize="schedule"), "unknown QAT schedule"),
    (dict(quantize="calib"), "calib-samples"),
    (dict(flows=("nope",)), "unknown flow"),
    (dict(preset="nope"), "unknown preset"),
])
def test_replicate_options_fail_before_any_work(bad, match):
    from quantbench.errors import QuantbenchError
    from quantbench.quantize import QuantizeConfig
    from quantbench.replicate import ReplicateConfig
    q = {"qconfig": dict(qconfig="bogus"), "schedule": dict(qat_schedule="bogus"),
         "calib": dict(calib_samples=0)}
    if "quantize" in bad:
        with pytest.raises(QuantbenchError, match=match):
            ReplicateConfig(quantize=QuantizeConfig(method="static", **q[bad["quantize"]]))
        return
    with pytest.raises(QuantbenchError, match=match):
        ReplicateConfig(**bad)


@pytest.mark.slow
def test_replicate_skips_rows_a_flow_cannot_make_and_says_so(tiny_data_dir, tmp_path):
    """A model without a quantizable twin: eager static is skipped with its reason (in the
    report too), the rows that can be made are made and measured."""
    from conftest import make_checkpoint

    from quantbench.bench import BenchConfig
    from quantbench.data import DataSource
    from quantbench.quantize import QuantizeConfig
    from quantbench.replicate import ReplicateConfig, replicate
    ckpt = make_checkpoint(tmp_path / "m.pth", arch="mobilenet_v3_small")
    cfg = ReplicateConfig(output=tmp_path / "run", data=DataSource(tiny_data_dir), checkpoint=ckpt,
                          methods=("dynamic", "static"), runtimes=(),
                          quantize=QuantizeConfig(method="static", calib_samples=16),
                          bench=BenchConfig(min_runs=3, timing_s=0.3, processes=1, progress=False, accuracy=False))
    res = replicate(cfg, progress=False)
    assert [m.label for m in res.models] == ["origin", "ptq-d"]
    assert [s["row"] for s in res.replicate["skipped"]] == ["ptq-s"]
    assert "no quantizable twin" in res.replicate["skipped"][0]["why"]
    assert "Rows not made: ptq-s: mobilenet_v3_small has no quantizable twin" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_resume_with_other_data_is_refused(tiny_trained_checkpoint, tiny_data_dir, tmp_path, capsys):
    """Issue 21 item 9: files calibrated on other images must not be measured as if made from these."""
    from conftest import write_tiny_image_folder
    out = tmp_path / "run"
    argv = ["replicate", "--checkpoint", str(tiny_trained_checkpoint), "--output", str(out), "--methods", "dynamic",
            "--runtimes", "none", "--min-runs", "3", "--timing-seconds", "0.2", "--processes", "1", "--no-progress"]
    assert main(argv + ["--data-dir", str(tiny_data_dir)]) == 0
    other = write_tiny_image_folder(tmp_path / "other", seed=3)
    capsys.readouterr()
    assert main(argv + ["--data-dir", str(other), "--resume"]) == 2
    assert "was made from other data" in capsys.readouterr().err


def test_unknown_fp32_layer_is_refused_before_training(tiny_data_dir, tmp_path, capsys, monkeypatch):
    """Issue 21 item 18: --fp32-layers nosuchlayer used to be refused only after training."""
    import quantbench.train as T
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("trained before checking --fp32-layers"))
    rc = main(["replicate", "--data-dir", str(tiny_data_dir), "--arch", "resnet10", "--preset", "smoke",
               "--fp32-layers", "nosuchlayer", "--output", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2 and "unknown layer 'nosuchlayer'" in capsys.readouterr().err


def test_the_plan_says_what_the_run_will_make_and_bounds_its_timing():
    from types import SimpleNamespace

    from quantbench.bench import BenchConfig
    from quantbench.replicate import ReplicateConfig, plan
    cfg = ReplicateConfig(checkpoint="x.pth", flows=("eager", "fx"), methods=("static", "qat"), runtimes=(),
                          bench=BenchConfig(batch_sizes=(1, 16), timing_s=30, processes=3, eval_samples=2000))
    lines = plan(cfg, SimpleNamespace(test=[0] * 50000, train=[0] * 100, input_shape=(3, 32, 32)))
    assert "5 targets, about 5 files" in lines[0] and "2 QAT fine-tune(s)" in lines[0] and "100 training" in lines[0]
    # 5 files x 2 batch sizes x 30 s: at most 5 min of timing
    assert "x 2 setting(s)" in lines[1] and "at most 5 min" in lines[1]
    assert "on 2,000 test images (10,000 images in all)" in lines[2]
    cfg = ReplicateConfig(checkpoint="x.pth", methods=("static",), runtimes=())
    lines = plan(cfg, SimpleNamespace(test=[0] * 50000, train=None, input_shape=(3, 224, 224)))
    assert "QAT" not in lines[0] and "--eval-samples N measures fewer" in lines[2]
    # timing left unset: what bench chooses for 224x224 (batch 1 and 16, 1 thread and all cores)
    assert "x 4 setting(s) (batch 1,16; threads 1,all)" in lines[1]


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_rows_are_made_where_the_cpu_has_bf16_and_skipped_with_the_reason_once(
        bf16, tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch, capsys):
    """A runtime's bf16 rows: made and reused on resume where the CPU has bf16; elsewhere left
    out with one line saying why, for every runtime that skips them (here the fake one and
    inductor, whose rows are all bf16's), in the log and in what the report shows."""
    from pathlib import Path

    from quantbench import cpu
    from quantbench import replicate as R
    from quantbench.deploy import is_flow
    from quantbench.quantize import QuantizeConfig
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from support import fakebf16
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "fakebf16=support.fakebf16")
    monkeypatch.setattr(cpu, "has_bf16", lambda: bf16)
    models = tmp_path / "models"
    fakebf16.calls.clear()
    names = list(fakebf16.FILES) if bf16 else list(fakebf16.FILES[:2])
    runtimes_ = ("fakebf16",) if bf16 else ("fakebf16", "inductor")  # inductor would export for real with bf16
    for resume in (False, True):
        cfg = R.ReplicateConfig(output=tmp_path, checkpoint=tiny_checkpoint, runtimes=runtimes_,
                                quantize=QuantizeConfig(method="static", calib_samples=16), resume=resume)
        files, skipped = R.make_files(cfg, tiny_checkpoint, tiny_dataset, models,
                                      [t for t in R.targets(cfg) if not is_flow(t.maker)], progress=False)
        assert [f.name for f in files] == names
        err = capsys.readouterr().err
        if bf16:
            assert skipped == [] and "skipped" not in err
        else:
            why = "bf16 rows skipped: this CPU has no AVX512-BF16 or AMX"
            assert skipped == [{"row": "fakebf16-bf16, inductor-fp32, inductor-bf16", "flow": None, "method": None,
                                "why": why}]
            assert err.count(why) == 1
            assert not (models / "inductor-fp32.pt2").exists()
    assert len(fakebf16.calls) == 1  # the resumed run reused every file this machine makes


def test_the_plan_is_said_before_training(tiny_data_dir, tmp_path, capsys, monkeypatch):
    """replicate without a checkpoint trains first (the longest work of all): its plan comes
    before that, so a user can stop a run whose cost they did not expect."""
    import quantbench.train as T
    from quantbench.errors import QuantbenchError

    def stop(*a, **k):
        raise QuantbenchError("stopped where training starts")
    monkeypatch.setattr(T, "train", stop)
    rc = main(["replicate", "--data-dir", str(tiny_data_dir), "--arch", "resnet10", "--preset", "smoke",
               "--runtimes", "none", "--output", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "stopped where training starts" in err
    assert "plan: " in err and err.index("plan: ") < err.index("training fp32")


def test_the_plan_times_and_evaluates_only_the_int8_file_of_a_plain_runtime(monkeypatch):
    """--plain RUNTIME makes the runtime's files (fp32, int8, bf16 here) but measures only its
    int8 one (make_files): the plan's timing and accuracy figures count what is measured."""
    from pathlib import Path
    from types import SimpleNamespace

    from quantbench import cpu
    from quantbench.bench import BenchConfig
    from quantbench.replicate import ReplicateConfig, plan
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "fakebf16=support.fakebf16")
    monkeypatch.setattr(cpu, "has_bf16", lambda: True)
    cfg = ReplicateConfig(checkpoint="x.pth", flows=("fx",), methods=("static",), runtimes=(), plain=("fakebf16",),
                          bench=BenchConfig(batch_sizes=(1,), threads=1, timing_s=60, processes=3,
                                            eval_samples=1000))
    lines = plan(cfg, SimpleNamespace(test=[0] * 5000, train=None, input_shape=(3, 32, 32)))
    # origin + ptq-s-fx + the plain runtime's 3 files are made; 3 of them are measured
    assert "3 targets, about 5 files" in lines[0]
    assert "timing 3 files x 1 setting(s)" in lines[1] and "at most 3 min" in lines[1]
    assert "(3,000 images in all)" in lines[2]


def test_plain_takes_only_runtimes_that_make_an_int8_file():
    """--plain RUNTIME adds the runtime's own int8 row; inductor's exporter makes fp32 and bf16
    files only (MAKES_INT8 = False), so --plain inductor would add nothing, silently: one line."""
    from quantbench.errors import QuantbenchError
    from quantbench.replicate import ReplicateConfig
    with pytest.raises(QuantbenchError, match="^runtime 'inductor' makes no int8 file"):
        ReplicateConfig(checkpoint="x.pth", plain=("inductor",))
