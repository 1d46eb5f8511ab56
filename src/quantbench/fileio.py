"""Small file helpers. Every file quantbench writes goes through here, so that

- an interrupted run never leaves a half-written file: the bytes go to a temp file that is
  renamed over the target only once complete (atomic_path);
- a killed run does not leave that temp file behind: the next write of the same file removes it
  at once (the temp name carries the writer's pid, its start time and which process table the pid
  belongs to, so a live writer's file is never touched, nor one of a process that reused the pid);
- a full disk or an unwritable folder ends in one line that names the file, with the earlier
  file intact (QuantbenchError), and check_writable says so before the work rather than after;
- torch's own writers never write to disk themselves (save_torch, save_torchscript): they write
  to memory and we write the bytes, because on a full disk torch.jit.save aborts the whole
  process from C++ and torch.save raises an opaque RuntimeError. In memory, the archive's root
  folder is also always "archive" rather than the temp file's random name, so two saves of the
  same object give the same bytes;
- two runs cannot write into one output folder at the same time (run_lock).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import QuantbenchError

LOCK_NAME = ".quantbench.lock"
# A temp file written on another machine (or container: another process table) is removed only
# once it is this old and its pid is not alive here: pids are per process table, so a live writer
# there may look dead here. Temps of this process table are judged by their writer alone.
STALE_TEMP_S = 60
# Temp files from quantbench versions that did not put the pid in the name: age is all we have.
STALE_TEMP_NO_PID_S = 3600


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _file_in_the_way(folder: Path) -> Path | None:
    """The file that stands where `folder` or one of its parents should be, if any."""
    for above in (folder, *folder.parents):
        if above.exists():
            return None if above.is_dir() else above
    return None


def _write_error(path: Path, e: OSError, nbytes: int | None = None) -> QuantbenchError:
    msg = f"cannot write {path}: {e.strerror or e}"
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and (file := _file_in_the_way(path.parent)):
        msg = f"cannot write {path}: {file} is a file, not a folder"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent).free
            msg += f" ({_size(free)} free there" + (f", {_size(nbytes)} to write)" if nbytes else ")")
        except OSError:
            pass
    return QuantbenchError(msg)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # Windows' os.kill would terminate the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is someone else's
        return True
    return True


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat's field 22), or None
    when it does not exist, has ended (a zombie not yet reaped) or /proc cannot say."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 and fields[19].isdigit() else None


@functools.lru_cache(maxsize=None)
def _process_table() -> str | None:
    """A short tag of the process table this process's pids belong to: the boot (a reboot
    starts pids afresh) and the pid namespace (a container has its own), or None without /proc."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = None
    if not boot or not ns:
        return None
    return hashlib.sha1(f"{boot.strip()}:{ns}".encode()).hexdigest()[:8]


def _writer_tag() -> str:
    """PID-TABLE-START- for this process (see _remove_stale_temps), or PID- without /proc."""
    pid, table = os.getpid(), _process_table()
    start = _start_time(pid) if table else None
    return f"{pid}-{table}-{start}-" if start else f"{pid}-"


def _writer_gone(pid: int, table: str | None, start: str | None, age: float) -> bool:
    """Whether the writer of a temp file has ended, so that its temp file may go."""
    if table is not None and table == _process_table():
        return _start_time(pid) != start  # dead, or the pid is another process's now, whatever the age
    # another process table's pid (another machine or container), or a name with the pid only
    # (no /proc, or an older version): the pid may be alive elsewhere, so only old temps go
    return age > STALE_TEMP_S and not _pid_alive(pid)


def _remove_stale_temps(path: Path) -> None:
    """Remove temp files of `path` left by writers that were killed (see atomic_path's names)."""
    # .NAME.PID-TABLE-START-RANDOM.tmp, .NAME.PID-RANDOM.tmp (no /proc, or older versions), or
    # .NAME.RANDOM.tmp (older versions). RANDOM has no dots or dashes, so the temp files of
    # another target (say NAME.1) never match.
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-(?:([0-9a-f]{{8}})-(\d+)-)?)?[a-z0-9_]+\.tmp")
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if not m:
                continue
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                age = now - entry.stat().st_mtime
                stale = _writer_gone(int(m[1]), m[2], m[3], age) if m[1] else age > STALE_TEMP_NO_PID_S
                if stale:
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, nbytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    An OSError in the block (a full disk, say) becomes a one-line QuantbenchError naming `path`;
    `nbytes`, if given, is what the block writes, for that message."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e, nbytes) from e
    tmp = Path(tmp)
    try:
        yield tmp
        # fsync: a crash just after the rename must not leave an empty file in place of the
        # old one; and some file systems (NFS) report a full disk only here.
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except OSError as e:
        raise _write_error(path, e, nbytes) from e
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    nbytes = memoryview(data).nbytes
    with atomic_path(path, nbytes=nbytes) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through memory (see the module's docstring): the file is held in memory once."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def save_torchscript(module: Any, path: str | os.PathLike) -> None:
    """torch.jit.save, but a full disk is a QuantbenchError instead of a C++ abort (exit 134)."""
    import torch
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    write_bytes(path, buf.getbuffer())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def check_writable(path: str | os.PathLike, *, is_dir: bool = False) -> Path:
    """Fail now, in one line, if `path` (a file, or a folder with is_dir) cannot be written,
    instead of after the work. Creates the missing folders, as the write would."""
    path = Path(path)
    folder = path if is_dir else path.parent
    try:
        if not is_dir and path.is_dir():
            raise QuantbenchError(f"cannot write {path}: it is a folder; give a file name")
        if file := _file_in_the_way(folder):
            raise QuantbenchError(f"cannot write {path}: {file} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".quantbench-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise QuantbenchError(f"cannot write {path}: {e.strerror or e}") from e
    return path


_locked: set[Path] = set()  # folders this process holds the run lock of


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']}, since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # it is writing its details right now
        return "pid unknown"


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold DIRECTORY/.quantbench.lock for the block: a second run into the same folder fails at
    once, saying who holds it. The lock is an flock, which the kernel releases when its holder
    exits however it exits (even SIGKILL), so a killed run never leaves a stale lock; the file
    stays (removing it would race with the next taker). Re-entrant within one process."""
    import fcntl  # POSIX only
    folder = check_writable(directory, is_dir=True).resolve()
    if folder in _locked:  # a stage run from within another (replicate -> quantize)
        yield folder / LOCK_NAME
        return
    lock = folder / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantbenchError(f"{folder} is in use by another quantbench run ({_holder(lock)}); "
                                  "wait for it to finish, or choose another output folder") from None
        info = {"pid": os.getpid(), "command": shlex.join(sys.argv),
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _locked.add(folder)
        try:
            yield lock
        finally:
            _locked.discard(folder)
            os.ftruncate(fd, 0)  # still locked: the next holder never reads our details as its own
    finally:
        os.close(fd)  # releases the flock


def sha256(path: str | os.PathLike) -> str:
    """Content hash of a file: what a model was made from, whatever its name or path."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
