"""Killed at any moment: `dvc repro` SIGKILLed inside each stage, then run again, ends as if never killed.

One uninterrupted `dvc repro` (stage by stage) is the reference; the repository is saved after each
stage. Each case restores the state just before its stage, starts `dvc repro <stage>` in its own
process group and kills the whole group (DVC and the stage) at one point: from outside when a file
or the HTTP server shows the moment, else with the KILL_POINT hook of tests/kill_point/. Then it runs
`dvc repro <stage>` again and checks that the stage's outputs equal the reference's, that nothing
partial is left anywhere, and that the stages before it were not run again.

The repository always lives at the same path (restored there, never moved), because MLflow and
run.json record absolute paths.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import mlflow
import numpy as np
import PIL.Image
import pytest
import yaml

from bench.workspace import copy_repository
from tasks.common import tracking
from tests.conftest import EXPORTED, FAST, LocalServer, make_image_folder, write_params

STAGES = ["download", "convert", "train", "evaluate", "register"]
ARCHIVE_PATH = "/digits-like.tar.gz"
BLOCK = 1 << 20  # tasks.data.fetch writes the download in blocks of this size
HOOK_FOLDER = pathlib.Path(__file__).parent / "kill_point"
TIMEOUT = 300  # seconds for one `dvc repro`


def _archive(folder: pathlib.Path) -> bytes:
    """Three classes of a dozen 8x8 images, and two 600x600 noise photos that make the archive span two
    download blocks, so that a transfer can be stopped with one block on disk."""
    make_image_folder(folder / "digits", classes=3, per_class=12)
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    for label in (0, 1):
        PIL.Image.fromarray(noise[:: 1 if label else -1]).save(folder / "digits" / f"class_{label}" / "photo.png")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder / "digits", arcname="digits")
    return buffer.getvalue()


def _dvc(folder: pathlib.Path, *arguments: str, environment: dict | None = None) -> subprocess.Popen:
    # Its own process group: a kill takes DVC and the stage it runs, as a power cut would.
    bin_dir = pathlib.Path(sys.executable).parent
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **(environment or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [str(bin_dir / "dvc"), *arguments],
        cwd=folder,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"dvc did not finish within {TIMEOUT} s:\n{output[-3000:]}")
    return output


def _repro(folder: pathlib.Path, stage: str) -> str:
    process = _dvc(folder, "repro", stage)
    output = _finish(process)
    assert process.returncode == 0, output[-3000:]
    return output


def _restore(snapshot: pathlib.Path, folder: pathlib.Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(snapshot, folder, symlinks=True)  # copy2: time stamps kept, so "not redone" is visible


def _tree(folder: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _mtimes(folder: pathlib.Path) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns for path in sorted(folder.rglob("*"))}


def _leftovers(folder: pathlib.Path) -> list[str]:
    """Anything a killed write could leave: temporary names, the convert spool, unfinished downloads, backups."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith((".git/", ".dvc/")):
            continue
        if ".partial" in path.name or path.name.endswith(".spool") or relative.startswith("checkpoints/"):
            found.append(relative)
    return sorted(found)


def _lock(folder: pathlib.Path) -> dict:
    path = folder / "dvc.lock"
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.is_file() else {}


@dataclasses.dataclass
class Reference:
    folder: pathlib.Path  # where every case runs
    snapshots: dict[str, pathlib.Path]  # "before-<stage>": the repository with the stages before it done
    server: LocalServer
    archive: bytes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    archive = _archive(base / "source")
    server = LocalServer()
    url = server.serve(ARCHIVE_PATH, archive)
    folder = copy_repository(base / "repository")
    write_params(
        folder / "params.yaml",
        {
            **FAST,
            "train.epochs": 2,
            "train.histogram_freq": 0,
            "train.backup_every_seconds": 0,
            "register.min_precision": 0.0,
            "dataset.name": "imagefolder",
            "dataset.source": url,
            "dataset.sha256": hashlib.sha256(archive).hexdigest(),
            "dataset.image_size": [8, 8],
        },
    )
    snapshots = {}
    try:
        for stage in STAGES:
            snapshots[f"before-{stage}"] = base / f"before-{stage}"
            shutil.copytree(folder, snapshots[f"before-{stage}"], symlinks=True)
            _repro(folder, stage)
        snapshots["done"] = base / "done"
        shutil.copytree(folder, snapshots["done"], symlinks=True)
        yield Reference(folder, snapshots, server, archive)
    finally:
        server.stop()


