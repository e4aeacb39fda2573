"""Two runs at once in one repository: one works, the other stops at once, naming it; nothing is mixed up."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from flows import pipeline  # at import, not in a test: see tests/test_bad_input.py
from tasks.common import errors, locking
from tests.conftest import FAST, REPOSITORY, write_params
from tests.test_pipeline import _dvc


def _holder(folder: pathlib.Path) -> str:
    try:
        return (folder / locking.LOCK_FILE).read_text()
    except FileNotFoundError:
        return ""


def _when(condition, action, timeout: float = 300) -> tuple[threading.Thread, dict]:
    """Runs `action` in a thread as soon as `condition()` holds; its result lands in the dict."""
    outcome: dict = {}

    def wait_then_act():
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                outcome["timeout"] = True
                return
            time.sleep(0.05)
        outcome["result"] = action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread, outcome


def _versions(folder: pathlib.Path, name: str) -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return sorted(int(version.version) for version in client.search_model_versions(f"name = '{name}'"))


def _flow_while(command: list[str], folder: pathlib.Path, holding: str, environment: dict[str, str]):
    """Starts `command` in `folder`; once the lock names `holding`, runs the flow in this process.

    Returns the flow's final state, the command's output and its exit code.
    """
    environment = {
        **os.environ,
        **environment,
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    process = subprocess.Popen(
        command, cwd=folder, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment
    )
    try:
        deadline = time.monotonic() + 300
        while holding not in _holder(folder):
            assert process.poll() is None and time.monotonic() < deadline, f"{' '.join(command)} took the lock"
            time.sleep(0.05)
        state = pipeline.pipeline("params.yaml", return_state=True)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return state, output, process.returncode


def test_a_busy_folder_stops_a_stage_before_it_changes_anything(workdir, capsys):
    from tasks import download

    write_params(workdir / "params.yaml", FAST)
    with locking.pipeline_lock("the nightly flow"):
        code = errors.run_main(download.main, [], exclusive=True)
    stderr = capsys.readouterr().err
    assert code == errors.BUSY == 3
    assert stderr.startswith(
        "tasks.download: error: another pipeline run is working in this folder: "
        f"the nightly flow (process {os.getpid()} on "
    )
    assert "nothing was changed. Run again when it has finished" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (workdir / "data").exists()
    assert errors.run_main(download.main, [], exclusive=True) == 0, "released when the holder is done"
    assert _holder(workdir) == "", "a released lock names no one"


def test_a_killed_holder_leaves_no_stale_lock(workdir):
    holding = (
        "from tasks.common import locking; import time\n"
        "with locking.pipeline_lock('a run about to be killed'):\n"
        "    print('held', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holding],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "held"
        with (
            pytest.raises(errors.PipelineBusy, match="a run about to be killed"),
            locking.pipeline_lock("a second run"),
        ):
            pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with locking.pipeline_lock("the next run"):
        assert "the next run" in _holder(workdir)


def test_dvc_repro_and_flows_exclude_each_other_and_leave_consistent_state(repository_copy, prefect_server):
    # min_precision 1.0: versions register as challengers, which skips the champion's export (seconds)
    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 1.0})

    # 1. The flow runs; `dvc repro` started while it trains finds DVC's lock held and stops (DVC's message).
    training = lambda: any((repository_copy / "checkpoints").glob("*/"))  # noqa: E731 - train's backup folder appears
    thread, refused = _when(training, lambda: _dvc("repro", cwd=repository_copy))
    flow = pipeline.pipeline("params.yaml", return_state=True)
    thread.join(timeout=300)
    assert flow.is_completed(), flow.message
    assert "result" in refused, "the flow trained, so `dvc repro` was started meanwhile"
    output = refused["result"].stdout + refused["result"].stderr
    assert refused["result"].returncode != 0, output
    assert "Unable to acquire lock" in output and "Running stage" not in output
    assert "Data and pipelines are up to date." in _dvc("status", cwd=repository_copy).stdout
    assert _versions(repository_copy, "digits-mnist_cnn") == [1]

    # 2. `dvc repro` runs; the flow started while its train stage works stops at once.
    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 1.0, "train.epochs": 2})
    stopped, output, returncode = _flow_while(
        [str(pathlib.Path(sys.executable).parent / "dvc"), "repro"], repository_copy, "python -m tasks.train", {}
    )
    assert stopped.is_failed()
    with pytest.raises(
        errors.PipelineBusy,
        match=r"another pipeline run is working in this folder: python -m tasks\.train \(process \d+",
    ):
        stopped.result()
    assert returncode == 0, output
    assert "Data and pipelines are up to date." in _dvc("status", cwd=repository_copy).stdout
    assert _versions(repository_copy, "digits-mnist_cnn") == [1, 2], "one new version, numbers unique"

    # 3. Two flows: one started while another flow is working stops at once, naming the first.
    from prefect.settings import PREFECT_API_URL

    write_params(repository_copy / "params.yaml", {**FAST, "register.min_precision": 1.0, "train.epochs": 3})
    second, output, returncode = _flow_while(
        [sys.executable, "-m", "flows.pipeline"],
        repository_copy,
        "Prefect flow run",
        {"PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    assert second.is_failed()
    with pytest.raises(
        errors.PipelineBusy,
        match=r"another pipeline run is working in this folder: Prefect flow run '[^']+' of params\.yaml \(process \d+",
    ):
        second.result()
    assert returncode == 0, output
    assert "Data and pipelines are up to date." in _dvc("status", cwd=repository_copy).stdout
    assert _versions(repository_copy, "digits-mnist_cnn") == [1, 2, 3], "one new version, numbers unique"
