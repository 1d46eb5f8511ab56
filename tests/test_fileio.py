"""fileio: atomic writes that leave nothing behind, one-line errors for full disks and unwritable
places, and the per-folder run lock."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench import fileio
from quantbench.errors import QuantbenchError
from quantbench.fileio import (atomic_path, check_writable, run_lock, save_torch, save_torchscript,
                               write_bytes, write_text)

SRC = str(Path(quantbench.__file__).parents[1])


def python(code: str, **kw) -> subprocess.Popen:
    """A Python subprocess that imports this checkout's quantbench (fileio does not import torch)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk. Needs root (mount); skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------- atomic writes and their temp files
def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "x.json"
    fileio.write_json(p, {"a": 1})
    fileio.write_json(p, {"a": 2})
    assert fileio.read_json(p) == {"a": 2}
    assert temps(p.parent) == []
    assert p.stat().st_mode & 0o777 == 0o644


def test_failed_block_keeps_the_old_file(tmp_path):
    p = tmp_path / "x.txt"
    write_text(p, "old")
    with pytest.raises(ZeroDivisionError), atomic_path(p) as tmp:
        tmp.write_text("half")
        1 / 0
    assert p.read_text() == "old" and temps(tmp_path) == []


def test_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path):
    p = tmp_path / "last.pth"
    child = python("import os, signal\n"
                   "from quantbench.fileio import atomic_path\n"
                   f"with atomic_path({str(p)!r}) as tmp:\n"
                   "    tmp.write_bytes(b'half a checkpoint')\n"
                   "    os.kill(os.getpid(), signal.SIGKILL)\n")
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    [left] = temps(tmp_path)
    assert left.name.startswith(f".last.pth.{child.pid}-")  # the writer's pid is in the name
    # The usual case: --resume right after the kill. The writer is dead here, so its fresh temp
    # file goes at once (issue 21: it used to stay until it was a minute old).
    write_text(p, "one")
    assert temps(tmp_path) == [] and p.read_text() == "one"


def test_temp_of_a_live_writer_is_kept_whatever_its_age(tmp_path):
    p = tmp_path / "best.pth"
    child = python("import sys, time\n"
                   "from quantbench.fileio import atomic_path\n"
                   f"with atomic_path({str(p)!r}) as tmp:\n"
                   "    tmp.write_bytes(b'writing')\n"
                   "    print('in', flush=True)\n"
                   "    sys.stdin.readline()\n", stdin=subprocess.PIPE)
    try:
        assert child.stdout.readline() == "in\n"
        [live] = temps(tmp_path)
        old = time.time() - fileio.STALE_TEMP_NO_PID_S - 5
        os.utime(live, (old, old))
        write_text(p, "mine")
        assert temps(tmp_path) == [live]
    finally:
        child.communicate("\n", timeout=60)
    assert child.returncode == 0 and temps(tmp_path) == [] and p.read_text() == "writing"


def test_temp_of_a_reused_pid_or_another_process_table(tmp_path):
    """The pid of a killed writer may belong to another process by now (its start time differs):
    its temp goes. A temp from another machine or container (another process table) stays until
    it is old, since its pid says nothing here."""
    table = fileio._process_table()
    if table is None:
        pytest.skip("no /proc here")
    me = os.getpid()
    reused = tmp_path / f".x.txt.{me}-{table}-1-abcd1234.tmp"              # this pid, another start
    elsewhere = tmp_path / f".x.txt.{2**22 + 7}-{'0' * 8}-12345-abcd1234.tmp"  # another table's
    for f in (reused, elsewhere):
        f.write_bytes(b"")
    write_text(tmp_path / "x.txt", "new")
    assert temps(tmp_path) == [elsewhere]
    old = time.time() - fileio.STALE_TEMP_S - 5
    os.utime(elsewhere, (old, old))
    write_text(tmp_path / "x.txt", "newer")
    assert temps(tmp_path) == []


def test_temps_of_live_writers_and_of_other_files_are_kept(tmp_path):
    old = time.time() - fileio.STALE_TEMP_NO_PID_S - 5
    live = tmp_path / f".x.txt.{os.getpid()}-abcd1234.tmp"      # a live writer (this process)
    other = tmp_path / ".x.txt.1.999999-abcd1234.tmp"            # a temp of "x.txt.1"
    legacy_fresh = tmp_path / ".x.txt.abcd1234.tmp"              # older naming, recent
    legacy_old = tmp_path / ".x.txt.efgh5678.tmp"                # older naming, an hour old
    for f in (live, other, legacy_fresh, legacy_old):
        f.write_bytes(b"")
        os.utime(f, (old, old))
    os.utime(legacy_fresh, None)
    write_text(tmp_path / "x.txt", "new")
    assert temps(tmp_path) == sorted([live, other, legacy_fresh])


# ---------------------------------------------------------------- full disk
def test_disk_full_is_one_line_and_keeps_the_old_file(tiny_disk):
    p = tiny_disk / "model.pt"
    write_bytes(p, b"old")
    with pytest.raises(QuantbenchError) as e:
        write_bytes(p, os.urandom(1 << 20))
    msg = str(e.value)
    assert str(p) in msg and "No space left" in msg and "free there" in msg and "1.0 MiB to write" in msg
    assert "\n" not in msg
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert p.read_bytes() == b"old" and temps(tiny_disk) == []


