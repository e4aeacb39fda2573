"""flows/local_api.py: the temporary local API a flow starts without a configured server, in a process of its own.

Each test runs a small flow in a fresh Python process, as `python -m flows.pipeline` runs one, with its own
PREFECT_HOME and no PREFECT_API_URL: the flow's logs must reach the API before it stops at exit, and no
server process may outlive the flow.
"""

import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import textwrap

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]

FLOW = textwrap.dedent(
    """
    import json, socket, sys
    import prefect
    from flows import local_api
    from tasks.common import local_http

    taken = None
    if sys.argv[1] == "taken":  # the first port chosen is taken before the API binds it
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken, choose = holder.getsockname()[1], local_http.free_port
        chosen = iter([taken])
        local_http.free_port = lambda: next(chosen, None) or choose()
    api = local_api.start()
    if sys.argv[1] == "dead":  # the process ends before it answers: Prefect is left to start its own
        api.process.kill()

    @prefect.flow(name="local-api-check")
    def check():
        prefect.get_run_logger().info("a line for the API")
        return prefect.settings.PREFECT_API_URL.value()

    with local_api.serving(api):
        used = check()
    print(json.dumps({"used": used, "ours": api.url, "pid": api.process.pid, "port": api.port, "taken": taken}))
    """
)


def _run_flow(tmp_path: pathlib.Path, mode: str) -> tuple[dict, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    environment |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPOSITORY)}
    done = subprocess.run(
        [sys.executable, "-c", FLOW, mode], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return json.loads(done.stdout.strip().splitlines()[-1]), output


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _logged(prefect_home: pathlib.Path) -> list[str]:
    with sqlite3.connect(prefect_home / "prefect.db") as database:
        return [message for (message,) in database.execute("SELECT message FROM log")]


def test_the_flow_runs_on_the_api_started_here_which_gets_every_log_and_stops_at_exit(tmp_path):
    # The first port chosen is taken before the API binds it: it starts again on another (one process start less
    # for the suite than a test of its own).
    result, output = _run_flow(tmp_path, "taken")
    assert result["port"] != result["taken"], "launched again on another port"
    assert result["used"] == result["ours"], "the flow ran on the API started here"
    assert "a line for the API" in _logged(tmp_path / "prefect"), "the run's logs reached it before it stopped"
    assert "Error logging to API" not in output and "failed to process item" not in output, output
    assert "View at" not in output, "no link to a UI the temporary API does not serve"
    assert _gone(result["pid"]), "the API's process stopped with the flow's"


def test_an_api_that_cannot_start_leaves_the_run_to_prefects_own(tmp_path):
    result, output = _run_flow(tmp_path, "dead")
    assert result["used"] is None, "Prefect's own temporary API, which it starts and stops itself"
    assert "Starting temporary server" in output
    assert "a line for the API" in _logged(tmp_path / "prefect")
    assert _gone(result["pid"])
