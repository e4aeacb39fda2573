"""The tf.data input pipelines: training (shuffled, distorted) and evaluation (centre crops, nothing random).

Shards are read in parallel and decoded in parallel by tasks/data/records.py. When the decoded training split fits
`cache_mb` it is held in memory as one tensor and every epoch takes batches of a new permutation of it; otherwise
every epoch reads the shards again through a shuffle buffer of their records (still compressed). Batches have the
global batch size and are distorted a whole batch at a time, then prefetched. Distortions run inside the tf.data
map as XLA-compiled functions, so they cost no accelerator time and never end up in the saved model.
Validation (train) and the test split (evaluate) go through the same `evaluation_data`, so both see
exactly what a served image is.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable

import tensorflow as tf

from tasks.common import contracts, machine
from tasks.data import preprocessing, records

# The seeds' distortion strengths: the Keras CIFAR-10 example's 10% shifts, the tutorial's brightness
# (max_delta 63 of 255) and contrast (x0.2..1.8).
SHIFT_FRACTION = 0.1
BRIGHTNESS_DELTA = 63 / 255
CONTRAST_FACTOR = 0.8


def training_data(
    shards_dir: pathlib.Path,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    crop_padding: int,
    augment: tuple[str, ...],
    batch_size: int,
    shuffle_buffer: int,
    cache_mb: int,
    seed: int,
    drop_remainder: bool = False,
    replicas: int = 1,
) -> tf.data.Dataset:
    """Batches of (uint8 images of `input_size`, int64 labels), reshuffled and freshly distorted every epoch.

    `drop_remainder` keeps every batch whole, which several workers need to take the same number of steps.
    With several `replicas` (of a batch_size they divide), an epoch's last, partial batch is cut to a multiple
    of them (dropped when smaller): see split_evenly().
    """
    count = contracts.Manifest.read(shards_dir).count("train")
    distort = _distortion(tuple(augment), tuple(image_size), tuple(input_size), crop_padding)
    if fits_in_memory(count, image_size, cache_mb):
        split = records.read_split(shards_dir, "train", image_size)
        batches = _from_memory(split, count, batch_size, seed, drop_remainder, replicas, distort)
    else:
        split = records.read_batches(
            shards_dir,
            "train",
            image_size,
            batch_size,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            drop_remainder=drop_remainder,
        )
        batches = _from_shards(split, seed, replicas, distort)
    return batches.prefetch(tf.data.AUTOTUNE)


def _from_memory(
    split: tf.data.Dataset,
    count: int,
    batch_size: int,
    seed: int,
    drop_remainder: bool,
    replicas: int,
    distort: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
) -> tf.data.Dataset:
    """Distorted batches of the decoded split held in memory as one tensor: every epoch a new permutation
    of all of it, each batch gathered from it by its indices.

    One gather per batch instead of tf.data's cache, shuffle and batch handing over each image on its own:
    1.3x the images/s of those on 2 cores, measured (bench/input_pipeline.py), and the shuffle is a whole
    permutation, not a buffer's. The split is read once, in the first epoch: the decode map and the batch
    of every image fuse (tf.data's map_and_batch_fusion), so each image is copied into the one tensor as it
    is decoded, and the memory held is the split's size, not twice it.
    """
    steps = batches_per_epoch(count, batch_size, replicas, drop_remainder)
    whole = split.batch(count).cache()
    # One seed an epoch, different in every one (a repeated dataset iterates this again each epoch).
    epoch_seeds = tf.data.Dataset.random(seed, rerandomize_each_iteration=True).batch(2).take(1)

    def epoch(split_batch: tuple[tf.Tensor, tf.Tensor], epoch_seed: tf.Tensor) -> tf.data.Dataset:
        images, labels = split_batch
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), epoch_seed)

        def batch(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            indices = order[step * batch_size : (step + 1) * batch_size]
            if replicas > 1:  # cut as split_evenly cuts a batch
                indices = indices[: tf.shape(indices)[0] // replicas * replicas]
            # The batch is gathered from the split inside the distortion's compiled program, not copied out first.
            seed = tf.random.experimental.stateless_fold_in(epoch_seed, step)
            return distort(images, seed, indices), tf.gather(labels, indices)

        return tf.data.Dataset.range(steps).map(batch, num_parallel_calls=tf.data.AUTOTUNE)

    # Without tf.data's autotuning model: with it, destroying the iterator at the end of model.fit waited 1.6-5.8 s
    # in 7 of 27 trainings of bench.warm_start, every thread of the process asleep (TensorFlow's root iterator
    # waiting on a thread of its pool), and in none of 15 without it; and with its thread's CPU beside the step's, a
    # keras_cnn stage spent 1.14x a bare fit's CPU an image (1.00x without: bench.train_throughput). The map
    # and the prefetch after it then take tf.data's fixed defaults for AUTOTUNE; a batch here is one gather and
    # the distortion's programs.
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.zip(whole, epoch_seeds).flat_map(epoch).with_options(options)


def _from_shards(
    batches: tf.data.Dataset, seed: int, replicas: int, distort: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
) -> tf.data.Dataset:
    """`batches` read from the shards every epoch (and shuffled there, through a buffer), distorted."""
    if replicas > 1:
        batches = batches.map(lambda images, labels: split_evenly(images, labels, replicas)).filter(
            lambda images, labels: tf.shape(images)[0] > 0
        )
    # A fresh, seeded pair of random seeds for every batch, different in every epoch.
    seeds = tf.data.Dataset.random(seed, rerandomize_each_iteration=True).batch(2)
    distorted = tf.data.Dataset.zip(batches, seeds).map(
        lambda batch, batch_seed: (distort(batch[0], batch_seed), batch[1]), num_parallel_calls=tf.data.AUTOTUNE
    )
    # Reading and decoding run beside the training step every epoch; on threads of their own, a core fewer than
    # the machine's, they leave the step a core. On 2 cores, keras_cnn at 32x32 in turns in one script took
    # 1,222-1,426 images/s this way and 1,157-1,228 on tf.data's shared threads (the cached split: 1,165-1,377);
    # bench.streaming's runs, noisier, did not tell the two apart. The cached split's batches, a gather each, were
    # slower on threads of their own (docs/benchmarks-history.md).
    options = tf.data.Options()
    options.threading.private_threadpool_size = max(1, machine.usable_cores() - 1)
    return distorted.with_options(options)


def fits_in_memory(count: int, image_size: tuple[int, int], cache_mb: int) -> bool:
    """Whether `count` decoded images of `image_size` take at most `cache_mb` MiB (train.cache_mb)."""
    return count * image_size[0] * image_size[1] * 3 <= cache_mb * 2**20


def bounded_shuffle_buffer(manifest: contracts.Manifest, shuffle_buffer: int, shuffle_mb: int) -> int:
    """train.shuffle_buffer images of the training split, or fewer when their stored images would take more than
    train.shuffle_mb MiB: the buffer holds records as stored (compressed), and 20,000 photos kept at their own size
    (a few MB each from a phone) would not fit in memory. Sized by the split's mean stored image; a manifest without
    those sizes (an earlier release's) leaves the count as it is."""
    mean_bytes = mean_stored_bytes(manifest, "train")
    if mean_bytes is None:
        return shuffle_buffer
    return max(1, min(shuffle_buffer, int(shuffle_mb * 2**20 // max(1.0, mean_bytes))))


def mean_stored_bytes(manifest: contracts.Manifest, split: str) -> float | None:
    """The mean size of a split's encoded images in its shards, as the manifest records them; None when it does
    not (an earlier release's manifest) or the split is empty."""
    shards = manifest.splits[split].shards
    if not shards or any(shard.image_bytes is None for shard in shards):
        return None
    return sum(shard.image_bytes for shard in shards) / max(1, manifest.count(split))


def batches_per_epoch(count: int, batch_size: int, replicas: int = 1, drop_remainder: bool = False) -> int:
    """How many batches training_data makes of `count` images an epoch."""
    whole, rest = divmod(count, batch_size)
    return whole + (0 if drop_remainder or rest < replicas else 1)


def split_evenly(images: tf.Tensor, labels: tf.Tensor, replicas: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The batch cut to a multiple of `replicas` images. Keras splits each global batch over the replicas
    and, before its first step, averages the first batch over them (the `_maybe_symbolic_build` of its
    TensorFlow trainer), which fails unless every replica got the same number of images ("Inputs to
    operation AddN ... must have the same size and shape"). Even splits also weigh every image alike. The
    few images cut off (fewer than `replicas`) are reshuffled into the next epoch."""
    kept = tf.shape(images)[0] // replicas * replicas
    return images[:kept], labels[:kept]


def evaluation_data(
    shards_dir: pathlib.Path,
    split: str,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    batch_size: int,
    with_source: bool = False,
) -> tf.data.Dataset:
    """Batches of (uint8 images, labels[, source paths]) of one split in stored order: decoded at `image_size`,
    centre-cropped to `input_size`."""
    return records.read_batches(shards_dir, split, image_size, batch_size, with_source=with_source).map(
        lambda images, *rest: (preprocessing.centre_crop(images, input_size), *rest),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def channel_mean(shards_dir: pathlib.Path, image_size: tuple[int, int]) -> list[float]:
    """The mean of each colour channel over the training split, in [0, 1] (ResNet subtracts it)."""
    per_image = records.read_split(shards_dir, "train", image_size).map(
        lambda image, label: tf.reduce_mean(tf.cast(image, tf.float64), axis=[0, 1]) / 255.0,
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    total, count = per_image.reduce(
        (tf.zeros(3, tf.float64), tf.constant(0.0, tf.float64)), lambda state, mean: (state[0] + mean, state[1] + 1.0)
    )
    return [float(value) for value in (total / count).numpy()]


@functools.cache  # one function per setting, so that every pipeline of a process shares its compiled programs
def _distortion(augment: tuple[str, ...], image_size: tuple[int, int], input_size: tuple[int, int], crop_padding: int):
    """A function of (a uint8 batch, a seed): the `augment` distortions in the tutorial's order, cropped to
    `input_size`.

    Written with plain TensorFlow ops rather than Keras' preprocessing layers: with those, crop, flip,
    brightness and contrast delivered 12,000 images/s of 32x32 on 2 cores, with these 110,000-125,000
    (bench/input_pipeline.py; docs/benchmarks-history.md has the profile). The geometric distortions (crop, flip,
    shift) only move whole pixels, so they are one gather of rows and one of columns of the uint8 images,
    each image with its own window; brightness and contrast then run once over the batch in float32.
    Random draws are stateless, from the batch's own seed: reproducible with any number of parallel calls.

    Each half is one XLA program: the gathers, the arithmetic and the casts fuse into a few loops over the
    pixels instead of a pass over the batch per TensorFlow op (about 2x faster on CPU, measured). They are
    two programs, not one, because XLA fuses the gathers into both readers of their result, the contrast's
    mean and the arithmetic, and so gathers every pixel twice: one program took 0.69 ms per batch of
    128 32x32 images, the two 0.42 ms. A batch of the split held in memory is gathered from it by the first
    program too, not copied out of it before.
    """
    geometric = _geometric_distortion(augment, image_size, input_size, crop_padding)
    colour = _colour_distortion(augment, input_size)

    def distort(images: tf.Tensor, seed: tf.Tensor, indices: tf.Tensor | None = None) -> tf.Tensor:
        """The distorted batch of `images`, or of images[indices] when given."""
        # Each program splits the batch's seed into the same five, one per distortion (geometric takes the first
        # three, colour the last two): inside them, not as two more operations per batch.
        images = geometric(images, tf.range(tf.shape(images)[0]) if indices is None else indices, seed)
        return images if colour is None else colour(images, seed)

    return distort


def _geometric_distortion(
    augment: tuple[str, ...], image_size: tuple[int, int], input_size: tuple[int, int], crop_padding: int
):
    """Crop, flip and shift as one compiled function of (uint8 images, the indices of a batch of them, the batch's
    seed): the batch gathered, distorted and cropped to `input_size`."""
    height, width = input_size
    padded_height, padded_width = image_size[0] + 2 * crop_padding, image_size[1] + 2 * crop_padding

    @tf.function(jit_compile=True)
    def distort(images: tf.Tensor, indices: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        crop_seed, flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 5)[:3])
        batch = tf.shape(indices)[0]
        # Where each output pixel is taken from, per image: rows (batch, height), columns (batch, width).
        rows, columns = (
            tf.tile(tf.range(height)[tf.newaxis], [batch, 1]),
            tf.tile(tf.range(width)[tf.newaxis], [batch, 1]),
        )
        if "shift" in augment:
            # Up to 10% of each side, the borders repeated (the seed's fill_mode nearest).
            shift_rows, shift_columns = round(SHIFT_FRACTION * height), round(SHIFT_FRACTION * width)
            shift_rows = tf.random.stateless_uniform([batch, 1], shift_seed, -shift_rows, shift_rows + 1, tf.int32)
            shift_columns = tf.random.stateless_uniform(
                [batch, 1], shift_seed + 1, -shift_columns, shift_columns + 1, tf.int32
            )
            rows, columns = (
                tf.clip_by_value(rows - shift_rows, 0, height - 1),
                tf.clip_by_value(columns - shift_columns, 0, width - 1),
            )
        if "flip" in augment:
            flipped = tf.random.stateless_uniform([batch, 1], flip_seed) < 0.5
            columns = tf.where(flipped, width - 1 - columns, columns)
        if "crop" in augment:
            # A random input_size window of the zero-padded image, drawn per image (Keras' RandomCrop draws one
            # per batch).
            top = tf.random.stateless_uniform([batch, 1], crop_seed, 0, padded_height - height + 1, tf.int32)
            left = tf.random.stateless_uniform([batch, 1], crop_seed + 1, 0, padded_width - width + 1, tf.int32)
        else:
            top, left = (padded_height - height) // 2, (padded_width - width) // 2  # the centre
        rows, columns = rows + top - crop_padding, columns + left - crop_padding  # in the unpadded image
        rows_inside, columns_inside = (rows >= 0) & (rows < image_size[0]), (columns >= 0) & (columns < image_size[1])
        inside = rows_inside[:, :, tf.newaxis] & columns_inside[:, tf.newaxis, :]
        images = tf.gather(images, indices)
        images = tf.gather(images, tf.clip_by_value(rows, 0, image_size[0] - 1), axis=1, batch_dims=1)
        images = tf.gather(images, tf.clip_by_value(columns, 0, image_size[1] - 1), axis=2, batch_dims=1)
        return tf.where(inside[..., tf.newaxis], images, tf.zeros_like(images))  # the padding

    return distort


def _colour_distortion(augment: tuple[str, ...], input_size: tuple[int, int]):
    """Brightness and contrast as one compiled function of (a uint8 batch, its seed); None when
    `augment` has neither."""
    if "brightness" not in augment and "contrast" not in augment:
        return None
    height, width = input_size

    @tf.function(jit_compile=True)
    def distort(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        brightness_seed, contrast_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 5)[3:])
        batch = tf.shape(images)[0]
        # As the tutorial does it (tf.image.random_brightness, then random_contrast, on floats, clipped once
        # at the end): x + delta, then each channel's distance from its mean scaled by `factor`, which is
        # (x - mean) * factor + mean + delta = x * factor + (mean * (1 - factor) + delta): one multiply-add per
        # pixel (10% faster), after one pass to take the means.
        pixels = tf.cast(images, tf.float32)
        delta, factor, mean = 0.0, 1.0, 0.0
        if "brightness" in augment:
            delta = tf.random.stateless_uniform(
                [batch, 1, 1, 1], brightness_seed, -BRIGHTNESS_DELTA * 255, BRIGHTNESS_DELTA * 255
            )
        if "contrast" in augment:
            factor = tf.random.stateless_uniform(
                [batch, 1, 1, 1], contrast_seed, 1 - CONTRAST_FACTOR, 1 + CONTRAST_FACTOR
            )
            # Summed as integers: exact, and twice as fast as a float mean here.
            mean = tf.cast(tf.reduce_sum(tf.cast(images, tf.int32), axis=[1, 2], keepdims=True), tf.float32) / (
                height * width
            )
        pixels = tf.clip_by_value(pixels * factor + (mean * (1 - factor) + delta), 0.0, 255.0)
        # The model takes uint8 pixels, as a served model will (clipped already: a plain cast).
        return tf.cast(tf.round(pixels), tf.uint8)

    return distort
