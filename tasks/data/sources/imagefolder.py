"""imagefolder: `dataset.source`, a folder, an archive or the URL of one, with one sub-folder per class,
or with train/ [validation/ or val/] [test/] folders that each hold the class folders.

A folder is only read: its files are hard-linked into the raw folder (copied where the raw folder is on
another file system), never moved, changed or deleted. An archive is verified (`dataset.sha256`) and
unpacked; one from a URL is kept in <paths.downloads>/ so that a rerun downloads nothing.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tarfile
import zipfile

from tasks.common import config, contracts, errors, files
from tasks.data import fetch, listing

_SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
# Added by macOS's archiver beside the real content: resource forks, not images of any class.
_ARCHIVER_NOISE = {"__MACOSX"}


def check(dataset: config.DatasetParams) -> None:
    if dataset.source is None:
        raise errors.BadInput(
            "name 'imagefolder' needs dataset.source: a folder with one sub-folder per class, "
            "a .zip/.tar/.tar.gz/.tgz archive of one, or an http(s):// URL of such an archive"
        )


def write(dataset: config.DatasetParams, staging: pathlib.Path, downloads_dir: pathlib.Path) -> contracts.Layout:
    return write_from(dataset.source, dataset.sha256, staging, downloads_dir)


def write_from(source: str, sha256: str | None, staging: pathlib.Path, downloads_dir: pathlib.Path) -> contracts.Layout:
    """The images of `source` (a folder, an archive, a URL) into `staging`."""
    if not fetch.is_url(source) and pathlib.Path(source).is_dir():
        if sha256 is not None:
            raise errors.BadInput(
                f"dataset.sha256 checks an archive, but dataset.source {source!r} is a folder; "
                "set dataset.sha256 to null"
            )
        return _link_folder(pathlib.Path(source), staging)
    path = archive(source, sha256, downloads_dir)
    unpacked = staging / ".unpacked"
    fetch.extract(path, unpacked)
    splits = _adopt(_content_root(unpacked), staging)
    if unpacked.exists():
        shutil.rmtree(unpacked)  # only emptied wrapper folders and archiver noise are left there
    return contracts.Layout(source=source, archive_sha256=files.sha256_of(path), splits=splits)


def changed(dataset: config.DatasetParams, raw_dir: pathlib.Path) -> bool:
    """A local folder is compared by fingerprint; a URL without dataset.sha256 may have changed at any time,
    so download runs again (cheaply: the cached archive is revalidated, not fetched again)."""
    if dataset.sha256 is not None or not dataset.source:
        return False  # a pinned digest and the built-in archives cannot change unseen
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


def archive(source: str, sha256: str | None, downloads_dir: pathlib.Path) -> pathlib.Path:
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


def folder_fingerprint(folder: pathlib.Path) -> str:
    """A digest of every file's path, size and modification time under `folder`: cheap for 50,000 photos,
    and it changes when one is added, removed or replaced. Walked a folder at a time, in sorted order
    (listing.walk): no list of every file (at 100,000 photos that list was most of download's memory)."""
    digest = hashlib.sha256()
    for source, _, identity in listing.walk(folder):
        if identity is not None:  # a vanished file or a broken link is no file of the data set
            digest.update(f"{source}\t{identity[0]}\t{identity[1]}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


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


def _link_folder(source: pathlib.Path, staging: pathlib.Path) -> contracts.Layout:
    source = source.resolve()
    root = _content_root(source)
    splits = _split_folders(root)
    for entry in sorted(root.iterdir()):
        if entry.name in _ARCHIVER_NOISE:
            continue
        destination = staging / splits.get(entry.name, entry.name)
        if entry.is_dir():
            shutil.copytree(entry, destination, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, destination)
    return contracts.Layout(
        source=str(source), splits=tuple(sorted(splits.values())), fingerprint=folder_fingerprint(source)
    )


def _link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    # A hard link costs no time or space for a 50,000-photo folder. It shares the file's data with the
    # source, which is safe because this pipeline only ever replaces or deletes files in the raw folder,
    # never writes into them, and DVC does not track the folder (see README: Your own images).
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(source, destination)
