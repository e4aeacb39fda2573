"""Where an interrupted training resumes from: the backup folder of one exact configuration.

Every epoch is backed up under <paths.checkpoints>/<model>-<hash of the settings, seed and data>/,
which DVC does not delete, so running train again with the same settings continues after the last
completed epoch. The folder holds Keras' BackupAndRestore files (backup-<phase>/; a cluster's loop
writes its own there: distributed.backup_epoch), a finished phase's weights (<phase>.weights.npz), the
best epoch's weights, the history and the MLflow run to continue.

Two of Keras' private APIs are used here, each in one place with the reason beside it:
`WholeBackupAndRestore` (BackupAndRestore's `_save_model` and the file names and counters it keeps)
and `forget_resumed_epoch` (`Model._initial_epoch`). tests/test_private_apis.py fails loudly when a
Keras upgrade changes either.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import pathlib
import shutil
import time

import keras

from tasks.common import config, contracts, files

RUN_FILE = "mlflow_run.json"  # the MLflow run an interrupted training resumes
BEST_WEIGHTS_FILE = "best.weights.h5"


def work_folder(
    root: pathlib.Path,
    params: config.TrainParams,
    seed: int,
    manifest_sha256: str,
    chief: bool,
    start: str = "random",
    worker: str | None = None,
) -> pathlib.Path:
    """<root>/<model>-<hash>: keyed by every train setting, the seed, the data and the weights it starts from
    (`start`: warm_start.Start.identity), so a changed config never resumes a stale backup, and a resumed run
    never mixes two starts (the champion changed while it was stopped).

    The other workers of a cluster (`worker`: distributed.worker_name) keep their own backups in
    <root>/<model>-<hash>/<worker>/: beside the chief's on a shared disk, alone on a machine of their own.
    """
    settings = params.model_dump(
        mode="json", exclude={"backup_every_seconds"}
    )  # how often to back up changes no result
    identity = json.dumps({"train": settings, "seed": seed, "data": manifest_sha256, "start": start}, sort_keys=True)
    folder = root / f"{params.model}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    # Only the latest configuration's backup is kept: backups of large models take gigabytes. Every worker
    # cleans its own disk; on a shared one they may meet, and either's deletion will do.
    for other in root.iterdir() if root.is_dir() else []:
        if other != folder and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    folder = folder / worker if worker else folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def history_rows(work: pathlib.Path) -> list[dict[str, str]]:
    path = work / contracts.HISTORY_FILE
    return list(csv.DictReader(path.open())) if path.is_file() else []


def completed_epochs(work: pathlib.Path) -> int:
    """Epochs a previous, interrupted run finished; history rows past its last backup are dropped (they will
    be redone)."""
    backups = [json.loads(path.read_text())["epoch"] for path in work.glob("backup-*/training_metadata.json")]
    finished_phases = list(work.glob("*.weights.npz"))
    completed = max(backups, default=len(history_rows(work)) if finished_phases else 0)
    keep_history(work, completed)
    return completed


def keep_history(work: pathlib.Path, epochs: int) -> None:
    """Drops the history's rows past its first `epochs` epochs (they will be redone)."""
    rows = history_rows(work)
    if len(rows) > epochs:
        with (work / contracts.HISTORY_FILE).open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows[:epochs])


def best_so_far(work: pathlib.Path, monitor: str) -> float | None:
    """The best value of `monitor` in the history: where a resumed ModelCheckpoint starts comparing."""
    values = [float(row[monitor]) for row in history_rows(work) if row.get(monitor) not in (None, "", "NA")]
    values = [value for value in values if math.isfinite(value)]
    if not values:
        return None
    return min(values) if monitor.endswith("loss") else max(values)


def remove(work: pathlib.Path) -> None:
    """Deletes a finished (or diverged) configuration's backups, and its root folder when nothing else is there."""
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):  # another configuration's backup, or files of the user's, are there
        work.parent.rmdir()


def forget_resumed_epoch(model: keras.Model) -> None:
    """Clears the epoch BackupAndRestore told the model to resume from.

    Keras sets the private `Model._initial_epoch` when it restores a backup and never resets it: a stale
    value would make the next fit (phase 2, fine-tuning) start past its own last epoch and train nothing.
    No public API resets it.
    """
    model._initial_epoch = None  # noqa: SLF001 - see the docstring


class WholeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, each of its files written under a temporary name and renamed when whole,
    at the end of an epoch once `every_seconds` have passed since the last backup.

    Keras writes its backup in place: a kill mid-write leaves weights that cannot be loaded, or an empty
    training_metadata.json that stops every later fit with a JSONDecodeError, until someone deletes the
    backup by hand. Weights first, then the epoch count: a kill between the two renames repeats an
    epoch, never skips one. Keras backs up every epoch or every N steps; short epochs (a GPU's, or
    bench.train_throughput's) then pay a whole model write each, 30-40 ms of a 1.5 s epoch here.
    Overrides Keras' private `_save_model` and reads the private paths and counters it keeps: Keras has
    no public hook for how a backup is written (tests/test_training.py cuts one off).
    """

    def __init__(self, backup_dir: str, every_seconds: float = 0.0):
        super().__init__(backup_dir)
        self.every_seconds = every_seconds

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._last_backup = time.monotonic()

    def _save_model(self):
        if time.monotonic() - self._last_backup < self.every_seconds:
            return
        self._last_backup = time.monotonic()
        with files.staged_file(pathlib.Path(self._weights_path)) as weights:
            self.model.save_weights(str(weights), overwrite=True)
        files.write_json(
            pathlib.Path(self._training_metadata_path), {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        )
