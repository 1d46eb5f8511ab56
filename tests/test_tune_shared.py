"""tune --storage: the search shared by several processes on Optuna's storage (SQLite, a journal
file, PostgreSQL), real storage and real worker processes: every candidate made exactly once,
the same candidates and the same pick as one process, a SIGKILLed worker's trial made again by
another worker, files consistent with the records."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import write_tiny_image_folder
from quantbench.cli import main
from quantbench.errors import QuantbenchError

optuna = pytest.importorskip("optuna", reason="the search extra (pip install 'quantbench[search]') is not installed")

FAST = ["--flows", "fx", "--runtimes", "none", "--val-samples", "30", "--calib-samples", "32",
        "--timing-seconds", "0.4", "--no-progress"]
# an impossible budget runs every stage: default, fp32 reference, 5 calibration choices, 1 fallback set
SEARCH = ["--max-drop", "-50", "--max-fallback", "1", *FAST]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "QUANTBENCH_TEST_THREADS": "1"}


@pytest.fixture(scope="module")
def tune_data(tmp_path_factory) -> Path:
    return write_tiny_image_folder(tmp_path_factory.mktemp("shared") / "data", train_per_class=24, test_per_class=6)


@pytest.fixture(scope="module")
def one_process(tiny_trained_checkpoint, tune_data, tmp_path_factory) -> dict:
    """Today's single-process tune (no --storage) on the same search: the reference."""
    out = tmp_path_factory.mktemp("one") / "tune"
    rc = main(["tune", str(tiny_trained_checkpoint), "--data-dir", str(tune_data), "--output", str(out), *SEARCH])
    assert rc == 3  # nothing can meet -50 points
    trials = [json.loads(x) for x in (out / "tune.jsonl").read_text().splitlines()]
    trials = [t for t in trials if t.get("type") == "trial"]
    return {"acc": {t["key"]: t["val_acc"] for t in trials}, "summary": json.loads((out / "tune.json").read_text())}


def _worker(ckpt, data, out: Path, url: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "quantbench", "tune", str(ckpt), "--data-dir", str(data), "--output", str(out),
           "--storage", url, *SEARCH, "--threads", "1", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], timeout: float = 400) -> None:
    deadline = time.time() + timeout
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _trials(url: str, study: str = "quantbench-tune") -> list:
    from quantbench.tune.shared import load_study
    s, _ = load_study(url, study)
    return s.get_trials(deepcopy=False)


def _check_study(url: str, out: Path, one: dict) -> list:
    """Every candidate made exactly once (one trial of each key holds a result), the same
    candidates and accuracies as one process, the study finished, files consistent with records."""
    S = optuna.trial.TrialState
    trials = _trials(url)
    made: dict[str, list] = {}
    for t in trials:
        if "result" in t.user_attrs:
            made.setdefault(t.user_attrs["key"], []).append(t)
    assert {k: len(v) for k, v in made.items()} == {k: 1 for k in one["acc"]}, "a candidate made twice, or missing"
    assert {k: v[0].user_attrs["result"]["val_acc"] for k, v in made.items()} == one["acc"]
    assert all(v[0].state == S.COMPLETE for v in made.values())
    assert not [t for t in trials if t.state in (S.RUNNING, S.WAITING)]
    # cancelled duplicates never did any work
    assert all("result" not in t.user_attrs for t in trials if t.state == S.PRUNED)
    # the records name files that are there, with their sidecars; no other deployment file, no temp file
    named = set()
    for v in made.values():
        r = v[0].user_attrs["result"]
        f = out / r["file"]
        assert f.is_file() and Path(str(f) + ".json").is_file() and f.stat().st_size > 0
        named.add(f.name)
        assert r["machine"]["cpu"] and r["worker"]["pid"]
    on_disk = {p.name for p in (out / "trials").iterdir() if not p.name.endswith(".json")}
    assert on_disk == named, f"files without records: {on_disk - named}"
    status = main(["tune", "--storage", url, "--status"])
    assert status == 0
    return trials


def _check_pick(url: str, out: Path, pick_dir: Path, one: dict) -> dict:
    rc = main(["tune", "--storage", url, "--pick", "--output", str(pick_dir), "--artifacts", str(out),
               "--timing-seconds", "0.4", "--no-progress"])
    assert rc == 3  # the budget is impossible: best.* is the most accurate trial, fastest.* the fastest
    summary = json.loads((pick_dir / "pick.json").read_text())
    mine, theirs = summary["pick"], one["summary"]["pick"]
    # the pick is the most accurate trial, as one process picks it; between equally accurate
    # trials both break the tie by timing, so either may win within the timing noise
    assert mine["val_acc"] == theirs["val_acc"]
    tied = {k for k, a in one["acc"].items() if a == theirs["val_acc"] and not k.endswith("origin")}
    assert mine["key"] in tied
    if len(tied) == 1:
        assert mine["key"] == theirs["key"]
    best = json.loads((pick_dir / "best.json").read_text())
    assert best["key"] == mine["key"] and (pick_dir / best["file"]).is_file()
    assert (pick_dir / best["file"]).read_bytes() == (out / mine["file"]).read_bytes()
    assert summary["sentence"] in (pick_dir / "pick.md").read_text() and "most accurate" in summary["sentence"]
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("kind,n", [("sqlite", 2), ("sqlite", 3), ("journal", 2), ("journal", 3)])
def test_workers_share_the_search_and_pick_as_one_process(kind, n, tiny_trained_checkpoint, tune_data, one_process,
                                                         tmp_path):
    out = tmp_path / "shared"
    url = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal://{tmp_path / 'study.log'}"
    _wait([_worker(tiny_trained_checkpoint, tune_data, out, url) for _ in range(n)])
    trials = _check_study(url, out, one_process)
    assert len({t.user_attrs["worker"]["pid"] for t in trials if "result" in t.user_attrs}) >= 1
    _check_pick(url, out, tmp_path / "pick", one_process)


