"""Stage 3, train: shards -> a trained Keras model, its labels and history, and one MLflow run.

    python -m tasks.train           # reads ./params.yaml, writes <paths.models>/

Builds `train.model` inside the distribution strategy of `train.strategy`, trains it with model.fit
(a small custom loop for several workers, which Keras 3's fit cannot drive), logs params, per-epoch
metrics, the model summary and TensorBoard logs to MLflow, and saves the model with the moving averages
of its weights (`train.ema_momentum`), as the seed's evaluator uses them.

An interrupted run resumes: every epoch is backed up under <paths.checkpoints>/<model>-<hash of the
settings, seed and data>/, which DVC does not delete, so running the stage again with the same params
continues from the last completed epoch in the same MLflow run. Other settings start afresh. The MLflow
run stays open for evaluate and register: its id goes to <paths.models>/run.json.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any

import keras
import mlflow
import mlflow.models
import mlflow.tensorflow
import numpy as np
import tensorflow as tf

from tasks.common import config, errors, files, tracking
from tasks.data import inputs, records
from tasks.modeling import distributed, monitoring, networks, optimizers

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
HISTORY_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"
RUN_FILE = "mlflow_run.json"  # in the backup folder: the run an interrupted training resumes


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_id: str | None  # None on the workers of a cluster that are not the chief: they write nothing
    model_path: pathlib.Path | None
    final_loss: float
    validation_accuracy: float  # of the saved weights (the moving averages when train.ema_momentum is set)
    validation_accuracy_raw: float | None  # of the raw weights, when moving averages are kept
    resumed_from_epoch: int  # 0 for a fresh start


def train(
    params: config.TrainParams,
    seed: int,
    shards_dir: pathlib.Path,
    model_dir: pathlib.Path,
    run_settings: dict[str, Any] | None = None,
    checkpoints_dir: pathlib.Path | None = None,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
) -> TrainResult:
    """Trains `params.model` on the shards of `shards_dir`; `run_settings` (all of params.yaml) go to MLflow.

    `extra_callbacks` are more Keras callbacks, e.g. the flow's progress report. Backups go to `checkpoints_dir` (default: inside `model_dir`, where a rerun by DVC cannot find them).
    """
    # Devices first: logical CPU devices and multi-worker collectives must exist before any other op.
    strategy = distributed.make_strategy(params.strategy, params.cpu_devices)
    chief, multi_worker = distributed.is_chief(strategy), distributed.is_multi_worker(strategy)
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    mixed_precision = has_gpu if params.mixed_precision == "auto" else params.mixed_precision
    jit_compile = has_gpu if params.jit_compile == "auto" else params.jit_compile
    keras.utils.set_random_seed(seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()  # for the whole process: TensorFlow has no way back
    print(f"train: {strategy.num_replicas_in_sync} replica(s) of {params.model} ({distributed.describe(strategy)}), "
          f"mixed precision {mixed_precision}, XLA {jit_compile}")

    # Data: global batches; the validation split is centre-cropped exactly as evaluate does it.
    manifest = records.read_manifest(shards_dir)
    manifest_sha256 = files.sha256_of(shards_dir / records.MANIFEST)
    class_names, train_count = manifest["classes"], manifest["splits"]["train"]["count"]
    one_hot = lambda images, labels: (images, tf.one_hot(labels, len(class_names)))  # noqa: E731 - for label smoothing
    pipeline = dict(shards_dir=shards_dir, image_size=params.image_size, input_size=params.input_size, crop_padding=params.crop_padding,
                    augment=params.augment, batch_size=params.batch_size, shuffle_buffer=params.shuffle_buffer, cache_mb=params.cache_mb, seed=seed)
    # Repeated, so that one input iterator serves the whole fit, `steps_per_epoch` steps an epoch: given a
    # finite dataset, Keras makes a new iterator every epoch, and on a 2-core CPU four or five epochs in ten
    # then leave one core idle much of the time (docs/benchmarks.md, train_throughput).
    train_data = inputs.training_data(**pipeline, drop_remainder=multi_worker).map(one_hot, num_parallel_calls=tf.data.AUTOTUNE).repeat()
    validation_data = (
        inputs.evaluation_data(shards_dir, "validation", params.image_size, params.input_size, params.batch_size)
        .map(one_hot, num_parallel_calls=tf.data.AUTOTUNE).cache()
    )
    steps_per_epoch = train_count // params.batch_size if multi_worker else math.ceil(train_count / params.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size = {params.batch_size} is larger than the {train_count} training images; lower it")
    # Keras runs whole calls of steps_per_execution steps, and on repeated data a call must not cross an
    # epoch's end: each runs as many steps as divide both the epoch and log_every_steps.
    steps_per_execution = math.gcd(params.log_every_steps, steps_per_epoch)

    # The model, built and compiled inside the strategy's scope so that its variables are mirrored.
    channel_mean = inputs.channel_mean(shards_dir, params.image_size) if params.model == "resnet" else None
    keras.mixed_precision.set_dtype_policy("mixed_float16" if mixed_precision else "float32")  # read by layers when built
    try:
        with strategy.scope():
            model = networks.build_model(
                params.model, (*params.input_size, 3), len(class_names), weight_decay=params.weight_decay,
                resnet_n=params.resnet_n, channel_mean=channel_mean, pretrained_weights=_weights(params.pretrained_weights),
            )
            _compile(model, params, optimizers.make_optimizer(params, steps_per_epoch * params.epochs), jit_compile, steps_per_execution)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    summary: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: summary.append(line), expand_nested=False)
    print("\n".join(summary))  # the seeds log each layer's output shape and the parameter count

    # The backup folder of this exact configuration: its history says where an interrupted run stopped.
    work = _work_folder(checkpoints_dir or model_dir / ".checkpoints", params, seed, manifest_sha256, chief)
    resumed_from_epoch = _completed_epochs(work)
    if resumed_from_epoch:
        print(f"train: resuming after epoch {resumed_from_epoch} from {work}")
    run = _start_run(params, manifest, manifest_sha256, shards_dir, work, run_settings) if chief else contextlib.nullcontext()
    with run:
        # Phase 1 trains everything trainable (a pretrained base stays frozen); phase 2 fine-tunes its top.
        phases = [("train", params.epochs, None)]
        if params.fine_tune_epochs:
            phases.append(("fine_tune", params.epochs + params.fine_tune_epochs, params.fine_tune_learning_rate))
        history, raw_scores, first_epoch = None, {}, 0
        for phase, last_epoch, learning_rate in phases:
            finished = work / f"{phase}.weights.npz"  # a finished phase is not repeated by a resumed run
            if phase == "fine_tune":
                networks.set_fine_tuning(model)
                with strategy.scope():
                    _compile(model, params, optimizers.make_optimizer(params, 0, learning_rate), jit_compile, steps_per_execution)
            if finished.is_file():
                model.set_weights(list(np.load(finished).values()))
                first_epoch = last_epoch
                continue
            raw_score = monitoring.RawWeightsScore(validation_data)
            callbacks = _callbacks(params, work / f"backup-{phase}", work, chief, multi_worker, raw_score, pipeline) + list(extra_callbacks or [])
            if multi_worker:
                history = distributed.fit_multi_worker(model, strategy, train_data, validation_data, last_epoch, steps_per_epoch,
                                                       params.label_smoothing, callbacks, work / f"backup-{phase}")
            else:
                model._initial_epoch = None  # set by BackupAndRestore and never reset by Keras: a stale one would skip phase 2
                history = model.fit(train_data, steps_per_epoch=steps_per_epoch, validation_data=validation_data, initial_epoch=first_epoch,
                                    epochs=last_epoch, callbacks=callbacks, shuffle=False, verbose=0)  # train_data shuffles itself, seeded
            if chief:
                # Keras deletes its backup when fit returns: without these weights, a kill before the model
                # is saved below would train every epoch again.
                with files.staged_file(finished) as staged:
                    np.savez(staged, *model.get_weights())
            raw_scores, first_epoch = raw_score.scores, last_epoch

        losses = (history.history.get("loss") if history else None) or [row["loss"] for row in _history_rows(work)]
        final_loss = float(losses[-1]) if losses else math.nan
        if not math.isfinite(final_loss):
            if chief:
                shutil.rmtree(work, ignore_errors=True)  # a diverged run is not worth resuming
            raise FloatingPointError(f"training diverged: loss is {final_loss}; lower train.learning_rate")
        best = work / "best.weights.h5"
        if params.restore_best and best.is_file():
            # After fine-tuning, the best epoch may be from phase 1: Keras then skips its optimizer state, with a warning.
            model.load_weights(best)
        # The weights now in the model are the moving averages (fit finalizes them): the saved ones.
        _, validation_accuracy = distributed.score(model, validation_data, params.label_smoothing)
        raw_accuracy = raw_scores.get("accuracy") if params.ema_momentum is not None else None
        if not chief:
            return TrainResult(None, None, final_loss, validation_accuracy, raw_accuracy, resumed_from_epoch)

        model_dir.mkdir(parents=True, exist_ok=True)
        # run.json is written last and read first: without it the folder never passes for a finished
        # model while the files below are being replaced (a kill mid-save leaves it visibly unfinished).
        (model_dir / tracking.RUN_FILE).unlink(missing_ok=True)
        model.save(model_dir / MODEL_FILE)
        files.write_json(model_dir / LABELS_FILE, class_names)
        inputs.write_preprocessing(model_dir, params.image_size, params.input_size)
        shutil.copyfile(work / HISTORY_FILE, model_dir / HISTORY_FILE)
        shutil.rmtree(model_dir / TENSORBOARD_DIR, ignore_errors=True)
        shutil.copytree(work / TENSORBOARD_DIR, model_dir / TENSORBOARD_DIR)
        mlflow.log_metric("validation_accuracy_final", validation_accuracy)
        if raw_accuracy is not None:
            mlflow.log_metric("validation_accuracy_raw", raw_accuracy)  # what the moving averages gained
        mlflow.log_text("\n".join(summary), "model_summary.txt")
        mlflow.log_artifacts(str(work / TENSORBOARD_DIR), TENSORBOARD_DIR)
        example = next(iter(validation_data.unbatch().batch(4).take(1)))[0].numpy()
        signature = mlflow.models.infer_signature(example, keras.ops.convert_to_numpy(model(example, training=False)))
        # Two of our layers (LRN, ResNet shortcut) are registered Keras objects, and MLflow pickles every
        # registered object with any model: the tasks package travels with it, so it loads anywhere.
        preprocessing = {"image_size": list(params.image_size), "input_size": list(params.input_size)}
        model_info = mlflow.tensorflow.log_model(
            model, name="model", signature=signature, input_example=example,
            metadata={"class_names": class_names, "preprocessing": preprocessing},
            code_paths=[str(pathlib.Path(networks.__file__).parents[1])],  # the whole tasks package
        )
        mlflow.log_text(json.dumps(class_names), "labels.json")
        run_id = mlflow.active_run().info.run_id
        tracking.write_run(model_dir, {
            "run_id": run_id, "experiment_id": mlflow.active_run().info.experiment_id, "tracking_uri": mlflow.get_tracking_uri(),
            "model_uri": model_info.model_uri, "dataset": manifest["dataset"], "manifest_sha256": manifest_sha256,
        })
    shutil.rmtree(work)  # finished: nothing left to resume
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # only if no other backup is there
    return TrainResult(run_id, model_dir / MODEL_FILE, final_loss, validation_accuracy, raw_accuracy, resumed_from_epoch)


class WholeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, each of its files written under a temporary name and renamed when whole,
    at the end of an epoch once `every_seconds` have passed since the last backup.

    Keras writes its backup in place: a kill mid-write leaves weights that cannot be loaded, or an empty
    training_metadata.json that stops every later fit with a JSONDecodeError, until someone deletes the
    backup by hand. Weights first, then the epoch count: a kill between the two renames repeats an
    epoch, never skips one. Keras backs up every epoch or every N steps; short epochs (a GPU's, or
    bench.train_throughput's) then pay a whole model write each, 30-40 ms of a 1.5 s epoch here.
    Overrides Keras' private `_save_model` (tests/test_training.py cuts one off).
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
        files.write_json(pathlib.Path(self._training_metadata_path), {"epoch": self._current_epoch, "batch": self._last_batch_seen})


def _compile(model: keras.Model, params: config.TrainParams, optimizer: keras.optimizers.Optimizer, jit_compile: bool, steps_per_execution: int) -> None:
    # One-hot targets: Keras' sparse cross-entropy has no label smoothing.
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
    # The steps between two progress lines run as calls of several steps each, without a return to Python
    # and the per-step callbacks after every step (bench/train_throughput.py).
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=jit_compile, steps_per_execution=steps_per_execution)


def _callbacks(params, backup_dir, work, chief, multi_worker, raw_score, pipeline) -> list[keras.callbacks.Callback]:
    """In this order: logs are completed before they are written; backups hold raw weights, the best checkpoint the averages."""
    progress = [keras.callbacks.TerminateOnNaN(), monitoring.ProgressLogger(params.log_every_steps, params.batch_size)]
    if not chief:
        return progress
    averages = params.ema_momentum is not None and not multi_worker  # the custom loop validates the raw weights
    # From a pipeline of its own, so the training one's shuffle order stays the same on every worker.
    preview = next(iter(inputs.training_data(**{**pipeline, "shuffle_buffer": 1}).take(1)))[0].numpy()
    return [
        *progress,
        keras.callbacks.CSVLogger(str(work / HISTORY_FILE), append=True),
        monitoring.MlflowMetrics(),
        # Step summaries every log_every_steps calls of the training function: every call costs too much (docs/benchmarks.md).
        keras.callbacks.TensorBoard(str(work / TENSORBOARD_DIR), histogram_freq=params.histogram_freq, write_graph=False,
                                    update_freq=params.log_every_steps),
        monitoring.InputImages(work / TENSORBOARD_DIR, preview),
        WholeBackupAndRestore(str(backup_dir), params.backup_every_seconds),
        # The averages validate; they stay in the model at the end of each epoch only for the best-epoch
        # checkpoint after them (two more swaps of every weight per epoch otherwise: ~10 ms here).
        *([raw_score, keras.callbacks.SwapEMAWeights(swap_on_epoch=params.restore_best)] if averages else []),
        # Only restore_best reads the best epoch's weights; without it, saving them would cost every improving
        # epoch a write of the whole model for nothing (a few percent of a short epoch: bench.train_throughput).
        *([keras.callbacks.ModelCheckpoint(str(work / "best.weights.h5"), monitor=params.monitor, save_best_only=True, save_weights_only=True,
                                           initial_value_threshold=_best_so_far(work, params.monitor))] if params.restore_best else []),
    ]


def _work_folder(root: pathlib.Path, params: config.TrainParams, seed: int, manifest_sha256: str, chief: bool) -> pathlib.Path:
    """<root>/<model>-<hash>: keyed by every train setting, the seed and the data, so a changed config never resumes a stale backup."""
    settings = params.model_dump(mode="json", exclude={"backup_every_seconds"})  # how often to back up changes no result
    identity = json.dumps({"train": settings, "seed": seed, "data": manifest_sha256}, sort_keys=True)
    folder = root / f"{params.model}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    if chief:
        # Only the latest configuration's backup is kept: backups of large models take gigabytes.
        for other in root.iterdir() if root.is_dir() else []:
            if other != folder and other.is_dir():
                shutil.rmtree(other)
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _history_rows(work: pathlib.Path) -> list[dict[str, str]]:
    path = work / HISTORY_FILE
    return list(csv.DictReader(path.open())) if path.is_file() else []


def _completed_epochs(work: pathlib.Path) -> int:
    """Epochs a previous, interrupted run finished; history rows past its last backup are dropped (they will be redone)."""
    backups = [json.loads(path.read_text())["epoch"] for path in work.glob("backup-*/training_metadata.json")]
    finished_phases = list(work.glob("*.weights.npz"))
    rows = _history_rows(work)
    completed = max(backups, default=len(rows) if finished_phases else 0)
    if len(rows) > completed:
        with (work / HISTORY_FILE).open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows[:completed])
    return completed


def _best_so_far(work: pathlib.Path, monitor: str) -> float | None:
    values = [float(row[monitor]) for row in _history_rows(work) if row.get(monitor) not in (None, "", "NA")]
    values = [value for value in values if math.isfinite(value)]
    if not values:
        return None
    return min(values) if monitor.endswith("loss") else max(values)


def _start_run(params, manifest, manifest_sha256, shards_dir, work, run_settings):
    """The MLflow run of this configuration: the interrupted one when resuming, else a new one."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    previous = files.read_json(work / RUN_FILE, "") if (work / RUN_FILE).is_file() else {}
    if previous.get("tracking_uri") == errors.without_credentials(mlflow.get_tracking_uri()):
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.get_run(previous["run_id"])
            client.set_tag(previous["run_id"], "resumed", "true")
            return mlflow.start_run(run_id=previous["run_id"])
    experiment_id = tracking.experiment_id(client, params.experiment_name)
    run_name = f"{manifest['dataset']}-{params.model}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    tags = {"dataset": manifest["dataset"], "manifest_sha256": manifest_sha256, **tracking.git_tags(), **tracking.dvc_tags(shards_dir)}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    settings = run_settings or {"train": params.model_dump(mode="json")}
    mlflow.log_params(config.flatten(settings))
    mlflow.log_dict(settings, "params.yaml")
    files.write_json(work / RUN_FILE, {"run_id": run.info.run_id, "tracking_uri": errors.without_credentials(mlflow.get_tracking_uri())})
    return run


def _weights(setting: str) -> str:
    if setting in ("imagenet", "none") or pathlib.Path(setting).is_file():
        return setting
    raise FileNotFoundError(f"train.pretrained_weights = {setting!r}: expected imagenet, none or the path of a weights file; no such file")


def main(arguments: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(arguments)
    params = config.load_params()
    result = train(params.train, params.base.seed, params.shards_dir, params.model_dir, config.as_dict(params), params.checkpoints_dir)
    print(
        f"train: loss {result.final_loss:.4f}, validation accuracy {result.validation_accuracy:.4f}"
        + (f" (raw weights {result.validation_accuracy_raw:.4f})" if result.validation_accuracy_raw is not None else "")
        + (f", model {result.model_path}, MLflow run {result.run_id}" if result.run_id else ", this worker writes nothing")
    )


if __name__ == "__main__":
    # The other workers of a cluster share the chief's folder and write nothing there: the chief holds the lock.
    sys.exit(errors.run_main(main, exclusive=distributed.is_chief_process()))
