"""What an earlier conversion already did: its encoded images, found again by the content of their files.

A nightly run adds a few images to a folder of thousands: decoding, validating and re-encoding every
file again would cost the whole conversion each night. The previous shards hold every accepted image
as it would be encoded now (same Pillow, same image_size), and their index names each record's source
file and its sha256, so a file whose bytes were converted before is copied from there instead: renamed
or moved files too. Only the shards that change are read (plan): one that keeps all its images and gets
no new one is left as it is. Each shard read is checked against its manifest's sha256, unless the record
of digests vouches for it (its size, time and inode unchanged since convert wrote or checked it, as
source files are trusted); the images of one that does not check out are converted again from their
sources.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import pathlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from tasks.common import contracts, errors, files
from tasks.data import images, splits, tfrecords


@dataclasses.dataclass(slots=True)  # one per image; not frozen, whose __init__ sets fields the slow way (convert._File)
class Stored:
    """An image of the previous shards: its whole record, left where it is, or its encoded image in the spool."""

    origin: pathlib.Path | None  # the previous shard that holds the whole record; None: in the spool
    offset: int
    length: int
    encoded_size: int
    entry: contracts.IndexEntry  # its row in the previous index


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which previous shards a run reads: all when `read` is None, else those files. `kept`: the files whose whole
    records stay in one of the others (source -> that shard's file), unread."""

    read: set[str] | None
    kept: dict[str, str]
    trusted: set[str] = dataclasses.field(default_factory=set)  # unchanged since written or checked: not hashed
    rows: dict[str, contracts.IndexEntry] | None = None  # the previous index by path, made once for find_previous


READ_ALL = Plan(None, {})


def plan(
    earlier: tuple[contracts.Manifest, list[contracts.IndexEntry]],
    image_size: tuple[int, int] | None,
    seed: int,
    given_splits: tuple[str, ...],
    class_names: tuple[str, ...],
    now: Iterable[tuple[str, str | None, str, float]],
    trusted: set[str],
) -> Plan:
    """The previous shards this run must read, from what is found `now` (source, sha256, split and place of each
    file). A shard is left unread when the record of digests vouches for its bytes (`trusted`: by size, time and
    inode) and every one of its images is found again as it is (same file, bytes, class and split), and no other
    image lands in it: it will be the same shard again, if its split keeps its number of shards (convert checks
    that once the new images are known, and reads them all when it changed). Reading and hashing every shard was
    most of a nightly run's time: 0.75 GB for 50,000 photos at 224x224. Nothing is kept from shards that store
    images otherwise than this run would (stored_alike)."""
    manifest, entries = earlier
    slots = {split: layout.shard_slots for split, layout in manifest.splits.items()}
    if (
        not stored_alike(manifest, image_size)
        or None in slots.values()
        or manifest.seed != seed
        or manifest.source_splits != list(given_splits)
        or manifest.classes != list(class_names)
        or any(shard.image_bytes is None for shard in manifest.shards())
    ):
        return READ_ALL  # another storage, layout, places or labels: every record is looked at

    names = {
        split: [tfrecords.shard_name(split, index, count) for index in range(count)] for split, count in slots.items()
    }

    def shard_at(split: str, place: float) -> str:
        return names[split][splits.shard_of(place, slots[split])]  # the names made once: not one string a file

    def place_of(entry: contracts.IndexEntry) -> float:
        return splits.position(seed, entry.class_name, splits.path_in_class(entry.path, bool(given_splits)))

    by_path = {entry.path: entry for entry in entries}
    kept: dict[str, str] = {}
    touched, other_digests = set(), set()
    for source, digest, split, place in now:
        entry = by_path.get(source)
        if entry is not None and entry.sha256 == digest and entry.split == split:
            kept[source] = shard_at(split, place)  # the same place (same seed, class and path): the same shard
            continue
        touched.add(shard_at(split, place))  # it lands there
        if entry is not None:
            touched.add(shard_at(entry.split, place))  # it leaves this one
        other_digests.add(digest)  # its bytes may be stored under another name
    touched.update(shard_at(entry.split, place_of(entry)) for entry in entries if entry.sha256 in other_digests)
    kept_counts = collections.Counter(kept.values())
    read = touched | {
        shard.file
        for shard in manifest.shards()
        if shard.file not in trusted or kept_counts[shard.file] != shard.records  # some of its images went
    }
    return Plan(read, {source: shard for source, shard in kept.items() if shard not in read}, trusted, by_path)


