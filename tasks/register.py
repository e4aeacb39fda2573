"""Stage 5, register: the trained model becomes a version in the MLflow Model Registry.

    python -m tasks.register        # reads ./params.yaml, writes <paths.registry>

The version carries the run's test metrics and lineage as tags, and the alias `champion` points at it,
so `models:/<name>@champion` always loads the newest registered model.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import mlflow

from tasks import config, files, tracking

ALIAS = "champion"


@dataclasses.dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: str
    alias: str


def register(model_name: str, model_dir: pathlib.Path, metrics_path: pathlib.Path, registry_path: pathlib.Path) -> RegisterResult:
    """Registers the model of the run in `model_dir` under `model_name` and points `champion` at it."""
    run = tracking.read_run(model_dir)
    metrics = files.read_json(metrics_path, "run the evaluate stage first")
    precision = metrics.get("precision_at_1")
    if not isinstance(precision, float) or not math.isfinite(precision):
        raise ValueError(f"{metrics_path}: precision_at_1 is {precision!r}; nothing registered")

    mlflow.set_tracking_uri(run["tracking_uri"])
    client = mlflow.MlflowClient()
    tags = {
        "run_id": run["run_id"],
        "dataset": run["dataset"],
        "manifest_sha256": run["manifest_sha256"],
        **{f"test_{key}": str(value) for key, value in metrics.items()},
        **{key: value for key, value in client.get_run(run["run_id"]).data.tags.items() if key.startswith("git_")},
    }
    version = mlflow.register_model(run["model_uri"], model_name, tags=tags)
    client.set_registered_model_alias(model_name, ALIAS, version.version)
    files.write_json(
        registry_path,
        {"model_name": model_name, "version": str(version.version), "alias": ALIAS, "run_id": run["run_id"], "model_uri": run["model_uri"]},
    )
    return RegisterResult(model_name=model_name, version=str(version.version), alias=ALIAS)


def main() -> None:
    params = config.load_params()
    result = register(params.registered_model_name, params.model_dir, params.metrics_path, params.registry_path)
    print(f"register: {result.model_name} version {result.version} is now models:/{result.model_name}@{result.alias}")


if __name__ == "__main__":
    main()
