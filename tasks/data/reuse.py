"""What an earlier conversion already did: its encoded images, found again by the content of their files.

A nightly run adds a few images to a folder of thousands: decoding, validating and re-encoding every
file again would cost the whole conversion each night. The previous shards hold every accepted image
as it would be encoded now (same Pillow, same image_size), and their index names each record's source
file and its sha256, so a file whose bytes were converted before is copied from there instead: renamed
or moved files too. The shards are checked against their manifest's sha256 first; anything that does
not check out is converted again from its source.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import BinaryIO

from tasks.common import contracts, errors
from tasks.data import records


@dataclasses.dataclass(frozen=True)
class Stored:
    """An image of the previous shards, copied to the spool."""

    offset: int
    length: int  # in the spool
    encoded_size: int
    serialized: bool  # the whole record, for the same file under the same label; else the encoded image
    entry: contracts.IndexEntry  # its row in the previous index


def spool_previous(
    shards_dir: pathlib.Path,
    image_size: tuple[int, int] | None,
    wanted: dict[str, tuple[str, int]],
    spool: BinaryIO,
) -> tuple[dict[str, Stored], dict[str, Stored]]:
    """Copies to `spool` what the shards in `shards_dir` hold of `wanted` (path -> (sha256, label) of each
    file now): (by path: whole records of files unchanged in name, bytes and label; by sha256: the
    encoded images of any other wanted content)."""
    previous = _previous(shards_dir, image_size)
    if previous is None:
        return {}, {}
    manifest, entries = previous
    wanted_digests = {digest for digest, _ in wanted.values()}
    by_path = {entry.path: entry for entry in entries if entry.sha256 in wanted_digests}
    if not by_path:
        return {}, {}
    try:
        paths = [path for split in manifest.splits for path in records.verify_shards(shards_dir, manifest, split)]
    except (errors.BadInput, errors.MissingInput) as error:
        print(f"convert: converting every file again, as the previous shards do not check out: {error}")
        return {}, {}
    old_labels = {name: label for label, name in enumerate(manifest.classes)}
    whole: dict[str, Stored] = {}
    encoded_only: dict[str, Stored] = {}
    for path in paths:
        for serialized, source, encoded in records.read_records(path):
            entry = by_path.get(source)
            if entry is None:
                continue
            if wanted.get(source) == (entry.sha256, old_labels[entry.class_name]):
                # The same file, bytes and label: its record is copied whole, not built again.
                whole[source] = Stored(spool.tell(), len(serialized), len(encoded), True, entry)
                spool.write(serialized)
            elif entry.sha256 not in encoded_only:
                encoded_only[entry.sha256] = Stored(spool.tell(), len(encoded), len(encoded), False, entry)
                spool.write(encoded)
    return whole, encoded_only


def _previous(
    shards_dir: pathlib.Path, image_size: tuple[int, int] | None
) -> tuple[contracts.Manifest, list[contracts.IndexEntry]] | None:
    """The previous conversion's manifest and index, when there is one made with the same image_size."""
    if not (shards_dir / contracts.MANIFEST_FILE).is_file() or not (shards_dir / contracts.INDEX_FILE).is_file():
        return None  # the first conversion, or one by a release that wrote no index
    try:
        manifest, entries = contracts.Manifest.read(shards_dir), contracts.read_index(shards_dir)
    except (errors.BadInput, errors.MissingInput) as error:
        print(f"convert: converting every file again: {error}")
        return None
    if manifest.image_size != (list(image_size) if image_size else None):
        return None  # stored at another size: every image is resized again
    return manifest, entries
