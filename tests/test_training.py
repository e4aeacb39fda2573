"""The train stage end to end: replicas, workers, an interrupted run resumed, divergence, reproducibility, fine-tuning.

Device layouts are fixed when TensorFlow starts, so each layout runs `python -m tasks.train` in a
process of its own, as DVC runs it.
"""

import csv
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from tasks import convert, evaluate, train
from tasks.common import config, contracts, tracking
from tasks.modeling import checkpoints, distributed
from tests.conftest import FAST, REPOSITORY, make_image_folder, write_params

# Small and free of randomness inside the model (no dropout, no batch norm): replicas must agree.
TINY = {
    **FAST,
    "train.model": "cifar10_tutorial",
    "train.log_every_steps": 1,
    "train.histogram_freq": 0,
    "train.backup_every_seconds": 0,
}
TIMEOUT = 300  # seconds; every process is killed past it


def _prepare(folder: pathlib.Path, overrides: dict, per_class: int = 20) -> config.Params:
    """A working folder as `dvc repro` sees it: params.yaml and the converted shards of a tiny image folder."""
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder / "params.yaml", overrides)
    params = config.load_params(folder / "params.yaml")
    make_image_folder(folder / "raw", classes=3, per_class=per_class)
    convert.convert(params.dataset, params.base.seed, folder / "raw", folder / params.shards_dir)
    return params


def _start(folder: pathlib.Path, code: str | None = None, environment: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "tasks.train"]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), **(environment or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        command, cwd=folder, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"training did not finish within {TIMEOUT} s:\n{output[-3000:]}")
    return output


def _losses(output: str) -> list[float]:
    return [float(value) for value in re.findall(r"^step \d+, .*?loss = ([0-9.]+)", output, flags=re.MULTILINE)]


def _history(folder: pathlib.Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "models" / "history.csv").open()))


# Runs the stage and kills its own process, as a power cut would, right after epoch 2's backup is written.
_KILLED_AFTER_EPOCH_2 = """
import os, signal, keras
from tasks import train
save = keras.callbacks.BackupAndRestore.on_epoch_end
def on_epoch_end(self, epoch, logs=None):
    save(self, epoch, logs)
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
keras.callbacks.BackupAndRestore.on_epoch_end = on_epoch_end
train.main()
"""


def test_a_killed_training_resumes_at_the_next_epoch_in_the_same_mlflow_run(tmp_path):
    _prepare(tmp_path, {**TINY, "train.epochs": 4, "train.log_every_steps": 100})
    killed = _start(tmp_path, code=_KILLED_AFTER_EPOCH_2)
    output = _finish(killed)
    assert killed.returncode == -signal.SIGKILL, output[-3000:]
    assert "epoch 2/4" in output and "epoch 3/4" not in output
    (backup,) = (tmp_path / "checkpoints").iterdir()
    assert json.loads((backup / "backup-train" / "training_metadata.json").read_text())["epoch"] == 2

    rerun = _start(tmp_path)
    output = _finish(rerun)
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming after epoch 2" in output
    assert "epoch 3/4" in output and "epoch 4/4" in output and "epoch 1/4" not in output
    assert [row["epoch"] for row in _history(tmp_path)] == ["0", "1", "2", "3"]
    assert not (tmp_path / "checkpoints").exists(), "a finished run leaves no backup behind"

    run_id = json.loads((tmp_path / "models" / "run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])) == 1
    assert [metric.step for metric in client.get_metric_history(run_id, "loss")] == [0, 1, 2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert {"validation_accuracy_final", "validation_accuracy_raw", "examples_per_second", "learning_rate"} <= set(
        run.data.metrics
    )
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"model_summary.txt", "tensorboard", "labels.json"} <= artifacts
    assert "cifar10_tutorial" in (pathlib.Path(client.download_artifacts(run_id, "model_summary.txt"))).read_text()


def test_a_diverging_run_fails_and_leaves_nothing_to_register_or_resume(workdir):
    params = _prepare(workdir, {**FAST, "train.optimizer": "sgd", "train.learning_rate": 1e12, "train.epochs": 3})
    with pytest.raises(FloatingPointError, match="training diverged: loss is (nan|inf)"):
        train.train(
            params.train, 7, workdir / params.shards_dir, workdir / "models", checkpoints_dir=workdir / "checkpoints"
        )
    assert not (workdir / "models" / "model.keras").exists() and not (workdir / "models" / "run.json").exists()
    assert not list((workdir / "checkpoints").glob("*/*")), "nothing to resume"
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])
    assert run.info.status == "FAILED"


