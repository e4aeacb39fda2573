"""Stage 3, train: shards -> a trained Keras model, its labels and history, and one MLflow run.

    python -m tasks.train           # reads ./params.yaml, writes <paths.models>/

Reads the train and validation shards with tf.data, trains `train.model` with Adam, logs params and
per-epoch metrics to MLflow, and saves the model with the moving averages of its weights
(`train.ema_momentum`), as the seed's evaluator uses them. The MLflow run stays open for evaluate and
register: its id goes to <paths.models>/run.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
from typing import Any

import keras
import mlflow
import mlflow.keras
import mlflow.models
import mlflow.tensorflow
import numpy as np
import tensorflow as tf

from tasks import config, files, models, records, tracking

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
HISTORY_FILE = "history.csv"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_path: pathlib.Path
    final_loss: float
    validation_accuracy: float


def train(
    params: config.TrainParams,
    seed: int,
    shards_dir: pathlib.Path,
    model_dir: pathlib.Path,
    run_settings: dict[str, Any] | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> TrainResult:
    """Trains `params.model` on the shards of `shards_dir`; `run_settings` (all of params.yaml) go to MLflow.

    `callbacks` are extra Keras callbacks, e.g. the flow's progress report.
    """
    keras.utils.set_random_seed(seed)
    manifest = records.read_manifest(shards_dir)
    class_names = manifest["classes"]
    train_count = manifest["splits"]["train"]["count"]
    train_data = (
        records.read_split(shards_dir, "train", params.image_size)
        .cache()
        .shuffle(train_count, seed=seed, reshuffle_each_iteration=True)
        .batch(params.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    validation_data = records.read_split(shards_dir, "validation", params.image_size).cache().batch(params.batch_size)

    model = models.build_model(params.model, (*params.image_size, 3), len(class_names))
    model.summary(print_fn=print)  # the seeds log each layer's output shape and the parameter count
    use_ema = params.ema_momentum is not None
    optimizer = keras.optimizers.Adam(
        learning_rate=params.learning_rate, use_ema=use_ema, ema_momentum=params.ema_momentum or 0.99
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    model_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    experiment_id = tracking.experiment_id(client, params.experiment_name)
    run_name = f"{manifest['dataset']}-{params.model}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    manifest_sha256 = files.sha256_of(shards_dir / records.MANIFEST)
    tags = {"dataset": manifest["dataset"], "manifest_sha256": manifest_sha256, **tracking.git_tags(), **tracking.dvc_tags(shards_dir)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        settings = run_settings or {"train": params.model_dump(mode="json")}
        mlflow.log_params(config.flatten(settings))
        mlflow.log_dict(settings, "params.yaml")
        history = model.fit(
            train_data,
            validation_data=validation_data,
            epochs=params.epochs,
            shuffle=False,  # train_data shuffles itself, seeded
            verbose=2,
            callbacks=[
                keras.callbacks.TerminateOnNaN(),
                keras.callbacks.CSVLogger(str(model_dir / HISTORY_FILE)),
                mlflow.keras.MlflowCallback(),
                *(callbacks or []),
            ],
        )
        final_loss = history.history["loss"][-1]
        if not math.isfinite(final_loss):
            raise FloatingPointError(f"training diverged: loss is {final_loss}; lower train.learning_rate")
        # fit() has replaced the weights by their moving averages (use_ema); measure those.
        _, validation_accuracy = model.evaluate(validation_data, verbose=0)
        mlflow.log_metric("validation_accuracy_final", validation_accuracy)

        model.save(model_dir / MODEL_FILE)
        files.write_json(model_dir / LABELS_FILE, class_names)
        example = next(iter(validation_data.unbatch().batch(4).take(1)))[0].numpy()
        signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
        model_info = mlflow.tensorflow.log_model(
            model, name="model", signature=signature, input_example=example, metadata={"class_names": class_names}
        )
        mlflow.log_text(json.dumps(class_names), "labels.json")
        tracking.write_run(
            model_dir,
            {
                "run_id": run.info.run_id,
                "experiment_id": experiment_id,
                "tracking_uri": mlflow.get_tracking_uri(),
                "model_uri": model_info.model_uri,
                "dataset": manifest["dataset"],
                "manifest_sha256": manifest_sha256,
            },
        )
    return TrainResult(
        run_id=run.info.run_id,
        model_path=model_dir / MODEL_FILE,
        final_loss=float(final_loss),
        validation_accuracy=float(validation_accuracy),
    )


def main() -> None:
    params = config.load_params()
    result = train(params.train, params.base.seed, params.shards_dir, params.model_dir, config.as_dict(params))
    print(
        f"train: loss {result.final_loss:.4f}, validation accuracy {result.validation_accuracy:.4f}, "
        f"model {result.model_path}, MLflow run {result.run_id}"
    )


if __name__ == "__main__":
    main()
