"""The search shared by many processes or machines, on Optuna's storage (`tune --storage URL`).

    quantbench tune CKPT --storage URL [--study NAME] [--artifacts DIR]   a worker (start any number)
    quantbench tune --storage URL --pick                                  on the deployment machine
    quantbench tune --storage URL --status                                anywhere

Storage URLs: `sqlite:///FILE.db` (processes of one machine), `postgresql://USER:PASSWORD@HOST/DB`
(machines; psycopg2 is in the `search` extra), `journal:///ABS/PATH/FILE.log` or
`journal://REL/PATH/FILE.log` (Optuna's JournalFileBackend: one append-only file on a shared
filesystem, locked with a symlink, so NFS works).

Two facts shape it. Accuracy does not depend on the machine, latency does: workers make each
candidate's file (into the shared artifact folder) and score it on the validation images, and
record the file, its accuracy, its size and the worker's machine record; nothing is timed there.
`--pick`, run on the machine that will run the model, times the accuracy-qualified files against
its own anchor (trials.Search's way: bench.AnchoredTiming, interleaved, pinned) and writes
best.<suffix>. Latencies from different machines are never compared. And workers die.

The design: no coordinator. Every worker runs the same loop on the study:
  1. fail the trials of dead workers: Optuna's heartbeats (RDBStorage's heartbeat_interval and
     grace_period, fail_stale_trials) with RetryHeartbeatStaleTrialCallback (Optuna 5's name for
     RetryFailedTrialCallback, deprecated since 4.9), which puts a WAITING copy of the trial back.
     Optuna 5's JournalStorage has no heartbeat, so for it a worker writes the time into its
     running trial's system attribute `quantbench_heartbeat` every heartbeat_s, and the same loop
     fails a RUNNING trial whose last beat (or start) is older than grace_s and calls the same
     callback (the clocks of the machines must agree within a fraction of grace_s: NTP).
  2. replay space.candidates() (the one-process search's order, unchanged) over the finished
     trials. A candidate not finished yet is READY when nothing it depends on is unfinished:
     space.py's later stages look only at stage-1 results (which paths missed, the fp32
     reference accuracy) and at their own path's earlier trials (`_met`, `_best_of` per maker).
     So: every stage-1 candidate (no calibration choice, no fp32 layer) is ready at once, except
     that a runtime's fp32 file waits for its int8 sibling (one exporter call makes both); a
     later-stage candidate waits until stage 1 is done and its own maker's earlier candidates
     are; paths are independent chains and run in parallel. Nothing is speculative: a candidate
     is made only when the one-process search would make it, so both make the same set. Ready
     candidates not already waiting or running are enqueued (study.enqueue_trial, the candidate
     in user attributes; index = the next free number, which names the file).
  3. claim the lowest-index WAITING trial whose maker is installed here (WAITING -> RUNNING is
     the storage's atomic step, Optuna's own queue), then make and score it.
Two workers replaying the same state may enqueue the same candidate; the lowest-numbered live
trial of a key owns it and a later one is cancelled (PRUNED, `duplicate_of`) when claimed, before
any work: no candidate is made twice. A retry makes the file again at the same path (the index
travels with the copy), atomically, so the artifact folder always agrees with the records.

A trial that fails for a reason of its own (a flow cannot trace the model) is FAIL with
`result.error`, its one-line reason, and is finished (not retried). One that fails for a passing
reason (disk full: trials._transient), a dead worker's (no heartbeat) and one interrupted by
Ctrl-C are FAIL without an own error and made again by another worker; a candidate given up
after MAX_ATTEMPTS dead or passing failures counts as failed. Ctrl-C ends the trial cleanly (FAIL
`fault: interrupted`, a WAITING copy for the others) and exits 130.

The study's user attributes: `start` (what the search is: checkpoint sha256, options, a
fingerprint of the validation images: joining workers must agree), `runtimes` (the runtimes the
first worker searched: every worker replays the same list), `input_shape`, `ranking` (the layers
for fp32 fallback, computed once), `started_at`, `finished_at`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

from .. import runtimes
from ..errors import QuantbenchError, cause
from .journal import Trial, copy_deployment
from .render import drop_words, hms
from .space import REFERENCE, Candidate, candidates

MAX_ATTEMPTS = 3          # dead-worker or passing failures of one candidate before it counts as failed
POLL_S = 0.5              # an idle worker looks at the study again after this long
HEARTBEAT_ATTR = "quantbench_heartbeat"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


# ------------------------------------------------------------------ storage
def check_storage_url(url: str) -> None:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in RDB_SCHEMES + ("journal",):
        raise QuantbenchError(f"--storage takes sqlite:///FILE.db, postgresql://USER:PASSWORD@HOST/DB or "
                              f"journal:///PATH/FILE.log, not {url!r}")
    if scheme == "journal" and not url[len("journal://"):]:
        raise QuantbenchError("--storage journal:// needs a file: journal:///PATH/FILE.log")


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise QuantbenchError("--storage needs Optuna: pip install 'quantbench[search]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def masked(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        head, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{head}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


def open_storage(url: str, heartbeat_s: int | None = None, grace_s: int | None = None):
    """(Optuna storage, is_journal)."""
    optuna = _optuna()
    check_storage_url(url)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_ATTEMPTS)
    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage
            path = Path(url[len("journal://"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path))), True
        kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        hb = dict(heartbeat_interval=heartbeat_s, grace_period=grace_s,
                  heartbeat_stale_trial_callback=retry) if heartbeat_s else {}
        for attempt in range(5):
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kw, **hb)
                if storage.engine.name == "sqlite":
                    _serialize_sqlite(storage.engine)
                return storage, False
            except ImportError:
                raise
            except Exception:  # noqa: BLE001 - workers starting together race to create the tables
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
    except ImportError as e:
        raise QuantbenchError(f"--storage {masked(url)}: {cause(e)} (the search extra installs psycopg2 for "
                              f"postgresql://)") from e
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors, in one line
        raise QuantbenchError(f"cannot open --storage {masked(url)}: {cause(e)}") from e


def _serialize_sqlite(engine) -> None:
    """SQLite ignores SELECT ... FOR UPDATE, so two processes could both read a WAITING trial and
    both set it RUNNING (both told they had it). With every transaction begun IMMEDIATE (the
    write lock first, SQLAlchemy's documented recipe), Optuna's WAITING -> RUNNING step is atomic
    there too, as it is on PostgreSQL and in the journal."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN off: ours below

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (table creation) are not reused


def load_study(url: str, name: str, heartbeat_s: int | None = None, grace_s: int | None = None,
               create: bool = False):
    optuna = _optuna()
    storage, journal = open_storage(url, heartbeat_s, grace_s)
    try:
        if create:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
        else:
            study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as e:
        raise QuantbenchError(f"no study {name!r} in {masked(url)}: start a worker first "
                              f"(quantbench tune CKPT --storage URL --study {name})") from e
    except Exception as e:  # noqa: BLE001
        raise QuantbenchError(f"cannot open study {name!r} in {masked(url)}: {cause(e)}") from e
    return study, journal


# ------------------------------------------------------------------ what the study holds
def _states():
    from optuna.trial import TrialState
    return TrialState


def _own_error(t) -> bool:
    """FAIL for a reason of the candidate's own: recorded, finished, not retried."""
    r = t.user_attrs.get("result") or {}
    return t.state == _states().FAIL and bool(r.get("error")) and not r.get("transient")


def _live(t) -> bool:
    """A trial that owns its candidate: waiting, running, done, or failed for its own reason."""
    S = _states()
    return t.state in (S.WAITING, S.RUNNING, S.COMPLETE) or _own_error(t)


def _trial_of(t) -> Trial:
    a = t.user_attrs
    r = a.get("result") or {}
    c = Candidate.from_dict(a["candidate"])
    return Trial(index=a["index"], key=a["key"], candidate=c.to_dict(), file=r.get("file"),
                 val_acc=r.get("val_acc"), file_bytes=r.get("file_bytes"), reference=c.reference,
                 seconds=r.get("seconds", 0.0), error=r.get("error"))


def finished(trials, max_drop: float) -> tuple[dict[str, Trial], float | None]:
    """({key: Trial} of the finished candidates, in index order; fp32 validation accuracy). A
    candidate is finished by its lowest-numbered COMPLETE trial or FAIL of its own, or when it
    failed MAX_ATTEMPTS times for passing reasons (dead workers, full disks)."""
    S = _states()
    done: dict[str, Trial] = {}
    faults: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.number):
        key = t.user_attrs.get("key")
        if key is None or key in done:
            continue
        if t.state == S.COMPLETE or _own_error(t):
            done[key] = _trial_of(t)
        elif t.state == S.FAIL and not (t.user_attrs.get("fault") or "").startswith("interrupted"):
            faults.setdefault(key, []).append(t)
    live = {t.user_attrs.get("key") for t in trials if t.state in (S.WAITING, S.RUNNING)}
    for key, ts in faults.items():
        if key not in done and key not in live and len(ts) >= MAX_ATTEMPTS + 1:
            tr = _trial_of(ts[-1])
            tr.error = f"given up after {len(ts)} attempts (workers died or failed for passing reasons)"
            done[key] = tr
    fp32 = done.get(REFERENCE.key)
    fp32_acc = fp32.val_acc if fp32 is not None and fp32.ok else None
    for tr in done.values():
        if tr.ok and fp32_acc is not None:
            tr.drop = round(fp32_acc - tr.val_acc, 2)
            tr.within_budget = not tr.reference and tr.drop <= max_drop
    return dict(sorted(done.items(), key=lambda kv: kv[1].index)), fp32_acc


