"""The networks of the seed articles: one builder function each, named in tasks/modeling/networks.py,
and `build_model`, which builds a registry entry; the preparation layer every saved model starts with.

A builder takes the scaled image tensor (floats in [0, 1]), the number of classes and the options of
architectures.build_model, and returns logits. Where its seed whitens or centres the pixels, the builder
does it inside the network, so a saved or registered model classifies raw pixels with no code from
this repository beyond the small layers below.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import keras
from keras.src.random import seed_generator  # private: see _seeds_drawn_from

from tasks.common import errors
from tasks.modeling import networks

# The tutorial's norm1/norm2 constants: tf.nn.lrn(depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75).
LRN_SETTINGS = {"depth_radius": 4, "bias": 1.0, "alpha": 0.001 / 9.0, "beta": 0.75}
# Configurations D (VGG-16) and E (VGG-19): filters per conv, "pool" after each block.
VGG_CONFIGURATIONS = {
    "vgg16": [64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool"],
    "vgg19": [
        64,
        64,
        "pool",
        128,
        128,
        "pool",
        256,
        256,
        256,
        256,
        "pool",
        512,
        512,
        512,
        512,
        "pool",
        512,
        512,
        512,
        512,
        "pool",
    ],
}
# The seed's PaddlePaddle CIFAR VGG: (filters, dropout after each conv of the group; none after the last).
VGG_BN_GROUPS = [
    (64, [0.3, 0.0]),
    (128, [0.4, 0.0]),
    (256, [0.4, 0.4, 0.0]),
    (512, [0.4, 0.4, 0.0]),
    (512, [0.4, 0.4, 0.0]),
]


@keras.saving.register_keras_serializable(package="tasks")
class LocalResponseNormalization(keras.layers.Layer):
    """The tutorial's LRN: Keras 3 has no such layer (the VGG authors dropped it as costly and useless)."""

    def __init__(
        self, depth_radius: int = 4, bias: float = 1.0, alpha: float = 0.001 / 9.0, beta: float = 0.75, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.depth_radius, self.bias, self.alpha, self.beta = depth_radius, bias, alpha, beta

    def call(self, inputs):
        import tensorflow as tf  # the op exists in TensorFlow only; the import is free once Keras runs on it

        return tf.nn.local_response_normalization(
            inputs, depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "depth_radius": self.depth_radius,
            "bias": self.bias,
            "alpha": self.alpha,
            "beta": self.beta,
        }


@keras.saving.register_keras_serializable(package="tasks")
class ParameterFreeShortcut(keras.layers.Layer):
    """ResNet option A: subsample by taking every `stride`-th pixel and zero-pad the new channels.

    Strided slicing, not a 1x1 pooling with stride 2, which TensorFlow refuses ("kernel smaller than stride").
    """

    def __init__(self, filters: int, stride: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.filters, self.stride = filters, stride

    def call(self, inputs):
        subsampled = inputs[:, :: self.stride, :: self.stride, :]
        extra = self.filters - inputs.shape[-1]
        return keras.ops.pad(subsampled, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        shrink = lambda side: None if side is None else -(-side // self.stride)  # noqa: E731 - ceil division
        return (batch, shrink(height), shrink(width), self.filters)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


@keras.saving.register_keras_serializable(package="tasks")
class PrepareImages(keras.layers.Layer):
    """The saved model's first layer: uint8 RGB images of any size, resized to `image_size` and
    centre-cropped to `input_size` exactly as training's validation prepares them
    (tasks/data/preprocessing.py), so that a served model needs no preparation from its caller."""

    def __init__(self, image_size: tuple[int, int], input_size: tuple[int, int], **kwargs: Any):
        super().__init__(**kwargs)
        self.image_size, self.input_size = tuple(image_size), tuple(input_size)

    def call(self, images):
        from tasks.data import preprocessing  # TensorFlow ops, like the LRN above

        prepared = preprocessing.centre_crop(preprocessing.resize(images, self.image_size), self.input_size)
        return keras.ops.reshape(prepared, (-1, *self.input_size, 3))  # a static shape for the network after it

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.input_size, 3)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "image_size": list(self.image_size), "input_size": list(self.input_size)}


def _conv(filters: int, kernel_size: int, regularizer, **kwargs: Any) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, kernel_size, kernel_regularizer=regularizer, **kwargs)


def _dense(units: int, regularizer, **kwargs: Any) -> keras.layers.Dense:
    return keras.layers.Dense(units, kernel_regularizer=regularizer, **kwargs)


def mnist_cnn(x, num_classes: int, regularizer, **_: Any):
    """The seed's tf.layers MNIST network: conv 5x5x32, pool, conv 5x5x64, pool, dense 1024, dropout 0.4."""
    x = _conv(32, 5, regularizer, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2, strides=2, name="pool1")(x)
    x = _conv(64, 5, regularizer, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, strides=2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense(1024, regularizer, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.4, name="dropout")(x)
    return _dense(num_classes, regularizer, name="logits")(x)


def cifar10_tutorial(x, num_classes: int, regularizer, **_: Any):
    """The TensorFlow CIFAR-10 tutorial's model, in its order: conv1, pool1, norm1, conv2, norm2, pool2, local3, local4.

    1,068,298 parameters on 24x24x3 crops and 10 classes ('same' pooling keeps 6x6x64 = 2304 features).
    """
    # Per-image whitening (tf.image.per_image_standardization): mean 0 and variance 1 over each image.
    x = keras.layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=1e-6, name="whiten")(x)
    conv_init = lambda: keras.initializers.TruncatedNormal(stddev=5e-2)  # noqa: E731 - the tutorial's initialisers
    x = _conv(64, 5, regularizer, padding="same", activation="relu", kernel_initializer=conv_init(), name="conv1")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = LocalResponseNormalization(**LRN_SETTINGS, name="norm1")(x)
    x = _conv(
        64,
        5,
        regularizer,
        padding="same",
        activation="relu",
        kernel_initializer=conv_init(),
        bias_initializer=keras.initializers.Constant(0.1),
        name="conv2",
    )(x)
    x = LocalResponseNormalization(**LRN_SETTINGS, name="norm2")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for units, name in ((384, "local3"), (192, "local4")):
        x = _dense(
            units,
            regularizer,
            activation="relu",
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.04),
            bias_initializer=keras.initializers.Constant(0.1),
            name=name,
        )(x)
    return _dense(
        num_classes, regularizer, kernel_initializer=keras.initializers.TruncatedNormal(stddev=1 / 192.0), name="logits"
    )(x)


