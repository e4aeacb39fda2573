"""The networks of the seed articles, built by name.

Every model takes uint8 RGB images of its input size and scales them itself, so a saved or
registered model classifies raw pixels with no code from this repository.
"""

from __future__ import annotations

import keras


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    builders = {"mnist_cnn": _mnist_cnn}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(builders)}")
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    outputs = builders[name](scaled, num_classes)
    return keras.Model(inputs, outputs, name=name)


def _mnist_cnn(x, num_classes: int):
    """The seed's tf.layers MNIST network: conv 5x5x32, pool, conv 5x5x64, pool, dense 1024, dropout 0.4."""
    x = keras.layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2, strides=2, name="pool1")(x)
    x = keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, strides=2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(1024, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.4, name="dropout")(x)
    return keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
