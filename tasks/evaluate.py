"""Stage 4, evaluate: the trained model (its moving-average weights) on the held-out test split.

    python -m tasks.evaluate        # reads ./params.yaml, writes <paths.metrics> and <paths.evaluation>/

<paths.metrics> (for `dvc metrics show/diff`): precision@1 (the seed's name for top-1 accuracy),
top-5 when there are more than 5 classes, the mean cross-entropy loss, and the macro and weighted
averages of per-class precision, recall and F1. <paths.evaluation>/ holds per_class.csv,
predictions.csv (one row per test image: the DVC confusion plot), confusion_matrix.png and
misclassified.png (the most confidently wrong test images). All of it is logged to the training run.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

import keras
import mlflow
import numpy as np
import pandas as pd
import sklearn.metrics

from tasks import train
from tasks.common import config, errors, files, tracking
from tasks.data import inputs, records
from tasks.modeling import figures

PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_FILE = "confusion_matrix.png"
MISCLASSIFIED_FILE = "misclassified.png"
MISCLASSIFIED_SHOWN = 16  # images in the grid


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    metrics_path: pathlib.Path
    precision_at_1: float
    test_images: int


@dataclasses.dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # (n,) true class indices
    probabilities: np.ndarray  # (n, classes)
    sources: list[str]  # each image's path relative to the raw folder
    worst: list[tuple[float, int, np.ndarray]]  # (confidence, index, image) of the most confidently wrong


def predict_test_split(
    model: keras.Model, shards_dir: pathlib.Path, batch_size: int, image_size: tuple[int, int], input_size: tuple[int, int]
) -> Predictions:
    """Runs `model` over the test shards, keeping only the few misclassified images a report shows.

    The images are prepared as in training's validation: decoded at `image_size`, centre-cropped to `input_size`.
    """
    test_data = inputs.evaluation_data(shards_dir, "test", image_size, input_size, batch_size, with_source=True)
    labels, probabilities, sources, worst = [], [], [], []
    seen = 0  # images before this batch
    for images, batch_labels, batch_sources in test_data:
        batch_probabilities = np.asarray(model.predict_on_batch(images))
        predicted = batch_probabilities.argmax(axis=1)
        for position in np.flatnonzero(predicted != batch_labels.numpy()):
            worst.append((float(batch_probabilities[position].max()), seen + int(position), images[position].numpy()))
        seen += len(batch_probabilities)
        worst = sorted(worst, key=lambda item: -item[0])[:MISCLASSIFIED_SHOWN]
        labels.append(batch_labels.numpy())
        probabilities.append(batch_probabilities)
        sources.extend(os.fsdecode(source) for source in batch_sources.numpy())
    return Predictions(np.concatenate(labels), np.concatenate(probabilities), sources, worst)


def score(labels: np.ndarray, probabilities: np.ndarray, class_count: int) -> dict:
    """The headline metrics of metrics.json, from true labels and predicted class probabilities."""
    all_labels = list(range(class_count))
    predicted = probabilities.argmax(axis=1)
    metrics = {
        "precision_at_1": float(sklearn.metrics.accuracy_score(labels, predicted)),
        "loss": float(sklearn.metrics.log_loss(labels, probabilities, labels=all_labels)),
        "images": int(len(labels)),
    }
    if class_count > 5:
        metrics["top_5"] = float(sklearn.metrics.top_k_accuracy_score(labels, probabilities, k=5, labels=all_labels))
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = sklearn.metrics.precision_recall_fscore_support(
            labels, predicted, labels=all_labels, average=average, zero_division=0
        )
        metrics[f"{average}_avg"] = {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
    return metrics


def evaluate(
    params: config.EvaluateParams,
    shards_dir: pathlib.Path,
    model_dir: pathlib.Path,
    metrics_path: pathlib.Path,
    evaluation_dir: pathlib.Path,
) -> EvaluateResult:
    """Scores the model of `model_dir` on the test shards of `shards_dir` and logs it all to its run."""
    run = tracking.read_run(model_dir)
    model = tracking.load_model_file(model_dir / train.MODEL_FILE)
    class_names = files.read_json(model_dir / train.LABELS_FILE, "run the train stage first")
    image_size, input_size = inputs.read_preprocessing(model_dir)
    predictions = predict_test_split(model, shards_dir, params.batch_size, image_size, input_size)
    metrics = score(predictions.labels, predictions.probabilities, len(class_names))
    predicted = predictions.probabilities.argmax(axis=1)

    with files.staged_directory(evaluation_dir) as staging:
        precision, recall, f1, support = sklearn.metrics.precision_recall_fscore_support(
            predictions.labels, predicted, labels=list(range(len(class_names))), zero_division=0
        )
        per_class = pd.DataFrame({"class": class_names, "precision": precision, "recall": recall, "f1": f1, "support": support})
        per_class.to_csv(staging / PER_CLASS_FILE, index=False, float_format="%.6f")
        pd.DataFrame(
            {
                "file": predictions.sources,
                "actual": [class_names[label] for label in predictions.labels],
                "predicted": [class_names[label] for label in predicted],
                "confidence": predictions.probabilities.max(axis=1).round(6),
            }
        ).to_csv(staging / PREDICTIONS_FILE, index=False)
        figures.confusion_matrix(predictions.labels, predicted, class_names, staging / CONFUSION_FILE)
        figures.misclassified_grid(
            [
                (image, predictions.sources[index], class_names[predictions.labels[index]], class_names[predicted[index]], confidence)
                for confidence, index, image in predictions.worst
            ],
            staging / MISCLASSIFIED_FILE,
        )
    files.write_json(metrics_path, metrics)

    mlflow.set_tracking_uri(run["tracking_uri"])
    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_metrics({f"test_{key}": value for key, value in tracking.flat_metrics(metrics).items()})
        mlflow.log_artifact(str(metrics_path), "evaluation")
        mlflow.log_artifacts(str(evaluation_dir), "evaluation")
        mlflow.log_table(per_class, "evaluation/per_class.json")
        for name in (records.MANIFEST, records.REJECTED):
            mlflow.log_artifact(str(shards_dir / name), "dataset")
    return EvaluateResult(metrics_path=metrics_path, precision_at_1=metrics["precision_at_1"], test_images=metrics["images"])


def main(arguments: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(arguments)
    params = config.load_params()
    result = evaluate(params.evaluate, params.shards_dir, params.model_dir, params.metrics_path, params.evaluation_dir)
    print(f"evaluate: precision@1 {result.precision_at_1:.4f} on {result.test_images} test images, in {result.metrics_path}")


if __name__ == "__main__":
    sys.exit(errors.run_main(main, exclusive=True))
