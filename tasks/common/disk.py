"""Disk space: what a stage is about to write, checked against what is free before it starts; a disk that
fills up anyway, named with the room left on it.

    disk.require(disk.Need(shards_dir, estimate, "the shards", "paths.shards"))  # before writing anything
    @disk.writes(shards_dir="paths.shards")                                       # on a stage function

`require` stops a stage whose estimate does not fit with errors.DiskFull (exit 1, like any full disk):
"<folder>: not enough disk space for <what>: needs about X MB with a safety margin, Y MB free; ...".
The estimates are sums of what a stage knows cheaply (file sizes, a model's parameter count), each
explained where it is made. A disk that fills up anyway (an estimate fell short, or another program
wrote meanwhile) ends the same way, naming the folder or file being written and the space free there
now, instead of the bare "No space left on device".

Free space is shutil.disk_usage's on the nearest folder that exists (an output folder is made only
when written): what an unprivileged process may still use, as `df` shows it. 1 MB is 10^6 bytes, as
in dataset.shard_size_mb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tasks.common import errors, files

# Estimates are estimates: a stage asks for a quarter more than it expects to write, and 20 MB more for
# what no estimate counts (manifests, logs, history, the file system's own records), so that it never
# fills a disk to its last byte either. A quarter covers the spread measured between estimates and what
# the stages wrote (docs in each estimate); a larger margin would stop runs that fit.
MARGIN = 0.25
RESERVE_BYTES = 20_000_000
_DEFAULT_BLOCK = 4096  # where the file system does not say: ext4's and APFS's block
# TensorFlow's file errors carry no errno: "<path>; No space left on device".
_TENSORFLOW_PATH = re.compile(r"(?P<path>[^\s;{}]+); (?:No space left on device|Disk quota exceeded)")


@dataclasses.dataclass(frozen=True)
class Need:
    """`bytes` a stage will write under `folder`, for `what` (words for a person); `setting` moves it elsewhere:
    a key of params.yaml (paths.*) or an environment variable (TMPDIR); None: found from the folder."""

    folder: pathlib.Path
    bytes: int
    what: str
    setting: str | None = None


def require(*needs: Need) -> None:
    """Raises errors.DiskFull, before anything is written, when a disk lacks the room that the `needs` on it
    take together, with the margin."""
    by_disk: dict[int, list[Need]] = {}
    for need in needs:
        if need.bytes > 0:
            by_disk.setdefault(os.stat(existing_parent(need.folder)).st_dev, []).append(need)
    for group in by_disk.values():
        wanted = with_margin(sum(need.bytes for need in group))
        free = free_bytes(group[0].folder)
        if wanted > free:
            folders = " and ".join(dict.fromkeys(str(need.folder) for need in group))
            whats = " and ".join(need.what for need in group)
            remedies = " or ".join(dict.fromkeys(_elsewhere(need.folder, need.setting) for need in group))
            raise errors.DiskFull(
                f"{folders}: not enough disk space for {whats}: "
                f"{'needs' if len(group) == 1 else 'need together'} about {megabytes(wanted)} with a safety margin, "
                f"{megabytes(free)} free (stopped before writing it); free space on that disk, or {remedies}"
            )


def with_margin(estimate: int) -> int:
    return int(estimate * (1 + MARGIN)) + RESERVE_BYTES


def writes(**settings: str) -> Callable:
    """Decorates a stage function: a full disk while it runs ends as errors.DiskFull naming the folder or file
    written and the space free there now. `settings`: {argument name: its setting}, for each argument that
    is a folder or file the function writes (None: not written)."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            targets = {
                setting: pathlib.Path(bound.arguments[name])
                for name, setting in settings.items()
                if bound.arguments.get(name) is not None
            }
            with writing(targets):
                return function(*args, **kwargs)

        return wrapper

    return decorate


@contextlib.contextmanager
def writing(targets: dict[str, pathlib.Path]) -> Iterator[None]:
    """Turns a full disk met inside the block into errors.DiskFull that names where it was writing: the file the
    error names, else the `targets` ({setting: folder or file})."""
    try:
        yield
    except errors.DiskFull:
        raise
    except Exception as error:
        if not errors.disk_full(error):
            raise
        raise errors.DiskFull(_filled(error, targets)) from error


def _filled(error: BaseException, targets: dict[str, pathlib.Path]) -> str:
    written = written_path(error)
    reason = getattr(error, "strerror", None) or next(
        (words for words in ("Disk quota exceeded", "No space left on device") if words in str(error)),
        "No space left on device",
    )
    if written is None:
        places = [(folder, setting) for setting, folder in targets.items()]
        what = " or ".join(str(folder) for folder, _ in places) or "a file"
    else:
        setting = next((setting for setting, folder in targets.items() if _within(written, folder)), None)
        places = [(written.parent, setting)]
        what = str(written)
    if not places:
        return f"the disk filled up while writing a file ({reason}): {room_left(None)}"
    frees = "; ".join(
        dict.fromkeys(f"{megabytes(free_bytes(folder))} free on the disk of {folder} now" for folder, _ in places)
    )
    remedies = " or ".join(dict.fromkeys(_elsewhere(folder, setting) for folder, setting in places))
    return f"the disk filled up while writing {what} ({reason}); {frees}; free space on that disk, or {remedies}"