def schedule(search, done: dict[str, Trial]) -> tuple[list[Candidate], bool]:
    """(candidates ready to make now, in the search's order; whether the search is over): the
    one-process order replayed over the finished trials, see the module's docstring."""
    search.trials = done
    ready: list[Candidate] = []
    busy_makers: set[str] = set()
    stage1_open = False
    over = True
    for c in candidates(search):
        if c.key in done:
            continue
        over = False
        later = bool(c.scheme or c.fp32_layers)
        if c.maker not in busy_makers and not (later and stage1_open):
            ready.append(c)
        busy_makers.add(c.maker)
        stage1_open |= not later
    return ready, over


# ------------------------------------------------------------------ a worker
class _Heartbeat:
    """Beats for one running trial from a thread; `lost` when another worker failed it."""

    def __init__(self, storage, trial_id: int, every: int, journal: bool):
        self.storage, self.trial_id, self.every, self.journal = storage, trial_id, every, journal
        self.stop_event, self.lost = threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _beat(self) -> None:
        if self.journal:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
        else:
            self.storage.record_heartbeat(self.trial_id)

    def _run(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        while not self.stop_event.is_set():
            try:
                self._beat()
            except UpdateFinishedTrialError:
                self.lost = True
                return
            except Exception:  # noqa: BLE001 - a missed beat; the next one may get through
                pass
            self.stop_event.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()


def fail_stale(study, journal: bool, grace_s: int) -> None:
    """Trials of dead workers -> FAIL, and a WAITING copy (RetryHeartbeatStaleTrialCallback)."""
    optuna = _optuna()
    if not journal:
        optuna.storages.fail_stale_trials(study)
        return
    from optuna.exceptions import UpdateFinishedTrialError
    S = _states()
    storage = study._storage
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        last = t.system_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last <= grace_s:
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=S.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # it finished, or another worker failed it first
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_ATTEMPTS)(study, storage.get_trial(t._trial_id))


