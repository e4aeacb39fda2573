"""The MLflow run of a training: started (or the interrupted one resumed) before the first epoch; the
trained model, its figures and the run record written after the last.

The run stays open for evaluate and register: its id goes to <paths.models>/run.json
(contracts.RunRecord), written last, so that a model folder without it never passes for finished.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import pathlib
from typing import Any

import keras
import mlflow
import mlflow.exceptions
import mlflow.models
import mlflow.tensorflow
import mlflow.types
import numpy as np

from tasks.common import config, contracts, errors, files, tracking
from tasks.data import inputs
from tasks.modeling import checkpoints

# Logged with the model, under data/, when convert wrote them: the index of every image (in the shards
# folder; the next conversion compares its data with the champion's through it) and the report of what
# changed since the champion's data (in the data report folder).
CHANGE_REPORT_FILES = ("changes.json", "changes.md")


def start(
    params: config.TrainParams,
    manifest: contracts.Manifest,
    manifest_sha256: str,
    shards_dir: pathlib.Path,
    work: pathlib.Path,
    run_settings: dict[str, Any] | None,
    lineage: dict[str, str] | None = None,
    class_weight: dict[str, float] | None = None,
) -> mlflow.ActiveRun:
    """The MLflow run of this configuration: the interrupted one when resuming, else a new one.

    Only the chief of a cluster calls it; `run_settings` (all of params.yaml) become its params, `lineage`
    (what the weights started from: warm_start.Start.tags) its tags, and the `class_weight` used
    class_weight.json.
    """
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    previous = files.read_json(work / checkpoints.RUN_FILE, "") if (work / checkpoints.RUN_FILE).is_file() else {}
    if previous.get("tracking_uri") == errors.without_credentials(mlflow.get_tracking_uri()):
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.get_run(previous["run_id"])
            client.set_tag(previous["run_id"], "resumed", "true")
            return mlflow.start_run(run_id=previous["run_id"])
    experiment_id = tracking.experiment_id(client, params.experiment_name)
    run_name = f"{manifest.dataset}-{params.model}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    tags = {
        "dataset": manifest.dataset,
        "manifest_sha256": manifest_sha256,
        **tracking.git_tags(),
        **tracking.dvc_tags(shards_dir),
        **(lineage or {}),
    }
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    settings = run_settings or {"train": params.model_dump(mode="json")}
    mlflow.log_params(config.flatten(settings))
    mlflow.log_dict(settings, "params.yaml")
    if class_weight is not None:
        mlflow.log_dict(class_weight, "class_weight.json")
    files.write_json(
        work / checkpoints.RUN_FILE,
        {"run_id": run.info.run_id, "tracking_uri": errors.without_credentials(mlflow.get_tracking_uri())},
    )
    return run


def log_model(
    serving: keras.Model,
    preprocessing: contracts.Preprocessing,
    manifest: contracts.Manifest,
    manifest_sha256: str,
    shards_dir: pathlib.Path,
    work: pathlib.Path,
    model_dir: pathlib.Path,
    summary: list[str],
    figures: dict[str, float | None],
    data_report_dir: pathlib.Path | None = None,
) -> str:
    """The saved model (`serving`) and its last `figures` to the open run, with validation images of
    `shards_dir` as its input example, and the data's index and change report; then run.json. Returns the
    run id."""
    mlflow.log_metrics({name: value for name, value in figures.items() if value is not None})
    mlflow.log_text("\n".join(summary), "model_summary.txt")
    mlflow.log_artifacts(str(work / contracts.TENSORBOARD_DIR), contracts.TENSORBOARD_DIR)
    data_files = [shards_dir / contracts.INDEX_FILE]
    if data_report_dir:
        data_files += [data_report_dir / name for name in CHANGE_REPORT_FILES]
    for path in data_files:
        if path.is_file():
            mlflow.log_artifact(str(path), "data")
    classes = manifest.classes
    # Uncropped validation images: the model prepares them itself, and takes any size.
    size = preprocessing.image_size
    example = next(iter(inputs.evaluation_data(shards_dir, "validation", size, size, 4)))[0].numpy()
    signature = mlflow.models.ModelSignature(
        inputs=mlflow.types.Schema([mlflow.types.TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "image")]),
        outputs=mlflow.types.Schema(
            [mlflow.types.TensorSpec(np.dtype(np.float32), (-1, len(classes)), "probabilities")]
        ),
    )
    # Three of our layers (preparation, LRN, ResNet shortcut) are registered Keras objects, and MLflow pickles
    # every registered object with any model: the tasks package travels with it, so it loads anywhere.
    model_info = mlflow.tensorflow.log_model(
        serving,
        name="model",
        signature=signature,
        input_example=example,
        metadata={"class_names": classes, "preprocessing": preprocessing.model_dump(mode="json")},
        code_paths=[str(pathlib.Path(__file__).parents[1])],  # the whole tasks package
        pip_requirements=_requirements(),
    )
    mlflow.log_text(json.dumps(classes), "labels.json")
    run = mlflow.active_run().info
    contracts.RunRecord(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        tracking_uri=mlflow.get_tracking_uri(),
        model_uri=model_info.model_uri,
        dataset=manifest.dataset,
        manifest_sha256=manifest_sha256,
    ).write(model_dir)
    return run.run_id


def _requirements() -> list[str]:
    """What the logged model needs to load, pinned to this environment. Named, not inferred: MLflow's
    inference loads the model again in a subprocess (about 9 s per run here) and lists this project,
    which no package index has; the code travels with the model instead (code_paths)."""
    return [
        f"{package}=={importlib.metadata.version(package)}"
        for package in ("tensorflow", "keras", "numpy", "cloudpickle")
    ]