@dataclasses.dataclass(frozen=True)
class KillPoint:
    stage: str
    hook: str | None  # KILL_POINT for tests/kill_point/sitecustomize.py; None: killed from outside
    outside: str | None = None  # what the test waits for before it kills: "stalled transfer", "metrics.json"
    epochs_before_kill: int = 1  # train: the epochs the killed run finished, which the rerun must not repeat


KILL_POINTS = {
    "download: mid-transfer": KillPoint("download", None, outside="stalled transfer"),
    "download: archive unpacked, raw folder not yet in place": KillPoint(
        "download", "tasks.data.fetch:extract after 1"
    ),
    "convert: halfway through the first shard": KillPoint("convert", "tasks.data.tfrecords:serialize after 10"),
    "train: after epoch 1's backup": KillPoint("train", "keras.callbacks:BackupAndRestore.on_epoch_end after 1"),
    "train: last epoch done, model not yet saved": KillPoint(
        "train", "keras:Model.save before 1", epochs_before_kill=2
    ),
    "evaluate: metrics written, MLflow logging under way": KillPoint("evaluate", None, outside="metrics.json"),
    "register: version registered, alias not yet set": KillPoint(
        "register", "mlflow:MlflowClient.set_registered_model_alias before 1"
    ),
    "register: alias set, registry.json not yet written": KillPoint(
        "register", "tasks.common.files:write_json before 1"
    ),
}


def _kill(reference: Reference, point: KillPoint) -> str:
    """Runs `dvc repro <stage>` and kills its process group at `point`; what the processes printed."""
    folder, marker = reference.folder, reference.folder.parent / "killed-at"
    marker.unlink(missing_ok=True)
    environment = {
        "PYTHONPATH": f"{HOOK_FOLDER}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "KILL_POINT": f"{point.stage} {point.hook}" if point.hook else "",
        "KILL_MARKER": str(marker),
    }
    if point.outside == "stalled transfer":
        # Hangs after one block and a little more: tasks.data.fetch has exactly one block on disk.
        reference.server.serve(ARCHIVE_PATH, reference.archive, stall_first_after=BLOCK + 1000)
    process = _dvc(folder, "repro", point.stage, environment=environment)
    if point.outside:
        deadline = time.monotonic() + TIMEOUT
        while not _reached(folder, point, reference) and process.poll() is None:
            assert time.monotonic() < deadline, f"{point} was not reached in {TIMEOUT} s"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    output = _finish(process)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed at {point}:\n{output[-3000:]}"
    assert point.hook is None or marker.is_file(), f"{point.hook} was not reached:\n{output[-3000:]}"
    assert point.stage not in _lock(folder), "a killed stage is never recorded as done"
    return output


def _reached(folder: pathlib.Path, point: KillPoint, reference: Reference) -> bool:
    if point.outside == "stalled transfer":
        # The download's own <name>.partial; not the short-lived hidden temporary files written beside it.
        partial = [path for path in (folder / "data" / "downloads").glob("*.partial") if not path.name.startswith(".")]
        return reference.server.stalled(ARCHIVE_PATH).is_set() and bool(partial) and partial[0].stat().st_size == BLOCK
    return (folder / "reports" / "metrics.json").is_file()


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_a_killed_stage_reruns_to_the_uninterrupted_result(reference, name):
    point = KILL_POINTS[name]
    folder = reference.folder
    before = reference.snapshots[f"before-{point.stage}"]
    _restore(before, folder)
    upstream = STAGES[: STAGES.index(point.stage)]
    upstream_outputs = {stage: _lock(before)[stage]["outs"][0]["path"] for stage in upstream}
    upstream_times = {stage: _mtimes(folder / path) for stage, path in upstream_outputs.items()}

    _kill(reference, point)
    requests_before_rerun = len(reference.server.gets(ARCHIVE_PATH))
    output = _repro(folder, point.stage)

    for stage in upstream:
        assert f"Running stage '{stage}'" not in output, f"{stage} had finished and was run again"
        assert _mtimes(folder / upstream_outputs[stage]) == upstream_times[stage], f"{stage}'s outputs were rewritten"
    assert f"Running stage '{point.stage}'" in output
    assert _leftovers(folder) == [], "a killed write left a file behind"
    status = _dvc(folder, "status", point.stage)
    assert "Data and pipelines are up to date." in _finish(status)
    _CHECKS[point.stage](reference, requests_before_rerun, point)


