"""The promotion gate's evidence: a challenger and the champion compared image by image on the same test images.

One precision@1 against another is a noisy comparison: on 330 test images one image is 0.3 points, and two
runs that differ only in their seed differ by more. The gate looks at the images where exactly one of the
two is right (the discordant pairs): if the models were equally good, each such image would be the
challenger's with probability 1/2. McNemar's exact test (a one-sided binomial test on those counts, from
scipy) says how unlikely the challenger's share is under that assumption; the challenger is better "at
register.significance" when that probability (the p-value) is below it. Per-class recall changes are
checked too: no class may lose more than register.max_class_drop, whatever the overall gain.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.stats

from tasks.common import config

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The two models on the same test images."""

    champion_version: str
    images: int
    precision_at_1: float  # the challenger's
    champion_precision_at_1: float
    challenger_only_right: int  # images the challenger gets right and the champion wrong
    champion_only_right: int  # and the reverse
    p_value: float  # McNemar's exact test, one-sided: is the challenger better?
    recall_changes: dict[str, tuple[float, float]]  # class: (champion's recall, challenger's recall)

    def worst_class(self) -> tuple[str, float]:
        """The class whose recall falls most (or rises least), and the change."""
        name = min(self.recall_changes, key=lambda item: self.recall_changes[item][1] - self.recall_changes[item][0])
        before, after = self.recall_changes[name]
        return name, after - before

    def tags(self) -> dict[str, str]:
        """The evidence as model version tags (flat strings: what the registry stores and the UI lists)."""
        worst, change = self.worst_class()
        return {
            "gate.champion_version": self.champion_version,
            "gate.images": str(self.images),
            "gate.precision_at_1": f"{self.precision_at_1:.4f}",
            "gate.champion_precision_at_1": f"{self.champion_precision_at_1:.4f}",
            "gate.challenger_only_right": str(self.challenger_only_right),
            "gate.champion_only_right": str(self.champion_only_right),
            "gate.p_value": f"{self.p_value:.4g}",
            "gate.worst_class": worst,
            "gate.worst_class_recall_change": f"{change:+.4f}",
        }

    def words(self) -> str:
        """The evidence in sentences, for the version's description and the run summary."""
        worst, change = self.worst_class()
        return (
            f"On the same {self.images} test images, precision@1 {self.precision_at_1:.4f} against champion "
            f"version {self.champion_version}'s {self.champion_precision_at_1:.4f}. Right where the champion was "
            f"wrong on {self.challenger_only_right} images, wrong where it was right on {self.champion_only_right}: "
            f"McNemar's exact test gives p = {self.p_value:.4g} that the challenger is no better. "
            f"Largest per-class recall change: class {worst}, {change:+.4f}."
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(
    champion_version: str, actual: list[str], challenger_predicted: list[str], champion_predicted: list[str]
) -> Evidence:
    """The evidence from each test image's true class and the two models' predicted classes (by name: the
    champion may know other classes than the challenger, and is wrong on a class it does not know)."""
    actual_array = np.asarray(actual)
    challenger_right = np.asarray(challenger_predicted) == actual_array
    champion_right = np.asarray(champion_predicted) == actual_array
    challenger_only = int(np.sum(challenger_right & ~champion_right))
    champion_only = int(np.sum(champion_right & ~challenger_right))
    discordant = challenger_only + champion_only
    # No discordant image: nothing tells the two apart (p = 1).
    p_value = (
        float(scipy.stats.binomtest(challenger_only, discordant, 0.5, alternative="greater").pvalue)
        if discordant
        else 1.0
    )
    recall_changes = {
        name: (float(champion_right[actual_array == name].mean()), float(challenger_right[actual_array == name].mean()))
        for name in sorted(set(actual))
    }
    return Evidence(
        champion_version=champion_version,
        images=len(actual),
        precision_at_1=float(challenger_right.mean()),
        champion_precision_at_1=float(champion_right.mean()),
        challenger_only_right=challenger_only,
        champion_only_right=champion_only,
        p_value=p_value,
        recall_changes=recall_changes,
    )


def decide(params: config.RegisterParams, precision: float, evidence: Evidence | None) -> tuple[str, str]:
    """The alias a version gets (champion or challenger) and why, in one sentence."""
    if precision < params.min_precision:
        return CHALLENGER, f"precision@1 {precision:.4f} is below register.min_precision {params.min_precision}"
    if evidence is None:
        return (
            CHAMPION,
            f"first version to reach register.min_precision {params.min_precision} (precision@1 {precision:.4f})",
        )
    comparison = (
        f"precision@1 {evidence.precision_at_1:.4f} vs champion version {evidence.champion_version}'s "
        f"{evidence.champion_precision_at_1:.4f} on the same {evidence.images} test images"
    )
    worst, change = evidence.worst_class()
    if -change > params.max_class_drop:
        before, after = evidence.recall_changes[worst]
        return CHALLENGER, (
            f"{comparison}, but class {worst}'s recall falls from {before:.4f} to {after:.4f} ({change:+.4f}), "
            f"more than register.max_class_drop {params.max_class_drop}"
        )
    discordant = (
        f"right alone on {evidence.challenger_only_right} images, wrong alone on {evidence.champion_only_right}: "
        f"McNemar p = {evidence.p_value:.4g}"
    )
    if evidence.p_value >= params.significance:
        return CHALLENGER, f"{comparison}: not better at register.significance {params.significance} ({discordant})"
    gain = evidence.precision_at_1 - evidence.champion_precision_at_1
    if gain < params.min_improvement:
        return CHALLENGER, f"{comparison}: +{gain:.4f} < register.min_improvement {params.min_improvement}"
    return CHAMPION, f"{comparison}: better at register.significance {params.significance} ({discordant})"
