"""Two trainings in one process taking their epochs in turns, for benchmarks that compare them.

This machine runs the same work faster or slower from one minute to the next (up to 1.5x within the hour). Two
trainings run one after the other meet different minutes, and their ratio moves with the host (a train stage
over a bare fit: 0.888x, 0.944x and 1.130x in three runs of the same code the same day). Taking epochs in turns,
one epoch of each side after the other, gives both sides the same minutes: a burst of other work on the host
lands on the epochs of both, and the median epochs of both sides are compared over the same stretch of time.

Each side runs on a thread of its own; only one of them trains at a time. A side waits for its turn at the end
of each epoch (`hand_over`, from the last callback of its fit), so the other side's epoch is never in its clock.
While it waits, its input pipeline's prefetch may fill its buffer (a few batches): the work of a pipeline
that runs ahead, as it also does during the validation pass at the end of each epoch.

Threads, not processes: both fits keep one input iterator each for the whole fit, which a fit called one
epoch at a time would not (Keras makes a new iterator every call), and Keras offers no way to pause a fit
between epochs but a callback that blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Turns:
    """Turns between two sides, 0 and 1: side 0 trains first; a side that has ended leaves every turn to the other."""

    def __init__(self, names: tuple[str, str]):
        self.names = names
        self.epochs: list[str] = []  # the name of the side that ended each epoch, in the order they ended
        self._condition = threading.Condition()
        self._turn = 0
        self._ready = [False, False]
        self._over = [False, False]

    def begin(self, side: int) -> None:
        """At the start of a side's fit: waits until the other side is set up too and it is this side's turn."""
        with self._condition:
            self._ready[side] = True
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._over[1 - side] or (self._ready[1 - side] and self._turn == side))

    def hand_over(self, side: int) -> None:
        """At the end of a side's epoch: the other side's turn; returns at this side's next one."""
        with self._condition:
            self.epochs.append(self.names[side])
            self._turn = 1 - side
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._over[1 - side] or self._turn == side)

    def run(self, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
        """`first` (side 0) and `second` (side 1), each on a thread of its own, returning what they return.
        `second` starts when `first` has reached its fit, so that their set-ups (reading data, building a model,
        which seeds Python's and TensorFlow's global generators) do not overlap; a failure of either is raised
        once both have stopped."""
        results: list[Any] = [None, None]
        failures: list[BaseException] = []
        threads = [
            threading.Thread(target=self._work, args=(side, function, results, failures), name=self.names[side])
            for side, function in enumerate((first, second))
        ]
        threads[0].start()
        with self._condition:
            self._condition.wait_for(lambda: self._ready[0] or self._over[0])
        threads[1].start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return results[0], results[1]

    def _work(self, side: int, function: Callable[[], Any], results: list[Any], failures: list[BaseException]) -> None:
        try:
            results[side] = function()
        except BaseException as error:  # raised again by run(), on the main thread
            failures.append(error)
        finally:
            with self._condition:
                self._over[side] = True
                self._turn = 1 - side
                self._condition.notify_all()