def keras_cnn(x, num_classes: int, regularizer, **_: Any):
    """The seed's Keras CIFAR-10 CNN: two conv pairs (32, 64) with pooling and dropout 0.25, dense 512, dropout 0.5."""
    for block, filters in enumerate((32, 64), start=1):
        x = _conv(filters, 3, regularizer, padding="same", activation="relu", name=f"conv{block}a")(x)
        x = _conv(filters, 3, regularizer, activation="relu", name=f"conv{block}b")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
        x = keras.layers.Dropout(0.25, name=f"dropout{block}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense(512, regularizer, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.5, name="dropout3")(x)
    return _dense(num_classes, regularizer, name="logits")(x)


def vgg(x, num_classes: int, regularizer, name: str, **_: Any):
    """VGG configuration D (vgg16) or E (vgg19): 3x3 convs, 2x2 pooling, fc 4096, 4096 with dropout 0.5."""
    block, index = 1, 1
    for item in VGG_CONFIGURATIONS[name]:
        if item == "pool":
            x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
            block, index = block + 1, 1
        else:
            x = _conv(item, 3, regularizer, padding="same", activation="relu", name=f"block{block}_conv{index}")(x)
            index += 1
    x = keras.layers.Flatten(name="flatten")(x)
    for layer in (6, 7):
        x = _dense(4096, regularizer, activation="relu", name=f"fc{layer}")(x)
        x = keras.layers.Dropout(0.5, name=f"dropout{layer}")(x)
    return _dense(num_classes, regularizer, name="fc8")(x)


def vgg16_bn(x, num_classes: int, regularizer, **_: Any):
    """The seed's CIFAR VGG-16 with batch norm: conv-BN-ReLU(-dropout) groups, then fc 512, fc 512."""
    for group, (filters, dropouts) in enumerate(VGG_BN_GROUPS, start=1):
        for index, rate in enumerate(dropouts, start=1):
            x = _conv(filters, 3, regularizer, padding="same", use_bias=False, name=f"group{group}_conv{index}")(x)
            x = keras.layers.BatchNormalization(name=f"group{group}_bn{index}")(x)
            x = keras.layers.ReLU(name=f"group{group}_relu{index}")(x)
            if rate:
                x = keras.layers.Dropout(rate, name=f"group{group}_dropout{index}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"group{group}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.5, name="fc1_dropout")(x)
    x = _dense(512, regularizer, use_bias=False, name="fc1")(x)
    x = keras.layers.BatchNormalization(name="fc1_bn")(x)
    x = keras.layers.ReLU(name="fc1_relu")(x)
    x = keras.layers.Dropout(0.5, name="fc2_dropout")(x)
    x = _dense(512, regularizer, name="fc2")(x)
    return _dense(num_classes, regularizer, name="logits")(x)


def resnet(x, num_classes: int, regularizer, resnet_n: int, channel_mean: list[float] | None, **_: Any):
    """CIFAR ResNet of depth 6n+2: conv 16, three stages of n full pre-activation blocks (16, 32, 64), pooling."""
    if channel_mean is not None:  # the seed subtracts the per-channel mean of the training images
        x = keras.layers.Normalization(mean=channel_mean, variance=[1.0] * len(channel_mean), name="subtract_mean")(x)
    x = _conv(16, 3, regularizer, padding="same", use_bias=False, name="conv1")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, resnet_n + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            prefix = f"stage{stage}_block{block}"
            shortcut = (
                x
                if stride == 1 and x.shape[-1] == filters
                else ParameterFreeShortcut(filters, stride, name=f"{prefix}_shortcut")(x)
            )
            y = keras.layers.BatchNormalization(name=f"{prefix}_bn1")(x)
            y = keras.layers.ReLU(name=f"{prefix}_relu1")(y)
            y = _conv(filters, 3, regularizer, strides=stride, padding="same", use_bias=False, name=f"{prefix}_conv1")(
                y
            )
            y = keras.layers.BatchNormalization(name=f"{prefix}_bn2")(y)
            y = keras.layers.ReLU(name=f"{prefix}_relu2")(y)
            y = _conv(filters, 3, regularizer, padding="same", use_bias=False, name=f"{prefix}_conv2")(y)
            x = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
    x = keras.layers.BatchNormalization(name="final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return _dense(num_classes, regularizer, name="logits")(x)


def inception_v3(x, num_classes: int, regularizer, pretrained_weights: str, **_: Any):
    """Transfer learning: Keras' InceptionV3 without its top, frozen, under a new softmax head."""
    weights = None if pretrained_weights == "none" else pretrained_weights
    base = keras.applications.InceptionV3(
        include_top=False, weights=weights, input_shape=tuple(x.shape[1:]), pooling="avg"
    )
    base.trainable = False
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_inception_range")(x)  # InceptionV3 was trained on [-1, 1]
    # training=False keeps the frozen base in inference mode; once its top blocks fine-tune, Keras passes
    # fit's training=True through, so their batch norm stays frozen instead (fine_tuned_layers).
    x = base(x, training=False)
    x = keras.layers.Dropout(0.2, name="head_dropout")(x)
    return _dense(num_classes, regularizer, name="logits")(x)


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weight_decay: float = 0.0,
    resnet_n: int = 5,
    channel_mean: list[float] | None = None,
    pretrained_weights: str = "none",
    seed: int | None = None,
) -> keras.Model:
    """The network `name` for uint8 images of `input_shape`; `weight_decay` puts an L2 penalty on its kernels.

    `channel_mean` (per-channel mean of the training images, in [0, 1]) is subtracted by the networks
    that say so; `pretrained_weights` (imagenet, none, a file) initialises a pretrained network's base.
    The model scales the pixels itself and ends in one float32 softmax, so that mixed precision never
    computes the probabilities in float16. With a `seed`, the initial weights and the dropout layers' seeds follow
    from it alone, whatever else the process draws from Python's `random` meanwhile.
    """
    if name not in networks.NETWORKS:
        raise errors.BadInput(f"unknown model {name!r}; known: {', '.join(networks.NETWORKS)}")
    builder = globals()[networks.NETWORKS[name].builder]
    options = {
        "name": name,
        "regularizer": keras.regularizers.L2(weight_decay) if weight_decay else None,
        "resnet_n": resnet_n,
        "channel_mean": channel_mean,
        "pretrained_weights": pretrained_weights,
    }
    with _seeds_drawn_from(seed) if seed is not None else contextlib.nullcontext():
        inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
        scaled = keras.layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
        logits = builder(scaled, num_classes, **options)
        outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
        return keras.Model(inputs, outputs, name=name)


@contextlib.contextmanager
def _seeds_drawn_from(seed: int) -> Iterator[None]:
    """Keras gives every initializer and dropout layer built without a seed one drawn from Python's global `random`
    (keras.src.random.seed_generator.make_default_seed, its only source of them); keras.utils.set_random_seed
    seeds that generator, but any other thread of the process may draw from it while the model is built (a
    client's retry jitter, a background service of an in-process flow: a thread drawing every millisecond gave
    another first epoch's loss in each of two trainings). Keras has no public way to give a model its own
    generator, so its module's reference to `random` is swapped for one of `seed` while the model is built
    (tests/test_private_apis.py pins it)."""
    shared = seed_generator.python_random
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


def fine_tuned_layers(model: keras.Model, name: str) -> list[str]:
    """The layers of the pretrained base that phase 2 unfreezes, in order: those after `frozen_up_to`, but
    for batch normalization, which keeps the pretrained statistics (a trainable BatchNormalization layer
    would normalise with, and learn, the statistics of each small fine-tuning batch: Keras passes fit's
    training=True into the base whatever the base was called with)."""
    fine_tuning = networks.NETWORKS[name].fine_tuning
    if fine_tuning is None:
        return []
    layers = model.get_layer(fine_tuning.base).layers
    names = [layer.name for layer in layers]
    after = layers[names.index(fine_tuning.frozen_up_to) + 1 :]
    return [layer.name for layer in after if not isinstance(layer, keras.layers.BatchNormalization)]


def set_fine_tuning(model: keras.Model, name: str) -> None:
    """Makes the top of the pretrained base trainable (phase 2 of transfer learning); recompile after."""
    fine_tuning = networks.NETWORKS[name].fine_tuning
    if fine_tuning is None:
        return
    base = model.get_layer(fine_tuning.base)
    base.trainable = True
    unfrozen = set(fine_tuned_layers(model, name))
    for layer in base.layers:
        layer.trainable = layer.name in unfrozen


@keras.saving.register_keras_serializable(package="tasks")
class Calibrate(keras.layers.Layer):
    """Temperature scaling (Guo et al., 2017): class probabilities p become softmax(log(p) / temperature),
    which is softmax(logits / temperature) for the logits the network's softmax was given. It keeps every
    image's ranking of the classes (so precision@1 is unchanged) and makes the confidences honest; the
    temperature is fitted on the validation split (tasks/modeling/calibration.py). Computed in float32."""

    def __init__(self, temperature: float = 1.0, **kwargs: Any):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities):
        # A floor on p: a probability that underflowed to 0 has no logarithm.
        logits = keras.ops.log(keras.ops.maximum(keras.ops.cast(probabilities, "float32"), 1e-30))
        return keras.ops.softmax(logits / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "temperature": self.temperature}


