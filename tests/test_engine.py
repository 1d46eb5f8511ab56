"""The quantized engine of the TorchScript flows: chosen per CPU (or asked for), recorded in the
sidecar, set by the loader before torch.jit.load (which packs the int8 weights for the engine
current at load time), restored after quantizing, and a bad name is a one-line error."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench.errors import QuantbenchError
from quantbench.export import read_sidecar, write_sidecar
from quantbench.quantize import QuantizeConfig, quantize, quantize_to_file
from quantbench.runtimes import torchscript

RESNET10_CONVS = 12


def _make(path, checkpoint, data, **kw) -> dict:
    cfg = QuantizeConfig(method="static", calib_samples=32, calib_batch_size=16, **kw)
    return quantize_to_file(checkpoint, path, cfg, data, progress=False)


def test_sidecar_records_the_engine(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    assert _make(tmp_path / "f.pt", tiny_trained_checkpoint, tiny_dataset, options={"torchscript": {"engine": "fbgemm"}})["engine"] == "fbgemm"
    assert read_sidecar(tmp_path / "f.pt")["engine"] == "fbgemm"
    # none asked for: the fastest for this CPU, which depends on whether pruning cropped convs
    for prune in (True, False):
        side = _make(tmp_path / f"{prune}.pt", tiny_trained_checkpoint, tiny_dataset, flow="fx", prune=prune)
        assert side["pruning"]["applied"] is prune
        assert side["engine"] == torchscript.best_engine(pruned=prune) and side["engine"] in torchscript.engines()
    # PT2E files run under inductor, which picks its kernels itself: no engine to record
    side = _make(tmp_path / "p.pt2", tiny_trained_checkpoint, tiny_dataset, flow="pt2e", options={"torchscript": {"engine": "fbgemm"}})
    assert side["engine"] is None


def test_quantize_restores_the_process_engine(tiny_trained_checkpoint, tiny_dataset):
    before = torch.backends.quantized.engine
    other = "fbgemm" if before != "fbgemm" else "x86"
    _, rec = quantize(tiny_trained_checkpoint, QuantizeConfig(method="dynamic", options={"torchscript": {"engine": other}}), tiny_dataset,
                      progress=False)
    assert rec["engine"] == other and torch.backends.quantized.engine == before


# A fresh process (torch's default engine) loads each file through quantbench's runtime and
# counts the convolutions oneDNN runs in one call (its verbose log goes to stdout).
FRESH = r"""
import sys, torch
from quantbench.runtimes import torchscript
print("DEFAULT", torch.backends.quantized.engine, flush=True)
for path in sys.argv[1:]:
    model = torchscript.load(path)
    print("ENGINE", torch.backends.quantized.engine, flush=True)
    with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        model(torch.randn(1, 3, 32, 32))
"""


def _fresh_loads(*paths) -> tuple[str, list[tuple[str, int]]]:
    """(the default engine, [(engine after loading, convs oneDNN ran) per file])."""
    env = {**os.environ, "PYTHONPATH": str(Path(quantbench.__file__).parents[1])}  # this quantbench
    out = subprocess.run([sys.executable, "-c", FRESH, *map(str, paths)], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout.splitlines()
    default = next(line.split()[1] for line in out if line.startswith("DEFAULT"))
    runs = []
    for line in out:
        if line.startswith("ENGINE"):
            runs.append([line.split()[1], 0])
        elif runs and ",exec," in line and ",convolution," in line:
            runs[-1][1] += 1
    return default, [tuple(r) for r in runs]


@pytest.mark.skipif(not {"fbgemm", "onednn"} <= set(torchscript.engines()), reason="needs fbgemm and onednn")
def test_loader_packs_for_the_sidecars_engine(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    """fbgemm runs no convolution through oneDNN, the onednn engine all of them: so the kernels
    that run show which engine packed the weights at load."""
    _make(tmp_path / "fbgemm.pt", tiny_trained_checkpoint, tiny_dataset, options={"torchscript": {"engine": "fbgemm"}})
    _make(tmp_path / "onednn.pt", tiny_trained_checkpoint, tiny_dataset, options={"torchscript": {"engine": "onednn"}})
    # the fbgemm file again, its sidecar without the engine: torch's default applies
    shutil.copy(tmp_path / "fbgemm.pt", tmp_path / "plain.pt")
    side = read_sidecar(tmp_path / "fbgemm.pt")
    del side["engine"]
    write_sidecar(tmp_path / "plain.pt", **side)
    default, runs = _fresh_loads(tmp_path / "plain.pt", tmp_path / "fbgemm.pt", tmp_path / "onednn.pt")
    assert default == "x86"
    assert runs[1] == ("fbgemm", 0) and runs[2] == ("onednn", RESNET10_CONVS)
    assert runs[0][0] == "x86"


def test_unknown_engine_is_one_line(tiny_trained_checkpoint, tmp_path):
    with pytest.raises(QuantbenchError, match=r"unknown quantized engine 'fbgemmm'; this torch offers .*x86") as e:
        QuantizeConfig(method="static", options={"torchscript": {"engine": "fbgemmm"}})
    assert "\n" not in str(e.value)
    # a file made for an engine this torch lacks
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    write_sidecar(path, options={"torchscript": {"engine": "tpu9000"}})
    with pytest.raises(QuantbenchError, match="made for quantized engine 'tpu9000'") as e:
        torchscript.load(path)
    assert "\n" not in str(e.value)


def test_quantized_engine_context_restores_on_error():
    before = torch.backends.quantized.engine
    with pytest.raises(RuntimeError):
        with torchscript.quantized_engine("fbgemm"):
            assert torch.backends.quantized.engine == "fbgemm"
            raise RuntimeError("boom")
    assert torch.backends.quantized.engine == before
    with torchscript.quantized_engine(None):
        assert torch.backends.quantized.engine == before
