"""The pipeline as one Prefect flow: the five stages of dvc.yaml, in its order, as tasks.

    python -m flows.pipeline                 # reads ./params.yaml; the ephemeral Prefect API is enough
    python -m flows.pipeline --params other.yaml

Each task wraps a stage function of tasks/ unchanged; tasks hand each other paths, not data.
"""

from __future__ import annotations

import argparse
import pathlib

import prefect

from tasks import config, convert, download, evaluate, register, train

# Downloads fail for transient reasons (network, a busy mirror): retry them with growing waits.
download_task = prefect.task(download.download, name="download", retries=3, retry_delay_seconds=[2, 10, 30])
convert_task = prefect.task(convert.convert, name="convert")
train_task = prefect.task(train.train, name="train", tags=["training"])
evaluate_task = prefect.task(evaluate.evaluate, name="evaluate")
register_task = prefect.task(register.register, name="register")


@prefect.flow(name="image-classification", log_prints=True)
def pipeline(params_file: str = "params.yaml") -> register.RegisterResult:
    """download -> convert -> train -> evaluate -> register, on the settings of `params_file`."""
    params = config.load_params(pathlib.Path(params_file))
    download_task(params.dataset, params.raw_dir)
    convert_task(params.dataset, params.base.seed, params.raw_dir, params.shards_dir)
    train_task(params.train, params.base.seed, params.shards_dir, params.model_dir, config.flatten(params), params.checkpoints_dir)
    evaluate_task(params.evaluate, params.shards_dir, params.model_dir, params.metrics_path)
    return register_task(params.registered_model_name, params.model_dir, params.metrics_path, params.registry_path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the image-classification pipeline as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: %(default)s)")
    arguments = parser.parse_args()
    result = pipeline(arguments.params)
    print(f"pipeline: {result.model_name} version {result.version} is now models:/{result.model_name}@{result.alias}")


if __name__ == "__main__":
    main()
