"""The search space, in the order that makes the search cheap: what to try, and when.

    1. each flow's and runtime's default int8 (+ dynamic where Linear layers hold the weights),
       then the fp32 file of each runtime, for comparison (never picked)
    2. other calibration choices, for the paths that missed the budget
    3. fp32 fallback of the layers that hurt most, for the torch flows still missing it

The flows and runtimes come from their registries: a new flow or exporter is searched as soon
as it is registered. Later stages look at the results of earlier ones, so `candidates` is a
generator over a search's state (a resumed search replays the same order).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..deploy import ORIGIN, is_flow
from ..flows import get_flow, quantizable_layers

# Calibration choices tried after a path's default misses the budget, most often helpful first:
# clipping outliers (percentile), then plain ranges, then ranges averaged over batches.
CALIBRATION_VARIANTS: tuple[dict, ...] = (
    {"observer": "percentile"},
    {"observer": "minmax"},
    {"observer": "moving-average"},
    {"act_scheme": "symmetric"},
    {"equalize": True},   # cross-layer equalization (torch flows only: quantbench.equalize)
)
FALLBACK_SIZES = (1, 2, 4, 8, 16)  # layers kept fp32, tried in this order until the budget is met


@dataclass(frozen=True)
class Candidate:
    """One deployment to try: a flow's int8 file, or a runtime's fp32/int8 file."""
    maker: str                            # a flow ("eager", "fx", ...) or a runtime with an exporter
    method: str = "static"                # "static", "dynamic", or "origin" (an fp32 reference)
    scheme: tuple[tuple[str, str], ...] = ()   # calibration overrides, e.g. (("observer", "minmax"),)
    fp32_layers: tuple[str, ...] = ()

    @property
    def is_runtime(self) -> bool:
        return not is_flow(self.maker)

    @property
    def reference(self) -> bool:
        return self.method == ORIGIN

    @property
    def key(self) -> str:
        """Names the trial in tune.jsonl (and is how --resume recognises it)."""
        parts = [self.maker, self.method] + [f"{k}={v}" for k, v in self.scheme]
        if self.fp32_layers:
            parts.append(f"fp32[{len(self.fp32_layers)}]=" + ",".join(self.fp32_layers))
        return " ".join(parts)

    def describe(self) -> str:
        what = {"origin": "fp32", "static": "static int8", "dynamic": "dynamic int8"}[self.method]
        opts = ", ".join("equalized" if k == "equalize" else f"{k} {v}" for k, v in self.scheme)
        fb = f", {len(self.fp32_layers)} layer(s) kept fp32" if self.fp32_layers else ""
        return f"{self.maker} {what}" + (f" ({opts})" if opts else "") + fb

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        """From its tune.jsonl form (JSON turned the tuples into lists; before 0.2 `maker` was `path`)."""
        return cls(d.get("maker", d.get("path")), d["method"], tuple(tuple(kv) for kv in d["scheme"]),
                   tuple(d["fp32_layers"]))


REFERENCE = Candidate("torchscript", ORIGIN)  # fp32 TorchScript: the accuracy reference


def variant(c: Candidate, **scheme) -> Candidate:
    return dataclasses.replace(c, scheme=tuple(sorted(scheme.items())))


def linear_share(model: nn.Module) -> float:
    """The share of conv/linear weights held by Linear layers."""
    sizes = {n: model.get_submodule(n).weight.numel() for n in quantizable_layers(model)}
    total = sum(sizes.values()) or 1
    return sum(v for n, v in sizes.items() if isinstance(model.get_submodule(n), nn.Linear)) / total


def candidates(search) -> Iterator[Candidate]:
    """Cheap, likely-good trials first, given the search's results so far (search.trials,
    search.ranking(), search.float_model, search.runtimes, search.cfg)."""
    cfg = search.cfg
    rts = search.runtimes
    # 1. each path's default int8 (the first one made becomes the latency anchor)
    firsts = [Candidate(f) for f in cfg.flows] + [Candidate(rt) for rt in rts]
    if linear_share(search.float_model) >= 0.25:  # dynamic int8 only speeds up Linear layers
        firsts = [Candidate(f, "dynamic") for f in cfg.flows if "dynamic" in get_flow(f).METHODS] + firsts
    yield from firsts
    # then the fp32 references on the same scale: TorchScript and each runtime's
    yield REFERENCE
    for rt in rts:
        yield Candidate(rt, ORIGIN)
    # 2. calibration choices for the static paths that missed the budget, fastest first
    for base in _missed(search, [c for c in firsts if c.method == "static"]):
        for v in CALIBRATION_VARIANTS:
            if _met(search, base.maker):
                break
            if base.is_runtime and "equalize" in v:
                continue
            yield variant(base, **v)
    # 3. fp32 fallback of the most sensitive layers, for the torch flows still missing it
    for base in _missed(search, [c for c in firsts if c.method == "static" and not c.is_runtime]):
        if _met(search, base.maker):
            continue
        best = _best_of(search, base.maker)  # fallback on top of that path's most accurate calibration
        start = Candidate.from_dict(best.candidate) if best else base
        ranking = search.ranking()
        most = min(cfg.max_fallback, len(ranking))
        for k in sorted({min(k, most) for k in FALLBACK_SIZES}):  # capped, each size once
            if k < 1 or _met(search, base.maker):
                break
            yield dataclasses.replace(start, fp32_layers=tuple(ranking[:k]))


def _maker(t) -> str:
    return Candidate.from_dict(t.candidate).maker


def _missed(search, cands: list[Candidate]) -> list[Candidate]:
    """Those whose trial ran but missed the budget, fastest first (their best case)."""
    missed = [c for c in cands if (t := search.trials.get(c.key)) is not None and t.ok and not t.within_budget]
    return sorted(missed, key=lambda c: search.trials[c.key].ratio or math.inf)


def _met(search, maker: str) -> bool:
    return any(t.within_budget and _maker(t) == maker for t in search.trials.values())


def _best_of(search, maker: str):
    ok = [t for t in search.trials.values() if t.ok and _maker(t) == maker
          and t.candidate["method"] == "static" and not t.candidate["fp32_layers"]]
    return max(ok, key=lambda t: t.val_acc, default=None)
