"""The nightly loop: a folder that grows over three flow runs, then loses a class to a bad sync."""

import json
import pathlib
import shutil

import mlflow
import numpy as np
import PIL.Image

from tasks.common import contracts
from tests.conftest import FAST, make_image_folder, write_params


def _index(repository: pathlib.Path) -> dict[str, contracts.IndexEntry]:
    return {entry.path: entry for entry in contracts.read_index(repository / "data" / "shards" / "imagefolder")}


def _add(source: pathlib.Path, class_name: str, count: int, night: int) -> list[str]:
    """New images like the class's own (make_image_folder: brightness 40 + 80 * label, plus noise)."""
    random = np.random.default_rng(night)
    label = int(class_name.rsplit("_", 1)[1])
    names = []
    for index in range(count):
        pixels = np.clip(40 + 80 * label + random.integers(-20, 20, (8, 8)), 0, 255).astype(np.uint8)
        name = f"night{night}_{index:02d}.png"
        PIL.Image.fromarray(pixels).save(source / class_name / name)
        names.append(f"{class_name}/{name}")
    return names


def _runs(repository: pathlib.Path) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{repository / 'mlflow.db'}")
    return client.search_runs(
        [experiment.experiment_id for experiment in client.search_experiments()], order_by=["attributes.start_time"]
    )


def _trained_on(repository: pathlib.Path, run_id: str, tmp_path: pathlib.Path) -> set[str]:
    """The training split of a run, from the index it logged."""
    mlflow.set_tracking_uri(f"sqlite:///{repository / 'mlflow.db'}")
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data/index.csv", dst_path=str(tmp_path))
    return {entry.path for entry in contracts.read_index(pathlib.Path(path)) if entry.split == "train"}


def test_a_growing_folder_over_three_nights(repository_copy, prefect_server, tmp_path):
    from flows import pipeline

    source = make_image_folder(tmp_path / "photos", classes=3, per_class=24)
    settings = {
        **FAST,
        "register.min_precision": 0.0,
        "dataset.name": "imagefolder",
        "dataset.source": str(source),
        "train.init_from": "champion",
        "train.warm_start_epochs": 1,
        "register.serve_check": True,  # the summary shows it
    }
    write_params(repository_copy / "params.yaml", settings)
    report_path = repository_copy / "reports" / "data" / "changes.json"

    first = pipeline.pipeline("params.yaml")
    assert "Stages run: download, convert, train, evaluate, register" in first
    # The first version is champion: its verified exports and served-model check are in the summary.
    assert "Exports, each run on the test split and compared with the Keras model:" in first
    assert "| tflite_int8 |" in first and "Serving: `mlflow models serve` gave its first answer" in first
    assert "Review queue: " in first and "reports/evaluation/review.csv" in first
    splits = {path: entry.split for path, entry in _index(repository_copy).items()}

    # The change report compares with the champion's data: what was added since the champion was trained.
    since_champion = {"class_0": [], "class_1": [], "class_2": []}
    for night in (2, 3):
        added = {"class_0": _add(source, "class_0", 4, night), "class_2": _add(source, "class_2", 2, night)}
        for name, paths in added.items():
            since_champion[name] = sorted(since_champion[name] + paths)
        summary = pipeline.pipeline("params.yaml")
        assert "Stages run: download, convert, train, evaluate, register" in summary
        now = _index(repository_copy)
        assert {path: now[path].split for path in splits} == splits, "no image present before changed split"
        splits = {path: entry.split for path, entry in now.items()}
        report = json.loads(report_path.read_text())
        assert report["baseline"]["kind"] == "champion"
        assert {name: counts["added"] for name, counts in report["classes"].items()} == since_champion
        assert report["conversion"]["decoded"] == 6, "only the new files were decoded"
        count = sum(len(paths) for paths in since_champion.values())
        assert f"Data: {count} added, 0 removed, 0 changed since the data champion imagefolder-mnist_cnn" in summary
        assert "Evidence: On the same" in summary and "McNemar's exact test gives p =" in summary
        if ": `champion`" in summary.splitlines()[0]:  # promoted: the next night compares with this night's data
            since_champion = {name: [] for name in since_champion}

    runs = _runs(repository_copy)
    assert len(runs) == 3
    generations = [run.data.tags.get("warm_start.generation") for run in runs]
    assert generations[:2] == ["0", "1"] and generations[2] in ("1", "2")  # 2 when night 2's model became champion
    assert all(
        run.data.tags.get("warm_start.source", "").startswith("models:/imagefolder-mnist_cnn/") for run in runs[1:]
    )
    # The gate compares on the newest test split: none of its images was trained on by any of the three models.
    test_images = {path for path, split in splits.items() if split == "test"}
    for run in runs:
        assert not test_images & _trained_on(repository_copy, run.info.run_id, tmp_path / run.info.run_id)

    # A bad sync empties a class: the guard stops the run, names it, and nothing more is registered.
    versions_before = len(mlflow.MlflowClient(f"sqlite:///{repository_copy / 'mlflow.db'}").search_model_versions())
    shutil.rmtree(source / "class_1")
    stopped = pipeline.pipeline("params.yaml", return_state=True)
    assert stopped.is_failed()
    assert "class 'class_1' vanished" in stopped.message
    client = mlflow.MlflowClient(f"sqlite:///{repository_copy / 'mlflow.db'}")
    assert len(client.search_model_versions()) == versions_before
    assert "**stopped the run**" in (repository_copy / "reports" / "data" / "changes.md").read_text()
