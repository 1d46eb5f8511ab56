"""The measuring worker: deadlines, dying with its parent, nothing left behind by a failed load.

This module is also the runtime the workers load (registered through QUANTBENCH_RUNTIMES as
`hang=test_worker`): a `.hang` file holds {"load": "ok" | "fail" | "hang", "call_s": S}; the
model sleeps S seconds per call after its first (loading makes one call)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here exports through a runtime or waits on subprocesses

TESTS = str(Path(__file__).parent)
NAME = "hang"
SUFFIXES = (".hang",)


def files(path):
    return [Path(path)]


def how_to_load(name):
    return f"json.load(open({name!r}))"


def load(path, threads=None):
    spec = json.loads(Path(path).read_text())
    if spec["load"] == "fail":
        raise ValueError("this model does not load")
    calls = []

    def model(x):
        calls.append(1)
        if spec["load"] == "hang" or len(calls) > 1:
            time.sleep(spec.get("call_s", 3600))
        return torch.zeros(x.shape[0], 3)
    return model


def op_counts(path, model=None):
    from quantbench.results import OpCounts
    return OpCounts()


@pytest.fixture
def plugged(monkeypatch):
    monkeypatch.setenv("QUANTBENCH_RUNTIMES", "hang=test_worker")
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _model(tmp_path, load="ok", call_s=3600) -> Path:
    path = tmp_path / f"{load}.hang"
    path.write_text(json.dumps({"load": load, "call_s": call_s}))
    return path


def _children() -> dict[int, str]:
    """pid -> state of this process's children (Z: exited but not reaped)."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid():
            out[int(d.name)] = fields[0]
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_a_worker_that_fails_to_load_leaves_no_child_and_no_open_files(tmp_path, plugged):
    from quantbench.errors import QuantbenchError
    from quantbench.worker import Worker
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(QuantbenchError, match="measuring fail.hang failed: .*this model does not load"):
        Worker(_model(tmp_path, "fail"), 1, (3, 4, 4))
    assert set(os.listdir("/proc/self/fd")) == before
    assert _children() == {}


def test_a_call_past_its_deadline_stops_the_worker(tmp_path, plugged):
    from quantbench.errors import QuantbenchError
    from quantbench.worker import Worker
    w = Worker(_model(tmp_path), 1, (3, 4, 4), timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(QuantbenchError, match=r"measuring ok.hang failed: no answer to 'time' within 1 s"):
        w.ask(op="time", batch=1, n=1)
    assert time.monotonic() - t0 < 10
    assert w.proc.returncode is not None and w.proc.stdout.closed  # killed and reaped
    with pytest.raises(QuantbenchError, match="no answer to 'load' within 1 s"):
        Worker(_model(tmp_path, "hang"), 1, (3, 4, 4), load_timeout_s=1.0)
    assert _children() == {}


def test_bench_does_not_hang_on_a_model_that_hangs(tmp_path, plugged, monkeypatch):
    from quantbench import bench as B
    from quantbench.errors import QuantbenchError
    from quantbench.export import write_sidecar
    path = _model(tmp_path, call_s=3600)
    write_sidecar(path, label="slowpoke", method="static", flow="test", runtime="hang", dtype="int8")
    cfg = B.BenchConfig(min_runs=5, timing_s=0.1, processes=1, accuracy=False, progress=False, warmup=0)
    assert B.worker_timeouts(cfg)["call"] == 60.0  # at least a minute, 10x the budget
    monkeypatch.setattr(B, "worker_timeouts", lambda cfg: {"call": 1.0, "load": 30.0, "accuracy": 30.0})
    t0 = time.monotonic()
    with pytest.raises(QuantbenchError, match="measuring ok.hang failed: no answer to 'time' within 1 s"):
        B.bench([path], cfg)
    assert time.monotonic() - t0 < 30
    assert _children() == {}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_worker_dies_with_its_parent(tmp_path, plugged):
    """A parent killed with SIGKILL (no cleanup runs) while its worker is busy in a model call."""
    model = _model(tmp_path)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from quantbench.worker import Worker
        w = Worker(Path({str(model)!r}), 1, (3, 4, 4))
        print(w.proc.pid, flush=True)
        w.ask(op="time", batch=1, n=1)  # hangs
        """)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_measuring_workers_share_the_decoded_image_cache(tmp_path, plugged, tiny_data_dir):
    """The accuracy op reads a pretrained model's images through the image cache it is given:
    the first worker writes the shards, the next one (another row, the next run) reads them."""
    from quantbench import data
    from quantbench.export import write_sidecar
    from quantbench.worker import Worker
    from conftest import TINY_CLASSES
    pre = data.Preprocess(crop=16, resize=20)
    path = _model(tmp_path, call_s=0)
    write_sidecar(path, label="zeros", method="origin", flow="test", runtime=NAME, dtype="fp32",
                  classes=list(TINY_CLASSES), input_shape=[3, 16, 16], preprocess=pre.to_dict())
    cache = tmp_path / "images"
    answers = []
    for _ in range(2):
        w = Worker(path, 1, (3, 16, 16), timeout_s=60)
        try:
            answers.append(w.ask(op="accuracy", data_dir=str(tiny_data_dir), image_cache=str(cache), image_cache_gb=1,
                                 batch_size=5, samples=None, seed=0))
            if len(answers) == 1:
                shards = {p: p.stat().st_ino for p in cache.glob("*.npy")}
        finally:
            w.close()
    # 24 test images: one shard, read by the second worker, not written again (same inode)
    assert len(shards) == 1 and {p: p.stat().st_ino for p in cache.glob("*.npy")} == shards
    assert answers[0] == answers[1] and answers[0]["n"] == 24


def test_a_workers_peak_memory_is_its_own_not_its_parents():
    # ru_maxrss is inherited through fork and kept by exec: a worker started by a 2.5 GB replicate
    # reported 2.5 GB for every file
    import subprocess
    import sys
    code = ("import subprocess, sys\n"
            "b = bytearray(300 * 2**20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "print(subprocess.run([sys.executable, '-c', 'from quantbench.worker import _rss_mb; print(_rss_mb())'],"
            " capture_output=True, text=True, check=True).stdout)")
    child_peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.strip())
    assert child_peak < 250  # its own imports only, not the parent's 300 MB
