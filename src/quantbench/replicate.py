"""The main job, end to end: the original's whole table from one command.

    train fp32 (or take --checkpoint)  ->  origin + ptq-d + ptq-s + qat for each flow
    (+ ONNX Runtime / OpenVINO rows when installed)  ->  bench  ->  report

Everything lands in one run directory: models/ (deployment files + sidecars), train/ and
qat-work/ (resumable checkpoints), results.json, results.csv, results.md, report.md.
With resume=True, deployment files that already exist (with their sidecar) are kept.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import runtimes
from .bench import BenchConfig, bench
from .data import DataSource
from .errors import FlowUnsupported, QuantbenchError
from .apart import make_apart
from .deploy import ORIGIN, Source, Target, files_of, is_flow, make, suffix
from .fileio import sha256
from .flows import METHODS, check_method
from .quantize import QuantizeConfig, qat_recipe
from .record import read_record, sidecar_path
from .report import write_report
from .results import BenchResults


@dataclass(frozen=True)
class ReplicateConfig:
    """The whole main job. `quantize` is the template every int8 row is made from (its method
    and flow are set per row); `data` is the one data location that training, calibration and
    the benchmark's accuracy runs all read."""
    output: Path = Path("runs/replicate")
    data: DataSource = field(default_factory=DataSource)
    checkpoint: Path | None = None        # skip training, start from this fp32 checkpoint
    preset: str = "fast"                  # fp32 training recipe when there is no checkpoint
    epochs: int | None = None             # override the recipe's epochs
    arch: str | None = "resnet18"         # what to train (or quantize.model, the user's builder)
    flows: tuple[str, ...] = ("eager",)
    methods: tuple[str, ...] = METHODS
    runtimes: tuple[str, ...] | None = None   # comparison rows; None: every installed one
    # runtimes whose int8 row is also made as that runtime alone makes it (no pruning, its own
    # default calibration), labelled NAME-plain: the baseline quantbench's additions are measured against
    plain: tuple[str, ...] = ()
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(method="static"))
    resume: bool = False
    bench: BenchConfig = field(default_factory=BenchConfig)

    def __post_init__(self):
        object.__setattr__(self, "flows", tuple(self.flows))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.flows or not self.methods:
            raise QuantbenchError("replicate needs at least one flow and one method")
        for flow in self.flows:  # fail on bad options before hours of work
            for method in self.methods:
                check_method(flow, method)
                self.quantize.replace(method=method, flow=flow)  # validates the combination
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", runtimes.check_exporters(self.runtimes))
        object.__setattr__(self, "plain", runtimes.check_exporters(self.plain, int8=True) if self.plain else ())  # its int8 row
        if self.checkpoint is None:
            from .train import get_recipe
            get_recipe(self.preset, epochs=self.epochs)  # unknown preset, bad epochs: fail now
        # the benchmark measures accuracy on the very data the models were made from
        object.__setattr__(self, "bench", dataclasses.replace(self.bench, data=self.data))


def _log(msg: str) -> None:
    print(f"[replicate] {msg}", file=sys.stderr, flush=True)


def targets(cfg: ReplicateConfig) -> list[Target]:
    """Every target of the run, in the table's order: the fp32 "origin" once per runtime the
    flows deploy to, each flow x method, each comparison runtime, then the plain rows."""
    q = cfg.quantize
    out: list[Target] = []
    for suf in dict.fromkeys(suffix(f) for f in cfg.flows):
        out.append(Target(next(f for f in cfg.flows if suffix(f) == suf), ORIGIN, q))
    out += [Target(flow, method, q) for flow in cfg.flows for method in cfg.methods]
    wanted = cfg.runtimes if cfg.runtimes is not None else tuple(r for r in runtimes.exporters()
                                                                 if runtimes.available(r))
    out += [Target(name, "static", q) for name in wanted]
    out += [Target(name, "static", q, plain=True) for name in cfg.plain]
    return out


def destination(models: Path, t: Target) -> Path:
    """Where a target's file(s) go: models/LABEL.suffix for a flow, models/ (or models/plain/)
    for a runtime's FILES."""
    if is_flow(t.maker):
        return models / (t.label + suffix(t.maker))
    return models / "plain" if t.plain else models