def find_previous(
    earlier: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
    shards_dir: pathlib.Path,
    image_size: tuple[int, int] | None,
    wanted: dict[str, tuple[str, int]],
    spool: BinaryIO,
    reads: Plan = READ_ALL,
) -> tuple[dict[str, Stored], dict[str, Stored]]:
    """What the shards in `shards_dir` (`earlier`: their manifest and index) hold of `wanted` (path ->
    (sha256, label) of each file now): (by path: the whole records of files unchanged in name, bytes and
    label, left in their shards; by sha256: the encoded images of any other wanted content, copied to
    `spool`). Only the shards `reads` names are read: the files of the others (`reads.kept`, each with its row
    in `reads.rows`) are the caller's to take as they are. A shard that does not match its sha256 is skipped: its
    images are decoded again."""
    if earlier is None or not stored_alike(earlier[0], image_size):
        if earlier and earlier[0].difference_hash_version != images.DIFFERENCE_HASH_VERSION:
            print(
                f"convert: decoding every file again: the previous shards' perceptual hashes are of version "
                f"{earlier[0].difference_hash_version}, this release's of {images.DIFFERENCE_HASH_VERSION}"
            )
        return {}, {}
    manifest, entries = earlier
    wanted_digests = {digest for digest, _ in wanted.values()}
    by_path = reads.rows if reads.rows is not None else {entry.path: entry for entry in entries}
    old_labels = {name: label for label, name in enumerate(manifest.classes)}
    whole: dict[str, Stored] = {}
    encoded_only: dict[str, Stored] = {}
    # No shard is read when none holds a wanted file's bytes (every file changed, or another folder).
    shards = [] if wanted_digests.isdisjoint(entry.sha256 for entry in entries) else manifest.shards()
    if reads.read is not None:
        shards = [shard for shard in shards if shard.file in reads.read]
    damaged = False
    paths = [shards_dir / shard.file for shard in shards]
    known = {path: shard.sha256 for shard, path in zip(shards, paths, strict=True) if shard.file in reads.trusted}
    for shard, (path, data, digest) in zip(shards, _read_ahead(paths, known), strict=True):
        if digest != shard.sha256:
            print(f"convert: decoding the images of {path} again: it is missing or does not match its sha256")
            damaged = True
            continue
        for offset, serialized, source, encoded in tfrecords.iterate_records(data, path):
            entry = by_path.get(source)
            if entry is None or entry.sha256 not in wanted_digests:
                continue
            if wanted.get(source) == (entry.sha256, old_labels[entry.class_name]):
                # The same file, bytes and label: its record is copied whole when the new shards are written.
                whole[source] = Stored(path, offset, len(serialized), len(encoded), entry)
            elif entry.sha256 not in encoded_only:
                encoded_only[entry.sha256] = Stored(None, spool.tell(), len(encoded), len(encoded), entry)
                spool.write(encoded)
    if damaged:
        _check_cached_shards(shards_dir)
    return whole, encoded_only


def _read_ahead(paths: list[pathlib.Path], known: dict[pathlib.Path, str]) -> Iterator[tuple[pathlib.Path, bytes, str]]:
    """(path, bytes, sha256) of each file (empty when missing), the next one read and hashed on a thread while
    the caller goes through this one: reading and hashing release the GIL, and were 60% of an incremental
    conversion's time in the previous shards. The files `known` (path -> sha256: unchanged since their sha256 was
    taken, by size, time and inode) are read, not hashed again."""
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        following = reader.submit(_read_hashed, paths[0], known.get(paths[0])) if paths else None
        for index in range(len(paths)):
            current = following.result()
            if index + 1 < len(paths):
                following = reader.submit(_read_hashed, paths[index + 1], known.get(paths[index + 1]))
            yield paths[index], *current


def _read_hashed(path: pathlib.Path, known_sha256: str | None) -> tuple[bytes, str]:
    data = path.read_bytes() if path.is_file() else b""  # one shard, about dataset.shard_size_mb
    return data, known_sha256 if known_sha256 and data else hashlib.sha256(data).hexdigest()


def _check_cached_shards(shards_dir: pathlib.Path) -> None:
    """Removes from DVC's cache every copy of a shard of dvc.lock's version whose content no longer matches
    its name (the md5 of the content). With cache.type hardlink (.dvc/config) a shard and its cached copy
    are one file, so damage written into the shard is in the cache too, under the good content's name: DVC
    would hand it out at the next checkout of that version, and push it. Once removed, DVC caches the good
    shard that convert writes next. Hashed here, not by DVC's own check, which trusts any read-only cached
    file (and root writes into read-only files); only after a damaged shard, so it costs nothing otherwise."""
    import dvc.exceptions  # here: only a damaged shard needs DVC
    import dvc.repo

    try:
        with dvc.repo.Repo(str(shards_dir)) as repo:
            for out in repo.index.outs:
                if pathlib.Path(out.fs_path) != shards_dir.resolve() or not (out.hash_info and out.hash_info.isdir):
                    continue  # another output, or one dvc.lock has no version of yet
                for _key, _meta, hash_info in out.get_obj() or []:
                    cached = pathlib.Path(out.cache.oid_to_path(hash_info.value))
                    if cached.is_file() and files.md5_of(cached) != hash_info.value:
                        cached.unlink()
                        print(f"convert: removed {cached} from DVC's cache: a damaged copy of a shard")
    except dvc.exceptions.NotDvcRepoError:
        return  # shards outside a DVC repository: no cache to check
    except (dvc.exceptions.DvcException, OSError) as error:  # the conversion itself does not depend on it
        print(f"convert: DVC's cached copies of the shards were not checked: {error}")


def stored_alike(manifest: contracts.Manifest, image_size: tuple[int, int] | None) -> bool:
    """Whether the previous shards store images as this run would: the same image size (else every image is
    resized again) and perceptual hashes of the same definition (else all are taken again, so that one index
    never compares hashes of two definitions)."""
    return (
        manifest.image_size == (list(image_size) if image_size else None)
        and manifest.difference_hash_version == images.DIFFERENCE_HASH_VERSION
    )


def previous(shards_dir: pathlib.Path) -> tuple[contracts.Manifest, list[contracts.IndexEntry]] | None:
    """The previous conversion's manifest and index, read once for find_previous and the change report."""
    if not (shards_dir / contracts.MANIFEST_FILE).is_file() or not (shards_dir / contracts.INDEX_FILE).is_file():
        return None  # the first conversion, or one by a release that wrote no index
    try:
        return contracts.Manifest.read(shards_dir), contracts.read_index(shards_dir)
    except (errors.BadInput, errors.MissingInput) as error:
        print(f"convert: converting every file again: {error}")
        return None
