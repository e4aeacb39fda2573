"""Stage 4, evaluate: the trained model on the held-out test split.

    python -m tasks.evaluate        # reads ./params.yaml, writes <paths.metrics>

precision@1 (the seed's name for top-1 accuracy), top-5 when there are more than 5 classes, and the
mean cross-entropy loss, written for `dvc metrics` and logged to the training run in MLflow.
"""

from __future__ import annotations

import dataclasses
import pathlib

import keras
import mlflow
import numpy as np
import sklearn.metrics

from tasks import config, files, inputs, tracking, train

@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    metrics_path: pathlib.Path
    precision_at_1: float
    test_images: int


def evaluate(params: config.EvaluateParams, shards_dir: pathlib.Path, model_dir: pathlib.Path, metrics_path: pathlib.Path) -> EvaluateResult:
    """Scores the model of `model_dir` on the test shards of `shards_dir`."""
    run = tracking.read_run(model_dir)
    model = keras.saving.load_model(model_dir / train.MODEL_FILE)  # safe_mode: no arbitrary code
    class_names = files.read_json(model_dir / train.LABELS_FILE, "run the train stage first")
    # The validation preprocessing of training: decoded at its image_size, centre-cropped to the model's input.
    image_size, input_size = inputs.read_preprocessing(model_dir)
    test_data = inputs.evaluation_data(shards_dir, "test", image_size, input_size, params.batch_size)
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in test_data])
    probabilities = model.predict(test_data, verbose=0)
    all_labels = list(range(len(class_names)))

    metrics = {
        "precision_at_1": float(sklearn.metrics.accuracy_score(labels, probabilities.argmax(axis=1))),
        "loss": float(sklearn.metrics.log_loss(labels, probabilities, labels=all_labels)),
        "images": int(len(labels)),
    }
    if len(class_names) > 5:
        metrics["top_5"] = float(sklearn.metrics.top_k_accuracy_score(labels, probabilities, k=5, labels=all_labels))
    files.write_json(metrics_path, metrics)

    mlflow.set_tracking_uri(run["tracking_uri"])
    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_metrics({f"test_{key}": value for key, value in metrics.items()})
        mlflow.log_artifact(str(metrics_path))
    return EvaluateResult(
        metrics_path=metrics_path, precision_at_1=metrics["precision_at_1"], test_images=metrics["images"]
    )


def main() -> None:
    params = config.load_params()
    result = evaluate(params.evaluate, params.shards_dir, params.model_dir, params.metrics_path)
    print(f"evaluate: precision@1 {result.precision_at_1:.4f} on {result.test_images} test images, in {result.metrics_path}")


if __name__ == "__main__":
    main()
