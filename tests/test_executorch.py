"""The ExecuTorch + XNNPACK row (quantbench.runtimes.executorch) on the tiny trained resnet10.

Needs the optional extra (pip install -e '.[edge]'); without it the export tests skip and only the
"missing package" error is checked. The export (torch.export, PT2E, XNNPACK lowering, twice) is
the slow part, so it runs once for the module.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from quantbench import runtimes
from quantbench.data import normalize
from quantbench.errors import QuantbenchError
from quantbench.qconfigs import Scheme
from quantbench.models import load_checkpoint
from quantbench.runtimes import executorch as et
from support.exporting import export_paths

pytestmark = pytest.mark.slow  # every test here exports through a runtime or waits on subprocesses

META = {"source_checkpoint": "tiny-resnet10"}


@pytest.fixture(scope="module")
def tiny(tiny_trained_checkpoint, tiny_dataset):
    """The trained tiny model, normalized train images (calibration) and test images."""
    model, meta = load_checkpoint(tiny_trained_checkpoint)
    mean, std = meta["normalize_mean"], meta["normalize_std"]
    return (model, normalize(tiny_dataset.train.images, mean, std),
            normalize(tiny_dataset.test.images, mean, std))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    pytest.importorskip("executorch", reason="executorch not installed: pip install -e '.[edge]'")
    model, train, _ = tiny
    return export_paths(et, model, tmp_path_factory.mktemp("executorch"), list(train.split(16)), META,
                        scheme=Scheme(weight_scheme="per-channel"))


def _sidecar(path):
    return json.loads((path.parent / (path.name + ".json")).read_text())


def test_export_writes_both_programs_and_sidecars(exported, tiny):
    assert [p.name for p in exported] == ["executorch-fp32.pte", "executorch-int8.pte"]
    fp32, int8 = (_sidecar(p) for p in exported)
    for side, dtype in ((fp32, "fp32"), (int8, "int8")):
        assert side["dtype"] == dtype and side["runtime"] == "executorch"
        assert side["input_shape"] == [3, 32, 32]
        assert side["source_checkpoint"] == META["source_checkpoint"]
    assert fp32["qconfig"] is None
    q = int8["qconfig"]
    assert q["weight_scheme"] == "per-channel" and q["overrides"] == {"weight_scheme": "per-channel"}
    # read back from the observers prepare_pt2e inserted, not from what was asked for
    assert q["weights"]["qscheme"] == "per_channel_symmetric" and q["weights"]["dtype"] == "int8"
    assert q["activations"]["observer"] == "HistogramObserver"
    assert int8["calibration"]["samples"] == len(tiny[1])
    assert int8["weight_bytes"] < fp32["weight_bytes"] / 3  # the weights really are 8-bit


def test_both_programs_run_and_int8_agrees_with_fp32(exported, tiny):
    model, train, test = tiny
    test = torch.cat([test, train])  # more than MAX_BATCH images: the wrapper splits the batch
    assert len(test) > et.MAX_BATCH
    with torch.no_grad():
        ref = model(test)
    fp32 = runtimes.load(exported[0], threads=1)(test)
    with torch.inference_mode():  # how the accuracy pass calls it
        int8 = runtimes.load(exported[1], threads=1)(test)
    assert fp32.shape == int8.shape == ref.shape and fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, ref, rtol=1e-3, atol=1e-3)
    agree = (int8.argmax(1) == fp32.argmax(1)).float().mean().item()
    assert agree >= 0.75, f"int8 top-1 agrees with fp32 on only {agree:.0%} of the images"
    one = runtimes.load(exported[1])(test[:1])  # batch 1, the runtime's default threads
    assert one.shape == (1, ref.shape[1])


def test_a_program_is_never_sent_a_batch_it_gets_wrong(monkeypatch):
    """_verified_batch: outputs at each batch size are compared with the same images one at a
    time (twice, since the failure seen was not repeatable); the largest batch that agrees is
    recorded with the reason. A fake runtime stands in for ExecuTorch (runs without the extra)."""
    import types

    calls = []

    class Method:
        def execute(self, inputs):
            (x,) = inputs
            calls.append(len(x))
            out = x.flatten(1)[:, :3] * 2
            return [out + 5.0 if len(x) > 4 else out]  # wrong above batch 4, like XNNPACK's int8 MobileNetV3

    fake = types.SimpleNamespace(get=lambda: types.SimpleNamespace(
        load_program=lambda program: types.SimpleNamespace(load_method=lambda name: Method())))
    monkeypatch.setitem(sys.modules, "executorch.runtime", types.SimpleNamespace(Runtime=fake))
    images = torch.randn(40, 3, 4, 4)
    rec = et._verified_batch(b"program", images, "int8")
    assert rec["max_batch"] == 4 and rec["batch_checked"]
    assert "at batch 8 the int8 program gave outputs that differed" in rec["max_batch_why"]
    assert set(calls) == {1, 32, 16, 8, 4}  # never anything else
    calls.clear()
    Method.execute = lambda self, inputs: [inputs[0].flatten(1)[:, :3]]  # right at every size
    assert et._verified_batch(b"program", images, "fp32") == {"max_batch": et.MAX_BATCH, "batch_checked": True}
    # fewer images than MAX_BATCH: the record claims only the batch it could check
    rec = et._verified_batch(b"program", torch.randn(12, 3, 4, 4), "fp32")
    assert rec["max_batch"] == 8 and "only 12 calibration images" in rec["max_batch_why"]

    def refuses_big(self, inputs):  # a program exported for batch 1 only
        if len(inputs[0]) > 1:
            raise RuntimeError("input shape mismatch")
        return [inputs[0].flatten(1)[:, :3]]
    Method.execute = refuses_big
    rec = et._verified_batch(b"program", images, "int8")
    assert rec["max_batch"] == 1 and "at batch 2 the int8 program refused the input" in rec["max_batch_why"]


def test_a_verification_failure_is_one_export_error(monkeypatch, tiny, tmp_path):
    """A program that cannot even be run for the batch check fails the export with one
    QuantbenchError (replicate skips or reports the row), not a traceback, and writes nothing."""
    pytest.importorskip("executorch", reason="executorch not installed: pip install -e '.[edge]'")
    model, train, _ = tiny
    monkeypatch.setattr(et, "_lower", lambda program: b"not a program")  # the lowering is not the point

    def broken(program, calib, what):
        raise ValueError("bad program")
    monkeypatch.setattr(et, "_verified_batch", broken)
    with pytest.raises(QuantbenchError, match="ExecuTorch export failed while checking batches: .*bad program"):
        export_paths(et, model, tmp_path, [train[:8]], {})
    assert not list(tmp_path.iterdir())


def test_the_wrapper_splits_batches_by_the_verified_size(exported, tiny, tmp_path):
    import shutil
    path = tmp_path / "p.pte"
    shutil.copy(exported[1], path)
    (tmp_path / "p.pte.json").write_text(json.dumps({**_sidecar(exported[1]), "max_batch": 3}))
    _, train, _ = tiny
    whole = runtimes.load(exported[1], threads=1)(train[:10])
    split = runtimes.load(path, threads=1)(train[:10])
    torch.testing.assert_close(split, whole)
    assert _sidecar(exported[1])["max_batch"] == et.MAX_BATCH  # resnet10 is right at every batch


def test_a_file_made_before_the_batch_check_runs_one_image_at_a_time(exported, tiny, tmp_path, monkeypatch):
    """Older sidecars said max_batch 32 without checking it: such a file (also reused by
    --resume) is sent one image per call, the one size known to be right."""
    import shutil
    path = tmp_path / "old.pte"
    shutil.copy(exported[1], path)
    side = {k: v for k, v in _sidecar(exported[1]).items() if k not in ("batch_checked", "max_batch_why")}
    (tmp_path / "old.pte.json").write_text(json.dumps({**side, "max_batch": 32}))
    _, train, _ = tiny
    sizes = []
    run = runtimes.load(path, threads=1)
    real_split = torch.Tensor.split
    monkeypatch.setattr(torch.Tensor, "split", lambda self, n, *a, **k: sizes.append(n) or real_split(self, n, *a, **k))
    out = run(train[:6])
    assert sizes == [1] and out.shape[0] == 6


def test_the_activation_observer_is_the_one_asked_for(tiny):
    """--observer moving-average reaches XNNPACK's quantizer: its activation specs get that
    observer (the sidecar reads them back from the prepared graph), the rest is unchanged."""
    pytest.importorskip("executorch", reason="executorch not installed: pip install -e '.[edge]'")
    q = et._quantizer(et.int8_settings(Scheme(observer="moving-average")))
    spec = q.global_config.input_activation
    assert spec.observer_or_fake_quant_ctr.p.func.__name__ == "MovingAverageMinMaxObserver"
    assert spec.dtype == torch.int8 and (spec.quant_min, spec.quant_max) == (-128, 127)
    assert q.global_config.output_activation is spec


def test_op_counts_say_what_runs_int8_in_xnnpack(exported):
    fp32, int8 = (runtimes.for_path(p).op_counts(p) for p in exported)
    assert fp32.int8_conv == 0 and fp32.float_conv > 0 and fp32.float_linear == 1
    assert int8.float_conv == 0 and int8.int8_conv == fp32.float_conv and int8.int8_linear == 1


def test_per_tensor_weights_observers_and_unsupported_schemes():
    assert et.int8_settings(None) == {"is_per_channel": True, "observer": "histogram"}
    assert et.int8_settings(Scheme(weight_scheme="per-tensor")) == {"is_per_channel": False, "observer": "histogram"}
    assert et.int8_settings(Scheme(observer="histogram", act_scheme="affine"))["is_per_channel"] is True
    assert et.int8_settings(Scheme(observer="moving-average"))["observer"] == "moving-average"
    for bad in (Scheme(qconfig="seed"), Scheme(observer="percentile"), Scheme(act_scheme="symmetric")):
        with pytest.raises(QuantbenchError, match="XNNPACK's quantizer cannot do") as e:
            et.int8_settings(bad)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- without executorch
def test_missing_executorch_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch", None)  # makes `import executorch` fail
    assert "executorch" in runtimes.exporters()  # still listed: replicate skips it in one line
    with pytest.raises(QuantbenchError, match=r"pip install -e '\.\[edge\]'") as e:
        export_paths(et, torch.nn.Identity(), tmp_path / "out", [torch.zeros(1, 3, 32, 32)], {})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # failed before writing anything
    f = tmp_path / "model.pte"
    f.write_bytes(b"")
    assert runtimes.for_path(f) is et  # the suffix is known without the package
    with pytest.raises(QuantbenchError, match=r"pip install -e '\.\[edge\]'") as e:
        runtimes.load(f)
    assert "\n" not in str(e.value)


def test_a_garbage_pte_is_one_line_not_an_abort(tmp_path):
    """ExecuTorch's loader aborts the whole process (exit 134, no output) on some garbage: bytes
    it logs that Python cannot decode. Loaded in a child here, so the old abort fails the test
    instead of killing pytest."""
    pytest.importorskip("executorch", reason="executorch not installed: pip install -e '.[edge]'")
    import subprocess
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\x00\x00\x00\x00\xff\xfe\xfd\xfc" + bytes(range(256)) * 4)
    code = ("from pathlib import Path\nfrom quantbench.errors import QuantbenchError\n"
            "from quantbench.runtimes import executorch as et\n"
            f"try:\n    et.load(Path({str(bad)!r}))\nexcept QuantbenchError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.returncode
    assert done.stdout.strip() == (f"{bad} is not an ExecuTorch program (.pte): it does not start with the ET12 "
                                   "flatbuffer header (a damaged or different file?)")
