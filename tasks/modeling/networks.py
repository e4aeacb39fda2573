"""The registry of networks: each one `train.model` can name, declared once.

An entry says how to build the network (its builder in tasks/modeling/architectures.py), the smallest
input side its pooling can take, whether it starts from pretrained weights (`train.pretrained_weights`)
and which layers its fine-tuning phase unfreezes, and the preprocessing it needs beyond scaling to
[0, 1] (ResNet subtracts the training images' channel mean). The settings' allowed values and checks
(tasks/common/config.py) come from here. Adding a network: a builder function, an entry, a test.

This module is data only: config.py reads it to check params.yaml on every command, which must not
wait for TensorFlow (about 6 s), and download and convert, which import config, must not depend on how
a network is built (dvc.yaml lists each stage's imports). architectures.build_model builds an entry.
"""

from __future__ import annotations

import dataclasses


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
    "inception_v3": Network(
        "inception_v3", min_input_side=75, fine_tuning=FineTuning(base="inception_v3", frozen_up_to="mixed8")
    ),
}
