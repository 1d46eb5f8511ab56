"""quantbench.apart: a runtime's files made in a process of its own are the files and records
make() gives in this one; its errors come back as the same error, its death as one line."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from quantbench.apart import make_apart
from quantbench.data import DataSource
from quantbench.deploy import Source, Target, make
from quantbench.errors import QuantbenchError
from quantbench.quantize import QuantizeConfig
from quantbench.record import same_making

pytestmark = pytest.mark.slow  # each test starts a Python that imports torch


@pytest.fixture
def fake_runtime(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the child finds the plug-in too
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "fake=support.fakert")
    return Target("fake", "static", QuantizeConfig(method="static", calib_samples=16))


def test_made_apart_is_what_make_makes_here(fake_runtime, tiny_checkpoint, tiny_data_dir, tmp_path):
    data = DataSource(tiny_data_dir, image_cache=None)
    apart = make_apart(tiny_checkpoint, data, fake_runtime, tmp_path / "apart")
    here = make(Source.from_checkpoint(tiny_checkpoint, data.load(progress=False)), fake_runtime, tmp_path / "here")
    assert [r.file for r in apart] == ["fake-fp32.fake", "fake-int8.fake"]
    assert all((tmp_path / "apart" / r.file).is_file() and (tmp_path / "apart" / (r.file + ".json")).is_file()
               for r in apart)

    def without_float_noise(r):  # the pruning check's max |difference| varies in the last bits
        def strip(d):
            return {k: strip(v) if isinstance(v, dict) else [strip(x) if isinstance(x, dict) else x for x in v]
                    if isinstance(v, list) else v for k, v in d.items() if k != "max_abs_diff"}
        return dataclasses.replace(r, pruning=strip(r.pruning))
    assert len(apart) == len(here) and all(same_making(without_float_noise(a), without_float_noise(b))
                                           for a, b in zip(apart, here))
    assert apart[0].pruning["applied"] and apart[0].pruning["layers"]  # the same pruning, redone there


def test_an_error_in_the_child_is_the_same_error_here(fake_runtime, tiny_data_dir, tmp_path):
    with pytest.raises(QuantbenchError, match="not found|No such file|does not exist"):
        make_apart(tmp_path / "missing.pth", DataSource(tiny_data_dir, image_cache=None), fake_runtime,
                   tmp_path / "out")


def test_a_child_that_dies_is_one_line(fake_runtime, tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_FAKE_CRASH", "1")
    with pytest.raises(QuantbenchError, match=r"^making the fake files stopped: their process was killed by signal 9"):
        make_apart(tiny_checkpoint, DataSource(tiny_data_dir, image_cache=None), fake_runtime, tmp_path / "out")
    assert not (tmp_path / "out" / "fake-int8.fake").exists()


class NeedsTwo(Exception):
    """A library's exception that pickles but does not unpickle (its __init__ wants two arguments)."""

    def __init__(self, what, code):
        super().__init__(f"{what} (code {code})")


def _run_child_here(monkeypatch, tmp_path, tiny_checkpoint, tiny_data_dir, target, fails_with):
    """The child's work (apart._answer) in this process, with deploy.make raising `fails_with`;
    returns what the parent would read back."""
    import pickle

    from quantbench import apart, deploy

    def failing_make(*args, **kwargs):
        raise fails_with
    monkeypatch.setattr(deploy, "make", failing_make)
    job = pickle.dumps((str(tiny_checkpoint), DataSource(tiny_data_dir, image_cache=None), target,
                        str(tmp_path / "out"), None, False))
    return pickle.loads(apart._answer(job))


def test_ctrl_c_in_the_child_prints_no_traceback(fake_runtime, tiny_checkpoint, tiny_data_dir, tmp_path,
                                                 monkeypatch, capfd):
    """Ctrl-C reaches the child too: it goes back as KeyboardInterrupt, without a traceback on
    the terminal (only a bug's traceback is printed there)."""
    ok, value = _run_child_here(monkeypatch, tmp_path, tiny_checkpoint, tiny_data_dir, fake_runtime,
                                KeyboardInterrupt())
    assert not ok and isinstance(value, KeyboardInterrupt)
    assert "Traceback" not in capfd.readouterr().err


def test_an_error_that_does_not_unpickle_comes_back_as_one_line(fake_runtime, tiny_checkpoint, tiny_data_dir,
                                                                tmp_path, monkeypatch, capfd):
    """An exception pickle.dumps takes but pickle.loads cannot rebuild would fail in the parent
    as an unrelated TypeError; it comes back as its one line instead."""
    ok, value = _run_child_here(monkeypatch, tmp_path, tiny_checkpoint, tiny_data_dir, fake_runtime,
                                NeedsTwo("the library broke", 7))
    assert not ok and isinstance(value, QuantbenchError)
    assert str(value) == "NeedsTwo: the library broke (code 7)"
    assert "Traceback" in capfd.readouterr().err  # a bug: its traceback is still printed by the child
