"""Stage 2, convert: image folder -> validated, sharded TFRecord files and a manifest.

    python -m tasks.convert         # reads ./params.yaml, writes <paths.shards>/<dataset.name>/

Writes {train,validation,test}-NNNNN-of-NNNNN.tfrecord, manifest.json (classes in label order,
counts per split and class, class imbalance, identical files found under two classes or in two
splits, shard names with record counts and sha256) and rejected.csv (every file that is not a
usable image, with the reason). Files seen = accepted + rejected. The source folder is only read.

Split folders recorded by the download stage (layout.json) are kept; a split the source lacks is
carved from its train images. An image's split follows from a hash of its class and name alone
(tasks/data/splits.py), so a growing folder never moves an image between splits. Files whose bytes
the previous shards hold are copied from there (tasks/data/reuse.py); only new or changed files are
decoded, on all cores. Writing stays in this process, in a fixed order (tasks/data/shard_writing.py), so the
same input always gives byte-identical shards, however much was reused. index.csv lists every accepted image; the
data-change report (tasks/data/changes.py) goes to <paths.data_report>, and its guard stops the
stage before any shard is replaced when a class vanished or lost too many images.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import gc
import io
import itertools
import multiprocessing
import operator
import os
import pathlib
import shutil
import sys
import unicodedata
from collections.abc import Iterator
from typing import Any

import tqdm

from tasks.common import config, contracts, disk, errors, files, machine
from tasks.data import changes, images, listing, reuse, shard_writing, splits, tfrecords

# fork: workers start in milliseconds and do not re-import the parent's main module (which may be
# the Prefect flow, importing TensorFlow again in every worker). They only run Pillow code.
_POOL_CONTEXT = "fork" if sys.platform == "linux" else "spawn"
_MIN_FILES_FOR_POOL = 32  # below this, sending files to the workers costs more than it saves
# Images prepared before the conversion to learn what the settings make of this folder's files: evenly
# spread over classes and names; a second or two even for large photos.
SIZE_SAMPLE = 24
# What a record adds to its encoded image besides its source path: the TFRecord framing (16 bytes) and the
# Example's field names, label and lengths (about 70).
_RECORD_OVERHEAD = 90
_INDEX_ROW = 110  # bytes of an index.csv row besides its path: class, split, two digests, encoding


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    shards_dir: pathlib.Path
    counts: dict[str, int]
    files_seen: int
    rejected_count: int
    decoded: int  # files decoded by this run; the others were taken from the previous shards by content
    report: changes.Report


# One per file: no __dict__ each (slots); not frozen, whose __init__ sets each field through object.__setattr__
# (2.1 instead of 0.8 us for 13 fields: 0.1 s of a nightly run of 50,000 photos for this class and
# shard_writing.Image).
@dataclasses.dataclass(slots=True)
class _File:
    root: str  # the raw folder, one string for all files: each file's whole path is made when it is read
    source: str  # relative to the raw folder, with "/" separators, as named on disk
    split: str | None  # the split folder it sits in, if the source brings splits
    class_name: str  # its class folder's name, Unicode NFC
    identity: bytes | None = None  # size, modification time (ns) and inode (listing.packed): unchanged, same bytes
    recorded: str | None = None  # its sha256 as the record of digests holds it for that identity; None: not there
    assigned_split: str = ""  # the split this run puts it in (_Placer)
    place: float = 0.0  # splits.position: its order in that split's shards, and which shard

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.source)


def arguments(params: config.Params) -> dict[str, Any]:
    """The stage's arguments, chosen from the settings: `python -m`, the flow, benchmarks and tests all call it."""
    return dict(
        dataset=params.dataset,
        seed=params.dataset.split_seed,
        raw_dir=params.raw_dir,
        shards_dir=params.shards_dir,
        report_dir=params.data_report_dir,
        model_name=params.registered_model_name,
        digests_file=params.digests_file,
        listing_file=listing.path_for(params.raw_dir),
    )


def _collector_paused(function):
    """Runs `function` with the garbage collector's automatic collections off and the objects the process already
    holds out of its reach (gc.freeze); both handed back when it returns.

    A conversion makes about ten objects an image and almost no reference cycles (68 left by a conversion of 50,000
    photos, by gc.collect() after it): reference counting frees what it lets go. The automatic collections only walk
    the objects that live on, again and again: 0.33 s of a 2.5 s nightly run of 50,000 photos (13%), six full
    collections of up to 500,000 objects among them. And with TensorFlow loaded a process holds about 400,000
    objects more, which gc.freeze keeps out of any collection; the forked workers also keep those objects' memory
    shared rather than copy the pages a collection touches. The workers collect as usual (_decoding_pool).
    A caller that froze objects itself keeps them frozen: nothing is frozen or handed back here then."""

    @functools.wraps(function)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            if gc.get_freeze_count():
                return function(*args, **kwargs)
            gc.freeze()
            try:
                return function(*args, **kwargs)
            finally:
                gc.unfreeze()
        finally:
            if was_enabled:
                gc.enable()

    return paused


