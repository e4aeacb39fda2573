"""Prefect's temporary local API, started in the background while the flow's heavy modules import.

Without a configured server (PREFECT_API_URL), Prefect starts a temporary local API at a flow's first
call to it: a new Python process that imports Prefect's server and answers /health, about 5 s on 2
cores, and only after the flow's own imports (TensorFlow, Keras, MLflow: some 7 s). Started first, on a
thread, the same server (Prefect's SubprocessASGIServer, one per process, which its client then finds
running) starts while those modules import: `python -m flows.pipeline` reached its flow 3.3 s sooner
(16.0 -> 12.7 s on 2 cores). With a configured server there is nothing to start, which is the way to
pay no start-up at all (README, With Prefect).
"""

from __future__ import annotations

import contextlib
import threading


def start_in_background() -> threading.Thread | None:
    """The thread starting the temporary API; None where a server is configured or Prefect may start none."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    thread = threading.Thread(target=_start, name="prefect-local-api", daemon=True)
    thread.start()
    return thread


def wait(thread: threading.Thread | None) -> None:
    """Until the API started there answers (or failed to start: the flow's first call then tries again and says why)."""
    if thread is not None:
        thread.join()


def _start() -> None:
    from prefect.server.api.server import SubprocessASGIServer

    # A failure is not lost: the flow's first API call starts the server again and reports why it cannot.
    with contextlib.suppress(Exception):
        SubprocessASGIServer().start()
