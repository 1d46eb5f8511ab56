"""User-facing errors: the CLI prints these as one line, without a traceback."""


class QuantbenchError(Exception):
    """A problem with the user's input (paths, files, options), not a bug in quantbench."""
