"""train -> evaluate -> register on a tiny image folder, against a real MLflow SQLite store."""

import json
import math

import mlflow
import numpy as np
import pytest

from tasks import config, convert, evaluate, register, tracking, train
from tests.conftest import FAST, REPOSITORY, make_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run shared by the tests of this module: (folder, params, TrainResult)."""
    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        params = config.load_params(REPOSITORY / "params.yaml", {**FAST, "train.epochs": 2})
        make_image_folder(folder / "raw", classes=3, per_class=20)
        convert.convert(params.dataset, 7, folder / "raw", folder / "shards")
        result = train.train(params.train, 7, folder / "shards", folder / "models", config.flatten(params))
        yield folder, params, result


@pytest.fixture
def inside(trained, monkeypatch):
    folder, params, result = trained
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return trained


def test_train_saves_the_model_and_logs_one_mlflow_run(inside):
    folder, params, result = inside
    assert result.model_path == folder / "models" / "model.keras"
    assert result.model_path.is_file()
    assert json.loads((folder / "models" / "labels.json").read_text()) == ["class_0", "class_1", "class_2"]
    assert (folder / "models" / "history.csv").read_text().splitlines()[0].startswith("epoch,")
    run_file = tracking.read_run(folder / "models")
    assert run_file["run_id"] == result.run_id
    assert run_file["tracking_uri"] == f"sqlite:///{folder / 'mlflow.db'}"

    client = mlflow.MlflowClient(run_file["tracking_uri"])
    run = client.get_run(result.run_id)
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["train.model"] == "mnist_cnn"
    assert run.data.tags["dataset"] == "digits"
    assert len(run.data.tags["manifest_sha256"]) == 64
    assert [metric.step for metric in client.get_metric_history(result.run_id, "loss")] == [0, 1]
    assert math.isfinite(result.final_loss)
    assert (folder / "mlartifacts").is_dir(), "artifacts stay beside mlflow.db"


def test_evaluate_writes_metrics_and_logs_them_to_the_training_run(inside):
    folder, params, result = inside
    evaluated = evaluate.evaluate(params.evaluate, folder / "shards", folder / "models", folder / "reports" / "metrics.json")

    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"precision_at_1", "loss", "images"}, "no top-5 with only 3 classes"
    assert metrics["images"] == 12 == evaluated.test_images
    assert 0.0 <= metrics["precision_at_1"] <= 1.0
    run = mlflow.MlflowClient(tracking.read_run(folder / "models")["tracking_uri"]).get_run(result.run_id)
    assert run.data.metrics["test_precision_at_1"] == pytest.approx(metrics["precision_at_1"])


def test_register_creates_versions_and_moves_champion(inside):
    folder, params, result = inside
    metrics_path = folder / "reports" / "metrics.json"
    if not metrics_path.exists():
        evaluate.evaluate(params.evaluate, folder / "shards", folder / "models", metrics_path)
    first = register.register("tiny", folder / "models", metrics_path, folder / "reports" / "registry.json")
    second = register.register("tiny", folder / "models", metrics_path, folder / "reports" / "registry.json")

    assert (first.version, second.version) == ("1", "2")
    client = mlflow.MlflowClient(tracking.read_run(folder / "models")["tracking_uri"])
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert str(champion.version) == "2"
    assert champion.tags["run_id"] == result.run_id
    assert champion.tags["test_precision_at_1"] == str(json.loads(metrics_path.read_text())["precision_at_1"])
    assert json.loads((folder / "reports" / "registry.json").read_text())["version"] == "2"

    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    probabilities = np.asarray(model.predict(np.full((2, 8, 8, 3), 120, dtype=np.uint8)))
    assert probabilities.shape == (2, 3)
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_register_refuses_a_run_without_a_finite_precision(inside, tmp_path):
    folder, params, result = inside
    bad_metrics = tmp_path / "metrics.json"
    bad_metrics.write_text('{"precision_at_1": NaN}')
    with pytest.raises(ValueError, match="precision_at_1 is nan; nothing registered"):
        register.register("never", folder / "models", bad_metrics, tmp_path / "registry.json")
    assert not (tmp_path / "registry.json").exists()
    client = mlflow.MlflowClient(tracking.read_run(folder / "models")["tracking_uri"])
    assert not client.search_registered_models(filter_string="name = 'never'")


def test_stages_name_the_missing_input(workdir):
    params = config.load_params(REPOSITORY / "params.yaml", FAST)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing: run the convert stage first"):
        train.train(params.train, 7, workdir / "shards", workdir / "models")
    with pytest.raises(FileNotFoundError, match="run.json is missing: run the train stage first"):
        evaluate.evaluate(params.evaluate, workdir / "shards", workdir / "models", workdir / "metrics.json")


def test_the_whole_run_works_against_a_tracking_server(workdir, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = config.load_params(REPOSITORY / "params.yaml", FAST)
    make_image_folder(workdir / "raw", classes=3, per_class=10)
    convert.convert(params.dataset, 7, workdir / "raw", workdir / "shards")
    result = train.train(params.train, 7, workdir / "shards", workdir / "models", config.flatten(params))
    evaluate.evaluate(params.evaluate, workdir / "shards", workdir / "models", workdir / "metrics.json")
    registered = register.register("served", workdir / "models", workdir / "metrics.json", workdir / "registry.json")

    assert tracking.read_run(workdir / "models")["tracking_uri"] == mlflow_server
    assert not (workdir / "mlflow.db").exists(), "nothing goes to the local store when a server is set"
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(result.run_id).data.metrics["test_images"] == 6
    assert str(client.get_model_version_by_alias("served", "champion").version) == registered.version == "1"
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/served@champion")
    assert np.asarray(model.predict(np.zeros((1, 8, 8, 3), dtype=np.uint8))).shape == (1, 3)