def test_torch_writers_on_a_full_disk_raise_instead_of_aborting(tiny_disk):
    # torch.jit.save(module, path) aborts the process from C++ (exit 134) on a full disk.
    big = torch.nn.Linear(512, 512)
    write_bytes(tiny_disk / "model.pt", b"old model")
    write_bytes(tiny_disk / "last.pth", b"old checkpoint")
    with pytest.raises(QuantbenchError, match="model.pt: No space left"):
        save_torchscript(torch.jit.script(big), tiny_disk / "model.pt")
    with pytest.raises(QuantbenchError, match="last.pth: No space left"):
        save_torch(big.state_dict(), tiny_disk / "last.pth")
    assert (tiny_disk / "model.pt").read_bytes() == b"old model"
    assert (tiny_disk / "last.pth").read_bytes() == b"old checkpoint"
    assert temps(tiny_disk) == []


def test_disk_full_reported_at_fsync(tmp_path, monkeypatch):
    # Some file systems (NFS) report a full disk only when the data is flushed.
    p = tmp_path / "r.json"
    write_text(p, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(QuantbenchError, match=r"cannot write .*r\.json: No space left on device \(.* free there, 3 bytes to write\)"):
        write_text(p, "new")
    assert p.read_text() == "old" and temps(tmp_path) == []


def test_write_error_in_a_file_size_limited_process(tmp_path):
    # No root needed: RLIMIT_FSIZE makes the write fail midway (EFBIG) like a full disk would.
    p = tmp_path / "big.bin"
    write_bytes(p, b"old")
    child = python("import resource\n"
                   "from quantbench.errors import QuantbenchError\n"
                   "from quantbench.fileio import write_bytes\n"
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
                   "try:\n"
                   f"    write_bytes({str(p)!r}, bytes(1 << 20))\n"
                   "except QuantbenchError as e:\n"
                   "    print(e)\n")
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == f"cannot write {p}: File too large"
    assert p.read_bytes() == b"old" and temps(tmp_path) == []


def test_torch_saves_are_byte_reproducible(tmp_path):
    # In memory the archive's root folder is "archive", not the (random) temp file's name.
    m = torch.jit.freeze(torch.jit.script(torch.nn.Linear(4, 2).eval()))
    save_torchscript(m, tmp_path / "a.pt")
    save_torchscript(m, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    sd = torch.nn.Linear(4, 2).state_dict()
    save_torch(sd, tmp_path / "a.pth")
    save_torch(sd, tmp_path / "b.pth")
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pth", weights_only=True)["weight"], sd["weight"])


# ---------------------------------------------------------------- unwritable outputs, checked first
@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    # root writes through permission bits: a read-only file system is what stops it.
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_check_writable_read_only_folder(read_only_dir):
    for target, is_dir in ((read_only_dir / "x.pt", False), (read_only_dir / "out", True), (read_only_dir, True)):
        with pytest.raises(QuantbenchError, match=r"cannot write .*ro.*: (Read-only file system|Permission denied)$"):
            check_writable(target, is_dir=is_dir)
    with pytest.raises(QuantbenchError, match="cannot write"):  # the write itself says so too
        write_text(read_only_dir / "x.txt", "x")


def test_check_writable_under_a_regular_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(QuantbenchError, match=f"{f} is a file, not a folder"):
        check_writable(f / "runs" / "model.pt")
    with pytest.raises(QuantbenchError, match=f"{f} is a file, not a folder"):
        check_writable(f, is_dir=True)
    with pytest.raises(QuantbenchError, match=f"cannot write {f}/x.json: {f} is a file, not a folder"):
        write_text(f / "x.json", "{}")
    assert f.read_text() == "x"


def test_check_writable_existing_folder_as_file_name(tmp_path):
    (tmp_path / "model.pt").mkdir()
    with pytest.raises(QuantbenchError, match="model.pt: it is a folder; give a file name"):
        check_writable(tmp_path / "model.pt")
    with pytest.raises(QuantbenchError, match="model.pt: Is a directory"):
        write_text(tmp_path / "model.pt", "x")


def test_check_writable_creates_folders_and_leaves_nothing(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "c.json") == tmp_path / "a" / "b" / "c.json"
    assert check_writable(tmp_path / "d" / "e", is_dir=True) == tmp_path / "d" / "e"
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "d" / "e").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == [] and list((tmp_path / "d" / "e").iterdir()) == []


# ---------------------------------------------------------------- one run per output folder
HOLD = ("import sys, time\n"
        "from quantbench.fileio import run_lock\n"
        "with run_lock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n")


def test_second_run_is_refused_until_the_holder_dies(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(QuantbenchError) as e:
            with run_lock(tmp_path):
                pass
        msg = str(e.value)
        assert f"pid {holder.pid}, since " in msg and msg.startswith(f"{tmp_path} is in use")
        assert f": -c {tmp_path})" in msg  # the holder's command line (python -c HOLD DIR)
        assert "\n" not in msg
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait()
    with run_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock.read_text() == ""  # released: no stale details left for the next reader


def test_run_lock_is_reentrant_and_released(tmp_path):
    with run_lock(tmp_path):
        with run_lock(tmp_path / "."):  # a stage run from within another
            pass
        # still held after the inner block: another process is refused
        p = python("import sys\nfrom quantbench.fileio import run_lock\n"
                   f"with run_lock({str(tmp_path)!r}): pass\n")
        _, err = p.communicate(timeout=60)
        assert p.returncode != 0 and f"pid {os.getpid()}" in err
    p = python(f"from quantbench.fileio import run_lock\nwith run_lock({str(tmp_path)!r}): print('ok')\n")
    out, err = p.communicate(timeout=60)
    assert out.strip() == "ok", err
