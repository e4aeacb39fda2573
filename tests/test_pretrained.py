"""Inception V3 from a weights file (train.pretrained_weights): phase 1 keeps the whole base as loaded,
phase 2 trains only the layers the registry names.

ImageNet's weights cannot be downloaded in a test, so the base starts from a local file that no
initialiser would give: every variable of an InceptionV3 base, batch-norm statistics included, scaled
and shifted by seeded noise. A weight that still equals the file's after training was loaded from it
and left alone; one that differs was trained. One training (1 + 1 epochs) serves the module.
"""

import dataclasses
import pathlib

import keras
import mlflow.models
import numpy as np
import pytest

from tasks import convert, train
from tasks.common import config, errors, tracking
from tasks.modeling import architectures, networks
from tests.conftest import REPOSITORY, make_image_folder

NETWORK = networks.NETWORKS["inception_v3"]
BASE, FROZEN_UP_TO = NETWORK.fine_tuning.base, NETWORK.fine_tuning.frozen_up_to
SIDE = NETWORK.min_input_side  # 75 pixels: the smallest input, and so the fastest
# 4-image batches of 3 x 12 tiny images (~25 in the training split). No moving averages and no
# best-epoch reload: the saved weights are the last epoch's, the ones compared with the file.
SETTINGS = {
    "train.model": "inception_v3",
    "train.image_size": [SIDE, SIDE],
    "train.epochs": 1,
    "train.fine_tune_epochs": 1,
    "train.batch_size": 4,
    "train.ema_momentum": None,
    "train.restore_best": False,
    "train.histogram_freq": 0,
}

LayerWeights = list[list[np.ndarray]]  # each layer's weights, in the base's layer order


@dataclasses.dataclass(frozen=True)
class Pretrained:
    weights_file: pathlib.Path
    layer_weights: LayerWeights  # what the file holds
    shards_dir: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Trained:
    network: keras.Model  # the saved model's network, behind which the serving model prepares images
    after_phase_1: LayerWeights
    pretrained: Pretrained

    @property
    def base(self) -> keras.Model:
        return self.network.get_layer(BASE)


def _layer_weights(base: keras.Model) -> LayerWeights:
    return [[np.array(weight) for weight in layer.get_weights()] for layer in base.layers]


