"""Making a deployment file in a process of its own.

    make_apart(checkpoint, data_source, target, dest)   -> [FileRecord], as deploy.make would

ONNX Runtime's calibration session, NNCF and ExecuTorch's lowering each take a gigabyte or more
at 224x224, and the allocator keeps most of it after they return: a run that made every
runtime's files in one process held the sum of their peaks while it measured them. Made in a
child that ends, that memory goes back to the system, and the caller's peak is its own.

The child is `python -m quantbench.apart FD`, a fresh interpreter (not a fork: a fork
shares, and counts in its RSS, the caller's memory, and copying a process whose library threads
are running is unsafe; not multiprocessing's spawn, which runs the caller's main script again
and so needs an `if __name__ == "__main__"` guard in every user's script). It reads its job
(checkpoint, data, target, destination) pickled on stdin, rebuilds the Source the way the parent
would, calls deploy.make, and pickles back the records or the exception on the pipe FD.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback

from .errors import QuantbenchError, cause


def make_apart(checkpoint: str | os.PathLike, data, target, dest: str | os.PathLike,
               model_spec: str | None = None, progress: bool = True) -> list:
    """deploy.make(Source.from_checkpoint(checkpoint, data.load(train=True)), target, dest) in a
    fresh process; `data` is a quantbench.data.DataSource. Its errors are raised here, as the
    same exception; a child killed (out of memory, a crash in C++) is one QuantbenchError."""
    from .worker import _PARENT
    job = pickle.dumps((str(checkpoint), data, target, str(dest), model_spec, progress))
    # the parent's import path, so the child finds what the parent found (runtime plug-ins
    # named in QUANTBENCH_RUNTIMES, a source tree that is not installed)
    env = {**os.environ, _PARENT: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)}
    sys.stdout.flush()  # what this process said so far comes before what the child says
    sys.stderr.flush()
    # the job goes in on stdin, the answer comes back on a pipe of its own (stdout is the
    # libraries'): no file to leave behind, whatever ends either process
    answer_r, answer_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "quantbench.apart", str(answer_w)], stdin=subprocess.PIPE,
                                env=env, pass_fds=(answer_w,))
    finally:
        os.close(answer_w)
    try:
        with proc.stdin:
            proc.stdin.write(job)
        with os.fdopen(answer_r, "rb") as f:
            answer_r = None
            payload = f.read()  # until the child ends (or closes it)
        rc = proc.wait()
    except BaseException:  # Ctrl-C here: the child got it too; do not leave it running
        if answer_r is not None:
            os.close(answer_r)
        proc.kill()
        proc.wait()
        raise
    if not payload:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        raise QuantbenchError(f"making the {target.maker} files stopped: their process {how} without an answer "
                              "(out of memory, or a crash in the runtime's library)")
    ok, value = pickle.loads(payload)  # from our own child, on our own pipe
    if ok:
        return value
    raise value


def _answer(job: bytes) -> bytes:
    """The child's work: the pickled job in, the pickled (True, records) or (False, exception) out."""
    from .warn import quiet_cpp_warnings, summarized_deprecations
    quiet_cpp_warnings()
    try:
        checkpoint, data, target, dest, model_spec, progress = pickle.loads(job)
        from .deploy import Source, make
        with summarized_deprecations(stream=open(os.devnull, "w")):  # dropped: the caller's summary is its own
            source = Source.from_checkpoint(checkpoint, data.load(train=True, progress=False), model_spec=model_spec)
            answer = (True, make(source, target, dest, progress=progress))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
        if isinstance(e, Exception) and not isinstance(e, QuantbenchError):
            traceback.print_exc()  # a bug: its traceback, where the caller's --debug would show it
        answer = (False, e)  # Ctrl-C (KeyboardInterrupt) too, without a traceback: the caller raises it
    try:
        payload = pickle.dumps(answer)
        pickle.loads(payload)  # as the caller will: an exception whose __init__ wants other arguments fails there
    except Exception:  # an exception that does not pickle, or not back: its one line
        payload = pickle.dumps((False, QuantbenchError(cause(answer[1]))))
    return payload


def _main(answer_fd: int) -> int:
    from .worker import _die_with_parent
    _die_with_parent()  # an orphan must not go on exporting after its caller was killed
    os.set_inheritable(answer_fd, False)  # a library's own subprocess must not hold the answer open
    job = sys.stdin.buffer.read()
    payload = _answer(job)
    with os.fdopen(answer_fd, "wb") as out:  # all of it, or (killed) nothing: the caller checks
        out.write(payload)
    return 0


if __name__ == "__main__":
    sys.exit(_main(int(sys.argv[1])))