def _requeue(study, t, fault: str) -> None:
    """A WAITING copy of a trial that failed for a passing reason (the retry callback's way)."""
    optuna = _optuna()
    keep = {k: t.user_attrs[k] for k in ("candidate", "key", "index")}
    hist = list(t.system_attrs.get("retry_history", [])) + [t.number]
    study.add_trial(optuna.trial.create_trial(state=_states().WAITING, user_attrs={**keep, "requeued": fault},
                                              system_attrs={"failed_trial": hist[0], "retry_history": hist}))


def _worker_id() -> dict:
    from ..cpu import cpu_model
    return {"host": socket.gethostname(), "pid": os.getpid(), "cpu": cpu_model()}


def _fingerprint(search) -> dict:
    """Which validation images, by content (paths differ between machines)."""
    h = hashlib.sha256()
    for tensor in (search.val.test.images, search.val.test.labels, search.val.train.labels):
        h.update(tensor.contiguous().numpy().tobytes())
    return {"validation_sha256": h.hexdigest(), "calibration_pool": len(search.val.train.labels),
            "input_shape": list(search.val.input_shape), "classes": list(search.data.classes)}


def _identity(cfg, search) -> dict:
    from . import _start
    from ..fileio import sha256
    start = _start(cfg)
    conf = dict(start["config"])
    if cfg.sensitivity is not None:
        conf["sensitivity"] = sha256(cfg.sensitivity)
    conf["time_limit_s"] = cfg.time_limit_s
    return {"checkpoint_sha256": start["checkpoint_sha256"], "checkpoint": str(cfg.checkpoint),
            "data": _fingerprint(search), "config": conf}


