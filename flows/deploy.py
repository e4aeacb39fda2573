"""Serve the pipeline flow on a schedule from this checkout (the nightly retraining).

    prefect server start                                  # the API and UI, in another terminal
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy
    python -m flows.deploy --cron "0 3 * * 1-5" --set register.min_improvement=0.005

The process registers the deployment "image-classification/nightly" with the Prefect API and then
runs every scheduled (or manually triggered) flow run itself, in this folder, until stopped. For
workers on other machines, `prefect deploy` reads prefect.yaml instead.
"""

from __future__ import annotations

import argparse
import sys

from flows import pipeline
from tasks.common import config, errors


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the image-classification flow on a cron schedule.")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: %(default)s)")
    parser.add_argument("--cron", help="when to run, as a cron expression (default: flow.cron of the params file)")
    parser.add_argument("--name", default="nightly", help="the deployment's name (default: %(default)s)")
    parser.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    options = errors.add_verbose_option(parser).parse_args(arguments)
    overrides = pipeline.parse_overrides(options.assignments) or None
    params = config.load_params(options.params, overrides)  # a bad setting stops here, not at 2 a.m.
    pipeline.pipeline.serve(
        name=options.name,
        cron=options.cron or params.flow.cron,
        parameters={"params_file": options.params, "overrides": overrides},
        description="Retrain on the current data; register the model, promoted only if it beats the champion.",
    )


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
