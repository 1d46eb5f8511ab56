"""A user's own model and data through every command: a model file named with --model, 24x24
grayscale-and-RGBA PNG images, train -> quantize -> bench -> profile -> eval, and the Python API
with an nn.Module in hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from quantbench.cli import main

MODEL_FILE = '''
import torch
from torch import nn


def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """2 classes of 24x24 PNGs, dark vs bright, some grayscale and some RGBA."""
    root = tmp_path_factory.mktemp("user") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for c, level in (("dark", 40), ("bright", 210)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(level + rng.integers(-30, 31, (24, 24)), 0, 255).astype(np.uint8)
                im = Image.fromarray(px, "L") if i % 2 else Image.fromarray(np.dstack([px] * 3 + [np.full_like(px, 255)]),
                                                                            "RGBA")
                im.save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_user_model_end_to_end(user_data, tmp_path, capsys):
    spec = tmp_path / "mymodel.py"
    spec.write_text(MODEL_FILE)
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(user_data), "--model", f"{spec}:build", "--preset", "smoke",
                 "--epochs", "2", "--output", str(run), "--no-progress"]) == 0
    ckpt = run / "best.pth"
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["model"] == f"{spec}:build" and meta["input_shape"] == [3, 24, 24]
    assert meta["classes"] == ["bright", "dark"]

    # the checkpoint alone never runs the user's code: --model must be named again
    rc = main(["eval", str(ckpt), "--data-dir", str(user_data), "--no-progress"])
    assert rc == 2 and "--model" in capsys.readouterr().err

    out = tmp_path / "ptq-s-fx.pt"
    assert main(["quantize", str(ckpt), "--model", f"{spec}:build", "--method", "static", "--flow", "fx",
                 "--calib-samples", "16", "--data-dir", str(user_data), "--output", str(out), "--no-progress"]) == 0
    side = json.loads((tmp_path / "ptq-s-fx.pt.json").read_text())
    assert side["input_shape"] == [3, 24, 24] and side["model"] == f"{spec}:build"

    assert main(["bench", str(out), "--data-dir", str(user_data), "--processes", "1", "--min-runs", "5",
                 "--timing-seconds", "0.5", "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    row = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert row["accuracy_n"] == 12 and row["input_shape"] == [3, 24, 24] and row["status"] == "int8"

    assert main(["profile", str(out), "--calls", "3"]) == 0
    assert "quantized::conv2d" in capsys.readouterr().out

    assert main(["eval", str(out), "--data-dir", str(user_data), "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_quantize_an_nn_module_in_hand(user_data):
    """The notebook path: an nn.Module, not a file; the caller's model is left as it was."""
    from quantbench.data import DataSource
    from quantbench.quantize import QuantizeConfig, quantize
    data = DataSource(user_data).load(progress=False)
    torch.manual_seed(0)
    ns = {}
    exec(MODEL_FILE, ns)
    model = ns["build"](2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, record = quantize(model, QuantizeConfig(method="static", flow="pt2e", calib_samples=16), data,
                              progress=False)
    assert record["input_shape"] == [3, 24, 24] and "nn.Module" in record["model"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        assert qmodel(x).shape == (4, 2)
    with pytest.raises(Exception, match="eager mode needs a model written for it"):
        quantize(model, QuantizeConfig(method="static", flow="eager", calib_samples=16), data, progress=False)


UNTRACEABLE = '''
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, k)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: neither tracer can follow it
            y = y * 2
        return self.fc(y.mean((2, 3)))
'''


@pytest.mark.parametrize("flow, other", [("fx", "--flow pt2e"), ("pt2e", "--flow fx")])
def test_a_model_that_does_not_trace_is_one_line(flow, other, user_data, tmp_path):
    """The error names the user's line and the flow to try instead."""
    from quantbench.data import DataSource
    from quantbench.errors import QuantbenchError
    from quantbench.quantize import QuantizeConfig, quantize
    (tmp_path / "branchy.py").write_text(UNTRACEABLE)
    import importlib.util
    spec = importlib.util.spec_from_file_location("branchy", tmp_path / "branchy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = DataSource(user_data).load(progress=False)
    with pytest.raises(QuantbenchError) as e:
        quantize(mod.Branchy(2), QuantizeConfig(method="static", flow=flow, calib_samples=8), data, progress=False)
    msg = str(e.value)
    assert f"the {flow} flow cannot trace this model at {tmp_path / 'branchy.py'}:13" in msg and other in msg
    assert "\n" not in msg


@pytest.mark.slow
def test_a_failed_capture_prints_one_line_from_the_cli(user_data, tmp_path):
    """torch's own graph dumps and log lines of a failed torch.export stay off the terminal."""
    import subprocess
    import sys
    (tmp_path / "branchy.py").write_text(UNTRACEABLE + "\n\ndef build(k):\n    return Branchy(k)\n")
    spec = f"{tmp_path / 'branchy.py'}:build"
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(user_data), "--model", spec, "--preset", "smoke", "--epochs", "1",
                 "--output", str(run), "--no-progress"]) == 0
    proc = subprocess.run([sys.executable, "-m", "quantbench", "quantize", str(run / "best.pth"), "--model", spec,
                           "--method", "static", "--flow", "pt2e", "--calib-samples", "8", "--data-dir",
                           str(user_data), "--output", str(tmp_path / "q.pt2")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("note: hid")]
    assert len(lines) == 1 and lines[0].startswith("quantbench: error: the pt2e flow cannot trace"), proc.stderr