def _join(study, cfg, search) -> dict:
    """Set the study's `start` (first worker) or check it (the others); every worker searches
    the first one's runtimes."""
    mine = _identity(cfg, search)
    attrs = study.user_attrs
    if "start" not in attrs:
        study.set_user_attr("start", mine)
        study.set_user_attr("runtimes", list(search.runtimes))
        study.set_user_attr("input_shape", list(search.val.input_shape))
        study.set_user_attr("started_at", time.time())
        attrs = study.user_attrs
    theirs = attrs["start"]
    ignore = {"runtimes"} if cfg.runtimes is None else set()
    differ = [k for k in ("checkpoint_sha256", "data") if theirs.get(k) != mine.get(k)]
    conf_a = {k: v for k, v in theirs.get("config", {}).items() if k not in ignore}
    conf_b = {k: v for k, v in mine["config"].items() if k not in ignore}
    if conf_a != conf_b:
        differ.append("config")
    if cfg.runtimes is not None and list(attrs.get("runtimes", [])) != list(search.runtimes):
        differ.append("config")
    if differ:
        what = {"checkpoint_sha256": "checkpoint", "data": "validation images", "config": "options"}
        diff = sorted(k for k in set(conf_a) | set(conf_b) if conf_a.get(k) != conf_b.get(k))
        raise QuantbenchError(f"study {cfg.study!r} belongs to another search (another "
                              f"{' and '.join(dict.fromkeys(what[k] for k in differ))}"
                              f"{': ' + ', '.join(diff) if diff else ''}); give the same options, or another --study")
    search.runtimes = tuple(attrs.get("runtimes", search.runtimes))
    return theirs


def work(cfg, progress: bool = True) -> dict:
    """One worker: takes the next ready candidate until the search is over. Returns what it did."""
    from . import _log
    from .trials import Search
    artifacts = Path(cfg.artifacts or cfg.output)
    artifacts.mkdir(parents=True, exist_ok=True)
    study, journal = load_study(cfg.storage, cfg.study, cfg.heartbeat_s, cfg.grace_s, create=True)
    search = Search(dataclasses.replace(cfg, output=artifacts), progress)
    _join(study, cfg, search)
    me = _worker_id()
    from ..cpu import machine_record
    machine = machine_record()
    storage = study._storage
    S = _states()
    made: list[str] = []
    stopped = None
    _log(f"worker {me['host']}:{me['pid']} on study {cfg.study!r} in {masked(cfg.storage)}; files in {artifacts}")
    try:
        while True:
            fail_stale(study, journal, cfg.grace_s)
            trials = study.get_trials(deepcopy=False)
            done, fp32_acc = finished(trials, cfg.max_drop)
            ref = done.get(REFERENCE.key)
            if ref is not None and not ref.ok:
                raise QuantbenchError(f"the fp32 reference (TorchScript) failed, so no budget can be judged: {ref.error}")
            if "ranking" in study.user_attrs:
                search._ranking = list(study.user_attrs["ranking"])
            ready, over = schedule(search, done)
            if search._ranking is not None and "ranking" not in study.user_attrs:
                study.set_user_attr("ranking", list(search._ranking))
            live = [t for t in trials if t.state in (S.WAITING, S.RUNNING) and "key" in t.user_attrs]
            if over and not live:
                if "finished_at" not in study.user_attrs:
                    study.set_user_attr("finished_at", time.time())
                break
            started = study.user_attrs.get("started_at", time.time())
            if cfg.time_limit_s is not None and time.time() - started >= cfg.time_limit_s:
                stopped = f"time limit of {hms(cfg.time_limit_s)} spent"
                study.set_user_attr("stopped", stopped)
                break
            queued = {t.user_attrs["key"] for t in live}
            new = [c for c in ready if c.key not in queued]
            if new:
                index = max([t.user_attrs.get("index", -1) for t in trials] + [-1]) + 1
                for i, c in enumerate(new):
                    study.enqueue_trial({}, user_attrs={"candidate": c.to_dict(), "key": c.key, "index": index + i})
                trials = study.get_trials(deepcopy=False)
            t = _claim(study, trials)
            if t is None:
                time.sleep(POLL_S)
                continue
            key = t.user_attrs["key"]
            c = Candidate.from_dict(t.user_attrs["candidate"])
            storage.set_trial_user_attr(t._trial_id, "worker", me)
            if _duplicate(study, t):
                continue
            if progress:
                _log(f"#{t.user_attrs['index']} {c.describe()}: making and scoring it here")
            with _Heartbeat(storage, t._trial_id, cfg.heartbeat_s, journal) as hb:
                try:
                    result = run_trial(search, c, t.user_attrs["index"], artifacts)
                except KeyboardInterrupt:
                    _interrupted(study, t, me)
                    raise
            result["machine"] = machine
            result["worker"] = me
            if not _finish(study, t, result, hb):
                _log(f"#{t.user_attrs['index']} {c.describe()}: another worker failed it for a missing heartbeat; "
                     f"it is made again there (raise --grace-seconds if this machine is just slow)")
                continue
            made.append(key)
            _log(_line(c, result, fp32_acc, cfg.max_drop))
    finally:
        search.close()
    return {"worker": me, "made": made, "stopped": stopped, "study": cfg.study,
            "status": status(cfg.storage, cfg.study)}


