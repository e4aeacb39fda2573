"""The team set-up end to end: prefect.yaml deployed to a process work pool on a Prefect server with basic
authentication, a worker that runs each flow run in a fresh clone of a bare repository, an MLflow server with
basic authentication and a database file, and a DVC remote folder. The second run pulls what the first one
pushed and skips every stage. Also: the pieces of that round trip (dvc_stages.pull and commit_lock) alone."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

from tasks.common import errors, local_http
from tests.conftest import FAST, stop, write_params

BIN = pathlib.Path(sys.executable).parent  # the environment's commands: prefect, mlflow, dvc
STAGES = ["download", "convert", "train", "evaluate", "register"]
IDENTITY = {  # a worker's git commits dvc.lock under an identity of its own
    "GIT_AUTHOR_NAME": "nightly",
    "GIT_AUTHOR_EMAIL": "nightly@localhost",
    "GIT_COMMITTER_NAME": "nightly",
    "GIT_COMMITTER_EMAIL": "nightly@localhost",
}
PREFECT_AUTH = "team:prefect-password-1"  # what the server expects and every client sends (user:password)
MLFLOW_ADMIN = ("admin", "admin-password-1")
MLFLOW_USER = ("nightly", "nightly-password-1")  # the worker's own MLflow account
MODEL = "digits-mnist_cnn"


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect, MLflow or git settings (a test harness may have set some),
    the environment's commands first on PATH, and `extra`."""
    kept = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "MLFLOW_", "GIT_"))}
    return {**kept, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def _run(command: list[str], cwd: pathlib.Path, environment: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=environment or _environment(**IDENTITY), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


class _Processes:
    """Servers and the worker, each in its own session; stopped with everything they started, including the
    flow runs the worker put in sessions of their own (found by a mark in their environment)."""

    def __init__(self, logs: pathlib.Path):
        self.logs = logs
        self.mark = uuid.uuid4().hex
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], environment: dict[str, str], cwd: pathlib.Path) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("w") as log:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env={**environment, "TEAM_SETUP_TEST": self.mark},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def log(self, name: str, characters: int = 6000) -> str:
        return f"--- {name}.log ---\n{(self.logs / f'{name}.log').read_text(errors='replace')[-characters:]}"

    def stop_all(self) -> None:
        for process in reversed(self.started):
            stop(process)
        for group in self._marked_groups():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)

    def _marked_groups(self) -> set[int]:
        groups = set()
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if f"TEAM_SETUP_TEST={self.mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    groups.add(os.getpgid(int(entry.name)))
            except (OSError, ProcessLookupError):
                continue
        return groups - {os.getpgrp()}


def _wait_until_up(url: str, process: subprocess.Popen, processes: _Processes, name: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start\n{processes.log(name)}") from None
            time.sleep(0.5)


def _request(url: str, credentials: str | None, body: dict | None = None) -> dict:
    """A GET (or a POST of `body` as JSON) with HTTP basic authentication when `credentials` ("user:password")."""
    headers = {"Content-Type": "application/json"}
    if credentials is not None:
        headers["Authorization"] = f"Basic {base64.b64encode(credentials.encode()).decode()}"
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as response:
        return json.load(response)


def _refused(url: str, body: dict | None = None) -> int:
    """The HTTP status of a request without credentials (an answer would fail the test)."""
    with pytest.raises(urllib.error.HTTPError) as refusal:
        _request(url, None, body)
    return refusal.value.code


# --- the servers


def _start_prefect_server(processes: _Processes, home: pathlib.Path) -> tuple[str, subprocess.Popen]:
    port = local_http.free_port()
    server = processes.start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        _environment(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            # No 02:00 runs made ahead of time: the test starts its runs itself.
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        ),
        home,
    )
    return f"http://127.0.0.1:{port}/api", server


def _start_mlflow_server(processes: _Processes, folder: pathlib.Path) -> tuple[str, subprocess.Popen]:
    port = local_http.free_port()
    # The users' database: a file beside the runs' database (the default is ./basic_auth.db).
    (folder / "basic_auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'users.db'}\n"
        f"admin_username = {MLFLOW_ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # a password hash per request costs seconds here (model uploads: hundreds)
    )
    server = processes.start(
        "mlflow-server",
        [
            str(BIN / "mlflow"),
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'runs.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
        ],
        _environment(
            MLFLOW_AUTH_CONFIG_PATH=str(folder / "basic_auth.ini"),
            MLFLOW_AUTH_ADMIN_PASSWORD=MLFLOW_ADMIN[1],
            MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # its GenAI job runners: seven idle processes here
        ),
        folder,
    )
    return f"http://127.0.0.1:{port}", server


# --- the repository the worker clones


