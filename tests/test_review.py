"""evaluate's calibration report and review queue: likely label errors first, then the highest losses."""

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest

from tasks import evaluate
from tasks.common import config, contracts, tracking
from tasks.data import splits
from tasks.modeling import architectures, calibration, review, scoring
from tests.conftest import FAST, REPOSITORY, make_image_folder
from tests.test_train_evaluate_register import run_stages

CLASS_NAMES = ["cat", "dog", "fox"]


def confident_probabilities(labels, confidence=0.9):
    """One row per label, `confidence` on the label and the rest shared by the other classes."""
    probabilities = np.full((len(labels), len(CLASS_NAMES)), (1 - confidence) / (len(CLASS_NAMES) - 1))
    probabilities[np.arange(len(labels)), labels] = confidence
    return probabilities


def test_likely_label_errors_come_first_then_the_highest_losses():
    labels = np.array([0] * 8 + [1] * 8 + [2] * 8)
    probabilities = confident_probabilities(labels)
    # Images 9 and 12 are labelled dog, yet the model is sure they are cats: likely label errors, 12 the surer.
    probabilities[9] = [0.92, 0.05, 0.03]
    probabilities[12] = [0.95, 0.02, 0.03]
    # Image 20, a fox, is merely uncertain: a high loss, not a label error.
    probabilities[20] = [0.3, 0.3, 0.4]
    sources = [f"{CLASS_NAMES[label]}/{index}.png" for index, label in enumerate(labels)]
    table = review.review_table(labels, probabilities, sources, ["test"] * 12 + ["validation"] * 12, CLASS_NAMES)

    assert list(table.columns) == review.COLUMNS
    assert len(table) == len(labels), "fewer images than REVIEW_ROWS: all of them"
    assert list(table["file"][:3]) == ["dog/12.png", "dog/9.png", "fox/20.png"]
    assert list(table["reason"][:3]) == [review.LIKELY_LABEL_ERROR, review.LIKELY_LABEL_ERROR, review.HIGH_LOSS]
    first = table.iloc[0]
    assert (first["split"], first["given"], first["predicted"]) == ("validation", "dog", "cat")
    assert first["predicted_probability"] == pytest.approx(0.95)
    assert first["given_probability"] == pytest.approx(0.02)
    assert first["loss"] == pytest.approx(-np.log(0.02))
    assert table["loss"][2:].is_monotonic_decreasing
    assert set(table["reason"][2:]) == {review.HIGH_LOSS}

    shortened = review.review_table(labels, probabilities, sources, ["test"] * 24, CLASS_NAMES, rows=2)
    assert list(shortened["file"]) == ["dog/12.png", "dog/9.png"]


def test_review_table_refuses_lists_of_different_lengths():
    labels = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="one label, probability row, source and split per image, got 3, 3, 2 and 3"):
        review.review_table(labels, confident_probabilities(labels), ["a", "b"], ["test"] * 3, CLASS_NAMES)


def test_one_class_has_no_label_errors_only_losses():
    labels = np.zeros(4, dtype=int)
    probabilities = confident_probabilities(np.array([0, 0, 1, 0]))
    table = review.review_table(labels, probabilities, ["a", "b", "c", "d"], ["test"] * 4, CLASS_NAMES)
    assert list(table["file"][:1]) == ["c"] and set(table["reason"]) == {review.HIGH_LOSS}


def test_calibration_of_undoes_the_temperature_for_before():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    probabilities = confident_probabilities(np.array([0, 1, 2, 1, 1, 2, 2, 1]), confidence=0.7)
    report = evaluate.calibration_of(labels, probabilities, temperature=2.0)
    uncalibrated = calibration.scaled(probabilities, 0.5)
    assert uncalibrated.max(axis=1) == pytest.approx(np.full(8, 0.7**2 / (0.7**2 + 2 * 0.15**2)))
    assert report["ece_before"] == pytest.approx(calibration.expected_calibration_error(labels, uncalibrated))
    assert report["ece_after"] == pytest.approx(calibration.expected_calibration_error(labels, probabilities))
    assert report["ece_before"] != pytest.approx(report["ece_after"])
    assert report["reliability"]["after"] == calibration.reliability(labels, probabilities)
    assert sum(report["reliability"]["before"]["count"]) == report["images"] == 8


# A tiny trained model whose source folder holds class_0 images filed under class_2 ------------------------

MISLABELLED = 3


