"""DVC's view of the pipeline, shared by the Prefect flow: one record of what is up to date.

Before a stage runs, the flow asks DVC whether the stage's deps (code, data), params and outputs
still match dvc.lock; if so the stage is skipped. After it runs, `dvc commit` records it in dvc.lock
and puts its outputs in DVC's cache. So a flow run after `dvc repro` skips every stage, `dvc repro`
after a flow run does nothing, and the data of every model stays recoverable with DVC (from the default
remote, when one is configured: `dvc remote add --default`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import dvc.exceptions
import dvc.repo


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
    with dvc.repo.Repo(".") as repo:
        return not repo.status(targets=[stage])


def commit(stage: str) -> None:
    """Records the stage in dvc.lock, caches its outputs, and pushes them to the default DVC remote if any."""
    with dvc.repo.Repo(".") as repo:
        repo.commit(stage, force=True)
        if repo.config["core"].get("remote"):
            repo.push(targets=[stage])
