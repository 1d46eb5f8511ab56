"""Dead-tap pruning inside quantize / export_origin (on by default): recorded in the sidecar,
verified on real images, the same predictions as without it, and off means off."""
from __future__ import annotations

import pytest
import torch

from quantbench import runtimes
from quantbench.data import Batches, for_model
from quantbench.export import example_input, export_torchscript, read_sidecar
from quantbench.deploy import suffix
from quantbench.flows import get_flow
from quantbench.quantize import QuantizeConfig, calibrate, export_origin, quantize_to_file
from quantbench.runtimes.torchscript import quantized_engine

# resnet10 at 32x32: layer4 runs on a 2x2 map (its strided conv) and then on 1x1 maps.
PRUNED = {"layer4.0.conv1": [2, 2], "layer4.0.conv2": [1, 1]}


def _cfg(flow: str, **kw) -> QuantizeConfig:
    return QuantizeConfig(method="static", flow=flow, calib_samples=48, calib_batch_size=16, **kw)


def _top1(path, data) -> tuple[float, torch.Tensor]:
    model = runtimes.load(path)
    x, y = next(iter(Batches(data.test, len(data.test), data.mean, data.std)))
    with torch.no_grad():
        pred = model(x).argmax(1)
    return (pred == y).float().mean().item(), pred


@pytest.mark.slow
def test_sidecar_records_pruning(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    side = quantize_to_file(tiny_trained_checkpoint, tmp_path / "p.pt", _cfg("eager"), tiny_dataset, progress=False)
    assert side.to_dict() == read_sidecar(tmp_path / "p.pt")
    p = side["pruning"]
    assert p["applied"] is True and {layer["name"]: layer["new_kernel"] for layer in p["layers"]} == PRUNED
    assert p["max_abs_diff"] is not None and p["max_abs_diff"] <= 1e-4
    assert "real images" in p["verified_on"] and p["input_shape"] == [3, 32, 32]
    assert p["weights_after"] < p["weights_before"]

    off = quantize_to_file(tiny_trained_checkpoint, tmp_path / "u.pt", _cfg("eager", prune=False), tiny_dataset,
                           progress=False)
    assert off["pruning"] == {"applied": False, "why": "turned off (--no-prune)"}
    assert off["weight_bytes"] > side["weight_bytes"]

    origin = export_origin(tiny_trained_checkpoint, tmp_path / "o.pt", data=tiny_dataset)
    assert origin["pruning"]["applied"] is True and len(origin["pruning"]["layers"]) == len(PRUNED)


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["eager", "fx", "pt2e"])
def test_pruned_and_unpruned_files_predict_alike(flow, tiny_trained_checkpoint, tiny_dataset, tmp_path):
    paths = {}
    for prune in (True, False):
        paths[prune] = tmp_path / f"{prune}{suffix(flow)}"
        rec = quantize_to_file(tiny_trained_checkpoint, paths[prune], _cfg(flow, prune=prune), tiny_dataset,
                               progress=False)
        assert rec["pruning"]["applied"] is prune
    if flow == "pt2e":  # run the QDQ graph as saved (the compiled run is test_flows' slow test)
        from quantbench.runtimes.inductor import load_program
        x, y = next(iter(Batches(tiny_dataset.test, len(tiny_dataset.test), tiny_dataset.mean, tiny_dataset.std)))
        with torch.no_grad():
            preds = {p: load_program(paths[p]).module()(x).argmax(1) for p in paths}
        acc = {p: (preds[p] == y).float().mean().item() for p in paths}
        convs = [n for n in load_program(paths[True]).graph.nodes if "conv2d" in str(n.target)]
        assert len(convs) == 12
    else:
        acc, preds = {}, {}
        for p, path in paths.items():
            acc[p], preds[p] = _top1(path, tiny_dataset)
    assert acc[True] == acc[False], acc
    assert (preds[True] == preds[False]).float().mean().item() >= 0.95