def _reusable(t: Target, dest: Path, resume: bool, source_sha: str | None) -> bool:
    """With --resume, a file already made is measured again only if its sidecar says it was made
    the way this run would make it: the same checkpoint by content, the same target."""
    paths = files_of(t, dest)
    if not (resume and all(p.is_file() and sidecar_path(p).is_file() for p in paths)):
        return False
    for p in paths:
        rec = read_record(p)
        if rec.source_sha256 != source_sha or rec.target != json.loads(json.dumps(t.identity())):
            why = "checkpoint" if rec.source_sha256 != source_sha else \
                "quantbench version" if rec.target is None else "configuration"
            _log(f"remaking {p.name}: it was made with another {why}")
            return False
    return True


def replicate(cfg: ReplicateConfig, progress: bool = True) -> BenchResults:
    out = Path(cfg.output)
    models = out / "models"
    data = cfg.data.load(train=True, progress=progress)
    if cfg.checkpoint is None and cfg.quantize.fp32_layers:  # before training, not after it
        from .flows import check_layers
        from .models import build_model
        check_layers(build_model(cfg.arch, cfg.quantize.model, num_classes=data.num_classes,
                                 input_shape=data.input_shape), cfg.quantize.fp32_layers)

    # what the run will do and cost, before the long work (training, when there is no checkpoint)
    for line in plan(cfg, data, trained=cfg.checkpoint is None):
        _log(line)

    # 1. fp32 model
    ckpt = cfg.checkpoint
    if ckpt is None:
        from .train import get_recipe, train
        _log(f"training fp32 ({cfg.preset} preset) in {out / 'train'}")
        train(data, get_recipe(cfg.preset, epochs=cfg.epochs), out / "train", arch=cfg.arch,
              model_spec=cfg.quantize.model, resume=cfg.resume, progress=progress)
        ckpt = out / "train" / "best.pth"
    _check_data_identity(out, cfg, ckpt)

    # 2. deployment files: every target from the one fp32 model, read once
    files, skipped = make_files(cfg, ckpt, data, models, progress=progress, apart=True)

    # 3. measure and report
    _log(f"benchmarking {len(files)} models")
    results = bench(files, cfg.bench)
    q = cfg.quantize
    results.replicate = {"checkpoint": str(ckpt), "flows": list(cfg.flows), "methods": list(cfg.methods),
                         "qconfig": q.qconfig, "calib_samples": q.calib_samples, "qat_schedule": q.qat_schedule,
                         "data": str(cfg.data.dir or cfg.data.root), "skipped": skipped}
    write_report(results, run_dir=out)
    return results


