"""The convert stage's shards: laying the accepted images out in shards, and writing them.

Each split has a power of two of shards (of about dataset.shard_size_mb), and an image's shard follows from its
place (tasks/data/splits.py). Convert decodes the new images into the spool's files, laid out as the shards are
expected to be (Spool, RecordFiles); once every image's size is known, `layout` fixes each split's shards and
`write_shards` writes them: a previous shard whose images are all kept as they are is that file again (a hard
link), a spool file that holds exactly a shard's records is moved into place, and any other shard is copied
together from the previous shards' records and the spool, in place order, so that the same images always give
byte-identical shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import math
import operator
import os
import pathlib
import shutil
from typing import Any

from tasks.common import contracts, disk, files
from tasks.data import splits, tfrecords


@dataclasses.dataclass(slots=True)  # one per image: slots and not frozen, as convert's per-file record (_File)
class Image:
    """An accepted image: where its whole record, or its encoded bytes, wait to be written into its shard."""

    source: str
    split: str
    place: float  # splits.position: the split's order in its shards, too
    label: int
    offset: int  # of its bytes in the spool file, or of its record in `origin`
    length: int
    size: int = 0  # of the encoded image: what the shards are sized by
    # The file that holds its whole record: a previous shard, or the spool's file of the images decoded now
    # (Spool); None: its encoded bytes are in the spool file.
    origin: pathlib.Path | None = None
    as_is: bool = False  # that record is this file's, under its label: written unchanged
    sha256: str = ""  # of the source file
    difference_hash: str = ""
    encoding: str = ""
    entry: contracts.IndexEntry | None = None  # its row of the previous index, when its record is written unchanged


@dataclasses.dataclass(frozen=True)
class Kept:
    """The previous shards kept whole, unread, where nothing in them changes (reuse.plan): their images get no
    object each here (a nightly run keeps all but a hundred shards of 1,400: 50,000 images)."""

    shards: set[pathlib.Path]
    rows: dict[str, list[contracts.IndexEntry]]  # their rows of the previous index by split, in its order
    places: dict[str, float]  # each of their images' place (splits.position), by path: the index's order


NOTHING_KEPT = Kept(set(), {}, {})


@dataclasses.dataclass(frozen=True)
class Shard:
    """A shard of the new conversion: the images written into it, in place order; or, `kept`, the previous shard
    of its name, whose records stay as they are."""

    name: str
    images: list[Image]
    kept: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class Spool:
    """Where the accepted images wait, in the staging folder, until the shards are written.

    The images decoded now are written as they come back from the workers, as whole records, into files laid out
    as the shards are expected to be (`shard_counts`: convert's estimate): sent to the workers in that order,
    each expected shard's images come back one after another, in place order, and go into the file of its name in
    `folder`. Where the shards' real layout (known once every image's size is) is the one expected, such a file is
    its shard, moved into place: no second write of every image at the end, when the workers would wait (2 GB at
    100,000 photos). Else its records are copied from there. Encoded images taken from other files' records in the
    previous shards wait in `file`."""

    file: pathlib.Path
    folder: pathlib.Path
    shard_counts: dict[str, int]  # each split's expected number of shards
    digests: dict[pathlib.Path, str]  # the sha256 of each file of `folder`, once written: a moved file's is known


class RecordFiles:
    """Appends records, framed, to the spool's files of the expected shards (`by_shard`; else to one file), one file
    open at a time (the records come shard after shard), each hashed as it is written: where it becomes its shard,
    it is not read again."""

    def __init__(self, spool: Spool, by_shard: bool):
        self._spool, self._by_shard = spool, by_shard
        self._shard: tuple[str, int, int] | None = None
        self._path: pathlib.Path | None = None
        self._stream: Any = None
        self._hash: Any = None
        self._end = 0  # the file's size so far: tell() would ask the system each time

    def __enter__(self) -> RecordFiles:
        return self

    def __exit__(self, *exception) -> None:
        self._close()

    def append(self, shard: tuple[str, int, int], record: bytes) -> tuple[pathlib.Path, int]:
        """(The file, the offset in it) of `record`, appended to the file of `shard`."""
        if self._stream is None or (self._by_shard and shard != self._shard):
            self._close()
            self._shard = shard
            self._path = self._spool.folder / (
                f"{tfrecords.shard_name(*shard)}.decoded" if self._by_shard else "images.decoded"
            )
            self._stream, self._hash, self._end = self._path.open("wb"), hashlib.sha256(), 0
        framed = tfrecords.frame(record)
        offset = self._end + tfrecords.FRAME_HEAD
        self._stream.write(framed)
        self._hash.update(framed)
        self._end += len(framed)
        return self._path, offset

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._spool.digests[self._path] = self._hash.hexdigest()
            self._stream = None


def write_shards(
    staging: pathlib.Path,
    spool: Spool,
    laid_out: dict[str, list[Shard]],
    split_entries: dict[str, list[contracts.IndexEntry]],
    class_names: tuple[str, ...],
    earlier: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
    shards_dir: pathlib.Path,
) -> dict[str, contracts.Split]:
    """Every split's shards, from the spool and the previous shards; then the spool goes."""
    previous = {shard.file: shard for shard in earlier[0].shards()} if earlier else {}
    with spool.file.open("rb") as spool_file, disk.writing({"paths.shards": shards_dir}):
        written = {
            split: contracts.Split(
                count=len(split_entries[split]),
                per_class=_per_class(split_entries[split], class_names),
                shards=_write_split(staging, spool_file, spool.digests, shards, previous),
                shard_slots=len(shards),
            )
            for split, shards in laid_out.items()
        }
    spool.file.unlink()
    shutil.rmtree(spool.folder)
    return written


