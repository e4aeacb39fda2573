"""The seeds' optimizers and learning-rate schedules, by name, from Keras.

Learning rates are per step and never rescaled behind the user's back: with N replicas the global
batch is still `train.batch_size`, so a change of batch size is a change of params.
"""

from __future__ import annotations

import keras

from tasks.common import config


def make_optimizer(params: config.TrainParams, total_steps: int, learning_rate: float | None = None) -> keras.optimizers.Optimizer:
    """`params.optimizer` on `params.schedule` over `total_steps`; `learning_rate` replaces the schedule by a constant."""
    rate = learning_rate if learning_rate is not None else make_schedule(params, total_steps)
    # Moving averages of the weights (the tutorial's evaluator uses them), kept by the optimizer itself.
    average = {"use_ema": params.ema_momentum is not None, "ema_momentum": params.ema_momentum or 0.99}
    name = params.optimizer
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else params.momentum
        return keras.optimizers.SGD(rate, momentum=momentum, nesterov=name == "nesterov", **average)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(rate, momentum=params.momentum, **average)
    if name == "adam":
        return keras.optimizers.Adam(rate, **average)
    if name == "adagrad":
        return keras.optimizers.Adagrad(rate, **average)
    if name == "adadelta":
        return keras.optimizers.Adadelta(rate, **average)
    raise ValueError(f"train.optimizer = {name!r}; expected one of {', '.join(config.OPTIMIZERS)}")


def make_schedule(params: config.TrainParams, total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate as a function of the step: constant, exponential, piecewise (÷10 per boundary), cosine."""
    rate = params.learning_rate
    if params.schedule == "constant":
        return rate
    if params.schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(rate, params.decay_steps, params.decay_rate, staircase=params.staircase)
    if params.schedule == "piecewise":
        values = [rate / 10**index for index in range(len(params.boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(list(params.boundaries), values)
    if params.schedule == "cosine":
        if params.warmup_steps >= total_steps:
            raise ValueError(f"train.warmup_steps = {params.warmup_steps} leaves no step to decay over; training has {total_steps} steps")
        if not params.warmup_steps:
            return keras.optimizers.schedules.CosineDecay(rate, total_steps)
        return keras.optimizers.schedules.CosineDecay(
            0.0, total_steps - params.warmup_steps, warmup_target=rate, warmup_steps=params.warmup_steps
        )
    raise ValueError(f"train.schedule = {params.schedule!r}; expected one of {', '.join(config.SCHEDULES)}")