@disk.writes(shards_dir="paths.shards", report_dir="paths.data_report", digests_file="paths.downloads")
@_collector_paused
def convert(
    dataset: config.DatasetParams,
    seed: int,
    raw_dir: pathlib.Path,
    shards_dir: pathlib.Path,
    report_dir: pathlib.Path | None = None,
    model_name: str | None = None,
    digests_file: pathlib.Path | None = None,
    listing_file: pathlib.Path | None = None,
) -> ConvertResult:
    """Validates every file of `raw_dir`, splits the images by their names and writes them as shards.
    Files whose content the shards already in `shards_dir` hold are taken from there, not decoded again.
    The data-change report (against the data the champion of `model_name` was trained on, else the
    previous shards) goes to `report_dir`; its guard stops the run before the shards are replaced.
    `digests_file` keeps each file's sha256 by its size, time and inode (the next run reads only changed
    files); a file that differs from download's `listing_file` (what DVC recorded) stops the run, as does
    too little room for the estimate (space_needed), before anything is written."""
    # The decoding workers are forked first, from a process that holds no per-file lists yet (nor MLflow, which
    # the change report imports): forked later, each would map those pages too, and a worker that touched
    # one would copy it.
    with _decoding_pool() as pool:
        return _convert(pool, dataset, seed, raw_dir, shards_dir, report_dir, model_name, digests_file, listing_file)


def _convert(
    pool: concurrent.futures.Executor | None,
    dataset: config.DatasetParams,
    seed: int,
    raw_dir: pathlib.Path,
    shards_dir: pathlib.Path,
    report_dir: pathlib.Path | None,
    model_name: str | None,
    digests_file: pathlib.Path | None,
    listing_file: pathlib.Path | None,
) -> ConvertResult:
    given_splits = _given_splits(raw_dir)
    placer = _Placer(seed, _carved_fractions(given_splits, dataset), given_splits)
    found, outside, earlier = _files_and_previous(raw_dir, placer, digests_file, pool, shards_dir)
    class_names = _class_names(found, raw_dir)
    # The previous conversion when it stored images as this one will: its sizes, records and layout can be kept.
    alike = earlier if earlier is not None and reuse.stored_alike(earlier[0], dataset.image_size) else None
    known, stored_sizes = [item.recorded for item in found], _stored_sizes(found, dataset.image_size, alike)
    disk.require(space_needed(found, stored_sizes, dataset, shards_dir, _stored_digests(found, alike)))
    shard_counts = _expected_shard_counts(found, stored_sizes, dataset, alike)
    baseline = changes.baseline(model_name, earlier[1] if earlier else None, shards_dir)
    with files.staged_directory(shards_dir) as staging:
        spool = shard_writing.Spool(staging / ".encoded.spool", staging / ".decoded", shard_counts, {})
        digests = _digests(found, known, listing_file, [source for source, _ in outside], earlier is not None)
        trusted = _trusted_shards(earlier, shards_dir, digests_file)
        prepare = functools.partial(
            _prepare_all, found, digests, class_names, dataset.image_size, placer, earlier, shards_dir, spool, pool
        )
        grouped, kept, layout, rejected, decoded = _prepared(prepare, trusted, earlier, dataset.shard_size_mb)
        accepted = sum(map(len, grouped.values())) + sum(map(len, kept.rows.values()))
        conversion = {"decoded": decoded, "reused": accepted - (decoded - len(rejected))}
        files_seen = len(found) + len(outside)
        if digests_file:  # now, so that the per-file list can go: the record holds only facts about the files
            listing.write_digests(
                digests_file, (item.source for item in found), (item.identity for item in found), digests, known
            )
        # Each file's record and identity (about 0.2 KB a file) are not needed past here; images keep their names
        # (`prepare` holds the lists too).
        del found, digests, known, prepare
        rejected = sorted(outside + rejected)
        conversion["rejected"] = len(rejected)
        split_entries = {split: _split_entries(split, images, kept, class_names) for split, images in grouped.items()}
        entries = [entry for rows in split_entries.values() for entry in rows]  # the index: by split, in place order
        report = _report_changes(baseline, entries, class_names, dataset, conversion, report_dir)
        _require_every_split(split_entries, accepted, dataset)
        written = shard_writing.write_shards(staging, spool, layout, split_entries, class_names, earlier, shards_dir)
        manifest = _manifest(dataset, seed, class_names, given_splits, files_seen, rejected, entries, written)
        _write_rejected(staging / contracts.REJECTED_FILE, rejected)
        contracts.write_index(staging, entries)
        manifest.write(staging)
    if digests_file:  # for the next run: the shards as they are now
        listing.record_shards(digests_file, _shard_digests(shards_dir, manifest))
    return ConvertResult(
        shards_dir=shards_dir,
        counts={split: len(rows) for split, rows in split_entries.items()},
        files_seen=manifest.files_seen,
        rejected_count=len(rejected),
        decoded=decoded,
        report=report,
    )


