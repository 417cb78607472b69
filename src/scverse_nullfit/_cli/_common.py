"""What every command module shares: the program name, the error type, argument helpers."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

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


class Terminated(Exception):
    """The process received SIGTERM (or SIGINT) while writing an output; raised from the signal handler."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name} while writing; no output was written")
        self.signum = signum


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A temporary path in OUTPUT's folder to write to (the caller renames it into place); it is removed when the
    block fails, and also when SIGTERM (a scheduler's time limit) or SIGINT arrive during the block, which then
    raises :class:`Terminated`. Only a SIGKILL, which no process can catch, can leave the hidden temporary file."""
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"

    def stop(signum, frame):
        raise Terminated(signum)

    handled = (signal.SIGTERM, signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in handled} if in_main else {}
    try:
        yield tmp
    finally:
        with suppress(OSError):
            os.unlink(tmp)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
