"""quantbench.deploy: one path from an fp32 model to a deployment file, whichever command asks.

The same target made through `quantize`, `replicate` and `tune` is the same file, byte for byte,
with the same record; a run reads its checkpoint once."""
from __future__ import annotations

from pathlib import Path

import pytest

from quantbench import deploy
from quantbench.bench import BenchConfig
from quantbench.deploy import Source, Target, make
from quantbench.errors import QuantbenchError
from quantbench.quantize import QuantizeConfig, quantize_to_file
from quantbench.record import read_record, same_making

SUPPORT = Path(__file__).parent / "support"


def _empty():
    from quantbench.results import BenchResults
    return BenchResults(machine={}, config={}, created="", models=[])


def _q(**kw) -> QuantizeConfig:
    return QuantizeConfig(method="static", calib_samples=32, calib_batch_size=16, **kw)


@pytest.mark.slow
def test_quantize_replicate_and_tune_make_the_same_file(tiny_trained_checkpoint, tiny_dataset, tiny_data_dir,
                                                        tmp_path, monkeypatch):
    from quantbench import replicate as R
    from quantbench.data import DataSource
    from quantbench.tune import Candidate, Search, TuneConfig

    # PT2E: its .pt2 archives are saved reproducibly (TorchScript files carry a per-process
    # counter in their class names, so two made in one process never match byte for byte)
    # 1. quantize
    q = _q(flow="pt2e", seed=0)
    a = quantize_to_file(tiny_trained_checkpoint, tmp_path / "a.pt2", q, tiny_dataset, progress=False)

    # 2. replicate: its target list for the same options, made by its own loop (no timing)
    made = []

    def no_bench(files, cfg):
        made.extend(files)
        return _empty()

    monkeypatch.setattr(R, "bench", no_bench)
    monkeypatch.setattr(R, "write_report", lambda *a, **k: None)
    cfg = R.ReplicateConfig(output=tmp_path / "rep", data=DataSource(tiny_data_dir), checkpoint=tiny_trained_checkpoint,
                            flows=("pt2e",), methods=("static",), runtimes=(), quantize=q.replace(calib_samples=32),
                            bench=BenchConfig(accuracy=False, progress=False))
    R.replicate(cfg, progress=False)
    b_path = next(p for p in made if p.name == "ptq-s-pt2e.pt2")

    # 3. tune's trial maker, with the same data the other two saw
    tcfg = TuneConfig(checkpoint=tiny_trained_checkpoint, data=DataSource(tiny_data_dir), output=tmp_path / "tune",
                      flows=("pt2e",), runtimes=(), quantize=q, val_samples=20)
    s = Search(tcfg, progress=False)
    s.source = Source.from_checkpoint(tiny_trained_checkpoint, tiny_dataset)  # tune's own split aside
    c_path = s.make(Candidate("pt2e"), 1)

    files = [tmp_path / "a.pt2", b_path, c_path]
    blobs = [p.read_bytes() for p in files]
    assert blobs[0] == blobs[1] == blobs[2], "the same target made three ways gave different files"
    recs = [read_record(p) for p in files]
    for r in recs[1:]:
        assert same_making(recs[0], r.replace(source_checkpoint=recs[0].source_checkpoint))
    assert recs[0].target["maker"] == "pt2e" and recs[0].calibration["samples"] == 32 and a.label == "ptq-s-pt2e"


@pytest.mark.slow
def test_replicate_reads_its_checkpoint_once(tiny_trained_checkpoint, tiny_data_dir, tmp_path, monkeypatch, capsys):
    from quantbench import models
    from quantbench import replicate as R
    from quantbench.data import DataSource
    reads = []
    real = models.read_checkpoint
    monkeypatch.setattr(models, "read_checkpoint", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(R, "bench", lambda files, cfg: _empty())
    monkeypatch.setattr(R, "write_report", lambda *a, **k: None)
    cfg = R.ReplicateConfig(output=tmp_path / "rep", data=DataSource(tiny_data_dir), checkpoint=tiny_trained_checkpoint,
                            flows=("eager", "fx"), methods=("dynamic", "static"), runtimes=(),
                            quantize=_q(), bench=BenchConfig(accuracy=False, progress=False))
    R.replicate(cfg, progress=False)
    assert len(reads) == 1, f"checkpoint read {len(reads)} times"
    log = capsys.readouterr().err
    assert log.count(f"loaded {tiny_trained_checkpoint}") == 1
    assert {p.name for p in (tmp_path / "rep" / "models").glob("*.pt")} == {
        "origin.pt", "ptq-d.pt", "ptq-s.pt", "ptq-d-fx.pt", "ptq-s-fx.pt"}


@pytest.mark.slow
def test_pruning_runs_once_per_kind_of_model(tiny_trained_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    calls = []
    real = deploy.prune_for_export
    monkeypatch.setattr(deploy, "prune_for_export", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = Source.from_checkpoint(tiny_trained_checkpoint, tiny_dataset)
    for flow in ("fx", "pt2e"):
        make(src, Target(flow, "static", _q()), tmp_path / f"{flow}{deploy.suffix(flow)}", progress=False)
    make(src, Target("fx", "dynamic", _q()), tmp_path / "d.pt", progress=False)
    assert len(calls) == 1  # fx and pt2e both quantize the plain float model: pruned and checked once


def test_a_target_checks_itself(tiny_checkpoint):
    with pytest.raises(QuantbenchError, match="unknown method"):
        Target("fx", "bogus")
    with pytest.raises(QuantbenchError, match="unknown runtime"):
        Target("nosuch")
    with pytest.raises(QuantbenchError, match="makes no files"):
        Target("torchscript")
    assert Target("eager", "static").label == "ptq-s" and Target("fx", "qat").label == "qat-fx"


def test_a_runtime_option_of_its_own_reaches_the_record(tiny_trained_checkpoint, tiny_dataset, tmp_path,
                                                         monkeypatch):
    monkeypatch.syspath_prepend(str(SUPPORT.parent))
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "sleepy=support.sleepy,fake=support.fakert")
    src = Source.from_checkpoint(tiny_trained_checkpoint, tiny_dataset)
    recs = make(src, Target("fake", "static", _q(options={"fake": {"knob": 7}})), tmp_path)
    int8 = read_record(tmp_path / "fake-int8.fake")
    assert [r.file for r in recs] == ["fake-fp32.fake", "fake-int8.fake"]
    assert int8.options == {"knob": 7} and int8.get("knob") == 7 and int8.target["options"] == {"knob": 7}
    with pytest.raises(QuantbenchError, match="--fake-knob must be 1 to 9"):
        _q(options={"fake": {"knob": 0}})
    with pytest.raises(QuantbenchError, match="unknown option"):
        _q(options={"fake": {"dial": 1}})
