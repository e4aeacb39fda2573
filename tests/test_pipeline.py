"""The whole pipeline in a fresh copy of the repository: once by `dvc repro`, once as the Prefect flow."""

import json
import os
import pathlib
import subprocess
import sys

import mlflow
import yaml

from tests.conftest import FAST, write_params

STAGES = ["download", "convert", "train", "evaluate", "register"]


def _dvc(*arguments: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    # The stages run `python -m tasks.<stage>` through the shell: this interpreter must be first on PATH.
    bin_dir = pathlib.Path(sys.executable).parent
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(bin_dir / "dvc"), *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )


def _champion(folder: pathlib.Path, name: str):
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return client, client.get_model_version_by_alias(name, "champion")


def test_dvc_repro_runs_every_stage_then_nothing(repository_copy):
    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 0.0})
    first = _dvc("repro", cwd=repository_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    assert "Traceback" not in first.stdout + first.stderr

    assert len(list((repository_copy / "data" / "raw" / "digits").rglob("*.png"))) == 1797
    assert (repository_copy / "data" / "shards" / "digits" / "manifest.json").is_file()
    metrics = json.loads((repository_copy / "reports" / "metrics.json").read_text())
    assert metrics["images"] == 330 and 0 <= metrics["precision_at_1"] <= 1 and "top_5" in metrics
    assert (repository_copy / "reports" / "evaluation" / "confusion_matrix.png").is_file()
    registry = json.loads((repository_copy / "reports" / "registry.json").read_text())
    client, champion = _champion(repository_copy, "digits-mnist_cnn")
    assert str(champion.version) == registry["version"] == "1"
    run = client.get_run(registry["run_id"])
    assert run.data.metrics["test_precision_at_1"] == metrics["precision_at_1"]
    convert_lock = yaml.safe_load((repository_copy / "dvc.lock").read_text())["stages"]["convert"]
    assert run.data.tags["shards_dvc_md5"] == convert_lock["outs"][0]["md5"]
    assert (
        run.data.tags["git_commit"]
        == subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repository_copy, capture_output=True, text=True
        ).stdout.strip()
    )

    lock = (repository_copy / "dvc.lock").read_text()
    for stage in STAGES:
        assert f"  {stage}:" in lock
    second = _dvc("repro", cwd=repository_copy)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert (repository_copy / "dvc.lock").read_text() == lock
    status = _dvc("status", cwd=repository_copy)
    assert "Data and pipelines are up to date." in status.stdout

    plots = _dvc("plots", "show", "--json", cwd=repository_copy)
    assert plots.returncode == 0 and "predictions.csv" in plots.stdout and "history.csv" in plots.stdout
    shown = _dvc("metrics", "show", "--json", cwd=repository_copy)
    assert (
        json.loads(shown.stdout)[""]["data"]["reports/metrics.json"]["data"]["precision_at_1"]
        == metrics["precision_at_1"]
    )


def test_prefect_flow_runs_the_same_stages(repository_copy, prefect_server):
    from flows import pipeline

    # A gate that one epoch cannot pass: the version is registered as challenger.
    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 1.0})
    state = pipeline.pipeline("params.yaml", return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    registry = json.loads((repository_copy / "reports" / "registry.json").read_text())

    assert (registry["model_name"], registry["version"], registry["alias"]) == ("digits-mnist_cnn", "1", "challenger")
    assert registry["reason"].endswith("is below register.min_precision 1.0")
    assert "digits-mnist_cnn version 1: `challenger`" in summary and registry["reason"] in summary
    metrics = json.loads((repository_copy / "reports" / "metrics.json").read_text())
    assert metrics["images"] == 330
    client = mlflow.MlflowClient(f"sqlite:///{repository_copy / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("digits-mnist_cnn", "challenger").version) == "1"
    run = client.get_run(json.loads((repository_copy / "models" / "run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"
    assert run.data.metrics["test_precision_at_1"] == metrics["precision_at_1"]
