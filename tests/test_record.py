"""quantbench.record: the sidecar every deployment file carries, written and read in one place,
with a schema version; older sidecars still load, bad ones are one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantbench.errors import QuantbenchError
from quantbench.record import FileRecord, read_record, sidecar_path

DATA = Path(__file__).parent / "data"


def test_a_sidecar_from_the_previous_version_still_loads(tmp_path):
    path = tmp_path / "ptq-s.pt"
    shutil.copy(DATA / "legacy-v1-ptq-s.pt.json", sidecar_path(path))
    rec = read_record(path)
    assert rec.schema_version == 1 and rec.label == "ptq-s" and rec.runtime == "torchscript"
    assert rec.engine == "fbgemm" and rec.shape == (3, 32, 32) and rec.calibration["samples"] == 16
    assert rec.config["calib_samples"] == 16 and rec.target is None  # made before targets were recorded


def test_a_record_round_trips_and_keeps_a_runtimes_own_fields(tmp_path):
    rec = FileRecord(file="m.onnx", label="onnxrt-int8", method="static", dtype="int8", runtime="onnxruntime",
                     input_shape=[3, 32, 32], extra={"opset": 17, "max_batch": 8})
    d = rec.to_dict()
    assert d["opset"] == 17 and d["schema_version"] == 2 and "extra" not in d
    assert FileRecord.from_dict(d) == rec


@pytest.mark.parametrize("bad, match", [
    ([], "must hold a JSON object"), (None, "must hold a JSON object"),
    ({"max_batch": -5}, "max_batch"), ({"max_batch": "abc"}, "max_batch"),
    ({"image_size": 20000}, "image_size"), ({"input_shape": [3, 20000, 20000]}, "input_shape"),
    ({"label": 5}, "label"), ({"classes": "abc"}, "classes"), ({"schema_version": 99}, "newer quantbench"),
])
def test_a_bad_sidecar_is_one_line(bad, match, tmp_path):
    path = tmp_path / "m.pt"
    sidecar_path(path).write_text(json.dumps(bad))
    with pytest.raises(QuantbenchError, match=match) as e:
        read_record(path)
    assert "\n" not in str(e.value) and str(sidecar_path(path)) in str(e.value)


def test_an_onnx_sidecar_of_the_previous_version_keeps_its_pre_pass_note(tmp_path):
    """Version 1 ONNX sidecars named ORT's pre-pass "preprocess", now the model's preprocessing."""
    path = tmp_path / "onnx-int8.onnx"
    sidecar_path(path).write_text(json.dumps({"label": "onnxrt-int8", "preprocess": "ONNX shape inference"}))
    rec = read_record(path)
    assert rec.preprocess is None and rec.get("quant_preprocess") == "ONNX shape inference"
