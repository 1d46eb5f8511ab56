"""tune's words: the pick explained in one sentence, tune.md, and one log line per trial."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .space import Candidate

if TYPE_CHECKING:
    from .journal import Trial
    from .trials import Search


def explain(s: Search, summary: dict) -> str:
    """The choice in one sentence."""
    cfg = s.cfg
    best = s.best()[0]
    refs = [t for t in s.trials.values() if t.reference and t.ok]
    fastest_fp32 = min(refs, key=lambda t: t.ratio, default=None)
    if best is None:
        return "No trial produced a deployment file (see the errors in tune.md)."
    pick = Candidate.from_dict(best.candidate).describe()
    x = s.speedup(best)
    speed = f"{x:.1f}x the speed of fp32 TorchScript" if x else "not timed against fp32 TorchScript"
    if fastest_fp32 is not None and Candidate.from_dict(fastest_fp32.candidate).maker != "torchscript" and best.ratio:
        speed += f" and {s.speedup(best, fastest_fp32):.2f}x that of the fastest fp32 ({Candidate.from_dict(fastest_fp32.candidate).maker})"
    if summary["within_budget"]:
        n_within = sum(t.within_budget for t in s.trials.values())
        goal = "fastest" if cfg.objective == "latency" else "smallest"
        return (f"Picked {pick}: the {goal} of the {n_within} trial(s) within {cfg.max_drop} point of fp32 on "
                f"{cfg.val_samples} validation images ({drop_words(best.drop)}), {speed}, "
                f"{best.file_bytes / 2**20:.1f} MiB; on the test split it scores "
                f"{summary.get('pick_test_acc')} % (fp32: {summary.get('fp32_test_acc')} %).")
    fast = Candidate.from_dict(summary["fastest"]["candidate"]).describe() if "fastest" in summary else "none"
    return (f"No int8 trial stayed within {cfg.max_drop} point of fp32 on the validation images; "
            f"best.* is the most accurate one, {pick} ({drop_words(best.drop)}, {speed}), and fastest.* the "
            f"fastest one, {fast}.")


def drop_words(d: float) -> str:
    return f"{d:.2f} point below fp32" if d > 0 else f"{-d:.2f} point above fp32" if d < 0 else "as accurate as fp32"


def render(s: Search, summary: dict) -> str:
    cfg = s.cfg
    lines = ["# quantbench tune", "", summary["sentence"], ""]
    if summary.get("stopped"):
        lines += [f"Stopped early: {summary['stopped']}; `--resume` continues the search.", ""]
    lines += [f"Checkpoint `{cfg.checkpoint}`; max drop {cfg.max_drop} point on {cfg.val_samples} validation images "
              f"held out of the training split (fp32 there: {s.fp32_acc} %); objective: {cfg.objective}; "
              f"{len(s.trials)} trials in {hms(summary['seconds'])}. Latency: batch 1, one thread, each file timed "
              f"against one anchor process (the first int8 file) in the same interleaved rounds: `vs anchor` is "
              f"that time ratio, `x fp32` the speed-up over fp32 TorchScript on the same scale, `ms` the "
              f"file's own median (absolute times drift with the machine's load; the ratios are what the "
              f"search compares).", "",
              "| # | trial | val acc | drop | vs anchor | x fp32 | ms | MiB | within |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(s.trials.values(), key=lambda t: t.index):
        desc = Candidate.from_dict(t.candidate).describe()
        if t.error:
            lines.append(f"| {t.index} | {desc} | failed: {t.error[:120]} | | | | | | |")
            continue
        within = "reference" if t.reference else ("yes" if t.within_budget else "no")
        x = s.speedup(t)
        lines.append(f"| {t.index} | {desc}{' (anchor)' if t.anchor else ''} | {t.val_acc:.2f} | {t.drop:+.2f} | "
                     f"{t.ratio:.3f} | {f'{x:.1f}' if x else ''} | {t.latency_ms:.3f} | "
                     f"{t.file_bytes / 2**20:.1f} | {within} |")
    return "\n".join(lines) + "\n"


def trial_line(s: Search, t: Trial) -> str:
    desc = Candidate.from_dict(t.candidate).describe()
    if t.error:
        return f"{desc}: failed: {t.error}"
    verdict = "reference" if t.reference else ("within --max-drop" if t.within_budget else "misses --max-drop")
    speed = "the latency anchor" if t.anchor else f"{t.ratio:.3f}x the anchor's time"
    return f"{desc}: val {t.val_acc:.2f} % ({-t.drop:+.2f}), {speed}, {t.file_bytes / 2**20:.1f} MiB: {verdict}"


def hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
