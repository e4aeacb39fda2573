"""Training throughput: the train stage against a bare model.fit of the same model, and against the CPU's FLOP limit.

    python -m bench.train_throughput                        # keras_cnn and cifar10_tutorial, 4,000 images
    python -m bench.train_throughput --images 600 --epochs 3 --models cifar10_tutorial   # quicker, noisier

32x32 RGB images (bench/input_pipeline.py's CIFAR-like PNGs) go through the convert stage into shards
in a temporary folder (70% of them, 2,800 by default, form the training split). Then, for each model,
in this process, `--runs` times (2 by default, of `--epochs` 12 each side), both sides at once on two
threads taking their epochs in turns, one epoch of each after the other (bench/turns.py): this machine
runs the same work faster or slower from one minute to the next, and turns give both sides the same
minutes (run after run, as before, the ratio moved 0.888x-1.130x the same day). Even in turns, one epoch
of a side against the next of the other moves by up to a quarter, and the median of seven steady epochs a
side moved 0.924x-0.998x between two identical stages: ten a run, twenty a side in all, about halve what
reaches the ratio of that. Each run also costs a model build, tracing and (for the stage) a saved
model, so two long runs time more epochs than several short ones (docs/benchmarks-history.md,
train_throughput):
- bare fit: the same network (`tasks.modeling.architectures.build_model`), loss, optimizer (with its moving averages)
  and batch size, `model.fit` on the training split held in memory (decoded once, centre-cropped to the
  input size, no distortion) as one repeated, shuffled, prefetched tf.data dataset, with the stage's steps
  per epoch and per call; validating on the validation split from memory.
- train stage: `tasks.train.train` on the shards with its defaults from params.yaml and the seed's
  settings from the README's model table: tf.data pipeline with distortions, progress lines, CSV,
  MLflow metrics (a SQLite store in the temporary folder), TensorBoard scalars and weight histograms,
  backups (every `train.backup_every_seconds`), moving-average swap for validation (the best-epoch
  checkpoint only with `train.restore_best`, off by default), and after training the saved model
  and MLflow model logging (not part of any epoch, so not in the figure).
Both are timed by the same Keras callback, the last in the list: an epoch lasts from the end of the
one before to its own end (the training steps, the validation pass and every callback of the
epoch). The first epoch (tracing, filling the cache) and the last (the stage then also scores the
raw weights) are left out. A side's images/s is that of its median timed epoch (of twenty by
default). Both keep one input iterator for the whole fit: given NumPy arrays, Keras makes a new one
every epoch, and on this machine four or five epochs in ten then left one core idle much of the time
(an earlier anchor that flattered the stage). The median is not moved by a few slow epochs, where
the throughput over all of them (reported beside it, as "all epochs") is, and the fastest epoch of
each side (also reported) compares the two at their best (docs/benchmarks-history.md, train_throughput).
The process's CPU time per image is compared the same way.
`train.deterministic: true` (the default) turns on TensorFlow's op determinism for the whole
process, so it is turned on first, for both sides.

The FLOP limit: the model's forward FLOPs per image are counted from its layer shapes (2 x
multiply-adds of every convolution and dense layer; pooling, normalization and activations are
left out, so the fraction is if anything understated), a training step is taken as 3 x forward
(backward = 2 x forward), and the limit is a 2048 x 2048 fp32 matmul timed right after every epoch
of both sides (outside the epoch's time, so that both sides start their epochs after the same
work), the fastest of them. The fraction compares the kernels with the machine, each at its best:
the stage's training FLOPs per second in its fastest epoch over that limit. It is also given per
CPU second of this process (the stage's least costly epoch over the least costly matmul).
Goals: the stage at least 0.95x the bare fit's images/s for every model; cifar10_tutorial's stage at
least 50% of the FLOP limit on CPU. Exits non-zero when one is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from bench import input_pipeline
from bench import report as bench_report
from bench.accelerator import forward_flops
from bench.turns import Turns
from tasks import train
from tasks.common import config, contracts
from tasks.data import inputs
from tasks.modeling import architectures, optimizers

PARAMS = pathlib.Path(__file__).resolve().parents[1] / "params.yaml"  # the defaults the stage runs with
REQUIRED_RATIO = 0.95
REQUIRED_FLOP_FRACTION = 0.50  # for cifar10_tutorial on CPU
# The seeds' settings (README: Models) on 32x32 images, and the seeds' batch sizes.
MODEL_SETTINGS = {
    "keras_cnn": {"train.augment": ["shift"], "train.batch_size": 32},
    "cifar10_tutorial": {
        "train.crop_size": [24, 24],
        "train.augment": ["crop", "brightness", "contrast"],
        "train.batch_size": 128,
        "train.optimizer": "sgd",
        "train.learning_rate": 0.1,
        "train.schedule": "exponential",
        "train.decay_steps": 500,
        "train.decay_rate": 0.1,
        "train.staircase": True,
        "train.weight_decay": 0.0001,
    },
}


# One timed epoch: its wall-clock and CPU seconds, then the matmul rate timed after it,
# per wall-clock and per CPU second.
Epoch = tuple[float, float, float, float]


def clocks() -> tuple[float, float]:
    """Wall-clock seconds and this process's CPU seconds."""
    return time.perf_counter(), time.process_time()


