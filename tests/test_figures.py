"""The confusion matrix stays one readable picture from a few classes to a hundred."""

import numpy as np
import PIL.Image

from tasks.modeling import figures


def _predictions(classes: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    random = np.random.default_rng(0)
    labels = random.integers(0, classes, images)
    return labels, np.where(random.random(images) < 0.8, labels, random.integers(0, classes, images))


def test_a_confusion_matrix_of_100_classes_colours_shares_in_a_bounded_picture(tmp_path, monkeypatch):
    shown = []
    original = figures.sklearn.metrics.ConfusionMatrixDisplay.from_predictions
    monkeypatch.setattr(
        figures.sklearn.metrics.ConfusionMatrixDisplay,
        "from_predictions",
        lambda *args, **options: shown.append(original(*args, **options)) or shown[-1],
    )
    labels, predicted = _predictions(100, 10_000)
    figures.confusion_matrix(labels, predicted, [f"class_{index:03d}" for index in range(100)], tmp_path / "100.png")
    few_labels, few_predicted = _predictions(5, 200)
    figures.confusion_matrix(few_labels, few_predicted, list("abcde"), tmp_path / "5.png")

    many, few = shown
    with PIL.Image.open(tmp_path / "100.png") as image:
        assert image.size == (2200, 2200), "0.2 inch a class (at 0.5 inch, as for few classes: 5,200 px)"
    assert many.text_ is None, "no counts in cells too small for them"
    assert np.allclose(many.confusion_matrix.sum(axis=1), 1.0), "each row: the shares of its true class"
    assert few.text_.shape == (5, 5) and few.confusion_matrix.sum() == 200, "few classes: a count in every cell"
