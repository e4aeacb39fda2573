"""The product's networks on an accelerator: bare `model.fit` throughput with mixed precision and XLA.

    python -m bench.accelerator                           # on a GPU machine, any Keras backend
    KERAS_BACKEND=jax python -m bench.accelerator         # where TensorFlow itself is not installed

What it measures, and why this and not the train stage itself: the train stage needs TensorFlow
(tf.data shards, the TensorFlow-only LRN op). Where TensorFlow with CUDA can be installed, run
bench.input_pipeline and bench.train_throughput there. Where it cannot, this still shows what the
networks themselves reach on the accelerator: each model of `tasks.modeling.networks` (those that need no
TensorFlow op) is compiled with XLA (`jit_compile=True`) under the `mixed_float16` policy and fitted
on random uint8 images held on the host, 32x32x3, 10 classes. Epochs after the first (tracing and
compiling) are timed and the fastest counts. Throughput is set against the device's float16 matmul
rate measured in the same run: training FLOPs per image (3 x forward, convolutions and dense layers
counted from their shapes) times images/s over that rate. Prints a table and writes
reports/bench/accelerator.json. It checks no goal: the issue's goals are for the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import keras
import numpy as np

from bench import report as bench_report
from tasks.modeling import architectures

# Batch sizes a GPU is usually fed with for these 32x32 networks; each the largest of the seeds' that
# keeps the device busy.
MODEL_BATCHES = {"mnist_cnn": 256, "keras_cnn": 256, "resnet": 128, "vgg16_bn": 128}


def forward_flops(model: keras.Model) -> float:
    """FLOPs of one image's forward pass through the convolutions and dense layers (2 per multiply-add).

    Counted by hand from the layer shapes: TensorFlow's profiler needs a frozen v1 graph for this (and
    is absent on other backends), and these two layer kinds are where nearly all of the arithmetic is.
    Shared with bench.train_throughput; this module imports no TensorFlow.
    """
    flops = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_height, kernel_width = layer.kernel_size
            flops += 2.0 * height * width * filters * kernel_height * kernel_width * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            flops += 2.0 * layer.input.shape[-1] * layer.units
    return flops


def matmul_flops_per_second(dtype: str, side: int = 8192, repeats: int = 10) -> float:
    """The device's matmul rate in `dtype`: the fastest of `repeats` products of two side x side matrices."""
    a = keras.random.normal([side, side], dtype=dtype, seed=1)
    b = keras.random.normal([side, side], dtype=dtype, seed=2)
    keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.matmul(a, b)))  # warm-up
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.matmul(a, b)))  # the sum forces completion
        fastest = min(fastest, time.perf_counter() - start)
    return 2.0 * side**3 / fastest


class EpochTimes(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds, self.start = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def fit_throughput(
    name: str, batch_size: int, images: np.ndarray, labels: np.ndarray, epochs: int, steps_per_execution: int
) -> tuple[float, float, float]:
    """(images/s of the fastest epoch after the first, first epoch's seconds, forward FLOPs per image)."""
    model = architectures.build_model(name, images.shape[1:], 10)
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
        steps_per_execution=steps_per_execution,
    )
    timer = EpochTimes()
    model.fit(images, labels, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[timer])
    return len(images) / min(timer.seconds[1:]), timer.seconds[0], forward_flops(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=51200, help="training images per epoch (default: %(default)s)")
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs per model, the first not timed (default: %(default)s)"
    )
    parser.add_argument(
        "--steps-per-execution", type=int, default=1, help="training steps per compiled call (default: %(default)s)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODEL_BATCHES), choices=list(MODEL_BATCHES))
    arguments = parser.parse_args(argv)
    keras.mixed_precision.set_global_policy("mixed_float16")
    random = np.random.default_rng(0)
    images = random.integers(0, 256, (arguments.images, 32, 32, 3), dtype=np.uint8)
    labels = random.integers(0, 10, arguments.images)
    matmul_rate = matmul_flops_per_second("float16")
    print(f"Keras {keras.__version__} on {keras.backend.backend()}; float16 matmul: {matmul_rate / 1e12:.1f} TFLOP/s")
    rows, results = [], {}
    for name in arguments.models:
        images_per_second, first_epoch, flops = fit_throughput(
            name, MODEL_BATCHES[name], images, labels, arguments.epochs, arguments.steps_per_execution
        )
        fraction = 3 * flops * images_per_second / matmul_rate
        rows.append([name, MODEL_BATCHES[name], images_per_second, first_epoch, 3 * flops / 1e6, f"{fraction:.1%}"])
        results[name] = {
            "batch_size": MODEL_BATCHES[name],
            "images_per_second": round(images_per_second),
            "first_epoch_seconds": round(first_epoch, 2),
            "training_flops_per_image": 3 * flops,
            "matmul_fraction": round(fraction, 4),
        }
    bench_report.print_table(
        ["model", "batch", "images/s", "first epoch s", "training MFLOP/image", "of float16 matmul rate"], rows
    )
    print(f"steps per execution: {arguments.steps_per_execution}")
    bench_report.write(
        "accelerator",
        {
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "policy": "mixed_float16",
            "jit_compile": True,
            "steps_per_execution": arguments.steps_per_execution,
            "images": arguments.images,
            "epochs": arguments.epochs,
            "float16_matmul_flops_per_second": matmul_rate,
            "models": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
