"""Stage 3, train: shards -> a trained Keras model, its labels and history, and one MLflow run.

    python -m tasks.train           # reads ./params.yaml, writes <paths.models>/

Builds `train.model` inside the distribution strategy of `train.strategy`, trains it with model.fit
(a small custom loop for several workers, which Keras 3's fit cannot drive), logs params, per-epoch
metrics, the model summary and TensorBoard logs to MLflow, and saves the model with the moving averages
of its weights (`train.ema_momentum`), as the seed's evaluator uses them. The saved model ends in a
temperature fitted on the validation split (tasks/modeling/calibration.py), so that its probabilities are
calibrated confidences; the MLflow run gets the temperature and the split's expected calibration error
before and after it.

`train.init_from` starts it from an earlier model's weights instead of random ones (the champion, a
registry URI or a model folder: tasks/modeling/warm_start.py), for `train.warm_start_epochs` epochs;
`train.class_weight` weighs each class's images in the loss (tasks/modeling/class_weights.py).

An interrupted run resumes: every epoch is backed up under <paths.checkpoints>/<model>-<hash of the
settings, seed, data and start>/, which DVC does not delete, so running the stage again with the same params
continues from the last completed epoch in the same MLflow run. Other settings start afresh. The MLflow
run stays open for evaluate and register: its id goes to <paths.models>/run.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import shutil
import sys
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tasks.common import config, contracts, disk, errors, files
from tasks.data import inputs
from tasks.modeling import (
    architectures,
    calibration,
    checkpoints,
    class_weights,
    distributed,
    monitoring,
    networks,
    optimizers,
    scoring,
    strategies,
    training_run,
    warm_start,
)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_id: str | None  # None on the workers of a cluster that are not the chief: they write nothing
    model_path: pathlib.Path | None
    final_loss: float
    validation_accuracy: float  # of the saved weights (the moving averages when train.ema_momentum is set)
    validation_accuracy_raw: float | None  # of the raw weights, when moving averages are kept
    resumed_from_epoch: int  # 0 for a fresh start


def arguments(params: config.Params) -> dict[str, Any]:
    """The stage's arguments, chosen from the settings: `python -m`, the flow, benchmarks and tests all call it."""
    return dict(
        params=params.train,
        seed=params.base.seed,
        shards_dir=params.shards_dir,
        model_dir=params.model_dir,
        run_settings=config.as_dict(params),
        checkpoints_dir=params.checkpoints_dir,
        registered_model_name=params.registered_model_name,
        data_report_dir=params.data_report_dir,
    )


@disk.writes(model_dir="paths.models", checkpoints_dir="paths.checkpoints")
def train(
    params: config.TrainParams,
    seed: int,
    shards_dir: pathlib.Path,
    model_dir: pathlib.Path,
    run_settings: dict[str, Any] | None = None,
    checkpoints_dir: pathlib.Path | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    registered_model_name: str | None = None,
    data_report_dir: pathlib.Path | None = None,
) -> TrainResult:
    """Trains `params.model` on the shards of `shards_dir`; `run_settings` (all of params.yaml) go to MLflow.

    `callbacks` are more Keras callbacks, e.g. the flow's progress report. Backups go to
    `checkpoints_dir` (default: inside `model_dir`, where a rerun by DVC cannot find them).
    `registered_model_name` is where `train.init_from: champion` looks for the champion; convert's data-change
    report in `data_report_dir`, if any, goes to the MLflow run.
    """
    devices = _devices(params, seed)  # first: logical CPU devices and collectives must exist before any other op
    data = _data(params, seed, shards_dir, devices)
    start = warm_start.resolve(params, registered_model_name)
    if start.warm:  # it starts near the answer: fewer epochs, and a schedule over those
        params = params.model_copy(update={"epochs": params.warm_start_epochs})
    print(start.describe(params.epochs))
    model, summary = _model(params, devices, data, seed)
    if start.warm:
        with devices.strategy.scope():
            warm_start.copy_weights(start, model, data.manifest.classes, params)
    work, resumed_from_epoch = _work_folder(
        checkpoints_dir or model_dir / ".checkpoints", params, seed, data, devices, start
    )
    disk.require(*disk.training_needs(model, params, work, model_dir, devices.chief))
    with _mlflow_run(devices, params, data, shards_dir, work, run_settings, start):
        history, raw_scores = _fit_phases(model, params, devices, data, work, list(callbacks or []))
        final_loss = _final_loss(history, work)
        validation_accuracy, raw_accuracy = _final_weights(model, params, data, work, raw_scores)
        if not devices.chief:
            checkpoints.remove(work)  # this worker's own backups: finished, nothing left to resume
            return TrainResult(None, None, final_loss, validation_accuracy, raw_accuracy, resumed_from_epoch)
        serving, calibration_figures = _save(model, params, data, shards_dir, work, model_dir)
        accuracies = {"validation_accuracy_final": validation_accuracy, "validation_accuracy_raw": raw_accuracy}
        run_id = training_run.log_model(
            serving,
            _preprocessing(params, data),
            data.manifest,
            data.manifest_sha256,
            shards_dir,
            work,
            model_dir,
            summary,
            {**accuracies, **calibration_figures},
            data_report_dir,
        )
    checkpoints.remove(work)  # finished: nothing left to resume
    return TrainResult(
        run_id, model_dir / contracts.MODEL_FILE, final_loss, validation_accuracy, raw_accuracy, resumed_from_epoch
    )