def _bare_repository(tmp_path: pathlib.Path, remote: pathlib.Path) -> pathlib.Path:
    """The project as a team would push it: tiny settings, a DVC remote in its committed .dvc/config, branch main."""
    from bench import workspace

    checkout = workspace.copy_repository(tmp_path / "checkout")
    write_params(checkout / "params.yaml", {**FAST, "register.min_precision": 0.0})
    with (checkout / "flows" / "__init__.py").open("a") as package:  # says where the worker imported it from
        package.write("\nprint(f'flows imported from {__file__}')\n")
    _run([str(BIN / "dvc"), "remote", "add", "--default", "storage", str(remote)], checkout)
    _run(["git", "add", "-A"], checkout)
    _run(["git", "commit", "-q", "-m", "tiny settings, a DVC remote"], checkout)
    _run(["git", "branch", "-M", "main"], checkout)
    _run(["git", "clone", "-q", "--bare", str(checkout), str(tmp_path / "project.git")], tmp_path)
    return checkout


def _commits(bare: pathlib.Path) -> list[str]:
    return _run(["git", "--git-dir", str(bare), "log", "--format=%s", "main"], bare).splitlines()


# --- the runs


def _trigger(prefect: dict[str, str], checkout: pathlib.Path) -> str:
    printed = _run([str(BIN / "prefect"), "deployment", "run", "image-classification/nightly"], checkout, prefect)
    return re.search(r"UUID: ([0-9a-f-]{36})", printed).group(1)


def _wait_for(api: str, flow_run: str, processes: _Processes, seconds: float) -> dict:
    """The flow run once it ended; a failure shows its log and the worker's."""
    deadline = time.monotonic() + seconds
    while True:
        run = _request(f"{api}/flow_runs/{flow_run}", PREFECT_AUTH)
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, (
            f"still {run['state']['name']}\n{_logs(api, flow_run)}\n{processes.log('worker')}"
        )
        time.sleep(2)
    assert run["state"]["type"] == "COMPLETED", (
        f"{run['state']['name']}: {run['state']['message']}\n{_logs(api, flow_run)}\n{processes.log('worker')}"
    )
    return run


def _logs(api: str, flow_run: str, until: str | None = None) -> str:
    """The flow run's log; with `until`, once it holds that (or after 30 s): the run's processes send their log
    lines in batches, which may reach the server after the run has ended."""
    body = {"logs": {"flow_run_id": {"any_": [flow_run]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    deadline = time.monotonic() + 30
    while True:
        log = "\n".join(entry["message"] for entry in _request(f"{api}/logs/filter", PREFECT_AUTH, body))
        if until is None or until in log or time.monotonic() > deadline:
            return log
        time.sleep(1)


def _task_states(api: str, flow_run: str) -> dict[str, str]:
    """Task name -> state name; task states reach the server as events, a moment after the flow run ends."""
    body = {"flow_runs": {"id": {"any_": [flow_run]}}, "limit": 50}
    deadline = time.monotonic() + 30
    while True:
        runs = _request(f"{api}/task_runs/filter", PREFECT_AUTH, body)
        states = {run["name"].rsplit("-", 1)[0]: run["state"]["name"] for run in runs if run["state"]}
        if (len(states) == len(STAGES) + 1 and "Pending" not in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def _summary(api: str, flow_run: str) -> str:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run]}, "key": {"any_": ["run-summary"]}}}
    return "\n".join(artifact["data"] for artifact in _request(f"{api}/artifacts/filter", PREFECT_AUTH, body))


def _mlflow(server: str, endpoint: str, **query: str) -> dict:
    url = f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    return _request(url, ":".join(MLFLOW_USER))


@dataclasses.dataclass
class _Team:
    api: str  # the Prefect API
    mlflow: str  # the MLflow server
    prefect: dict[str, str]  # a Prefect client's environment
    checkout: pathlib.Path  # where prefect.yaml is deployed from
    bare: pathlib.Path  # the repository the worker clones
    remote: pathlib.Path  # the DVC remote


