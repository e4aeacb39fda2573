"""Shared fixtures: tiny image folders, an isolated MLflow store, one Prefect test server per session."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pathlib
import subprocess
import threading

# DVC sets up its logging when imported, wrapping sys.stderr (colorama) as it is at that moment; Prefect's
# console log handler later writes through that wrapper. Imported here, they hold the session's stream,
# not one that pytest closes when the test that first imported DVC ends.
import dvc.repo  # noqa: F401
import numpy as np
import PIL.Image
import pytest
import yaml

from bench import workspace
from tasks.common import local_http

REPOSITORY = workspace.REPOSITORY
# The slowest test files, slowest first (from `pytest --durations`): the test command hands whole files to
# its two workers in collection order (`--dist loadfile --no-loadscope-reorder`), so a slow file handed out
# last keeps one worker busy while the other has nothing left. xdist's own order (files with the most tests
# first) put these few-test files last.
SLOWEST_FILES = [
    "test_register.py",
    "test_kill.py",
    "test_flow.py",
    "test_mirrored.py",
    "test_training.py",
    "test_team_setup.py",
    "test_pipeline.py",
    "test_multi_worker.py",
    "test_tracking_server.py",
    "test_concurrency.py",
    "test_pretrained.py",
    "test_nightly.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collects the slowest files first, the others after them in their usual order."""
    rank = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


def make_image_folder(
    root: pathlib.Path, classes: int = 3, per_class: int = 12, size: int = 8, seed: int = 0
) -> pathlib.Path:
    """<root>/<class>/<n>.png: each class a distinct brightness pattern, in RGB, L and P modes."""
    random = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            base = np.full((size, size), 40 + 80 * label, dtype=np.int16)
            pixels = np.clip(base + random.integers(-20, 20, (size, size)), 0, 255).astype(np.uint8)
            image = PIL.Image.fromarray(pixels)
            image = [image, image.convert("RGB"), image.convert("P")][index % 3]
            image.save(folder / f"{index:03d}.png")
    return root


def assert_cache_intact(repository: pathlib.Path) -> None:
    """Every file in the repository's DVC cache still has the content its name (that content's md5) says:
    nothing wrote into a file that DVC's cache shares with the workspace (cache.type hardlink)."""
    cached = [path for path in (repository / ".dvc" / "cache" / "files" / "md5").rglob("*") if path.is_file()]
    assert len(cached) > 3
    for path in cached:
        name = path.parent.name + path.name.removesuffix(".dir")
        assert hashlib.md5(path.read_bytes()).hexdigest() == name, f"{path} was changed after DVC cached it"


def write_params(path: pathlib.Path, overrides: dict[str, object]) -> None:
    """Copies the repository's params.yaml to `path` with dotted-key overrides applied."""
    params = yaml.safe_load((REPOSITORY / "params.yaml").read_text())
    for dotted_key, value in overrides.items():
        *parents, leaf = dotted_key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


# Small enough for seconds on 2 cores, real enough to exercise every stage.
# What register attaches to a champion's run (ONNX too, where the onnx extra is installed).
EXPORTED = (
    "export/saved_model",
    "export/model_float32.tflite",
    "export/model_float16.tflite",
    "export/model_int8.tflite",
    "export/checks.json",
    "export/checks.md",
)
# Tests of whole runs skip the served-model check (a server start, about 10 s, per promotion): the tests of
# register, exports, the tracking server and the nightly flow run it.
FAST = {"train.epochs": 1, "train.image_size": [8, 8], "train.batch_size": 64, "register.serve_check": False}


@pytest.fixture
def workdir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty working folder with its own MLflow store (the default one: ./mlflow.db)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def repository_copy(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A fresh git + DVC checkout of the repository's code and config, as a user would clone it."""
    copy = workspace.copy_repository(tmp_path / "repository")
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return copy


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect API for the whole session (it takes ~30 s to start on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri(monkeypatch: pytest.MonkeyPatch):
    # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI: undo it after each test.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder: its URI."""
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow_server")
    port = local_http.free_port()
    command = [
        str(pathlib.Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        yield uri
    finally:
        stop(server)
        log.close()


def stop(process: subprocess.Popen | None) -> None:
    """Stops a server started in its own session, with everything it started."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


class _Served:
    """What the test server serves at one path, and how it misbehaves."""

    def __init__(
        self,
        data: bytes,
        fail_first: int = 0,
        cut_first_after: int | None = None,
        stall_first_after: int | None = None,
        credentials: str | None = None,
        redirect_to: str | None = None,
    ):
        self.data = data
        self.credentials = credentials  # "user:password": answer 401 to a request without them (HTTP basic)
        self.redirect_to = redirect_to  # a path or URL: answer 302 there
        self.fail_first = fail_first  # answer 503 to this many requests first
        self.cut_first_after = cut_first_after  # first full response: close after this many bytes
        self.stall_first_after = stall_first_after  # first full response: hang after this many bytes
        self.stalled = threading.Event()  # set once that many bytes were sent and the response hangs


class LocalServer:
    """An HTTP server on 127.0.0.1 with Range, ETag and scripted failures; records every request."""

    def __init__(self):
        import http.server

        self.routes: dict[str, _Served] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) in arrival order
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *arguments):  # quiet: pytest shows failures, not access logs
                pass

            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                served = server.routes.get(self.path)
                if served is None:
                    self.send_error(404)
                    return
                if served.fail_first > 0:
                    served.fail_first -= 1
                    self.send_error(503, "busy")
                    return
                if (
                    served.credentials is not None
                    and self.headers.get("Authorization")
                    != f"Basic {base64.b64encode(served.credentials.encode()).decode()}"
                ):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="data"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if served.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", served.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = f'"{len(served.data)}-{hash(served.data) & 0xFFFFFFFF:x}"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                start = 0
                requested = self.headers.get("Range", "")
                if requested.startswith("bytes=") and self.headers.get("If-Range") in (None, etag):
                    start = int(requested.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(served.data) - 1}/{len(served.data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(served.data) - start))
                self.send_header("ETag", etag)
                self.end_headers()
                body = served.data[start:]
                if served.cut_first_after is not None:
                    body, served.cut_first_after = body[: served.cut_first_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if served.stall_first_after is not None:
                    # A transfer that stops moving, until the client goes away (or a minute passes).
                    sent, served.stall_first_after = body[: served.stall_first_after], None
                    self.wfile.write(sent)
                    self.wfile.flush()
                    served.stalled.set()
                    self.connection.settimeout(60)
                    with contextlib.suppress(OSError):
                        self.connection.recv(1)  # returns when the client closes (or is killed)
                    self.close_connection = True
                    return
                # A client may stop reading (a download refused for want of disk space, a killed one).
                with contextlib.suppress(ConnectionError):
                    self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def serve(self, path: str, data: bytes, **behaviour) -> str:
        self.routes[path] = _Served(data, **behaviour)
        return self.url + path

    def stalled(self, path: str) -> threading.Event:
        """Set once the stalled response of `path` has sent its bytes and hangs."""
        return self.routes[path].stalled

    def gets(self, path: str) -> list[dict[str, str]]:
        return [headers for requested, headers in self.requests if requested == path]

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def http_server(monkeypatch: pytest.MonkeyPatch):
    """A LocalServer for one test; retries wait milliseconds instead of seconds."""
    from tasks.data import fetch

    monkeypatch.setattr(fetch, "BACKOFF_SECONDS", 0.01)
    server = LocalServer()
    try:
        yield server
    finally:
        server.stop()