def _work_folder(root, params, seed, data, devices, start) -> tuple[pathlib.Path, int]:
    """This run's backup folder (checkpoints.work_folder), and the epochs an interrupted run of it finished."""
    work = checkpoints.work_folder(
        root, params, seed, data.manifest_sha256, devices.chief, start.identity, devices.worker
    )
    resumed_from_epoch = checkpoints.completed_epochs(work)
    if resumed_from_epoch:
        print(f"train: resuming after epoch {resumed_from_epoch} from {work}")
    return work, resumed_from_epoch


def _mlflow_run(devices, params, data, shards_dir, work, run_settings, start):
    """The MLflow run (training_run.start), on the chief only: the other workers of a cluster write nothing."""
    if not devices.chief:
        return contextlib.nullcontext()
    return training_run.start(
        params, data.manifest, data.manifest_sha256, shards_dir, work, run_settings, start.tags(), data.class_weight
    )


@dataclasses.dataclass(frozen=True)
class Devices:
    strategy: tf.distribute.Strategy
    chief: bool  # writes the outputs: every process but the other workers of a cluster
    worker: str | None  # the name of such another worker ("worker-1"): where it keeps its own backups
    multi_worker: bool
    mixed_precision: bool
    jit_compile: bool


def _devices(params: config.TrainParams, seed: int) -> Devices:
    """The strategy of `train.strategy`, and what the devices it found allow; seeds every generator."""
    strategy = strategies.make_strategy(params.strategy, params.cpu_devices)
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    devices = Devices(
        strategy=strategy,
        chief=distributed.is_chief(strategy),
        worker=distributed.worker_name(strategy),
        multi_worker=distributed.is_multi_worker(strategy),
        mixed_precision=has_gpu if params.mixed_precision == "auto" else params.mixed_precision,
        jit_compile=has_gpu if params.jit_compile == "auto" else params.jit_compile,
    )
    keras.utils.set_random_seed(seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()  # for the whole process: TensorFlow has no way back
    print(
        f"train: {strategy.num_replicas_in_sync} replica(s) of {params.model} ({distributed.describe(strategy)}), "
        f"mixed precision {devices.mixed_precision}, XLA {devices.jit_compile}"
    )
    return devices


@dataclasses.dataclass(frozen=True)
class Data:
    manifest: contracts.Manifest
    manifest_sha256: str
    training: tf.data.Dataset  # repeated: one iterator for the whole fit
    validation: tf.data.Dataset
    steps_per_epoch: int
    steps_per_execution: int
    pipeline: dict[str, Any]  # the arguments of inputs.training_data, for the preview of input images
    class_weight: dict[str, float] | None  # train.class_weight, per class name; None: unweighted


def _data(params: config.TrainParams, seed: int, shards_dir: pathlib.Path, devices: Devices) -> Data:
    """Global batches; the validation split is centre-cropped exactly as evaluate does it."""
    manifest = contracts.Manifest.read(shards_dir)
    class_count, train_count = len(manifest.classes), manifest.count("train")
    # Several replicas on this machine split every batch evenly (inputs.split_evenly); a cluster's workers
    # take whole batches, so that all of them take the same number of steps.
    replicas = 1 if devices.multi_worker else devices.strategy.num_replicas_in_sync
    _check_replicas(params.batch_size, replicas)
    one_hot = lambda images, labels: (images, tf.one_hot(labels, class_count))  # noqa: E731 - for label smoothing
    pipeline = dict(
        shards_dir=shards_dir,
        image_size=params.image_size,
        input_size=params.input_size,
        crop_padding=params.crop_padding,
        augment=params.augment,
        batch_size=params.batch_size,
        shuffle_buffer=_shuffle_buffer(params, manifest),
        cache_mb=params.cache_mb,
        seed=seed,
    )
    # Repeated, so that one input iterator serves the whole fit, `steps_per_epoch` steps an epoch: given a
    # finite dataset, Keras makes a new iterator every epoch, and on a 2-core CPU four or five epochs in ten
    # then leave one core idle much of the time (docs/benchmarks-history.md, train_throughput).
    training = (
        inputs.training_data(**pipeline, drop_remainder=devices.multi_worker, replicas=replicas)
        .map(one_hot, num_parallel_calls=tf.data.AUTOTUNE)
        .repeat()
    )
    validation = inputs.evaluation_data(
        shards_dir, "validation", params.image_size, params.input_size, params.batch_size
    ).map(one_hot, num_parallel_calls=tf.data.AUTOTUNE)
    # Kept in memory after the first pass under the same bound as the training split, else read from the
    # shards every epoch: held whatever its size, it made train's peak memory grow with the data set.
    if inputs.fits_in_memory(manifest.count("validation"), params.input_size, params.cache_mb):
        validation = validation.cache()
    steps_per_epoch = inputs.batches_per_epoch(train_count, params.batch_size, replicas, devices.multi_worker)
    if steps_per_epoch < 1:
        raise errors.BadInput(
            f"train.batch_size = {params.batch_size} is larger than the {train_count} training images; lower it"
        )
    # Keras runs whole calls of steps_per_execution steps, and on repeated data a call must not cross an
    # epoch's end: each runs as many steps as divide both the epoch and log_every_steps.
    return Data(
        manifest=manifest,
        manifest_sha256=files.sha256_of(shards_dir / contracts.MANIFEST_FILE),
        training=training,
        validation=validation,
        steps_per_epoch=steps_per_epoch,
        steps_per_execution=math.gcd(params.log_every_steps, steps_per_epoch),
        pipeline=pipeline,
        class_weight=class_weights.compute(params.class_weight, manifest),
    )


def _shuffle_buffer(params: config.TrainParams, manifest: contracts.Manifest) -> int:
    """train.shuffle_buffer, bounded by train.shuffle_mb, said when the split is streamed and the bound cuts it."""
    bounded = inputs.bounded_shuffle_buffer(manifest, params.shuffle_buffer, params.shuffle_mb)
    streamed = not inputs.fits_in_memory(manifest.count("train"), params.image_size, params.cache_mb)
    if streamed and bounded < min(params.shuffle_buffer, manifest.count("train")):
        print(
            f"train: shuffling through {bounded:,} stored images at a time, not train.shuffle_buffer's "
            f"{params.shuffle_buffer:,}: the training split's images are stored at "
            f"{inputs.mean_stored_bytes(manifest, 'train') / 2**10:,.0f} KiB each on average, and "
            f"train.shuffle_mb bounds the buffer to {params.shuffle_mb:,} MiB"
        )
    return bounded


def _check_replicas(batch_size: int, replicas: int) -> None:
    """Several replicas split every batch evenly (inputs.split_evenly says why): the batch size must be a
    multiple of their number."""
    if replicas > 1 and batch_size % replicas:
        lower, upper = batch_size // replicas * replicas, (batch_size // replicas + 1) * replicas
        raise errors.BadInput(
            f"train.batch_size = {batch_size} does not split evenly over the {replicas} replicas: use a multiple "
            f"of {replicas}, e.g. {' or '.join(str(size) for size in (lower, upper) if size)}"
        )


def _model(params: config.TrainParams, devices: Devices, data: Data, seed: int) -> tuple[keras.Model, list[str]]:
    """The network, built from `seed` and compiled inside the strategy's scope so that its variables are mirrored;
    and its summary."""
    network = networks.NETWORKS[params.model]
    channel_mean = (
        inputs.channel_mean(data.pipeline["shards_dir"], params.image_size) if network.subtracts_channel_mean else None
    )
    keras.mixed_precision.set_dtype_policy(
        "mixed_float16" if devices.mixed_precision else "float32"
    )  # read by layers when built
    try:
        with devices.strategy.scope():
            model = architectures.build_model(
                params.model,
                (*params.input_size, 3),
                len(data.manifest.classes),
                weight_decay=params.weight_decay,
                resnet_n=params.resnet_n,
                channel_mean=channel_mean,
                pretrained_weights=_weights(params.pretrained_weights),
                seed=seed,
            )
            _compile(
                model, params, optimizers.make_optimizer(params, data.steps_per_epoch * params.epochs), devices, data
            )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    summary: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: summary.append(line), expand_nested=False)
    print("\n".join(summary))  # the seeds log each layer's output shape and the parameter count
    return model, summary