def _set_up(tmp_path: pathlib.Path, processes: _Processes, monkeypatch: pytest.MonkeyPatch) -> _Team:
    """The README's team set-up: both servers, the workers' MLflow account, the work pool, the deployment, a worker."""
    for folder in ("logs", "prefect", "mlflow", "worker", "dvc-remote"):
        (tmp_path / folder).mkdir()
    # Both servers start while git and DVC make the repository (~30 s each on 2 cores).
    api, prefect_server = _start_prefect_server(processes, tmp_path / "prefect")
    mlflow_uri, mlflow_server = _start_mlflow_server(processes, tmp_path / "mlflow")
    checkout = _bare_repository(tmp_path, tmp_path / "dvc-remote")
    _wait_until_up(f"{api}/health", prefect_server, processes, "prefect-server", 180)
    _wait_until_up(f"{mlflow_uri}/health", mlflow_server, processes, "mlflow-server", 180)
    assert _refused(f"{api}/flow_runs/filter", {}) == 401, "the Prefect API refuses a request without the auth string"

    import mlflow.server

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_ADMIN[1])
    mlflow.server.get_app_client("basic-auth", tracking_uri=mlflow_uri).create_user(*MLFLOW_USER)

    prefect = _environment(
        PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=PREFECT_AUTH
    )
    _run([str(BIN / "prefect"), "work-pool", "create", "training-pool", "--type", "process"], checkout, prefect)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], checkout, prefect)
    worker = {
        **prefect,
        **IDENTITY,
        "IMAGE_PIPELINE_REPOSITORY": (tmp_path / "project.git").as_uri(),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_USER[0],
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_USER[1],
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # a run starts within 2 s of being asked for, not 10
        "TMPDIR": str(tmp_path / "worker"),  # where the worker makes each run's folder, and the clone in it
    }
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "training-pool", "--name", "test-worker"]
    processes.start("worker", command, worker, tmp_path / "worker")
    return _Team(api, mlflow_uri, prefect, checkout, tmp_path / "project.git", tmp_path / "dvc-remote")


def _on_the_remote(remote: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path.relative_to(remote) for path in remote.rglob("*") if path.is_file())


def test_two_nightly_runs_through_a_process_worker(tmp_path, monkeypatch):
    pytest.importorskip("flask_wtf", reason="mlflow server --app-name basic-auth needs mlflow[auth] (Flask-WTF)")
    processes = _Processes(tmp_path / "logs")
    try:
        team = _set_up(tmp_path, processes, monkeypatch)

        # The first run: every stage runs, the model is registered on the server, the outputs go to the DVC
        # remote and dvc.lock to the repository's main branch.
        first = _wait_for(team.api, _trigger(team.prefect, team.checkout), processes, 420)
        assert _task_states(team.api, first["id"]) == {**dict.fromkeys(STAGES, "Completed"), "summary": "Completed"}
        imported = re.search(r"flows imported from (\S+)", processes.log("worker", characters=10**7)).group(1)
        assert imported.endswith("/project-main/flows/__init__.py"), "the flow's code is the clone's"
        champion = _mlflow(team.mlflow, "registered-models/alias", name=MODEL, alias="champion")["model_version"]
        assert champion["version"] == "1"
        run = _mlflow(team.mlflow, "runs/get", run_id=champion["run_id"])["run"]
        assert "test_precision_at_1" in {metric["key"] for metric in run["data"]["metrics"]}
        cloned = _run(["git", "--git-dir", str(team.bare), "rev-parse", "main~1"], team.bare).strip()
        assert {tag["key"]: tag["value"] for tag in run["data"]["tags"]}["git_commit"] == cloned
        registered = f"{team.mlflow}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
        assert _refused(registered) == 401, "the MLflow server refuses a request without credentials"
        pushed = _on_the_remote(team.remote)
        assert pushed, "the outputs are on the DVC remote"
        assert _commits(team.bare)[0] == f"dvc.lock of Prefect flow run {first['name']}"
        lock = _run(["git", "--git-dir", str(team.bare), "show", "main:dvc.lock"], team.bare)
        assert all(f"  {stage}:\n" in lock for stage in STAGES)

        # The second run, in a new clone: it pulls the shards and models from the remote; download makes the
        # raw folder again (DVC keeps no copy of it), to the hash dvc.lock has, so every later stage is skipped.
        second = _wait_for(team.api, _trigger(team.prefect, team.checkout), processes, 240)
        skipped = dict.fromkeys(STAGES[1:], "Skipped")
        assert _task_states(team.api, second["id"]) == {"download": "Completed", **skipped, "summary": "Completed"}
        log = _logs(team.api, second["id"], until="dvc.lock unchanged: nothing to push")
        assert "From the DVC remote, as dvc.lock names them: data/shards/digits" in log, log
        assert "dvc.lock unchanged: nothing to push" in log
        assert "Stages run: download" in _summary(team.api, second["id"])
        assert _commits(team.bare)[0] == f"dvc.lock of Prefect flow run {first['name']}", "nothing new to record"
        assert _on_the_remote(team.remote) == pushed
        versions = _mlflow(team.mlflow, "model-versions/search", filter=f"name = '{MODEL}'")["model_versions"]
        assert [version["version"] for version in versions] == ["1"], "a skipped register registers nothing"
    finally:
        processes.stop_all()


# --- the round trip's pieces alone: seconds, no server


def _git_repository(folder: pathlib.Path, origin: pathlib.Path | None = None) -> pathlib.Path:
    """A clone of `origin` as prefect.yaml's pull step makes it (branch main, depth 1), or a new repository."""
    if origin is None:
        _run(["git", "init", "-q", "-b", "main", str(folder)], folder.parent)
        (folder / "code.py").write_text("print('v1')\n")
        _run(["git", "add", "-A"], folder)
        _run(["git", "commit", "-q", "-m", "code"], folder)
        return folder
    _run(["git", "clone", "-q", "--depth", "1", "--branch", "main", origin.as_uri(), str(folder)], folder.parent)
    return folder


