"""quantbench.evaluate: predictions kept and reused (PredictionMemo), through bench."""
from __future__ import annotations

import json

from quantbench import bench as B
from quantbench.data import DataSource
from quantbench.evaluate import PredictionMemo

from test_bench import SLEEPY, _colour_model, _ColourWorker


def _bench(files, data):
    _ColourWorker.log, _ColourWorker.seen = [], {}
    cfg = B.BenchConfig(data=data, eval_samples=20, processes=1, min_runs=2, round_s=0.01, warmup=0, pin=False,
                        progress=False)
    res = B.bench(files, cfg)
    measured = sorted(name for name, op, _ in _ColourWorker.log if op == "accuracy")
    return res, measured


def test_a_file_measured_before_on_the_same_images_is_not_evaluated_again(tmp_path, monkeypatch, tiny_data_dir):
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    monkeypatch.setattr(B, "Worker", _ColourWorker)
    files = [_colour_model(tmp_path, "fp32", 0.0, "fp32"), _colour_model(tmp_path, "int8-blue", 100.0, "int8")]
    data = DataSource(tiny_data_dir, image_cache=tmp_path / "cache")
    first, measured = _bench(files, data)
    assert measured == ["fp32", "int8-blue"] and first.config["accuracy_reused"] == {}
    second, measured = _bench(files, data)  # the next run (or replicate --resume): nothing evaluated
    assert measured == []
    reused = second.config["accuracy_reused"]
    assert sorted(reused) == ["fp32", "int8-blue"] and all(str(tmp_path / "cache") in v for v in reused.values())
    for a, b in zip(first.models, second.models):
        assert (a.accuracy, a.accuracy_n, a.agreement, a.accuracy_delta_ci) == \
               (b.accuracy, b.accuracy_n, b.agreement, b.accuracy_delta_ci)
    # a file whose bytes changed is measured again; so is everything on another subset
    files[1].write_text(json.dumps({"ms": 0, "bias": 50.0}))
    assert _bench(files, data)[1] == ["int8-blue"]
    _ColourWorker.log = []
    B.bench(files, B.BenchConfig(data=data, eval_samples=19, processes=1, min_runs=2, round_s=0.01, warmup=0,
                                 pin=False, progress=False))
    assert sorted(n for n, op, _ in _ColourWorker.log if op == "accuracy") == ["fp32", "int8-blue"]
    # off with the image cache
    assert _bench(files, DataSource(tiny_data_dir, image_cache="off"))[1] == ["fp32", "int8-blue"]


def test_changed_test_images_or_an_unreadable_memo_mean_measuring_again(tmp_path, monkeypatch, tiny_data_copy):
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    path = _colour_model(tmp_path, "fp32", 0.0, "fp32")
    data = DataSource(tiny_data_copy, image_cache=tmp_path / "cache")
    q = dict(batch_size=500, samples=None, seed=0)
    memo = PredictionMemo(path, data, q)
    memo.put({"accuracy": 50.0, "n": 2, "total": 2, "indices": [0, 1], "predictions": [0, 1], "labels": [0, 0]})
    assert PredictionMemo(path, data, q).get()["accuracy"] == 50.0
    assert PredictionMemo(path, data, {**q, "seed": 1}).get() is None
    victim = next((tiny_data_copy / "test" / "red").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")  # one test image changed: another fingerprint
    assert PredictionMemo(path, data, q).get() is None
    memo.file.write_text('{"accuracy": 50.0, "n": 3')  # truncated
    assert memo.get() is None


def test_kept_predictions_count_toward_the_image_cache_cap(tmp_path, monkeypatch, tiny_data_dir):
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    answer = {"accuracy": 50.0, "n": 2, "total": 2, "indices": [0, 1], "predictions": [0, 1], "labels": [0, 0]}
    data = DataSource(tiny_data_dir, image_cache=tmp_path / "cache", image_cache_gb=150 / 2**30)  # 150 bytes
    memos = [PredictionMemo(_colour_model(tmp_path, f"m{i}", float(i), "int8"), data, {}) for i in range(3)]
    for m in memos:
        m.put(answer)
    left = list((tmp_path / "cache" / "predictions").glob("*.json"))
    assert 75 < memos[-1].file.stat().st_size <= 150  # one fits, two do not: the newest stays
    assert left == [memos[-1].file]


def test_an_fp32_file_made_again_from_the_same_weights_is_not_evaluated_again(tmp_path, monkeypatch,
                                                                              tiny_data_dir):
    """TorchScript writes other bytes each time (a serialization id), so the fp32 row of the next
    run on the same weights is known by what made it: the checkpoint's sha256 and the target."""
    from conftest import TINY_CLASSES
    from quantbench.export import write_sidecar
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    data = DataSource(tiny_data_dir, image_cache=tmp_path / "cache")

    def made(run, sha, dtype="fp32", bias=0.0):
        path = tmp_path / run / "fp32.sleep"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"ms": 0, "bias": bias, "serialization_id": run}))
        write_sidecar(path, label="fp32", method="origin", flow="eager", runtime="sleepy", dtype=dtype,
                      classes=list(TINY_CLASSES), input_shape=[3, 32, 32], source_sha256=sha,
                      source_checkpoint=str(tmp_path / run / "best.pth"), target={"maker": "eager", "method": "origin"})
        return PredictionMemo(path, data, {"samples": None})
    answer = {"accuracy": 50.0, "n": 2, "total": 2, "indices": [0, 1], "predictions": [0, 1], "labels": [0, 0]}
    made("run1", "a" * 64).put(answer)
    assert made("run2", "a" * 64).get() == answer
    assert made("run3", "b" * 64).get() is None          # other weights
    assert made("run4", "a" * 64, dtype="int8").get() is None  # int8 files: by their bytes only