def _check_download(reference: Reference, requests_before_rerun: int, point: KillPoint) -> None:
    folder, done = reference.folder, reference.snapshots["done"]
    assert _tree(folder / "data" / "raw") == _tree(done / "data" / "raw")
    assert _lock(folder)["download"]["outs"] == _lock(done)["download"]["outs"]
    (kept,) = (folder / "data" / "downloads").glob("*.tar.gz")
    assert kept.read_bytes() == reference.archive
    resumed = reference.server.gets(ARCHIVE_PATH)[requests_before_rerun:]
    if resumed and "Range" in resumed[0]:
        assert resumed[0]["Range"] == f"bytes={BLOCK}-", "the transfer resumes where the killed one stopped"


def _check_convert(reference: Reference, requests_before_rerun: int, point: KillPoint) -> None:
    folder, done = reference.folder, reference.snapshots["done"]
    assert _tree(folder / "data" / "shards") == _tree(done / "data" / "shards"), (
        "byte-identical shards, manifest and rejections"
    )
    assert _lock(folder)["convert"]["outs"] == _lock(done)["convert"]["outs"]


def _check_train(reference: Reference, requests_before_rerun: int, point: KillPoint) -> None:
    folder, done = reference.folder, reference.snapshots["done"]
    history = list(csv_rows(folder / "models" / "history.csv"))
    expected = list(csv_rows(done / "models" / "history.csv"))
    assert [row["epoch"] for row in history] == ["0", "1"], "no epoch is repeated, each is done once"
    timings = ("seconds_per_batch", "examples_per_second")
    without_timings = lambda row: {key: value for key, value in row.items() if key not in timings}  # noqa: E731
    for epoch in range(point.epochs_before_kill):
        assert without_timings(history[epoch]) == without_timings(expected[epoch]), (
            "epochs before the kill are the uninterrupted run's, to the last digit"
        )
    if point.epochs_before_kill == len(expected):  # all of them: the rerun only saves the model
        trained, reference_model = (
            tracking.load_model_file(path / "models" / "model.keras") for path in (folder, done)
        )
        for weights, expected_weights in zip(trained.get_weights(), reference_model.get_weights(), strict=True):
            np.testing.assert_array_equal(
                weights, expected_weights, "the saved model is the one trained before the kill"
            )
    else:
        # Epoch 2 after a resume sees the training images in another order (the shuffle restarts with the
        # process): the same model within tolerance, not bit for bit.
        for column in ("loss", "val_loss"):
            assert float(history[1][column]) == pytest.approx(float(expected[1][column]), rel=0.1, abs=0.05)
    run = json.loads((folder / "models" / "run.json").read_text())
    assert run["tracking_uri"] == f"sqlite:///{folder / 'mlflow.db'}"
    client = _mlflow(folder)
    runs = client.search_runs([run["experiment_id"]])
    assert [found.info.run_id for found in runs] == [run["run_id"]], "one MLflow run, resumed, not a second"
    assert runs[0].data.tags["resumed"] == "true"
    assert [metric.step for metric in client.get_metric_history(run["run_id"], "loss")] == [0, 1]
    assert {"labels.json", "model.keras", "preprocessing.json", "run.json", "history.csv"} <= {
        path.name for path in (folder / "models").iterdir()
    }


def _check_evaluate(reference: Reference, requests_before_rerun: int, point: KillPoint) -> None:
    folder, done = reference.folder, reference.snapshots["done"]
    assert (folder / "reports" / "metrics.json").read_bytes() == (done / "reports" / "metrics.json").read_bytes()
    evaluation, expected = _tree(folder / "reports" / "evaluation"), _tree(done / "reports" / "evaluation")
    assert evaluation.keys() == expected.keys()
    assert {name: digest for name, digest in evaluation.items() if name.endswith(".csv")} == {
        name: digest for name, digest in expected.items() if name.endswith(".csv")
    }


