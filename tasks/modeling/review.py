"""The images worth a person's look after evaluate: likely label errors first, then the highest losses.

A likely label error is an image whose given label the model finds unlikely while it is confident of
another class, by confident learning (Northcutt et al., "Confident Learning: Estimating Uncertainty in
Dataset Labels", 2021; cleanlab's `find_label_issues`): each class gets a threshold, the model's mean
probability of that class over the images labelled with it, and an image labelled i whose probability
of some other class j reaches j's threshold counts towards the estimated number of images labelled i
that are really j; that many, those with the largest margin, are flagged per pair of classes. The
method needs out-of-sample probabilities: the test and validation splits, which the model did not
train on, qualify, so both are reviewed together (more images make the per-class thresholds firmer).
"""

from __future__ import annotations

import io
import pathlib

import cleanlab.filter
import numpy as np
import pandas as pd
import PIL.Image

from tasks.common import contracts
from tasks.data import records, tfrecords

REVIEW_ROWS = 100  # rows of review.csv at most: a list one person can go through in a sitting
REVIEW_SHOWN = 16  # images in review.png: the first rows of review.csv
LIKELY_LABEL_ERROR = "likely label error"
HIGH_LOSS = "high loss"
COLUMNS = ["file", "split", "given", "predicted", "predicted_probability", "given_probability", "loss", "reason"]


def review_table(
    labels: np.ndarray,
    probabilities: np.ndarray,
    sources: list[str],
    splits: list[str],
    class_names: list[str],
    rows: int = REVIEW_ROWS,
) -> pd.DataFrame:
    """review.csv's rows: the likely label errors, the given label's least likely first, then the remaining
    images by decreasing loss, `rows` at most. One image per row of `labels`, `probabilities`, `sources`
    and `splits` (its split's name)."""
    if not len(labels) == len(probabilities) == len(sources) == len(splits):
        raise ValueError(
            f"one label, probability row, source and split per image, got {len(labels)}, {len(probabilities)}, "
            f"{len(sources)} and {len(splits)}"
        )
    issues = np.zeros(0, dtype=int)
    # With every image in one class there is no other class to have been confused with (cleanlab refuses).
    if len(np.unique(labels)) > 1:
        # n_jobs=1: cleanlab would otherwise fork a worker per core, from a process that holds TensorFlow.
        issues = cleanlab.filter.find_label_issues(
            labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
        )
    given_probability = probabilities[np.arange(len(labels)), labels]
    # Clipped at the float type's resolution as sklearn's log_loss (metrics.json's loss) clips.
    loss = -np.log(np.clip(given_probability.astype(np.float64), np.finfo(probabilities.dtype).eps, 1.0))
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[issues] = True
    by_loss = np.argsort(-loss, kind="stable")
    order = np.concatenate([np.asarray(issues, dtype=int), by_loss[~flagged[by_loss]]])[:rows]
    predicted = probabilities.argmax(axis=1)
    return pd.DataFrame(
        {
            "file": [sources[index] for index in order],
            "split": [splits[index] for index in order],
            "given": [class_names[labels[index]] for index in order],
            "predicted": [class_names[predicted[index]] for index in order],
            "predicted_probability": probabilities[order, predicted[order]].round(6),
            "given_probability": given_probability[order].round(6),
            "loss": loss[order].round(6),
            "reason": [LIKELY_LABEL_ERROR if flagged[index] else HIGH_LOSS for index in order],
        },
        columns=COLUMNS,
    )


def stored_images(shards_dir: pathlib.Path, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """The stored pixels (RGB) of the images named by (split, source path), read again from the shards.

    Prediction keeps no pixels beyond the few worst images, and which images a review shows is only known
    once every image is scored; reading the records again decodes only the wanted ones."""
    manifest = contracts.Manifest.read(shards_dir)
    found: dict[tuple[str, str], np.ndarray] = {}
    for split in sorted({split for split, _ in wanted}):
        for path in records.verify_shards(shards_dir, manifest, split):
            for _, _, source, encoded in tfrecords.iterate_records(path.read_bytes(), path):
                if (split, source) in wanted:
                    with PIL.Image.open(io.BytesIO(encoded)) as image:
                        found[(split, source)] = np.asarray(image.convert("RGB"))
    return found
