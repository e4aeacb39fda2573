"""Stage 1, download: puts a data set on disk as an image folder, one sub-folder per class.

    python -m tasks.download        # reads ./params.yaml, writes <paths.raw>/<dataset.name>/

Sources (`dataset.name`):
- digits: the 1,797 real 8x8 handwritten digits that scikit-learn ships: no network needed.
- cifar10: the official binary archive (fixed-length records, never unpickled); its train/test split
  is kept as train/ and test/ folders.
- flowers: TensorFlow's flower_photos.tgz, five class folders.
- imagefolder: `dataset.source`, a folder, an archive or the URL of one, with one sub-folder per
  class, or with train/ [validation/ or val/] [test/] folders that each hold the class folders.

Archives are kept in <paths.downloads>/ and verified before use. The raw folder also gets
layout.json: where the data came from and which split folders it brings, for the convert stage.
A source folder is only read: its files are hard-linked into the raw folder (copied where the raw
folder is on another file system), never moved, changed or deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import sys
import tarfile
import zipfile
from typing import Any

import numpy as np
import PIL.Image
import sklearn.datasets

from tasks.common import config, contracts, errors, files
from tasks.data import fetch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
# As published by TensorFlow Datasets (url_checksums/cifar10.txt): 170,052,171 bytes.
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# As published by TensorFlow Datasets (url_checksums/tf_flowers.txt): 228,813,984 bytes.
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

_CIFAR_SIDE = 32
_CIFAR_RECORD = 1 + 3 * _CIFAR_SIDE * _CIFAR_SIDE  # label byte + channel-planar RGB
_CIFAR_BATCHES = {"train": [f"data_batch_{index}.bin" for index in range(1, 6)], "test": ["test_batch.bin"]}
_SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
# Added by macOS's archiver beside the real content: resource forks, not images of any class.
_ARCHIVER_NOISE = {"__MACOSX"}


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    raw_dir: pathlib.Path
    file_count: int  # files under class folders; convert decides which are images
    class_names: tuple[str, ...]
    splits: tuple[str, ...]  # split folders the source brings; empty: convert splits every class


def arguments(params: config.Params) -> dict[str, Any]:
    """The stage's arguments, chosen from the settings: `python -m`, the flow, benchmarks and tests all call it."""
    return dict(dataset=params.dataset, raw_dir=params.raw_dir, downloads_dir=params.downloads_dir)


def download(dataset: config.DatasetParams, raw_dir: pathlib.Path, downloads_dir: pathlib.Path) -> DownloadResult:
    """Writes the data set named by `dataset.name` to `raw_dir` as [<split>/]<class>/<image>."""
    if dataset.name == "digits":
        return _write_digits(raw_dir)
    if dataset.name == "cifar10":
        archive = _archive(dataset.source or CIFAR10_URL, dataset.sha256 or CIFAR10_SHA256, downloads_dir)
        with files.staged_directory(raw_dir) as staging:
            _write_cifar10(archive, staging)
            _write_layout(staging, dataset.source or CIFAR10_URL, files.sha256_of(archive), ("train", "test"))
        return _result(raw_dir, ("train", "test"))
    if dataset.name == "flowers":
        source, digest = dataset.source or FLOWERS_URL, dataset.sha256 or FLOWERS_SHA256
    else:
        source, digest = dataset.source, dataset.sha256
    if not fetch.is_url(source) and pathlib.Path(source).is_dir():
        if digest is not None:
            raise errors.BadInput(
                f"dataset.sha256 checks an archive, but dataset.source {source!r} is a folder; "
                "set dataset.sha256 to null"
            )
        return _link_folder(pathlib.Path(source), raw_dir)
    archive = _archive(source, digest, downloads_dir)
    with files.staged_directory(raw_dir) as staging:
        unpacked = staging / ".unpacked"
        fetch.extract(archive, unpacked)
        splits = _adopt(_content_root(unpacked), staging)
        if unpacked.exists():
            shutil.rmtree(unpacked)  # only emptied wrapper folders and archiver noise are left there
        _write_layout(staging, source, files.sha256_of(archive), splits)
    return _result(raw_dir, splits)


