"""When int8 hurts: which layers of a model lose the most when quantized.

For every quantizable layer (conv / linear) of an fp32 checkpoint, with one flow:

  SQNR         10 log10(|fp32 output|^2 / |int8 output - fp32 output|^2) of the layer's output on
               one calibration batch, measured by PyTorch's own numeric tools: FX's numeric
               suite (torch.ao.ns._numeric_suite_fx: loggers on the prepared and the converted
               graph) and, for PT2E, torchao's numeric debugger (loggers matched by the nodes'
               origin in the exported graph). Eager models have no graph to attach loggers to:
               eager reuses FX's (same layer names, same qconfigs), and says so. Two figures:
               "alone", in the model where only this layer is int8 (the layer's own error),
               and "in int8", in the fully quantized model (errors of earlier layers included).
  accuracy     on a validation subset carved from the TRAINING split (never the test split:
               choosing fp32 layers by test accuracy would tune on the test set), with
               only this layer int8 (every other conv/linear in fp32_layers), and with only
               this layer fp32 (the fallback that buys the most back).

Layers are ranked by the accuracy lost when only they are int8, ties (common: one layer alone
rarely flips a prediction) broken by the lower SQNR. The layers' neighbours that are not conv
or linear (pooling, residual adds, the input) stay int8 as each flow quantizes them; the
"every conv/linear fp32" row of the summary is that floor.

Every run is a fresh prepare -> calibrate -> convert through the flow's own functions, so the
numbers describe exactly what `quantbench quantize --fp32-layers` would make.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from .data import Batches, Dataset, Split, for_model
from .errors import QuantbenchError, cause
from .evaluate import accuracy
from .export import example_input, input_shape
from .fileio import sha256
from .fileio import atomic_path, write_json, write_text
from .flows import check_layers, get_flow, quantizable_layers
from .qconfigs import Scheme
from .quantize import CALIB_AUGMENT, QuantizeConfig

FILES = ("sensitivity.md", "sensitivity.json", "sensitivity.png")
SQNR_TOOLS = {
    "fx": "torch.ao.ns._numeric_suite_fx (add_loggers, extract_logger_info, compute_sqnr)",
    "pt2e": "torchao.quantization.pt2e numeric debugger (prepare_for_propagation_comparison, "
            "extract_results_from_loggers, compare_results)",
}


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's figures (accuracies in percent of the validation subset)."""
    layer: str
    kind: str                   # "conv" or "linear"
    params: int                 # weights and bias
    alone_acc: float            # only this layer int8 (every other conv/linear fp32)
    drop: float                 # fp32 accuracy - alone_acc: what this layer's int8 costs
    fallback_acc: float         # every other layer int8, this one fp32
    gain: float                 # fallback_acc - the fully int8 accuracy: what keeping it fp32 buys
    sqnr_db: float              # this layer's output, only this layer int8
    sqnr_in_int8_db: float      # this layer's output in the fully int8 model


