"""Stage 4, evaluate: the trained model (its moving-average weights) on the held-out test split.

    python -m tasks.evaluate        # reads ./params.yaml, writes <paths.metrics> and <paths.evaluation>/

<paths.metrics> (for `dvc metrics show/diff`): precision@1 (the seed's name for top-1 accuracy),
top-5 when there are more than 5 classes, the mean cross-entropy loss, and the macro and weighted
averages of per-class precision, recall and F1. <paths.evaluation>/ holds per_class.csv,
predictions.csv (one row per test image: the DVC confusion plot), confusion_matrix.png and
misclassified.png (the most confidently wrong test images). All of it is logged to the training run.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import mlflow
import pandas as pd
import sklearn.metrics

from tasks.common import config, contracts, errors, files, tracking
from tasks.modeling import figures, scoring

PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_FILE = "confusion_matrix.png"
MISCLASSIFIED_FILE = "misclassified.png"


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


def evaluate(
    params: config.EvaluateParams,
    shards_dir: pathlib.Path,
    model_dir: pathlib.Path,
    metrics_path: pathlib.Path,
    evaluation_dir: pathlib.Path,
) -> EvaluateResult:
    """Scores the model of `model_dir` on the test shards of `shards_dir` and logs it all to its run."""
    run = contracts.RunRecord.read(model_dir)
    model = tracking.load_model_file(model_dir / contracts.MODEL_FILE)
    class_names = contracts.read_labels(model_dir)
    preprocessing = contracts.Preprocessing.read(model_dir)
    predictions = scoring.predict_split(
        model, shards_dir, "test", params.batch_size, preprocessing.image_size, preprocessing.input_size
    )
    scores = scoring.score(predictions.labels, predictions.probabilities, len(class_names))
    per_class = _write_reports(predictions, class_names, evaluation_dir)
    scores.write(metrics_path)

    tracking.connect(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics({f"test_{key}": value for key, value in scores.flat().items()})
        mlflow.log_artifact(str(metrics_path), "evaluation")
        mlflow.log_artifacts(str(evaluation_dir), "evaluation")
        mlflow.log_table(per_class, "evaluation/per_class.json")
        for name in (contracts.MANIFEST_FILE, contracts.REJECTED_FILE):
            mlflow.log_artifact(str(shards_dir / name), "dataset")
    return EvaluateResult(metrics_path=metrics_path, precision_at_1=scores.precision_at_1, test_images=scores.images)


def _write_reports(
    predictions: scoring.Predictions, class_names: list[str], evaluation_dir: pathlib.Path
) -> pd.DataFrame:
    """per_class.csv, predictions.csv and the two pictures, written whole into `evaluation_dir`; returns the
    per-class table."""
    predicted = predictions.probabilities.argmax(axis=1)
    with files.staged_directory(evaluation_dir) as staging:
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


def main(argv: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(argv)
    result = evaluate(**arguments(config.load_params()))
    print(
        f"evaluate: precision@1 {result.precision_at_1:.4f} on {result.test_images} test images, "
        f"in {result.metrics_path}"
    )


if __name__ == "__main__":
    sys.exit(errors.run_main(main, exclusive=True))