def _archive(source: str, sha256: str | None, downloads_dir: pathlib.Path) -> pathlib.Path:
    """A verified local archive: downloaded into `downloads_dir` for a URL, checked in place for a path."""
    if fetch.is_url(source):
        return fetch.download(source, downloads_dir / fetch.cached_name(source), sha256)
    path = pathlib.Path(source)
    if not path.exists():
        raise errors.MissingInput(
            f"dataset.source {source!r} does not exist; give an existing folder with one sub-folder per class, "
            "a .zip/.tar/.tar.gz/.tgz archive of one, or an http(s):// URL"
        )
    if not path.is_file():
        raise errors.BadInput(
            f"dataset.source {source!r} is neither a folder nor a file; give a folder, an archive or an http(s):// URL"
        )
    if not (zipfile.is_zipfile(path) or tarfile.is_tarfile(path)):
        raise errors.BadInput(
            f"dataset.source {source!r} is a file but not a .zip/.tar/.tar.gz/.tgz archive; "
            "give such an archive, or the folder that holds one sub-folder per class"
        )
    if sha256 is not None and (actual := files.sha256_of(path)) != sha256:
        raise errors.BadInput(
            f"{path}: sha256 mismatch: expected {sha256} (dataset.sha256 or the built-in digest), got {actual}"
        )
    return path


def _write_digits(raw_dir: pathlib.Path) -> DownloadResult:
    digits = sklearn.datasets.load_digits()
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks); stretch them to 0..255.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    class_names = tuple(str(label) for label in digits.target_names)
    with files.staged_directory(raw_dir) as staging:
        for class_name in class_names:
            (staging / class_name).mkdir()
        for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
            buffer = io.BytesIO()
            PIL.Image.fromarray(image).save(buffer, format="PNG")
            (staging / class_names[label] / f"{index:04d}.png").write_bytes(buffer.getvalue())
        _write_layout(staging, "scikit-learn load_digits()", None, ())
    return DownloadResult(raw_dir=raw_dir, file_count=len(pixels), class_names=class_names, splits=())


def _write_cifar10(archive: pathlib.Path, staging: pathlib.Path) -> None:
    """<split>/<class>/<batch>-<index>.png from the binary batches, read straight out of the archive."""
    wanted = {name for names in _CIFAR_BATCHES.values() for name in names} | {"batches.meta.txt"}
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
    for split, batches in _CIFAR_BATCHES.items():
        for class_name in class_names:
            (staging / split / class_name).mkdir(parents=True)
        for batch in batches:
            data = contents.pop(batch)
            if len(data) % _CIFAR_RECORD:
                raise errors.BadInput(
                    f"{archive}: {batch} holds {len(data)} bytes, not a whole number of {_CIFAR_RECORD}-byte records"
                )
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
            if rows[:, 0].max(initial=0) >= len(class_names):
                raise errors.BadInput(
                    f"{archive}: {batch} has label {rows[:, 0].max()}, "
                    f"but batches.meta.txt names {len(class_names)} classes"
                )
            images = rows[:, 1:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)  # planes -> pixels
            stem = batch.removesuffix(".bin")
            for index, (label, image) in enumerate(zip(rows[:, 0], images, strict=True)):
                PIL.Image.fromarray(image).save(
                    staging / split / class_names[label] / f"{stem}-{index:05d}.png", format="PNG"
                )


def _content_root(folder: pathlib.Path) -> pathlib.Path:
    """The folder that holds the classes (or split folders), below any single wrapping folder."""
    while not _split_folders(folder):
        entries = [entry for entry in folder.iterdir() if entry.name not in _ARCHIVER_NOISE]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        folder = entries[0]
    return folder


def _split_folders(folder: pathlib.Path) -> dict[str, str]:
    """{folder name: split} when `folder` holds only train/, validation/ (or val/) and test/, with train/."""
    names = [entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name not in _ARCHIVER_NOISE]
    splits = {name: _SPLIT_FOLDERS.get(name.lower()) for name in names}
    if not names or None in splits.values() or "train" not in splits.values():
        return {}
    if len(set(splits.values())) < len(splits):
        raise errors.BadInput(
            f"{folder} has two folders for the same split: {sorted(names)}; keep one of validation/ and val/"
        )
    return splits


