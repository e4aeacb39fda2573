"""Stage 4, evaluate: the trained model (its moving-average weights) on the held-out test split.

    python -m tasks.evaluate        # reads ./params.yaml, writes <paths.metrics> and <paths.evaluation>/

<paths.metrics> (for `dvc metrics show/diff`): precision@1 (the seed's name for top-1 accuracy),
top-5 when there are more than 5 classes, the mean cross-entropy loss, and the macro and weighted
averages of per-class precision, recall and F1. <paths.evaluation>/ holds:

- per_class.csv; predictions.csv (one row per test image: the DVC confusion plot); confusion_matrix.png;
  misclassified.png (the most confidently wrong test images);
- calibration.json: the model's temperature and the test split's expected calibration error before
  (the network's own probabilities) and after (the model's, temperature-scaled) calibration, with their
  reliability tables; reliability.png draws them. The two errors are also run metrics (test_ece_before,
  test_ece_after);
- review.csv: test and validation images for a person to look at, likely label errors first (the given
  label unlikely, another class confidently predicted), then the highest losses; review.png shows the
  first of them. Move or relabel such a file in the source folder, and the next run takes it up.

All of it is logged to the training run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import sklearn.metrics

from tasks.common import config, contracts, disk, errors, files, tracking
from tasks.modeling import architectures, calibration, figures, review, scoring

PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = contracts.PREDICTIONS_FILE
CONFUSION_FILE = "confusion_matrix.png"
MISCLASSIFIED_FILE = "misclassified.png"
CALIBRATION_FILE = "calibration.json"
RELIABILITY_FILE = "reliability.png"
REVIEW_FILE = contracts.REVIEW_FILE
REVIEW_PICTURE_FILE = "review.png"


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    metrics_path: pathlib.Path
    precision_at_1: float
    test_images: int


def arguments(params: config.Params) -> dict[str, Any]:
    """The stage's arguments, chosen from the settings: `python -m`, the flow, benchmarks and tests all call it."""
    return dict(
        params=params.evaluate,
        shards_dir=params.shards_dir,
        model_dir=params.model_dir,
        metrics_path=params.metrics_path,
        evaluation_dir=params.evaluation_dir,
    )


