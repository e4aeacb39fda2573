"""Warm starts (train.init_from) and class weights (train.class_weight) on tiny image folders, against a
real MLflow SQLite store: one from-scratch model trained once for the module, the others started from it."""

from __future__ import annotations

import json
import pathlib
import types

import keras
import mlflow
import numpy as np
import PIL.Image
import pytest
import sklearn.utils.class_weight
import tensorflow as tf

from tasks import convert, register, train
from tasks.common import config, contracts, errors, tracking
from tasks.modeling import architectures, checkpoints, class_weights, distributed, scoring, warm_start
from tests.conftest import FAST, REPOSITORY, make_image_folder

# A base worth starting from: five steps an epoch, and the raw weights saved (moving averages over 30 steps
# would still be mostly the random start).
BASE = {
    **FAST,
    "train.epochs": 6,
    "train.batch_size": 8,
    "train.histogram_freq": 0,
    "train.ema_momentum": None,
    "train.learning_rate": 0.003,
}
NAME = "tiny"  # the registered model
CLASSES = ["class_0", "class_1", "class_2"]


def _params(overrides: dict) -> config.Params:
    return config.load_params(REPOSITORY / "params.yaml", {**BASE, **overrides})


def _shards(folder: pathlib.Path, name: str, classes: int, drop: int = 0, split_class: bool = False) -> pathlib.Path:
    """A converted image folder of `classes` classes of 20 images (`drop` fewer in class_0); `split_class`
    adds class_3, images dark on the left and bright on the right, unlike the others' even brightness."""
    raw = make_image_folder(folder / f"raw-{name}", classes=classes, per_class=20)
    for image in sorted((raw / "class_0").iterdir())[:drop]:
        image.unlink()
    if split_class:
        (raw / "class_3").mkdir()
        random = np.random.default_rng(3)
        for index in range(20):
            pixels = np.where(np.arange(8) < 4, 30, 220) + random.integers(-20, 20, (8, 8))
            PIL.Image.fromarray(pixels.astype(np.uint8)).convert("RGB").save(raw / "class_3" / f"{index:03d}.png")
    params = _params({})
    convert.convert(params.dataset, 7, raw, folder / name)
    return folder / name


