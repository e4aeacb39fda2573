"""cifar10: the official binary archive (fixed-length records, never unpickled); its train/test split is
kept as train/ and test/ folders. `dataset.source` may name a mirror or a local copy of the archive."""

from __future__ import annotations

import pathlib
import tarfile

from tasks.common import config, contracts, errors, files
from tasks.data.sources import imagefolder

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
# As published by TensorFlow Datasets (url_checksums/cifar10.txt): 170,052,171 bytes.
SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"

_SIDE = 32
_RECORD = 1 + 3 * _SIDE * _SIDE  # label byte + channel-planar RGB
_BATCHES = {"train": [f"data_batch_{index}.bin" for index in range(1, 6)], "test": ["test_batch.bin"]}


def check(dataset: config.DatasetParams) -> None:
    """Any source (a mirror or a local copy of the archive) or none (the official address)."""


def write(dataset: config.DatasetParams, staging: pathlib.Path, downloads_dir: pathlib.Path) -> contracts.Layout:
    archive = imagefolder.archive(dataset.source or URL, dataset.sha256 or SHA256, downloads_dir)
    _write_images(archive, staging)
    return contracts.Layout(
        source=dataset.source or URL, archive_sha256=files.sha256_of(archive), splits=("train", "test")
    )


def changed(dataset: config.DatasetParams, raw_dir: pathlib.Path) -> bool:
    return imagefolder.changed(dataset, raw_dir)


def _write_images(archive: pathlib.Path, staging: pathlib.Path) -> None:
    """<split>/<class>/<batch>-<index>.png from the binary batches, read straight out of the archive."""
    import numpy as np
    import PIL.Image

    wanted = {name for names in _BATCHES.values() for name in names} | {"batches.meta.txt"}
    contents: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for member in tar:  # in archive order: a .tar.gz is read once, front to back
            name = pathlib.PurePosixPath(member.name).name
            if member.isfile() and name in wanted:
                contents[name] = tar.extractfile(member).read()
    missing = sorted(wanted - set(contents))
    if missing:
        raise errors.BadInput(f"{archive} is not the CIFAR-10 binary archive: it lacks {', '.join(missing)}")
    class_names = contents.pop("batches.meta.txt").decode().split()
    for split, batches in _BATCHES.items():
        for class_name in class_names:
            (staging / split / class_name).mkdir(parents=True)
        for batch in batches:
            data = contents.pop(batch)
            if len(data) % _RECORD:
                raise errors.BadInput(
                    f"{archive}: {batch} holds {len(data)} bytes, not a whole number of {_RECORD}-byte records"
                )
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
            if rows[:, 0].max(initial=0) >= len(class_names):
                raise errors.BadInput(
                    f"{archive}: {batch} has label {rows[:, 0].max()}, "
                    f"but batches.meta.txt names {len(class_names)} classes"
                )
            images = rows[:, 1:].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)  # planes -> pixels
            stem = batch.removesuffix(".bin")
            for index, (label, image) in enumerate(zip(rows[:, 0], images, strict=True)):
                PIL.Image.fromarray(image).save(
                    staging / split / class_names[label] / f"{stem}-{index:05d}.png", format="PNG"
                )
