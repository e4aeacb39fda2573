"""How every command line of the pipeline ends when something goes wrong: one line, a telling exit code.

    python -m tasks.convert             # a bad input: "tasks.convert: error: <what, and what would fix it>"
    python -m tasks.convert --verbose   # the same, with the traceback (or PIPELINE_VERBOSE=1)

Exit codes (README: When something fails):
  0  done
  1  failed: an outage (network, tracking server, disk full), a diverged training, or a bug
  2  bad input: a setting, a missing or wrong file or folder, unusable data, a folder that cannot be written
  3  another pipeline run is working in this folder (tasks/common/locking.py); nothing was changed
130  interrupted (Ctrl-C)

An expected failure prints only its message: the message names the file, key or value at fault and
what would fix it, and a traceback would bury it. An exception of any other type is a bug: its
traceback is printed too, always, because the night's run that hit it may not fail the same way
again, and the traceback is all the on-call engineer will have. Every line printed here has any
password in a URL replaced by *** (a tracking URI like https://user:password@host).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
from collections.abc import Callable

VERBOSE_VARIABLE = "PIPELINE_VERBOSE"
VERBOSE_OPTION = "--verbose"
FAILED, BAD_INPUT, BUSY, INTERRUPTED = 1, 2, 3, 130

# scheme://user:password@host -> scheme://user:***@host; scheme://token@host -> scheme://***@host.
# The user information runs up to the last @ before the path, so a password may contain an @.
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s]*)@")
# Errors of the file system that the user fixes by pointing a setting elsewhere or fixing permissions.
_BAD_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}  # no room left on the disk, or in the user's quota on it


class PipelineError(Exception):
    """A failure the pipeline raised on purpose: its class says what it means, and so how it ends.

    Raised only where the code knows the cause. Anything else that escapes a stage is a bug.
    """

    exit_code = FAILED
    retried = False  # whether the Prefect flow tries the stage again: only when waiting may help


class BadInput(PipelineError, ValueError):
    """A setting, file, folder or data set the user must fix; a retry would fail the same way."""

    exit_code = BAD_INPUT


class MissingInput(PipelineError, FileNotFoundError):
    """Bad input too: a file or folder that should be there is not (a stage not run yet, a wrong path)."""

    exit_code = BAD_INPUT


class Outage(PipelineError, ConnectionError):
    """Something outside the pipeline is not answering or not ready (network, tracking server, an
    unfinished upload); the same run may succeed later."""

    retried = True


class Diverged(PipelineError, FloatingPointError):
    """Training produced NaN or infinite losses: the settings, not the weather; retrying repeats it."""


class Busy(PipelineError, RuntimeError):
    """Another pipeline run holds this folder's lock; nothing was changed."""

    exit_code = BUSY


class DiskFull(PipelineError, OSError):
    """A disk without room for what a stage writes: found before writing (an estimate that does not fit) or
    while writing. The message names the folder and the space free there (tasks/common/disk.py). A failure
    (exit 1) like any full disk, retried like any I/O failure: another program may free space meanwhile."""

    retried = True


PipelineBusy = Busy  # the name earlier releases raised


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""

    def hide(match: re.Match) -> str:
        user, has_password, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if has_password else f"{match['scheme']}***@"

    return _CREDENTIALS.sub(hide, text)


def without_credentials(uri: str) -> str:
    """`uri` with no user name or password (https://user:password@host/x -> https://host/x): what may be stored."""
    return _CREDENTIALS.sub(lambda match: match["scheme"], uri)


def add_verbose_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        VERBOSE_OPTION, action="store_true", help=f"print the traceback of a failure (or set {VERBOSE_VARIABLE}=1)"
    )
    return parser


def stage_parser(docstring: str | None) -> argparse.ArgumentParser:
    """The command line of a stage: no options but --verbose; the settings come from ./params.yaml."""
    summary = (docstring or "").strip().splitlines()[0] if docstring else None
    return add_verbose_option(argparse.ArgumentParser(description=summary))


def verbose(arguments: list[str] | None = None) -> bool:
    arguments = sys.argv[1:] if arguments is None else arguments
    return VERBOSE_OPTION in arguments or os.environ.get(VERBOSE_VARIABLE, "").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )


