"""The raw folder's listing: each file's path, size and sha256, in one CSV beside the folder.

DVC tracks this listing as download's output and convert's input instead of the raw folder itself. A
folder output makes DVC stat every file on every `dvc repro` and hash every file after download: at
100,000 photos a no-op repro took 5.7 s and download's bookkeeping 28 s, most of the stage. The listing
changes exactly when a file is added, removed, renamed or changed, so DVC reruns convert in the same
cases; its bytes are the same in every checkout of the same images (no times, no inodes).

Digests are kept in a record by size, modification time and inode (as git and DVC keep theirs), shared
with convert: a file hashed here is not read again there, and a rerun reads only the files that changed.
The record is an SQLite file, so that download looks up and writes a chunk of files at a time: its
memory does not grow with the number of files (a dict of 100,000 records and the lists beside it took
about 1 KB a file, 139 MB at 100,000).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import itertools
import operator
import os
import pathlib
import sqlite3
import stat
import struct
from collections.abc import Callable, Iterable, Iterator

from tasks.common import files

SUFFIX = ".files.csv"
HEADER = ("path", "size", "sha256")

Identity = tuple[int, int, int]  # size, modification time (ns), inode
# An identity as 24 bytes, for a caller that holds one per file: a bytes object of 64 bytes in memory, where the
# tuple and its three integers take about 170 (17 MB at 100,000 files).
_PACKED_IDENTITY = struct.Struct("<QqQ")


def path_for(raw_dir: pathlib.Path) -> pathlib.Path:
    """The listing of `raw_dir`: data/raw/digits -> data/raw/digits.files.csv."""
    return raw_dir.with_name(raw_dir.name + SUFFIX)


def hash_all(known: list[str | None], path_of: Callable[[int], str]) -> list[str | None]:
    """The sha256 of every file (None: unreadable): `known` holds those the record knows (recorded), None for the
    others, which are read (the file at `path_of(index)`) on threads (hashlib and reads release the GIL), in
    batches: one task per file would cost more than hashing a small file. Only their paths are made."""
    digests = list(known)
    todo = [index for index, digest in enumerate(digests) if digest is None]
    batches = [todo[start : start + 256] for start in range(0, len(todo), 256)]
    with concurrent.futures.ThreadPoolExecutor(2 * (os.cpu_count() or 1)) as pool:
        batch_paths = [[path_of(index) for index in batch] for batch in batches]
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


CHUNK = 900  # files listed, looked up and hashed at a time (under SQLite's oldest limit of 999 parameters)


def write(raw_dir: pathlib.Path, digests_file: pathlib.Path) -> int:
    """Lists every file under `raw_dir` into path_for(raw_dir), in a fixed order (folders and names sorted,
    as os.walk visits them); returns how many. A file that cannot be read (a broken link) is listed without
    size and digest, as convert sees it (and rejects it)."""
    count = 0
    with (
        files.staged_file(path_for(raw_dir)) as staged,
        staged.open("w", newline="", encoding="utf-8", errors="surrogateescape") as stream,
        files.staged_file(digests_file) as new_record,
        contextlib.closing(_connect(digests_file if digests_file.exists() else None)) as old,
        contextlib.closing(_connect(new_record)) as new,
    ):
        files.write_csv_rows(stream, [HEADER])
        walked = walk(raw_dir)
        while chunk := list(itertools.islice(walked, CHUNK)):
            sources, paths, identities = (list(column) for column in zip(*chunk, strict=True))
            digests = hash_all(_recorded(old, sources, identities), paths.__getitem__)
            files.write_csv_rows(
                stream,
                [
                    (source, identity[0] if identity else "", digest or "")
                    for source, identity, digest in zip(sources, identities, digests, strict=True)
                ],
            )
            _insert(new, sources, identities, digests)
            count += len(chunk)
        new.commit()
    return count


def walk(folder: pathlib.Path, root: pathlib.Path | None = None) -> Iterator[tuple[str, str, Identity | None]]:
    """(source, path, identity) of every file under `folder`: its path relative to `root` (default `folder`)
    with "/" separators, its path, and its size, time and inode (None when it cannot be read: vanished, a
    broken link). Sockets and devices are left out. A folder's files in sorted order, then its sub-folders
    (links to folders are not followed), one folder's names in memory at a time. By hand on os.scandir rather
    than os.walk: each entry's path and stat come from it, without joining names again; the relative path is
    made once per folder (os.path.relpath per file costs a second on 50,000 files)."""
    inside = os.path.relpath(folder, root or folder).replace(os.sep, "/")
    yield from _walk(str(folder), "" if inside == "." else inside + "/")


def _walk(directory: str, prefix: str) -> Iterator[tuple[str, str, Identity | None]]:
    try:
        with os.scandir(directory) as scanned:
            entries = sorted(scanned, key=operator.attrgetter("name"))
    except OSError:
        return  # vanished or unreadable, as os.walk skips it
    folders = []
    for entry in entries:
        try:
            if entry.is_dir():
                if not entry.is_symlink():
                    folders.append(entry)
                continue
            status = entry.stat()
        except OSError:
            status = None
        if status is not None and not stat.S_ISREG(status.st_mode):
            continue  # a socket or a device: no file of the data set
        yield prefix + entry.name, entry.path, _identity(status) if status else None
    for entry in folders:
        yield from _walk(entry.path, prefix + entry.name + "/")


def _identity(status: os.stat_result) -> Identity:
    return status.st_size, status.st_mtime_ns, status.st_ino


def packed(identity: Identity | None) -> bytes | None:
    return None if identity is None else _PACKED_IDENTITY.pack(*identity)


def unpacked(identity: bytes | None) -> Identity | None:
    return None if identity is None else _PACKED_IDENTITY.unpack(identity)


def size_of(identity: bytes) -> int:
    """The file's size, from its packed identity."""
    return int.from_bytes(identity[:8], "little")


