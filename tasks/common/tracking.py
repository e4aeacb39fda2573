"""Where MLflow keeps its records, and the small file that carries a run's identity between stages.

With no MLFLOW_TRACKING_URI, runs go to mlflow.db (SQLite) and mlartifacts/ in the working folder:
no server needed, and `mlflow ui --backend-store-uri sqlite:///mlflow.db` browses them.
The train stage starts the run and writes its id to <paths.models>/run.json (contracts.RunRecord);
evaluate and register, whether in other processes (dvc repro) or in the same one (the Prefect flow),
read it from there and `connect` to its store.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import urllib.parse

import mlflow
import yaml

from tasks.common import errors

CHAMPION = "champion"  # the registry alias of the model in production: register moves it, the others read it
# What MLflow 3's UI reads to tell an experiment of model training runs from a GenAI one (ExperimentKind in
# its code; "Machine learning" on the experiment's page). 3.17's UI reads it only with its GenAI / Model
# training switch turned off in its build, and it is on: there the switch picks the pages (EXPERIMENT_DESCRIPTION).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the Markdown the UI shows as a run's or an experiment's description
DATA_CONTEXT_TAG = "mlflow.data.context"  # what a data set was to the run (mlflow.log_input(context=...))
# The contexts of the data sets a training run logs as its inputs (training_run), in the order told.
DATA_CONTEXTS = ("training", "validation", "test")
# The experiment's description (the home page lists it). MLflow 3.17's UI opens every experiment on its GenAI
# pages, whatever EXPERIMENT_KIND says, until the user picks "Model training" (it remembers the choice).
EXPERIMENT_DESCRIPTION = (
    "Training runs of the image-classification pipeline, one per training, with their data sets, scores and "
    "registration decision. Pick **Model training** at the top left of the MLflow UI to list and compare them."
)
# Hex digits of a hash that the run shows: in its description, and as its data sets' digests. The UI lists a
# data set as `name (digest)` and cuts what is longer (MLflow keeps 36 characters at most); the whole hash is
# the run's tag manifest_sha256.
SHORT_HASH_LENGTH = 12
# Set by `dvc exp run` in the environment of every stage it runs (dvc/env.py, DVC_EXP_NAME): the
# experiment's name, e.g. "tipsy-lamb", given or generated.
DVC_EXPERIMENT_VARIABLE = "DVC_EXP_NAME"
DVC_BASELINE_VARIABLE = "DVC_EXP_BASELINE_REV"  # the commit the experiment started from


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the SQLite file in the working folder.

    A user name and password in the URI (https://user:password@host) are handed to MLflow as
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead, which it sends the same way (basic
    authentication), and the URI is used without them: MLflow prints its URI in run links and error
    messages, and this pipeline stores it beside the model.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{pathlib.Path.cwd() / 'mlflow.db'}"
    parts = urllib.parse.urlsplit(uri)
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(parts.username or ""))
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(parts.password))
        uri = errors.without_credentials(uri)
    return uri


def version_with_alias(client: mlflow.MlflowClient, model_name: str, alias: str):
    """The registered version of `model_name` that holds `alias`, or None (no such model, or no version holds it).

    Through the model's aliases: asking for an alias no version holds raises the same error code as a bad request.
    """
    try:
        version = client.get_registered_model(model_name).aliases.get(alias)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if version is None else client.get_model_version(model_name, str(version))


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing; marked as a model-training experiment (EXPERIMENT_KIND)
    and described, unless it already says what it is."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an earlier release, or by hand
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if DESCRIPTION_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION)
        return experiment.experiment_id
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:///"):
        # Beside the database file, so that the store is one folder to back up or delete; a tracking
        # server chooses its own artifact store.
        database = pathlib.Path(client.tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / "mlartifacts").as_uri()
    return client.create_experiment(
        name,
        artifact_location=artifact_location,
        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION},
    )


def load_logged_model(model_uri: str):
    """The Keras model logged at `model_uri` (models:/NAME@ALIAS, runs:/..., ...), loaded in Keras' safe mode.

    Not mlflow.tensorflow.load_model: it first unpickles (cloudpickle) the custom objects saved beside
    the model, which runs whatever code that file holds, whoever wrote it to the artifact store. The
    .keras file alone needs no pickle: its custom layers are this package's registered serializables.
    """
    return load_model_file(logged_model_file(model_uri), what=model_uri)


def logged_model_file(model_uri: str) -> pathlib.Path:
    """The .keras file of the model logged at `model_uri`, downloaded; refuses a model that holds none."""
    import mlflow.artifacts
    import mlflow.models

    local = pathlib.Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavors = mlflow.models.Model.load(str(local / "MLmodel")).flavors
    flavor = flavors.get("tensorflow") or flavors.get("keras")
    model_file = local / (flavor or {}).get("data", "data") / "model.keras"
    if flavor is None or not model_file.is_file():
        raise errors.BadInput(
            f"{model_uri} holds no Keras model file (data/model.keras); was it logged by the train stage?"
        )
    return model_file


def load_model_file(path: pathlib.Path, what: str | None = None):
    """A .keras file, loaded in Keras' safe mode: a layer that would run arbitrary Python code
    (a Lambda layer's pickled function) is refused, with the file named."""
    import keras

    from tasks.modeling import architectures  # noqa: F401 - registers the custom layers the file may name

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except ValueError as error:
        if "safe_mode" not in str(error):
            raise
        raise errors.BadInput(
            f"{what or path}: refused to load: it holds code that loading would run (e.g. a Lambda layer), "
            "which Keras' safe mode does "
            "not allow; models this pipeline trains hold none: retrain it, or use a model from a source you trust"
        ) from None


def connect(uri: str) -> None:
    """Points MLflow at the store `uri` (a run record's), with MLFLOW_TRACKING_URI's credentials if any."""
    tracking_uri()  # hands MLFLOW_TRACKING_URI's user name and password, if any, to MLflow in this process
    mlflow.set_tracking_uri(uri)


def dvc_tags(shards_dir: pathlib.Path) -> dict[str, str]:
    """The DVC hash of the shards folder from ./dvc.lock, so `dvc` can bring back the exact data.

    Only when dvc.lock describes the folder as it is now (same file count): a lock left from an earlier
    `dvc repro` would name other data.
    """
    try:
        lock = yaml.safe_load(pathlib.Path("dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            same_folder = pathlib.Path(out.get("path", "")) == shards_dir
            if same_folder and out.get("nfiles") == sum(1 for item in shards_dir.iterdir() if item.is_file()):
                return {"shards_dvc_md5": str(out.get("md5", ""))}
    return {}


def git_tags() -> dict[str, str]:
    """The commit the code came from, and whether the working tree differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(status.strip())).lower()}


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment this process runs in, when `dvc exp run` started it: its name and baseline commit."""
    tags = {}
    if os.environ.get(DVC_EXPERIMENT_VARIABLE):
        tags["dvc_experiment"] = os.environ[DVC_EXPERIMENT_VARIABLE]
    if os.environ.get(DVC_BASELINE_VARIABLE):
        tags["dvc_experiment_baseline"] = os.environ[DVC_BASELINE_VARIABLE]
    return tags


def describe_run(client: mlflow.MlflowClient, run_id: str, decision: str | None = None) -> str:
    """Writes the run's description (its Description in the MLflow UI) from what the run holds: the network,
    the data and its image counts, the scores logged so far and, when given, register's `decision` in words
    (Markdown allowed). Returns the text.

    Rebuilt from the run each time, not appended to: train writes it when the run starts and when the model
    is logged, register again with its decision. What matters most comes first: the UI folds all but the
    first four lines or so under "Show more".
    """
    run = client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    counts = _image_counts(run)
    images = ", ".join(f"{counts[context]} {context}" for context in DATA_CONTEXTS if context in counts)
    warm = tags.get("warm_start.from_scratch") == "false" and "warm_start.source" in tags
    start = f"warm-started from {tags['warm_start.source']}" if warm else "from random weights"
    network, data = run.data.params.get("train.model", "A network"), tags.get("dataset", "its data")
    lines = [
        f"**{network}** trained on **{data}** ({f'{images} images' if images else 'image counts unknown'}), {start}."
    ]
    if decision:
        lines += ["", f"**Registration:** {decision}"]
    lines += ["", *_facts(tags, metrics)]
    text = "\n".join(lines)
    client.set_tag(run_id, DESCRIPTION_TAG, text)
    return text


# The test figures evaluate logs beside precision@1 (test_<name>), as the description words them.
_TEST_FIGURES = (("test_top_5", "top-5"), ("test_macro_avg_f1", "macro F1"), ("test_loss", "loss"))


def _facts(tags: dict[str, str], metrics: dict[str, float]) -> list[str]:
    """The description's list: the scores, the DVC experiment, the data's hashes and the code."""
    facts = []
    if "test_precision_at_1" in metrics:
        test = [f"precision@1 **{metrics['test_precision_at_1']:.4f}**"]
        test += [f"{words} {metrics[key]:.4f}" for key, words in _TEST_FIGURES if key in metrics]
        facts.append(f"- Test: {', '.join(test)}")
    if "validation_accuracy_final" in metrics:
        facts.append(f"- Validation accuracy: {metrics['validation_accuracy_final']:.4f}")
    if "dvc_experiment" in tags:
        baseline = tags.get("dvc_experiment_baseline", "")
        facts.append(
            f"- DVC experiment: `{tags['dvc_experiment']}`" + (f" (from `{baseline[:7]}`)" if baseline else "")
        )
    hashes = [f"manifest sha256 `{tags['manifest_sha256'][:SHORT_HASH_LENGTH]}`"] if "manifest_sha256" in tags else []
    hashes += [f"DVC md5 `{tags['shards_dvc_md5']}`"] if "shards_dvc_md5" in tags else []
    if hashes:
        facts.append(f"- Data: {', '.join(hashes)}")
    if tags.get("git_commit", "unknown") != "unknown":
        changed = " with uncommitted changes" if tags.get("git_dirty") == "true" else ""
        facts.append(f"- Code: git commit `{tags['git_commit'][:7]}`{changed}")
    return facts


def _image_counts(run: mlflow.entities.Run) -> dict[str, int]:
    """{"training": 1200, ...}: the rows of the data sets logged as the run's inputs, by context."""
    counts = {}
    for dataset_input in run.inputs.dataset_inputs:
        context = {tag.key: tag.value for tag in dataset_input.tags}.get(DATA_CONTEXT_TAG)
        profile = json.loads(dataset_input.dataset.profile or "{}")
        if context in DATA_CONTEXTS and "num_rows" in profile:
            counts[context] = int(profile["num_rows"])
    return counts
