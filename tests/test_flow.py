"""The Prefect flow across runs: DVC decides what is up to date, failures stop before register."""

import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from tasks.common import local_http
from tests.conftest import FAST, assert_cache_intact, stop, write_params
from tests.test_pipeline import _dvc


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [flow_state.state_details.flow_run_id]}),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=50,
        )
    # Task run names are "<task name>-<3 hex digits>".
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in task_runs}


def _versions(folder: pathlib.Path) -> int:
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return sum(
        len(client.search_model_versions(f"name = '{model.name}'")) for model in client.search_registered_models()
    )


def test_unchanged_stages_are_skipped_and_dvc_agrees(repository_copy, prefect_server):
    from flows import pipeline

    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 0.0})
    first = pipeline.pipeline("params.yaml", return_state=True)
    assert first.is_completed(), first.message
    assert "Stages run: download, convert, train, evaluate, register" in first.result()
    assert "Data: 1797 added, 0 removed, 0 changed since nothing: a first conversion" in first.result()
    assert "Data and pipelines are up to date." in _dvc("status", cwd=repository_copy).stdout
    nothing = _dvc("repro", cwd=repository_copy)
    assert nothing.returncode == 0 and "Running stage" not in nothing.stdout

    second = pipeline.pipeline("params.yaml", return_state=True)
    assert "Stages run: nothing: every stage was up to date" in second.result()
    assert "Data: no new data since 20" in second.result() and "; nothing trained" in second.result()
    assert _task_states(second) == {
        "download": "Skipped",
        "convert": "Skipped",
        "train": "Skipped",
        "evaluate": "Skipped",
        "register": "Skipped",
        "summary": "Completed",
    }
    assert _versions(repository_copy) == 1, "a skipped register registers nothing"

    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 0.0, "train.epochs": 2})
    third = pipeline.pipeline("params.yaml", return_state=True)
    assert "Stages run: train, evaluate, register" in third.result()
    assert "Data: unchanged; trained again for changed code or settings" in third.result()
    assert _versions(repository_copy) == 2
    assert "Data and pipelines are up to date." in _dvc("status", cwd=repository_copy).stdout
    # DVC's cache shares its files' data with the outputs (cache.type hardlink on this file system), so the
    # shards take their size once; train's second model replaced the first one's files instead of writing
    # into them, so the cache still holds the first model intact.
    shards = [path for path in (repository_copy / "data" / "shards" / "digits").iterdir() if path.is_file()]
    assert shards and all(path.stat().st_nlink == 2 for path in shards)
    assert_cache_intact(repository_copy)


def test_a_failed_training_fails_the_flow_registers_nothing_and_the_rerun_resumes_there(
    repository_copy, prefect_server
):
    from flows import pipeline

    write_params(repository_copy / "params.yaml", {**FAST, "train.learning_rate": 1e300, "train.ema_momentum": None})
    failed = pipeline.pipeline("params.yaml", return_state=True)
    assert failed.is_failed()
    states = _task_states(failed)
    assert states["train"] == "Failed" and "register" not in states
    with pytest.raises(FloatingPointError, match="training diverged"):
        failed.result()
    assert _versions(repository_copy) == 0

    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 0.0})
    rerun = pipeline.pipeline("params.yaml", return_state=True)
    assert rerun.is_completed()
    assert "Stages run: train, evaluate, register" in rerun.result()
    assert _versions(repository_copy) == 1


def test_a_bad_override_fails_before_any_work(repository_copy, prefect_server):
    from flows import pipeline
    from tasks.common import config

    state = pipeline.pipeline("params.yaml", {"train.epochs": 0}, return_state=True)
    assert state.is_failed()
    with pytest.raises(config.ConfigError, match="train.epochs = 0"):
        state.result()
    assert not (repository_copy / "data" / "raw").exists()


def _get(url: str) -> dict | list:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _wait_for(check, timeout: float, what: str, processes=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{what}: a process ended early with code {process.returncode}")
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what}: not within {timeout} s")


def test_the_served_deployment_runs_on_a_prefect_server(repository_copy, tmp_path):
    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 0.0})
    port = local_http.free_port()
    api = f"http://127.0.0.1:{port}/api"
    bin_dir = pathlib.Path(sys.executable).parent
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")} | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "serve")}
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    served = None
    try:
        _wait_for(lambda: _get(f"{api}/health"), 180, "prefect server start", [server])
        served = subprocess.Popen(
            [sys.executable, "-m", "flows.deploy", "--cron", "0 3 * * *"],
            cwd=repository_copy,
            env=environment,
            stdout=logs["serve"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deployment = _wait_for(
            lambda: _get(f"{api}/deployments/name/image-classification/nightly"),
            180,
            "python -m flows.deploy",
            [server, served],
        )
        schedules = [item["schedule"]["cron"] for item in deployment["schedules"]]
        assert schedules == ["0 3 * * *"]
        # A busy server answers 503 now and then: ask again until it takes the run.
        flow_run = _wait_for(
            lambda: _post(f"{api}/deployments/{deployment['id']}/create_flow_run", {}),
            60,
            "create a flow run",
            [server, served],
        )
        final = _wait_for(
            lambda: (
                (run := _get(f"{api}/flow_runs/{flow_run['id']}"))["state"]["type"]
                in {"COMPLETED", "FAILED", "CRASHED"}
                and run
            ),
            400,
            "the triggered flow run",
            [server, served],
        )
        assert final["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert json.loads((repository_copy / "reports" / "registry.json").read_text())["version"] == "1"
    finally:
        stop(served)
        stop(server)
        for log in logs.values():
            log.close()
