"""The shards' reader (train, evaluate, predict): the records that tasks/data/tfrecords.py writes, as tf.data.

The shards folder's manifest (classes, counts, each shard's sha256) is tasks/common/contracts.py's.
A record holds one RGB image as JPEG or PNG (tasks/data/images.py says which), its label (index into the
manifest's classes) and the path it came from, relative to the raw folder, so that a result can be
traced back to its file.
"""

from __future__ import annotations

import pathlib

import tensorflow as tf

from tasks.common import contracts, errors, files, machine
from tasks.data import preprocessing, tfrecords

_FEATURES = {
    tfrecords.ENCODED: tf.io.FixedLenFeature([], tf.string),
    tfrecords.LABEL: tf.io.FixedLenFeature([], tf.int64),
    tfrecords.SOURCE: tf.io.FixedLenFeature([], tf.string),
}


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


# Shards read at a time, interleaved record by record: one a core, at most 8. A split has up to thousands of shards
# of about a megabyte (dataset.shard_size_mb), and a reader per shard held a buffer and a thread each; more readers
# than cores cost the streaming train stage a tenth of its images/s (2 cores: 8 readers 0.883x the images/s of
# the cached split, 2 readers 0.977x; bench.streaming).
PARALLEL_READS = min(8, machine.usable_cores())
PARSE_BATCH = 64


def read_split(
    shards_dir: pathlib.Path,
    split: str,
    image_size: tuple[int, int],
    with_source: bool = False,
    shuffle_buffer: int = 0,
    seed: int | None = None,
) -> tf.data.Dataset:
    """(uint8 image of `image_size` x 3, label[, source path]) of one split, in the order they were written; with a
    `shuffle_buffer`, in a new order every iteration (see read_batches)."""
    manifest = contracts.Manifest.read(shards_dir)
    # Decoded PARSE_BATCH at a time, then handed out one by one (which leaves the count unknown to tf.data).
    return (
        _batches(shards_dir, manifest, split, image_size, PARSE_BATCH, with_source, shuffle_buffer, seed)
        .unbatch()
        .apply(tf.data.experimental.assert_cardinality(manifest.count(split)))
    )


def read_batches(
    shards_dir: pathlib.Path,
    split: str,
    image_size: tuple[int, int],
    batch_size: int,
    with_source: bool = False,
    shuffle_buffer: int = 0,
    seed: int | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of `batch_size` (uint8 images of `image_size` x 3, labels[, source paths]) of one split, in the order
    they were written; with a `shuffle_buffer`, in a new order every iteration, shuffled as stored records, before
    they are decoded (the buffer holds compressed images: 20,000 photos of 224x224 about 0.4 GB, not 3 GB of
    pixels).

    A batch of records is parsed together and its images decoded in one map call: tf.data's cost for every element
    of every stage (a map per record, its parse on its own, then a batch) is much of a 32x32 image's. CPU an image
    read, shuffled, decoded and batched (2 cores): 63-67 us when each record went through tf.data alone, 56-58 us
    decoded 64 at a time and batched again, 49-53 us decoded in the batch it is used in.
    """
    manifest = contracts.Manifest.read(shards_dir)
    return _batches(
        shards_dir, manifest, split, image_size, batch_size, with_source, shuffle_buffer, seed, drop_remainder
    )


def _batches(
    shards_dir: pathlib.Path,
    manifest: contracts.Manifest,
    split: str,
    image_size: tuple[int, int],
    batch_size: int,
    with_source: bool,
    shuffle_buffer: int,
    seed: int | None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """read_batches with the shards folder's manifest already read (read_split reads it once for both)."""
    paths = [str(path) for path in verify_shards(shards_dir, manifest, split)]
    height, width = image_size
    # Stored at the size they are read at (convert's dataset.image_size): none is resized, and no image pays for
    # the check (a conditional per image in the loop over the batch was up to a sixth of a 32x32 image's CPU).
    stored_at_size = manifest.image_size is not None and tuple(manifest.image_size) == (height, width)

    def decode(serialized: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """A batch of records: parsed together, each image decoded and sized on its own."""
        examples = tf.io.parse_example(serialized, _FEATURES)
        images = tf.map_fn(
            lambda encoded: _decoded(encoded, (height, width), resize=not stored_at_size),
            examples[tfrecords.ENCODED],
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.uint8),
        )
        if with_source:
            return images, examples[tfrecords.LABEL], examples[tfrecords.SOURCE]
        return images, examples[tfrecords.LABEL]

    parallel_reads = min(len(paths), PARALLEL_READS) if len(paths) > 1 else None
    records_count = manifest.count(split)
    stored = tf.data.TFRecordDataset(paths, num_parallel_reads=parallel_reads)
    if shuffle_buffer:
        stored = stored.shuffle(min(records_count, shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    # The manifest's count makes the number of batches known to Keras (else it warns that the data "ran out" at
    # the end of every evaluation), and shards with records missing fail loudly (those of a whole batch, at least:
    # the shards' sha256 were checked already). Asserted on batches, not records: one step less for every image.
    whole, rest = divmod(records_count, batch_size)
    return (
        stored.batch(batch_size, drop_remainder=drop_remainder)
        .apply(tf.data.experimental.assert_cardinality(whole + (1 if rest and not drop_remainder else 0)))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    )


def _decoded(encoded: tf.Tensor, image_size: tuple[int, int], resize: bool = True) -> tf.Tensor:
    """One stored image as uint8 RGB pixels of `image_size`, resampled to it when `resize` and of another size
    (without `resize`, of that size already: the shards' sha256 vouch for what the manifest says)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(preprocessing.resize(image, image_size), (*image_size, 3)) if resize else image
