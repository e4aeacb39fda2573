"""Team mode: the pipeline against a real `mlflow server`, read back through its REST API; its password never shows."""

import json
import os
import urllib.parse
import urllib.request

from tasks.common import contracts
from tests.conftest import EXPORTED, make_image_folder
from tests.test_register import LEARNS
from tests.test_secrets import PASSWORD
from tests.test_train_evaluate_register import register_in, run_stages


def _get(server: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(
        f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30
    ) as response:
        return json.load(response)


def test_runs_artifacts_and_versions_land_on_the_server(workdir, mlflow_server, monkeypatch, capfd):
    # With a user name and password in the URI, as a careless team member might set it: they are used
    # (the server ignores them) and appear in no file, no output, no run and no registered version.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("http://", f"http://alice:{PASSWORD}@"))
    for variable in (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):  # set by the pipeline: gone after the test
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    make_image_folder(workdir / "raw", classes=3, per_class=20)
    params, result = run_stages(workdir, LEARNS)
    # Served too: `mlflow models serve` reads the version from this server, with the credentials.
    registered = register_in(workdir, params, name="served", min_precision=0.0, serve_check=True)

    assert contracts.RunRecord.read(workdir / "models").tracking_uri == mlflow_server
    assert [path for path in workdir.rglob("*") if path.is_file() and PASSWORD.encode() in path.read_bytes()] == []
    printed = capfd.readouterr()
    assert PASSWORD not in printed.out + printed.err, "not even in MLflow's 'View run at' links"
    assert not (workdir / "mlflow.db").exists(), "nothing goes to a local store when a server is set"
    run = _get(mlflow_server, "runs/get", run_id=result.run_id)["run"]
    metrics = {metric["key"]: metric["value"] for metric in run["data"]["metrics"]}
    assert metrics["test_images"] == contracts.Manifest.read(workdir / "shards").count("test")
    assert "test_precision_at_1" in metrics
    assert {tag["key"]: tag["value"] for tag in run["data"]["tags"]}["dataset"] == "digits"
    artifacts = _get(mlflow_server, "artifacts/list", run_id=result.run_id, path="evaluation")["files"]
    assert {"evaluation/confusion_matrix.png", "evaluation/misclassified.png", "evaluation/metrics.json"} <= {
        item["path"] for item in artifacts
    }
    exported = _get(mlflow_server, "artifacts/list", run_id=result.run_id, path="export")["files"]
    assert set(EXPORTED) <= {item["path"] for item in exported}
    version = _get(mlflow_server, "registered-models/alias", name="served", alias="champion")["model_version"]
    assert version["version"] == registered.version == "1"
    assert {tag["key"]: tag["value"] for tag in version["tags"]}["run_id"] == result.run_id
    assert PASSWORD not in json.dumps(run) + json.dumps(version), "nor in the run's params and tags or the version's"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", PASSWORD), (
        "sent as basic authentication"
    )
