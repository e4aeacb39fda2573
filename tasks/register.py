"""Stage 5, register: every good run becomes a Model Registry version; only a proven better one becomes champion.

    python -m tasks.register                                   # reads ./params.yaml, writes <paths.registry>
    python -m tasks.register --promote VERSION --reason "..."  # a person moves `champion` past the gate

Each version carries the run's test metrics and lineage (run id, git commit, data set manifest hash)
as tags. The alias `champion` moves to the new version only if its precision@1 reaches
`register.min_precision` and, scored image by image on the same test images as the current champion
(re-scored on them when the test set changed), it is better at `register.significance` (McNemar's
exact test, tasks/modeling/gate.py), gains at least `register.min_improvement`, and loses no more than
`register.max_class_drop` of any class's recall; otherwise it gets the alias `challenger`. The evidence
goes to the version's tags and description, the run (registration/gate.json) and registry.json.

Before the alias moves, a champion-to-be is exported (SavedModel, TFLite float32, float16 and int8),
each export run on the test split and compared with the Keras model, and the model is served by a real
`mlflow models serve` process whose answers must equal this process's (tasks/modeling/release.py). A
version that fails either stays registered without the alias, tagged `registration: refused`, and the
stage fails with the reason. The alias moves last: a version stays tagged `registration: unfinished`
until then.

One run, one version: registering a run again (a rerun after a kill, `dvc repro --force`, changed
`register` settings) decides again for the version it already has instead of adding another; a run
that is the champion stays it, as comparing it with itself decides nothing.

A forced promotion (--promote) records the person, the time and the reason on the version, and still
needs the version's exports and served-model check to pass.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import math
import pathlib
import sys
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.artifacts
import mlflow.entities
import mlflow.exceptions
import mlflow.models
import pandas as pd

from tasks.common import config, console, contracts, errors, files, tracking
from tasks.modeling import gate

if TYPE_CHECKING:  # release imports TensorFlow, which only a champion-to-be needs
    from tasks.modeling import release

CHAMPION = gate.CHAMPION
CHALLENGER = gate.CHALLENGER
# "unfinished" from registering until the alias is set, then "complete"; "refused" when the exports or the
# served-model check failed.
REGISTRATION_TAG = "registration"
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
        evaluation_dir=params.evaluation_dir,
        registry_path=params.registry_path,
    )


def register(
    params: config.RegisterParams,
    model_name: str,
    model_dir: pathlib.Path,
    shards_dir: pathlib.Path,
    metrics_path: pathlib.Path,
    evaluation_dir: pathlib.Path,
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
    if champion is not None and champion.run_id == run.run_id:
        # Registered before (a rerun after a kill): what was decided then, from the run.
        logged = recorded(run.run_id)
        decision = contracts.Decision.model_validate(
            {
                "reason": champion.tags.get("decision", "already the champion"),  # registered by an older release
                **{key: value for key, value in logged.items() if key in contracts.Decision.model_fields},
                "model_name": model_name,
                "version": str(champion.version),
                "alias": CHAMPION,
                "run_id": run.run_id,
                "model_uri": run.model_uri,
            }
        )
        checked = _release_of(logged)
    else:
        evidence = None
        if champion is not None and precision >= params.min_precision:
            evidence = _evidence(champion, evaluation_dir, shards_dir, run)
        alias, reason = gate.decide(params, precision, evidence)
        version = _registered_version(client, model_name, run, scores, reason, evidence)
        decision = contracts.Decision(
            model_name=model_name,
            version=version,
            alias=alias,
            reason=reason,
            run_id=run.run_id,
            model_uri=run.model_uri,
            evidence=None if evidence is None else evidence.words(),
        )
        checked = None
        if alias == CHAMPION:
            checked = _released(client, decision, model_dir / contracts.MODEL_FILE, shards_dir, params.serve_check)
        client.set_registered_model_alias(model_name, alias, version)
        client.log_dict(run.run_id, _logged(decision, evidence, checked), GATE_FILE)
    _finish(client, decision, checked)
    decision.write(registry_path)
    return RegisterResult(model_name=model_name, version=decision.version, alias=decision.alias, reason=decision.reason)


# The decision, its evidence, the exports' table and the served-model check, logged to the run. The last two
# hold times measured now, so they stay out of registry.json: a rerun writes the same registry.json.
GATE_FILE = "registration/gate.json"


def _logged(
    decision: contracts.Decision, evidence: gate.Evidence | None, checked: release.Release | None
) -> dict[str, Any]:
    return {
        **decision.model_dump(),
        "gate": None if evidence is None else evidence.as_dict(),
        "exports": None if checked is None else checked.exports,
        "served": None if checked is None else checked.served,
    }


def recorded(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """What the run's registration logged (GATE_FILE: the decision, its evidence, the exports' table and the
    served-model check); empty when it logged nothing yet or the store cannot be read."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=GATE_FILE, tracking_uri=tracking_uri)
        return files.read_json(pathlib.Path(local), "")
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return {}


