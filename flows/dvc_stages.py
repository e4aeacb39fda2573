"""DVC's view of the pipeline, shared by the Prefect flow: one record of what is up to date.

Before a stage runs, the flow asks DVC whether the stage's deps (code, data), params and outputs
still match dvc.lock; if so the stage is skipped. After it runs, `dvc commit` records it in dvc.lock
and puts its outputs in DVC's cache. So a flow run after `dvc repro` skips every stage, `dvc repro`
after a flow run does nothing, and the data of every model stays recoverable with DVC (from the default
remote, when one is configured: `dvc remote add --default`).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Any

import dvc.exceptions
import dvc.lock
import dvc.repo

from tasks.common import errors

# The repository of the running flow, holding DVC's lock while the flow runs (see exclusive()).
_held: dvc.repo.Repo | None = None


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Holds DVC's own repository lock (.dvc/tmp/lock) while the flow runs, so that no `dvc repro`
    (or other DVC command) starts meanwhile: before running a stage, DVC deletes its outputs, which
    the flow may be writing or reading. DVC gives up after 3 s with "Unable to acquire lock".

    `dvc repro` itself releases that lock while a stage's command runs; the stage then holds the
    pipeline lock (tasks/common/locking.py), which the flow takes first.
    """
    global _held
    try:
        repo = dvc.repo.Repo(".")
    except dvc.exceptions.NotDvcRepoError:
        yield  # not a DVC repository: nothing of DVC's to protect
        return
    with repo:
        try:
            # lock_repo: DVC's own way of holding the lock across calls; the flow's DVC calls on
            # this same repository object then run inside it instead of waiting for it.
            with dvc.repo.lock_repo(repo):
                _held = repo
                try:
                    yield
                finally:
                    _held = None
        except dvc.lock.LockError:
            holder = _read(pathlib.Path(repo.tmp_dir) / "lock")
            raise errors.Busy(
                "DVC is working in this folder "
                f"(dvc repro, dvc status or another DVC command{holder} holds {repo.tmp_dir}/lock); "
                "nothing was changed. Run again when it has finished"
            ) from None


@contextlib.contextmanager
def _repo() -> Iterator[dvc.repo.Repo]:
    if _held is None:
        with dvc.repo.Repo(".") as repo:
            yield repo
        return
    _held._reset()  # forget what DVC read before the last stage ran, as a new Repo object would  # noqa: SLF001
    yield _held


def _read(path: pathlib.Path) -> str:
    try:
        return f", process {int(path.read_text())}"
    except (OSError, ValueError):
        return ""


def tracked(params_file: str | pathlib.Path, overrides: dict[str, Any] | None) -> bool:
    """Whether this run's stages can be recorded in dvc.lock, which describes ./params.yaml only."""
    if overrides or pathlib.Path(params_file).resolve() != pathlib.Path("params.yaml").resolve():
        return False
    try:
        with dvc.repo.Repo(".") as repo:
            return any(stage.addressing == "download" for stage in repo.index.stages)
    except dvc.exceptions.NotDvcRepoError:
        return False


def up_to_date(stage: str) -> bool:
    with _repo() as repo:
        return not repo.status(targets=[stage])


def commit(stage: str) -> None:
    """Records the stage in dvc.lock, caches its outputs, and pushes them to the default DVC remote if any."""
    with _repo() as repo:
        repo.commit(stage, force=True)
        if repo.config["core"].get("remote"):
            repo.push(targets=[stage])
