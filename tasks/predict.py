"""Classify image files with a trained model: a local model or a registered one.

    python -m tasks.predict MODEL INPUT [--output FILE.csv] [--top-k K] [--min-confidence P]

MODEL: models/ (or its model.keras), or an MLflow URI such as models:/digits-mnist_cnn@champion.
INPUT: an image file, a folder (searched recursively) or a glob pattern ("photos/**/*.jpg").
Writes a CSV (to stdout without --output): file, the top-k labels with their probabilities, and an
error column. A file that cannot be read gets a row with its error (the reason convert would give);
the others are still classified. Exit code 0 when every file was classified, 1 when any failed.

The probabilities are calibrated confidences: the saved model ends in a temperature fitted on the
validation split (tasks/modeling/calibration.py), so that on images like those, about 80% of the ones
given 0.8 are right.
--min-confidence P (a probability, 0 to 1) adds an `unsure` column: true where the top probability is
below P, false where it is not (empty for a file that failed), so a person can look at those images;
their top-k columns stay filled. How many were unsure goes to stderr.

Each file is read as convert reads it (tasks/data/images.py: upright, RGB, resized only if the data set
was) and decoded by TensorFlow as training decodes a shard; the saved model resizes and crops it
itself. So a file gets the same probabilities here, in evaluate and from the registered model.
"""

from __future__ import annotations

import argparse
import csv
import glob
import pathlib
import sys

import keras
import numpy as np
import tensorflow as tf

from tasks.common import contracts, errors, tracking
from tasks.data import images
from tasks.modeling import architectures

BATCH_SIZE = 64  # images per model call


def load(model: str) -> tuple[keras.Model, list[str], tuple[int, int] | None]:
    """The model (taking images of any size), its class names and the size convert resized images to
    (None: kept), from a local path or an MLflow model URI."""
    if ":/" in model:
        import mlflow
        import mlflow.models

        mlflow.set_tracking_uri(tracking.tracking_uri())
        metadata = mlflow.models.get_model_info(model).metadata or {}
        if not metadata.get("class_names"):
            raise errors.BadInput(f"{model} carries no class_names metadata; was it logged by the train stage?")
        recorded = metadata.get("preprocessing")
        preprocessing = contracts.Preprocessing.model_validate(recorded) if recorded else None
        loaded, stored_size = _prepared(tracking.load_logged_model(model), preprocessing)
        return loaded, list(metadata["class_names"]), stored_size
    path = pathlib.Path(model)
    model_file = path / contracts.MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise errors.MissingInput(f"{model_file} is not a model file: give models/, a .keras file or a models:/ URI")
    recorded = (model_file.parent / contracts.PREPROCESSING_FILE).is_file()
    preprocessing = contracts.Preprocessing.read(model_file.parent) if recorded else None
    loaded, stored_size = _prepared(tracking.load_model_file(model_file), preprocessing)
    return loaded, contracts.read_labels(model_file.parent), stored_size


def _prepared(model: keras.Model, preprocessing: contracts.Preprocessing | None) -> tuple[keras.Model, tuple | None]:
    """The model behind its preparation, and convert's resize (stored_size) for reading files. A model saved
    before the preparation moved into it is put behind it here; without a record, at its input size."""
    fixed = tuple(model.input_shape[1:3])
    if fixed != (None, None):
        sizes = preprocessing or contracts.Preprocessing(image_size=fixed, input_size=fixed)
        model = architectures.serving_model(model, sizes.image_size, sizes.input_size)
    return model, preprocessing.stored_size if preprocessing else None


def find_images(pattern: str) -> list[pathlib.Path]:
    path = pathlib.Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(item for item in path.rglob("*") if item.is_file() and not item.name.startswith("."))
    matches = sorted(pathlib.Path(item) for item in glob.glob(pattern, recursive=True) if pathlib.Path(item).is_file())
    if not matches:
        raise errors.MissingInput(f"{pattern} is neither a file, a folder nor a glob pattern that matches files")
    return matches