def serving_model(
    network: keras.Model, image_size: tuple[int, int], input_size: tuple[int, int], temperature: float = 1.0
) -> keras.Model:
    """`network` behind its preparation (architectures.PrepareImages) and followed by its calibration
    (Calibrate at `temperature`): the model that is saved, registered and exported, taking uint8 RGB images
    of any size. It shares the network's weights."""
    images = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    prepared = PrepareImages(image_size, input_size, name="prepare")(images)
    calibrated = Calibrate(temperature, name="calibrate")(network(prepared))
    return keras.Model(images, calibrated, name=f"{network.name}_serving")


def without_training_state(network: keras.Model) -> keras.Model:
    """A copy of `network` with its weights and without what only training needs (its optimizer, compiled
    loss and metrics). Saved inside a serving model, a compiled network carries its optimizer's variables:
    Adam's two slots and the moving averages made the saved model 4x the size of its weights, in the model
    folder, MLflow and DVC's cache, and every save and load that much slower."""
    # From its configuration: keras.models.clone_model compiles the copy when the network was compiled.
    copy = type(network).from_config(network.get_config())
    copy.set_weights(network.get_weights())
    return copy


def network_of(model: keras.Model) -> keras.Model:
    """The network inside a serving model (what takes images of the input size, before calibration), or
    `model` itself when it is one already (as models saved before the preparation moved into it are)."""
    if len(model.layers) in (3, 4) and isinstance(model.layers[1], PrepareImages):
        return model.layers[2]
    return model


