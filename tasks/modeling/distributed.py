"""What train needs to know of its strategy (tasks/modeling/strategies.py makes it), and the one
training loop Keras cannot run for us.

Keras 3's model.fit does not work under MultiWorkerMirroredStrategy (keras-team/keras#20585), so
`fit_multi_worker` is a minimal replacement for that case only: the same callbacks and the same
per-epoch logs as fit. Its backups are its own: every worker keeps the weights of the last two epochs in
its own folder, as the machines of a cluster may share no disk, and after a restart the workers agree on
the epoch to continue from (resume_epoch).
"""

from __future__ import annotations

import pathlib
import re

import keras
import numpy as np
import tensorflow as tf

from tasks.common import files
from tasks.modeling import checkpoints

# Keras' BackupAndRestore file of the epoch count, which checkpoints.completed_epochs reads for every strategy.
METADATA_FILE = "training_metadata.json"
_EPOCH_WEIGHTS = re.compile(r"epoch-(?P<epoch>\d+)\.weights\.h5")


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def describe(strategy: tf.distribute.Strategy) -> str:
    # tf.distribute.MultiWorkerMirroredStrategy is an alias: its class is CollectiveAllReduceStrategy.
    return "MultiWorkerMirroredStrategy" if is_multi_worker(strategy) else type(strategy).__name__.lstrip("_")


def worker_name(strategy: tf.distribute.Strategy) -> str | None:
    """The name of a worker of a cluster that is not the chief, "worker-1" (its backups' folder); None otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if is_chief(strategy) or resolver is None:
        return None
    return f"{resolver.task_type}-{resolver.task_id}"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the outputs: always, except on the non-chief workers of a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0)


def fit_multi_worker(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset,
    epochs: int,
    steps_per_epoch: int,
    label_smoothing: float,
    callbacks: list[keras.callbacks.Callback],
    backup_dir: pathlib.Path | None,
    class_weight: dict[int, float] | None = None,
) -> keras.callbacks.History:
    """model.fit's loop for MultiWorkerMirroredStrategy: `train_data`, repeated, is batched at the global batch size.

    One iterator serves every epoch, as in the stage's model.fit (tasks/train.py says why). `class_weight`
    ({class index: weight}) weighs each image's loss as fit's class_weight does.
    """
    optimizer = model.optimizer
    train_step = _train_step(model, strategy, label_smoothing, class_weight)
    with strategy.scope():
        optimizer.build(model.trainable_variables)
    initial_epoch = resume_epoch(model, strategy, backup_dir)
    # Every worker reads all shards and keeps its share of each global batch: works with any shard count. Cut to
    # the steps this loop takes, as train cuts model.fit's data: on the repeated data, the prefetch after the last
    # step would begin another epoch, which from the shards first fills the shuffle buffer.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    steps = train_data.take(steps_per_epoch * (epochs - initial_epoch))
    batches = iter(strategy.experimental_distribute_dataset(steps.with_options(options)))
    history = keras.callbacks.History()
    callback_list = keras.callbacks.CallbackList([*callbacks, history], model=model, epochs=epochs)
    model.stop_training = False
    callback_list.on_train_begin()
    logs: dict[str, float] = {}
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        loss_sum = correct_sum = count_sum = 0.0
        for step in range(steps_per_epoch):
            images, labels = next(batches)
            callback_list.on_train_batch_begin(step)
            loss, correct, count = (float(value) for value in train_step(images, labels))
            loss_sum, correct_sum, count_sum = loss_sum + loss * count, correct_sum + correct, count_sum + count
            callback_list.on_train_batch_end(step, {"loss": loss_sum / count_sum, "accuracy": correct_sum / count_sum})
            if model.stop_training:
                break
        logs = {"loss": loss_sum / max(count_sum, 1), "accuracy": correct_sum / max(count_sum, 1)}
        # Each worker scores the whole validation split locally: no collectives, exact counts.
        logs["val_loss"], logs["val_accuracy"] = score(model, validation_data, label_smoothing)
        callback_list.on_epoch_end(epoch, logs)
        if backup_dir is not None:
            backup_epoch(model, backup_dir, epoch + 1)
        if model.stop_training:
            break
    optimizer.finalize_variable_values(model.trainable_variables)  # moving averages into the weights, as fit does
    callback_list.on_train_end(logs)
    return history


def _train_step(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    label_smoothing: float,
    class_weight: dict[int, float] | None = None,
):
    """One synchronous step on every replica: (mean loss, correct, count) over the global batch; each image's
    loss weighed by its class's `class_weight`, as fit does (the weighted sum over the batch size)."""
    optimizer = model.optimizer
    weights = None if class_weight is None else tf.constant([class_weight[index] for index in sorted(class_weight)])

    @tf.function
    def train_step(images, labels):
        def replica_step(images, labels):
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                per_example = keras.losses.categorical_crossentropy(
                    labels, probabilities, label_smoothing=label_smoothing
                )
                if weights is not None:
                    per_example *= tf.gather(weights, tf.argmax(labels, -1))
                loss = tf.nn.compute_average_loss(per_example)  # divided by the global batch, as fit does
                if model.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
                scaled_loss = optimizer.scale_loss(loss)  # loss scaling under mixed precision, else the loss
            gradients = tape.gradient(scaled_loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(labels, -1), tf.argmax(probabilities, -1)), tf.float32))
            return loss, correct, tf.cast(tf.shape(labels)[0], tf.float32)

        loss, correct, count = strategy.run(replica_step, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in (loss, correct, count)]

    return train_step