def _train(folder: pathlib.Path, shards: pathlib.Path, model_dir: str, report_dir=None, **overrides):
    """train.train on `shards` into folder/model_dir; (result, its MLflow run)."""
    params = _params({f"train.{key}": value for key, value in overrides.items()})
    result = train.train(
        params.train,
        7,
        shards,
        folder / model_dir,
        config.as_dict(params),
        registered_model_name=NAME,
        data_report_dir=report_dir,
    )
    return result, mlflow.MlflowClient(tracking.tracking_uri()).get_run(result.run_id)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Three-class and four-class shards, and a model trained from scratch on the three classes, with
    init_from: champion while there is no champion yet."""
    folder = tmp_path_factory.mktemp("warm_start")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        three = _shards(folder, "three", classes=3)
        four = _shards(folder, "four", classes=3, split_class=True)
        result, run = _train(folder, three, "base", init_from="champion")
        yield types.SimpleNamespace(folder=folder, three=three, four=four, result=result, run=run)


@pytest.fixture
def inside(base, monkeypatch):
    monkeypatch.chdir(base.folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return base


def test_a_warm_start_from_a_folder_continues_where_the_model_left_off(inside):
    models = inside.folder / "base"
    report = inside.folder / "report"
    report.mkdir()
    (report / "changes.md").write_text("# What changed\n")
    result, run = _train(inside.folder, inside.three, "warm", report, init_from=str(models), warm_start_epochs=1)

    tags = run.data.tags
    assert tags["init_from"] == str(models)
    assert tags["warm_start.source"] == str(models / "model.keras")
    assert tags["warm_start.run_id"] == inside.result.run_id
    assert tags["warm_start.generation"] == "1"
    assert tags["warm_start.from_scratch"] == "false"
    warm, scratch = checkpoints.history_rows(inside.folder / "warm"), checkpoints.history_rows(models)
    assert len(warm) == 1, "a warm start trains train.warm_start_epochs epochs, not train.epochs"
    # Its first epoch starts from trained weights: well below the first epoch from random ones.
    assert float(warm[0]["loss"]) < float(scratch[0]["loss"]) - 0.2, (warm[0], scratch[0])
    assert float(warm[0]["val_loss"]) < float(scratch[0]["val_loss"]) - 0.2, (warm[0], scratch[0])

    # The shards' index and convert's change report go with the run: the next conversion compares with them.
    logged = [item.path for item in mlflow.MlflowClient(tracking.tracking_uri()).list_artifacts(result.run_id, "data")]
    assert {"data/index.csv", "data/changes.md"} <= set(logged)

    # The checkpoint folder depends on the start: a resumed run never continues another start's epochs.
    params = _params({}).train
    folders = {
        checkpoints.work_folder(inside.folder / "work", params, 7, "data", False, start)
        for start in ("random", "models:/tiny/1 run a", "models:/tiny/2 run b")
    }
    assert len(folders) == 3


def test_a_new_class_grows_the_output_layer_and_keeps_the_old_columns(inside):
    start = architectures.network_of(tracking.load_model_file(inside.folder / "base" / "model.keras"))
    grown = architectures.build_model("mnist_cnn", (8, 8, 3), 4)
    fresh = grown.get_layer("logits").get_weights()
    warm_start.transfer(start, CLASSES, grown, [*CLASSES, "class_3"])

    old_kernel, old_bias = start.get_layer("logits").get_weights()
    kernel, bias = grown.get_layer("logits").get_weights()
    np.testing.assert_array_equal(kernel[:, :3], old_kernel)
    np.testing.assert_array_equal(bias[:3], old_bias)
    np.testing.assert_array_equal(kernel[:, 3], fresh[0][:, 3])  # the new class keeps its initialisation
    np.testing.assert_array_equal(grown.get_layer("conv1").get_weights()[0], start.get_layer("conv1").get_weights()[0])

    # The same classes in another order: columns move with their names, so the model answers the same.
    reordered = architectures.build_model("mnist_cnn", (8, 8, 3), 3)
    warm_start.transfer(start, CLASSES, reordered, CLASSES[::-1])
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        reordered.predict_on_batch(images)[:, ::-1], start.predict_on_batch(images), rtol=1e-5, atol=1e-6
    )

    # Trained on data with a fourth, distinct class, the grown model recognises it.
    result, run = _train(
        inside.folder, inside.four, "grown", init_from=str(inside.folder / "base"), warm_start_epochs=3
    )
    model = tracking.load_model_file(result.model_path)
    predictions = scoring.predict_split(model, inside.four, "test", 64, (8, 8), (8, 8))
    predicted = predictions.probabilities.argmax(-1)
    new_class = predictions.labels == 3
    assert new_class.any() and (predicted[new_class] == 3).all(), predicted[new_class]
    assert json.loads((inside.folder / "grown" / "labels.json").read_text()) == [*CLASSES, "class_3"]


def test_a_start_that_cannot_fit_is_refused_naming_both(inside):
    two = _shards(inside.folder, "two", classes=2)
    models = str(inside.folder / "base")
    with pytest.raises(errors.BadInput, match="knows the class\\(es\\) class_2, which the data set no longer has"):
        _train(inside.folder, two, "refused", init_from=models)
    with pytest.raises(
        errors.BadInput, match="is a mnist_cnn at 8x8, train.model is cifar10_tutorial at 8x8.*init_from: null"
    ):
        _train(inside.folder, inside.three, "refused", init_from=models, model="cifar10_tutorial")
    with pytest.raises(errors.BadInput, match="is a mnist_cnn at 8x8, train.model is mnist_cnn at 12x12"):
        _train(inside.folder, inside.three, "refused", init_from=models, image_size=[12, 12])
    with pytest.raises(errors.MissingInput, match="no such model file or model folder"):
        _train(inside.folder, inside.three, "refused", init_from=str(inside.folder / "nothing"))


def test_champion_starts_a_line_of_warm_starts_that_restarts_from_scratch(inside, monkeypatch, capfd):
    # The base asked for the champion before there was one: random weights, and the run says why.
    tags = inside.run.data.tags
    assert tags["warm_start.from_scratch"] == "true"
    assert tags["warm_start.generation"] == "0"
    assert f"no version of {NAME} holds the alias champion yet" in tags["warm_start.reason"]

    # Exports and the served-model check: tests/test_register.py and tests/test_exports.py.
    monkeypatch.setattr(register, "_released", lambda *arguments: None)
    _register(inside.folder, "base")
    _, run = _train(inside.folder, inside.three, "second", init_from="champion", warm_start_epochs=1)
    assert "train: warm start from models:/tiny/1 (generation 1), 1 epochs" in capfd.readouterr().out
    assert run.data.tags["warm_start.source"] == "models:/tiny/1"
    assert run.data.tags["warm_start.run_id"] == inside.result.run_id
    assert run.data.tags["warm_start.generation"] == "1"

    _register(inside.folder, "second")  # now version 2, generation 1, is the champion
    line = _params({"train.init_from": "champion", "train.from_scratch_every": 2}).train
    restart = warm_start.resolve(line, NAME)
    assert not restart.warm and restart.generation == 0
    assert "generation 1: the next would reach train.from_scratch_every = 2" in restart.reason
    longer = line.model_copy(update={"from_scratch_every": 3})
    assert (warm_start.resolve(longer, NAME).source, warm_start.resolve(longer, NAME).generation) == (
        "models:/tiny/2",
        2,
    )
    by_alias = warm_start.resolve(longer.model_copy(update={"init_from": "models:/tiny@champion"}), NAME)
    assert (by_alias.source, by_alias.run_id) == ("models:/tiny/2", run.info.run_id)
    with pytest.raises(errors.BadInput, match="no version of tiny holds the alias nightly"):
        warm_start.resolve(longer.model_copy(update={"init_from": "models:/tiny@nightly"}), NAME)


def test_an_unreachable_mlflow_is_an_outage(inside, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(errors.Outage, match="cannot read the registered model tiny from MLflow"):
        warm_start.resolve(_params({"train.init_from": "champion"}).train, NAME)


def _register(folder: pathlib.Path, model_dir: str) -> None:
    """Registers the run of folder/model_dir and makes it the champion by hand (these tests are about what the
    champion starts, not about whether it is better): registered below register.min_precision, then promoted."""
    metrics = folder / f"{model_dir}-metrics.json"
    average = contracts.Averages(precision=0.0, recall=0.0, f1=0.0)
    contracts.Scores(precision_at_1=0.0, loss=0.0, images=12, macro_avg=average, weighted_avg=average).write(metrics)
    params = _params({}).registration.model_copy(update={"serve_check": False})
    registry = folder / f"{model_dir}-registry.json"
    evaluation = folder / f"{model_dir}-evaluation"  # none: a challenger needs no comparison
    decision = register.register(params, NAME, folder / model_dir, folder / "three", metrics, evaluation, registry)
    assert decision.alias == "challenger"
    decision = register.promote(
        params, NAME, decision.version, "the warm-start tests' next start", folder / "three", registry
    )
    assert decision.alias == "champion"


def test_class_weights_balanced_and_named_are_computed_used_and_logged(inside):
    skewed = _shards(inside.folder, "skewed", classes=3, drop=12)
    manifest = contracts.Manifest.read(skewed)
    counts = manifest.splits["train"].per_class
    assert counts["class_0"] < counts["class_1"]
    labels = np.repeat(np.arange(3), [counts[name] for name in CLASSES])
    expected = sklearn.utils.class_weight.compute_class_weight("balanced", classes=np.arange(3), y=labels)
    balanced = class_weights.compute("balanced", manifest)
    assert list(balanced) == CLASSES
    np.testing.assert_allclose(list(balanced.values()), expected)
    assert class_weights.compute({"class_1": 2.5}, manifest) == {"class_0": 1.0, "class_1": 2.5, "class_2": 1.0}
    assert class_weights.by_index(balanced, CLASSES) == dict(enumerate(balanced.values()))
    assert class_weights.compute(None, manifest) is None

    result, run = _train(inside.folder, skewed, "weighted", epochs=1, class_weight="balanced")
    logged = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/class_weight.json")
    assert logged == pytest.approx(balanced)
    with pytest.raises(
        errors.BadInput, match="names the class\\(es\\) cat, .*its classes are class_0, class_1, class_2"
    ):
        _train(inside.folder, skewed, "refused", class_weight={"cat": 2.0})


def test_the_multi_worker_step_weighs_each_image_as_fit_does():
    """distributed's own loop (Keras' fit cannot run on several workers) applies class weights itself."""
    model = architectures.build_model("cifar10_tutorial", (8, 8, 3), 3)  # no dropout: training=True changes nothing
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    images = np.random.default_rng(1).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    labels = tf.one_hot([0, 0, 1, 1, 2, 2], 3)
    weights = {0: 2.0, 1: 1.0, 2: 0.5}
    step = distributed._train_step(model, tf.distribute.get_strategy(), 0.0, weights)  # noqa: SLF001
    loss, _, count = (float(value) for value in step(tf.constant(images), labels))
    per_image = keras.losses.categorical_crossentropy(labels, model(images)).numpy()
    assert count == 6
    assert loss == pytest.approx(float(np.mean(per_image * np.array([2.0, 2.0, 1.0, 1.0, 0.5, 0.5]))), rel=1e-5)