# Its reports are a few small files: no estimate before, but a disk that fills up is named.
@disk.writes(metrics_path="paths.metrics", evaluation_dir="paths.evaluation")
def evaluate(
    params: config.EvaluateParams,
    shards_dir: pathlib.Path,
    model_dir: pathlib.Path,
    metrics_path: pathlib.Path,
    evaluation_dir: pathlib.Path,
) -> EvaluateResult:
    """Scores the model of `model_dir` on the test shards of `shards_dir`, lists the test and validation images
    to review, and logs it all to its run."""
    run = contracts.RunRecord.read(model_dir)
    model = tracking.load_model_file(model_dir / contracts.MODEL_FILE)
    class_names = contracts.read_labels(model_dir)
    preprocessing = contracts.Preprocessing.read(model_dir)
    image_size, input_size = preprocessing.image_size, preprocessing.input_size
    test = scoring.predict_split(model, shards_dir, "test", params.batch_size, image_size, input_size)
    validation = scoring.predict_split(model, shards_dir, "validation", params.batch_size, image_size, input_size)
    scores = scoring.score(test.labels, test.probabilities, len(class_names))
    calibration_report = calibration_of(test.labels, test.probabilities, architectures.temperature_of(model))
    with files.staged_directory(evaluation_dir) as staging:
        per_class = _write_test_reports(test, class_names, staging)
        _write_calibration(calibration_report, staging)
        _write_review(test, validation, class_names, shards_dir, staging)
    scores.write(metrics_path)

    tracking.connect(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics({f"test_{key}": value for key, value in scores.flat().items()})
        mlflow.log_metrics(
            {"test_ece_before": calibration_report["ece_before"], "test_ece_after": calibration_report["ece_after"]}
        )
        mlflow.log_artifact(str(metrics_path), "evaluation")
        mlflow.log_artifacts(str(evaluation_dir), "evaluation")
        mlflow.log_table(per_class, "evaluation/per_class.json")
        for name in (contracts.MANIFEST_FILE, contracts.REJECTED_FILE):
            mlflow.log_artifact(str(shards_dir / name), "dataset")
    return EvaluateResult(metrics_path=metrics_path, precision_at_1=scores.precision_at_1, test_images=scores.images)


def calibration_of(labels: np.ndarray, probabilities: np.ndarray, temperature: float) -> dict[str, Any]:
    """calibration.json's content: the expected calibration error and reliability table of the model's
    probabilities (after calibration) and of the network's own (before: the temperature undone)."""
    uncalibrated = calibration.scaled(probabilities, 1 / temperature)
    return {
        "temperature": temperature,
        "images": int(len(labels)),
        "bins": calibration.BINS,
        "ece_before": calibration.expected_calibration_error(labels, uncalibrated),
        "ece_after": calibration.expected_calibration_error(labels, probabilities),
        "reliability": {
            "before": calibration.reliability(labels, uncalibrated),
            "after": calibration.reliability(labels, probabilities),
        },
    }


def _write_test_reports(
    predictions: scoring.Predictions, class_names: list[str], staging: pathlib.Path
) -> pd.DataFrame:
    """per_class.csv, predictions.csv and the two pictures of the test split, into `staging`; returns the
    per-class table."""
    predicted = predictions.probabilities.argmax(axis=1)
    precision, recall, f1, support = sklearn.metrics.precision_recall_fscore_support(
        predictions.labels, predicted, labels=list(range(len(class_names))), zero_division=0
    )
    per_class = pd.DataFrame(
        {"class": class_names, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
    per_class.to_csv(staging / PER_CLASS_FILE, index=False, float_format="%.6f")
    pd.DataFrame(
        {
            "file": predictions.sources,
            "actual": [class_names[label] for label in predictions.labels],
            "predicted": [class_names[label] for label in predicted],
            "confidence": predictions.probabilities.max(axis=1).round(6),
        }
    ).to_csv(staging / PREDICTIONS_FILE, index=False)
    figures.confusion_matrix(predictions.labels, predicted, class_names, staging / CONFUSION_FILE)
    figures.misclassified_grid(
        [
            (
                image,
                predictions.sources[index],
                class_names[predictions.labels[index]],
                class_names[predicted[index]],
                confidence,
            )
            for confidence, index, image in predictions.worst
        ],
        staging / MISCLASSIFIED_FILE,
    )
    return per_class


def _write_calibration(report: dict[str, Any], staging: pathlib.Path) -> None:
    """calibration.json and reliability.png, into `staging`."""
    (staging / CALIBRATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    before = f"before calibration (ECE {report['ece_before']:.3f})"
    after = f"after, temperature {report['temperature']:.2f} (ECE {report['ece_after']:.3f})"
    figures.reliability_diagram(
        {before: report["reliability"]["before"], after: report["reliability"]["after"]}, staging / RELIABILITY_FILE
    )


def _write_review(
    test: scoring.Predictions,
    validation: scoring.Predictions,
    class_names: list[str],
    shards_dir: pathlib.Path,
    staging: pathlib.Path,
) -> None:
    """review.csv (the test and validation images to look at) and review.png (its first rows), into `staging`."""
    table = review.review_table(
        np.concatenate([test.labels, validation.labels]),
        np.concatenate([test.probabilities, validation.probabilities]),
        test.sources + validation.sources,
        ["test"] * len(test.sources) + ["validation"] * len(validation.sources),
        class_names,
    )
    table.to_csv(staging / REVIEW_FILE, index=False)
    shown = table.head(review.REVIEW_SHOWN)
    images = review.stored_images(shards_dir, set(zip(shown["split"], shown["file"], strict=True)))
    figures.review_grid(
        [
            (images[(row.split, row.file)], row.file, row.given, row.predicted, row.predicted_probability, row.reason)
            for row in shown.itertuples()
        ],
        staging / REVIEW_PICTURE_FILE,
    )


def main(argv: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(argv)
    result = evaluate(**arguments(config.load_params()))
    print(
        f"evaluate: precision@1 {result.precision_at_1:.4f} on {result.test_images} test images, "
        f"in {result.metrics_path}"
    )


if __name__ == "__main__":
    sys.exit(errors.run_main(main, exclusive=True))