def space_needed(
    found: list[_File],
    stored_sizes: tuple[float, float],
    dataset: config.DatasetParams,
    shards_dir: pathlib.Path,
    keepable: dict[str, str],
) -> disk.Need:
    """What convert writes beside the shards folder at most, estimated before anything is decoded.

    The new shards are written beside the previous ones, which stay until the end, and the images decoded
    now wait in the spool there until the shards are written (shard_writing.Spool: when the layout is the one expected,
    the spool's files are the shards); then the spool goes and the index comes. The spool holds all but the
    files whose records the previous shards hold (`keepable`: path -> sha256 of the records that can be kept,
    which a file the record of digests knows with that sha256 keeps). Each image's stored bytes come from
    `stored_sizes` (_stored_sizes: the previous shards', or SIZE_SAMPLE files prepared as convert stores them): kept
    at their size (dataset.image_size null), an image stores about its file's size times what the sample
    stored per source byte (a JPEG kept as it is: exactly its size); resized, every image stores about
    the sample's mean, whatever its file's size. Measured against the real peak (shards and spool): digits
    0.8 MB estimated 1.0 MB; 300 photo crops of 14 MB, JPEG and PNG: 28.2 MB estimated 28.3 MB kept,
    17.6 MB estimated 17.3 MB at 224x224, 2.2 MB estimated 2.0 MB at 64x64.
    """
    per_byte, per_image = stored_sizes
    # Whole lists, not a pass with a lookup and a sum per file: a nightly run of 50,000 files spent 60 ms here.
    spooled = [item for item in found if item.recorded is None or item.recorded != keepable.get(item.source)]
    if dataset.image_size is None:
        stored, spool = (per_byte * sum(map(_file_size, items)) for items in (found, spooled))
    else:
        stored, spool = per_image * len(found), per_image * len(spooled)
    # The names' bytes on disk, as os.fsencode makes them.
    paths = len("".join(item.source for item in found).encode("utf-8", "surrogateescape"))
    shards = int(stored) + _RECORD_OVERHEAD * len(found) + paths
    index = _INDEX_ROW * len(found) + 2 * paths
    return disk.Need(
        shards_dir, shards + max(int(spool), index), "the shards (and the spool they are written from)", "paths.shards"
    )


