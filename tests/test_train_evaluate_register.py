"""train -> evaluate -> register on a tiny image folder, against a real MLflow SQLite store."""

import contextlib
import json
import math

import mlflow
import pytest

from tasks import convert, evaluate, register, train
from tasks.common import config, contracts
from tests.conftest import FAST, REPOSITORY, make_image_folder


def run_stages(folder, overrides=None, shards="shards", seed=7):
    """convert (if needed) -> train -> evaluate in `folder`; returns (params, TrainResult). `seed` is training's
    (weights, order); the split's stays 7."""
    params = config.load_params(REPOSITORY / "params.yaml", {**FAST, **(overrides or {})})
    if not (folder / shards).exists():
        convert.convert(params.dataset, 7, folder / "raw", folder / shards)
    result = train.train(params.train, seed, folder / shards, folder / "models", config.as_dict(params))
    evaluate.evaluate(
        params.evaluate,
        folder / shards,
        folder / "models",
        folder / "reports" / "metrics.json",
        folder / "reports" / "evaluation",
    )
    return params, result


def register_in(folder, params, name="tiny", shards="shards", **changes):
    return register.register(
        params.registration.model_copy(update=changes),
        name,
        folder / "models",
        folder / shards,
        folder / "reports" / "metrics.json",
        folder / "reports" / "evaluation",
        folder / "reports" / "registry.json",
    )


@contextlib.contextmanager
def trained_in(folder, overrides):
    """A tiny image folder trained and evaluated in `folder`, the working folder while the block runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        make_image_folder(folder / "raw", classes=3, per_class=20)
        yield run_stages(folder, overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained and evaluated run shared by the tests of this module: (folder, params, TrainResult)."""
    folder = tmp_path_factory.mktemp("trained")
    with trained_in(folder, {"train.epochs": 3}) as (params, result):
        yield folder, params, result


@pytest.fixture
def inside(trained, monkeypatch):
    folder, params, result = trained
    monkeypatch.chdir(folder)
    return trained


def test_train_saves_the_model_and_logs_one_mlflow_run(inside):
    folder, params, result = inside
    assert result.model_path == folder / "models" / "model.keras"
    assert result.model_path.is_file()
    assert json.loads((folder / "models" / "labels.json").read_text()) == ["class_0", "class_1", "class_2"]
    assert (folder / "models" / "history.csv").read_text().splitlines()[0].startswith("epoch,")
    run_file = contracts.RunRecord.read(folder / "models")
    assert run_file.run_id == result.run_id
    assert run_file.tracking_uri == f"sqlite:///{folder / 'mlflow.db'}"

    client = mlflow.MlflowClient(run_file.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.run_name.startswith("digits-mnist_cnn-")
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["register.min_precision"] == str(params.registration.min_precision)
    assert run.data.tags["dataset"] == "digits"
    assert len(run.data.tags["manifest_sha256"]) == 64
    assert [metric.step for metric in client.get_metric_history(result.run_id, "loss")] == [0, 1, 2]
    assert math.isfinite(result.final_loss)
    assert (folder / "mlartifacts").is_dir(), "artifacts stay beside mlflow.db"


def test_evaluate_writes_reports_and_logs_them_to_the_training_run(inside):
    folder, params, result = inside
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert {"precision_at_1", "loss", "images", "macro_avg", "weighted_avg"} == set(metrics), "no top-5 with 3 classes"
    assert metrics["images"] == contracts.Manifest.read(folder / "shards").count("test")
    assert set(metrics["macro_avg"]) == {"precision", "recall", "f1"}
    evaluation = folder / "reports" / "evaluation"
    per_class = (evaluation / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support"
    assert [line.split(",")[0] for line in per_class[1:]] == ["class_0", "class_1", "class_2"]
    assert sum(int(line.split(",")[4]) for line in per_class[1:]) == metrics["images"]
    predictions = (evaluation / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "file,actual,predicted,confidence" and len(predictions) == metrics["images"] + 1
    for picture in ("confusion_matrix.png", "misclassified.png"):
        assert (evaluation / picture).read_bytes().startswith(b"\x89PNG")

    client = mlflow.MlflowClient(contracts.RunRecord.read(folder / "models").tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["test_precision_at_1"] == pytest.approx(metrics["precision_at_1"])
    assert run.data.metrics["test_macro_avg_f1"] == pytest.approx(metrics["macro_avg"]["f1"])
    logged = {item.path for item in client.list_artifacts(result.run_id, "evaluation")}
    assert {
        "evaluation/metrics.json",
        "evaluation/confusion_matrix.png",
        "evaluation/misclassified.png",
        "evaluation/per_class.json",
    } <= logged
    assert {item.path for item in client.list_artifacts(result.run_id, "dataset")} == {
        "dataset/manifest.json",
        "dataset/rejected.csv",
    }
    assert "params.yaml" in {item.path for item in client.list_artifacts(result.run_id)}


def test_register_refuses_a_run_without_a_finite_precision(inside, tmp_path):
    folder, params, result = inside
    bad_metrics = tmp_path / "metrics.json"

    def register_bad_metrics():
        return register.register(
            params.registration,
            "never",
            folder / "models",
            folder / "shards",
            bad_metrics,
            tmp_path / "evaluation",
            tmp_path / "registry.json",
        )

    bad_metrics.write_text(
        '{"precision_at_1": NaN, "loss": 0.1, "images": 5, '
        '"macro_avg": {"precision": 1, "recall": 1, "f1": 1}, "weighted_avg": {"precision": 1, "recall": 1, "f1": 1}}'
    )
    with pytest.raises(ValueError, match="precision_at_1 is nan; nothing registered"):
        register_bad_metrics()
    assert not (tmp_path / "registry.json").exists()
    client = mlflow.MlflowClient(contracts.RunRecord.read(folder / "models").tracking_uri)
    assert not client.search_registered_models(filter_string="name = 'never'")

    bad_metrics.write_text('{"precision_at_1": 0.9}')
    with pytest.raises(
        ValueError,
        match=r"metrics.json does not hold what it should \(loss: Field required.*run the evaluate stage first",
    ):
        register_bad_metrics()


def test_stages_name_the_missing_input(workdir):
    params = config.load_params(REPOSITORY / "params.yaml", FAST)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing: run the convert stage first"):
        train.train(params.train, 7, workdir / "shards", workdir / "models")
    with pytest.raises(FileNotFoundError, match="run.json is missing: run the train stage first"):
        evaluate.evaluate(
            params.evaluate, workdir / "shards", workdir / "models", workdir / "metrics.json", workdir / "evaluation"
        )
