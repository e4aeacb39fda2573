"""The watcher starts the deployment once per change of the image folder: a burst of copies is one run."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time

import pydantic
import pytest
import yaml

from flows import deploy, watch  # at import, not in a test: see tests/test_bad_input.py
from tasks.common import errors, local_http
from tasks.data.sources import imagefolder
from tests.conftest import REPOSITORY, write_params


def _watcher(folder: pathlib.Path, state: pathlib.Path, log: pathlib.Path, *options: str) -> subprocess.Popen:
    import prefect.settings

    environment = os.environ | {"PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "flows.watch", "--folder", str(folder), "--state", str(state), *options]
    with log.open("a") as stream:
        return subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=stream, stderr=subprocess.STDOUT)


def _wait_for(check, timeout: float, what: str, log: pathlib.Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout} s; the watcher said:\n{log.read_text()[-3000:]}")


def _runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    async def read():
        async with get_client() as client:
            only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            # limit and sort given: this server answers 422 to the client's defaults (None) for both
            return await client.read_flow_runs(deployment_filter=only_this, limit=50, sort=FlowRunSort.ID_DESC)

    return asyncio.run(read())


def _copy(folder: pathlib.Path, start: int, count: int) -> None:
    for index in range(start, start + count):
        target = folder / f"class_{index % 3}" / f"{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\x89PNG" + index.to_bytes(4, "big"))


def test_a_burst_of_copies_starts_the_deployment_once(prefect_server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_params(tmp_path / "params.yaml", {"dataset.name": "imagefolder", "dataset.source": str(images)})
    # The product's deployment (flows/deploy.py, what `python -m flows.deploy` serves), registered without
    # serving it: its runs stay Scheduled, which is all this test counts.
    served = deploy.deployment(str(tmp_path / "params.yaml"), name="watch-test")
    deployment_id = served.apply()
    assert served.concurrency_limit == 1
    assert served.concurrency_options.collision_strategy == "ENQUEUE"

    state, log = tmp_path / "state" / "watch.json", tmp_path / "watch.log"
    watcher = _watcher(images, state, log, "--interval", "0.2", "--quiet-seconds", "1")
    try:
        _wait_for(lambda: "first look" in log.read_text(), 30, "the watcher's first look", log)
        for burst in range(4):  # 400 files in four bursts over ~1.5 s, closer together than the quiet period
            _copy(images, 100 * burst, 100)
            time.sleep(0.4)
        _wait_for(lambda: "sent" in log.read_text(), 30, "the announcement", log)
        _wait_for(lambda: _runs(deployment_id), 30, "a flow run of the deployment", log)
        time.sleep(3)  # room for a second, wrong run to appear
        assert len(_runs(deployment_id)) == 1
        assert log.read_text().count(f"sent {watch.EVENT}") == 1
        assert "400 files" in log.read_text()  # all four bursts in the one event

        _copy(images, 400, 1)  # a change after the first run's event: a second event, a second run
        _wait_for(lambda: len(_runs(deployment_id)) == 2, 30, "the second flow run", log)
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
    assert sorted(path.name for path in images.iterdir()) == ["class_0", "class_1", "class_2"]  # nothing written there

    # A restarted watcher (here: --once, as from cron) stays quiet about what it announced.
    once = _watcher(images, state, log, "--once")
    assert once.wait(timeout=30) == 0
    assert "unchanged since last recorded" in log.read_text()
    assert log.read_text().count(f"sent {watch.EVENT}") == 2


def test_a_change_the_server_did_not_get_is_announced_later(tmp_path):
    images, state = tmp_path / "images", tmp_path / "watch.json"
    _copy(images, 0, 3)
    unreachable = f"http://127.0.0.1:{local_http.free_port()}/api"  # a port nobody listens on
    command = [sys.executable, "-m", "flows.watch", "--folder", str(images), "--state", str(state), "--once"]
    command += ["--interval", "0.1", "--quiet-seconds", "0"]
    environment = os.environ | {"PREFECT_API_URL": unreachable}

    def once() -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=60)

    assert once().returncode == 0  # the first look records the folder
    recorded = state.read_text()
    _copy(images, 3, 1)
    failed = once()
    assert failed.returncode == 1, failed.stderr
    assert f"could not send {watch.EVENT} to the Prefect API at {unreachable}" in failed.stderr
    assert state.read_text() == recorded  # so the next call tries again


def test_the_fingerprint_is_the_one_download_records(tmp_path):
    folder = tmp_path / "images"
    _copy(folder, 0, 30)
    (folder / "class_0" / "nested").mkdir()
    (folder / "class_0" / "nested" / "a b.png").write_bytes(b"x")
    seen = watch.snapshot(folder)
    assert seen.fingerprint == imagefolder.folder_fingerprint(folder)
    assert seen.files == 31


def test_a_missing_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code = errors.run_main(watch.main, ["--folder", str(missing), "--once"])
    assert code == errors.BAD_INPUT
    assert f"flows.watch: error: the image folder {missing} does not exist" in capsys.readouterr().err


def test_the_default_state_file_is_outside_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = tmp_path / "images"
    assert not watch.default_state_path(folder).is_relative_to(folder)
    code = errors.run_main(watch.main, ["--folder", str(tmp_path), "--state", str(tmp_path / "s.json")])
    assert code == errors.BAD_INPUT


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPOSITORY / "prefect.yaml").read_text())["deployments"][0]


def test_prefect_yaml_has_the_same_trigger_and_limit(prefect_yaml):
    import prefect.events

    triggers = [
        pydantic.TypeAdapter(prefect.events.DeploymentTriggerTypes).validate_python(spec)
        for spec in prefect_yaml["triggers"]
    ]
    assert [trigger.expect for trigger in triggers] == [{watch.EVENT}]
    folder_resource = prefect.events.Resource({"prefect.resource.id": watch.resource_id("/data/photos")})
    assert triggers[0].match.matches(folder_resource)
    assert not triggers[0].match.matches(prefect.events.Resource({"prefect.resource.id": "prefect.flow-run.1"}))
    assert prefect_yaml["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
