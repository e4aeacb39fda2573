"""The registry of networks: each one `train.model` can name, declared once.

An entry says how to build the network (its builder in tasks/modeling/architectures.py), the smallest
input side its pooling can take, whether it starts from pretrained weights (`train.pretrained_weights`)
and which layers its fine-tuning phase unfreezes, and the preprocessing it needs beyond scaling to
[0, 1] (ResNet subtracts the training images' channel mean). The settings' allowed values and checks
(tasks/common/config.py) come from here. Adding a network: a builder function, an entry, a test.

This module imports no Keras at the top, so that reading the registry to check params.yaml does not
wait for TensorFlow (about 6 s); the builders are only imported to build.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


@dataclasses.dataclass(frozen=True)
class FineTuning:
    """Phase 2 of transfer learning: the pretrained base (a nested model named `base`) becomes trainable
    from the layer after `frozen_up_to` on; its earlier layers stay frozen."""

    base: str
    frozen_up_to: str


@dataclasses.dataclass(frozen=True)
class Network:
    builder: str  # the function of tasks/modeling/architectures.py that builds it
    min_input_side: int  # pixels: below this its pooling runs out of image
    fine_tuning: FineTuning | None = None  # set for networks that start from pretrained weights
    subtracts_channel_mean: bool = False  # its seed centres the images on the training split's mean

    @property
    def pretrained(self) -> bool:
        return self.fine_tuning is not None


NETWORKS = {
    "mnist_cnn": Network("mnist_cnn", min_input_side=4),
    "cifar10_tutorial": Network("cifar10_tutorial", min_input_side=4),
    "keras_cnn": Network("keras_cnn", min_input_side=10),
    "vgg16": Network("vgg", min_input_side=32),
    "vgg19": Network("vgg", min_input_side=32),
    "vgg16_bn": Network("vgg16_bn", min_input_side=32),
    "resnet": Network("resnet", min_input_side=4, subtracts_channel_mean=True),
    # InceptionV3's own limit is 75 pixels. The top two blocks (mixed9, mixed10) fine-tune, as in
    # Keras' fine-tuning example.
    "inception_v3": Network("inception_v3", min_input_side=75, fine_tuning=FineTuning(base="inception_v3", frozen_up_to="mixed8")),
}


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weight_decay: float = 0.0,
    resnet_n: int = 5,
    channel_mean: list[float] | None = None,
    pretrained_weights: str = "none",
) -> keras.Model:
    """The network `name` for uint8 images of `input_shape`; `weight_decay` puts an L2 penalty on its kernels.

    `channel_mean` (per-channel mean of the training images, in [0, 1]) is subtracted by the networks
    that say so; `pretrained_weights` (imagenet, none, a file) initialises a pretrained network's base.
    The model scales the pixels itself and ends in one float32 softmax, so that mixed precision never
    computes the probabilities in float16.
    """
    import keras

    from tasks.common import errors
    from tasks.modeling import architectures

    if name not in NETWORKS:
        raise errors.BadInput(f"unknown model {name!r}; known: {', '.join(NETWORKS)}")
    builder = getattr(architectures, NETWORKS[name].builder)
    options = {
        "name": name, "regularizer": keras.regularizers.L2(weight_decay) if weight_decay else None,
        "resnet_n": resnet_n, "channel_mean": channel_mean, "pretrained_weights": pretrained_weights,
    }
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    logits = builder(scaled, num_classes, **options)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=name)


def fine_tuned_layers(model: keras.Model, name: str) -> list[str]:
    """The layers of the pretrained base that phase 2 unfreezes, in order."""
    fine_tuning = NETWORKS[name].fine_tuning
    if fine_tuning is None:
        return []
    names = [layer.name for layer in model.get_layer(fine_tuning.base).layers]
    return names[names.index(fine_tuning.frozen_up_to) + 1 :]


def set_fine_tuning(model: keras.Model, name: str) -> None:
    """Makes the top of the pretrained base trainable (phase 2 of transfer learning); recompile after."""
    fine_tuning = NETWORKS[name].fine_tuning
    if fine_tuning is None:
        return
    base = model.get_layer(fine_tuning.base)
    base.trainable = True
    unfrozen = set(fine_tuned_layers(model, name))
    for layer in base.layers:
        layer.trainable = layer.name in unfrozen


def serving_model(network: keras.Model, image_size: tuple[int, int], input_size: tuple[int, int]) -> keras.Model:
    """`network` behind its preparation (architectures.PrepareImages): the model that is saved, registered
    and exported, taking uint8 RGB images of any size. It shares the network's weights."""
    import keras

    from tasks.modeling import architectures

    images = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    prepared = architectures.PrepareImages(image_size, input_size, name="prepare")(images)
    return keras.Model(images, network(prepared), name=f"{network.name}_serving")


def network_of(model: keras.Model) -> keras.Model:
    """The network inside a serving model (what takes images of the input size), or `model` itself when it
    is one already (as models saved before the preparation moved into the model are)."""
    from tasks.modeling import architectures

    if len(model.layers) == 3 and isinstance(model.layers[1], architectures.PrepareImages):
        return model.layers[2]
    return model
