"""The raw folder's listing: each file's path, size and sha256, in one CSV beside the folder.

DVC tracks this listing as download's output and convert's input instead of the raw folder itself. A
folder output makes DVC stat every file on every `dvc repro` and hash every file after download: at
100,000 photos a no-op repro took 5.7 s and download's bookkeeping 28 s, most of the stage. The listing
changes exactly when a file is added, removed, renamed or changed, so DVC reruns convert in the same
cases; its bytes are the same in every checkout of the same images (no times, no inodes).

Digests are kept in a record by size, modification time and inode (as git and DVC keep theirs), shared
with convert: a file hashed here is not read again there, and a rerun reads only the files that changed.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import os
import pathlib
import stat

from tasks.common import files

SUFFIX = ".files.csv"
HEADER = ("path", "size", "sha256")

Identity = tuple[int, int, int]  # size, modification time (ns), inode


def path_for(raw_dir: pathlib.Path) -> pathlib.Path:
    """The listing of `raw_dir`: data/raw/digits -> data/raw/digits.files.csv."""
    return raw_dir.with_name(raw_dir.name + SUFFIX)


def hash_all(
    sources: list[str], paths: list[str], identities: list[Identity | None], known: dict[str, tuple[Identity, str]]
) -> list[str | None]:
    """The sha256 of every file (None: unreadable). A file whose size, time and inode are those `known`
    recorded for its source keeps its digest; the others are read on threads (hashlib and reads release
    the GIL), in batches: one task per file would cost more than hashing a small file."""
    digests: list[str | None] = [
        known[source][1] if identity and known.get(source, (None,))[0] == identity else None
        for source, identity in zip(sources, identities, strict=True)
    ]
    todo = [index for index, digest in enumerate(digests) if digest is None]
    batches = [todo[start : start + 256] for start in range(0, len(todo), 256)]
    with concurrent.futures.ThreadPoolExecutor(2 * (os.cpu_count() or 1)) as pool:
        batch_paths = [[paths[index] for index in batch] for batch in batches]
        for batch, batch_digests in zip(batches, pool.map(_hash_batch, batch_paths), strict=True):
            for index, digest in zip(batch, batch_digests, strict=True):
                digests[index] = digest
    return digests


def _hash_batch(paths: list[str]) -> list[str | None]:
    return [file_sha256(path) for path in paths]


def file_sha256(path: str) -> str | None:
    """The sha256 of a file's bytes, or None when it cannot be read (prepare then says why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def write(raw_dir: pathlib.Path, digests_file: pathlib.Path) -> int:
    """Lists every file under `raw_dir` (sorted by path) into path_for(raw_dir); returns how many. A file that
    cannot be read (a broken link) is listed without size and digest, as convert sees it (and rejects it)."""
    sources, paths, identities = [], [], []
    for directory, folders, names in os.walk(raw_dir):
        folders.sort()
        for name in sorted(names):
            path = os.path.join(directory, name)
            try:
                status = os.stat(path)
            except OSError:
                status = None
            if status is not None and not stat.S_ISREG(status.st_mode):
                continue  # a socket or a device: no file of the data set
            paths.append(path)
            sources.append(os.path.relpath(path, raw_dir).replace(os.sep, "/"))
            identities.append((status.st_size, status.st_mtime_ns, status.st_ino) if status else None)
    digests = hash_all(sources, paths, identities, read_digests(digests_file))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(
        (source, identity[0] if identity else "", digest or "")
        for source, identity, digest in sorted(zip(sources, identities, digests, strict=True))
    )
    files.write_bytes(path_for(raw_dir), buffer.getvalue().encode("utf-8", "surrogateescape"))
    write_digests(digests_file, list(zip(sources, identities, strict=True)), digests)
    return len(sources)


def read(listing_path: pathlib.Path) -> dict[str, str] | None:
    """source -> sha256 ("" for a file that could not be read) as write listed them; None without a listing."""
    try:
        with listing_path.open(newline="", encoding="utf-8", errors="surrogateescape") as stream:
            rows = list(csv.reader(stream))
    except FileNotFoundError:
        return None
    return {row[0]: row[2] for row in rows[1:] if len(row) == 3}


def read_digests(path: pathlib.Path) -> dict[str, tuple[Identity, str]]:
    """source -> ((size, modification time in ns, inode), sha256), as write_digests kept them; {} without."""
    try:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as stream:
            return {
                row[0]: ((int(row[1]), int(row[2]), int(row[3])), row[4]) for row in csv.reader(stream) if len(row) == 5
            }
    except (OSError, ValueError):  # none yet, or unreadable: every file is hashed again, nothing is lost
        return {}


def write_digests(path: pathlib.Path, identities: list[tuple[str, Identity | None]], digests: list[str | None]) -> None:
    """Each file's (source, (size, time, inode)) with its sha256, for read_digests in the next run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(
        (source, *identity, digest)
        for (source, identity), digest in zip(identities, digests, strict=True)
        if identity and digest
    )
    files.make_folder(path.parent)
    files.write_bytes(path, buffer.getvalue().encode("utf-8", "surrogateescape"))


def remove(raw_dir: pathlib.Path) -> None:
    """Before the raw folder is replaced: a listing of the old one must not outlive it (an interrupted
    download would otherwise leave DVC a listing that no longer describes the folder)."""
    path_for(raw_dir).unlink(missing_ok=True)
