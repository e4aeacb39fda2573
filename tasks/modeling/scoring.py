"""Scoring a model on a split of the shards: what evaluate reports and register re-measures a champion with.

One function runs the model over the test split, one turns labels and probabilities into the scores
of metrics.json; evaluate and register share them, so a champion re-scored on new data is measured
exactly as a fresh model is.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import keras
import numpy as np
import sklearn.metrics

from tasks.common import contracts
from tasks.data import inputs

MISCLASSIFIED_SHOWN = 16  # images in evaluate's grid of the most confidently wrong


@dataclasses.dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # (n,) true class indices
    probabilities: np.ndarray  # (n, classes)
    sources: list[str]  # each image's path relative to the raw folder
    worst: list[tuple[float, int, np.ndarray]]  # (confidence, index, image) of the most confidently wrong


def predict_split(
    model: keras.Model,
    shards_dir: pathlib.Path,
    split: str,
    batch_size: int,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
) -> Predictions:
    """Runs `model` over the shards of `split` (test, validation), keeping only the few misclassified images a
    report shows.

    The images are decoded at `image_size`; the model centre-crops them to `input_size` itself, or, for a
    model saved before the preparation moved into it, they are cropped here as training's validation does.
    """
    takes_any_size = tuple(model.input_shape[1:3]) == (None, None)
    crop = image_size if takes_any_size else input_size
    split_data = inputs.evaluation_data(shards_dir, split, image_size, crop, batch_size, with_source=True)
    labels, probabilities, sources, worst = [], [], [], []
    seen = 0  # images before this batch
    for images, batch_labels, batch_sources in split_data:
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


def score(labels: np.ndarray, probabilities: np.ndarray, class_count: int) -> contracts.Scores:
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
    return contracts.Scores.model_validate(metrics)
