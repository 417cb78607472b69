"""What every command module shares: the program name, the error type, argument helpers."""

from __future__ import annotations

PROG = "scverse-nullfit"


class CLIError(ValueError):
    """A bad command-line input, reported as one line without traceback."""


def list_arg(values: list[str] | None) -> list[str] | None:
    """Flatten repeated and comma-separated list options (``--covariates a,b --covariates c``)."""
    if values is None:
        return None
    out = [item.strip() for value in values for item in value.split(",")]
    return [item for item in out if item]


def one_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        msg = err.args[0]
    else:
        msg = str(err) or type(err).__name__
    return " ".join(msg.split())
