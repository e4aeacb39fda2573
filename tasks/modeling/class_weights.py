"""How much each class's training images count in the loss (`train.class_weight`).

`balanced` gives each class n_images / (n_classes * n_class_images) of the training split (scikit-learn's
"balanced"), so that every class weighs the same in total; a mapping names the classes to weigh
differently (the others weigh 1.0). Validation and the test split are never weighted.
"""

from __future__ import annotations

from typing import Any

from tasks.common import contracts, errors


def compute(setting: str | dict[str, Any] | None, manifest: contracts.Manifest) -> dict[str, float] | None:
    """{class name: weight} for every class of the data set, in its order; None: unweighted."""
    if setting is None:
        return None
    classes = manifest.classes
    if setting == "balanced":
        counts = manifest.splits["train"].per_class
        total = sum(counts.get(name, 0) for name in classes)
        # scikit-learn's compute_class_weight("balanced") by its formula: it wants every label, the manifest
        # has the counts. A class without training images has nothing to weigh: 1.0 keeps the mapping complete.
        return {name: total / (len(classes) * counts[name]) if counts.get(name) else 1.0 for name in classes}
    unknown = [name for name in setting if name not in classes]
    if unknown:
        raise errors.BadInput(
            f"train.class_weight names the class(es) {', '.join(unknown)}, which the data set does not have; "
            f"its classes are {', '.join(classes)}"
        )
    return {name: float(setting.get(name, 1.0)) for name in classes}


def by_index(weights: dict[str, float] | None, class_names: list[str]) -> dict[int, float] | None:
    """Keras' form: {class index: weight}."""
    return None if weights is None else {index: weights[name] for index, name in enumerate(class_names)}
