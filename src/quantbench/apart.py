"""Making a deployment file in a process of its own.

    make_apart(checkpoint, data_source, target, dest)   -> [FileRecord], as deploy.make would

ONNX Runtime's calibration session, NNCF and ExecuTorch's lowering each take a gigabyte or more
at 224x224, and the allocator keeps most of it after they return: a run that made every
runtime's files in one process held the sum of their peaks while it measured them. Made in a
child that ends, that memory goes back to the system, and the caller's peak is its own.

The child is `python -m quantbench.apart JOB RESULT`, a fresh interpreter (not a fork: a fork
shares, and counts in its RSS, the caller's memory, and copying a process whose library threads
are running is unsafe; not multiprocessing's spawn, which runs the caller's main script again
and so needs an `if __name__ == "__main__"` guard in every user's script). It reads its job
(checkpoint, data, target, destination) from a pickle its parent wrote, rebuilds the Source the
way the parent would, calls deploy.make, and pickles back the records or the exception.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from .errors import QuantbenchError, cause


def make_apart(checkpoint: str | os.PathLike, data, target, dest: str | os.PathLike,
               model_spec: str | None = None, progress: bool = True) -> list:
    """deploy.make(Source.from_checkpoint(checkpoint, data.load(train=True)), target, dest) in a
    fresh process; `data` is a quantbench.data.DataSource. Its errors are raised here, as the
    same exception; a child killed (out of memory, a crash in C++) is one QuantbenchError."""
    from .worker import _PARENT
    with tempfile.TemporaryDirectory(prefix="quantbench-make-") as tmp:
        job, result = Path(tmp) / "job.pickle", Path(tmp) / "result.pickle"
        job.write_bytes(pickle.dumps((str(checkpoint), data, target, str(dest), model_spec, progress)))
        # the parent's import path, so the child finds what the parent found (runtime plug-ins
        # named in QUANTBENCH_RUNTIMES, a source tree that is not installed)
        env = {**os.environ, _PARENT: str(os.getpid()),
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)}
        sys.stdout.flush()  # what this process said so far comes before what the child says
        sys.stderr.flush()
        rc = subprocess.run([sys.executable, "-m", "quantbench.apart", str(job), str(result)], env=env).returncode
        if not result.is_file():
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            raise QuantbenchError(f"making the {target.maker} files stopped: their process {how} without an answer "
                                  "(out of memory, or a crash in the runtime's library)")
        ok, value = pickle.loads(result.read_bytes())  # written by our own child, in our own folder
    if ok:
        return value
    raise value


def _main(job: str, result: str) -> int:
    from .worker import _die_with_parent
    _die_with_parent()  # an orphan must not go on exporting after its caller was killed
    from .warn import quiet_cpp_warnings, summarized_deprecations
    quiet_cpp_warnings()
    try:
        checkpoint, data, target, dest, model_spec, progress = pickle.loads(Path(job).read_bytes())
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
    tmp = Path(result).with_suffix(".part")
    tmp.write_bytes(payload)
    os.replace(tmp, result)  # whole or absent: the parent never reads half an answer
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
