"""Stage 5, register: every good run becomes a Model Registry version; only a better one becomes champion.

    python -m tasks.register        # reads ./params.yaml, writes <paths.registry>

Each version carries the run's test metrics and lineage (run id, git commit, data set manifest hash)
as tags. The alias `champion` moves to the new version only if its precision@1 reaches
`register.min_precision` and beats the current champion's by at least `register.min_improvement`
on the same test set; otherwise the version gets the alias `challenger`. When the test set changed
since the champion was measured, the champion is first re-evaluated on the new one. A champion is
also exported as a SavedModel and a TFLite file, attached to its run. The alias moves last: a
version whose artifacts failed to upload never becomes champion. A version stays tagged
`registration: unfinished` until then.

One run, one version: registering a run again (a rerun after a kill, `dvc repro --force`, changed
`register` settings) decides again for the version it already has instead of adding another; a run
that is the champion stays it, as comparing it with itself decides nothing.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import tempfile
from typing import Any

import mlflow
import mlflow.entities
import mlflow.exceptions

from tasks.common import config, contracts, errors, tracking

CHAMPION = tracking.CHAMPION
CHALLENGER = "challenger"
REGISTRATION_TAG = "registration"  # "unfinished" from registering until the alias is set, then "complete"
REEVALUATION_BATCH_SIZE = 128  # images per step when the champion is re-scored on a new test set


@dataclasses.dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: str
    alias: str
    reason: str


def arguments(params: config.Params) -> dict[str, Any]:
    """The stage's arguments, chosen from the settings: `python -m`, the flow, benchmarks and tests all call it."""
    return dict(
        params=params.registration,
        model_name=params.registered_model_name,
        model_dir=params.model_dir,
        shards_dir=params.shards_dir,
        metrics_path=params.metrics_path,
        registry_path=params.registry_path,
    )


def register(
    params: config.RegisterParams,
    model_name: str,
    model_dir: pathlib.Path,
    shards_dir: pathlib.Path,
    metrics_path: pathlib.Path,
    registry_path: pathlib.Path,
) -> RegisterResult:
    """Registers the run of `model_dir` as a version of `model_name` and decides its alias."""
    run = contracts.RunRecord.read(model_dir)
    scores = contracts.Scores.read(metrics_path)
    precision = scores.precision_at_1
    if not math.isfinite(precision):
        raise errors.BadInput(f"{metrics_path}: precision_at_1 is {precision!r}; nothing registered")

    tracking.connect(run.tracking_uri)
    client = mlflow.MlflowClient()
    model_id = run.model_uri.removeprefix("models:/")
    if client.get_logged_model(model_id).status != mlflow.entities.LoggedModelStatus.READY:
        raise errors.Outage(f"the model of run {run.run_id} was not completely uploaded; rerun the train stage")
    champion = tracking.version_with_alias(client, model_name, CHAMPION)
    registered = _version_of_run(client, model_name, run.run_id)
    if champion is not None and champion.run_id == run.run_id:
        version, alias, reason = str(champion.version), CHAMPION, champion.tags.get("decision", "already the champion")
    else:
        champion_precision = None if champion is None else _champion_precision(client, champion, run, shards_dir)
        alias, reason = _decide(params, precision, champion, champion_precision)
        tags = {
            "run_id": run.run_id,
            "dataset": run.dataset,
            "manifest_sha256": run.manifest_sha256,
            "decision": reason,
            **{f"test_{key}": str(value) for key, value in scores.flat().items()},
            **{
                key: value
                for key, value in client.get_run(run.run_id).data.tags.items()
                if key.startswith(("git_", "shards_dvc"))
            },
            REGISTRATION_TAG: "unfinished",  # until its alias is set
        }
        if registered is None:
            version = str(mlflow.register_model(run.model_uri, model_name, tags=tags).version)
        else:
            version = str(registered.version)
            for key, value in tags.items():
                client.set_model_version_tag(model_name, version, key, value)
        if alias == CHAMPION:
            _attach_exports(run.run_id, model_dir, params.tflite_float16)
        client.set_registered_model_alias(model_name, alias, version)
    if alias == CHAMPION and str(client.get_registered_model(model_name).aliases.get(CHALLENGER)) == version:
        client.delete_registered_model_alias(model_name, CHALLENGER)  # a challenger registered again, now promoted
    client.set_model_version_tag(model_name, version, REGISTRATION_TAG, "complete")
    contracts.Decision(
        model_name=model_name, version=version, alias=alias, reason=reason, run_id=run.run_id, model_uri=run.model_uri
    ).write(registry_path)
    return RegisterResult(model_name=model_name, version=version, alias=alias, reason=reason)


