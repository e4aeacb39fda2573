"""Inception V3 from a weights file (train.pretrained_weights): phase 1 keeps the whole base as loaded,
phase 2 trains only the layers the registry names.

ImageNet's weights cannot be downloaded in a test, so the base starts from a local file that no
initialiser would give: every variable of a seeded InceptionV3, batch-norm statistics included,
scaled and shifted by seeded noise. A weight that still equals the file's after training was loaded
from it and left alone; one that differs was trained.
"""

import dataclasses
import pathlib

import keras
import numpy as np
import pytest

from tasks import convert, train
from tasks.common import config, errors, tracking
from tasks.modeling import networks
from tests.conftest import REPOSITORY, make_image_folder

BASE = networks.NETWORKS["inception_v3"].fine_tuning.base  # the nested model's name
FROZEN_UP_TO = networks.NETWORKS["inception_v3"].fine_tuning.frozen_up_to
INPUT_SIDE = networks.NETWORKS["inception_v3"].min_input_side  # 75: the smallest, and so the fastest, input
# 1 + 1 epochs of 4-image batches on 3 x 12 tiny images (~25 in the training split): seconds of
# training on 2 cores. No moving averages, no best-epoch reload: the saved weights are the last ones.
SETTINGS = {
    "train.model": "inception_v3", "train.image_size": [INPUT_SIDE, INPUT_SIDE], "train.epochs": 1, "train.fine_tune_epochs": 1,
    "train.batch_size": 4, "train.ema_momentum": None, "train.restore_best": False, "train.histogram_freq": 0,
}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    weights_file: pathlib.Path
    layer_weights: list[list[np.ndarray]]  # of each layer of the base, in the base's layer order
    shards_dir: pathlib.Path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Pretrained:
    """A weights file for Inception V3's base at 75x75 pixels, and the shards of a tiny image folder."""
    folder = tmp_path_factory.mktemp("pretrained")
    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(INPUT_SIDE, INPUT_SIDE, 3), pooling="avg")
    random = np.random.default_rng(2024)
    for variable in base.weights:
        value = keras.ops.convert_to_numpy(variable)
        # Positive factors keep the moving variances positive; the shift moves the zeros (betas, means) too.
        noisy = value * random.uniform(0.5, 1.5, value.shape) + random.normal(0.0, 0.01, value.shape)
        variable.assign(noisy.astype(value.dtype))
    # Keras' InceptionV3(weights=<path>) calls model.load_weights(path): a .weights.h5 file from save_weights
    # loads by the layers' order, whatever the names Keras numbered them with in another process.
    weights_file = folder / "inception_v3_notop.weights.h5"
    base.save_weights(weights_file)
    layer_weights = [[np.array(weight) for weight in layer.get_weights()] for layer in base.layers]

    params = config.load_params(REPOSITORY / "params.yaml", SETTINGS)
    make_image_folder(folder / "raw", classes=3, per_class=12)
    convert.convert(params.dataset, params.base.seed, folder / "raw", folder / "shards")
    return Pretrained(weights_file, layer_weights, folder / "shards")


class BaseWeightsAtEachFitEnd(keras.callbacks.Callback):
    """The base's weights, layer by layer, when each fit (phase) ends."""

    def __init__(self):
        super().__init__()
        self.phases: list[list[list[np.ndarray]]] = []

    def on_train_end(self, logs=None):
        self.phases.append([[np.array(weight) for weight in layer.get_weights()] for layer in self.model.get_layer(BASE).layers])


