"""What the MLflow UI shows of a training run, to compare runs: the experiment's kind, the run's data sets,
its description, its DVC experiment and its system metrics; after a tiny train -> evaluate."""

import collections
import json
import os
import threading

import mlflow
import pytest

from tasks.common import contracts, tracking
from tasks.modeling import training_run
from tests.conftest import make_image_folder
from tests.test_train_evaluate_register import run_stages

EXPERIMENT_NAME = "tiny-experiment-42"  # what `dvc exp run` would have put in DVC_EXP_NAME
BASELINE = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """convert -> train -> evaluate on a tiny image folder, as `dvc exp run` would run them: (folder, params,
    TrainResult, client)."""
    folder = tmp_path_factory.mktemp("mlflow_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
        patch.setenv(tracking.DVC_EXPERIMENT_VARIABLE, EXPERIMENT_NAME)
        patch.setenv(tracking.DVC_BASELINE_VARIABLE, BASELINE)
        # Samples every 0.2 s instead of 2: the tiny run may end before a 2 s interval does, and MLflow logs no
        # sample of a run shorter than its interval.
        patch.setattr(training_run, "SYSTEM_METRICS_SECONDS", 0.2)
        make_image_folder(folder / "raw", classes=3, per_class=20)
        params, result = run_stages(folder)
        yield folder, params, result, mlflow.MlflowClient(contracts.RunRecord.read(folder / "models").tracking_uri)


def test_the_experiment_is_a_model_training_experiment(trained):
    folder, params, result, client = trained
    experiment = client.get_experiment(client.get_run(result.run_id).info.experiment_id)
    assert experiment.name == params.train.experiment_name
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert "Model training" in experiment.tags["mlflow.note.content"], "tells a new user where the runs are"


def test_an_existing_experiment_gets_the_kind_unless_it_has_one(workdir):
    client = mlflow.MlflowClient(tracking.tracking_uri())
    older = client.create_experiment("made-by-an-earlier-release")
    chosen = client.create_experiment("chosen-by-a-user", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})

    assert tracking.experiment_id(client, "made-by-an-earlier-release") == older
    assert tracking.experiment_id(client, "chosen-by-a-user") == chosen
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_run_has_its_three_splits_as_input_data_sets(trained):
    folder, params, result, client = trained
    run = client.get_run(result.run_id)
    index_counts = collections.Counter(entry.split for entry in contracts.read_index(folder / "shards"))
    manifest_sha256 = run.data.tags["manifest_sha256"]

    logged = {}
    for dataset_input in run.inputs.dataset_inputs:
        context = {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"]
        logged[context] = dataset_input.dataset
    assert set(logged) == {"training", "validation", "test"}
    for split, context in (("train", "training"), ("validation", "validation"), ("test", "test")):
        dataset = logged[context]
        assert dataset.name == f"digits-{split}"
        assert dataset.digest == manifest_sha256[:12]
        assert dataset.source_type == "local"
        assert str(folder / "shards") in dataset.source
        assert json.loads(dataset.profile)["num_rows"] == index_counts[split] > 0
        assert "class_name" in dataset.schema


def test_the_run_is_described_in_words(trained):
    folder, params, result, client = trained
    index_counts = collections.Counter(entry.split for entry in contracts.read_index(folder / "shards"))
    written_by_train = client.get_run(result.run_id).data.tags["mlflow.note.content"]
    assert written_by_train.startswith("**mnist_cnn** trained on **digits**")
    assert f"{index_counts['train']} training, {index_counts['validation']} validation" in written_by_train
    assert "Validation accuracy: " in written_by_train
    assert "Test:" not in written_by_train, "evaluate ran after train wrote it"

    # register's call: the test scores evaluate logged since, and the decision.
    text = tracking.describe_run(client, result.run_id, decision="version 1 of `tiny`, alias `champion`: the first")
    assert client.get_run(result.run_id).data.tags["mlflow.note.content"] == text
    test_precision = client.get_run(result.run_id).data.metrics["test_precision_at_1"]
    assert f"- Test: precision@1 **{test_precision:.4f}**" in text
    summary, registration, test = [line for line in text.splitlines() if line][:3]  # the UI's unfolded lines
    assert summary.startswith("**mnist_cnn** trained on **digits**")
    assert registration == "**Registration:** version 1 of `tiny`, alias `champion`: the first"
    assert test.startswith("- Test: ")
    assert f"- DVC experiment: `{EXPERIMENT_NAME}` (from `0123456`)" in text
    assert f"manifest sha256 `{client.get_run(result.run_id).data.tags['manifest_sha256'][:12]}`" in text


def test_the_run_is_tagged_with_the_dvc_experiment(trained, monkeypatch):
    folder, params, result, client = trained
    tags = client.get_run(result.run_id).data.tags
    assert tags["dvc_experiment"] == EXPERIMENT_NAME
    assert tags["dvc_experiment_baseline"] == BASELINE

    monkeypatch.delenv(tracking.DVC_EXPERIMENT_VARIABLE, raising=False)
    monkeypatch.delenv(tracking.DVC_BASELINE_VARIABLE, raising=False)
    assert tracking.dvc_experiment_tags() == {}, "outside `dvc exp run` there is no experiment to name"


def test_the_run_logs_system_metrics_and_stops_sampling_when_it_ends(trained):
    folder, params, result, client = trained
    metrics = client.get_run(result.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics
    history = client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    assert [point.step for point in history] == list(range(len(history)))
    assert not [thread for thread in threading.enumerate() if thread.name == "SystemMetricsMonitor"]
    assert "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ, "the interval is set for the run's start only"


def test_shards_without_an_index_log_no_data_sets_and_say_so(workdir, capsys):
    shards = workdir / "shards"
    shards.mkdir()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run() as run:
        training_run.log_data("digits", "ab" * 32, shards)
    assert mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs == []
    assert "index.csv is missing" in capsys.readouterr().out
    assert "(image counts unknown)" in tracking.describe_run(mlflow.MlflowClient(), run.info.run_id)