class MatmulRate:
    """This device's fp32 matmul rate: the fastest of `repeats` products of two side x side matrices per
    wall-clock second, and the least costly per CPU second of this process."""

    def __init__(self, side: int = 2048):
        self.flops = 2.0 * side**3
        a = tf.random.stateless_normal([side, side], seed=[0, 1])
        b = tf.random.stateless_normal([side, side], seed=[0, 2])
        self._product = tf.function(lambda: tf.reduce_sum(tf.linalg.matmul(a, b)))
        self._product().numpy()  # traced here, not in an epoch's wake

    def measure(self, repeats: int = 3) -> tuple[float, float]:
        fastest, cheapest = float("inf"), float("inf")
        for _ in range(repeats):
            start = clocks()
            self._product().numpy()
            end = clocks()
            fastest, cheapest = min(fastest, end[0] - start[0]), min(cheapest, end[1] - start[1])
        return self.flops / fastest, self.flops / cheapest


class EpochEnds(keras.callbacks.Callback):
    """Each epoch's wall-clock and CPU seconds, from the end of the one before to its end after every callback
    before this one; then the matmul rate, timed outside the epochs. With `turns`, this fit is `side` of two
    taking epochs in turns (bench/turns.py): the clock stops while the other side trains."""

    def __init__(self, matmul: MatmulRate, turns: Turns | None = None, side: int = 0):
        super().__init__()
        self.matmul = matmul
        self.turns = turns
        self.side = side
        self.epochs: list[Epoch] = []

    def on_train_begin(self, logs=None):
        if self.turns:
            self.turns.begin(self.side)
        self.resumed = clocks()

    def on_epoch_end(self, epoch, logs=None):
        end = clocks()
        self.epochs.append((end[0] - self.resumed[0], end[1] - self.resumed[1], *self.matmul.measure()))
        if self.turns:
            self.turns.hand_over(self.side)
        self.resumed = clocks()

    def steady_epochs(self) -> list[Epoch]:
        """Every epoch but the first and the last."""
        return self.epochs[1:-1]


@dataclasses.dataclass(frozen=True)
class Result:
    model: str
    batch_size: int
    train_images: int
    bare_epochs: list[Epoch]  # the steady ones
    stage_epochs: list[Epoch]
    forward_flops_per_image: float
    epochs_in_turns: list[str]  # the side that ended each epoch, in order: the sides alternate

    def _column(self, side: str, index: int) -> list[float]:
        """One figure (0 wall seconds, 1 CPU seconds) of each of the side's steady epochs."""
        return [epoch[index] for epoch in getattr(self, f"{side}_epochs")]

    def images_per_second(self, side: str) -> float:
        """Wall-clock, in the side's median steady epoch."""
        return self.train_images / statistics.median(self._column(side, 0))

    def throughput(self, side: str) -> float:
        """Wall-clock images/s over all the side's steady epochs together."""
        walls = self._column(side, 0)
        return self.train_images * len(walls) / sum(walls)

    def fastest_images_per_second(self, side: str) -> float:
        return self.train_images / min(self._column(side, 0))

    def cpu_seconds_per_image(self, side: str) -> float:
        """This process's CPU time per image in the side's median steady epoch: the work done, whatever else ran."""
        return statistics.median(self._column(side, 1)) / self.train_images

    def least_cpu_seconds_per_image(self, side: str) -> float:
        return min(self._column(side, 1)) / self.train_images

    def matmul_rate(self, per: str = "wall") -> float:
        """The machine's limit: the highest of the matmul rates timed after every steady epoch of both sides,
        per wall-clock or per CPU second."""
        return max(epoch[2 if per == "wall" else 3] for epoch in self.bare_epochs + self.stage_epochs)