def _equal(weights: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    return len(weights) == len(expected) and all(np.array_equal(value, other) for value, other in zip(weights, expected))


def test_inception_starts_from_the_weights_file_and_fine_tunes_only_the_layers_the_registry_names(workdir, pretrained):
    params = config.load_params(REPOSITORY / "params.yaml", {**SETTINGS, "train.pretrained_weights": str(pretrained.weights_file)})
    at_fit_end = BaseWeightsAtEachFitEnd()
    train.train(params.train, params.base.seed, pretrained.shards_dir, workdir / "models", checkpoints_dir=workdir / "checkpoints",
                extra_callbacks=[at_fit_end])
    assert len(at_fit_end.phases) == 2, "train.fine_tune_epochs: 1 runs a second fit"

    model = tracking.load_model_file(workdir / "models" / "model.keras")
    base = model.get_layer(BASE)
    names = [layer.name for layer in base.layers]
    assert len(names) == len(pretrained.layer_weights), "the trained base is not the file's architecture"
    last_frozen = names.index(FROZEN_UP_TO)

    # Phase 1: the whole base is frozen, so every weight is still the file's.
    for name, weights, expected in zip(names, at_fit_end.phases[0], pretrained.layer_weights, strict=True):
        assert _equal(weights, expected), f"phase 1 changed {name} of the frozen base, or it was not loaded from the file"

    # Phase 2: up to and including mixed8 nothing moves; batch norm runs on its loaded statistics everywhere
    # (the base is called with training=False), so no moving mean or variance moves either.
    for name, layer, expected in zip(names[: last_frozen + 1], base.layers, pretrained.layer_weights, strict=False):
        assert _equal(layer.get_weights(), expected), f"{name} is at or below {FROZEN_UP_TO}, frozen in phase 2, yet changed"
    batch_norms = [(layer, expected) for layer, expected in zip(base.layers, pretrained.layer_weights, strict=True)
                   if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms
    for layer, expected in batch_norms:
        np.testing.assert_array_equal(layer.moving_mean.numpy(), expected[-2], err_msg=f"{layer.name}'s moving mean")
        np.testing.assert_array_equal(layer.moving_variance.numpy(), expected[-1], err_msg=f"{layer.name}'s moving variance")

    fine_tuned = networks.fine_tuned_layers(model, "inception_v3")
    changed = [name for name, layer, expected in zip(names, base.layers, pretrained.layer_weights, strict=True)
               if not _equal(layer.get_weights(), expected)]
    assert set(changed) <= set(fine_tuned), f"layers outside the registry's fine-tuned ones changed: {sorted(set(changed) - set(fine_tuned))}"
    weight_bearing = [name for name in fine_tuned if base.get_layer(name).weights]
    assert set(changed) & set(weight_bearing), "phase 2 trained none of the layers the registry unfreezes"
    assert [layer.name for layer in base.layers if layer.trainable and layer.trainable_weights] == [
        name for name in weight_bearing if base.get_layer(name).trainable_weights
    ], "the saved model's trainable layers are not the fine-tuned ones"


def test_fine_tuned_layers_are_the_top_two_blocks_after_mixed8():
    model = networks.build_model("inception_v3", (INPUT_SIDE, INPUT_SIDE, 3), 3)
    base = model.get_layer(BASE)
    names = [layer.name for layer in base.layers]
    fine_tuned = networks.fine_tuned_layers(model, "inception_v3")
    assert fine_tuned == names[names.index(FROZEN_UP_TO) + 1 :]
    assert {"mixed9", "mixed10"} <= set(fine_tuned) and fine_tuned[-1] == names[-1], "the top blocks and the pooling fine-tune"
    # In the graph, not only in the list's order: the layers that compute mixed8 stay frozen, all others train.
    up_to_mixed8 = {layer.name for layer in keras.Model(base.inputs, base.get_layer(FROZEN_UP_TO).output).layers}
    assert fine_tuned == [name for name in names if name not in up_to_mixed8]


def test_a_missing_weights_file_fails_naming_the_setting(workdir, pretrained):
    missing = workdir / "no-such.weights.h5"
    params = config.load_params(REPOSITORY / "params.yaml", {**SETTINGS, "train.pretrained_weights": str(missing)})
    with pytest.raises(errors.MissingInput, match=r"train\.pretrained_weights = .*no-such\.weights\.h5.*no such file"):
        train.train(params.train, params.base.seed, pretrained.shards_dir, workdir / "models", checkpoints_dir=workdir / "checkpoints")
    assert not (workdir / "models").exists()
