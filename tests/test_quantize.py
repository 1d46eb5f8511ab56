"""Eager-mode quantization (the original's three methods), deployment files and bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from quantbench.cli import main
from quantbench.data import Batches
from quantbench.models import load_checkpoint
from quantbench.quantize import QuantizeConfig, export_origin, quantize, quantize_to_file


def _logits(model, data, n=24):
    x, _ = next(iter(Batches(data.test, n, data.mean, data.std)))
    with torch.no_grad():
        return x, model(x)


@pytest.mark.parametrize("method", ["dynamic", "static", "qat"])
def test_eager_int8_agrees_with_fp32(method, tiny_trained_checkpoint, tiny_dataset, tmp_path):
    cfg = QuantizeConfig(method=method, calib_samples=48, calib_batch_size=16, qat_schedule="smoke",
                         work_dir=tmp_path / "qat")
    qmodel, record = quantize(tiny_trained_checkpoint, cfg, tiny_dataset, progress=False)
    fp32, _ = load_checkpoint(tiny_trained_checkpoint)
    x, ref = _logits(fp32, tiny_dataset)
    with torch.no_grad():
        out = qmodel(x)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.8, f"{method}: int8 top-1 agrees with fp32 on only {agree:.0%}"
    assert record["method"] == method and record["label"] == {"dynamic": "ptq-d", "static": "ptq-s", "qat": "qat"}[method]
    if method != "dynamic":  # convolutions really are int8 now
        assert any("quantized" in type(m).__module__ and "Conv" in type(m).__name__ for m in qmodel.modules())


def test_static_records_calibration_and_qconfig(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    out = tmp_path / "ptq-s.pt"
    rec = quantize_to_file(tiny_trained_checkpoint, out, QuantizeConfig(method="static", calib_samples=32),
                           tiny_dataset, progress=False)
    side = json.loads((tmp_path / "ptq-s.pt.json").read_text())
    assert side == rec.to_dict()
    assert side["calibration"]["samples"] == 32 and side["dtype"] == "int8" and side["runtime"] == "torchscript"
    assert side["classes"] == tiny_dataset.classes and len(side["normalize_mean"]) == 3
    assert side["weight_bytes"] < out.stat().st_size * 1.5
    assert side["qconfig"]["activations"]["observer"] == "HistogramObserver" and side["qconfig"]["why"]
    assert side["input_shape"] == [3, 32, 32]


def test_seed_qconfig_uses_7_bit_ranges(tiny_trained_checkpoint, tiny_dataset):
    qmodel, rec = quantize(tiny_trained_checkpoint, QuantizeConfig(method="static", qconfig="seed", calib_samples=32),
                           tiny_dataset, progress=False)
    conv = next(m for m in qmodel.modules() if type(m).__name__ == "ConvReLU2d")
    w = conv.weight().int_repr()
    assert w.min() >= -64 and w.max() <= 63
    assert rec["qconfig"]["name"] == "seed" and rec["qconfig"]["weights"]["range"] == [-64, 63]


@pytest.mark.slow
def test_torchscript_round_trip_in_a_fresh_process(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    """The deployment file needs plain torch only: load it where quantbench is never imported."""
    out = tmp_path / "ptq-s.pt"
    quantize_to_file(tiny_trained_checkpoint, out, QuantizeConfig(method="static", calib_samples=32),
                     tiny_dataset, progress=False)
    x = torch.randn(5, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    here = torch.jit.load(str(out))(x)
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "torch.save(m(x), sys.argv[3]); assert 'quantbench' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "y.pt"), here)
    assert here.shape == (5, 3)


def test_origin_export_matches_fp32(tiny_trained_checkpoint, tmp_path):
    out = tmp_path / "origin.pt"
    rec = export_origin(tiny_trained_checkpoint, out)
    fp32, _ = load_checkpoint(tiny_trained_checkpoint)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(x), fp32(x), atol=1e-4)
    assert rec["dtype"] == "fp32" and rec["label"] == "origin"


def _cli_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err and err[-1].startswith("quantbench: error:") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_quantizing_an_already_quantized_file(tiny_trained_checkpoint, tiny_dataset, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "ptq-d.pt"
    quantize_to_file(tiny_trained_checkpoint, out, QuantizeConfig(method="dynamic"), progress=False)
    msg = _cli_error(capsys, ["quantize", str(out), "--method", "static", "--data-dir", str(tiny_data_dir),
                              "--output", str(tmp_path / "again.pt"), "--no-progress"])
    assert "exported model" in msg


@pytest.mark.parametrize("argv, expect", [
    (["--method", "magic"], "unknown method"),
    (["--method", "static", "--qconfig", "nine-bit"], "unknown qconfig"),
    (["--method", "static", "--calib-samples", "0"], "--calib-samples"),
    (["--method", "static", "--flow", "nope"], "unknown flow"),
    (["--method", "qat", "--qat-schedule", "slow"], "unknown QAT schedule"),
    (["--method", "static", "--calib-batch-size", "0"], "--calib-batch-size"),
    (["--method", "qat", "--epochs", "0"], "--qat-epochs"),
    (["--method", "static", "--output-suffix", ".onnx"], "writes .pt files"),
])
def test_bad_quantize_options(argv, expect, tiny_trained_checkpoint, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "x.pt"
    if "--output-suffix" in argv:
        out = tmp_path / "x.onnx"
        argv = argv[:2]
    msg = _cli_error(capsys, ["quantize", str(tiny_trained_checkpoint), *argv, "--data-dir", str(tiny_data_dir),
                              "--output", str(out), "--no-progress"])
    assert expect in msg


def test_checkpoint_of_another_architecture(tiny_data_dir, tmp_path, capsys):
    from conftest import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "r18.pth", arch="resnet18", num_classes=5)
    msg = _cli_error(capsys, ["quantize", str(ckpt), "--method", "static", "--data-dir", str(tiny_data_dir),
                              "--output", str(tmp_path / "x.pt"), "--no-progress"])
    assert "5 output classes" in msg


def test_quantize_cli_writes_file(tiny_trained_checkpoint, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "ptq-s.pt"
    rc = main(["quantize", str(tiny_trained_checkpoint), "--method", "static", "--calib-samples", "32",
               "--data-dir", str(tiny_data_dir), "--output", str(out), "--no-progress"])
    assert rc == 0 and out.is_file() and (tmp_path / "ptq-s.pt.json").is_file()
    assert "ptq-s: wrote" in capsys.readouterr().out


def test_calibration_batches_of_large_images_are_smaller_and_hold_the_same_images(tiny_dataset, monkeypatch):
    # at 224x224 a batch of 100 took ONNX Runtime's calibration to 6.6 GB (every activation of a
    # batch at once); the images and their order must not change with the batch size
    import torch

    from quantbench import quantize as Q
    cfg = Q.QuantizeConfig(method="static", calib_samples=20, calib_batch_size=100)
    assert Q.calib_batch_size(cfg, (3, 224, 224)) == 20 and Q.calib_batch_size(cfg, (3, 32, 32)) == 100
    whole = [x for x, _ in Q.calibration_batches(tiny_dataset, cfg)]
    monkeypatch.setattr(Q, "CALIB_PIXELS", 6 * 32 * 32)
    split = [x for x, _ in Q.calibration_batches(tiny_dataset, cfg)]
    assert [len(x) for x in whole] == [20] and {len(x) for x in split[:-1]} == {6}
    assert torch.equal(torch.cat(split), whole[0])