def exit_code(error: BaseException) -> int | None:
    """The exit code of an expected failure; None for a bug.

    Expected: what the pipeline raised on purpose (PipelineError), what the operating system reports
    about a path (a missing file or a folder that cannot be written: bad input; disk full, I/O:
    failed), and MLflow's own errors (its server or store: failed). Nothing else: a ValueError from
    inside Keras or NumPy is a bug, not the user's fault.
    """
    if isinstance(error, PipelineError):
        return error.exit_code
    if isinstance(error, _BAD_PATH_ERRORS):
        return BAD_INPUT
    if isinstance(error, OSError):
        return BAD_INPUT if error.errno in _NOT_WRITABLE else FAILED
    if _is_mlflow_error(error) or disk_full(error):
        return FAILED
    return None


def worth_retrying(error: BaseException) -> bool:
    """Whether running the stage again later may succeed: an outage, an I/O failure or an MLflow
    server error; never bad input, a diverged training, a busy folder or a bug."""
    if isinstance(error, PipelineError):
        return error.retried
    if isinstance(error, OSError):
        return exit_code(error) == FAILED
    return _is_mlflow_error(error) or disk_full(error)


def disk_full(error: BaseException) -> bool:
    """Whether `error` says that a disk, or the user's quota on it, is full: an OSError, or TensorFlow's error,
    which has no errno and says so in its message ("<path>; No space left on device")."""
    if isinstance(error, DiskFull):
        return True
    if isinstance(error, OSError):
        return error.errno in _DISK_FULL
    return any(cls.__module__.startswith("tensorflow") for cls in type(error).__mro__) and any(
        os.strerror(code) in str(error) for code in _DISK_FULL
    )


def describe(error: BaseException) -> str:
    """One line for a person: the message an expected error carries, file system errors spelled out."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        # "[Errno 13] Permission denied: 'data/raw/.digits.partial'" -> which file, why, what to do.
        where = error.filename if error.filename is not None else ""
        message = f"{where}: {error.strerror}" if where else error.strerror
        if error.errno in _NOT_WRITABLE:
            folder = os.path.dirname(os.fspath(where)) or "."
            message += f"; make {folder} writable, or point its setting in params.yaml (paths.*) at a writable folder"
        elif isinstance(error, (FileExistsError, NotADirectoryError)):
            message += (
                "; a file stands where a folder is expected: move it away, or change the path in params.yaml (paths.*)"
            )
        elif error.errno in _DISK_FULL:
            message += "; " + _room_left(error)
    elif disk_full(error) and not isinstance(error, DiskFull):
        message = f"{error}; {_room_left(error)}"
    else:
        message = str(error) or type(error).__name__
    if _is_mlflow_error(error):
        message = f"MLflow: {message}"
    # Messages may span lines (several invalid settings, a server's answer): each line stays readable.
    return redact(message.strip())


def run_main(
    main: Callable[[list[str]], int | None], arguments: list[str] | None = None, exclusive: bool = False
) -> int:
    """Calls `main(arguments)` and turns what it raises into a message on stderr and an exit code.

    `exclusive`: main writes the pipeline's outputs, so it holds the folder's pipeline lock (tasks/common/locking.py).
    """
    arguments = sys.argv[1:] if arguments is None else list(arguments)
    program = _program_name(main)
    try:
        if not exclusive:
            return main(arguments) or 0
        from tasks.common import locking  # it imports this module

        with locking.pipeline_lock(" ".join(["python -m", program, *arguments])):
            return main(arguments) or 0
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place every failure of a command line ends
        code = exit_code(error)
        if code is None or verbose(arguments):
            print(redact("".join(traceback.format_exception(error))), file=sys.stderr, end="")
        if code is None:
            print(
                f"{program}: error: a bug, not a problem with the input: {type(error).__name__}: {describe(error)} "
                "(the traceback above shows where; please report it)",
                file=sys.stderr,
            )
            return FAILED
        print(f"{program}: error: {describe(error)}", file=sys.stderr)
        return code


def _room_left(error: BaseException) -> str:
    """The space free now on the disk of the file a full-disk error names (disk.py, which imports this module)."""
    from tasks.common import disk

    return disk.room_left(disk.written_path(error))


def _is_mlflow_error(error: BaseException) -> bool:
    return any(cls.__module__.startswith("mlflow") for cls in type(error).__mro__)


def _program_name(main: Callable) -> str:
    module = getattr(main, "__module__", "") or ""
    if module == "__main__":  # python -m tasks.convert: the module's own name is in its spec
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else os.path.basename(sys.argv[0])
    return module
