"""A fresh checkout of the repository in another folder, as a user would clone it: shared by the
benchmarks that run the pipeline and by the tests' `repository_copy` fixture."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
# What a copy needs to run the pipeline; outputs, local stores and the benchmarks stay behind. Names at
# the repository's root only: tasks/data/ is code, data/ is data.
NOT_COPIED = {
    ".git",
    ".venv",
    "data",
    "models",
    "reports",
    "mlflow.db",
    "mlartifacts",
    "mlruns",
    "checkpoints",
    ".pytest_cache",
    "dvc.lock",
    "bench",
    "docs",
}
# DVC's local cache, temporary files and machine-local config belong to a checkout, not to the code.
_DVC_LOCAL = {"cache", "tmp", "config.local"}
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
}


def copy_repository(destination: pathlib.Path) -> pathlib.Path:
    """The repository's code and config at `destination` (which must not exist), committed to a new git repository.

    No data, models, reports, dvc.lock, DVC cache or MLflow store: every stage has to run.
    """

    def ignore(folder: str, names: list[str]) -> list[str]:
        at_root = pathlib.Path(folder).resolve() == REPOSITORY
        local = _DVC_LOCAL if pathlib.Path(folder).name == ".dvc" else set()
        return [name for name in names if (at_root and name in NOT_COPIED) or name in local or name == "__pycache__"]

    shutil.copytree(REPOSITORY, destination, ignore=ignore)
    environment = {**os.environ, **_GIT_IDENTITY}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        subprocess.run(command, cwd=destination, env=environment, check=True)
    return destination
