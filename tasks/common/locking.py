"""One pipeline run at a time in a folder: the stages of `dvc repro`, a Prefect flow, a stage run by hand.

Every stage command (`python -m tasks.<stage>`, which is what `dvc repro` runs) and every flow run
holds an exclusive lock on .pipeline.lock in the working folder while it works; a second run that
finds it held stops at once, before changing anything, and names the run that holds it.

DVC's own lock (.dvc/tmp/lock) cannot do this: `dvc repro` holds it only while it checks and records
stages, and releases it while a stage's command runs, so that the command may call DVC itself. A
flow starting then would write the same outputs as the running stage. With this lock a stage of
`dvc repro` and a flow never run at once: whichever takes the lock first runs, the other stops (a
stopped `dvc repro` records nothing for the stage; a stopped flow registers nothing).

The lock is the operating system's (flock): it is released when its process ends, however it ends,
so a killed run never leaves a stale lock behind. Written by hand rather than with filelock or
zc.lockfile because the file also says who holds it, and filelock truncates the file on every
attempt (the holder's description would be erased by the run that is refused).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator

from tasks.common import errors

LOCK_FILE = ".pipeline.lock"


@contextlib.contextmanager
def pipeline_lock(what: str, folder: pathlib.Path | str = ".") -> Iterator[pathlib.Path]:
    """Holds the folder's pipeline lock while the block runs; raises errors.Busy if another run holds it."""
    path = pathlib.Path(folder) / LOCK_FILE
    # "a+": opening must not truncate the file, which tells who holds the lock.
    with open(path, "a+", encoding="utf-8") as stream:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            raise errors.Busy(
                f"another pipeline run is working in this folder: {_holder(stream.read())}; nothing was changed. "
                f"Run again when it has finished (the lock, {path}, is released when that process ends, "
                "even if it is killed)"
            ) from None
        stream.seek(0)
        stream.truncate()
        holder = {
            "what": what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        stream.write(json.dumps(holder) + "\n")
        stream.flush()
        try:
            yield path
        finally:
            stream.seek(0)
            stream.truncate()  # released: the next reader must not name a run that has ended
            fcntl.flock(stream.fileno(), fcntl.LOCK_UN)


def _holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"{holder['what']} (process {holder['pid']} on {holder['host']}, since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "a run that has not yet said which"  # it took the lock a moment ago and is writing its name
