"""Recipes that fit the data: scaled to a small dataset they train, and a run that diverges or
stays near chance says so (in the checkpoint, and in the report of everything made from it)."""
from __future__ import annotations

import math

import pytest
import torch

from quantbench.train import PRESETS, get_recipe, health_warnings, train


def test_fit_leaves_cifar10_alone_and_scales_small_data():
    fast = PRESETS["fast"]
    assert fast.fit(50_000) == fast
    small = fast.fit(720)
    assert small.batch_size == 32 and 720 // small.batch_size >= 16
    assert small.lr == pytest.approx(fast.lr * 32 / 256)                  # linear scaling
    assert small.epochs * (720 // 32) >= fast.min_steps                   # enough optimizer steps
    assert small.fit(720) == small                                        # idempotent
    mine = get_recipe("fast", epochs=8, lr=0.01).fit(720)                 # what the user set stays
    assert mine.epochs == 8 and mine.lr == 0.01 and mine.batch_size == 32
    assert PRESETS["seed"].fit(720) == PRESETS["seed"]                    # the original's recipe is exact


@pytest.mark.slow
def test_a_scaled_recipe_learns_an_easy_task_from_a_few_hundred_images(tmp_path):
    from conftest import write_tiny_image_folder

    from quantbench.data import load_dataset
    data = load_dataset(write_tiny_image_folder(tmp_path / "d", train_per_class=100, test_per_class=10),
                        progress=False)
    # the fast preset with a shorter floor of steps, to keep the test short
    recipe = PRESETS["fast"].replace(min_steps=120, channels_last=False)
    result = train(data, recipe, tmp_path / "run", arch="resnet10", progress=False)
    used = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["meta"]["recipe"]
    assert used["batch_size"] == 16 and used["lr"] == pytest.approx(0.4 * 16 / 256)  # 18 steps an epoch
    assert result.history[-1]["epoch"] == max(15, math.ceil(120 / (300 // 16)))
    assert result.best_acc >= 90 and result.warnings == []


def test_health_warnings():
    ok = [{"train_loss": 1.0, "test_acc": 80.0}, {"train_loss": 0.5, "test_acc": 90.0}]
    assert health_warnings(ok, 10) == []
    diverged = [{"train_loss": 1.2, "test_acc": 35.0}, {"train_loss": 30.0, "test_acc": 31.0}]
    w = health_warnings(diverged, 5)
    assert any("diverging" in x for x in w) and any("near chance" in x for x in w)


def test_warnings_reach_the_checkpoint_and_the_report(tiny_data_dir, tmp_path, capsys):
    """A run that learns nothing (lr far too small, 1 epoch): the checkpoint says so, and so do
    the sidecar and the report of a model quantized from it."""
    from quantbench.cli import main
    from quantbench.report import render
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(tiny_data_dir), "--preset", "smoke", "--arch", "resnet10",
                 "--epochs", "1", "--lr", "1e-9", "--output", str(run), "--no-progress"]) == 0
    assert "WARNING: best test accuracy" in capsys.readouterr().err
    meta = torch.load(run / "best.pth", weights_only=True)["meta"]
    assert any("near chance" in w for w in meta["warnings"])
    out = tmp_path / "ptq-d.pt"
    assert main(["quantize", str(run / "best.pth"), "--method", "dynamic", "--output", str(out),
                 "--no-progress"]) == 0
    from quantbench.bench import describe_model
    from quantbench.results import BenchResults
    row = describe_model(out)
    assert any("near chance" in w for w in row.sidecar["warnings"])
    text = render(BenchResults(machine={}, config={}, created="now", models=[row]))
    assert text.index("**Warning:** best test accuracy") < text.index("| Model |")


def test_qat_epochs_the_user_sets_are_kept_on_cifar10_sized_data():
    """`--qat-epochs 1` means one epoch: the fast schedule's minimum of 200 steps (which fit()
    enforces on its 25,000-image epochs of batch 128: 195 steps) must not raise it to 2."""
    from quantbench.quantize import QuantizeConfig, qat_recipe
    assert qat_recipe(QuantizeConfig(method="qat")).fit(50_000).epochs == 2  # the schedule's own
    one = qat_recipe(QuantizeConfig(method="qat", qat_epochs=1))
    assert one.fit(50_000).epochs == 1 and "epochs" in one.fixed
    assert qat_recipe(QuantizeConfig(method="qat", qat_epochs=3)).fit(500).epochs == 3
