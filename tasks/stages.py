"""The five stages, in dvc.yaml's order, and the one way to call one on the settings.

Each stage module `tasks/<stage>.py` has the stage function of the same name, with explicit
arguments, and `arguments(params)`, the one place those arguments are chosen from params.yaml. Its
`python -m` entry, the Prefect flow and the benchmarks call `call(stage, params)`, which is that; tests
call the stage function itself with their own folders.
"""

from __future__ import annotations

import importlib
from typing import Any

from tasks.common import config

STAGES = ("download", "convert", "train", "evaluate", "register")


def call(stage: str, params: config.Params, **extra: Any) -> Any:
    """Runs `stage` on the arguments its module chooses from `params`, plus `extra` (train's callbacks)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    # Imported here: download and convert need no TensorFlow, and a process runs only the stages it calls.
    module = importlib.import_module(f"tasks.{stage}")
    return getattr(module, stage)(**module.arguments(params), **extra)
