"""Orchestration overhead: `python -m flows.pipeline` against the same five stage functions in one plain process.

    python -m bench.orchestration                        # digits, one epoch, two runs each: ~3 minutes on 2 idle cores
    python -m bench.orchestration --set train.epochs=3   # any params.yaml key, as the flow's --set
    python -m bench.orchestration --repeats 1            # quicker, noisier

Every run starts from a fresh copy of the repository (git, DVC, no data, no dvc.lock, no DVC cache,
a new MLflow store) in a temporary folder, with the settings written into the copy's params.yaml:
so the flow keeps DVC's books as a user's default run does (asks DVC before each stage, records it in
dvc.lock after), and nothing is skipped. Each run is a fresh process, as a user would start it:
- plain: download, convert, train, evaluate and register called one after another with the
  arguments the flow's tasks pass, and the same DVC bookkeeping (dvc_stages.up_to_date and commit);
- flow: `python -m flows.pipeline`, as a user starts it, on Prefect's temporary local API (no server
  configured), whose start-up the run pays like every such run (flows/local_api.py starts it on
  another core while the flow's heavy modules import).
Before them, Prefect's API is started once alone, which creates its database in the benchmark's own
PREFECT_HOME (once per machine for a user; timed and shown, not counted), and once more after them:
its start-up alone, shown. Plain and flow runs alternate, --repeats times each; the fastest of each
counts (other work on the machine only ever slows a run down). Overhead = flow - plain: Prefect's
imports, the API's start-up, its task and state bookkeeping, logs, artifacts and shutdown. Then a
no-op `dvc repro` in the last flow's copy, best of three. Prints a table, writes
reports/bench/orchestration.json and exits non-zero when the overhead exceeds 10 s or the no-op
`dvc repro` takes more than 3 s. A configured server (PREFECT_API_URL, as a team runs it) pays no
start-up at all.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import time

import yaml

from bench import report as bench_report
from bench import workspace

MAX_OVERHEAD_SECONDS = 10.0
MAX_NOOP_REPRO_SECONDS = 3.0
RESULT_MARK = "bench.orchestration result: "
# One epoch: every stage does the same kind of work, only less of it; no precision gate, so that
# register always registers a version (its real work) whatever one epoch reaches.
DEFAULT_SETTINGS = {"train.epochs": 1, "register.min_precision": 0.0}


def write_params(copy: pathlib.Path, settings: dict) -> None:
    """The copy's params.yaml with dotted-key settings applied, so that the flow keeps DVC's books."""
    params = yaml.safe_load((copy / "params.yaml").read_text())
    for dotted_key, value in settings.items():
        *parents, leaf = dotted_key.split(".")
        node = params
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"--set {dotted_key}: params.yaml has no such key")
        node[leaf] = value
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def environment() -> dict[str, str]:
    """For the processes run in a copy: the venv's tools first (dvc runs `python -m tasks.<stage>`), this
    repository importable for bench/ (the copy's own tasks/ and flows/ come first: the working folder leads
    sys.path), output unbuffered so that lines arrive when written, and the default MLflow store."""
    variables = {**os.environ, "PYTHONUNBUFFERED": "1"}
    variables["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{variables.get('PATH', '')}"
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workspace.REPOSITORY), variables.get("PYTHONPATH")]))
    variables.pop("MLFLOW_TRACKING_URI", None)
    return variables


def run_timed(
    command: list[str], cwd: pathlib.Path, variables: dict[str, str]
) -> tuple[float, float, list[tuple[float, str]]]:
    """Wall seconds of `command`, CPU seconds (user + system) of it and every process it waited for (the flow's
    API server included: unlike wall time, hardly changed by other work sharing the cores), and each line of
    its output with the second it arrived; raises if it fails."""
    cpu_before = _children_cpu_seconds()
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(
        command, cwd=cwd, env=variables, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
    seconds = time.perf_counter() - start
    cpu_seconds = _children_cpu_seconds() - cpu_before
    if process.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise RuntimeError(f"{' '.join(command)} in {cwd} exited with {process.returncode}:\n{tail}")
    return seconds, cpu_seconds, lines


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_plain() -> dict:
    """The flow's five stage calls without Prefect, in the working folder: seconds per stage, its DVC share apart.

    Each stage is called as the flow's task calls it: tasks.stages.call.
    """
    start = time.perf_counter()
    from flows import dvc_stages
    from tasks import convert, download, evaluate, register, train  # noqa: F401 - imported as the flow does, timed apart
    from tasks import stages as pipeline_stages
    from tasks.common import config

    imported = time.perf_counter()
    params = config.load_params("params.yaml")
    tracked = dvc_stages.tracked("params.yaml", None)
    stages = {}
    for name in pipeline_stages.STAGES:
        begun = time.perf_counter()
        if tracked and dvc_stages.up_to_date(name):
            raise RuntimeError(f"{name} is up to date: the plain run needs a clean copy")
        checked = time.perf_counter()
        pipeline_stages.call(name, params)
        ran = time.perf_counter()
        if tracked:
            dvc_stages.commit(name)
        stages[name] = {"stage": ran - checked, "dvc": (checked - begun) + (time.perf_counter() - ran)}
    return {"import": imported - start, "run": time.perf_counter() - imported, "stages": stages}


def run_startup() -> dict:
    """Prefect's temporary local API started alone, as a flow run starts it (flows/local_api.py): Prefect's
    settings read, the server's process launched, its first answer to /health."""
    start = time.perf_counter()
    from flows import local_api

    imported = time.perf_counter()
    api = local_api.start()
    if api is None or not api.wait_until_answering(timeout_seconds=120):
        raise RuntimeError("Prefect's temporary local API did not start (configured: PREFECT_API_URL?)")
    started = time.perf_counter()
    api.stop()
    return {"import": imported - start, "startup": started - imported}


