"""Calibrated confidence: the temperature fit on synthetic probabilities, and a trained model that ends in
the fitted temperature everywhere it is used (the saved file, the MLflow model, predict)."""

import csv

import mlflow
import mlflow.pyfunc
import numpy as np
import PIL.Image
import pytest
import scipy.special

from tasks import convert, predict, train
from tasks.common import config, contracts, tracking
from tasks.modeling import architectures, calibration, scoring
from tests.conftest import FAST, REPOSITORY, make_image_folder

# One epoch on 8x8 images, without moving averages (after one epoch they would still be the random
# start) and at a rate that learns something in the few steps of one epoch.
QUICK = {**FAST, "train.batch_size": 8, "train.learning_rate": 0.001, "train.ema_momentum": None}


def _synthetic(sharpness: float, images: int = 4000, classes: int = 5, seed: int = 0):
    """Labels drawn from softmax(logits), and the probabilities of a model that reports softmax(sharpness *
    logits): overconfident for sharpness > 1, underconfident below 1, calibrated at 1."""
    random = np.random.default_rng(seed)
    logits = random.normal(0.0, 1.5, (images, classes))
    truth = scipy.special.softmax(logits, axis=1)
    labels = np.array([random.choice(classes, p=row) for row in truth])
    return labels, scipy.special.softmax(sharpness * logits, axis=1)


def _negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-30))))


@pytest.mark.parametrize("sharpness", [3.0, 0.5])
def test_the_fitted_temperature_undoes_over_and_underconfidence(sharpness):
    labels, probabilities = _synthetic(sharpness)
    temperature = calibration.fit_temperature(labels, probabilities)
    # softmax(log p / T) with T = sharpness gives back the true probabilities.
    assert temperature == pytest.approx(sharpness, rel=0.15)
    calibrated = calibration.scaled(probabilities, temperature)
    before = calibration.expected_calibration_error(labels, probabilities)
    after = calibration.expected_calibration_error(labels, calibrated)
    assert before > 0.05, "the synthetic model is visibly miscalibrated"
    assert after < before / 3 and after < 0.03
    assert _negative_log_likelihood(labels, calibrated) < _negative_log_likelihood(labels, probabilities)
    np.testing.assert_array_equal(calibrated.argmax(axis=1), probabilities.argmax(axis=1))


def test_a_calibrated_model_keeps_a_temperature_near_one():
    labels, probabilities = _synthetic(1.0)
    assert calibration.fit_temperature(labels, probabilities) == pytest.approx(1.0, abs=0.1)
    assert calibration.expected_calibration_error(labels, probabilities) < 0.03


def test_the_temperature_stays_one_without_a_mistake_or_with_too_few_images():
    labels, probabilities = _synthetic(3.0)
    right = probabilities.argmax(axis=1) == labels
    # Fitted on images it classifies right only, the temperature would sharpen to the bottom of its range.
    assert calibration.fit_temperature(labels[right], probabilities[right]) < 0.1
    assert calibration.temperature_for(labels[right], probabilities[right])[0] == 1.0
    assert calibration.temperature_for(labels, probabilities)[0] == pytest.approx(3.0, rel=0.15)
    few = calibration.MIN_IMAGES - 1
    assert calibration.temperature_for(labels[:few], probabilities[:few]) == (
        1.0,
        f"kept at 1: {few} validation images, fewer than the {calibration.MIN_IMAGES} a fit needs",
    )


def test_the_expected_calibration_error_of_known_bins():
    # Two bins: 0.95 confident and right half the time (gap 0.45), 0.55 confident and always right (gap 0.45).
    labels = np.array([0, 1, 0, 0])
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    assert calibration.expected_calibration_error(labels, probabilities) == pytest.approx(0.45)