def _write_split(
    folder: pathlib.Path,
    spool,
    decoded: dict[pathlib.Path, str],
    shards: list[Shard],
    previous: dict[str, contracts.Shard],
) -> list[contracts.Shard]:
    """The split's shards in `folder`, as layout laid them out. A shard whose images the previous shard of its
    name (`previous`: the last manifest's, by file) holds, and only those, as they are, is that file again (a hard
    link): a nightly run that added a few images writes a few shards, and DVC caches only those. A shard whose
    images are those of one of the spool's files of decoded images (`decoded`: file -> sha256), all in order, is
    that file, moved."""
    origins: dict[pathlib.Path, Any] = {}
    # Each shard is hashed on a thread while the next one is written.
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(1) as hashing:
        written = []
        for shard in shards:
            kept = shard.kept or (_unchanged_shard(shard.images, previous.get(shard.name)) if shard.images else None)
            if kept is not None:
                files.link_or_copy(kept, folder / shard.name)
                if previous[shard.name].image_bytes is None:  # a manifest of an earlier release: every record was read
                    previous[shard.name] = previous[shard.name].model_copy(
                        update={"image_bytes": stored_bytes(shard.images)}
                    )
                written.append(previous[shard.name])  # the same images, so the same bytes of them
                continue
            if not shard.images:
                continue  # no file for a shard without images: the manifest lists the shards there are
            image_bytes = stored_bytes(shard.images)
            whole = _whole_file(shard.images, decoded)
            if whole is not None:
                os.replace(whole, folder / shard.name)
                written.append(
                    contracts.Shard(
                        file=shard.name, records=len(shard.images), sha256=decoded[whole], image_bytes=image_bytes
                    )
                )
                continue
            with (folder / shard.name).open("wb") as stream:
                _write_records(stream, shard.images, spool, origins, stack)
            written.append(hashing.submit(_shard_entry, folder / shard.name, len(shard.images), image_bytes))
        return [shard if isinstance(shard, contracts.Shard) else shard.result() for shard in written]


def layout(
    grouped: dict[str, list[Image]],
    kept: Kept,
    shard_size_mb: float,
    earlier: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
) -> dict[str, list[Shard]] | None:
    """Each split's shards: each image in the shard its place gives (splits.shard_of), in place order, and the
    previous shards `kept` whole in their places. None when a kept shard has no place as it is: its split gets
    another number of shards now that every image's size is known, or an image lands in it (reuse.plan rules
    that out); every shard is then read and written again."""
    kept_names = {path.name: path for path in kept.shards}
    laid_out = {}
    for split, split_images in grouped.items():
        split_kept = (
            [shard for shard in earlier[0].splits[split].shards if shard.file in kept_names] if kept_names else []
        )
        shard_count = _shard_count(split_images, split_kept, shard_size_mb)
        members: list[list[Image]] = [[] for _ in range(shard_count)]
        for image in split_images:
            members[splits.shard_of(image.place, shard_count)].append(image)
        laid_out[split] = []
        for index, shard_images in enumerate(members):
            name = tfrecords.shard_name(split, index, shard_count)
            path = kept_names.pop(name, None)
            if path is not None and shard_images:
                return None
            laid_out[split].append(Shard(name, shard_images, path))
    return None if kept_names else laid_out


def stored_bytes(images: list[Image]) -> int:
    """The sum of these images' encoded sizes."""
    return sum(map(operator.attrgetter("size"), images))