def read(listing_path: pathlib.Path) -> dict[str, str] | None:
    """source -> sha256 ("" for a file that could not be read) as write listed them; None without a listing."""
    try:
        with listing_path.open(newline="", encoding="utf-8", errors="surrogateescape") as stream:
            rows = csv.reader(stream)
            next(rows, None)  # the header
            return {row[0]: row[2] for row in rows if len(row) == 3}  # row by row: no list of every row first
    except FileNotFoundError:
        return None


def _connect(path: pathlib.Path | None) -> sqlite3.Connection:
    """The digest record at `path` (created when new): the source files' digests, and the shards convert wrote
    or checked; an empty one in memory for None or a damaged file (its files are then hashed again: nothing is
    lost)."""
    connection = sqlite3.connect(":memory:" if path is None else path)
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS digests (source BLOB PRIMARY KEY, size INTEGER, modified INTEGER, "
            "inode INTEGER, sha256 TEXT)"
        )
        # The shards by path, with their size, time and inode: a nightly run trusts an unchanged shard it does not
        # need to read as it trusts an unchanged source file, instead of reading and hashing it.
        connection.execute(
            "CREATE TABLE IF NOT EXISTS shards (path TEXT PRIMARY KEY, size INTEGER, modified INTEGER, inode INTEGER, "
            "sha256 TEXT)"
        )
    except sqlite3.DatabaseError:
        connection.close()
        return _connect(None)
    return connection


def _recorded(
    connection: sqlite3.Connection, sources: list[str], identities: list[Identity | None]
) -> list[str | None]:
    """The digest the record holds for each file whose size, time and inode it recorded; None for the others."""
    try:
        rows = connection.execute(
            f"SELECT * FROM digests WHERE source IN ({','.join('?' * len(sources))})",
            [_encoded(source) for source in sources],
        ).fetchall()
    except sqlite3.DatabaseError:  # damaged, or no record: those files are hashed again, nothing is lost
        return [None] * len(sources)
    return _matching(rows, sources, identities)


def _matching(rows: list[tuple], sources: list[str], identities: list[Identity | None]) -> list[str | None]:
    """The digest of each source that `rows` (of the record) holds with the same size, time and inode; else None."""
    known = {
        source.decode("utf-8", "surrogateescape"): ((size, modified, inode), sha256)
        for source, size, modified, inode, sha256 in rows
    }
    return [
        known[source][1] if identity and known.get(source, (None,))[0] == identity else None
        for source, identity in zip(sources, identities, strict=True)
    ]


def recorded_under(
    path: pathlib.Path, folder: str, sources: list[str], identities: list[Identity | None]
) -> list[str | None]:
    """The digests the record at `path` holds of these files, which all lie under `folder` (their sources start with
    it, then "/"): None where it has none, or another size, time or inode. The record's rows of that folder are read
    in one range of its sorted keys, not looked up name by name (half the time: a nightly run reads every class
    folder's); a folder's rows at a time, not the whole record as a dict (about 0.5 KB a file)."""
    if not path.exists():
        return [None] * len(sources)
    first = _encoded(folder + "/")
    with contextlib.closing(_connect(path)) as connection:
        try:
            rows = connection.execute(
                "SELECT * FROM digests WHERE source >= ? AND source < ?", (first, first[:-1] + b"0")
            ).fetchall()  # "0" follows "/": every key that starts with the folder's name and "/", and no other
        except sqlite3.DatabaseError:  # damaged: those files are hashed again, nothing is lost
            return [None] * len(sources)
    return _matching(rows, sources, identities)