def _compile(
    model: keras.Model, params: config.TrainParams, optimizer: keras.optimizers.Optimizer, devices: Devices, data: Data
) -> None:
    # One-hot targets: Keras' sparse cross-entropy has no label smoothing.
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
    # The steps between two progress lines run as calls of several steps each, without a return to Python
    # and the per-step callbacks after every step (bench/train_throughput.py). Not with several replicas:
    # Keras 3's loop of several steps over a distributed, repeated dataset fails at the first epoch
    # ("You must feed a value for placeholder tensor ... while/cond/Placeholder_1", from
    # multi_step_on_iterator), so each call runs one step there.
    # The metric as an object and the optimizer built here: created while the training function is first traced,
    # their variables make TensorFlow trace it a second time (its first call 2.0 s instead of 1.1 s for mnist_cnn
    # on 2 cores: bench.warm_start).
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=devices.jit_compile,
        steps_per_execution=data.steps_per_execution if devices.strategy.num_replicas_in_sync == 1 else 1,
    )
    optimizer.build(model.trainable_variables)


def _fit_phases(
    model, params, devices, data, work, extra_callbacks
) -> tuple[keras.callbacks.History | None, dict[str, float]]:
    """Phase 1 trains everything trainable (a pretrained base stays frozen); phase 2 fine-tunes its top.

    A phase finished by an interrupted run is not repeated: its weights are loaded instead.
    """
    phases = [("train", params.epochs, None)]
    if params.fine_tune_epochs:
        phases.append(("fine_tune", params.epochs + params.fine_tune_epochs, params.fine_tune_learning_rate))
    history, raw_scores, first_epoch = None, {}, 0
    for phase, last_epoch, learning_rate in phases:
        finished = work / f"{phase}.weights.npz"
        if phase == "fine_tune":
            architectures.set_fine_tuning(model, params.model)
            with devices.strategy.scope():
                _compile(model, params, optimizers.make_optimizer(params, 0, learning_rate), devices, data)
        if finished.is_file():
            model.set_weights(list(np.load(finished).values()))
            first_epoch = last_epoch
            continue
        raw_score = monitoring.RawWeightsScore(data.validation, params.label_smoothing)
        callbacks = _callbacks(params, work / f"backup-{phase}", work, devices, raw_score, data) + extra_callbacks
        history = _fit(model, params, devices, data, callbacks, work / f"backup-{phase}", first_epoch, last_epoch)
        # Keras deletes its backup when fit returns: without these weights, a kill before the model is saved
        # would train every epoch again. Every worker of a cluster keeps its own.
        with files.staged_file(finished) as staged:
            np.savez(staged, *model.get_weights())
        raw_scores, first_epoch = raw_score.scores, last_epoch
    return history, raw_scores