def _content_bytes(path) -> int:
    """Bytes of a TorchScript archive's code, constants and tensors; its debug records (where the
    tracing was called from) differ with the caller, not with the model, and so do the numbers
    TorchScript gives each class it makes in one process (___torch_mangle_N)."""
    import re
    import zipfile
    with zipfile.ZipFile(path) as z:
        return sum(len(re.sub(rb"___torch_mangle_\d+", b"", z.read(i))) + len(re.sub(r"___torch_mangle_\d+", "", i.filename))
                   for i in z.infolist() if not i.filename.endswith(".debug_pkl"))


@pytest.mark.slow
def test_no_prune_leaves_the_file_as_before(tiny_trained_checkpoint, tiny_dataset, tmp_path):
    """prune=False makes the very model quantize made before pruning existed: same size (but
    for the debug records), while the pruned file is smaller."""
    cfg = _cfg("eager", prune=False, options={"torchscript": {"engine": "x86"}})
    quantize_to_file(tiny_trained_checkpoint, tmp_path / "off.pt", cfg, tiny_dataset, progress=False)
    quantize_to_file(tiny_trained_checkpoint, tmp_path / "on.pt", cfg.replace(prune=True), tiny_dataset,
                     progress=False)
    # the steps of quantize(), without pruning
    flow = get_flow("eager")
    from quantbench.models import load_checkpoint
    fp32, meta = load_checkpoint(tiny_trained_checkpoint, num_classes=tiny_dataset.num_classes)
    model = flow.from_float(fp32, meta, "static")
    data = for_model(tiny_dataset, meta, "checkpoint")
    example = example_input((3, 32, 32))
    with quantized_engine("x86"):
        prepared = flow.prepare(model, "default", qat=False, example=example)
        calibrate(prepared, data, cfg.calib_samples, cfg.calib_batch_size, cfg.seed, progress=False)
        export_torchscript(flow.convert(prepared), tmp_path / "before.pt", example)
    size = {n: _content_bytes(tmp_path / f"{n}.pt") for n in ("off", "on", "before")}
    assert size["off"] == size["before"] and size["on"] < size["off"], size


