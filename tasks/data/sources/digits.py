"""digits: the 1,797 real 8x8 handwritten digits that scikit-learn ships; no network needed."""

from __future__ import annotations

import io
import pathlib

from tasks.common import config, contracts, errors


def check(dataset: config.DatasetParams) -> None:
    if dataset.source is not None or dataset.sha256 is not None:
        raise errors.BadInput(
            "name 'digits' is bundled with scikit-learn: dataset.source and dataset.sha256 must be null"
        )


def write(dataset: config.DatasetParams, staging: pathlib.Path, downloads_dir: pathlib.Path) -> contracts.Layout:
    import numpy as np
    import PIL.Image
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks); stretch them to 0..255.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    class_names = tuple(str(label) for label in digits.target_names)
    for class_name in class_names:
        (staging / class_name).mkdir()
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        buffer = io.BytesIO()
        PIL.Image.fromarray(image).save(buffer, format="PNG")
        (staging / class_names[label] / f"{index:04d}.png").write_bytes(buffer.getvalue())
    return contracts.Layout(source="scikit-learn load_digits()")
