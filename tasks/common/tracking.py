"""Where MLflow keeps its records, and the small file that carries a run's identity between stages.

With no MLFLOW_TRACKING_URI, runs go to mlflow.db (SQLite) and mlartifacts/ in the working folder:
no server needed, and `mlflow ui --backend-store-uri sqlite:///mlflow.db` browses them.
The train stage starts the run and writes its id to <paths.models>/run.json (contracts.RunRecord);
evaluate and register, whether in other processes (dvc repro) or in the same one (the Prefect flow),
read it from there and `connect` to its store.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import urllib.parse

import mlflow
import yaml

from tasks.common import errors

CHAMPION = "champion"  # the registry alias of the model in production: register moves it, the others read it


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
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:///"):
        # Beside the database file, so that the store is one folder to back up or delete; a tracking
        # server chooses its own artifact store.
        database = pathlib.Path(client.tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def load_logged_model(model_uri: str):
    """The Keras model logged at `model_uri` (models:/NAME@ALIAS, runs:/..., ...), loaded in Keras' safe mode.

    Not mlflow.tensorflow.load_model: it first unpickles (cloudpickle) the custom objects saved beside
    the model, which runs whatever code that file holds, whoever wrote it to the artifact store. The
    .keras file alone needs no pickle: its custom layers are this package's registered serializables.
    """
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
    return load_model_file(model_file, what=model_uri)


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
