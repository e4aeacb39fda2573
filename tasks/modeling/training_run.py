"""The MLflow run of a training: started (or the interrupted one resumed) before the first epoch; the
trained model, its figures and the run record written after the last.

The run stays open for evaluate and register: its id goes to <paths.models>/run.json
(contracts.RunRecord), written last, so that a model folder without it never passes for finished.

What the MLflow UI shows of it, to compare runs: the three splits as the run's input data sets (rows from
the shards' index.csv, the manifest's hash as digest), a description in words (tracking.describe_run), the
DVC experiment that ran it, if any, and the machine's CPU, memory, disk and network use (GPU use too where
nvidia-ml-py is installed) on its System metrics tab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import operator
import os
import pathlib
from typing import Any

import keras
import mlflow
import mlflow.data
import mlflow.data.dataset_source_registry
import mlflow.exceptions
import mlflow.models
import mlflow.tensorflow
import mlflow.types
import numpy as np
import pandas as pd

from tasks.common import config, contracts, errors, files, tracking
from tasks.modeling import checkpoints

# Logged with the model, under data/, when convert wrote them: the index of every image (in the shards
# folder; the next conversion compares its data with the champion's through it) and the report of what
# changed since the champion's data (in the data report folder).
CHANGE_REPORT_FILES = ("changes.json", "changes.md")
# Seconds between two samples of the machine's use: MLflow's default, 10, leaves a few points on a run of a
# minute. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, if set, wins.
SYSTEM_METRICS_SECONDS = 2
# Each split of the shards, and the context of its data set among the run's inputs.
SPLIT_CONTEXTS = dict(zip(contracts.SPLITS, tracking.DATA_CONTEXTS, strict=True))


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
    resumed = _resume(client, work)
    if resumed is not None:
        return resumed
    experiment_id = tracking.experiment_id(client, params.experiment_name)
    run_name = f"{manifest.dataset}-{params.model}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    tags = {
        "dataset": manifest.dataset,
        "manifest_sha256": manifest_sha256,
        **tracking.git_tags(),
        **tracking.dvc_tags(shards_dir),
        **tracking.dvc_experiment_tags(),
        **(lineage or {}),
    }
    run = _start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    settings = run_settings or {"train": params.model_dump(mode="json")}
    mlflow.log_params(config.flatten(settings))
    mlflow.log_dict(settings, "params.yaml")
    if class_weight is not None:
        mlflow.log_dict(class_weight, "class_weight.json")
    log_data(manifest.dataset, manifest_sha256, shards_dir)
    tracking.describe_run(client, run.info.run_id)
    files.write_json(
        work / checkpoints.RUN_FILE,
        {"run_id": run.info.run_id, "tracking_uri": errors.without_credentials(mlflow.get_tracking_uri())},
    )
    return run


def _resume(client: mlflow.MlflowClient, work: pathlib.Path) -> mlflow.ActiveRun | None:
    """The run that `work` was started for, active again, when it is in this store; else None."""
    previous = files.read_json(work / checkpoints.RUN_FILE, "") if (work / checkpoints.RUN_FILE).is_file() else {}
    if previous.get("tracking_uri") != errors.without_credentials(mlflow.get_tracking_uri()):
        return None
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.get_run(previous["run_id"])
        for key, value in {"resumed": "true", **tracking.dvc_experiment_tags()}.items():
            client.set_tag(previous["run_id"], key, value)
        return _start_run(run_id=previous["run_id"])
    return None


def _start_run(**arguments: Any) -> mlflow.ActiveRun:
    """mlflow.start_run, sampling the machine's use every SYSTEM_METRICS_SECONDS until the run ends.

    MLflow's monitor is a daemon thread that mlflow.end_run (the `with` block's end) stops: it keeps no
    process alive. It reads its interval from the environment when the run starts; the variable is put
    back as it was at once.
    """
    user_interval = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    if user_interval is None:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_SECONDS)
    try:
        return mlflow.start_run(log_system_metrics=True, **arguments)
    finally:
        if user_interval is None:
            mlflow.set_system_metrics_sampling_interval(None)


def log_data(dataset: str, manifest_sha256: str, shards_dir: pathlib.Path) -> None:
    """The splits of `shards_dir` as the active run's input data sets, named `<dataset>-<split>`: one row per
    image (index.csv's), so that the UI counts them, and the manifest's hash as digest.

    The manifest's hash, not DVC's: the same data then has the same digest whether `dvc repro` or the Prefect
    flow trained on it (DVC's md5, when dvc.lock has it, is the run's tag shards_dvc_md5).
    """
    if not (shards_dir / contracts.INDEX_FILE).is_file():
        print(
            f"train: {shards_dir / contracts.INDEX_FILE} is missing (an earlier release's shards): the run's data "
            "sets are not logged; run convert again to have them"
        )
        return
    # attrgetter, not dataclasses.asdict, which deep-copies every field: a million rows in about a second here.
    # MLflow then reads every row to infer the schema: ~3 s per million rows and column here, small beside
    # training on a million images.
    columns = [field.name for field in dataclasses.fields(contracts.IndexEntry)]
    row = operator.attrgetter(*columns)
    index = pd.DataFrame([row(entry) for entry in contracts.read_index(shards_dir)], columns=columns)
    # Given as a local source explicitly: a bare path matches two of MLflow's source types, and it warns.
    source = mlflow.data.dataset_source_registry.get_dataset_source_from_json(
        json.dumps({"uri": str(shards_dir.resolve())}), source_type="local"
    )
    for split, context in SPLIT_CONTEXTS.items():
        rows = index[index["split"] == split].reset_index(drop=True)
        data_set = mlflow.data.from_pandas(
            rows,
            source=source,
            targets="class_name",
            name=f"{dataset}-{split}",
            digest=manifest_sha256[: tracking.SHORT_HASH_LENGTH],
        )
        mlflow.log_input(data_set, context=context)


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
    """The saved model (`serving`) and its last `figures` to the open run, with the data's index and change
    report; then run.json. Returns the run id."""
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
    signature = mlflow.models.ModelSignature(
        inputs=mlflow.types.Schema([mlflow.types.TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "image")]),
        outputs=mlflow.types.Schema(
            [mlflow.types.TensorSpec(np.dtype(np.float32), (-1, len(classes)), "probabilities")]
        ),
    )
    # No input example: MLflow would load the logged model and predict on it, only to warn when that fails
    # (~0.4 s of every training on 2 cores, and at 224x224 pixels four images are 2 MB of JSON, stored twice).
    # register's served-model check runs the model under `mlflow models serve` on test images, and fails the
    # release when it does not answer as the saved model does (tasks/modeling/release.py).
    # Three of our layers (preparation, LRN, ResNet shortcut) are registered Keras objects, and MLflow pickles
    # every registered object with any model: the tasks package travels with it, so it loads anywhere.
    model_info = mlflow.tensorflow.log_model(
        serving,
        name="model",
        signature=signature,
        metadata={"class_names": classes, "preprocessing": preprocessing.model_dump(mode="json")},
        code_paths=[str(pathlib.Path(__file__).parents[1])],  # the whole tasks package
        pip_requirements=_requirements(),
    )
    mlflow.log_text(json.dumps(classes), "labels.json")
    run = mlflow.active_run().info
    tracking.describe_run(mlflow.MlflowClient(), run.run_id)  # now with the validation accuracy
    contracts.RunRecord(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        tracking_uri=mlflow.get_tracking_uri(),
        model_uri=model_info.model_uri,
        dataset=manifest.dataset,
        manifest_sha256=manifest_sha256,
    ).write(model_dir)
    _print_link(run)
    return run.run_id


def _print_link(run: mlflow.entities.RunInfo) -> None:
    """Where to see the run. `workflowType=machine_learning`: MLflow 3.17's UI opens on its GenAI pages without it."""
    uri = errors.without_credentials(mlflow.get_tracking_uri())
    page = f"#/experiments/{run.experiment_id}/runs/{run.run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        print(f"train: the run in MLflow: {uri.rstrip('/')}/{page}")
    else:
        print(
            f"train: the run in MLflow, once `mlflow ui --backend-store-uri {uri}` serves it: http://127.0.0.1:5000/{page}"
        )


def _requirements() -> list[str]:
    """What the logged model needs to load, pinned to this environment. Named, not inferred: MLflow's
    inference loads the model again in a subprocess (about 9 s per run here) and lists this project,
    which no package index has; the code travels with the model instead (code_paths)."""
    return [
        f"{package}=={importlib.metadata.version(package)}"
        for package in ("tensorflow", "keras", "numpy", "cloudpickle")
    ]