@pytest.mark.slow
def test_a_killed_workers_trial_is_made_again_by_another(tiny_trained_checkpoint, tune_data, one_process, tmp_path):
    S = optuna.trial.TrialState
    out = tmp_path / "shared"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    fast_faults = ("--heartbeat-seconds", "1", "--grace-seconds", "3")
    a = _worker(tiny_trained_checkpoint, tune_data, out, url, *fast_faults)
    victim = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and a.poll() is None and victim is None:
            if (tmp_path / "study.db").is_file():
                try:
                    running = [t for t in _trials(url) if t.state == S.RUNNING
                               and t.user_attrs.get("worker", {}).get("pid") == a.pid]
                except QuantbenchError:
                    running = []  # the study is not made yet
                if running:
                    victim = running[0]
                    os.kill(a.pid, signal.SIGKILL)
                    break
            time.sleep(0.05)
    finally:
        if a.poll() is None and victim is None:
            a.kill()
        a.wait()
    assert victim is not None, "the worker ended before it could be killed mid-trial"
    b = _worker(tiny_trained_checkpoint, tune_data, out, url, *fast_faults)
    _wait([b])
    trials = _check_study(url, out, one_process)
    dead = next(t for t in trials if t.number == victim.number)
    assert dead.state == S.FAIL and "result" not in dead.user_attrs  # failed for its missing heartbeat
    redo = [t for t in trials if t.user_attrs.get("key") == victim.user_attrs["key"] and t.state == S.COMPLETE]
    assert len(redo) == 1 and redo[0].user_attrs["result"]["worker"]["pid"] == b.pid
    assert redo[0].system_attrs.get("failed_trial") == victim.number  # Optuna's retry callback made it
    from quantbench.tune.shared import status
    st = status(url, "quantbench-tune")
    assert st["finished"] and st["retried"] == 1 and st["failed"] == 0


# ---------------------------------------------------------------- PostgreSQL (CI installs the server)
def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL test cannot run in CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth, a temp folder), stopped after the test."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (the search extra installs it)")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = str(bins[-1]) if bins else shutil.which("initdb")  # Debian keeps the tools off PATH
    if initdb is None:
        _unavailable("no PostgreSQL server here (initdb not found; apt-get install postgresql)")
    bindir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="qb-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            shutil.chown(root, "postgres")
        except (LookupError, OSError) as e:
            shutil.rmtree(root, ignore_errors=True)
            _unavailable(f"no postgres user to run the server as ({e})")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"

    def run(*cmd):
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)

    started = False
    try:
        r = run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        if r.returncode != 0:
            _unavailable(f"initdb failed: {r.stderr.strip()[-300:]}")
        r = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if r.returncode != 0:
            _unavailable(f"the server did not start: {(r.stderr or r.stdout).strip()[-300:]}")
        started = True
        r = run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "quantbench")
        if r.returncode != 0:
            _unavailable(f"createdb failed: {r.stderr.strip()[-300:]}")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/quantbench"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql(postgres_url, tiny_trained_checkpoint, tune_data, one_process, tmp_path):
    out = tmp_path / "shared"
    _wait([_worker(tiny_trained_checkpoint, tune_data, out, postgres_url) for _ in range(2)])
    _check_study(postgres_url, out, one_process)
    _check_pick(postgres_url, out, tmp_path / "pick", one_process)


# ---------------------------------------------------------------- options (fast)
def test_shared_options_fail_in_one_line(tiny_trained_checkpoint, tmp_path, capsys):
    from quantbench.tune import TuneConfig
    with pytest.raises(QuantbenchError, match="--storage takes"):
        TuneConfig(checkpoint=tiny_trained_checkpoint, storage="mongodb://x/y")
    with pytest.raises(QuantbenchError, match="always continues"):
        TuneConfig(checkpoint=tiny_trained_checkpoint, storage="sqlite:///x.db", resume=True)
    with pytest.raises(QuantbenchError, match="--grace-seconds"):
        TuneConfig(checkpoint=tiny_trained_checkpoint, storage="sqlite:///x.db", heartbeat_s=10, grace_s=5)
    assert main(["tune", "--pick"]) == 2 and "--pick needs --storage" in capsys.readouterr().err
    url = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["tune", "--storage", url, "--status"]) == 2
    assert "no study 'quantbench-tune'" in capsys.readouterr().err
    assert main(["tune", "--storage", url]) == 2 and "give an fp32 checkpoint" in capsys.readouterr().err


def test_a_password_never_reaches_a_message():
    from quantbench.tune.shared import masked
    assert masked("postgresql://me:secret@db.example/tune") == "postgresql://me:***@db.example/tune"
    assert masked("sqlite:///x.db") == "sqlite:///x.db"