def _stored_sizes(
    found: list[_File],
    image_size: tuple[int, int] | None,
    alike: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
) -> tuple[float, float]:
    """(Bytes stored per source byte, mean bytes stored per image), the first for images kept at their size (and 1
    otherwise), the second for resized ones (0 otherwise). From the previous shards when they store images as this
    run would (`alike`; their images' bytes over the files found now, or over their records: a nightly run adds few
    images); else from SIZE_SAMPLE files spread evenly over the sorted list (every class), prepared as convert
    stores them (24 photos of 384 pixels prepared one after another: 20 ms of CPU kept at their size, 46 ms
    resized to 224x224); (1, 0) when none is an image."""
    previous = alike[0].shards() if alike is not None else []
    if previous and all(shard.image_bytes is not None for shard in previous):
        stored = sum(shard.image_bytes for shard in previous)
        if image_size is None:
            return stored / max(1, sum(map(_file_size, found))), 0.0
        return 1.0, stored / max(1, sum(shard.records for shard in previous))
    sample = found[:: max(1, len(found) // SIZE_SAMPLE)][:SIZE_SAMPLE]
    source_bytes, stored_sizes = 0, []
    for item in sample:
        prepared = images.prepare(item.path, image_size)
        if isinstance(prepared, images.Prepared) and item.identity:
            source_bytes += _file_size(item)
            stored_sizes.append(len(prepared.encoded))
    if not stored_sizes:
        return 1.0, 0.0
    return sum(stored_sizes) / max(1, source_bytes), sum(stored_sizes) / len(stored_sizes)


def _file_size(item: _File) -> int:
    return listing.size_of(item.identity) if item.identity else 0


def _stored_digests(
    found: list[_File], alike: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None
) -> dict[str, str]:
    """Path -> sha256 of the records the previous shards hold that this run can keep as they are: all, when they
    store images as this run would (`alike`) and were written with the same classes; else none."""
    if alike is None or alike[0].classes != sorted({item.class_name for item in found}):
        return {}  # none, or other labels: every record is written again
    return {entry.path: entry.sha256 for entry in alike[1]}


def _class_names(found: list[_File], raw_dir: pathlib.Path) -> tuple[str, ...]:
    class_names = tuple(sorted({item.class_name for item in found}))
    if len(class_names) < 2:
        raise errors.BadInput(
            f"{raw_dir} must hold one sub-folder per class and at least 2 classes, found {list(class_names)}; "
            "a classifier needs two or more: add a folder of images for each other class (in dataset.source)"
        )
    return class_names


def _report_changes(baseline, entries, class_names, dataset, conversion, report_dir) -> changes.Report:
    """The data-change report, written; its guard stops the stage here when the data lost too much."""
    report = changes.compare(baseline, entries, class_names, dataset, conversion)
    changes.write(report, report_dir)
    changes.guard(report, dataset, report_dir)
    return report


def _given_splits(raw_dir: pathlib.Path) -> tuple[str, ...]:
    if not raw_dir.is_dir():
        raise errors.MissingInput(f"{raw_dir} is not a folder: run the download stage first")
    layout = contracts.Layout.read(raw_dir)
    if layout is None:
        return ()  # a plain class folder
    splits = layout.splits
    unknown = [split for split in splits if split not in contracts.SPLITS]
    if unknown or "train" not in splits and splits:
        raise errors.BadInput(
            f"{raw_dir / contracts.LAYOUT_FILE}: splits {list(splits)} must include 'train' and be among "
            f"{list(contracts.SPLITS)}; rerun the download stage"
        )
    return splits


def _files_and_previous(
    raw_dir: pathlib.Path,
    placer: _Placer,
    digests_file: pathlib.Path | None,
    pool: concurrent.futures.Executor | None,
    shards_dir: pathlib.Path,
) -> tuple[list[_File], list[tuple[str, str]], tuple[contracts.Manifest, list[contracts.IndexEntry]] | None]:
    """_find_files, and the previous conversion's manifest and index (reuse.previous), read on a thread meanwhile:
    the stage's process mostly waits for the listing workers then."""
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        reading = reader.submit(reuse.previous, shards_dir)
        found, outside = _find_files(raw_dir, placer, digests_file, pool)
        return found, outside, reading.result()


def _find_files(
    raw_dir: pathlib.Path,
    placer: _Placer,
    digests_file: pathlib.Path | None,
    pool: concurrent.futures.Executor | None,
) -> tuple[list[_File], list[tuple[str, str]]]:
    """Every file under a class folder, in the order of classes, then paths (NFC), with its size, time and inode, its
    digest as the record of digests holds it for them, and its split and place; and the files that belong to no
    class.

    The class folders are listed, looked up in the record and placed on the decoding workers, a folder a task:
    statting every file and the lookups were 0.55 s of a nightly run of 50,000 photos in this process, 0.25-0.3 s
    on two workers, names and digests sent back included; placing them, another 0.1 s here."""
    class_folders, outside = _class_folders(raw_dir, placer.given_splits)
    # Each folder's files come sorted by name (NFC), so that listings in class order, a class's split folders in
    # order, are all files in order: the files' paths start with their split folder's name, then their class's.
    class_folders.sort(key=lambda class_folder: (class_folder[2], class_folder[1] or ""))
    listed = functools.partial(_class_listing, raw_dir=raw_dir, digests_file=digests_file, placer=placer)
    # Spawned workers start with their first task, importing the caller's main module: not for a listing.
    listings = pool.map(listed, class_folders) if pool and _POOL_CONTEXT == "fork" else map(listed, class_folders)
    root, found = str(raw_dir), []
    for (folder, split, class_name), (sources, identities, recorded, placed) in zip(
        class_folders, listings, strict=True
    ):
        if not sources:
            raise errors.BadInput(
                f"class folder {folder} holds no files; add images to it (in dataset.source) or remove the folder"
            )
        found += [
            _File(root, source, split, class_name, identity, digest, *place)
            for source, identity, digest, place in zip(sources, identities, recorded, placed, strict=True)
        ]
    return found, outside


def _class_listing(
    class_folder: tuple[pathlib.Path, str | None, str],
    raw_dir: pathlib.Path,
    digests_file: pathlib.Path | None,
    placer: _Placer,
) -> tuple[list[str], list[bytes | None], list[str | None], list[tuple[str, float]]]:
    """(Sources, identities (listing.packed), recorded digests, (split, place) of each) of every file under a class
    folder (the folder, the split folder it sits in and the class name), in the order of their names (NFC)."""
    folder, split, class_name = class_folder
    # NFC in the sort key: the same names give the same order whichever form the file system returns.
    walked = sorted(listing.walk(folder, raw_dir), key=lambda row: unicodedata.normalize("NFC", row[0]))
    sources, identities = [source for source, _, _ in walked], [identity for _, _, identity in walked]
    placed = [placer.place(class_name, source, split) for source in sources]
    recorded = [None] * len(sources)
    if digests_file is not None:
        recorded = listing.recorded_under(digests_file, folder.relative_to(raw_dir).as_posix(), sources, identities)
    return sources, list(map(listing.packed, identities)), recorded, placed


def _class_folders(
    raw_dir: pathlib.Path, given_splits: tuple[str, ...]
) -> tuple[list[tuple[pathlib.Path, str | None, str]], list[tuple[str, str]]]:
    """Every class folder (folder, split folder it sits in, class name in NFC), and the files that belong to no
    class."""
    class_folders, outside = [], []
    if given_splits:
        for entry in sorted(raw_dir.iterdir()):
            if entry.name not in given_splits and entry.name != contracts.LAYOUT_FILE:
                outside += [
                    (path, "not inside a split folder (train/, validation/, test/): belongs to no class")
                    for path in _files_under(entry, raw_dir)
                ]
    for split, folder in [(split, raw_dir / split) for split in given_splits] or [(None, raw_dir)]:
        by_name: dict[str, pathlib.Path] = {}
        for entry in sorted(folder.iterdir()):
            if entry.is_file():
                if entry != raw_dir / contracts.LAYOUT_FILE:
                    outside += [
                        (path, "not inside a class folder: belongs to no class")
                        for path in _files_under(entry, raw_dir)
                    ]
                continue
            if entry.name.startswith("."):  # .git, .ipynb_checkpoints, ...: tool folders, not classes
                outside += [
                    (path, f"in hidden folder {entry.name!r}, not a class folder: belongs to no class")
                    for path in _files_under(entry, raw_dir)
                ]
                continue
            class_name = unicodedata.normalize("NFC", entry.name)
            if class_name in by_name:
                raise errors.BadInput(
                    f"class folders {by_name[class_name]} and {entry} have the same name in different Unicode forms; "
                    "rename one"
                )
            by_name[class_name] = entry
            class_folders.append((entry, split, class_name))
    return class_folders, outside


def _files_under(entry: pathlib.Path, raw_dir: pathlib.Path) -> list[str]:
    paths = [entry] if entry.is_file() else sorted(path for path in entry.rglob("*") if path.is_file())
    return [path.relative_to(raw_dir).as_posix() for path in paths]


def _carved_fractions(given_splits: tuple[str, ...], dataset: config.DatasetParams) -> dict[str, float]:
    """The splits made here from train images, and their fractions: those the source does not bring."""
    carved = {"test": dataset.test_fraction, "validation": dataset.validation_fraction}
    return {split: fraction for split, fraction in carved.items() if split not in given_splits}


@dataclasses.dataclass(frozen=True)
class _Placer:
    seed: int
    carved: dict[str, float]
    given_splits: tuple[str, ...]

    def place(self, class_name: str, source: str, given_split: str | None) -> tuple[str, float]:
        """(Split, place) of the file `source` of that class, in that split folder."""
        place = splits.position(self.seed, class_name, splits.path_in_class(source, given_split is not None))
        return splits.split_of(place, given_split, self.carved), place


def _prepare_all(
    found: list[_File],
    digests: list[str | None],
    class_names: tuple[str, ...],
    image_size: tuple[int, int] | None,
    placer: _Placer,
    earlier: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
    shards_dir: pathlib.Path,
    spool: shard_writing.Spool,
    pool: concurrent.futures.Executor | None,
    trusted: set[str],
) -> tuple[list[shard_writing.Image], list[tuple[str, str]], int, shard_writing.Kept]:
    """Every accepted image in the spool: taken from the previous shards by content, else decoded on all cores;
    (accepted images, rejected files with the reason, files decoded, the previous shards kept whole). The previous
    shards `trusted` need not be read where nothing in them changes (reuse.plan): those are kept as they are, and
    their images are not among the accepted ones. The digests of files read only to be decoded (None in
    `digests`) are filled in, in place."""
    labels = {name: label for label, name in enumerate(class_names)}
    shutil.rmtree(spool.folder, ignore_errors=True)  # a second call (_prepared) starts again
    spool.folder.mkdir()
    spool.digests.clear()
    # A failed write to the spool names no file: the error names the shards folder (closing it writes too).
    with disk.writing({"paths.shards": shards_dir}), spool.file.open("wb") as spool_file:
        reused = _reused(found, digests, labels, image_size, placer, earlier, shards_dir, spool_file, trusted)
        accepted, to_decode, kept = reused
        # Images taken from the previous shards share their shards with those decoded now, which are then written
        # by copying anyway: the decoded records wait in one file (a nightly run's hundred new images land in about
        # a hundred shards, and a file each cost more in creating files than it saved).
        by_shard = not accepted and not kept.places
        decoded, rejected = _decode_to_files(found, to_decode, digests, image_size, labels, spool, pool, by_shard)
    return accepted + decoded, rejected, len(to_decode), kept


def _reused(
    found: list[_File],
    digests: list[str | None],
    labels: dict[str, int],
    image_size: tuple[int, int] | None,
    placer: _Placer,
    earlier: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
    shards_dir: pathlib.Path,
    spool,
    trusted: set[str],
) -> tuple[list[shard_writing.Image], list[int], shard_writing.Kept]:
    """(The images the previous shards hold, the positions in `found` of the files to decode, the previous shards
    kept whole and unread: reuse.plan)."""
    if earlier is None:
        return [], list(range(len(found))), shard_writing.NOTHING_KEPT
    now = ((item.source, digest, item.assigned_split, item.place) for item, digest in zip(found, digests, strict=True))
    reads = reuse.plan(earlier, image_size, placer.seed, placer.given_splits, tuple(labels), now, trusted)
    wanted = {
        item.source: (digest, labels[item.class_name])
        for item, digest in zip(found, digests, strict=True)
        if item.source not in reads.kept
    }
    whole, encoded_only = reuse.find_previous(earlier, shards_dir, image_size, wanted, spool, reads)
    accepted, elsewhere, kept_places = [], [], {}
    for position, (item, digest) in enumerate(zip(found, digests, strict=True)):
        if item.source in reads.kept:  # its whole record, in a previous shard kept whole: not one object an image
            kept_places[item.source] = item.place
            continue
        stored = whole.get(item.source)  # this file's own record, read: same name, bytes and label
        if stored is None:
            elsewhere.append(position)
            continue
        accepted.append(_image(item, labels[item.class_name], digest, stored.entry, *_where(stored), as_is=True))
    # The others' bytes may be stored under another name (renamed or copied files): looked up by digest.
    wanted_digests = {digests[position] for position in elsewhere}
    by_digest = {stored.entry.sha256: stored for stored in whole.values() if stored.entry.sha256 in wanted_digests}
    to_decode = []
    for position in elsewhere:
        item, digest = found[position], digests[position]
        stored = encoded_only.get(digest) or by_digest.get(digest)
        if stored is None:
            to_decode.append(position)
            continue
        accepted.append(_image(item, labels[item.class_name], digest, stored.entry, *_where(stored), as_is=False))
    kept_rows = collections.defaultdict(list)
    for entry in earlier[1]:  # in the previous index's order: by split, then place
        if entry.path in kept_places:
            kept_rows[entry.split].append(entry)
    # A path made a shard, not an image: the kept images' shard names are one string a shard already (reuse.plan).
    kept_shards = {shards_dir / file for file in set(reads.kept.values())}
    return accepted, to_decode, shard_writing.Kept(kept_shards, kept_rows, kept_places)


def _where(stored: reuse.Stored) -> tuple[pathlib.Path | None, int, int, int]:
    return stored.origin, stored.offset, stored.length, stored.encoded_size


def _image(
    item: _File,
    label: int,
    digest: str,
    entry: contracts.IndexEntry,
    origin: pathlib.Path | None,
    offset: int,
    length: int,
    size: int,
    as_is: bool,
) -> shard_writing.Image:
    """The image of `item` whose encoded bytes the previous shards hold (`entry`: its row there): its whole record
    when `as_is`, at `offset` in `origin` (None: the spool)."""
    return shard_writing.Image(
        item.source,
        item.assigned_split,
        item.place,
        label,
        offset,
        length,
        size=size,
        origin=origin,
        as_is=as_is,
        sha256=digest,
        difference_hash=entry.difference_hash,
        encoding=entry.encoding,
        entry=entry if as_is else None,
    )


def _decode_to_files(
    found: list[_File],
    to_decode: list[int],
    digests: list[str | None],
    image_size: tuple[int, int] | None,
    labels: dict[str, int],
    spool: shard_writing.Spool,
    pool: concurrent.futures.Executor | None,
    by_shard: bool,
) -> tuple[list[shard_writing.Image], list[tuple[str, str]]]:
    """The files at positions `to_decode` of `found` decoded on all cores, in the order of the shards expected
    (shard_writing.Spool), their records written to the spool's files as they come (a file an expected shard when
    `by_shard`, else one for all): (accepted images, rejected files with the reason). Each file's sha256 goes to
    `digests` (None: unreadable)."""
    order, expected = _decoding_order(found, to_decode, spool.shard_counts)
    accepted, rejected = [], []
    jobs = ((found[position].path, digests[position]) for position in order)  # made as the workers need them
    results = _decode_all(jobs, len(order), image_size, pool)
    with shard_writing.RecordFiles(spool, by_shard) as record_files:
        for position, shard, result in zip(order, expected, results, strict=True):
            item = found[position]
            # The digest this process holds already, when known, rather than the worker's copy of it: one string a file.
            sha256 = digests[position] = digests[position] or result.source_sha256
            if isinstance(result, images.Rejected):
                rejected.append((item.source, result.reason))
                continue
            label = labels[item.class_name]
            record = tfrecords.serialize(result.encoded, label, item.source)
            origin, offset = record_files.append(shard, record)
            accepted.append(
                shard_writing.Image(
                    item.source,
                    item.assigned_split,
                    item.place,
                    label,
                    offset,
                    len(record),
                    size=len(result.encoded),
                    origin=origin,
                    as_is=True,
                    sha256=sha256,
                    difference_hash=result.difference_hash,
                    encoding=sys.intern(result.encoding),  # one string per encoding, not one unpickled per image
                )
            )
    return accepted, rejected


def _decoding_order(
    found: list[_File], to_decode: list[int], shard_counts: dict[str, int]
) -> tuple[list[int], list[tuple[str, int, int]]]:
    """The positions `to_decode` of `found` shard after shard of those expected (`shard_counts`), each shard's in
    place order; and each one's shard (split, shard, number of shards: one tuple a shard). Sorted a shard at a time:
    sorted at once, by a key an image (two tuples, about 160 bytes), the keys would take about 16 MB at 100,000
    photos."""
    by_shard = collections.defaultdict(list)
    for position in to_decode:
        item = found[position]
        count = shard_counts[item.assigned_split]
        by_shard[item.assigned_split, splits.shard_of(item.place, count), count].append(position)
    order, expected = [], []
    for shard in sorted(by_shard):
        positions = sorted(by_shard.pop(shard), key=lambda position: (found[position].place, found[position].source))
        order += positions
        expected += [shard] * len(positions)
    return order, expected


def _digests(
    found: list[_File],
    known: list[str | None],
    listing_file: pathlib.Path | None,
    outside: list[str],
    reusing: bool,
) -> list[str | None]:
    """Each found file's sha256 (None: unreadable), after checking that the raw folder holds exactly the files
    download listed (what DVC recorded), with the same bytes. Only when something compares them before any
    file is decoded (download's listing, or the previous shards when `reusing`); else only those `known` (by the
    record of digests): the others are decoded then, and prepare hashes each file as it reads it, rather than this
    process reading every file once more, alone, before the workers start."""
    listed = listing.read(listing_file) if listing_file else None
    if listed is None and not reusing:
        return known  # the others are hashed by the workers that decode them
    digests = listing.hash_all(known, lambda index: found[index].path)
    if listed is None:
        return digests  # a folder made by hand (python -m tasks.convert alone): nothing to compare with
    # Each file found is taken off the listing: what differs, and what is left, is what changed.
    differing = [
        item.source
        for item, digest in zip(found, digests, strict=True)
        if listed.pop(item.source, None) != (digest or "")
    ]
    differing += [source for source in outside if listed.pop(source, None) is None]  # rejected unread: presence counts
    listed.pop(contracts.LAYOUT_FILE, None)
    differing = sorted([*differing, *listed])
    if differing:
        raise errors.BadInput(
            f"{len(differing)} files of the raw folder differ from download's listing {listing_file} (added, removed "
            f"or changed since, e.g. {differing[0]}); the raw folder is download's output: change the images in "
            "dataset.source, then rerun download (`dvc repro -f download`)"
        )
    return digests


def worker_count() -> int:
    """The processes convert decodes with: one per core this process may use."""
    return machine.usable_cores()


@contextlib.contextmanager
def _decoding_pool():
    """A process per core to decode with, forked now (None on one core). Where processes are spawned instead, they
    start with the first files to decode: each imports the caller's main module again, which a run with nothing
    to decode should not pay for."""
    workers = worker_count()
    if workers < 2:
        yield None
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(_POOL_CONTEXT), initializer=gc.enable
    )
    try:
        if _POOL_CONTEXT == "fork":
            pool.submit(int).result()  # the executor forks all its workers at its first task
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _decode_all(
    jobs: Iterator[tuple[str, str | None]],
    count: int,
    image_size: tuple[int, int] | None,
    pool: concurrent.futures.Executor | None,
) -> Iterator[images.Prepared | images.Rejected]:
    """images.prepare of each of `count` files (path, sha256 when the record of digests knows it: not computed
    again), in order, on the pool's workers (in this process when there are few); with a progress bar."""
    worker = functools.partial(_prepare_chunk, image_size=image_size)
    size = _chunk_size(count)
    chunks = iter(lambda: list(itertools.islice(jobs, size)), [])  # lists of `size` jobs until none are left
    if pool and count >= _MIN_FILES_FOR_POOL:
        results = _in_order(pool, worker, chunks, ahead=4 * worker_count())
    else:
        results = map(worker, chunks)
    progress = tqdm.tqdm(total=count, unit="img", desc="convert", file=sys.stderr, disable=None, leave=False)
    with progress:
        for chunk_results in results:
            yield from chunk_results
            progress.update(len(chunk_results))


def _chunk_size(count: int) -> int:
    return max(1, min(64, count // (worker_count() * 8)))


def _in_order(pool: concurrent.futures.Executor, function, chunks: Iterator, ahead: int) -> Iterator:
    """function(chunk) of every chunk on the pool, in order, with at most `ahead` chunks submitted and unread.

    By hand: Executor.map submits every chunk at once (until Python 3.14's buffersize), holding every file's
    path and arguments, and every result the reader has not reached yet, in this process."""
    pending = collections.deque(pool.submit(function, chunk) for chunk in itertools.islice(chunks, ahead))
    while pending:
        results = pending.popleft().result()
        pending.extend(pool.submit(function, chunk) for chunk in itertools.islice(chunks, 1))
        yield results


def _prepare_chunk(
    jobs: list[tuple[str, str | None]], image_size: tuple[int, int] | None
) -> list[images.Prepared | images.Rejected]:
    return [images.prepare(path, image_size, source_sha256) for path, source_sha256 in jobs]


def _group_splits(accepted: list[shard_writing.Image]) -> dict[str, list[shard_writing.Image]]:
    """The images of each split in their place order: shards mix classes, and the order is the same for the
    same images however they were found (decoded now or taken from the previous shards)."""
    grouped: dict[str, list[shard_writing.Image]] = {split: [] for split in contracts.SPLITS}
    for image in accepted:
        grouped[image.split].append(image)
    for split_images in grouped.values():
        split_images.sort(key=operator.attrgetter("place", "source"))
    return grouped


def _require_every_split(
    split_entries: dict[str, list[contracts.IndexEntry]], accepted: int, dataset: config.DatasetParams
) -> None:
    for split, rows in split_entries.items():
        if not rows:
            raise errors.BadInput(
                f"the {split} split is empty: {accepted} images are too few for "
                f"validation_fraction={dataset.validation_fraction}, test_fraction={dataset.test_fraction} "
                "(each image falls in a split by a hash of its name); add images or raise the fraction"
            )


def _entry(image: shard_writing.Image, class_names: tuple[str, ...]) -> contracts.IndexEntry:
    if image.entry is not None and image.entry.split == image.split:
        return image.entry  # the same file, bytes, class and split: its previous row, not a new one an image
    return contracts.IndexEntry(
        path=image.source,
        class_name=class_names[image.label],
        split=image.split,
        sha256=image.sha256,
        difference_hash=image.difference_hash,
        encoding=image.encoding,
    )


def _manifest(dataset, seed, class_names, given_splits, files_seen, rejected, entries, written) -> contracts.Manifest:
    per_class = {name: sum(split.per_class[name] for split in written.values()) for name in class_names}
    return contracts.Manifest(
        dataset=dataset.name,
        classes=list(class_names),
        seed=seed,
        image_size=list(dataset.image_size) if dataset.image_size else None,
        source_splits=list(given_splits),
        files_seen=files_seen,
        accepted=len(entries),
        rejected=len(rejected),
        encodings=dict(sorted(collections.Counter(map(operator.attrgetter("encoding"), entries)).items())),
        per_class=per_class,
        imbalance=_imbalance(per_class),
        duplicates=_duplicates(entries),
        splits=written,
        difference_hash_version=images.DIFFERENCE_HASH_VERSION,
    )


def _split_entries(
    split: str, images: list[shard_writing.Image], kept: shard_writing.Kept, class_names: tuple[str, ...]
) -> list[contracts.IndexEntry]:
    """The split's index rows, in place order: its images' (in that order) merged into the rows of the shards
    kept whole (in the previous index's order: the same). Each image's place among those rows is found by
    bisection: a few places looked up an image, not one a row."""
    kept_rows = kept.rows.get(split, [])
    rows: list[contracts.IndexEntry] = []
    start = 0
    for image in images:
        end = bisect.bisect_left(
            kept_rows, (image.place, image.source), lo=start, key=lambda row: (kept.places[row.path], row.path)
        )
        rows += kept_rows[start:end]
        rows.append(_entry(image, class_names))
        start = end
    return rows + kept_rows[start:]


def _expected_shard_counts(
    found: list[_File],
    stored_sizes: tuple[float, float],
    dataset: config.DatasetParams,
    alike: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
) -> dict[str, int]:
    """Each split's number of shards as shard_writing.layout is expected to find it once every image is stored.
    After a conversion that stored images as this one does (`alike`), its own: a nightly run's few new images join
    shards whose number changes only when a split doubles or halves (and there each shard that changes mixes kept
    and new records, all copied). Else every file of the split found stored as _stored_sizes says (broken files
    counted too: unknown yet)."""
    if alike is not None:
        return {split: alike[0].splits[split].shard_slots or 1 for split in contracts.SPLITS}
    per_byte, per_image = stored_sizes
    files, source_bytes = collections.Counter(), collections.Counter()
    for item in found:
        files[item.assigned_split] += 1
        if dataset.image_size is None:
            source_bytes[item.assigned_split] += _file_size(item)
    stored = {
        split: per_image * files[split] if dataset.image_size else per_byte * source_bytes[split]
        for split in contracts.SPLITS
    }
    return {
        split: shard_writing.shards_for(stored[split], files[split], dataset.shard_size_mb)
        for split in contracts.SPLITS
    }


def _trusted_shards(earlier, shards_dir: pathlib.Path, digests_file: pathlib.Path | None) -> set[str]:
    """The previous shards (by file) that the record of digests vouches for: unchanged since convert wrote or
    checked them (size, time and inode)."""
    if earlier is None or digests_file is None:
        return set()
    trusted = listing.trusted_shards(digests_file, _shard_digests(shards_dir, earlier[0]))
    return {path.name for path in trusted}


def _shard_digests(shards_dir: pathlib.Path, manifest: contracts.Manifest) -> dict[pathlib.Path, str]:
    return {shards_dir / shard.file: shard.sha256 for shard in manifest.shards()}


def _prepared(
    prepare,
    trusted: set[str],
    earlier: tuple[contracts.Manifest, list[contracts.IndexEntry]] | None,
    shard_size_mb: float,
) -> tuple[dict[str, list[shard_writing.Image]], shard_writing.Kept, dict[str, list[shard_writing.Shard]], list, int]:
    """`prepare`'s images of each split in place order (_group_splits), the previous shards kept whole, and all
    laid out in shards (shard_writing.layout), with the rejected files and how many were decoded; with the previous
    shards `trusted` kept whole where nothing in them changes, and every shard read when one of those has no place as
    it is in the new layout."""
    accepted, rejected, decoded, kept = prepare(trusted)
    grouped = _group_splits(accepted)
    layout = shard_writing.layout(grouped, kept, shard_size_mb, earlier)
    if layout is None:
        accepted, rejected, decoded, kept = prepare(set())  # every shard is written again: all are read
        grouped = _group_splits(accepted)
        layout = shard_writing.layout(grouped, kept, shard_size_mb, earlier)
    return grouped, kept, layout, rejected, decoded


def _imbalance(counts: dict[str, int]) -> dict:
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = counts[largest] / counts[smallest] if counts[smallest] else None
    return {"largest": largest, "smallest": smallest, "ratio": round(ratio, 3) if ratio else None}


def _duplicates(entries: list[contracts.IndexEntry]) -> dict:
    """Identical source files under two classes (label conflicts) or in two splits (leakage)."""
    conflicts, leakage = [], []
    groups = changes.identical_groups(entries)
    for group in groups:
        members = [{"path": entry.path, "class": entry.class_name, "split": entry.split} for entry in group]
        members.sort(key=lambda member: member["path"])
        if len({member["class"] for member in members}) > 1:
            conflicts.append({"sha256": group[0].sha256, "files": members})
        if len({member["split"] for member in members}) > 1:
            leakage.append({"sha256": group[0].sha256, "files": members})
    return {"identical_groups": len(groups), "label_conflicts": conflicts, "leakage": leakage}


def _write_rejected(path: pathlib.Path, rejected: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(rejected)
    # surrogateescape: a file name that is not valid UTF-8 is written back as the bytes it has on disk.
    files.write_bytes(path, buffer.getvalue().encode("utf-8", "surrogateescape"))


def summary(manifest: contracts.Manifest, shards_dir: pathlib.Path) -> str:
    """A few lines for people: counts per split and class, imbalance, rejections, duplicates."""
    splits = manifest.splits
    width = max(len(name) for name in manifest.classes + ["class"])
    lines = [f"  {'class':<{width}}  " + "  ".join(f"{split:>10}" for split in splits) + f"  {'total':>8}"]
    for name in manifest.classes:
        counts = [splits[split].per_class[name] for split in splits]
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{count:>10}" for count in counts) + f"  {sum(counts):>8}")
    imbalance = manifest.imbalance
    per_class = manifest.per_class
    ratio = (
        "balanced"
        if imbalance["ratio"] == 1
        else f"{imbalance['ratio']:g}x"
        if imbalance["ratio"]
        else "a class has no images"
    )
    lines.append(
        f"  imbalance: largest {imbalance['largest']!r} {per_class[imbalance['largest']]}, "
        f"smallest {imbalance['smallest']!r} {per_class[imbalance['smallest']]} ({ratio})"
    )
    lines.append(f"  files seen {manifest.files_seen} = accepted {manifest.accepted} + rejected {manifest.rejected}")
    if manifest.rejected:
        with (shards_dir / contracts.REJECTED_FILE).open(
            newline="", encoding="utf-8", errors="surrogateescape"
        ) as stream:
            reasons = collections.Counter(row["reason"].split(":")[0] for row in csv.DictReader(stream))
        lines += [f"    {count} x {reason}" for reason, count in reasons.most_common()] + [
            f"    listed in {shards_dir / contracts.REJECTED_FILE}"
        ]
    duplicates = manifest.duplicates
    if duplicates["identical_groups"]:
        lines.append(
            f"  identical files: {duplicates['identical_groups']} group(s); "
            f"{len(duplicates['label_conflicts'])} under different classes (label conflict), "
            f"{len(duplicates['leakage'])} across splits (leakage); listed in {shards_dir / contracts.MANIFEST_FILE}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(argv)
    result = convert(**arguments(config.load_params()))
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    print(f"convert: {counts} images, {result.rejected_count} rejected, in {result.shards_dir}")
    print(summary(contracts.Manifest.read(result.shards_dir), result.shards_dir))
    print(f"convert: {changes.summary_line(result.report)}")


if __name__ == "__main__":
    sys.exit(errors.run_main(main, exclusive=True))
