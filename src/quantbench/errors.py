"""User-facing errors: the CLI prints these as one line, without a traceback."""


class QuantbenchError(Exception):
    """A problem with the user's input (paths, files, options), not a bug in quantbench."""


class FlowUnsupported(QuantbenchError):
    """This flow cannot quantize this model (no quantizable twin, a graph it cannot trace); other
    flows may. `replicate` skips such rows with a line instead of stopping."""


def cause(e: BaseException, limit: int = 200) -> str:
    """An underlying exception as a short one-line phrase for a user error's message, e.g.
    "RuntimeError: unexpected EOF" (the whole exception stays chained for --debug)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
