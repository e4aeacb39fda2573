"""The pipeline as one Prefect flow: the five stages of dvc.yaml, in its order, as tasks.

    python -m flows.pipeline                                 # ./params.yaml, Prefect's ephemeral API
    python -m flows.pipeline --set train.epochs=30 --set train.batch_size=64
    python -m flows.pipeline --params other.yaml

Each task wraps a stage function of tasks/ unchanged; tasks hand each other paths, not data. With
./params.yaml and no overrides, DVC keeps the books: a stage whose code, params, inputs and outputs
are unchanged since its last run (by this flow or by `dvc repro`) is skipped and shown as "Skipped",
and every stage that runs is recorded in dvc.lock. Overrides run every stage and leave dvc.lock alone.

Run by a Prefect worker (prefect.yaml), each run is a fresh clone of the repository: it first pulls from
the default DVC remote the outputs dvc.lock names, and with push_dvc_lock it commits dvc.lock and pushes it
back to the branch it was cloned from, so that the next clone skips what this run did.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import prefect
import prefect.cache_policies
import prefect.logging.handlers
import prefect.runtime
import prefect.states
import yaml

from flows import dvc_stages, local_api
from tasks import download, stages
from tasks.common import config, errors, locking

STAGES = stages.STAGES

# Task options, in one place. Downloads and registry calls meet networks and servers that fail for a
# while: retried, when the error is an outage (errors.worth_retrying). A Prefect concurrency limit on
# the "training" tag keeps GPU jobs to one at a time. Timeouts come from flow.timeout_minutes.
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "download": {"retries": 3, "retry_delay_seconds": [5, 30, 120]},
    "convert": {},
    "train": {"tags": ["training"]},
    "evaluate": {},
    "register": {"retries": 2, "retry_delay_seconds": [10, 60]},
}


@prefect.flow(name="image-classification", log_prints=True)
def pipeline(
    params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, push_dvc_lock: bool = False
) -> str:
    """download -> convert -> train -> evaluate -> register, on `params_file` with `overrides`; with
    `push_dvc_lock`, dvc.lock is committed and pushed to the checkout's branch afterwards."""
    from flows import reports  # TensorFlow, Keras, MLflow: imported here, so that main() can start the API first

    params = config.load_params(params_file, overrides)  # a bad setting fails here, before any work
    # One run at a time: the pipeline lock keeps out a stage running by hand or under `dvc repro`,
    # DVC's lock keeps `dvc repro` from starting (and deleting outputs) while this flow works.
    with (
        locking.pipeline_lock(f"Prefect flow run {prefect.runtime.flow_run.name!r} of {params_file}"),
        dvc_stages.exclusive(),
    ):
        tracked = dvc_stages.tracked(params_file, overrides)  # DVC keeps the books of ./params.yaml only
        progress = [reports.TrainingProgress(params.train.epochs + params.train.fine_tune_epochs)]  # train's callbacks
        # In a fresh clone the outputs dvc.lock names come from the DVC remote first; dvc.lock goes back to git.
        with dvc_stages.shared(tracked, push_dvc_lock, f"dvc.lock of Prefect flow run {prefect.runtime.flow_run.name}"):
            # Each stage is skipped (shown as Skipped) when DVC says its code, params, inputs and outputs are unchanged.
            results = [
                skipped("download") if unchanged("download", params, tracked) else run("download", params, tracked),
                skipped("convert") if unchanged("convert", params, tracked) else run("convert", params, tracked),
                skipped("train")
                if unchanged("train", params, tracked)
                else run("train", params, tracked, callbacks=progress),
                skipped("evaluate") if unchanged("evaluate", params, tracked) else run("evaluate", params, tracked),
                skipped("register") if unchanged("register", params, tracked) else run("register", params, tracked),
            ]
        return summary_task(params, results)


