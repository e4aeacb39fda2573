"""The registries of the seeds' optimizers and learning-rate schedules, built from Keras by name.

Learning rates are per step and never rescaled behind the user's back: with N replicas the global
batch is still `train.batch_size`, so a change of batch size is a change of params.

Keras is imported inside the functions, not at the top: config.py reads these registries to check
params.yaml, and must not wait for TensorFlow (about 6 s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tasks.common import errors

if TYPE_CHECKING:
    import keras

    from tasks.common import config

# train.optimizer -> (the Keras optimizer class, its options from the settings).
OPTIMIZERS: dict[str, tuple[str, Callable[[config.TrainParams], dict[str, Any]]]] = {
    "sgd": ("SGD", lambda params: {"momentum": 0.0}),
    "momentum": ("SGD", lambda params: {"momentum": params.momentum}),
    "nesterov": ("SGD", lambda params: {"momentum": params.momentum, "nesterov": True}),
    "rmsprop": ("RMSprop", lambda params: {"momentum": params.momentum}),
    "adam": ("Adam", lambda params: {}),
    "adagrad": ("Adagrad", lambda params: {}),
    "adadelta": ("Adadelta", lambda params: {}),
}


def make_optimizer(
    params: config.TrainParams, total_steps: int, learning_rate: float | None = None
) -> keras.optimizers.Optimizer:
    """`params.optimizer` on `params.schedule` over `total_steps`; `learning_rate` replaces the schedule by a
    constant."""
    import keras

    if params.optimizer not in OPTIMIZERS:
        raise errors.BadInput(f"train.optimizer = {params.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    rate = learning_rate if learning_rate is not None else make_schedule(params, total_steps)
    class_name, options = OPTIMIZERS[params.optimizer]
    # Moving averages of the weights (the tutorial's evaluator uses them), kept by the optimizer itself.
    average = {"use_ema": params.ema_momentum is not None, "ema_momentum": params.ema_momentum or 0.99}
    return getattr(keras.optimizers, class_name)(rate, **options(params), **average)


def _constant(params: config.TrainParams, total_steps: int) -> float:
    return params.learning_rate


def _exponential(params: config.TrainParams, total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    import keras

    return keras.optimizers.schedules.ExponentialDecay(
        params.learning_rate, params.decay_steps, params.decay_rate, staircase=params.staircase
    )


def _piecewise(params: config.TrainParams, total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Divided by 10 at each boundary."""
    import keras

    values = [params.learning_rate / 10**index for index in range(len(params.boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(list(params.boundaries), values)


def _cosine(params: config.TrainParams, total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Cosine decay to 0 over the training, after `warmup_steps` of linear warm-up."""
    import keras

    if params.warmup_steps >= total_steps:
        raise errors.BadInput(
            f"train.warmup_steps = {params.warmup_steps} leaves no step to decay over; training has {total_steps} steps"
        )
    if not params.warmup_steps:
        return keras.optimizers.schedules.CosineDecay(params.learning_rate, total_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, total_steps - params.warmup_steps, warmup_target=params.learning_rate, warmup_steps=params.warmup_steps
    )


# train.schedule -> the learning rate as a function of the step.
SCHEDULES: dict[str, Callable[[config.TrainParams, int], Any]] = {
    "constant": _constant,
    "exponential": _exponential,
    "piecewise": _piecewise,
    "cosine": _cosine,
}


def make_schedule(
    params: config.TrainParams, total_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate of `params.schedule` over `total_steps` steps."""
    if params.schedule not in SCHEDULES:
        raise errors.BadInput(f"train.schedule = {params.schedule!r}; expected one of {', '.join(SCHEDULES)}")
    return SCHEDULES[params.schedule](params, total_steps)
