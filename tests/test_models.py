"""Every network of the seeds: its shape, its parameter count, one training step, a safe reload."""

import gc
import random
import threading

import keras
import numpy as np
import pytest

from tasks.common import config
from tasks.modeling import architectures


def _vgg_parameters(name: str, side: int, classes: int) -> int:
    """VGG's count from its definition: 3x3 convs, five 2x2 poolings, fc 4096, 4096, classes."""
    total, channels = 0, 3
    for item in architectures.VGG_CONFIGURATIONS[name]:
        if item != "pool":
            total += 3 * 3 * channels * item + item
            channels = item
    flat = (side // 32) ** 2 * 512
    return total + flat * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * classes + classes


@pytest.mark.parametrize(
    ("name", "shape", "classes", "expected"),
    [
        ("cifar10_tutorial", (24, 24, 3), 10, 1_068_298),  # the tutorial's own figure
        ("mnist_cnn", (28, 28, 3), 10, 3_276_234),
        ("keras_cnn", (32, 32, 3), 10, 1_250_858),  # the Keras example's figure
        ("vgg16", (32, 32, 3), 10, _vgg_parameters("vgg16", 32, 10)),
        ("vgg19", (32, 32, 3), 10, _vgg_parameters("vgg19", 32, 10)),
        ("vgg16_bn", (32, 32, 3), 10, 15_259_338),
        ("resnet", (32, 32, 3), 10, 466_426),  # ResNet-32: the paper's 0.46M
        ("inception_v3", (75, 75, 3), 5, 21_802_784 + 2048 * 5 + 5),  # Keras' base without top, a new head
    ],
)
def test_every_model_builds_with_its_shape_and_parameter_count(name, shape, classes, expected):
    assert name in config.MODELS
    model = architectures.build_model(name, shape, classes)
    assert model.input.dtype == "uint8"
    assert model.output_shape == (None, classes)
    assert model.count_params() == expected


def test_vgg_at_imagenet_size_has_the_published_counts():
    # 138M and 144M are the seeds' figures; the formula is checked against a real build of VGG-16.
    assert _vgg_parameters("vgg16", 224, 1000) == 138_357_544
    assert _vgg_parameters("vgg19", 224, 1000) == 143_667_240
    model = architectures.build_model("vgg16", (224, 224, 3), 1000)
    assert model.count_params() == 138_357_544
    del model
    gc.collect()


@pytest.mark.parametrize("n", [1, 3, 5])
def test_resnet_has_depth_6n_plus_2(n):
    model = architectures.build_model("resnet", (16, 16, 3), 10, resnet_n=n)
    weighted = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(weighted) == 6 * n + 2
    assert model.get_layer("pool").output.shape[1:] == (64,), "three stages end with 64 channels"


@pytest.mark.parametrize(
    ("name", "side", "extra"),
    [
        ("mnist_cnn", 8, {}),
        ("cifar10_tutorial", 8, {}),
        ("keras_cnn", 12, {}),
        ("vgg16", 32, {}),
        ("vgg19", 32, {}),
        ("vgg16_bn", 32, {}),
        ("resnet", 8, {"resnet_n": 1, "channel_mean": [0.4, 0.5, 0.6]}),
        ("inception_v3", 75, {}),
    ],
)
def test_every_model_trains_one_step(name, side, extra):
    model = architectures.build_model(name, (side, side, 3), 3, weight_decay=1e-4, **extra)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    images = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    loss = model.train_on_batch(images, keras.utils.to_categorical([0, 2], 3))
    assert np.isfinite(loss)
    del model
    gc.collect()


def test_custom_layers_reload_in_safe_mode(tmp_path):
    for name, extra in (("cifar10_tutorial", {}), ("resnet", {"resnet_n": 1, "channel_mean": [0.5, 0.5, 0.5]})):
        model = architectures.build_model(name, (12, 12, 3), 4, **extra)
        path = tmp_path / f"{name}.keras"
        model.save(path)
        reloaded = keras.saving.load_model(path, safe_mode=True)
        images = np.random.default_rng(1).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
        np.testing.assert_allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5)


def test_fine_tuning_unfreezes_only_the_top_inception_blocks():
    model = architectures.build_model("inception_v3", (75, 75, 3), 2)
    base = model.get_layer("inception_v3")
    assert not base.trainable and len(model.trainable_weights) == 2, "phase 1: only the new head trains"
    architectures.set_fine_tuning(model, "inception_v3")
    names = [layer.name for layer in base.layers if layer.trainable and layer.weights]
    assert names and all(
        base.layers.index(base.get_layer(name)) > base.layers.index(base.get_layer("mixed8")) for name in names
    )
    assert not any(layer.trainable for layer in base.layers[:20] if layer.weights), "the bottom stays frozen"


def test_an_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'alexnet'; known: mnist_cnn, cifar10_tutorial"):
        architectures.build_model("alexnet", (8, 8, 3), 2)


def test_a_seeded_model_is_the_same_whatever_other_threads_draw_from_random():
    """Keras draws its layers' seeds from Python's global `random`; a thread drawing from it meanwhile (as a
    client's retry jitter may) must not change the weights built from a seed."""
    drawing = threading.Event()
    drawing.set()

    def draw():
        while drawing.is_set():
            random.random()

    def weights(seed):
        model = architectures.build_model("keras_cnn", (32, 32, 3), 10, seed=seed)
        return [variable.numpy() for variable in model.weights]

    quiet = weights(3)
    thread = threading.Thread(target=draw)
    thread.start()
    try:
        busy = [weights(3) for _ in range(2)]
    finally:
        drawing.clear()
        thread.join()
    for built in busy:
        assert all(np.array_equal(a, b) for a, b in zip(quiet, built, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(quiet, weights(4), strict=True)), "another seed, other weights"