def _check_register(reference: Reference, requests_before_rerun: int, point: KillPoint) -> None:
    folder, done = reference.folder, reference.snapshots["done"]
    assert (folder / "reports" / "registry.json").read_bytes() == (done / "reports" / "registry.json").read_bytes()
    registry = json.loads((folder / "reports" / "registry.json").read_text())
    client, expected = _mlflow(folder), _mlflow(done)
    versions = client.search_model_versions(f"name = '{registry['model_name']}'")
    assert len(versions) == len(expected.search_model_versions(f"name = '{registry['model_name']}'")) == 1, (
        "one version per run"
    )
    champion = client.get_model_version_by_alias(registry["model_name"], "champion")
    assert str(champion.version) == registry["version"]
    exported = {artifact.path for artifact in client.list_artifacts(registry["run_id"], "export")}
    assert set(EXPORTED) <= exported, "the champion carries its exports"


def _mlflow(folder: pathlib.Path) -> mlflow.MlflowClient:
    """A client of `folder`'s MLflow store, read from a copy of its database: MLflow keeps one connection
    pool per URI for the whole process, which would go on reading the file an earlier case replaced."""
    copy = folder.parent / f"mlflow-{time.monotonic_ns()}.db"
    shutil.copyfile(folder / "mlflow.db", copy)
    return mlflow.MlflowClient(f"sqlite:///{copy}")


def csv_rows(path: pathlib.Path):
    with path.open(newline="") as stream:
        yield from csv.DictReader(stream)


_CHECKS = {
    "download": _check_download,
    "convert": _check_convert,
    "train": _check_train,
    "evaluate": _check_evaluate,
    "register": _check_register,
}


def test_a_killed_flow_run_is_finished_by_the_next_one(repository_copy, prefect_server):
    """The scheduled flow SIGKILLed while training (with its Prefect API still up, as under a worker):
    the next flow run resumes training where the backup left it, runs nothing before it again, and
    leaves DVC's books, the registry and the folder whole."""
    from prefect.settings import PREFECT_API_URL

    folder = repository_copy
    write_params(
        folder / "params.yaml",
        {**FAST, "train.epochs": 4, "train.backup_every_seconds": 0, "register.min_precision": 0.0},
    )
    bin_dir = pathlib.Path(sys.executable).parent
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    command = [sys.executable, "-m", "flows.pipeline"]
    log = folder.parent / "killed-flow.log"  # a file, not a pipe: nobody reads while the flow runs
    with log.open("w") as stream:
        killed = subprocess.Popen(
            command, cwd=folder, env=environment, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + TIMEOUT
    # Epoch 1's backup; written under a temporary name and renamed, it is whole once it is there.
    while not list(folder.glob("checkpoints/*/backup-train/training_metadata.json")):
        assert killed.poll() is None and time.monotonic() < deadline, (
            f"the flow ended before its first backup:\n{log.read_text()[-3000:]}"
        )
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert list(_lock(folder)) == ["download", "convert"], "the stages the flow finished are in dvc.lock, train is not"
    upstream = {stage: _mtimes(folder / _lock(folder)[stage]["outs"][0]["path"]) for stage in ("download", "convert")}

    rerun = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=TIMEOUT)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "train: resuming after epoch" in output
    for stage, times in upstream.items():
        assert _mtimes(folder / _lock(folder)[stage]["outs"][0]["path"]) == times, f"{stage}'s outputs were rewritten"
    assert [row["epoch"] for row in csv_rows(folder / "models" / "history.csv")] == ["0", "1", "2", "3"], (
        "each epoch once"
    )
    assert list(_lock(folder)) == STAGES
    status = _dvc(folder, "status")
    assert "Data and pipelines are up to date." in _finish(status)
    assert _leftovers(folder) == [], "a killed write left a file behind"
    run = json.loads((folder / "models" / "run.json").read_text())
    client = _mlflow(folder)
    assert [found.info.run_id for found in client.search_runs([run["experiment_id"]])] == [run["run_id"]], (
        "one MLflow run, resumed"
    )
    registry = json.loads((folder / "reports" / "registry.json").read_text())
    assert [version.version for version in client.search_model_versions(f"name = '{registry['model_name']}'")] == [1]
    assert registry["alias"] == "champion"
