"""Prefect's temporary local API, started first thing, so that it starts on one core while the flow's heavy
modules import on the other.

Without a configured server (PREFECT_API_URL), Prefect starts a temporary local API at a flow's first call
to it: uvicorn serving Prefect's server app (`create_app(ephemeral=True)`, no UI) in a process of its own on
127.0.0.1, about 3-4 s on 2 cores. Prefect's way of starting it (SubprocessASGIServer) first imports Prefect's
server in the flow's own process (1.2-1.4 s, holding the GIL against TensorFlow's import on the main thread,
and longer when both import at once), and only then launches the process: the flow began 10 s after
`python -m flows.pipeline` started, against 4 s for the same imports without Prefect's server (2 cores).

`start` launches the same process as Prefect does, with nothing of the server imported here, as soon as the
settings are read; `serving` waits until it answers and points this process's Prefect at it for the run
(PREFECT_API_URL, as a configured server is); it stops at exit. If it cannot start (its output shows why),
`serving` stops it and leaves the run to Prefect, which starts its own and reports any failure itself. With a
configured server there is nothing to start, which is the way to pay no start-up at all (README, With Prefect).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator

from tasks.common import local_http

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]  # uvicorn imports this module's create_app from here
# uvicorn's exit code when it could not start: its port taken between choosing and binding it (launched again on
# another, at most LAUNCHES times in all), or any other failure to start.
STARTUP_FAILURE = 3
LAUNCHES = 3


class LocalApi:
    """The temporary API's process on 127.0.0.1."""

    def __init__(self) -> None:
        self.process, self.port = _launch()
        atexit.register(self.stop)  # at exit, whatever happens before

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_until_answering(self, timeout_seconds: float) -> bool:
        """True once /health answers; False if the process ended or `timeout_seconds` passed first."""
        deadline = time.monotonic() + timeout_seconds
        opener = local_http.direct_opener()
        launches = 1
        while time.monotonic() < deadline:
            if self.process.poll() == STARTUP_FAILURE and launches < LAUNCHES:
                self.process, self.port = _launch()
                launches += 1
            elif self.process.poll() is not None:
                return False
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                opener.open(f"{self.url}/health", timeout=1) as response,
            ):
                if response.status == 200:
                    return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start() -> LocalApi | None:
    """The temporary API, starting; None where a server is configured or Prefect may start none."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    return LocalApi()


@contextlib.contextmanager
def serving(api: LocalApi | None) -> Iterator[None]:
    """This process's Prefect uses `api` within the block, once it answers. The API stops when this process
    exits, after Prefect has sent it the run's last logs and events (Prefect sends them at exit too, and its
    exit handlers, registered after `start`'s, run before)."""
    if api is None:
        yield
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        temporary_settings,
    )

    if not api.wait_until_answering(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()):
        api.stop()
        yield  # Prefect starts its own and says why if it cannot
        return
    # No UI is served (as from Prefect's own temporary API): no "View at" link to a page that is not there.
    with temporary_settings(updates={PREFECT_API_URL: api.url, PREFECT_UI_URL: ""}):
        yield


def create_app():
    """uvicorn's app factory in the API's process: Prefect's server app as its temporary API serves it."""
    from prefect.server.api.server import create_app as create_server_app

    return create_server_app(ephemeral=True, final=True)


def _launch() -> tuple[subprocess.Popen, int]:
    """uvicorn on a free port of 127.0.0.1, with this process's Prefect settings and the UI off, as Prefect
    launches its temporary API (its output passes through: errors only)."""
    from prefect.settings import get_current_settings

    port = local_http.free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(REPOSITORY), "--factory", f"{__name__}:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    variables = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
    }
    return subprocess.Popen(command, env=variables), port