def _release_of(recorded: dict[str, Any]) -> release.Release | None:
    from tasks.modeling import release

    if not recorded.get("exports"):
        return None
    return release.Release(exports=recorded["exports"], served=recorded.get("served") or "")


def _finish(client: mlflow.MlflowClient, decision: contracts.Decision, checked: release.Release | None) -> None:
    """The last steps once the alias is set: no longer challenger when promoted, described, complete."""
    model_name, version = decision.model_name, decision.version
    if decision.alias == CHAMPION and str(client.get_registered_model(model_name).aliases.get(CHALLENGER)) == version:
        client.delete_registered_model_alias(model_name, CHALLENGER)  # a challenger registered again, now promoted
    client.update_model_version(model_name, version, description=_description(decision, checked))
    words = f"version {version} of `{model_name}` is **{decision.alias}**: {decision.reason}."
    if decision.forced:
        words += f" Promoted by hand {decision.forced}."
    if decision.evidence:
        words += f" {decision.evidence}"
    tracking.describe_run(client, decision.run_id, decision=words)
    client.set_model_version_tag(model_name, version, REGISTRATION_TAG, "complete")


def _description(decision: contracts.Decision, checked: release.Release | None) -> str:
    """The version's description in the registry UI: the decision and its evidence in words."""
    parts = [f"**{decision.alias}**: {decision.reason}."]
    for title, text in (
        ("Forced promotion", decision.forced),
        ("Evidence", decision.evidence),
        ("Serving", checked and checked.served),
        ("Exports (each run on the test split, compared with the Keras model)", checked and checked.exports),
    ):
        if text:
            parts.append(f"{title}: {text}" if "\n" not in text else f"{title}:\n\n{text}")
    return "\n\n".join(parts)


def _registered_version(
    client: mlflow.MlflowClient,
    model_name: str,
    run: contracts.RunRecord,
    scores: contracts.Scores,
    reason: str,
    evidence: gate.Evidence | None,
) -> str:
    """The run's version of `model_name`, registered now or earlier, tagged with its metrics, lineage and
    the gate's evidence; marked unfinished until its alias is set."""
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
        **({} if evidence is None else evidence.tags()),
        REGISTRATION_TAG: "unfinished",  # until its alias is set
    }
    registered = _version_of_run(client, model_name, run.run_id)
    if registered is None:
        with console.native_output_hidden():  # MLflow's "Successfully registered model", "Created version": we say it
            return str(mlflow.register_model(run.model_uri, model_name, tags=tags).version)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(registered.version), key, value)
    return str(registered.version)


def _version_of_run(
    client: mlflow.MlflowClient, model_name: str, run_id: str
) -> mlflow.entities.model_registry.ModelVersion | None:
    """The version `run_id` already has, finished or not (the latest, where earlier releases registered a run twice)."""
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return max(versions, key=lambda version: int(version.version)) if versions else None


def _evidence(
    champion, evaluation_dir: pathlib.Path, shards_dir: pathlib.Path, run: contracts.RunRecord
) -> gate.Evidence:
    """The challenger (evaluate's predictions.csv) and the champion on the same test images, image by image."""
    predictions_path = evaluation_dir / contracts.PREDICTIONS_FILE
    if not predictions_path.is_file():
        raise errors.MissingInput(f"{predictions_path} is missing: run the evaluate stage first")
    challenger = pd.read_csv(predictions_path, dtype=str, keep_default_na=False)
    champion_predicted = _champion_predictions(champion, shards_dir, run)
    missing = sorted(set(challenger["file"]) - set(champion_predicted))
    if missing:
        raise errors.BadInput(
            f"{predictions_path} names {len(missing)} test images the shards in {shards_dir} lack (e.g. "
            f"{missing[0]}): the evaluation is of other data; rerun the evaluate stage"
        )
    return gate.compare(
        str(champion.version),
        list(challenger["actual"]),
        list(challenger["predicted"]),
        [champion_predicted[file] for file in challenger["file"]],
    )


