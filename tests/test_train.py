"""quantbench.train: the smoke run's outputs, exact resume, and a 2-process DDP run."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantbench import models
from quantbench.errors import QuantbenchError
from quantbench.train import get_recipe, train

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_acc", "lr", "epoch_s", "elapsed_s", "ema", "images",
               "images_per_s", "best_test_acc", "best_at_s"}
RESULT_KEYS = ("train_loss", "train_acc", "test_acc", "lr")  # those not depending on wall time


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_outputs(tiny_train_run):
    run = tiny_train_run
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) == METRIC_KEYS
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert 0 <= r["train_acc"] <= 100 and 0 <= r["test_acc"] <= 100
        assert r["lr"] == pytest.approx(0.02) and r["ema"] is False and r["epoch_s"] >= 0
    assert rows[1]["elapsed_s"] >= rows[0]["elapsed_s"]
    # time to accuracy: the best so far and when it was first reached; throughput of each epoch
    for i, r in enumerate(rows):
        best = max(rows[:i + 1], key=lambda h: h["test_acc"])
        assert r["best_test_acc"] == best["test_acc"] and r["best_at_s"] == round(best["elapsed_s"], 1)
        assert r["images"] == 48 and r["images_per_s"] == pytest.approx(48 / r["epoch_s"], rel=0.01)

    last = torch.load(run / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["history"] == rows
    assert last["meta"]["recipe"] == dataclasses.asdict(get_recipe("smoke", epochs=2))
    assert last["best_acc"] == max(r["test_acc"] for r in rows)

    model, meta = models.load_checkpoint(run / "best.pth")
    best = max(rows, key=lambda r: r["test_acc"])  # first epoch reaching the best accuracy
    assert meta["arch"] == "resnet10" and meta["classes"] == ["blue", "green", "red"]
    assert meta["epochs"] == best["epoch"] and meta["test_acc"] == best["test_acc"]
    if best["epoch"] == 2:  # then best.pth holds the same weights as last.pth
        assert all(torch.equal(v, last["model"][k]) for k, v in model.state_dict().items())

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("test_acc")] == \
        [(r["epoch"], round(r["test_acc"], 4)) for r in rows]


def test_smoke_model_predicts_the_colour(tiny_trained_checkpoint, tiny_dataset):
    # The classes are colours: even 2 smoke epochs must beat chance (33 %) clearly.
    from quantbench.evaluate import accuracy
    model, _ = models.load_checkpoint(tiny_trained_checkpoint)
    assert accuracy(model, tiny_dataset, progress=False) >= 60


def _recipe():
    # Momentum, OneCycle and an EMA from epoch 2: optimizer, scheduler and EMA state all must resume.
    return get_recipe("smoke", epochs=3).replace(schedule="onecycle", ema_epoch=2, ema_decay=0.5)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    recipe = _recipe()
    full = train(tiny_dataset, recipe, tmp_path / "full", arch="resnet10", progress=False)

    def interrupt_at_3(epoch, model):
        if epoch == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, recipe, tmp_path / "cut", arch="resnet10", epoch_hook=interrupt_at_3,
              progress=False)
    cut = tmp_path / "cut"
    assert torch.load(cut / "last.pth", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in _metrics(cut)] == [1, 2]

    seen = []
    resumed = train(tiny_dataset, recipe, cut, arch="resnet10", resume=True, progress=False,
                    epoch_hook=lambda epoch, model: seen.append(epoch))
    assert seen == [3]  # it continued, it did not start over
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    la, lb = (torch.load(p / "last.pth", weights_only=True) for p in (tmp_path / "full", cut))
    for k in la["model"]:
        assert torch.allclose(la["model"][k].float(), lb["model"][k].float(), atol=1e-6), k
    assert la["ema"] is not None and la["ema"]["n_averaged"] == lb["ema"]["n_averaged"]
    assert la["scheduler"]["last_epoch"] == lb["scheduler"]["last_epoch"]
    assert resumed.best_acc == full.best_acc
    ma, mb = _metrics(tmp_path / "full"), _metrics(cut)
    assert [r["epoch"] for r in mb] == [1, 2, 3] and [r["ema"] for r in mb] == [False, True, True]
    for ra, rb in zip(ma, mb):
        for k in RESULT_KEYS:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["epoch"], k)

    # Resuming a finished run trains nothing and duplicates no metrics.
    again = train(tiny_dataset, recipe, cut, arch="resnet10", resume=True, progress=False,
                  epoch_hook=lambda epoch, model: seen.append(epoch))
    assert seen == [3] and len(again.history) == 3 and len(_metrics(cut)) == 3

    with pytest.raises(QuantbenchError, match="another recipe"):
        train(tiny_dataset, recipe.replace(lr=0.5), cut, arch="resnet10", resume=True, progress=False)
    with pytest.raises(QuantbenchError, match="written with another seed: 0, not 1"):
        train(tiny_dataset, recipe, cut, arch="resnet10", seed=1, resume=True, progress=False)


def test_resume_unreadable_last(tiny_dataset, tmp_path):
    (tmp_path / "last.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(QuantbenchError, match="cannot resume"):
        train(tiny_dataset, get_recipe("smoke"), tmp_path, arch="resnet10", resume=True, progress=False)


@pytest.mark.slow
def test_ddp_two_processes(tiny_data_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "quantbench", "train",
         "--preset", "smoke", "--arch", "resnet10", "--data-dir", str(tiny_data_dir),
         "--output", str(out), "--no-progress", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Only rank 0 evaluates, prints and writes: one line per epoch, one event file.
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]
    assert proc.stdout.count("epoch 1/2") == 1 and proc.stdout.count("best test accuracy") == 1
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in out.iterdir()) == [".quantbench.lock", "best.pth", "last.pth", "metrics.jsonl",
                                                     "tensorboard"]
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and not any(k.startswith("module.") for k in last["model"])
    model, _ = models.load_checkpoint(out / "best.pth")
    assert model.fc.out_features == 3


# ---------------------------------------------------------------- options refused before any data is read
@pytest.fixture
def no_data(monkeypatch):
    from quantbench.data import DataSource

    def read(*args, **kwargs):
        raise AssertionError("data was read before the options were checked")
    monkeypatch.setattr(DataSource, "load", read)


def _train_cli(capsys, *argv) -> tuple[int, str]:
    from quantbench.cli import main
    rc = main(["train", "--preset", "smoke", "--arch", "resnet10", "--no-progress", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_train_refuses_to_replace_a_run(capsys, tiny_train_run, tiny_data_dir, tmp_path, no_data):
    """A second run without --resume silently replaced best.pth with a worse model (issue 21)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_train_run, run)
    before = {n: (run / n).read_bytes() for n in ("best.pth", "last.pth", "metrics.jsonl")}
    rc, err = _train_cli(capsys, "--data-dir", tiny_data_dir, "--epochs", "1", "--output", run)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert {n: (run / n).read_bytes() for n in before} == before


