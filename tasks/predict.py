"""Classify image files with a trained model: a local model or a registered one.

    python -m tasks.predict MODEL INPUT [--output FILE.csv] [--top-k K]

MODEL: models/ (or its model.keras), or an MLflow URI such as models:/digits-mnist_cnn@champion.
INPUT: an image file, a folder (searched recursively) or a glob pattern ("photos/**/*.jpg").
Writes a CSV (to stdout without --output): file, the top-k labels with their probabilities, and an
error column. A file that cannot be read gets a row with its error; the others are still
classified. Exit code 0 when every file was classified, 1 when any failed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import pathlib
import sys

import keras
import numpy as np
import PIL.Image
import PIL.ImageOps

from tasks import train
from tasks.common import contracts, errors, files, tracking
from tasks.data import inputs

BATCH_SIZE = 64  # images per model call


def load(model: str) -> tuple[keras.Model, list[str], tuple[int, int] | None]:
    """The Keras model, its class names and the size images were decoded at before the centre crop
    (None: straight to the model's input size), from a local path or an MLflow model URI."""
    if ":/" in model:
        import mlflow
        import mlflow.models

        mlflow.set_tracking_uri(tracking.tracking_uri())
        metadata = mlflow.models.get_model_info(model).metadata or {}
        if not metadata.get("class_names"):
            raise ValueError(f"{model} carries no class_names metadata; was it logged by the train stage?")
        image_size = metadata.get("preprocessing", {}).get("image_size")
        return tracking.load_logged_model(model), list(metadata["class_names"]), tuple(image_size) if image_size else None
    path = pathlib.Path(model)
    model_file = path / contracts.MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} is not a model file: give models/, a .keras file or a models:/ URI")
    class_names = files.read_json(model_file.parent / contracts.LABELS_FILE, "the class names written beside the model")
    image_size = inputs.read_preprocessing(model_file.parent)[0] if (model_file.parent / contracts.PREPROCESSING_FILE).is_file() else None
    return tracking.load_model_file(model_file), class_names, image_size


def find_images(pattern: str) -> list[pathlib.Path]:
    path = pathlib.Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(item for item in path.rglob("*") if item.is_file() and not item.name.startswith("."))
    matches = sorted(pathlib.Path(item) for item in glob.glob(pattern, recursive=True) if pathlib.Path(item).is_file())
    if not matches:
        raise FileNotFoundError(f"{pattern} is neither a file, a folder nor a glob pattern that matches files")
    return matches


def read_image(path: pathlib.Path, image_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB pixels as training's validation saw them: upright, resized to `image_size` (height, width),
    centre-cropped to `input_size`."""
    with PIL.Image.open(path) as image:
        upright = PIL.ImageOps.exif_transpose(image).convert("RGB")
    pixels = np.asarray(upright.resize((image_size[1], image_size[0]), PIL.Image.Resampling.BILINEAR), dtype=np.uint8)
    top, left = (image_size[0] - input_size[0]) // 2, (image_size[1] - input_size[1]) // 2
    return pixels[top : top + input_size[0], left : left + input_size[1]]


def predict(
    model: keras.Model, class_names: list[str], paths: list[pathlib.Path], top_k: int, image_size: tuple[int, int] | None = None
) -> list[dict]:
    """One row per path: the top-k labels and probabilities, or the reason it could not be read."""
    input_size = tuple(model.input_shape[1:3])
    image_size = image_size or input_size
    rows: list[dict] = []
    for start in range(0, len(paths), BATCH_SIZE):
        batch_rows, images = [], []
        for path in paths[start : start + BATCH_SIZE]:
            row = {"file": str(path), "error": ""}
            try:
                images.append(read_image(path, image_size, input_size))
                batch_rows.append(row)
            except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
        if not images:
            continue
        probabilities = np.asarray(model.predict_on_batch(np.stack(images)))
        for row, row_probabilities in zip(batch_rows, probabilities):
            for rank, index in enumerate(np.argsort(-row_probabilities)[:top_k], start=1):
                row[f"label_{rank}"] = class_names[index]
                row[f"probability_{rank}"] = f"{row_probabilities[index]:.6f}"
    return rows


def main(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify image files with a trained model.")
    parser.add_argument("model", help="models/, a .keras file, or an MLflow URI like models:/NAME@champion")
    parser.add_argument("input", help="an image file, a folder, or a glob pattern")
    parser.add_argument("--output", type=pathlib.Path, help="CSV file to write (default: stdout)")
    parser.add_argument("--top-k", type=int, default=1, help="labels per image, most probable first (default: %(default)s)")
    options = errors.add_verbose_option(parser).parse_args(arguments)
    model, class_names, image_size = load(options.model)
    if not 1 <= options.top_k <= len(class_names):
        parser.error(f"--top-k must be between 1 and {len(class_names)} (the number of classes), got {options.top_k}")
    rows = predict(model, class_names, find_images(options.input), options.top_k, image_size)

    columns = ["file"] + [f"{kind}_{rank}" for rank in range(1, options.top_k + 1) for kind in ("label", "probability")] + ["error"]
    stream = options.output.open("w", newline="") if options.output else sys.stdout
    try:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if options.output:
            stream.close()
    failed = sum(1 for row in rows if row["error"])
    print(f"predict: {len(rows) - failed} classified, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
