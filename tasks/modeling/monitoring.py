"""What training reports while it runs: Keras callbacks for the console, MLflow and TensorBoard.

Keras ships TensorBoard, CSVLogger, ModelCheckpoint and BackupAndRestore; these are the few things it
does not: the tutorial's progress line with throughput, per-epoch metrics to MLflow by epoch number
(so a resumed run continues its curves), a grid of input images, and the score of the raw weights
beside the moving averages; and Keras' TensorBoard without the step summaries it would not record.
"""

from __future__ import annotations

import math
import pathlib
import time

import keras
import mlflow
import numpy as np
import tensorflow as tf

from tasks.modeling import distributed


class ProgressLogger(keras.callbacks.Callback):
    """`step 10, loss = 4.66 (533.8 examples/sec; 0.240 sec/batch)` every `every_steps` steps, and per epoch.

    It also adds learning_rate, examples_per_second and seconds_per_batch to the epoch's logs, for the
    callbacks after it (CSV, MLflow, TensorBoard).
    """

    def __init__(self, every_steps: int, batch_size: int, print_fn=print):
        super().__init__()
        self.every_steps, self.batch_size, self.print_fn = every_steps, batch_size, print_fn

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.window_start = time.perf_counter()
        self.epoch_steps = self.window_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the epoch's last finished step: with steps_per_execution > 1 Keras calls this once per
        # group of steps. The step counter is read from the device only when a line is printed.
        steps = batch + 1 - self.epoch_steps
        self.epoch_steps, self.window_steps = batch + 1, self.window_steps + steps
        if self.window_steps >= self.every_steps:
            now = time.perf_counter()
            step = int(self.model.optimizer.iterations.numpy())
            self.print_fn(
                f"step {step}, {self._describe(logs)} {self._speed(now - self.window_start, self.window_steps)}"
            )
            self.window_start, self.window_steps = now, 0

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self.epoch_start
        if logs is not None:
            logs["learning_rate"] = self.learning_rate()
            logs["examples_per_second"] = self.epoch_steps * self.batch_size / elapsed
            logs["seconds_per_batch"] = elapsed / max(self.epoch_steps, 1)
        epochs = self.params.get("epochs") if self.params else None
        self.print_fn(f"epoch {epoch + 1}/{epochs}, {self._describe(logs)} {self._speed(elapsed, self.epoch_steps)}")

    def learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def _describe(self, logs) -> str:
        logs = logs or {}
        text = ", ".join(
            f"{key} = {float(logs[key]):.4f}" for key in ("loss", "accuracy", "val_loss", "val_accuracy") if key in logs
        )
        return f"{text}, learning rate = {self.learning_rate():.3g}"

    def _speed(self, elapsed: float, steps: int) -> str:
        steps = max(steps, 1)
        return f"({steps * self.batch_size / elapsed:.1f} examples/sec; {elapsed / steps:.3f} sec/batch)"


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, whose step summaries (an integer `update_freq`) are recorded once in
    `update_freq` calls of the training function but go through tf.summary at every call: 0.6 ms a call, about
    1.4% of a `keras_cnn` epoch of 32x32 images on 2 cores (44 calls of 2 steps). Here the calls whose summaries
    would not be recorded skip that; those recorded are written as Keras writes them."""

    def on_train_batch_end(self, batch, logs=None):
        # Keras counts the calls in _global_train_batch (on_train_batch_begin) and records a call's step summaries
        # when it is a multiple of update_freq (_push_writer).
        if self.update_freq == "epoch" or self._global_train_batch % self.update_freq == 0:
            super().on_train_batch_end(batch, logs)


class MlflowMetrics(keras.callbacks.Callback):
    """Every epoch's logs as MLflow metrics at step = epoch, so that a resumed run continues its curves."""

    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics(
            {key: float(value) for key, value in (logs or {}).items() if math.isfinite(float(value))}, step=epoch
        )


class InputImages(keras.callbacks.Callback):
    """The first training batch, as the network sees it (distorted), as one grid image in TensorBoard."""

    def __init__(self, log_dir: pathlib.Path, images: np.ndarray, max_images: int = 16):
        super().__init__()
        self.log_dir, self.images = log_dir, images[:max_images]

    def on_train_begin(self, logs=None):
        count, height, width, channels = self.images.shape
        columns = math.ceil(math.sqrt(count))
        rows = math.ceil(count / columns)
        grid = np.zeros((rows * (height + 1), columns * (width + 1), channels), dtype=np.uint8)
        for index, image in enumerate(self.images):
            row, column = divmod(index, columns)
            grid[
                row * (height + 1) : row * (height + 1) + height, column * (width + 1) : column * (width + 1) + width
            ] = image
        with tf.summary.create_file_writer(str(self.log_dir / "images")).as_default():
            tf.summary.image("training inputs", grid[np.newaxis], step=0)


class RawWeightsScore(keras.callbacks.Callback):
    """Validation metrics of the raw (not averaged) weights after the last epoch, to show what the averages gain.

    Must come before SwapEMAWeights in the callback list: at that point of on_epoch_end the model still
    holds the raw weights (fit then finalizes the averages into them). Scored in this process
    (distributed.validation_scores): model.evaluate fails on a small split under several replicas.
    """

    def __init__(self, validation_data, label_smoothing: float = 0.0):
        super().__init__()
        self.validation_data, self.label_smoothing, self.scores = validation_data, label_smoothing, {}

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.params["epochs"] - 1:
            self.scores = distributed.validation_scores(self.model, self.validation_data, self.label_smoothing)