def _version_of_run(
    client: mlflow.MlflowClient, model_name: str, run_id: str
) -> mlflow.entities.model_registry.ModelVersion | None:
    """The version `run_id` already has, finished or not (the latest, where earlier releases registered a run twice)."""
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return max(versions, key=lambda version: int(version.version)) if versions else None


def _champion_precision(
    client: mlflow.MlflowClient, champion, run: contracts.RunRecord, shards_dir: pathlib.Path
) -> float:
    """The champion's precision@1 on this run's test set: from its tags, or measured now."""
    measured_tag = f"test_precision_at_1_on_{run.manifest_sha256[:16]}"
    if champion.tags.get("manifest_sha256") == run.manifest_sha256:
        return float(champion.tags["test_precision_at_1"])
    if measured_tag in champion.tags:
        return float(champion.tags[measured_tag])
    # The test set changed (new images, another split): comparing the old number would be meaningless.
    import mlflow.models

    from tasks.modeling import scoring  # TensorFlow is only needed on this path

    champion_uri = f"models:/{champion.name}/{champion.version}"
    model = tracking.load_logged_model(champion_uri)
    recorded = (mlflow.models.get_model_info(champion_uri).metadata or {}).get("preprocessing")
    fixed = tuple(model.input_shape[1:3])  # a model registered before its metadata said how to prepare images
    preprocessing = (
        contracts.Preprocessing.model_validate(recorded)
        if recorded
        else contracts.Preprocessing(image_size=fixed, input_size=fixed)
    )
    predictions = scoring.predict_split(
        model, shards_dir, "test", REEVALUATION_BATCH_SIZE, preprocessing.image_size, preprocessing.input_size
    )
    precision = scoring.score(
        predictions.labels, predictions.probabilities, predictions.probabilities.shape[1]
    ).precision_at_1
    client.set_model_version_tag(champion.name, champion.version, measured_tag, str(precision))
    return precision


def _decide(
    params: config.RegisterParams, precision: float, champion, champion_precision: float | None
) -> tuple[str, str]:
    if precision < params.min_precision:
        return CHALLENGER, f"precision@1 {precision:.4f} is below register.min_precision {params.min_precision}"
    if champion is None:
        return (
            CHAMPION,
            f"first version to reach register.min_precision {params.min_precision} (precision@1 {precision:.4f})",
        )
    gain = precision - champion_precision
    comparison = (
        f"precision@1 {precision:.4f} vs champion version {champion.version}'s {champion_precision:.4f} "
        "on the same test set"
    )
    if gain >= params.min_improvement:
        return CHAMPION, f"{comparison}: +{gain:.4f} >= register.min_improvement {params.min_improvement}"
    return CHALLENGER, f"{comparison}: {gain:+.4f} < register.min_improvement {params.min_improvement}"


def _attach_exports(run_id: str, model_dir: pathlib.Path, tflite_float16: bool) -> None:
    from tasks.modeling import export  # TensorFlow is only needed for a champion

    with tempfile.TemporaryDirectory() as folder:
        exported = export.export_model(model_dir / contracts.MODEL_FILE, pathlib.Path(folder), tflite_float16)
        with mlflow.start_run(run_id=run_id):
            for path in exported:
                (
                    mlflow.log_artifacts(str(path), f"export/{path.name}")
                    if path.is_dir()
                    else mlflow.log_artifact(str(path), "export")
                )


def main(argv: list[str] | None = None) -> None:
    errors.stage_parser(__doc__).parse_args(argv)
    result = register(**arguments(config.load_params()))
    print(
        f"register: {result.model_name} version {result.version} is models:/{result.model_name}@{result.alias}: "
        f"{result.reason}"
    )


if __name__ == "__main__":
    sys.exit(errors.run_main(main, exclusive=True))
