"""Writing outputs so that a crash never leaves one that looks complete.

Every file or folder is written under a temporary name beside its destination and renamed into place
only when whole: os.replace is atomic on one file system. The temporary name holds the writer's
process id; a process killed mid-write (SIGKILL, power cut) cannot clean up after itself, so the next
write to the same destination removes what dead writers left there.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, TextIO

from tasks.common import errors


def make_folder(path: pathlib.Path) -> None:
    """`mkdir -p path`, naming the file that stands where one of its folders should be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((folder for folder in (path, *path.parents) if folder.exists() and not folder.is_dir()), path)
        raise errors.BadInput(
            f"{blocking} is a file where a folder is expected (to hold {path}); move the file away, "
            "or point the path's setting in params.yaml (paths.*) elsewhere"
        ) from None


def write_bytes(path: pathlib.Path, data: bytes) -> None:
    make_folder(path.parent)
    remove_abandoned(path)
    descriptor, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes files private; outputs are shared like any other
        os.replace(temporary, path)
    except BaseException as error:
        pathlib.Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = temporary  # a failed write (a full disk) does not say which file
        raise


def link_or_copy(source: pathlib.Path, destination: pathlib.Path) -> None:
    """`destination` as another name of `source`'s file (a hard link: no bytes written, and DVC, whose cache it may
    share, sees a file it knows); a copy where the file system makes no links."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def append_range(source: BinaryIO, target: BinaryIO, offset: int, count: int) -> None:
    """Appends `count` bytes of the open file `source`, from `offset`, to the open file `target`: by
    os.copy_file_range (Linux), which moves them between the files' pages in the kernel (or shares the blocks, on
    file systems that can) so that no copy passes through this process; through this process where the call is
    missing or refused. Writing a nightly conversion's ~100 changed shards took 0.11-0.13 s the first way,
    0.14-0.25 s reading and writing each block."""
    target.flush()  # what is buffered goes first: the bytes follow it in the file
    copied = 0
    with contextlib.suppress(AttributeError, OSError):
        while copied < count:
            done = os.copy_file_range(source.fileno(), target.fileno(), count - copied, offset + copied)
            if not done:
                break
            copied += done
    if copied < count:
        source.seek(offset + copied)
        target.write(source.read(count - copied))


def write_csv_rows(stream: TextIO, rows: Sequence[Sequence[Any]]) -> None:
    """The rows as csv.writer writes them with lines ending in a line feed, except that a row holding a carriage
    return (a file may be named so) has every field quoted: csv.writer leaves that character bare then, and
    csv.reader would end the row there."""
    plain = csv.writer(stream, lineterminator="\n")
    if not any("\r" in field for row in rows for field in row if isinstance(field, str)):
        plain.writerows(rows)
        return
    quoted = csv.writer(stream, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        (quoted if any("\r" in field for field in row if isinstance(field, str)) else plain).writerow(row)


def write_json(path: pathlib.Path, value: Any) -> None:
    write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: pathlib.Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise errors.MissingInput(f"{path} is missing: {what}") from None
    except json.JSONDecodeError as error:
        raise errors.BadInput(f"{path} is not valid JSON ({error}): {what}") from None


@contextlib.contextmanager
def staged_directory(destination: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields an empty folder beside `destination` that replaces it once the block succeeds."""
    make_folder(destination.parent)
    remove_abandoned(destination)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix=_temporary_prefix(destination), suffix=".partial", dir=destination.parent)
    )
    try:
        yield staging
        os.chmod(staging, 0o755)
        if destination.exists():
            # Only ever a folder this pipeline produced (an output), never a user's source.
            shutil.rmtree(destination)
        os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


@contextlib.contextmanager
def staged_file(destination: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a path named like `destination` in a temporary folder beside it, for writers that take a
    path and want its suffix (numpy.savez, Keras' save_weights); it replaces `destination` once the
    block succeeds."""
    make_folder(destination.parent)
    remove_abandoned(destination)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix=_temporary_prefix(destination), suffix=".partial", dir=destination.parent)
    )
    try:
        yield staging / destination.name
        with (staging / destination.name).open("rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(staging / destination.name, 0o644)
        os.replace(staging / destination.name, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _temporary_prefix(destination: pathlib.Path) -> str:
    return f".{destination.name}.{os.getpid()}-"


# A temporary name (see remove_abandoned): .<name>.<process id>-<mkstemp's random letters>.partial.
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?:\d+-)?[a-z0-9_]+\.partial")


def destination_of(path: pathlib.Path) -> pathlib.Path:
    """`path` with each temporary name in it (staged_directory's, write_bytes') replaced by the name of the
    output it becomes: what a message shows a person."""
    parts = [(match["name"] if (match := _TEMPORARY_NAME.fullmatch(part)) else part) for part in path.parts]
    return pathlib.Path(*parts) if parts else path


def remove_abandoned(destination: pathlib.Path) -> list[pathlib.Path]:
    """Deletes the temporary files and folders of `destination` whose writer is no longer running."""
    # .<name>.<process id>-<mkstemp's random letters>.partial; without the id: written before ids were kept.
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.(?:(\d+)-)?[a-z0-9_]+\.partial")
    removed = []
    for leftover in destination.parent.iterdir() if destination.parent.is_dir() else []:
        match = pattern.fullmatch(leftover.name)
        if match is None or match.group(1) and _running(int(match.group(1))):
            continue  # not ours, or being written right now by another process
        shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _running(process_id: int) -> bool:
    # Process ids are per machine: a writer on another machine sharing this folder would look dead,
    # and two runs at once in one repository are not allowed anyway.
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    # A killed process stays in the table as a zombie until something reaps it (in a container, that can
    # take a while): it answers the signal but writes nothing any more.
    stat = pathlib.Path(f"/proc/{process_id}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # the state follows "(command name)"
    except (OSError, IndexError):
        return True  # no /proc (macOS): alive, as the signal said


def sha256_of(path: pathlib.Path) -> str:
    return _hexdigest(path, hashlib.sha256())


def md5_of(path: pathlib.Path) -> str:
    """The name DVC gives a file's content in its cache."""
    return _hexdigest(path, hashlib.md5())


def _hexdigest(path: pathlib.Path, digest) -> str:
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
