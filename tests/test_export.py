"""quantbench.export: the calibration images other runtimes' calibrators read (CalibrationArrays)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.errors import QuantbenchError
from quantbench.export import CalibrationArrays, calibration_arrays


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, 8, 8, generator=g) for n in (4, 4, 3)]


def test_small_calibration_sets_stay_in_memory():
    batches = _batches()
    calib = calibration_arrays((x, torch.zeros(len(x))) for x in batches)  # (x, y) pairs, as Batches yields
    assert not calib.on_disk and len(calib) == 3 and calib.samples == 11
    for a, x in zip(calib, batches):
        assert a.dtype == np.float32 and np.array_equal(a, x.numpy())
    assert calibration_arrays(calib) is calib  # already arrays: not copied again


def test_large_calibration_sets_are_read_back_from_disk_a_batch_at_a_time():
    """Past the in-memory bound every batch goes to an unlinked temporary file, in order, and
    comes back equal, as often as a calibrator iterates, by index, slice or iteration."""
    batches = _batches()
    calib = CalibrationArrays(iter(batches), in_memory_bytes=5 * 3 * 8 * 8 * 4)  # room for one batch only
    assert calib.on_disk and len(calib) == 3 and calib.samples == 11
    for _ in range(2):  # calibrators make several passes (NNCF, ExecuTorch's check)
        assert all(np.array_equal(a, x.numpy()) for a, x in zip(calib, batches))
    assert np.array_equal(calib[-1], batches[-1].numpy())
    assert [len(a) for a in calib[1:]] == [4, 3]
    calib[0][0, 0, 0, 0] = 7.0  # a calibrator may write into what it is given: its own copy
    assert np.array_equal(calib[0], batches[0].numpy())
    # the first images for a batch check: across batch boundaries, reading only what it needs
    assert np.array_equal(calib.first(6), torch.cat(batches)[:6].numpy())
    assert len(calib.first(100)) == 11
    calib.close()


def test_no_calibration_images_is_one_line():
    with pytest.raises(QuantbenchError, match="needs calibration images"):
        calibration_arrays(iter([]))
