"""The private APIs of Keras and DVC the product relies on: each test fails, naming the code that depends
on it and what to do, when an upgrade renames or changes one. They run in seconds: run them after every
upgrade of Keras, TensorFlow or DVC.
"""

import json
import pathlib
import random
import subprocess

import dvc.repo
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.random import seed_generator

from tasks.modeling import architectures, checkpoints, monitoring

FEATURES = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
TARGETS = np.random.default_rng(1).normal(size=(8, 1)).astype("float32")


def _keras_changed(where: str, source: str = "backup_and_restore.py") -> str:
    return f"Keras {keras.__version__} changed it: read keras/src/callbacks/{source} and adapt {where}"


def _tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


class StopAfterFirstEpoch(keras.callbacks.Callback):
    """An interruption after epoch 1 is backed up: fit raises, and Keras leaves the backup in place."""

    def on_epoch_end(self, epoch, logs=None):
        raise RuntimeError("interrupted")


# --- keras.callbacks.BackupAndRestore: tasks/modeling/checkpoints.py, WholeBackupAndRestore


def test_backup_and_restore_writes_each_backup_through_save_model(tmp_path, monkeypatch):
    where = "WholeBackupAndRestore (tasks/modeling/checkpoints.py), which overrides _save_model to write whole files"
    assert callable(vars(keras.callbacks.BackupAndRestore).get("_save_model")), (
        f"BackupAndRestore has no _save_model any more. {_keras_changed(where)}"
    )
    calls = []
    save_model = checkpoints.WholeBackupAndRestore._save_model

    def counted(self):
        calls.append(self._current_epoch)
        save_model(self)

    monkeypatch.setattr(checkpoints.WholeBackupAndRestore, "_save_model", counted)
    backup = checkpoints.WholeBackupAndRestore(str(tmp_path / "backup"))
    seen = []

    def after_the_backup(epoch, logs):
        # Keras deletes the backup folder when fit ends: what the override wrote is looked at in between.
        weights, metadata = pathlib.Path(backup._weights_path), pathlib.Path(backup._training_metadata_path)
        restored = _tiny_model()
        restored.load_weights(weights)
        for value, expected in zip(restored.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(value, expected)
        seen.append((json.loads(metadata.read_text()), sorted(path.name for path in weights.parent.iterdir())))

    model = _tiny_model()
    model.fit(
        FEATURES,
        TARGETS,
        epochs=2,
        verbose=0,
        callbacks=[backup, keras.callbacks.LambdaCallback(on_epoch_end=after_the_backup)],
    )
    assert calls == [1, 2], f"BackupAndRestore.on_epoch_end no longer calls _save_model. {_keras_changed(where)}"
    assert seen == [
        ({"epoch": 1, "batch": 0}, ["latest.weights.h5", "training_metadata.json"]),
        ({"epoch": 2, "batch": 0}, ["latest.weights.h5", "training_metadata.json"]),
    ], "the override's backup is not Keras' file names and metadata, or left a temporary file behind"


def test_backup_and_restore_keeps_the_paths_and_counters_the_override_reads(tmp_path):
    where = "WholeBackupAndRestore._save_model (tasks/modeling/checkpoints.py), which reads these attributes"
    backup = checkpoints.WholeBackupAndRestore(str(tmp_path / "backup"))
    for name in ("_weights_path", "_training_metadata_path"):
        assert isinstance(getattr(backup, name, None), str), (
            f"BackupAndRestore has no {name} any more. {_keras_changed(where)}"
        )
    assert pathlib.Path(backup._training_metadata_path).parent == tmp_path / "backup"
    counters = []
    watch = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: counters.append((backup._current_epoch, backup._last_batch_seen)),
        on_epoch_end=lambda epoch, logs: counters.append((backup._current_epoch, backup._last_batch_seen)),
    )
    try:
        _tiny_model().fit(FEATURES, TARGETS, epochs=1, verbose=0, callbacks=[backup, watch])
    except AttributeError as error:
        pytest.fail(f"BackupAndRestore lost a counter: {error}. {_keras_changed(where)}")
    assert counters == [(0, 0), (1, 0)], (
        f"BackupAndRestore's _current_epoch or _last_batch_seen mean something else now. {_keras_changed(where)}"
    )


# --- keras.Model._initial_epoch: tasks/modeling/checkpoints.py, forget_resumed_epoch (train._fit, phase 2)