def _fit(model, params, devices, data, callbacks, backup_dir, first_epoch, last_epoch) -> keras.callbacks.History:
    """model.fit; under MultiWorkerMirroredStrategy, which Keras 3's fit cannot drive, distributed's loop."""
    if devices.multi_worker:
        return distributed.fit_multi_worker(
            model,
            devices.strategy,
            data.training,
            data.validation,
            last_epoch,
            data.steps_per_epoch,
            params.label_smoothing,
            callbacks,
            backup_dir,
            class_weights.by_index(data.class_weight, data.manifest.classes),
        )
    checkpoints.forget_resumed_epoch(model)  # a stale one, from phase 1's backup, would skip phase 2
    # train_data shuffles itself, seeded. Cut to the steps of this fit: on the repeated data, the prefetch after
    # the last step began the next epoch, which from the shards first fills the shuffle buffer (20,000 photos of
    # 224x224: 240 MB read at the end of training, and train's peak memory at 100,000 photos 1.3x that at 10,000).
    # A fit resumed from a backup takes fewer steps than that, never more.
    return model.fit(
        data.training.take(data.steps_per_epoch * (last_epoch - first_epoch)),
        steps_per_epoch=data.steps_per_epoch,
        validation_data=None if _validates(devices) else data.validation,
        initial_epoch=first_epoch,
        epochs=last_epoch,
        callbacks=callbacks,
        class_weight=class_weights.by_index(data.class_weight, data.manifest.classes),
        shuffle=False,
        verbose=0,
    )


