"""What a flow run shows in the Prefect UI besides its logs: artifacts built from the stages' files."""

from __future__ import annotations

import csv
import datetime
import pathlib
from collections import Counter

import keras
import mlflow
import prefect.artifacts

from tasks import register
from tasks.common import contracts, errors, files
from tasks.data import changes


class TrainingProgress(keras.callbacks.Callback):
    """A Prefect progress artifact that moves with each finished epoch ("epoch 3 of 20")."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.artifact_id = None

    def on_train_begin(self, logs=None):
        self.artifact_id = prefect.artifacts.create_progress_artifact(
            0.0, key="training-progress", description=f"epoch 0 of {self.epochs}"
        )

    def on_epoch_end(self, epoch, logs=None):
        # BackupAndRestore may resume past epoch 0: progress is the epoch number, not a count of calls.
        done = epoch + 1
        prefect.artifacts.update_progress_artifact(
            self.artifact_id, 100.0 * done / self.epochs, description=f"epoch {done} of {self.epochs}"
        )


def rejections(shards_dir: pathlib.Path) -> None:
    """convert's rejected files: how many, why, and the first few paths."""
    manifest = contracts.Manifest.read(shards_dir)
    with (shards_dir / contracts.REJECTED_FILE).open(newline="") as stream:
        rejected = list(csv.DictReader(stream))
    accepted = sum(split.count for split in manifest.splits.values())
    lines = [f"### Convert: {accepted} images accepted, {len(rejected)} rejected", ""]
    if rejected:
        reasons = Counter(row["reason"].split(":")[0] for row in rejected)
        lines += [
            "| reason | files |",
            "|---|---|",
            *(f"| {reason} | {count} |" for reason, count in reasons.most_common()),
        ]
        lines += ["", "First rejected files:", "", *(f"- `{row['path']}`: {row['reason']}" for row in rejected[:20])]
    prefect.artifacts.create_markdown_artifact(
        "\n".join(lines), key="convert-rejections", description="files convert did not write"
    )


def data_changes(report_dir: pathlib.Path, since: float) -> None:
    """convert's data-change report (reports/data/changes.md), when this run wrote it."""
    path = report_dir / changes.CHANGES_MARKDOWN
    if path.is_file() and path.stat().st_mtime >= since:
        prefect.artifacts.create_markdown_artifact(
            path.read_text(encoding="utf-8", errors="replace"),
            key="data-changes",
            description="what changed in the data since the champion's training data",
        )


def _data_line(report_dir: pathlib.Path, ran: list[str], run: contracts.RunRecord) -> str:
    """What the data did: changed (a line of the report), or nothing new since the current model was trained."""
    path = report_dir / changes.CHANGES_JSON
    if "convert" in ran and path.is_file():
        return f"Data: {changes.summary_line(changes.Report(files.read_json(path, 'written by the convert stage')))}"
    if "train" in ran:
        return "Data: unchanged; trained again for changed code or settings"
    # The report holds no date (it would make identical data look changed to DVC): the training run has one.
    started = mlflow.MlflowClient(run.tracking_uri).get_run(run.run_id).info.start_time
    since = datetime.datetime.fromtimestamp(started / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"Data: no new data since {since}, when the current model was trained; nothing trained"


def run_summary(
    metrics_path: pathlib.Path,
    registry_path: pathlib.Path,
    model_dir: pathlib.Path,
    report_dir: pathlib.Path,
    evaluation_dir: pathlib.Path,
    ran: list[str],
) -> str:
    """The data's changes, the run's test metrics, its MLflow run, the registry decision with its evidence and
    verified exports, and the images to review, as a markdown artifact."""
    scores = contracts.Scores.read(metrics_path)
    registry = contracts.Decision.read(registry_path)
    run = contracts.RunRecord.read(model_dir)
    server = errors.without_credentials(run.tracking_uri)  # the artifact is shown to everyone who sees the flow
    if server.startswith("http"):
        # workflowType: MLflow 3.17's UI opens its GenAI pages without it, whatever the experiment's kind.
        page = f"#/experiments/{run.experiment_id}/runs/{run.run_id}?workflowType=machine_learning"
        run_link = f"[{run.run_id}]({server}/{page})"
    else:
        run_link = f"`{run.run_id}` (`mlflow ui --backend-store-uri {server}`)"
    what_ran = ", ".join(ran) if ran else "nothing: every stage was up to date"
    # The exports' table and the served-model check: in the run, not registry.json (they hold times).
    release = register.recorded(registry.run_id, run.tracking_uri)
    lines = [
        f"### {registry.model_name} version {registry.version}: `{registry.alias}`",
        "",
        f"Decision: {registry.reason}",
        *_optional("Promoted by hand", registry.forced),
        *_optional("Evidence", registry.evidence),
        *_optional("Serving", release.get("served")),
        "",
        f"Stages run: {what_ran}",
        "",
        _data_line(report_dir, ran, run),
        "",
        f"MLflow run: {run_link}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {value:.4g} |" for key, value in scores.flat().items()),
        *_optional("Exports, each run on the test split and compared with the Keras model", release.get("exports")),
        *_review_queue(evaluation_dir, run_link),
    ]
    markdown = "\n".join(lines)
    prefect.artifacts.create_markdown_artifact(
        markdown, key="run-summary", description="test metrics and registry decision"
    )
    return markdown


def _optional(title: str, text: str | None) -> list[str]:
    """A titled paragraph (or table, when `text` has several lines), or nothing."""
    if not text:
        return []
    return ["", f"{title}:", "", text] if "\n" in text else ["", f"{title}: {text}"]


REVIEW_ROWS_SHOWN = 10


def _review_queue(evaluation_dir: pathlib.Path, run_link: str) -> list[str]:
    """evaluate's review queue: how many images a person should look at, where the list is, and the first few."""
    path = evaluation_dir / contracts.REVIEW_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return ["", f"Review queue: empty (`{path}`)"]
    columns = list(rows[0])
    return [
        "",
        f"Review queue: {len(rows)} test and validation images to look at, in `{path}` (also under evaluation/ "
        f"in MLflow run {run_link}). Fix or move each file in the source folder; the next run picks it up.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row[column] for column in columns) + " |" for row in rows[:REVIEW_ROWS_SHOWN]),
    ]