def test_a_restored_backup_sets_model_initial_epoch_and_forget_resumed_epoch_clears_it(tmp_path):
    where = "forget_resumed_epoch (tasks/modeling/checkpoints.py), which train._fit calls before each phase"
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        _tiny_model().fit(
            FEATURES,
            TARGETS,
            epochs=3,
            verbose=0,
            callbacks=[checkpoints.WholeBackupAndRestore(backup_dir), StopAfterFirstEpoch()],
        )
    model = _tiny_model()
    resumed = model.fit(
        FEATURES, TARGETS, epochs=3, verbose=0, callbacks=[checkpoints.WholeBackupAndRestore(backup_dir)]
    )
    assert len(resumed.history["loss"]) == 2, (
        f"BackupAndRestore did not resume after epoch 1 (it tells fit through Model._initial_epoch). "
        f"{_keras_changed(where)}"
    )
    assert getattr(model, "_initial_epoch", "missing") == 1, (
        f"restoring a backup no longer sets Model._initial_epoch. {_keras_changed(where)}"
    )

    # Why the product clears it: Keras never does, and every later fit starts from it, whatever it is asked.
    stale = model.fit(FEATURES, TARGETS, initial_epoch=3, epochs=5, verbose=0)
    assert len(stale.history["loss"]) == 4, (
        f"fit no longer starts from Model._initial_epoch (epochs 1-4 expected); forget_resumed_epoch may be unneeded "
        f"or need another attribute. {_keras_changed(where)}"
    )
    checkpoints.forget_resumed_epoch(model)
    assert model._initial_epoch is None
    asked = model.fit(FEATURES, TARGETS, initial_epoch=3, epochs=5, verbose=0)
    assert len(asked.history["loss"]) == 2, (
        f"after forget_resumed_epoch, fit still does not train the epochs asked for (3 and 4). {_keras_changed(where)}"
    )


# --- keras.callbacks.TensorBoard._global_train_batch: tasks/modeling/monitoring.py, TensorBoard


def _step_summaries(callback: keras.callbacks.TensorBoard, folder: pathlib.Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every summary that `callback` wrote in the training logs of a small fit."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    features = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    targets = np.random.default_rng(1).normal(size=(64, 1)).astype("float32")
    model.fit(features, targets, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    written = []
    for events in sorted((folder / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                written.append((value.tag, event.step, round(float(tf.make_ndarray(value.tensor)), 5)))
    return sorted(written)


def test_tensorboard_step_summaries_are_those_keras_writes(tmp_path):
    where = (
        "monitoring.TensorBoard (tasks/modeling/monitoring.py), which skips the calls whose step summaries Keras "
        "would not record by its _global_train_batch"
    )
    options = dict(update_freq=3, histogram_freq=0, write_graph=False)
    ours = _step_summaries(monitoring.TensorBoard(str(tmp_path / "ours"), **options), tmp_path / "ours")
    keras_own = _step_summaries(keras.callbacks.TensorBoard(str(tmp_path / "keras"), **options), tmp_path / "keras")
    assert ours == keras_own, f"other step summaries than Keras' own. {_keras_changed(where, 'tensorboard.py')}"
    assert [step for tag, step, _ in ours if tag == "batch_loss"] == [3, 6, 9, 12, 15], "every third call of 16"


# --- dvc.repo.Repo._reset: flows/dvc_stages.py, _repo()


def test_dvc_repo_reset_makes_a_held_repository_read_its_files_again(tmp_path, monkeypatch):
    fix = (
        "flows/dvc_stages.py _repo() calls it on the Repo that exclusive() holds for the whole flow, so that the "
        f"status after a stage ran reads dvc.yaml, dvc.lock and the outputs again. DVC {dvc.__version__} changed "
        "it: find what dvc.repo.lock_repo now calls to the same end (dvc/repo/__init__.py) and call that instead"
    )
    assert callable(getattr(dvc.repo.Repo, "_reset", None)), f"dvc.repo.Repo has no _reset any more. {fix}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    subprocess.run(["git", "init", "--quiet"], check=True)
    dvc.repo.Repo.init(".").close()

    with dvc.repo.Repo(".") as repo, dvc.repo.lock_repo(repo):  # held, as exclusive() holds it
        assert list(repo.index.stages) == []
        pathlib.Path("dvc.yaml").write_text("stages:\n  make:\n    cmd: echo made > out.txt\n    outs: [out.txt]\n")
        repo._reset()
        assert [stage.addressing for stage in repo.index.stages] == ["make"], f"_reset did not forget the index. {fix}"
        assert repo.status(targets=["make"]), "a stage that never ran is not up to date"

        pathlib.Path("out.txt").write_text("made\n")  # the stage runs, outside DVC, as the flow runs it
        repo._reset()
        repo.commit("make", force=True)
        repo._reset()
        assert not repo.status(targets=["make"]), f"a committed stage is not up to date after _reset. {fix}"
        pathlib.Path("out.txt").write_text("changed\n")
        repo._reset()
        assert repo.status(targets=["make"]), f"a changed output is not seen after _reset. {fix}"


# --- keras.src.random.seed_generator.python_random: tasks/modeling/architectures.py, _seeds_drawn_from


def test_keras_draws_layer_seeds_from_its_seed_generator_modules_random():
    """build_model swaps this module's reference to `random` to give a model's layers seeds of their own."""
    changed = _keras_changed("architectures._seeds_drawn_from", "../random/seed_generator.py")
    assert seed_generator.python_random is random, changed
    with architectures._seeds_drawn_from(11):
        dropout = keras.layers.Dropout(0.5)
        drawn = [seed_generator.make_default_seed(), keras.initializers.GlorotUniform().seed]
    drawn.insert(0, int(dropout.seed_generator.state.numpy()[0]))
    expected = random.Random(11)
    assert drawn == [expected.randint(1, int(1e9)) for _ in range(3)], changed
    assert seed_generator.python_random is random, "the shared generator is back"
