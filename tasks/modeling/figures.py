"""The pictures people look at in the MLflow UI: a confusion matrix and the worst mistakes."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted in a pipeline
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import sklearn.metrics  # noqa: E402


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, class_names: list[str], path: pathlib.Path) -> None:
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    sklearn.metrics.ConfusionMatrixDisplay.from_predictions(
        labels,
        predicted,
        labels=list(range(len(class_names))),
        display_labels=class_names,
        ax=axes,
        colorbar=False,
        xticks_rotation="vertical",
    )
    axes.set_title("Confusion matrix (test split)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def misclassified_grid(mistakes: list[tuple[np.ndarray, str, str, str, float]], path: pathlib.Path) -> None:
    """(image, source file, true label, predicted label, confidence) per mistake, most confident first."""
    columns = 4
    rows = max(1, -(-len(mistakes) // columns))
    figure, axes_grid = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axes in axes_grid.flat:
        axes.axis("off")
    # The grid may have empty cells after the last mistake: not strict.
    for axes, (image, source, actual, predicted, confidence) in zip(axes_grid.flat, mistakes, strict=False):
        axes.imshow(image, interpolation="nearest")
        axes.set_title(f"{source[-28:]}\ntrue {actual}, predicted {predicted} ({confidence:.0%})", fontsize=7)
    if not mistakes:
        axes_grid.flat[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    figure.suptitle("Most confidently misclassified test images")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
