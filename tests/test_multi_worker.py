"""Several workers that share no disk, stopped together and started again, continue where they were.

Each worker runs `python -m tasks.train` in a working folder of its own on 127.0.0.1, as on machines of
their own: each keeps its own backups (tasks/modeling/distributed.py), and after a restart they agree on
the epoch to continue from.
"""

import json
import pathlib
import signal

import pytest

from tasks import evaluate
from tasks.common import contracts, local_http
from tests.test_training import TINY, _finish, _history, _prepare, _start

SETTINGS = {**TINY, "train.epochs": 4, "train.batch_size": 8, "train.strategy": "multi_worker"}

# Runs a worker and kills its own process, as a power cut would, right after its backup of epoch 2.
_KILLED_AFTER_BACKUP_OF_EPOCH_2 = """
import os, signal
from tasks import train
from tasks.modeling import distributed
backup = distributed.backup_epoch
def backup_epoch(model, backup_dir, epochs):
    backup(model, backup_dir, epochs)
    if epochs == 2:
        os.kill(os.getpid(), signal.SIGKILL)
distributed.backup_epoch = backup_epoch
train.main()
"""


def _cluster(folders: list[pathlib.Path], code: str | None = None) -> list[tuple[int, str]]:
    """Runs one worker in each folder (the first is the chief): each one's (exit code, output)."""
    workers = [f"127.0.0.1:{local_http.free_port()}" for _ in folders]
    processes = [
        _start(
            folder,
            code=code,
            environment={
                "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            },
        )
        for index, folder in enumerate(folders)
    ]
    outputs = [_finish(process) for process in processes]
    return [(process.returncode, output) for process, output in zip(processes, outputs, strict=True)]


def test_two_workers_without_a_shared_disk_resume_together_after_both_were_killed(tmp_path):
    # The uninterrupted run to compare with: two workers in one folder, as on a shared disk.
    shared = tmp_path / "shared"
    params = _prepare(shared, SETTINGS)
    uninterrupted = _cluster([shared, shared])
    for code, output in uninterrupted:
        assert code == 0, output[-3000:]
        assert "2 replica(s) of cifar10_tutorial (MultiWorkerMirroredStrategy)" in output
        assert "epoch 4/4" in output
    assert "MLflow run" in uninterrupted[0][1] and "this worker writes nothing" in uninterrupted[1][1]
    assert len(_history(shared)) == 4
    assert not list(shared.glob("checkpoints/**/*.weights.*")), "finished workers leave no backup behind"
    evaluated = evaluate.evaluate(
        params.evaluate, shared / params.shards_dir, shared / "models", shared / "metrics.json", shared / "evaluation"
    )
    assert evaluated.test_images == contracts.Manifest.read(shared / params.shards_dir).count("test")

    folders = [tmp_path / "cluster" / f"worker{index}" for index in range(2)]
    for folder in folders:
        _prepare(folder, SETTINGS)

    for code, output in _cluster(folders, _KILLED_AFTER_BACKUP_OF_EPOCH_2):
        assert code == -signal.SIGKILL, output[-3000:]
        assert "epoch 2/4" in output and "epoch 3/4" not in output
    (chief_backup,) = (folders[0] / "checkpoints").glob("*/backup-train")
    (worker_backup,) = (folders[1] / "checkpoints").glob("*/worker-1/backup-train")
    assert {path.name for path in worker_backup.glob("*.weights.h5")} == {"epoch-1.weights.h5", "epoch-2.weights.h5"}
    assert json.loads((chief_backup / "training_metadata.json").read_text())["epoch"] == 2
    # The second worker was killed while writing its backup of epoch 2: it holds epoch 1 only.
    (worker_backup / "epoch-2.weights.h5").unlink()
    (worker_backup / "training_metadata.json").write_text(json.dumps({"epoch": 1}))

    restarted = _cluster(folders)
    for code, output in restarted:
        assert code == 0, output[-3000:]
        assert "epoch 2/4" in output and "epoch 4/4" in output and "epoch 1/4" not in output
    assert "the workers continue after epoch 1" in restarted[0][1]
    assert "resuming after epoch 1" in restarted[1][1]
    assert [row["epoch"] for row in _history(folders[0])] == ["0", "1", "2", "3"]
    # The uninterrupted run read its images in another order after epoch 1 (the restarted input pipeline starts
    # its shuffling over): close, not equal.
    for column in ("loss", "val_loss"):
        assert [float(row[column]) for row in _history(folders[0])] == pytest.approx(
            [float(row[column]) for row in _history(shared)], rel=0.05
        )
    assert not list((folders[1] / "checkpoints").rglob("*.weights.h5")), "a finished worker keeps no backup"
    assert not (folders[1] / "models").exists(), "only the chief writes the model"