def _equal(weights: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    return len(weights) == len(expected) and all(
        np.array_equal(value, other) for value, other in zip(weights, expected, strict=True)
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Pretrained:
    """A weights file for Inception V3's base at 75x75 pixels, and the shards of a tiny image folder."""
    folder = tmp_path_factory.mktemp("pretrained")
    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(SIDE, SIDE, 3), pooling="avg")
    random = np.random.default_rng(2024)
    for variable in base.weights:
        value = keras.ops.convert_to_numpy(variable)
        # Positive factors keep the moving variances positive; the shift moves the zeros (betas, means) too.
        noisy = value * random.uniform(0.5, 1.5, value.shape) + random.normal(0.0, 0.01, value.shape)
        variable.assign(noisy.astype(value.dtype))
    # InceptionV3(weights=<path>) calls model.load_weights(path): a .weights.h5 file of save_weights loads by
    # the layers' order, whatever numbers Keras gave the unnamed layers in the process that wrote it.
    weights_file = folder / "inception_v3_notop.weights.h5"
    base.save_weights(weights_file)

    params = config.load_params(REPOSITORY / "params.yaml", SETTINGS)
    make_image_folder(folder / "raw", classes=3, per_class=12)
    convert.convert(params.dataset, params.base.seed, folder / "raw", folder / "shards")
    return Pretrained(weights_file, _layer_weights(base), folder / "shards")


class BaseWeightsAtEachFitEnd(keras.callbacks.Callback):
    """The base's weights when each fit (each phase) ends."""

    def __init__(self):
        super().__init__()
        self.phases: list[LayerWeights] = []

    def on_train_end(self, logs=None):
        self.phases.append(_layer_weights(self.model.get_layer(BASE)))


@pytest.fixture(scope="module")
def trained(pretrained, tmp_path_factory) -> Trained:
    """The train stage run once on the tiny shards, from the weights file."""
    folder = tmp_path_factory.mktemp("trained")
    params = config.load_params(
        REPOSITORY / "params.yaml", {**SETTINGS, "train.pretrained_weights": str(pretrained.weights_file)}
    )
    at_fit_end = BaseWeightsAtEachFitEnd()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the MLflow store: ./mlflow.db
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        # The pip requirements MLflow records are not under test: inferring them loads the 22M-parameter
        # model again in a new Python process, ~30 s of 2 cores (a third of this module's time).
        patch.setattr(mlflow.models, "infer_pip_requirements", lambda path, flavor, fallback=None, **_: fallback)
        train.train(
            params.train,
            params.base.seed,
            pretrained.shards_dir,
            folder / "models",
            checkpoints_dir=folder / "checkpoints",
            callbacks=[at_fit_end],
        )
    assert len(at_fit_end.phases) == 2, "train.fine_tune_epochs: 1 runs a second fit"
    network = architectures.network_of(tracking.load_model_file(folder / "models" / "model.keras"))
    assert len(network.get_layer(BASE).layers) == len(pretrained.layer_weights), (
        "the trained base is not the file's architecture"
    )
    return Trained(network, at_fit_end.phases[0], pretrained)


def test_phase_1_leaves_the_whole_base_as_the_file_holds_it(trained):
    names = [layer.name for layer in trained.base.layers]
    for name, weights, expected in zip(names, trained.after_phase_1, trained.pretrained.layer_weights, strict=True):
        assert _equal(weights, expected), (
            f"{name}: not loaded from train.pretrained_weights, or trained while the base is frozen"
        )


def test_phase_2_leaves_every_layer_up_to_mixed8_as_the_file_holds_it(trained):
    layers = trained.base.layers
    frozen = [layer.name for layer in layers].index(FROZEN_UP_TO) + 1
    for layer, expected in zip(layers[:frozen], trained.pretrained.layer_weights[:frozen], strict=True):
        assert _equal(layer.get_weights(), expected), (
            f"{layer.name} is at or below {FROZEN_UP_TO}, frozen in phase 2, yet changed"
        )


def test_batch_norm_keeps_the_files_statistics_while_the_top_fine_tunes(trained):
    # The base is called with training=False so that batch norm normalises with the pretrained
    # statistics, and never updates them, also in the unfrozen top blocks.
    moved = []
    for layer, expected in zip(trained.base.layers, trained.pretrained.layer_weights, strict=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            statistics = [
                keras.ops.convert_to_numpy(layer.moving_mean),
                keras.ops.convert_to_numpy(layer.moving_variance),
            ]
            if not _equal(statistics, expected[-2:]):
                moved.append(layer.name)
    assert not moved, f"fine-tuning updated the moving mean and variance of {len(moved)} batch norm layers: {moved}"


def test_phase_2_trains_only_the_layers_the_registry_unfreezes(trained):
    base = trained.base
    fine_tuned = architectures.fine_tuned_layers(trained.network, "inception_v3")
    changed = [
        layer.name
        for layer, expected in zip(base.layers, trained.pretrained.layer_weights, strict=True)
        if not _equal(layer.get_weights(), expected)
    ]
    assert set(changed) <= set(fine_tuned), (
        f"changed outside the fine-tuned layers: {sorted(set(changed) - set(fine_tuned))}"
    )
    trainable = [name for name in fine_tuned if base.get_layer(name).trainable_weights]
    assert set(changed) & set(trainable), "phase 2 trained none of the layers the registry unfreezes"
    assert [layer.name for layer in base.layers if layer.trainable_weights] == trainable, (
        "trainable outside the fine-tuned layers"
    )


def test_the_fine_tuned_layers_are_the_top_two_blocks_after_mixed8_but_batch_norm(trained):
    names = [layer.name for layer in trained.base.layers]
    batch_norm = {layer.name for layer in trained.base.layers if isinstance(layer, keras.layers.BatchNormalization)}
    fine_tuned = architectures.fine_tuned_layers(trained.network, "inception_v3")
    after_mixed8 = names[names.index(FROZEN_UP_TO) + 1 :]
    assert batch_norm & set(after_mixed8), "the top blocks have batch norm layers, which stay frozen"
    assert fine_tuned == [name for name in after_mixed8 if name not in batch_norm]
    assert {"mixed9", "mixed10"} <= set(fine_tuned) and fine_tuned[-1] == names[-1], (
        "the top two blocks and the pooling"
    )
    # By the graph, not only by the list's order: whatever computes mixed8 stays frozen, everything else trains.
    up_to_mixed8 = keras.Model(trained.base.inputs, trained.base.get_layer(FROZEN_UP_TO).output).layers
    frozen = {layer.name for layer in up_to_mixed8} | batch_norm
    assert fine_tuned == [name for name in names if name not in frozen]


def test_a_missing_weights_file_fails_naming_the_setting(workdir, pretrained):
    missing = workdir / "no-such.weights.h5"
    params = config.load_params(REPOSITORY / "params.yaml", {**SETTINGS, "train.pretrained_weights": str(missing)})
    with pytest.raises(errors.MissingInput, match=r"train\.pretrained_weights = .*no-such\.weights\.h5.*no such file"):
        train.train(
            params.train,
            params.base.seed,
            pretrained.shards_dir,
            workdir / "models",
            checkpoints_dir=workdir / "checkpoints",
        )
    assert not (workdir / "models").exists()