def unchanged(stage: str, params: config.Params, tracked: bool) -> bool:
    """Whether DVC's books say `stage` need not run. A user's image folder is outside DVC's sight:
    download also runs when the folder changed since the raw copy was made."""
    if not tracked:
        return False
    if stage == "download" and download.source_changed(params.dataset, params.raw_dir):
        return False
    return dvc_stages.up_to_date(stage)


def run(stage: str, params: config.Params, tracked: bool, **extra: Any) -> Any:
    """The stage's task, with its options: its result."""
    timeout = 60 * params.flow.timeout_minutes.model_dump(by_alias=True)[stage]
    return stage_task.with_options(name=stage, timeout_seconds=timeout, **TASK_OPTIONS[stage])(
        stage, params, tracked, **extra
    )


def skipped(stage: str) -> None:
    """A task shown as Skipped in the UI, for a stage DVC found up to date: None, as the stage did not run."""
    return skip_task.with_options(name=stage)(stage)


def _worth_retrying(task, task_run, state) -> bool:
    return errors.worth_retrying(state.result(raise_on_failure=False))


# Tasks pass paths and settings; caching by input hash would be wrong (the files behind them change).
@prefect.task(cache_policy=prefect.cache_policies.NO_CACHE, retry_condition_fn=_worth_retrying)
def stage_task(stage: str, params: config.Params, tracked: bool, **extra: Any) -> Any:
    """Runs one stage on the arguments its module chooses, then records it in dvc.lock as `dvc repro` would."""
    from flows import reports

    started = time.time()
    try:
        result = stages.call(stage, params, **extra)
    finally:
        if stage == "convert":  # also when its guard stopped the run: the report says why
            reports.data_changes(params.data_report_dir, since=started)
    if tracked:
        dvc_stages.commit(stage)
    if stage == "convert":
        reports.rejections(result.shards_dir)
    return result


@prefect.task(cache_policy=prefect.cache_policies.NO_CACHE)
def skip_task(stage: str) -> prefect.states.State:
    return prefect.states.Completed(
        name="Skipped", message=f"{stage}: code, params, inputs and outputs unchanged since its last run"
    )


@prefect.task(name="summary", cache_policy=prefect.cache_policies.NO_CACHE)
def summary_task(params: config.Params, results: list) -> str:
    """What changed in the data, the test metrics, MLflow run and registry decision, as a markdown artifact."""
    from flows import reports

    ran = [stage for stage, result in zip(STAGES, results, strict=True) if result is not None]
    return reports.run_summary(
        params.metrics_path, params.registry_path, params.model_dir, params.data_report_dir, params.evaluation_dir, ran
    )


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """["train.epochs=30"] -> {"train.epochs": 30}: values are read as YAML, like params.yaml."""
    overrides = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise config.ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=30")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the image-classification pipeline as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: %(default)s)")
    parser.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    options = errors.add_verbose_option(parser).parse_args(arguments)
    overrides = parse_overrides(options.assignments) or None
    config.load_params(options.params, overrides)  # a bad setting stops here, before Prefect starts a server
    if not options.verbose and not errors.verbose():
        _console_without_tracebacks()
    logging.getLogger("dvc").propagate = False  # DVC prints its lines itself; Prefect's console printed them again
    api = local_api.start()  # without a configured server, Prefect's local API starts on another core meanwhile
    from flows import reports  # noqa: F401 - the run's heavy modules (TensorFlow, Keras, MLflow)

    with local_api.serving(api):
        print(pipeline(options.params, overrides))


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `formatter` does, leaving out its traceback."""

    def __init__(self, formatter: logging.Formatter):
        super().__init__()
        self.formatter = formatter

    def format(self, record: logging.LogRecord) -> str:
        kept = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.formatter.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = kept  # the Prefect UI's log keeps it


def _console_without_tracebacks() -> None:
    # Prefect's console log prints a failed task's traceback twice (task and flow); the command line
    # ends with the error's one line instead, and --verbose brings the tracebacks back.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, prefect.logging.handlers.PrefectConsoleHandler) and handler.formatter is not None:
            handler.setFormatter(_WithoutTraceback(handler.formatter))


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