def _shard_count(split_images: list[Image], kept: list[contracts.Shard], shard_size_mb: float) -> int:
    """The smallest power of two of shards that holds the split's encoded images (those written, and those of the
    previous shards `kept`) in shards of at most about dataset.shard_size_mb on average, and no more than there
    are images. A power of two, so that the count (and every shard with it) changes only when the split's size
    doubles or halves."""
    total_bytes = stored_bytes(split_images) + sum(shard.image_bytes for shard in kept)
    return shards_for(total_bytes, len(split_images) + sum(shard.records for shard in kept), shard_size_mb)


def shards_for(total_bytes: float, images: int, shard_size_mb: float) -> int:
    wanted = max(1, math.ceil(total_bytes / (shard_size_mb * 1e6)))
    return max(1, min(1 << (wanted - 1).bit_length(), 1 << max(0, images.bit_length() - 1)))  # 1 for none


def _unchanged_shard(shard_images: list[Image], previous: contracts.Shard | None) -> pathlib.Path | None:
    """The previous shard's file when it holds these images' records, as they are, and no others (its sha256
    was checked when its records were found: tasks/data/reuse.py)."""
    origin = shard_images[0].origin
    if previous is None or previous.records != len(shard_images) or origin is None or origin.name != previous.file:
        return None
    # `is` first: the images of one previous shard share its Path object (reuse.find_previous).
    return (
        origin
        if all(image.as_is and (image.origin is origin or image.origin == origin) for image in shard_images)
        else None
    )


def _whole_file(shard_images: list[Image], decoded: dict[pathlib.Path, str]) -> pathlib.Path | None:
    """The spool's file of decoded images (`decoded`) that holds these images' records, one after another in
    their order, and nothing else; None when no file does."""
    origin, end = shard_images[0].origin, 0
    if origin not in decoded:
        return None
    for image in shard_images:
        if image.origin is not origin or image.offset != end + tfrecords.FRAME_HEAD:
            return None
        end = image.offset + image.length + tfrecords.FRAME_TAIL
    return origin if end == origin.stat().st_size else None


def _shard_entry(path: pathlib.Path, records: int, image_bytes: int) -> contracts.Shard:
    return contracts.Shard(file=path.name, records=records, sha256=files.sha256_of(path), image_bytes=image_bytes)


def _write_records(shard, shard_images: list[Image], spool, origins: dict, stack: contextlib.ExitStack) -> None:
    """The images' records, framed, into `shard`. Records kept as they are that lie one after another in their
    previous shard (in a shard that changed, all but its new images) are copied as one block, framing and all
    (_copy_block), rather than read, framed and written a record at a time (a read, three writes and two CRCs
    each: 3,500 records in a nightly run's ~100 changed shards of 50,000 photos)."""
    block: list = []  # [origin, start, end] of the records to copy next
    for image in shard_images:
        if image.as_is and image.origin is not None:
            start = image.offset - tfrecords.FRAME_HEAD
            if block and start == block[2] and (image.origin is block[0] or image.origin == block[0]):
                block[2] = image.offset + image.length + tfrecords.FRAME_TAIL
                continue
            _copy_block(shard, block, origins, stack)
            block = [image.origin, start, image.offset + image.length + tfrecords.FRAME_TAIL]
            continue
        _copy_block(shard, block, origins, stack)
        block = []
        tfrecords.write_record(shard, _record(image, spool, origins, stack))
    _copy_block(shard, block, origins, stack)


def _copy_block(shard, block: list, origins: dict, stack: contextlib.ExitStack) -> None:
    if block:
        origin, start, end = block
        files.append_range(_opened(origin, origins, stack), shard, start, end - start)


def _opened(origin: pathlib.Path, origins: dict, stack: contextlib.ExitStack):
    """The previous shard `origin`, open for reading until the split is written (`origins`: those opened)."""
    if origin not in origins:
        origins[origin] = stack.enter_context(origin.open("rb"))
    return origins[origin]


def _record(image: Image, spool, origins: dict, stack: contextlib.ExitStack) -> bytes:
    """The image's serialized record, built from its encoded image: in the spool, or in another file's record in a
    previous shard. (Records kept as they are never come here: _write_records copies them.)"""
    source = spool if image.origin is None else _opened(image.origin, origins, stack)
    source.seek(image.offset)
    data = source.read(image.length)
    if image.origin is not None:  # another file's record holds the same bytes
        data = tfrecords.parse(data)[0]
    return tfrecords.serialize(data, image.label, image.source)


def _per_class(rows: list[contracts.IndexEntry], class_names: tuple[str, ...]) -> dict[str, int]:
    counts = collections.Counter(map(operator.attrgetter("class_name"), rows))
    return {name: counts[name] for name in class_names}
