"""The promotion gate's statistics and decision, on made-up predictions whose answer is known."""

import pytest
import scipy.stats

from tasks.common import config
from tasks.modeling import gate
from tests.conftest import REPOSITORY

PARAMS = config.load_params(REPOSITORY / "params.yaml").registration.model_copy(
    update={"min_precision": 0.0, "significance": 0.05, "max_class_drop": 0.1, "min_improvement": 0.0}
)


def _predictions(classes: int, per_class: int, champion_wrong: set[int], challenger_wrong: set[int]):
    """True classes, and the two models' predictions, wrong (class "x") on the given image numbers."""
    actual = [f"c{index % classes}" for index in range(classes * per_class)]

    def predicted(wrong):
        return ["x" if index in wrong else name for index, name in enumerate(actual)]

    return actual, predicted(challenger_wrong), predicted(champion_wrong)


def test_discordant_counts_and_mcnemar_exact_p_value():
    # Champion wrong on images 0-9, challenger wrong on 8-11: 8 right alone (0-7), 2 wrong alone (10, 11).
    actual, challenger, champion = _predictions(4, 25, champion_wrong=set(range(10)), challenger_wrong={8, 9, 10, 11})
    evidence = gate.compare("3", actual, challenger, champion)
    assert (evidence.challenger_only_right, evidence.champion_only_right) == (8, 2)
    assert (evidence.precision_at_1, evidence.champion_precision_at_1) == (0.96, 0.90)
    # P(X >= 8) for X ~ Binomial(10, 1/2) = (45 + 10 + 1) / 1024
    assert evidence.p_value == pytest.approx(56 / 1024)
    assert evidence.p_value == pytest.approx(scipy.stats.binomtest(8, 10, 0.5, alternative="greater").pvalue)
    assert evidence.tags()["gate.challenger_only_right"] == "8"
    assert "McNemar's exact test gives p = 0.05469" in evidence.words()


def test_a_lucky_gain_is_not_enough_and_a_clear_one_promotes():
    lucky = gate.compare("1", *_predictions(4, 25, champion_wrong={0, 1, 2}, challenger_wrong={3}))
    alias, reason = gate.decide(PARAMS, lucky.precision_at_1, lucky)
    assert alias == "challenger", "3 against 1 discordant images is what chance gives (p = 0.31)"
    assert (
        "not better at register.significance 0.05" in reason and "right alone on 3 images, wrong alone on 1" in reason
    )

    clear = gate.compare("1", *_predictions(4, 25, champion_wrong=set(range(0, 40, 4)) | {1, 2}, challenger_wrong={3}))
    alias, reason = gate.decide(PARAMS, clear.precision_at_1, clear)
    assert clear.p_value < 0.01 and alias == "champion"
    assert reason.startswith("precision@1 0.9900 vs champion version 1's 0.8800 on the same 100 test images")


def test_no_discordant_image_decides_nothing():
    same = gate.compare("1", *_predictions(2, 10, champion_wrong={1}, challenger_wrong={1}))
    assert same.p_value == 1.0
    assert gate.decide(PARAMS, same.precision_at_1, same)[0] == "challenger"


def test_a_class_that_loses_too_much_recall_blocks_an_overall_gain():
    # The challenger fixes 12 images of classes c1-c3 but loses 3 of c0's 25 (recall 1.0 -> 0.88).
    champion_wrong = {1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15}
    evidence = gate.compare("2", *_predictions(4, 25, champion_wrong=champion_wrong, challenger_wrong={0, 4, 8}))
    assert evidence.p_value < 0.05
    assert evidence.worst_class() == ("c0", pytest.approx(-0.12))
    alias, reason = gate.decide(PARAMS, evidence.precision_at_1, evidence)
    assert alias == "challenger"
    assert "class c0's recall falls from 1.0000 to 0.8800 (-0.1200), more than register.max_class_drop 0.1" in reason
    loose = PARAMS.model_copy(update={"max_class_drop": 0.15})
    assert gate.decide(loose, evidence.precision_at_1, evidence)[0] == "champion"


def test_a_class_the_champion_does_not_know_counts_against_it():
    actual = ["old"] * 10 + ["new"] * 10
    champion = ["old"] * 20  # it cannot answer "new"
    evidence = gate.compare("1", actual, actual, champion)
    assert evidence.recall_changes["new"] == (0.0, 1.0)
    assert gate.decide(PARAMS, 1.0, evidence)[0] == "champion"


def test_below_min_precision_and_first_version():
    assert gate.decide(PARAMS.model_copy(update={"min_precision": 0.9}), 0.5, None) == (
        "challenger",
        "precision@1 0.5000 is below register.min_precision 0.9",
    )
    assert gate.decide(PARAMS, 0.5, None)[0] == "champion"