def in_memory(
    shards_dir: pathlib.Path, split: str, params: config.TrainParams, class_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """A split as NumPy arrays, centre-cropped to the input size, with one-hot labels:
    what a plain script would feed."""
    images, labels = [], []
    data = inputs.evaluation_data(shards_dir, split, params.image_size, params.input_size, batch_size=1024)
    for image_batch, label_batch in data:
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    return np.concatenate(images), keras.utils.to_categorical(np.concatenate(labels), class_count)


def bare_fit(params: config.TrainParams, shards_dir: pathlib.Path, seed: int, epoch_ends: EpochEnds) -> float:
    """model.fit on the split from memory, its epochs timed by `epoch_ends`; the model's forward FLOPs per image."""
    class_names = contracts.Manifest.read(shards_dir).classes
    x_train, y_train = in_memory(shards_dir, "train", params, len(class_names))
    validation = in_memory(shards_dir, "validation", params, len(class_names))
    keras.utils.set_random_seed(seed)
    model = architectures.build_model(
        params.model, (*params.input_size, 3), len(class_names), weight_decay=params.weight_decay
    )
    # The fair baseline: one repeated tf.data dataset from memory for the whole fit, with the stage's steps per
    # epoch and per call (arrays would give fit a new iterator every epoch, which the stage does not pay).
    steps = inputs.batches_per_epoch(len(x_train), params.batch_size, 1, False)
    train_data = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed)
        .batch(params.batch_size)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )
    validation_data = tf.data.Dataset.from_tensor_slices(validation).batch(params.batch_size)
    model.compile(
        optimizer=optimizers.make_optimizer(params, steps * params.epochs),
        metrics=["accuracy"],
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
        jit_compile=False,
        steps_per_execution=math.gcd(params.log_every_steps, steps),
    )
    model.fit(
        train_data,
        steps_per_epoch=steps,
        epochs=params.epochs,
        validation_data=validation_data,
        callbacks=[epoch_ends],
        shuffle=False,  # the dataset shuffles
        verbose=0,
    )
    return forward_flops(model)


def train_stage(
    params: config.TrainParams, shards_dir: pathlib.Path, folder: pathlib.Path, seed: int, epoch_ends: EpochEnds
) -> None:
    """The train stage, everything on (the MLflow store and outputs in `folder`), its epochs timed by `epoch_ends`."""
    train.train(
        params, seed, shards_dir, folder / "models", checkpoints_dir=folder / "checkpoints", callbacks=[epoch_ends]
    )


@contextlib.contextmanager
def quiet_stdout():
    """The stages' progress lines go nowhere. Around both sides of a `Turns.run`: redirect_stdout replaces
    sys.stdout for the whole process, and two threads entering and leaving it would leave it redirected."""
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        yield


