"""The tf.data input pipelines: training (shuffled, distorted) and evaluation (centre crops, nothing random).

Shards are read in parallel and decoded in parallel by records.read_split; the decoded training split
is cached in memory when it fits, then shuffled, batched at the global batch size, distorted a whole
batch at a time and prefetched. Distortions are Keras preprocessing layers run inside the tf.data map,
so they cost no accelerator time and never end up in the saved model. Validation (train) and the test
split (evaluate) go through the same `evaluation_data`, so both see exactly what a served image is.
"""

from __future__ import annotations

import pathlib

import keras
import tensorflow as tf

from tasks import files, records

PREPROCESSING_FILE = "preprocessing.json"
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
) -> tf.data.Dataset:
    """Batches of (uint8 images of `input_size`, int64 labels), reshuffled and freshly distorted every epoch.

    `drop_remainder` keeps every batch whole, which several workers need to take the same number of steps.
    """
    count = records.read_manifest(shards_dir)["splits"]["train"]["count"]
    data = records.read_split(shards_dir, "train", image_size)
    if count * image_size[0] * image_size[1] * 3 <= cache_mb * 2**20:
        data = data.cache()  # decoding and resizing happen once, not once per epoch
    data = data.shuffle(min(count, shuffle_buffer), seed=seed, reshuffle_each_iteration=True).batch(batch_size, drop_remainder=drop_remainder)
    distort = _distortion(augment, image_size, input_size, crop_padding, seed)
    return data.map(lambda images, labels: (distort(images), labels), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def evaluation_data(
    shards_dir: pathlib.Path, split: str, image_size: tuple[int, int], input_size: tuple[int, int], batch_size: int, with_source: bool = False
) -> tf.data.Dataset:
    """Batches of (uint8 images, labels[, source paths]) of one split in stored order: decoded at `image_size`,
    centre-cropped to `input_size`."""
    height, width = input_size
    return (
        records.read_split(shards_dir, split, image_size, with_source=with_source)
        .batch(batch_size)
        .map(lambda images, *rest: (tf.image.resize_with_crop_or_pad(images, height, width), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    )


def channel_mean(shards_dir: pathlib.Path, image_size: tuple[int, int]) -> list[float]:
    """The mean of each colour channel over the training split, in [0, 1] (ResNet subtracts it)."""
    per_image = records.read_split(shards_dir, "train", image_size).map(
        lambda image, label: tf.reduce_mean(tf.cast(image, tf.float64), axis=[0, 1]) / 255.0, num_parallel_calls=tf.data.AUTOTUNE
    )
    total, count = per_image.reduce((tf.zeros(3, tf.float64), tf.constant(0.0, tf.float64)), lambda state, mean: (state[0] + mean, state[1] + 1.0))
    return [float(value) for value in (total / count).numpy()]


def write_preprocessing(model_dir: pathlib.Path, image_size: tuple[int, int], input_size: tuple[int, int]) -> None:
    """Records how the model's images were prepared, for evaluate (the model itself only knows `input_size`)."""
    files.write_json(model_dir / PREPROCESSING_FILE, {"image_size": list(image_size), "input_size": list(input_size)})


def read_preprocessing(model_dir: pathlib.Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image_size, input_size) the model in `model_dir` was trained with."""
    recorded = files.read_json(model_dir / PREPROCESSING_FILE, "run the train stage first")
    return tuple(recorded["image_size"]), tuple(recorded["input_size"])


def _distortion(augment: tuple[str, ...], image_size: tuple[int, int], input_size: tuple[int, int], crop_padding: int, seed: int):
    """A function of a uint8 batch: the `augment` distortions in the tutorial's order, then the crop to `input_size`."""
    layers = []
    if "crop" in augment:
        # A random input_size window of the padded image, drawn per image: Keras' RandomCrop draws one
        # window per batch, so shift each image by up to the spare margin, then take the centre.
        margin_height = (image_size[0] + 2 * crop_padding - input_size[0]) // 2
        margin_width = (image_size[1] + 2 * crop_padding - input_size[1]) // 2
        if crop_padding:
            layers.append(keras.layers.ZeroPadding2D(crop_padding))
        layers.append(keras.layers.RandomTranslation(
            margin_height / (image_size[0] + 2 * crop_padding), margin_width / (image_size[1] + 2 * crop_padding),
            fill_mode="constant", interpolation="nearest", seed=seed,
        ))
    if "flip" in augment:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 1))
    if "shift" in augment:
        layers.append(keras.layers.RandomTranslation(SHIFT_FRACTION, SHIFT_FRACTION, fill_mode="nearest", seed=seed + 2))
    if "brightness" in augment:
        layers.append(keras.layers.RandomBrightness(BRIGHTNESS_DELTA, value_range=(0, 255), seed=seed + 3))
    if "contrast" in augment:
        layers.append(keras.layers.RandomContrast(CONTRAST_FACTOR, value_range=(0, 255), seed=seed + 4))
    height, width = input_size

    def distort(images: tf.Tensor) -> tf.Tensor:
        if layers:
            distorted = tf.cast(images, tf.float32)
            for layer in layers:
                distorted = layer(distorted, training=True)
            # The model takes uint8 pixels, as a served model will.
            images = tf.cast(tf.round(tf.clip_by_value(distorted, 0.0, 255.0)), tf.uint8)
        return tf.image.resize_with_crop_or_pad(images, height, width)

    return distort