def test_dvc_lock_goes_to_the_branch_even_when_it_moved_meanwhile(tmp_path, monkeypatch):
    from flows import dvc_stages

    for name, value in IDENTITY.items():
        monkeypatch.setenv(name, value)
    seed = _git_repository(tmp_path / "seed")
    origin = tmp_path / "origin.git"
    _run(["git", "clone", "-q", "--bare", str(seed), str(origin)], tmp_path)
    worker = _git_repository(tmp_path / "worker", origin)
    person = _git_repository(tmp_path / "person", origin)
    (person / "code.py").write_text("print('v2')\n")
    _run(["git", "commit", "-q", "-am", "new code"], person)
    _run(["git", "push", "-q", "origin", "main"], person)

    monkeypatch.chdir(worker)
    dvc_stages.can_commit()
    assert dvc_stages.commit_lock("nothing yet") == "dvc.lock: no stage recorded, nothing to push"
    (worker / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (worker / "outputs").mkdir()
    (worker / "outputs" / ".gitignore").write_text("/model\n")  # as DVC writes beside an output git did not ignore
    (worker / "notes.txt").write_text("not DVC's: stays out of the commit\n")
    assert dvc_stages.commit_lock("dvc.lock of run 1") == "dvc.lock pushed to main of origin"
    assert _commits(origin) == ["dvc.lock of run 1", "new code", "code"], "rebased onto the new code"
    assert _run(["git", "--git-dir", str(origin), "show", "main:outputs/.gitignore"], tmp_path) == "/model\n"
    assert "notes.txt" not in _run(["git", "--git-dir", str(origin), "ls-tree", "--name-only", "main"], tmp_path)
    assert dvc_stages.commit_lock("dvc.lock of run 2") == "dvc.lock unchanged: nothing to push"

    # A person's dvc.lock reached the branch meanwhile: theirs stays, this run's is dropped, nothing is left half done.
    _run(["git", "pull", "-q", "origin", "main"], person)
    (person / "dvc.lock").write_text("schema: '2.0'\nstages: {by: hand}\n")
    _run(["git", "commit", "-q", "-am", "dvc repro by hand"], person)
    _run(["git", "push", "-q", "origin", "main"], person)
    (worker / "dvc.lock").write_text("schema: '2.0'\nstages: {by: run 3}\n")
    assert dvc_stages.commit_lock("dvc.lock of run 3").startswith("dvc.lock not pushed: it changed on main of origin")
    assert _commits(origin)[0] == "dvc repro by hand"
    assert not (worker / ".git" / "rebase-merge").exists() and not (worker / ".git" / "rebase-apply").exists()

    _run(["git", "checkout", "-q", "--detach"], worker)
    with pytest.raises(errors.BadInput, match="detached HEAD"):
        dvc_stages.can_commit()


def test_pull_restores_what_the_remote_holds_and_leaves_the_rest_to_its_stage(tmp_path, monkeypatch):
    import dvc.repo

    from flows import dvc_stages

    for name, value in IDENTITY.items():
        monkeypatch.setenv(name, value)
    project = _git_repository(tmp_path / "project")
    monkeypatch.chdir(project)
    (project / "dvc.yaml").write_text("stages:\n  make:\n    cmd: python code.py\n    outs:\n      - out\n")
    (project / "out").mkdir()
    (project / "out" / "a.txt").write_text("made\n")
    with dvc.repo.Repo.init(str(project)) as repo:
        repo.commit("make", force=True)
    assert dvc_stages.pull() == ([], []), "no default remote: nothing to pull"

    remote = tmp_path / "remote"
    _run([str(BIN / "dvc"), "remote", "add", "--default", "storage", str(remote)], project)
    cache = project / ".dvc" / "cache"
    shutil.rmtree(project / "out")
    shutil.rmtree(cache)
    assert dvc_stages.pull() == ([], ["out"]), "an object the remote lacks: its stage runs"

    (project / "out").mkdir()
    (project / "out" / "a.txt").write_text("made\n")
    with dvc.repo.Repo(str(project)) as repo:
        repo.commit("make", force=True)
        repo.push()
    shutil.rmtree(project / "out")
    shutil.rmtree(cache)
    assert dvc_stages.pull() == (["out"], [])
    assert (project / "out" / "a.txt").read_text() == "made\n"
    assert dvc_stages.up_to_date("make")

    (project / "out" / "a.txt").write_text("changed by hand\n")
    assert dvc_stages.pull() == ([], []), "an output present is left to its stage"
    assert (project / "out" / "a.txt").read_text() == "changed by hand\n"