def test_predictions_kept_on_another_cpu_are_not_reused(tmp_path, monkeypatch, tiny_data_dir):
    """int8 kernels differ by instruction set (without VNNI, fbgemm's u8 x s8 products saturate in
    int16: quantbench.cpu), so a file's predictions kept in a cache folder shared between machines
    (a home directory on NFS) must not serve a machine with another CPU or other int8/bf16 support."""
    from quantbench import cpu
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", SLEEPY)
    path = _colour_model(tmp_path, "int8-blue", 100.0, "int8")
    data = DataSource(tiny_data_dir, image_cache=tmp_path / "cache")
    q = dict(batch_size=500, samples=None, seed=0)
    answer = {"accuracy": 50.0, "n": 2, "total": 2, "indices": [0, 1], "predictions": [0, 1], "labels": [0, 0]}
    PredictionMemo(path, data, q).put(answer)
    assert PredictionMemo(path, data, q).get() == answer  # the same machine
    vnni = cpu.has_vnni()
    monkeypatch.setattr(cpu, "has_vnni", lambda: not vnni)  # the same model name, VNNI masked (a VM)
    assert PredictionMemo(path, data, q).get() is None
    monkeypatch.setattr(cpu, "has_vnni", lambda: vnni)
    monkeypatch.setattr(cpu, "cpu_model", lambda: "Another CPU @ 2.0GHz")
    assert PredictionMemo(path, data, q).get() is None


def test_large_images_are_evaluated_in_fewer_per_batch_with_the_same_predictions(tiny_dataset, monkeypatch):
    # at 224x224 the default 500 images a batch held 1.6 GB of ResNet-18's first activation alone
    import torch

    from quantbench import evaluate

    seen = []

    def model(x):
        seen.append(len(x))
        return x.float().mean(dim=(2, 3))  # the brightest channel: a prediction that depends on the image

    assert evaluate.batch_for((3, 224, 224), 500) == 41 and evaluate.batch_for((3, 32, 32), 500) == 500
    everything = evaluate.predict(model, tiny_dataset, batch_size=500, progress=False)
    assert max(seen) == len(tiny_dataset.test)
    seen.clear()
    monkeypatch.setattr(evaluate, "EVAL_PIXELS", 7 * 32 * 32)  # 7 images of 32x32 a batch
    bounded = evaluate.predict(model, tiny_dataset, batch_size=500, progress=False)
    assert max(seen) == 7 and sum(seen) == len(tiny_dataset.test)
    assert torch.equal(bounded[0], everything[0]) and torch.equal(bounded[1], everything[1])
