"""The seed's VGG-16 timing harness: seconds per batch of 128 for the forward pass and for forward + backward.

    python -m bench.vgg_timing                       # CPU: 64x64 images, 5 timed batches
    python -m bench.vgg_timing --batches 200         # the article's run (224x224 on a GPU by default)

As the seed article does it: random images, 10 burn-in steps that are not timed (tracing, memory
pools, caches), then N batches of 128, each timed on its own, reported as mean +- standard deviation
of the seconds per batch. The forward pass is the network at inference (dropout off); forward +
backward also computes the gradient of the loss with respect to every weight, without applying it
(the article times the gradient computation, not the optimizer). Each step ends by reading one number
of its result back to the host, so that a step is timed to its end on an asynchronous device.

The network is the product's `vgg16` (configuration D: thirteen 3x3 convolutions, fc 4096, 4096, here
with 1000 classes); the article's TensorFlow version has fc 2048, 2048, which changes its arithmetic by
under 1% at 224x224. On a CPU a batch of 128 images of 224x224 takes minutes, so the CPU defaults are
64x64 images and 5 batches; `--image-size 224 --batches 200` is the article's run. Prints a table and
writes reports/bench/vgg_timing.json. It checks no goal: the article's figures are for its GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import tasks  # noqa: F401 - imported before TensorFlow: turns its start-up notices down
from bench import accelerator
from bench import report as bench_report
from tasks.modeling import architectures

CLASSES = 1000


def time_steps(step, images, labels, burn_in: int, batches: int) -> list[float]:
    """Seconds of each of `batches` calls of `step`, after `burn_in` untimed calls."""
    for _ in range(burn_in):
        float(step(images, labels))
    seconds = []
    for _ in range(batches):
        start = time.perf_counter()
        float(step(images, labels))  # reads the result back: the step is done when this returns
        seconds.append(time.perf_counter() - start)
    return seconds


def steps(model):
    """(forward, forward + backward), each a compiled function of (images, labels) returning a scalar."""
    import keras
    import tensorflow as tf

    loss_function = keras.losses.SparseCategoricalCrossentropy()

    @tf.function(jit_compile=False)
    def forward(images, labels):
        return tf.reduce_sum(model(images, training=False))

    @tf.function(jit_compile=False)
    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_function(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        # Returning a number made from every gradient keeps each of them computed.
        return loss + tf.add_n([tf.reduce_sum(gradient) for gradient in gradients])

    return forward, forward_backward


def main(argv: list[str] | None = None) -> int:
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: %(default)s)")
    parser.add_argument(
        "--image-size", type=int, default=224 if has_gpu else 64, help="side in pixels (default: 224 on a GPU, else 64)"
    )
    parser.add_argument("--burn-in", type=int, default=10, help="untimed steps first (default: %(default)s)")
    parser.add_argument(
        "--batches", type=int, default=200 if has_gpu else 5, help="timed batches (default: 200 on a GPU, else 5)"
    )
    arguments = parser.parse_args(argv)
    random = np.random.default_rng(0)
    shape = (arguments.image_size, arguments.image_size, 3)
    images = tf.constant(random.integers(0, 256, (arguments.batch_size, *shape), dtype=np.uint8))
    labels = tf.constant(random.integers(0, CLASSES, arguments.batch_size))
    model = architectures.build_model("vgg16", shape, CLASSES)
    flops_per_image = accelerator.forward_flops(model)
    forward, forward_backward = steps(model)
    rows, results = [], {}
    for name, step, flops in (
        ("forward", forward, flops_per_image),
        ("forward-backward", forward_backward, 3 * flops_per_image),
    ):
        seconds = time_steps(step, images, labels, arguments.burn_in, arguments.batches)
        mean, deviation = statistics.fmean(seconds), statistics.stdev(seconds) if len(seconds) > 1 else 0.0
        rate = flops * arguments.batch_size / mean
        print(f"{name}: {mean:.3f} +/- {deviation:.3f} sec / batch across {arguments.batches} steps")
        rows.append([name, mean, deviation, arguments.batch_size / mean, rate / 1e9])
        results[name] = {
            "seconds_per_batch_mean": round(mean, 4),
            "seconds_per_batch_std": round(deviation, 4),
            "images_per_second": round(arguments.batch_size / mean, 1),
            "gflops_per_second": round(rate / 1e9, 1),
        }
    bench_report.print_table(["pass", "s/batch mean", "s/batch std", "images/s", "GFLOP/s"], rows)
    bench_report.write(
        "vgg_timing",
        {
            "model": "vgg16",
            "classes": CLASSES,
            "batch_size": arguments.batch_size,
            "image_size": arguments.image_size,
            "burn_in": arguments.burn_in,
            "batches": arguments.batches,
            "forward_flops_per_image": flops_per_image,
            "passes": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