def test_the_same_params_and_seed_train_the_same_model(workdir):
    overrides = {
        **FAST,
        "train.epochs": 2,
        "train.batch_size": 16,
        "train.augment": ["crop", "brightness"],
        "train.crop_padding": 2,
    }
    params = _prepare(workdir, overrides)
    histories = []
    for attempt in ("first", "second"):
        train.train(params.train, 7, workdir / params.shards_dir, workdir / attempt)
        histories.append([row["loss"] for row in csv.DictReader((workdir / attempt / "history.csv").open())])
    assert histories[0] == histories[1]


def test_every_epoch_is_one_pass_over_the_training_split_whatever_log_every_steps(workdir, monkeypatch):
    # One iterator serves the whole run, and Keras runs whole calls of steps: none may run into the next epoch.
    # fit is given those steps and no more: nothing is read ahead past the last one (a shuffle buffer's worth).
    params = _prepare(workdir, {**FAST, "train.epochs": 3, "train.batch_size": 8, "train.log_every_steps": 4})
    train_count = contracts.Manifest.read(workdir / params.shards_dir).count("train")
    steps_per_epoch = math.ceil(train_count / 8)
    assert steps_per_epoch % 4, (
        f"the fixture's {steps_per_epoch} steps per epoch must not be a multiple of log_every_steps"
    )

    class OptimizerSteps(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            self.count = int(self.model.optimizer.iterations)

    given, fit = [], keras.Model.fit

    def counting_fit(model, data, *args, **kwargs):
        given.append(int(data.cardinality()))
        return fit(model, data, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", counting_fit)
    optimizer_steps = OptimizerSteps()
    train.train(params.train, 7, workdir / params.shards_dir, workdir / "models", callbacks=[optimizer_steps])
    assert optimizer_steps.count == 3 * steps_per_epoch
    assert given == [3 * steps_per_epoch]
    assert [row["epoch"] for row in _history(workdir)] == ["0", "1", "2"]


def test_the_saved_model_holds_its_weights_without_the_optimizer(workdir):
    # A compiled network inside the serving model would carry Adam's two slots and the moving averages: 4x.
    params = _prepare(workdir, {**FAST, "train.epochs": 1})
    train.train(params.train, 7, workdir / params.shards_dir, workdir / "models")
    model_file = workdir / "models" / contracts.MODEL_FILE
    loaded = tracking.load_model_file(model_file)
    weight_bytes = sum(weight.nbytes for weight in loaded.get_weights())
    assert weight_bytes > 500_000, "the fixture's network must outweigh the file's configuration"
    assert model_file.stat().st_size < 1.1 * weight_bytes + 50_000


def test_inception_trains_a_head_then_fine_tunes_its_top(workdir):
    overrides = {
        **FAST,
        "train.model": "inception_v3",
        "train.image_size": [80, 80],
        "train.crop_size": [75, 75],
        "train.augment": ["crop"],
        "train.batch_size": 32,
        "train.fine_tune_epochs": 1,
        "train.restore_best": True,
        "train.monitor": "val_accuracy",
        "train.histogram_freq": 0,
    }
    params = _prepare(workdir, overrides)
    result = train.train(
        params.train, 7, workdir / params.shards_dir, workdir / "models", checkpoints_dir=workdir / "checkpoints"
    )
    history = list(csv.DictReader((workdir / "models" / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["0", "1"]
    assert float(history[1]["learning_rate"]) == pytest.approx(params.train.fine_tune_learning_rate)
    evaluated = evaluate.evaluate(
        params.evaluate,
        workdir / params.shards_dir,
        workdir / "models",
        workdir / "metrics.json",
        workdir / "evaluation",
    )
    assert evaluated.test_images == contracts.Manifest.read(workdir / params.shards_dir).count("test")
    assert result.validation_accuracy_raw is not None


def test_a_backup_cut_off_mid_write_leaves_the_one_before_it_whole(tmp_path, monkeypatch):
    """A power cut while epoch 2's weights are being written: epoch 1's backup is still there, whole."""
    import keras
    import numpy as np

    def tiny_model():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    features, targets = np.random.default_rng(0).normal(size=(16, 4)), np.zeros((16, 2))
    after_epoch_1 = []
    keep = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after_epoch_1.extend(model.get_weights()) if epoch == 0 else None
    )
    writes = []
    save_weights = keras.Model.save_weights

    def cut_off_at_the_second(self, filepath, *arguments, **keywords):
        writes.append(filepath)
        if len(writes) == 2:
            pathlib.Path(filepath).write_bytes(b"the first bytes of a weights file")
            raise RuntimeError("power cut")
        return save_weights(self, filepath, *arguments, **keywords)

    monkeypatch.setattr(keras.Model, "save_weights", cut_off_at_the_second)
    model = tiny_model()
    backup = checkpoints.WholeBackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="power cut"):
        model.fit(features, targets, epochs=3, callbacks=[keep, backup], verbose=0)
    monkeypatch.undo()

    assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    restored = tiny_model()
    restored.load_weights(backup._weights_path)
    for weights, expected in zip(restored.get_weights(), after_epoch_1, strict=True):
        np.testing.assert_array_equal(weights, expected)
    resumed = tiny_model().fit(
        features, targets, epochs=3, callbacks=[checkpoints.WholeBackupAndRestore(str(tmp_path / "backup"))], verbose=0
    )
    assert len(resumed.history["loss"]) == 2, "resumed after epoch 1: epochs 2 and 3"
    assert not (tmp_path / "backup").exists(), "a finished fit leaves no backup, nor any half-written file"


def test_backups_wait_for_their_interval(tmp_path):
    """train.backup_every_seconds: an epoch ending sooner after the last backup writes none."""
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    features, targets = np.zeros((16, 4)), np.zeros((16, 2))
    written = []
    for every_seconds in (0, 3600):
        backup = checkpoints.WholeBackupAndRestore(str(tmp_path / f"backup-{every_seconds}"), every_seconds)
        watch = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs, folder=backup.backup_dir: written.append(
                pathlib.Path(folder, "training_metadata.json").is_file()
            )
        )
        model.fit(features, targets, epochs=2, callbacks=[backup, watch], verbose=0)
    assert written == [True, True, False, False]


@pytest.mark.parametrize("backed_up_epochs", [0, 1])
def test_the_cluster_loop_reads_no_batch_past_its_last_step(tmp_path, monkeypatch, backed_up_epochs):
    # Its twin of model.fit's cut (above): the data it iterates holds the steps of the epochs it runs, from the
    # epoch its backups resume at. On the repeated data, the prefetch after the last step began another epoch.
    strategy = tf.distribute.get_strategy()  # the loop's calls, without a cluster
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    images, labels = np.random.default_rng(0).random((4, 4), "float32"), np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    repeated = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2).repeat()
    backup_dir = tmp_path / "backup"
    if backed_up_epochs:
        distributed.backup_epoch(model, backup_dir, backed_up_epochs)
    given, distribute = [], strategy.experimental_distribute_dataset

    def recording_distribute(data):
        given.append(data)
        return distribute(data)

    monkeypatch.setattr(strategy, "experimental_distribute_dataset", recording_distribute)
    distributed.fit_multi_worker(model, strategy, repeated, repeated.take(1), 3, 2, 0.0, [], backup_dir)
    assert [int(data.cardinality()) for data in given] == [2 * (3 - backed_up_epochs)]
    assert int(model.optimizer.iterations) == 2 * (3 - backed_up_epochs)
