"""Stage 1, download: puts a data set on disk as an image folder, one sub-folder per class.

    python -m tasks.download        # reads ./params.yaml, writes <paths.raw>/<dataset.name>/

`digits` is the 1,797 real 8x8 handwritten digits that scikit-learn ships: no network needed.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib

import numpy as np
import PIL.Image
import sklearn.datasets

from tasks import config, files


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    raw_dir: pathlib.Path
    image_count: int
    class_names: tuple[str, ...]


def download(dataset: config.DatasetParams, raw_dir: pathlib.Path) -> DownloadResult:
    """Writes the data set named by `dataset.name` to `raw_dir` as <class>/<image>.png."""
    if dataset.name != "digits":  # config allows only the sources implemented here
        raise ValueError(f"dataset.name: no download for {dataset.name!r}")
    return _write_digits(raw_dir)


def _write_digits(raw_dir: pathlib.Path) -> DownloadResult:
    digits = sklearn.datasets.load_digits()
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks); stretch them to 0..255.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    class_names = tuple(str(label) for label in digits.target_names)
    with files.staged_directory(raw_dir) as staging:
        for class_name in class_names:
            (staging / class_name).mkdir()
        for index, (image, label) in enumerate(zip(pixels, digits.target)):
            buffer = io.BytesIO()
            PIL.Image.fromarray(image).save(buffer, format="PNG")
            (staging / class_names[label] / f"{index:04d}.png").write_bytes(buffer.getvalue())
    return DownloadResult(raw_dir=raw_dir, image_count=len(pixels), class_names=class_names)


def main() -> None:
    params = config.load_params()
    result = download(params.dataset, params.raw_dir)
    print(f"download: {result.image_count} images of {len(result.class_names)} classes in {result.raw_dir}")


if __name__ == "__main__":
    main()