@dataclass
class SensitivityResult:
    checkpoint: str
    flow: str
    scheme: dict                # qconfig name and overrides
    observers: dict             # what the observers really were (flow.applied), fully int8
    sqnr_tool: str
    val_samples: int
    val_seed: int
    calib_samples: int
    calib_transform: str
    fp32_acc: float
    int8_acc: float             # every layer int8
    floor_acc: float            # every conv/linear fp32: only the flow's other int8 ops
    layers: list[LayerSensitivity] = field(default_factory=list)  # ranked, most sensitive first
    seconds: float = 0.0
    checkpoint_sha256: str | None = None   # which model the ranking is for (--fallback checks it)

    def ranked(self) -> list[LayerSensitivity]:
        return sorted(self.layers, key=rank_key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rank_key(row: LayerSensitivity) -> tuple[float, float]:
    # biggest drop first; then lowest SQNR (NaN: no figure, last)
    return -row.drop, row.sqnr_db if not math.isnan(row.sqnr_db) else math.inf


# ---------------------------------------------------------------- the validation subset
def validation_split(data: Dataset, n: int, seed: int = 0) -> Dataset:
    """The same data, with `.test` replaced by N images held out of the TRAINING split (the
    last N of a permutation seeded with `seed`, so the same N every time) and `.train` the rest,
    so calibrating on `.train` never sees them. The real test split is not touched."""
    if data.train is None:
        raise QuantbenchError("the validation subset is carved from the training split: load the data with it")
    total = len(data.train)
    if not 1 <= n < total:
        raise QuantbenchError(f"--val-samples must be between 1 and {total - 1} (the training split has "
                              f"{total} images and calibration needs some), not {n}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    held, rest = perm[total - n:].sort().values, perm[:total - n].sort().values
    pick = lambda idx: Split(data.train.images[idx], data.train.labels[idx])  # noqa: E731
    info = {**data.info, "validation": {"from": "train", "samples": n, "seed": seed}}
    return dataclasses.replace(data, train=pick(rest), test=pick(held), info=info)


# ---------------------------------------------------------------- numeric tools
def _fx_logger_cls():
    import torch.ao.ns._numeric_suite_fx as ns

    class CloningOutputLogger(ns.OutputLogger):
        """Keeps a copy: an in-place op after the layer (ReLU(inplace), +=) would otherwise
        change the logged tensor afterwards."""

        def forward(self, x):
            super().forward(x.detach().clone() if isinstance(x, torch.Tensor) else x)
            return x

    return CloningOutputLogger


class _Scopes(dict):
    # ns re-traces the models; a module called twice (torchvision's BasicBlock calls one ReLU
    # twice) gets a node name the prepared model's scope table never had. Only the conv and
    # linear nodes' names matter here.
    def __missing__(self, key):
        return ("", None)


def fx_layer_sqnr(prepared: nn.Module, converted: nn.Module, x: torch.Tensor,
                  layers: Sequence[str]) -> dict[str, float]:
    """SQNR (dB) of each named layer's output: FX's numeric suite, the prepared (float, with
    observers) graph against the converted one, on input `x`."""
    import torch.ao.ns._numeric_suite_fx as ns
    from torch.ao.ns.fx.utils import compute_sqnr

    attrs = prepared.meta.get("_observed_graph_module_attrs")
    if attrs is not None:
        attrs.node_name_to_scope = _Scopes(attrs.node_name_to_scope)
    logger = _fx_logger_cls()
    # add_loggers instruments the models it is given: copies keep ours clean
    a, b = ns.add_loggers("fp32", copy.deepcopy(prepared), "int8", copy.deepcopy(converted), logger)
    with torch.no_grad():
        a(x)
        b(x)
    results = ns.extract_logger_info(a, b, logger, "int8")
    ns.extend_logger_results_with_comparison(results, "fp32", "int8", compute_sqnr, "sqnr")
    wanted, out = set(layers), {}
    for subgraph in results.values():
        for entry in subgraph.get("node_output", {}).get("int8", []):
            if entry.get("fqn") in wanted and entry.get("sqnr"):
                out[entry["fqn"]] = sum(float(s) for s in entry["sqnr"]) / len(entry["sqnr"])
    return out


_CONV_LINEAR = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten.linear")


def pt2e_layer_sqnr(prepared: nn.Module, converted: nn.Module, x: torch.Tensor,
                    layers: Sequence[str]) -> dict[str, float]:
    """SQNR (dB) of each named layer's output: torchao's numeric debugger, loggers on the
    prepared graph (float, BN already folded, as in the converted one) and the converted one,
    matched by each node's origin in the exported graph."""
    from torchao.quantization.pt2e import (compare_results, extract_results_from_loggers,
                                           prepare_for_propagation_comparison)
    from torchao.quantization.pt2e._numeric_debugger import OutputLogger

    class CloningLogger(OutputLogger):
        """Keeps a copy: the exported graph's in-place relu_ / add_ would otherwise change the
        logged conv output afterwards."""

        def forward(self, x):
            self.stats.append(x.detach().clone() if isinstance(x, torch.Tensor) else x)
            return x

    ref, actual = prepare_for_propagation_comparison(prepared), prepare_for_propagation_comparison(converted)
    for m in (*ref.modules(), *actual.modules()):
        if type(m) is OutputLogger:
            m.__class__ = CloningLogger
    with torch.no_grad():
        ref(x)
        actual(x)
    nodes = {n.name: n for n in actual.graph.nodes}
    wanted, out = set(layers), {}
    for summary in compare_results(extract_results_from_loggers(ref),
                                   extract_results_from_loggers(actual)).values():
        node = nodes.get(summary.actual_node_name)
        is_op = node is not None and str(node.target).rsplit(".", 1)[0] in _CONV_LINEAR
        if is_op and summary.actual_module_stack in wanted and summary.results:
            out[summary.actual_module_stack] = sum(float(r.sqnr) for r in summary.results) / len(summary.results)
    return out


# ---------------------------------------------------------------- one quantized model
@dataclass
class _Runner:
    """Quantizes fresh copies of one float model with different fp32_layers."""
    flow: str
    model: nn.Module
    scheme: Scheme
    example: torch.Tensor
    calib: list[torch.Tensor]

    def run(self, fp32_layers: Sequence[str]) -> tuple[nn.Module, nn.Module]:
        """(prepared and calibrated float model, converted int8 model)."""
        flow = get_flow(self.flow)
        prepared = flow.prepare(copy.deepcopy(self.model), self.scheme, qat=False, example=self.example,
                                fp32_layers=tuple(fp32_layers))
        with torch.no_grad():
            for x in self.calib:
                prepared(x)
        # convert works in place in some flows: the prepared graph stays the SQNR's fp32 side
        return prepared, flow.convert(copy.deepcopy(prepared))


def sensitivity(checkpoint, data: Dataset, flow: str = "fx", *, scheme: Scheme | str = "default",
                val_samples: int = 1000, val_seed: int = 0, calib_samples: int = 1000,
                calib_batch_size: int = 100, calib_transform: str = "test", layers: Sequence[str] | None = None,
                progress: bool = True) -> SensitivityResult:
    """Per-layer int8 sensitivity of an fp32 checkpoint under one flow's static quantization
    (see the module's docstring). `data` needs its training split: the validation subset and the
    calibration images both come from it, apart. `layers` limits the analysis to some layers
    (default: every conv/linear); the others are still quantized in the fully int8 runs."""
    t0 = time.perf_counter()
    scheme = Scheme.of(scheme)
    cfg = QuantizeConfig(method="static", flow=flow, qconfig=scheme.qconfig, observer=scheme.observer,
                         weight_scheme=scheme.weight_scheme, act_scheme=scheme.act_scheme,
                         percentile=scheme.percentile, calib_samples=calib_samples,
                         calib_batch_size=calib_batch_size, calib_transform=calib_transform)  # checks them
    mod = get_flow(flow)
    from .models import load_checkpoint
    float_model, meta = load_checkpoint(checkpoint, num_classes=data.num_classes)
    model = mod.from_float(copy.deepcopy(float_model), meta, "static")
    data = for_model(data, meta, f"checkpoint {checkpoint}")
    val = validation_split(data, val_samples, val_seed)
    all_layers = quantizable_layers(model)
    layers = check_layers(model, layers, "--layers") if layers is not None else tuple(all_layers)
    if not layers:
        raise QuantbenchError("the model has no conv or linear layer to analyse")
    calib = [x for x, _ in Batches(val.train, cfg.calib_batch_size, val.mean, val.std,
                                   augment=CALIB_AUGMENT[cfg.calib_transform], shuffle=True, seed=val_seed,
                                   limit=cfg.calib_samples)]
    runner = _Runner(flow, model.eval(), cfg.scheme, example_input(input_shape(meta)), calib)
    # SQNR: the flow's graph and tool; eager has no graph: the FX flow's, same names and qconfigs
    sqnr_flow = "fx" if flow == "eager" else flow
    sqnr_runner = runner if sqnr_flow == flow else dataclasses.replace(
        runner, flow=sqnr_flow, model=get_flow(sqnr_flow).from_float(copy.deepcopy(float_model), meta, "static").eval())
    measure = fx_layer_sqnr if sqnr_flow == "fx" else pt2e_layer_sqnr
    probe = calib[0]  # "a calibration batch"

    def acc(m: nn.Module) -> float:
        # every model here is in eval mode already (and exported graphs refuse .eval())
        return accuracy(m, val, batch_size=250, progress=False, set_eval=False)

    fp32_acc = acc(model)  # eager's quantizable twin too: its stubs are identities until convert
    prepared, full = runner.run(())
    observers = get_flow(flow).applied(prepared)
    int8_acc = acc(full)
    in_int8 = measure(*(sqnr_runner.run(()) if sqnr_runner is not runner else (prepared, full)), probe, layers)
    floor_acc = acc(runner.run(all_layers)[1])

    rows = []
    for name in tqdm(layers, desc="layers", unit="layer", disable=not progress):
        others = [n for n in all_layers if n != name]
        prepared, alone = runner.run(others)
        alone_acc = acc(alone)
        if sqnr_runner is not runner:
            prepared, alone = sqnr_runner.run(others)
        sqnr = measure(prepared, alone, probe, [name]).get(name, math.nan)
        fallback_acc = acc(runner.run([name])[1])
        module = model.get_submodule(name)
        rows.append(LayerSensitivity(
            layer=name, kind="linear" if isinstance(module, nn.Linear) else "conv",
            params=sum(p.numel() for p in module.parameters()),
            alone_acc=round(alone_acc, 2), drop=round(fp32_acc - alone_acc, 2),
            fallback_acc=round(fallback_acc, 2), gain=round(fallback_acc - int8_acc, 2),
            sqnr_db=round(sqnr, 2), sqnr_in_int8_db=round(in_int8.get(name, math.nan), 2)))
    tool = SQNR_TOOLS[sqnr_flow] + (" on the FX flow's graph (eager mode has none; same layer names and "
                                    "qconfigs)" if flow == "eager" else "")
    return SensitivityResult(
        checkpoint=str(checkpoint), flow=flow, scheme={"qconfig": scheme.qconfig, **scheme.overrides()},
        observers=observers, sqnr_tool=tool, val_samples=val_samples, val_seed=val_seed,
        calib_samples=sum(len(x) for x in calib), calib_transform=calib_transform,
        fp32_acc=round(fp32_acc, 2), int8_acc=round(int8_acc, 2), floor_acc=round(floor_acc, 2),
        layers=sorted(rows, key=rank_key), seconds=round(time.perf_counter() - t0, 1),
        checkpoint_sha256=sha256(checkpoint) if not isinstance(checkpoint, nn.Module) else None)


# ---------------------------------------------------------------- choosing the fallback
def _fallback_key(row: dict) -> tuple[float, float, float]:
    # most bought back when kept fp32 first; ties by the bigger drop, then the lower SQNR
    # (a missing or NaN SQNR ranks last among equals)
    sqnr = row.get("sqnr_db")
    sqnr = math.inf if sqnr is None or (isinstance(sqnr, float) and math.isnan(sqnr)) else float(sqnr)
    return -float(row["gain"]), -float(row.get("drop", 0.0)), sqnr


def most_sensitive(path_or_result, k: int, checkpoint=None) -> tuple[str, ...]:
    """The K layers that buy the most back when kept fp32 ("gain": every other layer int8, this
    one fp32), from a `quantbench sensitivity` result: a SensitivityResult, its dict, or its
    sensitivity.json (or the folder holding it). Ties by the bigger drop, then the lower SQNR.
    For QuantizeConfig.fp32_layers (`--fallback K --sensitivity FILE`)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise QuantbenchError(f"the number of fp32 fallback layers must be 0 or more, not {k!r}")
    if isinstance(path_or_result, SensitivityResult):
        result, where = path_or_result.to_dict(), "the sensitivity result"
    elif isinstance(path_or_result, dict):
        result, where = path_or_result, "the sensitivity result"
    else:
        path = Path(path_or_result)
        if path.is_dir():
            path = path / "sensitivity.json"
        where = str(path)
        if not path.is_file():
            raise QuantbenchError(f"sensitivity file not found: {path} (write one with `quantbench sensitivity`)")
        try:
            result = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise QuantbenchError(f"{path} is not a sensitivity file (sensitivity.json of `quantbench "
                                  f"sensitivity`): {cause(e)}") from e
    rows = result.get("layers") if isinstance(result, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("layer"), str)
                                             and isinstance(r.get("gain"), (int, float)) for r in rows):
        raise QuantbenchError(f"{where} is not a sensitivity file (sensitivity.json of `quantbench sensitivity`): "
                              "it has no per-layer rows with a gain")
    if checkpoint is not None and isinstance(result, dict):
        made_for = result.get("checkpoint_sha256")
        if made_for is None:
            raise QuantbenchError(f"{where} does not say which checkpoint it ranks (made by an older quantbench); "
                                  f"run `quantbench sensitivity {checkpoint}` again")
        if made_for != sha256(checkpoint):
            raise QuantbenchError(f"{where} ranks the layers of another checkpoint ({result.get('checkpoint')}), "
                                  f"not {checkpoint}; run `quantbench sensitivity {checkpoint}`")
    if k > len(rows):
        raise QuantbenchError(f"cannot keep the {k} most sensitive layers fp32: {where} ranks only {len(rows)} layers")
    return tuple(r["layer"] for r in sorted(rows, key=_fallback_key)[:k])


# ---------------------------------------------------------------- output
def render_sensitivity(result: SensitivityResult, top: int | None = None) -> str:
    """The ranked table in Markdown, with what it was measured on."""
    rows = result.ranked()[:top] if top else result.ranked()
    scheme = ", ".join(f"{k}={v}" for k, v in result.scheme.items())
    acts = (result.observers.get("activations") or {}).get("summary", "?")
    lines = [
        f"# int8 sensitivity per layer: {result.checkpoint}, {result.flow} flow",
        "",
        f"- validation: {result.val_samples} images held out of the training split (seed {result.val_seed}); "
        f"calibration: {result.calib_samples} other training images ({result.calib_transform} transform)",
        f"- scheme: {scheme}; activations {acts}",
        f"- accuracy: fp32 {result.fp32_acc:.2f} %, every layer int8 {result.int8_acc:.2f} %, "
        f"every conv/linear fp32 (only the flow's other int8 ops) {result.floor_acc:.2f} %",
        f"- SQNR: {result.sqnr_tool}, on one calibration batch",
        f"- ranked by the accuracy drop with only that layer int8, ties by the lower SQNR; {result.seconds:.0f} s",
        "",
        "| rank | layer | kind | params | only this int8: acc % | drop | this fp32, rest int8: acc % | gain "
        "| SQNR dB alone | SQNR dB in int8 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r.layer} | {r.kind} | {r.params:,} | {r.alone_acc:.2f} | {r.drop:+.2f} | "
                     f"{r.fallback_acc:.2f} | {r.gain:+.2f} | {r.sqnr_db:.1f} | {r.sqnr_in_int8_db:.1f} |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(result: SensitivityResult, path) -> Path:
    """Bar chart, most sensitive layer on top: accuracy drop with only that layer int8 and gain
    with only that layer fp32 (left), SQNR of its output alone (right)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = result.ranked()[::-1]  # barh draws bottom-up
    names = [r.layer for r in rows]
    y = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(10, 2 + 0.32 * len(rows)), layout="constrained")
    left.barh([v + 0.2 for v in y], [r.drop for r in rows], height=0.4, label="drop: only this layer int8")
    left.barh([v - 0.2 for v in y], [r.gain for r in rows], height=0.4, label="gain: only this layer fp32")
    left.axvline(0, color="black", linewidth=0.8)
    left.set_yticks(y, names)
    left.set_xlabel("top-1 points on the validation subset")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)  # below the bars, never on them
    right.barh(y, [0 if math.isnan(r.sqnr_db) else r.sqnr_db for r in rows], color="tab:gray")
    right.set_xlabel("SQNR of the layer's output, only it int8 (dB)")
    fig.suptitle(f"int8 sensitivity per layer ({result.flow} flow; fp32 {result.fp32_acc:.1f} %, "
                 f"int8 {result.int8_acc:.1f} %)")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_sensitivity(result: SensitivityResult, out_dir) -> list[Path]:
    """sensitivity.md, sensitivity.json and sensitivity.png in `out_dir`, each written atomically."""
    out = Path(out_dir)
    md, js, png = (out / f for f in FILES)
    write_text(md, render_sensitivity(result))
    write_json(js, result.to_dict())
    plot_sensitivity(result, png)
    return [md, js, png]
