"""Calibrated confidence: a temperature fitted on the validation split, and how well confidences match
accuracy (the expected calibration error).

A network trained with cross-entropy is confident beyond its accuracy, near 100% even on its
mistakes. Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides
its logits by one number T, fitted to minimise the negative log-likelihood of held-out images; the
saved model applies it in its last layer (architectures.Calibrate). One parameter cannot overfit a
validation split of a few hundred images, and it leaves every image's predicted class unchanged.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.special

BINS = 15  # equal-width confidence bins of the expected calibration error, as Guo et al. report it
TEMPERATURE_RANGE = (0.05, 20.0)  # searched on a log scale; beyond it the model is broken, not miscalibrated
# Below this many validation images a fitted temperature is more noise than correction (on 9 images of a model
# that had learned nothing, the fit sharpened it tenfold and tripled the calibration error): the network's
# own probabilities stay. Guo et al. fit on 5,000.
MIN_IMAGES = 50


def scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): what architectures.Calibrate computes, in NumPy."""
    logits = np.log(np.maximum(probabilities.astype(np.float64), 1e-30))
    return scipy.special.softmax(logits / temperature, axis=1)


def temperature_for(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, str]:
    """The temperature to save, and how it was chosen: fitted (fit_temperature), or 1 (the network's own
    probabilities) on a split too small to fit on or without a single mistake.

    Without a mistake the likelihood keeps rising as the temperature falls, and the fit would end at the bottom
    of its range: certain of every image, mistakes on new images included. Such a split says nothing about how
    confident to be (a small or easy one often has no mistake).
    """
    if len(labels) < MIN_IMAGES:
        return 1.0, f"kept at 1: {len(labels)} validation images, fewer than the {MIN_IMAGES} a fit needs"
    mistakes = int((probabilities.argmax(axis=1) != labels).sum())
    if not mistakes:
        return 1.0, f"kept at 1: none of the {len(labels)} validation images is misclassified"
    return fit_temperature(
        labels, probabilities
    ), f"fitted on {len(labels)} validation images ({mistakes} misclassified)"


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature that minimises the mean negative log-likelihood of `labels` under the scaled
    `probabilities` (a bounded search over log T; the likelihood is smooth and has one minimum in T)."""
    logits = np.log(np.maximum(probabilities.astype(np.float64), 1e-30))
    rows = np.arange(len(labels))

    def negative_log_likelihood(log_temperature: float) -> float:
        scaled_logits = logits / np.exp(log_temperature)
        return float(np.mean(scipy.special.logsumexp(scaled_logits, axis=1) - scaled_logits[rows, labels]))

    low, high = np.log(TEMPERATURE_RANGE)
    result = scipy.optimize.minimize_scalar(negative_log_likelihood, bounds=(low, high), method="bounded")
    return float(np.exp(result.x))


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> dict[str, list[float]]:
    """Per confidence bin: the images' mean confidence, their accuracy and their count (empty bins included)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 goes to the first.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    return {
        "confidence": np.nan_to_num(mean_confidence).tolist(),
        "accuracy": np.nan_to_num(accuracy).tolist(),
        "count": counts.astype(int).tolist(),
    }


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> float:
    """Sum over confidence bins of (share of images in the bin) x |accuracy - mean confidence|."""
    table = reliability(labels, probabilities, bins)
    counts = np.asarray(table["count"], dtype=float)
    gaps = np.abs(np.asarray(table["accuracy"]) - np.asarray(table["confidence"]))
    return float((counts * gaps).sum() / max(counts.sum(), 1))
