"""Test-only: SIGKILLs a pipeline stage's whole process group at one exact point, as a power cut would.

Python imports `sitecustomize` at start-up from any folder on PYTHONPATH; the kill tests put this
folder there. With KILL_POINT="<stage> <module>:<attribute> <before|after> <call number>", the
process started as `python -m tasks.<stage>` (by `dvc repro`) wraps that attribute; at its Nth call
it writes KILL_MARKER and kills its process group, `dvc repro` included. Used only where no file or
log line shows the moment from outside (a few milliseconds between two writes). Every other
process, and every process without KILL_POINT, is left alone.
"""

import importlib
import os
import pathlib
import signal
import sys

_SPEC = os.environ.get("KILL_POINT", "").split()


def _install(stage: str, target: str, when: str, count: str) -> None:
    if sys.orig_argv[1:3] != ["-m", f"tasks.{stage}"]:
        return
    sys.path.insert(0, os.getcwd())  # the stage's own code, as `python -m` will import it
    module_name, attribute = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = []

    def kill() -> None:
        pathlib.Path(os.environ["KILL_MARKER"]).write_text(" ".join(_SPEC))
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def wrapper(*arguments, **keywords):
        calls.append(None)
        if when == "before" and len(calls) == int(count):
            kill()
        result = original(*arguments, **keywords)
        if when == "after" and len(calls) == int(count):
            kill()
        return result

    setattr(owner, name, wrapper)


if len(_SPEC) == 4:
    _install(*_SPEC)