def mislabel(raw, params):
    """Copies class_0 images into class_2's folder under names that the split hash sends to test or
    validation (the model must not train on them; run_stages converts with seed 7); returns their paths
    relative to `raw`."""
    fractions = {"test": params.dataset.test_fraction, "validation": params.dataset.validation_fraction}
    names, candidate = [], 0
    while len(names) < MISLABELLED:
        name = f"mislabelled_{candidate:03d}.png"
        if splits.split_of(splits.position(7, "class_2", name), None, fractions) != "train":
            shutil.copy(raw / "class_0" / f"{len(names):03d}.png", raw / "class_2" / name)
            names.append(f"class_2/{name}")
        candidate += 1
    return names


@pytest.fixture(scope="module")
def mislabelled_run(tmp_path_factory):
    """(folder, params, TrainResult, mislabelled files) of a run trained and evaluated on the folder."""
    folder = tmp_path_factory.mktemp("mislabelled")
    # Small batches and no moving average of the weights: enough steps for the saved model to learn 90 images.
    overrides = {"train.epochs": 10, "train.batch_size": 8, "train.ema_momentum": None}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        make_image_folder(folder / "raw", classes=3, per_class=30)
        mislabelled = mislabel(folder / "raw", config.load_params(REPOSITORY / "params.yaml", {**FAST, **overrides}))
        params, result = run_stages(folder, overrides)
        yield folder, params, result, mislabelled


def test_review_lists_the_mislabelled_files_first(mislabelled_run):
    folder, _, _, mislabelled = mislabelled_run
    table = pd.read_csv(folder / "reports" / "evaluation" / "review.csv")
    manifest = contracts.Manifest.read(folder / "shards")
    assert set(mislabelled) <= set(table["file"]), "every test and validation image is listed, these among them"
    assert len(table) == min(review.REVIEW_ROWS, manifest.count("test") + manifest.count("validation"))
    first = table.head(MISLABELLED)
    assert sorted(first["file"]) == sorted(mislabelled)
    assert set(first["reason"]) == {review.LIKELY_LABEL_ERROR}
    assert set(first["given"]) == {"class_2"} and set(first["predicted"]) == {"class_0"}
    assert (first["given_probability"] < first["predicted_probability"]).all()
    assert set(table["split"]) == {"test", "validation"}
    assert all((folder / "raw" / file).is_file() for file in table["file"])
    for picture in ("review.png", "reliability.png"):
        assert (folder / "reports" / "evaluation" / picture).read_bytes().startswith(b"\x89PNG")


def test_calibration_json_matches_the_predictions_and_the_run(mislabelled_run, monkeypatch):
    folder, params, result, _ = mislabelled_run
    monkeypatch.chdir(folder)
    report = json.loads((folder / "reports" / "evaluation" / "calibration.json").read_text())
    model = tracking.load_model_file(folder / "models" / contracts.MODEL_FILE)
    preprocessing = contracts.Preprocessing.read(folder / "models")
    test = scoring.predict_split(
        model, folder / "shards", "test", 64, preprocessing.image_size, preprocessing.input_size
    )
    temperature = architectures.temperature_of(model)
    assert report["temperature"] == pytest.approx(temperature)
    uncalibrated = calibration.scaled(test.probabilities, 1 / temperature)
    assert report["ece_before"] == pytest.approx(calibration.expected_calibration_error(test.labels, uncalibrated))
    assert report["ece_after"] == pytest.approx(calibration.expected_calibration_error(test.labels, test.probabilities))
    assert sum(report["reliability"]["after"]["count"]) == report["images"] == len(test.labels)

    # predictions.csv's confidences and outcomes alone give the same error after calibration.
    predictions = pd.read_csv(folder / "reports" / "evaluation" / "predictions.csv")
    correct = (predictions["actual"] == predictions["predicted"]).to_numpy()
    table = report["reliability"]["after"]
    gaps = np.abs(np.asarray(table["accuracy"]) - np.asarray(table["confidence"]))
    assert report["ece_after"] == pytest.approx(float(np.dot(table["count"], gaps)) / len(predictions), abs=1e-6)
    bins = np.clip(np.ceil(predictions["confidence"].to_numpy() * report["bins"]).astype(int) - 1, 0, None)
    assert np.bincount(bins, weights=correct, minlength=report["bins"]) == pytest.approx(
        np.asarray(table["accuracy"]) * np.asarray(table["count"])
    )

    run = mlflow.MlflowClient(contracts.RunRecord.read(folder / "models").tracking_uri).get_run(result.run_id)
    assert run.data.metrics["test_ece_before"] == pytest.approx(report["ece_before"])
    assert run.data.metrics["test_ece_after"] == pytest.approx(report["ece_after"])