def _validates(devices: Devices) -> bool:
    """Whether distributed.Validation scores the validation split instead of model.fit: under several replicas
    on this machine (the cluster's own loop scores it itself)."""
    return devices.strategy.num_replicas_in_sync > 1 and not devices.multi_worker


def _callbacks(params, backup_dir, work, devices, raw_score, data) -> list[keras.callbacks.Callback]:
    """In this order: logs are completed before they are written; backups hold raw weights, the best
    checkpoint the averages."""
    averages = params.ema_momentum is not None and not devices.multi_worker  # the custom loop validates the raw weights
    progress = [
        # First: the callbacks after it read the validation scores it adds (under several replicas only).
        *([distributed.Validation(data.validation, params.label_smoothing, averages)] if _validates(devices) else []),
        keras.callbacks.TerminateOnNaN(),
        monitoring.ProgressLogger(params.log_every_steps, params.batch_size),
    ]
    if not devices.chief:
        return progress
    # From a pipeline of its own, so the training one's shuffle order stays the same on every worker; streamed
    # (cache_mb 0), so that it reads one batch and not the whole split into memory.
    preview_pipeline = {**data.pipeline, "shuffle_buffer": 1, "cache_mb": 0}
    preview = next(iter(inputs.training_data(**preview_pipeline).take(1)))[0].numpy()
    return [
        *progress,
        keras.callbacks.CSVLogger(str(work / contracts.HISTORY_FILE), append=True),
        monitoring.MlflowMetrics(),
        # Step summaries every log_every_steps calls of the training function: every call costs too much
        # (docs/benchmarks-history.md).
        monitoring.TensorBoard(
            str(work / contracts.TENSORBOARD_DIR),
            histogram_freq=params.histogram_freq,
            write_graph=False,
            update_freq=params.log_every_steps,
        ),
        monitoring.InputImages(work / contracts.TENSORBOARD_DIR, preview),
        # A cluster's loop backs up every worker itself (distributed.backup_epoch).
        *(
            []
            if devices.multi_worker
            else [checkpoints.WholeBackupAndRestore(str(backup_dir), params.backup_every_seconds)]
        ),
        # The averages validate; they stay in the model at the end of each epoch only for the best-epoch
        # checkpoint after them (two more swaps of every weight per epoch otherwise: ~10 ms here).
        *([raw_score, keras.callbacks.SwapEMAWeights(swap_on_epoch=params.restore_best)] if averages else []),
        # Only restore_best reads the best epoch's weights; without it, saving them would cost every improving
        # epoch a write of the whole model for nothing (a few percent of a short epoch: bench.train_throughput).
        *(
            [
                keras.callbacks.ModelCheckpoint(
                    str(work / checkpoints.BEST_WEIGHTS_FILE),
                    monitor=params.monitor,
                    save_best_only=True,
                    save_weights_only=True,
                    initial_value_threshold=checkpoints.best_so_far(work, params.monitor),
                )
            ]
            if params.restore_best
            else []
        ),
    ]


def _final_loss(history: keras.callbacks.History | None, work: pathlib.Path) -> float:
    """The last epoch's loss (from the history file when every phase had finished before); diverged if not finite."""
    losses = (history.history.get("loss") if history else None) or [
        row["loss"] for row in checkpoints.history_rows(work)
    ]
    final_loss = float(losses[-1]) if losses else math.nan
    if not math.isfinite(final_loss):
        checkpoints.remove(work)  # a diverged run is not worth resuming (every worker removes its own)
        raise errors.Diverged(f"training diverged: loss is {final_loss}; lower train.learning_rate")
    return final_loss


def _final_weights(model, params, data, work, raw_scores) -> tuple[float, float | None]:
    """Puts the weights to save in the model (the best epoch's, with restore_best); their validation
    accuracy, and the raw weights' when moving averages are kept."""
    best = work / checkpoints.BEST_WEIGHTS_FILE
    if params.restore_best and best.is_file():
        # After fine-tuning, the best epoch may be from phase 1: Keras then skips its optimizer state, with a warning.
        model.load_weights(best)
    # The weights now in the model are the moving averages (fit finalizes them): the saved ones.
    _, validation_accuracy = distributed.score(model, data.validation, params.label_smoothing)
    return validation_accuracy, raw_scores.get("accuracy") if params.ema_momentum is not None else None