def _insert(
    connection: sqlite3.Connection,
    sources: Iterable[str],
    identities: Iterable[Identity | None],
    digests: Iterable[str | None],
) -> None:
    connection.executemany(
        "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
        (
            (_encoded(source), *identity, digest)
            for source, identity, digest in zip(sources, identities, digests, strict=True)
            if identity and digest
        ),
    )


def _encoded(source: str) -> bytes:
    # Names the file system gave as bytes that are not UTF-8 (surrogate escapes) are kept as bytes.
    return source.encode("utf-8", "surrogateescape")


def write_digests(
    path: pathlib.Path,
    sources: Iterable[str],
    identities: Iterable[bytes | None],
    digests: Iterable[str | None],
    known: list[str | None] | None = None,
) -> None:
    """The record of exactly these files' source and (size, time, inode) with their sha256, for the next run.
    `identities` are packed (as convert holds them): only those of the rows written are unpacked. The rows go
    to SQLite one by one: a list of them cost 25 MB at 100,000 files.

    `known`: each file's digest as the record at `path` held it (recorded; None where it did not). When those
    account for every row of the record, no row is stale: only the other files' rows are added to it, in place
    (rewriting the whole record took 0.15-0.2 s of a nightly run at 50,000 files)."""
    if known is not None and _add_digests(path, sources, identities, digests, known):
        return
    with files.staged_file(path) as staged, contextlib.closing(_connect(staged)) as connection:
        _insert(connection, sources, map(unpacked, identities), digests)
        connection.commit()


def _add_digests(
    path: pathlib.Path,
    sources: Iterable[str],
    identities: Iterable[bytes | None],
    digests: Iterable[str | None],
    known: list[str | None],
) -> bool:
    """Adds the rows of the files not `known` to the record at `path` when every row it holds is a known file's
    (True); False, with nothing read from the iterables, otherwise or when the record cannot be read. A failed
    write leaves the record as it was: the new files are hashed again next time."""
    if not path.exists():
        return False
    with contextlib.closing(_connect(path)) as connection:
        try:
            rows = connection.execute("SELECT COUNT(*) FROM digests").fetchone()[0]
        except sqlite3.DatabaseError:
            return False
        if rows == 0 or rows != sum(digest is not None for digest in known):
            return False  # a new or damaged record (read as an empty one), or rows of files gone or changed
        new = [
            (source, identity, digest)
            for source, identity, digest, recorded_digest in zip(sources, identities, digests, known, strict=True)
            if recorded_digest is None
        ]
        with contextlib.suppress(sqlite3.DatabaseError):
            if new:
                new_sources, new_identities, new_digests = zip(*new, strict=True)
                _insert(connection, new_sources, map(unpacked, new_identities), new_digests)
            connection.commit()
    return True


def remove(raw_dir: pathlib.Path) -> None:
    """Before the raw folder is replaced: a listing of the old one must not outlive it (an interrupted
    download would otherwise leave DVC a listing that no longer describes the folder)."""
    path_for(raw_dir).unlink(missing_ok=True)


def trusted_shards(path: pathlib.Path | None, shard_paths: dict[pathlib.Path, str]) -> set[pathlib.Path]:
    """Those of `shard_paths` (path -> its sha256 in the manifest) that the record at `path` holds with that sha256,
    and that still have the size, time and inode recorded with it."""
    if path is None or not path.exists():
        return set()
    with contextlib.closing(_connect(path)) as connection:
        try:
            rows = connection.execute("SELECT * FROM shards").fetchall()
        except sqlite3.DatabaseError:
            return set()
    recorded = {shard: ((size, modified, inode), sha256) for shard, size, modified, inode, sha256 in rows}
    return {
        shard_path
        for shard_path, sha256 in shard_paths.items()
        if recorded.get(str(shard_path)) == (_identity_of(shard_path), sha256)
    }


def record_shards(path: pathlib.Path, shard_paths: dict[pathlib.Path, str]) -> None:
    """Records exactly these shards (path -> sha256 of what convert wrote or checked) with their size, time and
    inode, in the record of digests at `path`."""
    with contextlib.closing(_connect(path)) as connection:
        connection.execute("DELETE FROM shards")
        identities = {shard_path: _identity_of(shard_path) for shard_path in shard_paths}
        connection.executemany(
            "INSERT INTO shards VALUES (?, ?, ?, ?, ?)",
            [
                (str(shard_path), *identities[shard_path], sha256)
                for shard_path, sha256 in shard_paths.items()
                if identities[shard_path]
            ],
        )
        connection.commit()


def _identity_of(path: pathlib.Path) -> Identity | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return _identity(status)
