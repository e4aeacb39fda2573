"""Stage 1, download: puts a data set on disk as an image folder, one sub-folder per class.

    python -m tasks.download        # reads ./params.yaml, writes <paths.raw>/<dataset.name>/

The sources (`dataset.name`) are the modules of tasks/data/sources/, one each: digits (the 1,797 real
8x8 handwritten digits that scikit-learn ships: no network needed), cifar10 (the official binary
archive, its train/test split kept as train/ and test/ folders), flowers (TensorFlow's
flower_photos.tgz) and imagefolder (`dataset.source`, a folder, an archive or the URL of one, with one
sub-folder per class, or with train/ [validation/ or val/] [test/] folders that each hold the class
folders).

Archives are kept in <paths.downloads>/ and verified before use. The raw folder also gets
layout.json: where the data came from and which split folders it brings, for the convert stage. Beside
the folder, <dataset.name>.files.csv lists every file with its size and sha256: DVC tracks that listing,
not the folder (tasks/data/listing.py).
A source folder is only read: its files are hard-linked into the raw folder (copied where the raw
folder is on another file system), never moved, changed or deleted.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Any

from tasks.common import config, disk, errors, files
from tasks.data import fetch, listing, sources


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    raw_dir: pathlib.Path
    file_count: int  # files under class folders; convert decides which are images
    class_names: tuple[str, ...]
    splits: tuple[str, ...]  # split folders the source brings; empty: convert splits every class


def arguments(params: config.Params) -> dict[str, Any]:
    """The stage's arguments, chosen from the settings: `python -m`, the flow, benchmarks and tests all call it."""
    return dict(
        dataset=params.dataset,
        raw_dir=params.raw_dir,
        downloads_dir=params.downloads_dir,
        digests_file=params.digests_file,
    )


@disk.writes(raw_dir="paths.raw", downloads_dir="paths.downloads", digests_file="paths.downloads")
def download(
    dataset: config.DatasetParams,
    raw_dir: pathlib.Path,
    downloads_dir: pathlib.Path,
    digests_file: pathlib.Path | None = None,
) -> DownloadResult:
    """Writes the data set named by `dataset.name` to `raw_dir` as [<split>/]<class>/<image>, and layout.json,
    then its listing (tasks/data/listing.py; `digests_file` keeps the files' digests for the next run).

    A copy of a folder that would not fit stops before anything is copied; an archive is checked as it is
    downloaded and before it is unpacked (tasks/data/fetch.py).
    """
    source = sources.load(dataset.name)
    _refuse_overlap(dataset, raw_dir)
    disk.require(*_copy_needed(dataset, raw_dir))
    listing.remove(raw_dir)
    with files.staged_directory(raw_dir) as staging:
        layout = source.write(dataset, staging, downloads_dir)
        layout.write(staging)
    listing.write(raw_dir, digests_file or config.digests_file(downloads_dir, dataset.name))
    return _result(raw_dir, layout.splits)


def source_changed(dataset: config.DatasetParams, raw_dir: pathlib.Path) -> bool:
    """Whether the source may hold other data than `raw_dir` was made from, though no setting changed.

    DVC sees settings, code and the raw folder itself, not a user's folder or a URL's content: each
    source says (its `changed`); one without it changes only with its settings.
    """
    source = sources.load(dataset.name)
    return hasattr(source, "changed") and source.changed(dataset, raw_dir)


def _refuse_overlap(dataset: config.DatasetParams, raw_dir: pathlib.Path) -> None:
    """A source folder inside the raw folder, or the other way round, would be replaced with its own copy."""
    if not dataset.source or fetch.is_url(dataset.source) or not pathlib.Path(dataset.source).is_dir():
        return
    source, target = pathlib.Path(dataset.source).resolve(), raw_dir.resolve()
    if target == source or target.is_relative_to(source) or source.is_relative_to(target):
        raise errors.BadInput(
            f"dataset.source {source} and the raw folder {target} overlap; "
            f"point dataset.source at a folder outside {target.parent}"
        )


def _copy_needed(dataset: config.DatasetParams, raw_dir: pathlib.Path) -> list[disk.Need]:
    """The room a folder given as dataset.source takes in the raw folder: none where both share a disk (its
    files are hard-linked), else the sum of its files' sizes in whole blocks (they are copied)."""
    if not dataset.source or fetch.is_url(dataset.source) or not pathlib.Path(dataset.source).is_dir():
        return []
    source = pathlib.Path(dataset.source)
    if os.stat(source).st_dev == os.stat(disk.existing_parent(raw_dir)).st_dev:
        return []
    copied = disk.stored_bytes(disk.folder_sizes(source), raw_dir)
    return [disk.Need(raw_dir, copied, f"a copy of {source}", "paths.raw")]


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
