"""The registry of distribution strategies `train.strategy` can name, and the devices they run on.

    auto          TensorFlow's default; mirrored with several GPUs or train.cpu_devices > 1,
                  multi_worker when TF_CONFIG names a cluster
    mirrored      MirroredStrategy: the tutorial's synchronous towers, one replica per GPU, or per
                  logical CPU device without GPUs
    multi_worker  MultiWorkerMirroredStrategy: the machines named by TF_CONFIG
    one_device    OneDeviceStrategy: the first GPU, else the CPU

TensorFlow is imported inside the functions, not at the top: config.py reads STRATEGIES to check
params.yaml, and must not wait for TensorFlow.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from tasks.common import errors

if TYPE_CHECKING:
    import tensorflow as tf


@functools.cache
def make_strategy(name: str, cpu_devices: int) -> tf.distribute.Strategy:
    """The strategy `name`; call before any other TensorFlow op (logical CPU devices must come first).

    One per process and setting, made once: a second MirroredStrategy in a process numbers its collective
    operations from the same start as the first, and its first all-reduce of a model of another size then
    fails ("Shape mismatch in the collective instance 100"), as a training after another in one process
    (tests, benchmarks, a flow that trains twice) would.
    """
    import tensorflow as tf

    if cpu_devices > 1:
        _split_cpu(cpu_devices)
    if name not in STRATEGIES:
        raise errors.BadInput(f"train.strategy = {name!r}; expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](bool(tf.config.list_physical_devices("GPU")), cpu_devices)


def _auto(has_gpu: bool, cpu_devices: int) -> tf.distribute.Strategy:
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return _multi_worker(has_gpu, cpu_devices)
    if len(tf.config.list_physical_devices("GPU")) > 1 or cpu_devices > 1:
        return _mirrored(has_gpu, cpu_devices)
    return tf.distribute.get_strategy()


def _mirrored(has_gpu: bool, cpu_devices: int) -> tf.distribute.Strategy:
    import tensorflow as tf

    # Without GPUs, mirror over the logical CPU devices (train.cpu_devices) instead of CPU:0 alone.
    devices = None if has_gpu else [device.name for device in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def _multi_worker(has_gpu: bool, cpu_devices: int) -> tf.distribute.Strategy:
    import tensorflow as tf

    if not os.environ.get("TF_CONFIG"):
        raise errors.BadInput(
            "train.strategy = 'multi_worker' needs the TF_CONFIG environment variable (cluster and task); it is not set"
        )
    try:
        json.loads(os.environ["TF_CONFIG"])
    except ValueError as error:
        # Checked here: TensorFlow's own json.loads would fail deep inside it, looking like a bug.
        raise errors.BadInput(
            f"the TF_CONFIG environment variable is not valid JSON ({error}); it names the cluster and this task"
        ) from None
    return tf.distribute.MultiWorkerMirroredStrategy()


def _one_device(has_gpu: bool, cpu_devices: int) -> tf.distribute.Strategy:
    import tensorflow as tf

    return tf.distribute.OneDeviceStrategy("/gpu:0" if has_gpu else "/cpu:0")


STRATEGIES: dict[str, Callable[[bool, int], tf.distribute.Strategy]] = {
    "auto": _auto,
    "mirrored": _mirrored,
    "multi_worker": _multi_worker,
    "one_device": _one_device,
}


def _split_cpu(count: int) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != count:
            raise errors.BadInput(
                f"train.cpu_devices = {count}, but TensorFlow has already started with {existing} CPU device(s) "
                "in this process; logical devices can only be set before: run the stage in a fresh process "
                "(python -m tasks.train)"
            ) from None


def is_chief_process() -> bool:
    """Whether this process writes the outputs, before any strategy exists: from TF_CONFIG alone (the
    command line decides on the lock with it). Always, except on the non-chief workers of a cluster."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError:
        return True  # make_strategy names the broken variable
    task = cluster.get("task") or {}
    if not task.get("type"):
        return True
    has_chief = "chief" in (cluster.get("cluster") or {})
    return task["type"] == "chief" or (not has_chief and task["type"] == "worker" and int(task.get("index", 0)) == 0)
