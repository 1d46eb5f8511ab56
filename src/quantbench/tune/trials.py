"""One trial: a candidate made into a real deployment file (quantbench.deploy, the code every
command makes files with), then measured:

  accuracy  on validation images held out of the TRAINING split (never the test split:
            choosing among many trials by test accuracy would tune on the test set and
            overstate what the pick delivers);
  latency   batch 1, one thread, against one anchor process (bench.AnchoredTiming): the ratio
            to the anchor is what trials compare;
  size      the deployment files' bytes.

Search holds what trials share: the fp32 model read once, the validation split, the anchor,
the results so far, and picks the best.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import math
import time
from pathlib import Path

from torch import nn

from .. import runtimes
from ..bench import AnchoredTiming
from ..data import Dataset
from ..deploy import ORIGIN, Source, Target, files_of, make, suffix
from ..errors import QuantbenchError, cause
from .journal import Journal, Trial, save_best
from .space import REFERENCE, Candidate

# errors that say nothing about the candidate: the trial is made again on --resume
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ENOMEM, errno.EMFILE}


class Search:
    """What the search needs between trials (the source model, data, anchor, results so far)."""

    def __init__(self, cfg, progress: bool = True):
        from ..sensitivity import validation_split
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output)
        self.trials_dir = self.out / "trials"
        self.journal = Journal(self.out)
        # the fp32 model, read once: every trial's file is made from it
        self.source = Source.from_checkpoint(cfg.checkpoint, model_spec=cfg.quantize.model)
        self.meta = meta = self.source.meta
        # load_for checks the data against the checkpoint's classes and shape, and normalizes as it was trained
        self.data: Dataset = cfg.data.load_for(meta, f"checkpoint {cfg.checkpoint}", train=True, progress=progress)
        # calibration reads val.train; accuracy val.test: both from the training split, apart
        self.val = validation_split(self.data, cfg.val_samples, cfg.seed)
        self.source.data = self.val
        self.trials: dict[str, Trial] = {}
        self.started = time.perf_counter()
        self.spent_before = 0.0           # seconds of earlier sessions of a resumed search
        self.fp32_acc: float | None = None
        self.ref_file = self.trials_dir / "ref-torchscript-fp32.pt"
        self.anchor: Trial | None = None
        self.timing = AnchoredTiming(self.val.input_shape, cfg.timing_s)
        self._ranking: list[str] | None = None
        self.runtimes = cfg.runtimes if cfg.runtimes is not None else tuple(
            r for r in runtimes.exporters(int8=True) if runtimes.available(r))

    @property
    def float_model(self) -> nn.Module:
        return self.source.model

    # -- bookkeeping ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def replay(self, start: dict) -> None:
        """--resume: the trials tune.jsonl already holds, and the best files made to agree with them."""
        trials, self.fp32_acc = self.journal.replay(start)
        for t in trials:
            self.trials[t.key] = t
            self.spent_before += t.seconds
            if t.anchor:
                self.anchor = t
        self.save_best()

    def reference_accuracy(self) -> float:
        """The fp32 model's validation accuracy, from its TorchScript file (made once)."""
        if self.fp32_acc is None:
            self.trials_dir.mkdir(parents=True, exist_ok=True)
            # fp32 TorchScript, as the eager flow exports its "origin" file
            make(self.source, Target("eager", ORIGIN, self.cfg.quantize.replace(seed=self.cfg.seed)), self.ref_file,
                 progress=False)
            self.fp32_acc = round(self.accuracy(self.ref_file), 2)
            self.journal.append({"type": "fp32", "file": str(self.ref_file.relative_to(self.out)),
                                 "val_acc": self.fp32_acc})
            from . import _log
            _log(f"fp32: val {self.fp32_acc:.2f} % on {self.cfg.val_samples} images held out of the training split")
        return self.fp32_acc

    def record(self, t: Trial) -> None:
        if self.anchor is None and t.ratio is not None:
            t.anchor, self.anchor = True, t
        if not t.transient:
            self.trials[t.key] = t
        self.journal.append({"type": "trial", **dataclasses.asdict(t)})
        self.save_best()

    def ranking(self) -> list[str]:
        """Layers most worth keeping fp32 first: from a sensitivity.json when given, else by the
        int8 error at each layer's output in the fully int8 FX model (one calibration, PyTorch's
        numeric suite: lowest SQNR first)."""
        if self._ranking is None:
            if self.cfg.sensitivity is not None:
                from ..fileio import read_json
                from ..sensitivity import most_sensitive
                n = len(read_json(self.cfg.sensitivity).get("layers") or [])
                self._ranking = list(most_sensitive(self.cfg.sensitivity, n, checkpoint=self.cfg.checkpoint))
            else:
                try:
                    self._ranking = sqnr_ranking(copy.deepcopy(self.float_model), self.val, self.cfg.quantize, self.meta)
                except Exception as e:  # noqa: BLE001 - a model FX cannot trace: no fallback stage
                    from . import _log
                    _log(f"no fp32 fallback trials: the layers could not be ranked ({cause(e)}); "
                         f"pass --sensitivity from `quantbench sensitivity --flow pt2e`")
                    self._ranking = []
        return self._ranking

    # -- one trial -------------------------------------------------------------------------------
    def run(self, c: Candidate, index: int) -> Trial:
        t0 = time.perf_counter()
        trial = Trial(index=index, key=c.key, candidate=c.to_dict(), reference=c.reference)
        try:
            path = self.make(c, index)
            trial.file = str(path.relative_to(self.out))
            trial.file_bytes = sum(p.stat().st_size for p in runtimes.for_path(path).files(path) if p.is_file())
            trial.val_acc = round(self.accuracy(path), 2)
            trial.drop = round(self.fp32_acc - trial.val_acc, 2)
            trial.within_budget = not c.reference and trial.drop <= self.cfg.max_drop
            anchor = self.out / self.anchor.file if self.anchor is not None else None
            trial.latency_ms, trial.anchor_latency_ms = self.timing.time(path, anchor)
            trial.ratio = round(trial.latency_ms / trial.anchor_latency_ms, 4)
        except QuantbenchError as e:  # one trial's failure (a flow that cannot trace...) is a result
            trial.error = str(e)
            trial.transient = _transient(e)
        except Exception as e:  # noqa: BLE001 - a library's crash on one config must not end the search
            trial.error = f"{type(e).__name__}: {cause(e)}"
            trial.transient = _transient(e)
        trial.seconds = round(time.perf_counter() - t0, 1)
        return trial

    def _target(self, c: Candidate) -> Target:
        """The deploy.Target a candidate names: the template config with its calibration
        choices and fp32 layers."""
        q = self.cfg.quantize
        q = q.replace(fp32_layers=tuple(q.fp32_layers) + c.fp32_layers, seed=self.cfg.seed, **dict(c.scheme))
        if c == REFERENCE:  # fp32 TorchScript: the eager flow's origin file (TorchScript has no exporter)
            return Target("eager", ORIGIN, q)
        method = "static" if c.is_runtime and c.method == ORIGIN else c.method
        return Target(c.maker, method, q)

    def make(self, c: Candidate, index: int) -> Path:
        """The deployment file of a candidate. A runtime's exporter writes its fp32 and int8
        files together: the origin candidate and the default int8 one share a folder."""
        self.trials_dir.mkdir(parents=True, exist_ok=True)
        if c == REFERENCE:  # made for the budget's reference accuracy already
            return self.ref_file
        target = self._target(c)
        if c.is_runtime:
            slug = f"{index:03d}-" + "-".join([c.maker, c.method] + [k if v is True else str(v) for k, v in c.scheme])
            folder = self.trials_dir / (f"{c.maker}-default" if not c.scheme else slug)
            fp32_file, int8_file = files_of(target, folder)[:2]  # FILES: fp32, int8, then others (bf16)
            want = fp32_file if c.reference else int8_file
            if not (want.is_file() and Path(str(want) + ".json").is_file()):
                make(self.source, target, folder, progress=False)
            return want
        slug = f"{index:03d}-" + "-".join([c.maker, c.method] + [k if v is True else str(v) for k, v in c.scheme]
                                          + ([f"fp32x{len(c.fp32_layers)}"] if c.fp32_layers else []))
        path = self.trials_dir / f"{slug}{suffix(c.maker)}"
        make(self.source, target, path, progress=False)
        return path

    def accuracy(self, path: Path) -> float:
        from ..evaluate import accuracy
        model = runtimes.load(path)
        return accuracy(model, self.val, batch_size=250, progress=False, set_eval=False)

    def close(self) -> None:
        self.timing.close()

    def speedup(self, t: Trial, over: Trial | None = None) -> float | None:
        """How many times faster than `over` (default: fp32 TorchScript), both on the anchor's scale."""
        over = over or self.trials.get(REFERENCE.key)
        if over is None or over.ratio is None or t.ratio is None:
            return None
        return over.ratio / t.ratio

    # -- the pick --------------------------------------------------------------------------------
    def score(self, t: Trial) -> tuple:
        """Smaller is better: the objective, then the other one, then accuracy."""
        if self.cfg.objective == "size":
            return (t.file_bytes, t.ratio, -t.val_acc)
        return (t.ratio, t.file_bytes, -t.val_acc)

    def candidates_done(self) -> list[Trial]:
        return [t for t in self.trials.values() if t.ok and not t.reference]

    def best(self) -> tuple[Trial | None, bool]:
        """(the pick, whether it meets the budget): the best within budget by the objective, else
        the most accurate trial."""
        done = self.candidates_done()
        within = [t for t in done if t.within_budget and t.ratio is not None]
        if within:
            return min(within, key=self.score), True
        return max(done, key=lambda t: (t.val_acc, -(t.ratio or math.inf)), default=None), False

    def fastest(self) -> Trial | None:
        return min((t for t in self.candidates_done() if t.ratio is not None), key=lambda t: t.ratio, default=None)

    def save_best(self) -> None:
        best, met = self.best()
        if best is not None:
            save_best(self.out, best, met, self.cfg.max_drop)


def _transient(e: BaseException) -> bool:
    """A failure of the machine, not of the candidate (a full disk, an I/O error)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        if isinstance(e, MemoryError):
            return True
        e = e.__cause__ or e.__context__
    return False


def sqnr_ranking(model: nn.Module, val: Dataset, q, meta: dict) -> list[str]:
    """Conv/linear layers, lowest int8 SQNR at their output in the fully int8 FX model first."""
    from ..export import example_input, input_shape
    from ..flows import quantizable_layers
    from ..quantize import calibration_batches
    from ..sensitivity import _Runner, fx_layer_sqnr
    layers = quantizable_layers(model)
    if not layers:
        return []
    calib = [x for x, _ in calibration_batches(val, q, limit=500)]
    runner = _Runner("fx", model, q.scheme, example_input(input_shape(meta)), calib)
    prepared, converted = runner.run(())
    sqnr = fx_layer_sqnr(prepared, converted, calib[0], layers)
    return sorted(layers, key=lambda n: sqnr.get(n, math.inf))
