"""What every command module shares: the program name, the error type, argument helpers."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator, Sequence
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


#: A single list value with one of these endings is a file name, never an ID.
LIST_FILE_SUFFIXES = (".txt", ".tsv", ".csv", ".list", ".lst", ".gz")


def read_id_list(value: str | None, option: str) -> list[str] | None:
    """IDs (genes, variants) from an existing file with one per line (first column; ``#`` comments skipped) or a
    comma-separated list. A single value that looks like a file name but is not a file is a FileNotFoundError."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        with open(path) as fh:
            items = [line.split()[0] for line in fh if line.strip() and not line.lstrip().startswith("#")]
        if not items:
            raise CLIError(f"{option} file {value!r} lists nothing.")
        return items
    items = list_arg([value]) or []
    if len(items) == 1 and (os.sep in value or path.suffix.lower() in LIST_FILE_SUFFIXES):
        raise FileNotFoundError(
            f"{option} file {value!r} not found ({option} takes an existing file with one ID per line, or a "
            "comma-separated list)."
        )
    if not items:
        raise CLIError(f"{option} is empty.")
    return items


def check_output_path(
    value: str | None, overwrite: bool, inputs: Sequence[Path], *, what: str = "output", example: str = "result.h5ad"
) -> Path | None:
    """An output path checked before any work: not a folder, in an existing folder, not one of the inputs, and not
    in the way (unless ``overwrite``)."""
    if value is None:
        return None
    out = Path(value)
    if out.is_dir():
        raise CLIError(f"{what} {value!r} is a directory; give a file name such as {str(out / example)!r}.")
    if not out.parent.is_dir():
        raise CLIError(f"{what} directory {str(out.parent)!r} does not exist.")
    for path in inputs:
        if path.exists() and out.exists() and os.path.samefile(out, path):
            raise CLIError(f"{what} {value!r} is an input file; {PROG} never modifies its inputs.")
    if out.exists() and not overwrite:
        raise CLIError(f"{what} {value!r} already exists; pass --overwrite to replace it.")
    return out


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
    with stop_on_signals():
        try:
            yield tmp
        finally:
            with suppress(OSError):
                os.unlink(tmp)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM / SIGINT during the block (in the main thread), then restore the
    previous handlers."""

    def stop(signum, frame):
        raise Terminated(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
