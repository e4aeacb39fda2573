"""The TFRecord schema, in one place: the writer's encoder (convert) and the reader (train, evaluate).

The shards folder's manifest (classes, counts, each shard's sha256) is tasks/common/contracts.py's.
A record holds one RGB image as JPEG or PNG (tasks/data/images.py says which), its label (index into the
manifest's classes) and the path it came from, relative to the raw folder, so that a result can be
traced back to its file.
"""

from __future__ import annotations

import os
import pathlib
import struct

import tensorflow as tf

from tasks.common import contracts, errors, files
from tasks.data import preprocessing

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/source": tf.io.FixedLenFeature([], tf.string),
}


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def serialize(encoded: bytes, label: int, source: str) -> bytes:
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "image/source": tf.train.Feature(bytes_list=tf.train.BytesList(value=[os.fsencode(source)])),
    }
    # deterministic: map entries (the features) in key order; otherwise their order follows the
    # process's string hash seed, and the same images would give other shard bytes in every process.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def encoded_image(serialized: bytes) -> bytes:
    """The encoded image of a serialized record."""
    return tf.train.Example.FromString(serialized).features.feature["image/encoded"].bytes_list.value[0]


def iterate_records(data: bytes, path: pathlib.Path):
    """(offset, serialized record, source path, encoded image) of every record in `data`, a shard's bytes.

    The TFRecord framing (length, its CRC, the record, its CRC) is read here rather than by
    tf.data.TFRecordDataset, whose iteration from Python costs ~100 us a record: most of a nightly
    conversion that reuses 50,000 images. The CRCs are not checked: callers check the whole shard's
    sha256 first.
    """
    position = 0
    while position < len(data):
        (length,) = struct.unpack_from("<Q", data, position)
        start, end = position + 12, position + 12 + length
        if end + 4 > len(data):
            raise errors.BadInput(f"shard {path} ends inside a record: it is cut off; run the convert stage again")
        serialized = data[start:end]
        feature = tf.train.Example.FromString(serialized).features.feature
        yield (
            start,
            serialized,
            os.fsdecode(feature["image/source"].bytes_list.value[0]),
            feature["image/encoded"].bytes_list.value[0],
        )
        position = end + 4


# Shards already checked by this process, by (path, size, modification time, inode): train reads its
# training split twice (the images and a preview); hashing costs ~0.2 s per 100 MB shard.
_verified: set[tuple[str, int, int, int]] = set()


def verify_shards(shards_dir: pathlib.Path, manifest: contracts.Manifest, split: str) -> list[pathlib.Path]:
    """The split's shard paths, each checked against the manifest's sha256 before anything reads it.

    A flipped bit or a cut-off shard would otherwise surface, if at all, as a TFRecord CRC error
    mid-epoch; the sha256 check stops the stage before it starts, naming the shard.
    """
    remedy = (
        "run `dvc repro` (it restores the shards from the DVC cache, or runs convert again) "
        "or `python -m tasks.convert`"
    )
    paths = []
    for shard in manifest.splits[split].shards:
        path = shards_dir / shard.file
        if not path.is_file():
            raise errors.MissingInput(
                f"shard {path} listed in {shards_dir / contracts.MANIFEST_FILE} is missing; {remedy}"
            )
        status = path.stat()
        identity = (str(path.resolve()), status.st_size, status.st_mtime_ns, status.st_ino)
        if identity not in _verified:
            if files.sha256_of(path) != shard.sha256:
                raise errors.BadInput(
                    f"shard {path} does not match its sha256 in {shards_dir / contracts.MANIFEST_FILE}: "
                    f"it is corrupted or cut off; {remedy}"
                )
            _verified.add(identity)
        paths.append(path)
    return paths


def read_split(
    shards_dir: pathlib.Path, split: str, image_size: tuple[int, int], with_source: bool = False
) -> tf.data.Dataset:
    """(uint8 image of `image_size` x 3, label[, source path]) of one split, in the order they were written."""
    manifest = contracts.Manifest.read(shards_dir)
    paths = [str(path) for path in verify_shards(shards_dir, manifest, split)]
    height, width = image_size

    def decode(serialized: tf.Tensor) -> tuple[tf.Tensor, ...]:
        example = tf.io.parse_single_example(serialized, _FEATURES)
        image = tf.io.decode_image(example["image/encoded"], channels=3, expand_animations=False)
        # Resampled once (then cached) when the stored size is not the fed size.
        image = tf.ensure_shape(preprocessing.resize(image, (height, width)), (height, width, 3))
        if with_source:
            return image, example["image/class/label"], example["image/source"]
        return image, example["image/class/label"]

    # The manifest's count makes the size known to Keras, and a shard with missing records fail loudly.
    records_count = manifest.count(split)
    return (
        tf.data.TFRecordDataset(paths, num_parallel_reads=len(paths) if len(paths) > 1 else None)
        .apply(tf.data.experimental.assert_cardinality(records_count))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    )