def score(model: keras.Model, data: tf.data.Dataset, label_smoothing: float = 0.0) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on batches of (images, one-hot labels), computed in this process alone.

    model.evaluate would do, except under MultiWorkerMirroredStrategy: this works under every strategy.
    """
    predict = tf.function(lambda images: model(images, training=False))
    batches = [(keras.ops.convert_to_numpy(predict(images)), labels.numpy()) for images, labels in data]
    probabilities = np.concatenate([batch for batch, _ in batches])
    labels = np.concatenate([batch for _, batch in batches])
    losses = keras.ops.convert_to_numpy(
        keras.losses.categorical_crossentropy(labels, probabilities, label_smoothing=label_smoothing)
    )
    return float(losses.mean()), float((probabilities.argmax(-1) == labels.argmax(-1)).mean())


def validation_scores(model: keras.Model, data: tf.data.Dataset, label_smoothing: float = 0.0) -> dict[str, float]:
    """{"loss", "accuracy"} of `model` on `data` as model.evaluate reports them (the loss with the weights'
    regularization), scored in this process alone: under every strategy, on a split of any size."""
    loss, accuracy = score(model, data, label_smoothing)
    if model.losses:
        loss += float(keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.stack(model.losses))))
    return {"loss": loss, "accuracy": accuracy}


class Validation(keras.callbacks.Callback):
    """val_loss and val_accuracy in each epoch's logs, scored in this process, for model.fit under several
    replicas, which is given no validation data.

    Keras' own validation splits every batch over the replicas, and fails on a small split: it averages the
    first batch over them before the first step, which fails unless both got as many images, and a replica
    given no image of a last, partial batch fails its convolutions. Scoring here needs neither. With moving
    averages (`averages`) the averages are scored, as fit's SwapEMAWeights does it. Must come first in the
    callback list: the others read these logs.
    """

    def __init__(self, data: tf.data.Dataset, label_smoothing: float, averages: bool):
        super().__init__()
        self.data, self.label_smoothing, self.averages = data, label_smoothing, averages

    def on_epoch_end(self, epoch, logs=None):
        swap = keras.callbacks.SwapEMAWeights() if self.averages else None
        if swap is not None:
            swap.set_model(self.model)
            swap.on_test_begin()  # the moving averages into the model, the raw weights kept aside
        try:
            scores = validation_scores(self.model, self.data, self.label_smoothing)
        finally:
            if swap is not None:
                swap.on_test_end()
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in scores.items()})


def backup_epoch(model: keras.Model, backup_dir: pathlib.Path, epochs: int) -> None:
    """This worker's backup after `epochs` epochs: their weights, then the count; the epoch before's weights
    are kept (see resume_epoch), older ones deleted. Every epoch, on every worker, so that all hold the same
    epochs."""
    with files.staged_file(backup_dir / f"epoch-{epochs}.weights.h5") as staged:
        model.save_weights(str(staged))
    files.write_json(backup_dir / METADATA_FILE, {"epoch": epochs})
    for epoch, path in _backed_up(backup_dir).items():
        if epoch < epochs - 1:
            path.unlink(missing_ok=True)


def resume_epoch(model: keras.Model, strategy: tf.distribute.Strategy, backup_dir: pathlib.Path | None) -> int:
    """The epoch every worker continues from, its weights loaded: the earliest of the workers' last backups.

    Workers stopped together may be one epoch apart (one wrote its backup, another was killed while writing
    it); each keeps the epoch before its last, so each holds the agreed one. A worker with no backup (a new
    machine) makes all start afresh.
    """
    backed_up = _backed_up(backup_dir) if backup_dir is not None else {}
    latest = max(backed_up, default=0)
    local = strategy.experimental_distribute_values_from_function(lambda context: tf.constant([latest]))
    agreed = int(tf.reduce_min(strategy.gather(local, axis=0)))
    if agreed and agreed not in backed_up:
        agreed = 0  # cannot happen with backups of every epoch; afresh rather than out of step
    if agreed < latest:
        print(f"train: the workers continue after epoch {agreed}, the last one all of them backed up")
        checkpoints.keep_history(backup_dir.parent, agreed)
    if agreed:
        model.load_weights(backed_up[agreed])
    return agreed


def _backed_up(backup_dir: pathlib.Path) -> dict[int, pathlib.Path]:
    """{epochs: weights file} of this worker's backups."""
    found = {}
    for path in backup_dir.glob("epoch-*.weights.h5") if backup_dir.is_dir() else []:
        match = _EPOCH_WEIGHTS.fullmatch(path.name)
        if match:
            found[int(match["epoch"])] = path
    return found