def plan(cfg: ReplicateConfig, data, trained: bool = False) -> list[str]:
    """What the run is about to do and what it costs, said before the long work: the files to
    make, and for the benchmark the most its timing may take (a bound: --timing-seconds per file
    and setting) and how many images the accuracy passes run (their rate is shown as they go)."""
    ts = targets(cfg)
    n_files = sum(1 if is_flow(t.maker) else len(runtimes.made_files(t.maker)) for t in ts)
    # what bench measures: a plain target's int8 file only (make_files), FILES' second
    n_timed = sum(1 if is_flow(t.maker) else int(getattr(runtimes.get(t.maker), "MAKES_INT8", True)) if t.plain
                  else len(runtimes.made_files(t.maker)) for t in ts)
    b = cfg.bench
    if b.threads is None or b.batch_sizes is None:  # chosen by the files' input size, as bench will
        from .bench import timing_defaults
        b, _ = timing_defaults(b, [tuple(data.input_shape)])
    threads = b.thread_settings()
    settings = len(b.batch_sizes) * len(threads)
    bound_s = n_timed * settings * b.timing_s
    test_n = len(data.test) if b.eval_samples is None else min(b.eval_samples, len(data.test))
    qat = [t.label for t in ts if t.method == "qat"]
    lines = [f"plan: {len(ts)} targets, about {n_files} files ({', '.join(t.label for t in ts)})"
             + (f"; {len(qat)} QAT fine-tune(s), up to {qat_recipe(cfg.quantize).epochs} epoch(s) each over "
                f"{len(data.train) if data.train is not None else 0} training images" if qat else "")]
    lines.append(f"plan: timing {n_timed} files x {settings} setting(s) (batch {','.join(map(str, b.batch_sizes))}; "
                 f"threads {','.join(map(str, threads))}) x {b.processes} processes: at most "
                 f"{_duration(bound_s)} (--timing-seconds {b.timing_s:g} per file and setting)")
    if b.accuracy:
        lines.append(f"plan: accuracy of each file on {test_n:,} test images ({n_timed * test_n:,} images in all"
                     f"{'; --eval-samples N measures fewer' if b.eval_samples is None and test_n > 5000 else ''})")
    return lines


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def make_files(cfg: ReplicateConfig, ckpt, data, models: Path, wanted: list[Target] | None = None,
               progress: bool = True, apart: bool = False) -> tuple[list[Path], list[dict]]:
    """Make (or, with --resume, reuse) every target's file(s) in `models`; returns (the files to
    measure, the rows skipped because a flow cannot take this model or a runtime does not make
    them on this machine, e.g. bf16 rows on a CPU without bf16: each reason said once).

    `apart`: each runtime's files are made in a process of its own (apart.make_apart) from `ckpt`
    and cfg.data, which `data` must be the loaded form of; its libraries' memory ends with it."""
    source: Source | None = None
    source_sha = sha256(ckpt)
    files: list[Path] = []
    skipped: list[dict] = []
    not_here: dict[str, list[str]] = {}  # why -> the rows a runtime does not make on this machine
    for t in (targets(cfg) if wanted is None else wanted):
        dest = destination(models, t)
        if not is_flow(t.maker):
            if not t.plain:  # a plain target's other rows are not measured anyway
                for name, why in runtimes.skipped_files(t.maker).items():
                    not_here.setdefault(why, []).append(Path(name).stem)
            if not files_of(t, dest):
                continue
        if t.method == "qat":  # resumable fine-tunes under the run directory
            t = Target(t.maker, t.method, t.quantize.replace(work_dir=Path(cfg.output) / "qat-work" / t.maker,
                                                             resume=cfg.resume))
        if not _reusable(t, dest, cfg.resume, source_sha):
            if source is None:
                source = Source.from_checkpoint(ckpt, data, model_spec=cfg.quantize.model, quiet=False)
            _log(f"{t.label}{' (plain)' if t.plain else ''} ({t.method}) -> {dest.name}")
            try:
                made = (make_apart(ckpt, cfg.data, t, dest, model_spec=cfg.quantize.model, progress=progress)
                        if apart and not is_flow(t.maker) else make(source, t, dest, progress=progress))
            except FlowUnsupported as e:  # this model, not this run: the other rows still mean something
                _log(f"skipping {t.label}: {e}")
                skipped.append({"row": t.label, "flow": t.maker, "method": t.method, "why": str(e)})
                continue
            except (QuantbenchError, ImportError) as e:
                if is_flow(t.maker):
                    raise
                if cfg.runtimes is not None or t.plain:  # asked for by name: its failure is the run's
                    raise QuantbenchError(f"runtime {t.maker}{' (--plain)' if t.plain else ''}: {e}") from e
                _log(f"skipping {t.maker} rows: {e}")
                continue
            paths = [dest] if is_flow(t.maker) else [dest / r.file for r in made]
        else:
            paths = files_of(t, dest)
        files += [p for p in paths if not t.plain or read_record(p).dtype == "int8"]
    for why, rows in not_here.items():
        _log(f"{why} ({', '.join(rows)})")
        skipped.append({"row": ", ".join(rows), "flow": None, "method": None, "why": why})
    return files, skipped


def _runtime_rows(cfg: ReplicateConfig, ckpt, data, models: Path) -> list[Path]:
    """The comparison runtimes' files only."""
    return make_files(cfg, ckpt, data, models, [t for t in targets(cfg) if not is_flow(t.maker)])[0]


def _check_data_identity(out: Path, cfg: ReplicateConfig, ckpt) -> None:
    """A resumed run must read the same data as the run it resumes: files calibrated on other
    images would be measured as if made from these. The data's identity is kept in
    OUTPUT/run.json."""
    from .fileio import read_json, write_json
    path = out / "run.json"
    ident = {"data": cfg.data.identity()}
    if cfg.resume and path.is_file():
        try:
            old = read_json(path)
        except ValueError:
            old = {}
        if isinstance(old, dict) and old.get("data") not in (None, ident["data"]):
            raise QuantbenchError(f"{out} was made from other data ({old['data'].get('path')}); resume it with "
                                  f"the same --data-dir, or drop --resume to start over")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, ident)
