"""How a decoded image becomes what a network sees, in one place for every path an image takes.

Training's validation, evaluate, the champion's re-scoring, predict, the registered MLflow model and
the exported SavedModel all prepare an image with these two functions: resized to `image_size`
(antialiased, rounded back to uint8) and centre-cropped to the network's `input_size`. The saved
model applies them itself, in its first layer (architectures.PrepareImages), so that it takes uint8
RGB images of any size and no caller can prepare them differently. Training draws random crops and
distortions instead of the centre crop (tasks/data/inputs.py).
"""

from __future__ import annotations

import tensorflow as tf


def resize(images: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """uint8 images, one (height, width, 3) or a batch, resampled to `size` ([height, width]).

    Skipped when they already have that size: it would compute the same pixels, at a third of the
    decoding time (bench/input_pipeline.py).
    """
    height, width = size
    return tf.cond(
        tf.reduce_all(tf.shape(images)[-3:-1] == [height, width]),
        lambda: images,
        lambda: tf.cast(
            tf.clip_by_value(tf.round(tf.image.resize(images, (height, width), antialias=True)), 0, 255), tf.uint8
        ),
    )


def centre_crop(images: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """The central `size` ([height, width]) of each image, as the tutorial's evaluation crops."""
    return tf.image.resize_with_crop_or_pad(images, *size)
