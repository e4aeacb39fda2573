"""The orchestration and end-to-end benchmarks' machinery, on tiny data: their figures come from real runs."""

import json

import pytest

from bench import end_to_end, orchestration
from flows import pipeline
from tests.conftest import FAST, write_params


def test_the_plain_run_keeps_dvcs_books_like_the_flow(repository_copy):
    write_params(
        repository_copy / "params.yaml", FAST
    )  # one tiny epoch misses the gate: register decides, exports nothing
    plain = orchestration.run_plain()

    assert tuple(plain["stages"]) == pipeline.STAGES
    assert all(parts["stage"] > 0 and parts["dvc"] > 0 for parts in plain["stages"].values())
    assert json.loads((repository_copy / "reports" / "registry.json").read_text())["model_name"] == "digits-mnist_cnn"
    # Every stage recorded in dvc.lock as the flow records it: a repro after it has nothing to run.
    timings = orchestration.measure_noop_repro(repository_copy, orchestration.environment(), attempts=1)
    assert len(timings) == 1 and 0 < timings[0] < 60


def test_a_repro_that_runs_a_stage_is_no_noop_figure(repository_copy):
    # A stage never run: the figure would be the stage's time, not DVC's own. A one-line stage keeps it quick.
    (repository_copy / "dvc.yaml").write_text(
        "stages:\n  hello:\n    cmd: echo hello > hello.txt\n    outs:\n      - hello.txt\n"
    )
    with pytest.raises(RuntimeError, match="not a no-op"):
        orchestration.measure_noop_repro(repository_copy, orchestration.environment(), attempts=1)


def test_overhead_is_the_fastest_flow_start_up_included_less_the_fastest_plain_run():
    plain_runs = [{"wall": 50.0, "cpu": 40.0}, {"wall": 42.0, "cpu": 39.0}]
    flow_runs = [{"wall": 60.0, "cpu": 50.0}, {"wall": 51.0, "cpu": 49.0}]
    report = orchestration.summarise({"train.epochs": 1}, plain_runs, flow_runs, [2.6, 2.4])
    assert report["overhead_seconds"] == pytest.approx(51.0 - 42.0)
    assert report["overhead_cpu_seconds"] == pytest.approx(49.0 - 39.0)
    assert report["noop_repro_seconds"] == 2.4
    assert report["passed"]
    slow = orchestration.summarise({}, plain_runs, [{"wall": 52.5, "cpu": 50.0}], [2.4])
    assert slow["overhead_seconds"] == pytest.approx(10.5) and not slow["passed"]
    assert not orchestration.summarise({}, plain_runs, flow_runs, [3.5])["passed"]


def test_stage_and_task_times_are_read_from_the_lines_dvc_and_prefect_print():
    dvc_lines = [
        (0.5, "Running stage 'download':"),
        (2.0, "Updating lock file 'dvc.lock'"),
        (3.0, "Running stage 'train':"),
    ]
    assert end_to_end.stage_seconds(dvc_lines, total=10.0) == {"download": 2.5, "train": 7.0}
    prefect_lines = [
        (12.0, "10:00:00.000 | INFO    | Task run 'download-7b9' - Finished in state Completed()"),
        (12.5, "10:00:00.500 | INFO    | Task run 'train-019' - train: 1 replica(s)"),
        (40.0, "10:00:28.000 | INFO    | Task run 'train-019' - Finished in state Completed()"),
    ]
    assert orchestration.flow_task_seconds(prefect_lines) == {"download": 12.0, "train": 28.0}


def test_settings_must_name_keys_params_yaml_has(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 20\n")
    orchestration.write_params(tmp_path, {"train.epochs": 1})
    assert "epochs: 1" in (tmp_path / "params.yaml").read_text()
    with pytest.raises(KeyError, match="train.epoch"):
        orchestration.write_params(tmp_path, {"train.epoch": 1})
