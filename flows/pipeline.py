"""The pipeline as one Prefect flow: the five stages of dvc.yaml, in its order, as tasks.

    python -m flows.pipeline                                 # ./params.yaml, Prefect's ephemeral API
    python -m flows.pipeline --set train.epochs=30 --set train.batch_size=64
    python -m flows.pipeline --params other.yaml

Each task wraps a stage function of tasks/ unchanged; tasks hand each other paths, not data. With
./params.yaml and no overrides, DVC keeps the books: a stage whose code, params, inputs and outputs
are unchanged since its last run (by this flow or by `dvc repro`) is skipped and shown as "Skipped",
and every stage that runs is recorded in dvc.lock. Overrides run every stage and leave dvc.lock alone.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import prefect
import prefect.cache_policies
import prefect.logging.handlers
import prefect.runtime
import prefect.states
import yaml

from flows import dvc_stages, reports
from tasks import convert, download, evaluate, register, train
from tasks.common import config, errors, locking

STAGES = ("download", "convert", "train", "evaluate", "register")


def _stage_task(
    name: str,
    function: Callable,
    after: Callable[[Any], None] | None = None,
    changed_outside: Callable[..., bool] | None = None,
    **options,
) -> prefect.Task:
    """A Prefect task that runs `function` unless DVC says the stage is up to date.

    `after(result)` runs once the stage has run; `changed_outside(*arguments)` tells of input changes
    DVC cannot see (a user's image folder).
    """

    def run(tracked: bool, *arguments, **keyword_arguments):
        outside = changed_outside is not None and changed_outside(*arguments, **keyword_arguments)
        if tracked and not outside and dvc_stages.up_to_date(name):
            return prefect.states.Completed(name="Skipped", message=f"{name}: code, params, inputs and outputs unchanged since its last run")
        result = function(*arguments, **keyword_arguments)
        if tracked:
            dvc_stages.commit(name)
        if after is not None:
            after(result)
        return result

    run.__doc__ = function.__doc__
    # Tasks pass paths and settings; caching by input hash would be wrong (the files behind them change).
    return prefect.task(run, name=name, cache_policy=prefect.cache_policies.NO_CACHE, **options)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry what a busy network or server causes, not what a retry cannot change."""
    error = state.result(raise_on_failure=False)
    # ValueError: a checksum mismatch, bad data or settings; FileNotFoundError: a missing input.
    return not isinstance(error, (ValueError, FileNotFoundError))


# Downloads and registry calls fail for transient reasons (network, a busy server): retry them.
download_task = _stage_task(
    "download", download.download, changed_outside=download.source_changed,
    retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=_worth_retrying,
)
convert_task = _stage_task("convert", convert.convert, after=lambda result: reports.rejections(result.shards_dir))
# A Prefect concurrency limit on the "training" tag keeps GPU jobs to one at a time.
train_task = _stage_task("train", train.train, tags=["training"])
evaluate_task = _stage_task("evaluate", evaluate.evaluate)
register_task = _stage_task(
    "register", register.register, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_worth_retrying
)


@prefect.task(name="summary", cache_policy=prefect.cache_policies.NO_CACHE)
def summary_task(metrics_path: pathlib.Path, registry_path: pathlib.Path, model_dir: pathlib.Path, results: list) -> str:
    """The test metrics, MLflow run and registry decision, as a markdown artifact."""
    ran = [stage for stage, result in zip(STAGES, results) if result is not None]
    return reports.run_summary(metrics_path, registry_path, model_dir, ran)


@prefect.flow(name="image-classification", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    """download -> convert -> train -> evaluate -> register, on `params_file` with `overrides`."""
    params = config.load_params(params_file, overrides)  # a bad setting fails here, before any work
    # One run at a time: the pipeline lock keeps out a stage running by hand or under `dvc repro`,
    # DVC's lock keeps `dvc repro` from starting (and deleting outputs) while this flow works.
    with locking.pipeline_lock(f"Prefect flow run {prefect.runtime.flow_run.name!r} of {params_file}"), dvc_stages.exclusive():
        return _stages(params, params_file, overrides)


def _stages(params: config.Params, params_file: str, overrides: dict[str, Any] | None) -> str:
    """The five stage tasks in dvc.yaml's order, then the summary."""
    tracked = dvc_stages.tracked(params_file, overrides)
    minutes = params.flow.timeout_minutes
    downloaded = download_task.with_options(timeout_seconds=60 * minutes.download)(tracked, params.dataset, params.raw_dir, params.downloads_dir)
    converted = convert_task.with_options(timeout_seconds=60 * minutes.convert)(
        tracked, params.dataset, params.base.seed, params.raw_dir, params.shards_dir
    )
    trained = train_task.with_options(timeout_seconds=60 * minutes.train)(
        tracked, params.train, params.base.seed, params.shards_dir, params.model_dir, config.as_dict(params), params.checkpoints_dir,
        extra_callbacks=[reports.TrainingProgress(params.train.epochs + params.train.fine_tune_epochs)],
    )
    evaluated = evaluate_task.with_options(timeout_seconds=60 * minutes.evaluate)(
        tracked, params.evaluate, params.shards_dir, params.model_dir, params.metrics_path, params.evaluation_dir
    )
    registered = register_task.with_options(timeout_seconds=60 * minutes.registration)(
        tracked, params.registration, params.registered_model_name, params.model_dir, params.shards_dir, params.metrics_path, params.registry_path
    )
    return summary_task(params.metrics_path, params.registry_path, params.model_dir, [downloaded, converted, trained, evaluated, registered])


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
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    options = errors.add_verbose_option(parser).parse_args(arguments)
    overrides = parse_overrides(options.assignments) or None
    config.load_params(options.params, overrides)  # a bad setting stops here, before Prefect starts a server
    if not options.verbose and not errors.verbose():
        _console_without_tracebacks()
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