def test_origin_without_data_and_without_pruning(tiny_trained_checkpoint, tmp_path):
    on = export_origin(tiny_trained_checkpoint, tmp_path / "on.pt")
    off = export_origin(tiny_trained_checkpoint, tmp_path / "off.pt", prune=False)
    assert on["pruning"]["applied"] and on["pruning"]["verified_on"] == "random inputs"
    assert off["pruning"]["applied"] is False
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = torch.jit.load(str(tmp_path / "on.pt"))(x), torch.jit.load(str(tmp_path / "off.pt"))(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (tmp_path / "on.pt").stat().st_size < (tmp_path / "off.pt").stat().st_size


def test_pruning_that_changes_outputs_fails_loudly(tiny_trained_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    """A wrong crop (here: the kernel's corner instead of its centre) is caught on verification
    and the quantize run stops with one line, writing nothing."""
    from quantbench import prune
    from quantbench.errors import QuantbenchError

    real = prune._cropped_conv

    def wrong(conv, plan):
        new = real(conv, plan)
        with torch.no_grad():
            new.weight.copy_(conv.weight[:, :, :new.kernel_size[0], :new.kernel_size[1]])
        return new

    monkeypatch.setattr(prune, "_cropped_conv", wrong)
    with pytest.raises(QuantbenchError, match="dead-tap pruning changed the model's output"):
        quantize_to_file(tiny_trained_checkpoint, tmp_path / "x.pt", _cfg("eager"), tiny_dataset, progress=False)
    assert not (tmp_path / "x.pt").exists()


def test_comparison_runtimes_start_from_the_pruned_model(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    """replicate's ONNX Runtime / OpenVINO rows export the same (pruned) fp32 graph as the torch
    rows, and their sidecars say so."""
    import types

    from quantbench import replicate as R

    seen = []

    def export(model, out_dir, calib_batches, base, scheme=None, options=None):
        seen.append((model.layer4[0].conv2.kernel_size, base.pruning))
        return []

    fake = types.SimpleNamespace(NAME="cap", SUFFIXES=(".cap",), export=export, FILES=("a.cap", "b.cap"))
    real_get = R.runtimes.get
    monkeypatch.setattr(R.runtimes, "get", lambda name: fake if name == "cap" else real_get(name))
    for prune in (True, False):
        cfg = R.ReplicateConfig(output=tmp_path, checkpoint=tiny_checkpoint, runtimes=("cap",),
                                quantize=QuantizeConfig(method="static", calib_samples=16, prune=prune))
        R._runtime_rows(cfg, tiny_checkpoint, tiny_dataset, tmp_path)
    (k_on, p_on), (k_off, p_off) = seen
    assert k_on == (1, 1) and p_on["applied"] is True and "real images" in p_on["verified_on"]
    assert k_off == (3, 3) and p_off == {"applied": False, "why": "turned off (--no-prune)"}


def test_plain_rows_are_the_runtime_alone_and_the_recommendation_compares_with_them(
        tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    """replicate --plain: the runtime's int8 row again from the UNPRUNED fp32 graph with its
    default calibration, labelled NAME-plain (its fp32 twin is not measured twice), reused on
    resume; "ship this" says how much faster the pick is than that row."""
    from pathlib import Path

    from quantbench import replicate as R
    from quantbench.export import read_sidecar
    from quantbench.report import recommendation_lines
    from quantbench.results import BenchResults, LatencyStats, ModelResult, derive
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from support import fakert
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "fake=support.fakert")
    seen = []
    real_export = fakert.export

    def export(model, out_dir, calib_batches, base, scheme=None, options=None):
        seen.append((out_dir.name, model.layer4[0].conv2.kernel_size, scheme))
        return real_export(model, out_dir, calib_batches, base, scheme, options)

    monkeypatch.setattr(fakert, "export", export)
    for resume in (False, True):
        cfg = R.ReplicateConfig(output=tmp_path, checkpoint=tiny_checkpoint, runtimes=("fake",), plain=("fake",),
                                quantize=QuantizeConfig(method="static", calib_samples=16, observer="minmax"),
                                resume=resume)
        files = R._runtime_rows(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "models")
        assert [f.relative_to(tmp_path).as_posix() for f in files] == [
            "models/fake-fp32.fake", "models/fake-int8.fake", "models/plain/fake-int8.fake"]
    assert [(d, k) for d, k, _ in seen] == [("models", (1, 1)), ("plain", (3, 3))]  # resume exported nothing
    assert seen[0][2].observer == "minmax" and seen[1][2] is None  # the plain row: the runtime's own calibration
    side = read_sidecar(files[2])
    assert side["label"] == "fake-int8-plain" and side["plain"] is True and side["target"]["prune"] is False
    assert side["pruning"] == {"applied": False, "why": "plain row: the runtime alone"}  # not "--no-prune"

    def row(label, ms, dtype="int8", plain=False):
        lat = {1: LatencyStats.of([ms] * 5)}
        return ModelResult(label=label, file=f"{label}.fake", method="static", flow="fake", runtime="fake",
                           dtype=dtype, file_bytes=1, accuracy=80.0, latency=lat, sidecar={"plain": plain})
    res = BenchResults(machine={}, config={}, created="", models=derive(
        [row("fake-fp32", 4.0, "fp32"), row("fake-int8", 1.0), row("fake-int8-plain", 1.5, plain=True)]))
    (line,) = recommendation_lines(res)
    assert "**fake-int8**" in line and "1.50x the speed of fake-int8-plain" in line


def test_a_plain_row_that_cannot_be_made_says_which_option_asked_for_it(
        tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    from pathlib import Path

    from quantbench import replicate as R
    from quantbench.errors import QuantbenchError
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from support import fakert
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "fake=support.fakert")

    def export(model, out_dir, calib_batches, base, scheme=None, options=None):
        raise QuantbenchError("fake export needs the optional runtimes")
    monkeypatch.setattr(fakert, "export", export)
    cfg = R.ReplicateConfig(output=tmp_path, checkpoint=tiny_checkpoint, runtimes=(), plain=("fake",),
                            quantize=QuantizeConfig(method="static", calib_samples=16))
    with pytest.raises(QuantbenchError, match=r"^runtime fake \(--plain\): fake export needs"):
        R._runtime_rows(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "models")