def measure(
    model: str,
    shards_dir: pathlib.Path,
    folder: pathlib.Path,
    epochs: int,
    batch_size: int | None,
    runs: int,
    matmul: MatmulRate,
) -> Result:
    overrides = {"train.model": model, "train.image_size": [32, 32], "train.epochs": epochs, **MODEL_SETTINGS[model]}
    if batch_size:
        overrides["train.batch_size"] = batch_size
    params = config.load_params(PARAMS, overrides)
    bare_epochs, stage_epochs, turns_taken = [], [], []
    for run in range(runs):
        turns = Turns(("bare", "stage"))  # epochs in turns, so that a burst of other work on the host hits both alike
        bare, stage = EpochEnds(matmul, turns, side=0), EpochEnds(matmul, turns, side=1)
        seed, outputs = params.base.seed, folder / f"{model}-{run}"
        with quiet_stdout():
            flops, _ = turns.run(
                functools.partial(bare_fit, params.train, shards_dir, seed, bare),
                functools.partial(train_stage, params.train, shards_dir, outputs, seed, stage),
            )
        bare_epochs += bare.steady_epochs()
        stage_epochs += stage.steady_epochs()
        turns_taken += turns.epochs
    train_images = contracts.Manifest.read(shards_dir).count("train")
    return Result(model, params.train.batch_size, train_images, bare_epochs, stage_epochs, flops, turns_taken)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        type=int,
        default=4000,
        help="32x32 images to convert; 70%% form the training split (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=12,
        help="per run; the first and last are not timed, at least 3 (default: %(default)s)",
    )
    parser.add_argument(
        "--runs", type=int, default=2, help="of each side, each with its epochs in turns (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="for every model (default: each seed's own, 32 or 128)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODEL_SETTINGS), choices=list(MODEL_SETTINGS))
    arguments = parser.parse_args(argv)
    if arguments.epochs < 3:
        parser.error("--epochs must be at least 3: the first and the last epoch are not timed")
    tf.config.experimental.enable_op_determinism()  # what train.deterministic (the default) does, for both sides
    matmul = MatmulRate()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        folder = pathlib.Path(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        shards_dir = input_pipeline.make_shards(folder, arguments.images)
        for model in arguments.models:
            results.append(
                measure(model, shards_dir, folder, arguments.epochs, arguments.batch_size, arguments.runs, matmul)
            )
        del os.environ["MLFLOW_TRACKING_URI"]
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(
        f"{results[0].train_images} training images of 32x32; fp32 matmul: "
        f"{max(result.matmul_rate() for result in results) / 1e9:.1f} GFLOP/s on {device} "
        f"({max(result.matmul_rate('cpu') for result in results) / 1e9:.1f} per CPU second), "
        "the fastest after an epoch; "
        f"images/s and CPU of the median epoch"
    )
    rows, report_models, passed = [], {}, True
    for result in results:
        bare, stage = result.images_per_second("bare"), result.images_per_second("stage")
        ratio = stage / bare
        throughput_ratio = result.throughput("stage") / result.throughput("bare")
        fastest_ratio = result.fastest_images_per_second("stage") / result.fastest_images_per_second("bare")
        cpu_ratio = result.cpu_seconds_per_image("bare") / result.cpu_seconds_per_image("stage")
        training_flops = 3 * result.forward_flops_per_image
        # Kernels against the machine, each at its best: the stage's fastest epoch over the fastest matmul.
        fraction = training_flops * result.fastest_images_per_second("stage") / result.matmul_rate()
        # The same per CPU second of this process: what the model gets out of the cycles it is given.
        cpu_fraction = training_flops / result.least_cpu_seconds_per_image("stage") / result.matmul_rate("cpu")
        rows.append(
            [
                result.model,
                "bare model.fit (tf.data, memory)",
                result.batch_size,
                bare,
                1000 * result.cpu_seconds_per_image("bare"),
                None,
                None,
                None,
                None,
                None,
                None,
            ]
        )
        rows.append(
            [
                result.model,
                "train stage",
                result.batch_size,
                stage,
                1000 * result.cpu_seconds_per_image("stage"),
                f"{ratio:.3f}x",
                f"{throughput_ratio:.3f}x",
                f"{fastest_ratio:.3f}x",
                f"{cpu_ratio:.3f}x",
                f"{fraction:.1%}",
                f"{cpu_fraction:.1%}",
            ]
        )
        report_models[result.model] = {
            "batch_size": result.batch_size,
            "bare_images_per_second": round(bare, 1),
            "stage_images_per_second": round(stage, 1),
            "ratio": round(ratio, 3),
            "throughput_ratio": round(throughput_ratio, 3),
            "fastest_epoch_ratio": round(fastest_ratio, 3),
            "cpu_ratio": round(cpu_ratio, 3),
            "forward_flops_per_image": result.forward_flops_per_image,
            "training_flops_per_image": training_flops,
            "matmul_flops_per_second": result.matmul_rate(),
            "matmul_flops_per_cpu_second": result.matmul_rate("cpu"),
            "flop_fraction": round(fraction, 4),
            "cpu_flop_fraction": round(cpu_fraction, 4),
            "bare_epochs_wall_cpu_matmul": result.bare_epochs,
            "stage_epochs_wall_cpu_matmul": result.stage_epochs,
            "epochs_in_turns": result.epochs_in_turns,
        }
    bench_report.print_table(
        [
            "model",
            "method",
            "batch",
            "images/s",
            "CPU ms/image",
            "ratio",
            "all epochs",
            "fastest epochs",
            "CPU ratio",
            "of FLOP limit",
            "per CPU s",
        ],
        rows,
    )
    for result in results:
        passed &= bench_report.check(
            f"{result.model}: train stage over bare fit", report_models[result.model]["ratio"], REQUIRED_RATIO
        )
    if "cifar10_tutorial" in report_models and device == "CPU":
        passed &= bench_report.check(
            "cifar10_tutorial: fraction of the fp32 FLOP limit",
            report_models["cifar10_tutorial"]["flop_fraction"] * 100,
            REQUIRED_FLOP_FRACTION * 100,
            unit="%",
        )
    bench_report.write(
        "train_throughput",
        {
            "images": arguments.images,
            "train_images": results[0].train_images,
            "epochs": arguments.epochs,
            "device": device,
            "required_ratio": REQUIRED_RATIO,
            "required_flop_fraction": REQUIRED_FLOP_FRACTION,
            "models": report_models,
            "passed": passed,
        },
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
