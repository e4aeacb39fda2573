"""Serving a logged model the way its users will, `mlflow models serve`, and checking what it answers.

    check_served("models:/m-...", images, expected)   # starts the server, asks it once, stops it

The server is a real process, started as a user would (`mlflow models serve -m URI --env-manager local`)
in its own process group, with this process's tracking store and credentials in its environment so that
it resolves models:/ URIs, and its output in a temporary file. Once /ping answers, the uint8 images go
to /invocations as {"inputs": [...]}: the logged signature is one uint8 tensor "image" of shape
(-1, -1, -1, 3) (tasks/modeling/training_run.py), which MLflow's scoring server takes as a nested list.
It answers {"predictions": [[...], ...]}, one row of class probabilities per image, which must equal
`expected` (the in-process model's answers to the same images) within SERVED_TOLERANCE. The process group
is stopped whatever happens. Each check costs a server start: about 12 s for the tiny test model on 2
cores, most of it importing TensorFlow.

A failure raises: errors.BadInput when the model cannot be served or answers wrongly (the server exits,
refuses the request, answers other probabilities: a retry would do the same), errors.Outage when it does
not answer in time (a busy machine may do better later); the message ends with the server's last lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np

from tasks.common import errors, local_http, tracking

# Largest |served - expected| probability. JSON carries each float32 exactly; what remains is the rounding
# of a batch computed in another process (measured: 0 on the tiny test model).
SERVED_TOLERANCE = 1e-4
POLL_SECONDS = 0.5  # between two /ping requests while the server starts
STOP_SECONDS = 10.0  # for the process group to end after SIGTERM, then again after SIGKILL
LOG_LINES = 15  # of the server's output in an error message


@dataclasses.dataclass(frozen=True)
class ServedCheck:
    seconds_to_first_answer: float  # from starting the process to the answer of /invocations
    images: int
    largest_difference: float  # of any probability, served against expected


def check_served(
    model_uri: str, images: np.ndarray, expected: np.ndarray, timeout_seconds: float = 180.0
) -> ServedCheck:
    """Serves `model_uri` with `mlflow models serve` and checks that its answer to `images` (uint8, a few:
    they travel as JSON) is `expected`; the server must answer within `timeout_seconds` of starting."""
    port = local_http.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # one worker: one copy of the model
    with tempfile.TemporaryDirectory() as folder:
        log_path = pathlib.Path(folder) / "server.log"
        with log_path.open("wb") as log:
            started = time.monotonic()
            deadline = started + timeout_seconds
            server = subprocess.Popen(
                command, env=_environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                _wait_until_ready(server, url, deadline, model_uri, log_path)
                answered = _ask(server, url, images, deadline, model_uri, log_path)
                seconds = time.monotonic() - started
            finally:
                _stop(server)
        difference = _compare(answered, np.asarray(expected), model_uri, log_path)
    return ServedCheck(seconds_to_first_answer=seconds, images=len(images), largest_difference=difference)


def _environment() -> dict[str, str]:
    tracking.tracking_uri()  # MLFLOW_TRACKING_URI's user name and password, if any, go to the environment
    environment = dict(os.environ)
    environment["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    environment["MLFLOW_REGISTRY_URI"] = mlflow.get_registry_uri()
    # `mlflow models serve` starts `uvicorn` by name through bash: this interpreter's folder first on the
    # PATH makes it this environment's, also when the environment was never activated.
    environment["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


def _wait_until_ready(
    server: subprocess.Popen, url: str, deadline: float, model_uri: str, log_path: pathlib.Path
) -> None:
    opener = local_http.direct_opener()
    while True:
        try:
            with opener.open(f"{url}/ping", timeout=POLL_SECONDS * 4):
                return
        except OSError:
            pass  # not listening yet, or still loading the model
        if server.poll() is not None:
            raise errors.BadInput(
                f"mlflow models serve -m {model_uri} exited (code {server.returncode}) before answering /ping: "
                f"the model cannot be served from this environment. Server output:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise errors.Outage(
                f"mlflow models serve -m {model_uri} did not answer /ping in time; give it a longer timeout "
                f"on a busy machine. Server output:\n{_tail(log_path)}"
            )
        time.sleep(POLL_SECONDS)


def _ask(
    server: subprocess.Popen, url: str, images: np.ndarray, deadline: float, model_uri: str, log_path: pathlib.Path
) -> np.ndarray:
    """The served model's probabilities for `images`."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"inputs": np.asarray(images).tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with local_http.direct_opener().open(request, timeout=max(deadline - time.monotonic(), 1.0)) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")[:1000]
        raise errors.BadInput(
            f"the model served from {model_uri} refused the images (HTTP {error.code}): {body}\n"
            f"Server output:\n{_tail(log_path)}"
        ) from None
    except OSError as error:
        if server.poll() is not None:
            raise errors.BadInput(
                f"mlflow models serve -m {model_uri} exited (code {server.returncode}) while answering. "
                f"Server output:\n{_tail(log_path)}"
            ) from None
        raise errors.Outage(
            f"the model served from {model_uri} did not answer in time ({error}). Server output:\n{_tail(log_path)}"
        ) from None
    if not isinstance(answer, dict) or "predictions" not in answer:
        raise errors.BadInput(
            f"the model served from {model_uri} answered without predictions: {json.dumps(answer)[:300]}"
        )
    return np.asarray(answer["predictions"], dtype=np.float32)


def _compare(answered: np.ndarray, expected: np.ndarray, model_uri: str, log_path: pathlib.Path) -> float:
    """The largest |answered - expected|; raises errors.BadInput if it is beyond SERVED_TOLERANCE."""
    if answered.shape != expected.shape:
        raise errors.BadInput(
            f"the model served from {model_uri} answered probabilities of shape {answered.shape}, "
            f"{expected.shape} expected. Server output:\n{_tail(log_path)}"
        )
    difference = float(np.max(np.abs(answered - expected))) if answered.size else 0.0
    if not difference <= SERVED_TOLERANCE:  # `not <=`: a NaN fails too
        raise errors.BadInput(
            f"the model served from {model_uri} answers differently from the model in this process: largest "
            f"probability difference {difference:.3g}, at most {SERVED_TOLERANCE:g} expected. "
            f"Server output:\n{_tail(log_path)}"
        )
    return difference


def _tail(log_path: pathlib.Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(none)"
    return "\n".join(lines[-LOG_LINES:]) or "(none)"


def _stop(server: subprocess.Popen) -> None:
    """Ends the server's process group (the mlflow command and the uvicorn it started): SIGTERM, then
    SIGKILL to what still runs after STOP_SECONDS; returns once none of it runs."""
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, stop_signal)
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:
            server.poll()  # reaps our own child
            if not _group_runs(server.pid):
                return
            time.sleep(0.1)


def _group_runs(group: int) -> bool:
    """Whether a process of `group` still runs. Zombies do not count: uvicorn outlives the mlflow command
    that started it by a moment, and then waits, dead, for PID 1 to reap it."""
    processes = pathlib.Path("/proc")
    if not processes.is_dir():  # not Linux: any member, zombie or not
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in processes.glob("[0-9]*/stat"):
        try:
            # After the command name in parentheses: state, parent, process group, ...
            state, _, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
        if state != "Z" and int(process_group) == group:
            return True
    return False