def _save(
    model: keras.Model,
    params: config.TrainParams,
    data: Data,
    shards_dir: pathlib.Path,
    work: pathlib.Path,
    model_dir: pathlib.Path,
) -> tuple[keras.Model, dict[str, float]]:
    """The model folder, but for run.json (see training_run.log_model); returns the saved model (the network
    behind its preparation, followed by its calibration) and the calibration's figures for the MLflow run."""
    serving, calibration_figures = _calibrated(model, params, shards_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    # run.json is written last and read first: without it the folder never passes for a finished
    # model while the files below are being replaced (a kill mid-save leaves it visibly unfinished).
    (model_dir / contracts.RUN_FILE).unlink(missing_ok=True)
    # Each file replaces the last one, never written into: DVC's cache may share its data (cache.type
    # hardlink, .dvc/config), and writing into the file would change the cached model of an earlier run.
    with files.staged_file(model_dir / contracts.MODEL_FILE) as staged:
        serving.save(staged)
    contracts.write_labels(model_dir, data.manifest.classes)
    _preprocessing(params, data).write(model_dir)
    with files.staged_file(model_dir / contracts.HISTORY_FILE) as staged:
        shutil.copyfile(work / contracts.HISTORY_FILE, staged)
    shutil.rmtree(model_dir / contracts.TENSORBOARD_DIR, ignore_errors=True)
    shutil.copytree(work / contracts.TENSORBOARD_DIR, model_dir / contracts.TENSORBOARD_DIR)
    return serving, calibration_figures


def _calibrated(
    model: keras.Model, params: config.TrainParams, shards_dir: pathlib.Path
) -> tuple[keras.Model, dict[str, float]]:
    """The serving model at the temperature fitted on the validation split (calibration.py), and the
    temperature with the split's expected calibration error before and after it.

    Fitted on the serving model's own output, over the shards as evaluate reads them, so the temperature
    suits exactly the probabilities that predict, evaluate and the registered model give.
    """
    network = architectures.without_training_state(model)
    uncalibrated = architectures.serving_model(network, params.image_size, params.input_size)
    # The serving model crops images itself: they are decoded at image_size and given to it uncropped.
    validation = scoring.predict_split(
        uncalibrated, shards_dir, "validation", params.batch_size, params.image_size, params.image_size
    )
    temperature, how = calibration.temperature_for(validation.labels, validation.probabilities)
    error_before = calibration.expected_calibration_error(validation.labels, validation.probabilities)
    error_after = calibration.expected_calibration_error(
        validation.labels, calibration.scaled(validation.probabilities, temperature)
    )
    print(
        f"train: calibration temperature {temperature:.4f}, {how}; expected calibration error on validation "
        f"{error_before:.4f} before, {error_after:.4f} after"
    )
    figures = {
        "calibration_temperature": temperature,
        "validation_ece_before": error_before,
        "validation_ece_after": error_after,
    }
    return architectures.serving_model(network, params.image_size, params.input_size, temperature), figures


def _preprocessing(params: config.TrainParams, data: Data) -> contracts.Preprocessing:
    stored_size = tuple(data.manifest.image_size) if data.manifest.image_size else None
    return contracts.Preprocessing(stored_size=stored_size, image_size=params.image_size, input_size=params.input_size)


def _weights(setting: str) -> str:
    if setting in ("imagenet", "none") or pathlib.Path(setting).is_file():
        return setting
    raise errors.MissingInput(
        f"train.pretrained_weights = {setting!r}: expected imagenet, none or the path of a weights file; no such file"
    )


def main(argv: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(argv)
    result = train(**arguments(config.load_params()))
    print(
        f"train: loss {result.final_loss:.4f}, validation accuracy {result.validation_accuracy:.4f}"
        + (f" (raw weights {result.validation_accuracy_raw:.4f})" if result.validation_accuracy_raw is not None else "")
        + (
            f", model {result.model_path}, MLflow run {result.run_id}"
            if result.run_id
            else ", this worker writes nothing"
        )
    )


if __name__ == "__main__":
    # The other workers of a cluster share the chief's folder and write nothing there: the chief holds the lock.
    sys.exit(errors.run_main(main, exclusive=strategies.is_chief_process()))
