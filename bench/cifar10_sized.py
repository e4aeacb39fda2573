"""The CIFAR-10-sized case of bench/scale.py: 60,000 32x32 images in the official binary archive's layout,
served on 127.0.0.1 to the `cifar10` source, as a team with a mirror of the archive runs it.

The archive is cifar-10-binary.tar.gz's layout: cifar-10-batches-bin/data_batch_1.bin .. data_batch_5.bin
(10,000 records each) and test_batch.bin (10,000), each record a label byte and 3,072 pixel bytes (red,
green and blue planes of 32x32), plus batches.meta.txt with the ten class names. The pixels are
generated (a per-class colour under a random gradient, plus noise), not CIFAR-10's own.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import pathlib
import tarfile
import threading
from collections.abc import Iterator

import numpy as np

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORDS_PER_BATCH = 10_000
BATCHES = [f"data_batch_{number}.bin" for number in range(1, 6)] + ["test_batch.bin"]
SETTINGS = {
    "dataset.name": "cifar10",
    "dataset.image_size": None,  # kept at 32x32
    "train.model": "keras_cnn",
    "train.image_size": [32, 32],
    "train.epochs": 1,
    "train.batch_size": 64,
    "train.cache_mb": 64,  # below the decoded training split (45,000 x 3 KB): it streams
    "register.min_precision": 0.0,
}


def make_archive(folder: pathlib.Path, seed: int = 0, records_per_batch: int = RECORDS_PER_BATCH) -> pathlib.Path:
    """cifar-10-binary.tar.gz in `folder` (kept when there: the same seed makes the same archive)."""
    path = folder / "cifar-10-binary.tar.gz"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    random = np.random.default_rng(seed)
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz", compresslevel=1) as archive:
        for name in BATCHES:
            _add(archive, f"cifar-10-batches-bin/{name}", _batch(random, records_per_batch))
        _add(archive, "cifar-10-batches-bin/batches.meta.txt", ("\n".join(CLASS_NAMES) + "\n\n").encode())
    partial.rename(path)
    return path


def _batch(random: np.random.Generator, records: int) -> bytes:
    labels = random.integers(0, len(CLASS_NAMES), records).astype(np.uint8)
    colours = np.array([[(label * 37) % 256, (label * 91) % 256, (label * 151) % 256] for label in range(10)])
    rows, columns = np.mgrid[0:32, 0:32] / 31.0
    slopes = random.random((records, 2, 1, 1))
    shade = 0.4 + 0.6 * (slopes[:, 0] * rows + slopes[:, 1] * columns) / 2  # (records, 32, 32)
    planes = colours[labels][:, :, None, None] * shade[:, None] + random.normal(0, 10, (records, 3, 32, 32))
    pixels = np.clip(planes, 0, 255).astype(np.uint8).reshape(records, 3 * 32 * 32)
    return np.concatenate([labels[:, None], pixels], axis=1).tobytes()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    archive.addfile(member, io.BytesIO(data))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def serving(folder: pathlib.Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 for the files of `folder`, stopped on leaving: its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
