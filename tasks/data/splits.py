"""Which split an image belongs to: a function of the image's own name and the fractions, nothing else.

Each image gets a position in [0, 1) from a hash of dataset.split_seed, its class and its path inside the class
folder, as TensorFlow's image-retraining script assigns splits from a hash of the file name. (The class
is part of it because folders often name their files alike, 0001.jpg in every class: without it, all
classes would split the same way.) Positions below
test_fraction are test, the next validation_fraction are validation, the rest train. So:

- adding, removing or renaming other files never moves an image: the gate compares a champion and
  a challenger on test images neither trained on, however the folder grew in between;
- changing a fraction moves only the images between the old and the new boundary.

The price: a class's share in each split is the fraction on average, not exactly. Exact shares would
make one image's split depend on how many others there are, which is the bug this replaces; on 20
images and a test fraction of 0.2, the test split holds 4 +- 1.8 of them (binomial).
"""

from __future__ import annotations

import hashlib
import unicodedata

_SCALE = float(1 << 64)


def position(seed: int, class_name: str, path_in_class: str) -> float:
    """The image's place in [0, 1): uniform over images, fixed for a given seed, class and path."""
    name = unicodedata.normalize("NFC", f"{class_name}/{path_in_class}")
    digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def path_in_class(source: str, in_split_folder: bool) -> str:
    """The path of a file below its class folder (what its place is taken of), from its path in the raw folder:
    class/name, or split/class/name when the source brings split folders."""
    return source.split("/", 2 if in_split_folder else 1)[-1]


def split_of(place: float, given_split: str | None, fractions: dict[str, float]) -> str:
    """The split of an image at `place`; `fractions` holds the splits carved here ("test", "validation").

    An image in a split folder the source brings stays there, unless validation is carved from its train/.
    """
    if given_split not in (None, "train"):
        return given_split
    boundary = 0.0
    for split in ("test", "validation"):
        boundary += fractions.get(split, 0.0)
        if place < boundary:
            return split
    return "train"


_SHARD_BITS = float(1 << 24)  # the place's upper 24 bits set its split; the bits below, its shard


def shard_of(place: float, shards: int) -> int:
    """Which of `shards` (a power of two) shards of its split the image at `place` goes to.

    From the place's lower bits (scaled by 2**24 and taken modulo 1, both exact in floating point): uniform over
    the shards whatever the split's range of places, and fixed while the number of shards is. An image added to a
    folder so lands in one shard; the others keep their images and their bytes (convert keeps those files).
    """
    return int(place * _SHARD_BITS % 1.0 * shards)