def _claim(study, trials):
    """The lowest-index WAITING trial this machine can make, now RUNNING here (or None)."""
    from optuna.exceptions import UpdateFinishedTrialError
    S = _states()
    waiting = sorted((t for t in trials if t.state == S.WAITING and "key" in t.user_attrs),
                     key=lambda t: (t.user_attrs["index"], t.number))
    for t in waiting:
        c = Candidate.from_dict(t.user_attrs["candidate"])
        if c.is_runtime and not runtimes.available(c.maker):
            continue  # another worker, with that runtime installed, takes it
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=S.RUNNING):
                return study._storage.get_trial(t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def _duplicate(study, t) -> bool:
    """Cancel a trial whose candidate a lower-numbered live trial owns (two workers enqueued it
    from the same state)."""
    key = t.user_attrs["key"]
    owner = next((o for o in study.get_trials(deepcopy=False)
                  if o.number < t.number and o.user_attrs.get("key") == key and _live(o)), None)
    if owner is None:
        return False
    from optuna.exceptions import UpdateFinishedTrialError
    try:
        study._storage.set_trial_user_attr(t._trial_id, "duplicate_of", owner.number)
        study._storage.set_trial_state_values(t._trial_id, state=_states().PRUNED)
    except UpdateFinishedTrialError:
        pass
    return True


def _interrupted(study, t, me: dict) -> None:
    """Ctrl-C: the trial is FAIL (interrupted) and a WAITING copy is left for the others."""
    from optuna.exceptions import UpdateFinishedTrialError
    fault = f"interrupted on {me['host']}:{me['pid']}"
    try:
        study._storage.set_trial_user_attr(t._trial_id, "fault", fault)
        if study._storage.set_trial_state_values(t._trial_id, state=_states().FAIL):
            _requeue(study, t, fault)
    except UpdateFinishedTrialError:
        pass


def _finish(study, t, result: dict, hb: _Heartbeat) -> bool:
    """Record the result: COMPLETE (value: validation accuracy), FAIL of its own, or FAIL for a
    passing reason with a WAITING copy. False when another worker had already failed the trial."""
    from optuna.exceptions import UpdateFinishedTrialError
    S = _states()
    st = study._storage
    if hb.lost:
        return False
    try:
        st.set_trial_user_attr(t._trial_id, "result", result)
        if result.get("error") is None:
            st.set_trial_state_values(t._trial_id, state=S.COMPLETE, values=[result["val_acc"]])
        elif result.get("transient"):
            st.set_trial_user_attr(t._trial_id, "fault", f"passing failure: {result['error']}")
            if st.set_trial_state_values(t._trial_id, state=S.FAIL):
                _requeue(study, t, "passing failure")
        else:
            st.set_trial_state_values(t._trial_id, state=S.FAIL)
    except UpdateFinishedTrialError:
        return False
    return True


def run_trial(search, c: Candidate, index: int, artifacts: Path) -> dict:
    """Make one candidate's file into the artifact folder and score it on the validation images
    (no timing: latency is measured by --pick on the deployment machine)."""
    from ..deploy import make
    from .trials import _transient
    t0 = time.perf_counter()
    r: dict = {"file": None, "val_acc": None, "file_bytes": None, "error": None, "transient": False}
    try:
        if c == REFERENCE:  # one-process tune makes it before the search; here it is a trial
            search.trials_dir.mkdir(parents=True, exist_ok=True)
            make(search.source, search._target(REFERENCE), search.ref_file, progress=False)
            path = search.ref_file
        else:
            path = search.make(c, index)
        r["file"] = str(path.relative_to(artifacts))
        r["file_bytes"] = sum(p.stat().st_size for p in runtimes.for_path(path).files(path) if p.is_file())
        r["val_acc"] = round(search.accuracy(path), 2)
    except QuantbenchError as e:  # the candidate's own failure is a result
        r["error"], r["transient"] = str(e).splitlines()[0] if str(e) else type(e).__name__, _transient(e)
    except Exception as e:  # noqa: BLE001 - a library's crash on one config must not end the worker
        r["error"], r["transient"] = f"{type(e).__name__}: {cause(e)}".splitlines()[0], _transient(e)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def _line(c: Candidate, r: dict, fp32_acc: float | None, max_drop: float) -> str:
    if r.get("error"):
        return f"{c.describe()}: failed{' (passing; made again)' if r.get('transient') else ''}: {r['error']}"
    if c.reference:
        return f"{c.describe()}: val {r['val_acc']:.2f} % (the fp32 reference) in {r['seconds']:.0f} s"
    verdict = ""
    if fp32_acc is not None:
        verdict = ": within budget" if fp32_acc - r["val_acc"] <= max_drop else ": misses the budget"
    return f"{c.describe()}: val {r['val_acc']:.2f} % in {r['seconds']:.0f} s{verdict}"


# ------------------------------------------------------------------ --status
def status(url: str, name: str, text: bool = False):
    """Trials done, running (by which machine), waiting, failed, the best so far and the time
    spent. A dict, or its text when `text`."""
    study, _ = load_study(url, name)
    S = _states()
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    max_drop = (attrs.get("start") or {}).get("config", {}).get("max_drop", math.inf)
    done, fp32_acc = finished(trials, max_drop)
    running = [t for t in trials if t.state == S.RUNNING and "key" in t.user_attrs]
    waiting = [t for t in trials if t.state == S.WAITING and "key" in t.user_attrs]
    retried = [t for t in trials if t.state == S.FAIL and not _own_error(t)]
    dups = [t for t in trials if t.state == S.PRUNED]
    failed = [t for t in done.values() if not t.ok]
    ok = [t for t in done.values() if t.ok and not t.reference]
    within = [t for t in ok if t.within_budget]
    best = max(within or ok, key=lambda t: (t.val_acc, -(t.file_bytes or 0)), default=None)
    now = time.time()
    started = attrs.get("started_at")
    end = attrs.get("finished_at") or now
    machines = sorted({(t.user_attrs.get("result") or {}).get("worker", {}).get("host", "?")
                       for t in trials if t.state == S.COMPLETE})
    d = {"study": name, "storage": masked(url), "done": len(done) - len(failed), "failed": len(failed),
         "running": [{"index": t.user_attrs["index"], "key": t.user_attrs["key"],
                      "worker": t.user_attrs.get("worker", {}),
                      "seconds": round(now - t.datetime_start.timestamp(), 1) if t.datetime_start else None}
                     for t in running],
         "waiting": len(waiting), "retried": len(retried), "duplicates_cancelled": len(dups),
         "fp32_val_acc": fp32_acc, "within_budget": len(within),
         "best": dataclasses.asdict(best) if best else None,
         "finished": "finished_at" in attrs, "stopped": attrs.get("stopped"),
         "wall_s": round(end - started, 1) if started else 0.0,
         "trial_s": round(sum(t.seconds for t in done.values()), 1), "machines": machines,
         "failures": [{"index": t.index, "key": t.key, "error": t.error} for t in failed]}
    return render_status(d) if text else d


def render_status(d: dict) -> str:
    state = ("finished" if d["finished"] else f"stopped: {d['stopped']}" if d["stopped"] else "in progress")
    lines = [f"study {d['study']!r} in {d['storage']}: {state}",
             f"  done {d['done']}, running {len(d['running'])}, waiting {d['waiting']}, failed {d['failed']}"
             f" (made again after a dead worker, Ctrl-C or a passing failure: {d['retried']}; duplicates cancelled: "
             f"{d['duplicates_cancelled']})"]
    for r in d["running"]:
        w = r["worker"]
        lines.append(f"  running #{r['index']} {r['key']} on {w.get('host', '?')} (pid {w.get('pid', '?')}) for {hms(r['seconds'] or 0)}")
    for f in d["failures"]:
        lines.append(f"  failed #{f['index']} {f['key']}: {f['error']}")
    if d["fp32_val_acc"] is not None:
        lines.append(f"  fp32 reference: val {d['fp32_val_acc']:.2f} %; within budget so far: {d['within_budget']}")
    if d["best"]:
        b = d["best"]
        lines.append(f"  best so far by accuracy: #{b['index']} {Candidate.from_dict(b['candidate']).describe()}, "
                     f"val {b['val_acc']:.2f} % ({drop_words(b['drop']) if b['drop'] is not None else 'no reference yet'}),"
                     f" {b['file_bytes'] / 2**20:.1f} MiB (latency: `--pick` times the qualified files on the "
                     f"deployment machine)")
    lines.append(f"  time: {hms(d['wall_s'])} since the study started; {hms(d['trial_s'])} of trial time on "
                 f"{len(d['machines'])} machine(s){': ' + ', '.join(d['machines']) if d['machines'] else ''}")
    return "\n".join(lines)


# ------------------------------------------------------------------ --pick
class _Scores:
    """The one-process search's pick rules (trials.Search) over the study's trials."""
    from .trials import Search as _S
    score, candidates_done, best, fastest, speedup = _S.score, _S.candidates_done, _S.best, _S.fastest, _S.speedup

    def __init__(self, cfg, trials: dict[str, Trial]):
        self.cfg, self.trials = cfg, trials


def pick(url: str, name: str, output: Path, artifacts: Path | None = None, timing_s: float = 4.0,
         progress: bool = True) -> dict:
    """On the deployment machine: time the accuracy-qualified files here against one anchor (the
    first of them), pick by the search's objective, write best.<suffix>, best.json, pick.json and
    pick.md in `output`. Returns pick.json's content."""
    from ..bench import AnchoredTiming
    from ..cpu import machine_record
    from ..fileio import check_writable, run_lock, write_json, write_text
    from . import _log
    study, _ = load_study(url, name)
    attrs = study.user_attrs
    start = attrs.get("start")
    if not start:
        raise QuantbenchError(f"study {name!r} in {masked(url)} has no search yet: start a worker first")
    conf = start["config"]
    cfg = SimpleNamespace(objective=conf["objective"], max_drop=conf["max_drop"], val_samples=conf["val_samples"])
    S = _states()
    trials = study.get_trials(deepcopy=False)
    done, fp32_acc = finished(trials, cfg.max_drop)
    if fp32_acc is None:
        raise QuantbenchError(f"study {name!r} has no fp32 reference accuracy yet: let the workers run")
    artifacts = Path(artifacts or output)
    ok = [t for t in done.values() if t.ok and not t.reference]
    qualified = [t for t in ok if t.within_budget]
    timed = qualified or ok  # nothing met the budget: best.* is the most accurate, fastest.* the fastest
    if not timed:
        raise QuantbenchError(f"study {name!r} has no scored int8 file yet: let the workers run")
    missing = [t.file for t in timed + [done[REFERENCE.key]] if not (artifacts / t.file).is_file()]
    if missing:
        raise QuantbenchError(f"{artifacts / missing[0]} is missing: give --artifacts, the shared folder the workers "
                              f"wrote to ({len(missing)} file(s) not found)")
    out = check_writable(output, is_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    ref = done[REFERENCE.key]
    with run_lock(out):
        timing = AnchoredTiming(tuple(attrs.get("input_shape") or start["data"]["input_shape"]), timing_s)
        anchor = timed[0]
        try:
            for t in timed + [ref]:
                if progress:
                    _log(f"timing #{t.index} {Candidate.from_dict(t.candidate).describe()}")
                t.latency_ms, t.anchor_latency_ms = timing.time(artifacts / t.file, artifacts / anchor.file)
                t.ratio = round(t.latency_ms / t.anchor_latency_ms, 4)
        finally:
            timing.close()
        anchor.anchor = True
        scores = _Scores(cfg, done)
        best, met = scores.best()
        fastest = scores.fastest() if not met else None
        copy_deployment(artifacts / best.file, out, "best")
        suffix = Path(best.file).suffix
        running = sum(t.state in (S.WAITING, S.RUNNING) for t in trials)
        here = machine_record(threads=1)
        write_json(out / "best.json", {"key": best.key, "within_budget": met, "max_drop": cfg.max_drop,
                                       "trial": dataclasses.asdict(best), "file": f"best{suffix}",
                                       "study": name, "storage": masked(url), "timed_on": here})
        summary = {"study": name, "storage": masked(url), "max_drop": cfg.max_drop, "objective": cfg.objective,
                   "val_samples": cfg.val_samples, "fp32_val_acc": fp32_acc, "within_budget": met,
                   "trials": len(done), "unfinished": running, "finished": "finished_at" in attrs,
                   "timing_s": timing_s, "timed_on": here, "pick": dataclasses.asdict(best),
                   "pick_file": str(out / f"best{suffix}"),
                   "timed": [dataclasses.asdict(t) for t in sorted(timed + [ref], key=lambda t: t.ratio)]}
        if fastest is not None:
            summary["fastest"] = dataclasses.asdict(fastest)
            summary["fastest_file"] = str(copy_deployment(artifacts / fastest.file, out, "fastest"))
        summary["sentence"] = explain_pick(scores, summary, timed)
        write_json(out / "pick.json", summary)
        write_text(out / "pick.md", render_pick(summary))
    return summary


def explain_pick(scores: _Scores, summary: dict, timed: list[Trial]) -> str:
    cfg = scores.cfg
    best = scores.best()[0]
    desc = Candidate.from_dict(best.candidate).describe()
    x = scores.speedup(best)
    speed = f"{x:.1f}x the speed of fp32 TorchScript" if x else "not timed against fp32 TorchScript"
    where = summary["timed_on"]["cpu"]
    unfinished = (f" The study is not finished ({summary['unfinished']} trial(s) waiting or running): "
                  f"pick again when it is." if not summary["finished"] else "")
    if not summary["within_budget"]:
        fast = Candidate.from_dict(summary["fastest"]["candidate"]).describe() if "fastest" in summary else "none"
        return (f"No int8 trial stayed within {cfg.max_drop} point of fp32 on the validation images; best.* is the "
                f"most accurate one, {desc} ({drop_words(best.drop)}, {speed} on {where}), and fastest.* the fastest "
                f"one here, {fast}.{unfinished}")
    goal = "fastest" if cfg.objective == "latency" else "smallest"
    others = sorted((t for t in timed if t is not best), key=scores.score)
    close = ""
    if cfg.objective == "latency" and others:
        gap = others[0].ratio / best.ratio - 1
        close = (f" The runner-up, {Candidate.from_dict(others[0].candidate).describe()}, takes {gap * 100:.1f} % "
                 f"longer" + (": within this machine's timing noise (a few %), time longer with --timing-seconds "
                              "to separate them" if gap < 0.03 else "") + ".")
    return (f"Picked {desc}: the {goal} here ({where}) of the {len(timed)} trial(s) within {cfg.max_drop} point of "
            f"fp32 on {cfg.val_samples} validation images ({drop_words(best.drop)}, scored by a worker), {speed}, "
            f"{best.file_bytes / 2**20:.1f} MiB.{close}{unfinished}")


def render_pick(summary: dict) -> str:
    lines = ["# quantbench tune --pick", "", summary["sentence"], "",
             f"Study `{summary['study']}` in `{summary['storage']}`; max drop {summary['max_drop']} point on "
             f"{summary['val_samples']} validation images (fp32 there: {summary['fp32_val_acc']} %, scored by the "
             f"workers); latency timed here, on {summary['timed_on']['cpu']}: batch 1, one thread, "
             f"{summary['timing_s']} s per file against the anchor (the first qualified file) in interleaved rounds.",
             "", "| # | trial | val acc | drop | vs anchor | ms | MiB |", "|---|---|---|---|---|---|---|"]
    for t in summary["timed"]:
        desc = Candidate.from_dict(t["candidate"]).describe() + (" (anchor)" if t["anchor"] else "")
        lines.append(f"| {t['index']} | {desc} | {t['val_acc']:.2f} | {t['drop']:+.2f} | {t['ratio']:.3f} | "
                     f"{t['latency_ms']:.3f} | {t['file_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"
