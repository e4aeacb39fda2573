"""DVC's view of the pipeline, shared by the Prefect flow: one record of what is up to date.

Before a stage runs, the flow asks DVC whether the stage's deps (code, data), params and outputs
still match dvc.lock; if so the stage is skipped. After it runs, `dvc commit` records it in dvc.lock
and puts its outputs in DVC's cache. So a flow run after `dvc repro` skips every stage, `dvc repro`
after a flow run does nothing, and the data of every model stays recoverable with DVC (from the default
remote, when one is configured: `dvc remote add --default`).

A run in a fresh clone (each run of a Prefect worker, prefect.yaml) has no outputs and no cache: shared()
first pulls from the default remote what dvc.lock names, and afterwards commits dvc.lock to git and pushes
it to the branch the clone came from, so the next clone skips what this run did.
"""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
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


@contextlib.contextmanager
def shared(tracked: bool, push_lock: bool, message: str) -> Iterator[None]:
    """Around a run's stages: before, pull() (when `tracked`); after, with `push_lock`, dvc.lock to git
    (commit_lock()), also after a failed stage: the stages before it stay recorded, so the next run in a fresh
    clone starts at the failed one instead of training again."""
    if not tracked:
        yield
        return
    if push_lock:
        can_commit()  # before hours of training, not after
    restored, absent = pull()
    if restored:
        print(f"From the DVC remote, as dvc.lock names them: {', '.join(restored)}")
    if absent:
        print(f"Not on the DVC remote, so their stages run: {', '.join(absent)}")
    try:
        yield
    except BaseException:
        if push_lock:
            try:
                print(commit_lock(message))
            except errors.PipelineError as error:  # the stage's error is the one the run ends with
                print(f"dvc.lock was not pushed: {error}")
        raise
    if push_lock:
        print(commit_lock(message))


def pull() -> tuple[list[str], list[str]]:
    """Fetches from the default DVC remote the outputs dvc.lock names that are missing here, as `dvc pull`
    would: (restored, still missing). The remote may lack some (a first run, a run that never pushed): their
    stages then run. Outputs present are left as they are: a changed one is rebuilt by its stage."""
    with _repo() as repo:
        if not repo.config["core"].get("remote"):
            return [], []
        missing = {
            pathlib.Path(out.fs_path).relative_to(repo.root_dir).as_posix(): out.fs_path
            for out in repo.index.outs
            if out.use_cache and out.hash_info and not out.exists
        }
        if missing:
            repo.pull(targets=list(missing.values()), allow_missing=True)
    restored = [name for name, path in missing.items() if pathlib.Path(path).exists()]
    return restored, [name for name in missing if name not in restored]


def can_commit() -> None:
    """Stops, before any work, a run that could not commit dvc.lock: no branch checked out, no git identity."""
    if _git("symbolic-ref", "--quiet", "--short", "HEAD", check=False).returncode != 0:
        raise errors.BadInput("push_dvc_lock: the checkout is on no branch (a detached HEAD); clone a branch")
    if _git("var", "GIT_COMMITTER_IDENT", check=False).returncode != 0:
        raise errors.BadInput(
            "push_dvc_lock: git has no identity to commit dvc.lock with; set user.name and user.email "
            "(git config --global) or GIT_AUTHOR_NAME/EMAIL and GIT_COMMITTER_NAME/EMAIL in the environment"
        )


# What DVC writes for git: dvc.lock, and a .gitignore beside an output that git does not ignore yet.
_RECORDS = ["dvc.lock", ":(glob)**/.gitignore"]


def commit_lock(message: str) -> str:
    """Commits dvc.lock (and the .gitignore files DVC wrote) and pushes it to the branch of origin this checkout
    is on; what happened, in a sentence. A branch that moved meanwhile (new code) is rebased onto; one whose
    dvc.lock changed too (a person's `dvc repro`) keeps its own, and this run's record is dropped."""
    if not pathlib.Path("dvc.lock").exists():
        return "dvc.lock: no stage recorded, nothing to push"
    _git("add", "--all", "--", *_RECORDS)
    if _git("diff", "--cached", "--quiet", "--", *_RECORDS, check=False).returncode == 0:
        return "dvc.lock unchanged: nothing to push"
    branch = _git("symbolic-ref", "--quiet", "--short", "HEAD").stdout.strip()
    _git("commit", "--quiet", "--message", message, "--", *_RECORDS)
    if _git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", check=False).returncode != 0:
        _git("fetch", "--quiet", "origin", branch)  # the branch moved, or origin is unreachable: git says which
        if _git("rebase", "--quiet", "FETCH_HEAD", check=False).returncode != 0:
            _git("rebase", "--abort", check=False)
            return (
                f"dvc.lock not pushed: it changed on {branch} of origin since this checkout was made; the outputs "
                "of this run are on the DVC remote, and the next run does the stages that its dvc.lock lacks"
            )
        _git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}")
    return f"dvc.lock pushed to {branch} of origin"


def _git(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["git", *arguments], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise errors.Outage(f"git {' '.join(arguments)} failed: {errors.redact(done.stderr.strip())}")
    return done