def temperature_of(model: keras.Model) -> float:
    """The temperature of a serving model's calibration; 1.0 (none) for a model saved before calibration."""
    calibrations = [layer for layer in model.layers if isinstance(layer, Calibrate)]
    return calibrations[0].temperature if calibrations else 1.0


def calibrated_network(model: keras.Model) -> keras.Model:
    """The network of a serving model with its calibration, without the preparation: uint8 images of the
    input size in, calibrated probabilities out (what the TFLite and ONNX exports hold).

    The temperature divides the network's logits, the input of its final softmax ("probabilities"), which is
    what Calibrate computes from the probabilities, without their logarithm: in an int8 model a logarithm of
    probabilities spans down to log(1e-30), which leaves too few of its 256 levels for the classes that
    matter (precision@1 fell 12 points on a weakly trained digits model). A network without that layer
    (saved before build_model named it) keeps the Calibrate layer.
    """
    network = network_of(model)
    temperature = temperature_of(model)
    images = keras.Input(shape=network.input_shape[1:], dtype="uint8", name="image")
    names = [layer.name for layer in network.layers]
    if "probabilities" not in names:
        return keras.Model(images, Calibrate(temperature, name="calibrate")(network(images)), name=network.name)
    logits = keras.Model(network.inputs, network.get_layer("probabilities").input, name=f"{network.name}_logits")
    scaled = keras.layers.Rescaling(1.0 / temperature, dtype="float32", name="temperature")(logits(images))
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="calibrated")(scaled)
    return keras.Model(images, probabilities, name=network.name)