def _run_in_child(
    mode: str, cwd: pathlib.Path, variables: dict[str, str]
) -> tuple[float, float, dict, list[tuple[float, str]]]:
    """`python -m bench.orchestration --<mode>` in `cwd`: its wall and CPU seconds, the result it printed,
    its output."""
    seconds, cpu_seconds, lines = run_timed([sys.executable, "-m", "bench.orchestration", f"--{mode}"], cwd, variables)
    result = next(line for _, line in reversed(lines) if line.startswith(RESULT_MARK))
    return seconds, cpu_seconds, json.loads(result.removeprefix(RESULT_MARK)), lines


def measure_noop_repro(
    copy: pathlib.Path, variables: dict[str, str], attempts: int = 3, arguments: tuple[str, ...] = ()
) -> list[float]:
    """Wall seconds of `dvc repro [arguments]` with nothing to do; raises if any stage ran."""
    timings = []
    for _ in range(attempts):
        seconds, _, lines = run_timed(["dvc", "repro", *arguments], copy, variables)
        ran = [line for _, line in lines if line.startswith("Running stage")]
        if ran:
            raise RuntimeError(f"dvc repro in {copy} was not a no-op: {ran}")
        timings.append(seconds)
    return timings


def flow_task_seconds(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from one task's end to the next one's (Prefect logs "Task run '<name>-<id>' - Finished in state ...")."""
    finished = re.compile(r"Task run '(?P<name>[a-z_]+)-[0-9a-f]+' - Finished in state")
    seconds, previous = {}, 0.0
    for arrived, line in lines:
        match = finished.search(line)
        if match:
            seconds[match["name"]] = arrived - previous
            previous = arrived
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml setting for every run",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="plain and flow runs each, alternating; the fastest counts (default: %(default)s)",
    )
    # The child processes the benchmark starts in each copy.
    for mode in ("plain", "startup"):
        parser.add_argument(f"--{mode}", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    children = {"plain": run_plain, "startup": run_startup}
    for mode, child in children.items():
        if getattr(arguments, mode):
            result = child()
            print(RESULT_MARK + json.dumps(result), flush=True)  # what the parent reads; Prefect may log after it
            return 0
    settings = {**DEFAULT_SETTINGS, **dict(_assignment(text) for text in arguments.assignments)}
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as folder:
        report = measure(pathlib.Path(folder), settings, arguments.repeats)
    print_report(report)
    bench_report.write("orchestration", report)
    return 0 if report["passed"] else 1


def _assignment(text: str) -> tuple[str, object]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    return key.strip(), yaml.safe_load(value)


def _fresh_copy(folder: pathlib.Path, settings: dict) -> pathlib.Path:
    copy = workspace.copy_repository(folder)
    write_params(copy, settings)
    return copy


def measure(folder: pathlib.Path, settings: dict, repeats: int = 2, repro_attempts: int = 3) -> dict:
    """Runs everything in `folder`: the report, without the machine."""
    variables = {**environment(), "PREFECT_HOME": str(folder / "prefect-home")}
    variables.pop("PREFECT_API_URL", None)  # the temporary local API, as `python -m flows.pipeline` starts it
    _, _, first_start, _ = _run_in_child("startup", folder, variables)  # creates Prefect's database
    plain_runs, flow_runs = [], []
    for attempt in range(repeats):  # alternating, so that a burst of other work hits both alike
        seconds, cpu_seconds, child, _ = _run_in_child(
            "plain", _fresh_copy(folder / f"plain-{attempt}", settings), variables
        )
        plain_runs.append({"wall": seconds, "cpu": cpu_seconds, **child})
        flow_copy = _fresh_copy(folder / f"flow-{attempt}", settings)
        seconds, cpu_seconds, lines = run_timed([sys.executable, "-m", "flows.pipeline"], flow_copy, variables)
        flow_runs.append({"wall": seconds, "cpu": cpu_seconds, "tasks": flow_task_seconds(lines)})
    _, _, startup, _ = _run_in_child("startup", folder, variables)
    repro = measure_noop_repro(flow_copy, variables, repro_attempts)
    report = summarise(settings, plain_runs, flow_runs, repro)
    report["api_startup_seconds"] = round(startup["startup"], 2)
    report["api_first_start_new_database"] = round(first_start["startup"], 2)
    report["precision_at_1"] = round(
        json.loads((flow_copy / "reports" / "metrics.json").read_text())["precision_at_1"], 4
    )
    return report


def summarise(settings: dict, plain_runs: list[dict], flow_runs: list[dict], repro: list[float]) -> dict:
    """The fastest plain run, the fastest flow run (its API's start-up included), their difference and the verdict."""
    plain = min(plain_runs, key=lambda run: run["wall"])
    flow = min(flow_runs, key=lambda run: run["wall"])
    overhead = flow["wall"] - plain["wall"]
    return {
        "settings": settings,
        "repeats": len(flow_runs),
        "plain": _rounded(plain),
        "flow": _rounded(flow),
        "overhead_seconds": round(overhead, 2),
        # CPU seconds of every process, hardly changed by other work on the cores: a steadier view of the same cost.
        "overhead_cpu_seconds": round(flow["cpu"] - plain["cpu"], 2),
        "noop_repro_seconds": round(min(repro), 2),
        "runs": {
            "plain": [_rounded(run) for run in plain_runs],
            "flow": [_rounded(run) for run in flow_runs],
            "noop_repro": [round(value, 2) for value in repro],
        },
        "max_overhead_seconds": MAX_OVERHEAD_SECONDS,
        "max_noop_repro_seconds": MAX_NOOP_REPRO_SECONDS,
        "passed": overhead <= MAX_OVERHEAD_SECONDS and min(repro) <= MAX_NOOP_REPRO_SECONDS,
    }


def _rounded(value):
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def print_report(report: dict) -> None:
    settings = ", ".join(f"{key}={value}" for key, value in report["settings"].items())
    print(f"digits pipeline, params.yaml with {settings}; fastest of {report['repeats']} runs each")
    plain, flow = report["plain"], report["flow"]
    dvc_share = sum(parts["dvc"] for parts in plain["stages"].values())
    rows = [
        [
            "plain: five stage functions, one process",
            plain["wall"],
            plain["cpu"],
            plain["import"],
            plain["run"],
            f"DVC bookkeeping {dvc_share:.1f} s of the run",
        ],
        [
            "flow: python -m flows.pipeline",
            flow["wall"],
            flow["cpu"],
            None,
            None,
            "temporary local API, its start-up included",
        ],
        [
            "Prefect API start-up alone",
            report["api_startup_seconds"],
            None,
            None,
            None,
            "launch, first /health; in the flow while it imports",
        ],
        [
            "Prefect API first start, new database",
            report["api_first_start_new_database"],
            None,
            None,
            None,
            "once per PREFECT_HOME; not in the runs above",
        ],
        [
            "overhead: flow - plain",
            report["overhead_seconds"],
            report["overhead_cpu_seconds"],
            None,
            None,
            "CPU: every process, the server's included",
        ],
        [
            "no-op dvc repro (best)",
            report["noop_repro_seconds"],
            None,
            None,
            None,
            " ".join(f"{value:.2f}" for value in report["runs"]["noop_repro"]),
        ],
    ]
    bench_report.print_table(["measured", "wall s", "CPU s", "import s", "run s", "note"], rows)
    stages = [[name, parts["stage"], parts["dvc"], flow["tasks"].get(name)] for name, parts in plain["stages"].items()]
    bench_report.print_table(
        ["stage", "plain: stage s", "plain: DVC s", "flow: s since the previous task ended"], stages
    )
    print(f"test precision@1 of the flow's model: {report['precision_at_1']:.4f}")
    bench_report.check(
        "orchestration overhead, the API's start-up included",
        report["overhead_seconds"],
        MAX_OVERHEAD_SECONDS,
        higher_is_better=False,
        unit=" s",
    )
    bench_report.check(
        "no-op dvc repro", report["noop_repro_seconds"], MAX_NOOP_REPRO_SECONDS, higher_is_better=False, unit=" s"
    )


if __name__ == "__main__":
    sys.exit(main())
