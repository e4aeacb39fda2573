"""The pictures people look at in the MLflow UI: a confusion matrix, the worst mistakes, the images to review
and a reliability diagram."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted in a pipeline
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import sklearn.metrics  # noqa: E402

# Above this many classes a cell is too small for its count: the matrix shows each row's share by colour alone.
MAX_CLASSES_WITH_COUNTS = 30
MAX_FIGURE_INCHES = 24.0  # at 100 dpi; 100 classes get cells of about 0.2 inch, names in 5-point type


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, class_names: list[str], path: pathlib.Path) -> None:
    """Counts in each cell up to MAX_CLASSES_WITH_COUNTS classes; beyond, each row coloured by its share
    (recall on the diagonal), so that 100 classes stay one readable picture of bounded size."""
    class_count = len(class_names)
    with_counts = class_count <= MAX_CLASSES_WITH_COUNTS
    size = min(MAX_FIGURE_INCHES, max(4.0, (0.5 if with_counts else 0.2) * class_count + 2))
    figure, axes = plt.subplots(figsize=(size, size))
    display = sklearn.metrics.ConfusionMatrixDisplay.from_predictions(
        labels,
        predicted,
        labels=list(range(class_count)),
        display_labels=class_names,
        ax=axes,
        colorbar=False,
        include_values=with_counts,
        normalize=None if with_counts else "true",
        xticks_rotation="vertical",
    )
    if not with_counts:
        figure.colorbar(display.im_, ax=axes, shrink=0.5, label="share of the true class's test images")
        axes.tick_params(labelsize=max(4, min(8, round(600 / class_count))))
    axes.set_title("Confusion matrix (test split)" + ("" if with_counts else ": share of each true class"))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def misclassified_grid(mistakes: list[tuple[np.ndarray, str, str, str, float]], path: pathlib.Path) -> None:
    """(image, source file, true label, predicted label, confidence) per mistake, most confident first."""
    cells = [
        (image, f"{source[-28:]}\ntrue {actual}, predicted {predicted} ({confidence:.0%})")
        for image, source, actual, predicted, confidence in mistakes
    ]
    _image_grid(cells, "Most confidently misclassified test images", "no misclassified test images", path)


def review_grid(items: list[tuple[np.ndarray, str, str, str, float, str]], path: pathlib.Path) -> None:
    """(image, source file, given label, predicted label, its probability, reason) per row of review.csv."""
    cells = [
        (image, f"{source[-28:]}\n{given} → {predicted} ({probability:.0%})\n{reason}")
        for image, source, given, predicted, probability, reason in items
    ]
    title = "To review: likely label errors, then the highest losses (test and validation images)"
    _image_grid(cells, title, "no images to review", path)


def _image_grid(cells: list[tuple[np.ndarray, str]], title: str, empty_text: str, path: pathlib.Path) -> None:
    """Images with a caption each, four to a row."""
    columns = 4
    rows = max(1, -(-len(cells) // columns))
    figure, axes_grid = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for axes in axes_grid.flat:
        axes.axis("off")
    # The grid may have empty cells after the last image: not strict.
    for axes, (image, caption) in zip(axes_grid.flat, cells, strict=False):
        axes.imshow(image, interpolation="nearest")
        axes.set_title(caption, fontsize=7)
    if not cells:
        axes_grid.flat[0].text(0.5, 0.5, empty_text, ha="center", va="center")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def reliability_diagram(tables: dict[str, dict[str, list[float]]], path: pathlib.Path) -> None:
    """Accuracy against confidence per bin for each named reliability table (calibration.reliability), over
    the diagonal a perfectly calibrated model lies on, and below it how many images each bin holds."""
    figure, (curves, counts) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    curves.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for name, table in tables.items():
        count = np.asarray(table["count"])
        edges = np.linspace(0, 1, len(count) + 1)
        filled = count > 0  # an empty bin has no accuracy to show
        confidence = np.asarray(table["confidence"])[filled]
        curves.plot(confidence, np.asarray(table["accuracy"])[filled], marker="o", label=name)
        counts.stairs(count, edges, label=name)
    curves.set_xlim(0, 1)
    curves.set_ylim(0, 1.05)
    curves.set_ylabel("accuracy of the images in the bin")
    curves.set_title("Reliability diagram (test split)")
    curves.legend(loc="upper left", fontsize=8)
    curves.grid(alpha=0.3)
    counts.set_xlabel("confidence: the predicted class's probability (bin mean)")
    counts.set_ylabel("images")
    counts.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