def test_the_calibrate_layer_computes_what_calibration_fits():
    _, probabilities = _synthetic(2.0, images=50)
    layer = architectures.Calibrate(2.5)
    np.testing.assert_allclose(
        np.asarray(layer(probabilities.astype(np.float32))), calibration.scaled(probabilities, 2.5), atol=1e-5
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for one epoch in its own folder and MLflow store: (folder, params, TrainResult)."""
    folder = tmp_path_factory.mktemp("calibrated")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        # 600 images: about 60 validation images, enough to fit a temperature on (calibration.MIN_IMAGES).
        make_image_folder(folder / "raw", classes=3, per_class=200)
        params = config.load_params(REPOSITORY / "params.yaml", QUICK)
        convert.convert(params.dataset, 7, folder / "raw", folder / "shards")
        result = train.train(params.train, 7, folder / "shards", folder / "models", config.as_dict(params))
        yield folder, params, result


def _uncalibrated_validation(folder, params, saved):
    """The saved model's network at temperature 1, over the validation split as train fits it."""
    uncalibrated = architectures.serving_model(
        architectures.network_of(saved), params.train.image_size, params.train.input_size
    )
    size = params.train.image_size
    return scoring.predict_split(uncalibrated, folder / "shards", "validation", 8, size, size)


def test_the_saved_model_ends_in_the_temperature_fitted_on_validation(trained, monkeypatch, capfd):
    folder, params, result = trained
    monkeypatch.chdir(folder)
    saved = tracking.load_model_file(folder / "models" / contracts.MODEL_FILE)
    assert isinstance(saved.layers[-1], architectures.Calibrate) and saved.layers[-1].name == "calibrate"
    temperature = architectures.temperature_of(saved)

    validation = _uncalibrated_validation(folder, params, saved)
    assert temperature == pytest.approx(calibration.fit_temperature(validation.labels, validation.probabilities))
    assert abs(np.log(temperature)) > 0.01, f"a temperature of {temperature} would not tell calibration apart"
    calibrated = calibration.scaled(validation.probabilities, temperature)
    nll_at_one = _negative_log_likelihood(validation.labels, validation.probabilities)
    assert _negative_log_likelihood(validation.labels, calibrated) <= nll_at_one + 1e-6

    # The saved model gives the calibrated probabilities itself.
    size = params.train.image_size
    from_saved = scoring.predict_split(saved, folder / "shards", "validation", 8, size, size)
    np.testing.assert_allclose(from_saved.probabilities, calibrated, atol=1e-5)

    record = contracts.RunRecord.read(folder / "models")
    metrics = mlflow.MlflowClient(record.tracking_uri).get_run(result.run_id).data.metrics
    assert metrics["calibration_temperature"] == pytest.approx(temperature)
    assert metrics["validation_ece_before"] == pytest.approx(
        calibration.expected_calibration_error(validation.labels, validation.probabilities), abs=1e-6
    )
    assert metrics["validation_ece_after"] == pytest.approx(
        calibration.expected_calibration_error(validation.labels, calibrated), abs=1e-6
    )


def test_the_mlflow_model_and_predict_give_calibrated_probabilities(trained, monkeypatch):
    folder, params, _ = trained
    monkeypatch.chdir(folder)
    saved = tracking.load_model_file(folder / "models" / contracts.MODEL_FILE)
    uncalibrated = architectures.serving_model(
        architectures.network_of(saved), params.train.image_size, params.train.input_size
    )
    temperature = architectures.temperature_of(saved)
    files = sorted((folder / "raw").rglob("00*.png"))[:6]
    model, class_names, stored_size = predict.load("models")
    rows = predict.predict(model, class_names, files, top_k=1, stored_size=stored_size)

    logged = mlflow.pyfunc.load_model(contracts.RunRecord.read(folder / "models").model_uri)
    for file, row in zip(files, rows, strict=True):
        pixels = predict.read_image(file, stored_size)[np.newaxis]
        expected = calibration.scaled(np.asarray(uncalibrated.predict_on_batch(pixels)), temperature)[0]
        assert float(row["probability_1"]) == pytest.approx(expected.max(), abs=2e-6)
        assert row["label_1"] == class_names[expected.argmax()]
        raw = np.asarray(PIL.Image.open(file).convert("RGB"))[np.newaxis]  # what a user of the MLflow model sends
        np.testing.assert_allclose(np.asarray(logged.predict(raw))[0], expected, atol=1e-5)


def test_min_confidence_marks_the_rows_below_it(trained, monkeypatch, capsys):
    folder, _, _ = trained
    monkeypatch.chdir(folder)
    files = sorted((folder / "raw").rglob("00*.png"))
    model, class_names, stored_size = predict.load("models")
    top = sorted(float(row["probability_1"]) for row in predict.predict(model, class_names, files, 1, stored_size))
    threshold = (top[0] + top[-1]) / 2  # the least sure image below it, the surest above (many may be at 1.0)
    assert top[0] < threshold < top[-1], f"the tiny model gives every image the same confidence: {top}"
    (folder / "photos").mkdir()
    (folder / "photos" / "broken.png").write_bytes(b"not an image")

    output = folder / "unsure.csv"
    pattern = str(folder / "raw" / "*" / "00*.png")
    assert (
        predict.main(["models", pattern, "--top-k", "2", "--min-confidence", str(threshold), "--output", str(output)])
        == 0
    )
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == ["file", "label_1", "probability_1", "label_2", "probability_2", "unsure", "error"]
    assert all(row["label_1"] and row["label_2"] for row in rows), "unsure rows keep their top-k"
    assert {row["unsure"] for row in rows} == {"true", "false"}
    for row in rows:
        assert row["unsure"] == str(float(row["probability_1"]) < threshold).lower()
    unsure = sum(row["unsure"] == "true" for row in rows)
    assert f"{len(rows)} classified ({unsure} unsure: top probability below {threshold})" in capsys.readouterr().err

    # A file that failed is neither sure nor unsure.
    assert predict.main(["models", str(folder / "photos"), "--min-confidence", "0.5"]) == 1
    (broken,) = csv.DictReader(capsys.readouterr().out.splitlines())
    assert broken["error"] and broken["unsure"] == ""


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_min_confidence_outside_zero_to_one_is_refused(tmp_path, capsys, value):
    # Refused before any model is looked for: there is none here.
    with pytest.raises(SystemExit):
        predict.main([str(tmp_path / "models"), str(tmp_path), "--min-confidence", value])
    assert f"--min-confidence must be a probability between 0 and 1, got {float(value)}" in capsys.readouterr().err


def test_a_registered_calibrated_model_starts_a_new_run_that_is_calibrated_afresh(trained, monkeypatch):
    """A warm start copies the network's weights, not its temperature: the new run fits its own."""
    folder, params, _ = trained
    monkeypatch.chdir(folder)
    record = contracts.RunRecord.read(folder / "models")
    mlflow.set_tracking_uri(record.tracking_uri)
    version = mlflow.register_model(record.model_uri, "calibrated").version
    warm = params.train.model_copy(update={"init_from": f"models:/calibrated/{version}", "warm_start_epochs": 1})
    train.train(warm, 7, folder / "shards", folder / "warm", config.as_dict(params))

    started = tracking.load_model_file(folder / "warm" / contracts.MODEL_FILE)
    calibrations = [layer for layer in started.layers if isinstance(layer, architectures.Calibrate)]
    assert len(calibrations) == 1 and started.layers[-1] is calibrations[0], "one calibration, at the end"
    validation = _uncalibrated_validation(folder, params, started)
    assert calibrations[0].temperature == pytest.approx(
        calibration.temperature_for(validation.labels, validation.probabilities)[0]
    )
