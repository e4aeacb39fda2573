"""Serve the pipeline flow on a schedule from this checkout (the nightly retraining), and on new images.

    prefect server start                                  # the API and UI, in another terminal
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy
    python -m flows.deploy --cron "0 3 * * 1-5" --set register.min_improvement=0.005

The process registers the deployment "image-classification/nightly" with the Prefect API and then
runs every scheduled, triggered or manually started flow run itself, in this folder, until stopped.
When dataset.source is a local image folder, the deployment also starts on the event the watcher
(python -m flows.watch) sends for that folder. One run at a time: a run that comes while another
works waits for it (ONE_AT_A_TIME). For workers on other machines, `prefect deploy` reads
prefect.yaml instead.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import prefect
import prefect.events
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment

from flows import pipeline, watch
from tasks.common import config, errors

# ENQUEUE, not CANCEL_NEW: images that arrive while a run trains are not in its data, so the run they
# trigger waits and goes next; cancelling it would leave them unused until the next night. A burst does
# not stack runs: the watcher sends one event per quiet period, and a queued run that finds nothing new
# (the run before it already took those images) skips every stage, as DVC's books say (runs of
# ./params.yaml without --set; with overrides every run trains again).
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
DESCRIPTION = "Retrain on the current data; register the model, promoted only if it beats the champion."


def deployment(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    cron: str | None = None,
    name: str = "nightly",
) -> RunnerDeployment:
    """The pipeline's deployment: the cron schedule, the new-images trigger when there is a folder to
    watch, one run at a time. A bad setting stops here, not at 2 a.m."""
    params = config.load_params(params_file, overrides)
    folder = watch.source_folder(params)
    return pipeline.pipeline.to_deployment(
        name=name,
        cron=cron or params.flow.cron,
        triggers=[] if folder is None else [new_images(name, folder)],
        concurrency_limit=ONE_AT_A_TIME,
        parameters={"params_file": params_file, "overrides": overrides},
        description=DESCRIPTION,
    )


def new_images(name: str, folder: pathlib.Path) -> prefect.events.DeploymentEventTrigger:
    """Starts a run on each change event of `folder` (flows/watch.py sends one per quiet period)."""
    return prefect.events.DeploymentEventTrigger(
        name=f"{name}: new images in {folder}",
        description=f"python -m flows.watch saw {folder} change",
        expect={watch.EVENT},
        match={"prefect.resource.id": watch.resource_id(folder)},
    )


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the image-classification flow on a schedule and on new images.")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: %(default)s)")
    parser.add_argument("--cron", help="when to run, as a cron expression (default: flow.cron of the params file)")
    parser.add_argument("--name", default="nightly", help="the deployment's name (default: %(default)s)")
    parser.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    options = errors.add_verbose_option(parser).parse_args(arguments)
    overrides = pipeline.parse_overrides(options.assignments) or None
    prefect.serve(deployment(options.params, overrides, options.cron, options.name))


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