def test_train_overwrite_replaces_the_run(capsys, tiny_train_run, tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_train_run, run)
    rc, err = _train_cli(capsys, "--data-dir", tiny_data_dir, "--epochs", "1", "--output", run, "--overwrite")
    assert rc == 0, err
    assert [r["epoch"] for r in _metrics(run)] == [1]


@pytest.mark.parametrize("argv, message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--image-size", "1"], "too small to train"),
    (["--image-size", "4"], "images of 4x4 are too small to train with the smoke recipe"),
    (["--image-size", "0"], "--image-size must be at least 1"),
])
def test_bad_train_options_are_one_line(capsys, tiny_data_dir, tmp_path, no_data, argv, message):
    rc, err = _train_cli(capsys, "--data-dir", tiny_data_dir, "--output", tmp_path / "out", *argv)
    assert rc == 2 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("quantbench: error: ") and message in line


def test_images_too_small_for_the_augmentation(tiny_dataset, tmp_path):
    """Native images smaller than the crop padding: one line from train(), not a traceback from F.pad."""
    crop = lambda split: dataclasses.replace(split, images=split.images[:, :, :4, :4])
    small = dataclasses.replace(tiny_dataset, train=crop(tiny_dataset.train), test=crop(tiny_dataset.test))
    with pytest.raises(QuantbenchError, match="images of 4x4 are too small"):
        train(small, get_recipe("smoke", epochs=1), tmp_path, arch="resnet10", progress=False)