def room_left(path: str | os.PathLike | None) -> str:
    """What is free on the disk of `path` now and what to do, for a full disk met outside `writing`."""
    if path is None:
        return "free space on the disk that paths.* in params.yaml point at, or point them at a disk with more room"
    folder = pathlib.Path(os.fsdecode(path)).parent
    return (
        f"{megabytes(free_bytes(folder))} free on the disk of {folder} now; free space there, or "
        f"{_elsewhere(folder, None)}"
    )


def written_path(error: BaseException) -> pathlib.Path | None:
    """The file a full-disk error names (a staged name shown as its destination), or None."""
    named = getattr(error, "filename", None)
    if named is None and (found := _TENSORFLOW_PATH.search(str(error))):
        named = found["path"]
    if not isinstance(named, (str, bytes, os.PathLike)):  # None, or a file descriptor
        return None
    return files.destination_of(pathlib.Path(os.fsdecode(named)))


def _within(path: pathlib.Path, target: pathlib.Path) -> bool:
    path, target = pathlib.Path(os.path.abspath(path)), pathlib.Path(os.path.abspath(target))
    return path == target or path.is_relative_to(target)


def _elsewhere(folder: pathlib.Path, setting: str | None) -> str:
    if setting is None and _within(folder, pathlib.Path(tempfile.gettempdir())):
        setting = "TMPDIR"
    if setting is None:
        return "point its setting in params.yaml (paths.*) at a disk with more room"
    if setting.startswith("paths."):
        return f"point {setting} in params.yaml at a disk with more room"
    return f"set {setting} to a folder on a disk with more room"


def existing_parent(path: pathlib.Path) -> pathlib.Path:
    """`path` or its nearest ancestor that exists: where an output folder will be made."""
    path = pathlib.Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: pathlib.Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def block_bytes(path: pathlib.Path) -> int:
    """The file system's allocation unit under `path`: a file of 1 byte takes that much."""
    try:
        return os.statvfs(existing_parent(path)).f_frsize or _DEFAULT_BLOCK
    except (AttributeError, OSError):  # no statvfs (Windows)
        return _DEFAULT_BLOCK


def stored_bytes(sizes: Iterable[int], folder: pathlib.Path) -> int:
    """What files of `sizes` take on the disk of `folder`: each rounded up to whole blocks, as a file system stores
    it; for 50,000 small images that is most of the answer (a 2 kB PNG takes 4 kB)."""
    block = block_bytes(folder)
    return sum(-(-size // block) * block for size in sizes)


def folder_sizes(folder: pathlib.Path) -> list[int]:
    """The size of every file under `folder` (links followed, as copying does), and a block for each folder."""
    sizes, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(pathlib.Path(entry.path))
                    sizes.append(1)
                elif entry.is_file():
                    sizes.append(entry.stat().st_size)
    return sizes


# Variables an optimizer keeps for each trainable weight, by train.optimizer (tasks/modeling/optimizers.py):
# the most it may keep (rmsprop keeps 1 without momentum). train.ema_momentum's moving averages add one.
# tests/test_disk_space.py counts them on Keras' own optimizers.
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "rmsprop": 2, "adam": 2, "adagrad": 1, "adadelta": 2}


def training_needs(model: Any, params: Any, work: pathlib.Path, model_dir: pathlib.Path, chief: bool) -> list[Need]:
    """What train writes, from its built network `model` and train settings `params`: on the other workers of a
    cluster (not `chief`), only their backups.

    W: the bytes of all the model's weights; S: the optimizer's, slots x the trainable weights (Keras makes them
    at the first step, so they are counted, not read). In `work` (tasks/modeling/checkpoints.py), at most: the
    epoch's backup, W + S (Keras' save_weights keeps the optimizer too), twice while a new one replaces the
    old; the best epoch's with train.restore_best, W + S; while fine-tuning, the first phase's weights, W. In
    `model_dir`: the model file, W + S (Keras saves the optimizer with the model). Logs: the margin. Measured
    on digits' mnist_cnn with Adam and moving averages (W 13.1 MB, S 39.3 MB): backups of 52.5 MB each and
    a model file of 52.5 MB, as estimated.
    """
    weights = variable_bytes(model.weights)
    slots = OPTIMIZER_SLOTS.get(params.optimizer, max(OPTIMIZER_SLOTS.values())) + (params.ema_momentum is not None)
    state = slots * variable_bytes(model.trainable_weights)
    best = weights + state if params.restore_best and chief else 0
    backups = 2 * (weights + state) + best + (weights if params.fine_tune_epochs else 0)
    needs = [Need(work, backups, "the training's backups", "paths.checkpoints")]
    return needs + [Need(model_dir, weights + state, "the model file", "paths.models")] if chief else needs


def variable_bytes(variables: Iterable[Any]) -> int:
    """The bytes of Keras variables' values: their elements times their dtype's size."""
    import numpy as np

    return sum(math.prod(variable.shape) * np.dtype(str(variable.dtype)).itemsize for variable in variables)


def megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count < 10e6 else f"{count / 1e6:,.0f} MB"
