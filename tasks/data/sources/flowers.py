"""flowers: TensorFlow's flower_photos.tgz, five class folders. `dataset.source` may name a mirror or a
local copy of the archive."""

from __future__ import annotations

import pathlib

from tasks.common import config, contracts
from tasks.data.sources import imagefolder

URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# As published by TensorFlow Datasets (url_checksums/tf_flowers.txt): 228,813,984 bytes.
SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"


def check(dataset: config.DatasetParams) -> None:
    """Any source (a mirror or a local copy of the archive) or none (the official address)."""


def write(dataset: config.DatasetParams, staging: pathlib.Path, downloads_dir: pathlib.Path) -> contracts.Layout:
    return imagefolder.write_from(dataset.source or URL, dataset.sha256 or SHA256, staging, downloads_dir)


def changed(dataset: config.DatasetParams, raw_dir: pathlib.Path) -> bool:
    return imagefolder.changed(dataset, raw_dir)