def _champion_predictions(champion, shards_dir: pathlib.Path, run: contracts.RunRecord) -> dict[str, str]:
    """The champion's predicted class name for each test image: from its own evaluation when it was made on the
    same data, else measured now on this run's test split."""
    if champion.tags.get("manifest_sha256") == run.manifest_sha256:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=champion.run_id, artifact_path=f"evaluation/{contracts.PREDICTIONS_FILE}"
            )
        except (mlflow.exceptions.MlflowException, OSError):
            local = None  # a champion evaluated before its predictions were logged: measured below
        if local:
            table = pd.read_csv(local, dtype=str, keep_default_na=False)
            return dict(zip(table["file"], table["predicted"], strict=True))
    # The test set changed (new images, another split): comparing old numbers would be meaningless.
    from tasks.modeling import scoring  # TensorFlow is only needed on this path

    champion_uri = f"models:/{champion.name}/{champion.version}"
    model = tracking.load_logged_model(champion_uri)
    metadata = mlflow.models.get_model_info(champion_uri).metadata or {}
    class_names = list(metadata.get("class_names") or [])
    if not class_names:
        raise errors.BadInput(
            f"{champion_uri} (the champion) carries no class_names metadata, so the gate cannot compare it class by "
            "class; make a version champion by hand: python -m tasks.register --promote VERSION --reason ..."
        )
    recorded = metadata.get("preprocessing")
    fixed = tuple(model.input_shape[1:3])  # a model registered before its metadata said how to prepare images
    preprocessing = (
        contracts.Preprocessing.model_validate(recorded)
        if recorded
        else contracts.Preprocessing(image_size=fixed, input_size=fixed)
    )
    predictions = scoring.predict_split(
        model, shards_dir, "test", REEVALUATION_BATCH_SIZE, preprocessing.image_size, preprocessing.input_size
    )
    predicted = [class_names[index] for index in predictions.probabilities.argmax(axis=1)]
    return dict(zip(predictions.sources, predicted, strict=True))


def _released(
    client: mlflow.MlflowClient,
    decision: contracts.Decision,
    model_file: pathlib.Path,
    shards_dir: pathlib.Path,
    serve: bool,
) -> release.Release:
    """The verified exports and served-model check of the version of `decision` (tasks/modeling/release.py); a
    failure refuses the promotion: the version keeps no alias and says why."""
    from tasks.modeling import release

    model_uri = f"models:/{decision.model_name}/{decision.version}"
    try:
        return release.verify_and_attach(decision.run_id, model_file, model_uri, shards_dir, serve)
    except errors.PipelineError as error:
        refusal = f"not promoted: {error}"
        client.set_model_version_tag(decision.model_name, decision.version, REGISTRATION_TAG, "refused")
        client.set_model_version_tag(decision.model_name, decision.version, "decision", refusal[:5000])
        client.update_model_version(decision.model_name, decision.version, description=refusal)
        raise


def promote(
    params: config.RegisterParams,
    model_name: str,
    version: str,
    reason: str,
    shards_dir: pathlib.Path,
    registry_path: pathlib.Path,
) -> RegisterResult:
    """Moves `champion` to `version` of `model_name` past the gate, recording who, when and why; its exports
    and served-model check must still pass."""
    if not reason.strip():
        raise errors.BadInput('--reason is empty: say why the gate is overruled, e.g. --reason "approved by QA"')
    tracking.connect(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    try:
        target = client.get_model_version(model_name, version)
    except mlflow.exceptions.MlflowException as error:
        versions = sorted(int(item.version) for item in client.search_model_versions(f"name = '{model_name}'"))
        known = ", ".join(map(str, versions))
        raise errors.BadInput(
            f"--promote {version}: {model_name} has no such version (versions: {known or 'none'})"
        ) from error
    user = getpass.getuser()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    forced = f"by {user} at {when}: {reason.strip()}"
    previous = tracking.version_with_alias(client, model_name, CHAMPION)
    decision = contracts.Decision(
        model_name=model_name,
        version=str(target.version),
        alias=CHAMPION,
        reason=f"promoted by hand past the gate (champion was version {previous.version if previous else 'none'})",
        run_id=target.run_id,
        model_uri=f"models:/{model_name}/{target.version}",
        forced=forced,
    )
    from tasks.modeling import release

    model_file = release.logged_model_file(decision.model_uri)
    checked = _released(client, decision, model_file, shards_dir, params.serve_check)
    for key, value in {"promotion.user": user, "promotion.time": when, "promotion.reason": reason.strip()}.items():
        client.set_model_version_tag(model_name, decision.version, key, value)
    client.set_model_version_tag(model_name, decision.version, "decision", f"{decision.reason}, {forced}")
    client.set_registered_model_alias(model_name, CHAMPION, decision.version)
    client.log_dict(decision.run_id, _logged(decision, None, checked), GATE_FILE)
    _finish(client, decision, checked)
    decision.write(registry_path)
    return RegisterResult(model_name=model_name, version=decision.version, alias=CHAMPION, reason=decision.reason)


def main(argv: list[str] | None = None) -> None:
    parser = errors.stage_parser(__doc__)
    parser.add_argument("--promote", metavar="VERSION", help="make this version champion, past the gate")
    parser.add_argument("--reason", default="", help="why (required with --promote): recorded on the version")
    options = parser.parse_args(argv)
    params = config.load_params()
    if options.promote is None:
        if options.reason:
            parser.error("--reason goes with --promote VERSION")
        result = register(**arguments(params))
    else:
        result = promote(
            params.registration,
            params.registered_model_name,
            options.promote,
            options.reason,
            params.shards_dir,
            params.registry_path,
        )
    print(
        f"register: {result.model_name} version {result.version} is models:/{result.model_name}@{result.alias}: "
        f"{result.reason}"
    )


if __name__ == "__main__":
    sys.exit(errors.run_main(main, exclusive=True))