def read_image(path: pathlib.Path, stored_size: tuple[int, int] | None) -> np.ndarray:
    """uint8 RGB pixels of `path` as a shard holds them: read by convert's code, decoded by TensorFlow."""
    prepared = images.prepare(str(path), stored_size)
    if isinstance(prepared, images.Rejected):
        raise errors.BadInput(prepared.reason)
    return tf.io.decode_image(prepared.encoded, channels=3, expand_animations=False).numpy()


def predict(
    model: keras.Model,
    class_names: list[str],
    paths: list[pathlib.Path],
    top_k: int,
    stored_size: tuple[int, int] | None = None,
    min_confidence: float | None = None,
) -> list[dict]:
    """One row per path: the top-k labels and probabilities, or the reason it could not be read; with
    `min_confidence`, whether its top probability is below it (`unsure`: "true" or "false")."""
    rows: list[dict] = []
    for start in range(0, len(paths), BATCH_SIZE):
        by_shape: dict[tuple[int, ...], list[tuple[dict, np.ndarray]]] = {}
        for path in paths[start : start + BATCH_SIZE]:
            row = {"file": str(path), "error": ""}
            rows.append(row)
            try:
                pixels = read_image(path, stored_size)
            except errors.BadInput as error:
                row["error"] = str(error)
                continue
            by_shape.setdefault(pixels.shape, []).append((row, pixels))
        for group in by_shape.values():  # one model call per image size: a batch holds one size
            probabilities = np.asarray(model.predict_on_batch(np.stack([pixels for _, pixels in group])))
            for (row, _), row_probabilities in zip(group, probabilities, strict=True):
                for rank, index in enumerate(np.argsort(-row_probabilities)[:top_k], start=1):
                    row[f"label_{rank}"] = class_names[index]
                    row[f"probability_{rank}"] = f"{row_probabilities[index]:.6f}"
                if min_confidence is not None:  # compared unrounded: the CSV's 6 decimals could round up to P
                    row["unsure"] = str(bool(row_probabilities.max() < min_confidence)).lower()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify image files with a trained model.")
    parser.add_argument("model", help="models/, a .keras file, or an MLflow URI like models:/NAME@champion")
    parser.add_argument("input", help="an image file, a folder, or a glob pattern")
    parser.add_argument("--output", type=pathlib.Path, help="CSV file to write (default: stdout)")
    parser.add_argument(
        "--top-k", type=int, default=1, help="labels per image, most probable first (default: %(default)s)"
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        metavar="P",
        help="mark images whose top probability is below P (0 to 1) as unsure, in a column `unsure`",
    )
    options = errors.add_verbose_option(parser).parse_args(argv)
    if options.min_confidence is not None and not 0.0 <= options.min_confidence <= 1.0:
        parser.error(f"--min-confidence must be a probability between 0 and 1, got {options.min_confidence}")
    model, class_names, stored_size = load(options.model)
    if not 1 <= options.top_k <= len(class_names):
        parser.error(f"--top-k must be between 1 and {len(class_names)} (the number of classes), got {options.top_k}")
    rows = predict(model, class_names, find_images(options.input), options.top_k, stored_size, options.min_confidence)

    columns = (
        ["file"]
        + [f"{kind}_{rank}" for rank in range(1, options.top_k + 1) for kind in ("label", "probability")]
        + (["unsure"] if options.min_confidence is not None else [])
        + ["error"]
    )
    stream = options.output.open("w", newline="") if options.output else sys.stdout
    try:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if options.output:
            stream.close()
    failed = sum(1 for row in rows if row["error"])
    unsure = sum(1 for row in rows if row.get("unsure") == "true")
    below = (
        f" ({unsure} unsure: top probability below {options.min_confidence})"
        if options.min_confidence is not None
        else ""
    )
    print(f"predict: {len(rows) - failed} classified{below}, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