def _adopt(root: pathlib.Path, staging: pathlib.Path) -> tuple[str, ...]:
    """Moves the unpacked content of `root` up into `staging`, split folders under their canonical names."""
    splits = _split_folders(root)
    holding = staging / ".unpacked-root"
    os.replace(root, holding)  # out of the way first: a wrapper may share a name with what it wraps
    for entry in sorted(holding.iterdir()):
        if entry.name not in _ARCHIVER_NOISE:
            os.replace(entry, staging / splits.get(entry.name, entry.name))
    shutil.rmtree(holding)  # empty, or archiver noise
    return tuple(sorted(splits.values()))


def _link_folder(source: pathlib.Path, raw_dir: pathlib.Path) -> DownloadResult:
    source, target = source.resolve(), raw_dir.resolve()
    if target == source or target.is_relative_to(source) or source.is_relative_to(target):
        raise errors.BadInput(
            f"dataset.source {source} and the raw folder {target} overlap; "
            f"point dataset.source at a folder outside {target.parent}"
        )
    root = _content_root(source)
    splits = _split_folders(root)
    with files.staged_directory(raw_dir) as staging:
        for entry in sorted(root.iterdir()):
            if entry.name in _ARCHIVER_NOISE:
                continue
            destination = staging / splits.get(entry.name, entry.name)
            if entry.is_dir():
                shutil.copytree(entry, destination, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, destination)
        _write_layout(
            staging, str(source), None, tuple(sorted(splits.values())), fingerprint=folder_fingerprint(source)
        )
    return _result(raw_dir, tuple(sorted(splits.values())))


def _link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    # A hard link costs no time or space for a 50,000-photo folder. It shares the file's data with the
    # source, which is safe because this pipeline and DVC (with its default cache types) only ever
    # replace or delete files in the raw folder, never write into them (see README: Your own images).
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(source, destination)


def _write_layout(
    staging: pathlib.Path,
    source: str,
    archive_sha256: str | None,
    splits: tuple[str, ...],
    fingerprint: str | None = None,
) -> None:
    contracts.Layout(source=source, archive_sha256=archive_sha256, splits=splits, fingerprint=fingerprint).write(
        staging
    )


def folder_fingerprint(folder: pathlib.Path) -> str:
    """A digest of every file's path, size and modification time under `folder`: cheap for 50,000 photos,
    and it changes when one is added, removed or replaced."""
    digest = hashlib.sha256()
    for path in sorted(item for item in folder.rglob("*") if item.is_file()):
        status = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_changed(dataset: config.DatasetParams, raw_dir: pathlib.Path, downloads_dir: pathlib.Path) -> bool:
    """Whether the source may hold other data than `raw_dir` was made from, though no setting changed.

    DVC sees settings, code and the raw folder itself, not a user's folder or a URL's content. A local
    folder is compared by fingerprint; a URL without dataset.sha256 may have changed at any time, so
    download runs again (cheaply: the cached archive is revalidated, not fetched again).
    """
    if dataset.name == "digits" or dataset.sha256 is not None or not dataset.source:
        return False  # digits, a pinned digest and the built-in archives cannot change unseen
    if fetch.is_url(dataset.source):
        return True
    source = pathlib.Path(dataset.source)
    if not source.is_dir():
        return False  # a local archive: its path is a setting (replacing the file in place goes unseen)
    try:
        layout = contracts.Layout.read(raw_dir)
    except (OSError, ValueError):
        return True  # unreadable: download again rather than trust it
    return layout is None or layout.fingerprint != folder_fingerprint(source.resolve())


def _result(raw_dir: pathlib.Path, splits: tuple[str, ...]) -> DownloadResult:
    class_folders = [raw_dir / split for split in splits] if splits else [raw_dir]
    class_names = sorted({entry.name for folder in class_folders for entry in folder.iterdir() if entry.is_dir()})
    file_count = sum(
        1
        for folder in class_folders
        for class_dir in folder.iterdir()
        if class_dir.is_dir()
        for path in class_dir.rglob("*")
        if path.is_file()
    )
    return DownloadResult(raw_dir=raw_dir, file_count=file_count, class_names=tuple(class_names), splits=splits)


def main(argv: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(argv)
    result = download(**arguments(config.load_params()))
    splits = f", split folders {', '.join(result.splits)}" if result.splits else ""
    print(f"download: {result.file_count} files in {len(result.class_names)} classes{splits}, in {result.raw_dir}")


if __name__ == "__main__":
    sys.exit(errors.run_main(main, exclusive=True))
