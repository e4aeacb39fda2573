"""What an earlier conversion already did: its encoded images, found again by the content of their files.

A nightly run adds a few images to a folder of thousands: decoding, validating and re-encoding every
file again would cost the whole conversion each night. The previous shards hold every accepted image
as it would be encoded now (same Pillow, same image_size), and their index names each record's source
file and its sha256, so a file whose bytes were converted before is copied from there instead: renamed
or moved files too. The shards are checked against their manifest's sha256 first; anything that does
not check out is converted again from its source.
"""

from __future__ import annotations

import pathlib
from typing import BinaryIO

from tasks.common import contracts, errors
from tasks.data import records

Reused = dict[str, tuple[int, int, contracts.IndexEntry]]  # source sha256 -> (spool offset, size, its old row)


def spool_previous(
    shards_dir: pathlib.Path, image_size: tuple[int, int] | None, wanted: set[str], spool: BinaryIO
) -> Reused:
    """Copies the encoded images of the shards in `shards_dir` whose source sha256 is in `wanted` to `spool`."""
    previous = _previous(shards_dir, image_size)
    if previous is None:
        return {}
    manifest, entries = previous
    by_path = {entry.path: entry for entry in entries if entry.sha256 in wanted}
    if not by_path:
        return {}
    try:
        paths = [path for split in manifest.splits for path in records.verify_shards(shards_dir, manifest, split)]
    except (errors.BadInput, errors.MissingInput) as error:
        print(f"convert: converting every file again, as the previous shards do not check out: {error}")
        return {}
    reused: Reused = {}
    for path in paths:
        for source, encoded in records.read_encoded(path):
            entry = by_path.get(source)
            if entry is not None and entry.sha256 not in reused:
                reused[entry.sha256] = (spool.tell(), len(encoded), entry)
                spool.write(encoded)
    return reused


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
