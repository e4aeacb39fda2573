"""bench/turns.py: two sides take their epochs in turns, set up one after the other, and a failing side stops
neither the other nor the run silently."""

import threading
import time

import pytest

from bench.turns import Turns


def _side(turns: Turns, side: int, epochs: int, log: list[str], fail_at: int | None = None):
    def train():
        log.append(f"{turns.names[side]} set up")
        time.sleep(0.05)  # a set-up that takes a while: the other side must not start its own meanwhile
        log.append(f"{turns.names[side]} ready")
        turns.begin(side)
        for epoch in range(epochs):
            if epoch == fail_at:
                raise RuntimeError(f"{turns.names[side]} failed in epoch {epoch}")
            log.append(f"{turns.names[side]} {epoch}")
            turns.hand_over(side)
        return turns.names[side]

    return train


def test_sides_set_up_one_after_the_other_then_alternate_epochs():
    turns, log = Turns(("bare", "stage")), []
    assert turns.run(_side(turns, 0, 3, log), _side(turns, 1, 3, log)) == ("bare", "stage")
    assert log[:4] == ["bare set up", "bare ready", "stage set up", "stage ready"], "set-ups one after the other"
    assert log[4:] == ["bare 0", "stage 0", "bare 1", "stage 1", "bare 2", "stage 2"]
    assert turns.epochs == ["bare", "stage"] * 3


def test_a_side_with_more_epochs_goes_on_alone_once_the_other_has_ended():
    turns, log = Turns(("a", "b")), []
    turns.run(_side(turns, 0, 1, log), _side(turns, 1, 3, log))
    assert log[4:] == ["a 0", "b 0", "b 1", "b 2"]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failure_is_raised_once_the_other_side_has_finished(failing):
    turns, log = Turns(("a", "b")), []
    sides = [_side(turns, side, 3, log, fail_at=1 if side == failing else None) for side in (0, 1)]
    with pytest.raises(RuntimeError, match=f"{turns.names[failing]} failed in epoch 1"):
        turns.run(*sides)
    other = turns.names[1 - failing]
    assert f"{other} 2" in log, "the other side trains on alone"
    assert not any(thread.name in turns.names for thread in threading.enumerate()), "both threads have stopped"
